//! Start-up: reconcile the store with what the kernel really has, then make sure the base device
//! exists. Runs before the socket is served, on a blocking thread.
//!
//! Every mutating call records its intent (state Creating or Deleting) durably before it touches
//! the kernel, so after a crash or a reboot each record says what may be half done:
//! - a device Creating: the call never answered; its thin device may exist. Delete it, drop the
//!   records (the client saw an error or nothing, and will retry).
//! - a device Deleting: the snapshot is already gone for clients; finish deleting the device.
//! - an active snapshot or view whose device is not active (a reboot): activate it again.
//! - a committed snapshot whose device is active: deactivate it.
//! - an active dm device with our prefix that no record owns: deactivate and delete it.
//!
//! Every action is logged.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::{pool_err, Engine, EngineError, Settings};
use crate::config::FsConfig;
use crate::fs::FsError;
use crate::pool::txid::TxCounter;
use crate::pool::{PoolError, ThinId, ThinPool};
use crate::store::{BaseRecord, Kind, SnapshotRecord, State, Store, BASE_OWNER};

/// What recovery did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub undone_creates: Vec<ThinId>,
    pub finished_deletes: Vec<ThinId>,
    pub reactivated: Vec<ThinId>,
    pub deactivated: Vec<ThinId>,
    pub orphans_deleted: Vec<ThinId>,
    pub base_created: bool,
    /// The pool's thin ids were read (thin_ls) and compared with the store's; false when the
    /// pool's transaction id showed that the store had seen every change.
    pub thin_ids_listed: bool,
}

/// Formats the freshly made base device (mkfs; see [`crate::fs::format_base`]).
pub type Formatter<'a> = &'a (dyn Fn(&Path) -> Result<(), FsError> + Sync);

