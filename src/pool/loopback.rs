//! Loop mode's backing store: sparse files attached to loop devices (Docker's loop-lvm layout),
//! and the loop pool made of them: its `thin-pool` device created at first start, its files and
//! loop devices grown online, the host room left for them, their release at `pool destroy`.
//!
//! After a restart the loop devices may still be attached: they are found through sysfs
//! (`/sys/block/loopN/loop/backing_file`) and reused, never attached twice. Attaching uses the
//! `loopdev-3` crate (LOOP_CTL_GET_FREE + LOOP_CONFIGURE); nothing here spawns `losetup`.
//! This module must not touch thin devices or the pool's table beyond creating it: reloading it
//! and everything else device-mapper is [`super::dm`]'s, through the shared `ioctl` module.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use devicemapper::{Device, DM};
use loopdev::{LoopControl, LoopDevice};
use tracing::info;

use super::ioctl::{create_device, Udev, SECTOR};
use super::{remove_file_if_exists, PoolError};
use crate::config::Config;

/// A loop pool's files: (role, file, loop device), the data file first.
pub type LoopFiles = Vec<(String, PathBuf, PathBuf)>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.to_path_buf();
    move |source| PoolError::Io { op, path, source }
}

/// Creates `file` as a sparse file of `size` bytes if it does not exist; an existing file is kept
/// (and grown to `size` if it is smaller). Returns the file's size.
///
/// Returns an error if the file cannot be created, inspected or resized.
pub fn ensure_sparse_file(file: &Path, size: u64) -> Result<u64, PoolError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .map_err(io_err("create", file))?;
    let len = f.metadata().map_err(io_err("stat", file))?.len();
    if len < size {
        f.set_len(size).map_err(io_err("resize", file))?;
        f.sync_all().map_err(io_err("sync", file))?;
        return Ok(size);
    }
    Ok(len)
}

/// The loop device already attached to `file`, if any.
///
/// Returns an error if sysfs cannot be read.
pub fn find_attached(file: &Path) -> Result<Option<PathBuf>, PoolError> {
    let want = file.canonicalize().map_err(io_err("canonicalize", file))?;
    let sys = Path::new("/sys/block");
    let entries = match std::fs::read_dir(sys) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", sys)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = entry.path().join("loop/backing_file");
        let Ok(text) = std::fs::read_to_string(&backing) else {
            continue; // not attached
        };
        let text = text.trim_end_matches('\n');
        // The kernel appends " (deleted)" when the file was unlinked: not ours any more.
        if Path::new(text) == want {
            return Ok(Some(PathBuf::from(format!("/dev/{name}"))));
        }
    }
    Ok(None)
}

/// Returns the loop device attached to `file`, attaching a free one if none is.
///
/// Returns an error if no loop device can be had or attaching fails.
pub fn attach(file: &Path) -> Result<PathBuf, PoolError> {
    if let Some(dev) = find_attached(file)? {
        info!(file = %file.display(), device = %dev.display(), "reusing attached loop device");
        return Ok(dev);
    }
    let ctl = LoopControl::open().map_err(io_err("open", Path::new("/dev/loop-control")))?;
    // LOOP_CTL_GET_FREE hands the same device to processes racing for one (several thinsnap
    // instances starting at once): the loser's attach fails with EBUSY and takes the next one,
    // as losetup does.
    let mut attempt = 0;
    let dev = loop {
        attempt += 1;
        let dev = ctl
            .next_free()
            .map_err(io_err("find a free loop device for", file))?;
        match dev.with().autoclear(false).attach(file) {
            Ok(()) => break dev,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 20 => {
                std::thread::sleep(std::time::Duration::from_millis(10 * attempt));
                continue;
            }
            Err(e) => return Err(io_err("attach loop device to", file)(e)),
        }
    };
    let path = dev
        .path()
        .ok_or_else(|| io_err("name the loop device of", file)(std::io::Error::other("no path")))?;
    info!(file = %file.display(), device = %path.display(), "attached loop device");
    Ok(path)
}

/// Detaches the loop device attached to `file`, if any.
///
/// Returns an error if it is attached and cannot be detached.
pub fn detach(file: &Path) -> Result<(), PoolError> {
    if !file.exists() {
        return Ok(());
    }
    if let Some(dev) = find_attached(file)? {
        let ld = LoopDevice::open(&dev).map_err(io_err("open", &dev))?;
        ld.detach().map_err(io_err("detach", &dev))?;
        info!(file = %file.display(), device = %dev.display(), "detached loop device");
    }
    Ok(())
}

