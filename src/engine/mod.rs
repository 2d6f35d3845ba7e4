//! The snapshot engine: containerd's snapshot semantics on top of the pool and the [`Store`].
//! It owns the order of every mutating call (intent recorded and flushed, then the kernel, then
//! the outcome recorded: one durable write per call on the common path; the outcome is durable
//! with the next flush, and until then recovery completes the call from its intent), per-key
//! locking, rollback of a failed call, and recovery at start ([`recovery`]).
//!
//! It must not know gRPC (the `grpc` module converts) nor device-mapper (the pool does); pool
//! calls are blocking ioctls and always go through `spawn_blocking`. It reaches the pool only
//! through [`NumberedPool`], so every change of the pool's thin devices is numbered.
//!
//! The calls live here; the rest along its seams: `error` (the error type and how the layers
//! below map into it), `limits` (what a request may carry), `space` (the free-space floor,
//! growing the pool), `reaper` (deleting devices: Remove's last step, Cleanup, `remove.async`),
//! `commit` (Commit and its intent), `types` (what callers see and give: infos, mounts, status,
//! settings), `activate` (a device made on first use after a reboot; quarantined snapshots),
//! `spares` (warm spares: Prepare and View on a device made ahead, and their refiller), `handle`
//! (the engine as the services reach it while the daemon starts; Stat and List, which only read
//! the store), `audit` (the pool's thin ids against the store, after a start and at Cleanup),
//! `calls` (the calls in flight, each a task of its own, waited for at a clean stop).

mod activate;
mod audit;
pub mod autogrow;
mod calls;
mod commit;
mod error;
pub mod filter;
mod handle;
mod limits;
mod locks;
pub mod ownership;
mod reaper;
pub mod recovery;
mod space;
mod spares;
mod types;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{info, warn};

use crate::fs::mount_options;
pub use crate::model::{Kind, ThinId};
use crate::pool::{NumberedPool, PoolError, PoolInfo, ThinPool};
use crate::store::{BaseRecord, NewSnapshot, SnapshotRecord, State, Store, StoreError};
pub use activate::QuarantinedInfo;
pub use audit::AuditReport;
pub use calls::Calls;
pub(crate) use error::pool_err;
pub use error::EngineError;
pub use handle::{EngineHandle, Publisher};
use limits::{check_field_paths, check_key, check_labels, size_label};
pub use limits::{
    MAX_FIELD_PATHS, MAX_KEY_LEN, MAX_LABELS, MAX_LABELS_BYTES, MAX_LABEL_LEN, SIZE_LABEL,
};
use locks::KeyLocks;
pub use spares::{SpareCounts, SPARE_OWNER};
pub use types::{Adopt, BaseInfo, EngineStatus, Mount, Settings, SnapshotInfo, Usage};

/// Nanoseconds since the epoch, for records.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Resolves once `stop` turns true (or its sender is gone): the background tasks' stop signal.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

fn to_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

/// How many thin ids in a row Prepare skips because a device thinsnap does not own holds them.
pub(super) const MAX_TAKEN_IDS: u32 = 64;

/// Why making a snapshot's device failed: its thin id is someone else's, or anything else.
enum MakeError {
    Taken(ThinId),
    Failed(EngineError),
}
use MakeError::{Failed, Taken};

impl From<EngineError> for MakeError {
    fn from(e: EngineError) -> Self {
        Failed(e)
    }
}

