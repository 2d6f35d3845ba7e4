//! Reading the pool's thin ids with `thin_ls` from a metadata snapshot: [`DmPool::thin_ls`].

use std::path::PathBuf;
use std::str::FromStr;

use devicemapper::ThinPoolTargetParams;
use nix::errno::Errno;
use tracing::warn;

use super::DmPool;
use crate::pool::ioctl::{dm_err, errno_of, table_of};
use crate::pool::{PoolError, ThinId, ThinPool};

impl DmPool {
    /// The thin ids in the pool's metadata, read by `thin_ls` from a metadata snapshot
    /// (reserved, read, released). `release_stale`: at start, a snapshot already held is one a
    /// killed thinsnap left and is released first; while serving (`false`) it is someone else's
    /// and the answer is [`PoolError::Busy`].
    ///
    /// Returns ThinLsMissing without thin_ls, Busy as said, or the failing step's error.
    pub(super) fn thin_ls(
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
}
