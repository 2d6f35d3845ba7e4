//! The device-mapper implementation of [`ThinPool`]: thin messages, activation, status and
//! growing of one pool, through the `devicemapper` crate's `DM` handle; opening the pool the
//! configuration describes, and `pool destroy`. The ioctls themselves are in the private `ioctl`
//! module, loop files in [`super::loopback`], LVM provisioning in [`super::lvm`]; this module
//! must not grow its own copies of them. No process is spawned here except `thin_ls`.
//!
//! Device names: the pool is `<pool.name>`; thin device `N` is `<pool.name>-snap-N`. Nothing else
//! is ever named with that prefix, so recovery can tell ours from the rest.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use devicemapper::{
    DevId, Device, DmError, DmFlags, DmName, DmOptions, ThinPoolStatus, ThinPoolStatusSummary,
    ThinPoolTargetParams, ThinStatus, DM,
};
use nix::errno::Errno;
use tracing::{debug, info, warn};

use super::ioctl::{
    self, create_device, device_exists, device_info, dm_err, dm_name, errno_of, open_dm,
    remove_device, table_of, Udev, SECTOR,
};
use super::loopback::{self, LoopFiles};
use super::{lvm, PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};
use crate::config::{Config, PoolMode};

mod destroy;
mod thin_ls;

pub use destroy::destroy;

const META_BLOCK: u64 = 4096;

