//! Commit: an active snapshot becomes a committed one under a new name, keeping its thin id; its
//! device is deactivated. One durable write: the intent (on the device record, with everything
//! the committed record needs) is flushed before the kernel is touched; the outcome is written
//! and becomes durable with the next flush. A Commit whose intent is durable is finished by
//! recovery (`recovery::Recovery::finish_commit`); one whose intent is not never happened.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::limits::{check_key, check_labels};
use super::{now_ns, pool_err, Engine, EngineError, Kind};
use crate::pool::{PoolError, ThinPool};
use crate::store::CommitIntent;

impl Engine {
    /// Commits active snapshot `key` as `name`: the device keeps its thin id and is deactivated.
    ///
    /// Returns NotFound if `key` does not exist, FailedPrecondition if it is a view or committed
    /// or still mounted, AlreadyExists if `name` is taken.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        check_key("name", name)?;
        check_key("key", key)?;
        check_labels(&labels)?;
        let _in_flight = self.spares.call_in_flight();
        let _guard = self.locks.lock(&[key, name]).await;
        crate::failpoint!("commit:start");
        let rec = self.ready(key)?;
        if rec.kind != Kind::Active {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} is {}; only an active snapshot can be committed",
                rec.kind.as_str()
            )));
        }
        if self.store.get(name)?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        // A device not activated yet this run (lazy activation after a reboot) is made now: the
        // committed record's usage is read from it and its dirty pages flushed by deactivation.
        self.ensure_device(key, &rec).await?;
        let (id, size) = (rec.thin_id, rec.size);
        // The device is this call's until the Commit is done: no first-use activation races it.
        let _device = self.thin_locks.lock(&[&id]).await;
        // What the committed record keeps for Usage, read from the active device.
        let what = format!("commit snapshot {key:?}");
        let mapped = self
            .on_pool(move |pool| {
                pool.activate(id, size)
                    .map_err(pool_err(format!("{what}: activate thin id {id}")))?;
                pool.mapped_bytes(id)
                    .map_err(pool_err(format!("{what}: read usage of thin id {id}")))
            })
            .await?;
        // 1. Intent, durable before the kernel is touched.
        let intent = CommitIntent {
            name: name.to_string(),
            labels,
            mapped,
            now: now_ns(),
        };
        self.store.begin_commit(key, &intent)?;
        if let Err(e) = self.flush().await {
            self.abandon_commit(key, id, size).await;
            return Err(e.into());
        }
        crate::failpoint!("commit:after-intent");
        // 2. The kernel: the device goes (it is flushed first).
        let what = format!("commit snapshot {key:?}");
        let deactivated = self
            .on_pool(move |pool| {
                match pool.deactivate(id) {
                    Ok(()) => {}
                    // containerd's own conformance suite commits snapshots it has not
                    // unmounted yet (so does a careless client): flush the filesystem now and
                    // let the device go at its last close, as containerd's devmapper does.
                    Err(PoolError::Busy(_)) => {
                        warn!(
                            thin_id = id.get(),
                            "committing a snapshot that is still mounted"
                        );
                        pool.deactivate_deferred(id).map_err(pool_err(what))?;
                    }
                    Err(e) => return Err(pool_err(what)(e)),
                }
                crate::failpoint!("commit:after-deactivate");
                Ok(())
            })
            .await;
        // 3. Outcome: written; durable with the next flush, or finished by recovery.
        let finished = deactivated.and_then(|()| Ok(self.store.finish_commit(key)?));
        if let Err(e) = finished {
            warn!(key, name, thin_id = id.get(), error = %e, "commit failed; undoing");
            self.abandon_commit(key, id, size).await;
            return Err(e);
        }
        crate::failpoint!("commit:after-record");
        info!(key, name, thin_id = id.get(), mapped, "committed snapshot");
        // A layer just committed is the likeliest next parent: a spare of it is wanted; one
        // committed by an image unpack only once the unpack has gone quiet on it, and never one
        // of a Docker container's init layer (one child, prepared at once).
        if super::spares::is_unpack_key(key) {
            self.spares.unpacked(name);
        } else if !super::spares::is_docker_init_layer(name) {
            self.spares.touch(name);
        }
        Ok(())
    }

    /// Undoes a Commit that fails before its outcome: the intent goes, durably (the caller is
    /// told the Commit did not happen, so recovery must not finish it), and the active snapshot
    /// gets its device back. A store failure here is logged: the intent then stays, and the
    /// next start finishes the Commit.
    async fn abandon_commit(&self, key: &str, id: crate::model::ThinId, size: u64) {
        let dropped = async {
            self.store.abandon_commit(key)?;
            self.flush().await
        }
        .await;
        if let Err(e) = dropped {
            warn!(key, thin_id = id.get(), error = %e, "cannot drop the intent of a failed commit");
        }
        self.reactivate(id, size).await;
    }
}
