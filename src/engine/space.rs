//! Space: the free-space floor that refuses new snapshots before the pool runs dry, and growing
//! the pool (on request, and `pool.autogrow` as it fills). The growth plan itself is pure and
//! lives in [`super::autogrow`]; this module runs it against the pool.

use tracing::{info, warn};

use super::limits::SizeAsk;
use super::{autogrow, pool_err, stopped, Engine, EngineError};
use crate::pool::{PoolError, PoolStatus, ThinPool};

/// Growth of a device that a Prepare with the size label has reserved in the free-space floor
/// ([`Engine::check_space_reserving`]), given back when dropped (the call ended, however).
pub(super) struct Reservation<'a> {
    total: &'a std::sync::Mutex<u64>,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut total = self.total.lock().unwrap_or_else(|p| p.into_inner());
        *total = total.saturating_sub(self.bytes);
    }
}

/// Free bytes of a space and the bytes the free-space floor (percent) requires of it.
fn free_and_required(used: u64, total: u64, floor: f64) -> (u64, u64) {
    let free = total.saturating_sub(used);
    (free, (total as f64 * floor / 100.0).ceil() as u64)
}

/// Whether the pool is out of data space or under the floor in data or metadata.
fn below_floor(st: &PoolStatus, floor: f64) -> bool {
    let under = |used, total| {
        let (free, required) = free_and_required(used, total, floor);
        free < required
    };
    st.out_of_data_space
        || under(st.data_used_bytes, st.data_total_bytes)
        || under(st.metadata_used_bytes, st.metadata_total_bytes)
}

/// The store's floor (`store.min_free`, `floor` bytes; 0: none): the database under `root`
/// grows with every snapshot, and a full root filesystem fails its writes, Commit and Remove
/// included. Only new snapshots are refused (the caller is Prepare, View or the spares'
/// refiller), so the calls that give space back always run.
///
/// Returns ResourceExhausted naming `root` with its free and required bytes, or Internal if the
/// free space cannot be read.
fn check_store_floor(root: &std::path::Path, floor: u64) -> Result<(), EngineError> {
    if floor == 0 {
        return Ok(());
    }
    let fs = nix::sys::statvfs::statvfs(root).map_err(|e| {
        EngineError::Internal(format!(
            "cannot read the free space of the filesystem of root {}: {e}",
            root.display()
        ))
    })?;
    let free = (fs.blocks_available() as u64).saturating_mul(fs.fragment_size() as u64);
    if free < floor {
        let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
        return Err(EngineError::ResourceExhausted(format!(
            "the filesystem of root {} (the store) has {} ({free} bytes) free, store.min_free \
             requires {} ({floor} bytes); free space there, or remove snapshots",
            root.display(),
            human(free),
            human(floor)
        )));
    }
    Ok(())
}

impl Engine {
    /// Refuses to create while free data or metadata space is under the floor
    /// (`pool.min_free_space`), while the pool cannot take writes, or while the filesystem of
    /// `root` (the store's) is under `store.min_free`. With `pool.autogrow`, grows
    /// the pool first and refuses only if that was not enough.
    ///
    /// Returns ResourceExhausted saying how much is free and how much is required; otherwise
    /// the pool's status as read.
    pub(super) async fn check_space(&self) -> Result<PoolStatus, EngineError> {
        self.check_space_reserving(None).await.map(|(st, _)| st)
    }

