//! Per-key locks: mutating calls on the same snapshot key run one at a time, calls on different
//! keys run concurrently. Entries are dropped when nobody holds or waits for them. Keyed by
//! snapshot key (`KeyLocks<String>`, the default) or by thin id (`KeyLocks<ThinId>`).
//!
//! A guard owns what it needs (it borrows nothing from its [`KeyLocks`]): it can be moved into
//! the task or the blocking closure that does the kernel work it protects, so a caller that is
//! cancelled does not release the lock while that work still runs.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Slot = Arc<tokio::sync::Mutex<()>>;
type Map<K> = Arc<Mutex<HashMap<K, Slot>>>;

/// A set of async mutexes, one per key.
pub struct KeyLocks<K = String> {
    map: Map<K>,
}

impl<K> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks {
            map: Arc::default(),
        }
    }
}

/// Holds the locks of some keys; releases them on drop. Owned: `Send + 'static`.
pub struct KeyGuard<K: Eq + Hash = String> {
    map: Map<K>,
    held: Vec<(K, Option<OwnedMutexGuard<()>>)>,
}

impl<K: Eq + Hash> KeyLocks<K> {
    /// Locks every key in `keys`, in sorted order so that two callers never deadlock.
    pub async fn lock<Q>(&self, keys: &[&Q]) -> KeyGuard<K>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Ord + Hash + ?Sized,
    {
        let mut keys: Vec<&Q> = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let mut held = Vec::with_capacity(keys.len());
        for key in keys {
            let slot = {
                let mut map = self.map.lock().expect("key lock map poisoned");
                map.entry(key.to_owned()).or_default().clone()
            };
            let guard = slot.lock_owned().await;
            held.push((key.to_owned(), Some(guard)));
        }
        KeyGuard {
            map: self.map.clone(),
            held,
        }
    }

    /// Locks `key` if nobody holds it; `None` if somebody does (a call in flight on it).
    pub fn try_lock<Q>(&self, key: &Q) -> Option<KeyGuard<K>>
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + Hash + Eq + ?Sized,
    {
        let slot = {
            let mut map = self.map.lock().expect("key lock map poisoned");
            map.entry(key.to_owned()).or_default().clone()
        };
        let guard = slot.try_lock_owned().ok();
        let held = guard.is_some();
        // Built even on failure, so that its drop removes the entry this call may have made.
        let g = KeyGuard {
            map: self.map.clone(),
            held: vec![(key.to_owned(), guard)],
        };
        if held {
            Some(g)
        } else {
            None
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }
}

impl<K: Eq + Hash> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("key lock map poisoned");
        for (key, guard) in &mut self.held {
            drop(guard.take());
            // Only the map holds it: nobody waits, so the entry can go.
            if map
                .get(key)
                .is_some_and(|slot| Arc::strong_count(slot) == 1)
            {
                map.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn same_key_is_exclusive_and_entries_are_dropped() {
        let locks = Arc::new(KeyLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(&["k", "other"]).await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0);
    }
}
