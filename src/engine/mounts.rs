//! Mounts: [`Engine::mounts`], what a client mounts for an active snapshot or view (its device,
//! made on first use after a reboot; a bind of where it is mounted already).

use tracing::{info, warn};

use super::limits::check_key;
use super::{Engine, EngineError, Kind, Mount};
use crate::fs::mount_options;
use crate::pool::ThinPool;
use crate::store::SnapshotRecord;

impl Engine {
    /// The mounts of an active snapshot or view.
    ///
    /// Returns NotFound if there is no such snapshot, FailedPrecondition if it is committed.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, EngineError> {
        check_key("key", key)?;
        let rec = self.ready(key)?;
        if rec.kind == Kind::Committed {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        self.ensure_device(key, &rec).await?;
        if let Some(point) = self.mounted_whole(key, &rec).await {
            // Already mounted (a running container's root filesystem): the kernel refuses a
            // read-only mount of the device while it is mounted read-write (EBUSY), and that is
            // how containerd's differ mounts it for a diff (`docker commit`, `nerdctl commit`,
            // rootfs.CreateDiff). A bind of where it is mounted serves a read-only and a
            // read-write mount alike, on the same live filesystem: nothing new to clean up, the
            // container sees no change, and a Remove afterwards is as before.
            info!(key = ?key, thin_id = rec.thin_id.get(), mount_point = %point.display(), "snapshot already mounted; answering a bind mount of it");
            let mode = if rec.kind == Kind::View { "ro" } else { "rw" };
            return Ok(vec![Mount {
                fs_type: "bind".to_string(),
                source: point.display().to_string(),
                options: vec!["bind".to_string(), mode.to_string()],
            }]);
        }
        Ok(self.mounts_of(&rec))
    }

    /// Where the device of snapshot `key` is mounted whole, if it is (see
    /// [`crate::fs::mounted_at`]). A mount table that cannot be read is logged and taken as
    /// "not mounted": the answer is then the device, as for a snapshot nobody mounted.
    async fn mounted_whole(&self, key: &str, rec: &SnapshotRecord) -> Option<std::path::PathBuf> {
        let device = self.pool.device_path(rec.thin_id);
        let table = self.settings.mount_table.clone();
        let found = tokio::task::spawn_blocking(move || crate::fs::mounted_at(&device, &table))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match found {
            Ok(point) => point,
            Err(e) => {
                warn!(key = ?key, thin_id = rec.thin_id.get(), error = %e, "cannot tell whether the snapshot is mounted; answering its device");
                None
            }
        }
    }

    pub(super) fn mounts_of(&self, rec: &SnapshotRecord) -> Vec<Mount> {
        vec![Mount {
            fs_type: self.settings.fs.fs_type.as_str().to_string(),
            source: self.pool.device_path(rec.thin_id).display().to_string(),
            options: mount_options(&self.settings.fs, rec.kind == Kind::View),
        }]
    }
}