/// The snapshot engine. Shared between gRPC handlers through an `Arc`.
pub struct Engine {
    /// The only way to the kernel: numbers every change (see [`NumberedPool`]).
    pool: Arc<NumberedPool>,
    store: Store,
    base: BaseRecord,
    settings: Settings,
    locks: KeyLocks,
    /// Per thin id (by its decimal text): the reap of a device and a sync Remove that may give
    /// it back its record run one at a time.
    thin_locks: KeyLocks,
    /// Kernel calls hold it shared; growing the pool (which suspends it) holds it exclusively.
    /// Its guards are owned by the blocking closure that does the kernel work (see
    /// [`Engine::on_pool_as`] and [`Engine::grow`]): a caller cancelled meanwhile does not
    /// release it early.
    kernel: Arc<tokio::sync::RwLock<()>>,
    /// `remove.async`: Remove queues thin ids here for the reaper ([`Engine::run_reaper`]).
    reaper: Option<UnboundedSender<ThinId>>,
    /// The reaper's end of that queue, until the reaper task takes it.
    reaper_queue: Mutex<Option<UnboundedReceiver<ThinId>>>,
    /// What last limited `pool.autogrow` (logged when it changes).
    autogrow_limited: Mutex<Vec<String>>,
    /// Devices not activated yet this run (see [`activate`]); shared with the blocking closure
    /// of an activation, which records its outcome itself.
    lazy: Arc<activate::Lazy>,
    /// Warm spares (see [`spares`]).
    spares: spares::Spares,
    /// What the audit of thin ids found (see [`audit`]).
    audits: audit::Audits,
    /// Device growth reserved in the free-space floor by Prepares and Views with the size
    /// label under way (see `space::Reservation`).
    reserved: Mutex<u64>,
}

impl Engine {
    /// Builds the engine on a recovered store (see [`recovery::start`]).
    fn new(pool: Arc<NumberedPool>, store: Store, base: BaseRecord, settings: Settings) -> Engine {
        let (reaper, reaper_queue) = if settings.remove_async {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Engine {
            pool,
            store,
            base,
            locks: KeyLocks::default(),
            thin_locks: KeyLocks::default(),
            kernel: Arc::new(tokio::sync::RwLock::new(())),
            reaper,
            reaper_queue: Mutex::new(reaper_queue),
            autogrow_limited: Mutex::new(Vec::new()),
            lazy: Arc::default(),
            spares: spares::Spares::new(settings.spares),
            audits: audit::Audits::default(),
            reserved: Mutex::new(0),
            settings,
        }
    }

    /// Runs `f` on the pool in the blocking thread pool.
    async fn on_pool<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&NumberedPool) -> Result<T, EngineError> + Send + 'static,
    {
        self.on_pool_as(f).await
    }

    /// [`Engine::on_pool`] for a closure with an error type of its own.
    async fn on_pool_as<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<EngineError> + Send + 'static,
        F: FnOnce(&NumberedPool) -> Result<T, E> + Send + 'static,
    {
        // The kernel lock's shared guard is owned by the blocking closure: if the caller's future
        // is dropped (a client gone, a `select!`), it is not released while the ioctls it
        // protects still run. A caller that holds another guard for its kernel work moves it
        // into `f` the same way (see `Engine::ensure_device`).
        let pool = self.pool.clone();
        let shared = self.kernel.clone().read_owned().await;
        tokio::task::spawn_blocking(move || {
            let r = f(&pool);
            drop(shared);
            r
        })
        .await
        .map_err(|e| E::from(EngineError::Internal(format!("pool task failed: {e}"))))?
    }

    /// Makes every change so far durable, with the pool's transaction id as of now.
    async fn flush(&self) -> Result<(), StoreError> {
        if let Some(id) = self.pool.current() {
            self.store.set_pool_transaction_id(id)?;
        }
        self.store.flush().await
    }

    fn mounts_of(&self, rec: &SnapshotRecord) -> Vec<Mount> {
        vec![Mount {
            fs_type: self.settings.fs.fs_type.as_str().to_string(),
            source: self.pool.device_path(rec.thin_id).display().to_string(),
            options: mount_options(&self.settings.fs, rec.kind == Kind::View),
        }]
    }

    fn info_of(key: &str, rec: &SnapshotRecord) -> SnapshotInfo {
        handle::info_of(key, rec)
    }

    fn ready(&self, key: &str) -> Result<SnapshotRecord, EngineError> {
        handle::ready_in(&self.store, key)
    }

