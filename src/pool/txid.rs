//! [`NumberedPool`]: the pool that numbers its own changes, so its transaction id is a commit
//! marker, as Docker's devicemapper driver used it.
//!
//! In a pool thinsnap owns (loop mode), every change to the pool's set of thin devices
//! (`create_thin`, `create_snap`, `delete`) is followed by `set_transaction_id N N+1`, one after
//! the other under one lock, so the transaction id in the pool's metadata counts the changes the
//! kernel has made. The engine writes the counter into the store with every flush. At start, a
//! store with no half-done operation whose recorded transaction id equals the pool's knows every
//! thin id the pool holds: no change happened that the store did not see the outcome of.
//! Otherwise recovery reads the pool's thin ids (thin_ls) and reconciles.
//!
//! The wrapper is the only way the engine reaches the pool, so no change can go unnumbered: the
//! numbering is not something a caller has to remember. It also owns the one "deactivate, then
//! delete, a missing thin id being fine" sequence every removal path needs
//! ([`NumberedPool::remove_device`]).
//!
//! A pool thinsnap does not own gets no `set_transaction_id`: LVM keeps the transaction id of
//! its pools in its own metadata and refuses to activate one whose kernel id differs (see
//! [`super::lvm`]); someone else's pool is theirs to number.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::{HostRoom, PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};

/// See the module doc.
pub struct NumberedPool {
    inner: Arc<dyn ThinPool>,
    owned: bool,
    /// Serializes change + bump; holds the pool's transaction id.
    lock: Mutex<u64>,
    /// The same, readable without the lock (by flushes).
    current: AtomicU64,
}

impl NumberedPool {
    /// Wraps `inner`, reading its transaction id. `owned`: number every change.
    ///
    /// Returns an error if the pool's status cannot be read.
    pub fn new(inner: Arc<dyn ThinPool>, owned: bool) -> Result<NumberedPool, PoolError> {
        let id = inner.status()?.transaction_id;
        Ok(NumberedPool {
            inner,
            owned,
            lock: Mutex::new(id),
            current: AtomicU64::new(id),
        })
    }

    /// The pool's transaction id as last set by this process, if it numbers the pool's changes.
    pub fn current(&self) -> Option<u64> {
        self.owned.then(|| self.current.load(Ordering::SeqCst))
    }

