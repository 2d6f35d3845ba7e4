//! Loop mode's backing store: sparse files attached to loop devices (Docker's loop-lvm layout).
//!
//! After a restart the loop devices may still be attached: they are found through sysfs
//! (`/sys/block/loopN/loop/backing_file`) and reused, never attached twice. Attaching uses the
//! `loopdev-3` crate (LOOP_CTL_GET_FREE + LOOP_CONFIGURE); nothing here spawns `losetup`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};
use tracing::info;

use super::PoolError;

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
