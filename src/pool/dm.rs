//! The device-mapper implementation of [`ThinPool`]: thin messages, activation, status and
//! growing of one pool, through the `devicemapper` crate's `DM` handle; opening the pool the
//! configuration describes, and `pool destroy`. The ioctls themselves are in the private `ioctl`
//! module, loop files in [`super::loopback`], LVM provisioning in [`super::lvm`]; this module
//! must not grow its own copies of them. No process is spawned here except `thin_ls`.
//!
//! Device names: the pool is `<pool.name>`; thin device `N` is `<pool.name>-snap-N`. Nothing else
//! is ever named with that prefix, so recovery can tell ours from the rest.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use devicemapper::{
    DevId, Device, DmError, DmFlags, DmName, DmOptions, ThinPoolStatus, ThinPoolStatusSummary,
    ThinPoolTargetParams, ThinStatus, DM,
};
use nix::errno::Errno;
use tracing::{debug, info, warn};

use super::ioctl::{
    self, create_device, device_exists, device_info, dm_err, dm_name, errno_of, open_dm,
    remove_device, table_of, SECTOR,
};
use super::loopback::{self, LoopFiles};
use super::{lvm, PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};
use crate::config::{Config, PoolMode};

const META_BLOCK: u64 = 4096;

/// How long a thin delete waits out EBUSY while the kernel finishes removing the thin's dm
/// device by itself (see [`DmPool::closing_by_itself`]): after an unmount, a deferred removal
/// runs from a kernel work queue, and the pool counts the thin device open until its table is
/// destroyed. Bounded: then the EBUSY is the answer.
const DELETE_BUSY_RETRIES: u32 = 50;
const DELETE_BUSY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// A thin pool driven through device-mapper ioctls.
pub struct DmPool {
    dm: DM,
    name: String,
    prefix: String,
    mode: PoolMode,
    block_size: u64,
    loop_files: LoopFiles,
    /// The pool's major:minor, the first word of every thin table. Fixed while the pool device
    /// exists (growing reloads its table, the device stays), so it is read once, at open, instead
    /// of by a DM_DEV_STATUS on every activation.
    pool_dev: Device,
}

impl DmPool {
    /// Sets up the pool the configuration describes: in loop mode creates or reuses the sparse
    /// files, their loop devices and the `thin-pool` table; in existing mode adopts the named pool
    /// after checking its target type.
    ///
    /// Returns an error if device-mapper is missing, the pool cannot be made, or an existing device
    /// of that name is not a thin pool.
    pub fn open(config: &Config) -> Result<DmPool, PoolError> {
        let dm = open_dm()?;
        let name = match config.pool.mode {
            PoolMode::Lvm => lvm::provision(config)?,
            PoolMode::Loop | PoolMode::Existing => config.pool.name.clone(),
        };
        let mut loop_files = Vec::new();
        let exists = device_exists(&dm, &name)?;
        match config.pool.mode {
            PoolMode::Loop => {
                loop_files = loopback::provision(&dm, config, &name, exists)?;
            }
            PoolMode::Existing | PoolMode::Lvm => {
                if !exists {
                    return Err(PoolError::PoolMissing(name));
                }
            }
        }
        // Whatever made it, the device must be a thin pool; its table gives the block size.
        let table = table_of(&dm, &name, true)?;
        let (target, params) = match table.as_slice() {
            [(_, _, t, p)] => (t.clone(), p.clone()),
            _ => {
                return Err(PoolError::NotAThinPool {
                    name,
                    found: format!("{}-target", table.len()),
                })
            }
        };
        if target != "thin-pool" {
            return Err(PoolError::NotAThinPool {
                name,
                found: target,
            });
        }
        let params = ThinPoolTargetParams::from_str(&format!("thin-pool {params}"))
            .map_err(dm_err("parse table of", &name))?;
        let block_size = *params.data_block_size * SECTOR;
        if config.pool.mode == PoolMode::Loop && block_size != config.pool.block_size.as_u64() {
            warn!(pool = %name, existing = block_size, configured = config.pool.block_size.as_u64(),
                  "pool.block_size differs from the existing pool's; the pool's own is used");
        }
        if exists {
            info!(pool = %name, mode = %config.pool.mode, "using existing thin pool");
        }
        let pool_dev = device_info(&dm, &name)?
            .ok_or_else(|| PoolError::PoolMissing(name.clone()))?
            .device();
        let prefix = format!("{}-snap-", config.pool.name);
        resume_left_suspended(&dm, &name, config.pool.mode, &prefix)?;
        Ok(DmPool {
            pool_dev,
            dm,
            prefix,
            name,
            mode: config.pool.mode,
            block_size,
            loop_files,
        })
    }

