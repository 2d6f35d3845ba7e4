//! Lvm mode: provisions an LVM thin pool on a block device with the lvm2 tools, the way Docker's
//! `dm.directlvm_device` did, and names the dm device of the pool for [`super::dm::DmPool`].
//! Runs at start only (and on `pool destroy --remove-files`), never on a snapshot call.

use super::PoolError;
use crate::config::Config;

/// Makes sure the volume group, the thin pool and its autoextend profile exist on
/// `pool.lvm.device`, creating them if not, and returns the dm name of the thin-pool device.
///
/// Returns an error if the device holds a filesystem (without `force`) or an lvm2 tool fails.
pub fn provision(config: &Config) -> Result<String, PoolError> {
    let _ = config;
    Err(PoolError::PoolMissing(
        "lvm mode is not available yet".to_string(),
    ))
}

/// `pool destroy --remove-files` in lvm mode: removes the thin pool, the volume group and the
/// physical volume label thinsnap made.
///
/// Returns an error if an lvm2 tool fails.
pub fn teardown(config: &Config) -> Result<(), PoolError> {
    let _ = config;
    Ok(())
}