/// Makes the loop device see its file's new size (LOOP_SET_CAPACITY).
///
/// Returns an error if the ioctl fails.
pub fn refresh_capacity(dev: &Path) -> Result<(), PoolError> {
    let ld = LoopDevice::open(dev).map_err(io_err("open", dev))?;
    ld.set_capacity().map_err(io_err("set capacity of", dev))
}

/// The device number (`major:minor`) of block device `dev` (`/dev/loopN`), from sysfs.
fn devno_of(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_str()?;
    let text = std::fs::read_to_string(format!("/sys/block/{name}/dev")).ok()?;
    Some(text.trim().to_string())
}

/// `major:minor`, with the loop device and its backing file when it is one.
fn describe_devno(dev: Device) -> String {
    let sys = format!("/sys/dev/block/{}:{}", dev.major, dev.minor);
    let backing = std::fs::read_to_string(format!("{sys}/loop/backing_file"));
    let node = std::fs::read_link(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match (node, backing) {
        (Some(node), Ok(file)) => format!("{dev} (/dev/{node} on {})", file.trim_end()),
        (Some(node), Err(_)) => format!("{dev} (/dev/{node})"),
        _ => dev.to_string(),
    }
}

/// Checks that an existing pool device whose table names `metadata_dev` and `data_dev` is the
/// pool on this root's files (`config.pool_dir()`): each must be the loop device attached to
/// the file of its role. Nothing is created or attached.
///
/// Returns [`PoolError::NotOurPool`] naming both sides if not, or an error if sysfs cannot be
/// read.
pub fn check_pool_devices(
    config: &Config,
    name: &str,
    metadata_dev: Device,
    data_dev: Device,
) -> Result<(), PoolError> {
    let dir = config.pool_dir();
    let mut ours = Vec::new();
    let mut matches = true;
    for (role, file, want) in [
        ("data", dir.join("data"), data_dev),
        ("metadata", dir.join("metadata"), metadata_dev),
    ] {
        let attached = if file.exists() {
            find_attached(&file)?
        } else {
            None
        };
        match attached {
            Some(dev) => {
                let devno = devno_of(&dev);
                if devno.as_deref() != Some(want.to_string().as_str()) {
                    matches = false;
                }
                ours.push(format!(
                    "{role} {} on {}",
                    devno.unwrap_or_else(|| "?".to_string()),
                    file.display()
                ));
            }
            None => {
                matches = false;
                ours.push(format!("{role} {} (not attached)", file.display()));
            }
        }
    }
    if matches {
        return Ok(());
    }
    Err(PoolError::NotOurPool {
        name: name.to_string(),
        found: format!(
            "data {}, metadata {}",
            describe_devno(data_dev),
            describe_devno(metadata_dev)
        ),
        ours: ours.join(", "),
    })
}

/// The pool id of the loop pool in `dir`: read from `dir/id`, made (random) if there is none.
/// It is the pool device's dm uuid (`thinsnap-pool-<id>`), so a pool made again after a reboot
/// from the same files is the same pool, and a pool of other files is another.
///
/// Returns an error if the file cannot be read or written.
pub fn pool_id(dir: &Path) -> Result<String, PoolError> {
    let file = dir.join("id");
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &file)(e)),
    }
    let random = Path::new("/proc/sys/kernel/random/uuid");
    let id: String = std::fs::read_to_string(random)
        .map_err(io_err("read", random))?
        .trim()
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    let tmp = dir.join("id.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(io_err("write", &tmp))?;
    OpenOptions::new()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", &tmp))?;
    std::fs::rename(&tmp, &file).map_err(io_err("rename", &tmp))?;
    info!(file = %file.display(), id = %id, "made the pool id");
    Ok(id)
}

/// The dm uuid of the loop pool whose id is `id` (see [`pool_id`]).
pub fn pool_uuid(id: &str) -> String {
    format!("thinsnap-pool-{id}")
}

