//! An in-memory [`ThinPool`] for unit tests only: it keeps the set of thin devices and active
//! devices the way dm-thin would, records every call, and fails the N-th call of a chosen
//! operation so that every rollback branch of the engine can be exercised.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};

#[derive(Default)]
struct State {
    /// thin id -> mapped bytes
    thins: BTreeMap<ThinId, u64>,
    active: BTreeSet<ThinId>,
    busy: BTreeSet<ThinId>,
    calls: Vec<String>,
    counts: HashMap<&'static str, usize>,
    /// op -> the 1-based call number that fails
    fail_at: HashMap<&'static str, usize>,
    transaction_id: u64,
    host_room: Option<u64>,
    data_total: u64,
    data_used_extra: u64,
}

/// See the module doc.
#[derive(Default)]
pub struct FakePool {
    state: Mutex<State>,
}

impl FakePool {
    pub fn new() -> FakePool {
        FakePool::default()
    }

    /// Makes the `nth` (1-based, counted from now on) call of `op` fail.
    pub fn fail_nth(&self, op: &'static str, nth: usize) {
        let mut s = self.lock();
        let done = s.counts.get(op).copied().unwrap_or(0);
        s.fail_at.insert(op, done + nth);
    }

    /// Marks a device as open (mounted), so deactivating it fails with Busy.
    pub fn set_busy(&self, id: ThinId, busy: bool) {
        let mut s = self.lock();
        if busy {
            s.busy.insert(id);
        } else {
            s.busy.remove(&id);
        }
    }

    /// Sets what [`ThinPool::host_room`] answers (None by default: not a file-backed pool).
    pub fn set_host_room(&self, room: Option<u64>) {
        self.lock().host_room = room;
    }

    /// Pretends `bytes` were written to the device of `id`.
    pub fn write(&self, id: ThinId, bytes: u64) {
        let mut s = self.lock();
        if let Some(m) = s.thins.get_mut(&id) {
            *m += bytes;
        }
    }

    /// Sets the pool's total data space and extra used bytes, to test the free-space floor.
    pub fn set_space(&self, total: u64, used_extra: u64) {
        let mut s = self.lock();
        s.data_total = total;
        s.data_used_extra = used_extra;
    }

    pub fn thin_ids(&self) -> BTreeSet<ThinId> {
        self.lock().thins.keys().copied().collect()
    }

    pub fn active(&self) -> BTreeSet<ThinId> {
        self.lock().active.clone()
    }

    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forgets every active device, as a reboot does.
    pub fn reboot(&self) {
        self.lock().active.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake pool mutex poisoned")
    }

    fn enter(
        &self,
        op: &'static str,
        call: String,
    ) -> Result<std::sync::MutexGuard<'_, State>, PoolError> {
        let mut s = self.lock();
        s.calls.push(call.clone());
        let n = {
            let n = s.counts.entry(op).or_insert(0);
            *n += 1;
            *n
        };
        if s.fail_at.get(op) == Some(&n) {
            return Err(PoolError::Io {
                op,
                path: PathBuf::from(call),
                source: std::io::Error::other("injected failure"),
            });
        }
        Ok(s)
    }
}

impl ThinPool for FakePool {
    fn create_thin(&self, id: ThinId) -> Result<(), PoolError> {
        let mut s = self.enter("create_thin", format!("create_thin {id}"))?;
        if s.thins.contains_key(&id) {
            return Err(PoolError::ThinExists(id));
        }
        s.thins.insert(id, 0);
        Ok(())
    }

    fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<(), PoolError> {
        let mut s = self.enter("create_snap", format!("create_snap {id} {origin}"))?;
        if s.thins.contains_key(&id) {
            return Err(PoolError::ThinExists(id));
        }
        let mapped = *s
            .thins
            .get(&origin)
            .ok_or(PoolError::ThinNotFound(origin))?;
        s.thins.insert(id, mapped);
        Ok(())
    }

    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        let mut s = self.enter("delete_thin", format!("delete {id}"))?;
        if s.active.contains(&id) {
            return Err(PoolError::Busy(format!("fake-snap-{id}")));
        }
        s.thins.remove(&id).ok_or(PoolError::ThinNotFound(id))?;
        Ok(())
    }

    fn activate(&self, id: ThinId, _size_bytes: u64) -> Result<PathBuf, PoolError> {
        let mut s = self.enter("activate", format!("activate {id}"))?;
        if !s.thins.contains_key(&id) {
            return Err(PoolError::ThinNotFound(id));
        }
        s.active.insert(id);
        Ok(self.device_path(id))
    }

    fn deactivate(&self, id: ThinId) -> Result<(), PoolError> {
        let mut s = self.enter("deactivate", format!("deactivate {id}"))?;
        if s.busy.contains(&id) {
            return Err(PoolError::Busy(format!("fake-snap-{id}")));
        }
        s.active.remove(&id);
        Ok(())
    }

    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError> {
        let mut s = self.enter("deactivate_deferred", format!("deactivate_deferred {id}"))?;
        s.active.remove(&id);
        Ok(())
    }

    fn mapped_bytes(&self, id: ThinId) -> Result<u64, PoolError> {
        let s = self.lock();
        s.thins.get(&id).copied().ok_or(PoolError::ThinNotFound(id))
    }

    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError> {
        Ok(self.lock().active.iter().copied().collect())
    }

    fn device_path(&self, id: ThinId) -> PathBuf {
        Path::new("/dev/mapper").join(format!("fake-snap-{id}"))
    }

    fn status(&self) -> Result<PoolStatus, PoolError> {
        let s = self.lock();
        Ok(PoolStatus {
            transaction_id: s.transaction_id,
            data_used_bytes: s.thins.values().sum::<u64>() + s.data_used_extra,
            data_total_bytes: if s.data_total == 0 {
                1 << 40
            } else {
                s.data_total
            },
            metadata_used_bytes: 4096 * s.thins.len() as u64,
            metadata_total_bytes: 1 << 30,
            block_size_bytes: 65536,
            ..PoolStatus::default()
        })
    }

    fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), PoolError> {
        let mut s = self.enter(
            "set_transaction_id",
            format!("set_transaction_id {old} {new}"),
        )?;
        if s.transaction_id != old {
            return Err(PoolError::Io {
                op: "set_transaction_id",
                path: PathBuf::from("fake"),
                source: std::io::Error::other("transaction id mismatch"),
            });
        }
        s.transaction_id = new;
        Ok(())
    }

    fn discard(&self, id: ThinId, _size_bytes: u64) -> Result<(), PoolError> {
        let mut s = self.enter("discard", format!("discard {id}"))?;
        let m = s.thins.get_mut(&id).ok_or(PoolError::ThinNotFound(id))?;
        *m = 0;
        Ok(())
    }

    fn list_thin_ids(&self) -> Result<Option<BTreeSet<ThinId>>, PoolError> {
        Ok(Some(self.thin_ids()))
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        let mut s = self.enter("grow", format!("grow {data_bytes:?} {metadata_bytes:?}"))?;
        if let Some(d) = data_bytes {
            s.data_total = d;
        }
        Ok(())
    }

    fn host_room(&self) -> Result<Option<u64>, PoolError> {
        Ok(self.lock().host_room)
    }

    fn info(&self) -> PoolInfo {
        PoolInfo {
            name: "fake".to_string(),
            mode: "fake".to_string(),
            loop_files: Vec::new(),
        }
    }
}