    fn thin_name(&self, id: ThinId) -> String {
        format!("{}{id}", self.prefix)
    }

    fn message(&self, msg: &str) -> Result<(), DmError> {
        let name = DmName::new(&self.name).expect("pool name validated by config");
        ioctl::message(&self.dm, name, msg)
    }

    /// The thin ids in the pool's metadata, read by `thin_ls` from a metadata snapshot
    /// (reserved, read, released). `release_stale`: at start, a snapshot already held is one a
    /// killed thinsnap left and is released first; while serving (`false`) it is someone else's
    /// and the answer is [`PoolError::Busy`].
    ///
    /// Returns ThinLsMissing without thin_ls, Busy as said, or the failing step's error.
    fn thin_ls(
        &self,
        release_stale: bool,
    ) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        let table = table_of(&self.dm, &self.name, true)?;
        let Some((_, _, _, params)) = table.first() else {
            return Err(PoolError::PoolMissing(self.name.clone()));
        };
        let params = ThinPoolTargetParams::from_str(&format!("thin-pool {params}"))
            .map_err(dm_err("parse table of", &self.name))?;
        let meta = params.metadata_dev;
        // The metadata device's node, from sysfs (udev's /dev/block links may not exist).
        let uevent = format!("/sys/dev/block/{}:{}/uevent", meta.major, meta.minor);
        let devname = std::fs::read_to_string(&uevent)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("DEVNAME=").map(|n| format!("/dev/{n}")))
            })
            .ok_or_else(|| PoolError::Io {
                op: "find the metadata device in",
                path: PathBuf::from(&uevent),
                source: std::io::Error::other("no DEVNAME"),
            })?;
        // thin-provisioning.rst: a live pool's metadata may only be read through a snapshot.
        // The kernel holds one at most: a thinsnap killed (or a power loss) between reserve
        // and release left one behind, and every later reserve would fail with EBUSY. Release
        // the stale one first, rather than refusing every start from now on (start-up reads
        // the metadata before it serves; the audit while serving never releases one).
        if self.status()?.metadata_snapshot_held {
            if !release_stale {
                // While serving, a held snapshot is someone else's (an admin's thin_ls).
                return Err(PoolError::Busy(format!(
                    "the metadata snapshot of pool {}",
                    self.name
                )));
            }
            warn!(pool = %self.name, "releasing a metadata snapshot left reserved (a start killed during thin_ls)");
            self.message("release_metadata_snap")
                .map_err(dm_err("release_metadata_snap", &self.name))?;
        }
        self.message("reserve_metadata_snap").map_err(|e| {
            if !release_stale && errno_of(&e) == Some(Errno::EBUSY) {
                PoolError::Busy(format!("the metadata snapshot of pool {}", self.name))
            } else {
                dm_err("reserve_metadata_snap", &self.name)(e)
            }
        })?;
        crate::failpoint!("recovery:metadata-snap-held");
        let out = std::process::Command::new("thin_ls")
            .args(["--no-headers", "-m", "-o", "DEV", &devname])
            .output();
        if let Err(e) = self.message("release_metadata_snap") {
            warn!(pool = %self.name, error = %e, "cannot release the metadata snapshot");
        }
        let out = match out {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolError::ThinLsMissing(self.name.clone()))
            }
            Err(source) => {
                return Err(PoolError::Io {
                    op: "run thin_ls on",
                    path: PathBuf::from(devname),
                    source,
                })
            }
        };
        if !out.status.success() {
            return Err(PoolError::Io {
                op: "thin_ls",
                path: PathBuf::from(devname),
                source: std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect())
    }

    /// Whether an EBUSY from deleting thin id `id` is the kernel's own removal of its dm device
    /// still under way, which ends by itself: no dm device of that id exists (it is gone from
    /// the name table, its table is still being torn down, and the pool still counts the thin
    /// device open), or one exists with a deferred removal pending (a device committed while
    /// mounted, just unmounted). A device that exists without one holds the thin device open
    /// for real: the EBUSY is answered at once.
    ///
    /// Returns an error if the device's state cannot be read.
    fn closing_by_itself(&self, id: ThinId) -> Result<bool, PoolError> {
        Ok(match device_info(&self.dm, &self.thin_name(id))? {
            None => true,
            Some(info) => info.flags().contains(DmFlags::DM_DEFERRED_REMOVE),
        })
    }

    /// Maps a failed thin message to the error the engine can act on.
    fn message_err(&self, op: &'static str, id: ThinId, err: DmError) -> PoolError {
        match errno_of(&err) {
            Some(Errno::EEXIST) => PoolError::ThinExists(id),
            Some(Errno::ENODATA) | Some(Errno::ENOENT) => PoolError::ThinNotFound(id),
            Some(Errno::ENOSPC) => PoolError::NoSpace(self.name.clone()),
            // The kernel refuses every pool message in read-only (and fail) mode.
            Some(Errno::EOPNOTSUPP) => PoolError::ReadOnly(self.name.clone()),
            _ => PoolError::Dm {
                op,
                target: format!("thin id {id} in pool {}", self.name),
                source: err,
            },
        }
    }
}

