//! An in-memory [`ThinPool`] for unit tests only: it keeps the set of thin devices and active
//! devices the way dm-thin would, records every call, and fails the N-th call of a chosen
//! operation so that every rollback branch of the engine can be exercised.
//!
//! Every method that returns a `Result` can be made to fail ([`OPS`] names them, as
//! [`FakePool::fail_nth`] takes them); `device_path` and `info` cannot fail in the trait either.
//! It must stay a model of dm-thin's semantics, not of thinsnap's: no engine logic here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};

#[derive(Default)]
struct State {
    /// thin id -> mapped bytes
    thins: BTreeMap<ThinId, u64>,
    active: BTreeSet<ThinId>,
    busy: BTreeSet<ThinId>,
    calls: Vec<String>,
    counts: HashMap<&'static str, usize>,
    /// op -> the 1-based call number that fails, and the error it fails with (None: an
    /// injected [`PoolError::Io`]).
    fail_at: HashMap<&'static str, (usize, Option<PoolError>)>,
    /// op -> the 1-based call number that is held, and its two ends (see [`Pause`]).
    pause_at: HashMap<&'static str, (usize, Held)>,
    transaction_id: u64,
    host_room: Option<super::HostRoom>,
    data_total: u64,
    data_used_extra: u64,
    /// A metadata snapshot reserved (what a thin_ls cut short by a kill leaves).
    metadata_snapshot_held: bool,
    identity: String,
    fresh: bool,
    /// dm devices with the prefix that are not the pool's devices (see
    /// [`FakePool::add_foreign_device`]).
    foreign_devices: Vec<(String, Option<ThinId>)>,
}

/// The pool's end of a [`Pause`]: says the call got there, then waits to be let go.
type Held = (
    tokio::sync::oneshot::Sender<()>,
    std::sync::mpsc::Receiver<()>,
);

/// A call of the fake pool held before it does anything, as a slow ioctl is (see
/// [`FakePool::pause_nth`]): [`Pause::reached`] waits until the call is there, and
/// [`Pause::release`] (or dropping the `Pause`) lets it go on.
pub struct Pause {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl Pause {
    /// Waits until the held call has begun (it is then blocked in its thread).
    ///
    /// Panics if the pool was dropped before the call came.
    pub async fn reached(&mut self) {
        if let Some(r) = self.reached.take() {
            r.await
                .expect("the fake pool went before the held call came");
        }
    }

    /// Lets the held call go on (also if it has not come yet: it then does not stop).
    pub fn release(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.release();
    }
}

/// The name of every [`ThinPool`] method that returns a `Result`: the `op` of
/// [`FakePool::fail_nth`] and [`FakePool::count`].
pub const OPS: &[&str] = &[
    "create_thin",
    "create_snap",
    "delete_thin",
    "activate",
    "deactivate",
    "deactivate_deferred",
    "mapped_bytes",
    "active_ids",
    "prefixed_devices",
    "status",
    "set_transaction_id",
    "discard",
    "list_thin_ids",
    "grow",
    "host_room",
];

/// See the module doc.
#[derive(Default)]
pub struct FakePool {
    state: Mutex<State>,
    /// op -> a gate its calls wait at (see [`FakePool::gate`]).
    gates: Mutex<HashMap<&'static str, Arc<Gate>>>,
}

/// A [`Gate`] that opens when dropped.
pub struct HeldGate(Arc<Gate>);

impl std::ops::Deref for HeldGate {
    type Target = Gate;
    fn deref(&self) -> &Gate {
        &self.0
    }
}

impl Drop for HeldGate {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Holds every call of one op until opened: tests make calls meet at a point without sleeps.
pub struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    /// How many calls are waiting at the gate now.
    waiting: tokio::sync::watch::Sender<usize>,
}

impl Gate {
    /// Resolves once at least `n` calls wait at the gate.
    pub async fn waiting(&self, n: usize) {
        let mut rx = self.waiting.subscribe();
        rx.wait_for(|w| *w >= n).await.expect("the gate lives");
    }

    /// Lets every waiting call, and every later one, through.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if *open {
            return;
        }
        self.waiting.send_modify(|w| *w += 1);
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        self.waiting.send_modify(|w| *w -= 1);
    }
}

