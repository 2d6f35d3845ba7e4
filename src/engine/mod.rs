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
//! This file holds the engine itself (its state, `Engine::on_pool`, the flush); each call of
//! the Snapshots API has a file named after it: `create` (Prepare and View; the kernel step
//! `make_device`), `commit`, `remove`, `mounts`, `update`, `usage`, `reads` (Stat and List, and
//! the lookup every call starts with; below both the engine and its handle), `status` (Admin's
//! Status). Start-up: `start` (the daemon's start-up sequence: [`start()`]), `recovery` (the store
//! reconciled with the kernel), `handle` (the engine as the services reach it while the daemon
//! starts). The rest along its seams: `error` (the error type and how the layers below map into
//! it), `limits` (what a request may carry), `space` (the free-space floor, growing the pool),
//! `reaper` (deleting devices: Remove's last step, Cleanup, `remove.async`), `types` (what
//! callers see and give: infos, mounts, status, settings), `activate` (a device made on first
//! use after a reboot; quarantined snapshots), `spares` (warm spares: Prepare and View on a
//! device made ahead, and their refiller), `audit` (the pool's thin ids against the store, after
//! a start and at Cleanup), `calls` (the calls in flight, each a task of its own, waited for at a
//! clean stop), `locks` (per-key locks).

mod activate;
mod audit;
pub mod autogrow;
mod calls;
mod commit;
mod create;
mod error;
pub mod filter;
mod handle;
mod inventory;
mod limits;
mod locks;
mod mounts;
pub mod ownership;
mod reads;
mod reaper;
pub mod recovery;
mod remove;
mod space;
mod spares;
mod start;
mod status;
mod types;
mod update;
mod usage;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

pub use crate::model::{Kind, ThinId};
use crate::pool::{NumberedPool, PoolInfo, ThinPool};
use crate::store::{BaseRecord, SnapshotRecord, Store, StoreError};
pub use activate::QuarantinedInfo;
pub use audit::AuditReport;
pub use calls::Calls;
pub(crate) use error::pool_err;
pub use error::EngineError;
pub use handle::{EngineHandle, Publisher};
pub use inventory::{DeviceState, Entry, EntryKind, Inventory, Mapped};
pub use limits::{
    MAX_FIELD_PATHS, MAX_KEY_LEN, MAX_LABELS, MAX_LABELS_BYTES, MAX_LABEL_LEN, MAX_SIZE_LABEL,
    SIZE_LABEL,
};
use locks::KeyLocks;
pub use spares::{SpareCounts, SPARE_OWNER};
#[cfg(test)]
pub(crate) use start::start_opening;
pub use start::{start, StartError, StartTask};
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

/// The snapshot engine. Shared between gRPC handlers through an `Arc`.
pub struct Engine {
    /// The only way to the kernel: numbers every change (see [`NumberedPool`]).
    pool: Arc<NumberedPool>,
    store: Store,
    base: BaseRecord,
    settings: Settings,
    locks: KeyLocks,
    /// Per thin id: the reap of a device and a sync Remove that may give it back its record run
    /// one at a time.
    thin_locks: KeyLocks<ThinId>,
    /// The pool-growth lock (it guards no data, only who may call the kernel): every kernel
    /// call holds it shared; growing the pool (which suspends it) holds it exclusively. Its
    /// guards are owned by the blocking closure that does the kernel work (see
    /// [`Engine::on_pool_as`] and [`Engine::grow`]): a caller cancelled meanwhile does not
    /// release it early.
    grow_lock: Arc<tokio::sync::RwLock<()>>,
    /// `remove.async`: Remove queues thin ids here for the reaper ([`Engine::run_reaper`]).
    reaper: Option<UnboundedSender<ThinId>>,
    /// The reaper's end of that queue, until the reaper task takes it.
    reaper_queue: Mutex<Option<UnboundedReceiver<ThinId>>>,
    /// What last limited `pool.autogrow` (logged when it changes).
    autogrow_limited: Mutex<Vec<String>>,
    /// Devices not activated yet this run (see [`activate`]); shared with the blocking closure
    /// of an activation, which records its outcome itself.
    lazy: Arc<activate::LazyActivation>,
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
            grow_lock: Arc::new(tokio::sync::RwLock::new(())),
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
        // The pool-growth lock's shared guard is owned by the blocking closure: if the caller's future
        // is dropped (a client gone, a `select!`), it is not released while the ioctls it
        // protects still run. A caller that holds another guard for its kernel work moves it
        // into `f` the same way (see `Engine::ensure_device`).
        let pool = self.pool.clone();
        let shared = self.grow_lock.clone().read_owned().await;
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

    fn info_of(key: &str, rec: &SnapshotRecord) -> SnapshotInfo {
        reads::info_of(key, rec)
    }

    fn ready(&self, key: &str) -> Result<SnapshotRecord, EngineError> {
        reads::ready_in(&self.store, key)
    }

    /// Info of a snapshot.
    ///
    /// Returns NotFound if it does not exist.
    pub async fn stat(&self, key: &str) -> Result<SnapshotInfo, EngineError> {
        reads::stat_in(&self.store, key)
    }

    /// Every snapshot that passes `filters` (containerd's syntax: several filters OR, `,` AND),
    /// read and filtered on a blocking thread.
    ///
    /// Returns InvalidArgument for a malformed filter or more than `filter::MAX_FILTERS`.
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, EngineError> {
        reads::list_blocking(self.store.clone(), filters).await
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