    /// [`Engine::check_space`] for a Prepare or View whose size label (or a raised
    /// `fs.base_size`) asks for a device of `want` bytes, `growth` = (key, want, bytes) beyond
    /// its parent's: `want` within
    /// [`Engine::check_size_bound`], and the growth must fit above the floor too,
    /// after what the other such calls under way have reserved, and is reserved until the
    /// returned [`Reservation`] is dropped (when the call ends). So a burst of them cannot all
    /// pass the floor on the same free space and then fill the pool together. Every floor check
    /// counts what is reserved as used.
    ///
    /// Returns InvalidArgument as [`Engine::check_size_bound`]; ResourceExhausted naming the key,
    /// the growth, what is free and reserved, and the floor; otherwise as [`Engine::check_space`].
    pub(super) async fn check_space_reserving(
        &self,
        growth: Option<(&str, SizeAsk, u64)>,
    ) -> Result<(PoolStatus, Option<Reservation<'_>>), EngineError> {
        let floor = self.settings.min_free_percent;
        // One trip to the blocking pool for all three: this runs on every Prepare and View.
        let read = || {
            let root = self.settings.root.clone();
            let store_floor = self.settings.store_min_free;
            self.on_pool(move |pool| {
                check_store_floor(&root, store_floor)?;
                let st = pool.status().map_err(pool_err("read pool status"))?;
                let host = pool
                    .host_room()
                    .map_err(pool_err("read the host's free space"))?;
                Ok((st, host))
            })
        };
        let (mut st, mut host) = read().await?;
        if self.settings.autogrow.is_some() && below_floor(&st, floor) {
            match self.autogrow().await {
                Ok(true) => (st, host) = read().await?,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot grow the pool"),
            }
        }
        let name = self.pool.info().name;
        if st.read_only || st.out_of_data_space || st.needs_check {
            return Err(EngineError::ResourceExhausted(format!(
                "thin pool {name} cannot take writes (read_only={}, out_of_data_space={}, needs_check={}); \
                 remove snapshots or grow the pool",
                st.read_only, st.out_of_data_space, st.needs_check
            )));
        }
        let reserved_now = *self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        for (what, used, total) in [
            (
                "data",
                st.data_used_bytes.saturating_add(reserved_now),
                st.data_total_bytes,
            ),
            ("metadata", st.metadata_used_bytes, st.metadata_total_bytes),
        ] {
            let (free, required) = free_and_required(used, total, floor);
            if free < required {
                let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
                return Err(EngineError::ResourceExhausted(format!(
                    "thin pool {name}: {} of {what} space free ({:.1}%), pool.min_free_space requires {} ({floor}%); \
                     remove snapshots or grow the pool",
                    human(free),
                    free as f64 * 100.0 / total.max(1) as f64,
                    human(required)
                )));
            }
        }
        // A loop pool's sparse files may promise more than the host's filesystem still holds:
        // the pool's free space is only as good as the host's, and a write the host cannot back
        // puts the pool in fail mode. Only the part the host can back counts against the floor.
        if let Some(h) = host {
            let (free, required) = free_and_required(
                st.data_used_bytes.saturating_add(reserved_now),
                st.data_total_bytes,
                floor,
            );
            let backed = free.saturating_sub(h.shortfall());
            if backed < required {
                let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
                return Err(EngineError::ResourceExhausted(format!(
                    "thin pool {name}: the host filesystem under its files has {} free, but the sparse \
                     files may still take {}: only {} of the pool's free data space can be written, \
                     pool.min_free_space requires {} ({floor}%); free space on the host, or remove snapshots",
                    human(h.free),
                    human(h.promised),
                    human(backed),
                    human(required)
                )));
            }
        }
        let Some((key, want, bytes)) = growth else {
            return Ok((st, None));
        };
        // A size the pool could never hold is the request's fault, whatever is free now.
        self.check_size_bound(key, want, &st)?;
        // Checked and reserved under one lock: of calls that meet here, each sees the others'.
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let (free, required) = free_and_required(st.data_used_bytes, st.data_total_bytes, floor);
        let backed = free.saturating_sub(host.map_or(0, |h| h.shortfall()));
        let left = backed.saturating_sub(*reserved);
        if left < required.saturating_add(bytes) {
            let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
            return Err(EngineError::ResourceExhausted(format!(
                "thin pool {name}: {} of {key:?} grows its device by {} beyond its \
                 parent's, but of the {} of data space free (that the host can back), {} is \
                 reserved by Prepares with that label under way and pool.min_free_space requires \
                 {} ({floor}%): {} can be promised; ask for less, remove snapshots or grow the pool",
                want.from,
                human(bytes),
                human(backed),
                human(*reserved),
                human(required),
                human(left.saturating_sub(required))
            )));
        }
        *reserved += bytes;
        Ok((
            st,
            Some(Reservation {
                total: &self.reserved,
                bytes,
            }),
        ))
    }

