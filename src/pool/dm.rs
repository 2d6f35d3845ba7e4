//! The device-mapper implementation of [`ThinPool`]: ioctls through the `devicemapper` crate's
//! `DM` handle (device create, table load, suspend/resume, target messages, status). No process is
//! spawned here.
//!
//! Device names: the pool is `<pool.name>`; thin device `N` is `<pool.name>-snap-N`. Nothing else
//! is ever named with that prefix, so recovery can tell ours from the rest.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use devicemapper::{
    errors, DevId, Device, DeviceInfo, DmError, DmFlags, DmName, DmNameBuf, DmOptions,
    ThinPoolStatus, ThinPoolStatusSummary, ThinPoolTargetParams, ThinStatus, DM,
};
use nix::errno::Errno;
use tracing::{debug, info, warn};

use super::{loopback, lvm, PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};
use crate::config::{Config, PoolMode};

const SECTOR: u64 = 512;

// BLKDISCARD = _IO(0x12, 119), argument: u64[2] {start, length} in bytes.
nix::ioctl_write_ptr_bad!(blk_discard, 0x1277, [u64; 2]);
const META_BLOCK: u64 = 4096;

/// A thin pool driven through device-mapper ioctls.
pub struct DmPool {
    dm: DM,
    name: String,
    prefix: String,
    mode: PoolMode,
    block_size: u64,
    loop_files: Vec<(String, PathBuf, PathBuf)>,
    /// The pool's major:minor, the first word of every thin table. Fixed while the pool device
    /// exists (growing reloads its table, the device stays), so it is read once, at open, instead
    /// of by a DM_DEV_STATUS on every activation.
    pool_dev: Device,
}

/// The errno behind a devicemapper ioctl error, if it is one.
fn errno_of(err: &DmError) -> Option<Errno> {
    match err {
        // The crate's nix may be another version than ours: go through the raw number.
        DmError::Core(errors::Error::Ioctl(_, _, _, errno)) => {
            Some(Errno::from_raw(**errno as i32))
        }
        _ => None,
    }
}

fn dm_err(op: &'static str, target: impl Into<String>) -> impl FnOnce(DmError) -> PoolError {
    let target = target.into();
    move |source| PoolError::Dm { op, target, source }
}

fn dm_name(name: &str) -> Result<DmNameBuf, PoolError> {
    DmNameBuf::new(name.to_string()).map_err(dm_err("name", name))
}

