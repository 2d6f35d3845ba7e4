//! Space: the free-space floor that refuses new snapshots before the pool runs dry, and growing
//! the pool (on request, and `pool.autogrow` as it fills). The growth plan itself is pure and
//! lives in [`super::autogrow`]; this module runs it against the pool.

use tracing::{info, warn};

use super::{autogrow, pool_err, stopped, Engine, EngineError, SIZE_LABEL};
use crate::pool::{PoolError, PoolStatus, ThinPool};

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

impl Engine {
    /// Refuses to create while free data or metadata space is under the floor
    /// (`pool.min_free_space`), or while the pool cannot take writes. With `pool.autogrow`, grows
    /// the pool first and refuses only if that was not enough.
    ///
    /// Returns ResourceExhausted saying how much is free and how much is required; otherwise
    /// the pool's status as read.
    pub(super) async fn check_space(&self) -> Result<PoolStatus, EngineError> {
        let floor = self.settings.min_free_percent;
        // One trip to the blocking pool for both: this runs on every Prepare and View.
        let read = || {
            self.on_pool(|pool| {
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
        for (what, used, total) in [
            ("data", st.data_used_bytes, st.data_total_bytes),
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
            let (free, required) =
                free_and_required(st.data_used_bytes, st.data_total_bytes, floor);
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
        Ok(st)
    }

    /// The size label's upper bound: no snapshot may be larger than the pool could ever hold
    /// (its data space now, or what `pool.autogrow` may grow it to). A larger filesystem could
    /// never be filled, and resize2fs would spend pool space on metadata for space that is not
    /// there.
    ///
    /// Returns InvalidArgument naming the label, the size and the bound.
    pub(super) fn check_size_bound(
        &self,
        key: &str,
        want: u64,
        st: &PoolStatus,
    ) -> Result<(), EngineError> {
        let bound = self
            .settings
            .autogrow
            .as_ref()
            .map_or(0, |a| a.max_data_size.as_u64())
            .max(st.data_total_bytes);
        if want > bound {
            let human = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
            return Err(EngineError::InvalidArgument(format!(
                "label {SIZE_LABEL} of {key:?}: {} is more than the pool can ever hold ({})",
                human(want),
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
        // Checked and grown under the exclusive kernel lock: two requests cannot both spend the
        // same room.
        let _exclusive = self.kernel.write().await;
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
        self.grow_locked(data, metadata).await
    }

    /// Grows the pool online (loop mode): data and/or metadata to the given sizes. Holds the
    /// kernel lock exclusively: the pool is suspended while its table is reloaded.
    ///
    /// Returns FailedPrecondition for pools thinsnap did not make, InvalidArgument for a size
    /// smaller than now.
    pub async fn grow(&self, data: Option<u64>, metadata: Option<u64>) -> Result<(), EngineError> {
        let _exclusive = self.kernel.write().await;
        self.grow_locked(data, metadata).await
    }

    /// [`Engine::grow`] under the exclusive kernel lock its caller holds.
    async fn grow_locked(
        &self,
        data: Option<u64>,
        metadata: Option<u64>,
    ) -> Result<(), EngineError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.grow(data, metadata))
            .await
            .map_err(|e| EngineError::Internal(format!("pool task failed: {e}")))?
            .map_err(|e| match e {
                PoolError::Unsupported(m) => EngineError::FailedPrecondition(m),
                PoolError::Invalid(m) => EngineError::InvalidArgument(m),
                e => pool_err("grow the pool")(e),
            })
    }
}