    /// The bytes snapshot `key` of `parent` (the base when empty or unknown: the call then fails
    /// NotFound anyway) grows by when `want` asks for a size.
    ///
    /// Returns InvalidArgument naming who asked, the key and both sizes if `want` is smaller
    /// than the parent's device (a thin snapshot is never smaller than its origin, and no
    /// filesystem here shrinks); an error if the store cannot be read.
    pub(super) fn growth_of(
        &self,
        key: &str,
        parent: &str,
        want: SizeAsk,
    ) -> Result<u64, EngineError> {
        let from = if parent.is_empty() {
            self.base.size
        } else {
            self.store.get(parent)?.map_or(self.base.size, |r| r.size)
        };
        if want.bytes < from {
            let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
            return Err(EngineError::InvalidArgument(format!(
                "{} of {key:?}: {} is smaller than its parent's device ({}); a snapshot is never smaller than its parent",
                want.from,
                human(want.bytes),
                human(from)
            )));
        }
        Ok(want.bytes - from)
    }

    /// `fs.max_size`: the largest device a size label may ask for.
    ///
    /// Returns InvalidArgument naming the label, the key, the size and the maximum.
    pub(super) fn check_max_size(&self, key: &str, want: SizeAsk) -> Result<(), EngineError> {
        if let Some(max) = self.settings.fs.max_size {
            if want.bytes > max.as_u64() {
                let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
                return Err(EngineError::InvalidArgument(format!(
                    "{} of {key:?}: {} is more than fs.max_size ({})",
                    want.from,
                    human(want.bytes),
                    human(max.as_u64())
                )));
            }
        }
        Ok(())
    }

    /// The size label's upper bound: no snapshot may be larger than the pool could ever hold
    /// (its data space now, or what `pool.autogrow` may grow it to). A larger filesystem could
    /// never be filled, and resize2fs would spend pool space on metadata for space that is not
    /// there.
    ///
    /// Returns InvalidArgument naming the label, the size and the bound.
    /// The size of a new snapshot of the base device (`parent` empty) when `fs.base_size` was
    /// raised after the base device was made: the base keeps its size and filesystem (it is
    /// never rewritten under the snapshots that share its blocks); each new image's first layer
    /// is made at the new size and its filesystem grown, as with the size label, and every
    /// snapshot above it inherits that size. Docker's devicemapper applied a raised
    /// `dm.basesize` to new images and their containers the same way. A smaller `fs.base_size`
    /// never shrinks anything (`None`).
    pub(super) fn grown_base_size(&self, parent: &str) -> Option<u64> {
        let configured = self.settings.fs.base_size.as_u64();
        (parent.is_empty() && configured > self.base.size).then_some(configured)
    }

    pub(super) fn check_size_bound(
        &self,
        key: &str,
        want: SizeAsk,
        st: &PoolStatus,
    ) -> Result<(), EngineError> {
        let bound = self
            .settings
            .autogrow
            .as_ref()
            .map_or(0, |a| a.max_data_size.as_u64())
            .max(st.data_total_bytes);
        if want.bytes > bound {
            let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
            return Err(EngineError::InvalidArgument(format!(
                "{} of {key:?}: {} is more than the pool can ever hold ({})",
                want.from,
                human(want.bytes),
                human(bound)
            )));
        }
        Ok(())
    }