/// Opens the device-mapper control device.
///
/// Returns [`PoolError::NoDeviceMapper`] if the kernel has no device-mapper.
pub fn open_dm() -> Result<DM, PoolError> {
    if !Path::new("/dev/mapper/control").exists() {
        let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
        if !misc.contains("device-mapper") {
            return Err(PoolError::NoDeviceMapper(
                "no device-mapper in /proc/misc, no /dev/mapper/control".to_string(),
            ));
        }
    }
    DM::new().map_err(|e| PoolError::NoDeviceMapper(e.to_string()))
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
                let dir = config.pool_dir();
                std::fs::create_dir_all(&dir).map_err(|source| PoolError::Io {
                    op: "create",
                    path: dir.clone(),
                    source,
                })?;
                let data_file = dir.join("data");
                let meta_file = dir.join("metadata");
                let block = config.pool.block_size.as_u64();
                let data_len =
                    loopback::ensure_sparse_file(&data_file, config.pool.data_size.as_u64())?;
                loopback::ensure_sparse_file(&meta_file, config.pool.metadata_size.as_u64())?;
                let data_dev = loopback::attach(&data_file)?;
                let meta_dev = loopback::attach(&meta_file)?;
                loop_files.push(("data".to_string(), data_file, data_dev.clone()));
                loop_files.push(("metadata".to_string(), meta_file, meta_dev.clone()));
                if !exists {
                    let data_sectors = data_len / block * block / SECTOR;
                    let block_sectors = block / SECTOR;
                    let blocks = data_sectors / block_sectors;
                    // Ask for an event when 1% (at least one block) of the data space is left.
                    let low_water = (blocks / 100).max(1);
                    let features = if config.pool.zero_blocks {
                        "0".to_string()
                    } else {
                        "1 skip_block_zeroing".to_string()
                    };
                    let params = format!(
                        "{} {} {block_sectors} {low_water} {features}",
                        meta_dev.display(),
                        data_dev.display()
                    );
                    create_device(&dm, &name, "thin-pool", data_sectors, &params)?;
                    info!(pool = %name, data = %data_dev.display(), metadata = %meta_dev.display(),
                          data_bytes = data_sectors * SECTOR, block_bytes = block, "created thin pool");
                }
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
        Ok(DmPool {
            pool_dev,
            dm,
            prefix: format!("{}-snap-", config.pool.name),
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
        self.dm
            .target_msg(&DevId::Name(name), None, msg)
            .map(|_| ())
    }

    /// Maps a failed thin message to the error the engine can act on.
    fn message_err(&self, op: &'static str, id: ThinId, err: DmError) -> PoolError {
        match errno_of(&err) {
            Some(Errno::EEXIST) => PoolError::ThinExists(id),
            Some(Errno::ENODATA) | Some(Errno::ENOENT) => PoolError::ThinNotFound(id),
            Some(Errno::ENOSPC) => PoolError::NoSpace(self.name.clone()),
            _ => PoolError::Dm {
                op,
                target: format!("thin id {id} in pool {}", self.name),
                source: err,
            },
        }
    }

    /// Removes every dm device with this pool's prefix, then (loop mode) the pool itself and
    /// its loop devices. Thin devices stay in the pool's metadata.
    ///
    /// Returns an error if a device is busy or cannot be removed.
    pub fn teardown(&self, remove_pool: bool) -> Result<(), PoolError> {
        for id in self.active_ids()? {
            self.deactivate(id)?;
        }
        if remove_pool {
            remove_device(&self.dm, &self.name)?;
            info!(pool = %self.name, "removed thin pool device");
            for (_, file, _) in &self.loop_files {
                loopback::detach(file)?;
            }
        }
        Ok(())
    }

    /// The dm name of the base device's temporary activation, and of every thin device.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The dm device called `name` (one DM_DEV_STATUS), or None if there is none.
fn device_info(dm: &DM, name: &str) -> Result<Option<DeviceInfo>, PoolError> {
    let n = dm_name(name)?;
    match dm.device_info(&DevId::Name(&n)) {
        Ok(info) => Ok(Some(info)),
        Err(e) if errno_of(&e) == Some(Errno::ENXIO) => Ok(None),
        Err(e) => Err(dm_err("info", name)(e)),
    }
}

/// Whether a dm device called `name` exists.
pub fn device_exists(dm: &DM, name: &str) -> Result<bool, PoolError> {
    Ok(device_info(dm, name)?.is_some())
}

fn table_of(
    dm: &DM,
    name: &str,
    table: bool,
) -> Result<Vec<(u64, u64, String, String)>, PoolError> {
    let n = dm_name(name)?;
    let opts = if table {
        DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE)
    } else {
        // Status without flushing: never block on a pool that is out of space.
        DmOptions::default().set_flags(DmFlags::DM_NOFLUSH)
    };
    let (_, lines) = dm
        .table_status(&DevId::Name(&n), opts)
        .map_err(dm_err(if table { "table" } else { "status" }, name))?;
    Ok(lines)
}

/// Creates dm device `name` with one target, loads its table and resumes it; a device left half
/// made is removed again.
fn create_device(
    dm: &DM,
    name: &str,
    target: &str,
    sectors: u64,
    params: &str,
) -> Result<Device, PoolError> {
    let n = dm_name(name)?;
    let info = dm
        .device_create(&n, None, DmOptions::default())
        .map_err(dm_err("create", name))?;
    let id = DevId::Name(&n);
    let table = vec![(0u64, sectors, target.to_string(), params.to_string())];
    let loaded = dm
        .table_load(&id, &table, DmOptions::default())
        .map_err(dm_err("load table of", name))
        .and_then(|_| {
            dm.device_suspend(&id, DmOptions::default())
                .map_err(dm_err("resume", name))
        });
    if let Err(e) = loaded {
        if let Err(e2) = dm.device_remove(&id, DmOptions::default()) {
            warn!(device = %name, error = %e2, "cannot remove half-made dm device");
        }
        return Err(e);
    }
    let dev = info.device();
    ensure_node(name, dev);
    Ok(dev)
}

/// How long a removal waits out a device that is open but not mounted: udev's `blkid` opens a
/// dm device for a moment after anything closes it for writing (mkfs, a discard, resize2fs), and
/// the removal must not fail for that. LVM does the same (`activation/retry_deactivation`).
const BUSY_RETRIES: u32 = 30;
const BUSY_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Removes dm device `name`; nothing to do if it does not exist. A device that is mounted (in
/// this mount namespace) is refused at once; one that is only open is waited for a few seconds.
fn remove_device(dm: &DM, name: &str) -> Result<(), PoolError> {
    let n = dm_name(name)?;
    let id = DevId::Name(&n);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let busy = match dm.device_info(&id) {
            Err(e) if errno_of(&e) == Some(Errno::ENXIO) => {
                remove_node(name);
                return Ok(());
            }
            Err(e) => return Err(dm_err("info", name)(e)),
            Ok(info) if info.open_count() > 0 => Some(info.device()),
            Ok(info) => match dm.device_remove(&id, DmOptions::default()) {
                Ok(_) => break,
                Err(e) if errno_of(&e) == Some(Errno::ENXIO) => break,
                Err(e) if errno_of(&e) == Some(Errno::EBUSY) => Some(info.device()),
                Err(e) => return Err(dm_err("remove", name)(e)),
            },
        };
        if let Some(dev) = busy {
            if let Some(at) = mount_point_of(dev) {
                return Err(PoolError::Busy(format!(
                    "{name} (mounted at {})",
                    at.display()
                )));
            }
            if attempt >= BUSY_RETRIES {
                return Err(PoolError::Busy(name.to_string()));
            }
            debug!(device = %name, attempt, "dm device is open; waiting for it to be closed");
            std::thread::sleep(BUSY_RETRY_DELAY);
        }
    }
    remove_node(name);
    Ok(())
}

/// Where block device `dev` is mounted in this process's mount namespace, if it is.
fn mount_point_of(dev: Device) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find_mount_point(&text, dev.major, dev.minor)
}

