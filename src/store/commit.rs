//! Commit in the store: the intent (recorded on the device record, durable before the kernel
//! is touched), its outcome, and its abandonment when the kernel step fails. Recovery finishes
//! a Commit whose intent is durable from the intent alone.

use std::collections::BTreeMap;

use sled::transaction::{abort, TransactionalTree};
use sled::Transactional;

use super::{
    enc, id_key, ready_snapshot, tx_dec, CommitIntent, DeviceRecord, Kind, SnapshotRecord, Store,
    StoreError, TxResult,
};

/// Checks that active snapshot `key` can be committed as `name` and returns it with its device
/// record.
fn committable(
    snapshots: &TransactionalTree,
    devices: &TransactionalTree,
    key: &str,
    name: &str,
) -> TxResult<(SnapshotRecord, DeviceRecord)> {
    let rec = ready_snapshot(snapshots, key)?;
    if rec.kind != Kind::Active {
        return abort(StoreError::FailedPrecondition(format!(
            "snapshot {key:?} is {}, only an active snapshot can be committed",
            rec.kind.as_str()
        )));
    }
    if snapshots.get(name.as_bytes())?.is_some() {
        return abort(StoreError::AlreadyExists(name.to_string()));
    }
    let Some(v) = devices.get(id_key(rec.thin_id))? else {
        return abort(StoreError::Invariant(format!(
            "snapshot {key:?}: thin id {} has no device record",
            rec.thin_id
        )));
    };
    let dev: DeviceRecord = tx_dec(format!("device {}", rec.thin_id), &v)?;
    Ok((rec, dev))
}

/// The committed record replaces `key`; the device record names its new owner, without intent.
fn apply(
    snapshots: &TransactionalTree,
    devices: &TransactionalTree,
    key: &str,
    intent: &CommitIntent,
) -> TxResult<SnapshotRecord> {
    let (rec, mut dev) = committable(snapshots, devices, key, &intent.name)?;
    snapshots.remove(key.as_bytes())?;
    let mut committed = rec;
    committed.kind = Kind::Committed;
    committed.labels = intent.labels.clone();
    committed.mapped = intent.mapped;
    committed.updated_at = intent.now;
    committed.created_at = intent.now;
    snapshots.insert(intent.name.as_bytes(), enc(&committed))?;
    dev.owner = intent.name.clone();
    dev.commit = None;
    devices.insert(&id_key(committed.thin_id), enc(&dev))?;
    Ok(committed)
}

impl Store {
    /// Records the intent to commit active snapshot `key` as `intent.name` on its device
    /// record; clients still see `key` until [`Store::finish_commit`].
    ///
    /// Returns NotFound if `key` is not there, FailedPrecondition if it is a view or committed,
    /// AlreadyExists if the name is taken.
    pub fn begin_commit(&self, key: &str, intent: &CommitIntent) -> Result<(), StoreError> {
        (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            let (rec, mut dev) = committable(snapshots, devices, key, &intent.name)?;
            dev.commit = Some(intent.clone());
            devices.insert(&id_key(rec.thin_id), enc(&dev))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Finishes the Commit of `key` that [`Store::begin_commit`] recorded.
    ///
    /// Returns NotFound if `key` is not there or has no Commit intent, or what
    /// [`Store::begin_commit`] returns if the snapshot cannot be committed any more.
    pub fn finish_commit(&self, key: &str) -> Result<SnapshotRecord, StoreError> {
        let rec = (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            let rec = ready_snapshot(snapshots, key)?;
            let intent = devices
                .get(id_key(rec.thin_id))?
                .map(|v| tx_dec::<DeviceRecord>(format!("device {}", rec.thin_id), &v))
                .transpose()?
                .and_then(|d| d.commit);
            let Some(intent) = intent else {
                return abort(StoreError::NotFound(format!("commit intent of {key:?}")));
            };
            apply(snapshots, devices, key, &intent)
        })?;
        Ok(rec)
    }

    /// Drops the Commit intent of `key` (its kernel step failed): the snapshot stays active.
    /// Nothing to do if there is none.
    pub fn abandon_commit(&self, key: &str) -> Result<(), StoreError> {
        let Some(rec) = self.get(key)? else {
            return Ok(());
        };
        self.devices.transaction(|devices| {
            if let Some(v) = devices.get(id_key(rec.thin_id))? {
                let mut dev: DeviceRecord = tx_dec(format!("device {}", rec.thin_id), &v)?;
                if dev.commit.take().is_some() {
                    devices.insert(&id_key(rec.thin_id), enc(&dev))?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Turns active snapshot `key` into committed snapshot `name` with `labels` at once (no
    /// intent), keeping its thin id; records `mapped` bytes for Usage.
    ///
    /// Returns NotFound if `key` is not there, FailedPrecondition if it is a view or committed,
    /// AlreadyExists if `name` is taken.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        mapped: u64,
        now: u64,
    ) -> Result<SnapshotRecord, StoreError> {
        let intent = CommitIntent {
            name: name.to_string(),
            labels,
            mapped,
            now,
        };
        let rec = (&self.snapshots, &self.devices)
            .transaction(|(snapshots, devices)| apply(snapshots, devices, key, &intent))?;
        Ok(rec)
    }
}