fn delete_if_present(pool: &dyn ThinPool, tx: &TxCounter, id: ThinId) -> Result<(), EngineError> {
    pool.deactivate(id)
        .map_err(pool_err(format!("deactivate thin id {id}")))?;
    match tx.change(pool, || pool.delete_thin(id)) {
        Ok(()) | Err(PoolError::ThinNotFound(_)) => Ok(()),
        Err(e) => Err(pool_err(format!("delete thin id {id}"))(e)),
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
    let fs = settings.fs.clone();
    let mut report = Report::default();
    let p: &dyn ThinPool = &*pool;
    let active: BTreeSet<ThinId> = p
        .active_ids()
        .map_err(pool_err("list active devices"))?
        .into_iter()
        .collect();
    let base = store.base()?;
    let tx = Arc::new(TxCounter::new(p, settings.owns_pool).map_err(pool_err("read pool status"))?);
    let recorded_txid = store.pool_transaction_id()?;
    let devices = store.devices()?;
    // Every snapshot record, decoded once: a start with thousands of them must not read each
    // twice (once per device, once more for the check below).
    let mut snapshots: HashMap<String, SnapshotRecord> = store.snapshots()?.into_iter().collect();
    // Nothing half done, and the store saw the outcome of the pool's last change: the store
    // knows every thin id in the pool.
    let consistent = tx.current().is_some()
        && recorded_txid == tx.current()
        && devices.iter().all(|d| d.state == State::Ready);

    for dev in devices {
        let id = dev.thin_id;
        match dev.state {
            State::Creating => {
                info!(thin_id = id, owner = %dev.owner, "undoing interrupted create");
                delete_if_present(p, &tx, id)?;
                if dev.owner != BASE_OWNER
                    && snapshots
                        .get(&dev.owner)
                        .is_some_and(|r| r.thin_id == id && r.state == State::Creating)
                {
                    store.forget_snapshot(&dev.owner)?;
                    snapshots.remove(&dev.owner);
                } else {
                    store.forget_device(id)?;
                }
                report.undone_creates.push(id);
            }
            State::Deleting => {
                info!(thin_id = id, owner = %dev.owner, "finishing interrupted delete");
                match delete_if_present(p, &tx, id) {
                    Ok(()) => {
                        store.forget_device(id)?;
                        report.finished_deletes.push(id);
                    }
                    // Busy (mounted by someone): the snapshot is already gone for clients; the
                    // reaper or Cleanup retries. Starting must not depend on it.
                    Err(e) => {
                        warn!(thin_id = id, error = %e, "cannot delete yet; left for cleanup")
                    }
                }
            }
            State::Ready => {
                if dev.owner == BASE_OWNER {
                    if base.as_ref().is_some_and(|b| b.thin_id == id) {
                        if active.contains(&id) {
                            p.deactivate(id)
                                .map_err(pool_err(format!("deactivate base thin id {id}")))?;
                            report.deactivated.push(id);
                        }
                        continue;
                    }
                    warn!(thin_id = id, "base device record without base; deleting");
                    delete_if_present(p, &tx, id)?;
                    store.forget_device(id)?;
                    report.orphans_deleted.push(id);
                    continue;
                }
                let rec = snapshots.get(&dev.owner).filter(|r| r.thin_id == id);
                match rec {
                    None => {
                        warn!(thin_id = id, owner = %dev.owner, "device record without snapshot; deleting");
                        store.mark_deleting(id)?;
                        store.flush_sync()?;
                        delete_if_present(p, &tx, id)?;
                        store.forget_device(id)?;
                        report.orphans_deleted.push(id);
                    }
                    Some(rec) if rec.kind == Kind::Committed => {
                        if active.contains(&id) {
                            info!(thin_id = id, key = %dev.owner, "deactivating committed snapshot");
                            match p.deactivate(id) {
                                Ok(()) => report.deactivated.push(id),
                                // Still mounted (committed while mounted): it goes at its last
                                // close; nothing to repair.
                                Err(PoolError::Busy(_)) => {
                                    let _ = p.deactivate_deferred(id);
                                }
                                Err(e) => {
                                    return Err(pool_err(format!("deactivate thin id {id}"))(e))
                                }
                            }
                        }
                    }
                    Some(rec) => {
                        if !active.contains(&id) {
                            info!(thin_id = id, key = %dev.owner, "reactivating snapshot");
                            p.activate(id, rec.size)
                                .map_err(pool_err(format!("reactivate thin id {id}")))?;
                            report.reactivated.push(id);
                        }
                    }
                }
            }
        }
    }
    // Snapshot records in Creating whose device record is gone (cannot happen with transactions,
    // but a record pointing at nothing must never be served).
    let known: BTreeSet<ThinId> = store.devices()?.iter().map(|d| d.thin_id).collect();
    for (key, rec) in &snapshots {
        if !known.contains(&rec.thin_id) {
            warn!(key = %key, thin_id = rec.thin_id, "snapshot record without device record; dropping");
            store.forget_snapshot(key)?;
        }
    }
    for id in active.iter().filter(|id| !known.contains(id)) {
        warn!(
            thin_id = id,
            "active dm device with our prefix but no record; deleting"
        );
        delete_if_present(p, &tx, *id)?;
        report.orphans_deleted.push(*id);
    }
    store.flush_sync()?;
    if consistent {
        info!(
            transaction_id = recorded_txid,
            "the pool's transaction id is the one last recorded: its thin ids are known"
        );
    } else {
        if let (Some(pool_id), Some(recorded)) = (tx.current(), recorded_txid) {
            if pool_id != recorded {
                warn!(
                    pool = pool_id,
                    recorded,
                    "the pool's transaction id is not the one last recorded; checking its thin ids"
                );
            }
        }
        report.thin_ids_listed = true;
        reconcile_thin_ids(p, &tx, &store, &settings, &mut report)?;
    }

    let base = match base {
        Some(b) => {
            if b.fs_type != fs.fs_type.as_str() {
                return Err(EngineError::FailedPrecondition(format!(
                    "fs.type is {} but the pool's base device (thin id {}) holds {}; \
                     use a new pool (or `thinsnap pool destroy`) to change it",
                    fs.fs_type, b.thin_id, b.fs_type
                )));
            }
            if b.size != fs.base_size.as_u64() {
                warn!(configured = fs.base_size.as_u64(), existing = b.size,
                      "fs.base_size differs from the existing base device's; keeping the existing size");
            }
            b
        }
        None => {
            report.base_created = true;
            make_base(p, &tx, &store, &fs, format)?
        }
    };
    if !report.undone_creates.is_empty()
        || !report.finished_deletes.is_empty()
        || !report.orphans_deleted.is_empty()
        || !report.reactivated.is_empty()
    {
        info!(?report, "recovery done");
    }
    if let Some(id) = tx.current() {
        store.set_pool_transaction_id(id)?;
        store.flush_sync()?;
    }
    Ok((Engine::new(pool, tx, store, base, settings), report))
}

/// Compares the thin ids in the pool's metadata with the store's. In a pool thinsnap made, an
/// unknown id is an orphan (a lost database, a crash of an older version) and is deleted; in a
/// pool someone else made it is theirs, and start-up is refused unless `allow_foreign_devices`.
fn reconcile_thin_ids(
    pool: &dyn ThinPool,
    tx: &TxCounter,
    store: &Store,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), EngineError> {
    let Some(kernel) = pool
        .list_thin_ids()
        .map_err(pool_err("list the pool's thin ids"))?
    else {
        warn!("thin_ls not found (thin-provisioning-tools): orphan thin ids cannot be looked for");
        return Ok(());
    };
    let known: BTreeSet<ThinId> = store.devices()?.iter().map(|d| d.thin_id).collect();
    let unknown: Vec<ThinId> = kernel.difference(&known).copied().collect();
    if unknown.is_empty() {
        return Ok(());
    }
    if settings.owns_pool {
        for id in unknown {
            warn!(thin_id = id, "thin id in the pool with no record; deleting");
            delete_if_present(pool, tx, id)?;
            report.orphans_deleted.push(id);
        }
        return Ok(());
    }
    if settings.allow_foreign_devices {
        info!(count = unknown.len(), ids = ?unknown, "the pool holds thin devices thinsnap does not know; leaving them alone");
        return Ok(());
    }
    Err(EngineError::FailedPrecondition(format!(
        "thin pool {} holds {} thin device(s) thinsnap does not know (ids {:?}); \
         use a pool of its own, or set pool.allow_foreign_devices = true to share it",
        pool.info().name,
        unknown.len(),
        unknown.iter().take(16).collect::<Vec<_>>()
    )))
}

/// Makes the base device: intent, create_thin, activate, mkfs, record. Runs once per pool.
fn make_base(
    pool: &dyn ThinPool,
    tx: &TxCounter,
    store: &Store,
    fs: &FsConfig,
    format: Formatter<'_>,
) -> Result<BaseRecord, EngineError> {
    let size = fs.base_size.as_u64();
    let id = store.begin_device(BASE_OWNER, size)?;
    store.flush_sync()?;
    crate::failpoint!("base:after-intent");
    let made = (|| {
        tx.change(pool, || pool.create_thin(id))
            .map_err(pool_err(format!("create base thin id {id}")))?;
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
            if delete_if_present(pool, tx, id).is_ok() {
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
