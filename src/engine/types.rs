//! What the engine's callers see and give: a snapshot's info, its mounts and usage, the status
//! counts, and the engine's part of the configuration. Plain data: no behaviour beyond building
//! [`Settings`] from the configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::{AutogrowConfig, Config, FsConfig, PoolMode};
use crate::model::{Kind, ThinId};
use crate::pool::PoolStatus;

/// What a client sees of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub key: String,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A mount for containerd: `mount -t <fs_type> -o <options> <source> <target>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Space a snapshot uses, excluding its parent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

/// The base device every parentless snapshot is a thin snapshot of, for `thinsnap status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaseInfo {
    pub thin_id: ThinId,
    pub fs_type: String,
    pub size: u64,
    /// The size new images' first layers get (and so their containers): `fs.base_size` when it
    /// was raised above `size` after the base device was made (see `Engine::grown_base_size`).
    pub new_image_size: u64,
}

/// Counts for `thinsnap status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStatus {
    pub pool: PoolStatus,
    pub active: u64,
    pub views: u64,
    pub committed: u64,
    /// Device records but warm spares: snapshots, the base, devices being deleted.
    pub thin_ids: u64,
    pub base: BaseInfo,
    /// Active snapshots and views whose dm devices are missing (after a reboot) and not yet
    /// activated by a call that needs them.
    pub inactive: u64,
    /// Snapshots whose devices cannot be used, with the reason.
    pub quarantined: Vec<super::QuarantinedInfo>,
    /// Warm spares: ready, wanted, taken and missed.
    pub spares: super::SpareCounts,
    /// The thin ids of every warm spare's device record (any state); not in `thin_ids`.
    pub spare_thin_ids: Vec<ThinId>,
    /// What the last audit of thin ids found (see [`super::Engine::audit`]).
    pub audit: super::AuditReport,
    /// Device records in state Deleting: snapshots gone whose thin devices are still to delete.
    pub deleting: u64,
}

/// What the engine takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub fs: FsConfig,
    /// Prepare and View are refused below this share (percent) of free data or metadata space.
    pub min_free_percent: f64,
    /// Remove answers once the record is gone; a background reaper deletes the device.
    pub remove_async: bool,
    /// Discard a device's blocks before deleting it.
    pub discard: bool,
    /// The state directory (`root`): temporary mounts (growing xfs) go under it; status shows it.
    pub root: PathBuf,
    /// thinsnap made the pool (loop mode): a thin id in it that the store does not know is an
    /// orphan of ours and is deleted at start. Otherwise such ids belong to someone else.
    pub owns_pool: bool,
    /// Not owning the pool: start even if it holds thin ids the store does not know.
    pub allow_foreign_devices: bool,
    /// Loop mode with `pool.autogrow.enabled`: grow the pool as it fills.
    pub autogrow: Option<AutogrowConfig>,
    /// `[spares] count`: warm spares kept at most; 0: none.
    pub spares: u32,
    /// `store.min_free`: Prepare and View are refused while the filesystem holding `root` has
    /// less free space (bytes); 0: no floor.
    pub store_min_free: u64,
    /// The mount table Mounts reads to find where an active snapshot is already mounted
    /// ([`crate::fs::mounted_at`]); /proc/self/mountinfo but in tests.
    pub mount_table: PathBuf,
    /// The largest data and metadata sizes `thinsnap pool grow` may ask for: autogrow's own
    /// maxima (`pool.autogrow.max_data_size`, `max_metadata_size`), whether autogrow is on or not.
    pub grow_max: (u64, u64),
    /// `thinsnap pool adopt`: what to do with the thin devices of a pool this database has no
    /// record of (None: refuse to start, see `super::ownership`).
    pub adopt: Option<Adopt>,
}

/// What `thinsnap pool adopt` does with the thin devices of a pool in front of a new (or lost)
/// database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// Keep them as someone else's: never deleted, their thin ids never allocated.
    KeepForeign,
    /// Delete them.
    Reset,
}

impl Settings {
    /// The engine's part of `config`.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            fs: config.fs.clone(),
            min_free_percent: config.pool.min_free_space.0,
            remove_async: config.remove.asynchronous,
            discard: config.remove.discard,
            root: config.root.clone(),
            owns_pool: config.pool.mode == PoolMode::Loop,
            allow_foreign_devices: config.pool.allow_foreign_devices,
            autogrow: (config.pool.autogrow.enabled && config.pool.mode == PoolMode::Loop)
                .then(|| config.pool.autogrow.clone()),
            spares: config.spares.count,
            store_min_free: config.store.min_free.as_u64(),
            adopt: None,
            mount_table: PathBuf::from(crate::fs::MOUNT_TABLE),
            grow_max: (
                config.pool.autogrow.max_data_size.as_u64(),
                config.pool.autogrow.max_metadata_size.as_u64(),
            ),
        }
    }

    /// Defaults with `fs`, for tests.
    pub fn with_fs(fs: FsConfig) -> Settings {
        Settings {
            fs,
            min_free_percent: 10.0,
            remove_async: false,
            discard: false,
            root: std::env::temp_dir(),
            owns_pool: true,
            allow_foreign_devices: false,
            autogrow: None,
            spares: 0,
            store_min_free: 0,
            adopt: None,
            mount_table: PathBuf::from(crate::fs::MOUNT_TABLE),
            grow_max: {
                let a = AutogrowConfig::default();
                (a.max_data_size.as_u64(), a.max_metadata_size.as_u64())
            },
        }
    }
}
