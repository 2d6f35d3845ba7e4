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
}
