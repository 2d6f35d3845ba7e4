//! Lvm mode: provisions an LVM thin pool on a block device with the lvm2 tools, the way Docker's
//! `dm.directlvm_device` did, and names the dm device of the pool for [`super::dm::DmPool`].
//! Runs at start only (and on `pool destroy --remove-files`), never on a snapshot call.
//!
//! What it makes on `pool.lvm.device`, once: a physical volume, the volume group
//! `pool.lvm.volume_group` (tagged `thinsnap`), two linear volumes of `thinp_percent`% and
//! `thinp_metapercent`% of the group converted into the thin pool `pool.lvm.thin_pool`
//! (`--zero n`, chunk size = `pool.block_size`), and the metadata profile `<vg>-<pool>` in LVM's
//! profile directory (`/etc/lvm/profile`) carrying `activation/thin_pool_autoextend_threshold`
//! and `thin_pool_autoextend_percent`, applied with `lvchange --metadataprofile`. Monitoring by
//! dmeventd (which does the autoextending) is switched on where the host can run it.
//! At every later start the group and pool are found and only activated (`lvchange -ay`), so a
//! restart or a reboot reuses them. A device holding any signature (filesystem, partition
//! table, RAID or LVM label) is refused unless `pool.lvm.force`, which wipes it first; a device
//! that belongs to another volume group is always refused.
//!
//! The pool is thinsnap's alone. LVM knows nothing of thinsnap's thin devices: thinsnap creates
//! and deletes them with pool messages and gives them its own dm names, as Docker did on direct-lvm.
//! LVM tracks the pool's transaction id in its own metadata and checks it against the kernel's on
//! activation, so thinsnap must never send `set_transaction_id` to an LVM pool (it sends none
//! today: keep it that way), and nobody may create LVM thin volumes in it (LVM would hand out
//! thin ids thinsnap may already use).
//!
//! This module must not touch the pool's thin devices, the store or anything outside the
//! configured device, volume group and profile file. Tools are run with stdin closed (any prompt
//! answers "no"), `LC_ALL=C`, and `DM_DISABLE_UDEV=1` when no udev daemon runs (containers,
//! minimal VMs), so libdevmapper makes the device nodes itself instead of waiting for udev.
//!
//! Inside: `provision` (first start and every start), `profile` (the autoextend profile),
//! `command` (running the tools and reading their reports); this file holds the refusals
//! ([`LvmError`]), the names and `teardown`.

mod command;
mod profile;
mod provision;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use tracing::info;

use self::command::{
    block_device_number, find_vg, list_lvs, list_pvs, lvm_thin_volumes, same_device, tool,
};
pub use self::profile::{profile_name, profile_path};
pub use self::provision::provision;
use super::{remove_file_if_exists, PoolError};
use crate::config::Config;

/// The tag thinsnap puts on the volume group it creates: only in such a group does it clean up
/// half-made volumes of an interrupted provisioning, and only such a group does teardown remove.
pub const VG_TAG: &str = "thinsnap";

/// What lvm mode refuses to do with the configured device, volume group or thin pool: each names
/// what it found and the way out. (A tool that fails is a [`PoolError::Io`] instead.)
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error("lvm mode needs pool.lvm.device: the block device to use is not configured")]
    NoDevice,
    #[error("pool.lvm.device {}: not a block device (lvm mode needs a disk or partition)", .0.display())]
    NotABlockDevice(PathBuf),
    #[error("refusing to use {}: it holds {signatures} (a filesystem or other data?); lvm mode would destroy it. Use another device, or set pool.lvm.force = true to wipe it", .device.display())]
    DeviceHoldsData { device: PathBuf, signatures: String },
    #[error("refusing to use {}: it is a physical volume of volume group {group}, not of pool.lvm.volume_group {configured}; thinsnap does not take over another group (remove it with vgremove, or configure volume_group = {group:?} to put the pool in it)", .device.display())]
    DeviceInOtherGroup {
        device: PathBuf,
        group: String,
        configured: String,
    },
    #[error("refusing to use {}: volume group {group} already exists on {devices}, not on this device", .device.display())]
    GroupOnOtherDevices {
        device: PathBuf,
        group: String,
        devices: String,
    },
    #[error("refusing to use {}: volume group {group} holds {volumes}, not a thin pool{}; remove them or choose another pool.lvm.thin_pool", .pool.display(), if *.group_is_ours { "" } else { " (and the group was not made by thinsnap)" })]
    NotAThinPool {
        pool: PathBuf,
        group: String,
        volumes: String,
        group_is_ours: bool,
    },
    #[error("not removing the thin pool {pool}: it holds LVM thin volumes thinsnap did not make: {volumes}")]
    PoolHoldsLvmThinVolumes { pool: String, volumes: String },
    #[error("not removing volume group {group}: it still holds logical volumes thinsnap did not make: {volumes}")]
    GroupHoldsOtherVolumes { group: String, volumes: String },
}

