//! The snapshot engine: containerd's snapshot semantics on top of a [`ThinPool`] and the
//! [`Store`]. It owns the order of every mutating call (intent recorded and flushed, then the
//! kernel, then the outcome recorded and flushed), per-key locking, rollback of a failed call, and
//! recovery at start ([`recovery`]).
//!
//! It must not know gRPC (the `grpc` module converts) nor device-mapper (the pool does); pool
//! calls are blocking ioctls and always go through `spawn_blocking`.

pub mod autogrow;
pub mod filter;
mod locks;
pub mod recovery;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::config::{AutogrowConfig, Config, FsConfig, PoolMode};
use crate::fs::{mount_options, FsError};
use crate::pool::txid::TxCounter;
use crate::pool::{PoolError, PoolStatus, ThinId, ThinPool};
use crate::store::{BaseRecord, Kind, NewSnapshot, SnapshotRecord, State, Store, StoreError};
use locks::KeyLocks;

/// Longest snapshot key or name accepted, in bytes (containerd's keys are a namespace, a counter
/// and a digest: far below this).
pub const MAX_KEY_LEN: usize = 4096;
/// Longest label key plus value, in bytes (containerd's own limit for labels).
pub const MAX_LABEL_LEN: usize = 4096;
/// Most labels one snapshot may carry.
pub const MAX_LABELS: usize = 256;

/// Errors of the engine. The first five are the caller's; the rest are ours and carry their cause.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{context}: {source}")]
    Pool { context: String, source: PoolError },
    #[error("store: {0}")]
    Store(StoreError),
    #[error("filesystem: {0}")]
    Fs(#[from] FsError),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(k) => EngineError::NotFound(format!("snapshot {k:?} not found")),
            StoreError::AlreadyExists(k) => {
                EngineError::AlreadyExists(format!("snapshot {k:?} already exists"))
            }
            StoreError::FailedPrecondition(m) => EngineError::FailedPrecondition(m),
            StoreError::NoFreeThinId => EngineError::ResourceExhausted(e.to_string()),
            other => EngineError::Store(other),
        }
    }
}

/// Free bytes of a space and the bytes the free-space floor (percent) requires of it.
fn free_and_required(used: u64, total: u64, floor: f64) -> (u64, u64) {
    let free = total.saturating_sub(used);
    (free, (total as f64 * floor / 100.0).ceil() as u64)
}

/// Whether the pool is out of data space or under the floor in data or metadata.
fn below_floor(st: &PoolStatus, floor: f64) -> bool {
    let under = |used, total| {
        let (free, required) = free_and_required(used, total, floor);
        free < required
    };
    st.out_of_data_space
        || under(st.data_used_bytes, st.data_total_bytes)
        || under(st.metadata_used_bytes, st.metadata_total_bytes)
}

fn pool_err(context: impl Into<String>) -> impl FnOnce(PoolError) -> EngineError {
    let context = context.into();
    move |source| match source {
        PoolError::Busy(dev) => EngineError::FailedPrecondition(format!(
            "{context}: dm device {dev} is busy; unmount it first"
        )),
        PoolError::NoSpace(pool) => {
            EngineError::ResourceExhausted(format!("{context}: thin pool {pool} is out of space"))
        }
        source => EngineError::Pool { context, source },
    }
}

/// What a client sees of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub key: String,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A mount for containerd: `mount -t <fs_type> -o <options> <source> <target>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Space a snapshot uses, excluding its parent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

/// Counts for `thinsnap status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStatus {
    pub pool: PoolStatus,
    pub active: u64,
    pub views: u64,
    pub committed: u64,
    pub thin_ids: u64,
    pub base: Option<BaseRecord>,
}

/// Nanoseconds since the epoch, for records.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn to_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

