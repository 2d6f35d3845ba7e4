//! Whose pool it is: the check every start makes before recovery may delete anything.
//!
//! The store records the identity of its pool (`PoolInfo::identity`: mode, dm name, dm uuid
//! and, in loop mode, the backing files) at its first start with it. At every later start:
//! - the recorded identity is the kernel's pool's: go on;
//! - it is another: refuse, naming both (recovery would otherwise delete, as orphans, the thin
//!   ids of a pool whose devices this database never made);
//! - none is recorded and the store has records (a database of a release that recorded no
//!   identity, in front of the pool it used: in loop mode the pool layer has checked that the
//!   pool is on this root's files): record it;
//! - none is recorded and the store has no record (a new or lost database): if the pool holds
//!   thin devices, refuse unless the operator said what to do with them (`thinsnap pool adopt
//!   --keep-foreign`: keep them, never delete them, never allocate their ids; `--reset`: delete
//!   them). Then record the identity.
//!
//! A pool this start made itself (`PoolInfo::fresh`) holds nothing: no thin_ls is run for it.

use tracing::{info, warn};

use super::{pool_err, Adopt, EngineError, Settings};
use crate::model::ThinId;
use crate::pool::{PoolError, ThinPool};
use crate::store::Store;

/// What [`check`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The store's identity is the pool's.
    Matches,
    /// The identity was recorded now: a store of an older release, or a new store in front of
    /// an empty pool.
    Recorded,
    /// A new store adopted the pool's thin devices as someone else's (their ids).
    AdoptedForeign(Vec<ThinId>),
    /// A new store's pool was emptied of the thin devices it held (their ids).
    Reset(Vec<ThinId>),
}

/// Checks that `store` belongs to `pool` (see the module doc), recording the pool's identity
/// when the store has none. `has_records` says whether the store holds any device or snapshot
/// record or a base.
///
/// Returns FailedPrecondition naming both sides if the store belongs to another pool, or if a
/// new store faces a pool with thin devices and `settings.adopt` is None; an error if the pool
/// or the store cannot be read, or a reset cannot delete a device.
pub fn check(
    pool: &dyn ThinPool,
    store: &Store,
    has_records: bool,
    settings: &Settings,
) -> Result<Outcome, EngineError> {
    let info = pool.info();
    let current = info.identity;
    let db = settings.root.join("db");
    match store.pool_identity()? {
        Some(recorded) if recorded == current => {
            if settings.adopt.is_some() {
                info!(pool = %current, "the database already belongs to this pool: nothing to adopt");
            }
            return Ok(Outcome::Matches);
        }
        Some(recorded) => {
            return Err(EngineError::FailedPrecondition(format!(
                "the database {} belongs to {recorded}, but the pool the kernel has is \
                 {current}; thinsnap does not start, so that it deletes nothing of a pool that is \
                 not this database's. If the configuration points at the wrong pool (pool.name, \
                 pool.mode, root), fix it; if the pool is right and the database is not its own, \
                 move the database away and run `thinsnap pool adopt` (see README.md, \
                 \"What thinsnap deletes\")",
                db.display()
            )))
        }
        None if has_records => {
            info!(pool = %current, "recording the pool's identity in the database (first start of this release with it)");
            store.set_pool_identity(&current)?;
            store.flush_sync()?;
            return Ok(Outcome::Recorded);
        }
        None => {}
    }
    // A new (or lost) database.
    let ids = if info.fresh {
        Default::default()
    } else {
        pool.list_thin_ids().map_err(pool_err(format!(
            "list the thin ids of {current} (the database {} is new)",
            db.display()
        )))?
    };
    let shared = !settings.owns_pool && settings.allow_foreign_devices;
    let outcome = if ids.is_empty() {
        Outcome::Recorded
    } else if shared && settings.adopt.is_none() {
        // A pool shared on purpose (existing/lvm mode with pool.allow_foreign_devices): its
        // thin devices are someone else's and recovery leaves them alone anyway.
        Outcome::Recorded
    } else {
        let list: Vec<ThinId> = ids.iter().copied().collect();
        match settings.adopt {
            None => {
                return Err(EngineError::FailedPrecondition(format!(
                    "{current} holds {} thin device(s) (ids {:?}) but the database {} has no \
                     record of this pool (a new or lost database, or a pool another instance \
                     uses); thinsnap deletes nothing it cannot prove is its own, so it does not \
                     start. With the daemon stopped, run `thinsnap pool adopt --keep-foreign` to \
                     keep them (never deleted, their ids never reused), or `thinsnap pool adopt \
                     --reset` to delete them (their data is lost); or fix pool.name / root if \
                     this is another instance's pool",
                    list.len(),
                    list.iter().take(16).collect::<Vec<_>>(),
                    db.display()
                )))
            }
            Some(Adopt::KeepForeign) => {
                warn!(pool = %current, ids = ?list, "adopting the pool's thin devices as someone else's: never deleted, their ids never reused");
                store.add_foreign_ids(&ids)?;
                Outcome::AdoptedForeign(list)
            }
            Some(Adopt::Reset) => {
                for &id in &list {
                    warn!(pool = %current, thin_id = id.get(), "reset: deleting a thin device the database has no record of");
                    pool.deactivate(id).map_err(pool_err(format!(
                        "reset: remove the device of thin id {id}"
                    )))?;
                    match pool.delete_thin(id) {
                        Ok(()) | Err(PoolError::ThinNotFound(_)) => {}
                        Err(e) => return Err(pool_err(format!("reset: delete thin id {id}"))(e)),
                    }
                }
                Outcome::Reset(list)
            }
        }
    };
    store.set_pool_identity(&current)?;
    store.flush_sync()?;
    info!(pool = %current, "recorded the pool's identity in the new database");
    Ok(outcome)
}