    /// `pool.autogrow`: grows the pool if its use reached the threshold, as far as the maximum
    /// and the host's free space allow. Returns whether it grew.
    ///
    /// Returns an error if the pool's status cannot be read or growing failed.
    pub async fn autogrow(&self) -> Result<bool, EngineError> {
        let Some(config) = self.settings.autogrow.clone() else {
            return Ok(false);
        };
        let (st, room) = self
            .on_pool(|pool| {
                let st = pool.status().map_err(pool_err("read pool status"))?;
                let room = pool
                    .host_room()
                    .map_err(pool_err("read the host's free space"))?;
                Ok((st, room))
            })
            .await?;
        let Some(room) = room else {
            return Ok(false);
        };
        let plan = autogrow::plan(&config, &st, room.room());
        {
            // Said once, not at every check, until it changes.
            let mut last = self
                .autogrow_limited
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *last != plan.limited {
                for why in &plan.limited {
                    warn!(pool = %self.pool.info().name, "autogrow limited: {why}");
                }
                last.clone_from(&plan.limited);
            }
        }
        if !plan.grows() {
            return Ok(false);
        }
        self.grow(plan.data, plan.metadata).await?;
        info!(
            pool = %self.pool.info().name,
            data_from = st.data_total_bytes,
            data_to = plan.data,
            metadata_from = st.metadata_total_bytes,
            metadata_to = plan.metadata,
            "autogrow: grew the pool"
        );
        Ok(true)
    }