impl ThinPool for DmPool {
    fn create_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.message(&format!("create_thin {id}"))
            .map_err(|e| self.message_err("create_thin", id, e))
    }

    fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<(), PoolError> {
        // thin-provisioning.rst: an active origin must be suspended while the snapshot is taken.
        let origin_name = self.thin_name(origin);
        let guard = if device_exists(&self.dm, &origin_name)? {
            Some(ioctl::suspend(&self.dm, &origin_name)?)
        } else {
            None
        };
        // On a failed message the guard resumes the origin as it drops.
        self.message(&format!("create_snap {id} {origin}"))
            .map_err(|e| match self.message_err("create_snap", id, e) {
                // The id is new; a missing device can only be the origin.
                PoolError::ThinNotFound(_) => PoolError::ThinNotFound(origin),
                other => other,
            })?;
        // The snapshot exists, but an origin left suspended would hang every reader of it: that
        // is a failed call (the engine undoes the snapshot), not a success.
        guard.map_or(Ok(()), ioctl::ResumeGuard::resume)
    }

    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        let mut attempt = 0;
        loop {
            let err = match self.message(&format!("delete {id}")) {
                Ok(()) => {
                    if attempt > 0 {
                        info!(pool = %self.name, thin_id = id, busy_answers = attempt,
                              "deleted thin device once the kernel had removed its dm device");
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            attempt += 1;
            if errno_of(&err) != Some(Errno::EBUSY)
                || attempt >= DELETE_BUSY_RETRIES
                || !self.closing_by_itself(id)?
            {
                return Err(self.message_err("delete", id, err));
            }
            debug!(pool = %self.name, thin_id = id, attempt,
                   "thin device still open in the pool while the kernel removes its dm device; waiting");
            std::thread::sleep(DELETE_BUSY_DELAY);
        }
    }

    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError> {
        let name = self.thin_name(id);
        let path = self.device_path(id);
        // One DM_DEV_STATUS tells both whether the device is already active (recovery, a retried
        // call) and, if it is, its device number for the node.
        if let Some(info) = device_info(&self.dm, &name)? {
            let flags = info.flags();
            if !flags.contains(DmFlags::DM_ACTIVE_PRESENT) {
                // Half made: a thinsnap killed between the device's create and its resume. No
                // live table, so nothing can have it open: make it again.
                warn!(device = %name, "dm device without a live table; making it again");
                remove_device(&self.dm, &name)?;
            } else {
                if ioctl::is_suspended(&info) {
                    // Left suspended by a killed thinsnap: resume it (it may be mounted).
                    warn!(device = %name, "dm device left suspended; resuming it");
                    ioctl::resume(&self.dm, &name)?;
                }
                ioctl::ensure_node(&name, info.device());
                return Ok(path);
            }
        }
        create_device(
            &self.dm,
            &name,
            "thin",
            size_bytes / SECTOR,
            &format!("{} {id}", self.pool_dev),
        )
        .map_err(|e| match &e {
            // The thin target's constructor cannot open the thin id: the pool has no such
            // device (dm-thin's __open_device answers ENODATA). Recovery asks exactly this.
            PoolError::Dm { source, .. } if errno_of(source) == Some(Errno::ENODATA) => {
                PoolError::ThinNotFound(id)
            }
            _ => e,
        })?;
        Ok(path)
    }

    fn deactivate(&self, id: ThinId) -> Result<(), PoolError> {
        remove_device(&self.dm, &self.thin_name(id))
    }

    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError> {
        let name = self.thin_name(id);
        if !device_exists(&self.dm, &name)? {
            return Ok(());
        }
        // Without DM_SKIP_LOCKFS the suspend freezes the mounted filesystem: its dirty pages are
        // written to the device before the pool sees the suspend. Resumed at once.
        ioctl::suspend(&self.dm, &name)?.resume()?;
        let n = dm_name(&name)?;
        let devid = DevId::Name(&n);
        self.dm
            .device_remove(
                &devid,
                DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
            )
            .map_err(dm_err("deferred remove", &name))?;
        info!(device = %name, "still open: flushed, removal deferred to its last close");
        Ok(())
    }

    fn mapped_bytes(&self, id: ThinId) -> Result<u64, PoolError> {
        let name = self.thin_name(id);
        let lines = table_of(&self.dm, &name, false)?;
        let params = lines.first().map(|l| l.3.clone()).unwrap_or_default();
        match ThinStatus::from_str(&params).map_err(dm_err("parse status of", &name))? {
            ThinStatus::Working(w) => Ok(*w.nr_mapped_sectors * SECTOR),
            other => Err(PoolError::PoolFailed {
                name,
                status: format!("{other:?}"),
            }),
        }
    }

    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError> {
        Ok(ioctl::list_names(&self.dm)?
            .iter()
            .filter_map(|n| n.strip_prefix(&self.prefix)?.parse().ok())
            .collect())
    }

    fn device_path(&self, id: ThinId) -> PathBuf {
        Path::new("/dev/mapper").join(self.thin_name(id))
    }

    fn status(&self) -> Result<PoolStatus, PoolError> {
        let lines = table_of(&self.dm, &self.name, false)?;
        let params = lines.first().map(|l| l.3.clone()).unwrap_or_default();
        let status =
            ThinPoolStatus::from_str(&params).map_err(dm_err("parse status of", &self.name))?;
        match status {
            ThinPoolStatus::Working(w) => Ok(PoolStatus {
                transaction_id: w.transaction_id,
                data_used_bytes: *w.usage.used_data * self.block_size,
                data_total_bytes: *w.usage.total_data * self.block_size,
                metadata_used_bytes: *w.usage.used_meta * META_BLOCK,
                metadata_total_bytes: *w.usage.total_meta * META_BLOCK,
                block_size_bytes: self.block_size,
                read_only: w.summary == ThinPoolStatusSummary::ReadOnly,
                out_of_data_space: w.summary == ThinPoolStatusSummary::OutOfSpace,
                needs_check: w.needs_check,
                error_if_no_space: w.no_space_policy == devicemapper::ThinPoolNoSpacePolicy::Error,
                metadata_snapshot_held: w.held_metadata_root.is_some(),
            }),
            other => Err(PoolError::PoolFailed {
                name: self.name.clone(),
                status: format!("{other:?}"),
            }),
        }
    }

    fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), PoolError> {
        self.message(&format!("set_transaction_id {old} {new}"))
            .map_err(dm_err("set_transaction_id", &self.name))
    }

    fn discard(&self, id: ThinId, size_bytes: u64) -> Result<(), PoolError> {
        let was_active = device_exists(&self.dm, &self.thin_name(id))?;
        let path = self.activate(id, size_bytes)?;
        let discarded = ioctl::discard_range(&path, size_bytes);
        if !was_active {
            self.deactivate(id)?;
        }
        discarded
    }

    fn list_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        self.thin_ls(true)
    }

    fn audit_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        self.thin_ls(false)
    }

    fn host_room(&self) -> Result<Option<super::HostRoom>, PoolError> {
        loopback::host_room(&self.loop_files)
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        if self.mode != PoolMode::Loop {
            return Err(PoolError::Unsupported(format!(
                "pool {} is in {} mode: thinsnap grows loop pools only; grow it with its own tools (lvextend)",
                self.name, self.mode
            )));
        }
        let len = loopback::grow(&self.loop_files, data_bytes, metadata_bytes)?;
        let sectors = len / self.block_size * self.block_size / SECTOR;
        let table = table_of(&self.dm, &self.name, true)?;
        let Some((_, old, target, params)) = table.first().cloned() else {
            return Err(PoolError::PoolMissing(self.name.clone()));
        };
        if sectors == old && metadata_bytes.is_none() {
            return Ok(());
        }
        // Reload the same table with the new length; the kernel also notices a larger metadata
        // device when the pool resumes (thin-provisioning.rst, "Resizing the metadata device").
        let n = dm_name(&self.name)?;
        let id = DevId::Name(&n);
        self.dm
            .table_load(&id, &[(0, sectors, target, params)], DmOptions::default())
            .map_err(dm_err("load table of", &self.name))?;
        // Suspended and resumed at once: the resume makes the new table live. A failed resume
        // is an error: the pool would stay suspended, every thin device's I/O blocked.
        let suspended = ioctl::suspend(&self.dm, &self.name)?;
        crate::failpoint!("grow:pool-suspended");
        suspended.resume()?;
        info!(pool = %self.name, data_bytes = sectors * SECTOR, "reloaded pool table");
        Ok(())
    }

    fn info(&self) -> PoolInfo {
        PoolInfo {
            name: self.name.clone(),
            mode: self.mode.to_string(),
            loop_files: self.loop_files.clone(),
        }
    }
}