    /// Prepare (`kind` Active) or View (`kind` View): a thin snapshot of the parent (or of the
    /// base device), activated, returned as one mount.
    ///
    /// Returns InvalidArgument for an empty key or bad labels, AlreadyExists if the key is taken,
    /// NotFound if the parent does not exist, FailedPrecondition if it is not committed,
    /// ResourceExhausted if the pool is out of space or thin ids.
    pub async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, EngineError> {
        check_key("key", key)?;
        check_labels(&labels)?;
        // A raised fs.base_size reaches new images through their first layer, as the size label
        // does (which wins when given).
        let size = size_label(key, &labels)?.or_else(|| self.grown_base_size(parent));
        let _busy = self.spares.call_in_flight();
        let _guard = self.locks.lock(&[key]).await;
        crate::failpoint!("prepare:start");
        // A half-made snapshot of this key that its own call could not undo (a store write that
        // failed during the undo): nobody else holds the key, so roll it back now instead of
        // answering AlreadyExists until a restart.
        self.heal(key).await?;
        let growth = match size {
            Some(want) => {
                self.check_max_size(key, want)?;
                Some((key, want, self.growth_of(parent, want)?))
            }
            None => None,
        };
        // With the size label, the growth is reserved in the floor until this call ends.
        let (_, _reservation) = self.check_space_reserving(growth).await?;
        if size.is_none() {
            if let Some(mounts) = self.take_spare(kind, key, parent, &labels).await? {
                // A warm spare of the parent became this snapshot: no device made on this path.
                return Ok(mounts);
            }
        }
        // The common path answers with only its intent durable: recovery completes the call if
        // the pool has its thin device (see DeviceRecord::roll_forward). Not with the size
        // label (a thin device whose filesystem may not be grown yet is not a finished
        // snapshot), nor in a pool thinsnap does not own (a thin id found there after a crash
        // may be someone else's): those flush their outcome before they answer.
        let roll_forward = size.is_none() && self.pool.current().is_some();
        let new = NewSnapshot {
            key: key.to_string(),
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            now: now_ns(),
            size,
            roll_forward,
        };
        let mut tries = 0;
        let (id, origin) = loop {
            tries += 1;
            // 1. Intent: records in state Creating, durable before the kernel is touched.
            let plan = self.store.begin_create(&new, &self.base)?;
            self.flush().await?;
            crate::failpoint!("prepare:after-intent");
            // 2. The kernel: create_snap, then activate.
            let (id, origin, size) = (plan.thin_id, plan.origin, plan.size);
            let grow = (size > plan.parent_size)
                .then(|| (self.settings.fs.clone(), self.settings.root.clone()));
            let made = self
                .on_pool_as(move |pool| {
                    pool.create_snap(id, origin).map_err(|e| match e {
                        // Someone else's volume (a shared pool): not ours to touch.
                        PoolError::ThinExists(_) => Taken(id),
                        e => Failed(pool_err(format!("create thin id {id} from {origin}"))(e)),
                    })?;
                    crate::failpoint!("prepare:after-create-snap");
                    let dev = pool
                        .activate(id, size)
                        .map_err(pool_err(format!("activate thin id {id}")))
                        .map_err(Failed)?;
                    if let Some((fs, root)) = grow {
                        // Only with the size label: a process spawn, off the common Prepare path.
                        crate::fs::grow(&dev, &fs, &root).map_err(|e| Failed(e.into()))?;
                    }
                    crate::failpoint!("prepare:after-activate");
                    Ok(())
                })
                .await;
            match made {
                Ok(()) => break (id, origin),
                Err(Taken(id)) if tries < MAX_TAKEN_IDS => {
                    // The thin id is held by a device thinsnap never made: drop our records
                    // without touching the kernel (never delete what is not ours) and take the
                    // next id (ids are handed out in increasing order).
                    warn!(
                        key,
                        thin_id = id,
                        "thin id taken by a device thinsnap does not own; trying the next one"
                    );
                    self.store.forget_snapshot(key)?;
                    self.flush().await?;
                }
                Err(Taken(id)) => {
                    self.store.forget_snapshot(key)?;
                    self.flush().await?;
                    return Err(EngineError::ResourceExhausted(format!(
                        "prepare {key:?}: {MAX_TAKEN_IDS} thin ids in a row, up to {id}, are held by devices thinsnap does not own"
                    )));
                }
                Err(Failed(e)) => {
                    warn!(key, thin_id = id, error = %e, "prepare failed; undoing");
                    self.undo_create(key, id).await;
                    return Err(e);
                }
            }
        };
        // 3. Outcome: written; durable with the next flush (any call's), or made so by recovery.
        let finished = async {
            self.store.finish_create(key)?;
            if !roll_forward {
                self.flush().await?;
            }
            Ok::<_, EngineError>(())
        }
        .await;
        if let Err(e) = finished {
            self.undo_create(key, id).await;
            return Err(e);
        }
        crate::failpoint!("prepare:after-outcome");
        let rec = self.ready(key)?;
        info!(
            key,
            thin_id = id,
            origin,
            kind = kind.as_str(),
            "created snapshot"
        );
        Ok(self.mounts_of(&rec))
    }