fn check_key(what: &str, key: &str) -> Result<(), EngineError> {
    if key.is_empty() {
        return Err(EngineError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(EngineError::InvalidArgument(format!(
            "{what} is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels against the documented limits.
///
/// Returns InvalidArgument naming the offending label.
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), EngineError> {
    let mut n = 0;
    for (k, v) in labels {
        n += 1;
        if k.is_empty() {
            return Err(EngineError::InvalidArgument(
                "label key must not be empty".into(),
            ));
        }
        if k.len() + v.len() > MAX_LABEL_LEN {
            let shown: String = k.chars().take(64).collect();
            return Err(EngineError::InvalidArgument(format!(
                "label {shown:?}: key and value are {} bytes; at most {MAX_LABEL_LEN} are allowed",
                k.len() + v.len()
            )));
        }
    }
    if n > MAX_LABELS {
        return Err(EngineError::InvalidArgument(format!(
            "{n} labels; at most {MAX_LABELS} are allowed"
        )));
    }
    Ok(())
}

/// The label that makes a snapshot's device larger than its parent's (human units).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinsnap.size";

/// What the engine takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub fs: FsConfig,
    /// Prepare and View are refused below this share (percent) of free data or metadata space.
    pub min_free_percent: f64,
    /// Remove answers once the record is gone; a background reaper deletes the device.
    pub remove_async: bool,
    /// Discard a device's blocks before deleting it.
    pub discard: bool,
    /// A directory for temporary mounts (formatting the base, growing xfs).
    pub scratch: PathBuf,
    /// thinsnap made the pool (loop mode): a thin id in it that the store does not know is an
    /// orphan of ours and is deleted at start. Otherwise such ids belong to someone else.
    pub owns_pool: bool,
    /// Not owning the pool: start even if it holds thin ids the store does not know.
    pub allow_foreign_devices: bool,
    /// Loop mode with `pool.autogrow.enabled`: grow the pool as it fills.
    pub autogrow: Option<AutogrowConfig>,
}

impl Settings {
    /// The engine's part of `config`.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            fs: config.fs.clone(),
            min_free_percent: config.pool.min_free_space.0,
            remove_async: config.remove.asynchronous,
            discard: config.remove.discard,
            scratch: config.root.clone(),
            owns_pool: config.pool.mode == PoolMode::Loop,
            allow_foreign_devices: config.pool.allow_foreign_devices,
            autogrow: (config.pool.autogrow.enabled && config.pool.mode == PoolMode::Loop)
                .then(|| config.pool.autogrow.clone()),
        }
    }

    /// Defaults with `fs`, for tests.
    pub fn with_fs(fs: FsConfig) -> Settings {
        Settings {
            fs,
            min_free_percent: 10.0,
            remove_async: false,
            discard: false,
            scratch: std::env::temp_dir(),
            owns_pool: true,
            allow_foreign_devices: false,
            autogrow: None,
        }
    }
}

/// The snapshot engine. Shared between gRPC handlers through an `Arc`.
pub struct Engine {
    pool: Arc<dyn ThinPool>,
    /// Numbers the pool's changes (pools thinsnap owns; see [`crate::pool::txid`]).
    tx: Arc<TxCounter>,
    store: Store,
    base: BaseRecord,
    settings: Settings,
    locks: KeyLocks,
    /// Kernel calls hold it shared; growing the pool (which suspends it) holds it exclusively.
    kernel: tokio::sync::RwLock<()>,
    /// The background reaper of `remove.async`, once started.
    reaper: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<ThinId>>>,
    /// What last limited `pool.autogrow` (logged when it changes).
    autogrow_limited: std::sync::Mutex<Vec<String>>,
}

impl Engine {
    /// Builds the engine on a recovered store (see [`recovery::start`]).
    fn new(
        pool: Arc<dyn ThinPool>,
        tx: Arc<TxCounter>,
        store: Store,
        base: BaseRecord,
        settings: Settings,
    ) -> Engine {
        Engine {
            pool,
            tx,
            store,
            base,
            settings,
            locks: KeyLocks::default(),
            kernel: tokio::sync::RwLock::new(()),
            reaper: std::sync::Mutex::new(None),
            autogrow_limited: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on the pool in the blocking thread pool.
    async fn on_pool<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn ThinPool) -> Result<T, EngineError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let _shared = self.kernel.read().await;
        tokio::task::spawn_blocking(move || f(&*pool))
            .await
            .map_err(|e| EngineError::Internal(format!("pool task failed: {e}")))?
    }

    /// Makes every change so far durable, with the pool's transaction id as of now.
    async fn flush(&self) -> Result<(), StoreError> {
        if let Some(id) = self.tx.current() {
            self.store.set_pool_transaction_id(id)?;
        }
        self.store.flush().await
    }

    /// Refuses to create while free data or metadata space is under the floor
    /// (`pool.min_free_space`), or while the pool cannot take writes.
    async fn check_space(&self) -> Result<(), EngineError> {
        let floor = self.settings.min_free_percent;
        let mut st = self
            .on_pool(|pool| pool.status().map_err(pool_err("read pool status")))
            .await?;
        if self.settings.autogrow.is_some() && below_floor(&st, floor) {
            // Grow first (if allowed), refuse only if that was not enough.
            match self.autogrow().await {
                Ok(true) => {
                    st = self
                        .on_pool(|pool| pool.status().map_err(pool_err("read pool status")))
                        .await?;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot grow the pool"),
            }
        }
        let name = self.pool.info().name;
        if st.read_only || st.out_of_data_space || st.needs_check {
            return Err(EngineError::ResourceExhausted(format!(
                "thin pool {name} cannot take writes (read_only={}, out_of_data_space={}, needs_check={}); \
                 remove snapshots or grow the pool",
                st.read_only, st.out_of_data_space, st.needs_check
            )));
        }
        for (what, used, total) in [
            ("data", st.data_used_bytes, st.data_total_bytes),
            ("metadata", st.metadata_used_bytes, st.metadata_total_bytes),
        ] {
            let (free, required) = free_and_required(used, total, floor);
            if free < required {
                let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
                return Err(EngineError::ResourceExhausted(format!(
                    "thin pool {name}: {} of {what} space free ({:.1}%), pool.min_free_space requires {} ({floor}%); \
                     remove snapshots or grow the pool",
                    human(free),
                    free as f64 * 100.0 / total.max(1) as f64,
                    human(required)
                )));
            }
        }
        Ok(())
    }

    fn mounts_of(&self, rec: &SnapshotRecord) -> Vec<Mount> {
        vec![Mount {
            fs_type: self.settings.fs.fs_type.as_str().to_string(),
            source: self.pool.device_path(rec.thin_id).display().to_string(),
            options: mount_options(&self.settings.fs, rec.kind == Kind::View),
        }]
    }

    fn info_of(key: &str, rec: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            key: key.to_string(),
            kind: rec.kind,
            parent: rec.parent.clone().unwrap_or_default(),
            labels: rec.labels.clone(),
            created_at: to_time(rec.created_at),
            updated_at: to_time(rec.updated_at),
        }
    }

    fn ready(&self, key: &str) -> Result<SnapshotRecord, EngineError> {
        match self.store.get(key)? {
            Some(rec) if rec.state == State::Ready => Ok(rec),
            _ => Err(EngineError::NotFound(format!("snapshot {key:?} not found"))),
        }
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
        let size = match labels.get(SIZE_LABEL) {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| {
                        EngineError::InvalidArgument(format!(
                            "label {SIZE_LABEL}={v:?} of {key:?} is not a size: {e}"
                        ))
                    })?
                    .as_u64(),
            ),
        };
        let _guard = self.locks.lock(&[key]).await;
        self.check_space().await?;
        let new = NewSnapshot {
            key: key.to_string(),
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            now: now_ns(),
            size,
        };
        // 1. Intent: records in state Creating, durable before the kernel is touched.
        let plan = self
            .store
            .begin_create(&new, &self.base)
            .map_err(|e| match e {
                StoreError::FailedPrecondition(m) if size.is_some() && m.starts_with("size ") => {
                    EngineError::InvalidArgument(format!("label {SIZE_LABEL} of {key:?}: {m}"))
                }
                e => e.into(),
            })?;
        self.flush().await?;
        crate::failpoint!("prepare:after-intent");
        // 2. The kernel: create_snap, then activate.
        let (id, origin, size) = (plan.thin_id, plan.origin, plan.size);
        let grow = (size > plan.parent_size)
            .then(|| (self.settings.fs.clone(), self.settings.scratch.clone()));
        let tx = self.tx.clone();
        let made = self
            .on_pool(move |pool| {
                tx.change(pool, || pool.create_snap(id, origin))
                    .map_err(pool_err(format!("create thin id {id} from {origin}")))?;
                crate::failpoint!("prepare:after-create-snap");
                let dev = pool
                    .activate(id, size)
                    .map_err(pool_err(format!("activate thin id {id}")))?;
                if let Some((fs, scratch)) = grow {
                    // Only with the size label: a process spawn, off the common Prepare path.
                    crate::fs::grow(&dev, &fs, &scratch)?;
                }
                crate::failpoint!("prepare:after-activate");
                Ok(())
            })
            .await;
        if let Err(e) = made {
            warn!(key, thin_id = id, error = %e, "prepare failed; undoing");
            self.undo_create(key, id).await;
            return Err(e);
        }
        // 3. Outcome.
        let finished = async {
            self.store.finish_create(key)?;
            self.flush().await?;
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

    /// Undoes a half-made snapshot: its record goes, its device is reaped.
    async fn undo_create(&self, key: &str, id: ThinId) {
        if let Err(e) = self.store.forget_snapshot_keep_device(key) {
            warn!(key, thin_id = id, error = %e, "cannot drop the record of an undone snapshot");
            return;
        }
        let _ = self.flush().await;
        self.reap(id).await;
    }

    /// Deactivates and deletes thin device `id`, whose record is in state Deleting, then forgets
    /// it. A failure leaves the record for [`Engine::cleanup`] and recovery to retry.
    async fn reap(&self, id: ThinId) -> bool {
        let discard = self
            .settings
            .discard
            .then(|| self.store.device(id).ok().flatten().map(|d| d.size))
            .flatten();
        let tx = self.tx.clone();
        let deleted = self
            .on_pool(move |pool| {
                pool.deactivate(id)
                    .map_err(pool_err(format!("deactivate thin id {id}")))?;
                if let Some(size) = discard {
                    match pool.discard(id, size) {
                        Ok(()) | Err(PoolError::ThinNotFound(_)) => {}
                        Err(e) => return Err(pool_err(format!("discard thin id {id}"))(e)),
                    }
                }
                match tx.change(pool, || pool.delete_thin(id)) {
                    Ok(()) | Err(PoolError::ThinNotFound(_)) => {}
                    Err(e) => return Err(pool_err(format!("delete thin id {id}"))(e)),
                }
                crate::failpoint!("remove:after-delete");
                Ok(())
            })
            .await;
        match deleted {
            Ok(()) => {
                if let Err(e) = self.store.forget_device(id) {
                    warn!(thin_id = id, error = %e, "cannot forget deleted device");
                    return false;
                }
                if let Err(e) = self.flush().await {
                    warn!(thin_id = id, error = %e, "cannot flush after deleting device");
                    return false;
                }
                crate::failpoint!("remove:after-forget");
                true
            }
            Err(e) => {
                warn!(thin_id = id, error = %e, "cannot delete thin device; left for cleanup");
                false
            }
        }
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
        Ok(self.mounts_of(&rec))
    }

    /// Commits active snapshot `key` as `name`: the device keeps its thin id and is deactivated.
    ///
    /// Returns NotFound if `key` does not exist, FailedPrecondition if it is a view or committed
    /// or still mounted, AlreadyExists if `name` is taken.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        check_key("name", name)?;
        check_key("key", key)?;
        check_labels(&labels)?;
        let _guard = self.locks.lock(&[key, name]).await;
        let rec = self.ready(key)?;
        if rec.kind != Kind::Active {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} is {}; only an active snapshot can be committed",
                rec.kind.as_str()
            )));
        }
        if self.store.get(name)?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let (id, size) = (rec.thin_id, rec.size);
        let what = format!("commit snapshot {key:?}");
        let mapped = self
            .on_pool(move |pool| {
                pool.activate(id, size)
                    .map_err(pool_err(format!("{what}: activate thin id {id}")))?;
                let mapped = pool
                    .mapped_bytes(id)
                    .map_err(pool_err(format!("{what}: read usage of thin id {id}")))?;
                match pool.deactivate(id) {
                    Ok(()) => {}
                    // containerd's own conformance suite commits snapshots it has not
                    // unmounted yet (so does a careless client): flush the filesystem now and
                    // let the device go at its last close, as containerd's devmapper does.
                    Err(PoolError::Busy(_)) => {
                        warn!(thin_id = id, "committing a snapshot that is still mounted");
                        pool.deactivate_deferred(id).map_err(pool_err(what))?;
                    }
                    Err(e) => return Err(pool_err(what)(e)),
                }
                crate::failpoint!("commit:after-deactivate");
                Ok(mapped)
            })
            .await?;
        let committed = self.store.commit(key, name, labels, mapped, now_ns());
        let committed = match committed {
            Ok(c) => self.flush().await.map(|_| c).map_err(EngineError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = committed {
            // The active snapshot is still what the store has: give it its device back.
            let _ = self
                .on_pool(move |pool| {
                    pool.activate(id, size)
                        .map_err(pool_err(format!("reactivate thin id {id}")))
                })
                .await;
            return Err(e);
        }
        crate::failpoint!("commit:after-record");
        info!(key, name, thin_id = id, mapped, "committed snapshot");
        Ok(())
    }

    /// Removes a snapshot and deletes its thin device.
    ///
    /// Returns NotFound if it does not exist, FailedPrecondition if it has children or its
    /// device is still mounted.
    pub async fn remove(&self, key: &str) -> Result<(), EngineError> {
        check_key("key", key)?;
        let _guard = self.locks.lock(&[key]).await;
        let rec = self.ready(key)?;
        if rec.kind == Kind::Committed && rec.children > 0 {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} has {} child snapshot(s); remove them first",
                rec.children
            )));
        }
        let id = rec.thin_id;
        let reaper = self.reaper.lock().expect("reaper mutex poisoned").clone();
        if let Some(reaper) = reaper {
            // remove.async: answer once the record is gone; the reaper deletes the device,
            // retrying while it is busy, so Remove never blocks containerd's garbage collector.
            self.store.begin_remove(key)?;
            self.flush().await?;
            let _ = reaper.send(id);
            info!(
                key,
                thin_id = id,
                "removed snapshot; device queued for the reaper"
            );
            return Ok(());
        }
        if rec.kind != Kind::Committed {
            // Deactivate first: a device still mounted refuses, and the snapshot stays intact.
            let what = format!("remove snapshot {key:?}");
            self.on_pool(move |pool| pool.deactivate(id).map_err(pool_err(what)))
                .await?;
            crate::failpoint!("remove:after-deactivate");
        }
        let removed = async {
            self.store.begin_remove(key)?;
            self.flush().await?;
            Ok::<_, EngineError>(())
        }
        .await;
        if let Err(e) = removed {
            if rec.kind != Kind::Committed {
                let size = rec.size;
                let _ = self
                    .on_pool(move |pool| {
                        pool.activate(id, size)
                            .map_err(pool_err(format!("reactivate thin id {id}")))
                    })
                    .await;
            }
            return Err(e);
        }
        crate::failpoint!("remove:after-intent");
        self.reap(id).await;
        info!(key, thin_id = id, "removed snapshot");
        Ok(())
    }

    /// Info of a snapshot.
    ///
    /// Returns NotFound if it does not exist.
    pub async fn stat(&self, key: &str) -> Result<SnapshotInfo, EngineError> {
        check_key("key", key)?;
        let rec = self.ready(key)?;
        Ok(Self::info_of(key, &rec))
    }

    /// Updates the labels of a snapshot, the only mutable field. `paths` empty replaces all
    /// labels; `labels` replaces all; `labels.<k>` sets or (absent from `labels`) removes one.
    ///
    /// Returns NotFound if it does not exist, InvalidArgument for any other field path.
    pub async fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo, EngineError> {
        check_key("name", key)?;
        let _guard = self.locks.lock(&[key]).await;
        let rec = self.ready(key)?;
        let mut new_labels = rec.labels.clone();
        if paths.is_empty() {
            new_labels = labels;
        } else {
            for path in paths {
                if path == "labels" {
                    new_labels = labels.clone();
                } else if let Some(l) = path.strip_prefix("labels.") {
                    match labels.get(l) {
                        Some(v) => {
                            new_labels.insert(l.to_string(), v.clone());
                        }
                        None => {
                            new_labels.remove(l);
                        }
                    }
                } else {
                    return Err(EngineError::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {key:?}: only labels are mutable"
                    )));
                }
            }
        }
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
        let mapped = match rec.kind {
            Kind::Committed => rec.mapped,
            Kind::Active | Kind::View => {
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

    /// Every snapshot that passes `filters` (containerd's syntax: several filters OR, `,` AND).
    ///
    /// Returns InvalidArgument for a malformed filter.
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, EngineError> {
        let parsed =
            filter::parse_all(filters).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        let mut out = Vec::new();
        for (key, rec) in self.store.snapshots()? {
            if rec.state != State::Ready {
                continue;
            }
            let parent = rec.parent.clone().unwrap_or_default();
            let fields = filter::Fields {
                kind: rec.kind.as_str(),
                name: &key,
                parent: &parent,
                labels: &rec.labels,
            };
            if filter::any_matches(&parsed, &fields) {
                out.push(Self::info_of(&key, &rec));
            }
        }
        Ok(out)
    }

    /// Deletes thin devices left behind by removals that could not finish (a device that was
    /// busy, a crash), and dm devices with our prefix that no record owns.
    ///
    /// Returns an error if the store or the pool cannot be read.
    pub async fn cleanup(&self) -> Result<usize, EngineError> {
        let mut reaped = 0;
        for dev in self.store.devices()? {
            if dev.state == State::Deleting && self.reap(dev.thin_id).await {
                reaped += 1;
            }
        }
        let known: std::collections::BTreeSet<ThinId> =
            self.store.devices()?.iter().map(|d| d.thin_id).collect();
        let active = self
            .on_pool(|pool| pool.active_ids().map_err(pool_err("list active devices")))
            .await?;
        for id in active.into_iter().filter(|id| !known.contains(id)) {
            // Every device we activate has a record first; one without is an orphan.
            warn!(thin_id = id, "active device with no record; deleting");
            let tx = self.tx.clone();
            let gone = self
                .on_pool(move |pool| {
                    pool.deactivate(id)
                        .map_err(pool_err(format!("deactivate orphan thin id {id}")))?;
                    match tx.change(pool, || pool.delete_thin(id)) {
                        Ok(()) | Err(PoolError::ThinNotFound(_)) => Ok(()),
                        Err(e) => Err(pool_err(format!("delete orphan thin id {id}"))(e)),
                    }
                })
                .await;
            match gone {
                Ok(()) => reaped += 1,
                Err(e) => warn!(thin_id = id, error = %e, "cannot delete orphan"),
            }
        }
        Ok(reaped)
    }

    /// Starts the background reaper when `remove.async` is on, and queues every device left in
    /// state Deleting (by a crash or a busy device). Needs a tokio runtime.
    pub fn spawn_reaper(self: &Arc<Self>) {
        if !self.settings.remove_async {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ThinId>();
        if let Ok(devices) = self.store.devices() {
            for d in devices.iter().filter(|d| d.state == State::Deleting) {
                let _ = tx.send(d.thin_id);
            }
        }
        *self.reaper.lock().expect("reaper mutex poisoned") = Some(tx.clone());
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let Some(e) = engine.upgrade() else { break };
                if !e.reap(id).await {
                    // Busy (still mounted) or a passing failure: try again a little later.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        let _ = tx.send(id);
                    });
                }
            }
        });
    }

    /// `pool.autogrow`: grows the pool if its use reached the threshold, as far as the maximum
    /// and the host's free space allow. Returns whether it grew.
    ///
    /// Returns an error if the pool's status cannot be read or growing failed.
    pub async fn autogrow(&self) -> Result<bool, EngineError> {
        let Some(config) = self.settings.autogrow.clone() else {
            return Ok(false);
        };
        let (st, room) = self
            .on_pool(|pool| {
                let st = pool.status().map_err(pool_err("read pool status"))?;
                let room = pool
                    .host_room()
                    .map_err(pool_err("read the host's free space"))?;
                Ok((st, room))
            })
            .await?;
        let Some(room) = room else {
            return Ok(false);
        };
        let plan = autogrow::plan(&config, &st, room);
        {
            // Said once, not at every check, until it changes.
            let mut last = self
                .autogrow_limited
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *last != plan.limited {
                for why in &plan.limited {
                    warn!(pool = %self.pool.info().name, "autogrow limited: {why}");
                }
                last.clone_from(&plan.limited);
            }
        }
        if !plan.grows() {
            return Ok(false);
        }
        self.grow(plan.data, plan.metadata).await?;
        info!(
            pool = %self.pool.info().name,
            data_from = st.data_total_bytes,
            data_to = plan.data,
            metadata_from = st.metadata_total_bytes,
            metadata_to = plan.metadata,
            "autogrow: grew the pool"
        );
        Ok(true)
    }

    /// Starts the periodic `pool.autogrow` check, if it is enabled.
    pub fn spawn_autogrow(self: &Arc<Self>) {
        let Some(config) = &self.settings.autogrow else {
            return;
        };
        let period = std::time::Duration::from_secs(config.interval_seconds);
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(e) = engine.upgrade() else { break };
                if let Err(err) = e.autogrow().await {
                    warn!(error = %err, "autogrow: cannot grow the pool");
                }
            }
        });
    }

    /// Grows the pool online (loop mode): data and/or metadata to the given sizes.
    ///
    /// Returns FailedPrecondition for pools thinsnap did not make, InvalidArgument for a size
    /// smaller than now.
    pub async fn grow(&self, data: Option<u64>, metadata: Option<u64>) -> Result<(), EngineError> {
        let _exclusive = self.kernel.write().await;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.grow(data, metadata))
            .await
            .map_err(|e| EngineError::Internal(format!("pool task failed: {e}")))?
            .map_err(|e| match e {
                PoolError::Unsupported(m) => EngineError::FailedPrecondition(m),
                PoolError::Invalid(m) => EngineError::InvalidArgument(m),
                e => pool_err("grow the pool")(e),
            })
    }

    /// Pool space and health with the snapshot counts.
    ///
    /// Returns an error if the pool status cannot be read.
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let pool = self
            .on_pool(|pool| pool.status().map_err(pool_err("read pool status")))
            .await?;
        let mut st = EngineStatus {
            pool,
            base: Some(self.base.clone()),
            thin_ids: self.store.devices()?.len() as u64,
            ..EngineStatus::default()
        };
        for (_, rec) in self.store.snapshots()? {
            if rec.state != State::Ready {
                continue;
            }
            match rec.kind {
                Kind::Active => st.active += 1,
                Kind::View => st.views += 1,
                Kind::Committed => st.committed += 1,
            }
        }
        Ok(st)
    }

    /// What the pool is made of.
    pub fn pool_info(&self) -> crate::pool::PoolInfo {
        self.pool.info()
    }

    /// The configured filesystem.
    pub fn fs(&self) -> &FsConfig {
        &self.settings.fs
    }

    /// Every thin id the store holds a device record for (any state), in order.
    ///
    /// Returns an error if the store cannot be read.
    pub fn thin_ids(&self) -> Result<Vec<ThinId>, EngineError> {
        Ok(self.store.devices()?.iter().map(|d| d.thin_id).collect())
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

    /// The device path of a thin id (for tests and status).
    pub fn device_path(&self, id: ThinId) -> PathBuf {
        self.pool.device_path(id)
    }

    /// The record of a snapshot, for tests.
    pub fn record(&self, key: &str) -> Result<Option<SnapshotRecord>, EngineError> {
        Ok(self.store.get(key)?)
    }
}

#[cfg(test)]
mod tests;