/// How long a thin delete waits out EBUSY while the kernel finishes removing the thin's dm
/// device by itself (see [`DmPool::closing_by_itself`]): after an unmount, a deferred removal
/// runs from a kernel work queue, and the pool counts the thin device open until its table is
/// destroyed. Bounded: then the EBUSY is the answer.
const DELETE_BUSY_RETRIES: u32 = 50;
const DELETE_BUSY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// A thin pool driven through device-mapper ioctls.
pub struct DmPool {
    dm: DM,
    name: String,
    prefix: String,
    mode: PoolMode,
    block_size: u64,
    loop_files: LoopFiles,
    /// The pool's major:minor, the first word of every thin table. Fixed while the pool device
    /// exists (growing reloads its table, the device stays), so it is read once, at open, instead
    /// of by a DM_DEV_STATUS on every activation.
    pool_dev: Device,
    /// What every thin device's dm uuid starts with: it names this pool.
    thin_uuid_prefix: String,
    /// See [`PoolInfo::identity`].
    identity: String,
    /// See [`PoolInfo::fresh`].
    fresh: bool,
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
        let mut fresh = false;
        match config.pool.mode {
            PoolMode::Loop => {
                if exists {
                    // Adopted only if it is the pool on this root's files: another instance's
                    // pool of the same name is refused before anything is made or attached.
                    let params = pool_params(&dm, &name)?;
                    loopback::check_pool_devices(
                        config,
                        &name,
                        params.metadata_dev,
                        params.data_dev,
                    )?;
                }
                let dir = config.pool_dir();
                std::fs::create_dir_all(&dir).map_err(|source| PoolError::Io {
                    op: "create",
                    path: dir.clone(),
                    source,
                })?;
                fresh = !dir.join("metadata").exists();
                let uuid = loopback::pool_uuid(&loopback::pool_id(&dir)?);
                loop_files = loopback::provision(&dm, config, &name, &uuid, exists)?;
                if exists
                    && device_info(&dm, &name)?
                        .and_then(|i| ioctl::uuid_of(&i))
                        .is_none()
                {
                    // A pool made by a release that set no uuid: it is ours (its table is on
                    // our files), so it gets its uuid now.
                    ioctl::set_uuid(&dm, &name, &uuid)?;
                    info!(pool = %name, uuid = %uuid, "gave the pool its dm uuid");
                }
            }
            PoolMode::Existing | PoolMode::Lvm => {
                if !exists {
                    return Err(PoolError::PoolMissing(name));
                }
            }
        }
        // Whatever made it, the device must be a thin pool; its table gives the block size.
        let params = pool_params(&dm, &name)?;
        let block_size = *params.data_block_size * SECTOR;
        if config.pool.mode == PoolMode::Loop && block_size != config.pool.block_size.as_u64() {
            warn!(pool = %name, existing = block_size, configured = config.pool.block_size.as_u64(),
                  "pool.block_size differs from the existing pool's; the pool's own is used");
        }
        if exists {
            info!(pool = %name, mode = %config.pool.mode, "using existing thin pool");
        }
        let pool_info =
            device_info(&dm, &name)?.ok_or_else(|| PoolError::PoolMissing(name.clone()))?;
        let pool_dev = pool_info.device();
        let identity = identity_of(config, &name, ioctl::uuid_of(&pool_info), &loop_files);
        let prefix = format!("{}-snap-", config.pool.name);
        let pool = DmPool {
            pool_dev,
            dm,
            thin_uuid_prefix: thin_uuid_prefix(&name),
            prefix,
            name,
            mode: config.pool.mode,
            block_size,
            loop_files,
            identity,
            fresh,
        };
        pool.resume_left_suspended()?;
        Ok(pool)
    }

    /// For a removal: false if the device named as `id`'s is someone else's (logged; our
    /// device of `id` cannot be active under that name, so there is nothing of ours to remove).
    ///
    /// Returns an error if the device cannot be read.
    fn device_is_ours_or_absent(&self, id: ThinId) -> Result<bool, PoolError> {
        match self.own_device(id) {
            Ok(_) => Ok(true),
            Err(PoolError::ForeignDevice { name, why, .. }) => {
                warn!(device = %name, thin_id = id.get(), why = %why,
                      "dm device has our name but is not ours: not removing it");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn thin_name(&self, id: ThinId) -> String {
        format!("{}{id}", self.prefix)
    }

    /// The dm uuid thinsnap gives the device of thin id `id`: it names the pool.
    fn thin_uuid(&self, id: ThinId) -> String {
        format!("{}{id}", self.thin_uuid_prefix)
    }

    /// Whether dm device `info` (named as thin id `id`'s) is thinsnap's device of thin id `id`
    /// of this pool: its table is `thin <this pool's major:minor> <id>`, and its dm uuid, if it
    /// has one (devices of older releases have none), is the one thinsnap gives it. A device
    /// with no live table (a create cut short) is recognised by its dm uuid alone.
    ///
    /// Returns `Err(why)` if it is someone else's, or a [`PoolError`] if its table cannot be read.
    fn check_ours(
        &self,
        name: &str,
        id: ThinId,
        info: &devicemapper::DeviceInfo,
    ) -> Result<Result<(), String>, PoolError> {
        let want_uuid = self.thin_uuid(id);
        let uuid = ioctl::uuid_of(info);
        if let Some(u) = &uuid {
            if *u != want_uuid {
                return Ok(Err(format!("its dm uuid is {u:?}, not {want_uuid:?}")));
            }
        }
        if !info.flags().contains(DmFlags::DM_ACTIVE_PRESENT) {
            return Ok(if uuid.is_some() {
                Ok(())
            } else {
                Err("it has no table and no dm uuid".to_string())
            });
        }
        let table = table_of(&self.dm, name, true)?;
        let want = format!("{} {id}", self.pool_dev);
        match table.as_slice() {
            [(_, _, target, params)] if target == "thin" && params.trim() == want => Ok(Ok(())),
            lines => Ok(Err(format!(
                "its table is {:?}, not \"thin {want}\"",
                lines
                    .iter()
                    .map(|(_, _, t, p)| format!("{t} {p}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    /// The dm device named as thin id `id`'s, if there is one and it is thinsnap's.
    ///
    /// Returns [`PoolError::ForeignDevice`] if a device has the name but is someone else's.
    fn own_device(&self, id: ThinId) -> Result<Option<devicemapper::DeviceInfo>, PoolError> {
        let name = self.thin_name(id);
        let Some(info) = device_info(&self.dm, &name)? else {
            return Ok(None);
        };
        match self.check_ours(&name, id, &info)? {
            Ok(()) => Ok(Some(info)),
            Err(why) => Err(PoolError::ForeignDevice {
                name,
                id,
                pool: self.name.clone(),
                why,
            }),
        }
    }

    /// Every active dm device that is thinsnap's device of one of this pool's thin ids (named
    /// with the prefix and checked by [`DmPool::check_ours`]), with its info. Devices with the
    /// prefix that are someone else's are logged and left alone.
    ///
    /// Returns an error if the devices cannot be listed or read.
    fn own_devices(&self) -> Result<Vec<(ThinId, devicemapper::DeviceInfo)>, PoolError> {
        let mut ours = Vec::new();
        for name in ioctl::list_names(&self.dm)? {
            let Some(id) = name
                .strip_prefix(&self.prefix)
                .and_then(|i| i.parse::<ThinId>().ok())
            else {
                continue;
            };
            // Gone since the list: nothing to do.
            let Some(info) = device_info(&self.dm, &name)? else {
                continue;
            };
            match self.check_ours(&name, id, &info)? {
                Ok(()) => ours.push((id, info)),
                Err(why) => {
                    warn!(device = %name, why = %why, "dm device with our name prefix is not ours; left alone")
                }
            }
        }
        Ok(ours)
    }

    /// Resumes thinsnap's devices that a killed process left suspended: a thinsnap killed
    /// between the suspend and the resume of a pool grow, or of an origin's snapshot, leaves the
    /// device suspended in the kernel, and every reader of it (a container, the next start)
    /// blocks. The pool itself only in loop mode: in lvm and existing mode it is someone else's
    /// to suspend, and a suspended pool there is reported, not touched. Thin devices only if
    /// they are ours ([`DmPool::check_ours`]).
    ///
    /// Returns an error naming the device if one cannot be resumed.
    fn resume_left_suspended(&self) -> Result<(), PoolError> {
        let (dm, pool, mode) = (&self.dm, self.name.as_str(), self.mode);
        if device_info(dm, pool)?.is_some_and(|i| ioctl::is_suspended(&i)) {
            if mode == PoolMode::Loop {
                warn!(
                    pool,
                    "pool left suspended (a grow killed before its resume): resuming it"
                );
                ioctl::resume(dm, pool, Udev::Disk)?;
            } else {
                warn!(pool, %mode, "the pool is suspended; thin I/O blocks until its owner resumes it");
            }
        }
        for (id, info) in self.own_devices()? {
            if ioctl::is_suspended(&info) {
                let name = self.thin_name(id);
                warn!(device = %name, "thin device left suspended (a snapshot of it killed before its resume): resuming it");
                ioctl::resume(dm, &name, Udev::Private)?;
            }
        }
        Ok(())
    }

    fn message(&self, msg: &str) -> Result<(), DmError> {
        let name = DmName::new(&self.name).expect("pool name validated by config");
        ioctl::message(&self.dm, name, msg)
    }

    /// Whether an EBUSY from deleting thin id `id` is the kernel's own removal of its dm device
    /// still under way, which ends by itself: no dm device of that id exists (it is gone from
    /// the name table, its table is still being torn down, and the pool still counts the thin
    /// device open), or one exists with a deferred removal pending (a device committed while
    /// mounted, just unmounted). A device that exists without one holds the thin device open
    /// for real: the EBUSY is answered at once.
    ///
    /// Returns an error if the device's state cannot be read.
    fn closing_by_itself(&self, id: ThinId) -> Result<bool, PoolError> {
        Ok(match device_info(&self.dm, &self.thin_name(id))? {
            None => true,
            Some(info) => info.flags().contains(DmFlags::DM_DEFERRED_REMOVE),
        })
    }

    /// Maps a failed thin message to the error the engine can act on.
    fn message_err(&self, op: &'static str, id: ThinId, err: DmError) -> PoolError {
        match errno_of(&err) {
            Some(Errno::EEXIST) => PoolError::ThinExists(id),
            Some(Errno::ENODATA) | Some(Errno::ENOENT) => PoolError::ThinNotFound(id),
            Some(Errno::ENOSPC) => PoolError::NoSpace(self.name.clone()),
            // The kernel refuses every pool message in read-only (and fail) mode.
            Some(Errno::EOPNOTSUPP) => PoolError::ReadOnly(self.name.clone()),
            _ => PoolError::Dm {
                op,
                target: format!("thin id {id} in pool {}", self.name),
                source: err,
            },
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
        // Only our own device of the origin is suspended: a device of someone else's under its
        // name is not the origin (ours is then not active).
        let guard =
            if self.device_is_ours_or_absent(origin)? && device_exists(&self.dm, &origin_name)? {
                Some(ioctl::suspend(&self.dm, &origin_name, Udev::Private)?)
            } else {
                None
            };
        // On a failed message the guard resumes the origin as it drops.
        self.message(&format!("create_snap {id} {origin}"))
            .map_err(|e| match self.message_err("create_snap", id, e) {
                // The id is new; a missing device can only be the origin.
                PoolError::ThinNotFound(_) => PoolError::ThinNotFound(origin),
                other => other,
            })?;
        // The snapshot exists, but an origin left suspended would hang every reader of it: that
        // is a failed call (the engine undoes the snapshot), not a success.
        guard.map_or(Ok(()), ioctl::ResumeGuard::resume)
    }

    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        let mut attempt = 0;
        loop {
            let err = match self.message(&format!("delete {id}")) {
                Ok(()) => {
                    if attempt > 0 {
                        info!(pool = %self.name, thin_id = id.get(), busy_answers = attempt,
                              "deleted thin device once the kernel had removed its dm device");
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            attempt += 1;
            if errno_of(&err) != Some(Errno::EBUSY)
                || attempt >= DELETE_BUSY_RETRIES
                || !self.closing_by_itself(id)?
            {
                return Err(self.message_err("delete", id, err));
            }
            debug!(pool = %self.name, thin_id = id.get(), attempt,
                   "thin device still open in the pool while the kernel removes its dm device; waiting");
            std::thread::sleep(DELETE_BUSY_DELAY);
        }
    }

    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError> {
        let name = self.thin_name(id);
        let path = self.device_path(id);
        // One DM_DEV_STATUS tells both whether the device is already active (recovery, a retried
        // call) and, if it is, its device number for the node. A device of that name is reused
        // (or made again) only if it is ours (its table and dm uuid, `check_ours`); someone
        // else's is refused.
        if let Some(info) = self.own_device(id)? {
            let flags = info.flags();
            if !flags.contains(DmFlags::DM_ACTIVE_PRESENT) {
                // Half made: a thinsnap killed between the device's create and its resume. No
                // live table, so nothing can have it open: make it again.
                warn!(device = %name, "dm device without a live table; making it again");
                remove_device(&self.dm, &name, Udev::Private)?;
            } else {
                if ioctl::is_suspended(&info) {
                    // Left suspended by a killed thinsnap: resume it (it may be mounted).
                    warn!(device = %name, "dm device left suspended; resuming it");
                    ioctl::resume(&self.dm, &name, Udev::Private)?;
                }
                ioctl::ensure_node(&name, info.device());
                return Ok(path);
            }
        }
        create_device(
            &self.dm,
            &name,
            &self.thin_uuid(id),
            "thin",
            size_bytes / SECTOR,
            &format!("{} {id}", self.pool_dev),
            Udev::Private,
        )
        .map_err(|e| match &e {
            // The thin target's constructor cannot open the thin id: the pool has no such
            // device (dm-thin's __open_device answers ENODATA). Recovery asks exactly this.
            PoolError::Dm { source, .. } if errno_of(source) == Some(Errno::ENODATA) => {
                PoolError::ThinNotFound(id)
            }
            _ => e,
        })?;
        Ok(path)
    }

    fn deactivate(&self, id: ThinId) -> Result<(), PoolError> {
        if !self.device_is_ours_or_absent(id)? {
            return Ok(());
        }
        remove_device(&self.dm, &self.thin_name(id), Udev::Private)
    }

    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError> {
        let name = self.thin_name(id);
        if !self.device_is_ours_or_absent(id)? || !device_exists(&self.dm, &name)? {
            return Ok(());
        }
        // Without DM_SKIP_LOCKFS the suspend freezes the mounted filesystem: its dirty pages are
        // written to the device before the pool sees the suspend. Resumed at once.
        ioctl::suspend(&self.dm, &name, Udev::Private)?.resume()?;
        let n = dm_name(&name)?;
        let devid = DevId::Name(&n);
        self.dm
            .device_remove(&devid, Udev::Private.options(DmFlags::DM_DEFERRED_REMOVE))
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
        Ok(self.own_devices()?.into_iter().map(|(id, _)| id).collect())
    }

    fn device_path(&self, id: ThinId) -> PathBuf {
        Path::new("/dev/mapper").join(self.thin_name(id))
    }

    fn prefixed_devices(&self) -> Result<Vec<super::PrefixedDevice>, PoolError> {
        let mut found = Vec::new();
        for name in ioctl::list_names(&self.dm)? {
            let Some(rest) = name.strip_prefix(&self.prefix) else {
                continue;
            };
            let thin_id = rest.parse::<ThinId>().ok();
            // Gone since the list: nothing to say.
            let Some(info) = device_info(&self.dm, &name)? else {
                continue;
            };
            let not_ours = match thin_id {
                Some(id) => self.check_ours(&name, id, &info)?.err(),
                None => Some(format!("{rest:?} after the prefix is not a thin id")),
            };
            found.push(super::PrefixedDevice {
                name,
                thin_id,
                not_ours,
            });
        }
        Ok(found)
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
                metadata_snapshot_held: w.held_metadata_root.is_some(),
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
        let was_active = self.own_device(id)?.is_some();
        let path = self.activate(id, size_bytes)?;
        let discarded = ioctl::discard_range(&path, size_bytes);
        if !was_active {
            self.deactivate(id)?;
        }
        discarded
    }

    fn list_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        self.thin_ls(true)
    }

    fn audit_thin_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, PoolError> {
        self.thin_ls(false)
    }

    fn host_room(&self) -> Result<Option<super::HostRoom>, PoolError> {
        loopback::host_room(&self.loop_files)
    }

    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        if self.mode != PoolMode::Loop {
            return Err(PoolError::Unsupported(format!(
                "pool {} is in {} mode: thinsnap grows loop pools only; grow it with its own tools (lvextend)",
                self.name, self.mode
            )));
        }
        let len = loopback::grow(&self.loop_files, data_bytes, metadata_bytes)?;
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
        // Suspended and resumed at once: the resume makes the new table live. A failed resume
        // is an error: the pool would stay suspended, every thin device's I/O blocked.
        let suspended = ioctl::suspend(&self.dm, &self.name, Udev::Disk)?;
        crate::failpoint!("grow:pool-suspended");
        suspended.resume()?;
        info!(pool = %self.name, data_bytes = sectors * SECTOR, "reloaded pool table");
        Ok(())
    }

    fn info(&self) -> PoolInfo {
        PoolInfo {
            name: self.name.clone(),
            mode: self.mode.to_string(),
            loop_files: self.loop_files.clone(),
            identity: self.identity.clone(),
            fresh: self.fresh,
        }
    }
}

/// The parameters of pool device `name`'s table, which must be one `thin-pool` target.
///
/// Returns [`PoolError::NotAThinPool`] if it is not a thin pool, or an error if the table
/// cannot be read or parsed.
fn pool_params(dm: &DM, name: &str) -> Result<ThinPoolTargetParams, PoolError> {
    let table = table_of(dm, name, true)?;
    let (target, params) = match table.as_slice() {
        [(_, _, t, p)] => (t.clone(), p.clone()),
        _ => {
            return Err(PoolError::NotAThinPool {
                name: name.to_string(),
                found: format!("{}-target", table.len()),
            })
        }
    };
    if target != "thin-pool" {
        return Err(PoolError::NotAThinPool {
            name: name.to_string(),
            found: target,
        });
    }
    ThinPoolTargetParams::from_str(&format!("thin-pool {params}"))
        .map_err(dm_err("parse table of", name))
}

/// What the dm uuid of every thin device of pool `pool` (its dm name) starts with. LVM's
/// `-tpool` suffix is left out: LVM renames its pool's thin-pool device to `<vg>-<lv>-tpool`
/// when LVM thin volumes appear in it, and the devices made before must still be recognised.
/// dm uuids are at most 128 bytes: a long name is shortened to a hash of it.
fn thin_uuid_prefix(pool: &str) -> String {
    let pool = pool.strip_suffix("-tpool").unwrap_or(pool);
    if pool.len() <= 96 {
        return format!("thinsnap-{pool}-snap-");
    }
    // FNV-1a: stable across Rust releases (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pool.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("thinsnap-{}-{h:016x}-snap-", &pool[..64])
}

/// The pool's identity as the kernel has it (see [`PoolInfo::identity`]). In lvm mode the
/// volume group and thin pool name it (its dm name changes when LVM thin volumes come and go,
/// its uuid then gains `-tpool`).
fn identity_of(
    config: &Config,
    name: &str,
    uuid: Option<String>,
    loop_files: &LoopFiles,
) -> String {
    let uuid = uuid.map(|u| u.trim_end_matches("-tpool").to_string());
    let uuid = uuid
        .as_deref()
        .map_or("no dm uuid".to_string(), |u| format!("dm uuid {u}"));
    match config.pool.mode {
        PoolMode::Loop => format!(
            "loop pool {name} ({uuid}) on {}",
            loop_files
                .iter()
                .map(|(_, f, _)| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        PoolMode::Lvm => format!(
            "lvm pool {}/{} ({uuid})",
            config.pool.lvm.volume_group, config.pool.lvm.thin_pool
        ),
        PoolMode::Existing => format!("existing pool {name} ({uuid})"),
    }
}

/// Checks that the kernel has device-mapper (opens its control device, one version ioctl): the
/// daemon refuses to start without it before it makes anything.
///
/// Returns NoDeviceMapper otherwise.
pub fn check_device_mapper() -> Result<(), PoolError> {
    open_dm().map(|_| ())
}

#[cfg(test)]
mod tests;