    /// Gives a snapshot whose call failed its device back (undoing that call's deactivation).
    /// The caller holds the thin id's lock. A failure is logged and the snapshot awaits
    /// activation again (see [`activate`]): the next call that needs its device (Mounts, Usage,
    /// Commit) makes it or says why not, instead of handing out a path to nothing.
    async fn reactivate(&self, id: ThinId, size: u64) {
        let done = self
            .on_pool(move |pool| {
                pool.activate(id, size)
                    .map_err(pool_err(format!("reactivate thin id {id}")))
            })
            .await;
        if let Err(e) = done {
            self.lazy.missing(id);
            warn!(thin_id = id, error = %e, "cannot reactivate the device of a failed call; it awaits activation");
        }
    }

    /// Rolls back a half-made snapshot of `key` (state Creating) whose call is over: the caller
    /// holds the key's lock, so no call is making it. Nothing to do for any other state.
    ///
    /// Returns an error if the store cannot be read or written.
    pub(super) async fn heal(&self, key: &str) -> Result<(), EngineError> {
        match self.store.get(key)? {
            Some(rec) if rec.state == State::Creating => {
                warn!(
                    key,
                    thin_id = rec.thin_id,
                    "rolling back a half-made snapshot"
                );
                self.undo_create(key, rec.thin_id).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Undoes a half-made snapshot: its record goes, its device is reaped.
    async fn undo_create(&self, key: &str, id: ThinId) {
        if let Err(e) = self.store.forget_snapshot_keep_device(key) {
            warn!(key, thin_id = id, error = %e, "cannot drop the record of an undone snapshot");
            return;
        }
        let _ = self.flush().await;
        self.reap(id).await;
    }

    /// The mounts of an active snapshot or view.
    ///
    /// Returns NotFound if there is no such snapshot, FailedPrecondition if it is committed.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, EngineError> {
        check_key("key", key)?;
        let rec = self.ready(key)?;
        if rec.kind == Kind::Committed {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        self.ensure_device(key, &rec).await?;
        if let Some(point) = self.mounted_whole(key, &rec).await {
            // Already mounted (a running container's root filesystem): the kernel refuses a
            // read-only mount of the device while it is mounted read-write (EBUSY), and that is
            // how containerd's differ mounts it for a diff (`docker commit`, `nerdctl commit`,
            // rootfs.CreateDiff). A bind of where it is mounted serves a read-only and a
            // read-write mount alike, on the same live filesystem: nothing new to clean up, the
            // container sees no change, and a Remove afterwards is as before.
            info!(key = ?key, thin_id = rec.thin_id, mount_point = %point.display(), "snapshot already mounted; answering a bind mount of it");
            let mode = if rec.kind == Kind::View { "ro" } else { "rw" };
            return Ok(vec![Mount {
                fs_type: "bind".to_string(),
                source: point.display().to_string(),
                options: vec!["bind".to_string(), mode.to_string()],
            }]);
        }
        Ok(self.mounts_of(&rec))
    }

    /// Where the device of snapshot `key` is mounted whole, if it is (see
    /// [`crate::fs::mounted_at`]). A mount table that cannot be read is logged and taken as
    /// "not mounted": the answer is then the device, as for a snapshot nobody mounted.
    async fn mounted_whole(&self, key: &str, rec: &SnapshotRecord) -> Option<std::path::PathBuf> {
        let device = self.pool.device_path(rec.thin_id);
        let table = self.settings.mount_table.clone();
        let found = tokio::task::spawn_blocking(move || crate::fs::mounted_at(&device, &table))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match found {
            Ok(point) => point,
            Err(e) => {
                warn!(key = ?key, thin_id = rec.thin_id, error = %e, "cannot tell whether the snapshot is mounted; answering its device");
                None
            }
        }
    }

    /// Removes a snapshot and deletes its thin device (with `remove.async`, queues the device
    /// for the reaper and answers at once).
    ///
    /// Returns NotFound if it does not exist, FailedPrecondition if it has children or its
    /// device is still mounted; if the kernel cannot delete the device, its error, and the
    /// snapshot is still there.
    pub async fn remove(&self, key: &str) -> Result<(), EngineError> {
        check_key("key", key)?;
        let _busy = self.spares.call_in_flight();
        // The key and its parent: the parent must not go while this snapshot may still be given
        // back (a failed delete). Locked together, in order; a key removed and made again with
        // another parent meanwhile is read again.
        let mut parent = self.ready(key)?.parent.unwrap_or_default();
        let (_guard, rec) = loop {
            let guard = self.locks.lock(&[key, &parent]).await;
            let rec = self.ready(key)?;
            let now = rec.parent.clone().unwrap_or_default();
            if now == parent {
                break (guard, rec);
            }
            parent = now;
        };
        crate::failpoint!("remove:start");
        if rec.kind == Kind::Committed && rec.children > 0 {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} has {} child snapshot(s); remove them first",
                rec.children
            )));
        }
        let id = rec.thin_id;
        if rec.quarantine.as_ref().is_some_and(|q| q.thin_id_gone) {
            return self.remove_gone(key, id).await;
        }
        if let Some(reaper) = &self.reaper {
            // remove.async: answer once the record is gone; the reaper deletes the device,
            // retrying while it is busy, so Remove never blocks containerd's garbage collector.
            let removed = self.store.begin_remove(key)?;
            self.flush().await?;
            // Its spares first (the reaper takes them in order), then its own device.
            self.reap_spares(key, &removed.spares).await;
            let _ = reaper.send(id);
            self.lazy.done(id);
            info!(
                key,
                thin_id = id,
                "removed snapshot; device queued for the reaper"
            );
            return Ok(());
        }
        // Sync: the device goes before the answer, or nothing does. The thin id's lock first:
        // a first-use activation of this device (Mounts, Usage) holds it until its ioctls end,
        // so the deactivation below never runs in the middle of one.
        let id_text = id.to_string();
        let _device = self.thin_locks.lock(&[&id_text]).await;
        let active = rec.kind != Kind::Committed;
        if active {
            // Deactivate first: a device still mounted refuses, and the snapshot stays intact.
            let what = format!("remove snapshot {key:?}");
            self.on_pool(move |pool| pool.deactivate(id).map_err(pool_err(what)))
                .await?;
            crate::failpoint!("remove:after-deactivate");
        }
        let removed = async {
            let removed = self.store.begin_remove(key)?;
            self.flush().await?;
            Ok::<_, EngineError>(removed)
        }
        .await;
        let failed = match removed {
            Err(e) => Some(e),
            Ok(removed) => {
                crate::failpoint!("remove:after-intent");
                // Its spares (marked Deleting by the same transaction) go before its device.
                self.reap_spares(key, &removed.spares).await;
                match self.reap_locked(id, rec.size).await {
                    Ok(()) => None,
                    Err(e) => {
                        // The kernel kept the device (a failed or read-only pool): give the
                        // snapshot back, so the answer is true and a retry can finish it.
                        warn!(key, thin_id = id, error = %e, "cannot delete the device; the snapshot stays");
                        self.store.restore_removed(key, &rec)?;
                        self.flush().await?;
                        Some(e)
                    }
                }
            }
        };
        if let Some(e) = failed {
            // A device never activated this run stays so (the first call that needs it will).
            if active && !self.lazy.is_pending(id) {
                self.reactivate(id, rec.size).await;
            }
            return Err(e);
        }
        self.lazy.done(id);
        info!(key, thin_id = id, "removed snapshot");
        Ok(())
    }

    /// Info of a snapshot.
    ///
    /// Returns NotFound if it does not exist.
    pub async fn stat(&self, key: &str) -> Result<SnapshotInfo, EngineError> {
        handle::stat_in(&self.store, key)
    }

    /// Updates the labels of a snapshot, the only mutable field. `paths` empty replaces all
    /// labels; `labels` replaces all; `labels.<k>` sets or (absent from `labels`) removes one.
    ///
    /// Returns NotFound if it does not exist, InvalidArgument for any other field path, more
    /// than [`MAX_FIELD_PATHS`] paths, or labels (the request's or the result) beyond the limits
    /// (checked before the snapshot is read).
    pub async fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo, EngineError> {
        check_key("name", key)?;
        // Everything the request carries is checked before any lock, read or copy: the paths
        // (their number and that each is a label) and the labels themselves.
        let replace_all = check_field_paths(key, paths)?;
        check_labels(&labels)?;
        let _guard = self.locks.lock(&[key]).await;
        let rec = self.ready(key)?;
        // "labels" anywhere among the paths makes the request's labels the snapshot's: every
        // `labels.<key>` then sets or removes a label to what the request has, which it already
        // is. Otherwise each `labels.<key>` sets or removes one. Either way no label map is
        // copied per path.
        let new_labels = if paths.is_empty() || replace_all {
            labels
        } else {
            let mut new_labels = rec.labels;
            for path in paths {
                let l = path
                    .strip_prefix("labels.")
                    .expect("checked by check_field_paths");
                match labels.get(l) {
                    Some(v) => {
                        new_labels.insert(l.to_string(), v.clone());
                    }
                    None => {
                        new_labels.remove(l);
                    }
                }
            }
            new_labels
        };
        check_labels(&new_labels)?;
        let rec = self.store.set_labels(key, new_labels, now_ns())?;
        self.flush().await?;
        Ok(Self::info_of(key, &rec))
    }

    /// Bytes the snapshot maps beyond what its parent mapped when it was made: read live from the
    /// device for active snapshots and views, recorded at commit for committed ones.
    ///
    /// Returns NotFound if it does not exist.
    pub async fn usage(&self, key: &str) -> Result<Usage, EngineError> {
        check_key("key", key)?;
        let rec = self.ready(key)?;
        if let Some(q) = &rec.quarantine {
            return Err(activate::quarantined(key, rec.thin_id, q));
        }
        let mapped = match rec.kind {
            Kind::Committed => rec.mapped,
            Kind::Active | Kind::View => {
                self.ensure_device(key, &rec).await?;
                let id = rec.thin_id;
                self.on_pool(move |pool| {
                    pool.mapped_bytes(id)
                        .map_err(pool_err(format!("read usage of thin id {id}")))
                })
                .await?
            }
        };
        Ok(Usage {
            size: mapped.saturating_sub(rec.origin_mapped),
            inodes: 0,
        })
    }

    /// Every snapshot that passes `filters` (containerd's syntax: several filters OR, `,` AND),
    /// read and filtered on a blocking thread.
    ///
    /// Returns InvalidArgument for a malformed filter or more than `filter::MAX_FILTERS`.
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, EngineError> {
        handle::list_blocking(self.store.clone(), filters).await
    }

    /// Pool space and health with the snapshot counts.
    ///
    /// Returns an error if the pool status cannot be read.
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let pool = self
            .on_pool(|pool| pool.status().map_err(pool_err("read pool status")))
            .await?;
        // The store's part is a scan of every record: on a blocking thread, as List's is.
        let store = self.store.clone();
        let (thin_ids, spare_ids, quarantined, kinds, deleting) =
            tokio::task::spawn_blocking(move || {
                let devices = store.devices()?;
                let deleting = devices
                    .iter()
                    .filter(|d| d.state == State::Deleting)
                    .count() as u64;
                let spare_ids = spares::spare_ids_in(&store, &devices)?;
                let quarantined = activate::quarantined_in(&store)?;
                let mut kinds = [0u64; 3];
                for (_, rec) in store.snapshots()? {
                    if rec.state != State::Ready {
                        continue;
                    }
                    kinds[match rec.kind {
                        Kind::Active => 0,
                        Kind::View => 1,
                        Kind::Committed => 2,
                    }] += 1;
                }
                // Warm spares apart: they are no snapshot's (see `spare_thin_ids`).
                let thin_ids = (devices.len() - spare_ids.len()) as u64;
                Ok::<_, EngineError>((thin_ids, spare_ids, quarantined, kinds, deleting))
            })
            .await
            .map_err(|e| EngineError::Internal(format!("status task failed: {e}")))??;
        Ok(EngineStatus {
            pool,
            base: BaseInfo {
                thin_id: self.base.thin_id,
                fs_type: self.base.fs_type.clone(),
                size: self.base.size,
                new_image_size: self.grown_base_size("").unwrap_or(self.base.size),
            },
            thin_ids,
            spare_thin_ids: spare_ids,
            inactive: self.lazy.inactive(),
            quarantined,
            spares: self.spares.counts(),
            audit: self.audit_report(),
            deleting,
            active: kinds[0],
            views: kinds[1],
            committed: kinds[2],
        })
    }

    /// What the pool is made of.
    pub fn pool_info(&self) -> PoolInfo {
        self.pool.info()
    }

    /// Every thin id the store holds a device record for (any state), in order.
    ///
    /// Returns an error if the store cannot be read.
    pub fn thin_ids(&self) -> Result<Vec<ThinId>, EngineError> {
        Ok(self.store.devices()?.iter().map(|d| d.thin_id).collect())
    }

    /// The state directory (`root`).
    pub fn root(&self) -> &std::path::Path {
        &self.settings.root
    }

    /// `[remove] async`: Remove answers at once; the reaper deletes the device.
    pub fn remove_async(&self) -> bool {
        self.settings.remove_async
    }

    /// The free-space floor, in percent.
    pub fn min_free_percent(&self) -> f64 {
        self.settings.min_free_percent
    }

    /// Flushes the store; called once more at shutdown.
    ///
    /// Returns an error if the store cannot be flushed.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        self.flush().await?;
        Ok(())
    }

    /// Durable store writes (flushes) since start: see [`Store::flushes`].
    pub fn store_flushes(&self) -> u64 {
        self.store.flushes()
    }

    /// The record of a snapshot, for tests.
    pub fn record(&self, key: &str) -> Result<Option<SnapshotRecord>, EngineError> {
        Ok(self.store.get(key)?)
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_base_size;
#[cfg(test)]
mod tests_handle;
#[cfg(test)]
mod tests_ownership;
#[cfg(test)]
mod tests_spares;
#[cfg(test)]
mod tests_upgrade;
