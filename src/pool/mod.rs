//! The thin pool: the [`ThinPool`] trait the engine talks to, its device-mapper implementation
//! ([`dm::DmPool`], ioctls through the `devicemapper` crate), loop-device provisioning
//! ([`loopback`]) and LVM provisioning ([`lvm`]).
//!
//! Only this module imports `devicemapper`. It knows dm names (derived from the pool name and a
//! thin id, so recovery can recognise every device that is ours), tables and messages; it knows
//! nothing of snapshots, keys or the store. Every call is a blocking ioctl: callers in async code
//! go through `spawn_blocking`.
//!
//! Inside, imports point one way: `dm` uses `loopback`, `lvm` and `ioctl`; `loopback` and `lvm`
//! use `ioctl` (the shared device-mapper calls, a leaf); nothing but `main.rs` uses `dm`.
//! [`txid`] (the pool that numbers its own changes) and `fake` (the in-memory pool of the unit
//! tests) build on the trait alone.

pub mod dm;
#[cfg(any(test, feature = "fake-pool"))]
pub mod fake;
mod ioctl;
pub mod loopback;
pub mod lvm;
pub mod txid;

use std::path::PathBuf;

pub use crate::model::{ThinId, MAX_THIN_ID};
pub use txid::NumberedPool;

/// Errors of the pool layer. Each names the device or thin id it concerns.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "device-mapper is not available in this kernel ({0}): load it with `modprobe dm-thin-pool`"
    )]
    NoDeviceMapper(String),
    #[error("thin pool {0} does not exist")]
    PoolMissing(String),
    #[error(
        "thin_ls not found: thinsnap reads pool {0}'s thin ids with it at a start that needs them \
         (the pool changed without the store seeing it, or the pool is shared); \
         install thin-provisioning-tools"
    )]
    ThinLsMissing(String),
    #[error(
        "dm device {name} is a thin pool, but not the one on this root's files: it is made of \
         {found}, and this root's pool files are {ours}. Another thinsnap instance (another \
         root) or another tool uses the pool name {name}; thinsnap changes nothing in it. Give \
         this instance a pool.name of its own (or set root to the directory of the instance \
         that made the pool)"
    )]
    NotOurPool {
        name: String,
        found: String,
        ours: String,
    },
    /// A dm device has the name thinsnap derives for one of its thin devices, but it is not
    /// that device (another table, another dm uuid): it is never reused nor removed.
    #[error(
        "dm device {name} has the name of thin id {id} of pool {pool}, but it is not that \
         device ({why}); thinsnap neither uses nor removes it: find out whose it is \
         (`dmsetup table {name}`, `dmsetup info {name}`) and remove or rename it"
    )]
    ForeignDevice {
        name: String,
        id: ThinId,
        pool: String,
        why: String,
    },
    #[error("dm device {name} is a {found} target, not a thin-pool")]
    NotAThinPool { name: String, found: String },
    #[error("thin id {0} already exists in the pool")]
    ThinExists(ThinId),
    #[error("thin id {0} does not exist in the pool")]
    ThinNotFound(ThinId),
    #[error("dm device {0} is busy (still mounted or open)")]
    Busy(String),
    #[error("thin pool {0} is out of space")]
    NoSpace(String),
    #[error(
        "thin pool {0} is read-only and takes no changes (its metadata is full or failed); \
         `thinsnap status` says what to do"
    )]
    ReadOnly(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("thin pool {name} failed: {status}")]
    PoolFailed { name: String, status: String },
    #[error("{op} on {target}: {source}")]
    Dm {
        op: &'static str,
        target: String,
        source: devicemapper::DmError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Lvm mode refused the configured device, volume group or thin pool.
    #[error(transparent)]
    Lvm(#[from] lvm::LvmError),
}

/// Removes `path`, returning whether it was there.
///
/// Returns [`PoolError::Io`] if it exists and cannot be removed.
fn remove_file_if_exists(path: &std::path::Path) -> Result<bool, PoolError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PoolError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Space and health of the pool, from the thin-pool target's status line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStatus {
    pub transaction_id: u64,
    pub data_used_bytes: u64,
    pub data_total_bytes: u64,
    pub metadata_used_bytes: u64,
    pub metadata_total_bytes: u64,
    pub block_size_bytes: u64,
    pub read_only: bool,
    pub out_of_data_space: bool,
    pub needs_check: bool,
    pub error_if_no_space: bool,
    /// A metadata snapshot is reserved (`reserve_metadata_snap`): only while thin_ls reads it,
    /// or left behind by a thinsnap killed in that window.
    pub metadata_snapshot_held: bool,
}

/// A dm device named with the pool's thin prefix (see [`ThinPool::prefixed_devices`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixedDevice {
    pub name: String,
    /// The thin id its name gives; `None` if the rest of the name is not a number.
    pub thin_id: Option<ThinId>,
    /// Why it is not thinsnap's device of that thin id (another table or dm uuid); `None`: ours.
    pub not_ours: Option<String>,
}

