//! `thinsnap pool destroy`: [`destroy`].

use nix::errno::Errno;
use tracing::{info, warn};

use super::{pool_params, thin_uuid_prefix};
use crate::config::{Config, PoolMode};
use crate::pool::ioctl::{
    self, device_exists, device_info, dm_err, dm_name, errno_of, open_dm, remove_device, table_of,
    Udev,
};
use crate::pool::{loopback, lvm, PoolError, ThinId};

/// `thinsnap pool destroy`: removes every dm device with this pool's prefix; in existing mode
/// deletes `thin_ids` (the ones the store knows) from the pool, which stays; in loop mode removes
/// the pool and detaches its loop devices, and with `remove_files` deletes the sparse files.
///
/// Returns an error if device-mapper is missing or a device is busy.
pub fn destroy(config: &Config, thin_ids: &[ThinId], remove_files: bool) -> Result<(), PoolError> {
    let dm = open_dm()?;
    let name = &config.pool.name;
    let pool_dev = match config.pool.mode {
        PoolMode::Lvm => {
            let l = &config.pool.lvm;
            let [tpool, plain] = lvm::pool_dm_candidates(&l.volume_group, &l.thin_pool);
            if device_exists(&dm, &tpool)? {
                tpool
            } else {
                plain
            }
        }
        _ => name.clone(),
    };
    // Only thin devices of this pool go: their table must be `thin <pool's major:minor> <id>`
    // (a thin device holds its pool open, so without the pool there is none of ours), and a
    // loop pool must be the one on this root's files.
    if let Some(info) = device_info(&dm, &pool_dev)? {
        if config.pool.mode == PoolMode::Loop {
            let params = pool_params(&dm, &pool_dev)?;
            loopback::check_pool_devices(config, &pool_dev, params.metadata_dev, params.data_dev)?;
        }
        let prefix = format!("{name}-snap-");
        let uuid_prefix = thin_uuid_prefix(&pool_dev);
        for n in ioctl::list_names(&dm)? {
            let Some(id) = n
                .strip_prefix(&prefix)
                .and_then(|id| id.parse::<ThinId>().ok())
            else {
                continue;
            };
            let Some(dev) = device_info(&dm, &n)? else {
                continue;
            };
            let uuid_ok = ioctl::uuid_of(&dev).is_none_or(|u| u == format!("{uuid_prefix}{id}"));
            let want = format!("{} {id}", info.device());
            let table_ok = matches!(table_of(&dm, &n, true)?.as_slice(),
                [(_, _, t, p)] if t == "thin" && p.trim() == want);
            if uuid_ok && table_ok {
                remove_device(&dm, &n, Udev::Private)?;
                info!(device = %n, "removed dm device");
            } else {
                warn!(device = %n, "dm device with our name prefix is not a thin device of this pool; left alone");
            }
        }
    }
    let exists = device_exists(&dm, &pool_dev)?;
    match config.pool.mode {
        PoolMode::Existing | PoolMode::Lvm => {
            if exists {
                let n = dm_name(&pool_dev)?;
                for id in thin_ids {
                    match ioctl::message(&dm, &n, &format!("delete {id}")) {
                        Ok(()) => info!(pool = %name, thin_id = id.get(), "deleted thin device"),
                        Err(e) if matches!(errno_of(&e), Some(Errno::ENODATA)) => {}
                        Err(e) => {
                            return Err(dm_err("delete thin id", format!("{id} in {name}"))(e))
                        }
                    }
                }
            }
            if config.pool.mode == PoolMode::Lvm && remove_files {
                lvm::teardown(config)?;
            }
        }
        PoolMode::Loop => {
            if exists {
                remove_device(&dm, name, Udev::Disk)?;
                info!(pool = %name, "removed thin pool");
            }
            loopback::release(&config.pool_dir(), remove_files)?;
        }
    }
    Ok(())
}
