//! Start-up: reconcile the store with what the kernel really has, then make sure the base device
//! exists. Runs before the socket is served, on a blocking thread.
//!
//! Every mutating call records its intent (state Creating or Deleting) durably before it touches
//! the kernel, so after a crash or a reboot each record says what may be half done. [`start`]
//! runs these phases in order, each logged:
//! 1. `Recovery::settle_devices`: a device Creating whose call flushes its outcome before it
//!    answers (`roll_forward` false: the size label, a pool thinsnap does not own, records of
//!    older versions) never answered its caller; its thin device may exist: delete it, drop the
//!    records (the client saw an error or nothing, and will retry). A device Creating with
//!    `roll_forward` may have answered OK with only its intent durable: if the pool has its thin
//!    device, activate it and mark it Ready (the call is complete); if not, undo it as above.
//!    A device Deleting is already gone for clients: finish deleting it. A Ready device with a
//!    Commit intent: finish the Commit from the intent (then, as committed, its device is
//!    deactivated). A Ready device: an active snapshot or view is left as it is, its device
//!    activated by the first call that needs it (lazy activation, `super::activate`: a start
//!    after a reboot does not re-make every device before serving), a committed snapshot's or
//!    the base's active device is deactivated, and a device no snapshot owns is deleted.
//!
//! Start-up is never blocked for ever by one device: a kernel step that fails here (a delete
//! refused by a read-only pool, a device still mounted) is logged and left for the next call on
//! its key, Cleanup or the next start; a Ready snapshot whose thin id the pool does not have
//! (seen by the thin_ls pass) is quarantined (`super::activate`), kept and reported, never
//! dropped. A create rolled forward whose activation fails with anything but "thin id gone"
//! (whether the pool has the thin id is then not known) is completed and left awaiting
//! activation; the thin_ls pass, which such a start always runs, undoes it if the pool has no
//! such thin id (its call never answered OK).
//!
//! A warm spare's device record (owner `SPARE_OWNER`, see `super::spares`) is settled as its own
//! kind: Creating is undone as an interrupted create (the shared-pool rule included), Deleting is
//! finished, and Ready is deleted too: only a spare whose device this run activated is ever
//! handed out, and the refiller makes new ones. Every committed snapshot's list of spares is then
//! emptied. No spare survives a start, so none leaks and none is handed out twice.
//! 2. `Recovery::drop_dangling_snapshots`: a snapshot record whose device record is gone is
//!    never served.
//! 3. `Recovery::delete_unowned_active`: an active dm device with our prefix that no record
//!    owns is deleted.
//! 4. `Recovery::reconcile_thin_ids`, unless the pool's transaction id shows the store saw
//!    every change: the pool's thin ids (thin_ls) against the store's.
//! 5. `Recovery::ensure_base`: the base device, made once per pool.
//!
//! This file runs the phases in order; they live in `settle` (1), `reconcile` (2 to 4) and
//! `base` (5).
//!
//! The base device is recognised by its thin id (the base record's), not by its owner name:
//! snapshot keys are opaque, and a client's key may be anything, `<base>` included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use tracing::info;

mod base;
mod reconcile;
mod settle;

use super::{pool_err, Engine, EngineError, Settings};
use crate::fs::FsError;
use crate::model::ThinId;
use crate::pool::{NumberedPool, ThinPool};
use crate::store::{BaseRecord, DeviceRecord, SnapshotRecord, State, Store, StoreError};

