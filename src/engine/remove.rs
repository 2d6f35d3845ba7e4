//! Remove: [`Engine::remove`]. The record goes (intent flushed), then the device (sync), or the
//! device is queued for the reaper (`remove.async`, see `super::reaper`).

use tracing::{info, warn};

use super::limits::check_key;
use super::{pool_err, Engine, EngineError, Kind};
use crate::pool::ThinPool;

impl Engine {
    /// Removes a snapshot and deletes its thin device (with `remove.async`, queues the device
    /// for the reaper and answers at once).
    ///
    /// Returns NotFound if it does not exist, FailedPrecondition if it has children or its
    /// device is still mounted; if the kernel cannot delete the device, its error, and the
    /// snapshot is still there.
    pub async fn remove(&self, key: &str) -> Result<(), EngineError> {
        check_key("key", key)?;
        let _in_flight = self.spares.call_in_flight();
        // The key and its parent: the parent must not go while this snapshot may still be given
        // back (a failed delete). Locked together, in order; a key removed and made again with
        // another parent meanwhile is read again.
        let mut parent = self.ready(key)?.parent.unwrap_or_default();
        let (_guard, rec) = loop {
            let guard = self.locks.lock(&[key, &parent]).await;
            let rec = self.ready(key)?;
            let now = rec.parent.clone().unwrap_or_default();
            if now == parent {
                break (guard, rec);
            }
            parent = now;
        };
        crate::failpoint!("remove:start");
        if rec.kind == Kind::Committed && rec.children > 0 {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} has {} child snapshot(s); remove them first",
                rec.children
            )));
        }
        let id = rec.thin_id;
        if rec.quarantine.as_ref().is_some_and(|q| q.thin_id_gone) {
            return self.remove_gone(key, id).await;
        }
        if let Some(reaper) = &self.reaper {
            // remove.async: answer once the record is gone; the reaper deletes the device,
            // retrying while it is busy, so Remove never blocks containerd's garbage collector.
            let removed = self.store.begin_remove(key)?;
            self.flush().await?;
            // Its spares first (the reaper takes them in order), then its own device.
            self.reap_spares(key, &removed.spares).await;
            let _ = reaper.send(id);
            self.lazy.done(id);
            info!(
                key,
                thin_id = id.get(),
                "removed snapshot; device queued for the reaper"
            );
            return Ok(());
        }
        // Sync: the device goes before the answer, or nothing does. The thin id's lock first:
        // a first-use activation of this device (Mounts, Usage) holds it until its ioctls end,
        // so the deactivation below never runs in the middle of one.
        let _device = self.thin_locks.lock(&[&id]).await;
        let active = rec.kind != Kind::Committed;
        if active {
            // Deactivate first: a device still mounted refuses, and the snapshot stays intact.
            let what = format!("remove snapshot {key:?}");
            self.on_pool(move |pool| pool.deactivate(id).map_err(pool_err(what)))
                .await?;
            crate::failpoint!("remove:after-deactivate");
        }
        let removed = async {
            let removed = self.store.begin_remove(key)?;
            self.flush().await?;
            Ok::<_, EngineError>(removed)
        }
        .await;
        let failed = match removed {
            Err(e) => Some(e),
            Ok(removed) => {
                crate::failpoint!("remove:after-intent");
                // Its spares (marked Deleting by the same transaction) go before its device.
                self.reap_spares(key, &removed.spares).await;
                match self.reap_locked(id, rec.size).await {
                    Ok(()) => None,
                    Err(e) => {
                        // The kernel kept the device (a failed or read-only pool): give the
                        // snapshot back, so the answer is true and a retry can finish it.
                        warn!(key, thin_id = id.get(), error = %e, "cannot delete the device; the snapshot stays");
                        self.store.restore_removed(key, &rec)?;
                        self.flush().await?;
                        Some(e)
                    }
                }
            }
        };
        if let Some(e) = failed {
            // A device never activated this run stays so (the first call that needs it will).
            if active && !self.lazy.is_pending(id) {
                self.reactivate(id, rec.size).await;
            }
            return Err(e);
        }
        self.lazy.done(id);
        info!(key, thin_id = id.get(), "removed snapshot");
        Ok(())
    }
}
