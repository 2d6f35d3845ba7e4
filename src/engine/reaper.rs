//! Deleting thin devices whose snapshots are gone: the one reap path (Remove, an undone Prepare,
//! Cleanup and the `remove.async` reaper all end here), Cleanup, and the background reaper task.
//! A device is deleted only once its record says Deleting; a failure leaves the record for the
//! next try, so nothing is lost and nothing leaks.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::warn;

use super::{pool_err, stopped, Engine, EngineError};
use crate::model::ThinId;
use crate::pool::ThinPool;
use crate::store::State;

/// How long the reaper waits before retrying a device it could not delete (still mounted).
const RETRY_AFTER: Duration = Duration::from_secs(2);

impl Engine {
    /// Deactivates and deletes thin device `id` if its record is in state Deleting, then
    /// forgets it. Returns whether it is gone; a failure leaves the record for
    /// [`Engine::cleanup`], the reaper and recovery to retry.
    pub(super) async fn reap(&self, id: ThinId) -> bool {
        let _device = self.thin_locks.lock(&[&id]).await;
        let size = match self.store.device(id) {
            Ok(Some(d)) if d.state == State::Deleting => d.size,
            // Given back by a Remove whose delete failed, or reaped already.
            Ok(_) => return true,
            Err(e) => {
                warn!(thin_id = id.get(), error = %e, "cannot read the device record");
                return false;
            }
        };
        match self.reap_locked(id, size).await {
            Ok(()) => true,
            Err(e) => {
                warn!(thin_id = id.get(), error = %e, "cannot delete thin device; left for cleanup");
                false
            }
        }
    }

    /// [`Engine::reap`]'s work, for a caller that holds the thin id's lock and knows the record
    /// is Deleting; `size` is the device's (for `remove.discard`), which the caller has read.
    ///
    /// Returns the pool's or the store's error; the record is then still Deleting.
    pub(super) async fn reap_locked(&self, id: ThinId, size: u64) -> Result<(), EngineError> {
        let discard = self.settings.discard.then_some(size);
        self.on_pool(move |pool| {
            pool.remove_device(id, discard)
                .map_err(pool_err(format!("delete thin id {id}")))?;
            crate::failpoint!("remove:after-delete");
            Ok(())
        })
        .await?;
        // Written, not flushed: a Deleting record that comes back after a crash is deleted again
        // by recovery (a missing thin id is success), so the next flush, any call's, suffices.
        self.store.forget_device(id)?;
        crate::failpoint!("remove:after-forget");
        Ok(())
    }

    /// Rolls back half-made snapshots no call is making any more, deletes thin devices left
    /// behind by removals that could not finish (a device that was busy, a crash), and dm devices
    /// with our prefix that no record owns; then audits the pool's thin ids against the store
    /// (see [`super::audit`]). Returns how many devices it deleted.
    ///
    /// Returns an error if the store or the pool cannot be read.
    pub async fn cleanup(&self) -> Result<usize, EngineError> {
        // The kernel first: a device active now had its record written before it was activated
        // (intent first), so reading the store after it can only see more records, never miss
        // the record of a device a Prepare made in between.
        let active = self
            .on_pool(|pool| pool.active_ids().map_err(pool_err("list active devices")))
            .await?;
        for (key, rec) in self.store.snapshots()? {
            if rec.state == State::Creating {
                // Its call is over if nobody holds the key.
                if let Some(_key) = self.locks.try_lock(&key) {
                    self.roll_back_half_made(&key).await?;
                }
            }
        }
        let mut reaped = BTreeSet::new();
        for dev in self.store.devices()? {
            if dev.state == State::Deleting && self.reap(dev.thin_id).await {
                reaped.insert(dev.thin_id);
            }
        }
        let known: BTreeSet<ThinId> = self.store.devices()?.iter().map(|d| d.thin_id).collect();
        let mut orphans = 0;
        for id in active
            .into_iter()
            .filter(|id| !known.contains(id) && !reaped.contains(id))
        {
            // Every device we activate has a record first; one without is an orphan.
            warn!(thin_id = id.get(), "active device with no record; deleting");
            let gone = self
                .on_pool(move |pool| {
                    pool.remove_device(id, None)
                        .map_err(pool_err(format!("delete orphan thin id {id}")))
                })
                .await;
            match gone {
                Ok(()) => orphans += 1,
                Err(e) => warn!(thin_id = id.get(), error = %e, "cannot delete orphan"),
            }
        }
        // Then the audit of thin ids (reported in status; it deletes nothing): its failure
        // (thin_ls missing, the metadata snapshot held) does not fail the Cleanup.
        let _ = self.audit().await;
        Ok(reaped.len() + orphans)
    }

    /// The `remove.async` reaper, until `stop` turns true: deletes the devices Remove queued,
    /// and every device left in state Deleting (by a crash or a busy device), retrying a busy
    /// one every `RETRY_AFTER` (2 s). Returns at once when `remove.async` is off. The server runs it
    /// as one of its tasks.
    pub async fn run_reaper(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(mut queue) = self
            .reaper_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let mut retry: Vec<ThinId> = match self.store.devices() {
            Ok(devices) => devices
                .iter()
                .filter(|d| d.state == State::Deleting)
                .map(|d| d.thin_id)
                .collect(),
            Err(e) => {
                warn!(error = %e, "reaper: cannot read the device records");
                Vec::new()
            }
        };
        // Leftovers from before are due at once; a failed try is due again RETRY_AFTER later.
        let mut due = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                id = queue.recv() => match id {
                    Some(id) => {
                        if !self.reap(id).await {
                            if retry.is_empty() {
                                due = tokio::time::Instant::now() + RETRY_AFTER;
                            }
                            retry.push(id);
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(due), if !retry.is_empty() => {
                    let mut still = Vec::new();
                    for id in std::mem::take(&mut retry) {
                        if !self.reap(id).await {
                            still.push(id);
                        }
                    }
                    retry = still;
                    due = tokio::time::Instant::now() + RETRY_AFTER;
                }
            }
        }
    }
}