/// What recovery did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub undone_creates: Vec<ThinId>,
    /// Creates whose intent was durable and whose thin device the pool had: completed.
    pub completed_creates: Vec<ThinId>,
    /// Creates whose intent was durable but whose device could not be activated at start
    /// (an error other than the thin id being gone): completed, awaiting activation, unless the
    /// thin_ls pass of the same start found the pool without the thin id (then undone).
    pub unverified_creates: Vec<ThinId>,
    /// Commits whose intent was durable: completed.
    pub completed_commits: Vec<ThinId>,
    pub finished_deletes: Vec<ThinId>,
    /// Active snapshots and views whose dm devices are missing: activated on first use.
    pub awaiting_activation: Vec<ThinId>,
    /// Ready snapshots quarantined at this start (their thin ids are gone from the pool).
    pub quarantined: Vec<ThinId>,
    /// Kernel steps that failed and were left for later (their records kept as they were).
    pub left_for_later: Vec<ThinId>,
    pub deactivated: Vec<ThinId>,
    pub orphans_deleted: Vec<ThinId>,
    /// Thin ids of interrupted creates in a shared pool, not deleted: they may be another
    /// owner's (see `undo_create`).
    pub left_alone: Vec<ThinId>,
    /// Warm spares deleted at start (Ready ones; interrupted ones count as undone creates).
    pub spares_dropped: Vec<ThinId>,
    pub base_created: bool,
    /// The pool's thin ids were read (thin_ls) and compared with the store's; false when the
    /// pool's transaction id showed that the store had seen every change.
    pub thin_ids_listed: bool,
}

impl Report {
    fn changed_anything(&self) -> bool {
        !self.undone_creates.is_empty()
            || !self.left_alone.is_empty()
            || !self.completed_creates.is_empty()
            || !self.unverified_creates.is_empty()
            || !self.completed_commits.is_empty()
            || !self.finished_deletes.is_empty()
            || !self.orphans_deleted.is_empty()
            || !self.quarantined.is_empty()
            || !self.left_for_later.is_empty()
            || !self.spares_dropped.is_empty()
    }
}

/// Formats the freshly made base device (mkfs; see [`crate::fs::format_base`]).
pub type Formatter<'a> = &'a (dyn Fn(&Path) -> Result<(), FsError> + Sync);

/// Every device and snapshot record of a store, decoded once: what recovery starts from.
///
/// The daemon reads them while the kernel makes the pool, to tell whether the store is settled
/// (see [`Records::settled`]), and hands them to [`start_from`]: a start with thousands of
/// records does not read them once for that check and again for recovery (only phase 2
/// re-reads the device records, which phase 1 may have deleted).
#[derive(Debug)]
pub struct Records {
    devices: Vec<DeviceRecord>,
    snapshots: HashMap<String, SnapshotRecord>,
}

impl Records {
    /// Reads every device and snapshot record of `store`.
    ///
    /// Returns an error if the store cannot be read.
    pub fn read(store: &Store) -> Result<Records, StoreError> {
        Ok(Records {
            devices: store.devices()?,
            snapshots: store.snapshots()?.into_iter().collect(),
        })
    }

    /// Whether recovery could change anything a client reads: false when a call was cut short
    /// (a record Creating or Deleting, a Commit intent) or a snapshot's device record is gone
    /// (recovery drops such a snapshot). Quarantine is not seen by Stat or List.
    pub fn settled(&self) -> bool {
        let mut ids = BTreeSet::new();
        for d in &self.devices {
            if d.state != State::Ready || d.commit.is_some() {
                return false;
            }
            ids.insert(d.thin_id);
        }
        self.snapshots
            .values()
            .all(|s| s.state == State::Ready && ids.contains(&s.thin_id))
    }
}

/// Reconciles `store` with `pool`, creates the base device if there is none, and returns the
/// engine ready to serve.
///
/// Returns an error if the store or pool cannot be read, the base cannot be made, or the
/// existing base's filesystem is not the configured one.
pub fn start(
    pool: Arc<dyn ThinPool>,
    store: Store,
    settings: Settings,
    format: Formatter<'_>,
) -> Result<(Engine, Report), EngineError> {
    let records = Records::read(&store)?;
    start_from(pool, store, records, settings, format)
}

