//! Filesystems on thin devices: formatting the base device (the only place thinsnap runs mkfs,
//! once per pool) and the mount options each snapshot's mount carries.
//!
//! Nothing here knows of snapshots or the store. The common Prepare path calls only
//! [`mount_options`], which is pure; a Prepare with the size label also calls [`grow`] (a process
//! spawn: resize2fs or xfs_growfs), and the base device is formatted once per pool.

use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

use crate::config::{FsConfig, FsType};

/// Errors of formatting the base device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{cmd} on {device}: {reason}")]
    Command {
        cmd: String,
        device: PathBuf,
        reason: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The mount options of a snapshot of a filesystem configured by `fs`.
///
/// xfs refuses to mount two filesystems with one UUID, and every snapshot shares the base's: so
/// `nouuid`. A view is mounted `ro`; its device is still a snapshot of its own, so a journal
/// replay never touches the parent.
pub fn mount_options(fs: &FsConfig, read_only: bool) -> Vec<String> {
    let mut opts = Vec::new();
    if read_only {
        opts.push("ro".to_string());
    }
    if fs.fs_type == FsType::Xfs {
        opts.push("nouuid".to_string());
    }
    for o in &fs.mount_options {
        if !opts.contains(o) {
            opts.push(o.clone());
        }
    }
    opts
}

/// The mount table [`mounted_at`] reads in the daemon: the mounts of thinsnap's own mount
/// namespace, which is the host's (deploy/thinsnap.service gives it no private one).
pub const MOUNT_TABLE: &str = "/proc/self/mountinfo";

/// Where the filesystem on block device `device` is mounted whole (the filesystem's root at the
/// mount point, not a bind of a subdirectory), according to the mount table `table` (the format
/// of /proc/self/mountinfo): the first such mount that nothing else is mounted over. A mount
/// matches by the device's major:minor (whatever name it was mounted under) or by `device`
/// itself as its source. None if it is not mounted so (or `device` does not exist).
///
/// A second Mounts of an active snapshot that a container has mounted answers a bind mount of
/// this path: the kernel refuses a read-only mount of a block device that is mounted read-write
/// elsewhere (EBUSY), which is how containerd's differ mounts the upper side of a diff.
///
/// Returns an error if `table` cannot be read.
pub fn mounted_at(device: &Path, table: &Path) -> Result<Option<PathBuf>, FsError> {
    let text = std::fs::read_to_string(table).map_err(|source| FsError::Io {
        op: "read",
        path: table.to_path_buf(),
        source,
    })?;
    let number = match std::fs::metadata(device) {
        Ok(m) => {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            m.file_type().is_block_device().then(|| {
                let rdev = m.rdev();
                (libc::major(rdev), libc::minor(rdev))
            })
        }
        Err(_) => None,
    };
    Ok(find_mount_point(&text, number, device))
}

/// One line of a mount table: (major, minor), root, mount point, source.
fn parse_mount_line(line: &str) -> Option<((u32, u32), String, PathBuf, String)> {
    let (head, tail) = line.split_once(" - ")?;
    let mut head = head.split(' ');
    let _id = head.next()?;
    let _parent = head.next()?;
    let (major, minor) = head.next()?.split_once(':')?;
    let number = (major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(head.next()?);
    let point = PathBuf::from(unescape(head.next()?));
    let mut tail = tail.split(' ');
    let _fstype = tail.next()?;
    let source = unescape(tail.next()?);
    Some((number, root, point, source))
}

/// The mount point of the filesystem on `device` (number `number`), mounted whole, in mount
/// table `text`; one with a later mount of something else at the same point is hidden, skipped.
fn find_mount_point(text: &str, number: Option<(u32, u32)>, device: &Path) -> Option<PathBuf> {
    let lines: Vec<_> = text.lines().filter_map(parse_mount_line).collect();
    let ours = |n: (u32, u32), source: &str| Some(n) == number || Path::new(source) == device;
    lines
        .iter()
        .enumerate()
        .find_map(|(i, (n, root, point, source))| {
            if root != "/" || !ours(*n, source) {
                return None;
            }
            let hidden = lines[i + 1..]
                .iter()
                .any(|(n2, _, p2, s2)| p2 == point && !ours(*n2, s2));
            (!hidden).then(|| point.clone())
        })
}

/// Undoes the mount table's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run(cmd: &mut Command, device: &Path) -> Result<(), FsError> {
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| FsError::Command {
        cmd: name.clone(),
        device: device.to_path_buf(),
        reason: format!("cannot run: {e}"),
    })?;
    if !out.status.success() {
        return Err(FsError::Command {
            cmd: name,
            device: device.to_path_buf(),
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Formats the base device once: mkfs with discard off (a fresh thin device has nothing to
/// discard) and, for ext4, the inode tables and journal initialised now rather than lazily in the
/// background of every container; then mounts it on a temporary directory under `scratch` to
/// remove `lost+found`, so a snapshot of it is an empty directory as containerd expects.
///
/// Returns an error if mkfs, mount or umount fails.
pub fn format_base(device: &Path, fs: &FsConfig, scratch: &Path) -> Result<(), FsError> {
    let mut mkfs = Command::new(format!("mkfs.{}", fs.fs_type));
    match fs.fs_type {
        FsType::Ext4 => {
            mkfs.args([
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            ]);
        }
        FsType::Xfs => {
            mkfs.args(["-q", "-f", "-K"]);
        }
    }
    mkfs.args(&fs.mkfs_options).arg(device);
    run(&mut mkfs, device)?;
    info!(device = %device.display(), fs = %fs.fs_type, "formatted base device");

    let opts = mount_options(fs, false).join(",");
    let opts = (!opts.is_empty()).then_some(opts.as_str());
    let dir = scratch.join("base-mnt");
    with_mounted(device, &dir, fs.fs_type.as_str(), opts, |dir| {
        let lost = dir.join("lost+found");
        match std::fs::remove_dir(&lost) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FsError::Io {
                op: "remove",
                path: lost,
                source,
            }),
        }
    })
}

/// Mounts `device` on `dir` (created for the purpose), runs `f` on it, unmounts it and removes
/// `dir`, whatever `f` returned.
///
/// Returns `f`'s error first, then the mount's or the unmount's.
fn with_mounted<T>(
    device: &Path,
    dir: &Path,
    fs_type: &str,
    options: Option<&str>,
    f: impl FnOnce(&Path) -> Result<T, FsError>,
) -> Result<T, FsError> {
    let io = |op: &'static str| {
        let path = dir.to_path_buf();
        move |e: nix::errno::Errno| FsError::Io {
            op,
            path,
            source: e.into(),
        }
    };
    std::fs::create_dir_all(dir).map_err(|source| FsError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    nix::mount::mount(
        Some(device),
        dir,
        Some(fs_type),
        nix::mount::MsFlags::empty(),
        options,
    )
    .map_err(io("mount a thin device on"))?;
    let out = f(dir);
    let unmounted = nix::mount::umount(dir).map_err(io("unmount"));
    let _ = std::fs::remove_dir(dir);
    let out = out?;
    unmounted?;
    Ok(out)
}

/// Grows the filesystem on `device` (unmounted) to fill the device: for a snapshot made larger
/// than its parent with the size label. ext4: `resize2fs -f`: the parent was unmounted cleanly
/// before it was committed, and e2fsck would recreate the `lost+found` the base removed; xfs
/// grows only mounted, so it is mounted under `scratch` for `xfs_growfs`.
///
/// Returns an error if a tool fails.
pub fn grow(device: &Path, fs: &FsConfig, scratch: &Path) -> Result<(), FsError> {
    match fs.fs_type {
        FsType::Ext4 => {
            run(Command::new("resize2fs").arg("-f").arg(device), device)?;
        }
        FsType::Xfs => {
            let dir = scratch.join(format!(
                "grow-{}",
                device
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            with_mounted(device, &dir, "xfs", Some("nouuid"), |dir| {
                run(Command::new("xfs_growfs").arg(dir), device)
            })?;
        }
    }
    info!(device = %device.display(), fs = %fs.fs_type, "grew filesystem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_read_only_and_xfs_gets_nouuid() {
        let mut fs = FsConfig::default();
        assert!(mount_options(&fs, false).is_empty());
        assert_eq!(mount_options(&fs, true), vec!["ro"]);
        fs.fs_type = FsType::Xfs;
        fs.mount_options = vec!["noatime".into(), "ro".into()];
        assert_eq!(mount_options(&fs, false), vec!["nouuid", "noatime", "ro"]);
        assert_eq!(mount_options(&fs, true), vec!["ro", "nouuid", "noatime"]);
    }

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
90 29 254:3 /sub /var/lib/x/bound rw,relatime shared:1 - ext4 /dev/mapper/p-snap-3 rw
91 29 254:3 / /run/containerd/io.containerd.runtime.v2.task/default/c\\0401/rootfs rw,relatime shared:1 - ext4 /dev/mapper/p-snap-3 rw
92 29 254:4 / /var/lib/docker/rootfs/thinsnap/c2 rw,relatime shared:1 - xfs /dev/dm-4 rw,nouuid
93 29 254:5 / /hidden rw - ext4 /dev/mapper/p-snap-5 rw
94 29 0:40 / /hidden rw - tmpfs tmpfs rw
";

    #[test]
    fn a_device_is_found_mounted_whole_by_number_or_by_its_source() {
        let dev = |n| PathBuf::from(format!("/dev/mapper/p-snap-{n}"));
        // By number: the bind of a subdirectory is skipped, the escaped space undone.
        assert_eq!(
            find_mount_point(TABLE, Some((254, 3)), &dev(3)),
            Some(PathBuf::from(
                "/run/containerd/io.containerd.runtime.v2.task/default/c 1/rootfs"
            ))
        );
        // Mounted under another name of the same device (/dev/dm-4): found by number only.
        assert_eq!(
            find_mount_point(TABLE, Some((254, 4)), &dev(4)),
            Some(PathBuf::from("/var/lib/docker/rootfs/thinsnap/c2"))
        );
        assert_eq!(find_mount_point(TABLE, None, &dev(4)), None);
        // By source when the device cannot be read (no number).
        assert_eq!(
            find_mount_point(TABLE, None, &dev(3)),
            Some(PathBuf::from(
                "/run/containerd/io.containerd.runtime.v2.task/default/c 1/rootfs"
            ))
        );
        // Mounted over by a tmpfs: the path would bind the tmpfs, so it is no answer.
        assert_eq!(find_mount_point(TABLE, Some((254, 5)), &dev(5)), None);
        // Not mounted.
        assert_eq!(find_mount_point(TABLE, Some((254, 6)), &dev(6)), None);
    }

    #[test]
    fn mounted_at_reads_the_table_and_names_it_when_it_cannot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = dir.path().join("mountinfo");
        let err = mounted_at(Path::new("/dev/mapper/p-snap-3"), &table).expect_err("no table");
        assert!(err.to_string().contains("mountinfo"), "{err}");
        std::fs::write(&table, TABLE).expect("write");
        assert_eq!(
            mounted_at(Path::new("/dev/mapper/p-snap-5"), &table).expect("read"),
            None
        );
        assert!(mounted_at(Path::new("/dev/mapper/p-snap-3"), &table)
            .expect("read")
            .is_some());
    }
}