/// Resumes thinsnap's devices that a killed process left suspended: a thinsnap killed between
/// the suspend and the resume of a pool grow, or of an origin's snapshot, leaves the device
/// suspended in the kernel, and every reader of it (a container, the next start) blocks. The
/// pool itself only in loop mode: in lvm and existing mode it is someone else's to suspend,
/// and a suspended pool there is reported, not touched.
///
/// Returns an error naming the device if one cannot be resumed.
fn resume_left_suspended(
    dm: &DM,
    pool: &str,
    mode: PoolMode,
    prefix: &str,
) -> Result<(), PoolError> {
    if device_info(dm, pool)?.is_some_and(|i| ioctl::is_suspended(&i)) {
        if mode == PoolMode::Loop {
            warn!(
                pool,
                "pool left suspended (a grow killed before its resume): resuming it"
            );
            ioctl::resume(dm, pool)?;
        } else {
            warn!(pool, %mode, "the pool is suspended; thin I/O blocks until its owner resumes it");
        }
    }
    for name in ioctl::list_names(dm)? {
        let ours = name
            .strip_prefix(prefix)
            .is_some_and(|id| id.parse::<ThinId>().is_ok());
        if ours && device_info(dm, &name)?.is_some_and(|i| ioctl::is_suspended(&i)) {
            warn!(device = %name, "thin device left suspended (a snapshot of it killed before its resume): resuming it");
            ioctl::resume(dm, &name)?;
        }
    }
    Ok(())
}