/// Creates or reuses the sparse files of a loop pool under `config.pool_dir()` and their loop
/// devices, and, unless the pool device `name` `exists` already, creates it with a `thin-pool`
/// table over them and the dm uuid `uuid`. Returns the files and their loop devices.
///
/// Returns an error if a file, a loop device or the pool device cannot be made.
pub fn provision(
    dm: &DM,
    config: &Config,
    name: &str,
    uuid: &str,
    exists: bool,
) -> Result<LoopFiles, PoolError> {
    let mut loop_files = Vec::new();
    let dir = config.pool_dir();
    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let data_file = dir.join("data");
    let meta_file = dir.join("metadata");
    let block = config.pool.block_size.as_u64();
    let data_len = ensure_sparse_file(&data_file, config.pool.data_size.as_u64())?;
    ensure_sparse_file(&meta_file, config.pool.metadata_size.as_u64())?;
    let data_dev = attach(&data_file)?;
    let meta_dev = attach(&meta_file)?;
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
        create_device(
            dm,
            name,
            uuid,
            "thin-pool",
            data_sectors,
            &params,
            Udev::Disk,
        )?;
        info!(pool = %name, data = %data_dev.display(), metadata = %meta_dev.display(),
              data_bytes = data_sectors * SECTOR, block_bytes = block, "created thin pool");
    }
    Ok(loop_files)
}

/// Grows the data file to `data_bytes` and the metadata file to `metadata_bytes` (`None`: leave
/// it), and makes their loop devices see the new sizes. Returns the data file's size.
///
/// Returns [`PoolError::Invalid`] if a size is smaller than the file's now (pools only grow), or
/// an error if a file cannot be inspected or resized.
pub fn grow(
    loop_files: &[(String, PathBuf, PathBuf)],
    data_bytes: Option<u64>,
    metadata_bytes: Option<u64>,
) -> Result<u64, PoolError> {
    let mut data_file = None;
    for (role, file, dev) in loop_files {
        let want = if role == "data" {
            data_bytes
        } else {
            metadata_bytes
        };
        if role == "data" {
            data_file = Some(file.clone());
        }
        let Some(want) = want else { continue };
        let cur = std::fs::metadata(file).map_err(io_err("stat", file))?.len();
        if want < cur {
            return Err(PoolError::Invalid(format!(
                "{role} size {want} is smaller than the current {cur} of {}: pools only grow",
                file.display()
            )));
        }
        if want > cur {
            ensure_sparse_file(file, want)?;
            refresh_capacity(dev)?;
            info!(file = %file.display(), device = %dev.display(), from = cur, to = want, "grew pool file");
        }
    }
    let data_file = data_file.expect("loop pools have a data file");
    Ok(std::fs::metadata(&data_file)
        .map_err(io_err("stat", &data_file))?
        .len())
}

/// The host filesystem's free space and what the pool's sparse files may still take of it;
/// `None` if there are no files.
///
/// Returns an error if the filesystem or a file cannot be inspected.
pub fn host_room(
    loop_files: &[(String, PathBuf, PathBuf)],
) -> Result<Option<super::HostRoom>, PoolError> {
    use std::os::unix::fs::MetadataExt;
    let Some((_, data_file, _)) = loop_files.first() else {
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
    for (_, file, _) in loop_files {
        let m = std::fs::metadata(file).map_err(io_err("stat", file))?;
        promised += m.len().saturating_sub(m.blocks() * 512);
    }
    Ok(Some(super::HostRoom { free, promised }))
}

/// `pool destroy` in loop mode, once the pool device is gone: detaches the loop devices of the
/// pool files in `dir`; with `remove_files` also deletes the files and (if empty) `dir`.
///
/// Returns an error if a loop device cannot be detached or a file cannot be removed.
pub fn release(dir: &Path, remove_files: bool) -> Result<(), PoolError> {
    for file in [dir.join("data"), dir.join("metadata")] {
        detach(&file)?;
        if remove_files && remove_file_if_exists(&file)? {
            info!(file = %file.display(), "removed pool file");
        }
    }
    if remove_files {
        remove_file_if_exists(&dir.join("id"))?;
    }
    if remove_files {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_is_created_and_never_shrunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("data");
        assert_eq!(ensure_sparse_file(&f, 1 << 30).expect("create"), 1 << 30);
        let meta = std::fs::metadata(&f).expect("stat");
        assert_eq!(meta.len(), 1 << 30);
        // Sparse: almost nothing is allocated.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "file is not sparse");
        assert_eq!(ensure_sparse_file(&f, 1 << 20).expect("keep"), 1 << 30);
        assert_eq!(ensure_sparse_file(&f, 2 << 30).expect("grow"), 2 << 30);
    }

    #[test]
    fn unattached_file_has_no_loop_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("data");
        ensure_sparse_file(&f, 1 << 20).expect("create");
        assert_eq!(find_attached(&f).expect("scan sysfs"), None);
    }
}
