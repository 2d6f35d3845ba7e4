//! Usage: [`Engine::usage`], the bytes a snapshot maps beyond its parent.

use super::limits::check_key;
use super::{activate, pool_err, Engine, EngineError, Kind, Usage};
use crate::pool::ThinPool;

impl Engine {
    /// Bytes the snapshot maps beyond what its parent mapped when it was made: read live from the
    /// device for active snapshots and views, recorded at commit for committed ones.
    ///
    /// Returns NotFound if it does not exist.
    pub async fn usage(&self, key: &str) -> Result<Usage, EngineError> {
        check_key("key", key)?;
        let rec = self.ready(key)?;
        if let Some(q) = &rec.quarantine {
            return Err(activate::quarantined(key, rec.thin_id, q));
        }
        let mapped = match rec.kind {
            Kind::Committed => rec.mapped,
            Kind::Active | Kind::View => {
                self.ensure_device(key, &rec).await?;
                let id = rec.thin_id;
                self.on_pool(move |pool| {
                    pool.mapped_bytes(id)
                        .map_err(pool_err(format!("read usage of thin id {id}")))
                })
                .await?
            }
        };
        Ok(Usage {
            size: mapped.saturating_sub(rec.origin_mapped),
            inodes: 0,
        })
    }
}
