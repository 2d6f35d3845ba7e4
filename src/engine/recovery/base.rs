//! Recovery's phase 5 (see `super`): the base device, made once per pool.

use tracing::{info, warn};

use super::{Formatter, Recovery};
use crate::engine::{pool_err, EngineError};
use crate::pool::{PoolError, ThinPool};
use crate::store::{BaseRecord, BASE_OWNER};

impl Recovery<'_> {
    /// Phase 5: the existing base, checked against the configuration, or a new one.
    pub(super) fn ensure_base(&mut self, format: Formatter<'_>) -> Result<BaseRecord, EngineError> {
        let fs = &self.settings.fs;
        let Some(b) = self.base.clone() else {
            self.report.base_created = true;
            return self.make_base(format);
        };
        if b.fs_type != fs.fs_type.as_str() {
            return Err(EngineError::FailedPrecondition(format!(
                "fs.type is {} but the pool's base device (thin id {}) holds {}; \
                 use a new pool (or `thinsnap pool destroy`) to change it",
                fs.fs_type, b.thin_id, b.fs_type
            )));
        }
        if b.size > fs.base_size.as_u64() {
            warn!(
                configured = fs.base_size.as_u64(),
                existing = b.size,
                "fs.base_size is smaller than the existing base device's; nothing shrinks: new images keep the base's size"
            );
        } else if b.size < fs.base_size.as_u64() {
            info!(
                configured = fs.base_size.as_u64(),
                existing = b.size,
                "fs.base_size was raised: new images' first layers get the new size (their filesystems grown when made)"
            );
        }
        Ok(b)
    }

    /// Makes the base device: intent, create_thin, activate, mkfs, record. Runs once per pool.
    fn make_base(&self, format: Formatter<'_>) -> Result<BaseRecord, EngineError> {
        let (pool, store, fs) = (self.pool, self.store, &self.settings.fs);
        let size = fs.base_size.as_u64();
        let mut tries = 0;
        let id = loop {
            tries += 1;
            let id = store.begin_device(BASE_OWNER, size)?;
            store.flush_sync()?;
            crate::failpoint!("base:after-intent");
            match pool.create_thin(id) {
                Ok(()) => break id,
                // Another owner's volume in a shared pool: not ours to touch (the undo below
                // would delete it); drop the record and take the next id.
                Err(PoolError::ThinExists(_)) if tries < crate::engine::create::MAX_TAKEN_IDS => {
                    warn!(
                        thin_id = id.get(),
                        "thin id taken by a device thinsnap does not own; trying the next one"
                    );
                    store.forget_device(id)?;
                    store.flush_sync()?;
                }
                Err(e) => {
                    store.forget_device(id)?;
                    store.flush_sync()?;
                    return Err(pool_err(format!("create base thin id {id}"))(e));
                }
            }
        };
        let made = (|| {
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
                warn!(thin_id = id.get(), error = %e, "cannot make base device; undoing");
                if self.delete(id).is_ok() {
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
        info!(thin_id = id.get(), fs = %fs.fs_type, size, "created base device");
        Ok(base)
    }
}
