//! The `[fs]` section: the filesystem of the base device (and so of every snapshot), its size and
//! the extra mkfs and mount options, with their defaults and the checks of their values.
//!
//! It only checks values; making and mounting filesystems is `crate::fs`'s business, not this
//! module's.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{exact_bytes, invalid, ConfigError, MAX_SIZE};

/// Filesystem of the base device (and so of every snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The name used for `mkfs.<name>` and as the mount type.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FsConfig {
    #[serde(rename = "type")]
    pub fs_type: FsType,
    /// Virtual size of the base device, and so of every snapshot.
    #[serde(serialize_with = "exact_bytes")]
    pub base_size: ByteSize,
    /// Extra arguments for mkfs, run once when the base device is made.
    pub mkfs_options: Vec<String>,
    /// Extra mount options returned with every mount.
    pub mount_options: Vec<String>,
    /// The largest device the size labels (`containerd.io/snapshot/thinsnap.size` and
    /// containerd's `containerd.io/snapshot/max-size`) may ask for;
    /// unset: bounded by the pool (its data space, or `pool.autogrow.max_data_size`).
    #[serde(
        serialize_with = "exact_bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size: Option<ByteSize>,
}

/// [`exact_bytes`] for an optional size.
fn exact_bytes_opt<S: serde::Serializer>(b: &Option<ByteSize>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => exact_bytes(b, s),
        None => s.serialize_none(),
    }
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            fs_type: FsType::Ext4,
            base_size: ByteSize::gib(10),
            mkfs_options: Vec::new(),
            mount_options: Vec::new(),
            max_size: None,
        }
    }
}

impl FsConfig {
    /// Checks `[fs]`.
    ///
    /// Returns an error naming `fs.base_size` when the size is not a multiple of 4KiB, below
    /// what mkfs accepts for the type, or not below 8EiB; `fs.mount_options` when an entry is
    /// empty or holds a comma.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let base = self.base_size.as_u64();
        // TOML integers are i64 (and no filesystem reaches 8EiB): a larger size could not even be
        // written back to a config file (found by fuzz_config).
        if base > MAX_SIZE {
            return Err(invalid(
                "fs.base_size",
                format!("{base} bytes: must be below 8EiB"),
            ));
        }
        let min_base = match self.fs_type {
            FsType::Ext4 => 16 * 1024 * 1024,
            // mkfs.xfs refuses filesystems under 300MiB.
            FsType::Xfs => 300 * 1024 * 1024,
        };
        if base < min_base || !base.is_multiple_of(4096) {
            return Err(invalid(
                "fs.base_size",
                format!(
                    "{base} bytes: must be a multiple of 4KiB and at least {} for {}",
                    ByteSize::b(min_base).display().iec(),
                    self.fs_type
                ),
            ));
        }
        if let Some(max) = self.max_size {
            let max = max.as_u64();
            if max < base || max > MAX_SIZE || !max.is_multiple_of(512) {
                return Err(invalid(
                    "fs.max_size",
                    format!(
                        "{max} bytes: must be a multiple of 512 (a sector), at least fs.base_size \
                         ({base} bytes) and below 8EiB"
                    ),
                ));
            }
        }
        for opt in &self.mount_options {
            if opt.is_empty() || opt.contains(',') {
                return Err(invalid(
                    "fs.mount_options",
                    format!("{opt:?}: give one option per list entry"),
                ));
            }
        }
        Ok(())
    }
}
