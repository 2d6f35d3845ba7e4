//! Recovery's phases 2 to 4 (see `super`): snapshots whose device record is gone, active dm
//! devices no record owns, and the pool's thin ids (thin_ls) against the store's.

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::Recovery;
use crate::engine::{pool_err, EngineError};
use crate::model::ThinId;
use crate::pool::ThinPool;
use crate::store::{Quarantine, State};

impl Recovery<'_> {
    fn known_ids(&self) -> Result<BTreeSet<ThinId>, EngineError> {
        Ok(self.store.devices()?.iter().map(|d| d.thin_id).collect())
    }

    /// Phase 2: snapshot records whose device record is gone (cannot happen with transactions,
    /// but a record pointing at nothing must never be served).
    pub(super) fn drop_dangling_snapshots(&mut self) -> Result<(), EngineError> {
        let known = self.known_ids()?;
        for (key, rec) in &self.snapshots {
            if !known.contains(&rec.thin_id) {
                warn!(key = ?key, thin_id = rec.thin_id.get(), "snapshot record without device record; dropping");
                self.store.forget_snapshot(key)?;
            }
        }
        Ok(())
    }

    /// Phase 3: active dm devices with our prefix that no record owns.
    pub(super) fn delete_unowned_active(&mut self) -> Result<(), EngineError> {
        let mut known = self.known_ids()?;
        known.extend(self.store.foreign_ids()?);
        for &id in self.active.iter().filter(|id| !known.contains(id)) {
            warn!(
                thin_id = id.get(),
                "active dm device with our prefix but no record; deleting"
            );
            match self.delete(id) {
                Ok(()) => self.report.orphans_deleted.push(id),
                // Cleanup retries (an active device with no record is an orphan there too).
                Err(e) => {
                    warn!(thin_id = id.get(), error = %e, "cannot delete yet; left for cleanup");
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
    pub(super) fn reconcile_thin_ids(&mut self) -> Result<(), EngineError> {
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
                warn!(
                    thin_id = id.get(),
                    "thin id in the pool with no record; deleting"
                );
                match self.delete(id) {
                    Ok(()) => self.report.orphans_deleted.push(id),
                    Err(e) => {
                        warn!(thin_id = id.get(), error = %e, "cannot delete yet; the next start tries again");
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
                        info!(thin_id = id.get(), key = ?key,
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
                        warn!(thin_id = id.get(), key = ?key, error = %e, "cannot undo the interrupted create")
                    }
                }
            }
            let q = Quarantine {
                reason: format!("thin id {id} is gone from the pool (not in thin_ls)"),
                thin_id_gone: true,
                since: crate::engine::now_ns(),
            };
            warn!(key = ?key, thin_id = id.get(), reason = ?q.reason, "quarantining snapshot");
            if self.store.set_quarantine(key, id, &q)? {
                self.pending.remove(&id);
                self.report.awaiting_activation.retain(|&i| i != id);
                self.report.quarantined.push(id);
            }
        }
        Ok(())
    }
}
