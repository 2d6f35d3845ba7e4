//! Lvm mode's provisioning at start: the physical volume, the volume group and the thin pool made
//! on `pool.lvm.device` the first time, found and activated every later time, with the autoextend
//! profile applied and dmeventd monitoring switched on where it can run.
//!
//! Every refusal (a device holding data, a device or group that is someone else's, volumes in
//! the way) is an [`LvmError`], decided before anything is changed. It must not touch the pool's
//! thin devices or anything outside the configured device and volume group.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::command::{
    block_device_number, find_vg, list_lvs, list_pvs, lvm_thin_volumes, same_device, signatures,
    tool, Lv,
};
use super::profile::write_profile;
use super::{pool_dm_candidates, LvmError, VG_TAG};
use crate::config::Config;
use crate::pool::ioctl::{device_exists, open_dm, table_of};
use crate::pool::PoolError;

/// Makes `dev` an LVM physical volume: refuses it if it holds a signature (unless `force`, which
/// wipes them), then `pvcreate`.
fn make_pv(dev: &Path, force: bool) -> Result<(), PoolError> {
    let found = signatures(dev)?;
    if !found.is_empty() {
        if !force {
            return Err(LvmError::DeviceHoldsData {
                device: dev.to_path_buf(),
                signatures: found.join(", "),
            }
            .into());
        }
        warn!(device = %dev.display(), signatures = %found.join(", "),
              "pool.lvm.force: wiping the device's signatures");
        tool(
            "wipe signatures of",
            dev,
            "wipefs",
            [OsStr::new("--all"), dev.as_os_str()],
        )?;
    }
    // --yes only when forced: otherwise a signature lvm finds and wipefs did not makes pvcreate
    // ask, and the closed stdin answers no.
    let mut args: Vec<&OsStr> = Vec::new();
    if force {
        args.push(OsStr::new("--yes"));
    }
    args.push(dev.as_os_str());
    tool("create a physical volume on", dev, "pvcreate", args)?;
    info!(device = %dev.display(), "created LVM physical volume");
    Ok(())
}

/// Creates the data and metadata volumes and converts them into the thin pool.
fn create_pool(config: &Config) -> Result<(), PoolError> {
    let l = &config.pool.lvm;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    let subject = PathBuf::from(format!("{vg}/{lv}"));
    let meta = format!("{lv}meta");
    for (op, name, percent) in [
        ("create the thin pool's data volume", lv, l.thinp_percent),
        (
            "create the thin pool's metadata volume",
            meta.as_str(),
            l.thinp_metapercent,
        ),
    ] {
        tool(
            op,
            &subject,
            "lvcreate",
            [
                "--yes",
                "--wipesignatures",
                "y",
                "--name",
                name,
                "--extents",
                &format!("{percent}%VG"),
                vg,
            ],
        )?;
    }
    let chunk = format!("{}k", config.pool.block_size.as_u64() / 1024);
    let data_path = format!("{vg}/{lv}");
    let meta_path = format!("{vg}/{meta}");
    let mut args = vec![
        "--yes",
        "--zero",
        "n",
        "--chunksize",
        &chunk,
        "--thinpool",
        &data_path,
        "--poolmetadata",
        &meta_path,
    ];
    // LVM keeps a spare metadata volume (as big as the metadata) for `lvconvert --repair`; when
    // the percentages leave no room for it, do without rather than fail.
    let free = find_vg(vg)?.map_or(0, |g| g.free_bytes);
    let meta_size = list_lvs(vg)?
        .iter()
        .find(|v| v.name == meta)
        .map_or(0, |v| v.size_bytes);
    if free < meta_size {
        warn!(volume_group = %vg, free, meta_size,
              "no room for LVM's spare metadata volume: creating the pool without one");
        args.extend(["--poolmetadataspare", "n"]);
    }
    tool("convert into a thin pool", &subject, "lvconvert", args)?;
    info!(pool = %subject.display(), chunk = %chunk, data_percent = l.thinp_percent,
          metadata_percent = l.thinp_metapercent, "created LVM thin pool");
    Ok(())
}

