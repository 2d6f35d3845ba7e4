//! Lazy activation and quarantine: after a reboot the store knows every active snapshot and view
//! but the kernel has none of their dm devices. Start-up does not re-make them (linear in their
//! number); it hands the engine the set of thin ids whose devices are not known to be live, and
//! the first call that needs a device (Mounts, Usage, Commit) activates it here, once, under the
//! thin id's lock. Remove never activates: deactivating a missing device is nothing to do. The
//! lock and the activation's outcome (done, or still pending) go with the ioctls into their
//! blocking closure: a caller cancelled meanwhile releases nothing early and loses nothing. A
//! device that a failed call could not give back (a failed re-activation) awaits activation
//! again ([`Lazy::missing`]).
//!
//! A snapshot whose device cannot be used for good (its thin id is gone from the pool) is
//! quarantined: the record stays in the store with the reason ([`Quarantine`]), its own calls
//! answer FailedPrecondition naming the key, the thin id and the reason, `thinsnap status` lists
//! it, and Remove drops its records without sending the pool a delete. Any other activation
//! failure (a busy or failed pool, an ioctl error) is that call's error; the snapshot stays
//! awaiting activation and the next call tries again.
//!
//! Activation is idempotent in the kernel (an active device is returned as it is, a half-made one
//! is made again: see `pool::dm`), and nothing about it is recorded: a crash in the middle leaves
//! at most a dm device the next start sees as present but not yet verified, which the first call
//! on it verifies (or repairs) the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::{info, warn};

use super::{now_ns, pool_err, Engine, EngineError};
use crate::model::{Kind, ThinId};
use crate::pool::{PoolError, ThinPool};
use crate::store::{Quarantine, SnapshotRecord, State, Store};

/// Lazy activation's bookkeeping: the thin ids of active snapshots and views whose dm devices
/// this run has not activated yet. After a reboot a start does not re-make every device before
/// serving; the first call that needs one (Mounts, Usage, Commit, Remove) activates it.
#[derive(Default)]
pub(super) struct LazyActivation {
    /// thin id -> whether its device was missing at start (`true`: inactive, awaiting
    /// activation) or present but not yet verified by this run (`false`: a crash may have left
    /// it half made; the first call checks it with the idempotent activate).
    pending: Mutex<BTreeMap<ThinId, bool>>,
    /// Devices activated on first use since start.
    activations: AtomicU64,
}

impl LazyActivation {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ThinId, bool>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what start-up found (see [`LazyActivation::pending`]).
    pub(super) fn fill(&self, pending: BTreeMap<ThinId, bool>) {
        *self.map() = pending;
    }

    pub(super) fn is_pending(&self, id: ThinId) -> bool {
        self.map().contains_key(&id)
    }

    /// The device of `id` is live (activated, verified) or gone: nothing more to do for it.
    pub(super) fn done(&self, id: ThinId) {
        self.map().remove(&id);
    }

    /// The device of `id` is missing again (a failed call could not give it back): it awaits
    /// activation, which the next call that needs it makes (or says why not).
    pub(super) fn missing(&self, id: ThinId) {
        self.map().insert(id, true);
    }

    /// How many snapshots' devices are missing and await activation.
    pub(super) fn inactive(&self) -> u64 {
        self.map().values().filter(|missing| **missing).count() as u64
    }

    pub(super) fn activations(&self) -> u64 {
        self.activations.load(Ordering::Relaxed)
    }
}

/// The error a quarantined snapshot's calls answer.
pub(super) fn quarantined(key: &str, id: ThinId, q: &Quarantine) -> EngineError {
    EngineError::FailedPrecondition(q.refusal(key, id))
}

/// A quarantined snapshot, for `thinsnap status`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedInfo {
    pub key: String,
    pub thin_id: ThinId,
    pub kind: Kind,
    pub reason: String,
}

impl Engine {
    /// Gives a snapshot whose call failed its device back (undoing that call's deactivation).
    /// The caller holds the thin id's lock. A failure is logged and the snapshot awaits
    /// activation again (see [`activate`]): the next call that needs its device (Mounts, Usage,
    /// Commit) makes it or says why not, instead of handing out a path to nothing.
    pub(super) async fn reactivate(&self, id: ThinId, size: u64) {
        let done = self
            .on_pool(move |pool| {
                pool.activate(id, size)
                    .map_err(pool_err(format!("reactivate thin id {id}")))
            })
            .await;
        if let Err(e) = done {
            self.lazy.missing(id);
            warn!(thin_id = id.get(), error = %e, "cannot reactivate the device of a failed call; it awaits activation");
        }
    }

