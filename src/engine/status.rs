//! The engine's status (Admin's Status, the metrics): [`Engine::status`], pool space and health
//! with the snapshot counts.

use super::{activate, pool_err, spares, BaseInfo, Engine, EngineError, EngineStatus, Kind};
use crate::pool::ThinPool;
use crate::store::State;

impl Engine {
    /// Pool space and health with the snapshot counts.
    ///
    /// Returns an error if the pool status cannot be read.
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let pool = self
            .on_pool(|pool| pool.status().map_err(pool_err("read pool status")))
            .await?;
        // The store's part is a scan of every record: on a blocking thread, as List's is.
        let store = self.store.clone();
        let (thin_ids, spare_ids, quarantined, kinds, deleting) =
            tokio::task::spawn_blocking(move || {
                let devices = store.devices()?;
                let deleting = devices
                    .iter()
                    .filter(|d| d.state == State::Deleting)
                    .count() as u64;
                let spare_ids = spares::spare_ids_in(&store, &devices)?;
                let quarantined = activate::quarantined_in(&store)?;
                let mut kinds = [0u64; 3];
                for (_, rec) in store.snapshots()? {
                    if rec.state != State::Ready {
                        continue;
                    }
                    kinds[match rec.kind {
                        Kind::Active => 0,
                        Kind::View => 1,
                        Kind::Committed => 2,
                    }] += 1;
                }
                // Warm spares apart: they are no snapshot's (see `spare_thin_ids`).
                let thin_ids = (devices.len() - spare_ids.len()) as u64;
                Ok::<_, EngineError>((thin_ids, spare_ids, quarantined, kinds, deleting))
            })
            .await
            .map_err(|e| EngineError::Internal(format!("status task failed: {e}")))??;
        Ok(EngineStatus {
            pool,
            base: BaseInfo {
                thin_id: self.base.thin_id,
                fs_type: self.base.fs_type.clone(),
                size: self.base.size,
                new_image_size: self.grown_base_size("").unwrap_or(self.base.size),
            },
            thin_ids,
            spare_thin_ids: spare_ids,
            inactive: self.lazy.inactive(),
            quarantined,
            spares: self.spares.counts(),
            audit: self.audit_report(),
            deleting,
            active: kinds[0],
            views: kinds[1],
            committed: kinds[2],
        })
    }
}