impl FakePool {
    pub fn new() -> FakePool {
        FakePool::default()
    }

    /// Makes every call of `op` from now on wait (before it does anything) until the returned
    /// gate is opened, or dropped (so a test that fails while calls wait does not hang in the
    /// runtime's shutdown, which waits for its blocking threads).
    pub fn gate(&self, op: &'static str) -> HeldGate {
        assert!(OPS.contains(&op), "{op} is not a pool operation");
        let gate = Arc::new(Gate {
            open: Mutex::new(false),
            opened: std::sync::Condvar::new(),
            waiting: tokio::sync::watch::channel(0).0,
        });
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(op, gate.clone());
        HeldGate(gate)
    }

    /// Makes the `nth` (1-based, counted from now on) call of `op` fail with an injected
    /// [`PoolError::Io`]; replaces a failure set for `op` before. `op` is a method name of
    /// [`OPS`].
    ///
    /// Panics if `op` is not in [`OPS`] or `nth` is 0: a test whose failure never fires would
    /// prove nothing.
    pub fn fail_nth(&self, op: &'static str, nth: usize) {
        self.set_failure(op, nth, None);
    }

    /// Makes the next call of `op` fail; the same as `fail_nth(op, 1)`.
    pub fn fail_next(&self, op: &'static str) {
        self.set_failure(op, 1, None);
    }

    /// Makes the `nth` call of `op` fail with `err` (a [`PoolError::Busy`] or
    /// [`PoolError::NoSpace`], say), otherwise as [`FakePool::fail_nth`].
    pub fn fail_nth_with(&self, op: &'static str, nth: usize, err: PoolError) {
        self.set_failure(op, nth, Some(err));
    }

    /// How many times `op` has been called.
    pub fn count(&self, op: &str) -> usize {
        self.lock().counts.get(op).copied().unwrap_or(0)
    }

    fn set_failure(&self, op: &'static str, nth: usize, err: Option<PoolError>) {
        assert!(
            OPS.contains(&op),
            "the fake pool has no fallible method {op:?}"
        );
        assert!(nth >= 1, "calls are counted from 1");
        let mut s = self.lock();
        let done = s.counts.get(op).copied().unwrap_or(0);
        s.fail_at.insert(op, (done + nth, err));
    }

    /// Holds the `nth` (1-based, counted from now on) call of `op` before it does anything,
    /// until the returned [`Pause`] releases it; replaces a pause set for `op` before.
    ///
    /// Panics if `op` is not in [`OPS`] or `nth` is 0.
    pub fn pause_nth(&self, op: &'static str, nth: usize) -> Pause {
        assert!(
            OPS.contains(&op),
            "the fake pool has no fallible method {op:?}"
        );
        assert!(nth >= 1, "calls are counted from 1");
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let mut s = self.lock();
        let done = s.counts.get(op).copied().unwrap_or(0);
        s.pause_at
            .insert(op, (done + nth, (reached_tx, release_rx)));
        Pause {
            reached: Some(reached_rx),
            release: Some(release_tx),
        }
    }