    /// Runs `change` (one thin message) and, if it succeeded and the pool is owned, bumps the
    /// transaction id.
    ///
    /// Returns the change's error, or the bump's (after re-reading the pool's id): the change
    /// happened but is not marked, which callers treat like a failed change (they undo it or
    /// retry it, and both are idempotent).
    fn change<T>(
        &self,
        change: impl FnOnce(&dyn ThinPool) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        let mut id = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let out = change(&*self.inner)?;
        if !self.owned {
            return Ok(out);
        }
        // The kernel has made the change and the marker does not count it yet: the window in
        // which the store's transaction id alone would miss a change (recovery must see it by
        // the call's intent record).
        crate::failpoint!("pool:before-txid-bump");
        match self.inner.set_transaction_id(*id, *id + 1) {
            Ok(()) => {
                *id += 1;
                self.current.store(*id, Ordering::SeqCst);
                Ok(out)
            }
            Err(e) => {
                // Someone else changed it, or the pool failed: take the pool's word for it.
                if let Ok(st) = self.inner.status() {
                    warn!(expected = *id, found = st.transaction_id, error = %e,
                          "the pool's transaction id is not the one thinsnap set");
                    *id = st.transaction_id;
                    self.current.store(*id, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }

    /// Deactivates thin device `id`, discards its blocks first if `discard` gives its size, and
    /// deletes it from the pool. A thin id the pool does not have is already deleted: that is
    /// success, so every removal path (reap, cleanup, recovery, undo) can retry it.
    ///
    /// Returns [`PoolError::Busy`] if the device is still open, or the failing step's error.
    pub fn remove_device(&self, id: ThinId, discard: Option<u64>) -> Result<(), PoolError> {
        self.inner.deactivate(id)?;
        if let Some(size) = discard {
            match self.inner.discard(id, size) {
                Ok(()) | Err(PoolError::ThinNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        match self.delete_thin(id) {
            Ok(()) | Err(PoolError::ThinNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl ThinPool for NumberedPool {
    fn create_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.change(|p| p.create_thin(id))
    }

    fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<(), PoolError> {
        self.change(|p| p.create_snap(id, origin))
    }

    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.change(|p| p.delete_thin(id))
    }

    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError> {
        self.inner.activate(id, size_bytes)
    }

    fn deactivate(&self, id: ThinId) -> Result<(), PoolError> {
        self.inner.deactivate(id)
    }

    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError> {
        self.inner.deactivate_deferred(id)
    }

    fn mapped_bytes(&self, id: ThinId) -> Result<u64, PoolError> {
        self.inner.mapped_bytes(id)
    }

    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError> {
        self.inner.active_ids()
    }

    fn device_path(&self, id: ThinId) -> PathBuf {
        self.inner.device_path(id)
    }

    fn prefixed_devices(&self) -> Result<Vec<super::PrefixedDevice>, PoolError> {
        self.inner.prefixed_devices()
    }

    fn status(&self) -> Result<PoolStatus, PoolError> {
        self.inner.status()
    }

    /// The transaction id is this wrapper's to set: refused, so nothing can renumber the pool
    /// behind the counter's back.
    fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), PoolError> {
        Err(PoolError::Unsupported(format!(
            "set_transaction_id {old} {new}: the pool's transaction id is numbered by thinsnap itself"
        )))
    }

    fn info(&self) -> PoolInfo {
        self.inner.info()
    }

    fn discard(&self, id: ThinId, size_bytes: u64) -> Result<(), PoolError> {
        self.inner.discard(id, size_bytes)
    }

    fn list_thin_ids(&self) -> Result<BTreeSet<ThinId>, PoolError> {
        self.inner.list_thin_ids()
    }

    fn audit_thin_ids(&self) -> Result<BTreeSet<ThinId>, PoolError> {
        self.inner.audit_thin_ids()
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        self.inner.grow(data_bytes, metadata_bytes)
    }

    fn host_room(&self) -> Result<Option<HostRoom>, PoolError> {
        self.inner.host_room()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::NumberedPool;
    use crate::pool::fake::FakePool;
    use crate::pool::{PoolError, ThinId, ThinPool};

    fn numbered(owned: bool) -> (Arc<FakePool>, NumberedPool) {
        let fake = Arc::new(FakePool::new());
        let pool = NumberedPool::new(fake.clone(), owned).expect("status");
        (fake, pool)
    }

    #[test]
    fn each_change_of_an_owned_pool_is_numbered() {
        let (fake, pool) = numbered(true);
        assert_eq!(pool.current(), Some(0));
        pool.create_thin(ThinId::from(1)).expect("create");
        pool.create_snap(ThinId::from(2), ThinId::from(1))
            .expect("snap");
        assert_eq!(pool.current(), Some(2));
        pool.delete_thin(ThinId::from(2)).expect("delete");
        assert_eq!(pool.current(), Some(3));
        assert_eq!(fake.status().expect("status").transaction_id, 3);
        // A failed change is not numbered.
        assert!(
            matches!(pool.create_thin(ThinId::from(1)), Err(PoolError::ThinExists(id)) if id == 1)
        );
        assert_eq!(fake.status().expect("status").transaction_id, 3);
    }

    #[test]
    fn nothing_renumbers_the_pool_behind_the_counter() {
        let (fake, pool) = numbered(true);
        assert!(matches!(
            pool.set_transaction_id(0, 5),
            Err(PoolError::Unsupported(_))
        ));
        assert_eq!(fake.status().expect("status").transaction_id, 0);
    }

    #[test]
    fn a_pool_not_owned_is_never_numbered() {
        let (fake, pool) = numbered(false);
        pool.create_thin(ThinId::from(1)).expect("create");
        assert_eq!(pool.current(), None);
        assert_eq!(fake.status().expect("status").transaction_id, 0);
        assert!(!fake
            .calls()
            .iter()
            .any(|c| c.starts_with("set_transaction_id")));
    }

    #[test]
    fn a_failed_bump_fails_the_change_and_resyncs() {
        let (fake, pool) = numbered(true);
        fake.set_transaction_id(0, 7).expect("someone else");
        assert!(pool.create_thin(ThinId::from(1)).is_err());
        assert_eq!(pool.current(), Some(7));
        pool.create_thin(ThinId::from(2)).expect("create");
        assert_eq!(fake.status().expect("status").transaction_id, 8);
    }

    #[test]
    fn remove_device_deactivates_then_deletes_and_tolerates_a_missing_id() {
        let (fake, pool) = numbered(true);
        pool.create_thin(ThinId::from(1)).expect("create");
        pool.activate(ThinId::from(1), 1 << 20).expect("activate");
        pool.remove_device(ThinId::from(1), None).expect("remove");
        assert!(fake.active_ids().expect("active").is_empty());
        assert_eq!(pool.current(), Some(2));
        // Already gone: still success, and not numbered (nothing changed).
        pool.remove_device(ThinId::from(1), None)
            .expect("remove again");
        assert_eq!(pool.current(), Some(2));
        let calls = fake.calls();
        let deact = calls.iter().position(|c| c.starts_with("deactivate"));
        let del = calls.iter().position(|c| c.starts_with("delete "));
        assert!(deact < del, "deactivate before delete: {calls:?}");
    }
}