/// Finds the mount point of `major:minor` in the text of a `/proc/<pid>/mountinfo` file (field 3
/// is the device number, field 5 the mount point, with spaces written as `\040`).
fn find_mount_point(mountinfo: &str, major: u32, minor: u32) -> Option<PathBuf> {
    let want = format!("{major}:{minor}");
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let devno = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        (devno == want).then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// Makes sure `/dev/mapper/<name>` exists. udev makes it where udev runs; where it does not (a
/// minimal VM, a container), the node is made here, as libdevmapper does without udev.
fn ensure_node(name: &str, dev: Device) {
    let path = Path::new("/dev/mapper").join(name);
    if path.exists() {
        return;
    }
    let devno = nix::sys::stat::makedev(dev.major.into(), dev.minor.into());
    match nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        devno,
    ) {
        Ok(()) | Err(Errno::EEXIST) => debug!(device = %name, "made device node"),
        Err(e) => warn!(device = %name, error = %e, "cannot make device node"),
    }
}

fn remove_node(name: &str) {
    let path = Path::new("/dev/mapper").join(name);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_block_device() || meta.file_type().is_symlink() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Resumes a suspended device when dropped, on every path (the crate's own
/// `ThinDev::snapshot` leaves the origin suspended when the message fails).
struct ResumeGuard<'a> {
    dm: &'a DM,
    name: DmNameBuf,
}

impl Drop for ResumeGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .dm
            .device_suspend(&DevId::Name(&self.name), DmOptions::default())
        {
            warn!(device = %self.name.to_string(), error = %e, "cannot resume device");
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
        let _guard = if device_exists(&self.dm, &origin_name)? {
            let n = dm_name(&origin_name)?;
            self.dm
                .device_suspend(
                    &DevId::Name(&n),
                    DmOptions::default().set_flags(DmFlags::DM_SUSPEND),
                )
                .map_err(dm_err("suspend", &origin_name))?;
            Some(ResumeGuard {
                dm: &self.dm,
                name: n,
            })
        } else {
            None
        };
        self.message(&format!("create_snap {id} {origin}"))
            .map_err(|e| match self.message_err("create_snap", id, e) {
                // The id is new; a missing device can only be the origin.
                PoolError::ThinNotFound(_) => PoolError::ThinNotFound(origin),
                other => other,
            })
    }

    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.message(&format!("delete {id}"))
            .map_err(|e| self.message_err("delete", id, e))
    }

    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError> {
        let name = self.thin_name(id);
        let path = self.device_path(id);
        // One DM_DEV_STATUS tells both whether the device is already active (recovery, a retried
        // call) and, if it is, its device number for the node.
        if let Some(info) = device_info(&self.dm, &name)? {
            ensure_node(&name, info.device());
            return Ok(path);
        }
        create_device(
            &self.dm,
            &name,
            "thin",
            size_bytes / SECTOR,
            &format!("{} {id}", self.pool_dev),
        )?;
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
        let n = dm_name(&name)?;
        let devid = DevId::Name(&n);
        // Without DM_SKIP_LOCKFS the suspend freezes the mounted filesystem: its dirty pages are
        // written to the device before the pool sees the suspend.
        self.dm
            .device_suspend(&devid, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(dm_err("suspend", &name))?;
        {
            let _resume = ResumeGuard {
                dm: &self.dm,
                name: n.clone(),
            };
        }
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
        let devices = self
            .dm
            .list_devices()
            .map_err(dm_err("list devices", &self.name))?;
        Ok(devices
            .iter()
            .filter_map(|(n, _, _)| n.to_string().strip_prefix(&self.prefix)?.parse().ok())
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
        use std::os::fd::AsRawFd;
        let was_active = device_exists(&self.dm, &self.thin_name(id))?;
        let path = self.activate(id, size_bytes)?;
        let discarded = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| {
                let range: [u64; 2] = [0, size_bytes];
                // SAFETY: BLKDISCARD reads two u64s (start, length) from the pointer, which
                // points at `range`, alive for the call.
                unsafe { blk_discard(f.as_raw_fd(), &range) }
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            })
            .map_err(|source| PoolError::Io {
                op: "discard",
                path: path.clone(),
                source,
            });
        if !was_active {
            self.deactivate(id)?;
        }
        discarded
    }

    fn list_thin_ids(&self) -> Result<Option<std::collections::BTreeSet<ThinId>>, PoolError> {
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
        self.message("reserve_metadata_snap")
            .map_err(dm_err("reserve_metadata_snap", &self.name))?;
        let out = std::process::Command::new("thin_ls")
            .args(["--no-headers", "-m", "-o", "DEV", &devname])
            .output();
        if let Err(e) = self.message("release_metadata_snap") {
            warn!(pool = %self.name, error = %e, "cannot release the metadata snapshot");
        }
        let out = match out {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
        Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect(),
        ))
    }

    fn host_room(&self) -> Result<Option<u64>, PoolError> {
        use std::os::unix::fs::MetadataExt;
        let Some((_, data_file, _)) = self.loop_files.first() else {
            return Ok(None);
        };
        let dir = data_file.parent().unwrap_or(Path::new("/"));
        let fs = nix::sys::statvfs::statvfs(dir).map_err(|e| PoolError::Io {
            op: "statvfs",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
        // Bytes the sparse files may still take as the pool writes into them.
        let mut promised = 0u64;
        for (_, file, _) in &self.loop_files {
            let m = std::fs::metadata(file).map_err(|source| PoolError::Io {
                op: "stat",
                path: file.clone(),
                source,
            })?;
            promised += m.len().saturating_sub(m.blocks() * 512);
        }
        Ok(Some(free.saturating_sub(promised)))
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        if self.mode != PoolMode::Loop {
            return Err(PoolError::Unsupported(format!(
                "pool {} is in {} mode: thinsnap grows loop pools only; grow it with its own tools (lvextend)",
                self.name, self.mode
            )));
        }
        let mut data_file = None;
        for (role, file, dev) in &self.loop_files {
            let want = if role == "data" {
                data_bytes
            } else {
                metadata_bytes
            };
            if role == "data" {
                data_file = Some(file.clone());
            }
            let Some(want) = want else { continue };
            let cur = std::fs::metadata(file)
                .map_err(|source| PoolError::Io {
                    op: "stat",
                    path: file.clone(),
                    source,
                })?
                .len();
            if want < cur {
                return Err(PoolError::Invalid(format!(
                    "{role} size {want} is smaller than the current {cur} of {}: pools only grow",
                    file.display()
                )));
            }
            if want > cur {
                loopback::ensure_sparse_file(file, want)?;
                loopback::refresh_capacity(dev)?;
                info!(file = %file.display(), device = %dev.display(), from = cur, to = want, "grew pool file");
            }
        }
        let data_file = data_file.expect("loop pools have a data file");
        let len = std::fs::metadata(&data_file)
            .map_err(|source| PoolError::Io {
                op: "stat",
                path: data_file.clone(),
                source,
            })?
            .len();
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
        self.dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(dm_err("suspend", &self.name))?;
        // Resumes here, and on every path out of this block.
        {
            let _resume = ResumeGuard {
                dm: &self.dm,
                name: n.clone(),
            };
        }
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
                    match dm.target_msg(&DevId::Name(&n), None, &format!("delete {id}")) {
                        Ok(_) => info!(pool = %name, thin_id = id, "deleted thin device"),
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
            let dir = config.pool_dir();
            for file in [dir.join("data"), dir.join("metadata")] {
                loopback::detach(&file)?;
                if remove_files {
                    match std::fs::remove_file(&file) {
                        Ok(()) => info!(file = %file.display(), "removed pool file"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(PoolError::Io {
                                op: "remove",
                                path: file,
                                source,
                            })
                        }
                    }
                }
            }
            if remove_files {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::find_mount_point;
    use std::path::PathBuf;

    #[test]
    fn mount_point_is_found_by_device_number() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    97 22 253:4 / /run/con\\040tainerd/x rw,relatime shared:50 - ext4 /dev/mapper/p-snap-4 rw\n";
        assert_eq!(
            find_mount_point(text, 253, 4),
            Some(PathBuf::from("/run/con tainerd/x"))
        );
        assert_eq!(find_mount_point(text, 8, 1), Some(PathBuf::from("/")));
        assert_eq!(find_mount_point(text, 253, 40), None);
        assert_eq!(find_mount_point("", 253, 4), None);
    }
}
