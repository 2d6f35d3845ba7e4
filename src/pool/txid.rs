//! The pool's transaction id as a commit marker, as Docker's devicemapper driver used it.
//!
//! In a pool thinsnap owns (loop mode), every change to the pool's set of thin devices
//! (`create_thin`, `create_snap`, `delete`) is followed by `set_transaction_id N N+1`, one after
//! the other under one lock, so the transaction id in the pool's metadata counts the changes the
//! kernel has made. The engine writes the counter into the store with every flush. At start, a
//! store with no half-done operation whose recorded transaction id equals the pool's knows every
//! thin id the pool holds: no change happened that the store did not see the outcome of.
//! Otherwise recovery reads the pool's thin ids (thin_ls) and reconciles.
//!
//! A pool thinsnap does not own gets no `set_transaction_id`: LVM keeps the transaction id of
//! its pools in its own metadata and refuses to activate one whose kernel id differs (see
//! [`super::lvm`]); someone else's pool is theirs to number.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::warn;

use super::{PoolError, ThinPool};

/// See the module doc.
pub struct TxCounter {
    owned: bool,
    /// Serializes change + bump; holds the pool's transaction id.
    lock: Mutex<u64>,
    /// The same, readable without the lock (by flushes).
    current: AtomicU64,
}

impl TxCounter {
    /// Reads the pool's transaction id. `owned`: bump it after every change.
    ///
    /// Returns an error if the pool's status cannot be read.
    pub fn new(pool: &dyn ThinPool, owned: bool) -> Result<TxCounter, PoolError> {
        let id = pool.status()?.transaction_id;
        Ok(TxCounter {
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
    pub fn change<T>(
        &self,
        pool: &dyn ThinPool,
        change: impl FnOnce() -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        let mut id = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let out = change()?;
        if !self.owned {
            return Ok(out);
        }
        match pool.set_transaction_id(*id, *id + 1) {
            Ok(()) => {
                *id += 1;
                self.current.store(*id, Ordering::SeqCst);
                Ok(out)
            }
            Err(e) => {
                // Someone else changed it, or the pool failed: take the pool's word for it.
                if let Ok(st) = pool.status() {
                    warn!(expected = *id, found = st.transaction_id, error = %e,
                          "the pool's transaction id is not the one thinsnap set");
                    *id = st.transaction_id;
                    self.current.store(*id, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TxCounter;
    use crate::pool::fake::FakePool;
    use crate::pool::{PoolError, ThinPool};

    #[test]
    fn each_change_of_an_owned_pool_is_numbered() {
        let pool = FakePool::new();
        let tx = TxCounter::new(&pool, true).expect("status");
        assert_eq!(tx.current(), Some(0));
        tx.change(&pool, || pool.create_thin(1)).expect("create");
        tx.change(&pool, || pool.create_snap(2, 1)).expect("snap");
        assert_eq!(tx.current(), Some(2));
        assert_eq!(pool.status().expect("status").transaction_id, 2);
        // A failed change is not numbered.
        assert!(matches!(
            tx.change(&pool, || pool.create_thin(1)),
            Err(PoolError::ThinExists(1))
        ));
        assert_eq!(pool.status().expect("status").transaction_id, 2);
    }

    #[test]
    fn a_pool_not_owned_is_never_numbered() {
        let pool = FakePool::new();
        let tx = TxCounter::new(&pool, false).expect("status");
        tx.change(&pool, || pool.create_thin(1)).expect("create");
        assert_eq!(tx.current(), None);
        assert_eq!(pool.status().expect("status").transaction_id, 0);
        assert!(!pool
            .calls()
            .iter()
            .any(|c| c.starts_with("set_transaction_id")));
    }

    #[test]
    fn a_failed_bump_fails_the_change_and_resyncs() {
        let pool = FakePool::new();
        let tx = TxCounter::new(&pool, true).expect("status");
        pool.set_transaction_id(0, 7).expect("someone else");
        assert!(tx.change(&pool, || pool.create_thin(1)).is_err());
        assert_eq!(tx.current(), Some(7));
        tx.change(&pool, || pool.create_thin(2)).expect("create");
        assert_eq!(pool.status().expect("status").transaction_id, 8);
    }
}