/// Makes sure the thin pool `vg/lv` exists (creating it, or cleaning up the half-made volumes of
/// an interrupted provisioning in a group thinsnap made), is active, carries the autoextend
/// profile and is monitored where possible.
fn ensure_pool(config: &Config, vg_tagged: bool) -> Result<(), PoolError> {
    let l = &config.pool.lvm;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    let subject = PathBuf::from(format!("{vg}/{lv}"));
    let meta = format!("{lv}meta");
    let lvs = list_lvs(vg)?;
    let thin_lvs = lvm_thin_volumes(&lvs, lv);
    if !thin_lvs.is_empty() {
        warn!(pool = %subject.display(), volumes = %thin_lvs.join(", "),
              "the pool holds LVM thin volumes: their thin ids may collide with thinsnap's");
    }
    let pool = lvs.iter().find(|v| v.name == lv);
    // Whether the pool was made or changed here (then its monitoring state is asked again).
    let mut changed = true;
    let pool = match pool {
        Some(p) if p.segtype == "thin-pool" => {
            changed = false;
            p.clone()
        }
        _ => {
            let leftovers: Vec<&Lv> = lvs
                .iter()
                .filter(|v| v.name == lv || v.name == meta)
                .collect();
            if !leftovers.is_empty() {
                let ours = vg_tagged;
                let linear = leftovers.iter().all(|v| v.segtype == "linear");
                let names = leftovers
                    .iter()
                    .map(|v| format!("{} ({})", v.name, v.segtype))
                    .collect::<Vec<_>>()
                    .join(", ");
                if !(ours && linear) {
                    return Err(LvmError::NotAThinPool {
                        pool: subject,
                        group: vg.to_string(),
                        volumes: names,
                        group_is_ours: ours,
                    }
                    .into());
                }
                warn!(volume_group = %vg, volumes = %names,
                      "removing the half-made volumes of an interrupted provisioning");
                let mut args = vec!["--yes".to_string()];
                args.extend(leftovers.iter().map(|v| format!("{vg}/{}", v.name)));
                tool("remove half-made volumes", &subject, "lvremove", args)?;
            }
            create_pool(config)?;
            list_lvs(vg)?
                .into_iter()
                .find(|v| v.name == lv)
                .ok_or_else(|| PoolError::PoolMissing(format!("{vg}/{lv}")))?
        }
    };
    if !pool.active {
        changed = true;
        tool(
            "activate",
            &subject,
            "lvchange",
            ["--activate", "y", &format!("{vg}/{lv}")],
        )?;
        info!(pool = %subject.display(), "activated LVM thin pool");
    }
    let want = config.pool.block_size.as_u64();
    if pool.chunk_bytes != 0 && pool.chunk_bytes != want {
        warn!(pool = %subject.display(), existing = pool.chunk_bytes, configured = want,
              "pool.block_size differs from the existing pool's chunk size; the pool's own is used");
    }
    let profile = write_profile(l)?;
    if pool.profile != profile {
        tool(
            "apply the autoextend profile to",
            &subject,
            "lvchange",
            ["--metadataprofile", &profile, &format!("{vg}/{lv}")],
        )?;
        info!(pool = %subject.display(), profile = %profile, "applied LVM metadata profile");
    }
    // dmeventd does the autoextending; without it (no dmeventd, monitoring off) the pool still
    // works, it just does not grow.
    let monitored = if changed {
        list_lvs(vg)?
            .iter()
            .find(|v| v.name == lv)
            .is_some_and(|v| v.monitor == "monitored")
    } else {
        pool.monitor == "monitored"
    };
    if !monitored {
        match tool(
            "monitor",
            &subject,
            "lvchange",
            ["--monitor", "y", &format!("{vg}/{lv}")],
        ) {
            Ok(_) => info!(pool = %subject.display(), "dmeventd monitors the pool"),
            Err(e) => warn!(pool = %subject.display(), error = %e,
                            "cannot have dmeventd monitor the pool: it will not autoextend"),
        }
    }
    Ok(())
}

