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
//! The base device is recognised by its thin id (the base record's), not by its owner name:
//! snapshot keys are opaque, and a client's key may be anything, `<base>` included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::{pool_err, Engine, EngineError, Settings};
use crate::fs::FsError;
use crate::model::{Kind, ThinId};
use crate::pool::{NumberedPool, PoolError, ThinPool};
use crate::store::{
    BaseRecord, DeviceRecord, Quarantine, SnapshotRecord, State, Store, StoreError, BASE_OWNER,
    SPARE_OWNER,
};

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

    /// Phase 1: every device record according to its state.
    fn settle_devices(&mut self) -> Result<(), EngineError> {
        for dev in std::mem::take(&mut self.devices) {
            if self.is_spare(&dev) {
                self.settle_spare(&dev)?;
                continue;
            }
            match dev.state {
                State::Creating if dev.roll_forward => self.settle_create(&dev)?,
                State::Creating => self.undo_create(&dev)?,
                State::Deleting => self.finish_delete(&dev)?,
                State::Ready if dev.commit.is_some() => self.finish_commit(&dev)?,
                State::Ready => self.settle_ready(&dev)?,
            }
        }
        Ok(())
    }

    /// A warm spare's record: owned by [`SPARE_OWNER`] and not the device of a client's snapshot
    /// that happens to be named so.
    fn is_spare(&self, dev: &DeviceRecord) -> bool {
        dev.owner == SPARE_OWNER
            && self
                .snapshots
                .get(SPARE_OWNER)
                .is_none_or(|r| r.thin_id != dev.thin_id)
    }

    /// A spare at start: whatever its state, it goes (see the module doc).
    fn settle_spare(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let id = dev.thin_id;
        match dev.state {
            State::Creating => self.undo_create(dev),
            State::Deleting => self.finish_delete(dev),
            State::Ready => {
                info!(
                    thin_id = id,
                    origin = ?dev.origin,
                    "deleting a warm spare of the last run"
                );
                self.store.mark_deleting(id)?;
                self.store.flush_sync()?;
                match self.delete(id) {
                    Ok(()) => {
                        self.store.forget_device(id)?;
                        self.active.remove(&id);
                        self.report.spares_dropped.push(id);
                    }
                    // Deleting now: the reaper, Cleanup or the next start finishes it.
                    Err(e) => {
                        warn!(thin_id = id, error = %e, "cannot delete the spare yet; left for cleanup");
                        self.report.left_for_later.push(id);
                    }
                }
                Ok(())
            }
        }
    }

    /// Empties the spare list of every committed snapshot (no spare survives a start).
    fn clear_spare_lists(&mut self) -> Result<(), EngineError> {
        for (key, rec) in self.snapshots.iter_mut() {
            if !rec.spares.is_empty() {
                self.store.clear_spare_list(key)?;
                rec.spares.clear();
            }
        }
        Ok(())
    }

    /// A create that may have answered OK with only its intent durable: complete if the pool
    /// has its thin device (the kernel step was made; activating it is the probe), undo if not.
    /// In a pool thinsnap owns, a thin id is only ever made after its intent is durable, so a
    /// thin device under this id is this call's.
    fn settle_create(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let id = dev.thin_id;
        let size = match self.snapshots.get(&dev.owner) {
            Some(r) if r.thin_id == id && r.state == State::Creating => r.size,
            _ => return self.undo_create(dev),
        };
        match self.pool.activate(id, size) {
            Ok(_) => {
                info!(thin_id = id, key = ?dev.owner,
                      "completing an interrupted create: the pool has its thin device");
                self.store.finish_create(&dev.owner)?;
                if let Some(r) = self.snapshots.get_mut(&dev.owner) {
                    r.state = State::Ready;
                }
                self.active.insert(id);
                self.report.completed_creates.push(id);
                Ok(())
            }
            Err(PoolError::ThinNotFound(_)) => self.undo_create(dev),
            Err(e) => {
                // Whether the pool has its thin device is not known (a busy or failing pool, an
                // ioctl error): the start goes on with the create completed and its device
                // awaiting activation (the first call that needs it makes it, or says why). This
                // start cannot skip thin_ls (a record was Creating): if the pool turns out not to
                // have the thin id, the create is undone there (`quarantine_gone`).
                warn!(thin_id = id, key = ?dev.owner, error = %e,
                      "cannot activate the device of an interrupted create; it awaits activation");
                self.store.finish_create(&dev.owner)?;
                if let Some(r) = self.snapshots.get_mut(&dev.owner) {
                    r.state = State::Ready;
                }
                self.pending.insert(id, true);
                self.unverified.insert(id);
                self.report.awaiting_activation.push(id);
                self.report.unverified_creates.push(id);
                Ok(())
            }
        }
    }

    /// A Commit whose intent is durable: finished from the intent; then the device is settled
    /// as a committed snapshot's (deactivated if active).
    fn finish_commit(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let (id, key) = (dev.thin_id, dev.owner.clone());
        let mut settled = dev.clone();
        settled.commit = None;
        match self.store.finish_commit(&key) {
            Ok(rec) => {
                let name = dev
                    .commit
                    .as_ref()
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                info!(thin_id = id, key = ?key, name = ?name, "completing an interrupted commit");
                self.snapshots.remove(&key);
                self.snapshots.insert(name.clone(), rec);
                settled.owner = name;
                self.report.completed_commits.push(id);
            }
            // Cannot happen (the call held both keys until the crash): the snapshot stays as
            // it was, never half committed.
            Err(e) => {
                warn!(thin_id = id, key = ?key, error = %e, "cannot complete an interrupted commit; dropping its intent");
                self.store.abandon_commit(&key)?;
            }
        }
        self.settle_ready(&settled)
    }

    fn undo_create(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let id = dev.thin_id;
        let shared = self.settings.allow_foreign_devices && !self.settings.owns_pool;
        if shared && !self.active.contains(&id) {
            // A pool shared with someone else, and no transaction id of ours to tell whether
            // this Prepare's create_snap ran: the id in the kernel may be the snapshot it made,
            // or another owner's volume that answered its create_snap with EEXIST just before
            // the kill. Never delete what may not be ours: the id is left alone (counted as a
            // foreign device from now on; at worst an empty snapshot of one of our layers).
            // An active device under our prefix is ours: thinsnap activated it.
            warn!(thin_id = id, owner = ?dev.owner,
                  "interrupted create in a shared pool: its thin id, if the pool holds it, may be another owner's; left alone");
            self.report.left_alone.push(id);
        } else {
            info!(thin_id = id, owner = ?dev.owner, "undoing interrupted create");
            if let Err(e) = self.delete(id) {
                // A read-only pool, a device still open: the record stays Creating (invisible
                // to clients); the next Prepare of the key, Cleanup or the next start tries
                // again.
                warn!(thin_id = id, owner = ?dev.owner, error = %e, "cannot undo the interrupted create yet; left for later");
                self.report.left_for_later.push(id);
                return Ok(());
            }
        }
        let owned_snapshot = self
            .snapshots
            .get(&dev.owner)
            .is_some_and(|r| r.thin_id == id && r.state == State::Creating);
        if owned_snapshot {
            self.store.forget_snapshot(&dev.owner)?;
            self.snapshots.remove(&dev.owner);
        } else {
            self.store.forget_device(id)?;
        }
        self.report.undone_creates.push(id);
        Ok(())
    }

    fn finish_delete(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let id = dev.thin_id;
        info!(thin_id = id, owner = ?dev.owner, "finishing interrupted delete");
        match self.delete(id) {
            Ok(()) => {
                self.store.forget_device(id)?;
                self.report.finished_deletes.push(id);
            }
            // Busy (mounted by someone): the snapshot is already gone for clients; the reaper or
            // Cleanup retries. Starting must not depend on it.
            Err(e) => warn!(thin_id = id, error = %e, "cannot delete yet; left for cleanup"),
        }
        Ok(())
    }

    fn settle_ready(&mut self, dev: &DeviceRecord) -> Result<(), EngineError> {
        let id = dev.thin_id;
        if self.base.as_ref().is_some_and(|b| b.thin_id == id) {
            if self.active.contains(&id) {
                self.deactivate_or_defer(id, "base");
            }
            return Ok(());
        }
        let rec = self.snapshots.get(&dev.owner).filter(|r| r.thin_id == id);
        match rec {
            None => {
                // Also a base device made but never recorded as the base (owner BASE_OWNER).
                warn!(thin_id = id, owner = ?dev.owner, base = dev.owner == BASE_OWNER,
                      "device record without snapshot; deleting");
                self.store.mark_deleting(id)?;
                self.store.flush_sync()?;
                match self.delete(id) {
                    Ok(()) => {
                        self.store.forget_device(id)?;
                        self.report.orphans_deleted.push(id);
                    }
                    // Deleting now: the reaper, Cleanup or the next start finishes it.
                    Err(e) => {
                        warn!(thin_id = id, error = %e, "cannot delete yet; left for cleanup");
                        self.report.left_for_later.push(id);
                    }
                }
            }
            Some(rec) if rec.kind == Kind::Committed => {
                if self.active.contains(&id) {
                    info!(thin_id = id, key = ?dev.owner, "deactivating committed snapshot");
                    self.deactivate_or_defer(id, "committed snapshot");
                }
            }
            // Quarantined: nothing to do with its device until it is removed.
            Some(rec) if rec.quarantine.is_some() => {}
            Some(_) => {
                // Lazy activation: the first call that needs the device activates it (and
                // verifies one that is present: a crash may have left it half made).
                let missing = !self.active.contains(&id);
                if missing {
                    self.report.awaiting_activation.push(id);
                }
                self.pending.insert(id, missing);
            }
        }
        Ok(())
    }

    /// Deactivates the active device of a committed snapshot or of the base. Still mounted
    /// (committed while mounted, a base-format mount left by a crash): it goes at its last
    /// close. Any other failure is logged: a stray active device of an immutable snapshot harms
    /// nothing, and start-up must not depend on it.
    fn deactivate_or_defer(&mut self, id: ThinId, what: &str) {
        let done = match self.pool.deactivate(id) {
            Ok(()) => {
                self.report.deactivated.push(id);
                Ok(())
            }
            Err(PoolError::Busy(_)) => self.pool.deactivate_deferred(id),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            warn!(thin_id = id, what, error = %e, "cannot deactivate; left active");
            self.report.left_for_later.push(id);
        }
    }

    fn known_ids(&self) -> Result<BTreeSet<ThinId>, EngineError> {
        Ok(self.store.devices()?.iter().map(|d| d.thin_id).collect())
    }

    /// Phase 2: snapshot records whose device record is gone (cannot happen with transactions,
    /// but a record pointing at nothing must never be served).
    fn drop_dangling_snapshots(&mut self) -> Result<(), EngineError> {
        let known = self.known_ids()?;
        for (key, rec) in &self.snapshots {
            if !known.contains(&rec.thin_id) {
                warn!(key = ?key, thin_id = rec.thin_id, "snapshot record without device record; dropping");
                self.store.forget_snapshot(key)?;
            }
        }
        Ok(())
    }

    /// Phase 3: active dm devices with our prefix that no record owns.
    fn delete_unowned_active(&mut self) -> Result<(), EngineError> {
        let mut known = self.known_ids()?;
        known.extend(self.store.foreign_ids()?);
        for &id in self.active.iter().filter(|id| !known.contains(id)) {
            warn!(
                thin_id = id,
                "active dm device with our prefix but no record; deleting"
            );
            match self.delete(id) {
                Ok(()) => self.report.orphans_deleted.push(id),
                // Cleanup retries (an active device with no record is an orphan there too).
                Err(e) => {
                    warn!(thin_id = id, error = %e, "cannot delete yet; left for cleanup");
                    self.report.left_for_later.push(id);
                }
            }
        }
        Ok(())
    }

    /// Phase 4: compares the thin ids in the pool's metadata with the store's. In a pool
    /// thinsnap made, an unknown id is an orphan (a lost database, a crash of an older version)
    /// and is deleted; in a pool someone else made it is theirs, and start-up is refused unless
    /// `allow_foreign_devices`.
    fn reconcile_thin_ids(&mut self) -> Result<(), EngineError> {
        if let (Some(pool_id), Some(recorded)) = (self.pool.current(), self.recorded_txid) {
            if pool_id != recorded {
                warn!(
                    pool = pool_id,
                    recorded,
                    "the pool's transaction id is not the one last recorded; checking its thin ids"
                );
            }
        }
        self.report.thin_ids_listed = true;
        // Without thin_ls (PoolError::ThinLsMissing) the start fails with what to install: an
        // unknown id could be an orphan to delete or someone else's volume to keep, and
        // thinsnap does not guess.
        let kernel = self
            .pool
            .list_thin_ids()
            .map_err(pool_err("list the pool's thin ids"))?;
        self.quarantine_gone(&kernel)?;
        let mut known = self.known_ids()?;
        // Adopted as someone else's (`thinsnap pool adopt --keep-foreign`): never deleted.
        known.extend(self.store.foreign_ids()?);
        let unknown: Vec<ThinId> = kernel.difference(&known).copied().collect();
        if unknown.is_empty() {
            return Ok(());
        }
        if self.settings.owns_pool {
            for id in unknown {
                warn!(thin_id = id, "thin id in the pool with no record; deleting");
                match self.delete(id) {
                    Ok(()) => self.report.orphans_deleted.push(id),
                    Err(e) => {
                        warn!(thin_id = id, error = %e, "cannot delete yet; the next start tries again");
                        self.report.left_for_later.push(id);
                    }
                }
            }
            return Ok(());
        }
        if self.settings.allow_foreign_devices {
            info!(count = unknown.len(), ids = ?unknown,
                  "the pool holds thin devices thinsnap does not know; leaving them alone");
            // New ids go past theirs: no Prepare has to find them by EEXIST.
            if let Some(&max) = unknown.iter().max() {
                self.store.allocate_past(max)?;
            }
            return Ok(());
        }
        Err(EngineError::FailedPrecondition(format!(
            "thin pool {} holds {} thin device(s) thinsnap does not know (ids {:?}); \
             use a pool of its own, or set pool.allow_foreign_devices = true to share it",
            self.pool.info().name,
            unknown.len(),
            unknown.iter().take(16).collect::<Vec<_>>()
        )))
    }

    /// Quarantines every Ready snapshot whose thin id the pool (`kernel`, from thin_ls) does
    /// not have: deleted behind thinsnap's back, a restored database. Kept and reported, never
    /// dropped; Remove clears it without sending the pool a delete.
    fn quarantine_gone(&mut self, kernel: &BTreeSet<ThinId>) -> Result<(), EngineError> {
        for (key, rec) in &self.snapshots {
            let id = rec.thin_id;
            if rec.state != State::Ready || rec.quarantine.is_some() || kernel.contains(&id) {
                continue;
            }
            if self.unverified.contains(&id) {
                // A create completed at this start without its device (see `settle_create`):
                // the pool never made its thin device, so its call never answered OK. Undone as
                // any interrupted create the pool has no thin device for (a dm device half made
                // by the failed activation goes with it).
                match self
                    .pool
                    .remove_device(id, None)
                    .map_err(pool_err(format!("delete thin id {id}")))
                {
                    Ok(()) => {
                        info!(thin_id = id, key = ?key,
                              "undoing an interrupted create: the pool has no such thin id");
                        self.store.forget_snapshot(key)?;
                        self.pending.remove(&id);
                        self.report.awaiting_activation.retain(|&i| i != id);
                        self.report.unverified_creates.retain(|&i| i != id);
                        self.report.undone_creates.push(id);
                        continue;
                    }
                    // Quarantined below: kept, reported, and Remove clears it.
                    Err(e) => {
                        warn!(thin_id = id, key = ?key, error = %e, "cannot undo the interrupted create")
                    }
                }
            }
            let q = Quarantine {
                reason: format!("thin id {id} is gone from the pool (not in thin_ls)"),
                thin_id_gone: true,
                since: super::now_ns(),
            };
            warn!(key = ?key, thin_id = id, reason = ?q.reason, "quarantining snapshot");
            if self.store.set_quarantine(key, id, &q)? {
                self.pending.remove(&id);
                self.report.awaiting_activation.retain(|&i| i != id);
                self.report.quarantined.push(id);
            }
        }
        Ok(())
    }

    /// Phase 5: the existing base, checked against the configuration, or a new one.
    fn ensure_base(&mut self, format: Formatter<'_>) -> Result<BaseRecord, EngineError> {
        let fs = &self.settings.fs;
        let Some(b) = self.base.clone() else {
            self.report.base_created = true;
            return self.make_base(format);
        };
        if b.fs_type != fs.fs_type.as_str() {
            return Err(EngineError::FailedPrecondition(format!(
                "fs.type is {} but the pool's base device (thin id {}) holds {}; \
                 use a new pool (or `thinsnap pool destroy`) to change it",
                fs.fs_type, b.thin_id, b.fs_type
            )));
        }
        if b.size > fs.base_size.as_u64() {
            warn!(
                configured = fs.base_size.as_u64(),
                existing = b.size,
                "fs.base_size is smaller than the existing base device's; nothing shrinks: new images keep the base's size"
            );
        } else if b.size < fs.base_size.as_u64() {
            info!(
                configured = fs.base_size.as_u64(),
                existing = b.size,
                "fs.base_size was raised: new images' first layers get the new size (their filesystems grown when made)"
            );
        }
        Ok(b)
    }

    /// Makes the base device: intent, create_thin, activate, mkfs, record. Runs once per pool.
    fn make_base(&self, format: Formatter<'_>) -> Result<BaseRecord, EngineError> {
        let (pool, store, fs) = (self.pool, self.store, &self.settings.fs);
        let size = fs.base_size.as_u64();
        let mut tries = 0;
        let id = loop {
            tries += 1;
            let id = store.begin_device(BASE_OWNER, size)?;
            store.flush_sync()?;
            crate::failpoint!("base:after-intent");
            match pool.create_thin(id) {
                Ok(()) => break id,
                // Another owner's volume in a shared pool: not ours to touch (the undo below
                // would delete it); drop the record and take the next id.
                Err(PoolError::ThinExists(_)) if tries < super::create::MAX_TAKEN_IDS => {
                    warn!(
                        thin_id = id,
                        "thin id taken by a device thinsnap does not own; trying the next one"
                    );
                    store.forget_device(id)?;
                    store.flush_sync()?;
                }
                Err(e) => {
                    store.forget_device(id)?;
                    store.flush_sync()?;
                    return Err(pool_err(format!("create base thin id {id}"))(e));
                }
            }
        };
        let made = (|| {
            crate::failpoint!("base:after-create");
            let dev = pool
                .activate(id, size)
                .map_err(pool_err(format!("activate base thin id {id}")))?;
            let formatted = format(&dev).map_err(EngineError::from);
            crate::failpoint!("base:after-format");
            let mapped = formatted.and_then(|_| {
                pool.mapped_bytes(id)
                    .map_err(pool_err(format!("read usage of base thin id {id}")))
            });
            let deactivated = pool
                .deactivate(id)
                .map_err(pool_err(format!("deactivate base thin id {id}")));
            let mapped = mapped?;
            deactivated?;
            Ok(mapped)
        })();
        let mapped = match made {
            Ok(m) => m,
            Err(e) => {
                warn!(thin_id = id, error = %e, "cannot make base device; undoing");
                if self.delete(id).is_ok() {
                    store.forget_device(id)?;
                    store.flush_sync()?;
                }
                return Err(e);
            }
        };
        let base = BaseRecord {
            thin_id: id,
            fs_type: fs.fs_type.as_str().to_string(),
            size,
            mapped,
        };
        store.set_base(&base)?;
        store.flush_sync()?;
        info!(thin_id = id, fs = %fs.fs_type, size, "created base device");
        Ok(base)
    }
}
