//! The device-mapper ioctls every part of the pool layer shares, as small functions over the
//! `devicemapper` crate's `DM` handle: opening the control device, looking a device up by name,
//! reading its table or status, creating and removing a one-target device (its /dev/mapper node
//! included), target messages, a suspend paired with a resume guard, and BLKDISCARD.
//!
//! A leaf: it imports no other pool module, knows nothing of thin ids, dm name prefixes, loop
//! files or LVM, and must not learn them. No process is spawned here; every call blocks.

use std::path::{Path, PathBuf};

use devicemapper::{
    errors, DevId, Device, DeviceInfo, DmError, DmFlags, DmName, DmNameBuf, DmOptions, DmUuidBuf,
    DM,
};
use nix::errno::Errno;
use tracing::{debug, warn};

use super::PoolError;

/// The unit of dm table lengths.
pub const SECTOR: u64 = 512;

/// What udev does with a device's events. The flags ride in each uevent's cookie (the crate
/// waits for udev's rules to finish with it where udev runs), and udev's dm rules keep them in
/// its database for the device's later events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Udev {
    /// Every rule, as for a disk: the thin pool, which an admin may look at as any device.
    Disk,
    /// A private device, as LVM has its internal ones (`DmOptions::private()`): udev makes
    /// `/dev/mapper/NAME` and skips the disk rules (no `blkid` probe of each new device, no
    /// `by-uuid` link, which every snapshot of one filesystem would claim at once, no inotify
    /// watch that probes it again after each close for writing) and the subsystem and other
    /// rules (systemd makes no `.device` unit of it). The thin devices: nothing but thinsnap and
    /// the mounts it hands out reads them. No speed-up is claimed (benches/NOTES.md: two runs
    /// of the floor both ways disagree): what a resume waits for in the test VM is mostly
    /// udev's dm rules, which run for every device.
    Private,
}

impl Udev {
    /// The options of an ioctl on such a device, with `flags`.
    pub fn options(self, flags: DmFlags) -> DmOptions {
        match self {
            Udev::Disk => DmOptions::default(),
            Udev::Private => DmOptions::private(),
        }
        .set_flags(flags)
    }
}

// BLKDISCARD = _IO(0x12, 119), argument: u64[2] {start, length} in bytes.
nix::ioctl_write_ptr_bad!(blk_discard, 0x1277, [u64; 2]);

/// One line of a dm table or status: start, length (sectors), target type, parameters.
pub type TableLine = (u64, u64, String, String);

/// The errno behind a devicemapper ioctl error, if it is one.
pub fn errno_of(err: &DmError) -> Option<Errno> {
    match err {
        // The crate's nix may be another version than ours: go through the raw number.
        DmError::Core(errors::Error::Ioctl(_, _, _, errno)) => {
            Some(Errno::from_raw(**errno as i32))
        }
        _ => None,
    }
}

/// Wraps a devicemapper error into [`PoolError::Dm`] naming `op` and `target`.
pub fn dm_err(op: &'static str, target: impl Into<String>) -> impl FnOnce(DmError) -> PoolError {
    let target = target.into();
    move |source| PoolError::Dm { op, target, source }
}

