//! Prepare and View: [`Engine::create`], a thin snapshot of the parent (or of the base device)
//! made in three steps: the intent recorded and flushed, the kernel's part
//! ([`Engine::make_device`]), the outcome recorded. A call that fails is undone
//! ([`Engine::undo_create`]); one that could not be undone is rolled back by the next call on
//! its key ([`Engine::roll_back_half_made`]).

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::limits::{check_key, check_labels, size_label, SizeAsk, SizeSource};
use super::{now_ns, pool_err, Engine, EngineError, Kind, Mount, ThinId};
use crate::pool::{PoolError, ThinPool};
use crate::store::{NewSnapshot, State};

/// How many thin ids in a row Prepare skips because a device thinsnap does not own holds them.
pub(super) const MAX_TAKEN_IDS: u32 = 64;

/// Why making a snapshot's device ([`Engine::make_device`]) failed.
enum MakeError {
    /// The thin id is held by a device thinsnap does not own (a shared pool): Prepare drops its
    /// records without touching the device and tries the next id.
    ThinIdNotOurs(ThinId),
    /// Anything else: the call fails and is undone.
    Failed(EngineError),
}
use MakeError::{Failed, ThinIdNotOurs};

impl From<EngineError> for MakeError {
    fn from(e: EngineError) -> Self {
        Failed(e)
    }
}

impl Engine {
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
        let size = size_label(key, &labels)?.or_else(|| {
            self.grown_base_size(parent).map(|bytes| SizeAsk {
                bytes,
                from: SizeSource::BaseSize,
            })
        });
        let _in_flight = self.spares.call_in_flight();
        let _guard = self.locks.lock(&[key]).await;
        crate::failpoint!("prepare:start");
        // A half-made snapshot of this key that its own call could not undo (a store write that
        // failed during the undo): nobody else holds the key, so roll it back now instead of
        // answering AlreadyExists until a restart.
        self.roll_back_half_made(key).await?;
        let growth = match size {
            Some(ask) => {
                self.check_max_size(key, ask)?;
                Some((key, ask, self.growth_of(key, parent, ask)?))
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
            size: size.map(|ask| ask.bytes),
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
            let made = self.make_device(id, origin, size, grow).await;
            match made {
                Ok(()) => break (id, origin),
                Err(ThinIdNotOurs(id)) if tries < MAX_TAKEN_IDS => {
                    // The thin id is held by a device thinsnap never made: drop our records
                    // without touching the kernel (never delete what is not ours) and take the
                    // next id (ids are handed out in increasing order).
                    warn!(
                        key,
                        thin_id = id.get(),
                        "thin id taken by a device thinsnap does not own; trying the next one"
                    );
                    self.store.forget_snapshot(key)?;
                    self.flush().await?;
                }
                Err(ThinIdNotOurs(id)) => {
                    self.store.forget_snapshot(key)?;
                    self.flush().await?;
                    return Err(EngineError::ResourceExhausted(format!(
                        "prepare {key:?}: {MAX_TAKEN_IDS} thin ids in a row, up to {id}, are held by devices thinsnap does not own"
                    )));
                }
                Err(Failed(e)) => {
                    warn!(key, thin_id = id.get(), error = %e, "prepare failed; undoing");
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
            thin_id = id.get(),
            origin = origin.get(),
            kind = kind.as_str(),
            "created snapshot"
        );
        Ok(self.mounts_of(&rec))
    }

    /// The kernel's part of a Prepare or View: the thin snapshot `id` of `origin` (create_snap),
    /// its device activated with `size`, and its filesystem grown when `grow` says so (the size
    /// label). Runs on the pool's blocking thread ([`Engine::on_pool_as`]).
    ///
    /// Returns `ThinIdNotOurs` if a device thinsnap does not own holds `id`, `Failed` otherwise.
    async fn make_device(
        &self,
        id: ThinId,
        origin: ThinId,
        size: u64,
        grow: Option<(crate::config::FsConfig, std::path::PathBuf)>,
    ) -> Result<(), MakeError> {
        self.on_pool_as(move |pool| {
            pool.create_snap(id, origin).map_err(|e| match e {
                // Someone else's volume (a shared pool): not ours to touch.
                PoolError::ThinExists(_) => ThinIdNotOurs(id),
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
        .await
    }

    /// Rolls back a half-made snapshot of `key` (state Creating) whose call is over: the caller
    /// holds the key's lock, so no call is making it. Nothing to do for any other state.
    ///
    /// Returns an error if the store cannot be read or written.
    pub(super) async fn roll_back_half_made(&self, key: &str) -> Result<(), EngineError> {
        match self.store.get(key)? {
            Some(rec) if rec.state == State::Creating => {
                warn!(
                    key,
                    thin_id = rec.thin_id.get(),
                    "rolling back a half-made snapshot"
                );
                self.undo_create(key, rec.thin_id).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Undoes a half-made snapshot: its record goes, its device is reaped.
    pub(super) async fn undo_create(&self, key: &str, id: ThinId) {
        if let Err(e) = self.store.forget_snapshot_keep_device(key) {
            warn!(key, thin_id = id.get(), error = %e, "cannot drop the record of an undone snapshot");
            return;
        }
        let _ = self.flush().await;
        self.reap(id).await;
    }
}
