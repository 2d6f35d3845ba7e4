//! Quarantined snapshots: a Ready record whose device cannot be used (its thin id is gone from
//! the pool, the kernel refuses to activate it) is kept, marked with the reason, instead of
//! blocking start-up or being dropped. The engine decides when; the store only records it.

use super::{enc, tx_dec, SnapshotRecord, State, Store, StoreError};
use crate::model::ThinId;
use crate::store::Quarantine;

impl Store {
    /// Marks Ready snapshot `key` quarantined with `q`, if it is still the snapshot of thin id
    /// `id` (a key removed and made again meanwhile is left alone). Returns whether it did.
    /// Durable with the next flush.
    ///
    /// Returns an error if the database cannot be read or written.
    pub fn set_quarantine(
        &self,
        key: &str,
        id: ThinId,
        q: &Quarantine,
    ) -> Result<bool, StoreError> {
        let done = self.snapshots.transaction(|snapshots| {
            let Some(v) = snapshots.get(key.as_bytes())? else {
                return Ok(false);
            };
            let mut rec: SnapshotRecord = tx_dec(key, &v)?;
            if rec.state != State::Ready || rec.thin_id != id {
                return Ok(false);
            }
            rec.quarantine = Some(q.clone());
            snapshots.insert(key.as_bytes(), enc(&rec))?;
            Ok(true)
        })?;
        Ok(done)
    }

    /// Every quarantined snapshot, in key order.
    ///
    /// Returns an error if the database cannot be read.
    pub fn quarantined(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        Ok(self
            .snapshots()?
            .into_iter()
            .filter(|(_, r)| r.quarantine.is_some())
            .collect())
    }
}