/// [`start`] from `records`, read from `store` since it was opened, with nothing written to it
/// since.
///
/// Returns an error as [`start`] does.
pub fn start_from(
    pool: Arc<dyn ThinPool>,
    store: Store,
    records: Records,
    settings: Settings,
    format: Formatter<'_>,
) -> Result<(Engine, Report), EngineError> {
    // Whose pool it is, before anything may be deleted from it.
    let has_records =
        !records.devices.is_empty() || !records.snapshots.is_empty() || store.base()?.is_some();
    super::ownership::check(pool.as_ref(), &store, has_records, &settings)?;
    let pool = Arc::new(
        NumberedPool::new(pool, settings.owns_pool).map_err(pool_err("read pool status"))?,
    );
    let mut r = Recovery::read(&pool, &store, records, &settings)?;
    r.settle_devices()?;
    r.clear_spare_lists()?;
    r.drop_dangling_snapshots()?;
    r.delete_unowned_active()?;
    store.flush_sync()?;
    if r.consistent && pool.status().is_ok_and(|st| st.metadata_snapshot_held) {
        // A thin_ls cut short by a kill (the start's, or the audit's while serving): the pass
        // below releases the snapshot it left reserved, which would otherwise fail every audit.
        info!("a metadata snapshot is left reserved; listing the pool's thin ids");
        r.consistent = false;
    }
    if r.consistent {
        info!(
            transaction_id = r.recorded_txid,
            "the pool's transaction id is the one last recorded: its thin ids are known"
        );
    } else {
        r.reconcile_thin_ids()?;
        store.flush_sync()?;
    }
    let base = r.ensure_base(format)?;
    let report = r.report;
    let pending = r.pending;
    if report.changed_anything() {
        info!(?report, "recovery done");
    }
    info!(
        awaiting_activation = report.awaiting_activation.len(),
        quarantined = report.quarantined.len(),
        "serving; active snapshots' devices are activated on first use"
    );
    if let Some(id) = pool.current() {
        store.set_pool_transaction_id(id)?;
        store.flush_sync()?;
    }
    let engine = Engine::new(pool, store, base, settings);
    engine.lazy.fill(pending);
    Ok((engine, report))
}

/// The state recovery works on: what the kernel and the store had at start, and what was done.
struct Recovery<'a> {
    pool: &'a NumberedPool,
    store: &'a Store,
    settings: &'a Settings,
    /// Thin ids whose dm devices are active.
    active: BTreeSet<ThinId>,
    base: Option<BaseRecord>,
    /// Every device record as the start found it, settled by phase 1 (which takes them).
    devices: Vec<DeviceRecord>,
    /// Every snapshot record, decoded once: a start with thousands of them must not read each
    /// twice (once per device, once more for the dangling check).
    snapshots: HashMap<String, SnapshotRecord>,
    recorded_txid: Option<u64>,
    /// Nothing half done, and the store saw the outcome of the pool's last change: the store
    /// knows every thin id in the pool.
    consistent: bool,
    /// Active snapshots and views not known to have a live device (see `super::activate`).
    pending: BTreeMap<ThinId, bool>,
    /// Creates completed without knowing whether the pool has their thin ids (see
    /// `settle_create`): thin_ls tells.
    unverified: BTreeSet<ThinId>,
    report: Report,
}

impl<'a> Recovery<'a> {
    /// Reads the kernel's active devices and the store's other records.
    fn read(
        pool: &'a NumberedPool,
        store: &'a Store,
        records: Records,
        settings: &'a Settings,
    ) -> Result<Recovery<'a>, EngineError> {
        let active = pool
            .active_ids()
            .map_err(pool_err("list active devices"))?
            .into_iter()
            .collect();
        let recorded_txid = store.pool_transaction_id()?;
        let consistent = pool.current().is_some()
            && recorded_txid == pool.current()
            && records.devices.iter().all(|d| d.state == State::Ready);
        Ok(Recovery {
            pool,
            store,
            settings,
            active,
            base: store.base()?,
            devices: records.devices,
            snapshots: records.snapshots,
            recorded_txid,
            consistent,
            pending: BTreeMap::new(),
            unverified: BTreeSet::new(),
            report: Report::default(),
        })
    }

    fn delete(&self, id: ThinId) -> Result<(), EngineError> {
        self.pool
            .remove_device(id, None)
            .map_err(pool_err(format!("delete thin id {id}")))
    }
}