    /// The periodic `pool.autogrow` check, until `stop` turns true; returns at once if autogrow
    /// is off. The server runs it as one of its tasks.
    pub async fn run_autogrow(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(config) = &self.settings.autogrow else {
            return;
        };
        let mut tick =
            tokio::time::interval(std::time::Duration::from_secs(config.interval_seconds));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tick.tick() => {}
            }
            if let Err(err) = self.autogrow().await {
                warn!(error = %err, "autogrow: cannot grow the pool");
            }
        }
    }

    /// `thinsnap pool grow`: grows the pool as [`Engine::grow`] does, within the bounds autogrow
    /// keeps to: never beyond `pool.autogrow.max_data_size` / `max_metadata_size` (whether
    /// autogrow is on or not), nor by more than the host's filesystem can still give the pool's
    /// files beyond what they already promise. A typo like 100TiB would otherwise grow the files
    /// for good, and the free-space floor would then refuse every Prepare.
    ///
    /// Returns InvalidArgument naming the requested size and the maximum, ResourceExhausted
    /// naming the growth asked and the host's room; as [`Engine::grow`] otherwise.
    pub async fn grow_on_request(
        &self,
        data: Option<u64>,
        metadata: Option<u64>,
    ) -> Result<(), EngineError> {
        let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
        let (max_data, max_meta) = self.settings.grow_max;
        for (what, want, max) in [("data", data, max_data), ("metadata", metadata, max_meta)] {
            if let Some(want) = want.filter(|&w| w > max) {
                return Err(EngineError::InvalidArgument(format!(
                    "pool grow: {what} size {} ({want} bytes) is above the allowed maximum {} \
                     ({max} bytes, pool.autogrow.max_{what}_size)",
                    human(want),
                    human(max)
                )));
            }
        }
        // Checked and grown under the exclusive pool-growth lock: two requests cannot both spend the
        // same room.
        let exclusive = self.grow_lock.clone().write_owned().await;
        let pool = self.pool.clone();
        let (st, room) = tokio::task::spawn_blocking(move || {
            let st = pool.status().map_err(pool_err("read pool status"))?;
            let room = pool
                .host_room()
                .map_err(pool_err("read the host's free space"))?;
            Ok::<_, EngineError>((st, room))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("pool task failed: {e}")))??;
        if let Some(room) = room {
            let more = data.map_or(0, |d| d.saturating_sub(st.data_total_bytes))
                + metadata.map_or(0, |m| m.saturating_sub(st.metadata_total_bytes));
            if more > room.room() {
                return Err(EngineError::ResourceExhausted(format!(
                    "pool grow: the requested sizes add {} ({more} bytes) to the pool's files, \
                     but the host filesystem under them allows {} more ({} free, of which the \
                     sparse files already promise {})",
                    human(more),
                    human(room.room()),
                    human(room.free),
                    human(room.promised)
                )));
            }
        }
        self.grow_locked(exclusive, data, metadata).await
    }

    /// Grows the pool online (loop mode): data and/or metadata to the given sizes. Holds the
    /// pool-growth lock exclusively: the pool is suspended while its table is reloaded.
    ///
    /// Returns FailedPrecondition for pools thinsnap did not make, InvalidArgument for a size
    /// smaller than now.
    pub async fn grow(&self, data: Option<u64>, metadata: Option<u64>) -> Result<(), EngineError> {
        // Owned by the blocking closure: a caller gone meanwhile does not let other kernel calls
        // in while the pool is suspended.
        let exclusive = self.grow_lock.clone().write_owned().await;
        self.grow_locked(exclusive, data, metadata).await
    }

    /// [`Engine::grow`] under the exclusive pool-growth lock its caller holds, which goes with the
    /// grow into its blocking closure.
    async fn grow_locked(
        &self,
        exclusive: tokio::sync::OwnedRwLockWriteGuard<()>,
        data: Option<u64>,
        metadata: Option<u64>,
    ) -> Result<(), EngineError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let r = pool.grow(data, metadata);
            drop(exclusive);
            r
        })
        .await
        .map_err(|e| EngineError::Internal(format!("pool task failed: {e}")))?
        .map_err(|e| match e {
            PoolError::Unsupported(m) => EngineError::FailedPrecondition(m),
            PoolError::Invalid(m) => EngineError::InvalidArgument(m),
            e => pool_err("grow the pool")(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{no_format, no_labels, prep, reopen, setup, T};
    use super::super::{recovery, Kind, Settings};
    use super::*;
    use crate::config::FsConfig;

    /// Issue 24 item 8: under `store.min_free` (here more than any filesystem has), Prepare and
    /// View are refused with ResourceExhausted naming the root and the free and required bytes;
    /// Commit and Remove, which give space back, are not.
    #[tokio::test]
    async fn under_the_store_floor_only_new_snapshots_are_refused() {
        let t = setup();
        prep(&t, "a", "").await.expect("prepare a");
        prep(&t, "b", "").await.expect("prepare b");
        t.engine
            .commit("c", "b", no_labels())
            .await
            .expect("commit c");
        let (_dir, path, pool) = t.into_parts();
        let mut s = Settings::with_fs(FsConfig::default());
        let root = tempfile::tempdir().expect("root");
        s.root = root.path().to_path_buf();
        s.store_min_free = u64::MAX / 4;
        let (engine, _) =
            recovery::start(pool.clone(), reopen(&path), s, &no_format).expect("restart");
        let t = T {
            _dir,
            path,
            pool,
            engine: Arc::new(engine),
        };
        for (kind, parent) in [(Kind::Active, ""), (Kind::View, "c")] {
            let err = t
                .engine
                .create(kind, "new", parent, no_labels())
                .await
                .expect_err("under the store's floor");
            let EngineError::ResourceExhausted(msg) = &err else {
                panic!("{kind:?}: expected ResourceExhausted, got {err:?}");
            };
            let root_text = format!("root {}", root.path().display());
            assert!(
                msg.contains(&root_text)
                    && msg.contains("store.min_free")
                    && msg.contains(&format!("({} bytes)", u64::MAX / 4)),
                "{msg}"
            );
            assert!(t.engine.record("new").expect("read").is_none());
        }
        t.engine
            .commit("d", "a", no_labels())
            .await
            .expect("commit under the floor");
        t.engine.remove("d").await.expect("remove under the floor");
        t.engine.remove("c").await.expect("remove under the floor");
    }
}