/// Checks that the kernel has device-mapper (opens its control device, one version ioctl): the
/// daemon refuses to start without it before it makes anything.
///
/// Returns NoDeviceMapper otherwise.
pub fn check_device_mapper() -> Result<(), PoolError> {
    open_dm().map(|_| ())
}

/// `thinsnap pool destroy`: removes every dm device with this pool's prefix; in existing mode
/// deletes `thin_ids` (the ones the store knows) from the pool, which stays; in loop mode removes
/// the pool and detaches its loop devices, and with `remove_files` deletes the sparse files.
///
/// Returns an error if device-mapper is missing or a device is busy.
pub fn destroy(config: &Config, thin_ids: &[ThinId], remove_files: bool) -> Result<(), PoolError> {
    let dm = open_dm()?;
    let name = &config.pool.name;
    let prefix = format!("{name}-snap-");
    let devices = dm.list_devices().map_err(dm_err("list devices", name))?;
    for (n, _, _) in &devices {
        let n = n.to_string();
        if n.strip_prefix(&prefix)
            .is_some_and(|id| id.parse::<ThinId>().is_ok())
        {
            remove_device(&dm, &n)?;
            info!(device = %n, "removed dm device");
        }
    }
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
    let exists = device_exists(&dm, &pool_dev)?;
    match config.pool.mode {
        PoolMode::Existing | PoolMode::Lvm => {
            if exists {
                let n = dm_name(&pool_dev)?;
                for id in thin_ids {
                    match ioctl::message(&dm, &n, &format!("delete {id}")) {
                        Ok(()) => info!(pool = %name, thin_id = id, "deleted thin device"),
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
                remove_device(&dm, name)?;
                info!(pool = %name, "removed thin pool");
            }
            loopback::release(&config.pool_dir(), remove_files)?;
        }
    }
    Ok(())
}