/// What the pool is made of, for `thinsnap status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolInfo {
    pub name: String,
    pub mode: String,
    /// (role, file, loop device) in loop mode.
    pub loop_files: Vec<(String, PathBuf, PathBuf)>,
    /// Who the pool is, as the kernel has it: mode, dm name, dm uuid and, in loop mode, the
    /// backing files. The store records it at the first start and every start compares it.
    pub identity: String,
    /// The pool's metadata was made empty by this start (loop mode, a new metadata file): it
    /// holds no thin device.
    pub fresh: bool,
}

/// The operations the engine needs from a thin pool. Implementations are synchronous.
///
/// Thin ids are the engine's; device names are derived from them by the implementation.
pub trait ThinPool: Send + Sync + 'static {
    /// Creates a new, empty thin device `id` (message `create_thin`).
    ///
    /// Returns [`PoolError::ThinExists`] if `id` is taken, [`PoolError::NoSpace`] if the metadata is full.
    fn create_thin(&self, id: ThinId) -> Result<(), PoolError>;

    /// Creates thin device `id` as a snapshot of `origin` (message `create_snap`), suspending the
    /// origin's dm device for the duration if it is active.
    ///
    /// Returns [`PoolError::ThinExists`] if `id` is taken, [`PoolError::ThinNotFound`] if `origin` is missing.
    fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<(), PoolError>;

    /// Deletes thin device `id` from the pool (message `delete`); it must not be active.
    ///
    /// Returns [`PoolError::ThinNotFound`] if the pool has no such device.
    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError>;

    /// Activates thin device `id` as a dm device of `size_bytes`, returning its /dev/mapper path.
    /// Idempotent: an already active device is returned as is.
    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError>;

    /// Removes the dm device of `id`; nothing to do if it is not active.
    ///
    /// Returns [`PoolError::Busy`] if it is open (mounted).
    fn deactivate(&self, id: ThinId) -> Result<(), PoolError>;

    /// For a device still open (mounted): flushes it (a suspend freezes the filesystem on it, so
    /// its dirty data reaches the device) and schedules its removal for when the last opener
    /// closes it (DM_DEFERRED_REMOVE). Nothing to do if it is not active.
    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError>;

    /// Bytes mapped (provisioned) by the active device of `id`, shared blocks included.
    fn mapped_bytes(&self, id: ThinId) -> Result<u64, PoolError>;

    /// Thin ids whose dm devices (named with this pool's prefix) are active.
    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError>;

    /// The /dev/mapper path the device of `id` has when active.
    fn device_path(&self, id: ThinId) -> PathBuf;

    /// Every dm device whose name has this pool's thin prefix, ours or not (`thinsnap ls`).
    ///
    /// Returns an error if the devices cannot be listed or read.
    fn prefixed_devices(&self) -> Result<Vec<PrefixedDevice>, PoolError>;

    /// The pool's space and health.
    fn status(&self) -> Result<PoolStatus, PoolError>;

    /// Sets the pool's transaction id from `old` to `new` (message `set_transaction_id`).
    fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), PoolError>;

    /// What the pool is made of.
    fn info(&self) -> PoolInfo;

    /// Discards every block of thin device `id` (BLKDISCARD over the whole device), so the pool
    /// frees them and, with discard passdown, a loop pool's file gives the space back to the host.
    /// Activates the device for the call if it is not active, and leaves it as it found it.
    fn discard(&self, id: ThinId, size_bytes: u64) -> Result<(), PoolError>;

    /// Every thin id in the pool's metadata, read from a metadata snapshot (start-up only: it runs
    /// `thin_ls`).
    ///
    /// Returns [`PoolError::ThinLsMissing`] if thin_ls is not installed: without it thinsnap
    /// cannot tell its own thin ids from someone else's, so it does not guess.
    fn list_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError>;

    /// [`ThinPool::list_thin_ids`] while the daemon serves (the audit of thin ids against the
    /// store): a metadata snapshot already held is someone else's (an admin's thin_ls, a test),
    /// never released here.
    ///
    /// Returns [`PoolError::Busy`] if one is held, otherwise as `list_thin_ids`.
    fn audit_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        self.list_thin_ids()
    }

    /// Grows the pool's data and/or metadata space online (loop mode: the files, the loop
    /// devices' capacity, then the pool table is reloaded). Sizes smaller than now are refused.
    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError>;

    /// Loop mode: the host filesystem's free space against what the pool's sparse files may
    /// still take. `None` for pools that are not files.
    fn host_room(&self) -> Result<Option<HostRoom>, PoolError>;
}

/// The host filesystem under a loop pool's sparse files.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostRoom {
    /// Bytes free on the filesystem (for an unprivileged writer).
    pub free: u64,
    /// Bytes the sparse files may still take as the pool writes into them (their sizes minus
    /// what they have allocated).
    pub promised: u64,
}

impl HostRoom {
    /// Bytes the host can still give the files beyond what they already promise.
    pub fn room(&self) -> u64 {
        self.free.saturating_sub(self.promised)
    }

    /// Bytes the files promise that the host cannot give: the pool would fail writing them.
    pub fn shortfall(&self) -> u64 {
        self.promised.saturating_sub(self.free)
    }
}