    /// Makes sure the dm device of snapshot `key` (record `rec`, read by the caller) is live:
    /// activates it if this run has not yet, exactly once however many calls ask at the same
    /// time (the thin id's lock, and the pending set read again under it).
    ///
    /// Returns FailedPrecondition if the snapshot is quarantined (or becomes so: the pool has no
    /// such thin id), NotFound if it was removed meanwhile, and the pool's error (mapped as
    /// every pool error is) if the activation fails otherwise; the snapshot then stays pending.
    pub(super) async fn ensure_device(
        &self,
        key: &str,
        rec: &SnapshotRecord,
    ) -> Result<(), EngineError> {
        let id = rec.thin_id;
        if let Some(q) = &rec.quarantine {
            return Err(quarantined(key, id, q));
        }
        if !self.lazy.is_pending(id) {
            return Ok(());
        }
        let device = self.thin_locks.lock(&[&id]).await;
        if !self.lazy.is_pending(id) {
            // A concurrent call activated it while this one waited.
            return Ok(());
        }
        // Read again under the lock: a Remove takes it before its intent, so a record still here
        // is still this snapshot's.
        let rec = match self.store.get(key)? {
            Some(r) if r.state == State::Ready && r.thin_id == id => r,
            _ => return Err(EngineError::NotFound(format!("snapshot {key:?} not found"))),
        };
        if let Some(q) = &rec.quarantine {
            return Err(quarantined(key, id, q));
        }
        let size = rec.size;
        // The thin id's lock goes into the blocking closure with the activation, which records
        // its outcome there: a caller cancelled meanwhile (a client gone) neither lets a Remove
        // in while the ioctls run nor leaves a live device marked pending (the next call would
        // activate it again) or a failed one marked done (Mounts would hand out a missing
        // device). A failure leaves it pending; the next call tries again. The lock comes back
        // only with a thin id gone from the pool: held while it is quarantined (no kernel work
        // runs then).
        let lazy = self.lazy.clone();
        let (activated, _device) = self
            .on_pool(move |pool| {
                let r = pool.activate(id, size);
                if r.is_ok() {
                    lazy.done(id);
                    lazy.activations.fetch_add(1, Ordering::Relaxed);
                }
                crate::failpoint!("lazy:after-activate");
                let device = matches!(r, Err(PoolError::ThinNotFound(_))).then_some(device);
                Ok((r, device))
            })
            .await?;
        match activated {
            Ok(_) => {
                info!(
                    key,
                    thin_id = id.get(),
                    "activated the snapshot's device on first use"
                );
                Ok(())
            }
            Err(PoolError::ThinNotFound(_)) => {
                let q = Quarantine {
                    reason: format!("thin id {id} is gone from the pool"),
                    thin_id_gone: true,
                    since: now_ns(),
                };
                self.quarantine(key, id, &q).await?;
                Err(quarantined(key, id, &q))
            }
            Err(e) => {
                warn!(key, thin_id = id.get(), error = %e, "cannot activate the snapshot's device; the next call tries again");
                Err(pool_err(format!("snapshot {key:?}: activate thin id {id}"))(e))
            }
        }
    }

    /// Records `key` (thin id `id`) as quarantined, durably, and stops awaiting its activation.
    ///
    /// Returns an error if the store cannot be written.
    pub(super) async fn quarantine(
        &self,
        key: &str,
        id: ThinId,
        q: &Quarantine,
    ) -> Result<(), EngineError> {
        warn!(key, thin_id = id.get(), reason = ?q.reason, "quarantining snapshot");
        self.store.set_quarantine(key, id, q)?;
        self.flush().await?;
        self.lazy.done(id);
        Ok(())
    }

    /// Remove of a quarantined snapshot whose thin id is gone from the pool: its records go,
    /// and the pool is not sent a delete (the id is not ours any more). The caller holds the key.
    ///
    /// Returns NotFound if it is not there, FailedPrecondition if it has children.
    pub(super) async fn remove_gone(&self, key: &str, id: ThinId) -> Result<(), EngineError> {
        let _device = self.thin_locks.lock(&[&id]).await;
        let removed = self.store.begin_remove(key)?;
        self.store.forget_device(id)?;
        self.flush().await?;
        self.reap_spares(key, &removed.spares).await;
        self.lazy.done(id);
        info!(
            key,
            thin_id = id.get(),
            "removed quarantined snapshot; its thin id was already gone from the pool"
        );
        Ok(())
    }

    /// Every quarantined snapshot.
    ///
    /// Returns an error if the store cannot be read.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedInfo>, EngineError> {
        quarantined_in(&self.store)
    }

    /// How many devices were activated on first use since start (for tests and logs).
    pub fn lazy_activations(&self) -> u64 {
        self.lazy.activations()
    }
}

/// Every quarantined snapshot in `store`.
///
/// Returns an error if the store cannot be read.
pub(super) fn quarantined_in(store: &Store) -> Result<Vec<QuarantinedInfo>, EngineError> {
    Ok(store
        .quarantined()?
        .into_iter()
        .filter_map(|(key, r)| {
            let reason = r.quarantine?.reason;
            Some(QuarantinedInfo {
                key,
                thin_id: r.thin_id,
                kind: r.kind,
                reason,
            })
        })
        .collect())
}