/// Makes sure the volume group, the thin pool and its autoextend profile exist on
/// `pool.lvm.device`, creating them if not, activates the pool, and returns the dm name of the
/// thin-pool device (`<vg>-<pool>`, or `<vg>-<pool>-tpool` when LVM layers it; dashes in the
/// names doubled).
///
/// Idempotent: after a restart or a reboot it only activates what exists. thinsnap must never
/// send `set_transaction_id` to the pool this returns: LVM owns its transaction id (see the
/// module documentation).
///
/// Returns an error naming the device or volume group if the device is not a block device, holds
/// a signature (a filesystem, say) and `pool.lvm.force` is off, belongs to another volume group,
/// the volume group lives on other devices, the group holds volumes of the pool's names that are
/// not a thin pool, or an lvm2 tool fails (its stderr included).
pub fn provision(config: &Config) -> Result<String, PoolError> {
    let l = &config.pool.lvm;
    let device = l.device.as_deref().ok_or(LvmError::NoDevice)?;
    // Names: checked against LVM's rule when the configuration was loaded (config/pool.rs).
    let vg = l.volume_group.as_str();
    let rdev = block_device_number(device)?;
    let pvs = list_pvs(device)?;
    let this = pvs.iter().find(|p| same_device(&p.name, rdev));
    let tagged = match this {
        Some(pv) if pv.vg == vg => {
            debug!(device = %device.display(), volume_group = %vg, "found the volume group");
            pv.vg_tags.iter().any(|t| t == VG_TAG)
        }
        Some(pv) if !pv.vg.is_empty() => {
            return Err(LvmError::DeviceInOtherGroup {
                device: device.to_path_buf(),
                group: pv.vg.clone(),
                configured: vg.to_string(),
            }
            .into());
        }
        _ => {
            let elsewhere: Vec<&str> = pvs
                .iter()
                .filter(|p| p.vg == vg)
                .map(|p| p.name.as_str())
                .collect();
            if !elsewhere.is_empty() {
                return Err(LvmError::GroupOnOtherDevices {
                    device: device.to_path_buf(),
                    group: vg.to_string(),
                    devices: elsewhere.join(", "),
                }
                .into());
            }
            // An orphan physical volume counts as a signature like any other: wipefs lists it.
            make_pv(device, l.force)?;
            tool(
                "create volume group",
                Path::new(vg),
                "vgcreate",
                [
                    OsStr::new("--addtag"),
                    OsStr::new(VG_TAG),
                    OsStr::new(vg),
                    device.as_os_str(),
                ],
            )?;
            info!(device = %device.display(), volume_group = %vg, "created LVM volume group");
            true
        }
    };
    ensure_pool(config, tagged)?;
    let name = find_pool_device(vg, &l.thin_pool)?;
    info!(pool = %name, device = %device.display(), volume_group = %vg,
          "LVM thin pool ready");
    Ok(name)
}

/// The dm name of `vg/lv`'s device whose table is a thin-pool target.
fn find_pool_device(vg: &str, lv: &str) -> Result<String, PoolError> {
    let dm = open_dm()?;
    let candidates = pool_dm_candidates(vg, lv);
    for name in &candidates {
        if !device_exists(&dm, name)? {
            continue;
        }
        let table = table_of(&dm, name, true)?;
        if let [(_, _, target, _)] = table.as_slice() {
            if target == "thin-pool" {
                return Ok(name.clone());
            }
        }
        debug!(device = %name, "not the thin-pool target");
    }
    Err(PoolError::PoolMissing(format!(
        "{vg}/{lv} (no active dm device {} or {} with a thin-pool table after activation; is \
         it excluded by activation/volume_list in lvm.conf?)",
        candidates[0], candidates[1]
    )))
}