/// `name` as a dm name.
///
/// Returns [`PoolError::Dm`] if it is not one (too long, a `/` in it).
pub fn dm_name(name: &str) -> Result<DmNameBuf, PoolError> {
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

/// The dm device called `name` (one DM_DEV_STATUS), or None if there is none.
///
/// Returns an error if `name` is not a dm name or the ioctl fails otherwise.
pub fn device_info(dm: &DM, name: &str) -> Result<Option<DeviceInfo>, PoolError> {
    let n = dm_name(name)?;
    match dm.device_info(&DevId::Name(&n)) {
        Ok(info) => Ok(Some(info)),
        Err(e) if errno_of(&e) == Some(Errno::ENXIO) => Ok(None),
        Err(e) => Err(dm_err("info", name)(e)),
    }
}

/// Whether a dm device called `name` exists.
///
/// Returns an error if `name` is not a dm name or the ioctl fails otherwise.
pub fn device_exists(dm: &DM, name: &str) -> Result<bool, PoolError> {
    Ok(device_info(dm, name)?.is_some())
}

/// The table (`table`) or the status (`!table`, read without flushing) of dm device `name`.
///
/// Returns an error if the device does not exist or the ioctl fails.
pub fn table_of(dm: &DM, name: &str, table: bool) -> Result<Vec<TableLine>, PoolError> {
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

/// Sends target message `msg` to dm device `name` (thin-provisioning.rst, "Pool messages").
pub fn message(dm: &DM, name: &DmName, msg: &str) -> Result<(), DmError> {
    dm.target_msg(&DevId::Name(name), None, msg).map(|_| ())
}

/// `uuid` as a dm uuid.
///
/// Returns [`PoolError::Dm`] if it is not one (too long, say).
pub fn dm_uuid(uuid: &str) -> Result<DmUuidBuf, PoolError> {
    DmUuidBuf::new(uuid.to_string()).map_err(dm_err("uuid", uuid))
}

/// The dm uuid of device `info`, if it has one.
pub fn uuid_of(info: &DeviceInfo) -> Option<String> {
    info.uuid().map(|u| u.to_string()).filter(|u| !u.is_empty())
}

/// Gives dm device `name`, which has none, the dm uuid `uuid` (the kernel sets a uuid once).
///
/// Returns an error if the ioctl fails (the device has a uuid already, say).
pub fn set_uuid(dm: &DM, name: &str, uuid: &str) -> Result<(), PoolError> {
    let n = dm_name(name)?;
    let u = dm_uuid(uuid)?;
    dm.device_rename(&n, &DevId::Uuid(&u))
        .map(|_| ())
        .map_err(dm_err("set the uuid of", name))
}

/// Creates dm device `name` (with dm uuid `uuid`) with one target, loads its table and resumes
/// it; a device left half made is removed again.
///
/// Returns an error if a step fails (the device exists already, say).
pub fn create_device(
    dm: &DM,
    name: &str,
    uuid: &str,
    target: &str,
    sectors: u64,
    params: &str,
    udev: Udev,
) -> Result<Device, PoolError> {
    let n = dm_name(name)?;
    let u = dm_uuid(uuid)?;
    let opts = udev.options(DmFlags::empty());
    let info = dm
        .device_create(&n, Some(&u), opts)
        .map_err(dm_err("create", name))?;
    // Killed here, the device exists with no table (tests/vm_lazy.rs): the next activate
    // must make it again.
    crate::failpoint!("dm:after-device-create");
    let id = DevId::Name(&n);
    let table = vec![(0u64, sectors, target.to_string(), params.to_string())];
    let loaded = dm
        .table_load(&id, &table, opts)
        .map_err(dm_err("load table of", name))
        .and_then(|_| dm.device_suspend(&id, opts).map_err(dm_err("resume", name)));
    if let Err(e) = loaded {
        if let Err(e2) = dm.device_remove(&id, opts) {
            warn!(device = %name, error = %e2, "cannot remove half-made dm device");
        }
        return Err(e);
    }
    let dev = info.device();
    ensure_node(name, dev);
    Ok(dev)
}

/// How long a removal waits out a device that is open but not mounted: where udev runs its disk
/// rules on a dm device ([`Udev::Disk`], or a device made before thinsnap made them private), its
/// `blkid` opens the device for a moment after anything closes it for writing (mkfs, a discard,
/// resize2fs, an unmount), and the removal must not fail for that. LVM does the same (`activation/retry_deactivation`).
const BUSY_RETRIES: u32 = 30;
const BUSY_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Removes dm device `name`; nothing to do if it does not exist. A device that is mounted (in
/// this mount namespace) is refused at once; one that is only open is waited for a few seconds.
///
/// Returns [`PoolError::Busy`] if it stays open, or an error if an ioctl fails.
pub fn remove_device(dm: &DM, name: &str, udev: Udev) -> Result<(), PoolError> {
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
            Ok(info) => match dm.device_remove(&id, udev.options(DmFlags::empty())) {
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
pub fn ensure_node(name: &str, dev: Device) {
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

/// Resumes a suspended device: explicitly with [`ResumeGuard::resume`], which says whether it
/// worked, or, on a path that returns early (the crate's own `ThinDev::snapshot` leaves the
/// origin suspended when the message fails), when dropped, where a failure can only be logged.
pub struct ResumeGuard<'a> {
    dm: &'a DM,
    udev: Udev,
    /// `None` once resumed.
    name: Option<DmNameBuf>,
}

impl ResumeGuard<'_> {
    /// Resumes the device now.
    ///
    /// Returns an error naming the device if the resume fails: it is then still suspended (I/O
    /// to it blocks until it is resumed), so the caller must not report success. The next start
    /// resumes it ([`resume`]) if nothing else does first.
    pub fn resume(mut self) -> Result<(), PoolError> {
        match self.name.take() {
            Some(name) => resume_name(self.dm, &name, self.udev),
            None => Ok(()),
        }
    }
}

impl Drop for ResumeGuard<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            if let Err(e) = resume_name(self.dm, &name, self.udev) {
                warn!(device = %name.to_string(), error = %e, "cannot resume device: left suspended");
            }
        }
    }
}

fn resume_name(dm: &DM, name: &DmName, udev: Udev) -> Result<(), PoolError> {
    dm.device_suspend(&DevId::Name(name), udev.options(DmFlags::empty()))
        .map(|_| ())
        .map_err(dm_err("resume", name.to_string()))
}

/// Resumes dm device `name` (a suspend left behind by a process killed before its resume).
///
/// Returns an error naming the device if the resume fails.
pub fn resume(dm: &DM, name: &str, udev: Udev) -> Result<(), PoolError> {
    resume_name(dm, &dm_name(name)?, udev)
}

/// Whether the device `info` describes is suspended.
pub fn is_suspended(info: &DeviceInfo) -> bool {
    info.flags().contains(DmFlags::DM_SUSPEND)
}

/// The names of every dm device on the system.
///
/// Returns an error if the list ioctl fails.
pub fn list_names(dm: &DM) -> Result<Vec<String>, PoolError> {
    Ok(dm
        .list_devices()
        .map_err(dm_err("list", "dm devices"))?
        .into_iter()
        .map(|(name, _, _)| name.to_string())
        .collect())
}

/// Suspends dm device `name` (without DM_SKIP_LOCKFS: a filesystem mounted on it is frozen, its
/// dirty pages written first) and returns the guard that resumes it.
///
/// Returns an error if the suspend fails; nothing is then left suspended.
pub fn suspend<'a>(dm: &'a DM, name: &str, udev: Udev) -> Result<ResumeGuard<'a>, PoolError> {
    let n = dm_name(name)?;
    dm.device_suspend(&DevId::Name(&n), udev.options(DmFlags::DM_SUSPEND))
        .map_err(dm_err("suspend", name))?;
    Ok(ResumeGuard {
        dm,
        udev,
        name: Some(n),
    })
}

/// Discards bytes `0..size_bytes` of the block device at `path` (BLKDISCARD).
///
/// Returns [`PoolError::Io`] if the device cannot be opened or the ioctl fails.
pub fn discard_range(path: &Path, size_bytes: u64) -> Result<(), PoolError> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
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
            path: path.to_path_buf(),
            source,
        })
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