    /// Sets what [`ThinPool::info`] says of the pool's identity (empty by default) and whether
    /// it was made empty by this start.
    pub fn set_identity(&self, identity: &str, fresh: bool) {
        let mut s = self.lock();
        s.identity = identity.to_string();
        s.fresh = fresh;
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

    /// Marks a metadata snapshot reserved (or released), as the pool's status reports it.
    pub fn set_metadata_snapshot_held(&self, held: bool) {
        self.lock().metadata_snapshot_held = held;
    }

    /// Adds a dm device named with the prefix that is not one of the pool's devices (someone
    /// else's device named like ours): [`ThinPool::prefixed_devices`] lists it as not ours.
    pub fn add_foreign_device(&self, name: &str, thin_id: Option<ThinId>) {
        self.lock()
            .foreign_devices
            .push((name.to_string(), thin_id));
    }

    /// Sets what [`ThinPool::host_room`] answers (None by default: not a file-backed pool).
    pub fn set_host_room(&self, room: Option<u64>) {
        self.lock().host_room = room.map(|free| super::HostRoom { free, promised: 0 });
    }

    /// Sets the host's free space and what the pool's files promise of it.
    pub fn set_host_space(&self, free: u64, promised: u64) {
        self.lock().host_room = Some(super::HostRoom { free, promised });
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
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(op)
            .cloned();
        if let Some(gate) = gate {
            gate.pass();
        }
        let mut s = self.lock();
        s.calls.push(call.clone());
        let n = {
            let n = s.counts.entry(op).or_insert(0);
            *n += 1;
            *n
        };
        if s.pause_at.get(op).is_some_and(|(at, _)| *at == n) {
            // Held outside the pool's lock: other calls go on meanwhile, as in the kernel.
            let (_, (reached, release)) = s.pause_at.remove(op).expect("just found");
            drop(s);
            let _ = reached.send(());
            let _ = release.recv();
            s = self.lock();
        }
        if s.fail_at.get(op).is_some_and(|(at, _)| *at == n) {
            let (_, err) = s.fail_at.remove(op).expect("just found");
            return Err(err.unwrap_or_else(|| PoolError::Io {
                op,
                path: PathBuf::from(call),
                source: std::io::Error::other("injected failure"),
            }));
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
        let s = self.enter("mapped_bytes", format!("mapped_bytes {id}"))?;
        s.thins.get(&id).copied().ok_or(PoolError::ThinNotFound(id))
    }

    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError> {
        let s = self.enter("active_ids", "active_ids".to_string())?;
        Ok(s.active.iter().copied().collect())
    }

    fn device_path(&self, id: ThinId) -> PathBuf {
        Path::new("/dev/mapper").join(format!("fake-snap-{id}"))
    }

    fn prefixed_devices(&self) -> Result<Vec<super::PrefixedDevice>, PoolError> {
        let s = self.enter("prefixed_devices", "prefixed_devices".to_string())?;
        let ours = s.active.iter().map(|&id| super::PrefixedDevice {
            name: format!("fake-snap-{id}"),
            thin_id: Some(id),
            not_ours: None,
        });
        let foreign = s
            .foreign_devices
            .iter()
            .map(|(name, id)| super::PrefixedDevice {
                name: name.clone(),
                thin_id: *id,
                not_ours: Some("its table is not this pool's".to_string()),
            });
        Ok(ours.chain(foreign).collect())
    }

    fn status(&self) -> Result<PoolStatus, PoolError> {
        let s = self.enter("status", "status".to_string())?;
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
            metadata_snapshot_held: s.metadata_snapshot_held,
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

    fn list_thin_ids(&self) -> Result<BTreeSet<ThinId>, PoolError> {
        let mut s = self.enter("list_thin_ids", "list_thin_ids".to_string())?;
        // As the dm pool at start: a metadata snapshot left reserved is released first.
        s.metadata_snapshot_held = false;
        Ok(s.thins.keys().copied().collect())
    }

    fn audit_thin_ids(&self) -> Result<BTreeSet<ThinId>, PoolError> {
        let s = self.enter("list_thin_ids", "audit_thin_ids".to_string())?;
        // As the dm pool while serving: a reserved metadata snapshot is someone else's.
        if s.metadata_snapshot_held {
            return Err(PoolError::Busy("the metadata snapshot of pool fake".into()));
        }
        Ok(s.thins.keys().copied().collect())
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        let mut s = self.enter("grow", format!("grow {data_bytes:?} {metadata_bytes:?}"))?;
        if let Some(d) = data_bytes {
            s.data_total = d;
        }
        Ok(())
    }

    fn host_room(&self) -> Result<Option<super::HostRoom>, PoolError> {
        Ok(self.enter("host_room", "host_room".to_string())?.host_room)
    }

    fn info(&self) -> PoolInfo {
        let s = self.lock();
        PoolInfo {
            name: "fake".to_string(),
            mode: "fake".to_string(),
            loop_files: Vec::new(),
            identity: s.identity.clone(),
            fresh: s.fresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls method `op` of `pool` with arguments under which it succeeds on the pool
    /// [`ready`] makes (thin 1 active, thin 2 not).
    fn call(pool: &FakePool, op: &str) -> Result<(), PoolError> {
        match op {
            "create_thin" => pool.create_thin(ThinId::from(10)),
            "create_snap" => pool.create_snap(ThinId::from(11), ThinId::from(1)),
            "delete_thin" => pool.delete_thin(ThinId::from(2)),
            "activate" => pool.activate(ThinId::from(2), 1 << 20).map(drop),
            "deactivate" => pool.deactivate(ThinId::from(1)),
            "deactivate_deferred" => pool.deactivate_deferred(ThinId::from(1)),
            "mapped_bytes" => pool.mapped_bytes(ThinId::from(1)).map(drop),
            "active_ids" => pool.active_ids().map(drop),
            "prefixed_devices" => pool.prefixed_devices().map(drop),
            "status" => pool.status().map(drop),
            "set_transaction_id" => {
                let now = pool.lock().transaction_id;
                pool.set_transaction_id(now, now + 1)
            }
            "discard" => pool.discard(ThinId::from(1), 1 << 20),
            "list_thin_ids" => pool.list_thin_ids().map(drop),
            "grow" => pool.grow(Some(2 << 40), None),
            "host_room" => pool.host_room().map(drop),
            other => panic!("no call for {other:?}: add it here and to OPS"),
        }
    }

    fn ready() -> FakePool {
        let pool = FakePool::new();
        pool.create_thin(ThinId::from(1)).expect("thin 1");
        pool.create_thin(ThinId::from(2)).expect("thin 2");
        pool.activate(ThinId::from(1), 1 << 20).expect("activate 1");
        pool
    }

    fn injected(err: &PoolError) -> bool {
        matches!(err, PoolError::Io { source, .. } if source.to_string() == "injected failure")
    }

    #[test]
    fn every_fallible_method_can_be_made_to_fail() {
        for op in OPS {
            let pool = ready();
            let before = pool.count(op);
            call(&pool, op).unwrap_or_else(|e| panic!("{op} fails unasked: {e}"));
            pool.fail_next(op);
            let err = call(&pool, op).expect_err(op);
            assert!(injected(&err), "{op}: {err}");
            assert_eq!(
                pool.count(op),
                before + 2,
                "{op}: the failed call is counted"
            );
        }
    }

    #[test]
    fn the_nth_call_fails_and_only_that_one() {
        for op in OPS {
            let pool = ready();
            pool.fail_nth(op, 2);
            let before = pool.count(op);
            // A repeated create or delete fails on its own (ThinExists, ThinNotFound): only
            // the injected failure must come at the second call and no other.
            let first = call(&pool, op);
            assert!(
                !first.as_ref().is_err_and(injected),
                "{op}: the first call failed"
            );
            let second = call(&pool, op).expect_err(op);
            assert!(injected(&second), "{op}: {second}");
            let third = call(&pool, op);
            assert!(
                !third.as_ref().is_err_and(injected),
                "{op}: the third call failed"
            );
            assert_eq!(pool.count(op), before + 3, "{op}");
        }
    }

    #[test]
    fn a_chosen_error_is_returned_as_is() {
        let pool = ready();
        pool.fail_nth_with("status", 1, PoolError::NoSpace("fake".to_string()));
        assert!(matches!(pool.status(), Err(PoolError::NoSpace(_))));
        pool.status().expect("fails once");
    }

    #[tokio::test]
    async fn a_paused_call_waits_for_its_release_and_others_go_on() {
        let pool = std::sync::Arc::new(ready());
        let mut pause = pool.pause_nth("activate", 1);
        let held = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.activate(ThinId::from(2), 1 << 20))
        };
        pause.reached().await;
        assert!(
            !pool.active().contains(&ThinId::from(2)),
            "the held call did something"
        );
        pool.deactivate(ThinId::from(1)).expect("other calls go on");
        pause.release();
        held.join().expect("thread").expect("activate");
        assert!(pool.active().contains(&ThinId::from(2)));
    }

    #[test]
    #[should_panic(expected = "no fallible method")]
    fn an_unknown_operation_is_refused() {
        FakePool::new().fail_next("create_thinn");
    }
}