/// The dm name LVM gives `vg/lv` (dashes inside a name doubled, `-` between them).
pub fn dm_name_of(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The dm names under which LVM may expose the thin-pool target of `vg/lv`, most specific first:
/// `<vg>-<lv>-tpool` when the pool has LVM thin volumes (then `<vg>-<lv>` is a linear layer on
/// top), plain `<vg>-<lv>` when it has none.
pub fn pool_dm_candidates(vg: &str, lv: &str) -> [String; 2] {
    let base = dm_name_of(vg, lv);
    [format!("{base}-tpool"), base]
}

/// `pool destroy --remove-files` in lvm mode: removes the thin pool, then the volume group and
/// the physical volume label if thinsnap made the group (tagged `thinsnap`) and nothing else is in
/// it, and the autoextend profile. What is already gone is skipped, so it can be run again.
/// thinsnap's own dm devices on the pool must have been removed first.
///
/// Returns an error naming the volume group or device if an lvm2 tool fails (the pool is still
/// open, say) or the group holds volumes thinsnap did not make.
pub fn teardown(config: &Config) -> Result<(), PoolError> {
    // The names were checked against LVM's rule when the configuration was loaded
    // (config/pool.rs), before they reach a path or a command line.
    let l = &config.pool.lvm;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    if let Some(info) = find_vg(vg)? {
        let lvs = list_lvs(vg)?;
        let thin_lvs = lvm_thin_volumes(&lvs, lv);
        if !thin_lvs.is_empty() {
            return Err(LvmError::PoolHoldsLvmThinVolumes {
                pool: format!("{vg}/{lv}"),
                volumes: thin_lvs.join(", "),
            }
            .into());
        }
        let tagged = info.tags.iter().any(|t| t == VG_TAG);
        let meta = format!("{lv}meta");
        // The pool; in a group thinsnap made, also the linear volumes of a half-made pool.
        let ours: Vec<String> = lvs
            .iter()
            .filter(|v| {
                (v.name == lv && v.segtype == "thin-pool")
                    || (tagged && (v.name == lv || v.name == meta) && v.segtype == "linear")
            })
            .map(|v| format!("{vg}/{}", v.name))
            .collect();
        if !ours.is_empty() {
            let mut args = vec!["--yes".to_string()];
            args.extend(ours.iter().cloned());
            tool(
                "remove the thin pool",
                Path::new(&format!("{vg}/{lv}")),
                "lvremove",
                args,
            )?;
            info!(pool = %format!("{vg}/{lv}"), "removed LVM thin pool");
        }
        if tagged {
            let others: Vec<String> = list_lvs(vg)?.into_iter().map(|v| v.name).collect();
            if !others.is_empty() {
                return Err(LvmError::GroupHoldsOtherVolumes {
                    group: vg.to_string(),
                    volumes: others.join(", "),
                }
                .into());
            }
            tool(
                "remove volume group",
                Path::new(vg),
                "vgremove",
                ["--yes", vg],
            )?;
            info!(volume_group = %vg, "removed LVM volume group");
        } else {
            info!(volume_group = %vg, "volume group not made by thinsnap: kept");
        }
    }
    if let Some(device) = l.device.as_deref() {
        if let Ok(rdev) = block_device_number(device) {
            let orphan = list_pvs(device)?
                .iter()
                .any(|p| p.vg.is_empty() && same_device(&p.name, rdev));
            if orphan {
                tool(
                    "remove the physical volume label of",
                    device,
                    "pvremove",
                    [OsStr::new("--yes"), device.as_os_str()],
                )?;
                info!(device = %device.display(), "removed LVM physical volume label");
            }
        }
    }
    let profile = profile_path(l);
    if remove_file_if_exists(&profile)? {
        info!(profile = %profile.display(), "removed LVM profile");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names_double_dashes() {
        assert_eq!(dm_name_of("tvg", "pool"), "tvg-pool");
        assert_eq!(dm_name_of("my-vg", "thin-pool"), "my--vg-thin--pool");
        assert_eq!(
            pool_dm_candidates("my-vg", "p"),
            ["my--vg-p-tpool".to_string(), "my--vg-p".to_string()]
        );
    }
}
