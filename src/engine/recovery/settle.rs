//! Recovery's phase 1 (see `super`): every device record settled according to its state, and
//! the warm spares' records dropped.

use tracing::{info, warn};

use super::Recovery;
use crate::engine::EngineError;
use crate::model::{Kind, ThinId};
use crate::pool::{PoolError, ThinPool};
use crate::store::{DeviceRecord, State, BASE_OWNER, SPARE_OWNER};

impl Recovery<'_> {
    /// Phase 1: every device record according to its state.
    pub(super) fn settle_devices(&mut self) -> Result<(), EngineError> {
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
                    thin_id = id.get(),
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
                        warn!(thin_id = id.get(), error = %e, "cannot delete the spare yet; left for cleanup");
                        self.report.left_for_later.push(id);
                    }
                }
                Ok(())
            }
        }
    }

    /// Empties the spare list of every committed snapshot (no spare survives a start).
    pub(super) fn clear_spare_lists(&mut self) -> Result<(), EngineError> {
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
                info!(thin_id = id.get(), key = ?dev.owner,
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
                warn!(thin_id = id.get(), key = ?dev.owner, error = %e,
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
                info!(thin_id = id.get(), key = ?key, name = ?name, "completing an interrupted commit");
                self.snapshots.remove(&key);
                self.snapshots.insert(name.clone(), rec);
                settled.owner = name;
                self.report.completed_commits.push(id);
            }
            // Cannot happen (the call held both keys until the crash): the snapshot stays as
            // it was, never half committed.
            Err(e) => {
                warn!(thin_id = id.get(), key = ?key, error = %e, "cannot complete an interrupted commit; dropping its intent");
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
            warn!(thin_id = id.get(), owner = ?dev.owner,
                  "interrupted create in a shared pool: its thin id, if the pool holds it, may be another owner's; left alone");
            self.report.left_alone.push(id);
        } else {
            info!(thin_id = id.get(), owner = ?dev.owner, "undoing interrupted create");
            if let Err(e) = self.delete(id) {
                // A read-only pool, a device still open: the record stays Creating (invisible
                // to clients); the next Prepare of the key, Cleanup or the next start tries
                // again.
                warn!(thin_id = id.get(), owner = ?dev.owner, error = %e, "cannot undo the interrupted create yet; left for later");
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
        info!(thin_id = id.get(), owner = ?dev.owner, "finishing interrupted delete");
        match self.delete(id) {
            Ok(()) => {
                self.store.forget_device(id)?;
                self.report.finished_deletes.push(id);
            }
            // Busy (mounted by someone): the snapshot is already gone for clients; the reaper or
            // Cleanup retries. Starting must not depend on it.
            Err(e) => warn!(thin_id = id.get(), error = %e, "cannot delete yet; left for cleanup"),
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
                warn!(thin_id = id.get(), owner = ?dev.owner, base = dev.owner == BASE_OWNER,
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
                        warn!(thin_id = id.get(), error = %e, "cannot delete yet; left for cleanup");
                        self.report.left_for_later.push(id);
                    }
                }
            }
            Some(rec) if rec.kind == Kind::Committed => {
                if self.active.contains(&id) {
                    info!(thin_id = id.get(), key = ?dev.owner, "deactivating committed snapshot");
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
            warn!(thin_id = id.get(), what, error = %e, "cannot deactivate; left active");
            self.report.left_for_later.push(id);
        }
    }
}
