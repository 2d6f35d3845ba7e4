//! Automatic growth of a loop pool (`[pool.autogrow]`): when data or metadata use reaches the
//! threshold, the pool's file grows by `step` of its size, never beyond the configured maximum
//! nor beyond what the host's filesystem can still hold. What LVM's autoextend does for thin
//! pools, for the sparse files of loop mode.

use crate::config::AutogrowConfig;
use crate::pool::PoolStatus;

/// Metadata sizes move in 4KiB blocks (thin-provisioning.rst).
const META_BLOCK: u64 = 4096;

/// What one growth check decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrowthPlan {
    /// The new data size, if data is to grow.
    pub data: Option<u64>,
    /// The new metadata size, if metadata is to grow.
    pub metadata: Option<u64>,
    /// Why growth that was due did not happen, or happened short of `step` (for the log).
    pub limited: Vec<String>,
}

impl GrowthPlan {
    /// Whether anything grows.
    pub fn grows(&self) -> bool {
        self.data.is_some() || self.metadata.is_some()
    }
}

/// Plans the growth `config` asks for, given the pool's status and `room`, the bytes the host's
/// filesystem can still give the pool's files beyond what their current sizes already promise.
pub fn plan(config: &AutogrowConfig, st: &PoolStatus, room: u64) -> GrowthPlan {
    let mut plan = GrowthPlan::default();
    let mut room = room;
    let block = st.block_size_bytes.max(1);
    for (what, used, total, max, unit) in [
        (
            "data",
            st.data_used_bytes,
            st.data_total_bytes,
            config.max_data_size.as_u64(),
            block,
        ),
        (
            "metadata",
            st.metadata_used_bytes,
            st.metadata_total_bytes,
            config.max_metadata_size.as_u64(),
            META_BLOCK,
        ),
    ] {
        if total == 0 || (used as f64) < total as f64 * config.threshold.0 / 100.0 {
            continue;
        }
        let max = max / unit * unit;
        if total >= max {
            plan.limited.push(format!(
                "{what} is at its maximum of {} bytes (pool.autogrow.max_{what}_size)",
                max
            ));
            continue;
        }
        let step = ((total as f64 * config.step.0 / 100.0).ceil() as u64).max(unit);
        let mut want = total.saturating_add(step).min(max);
        if want - total > room {
            plan.limited.push(format!(
                "the host's filesystem can hold only {room} more bytes of pool files"
            ));
            want = total + room;
        }
        want = want / unit * unit;
        if want <= total {
            continue;
        }
        room -= want - total;
        if what == "data" {
            plan.data = Some(want);
        } else {
            plan.metadata = Some(want);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Percent;
    use bytesize::ByteSize;

    const GIB: u64 = 1 << 30;

    fn status(data_used: u64, data_total: u64, meta_used: u64, meta_total: u64) -> PoolStatus {
        PoolStatus {
            data_used_bytes: data_used,
            data_total_bytes: data_total,
            metadata_used_bytes: meta_used,
            metadata_total_bytes: meta_total,
            block_size_bytes: 64 << 10,
            ..PoolStatus::default()
        }
    }

    fn config() -> AutogrowConfig {
        AutogrowConfig {
            enabled: true,
            threshold: Percent(80.0),
            step: Percent(50.0),
            max_data_size: ByteSize::gib(20),
            max_metadata_size: ByteSize::gib(1),
            interval_seconds: 10,
        }
    }

    #[test]
    fn below_the_threshold_nothing_grows() {
        let p = plan(&config(), &status(7 * GIB, 10 * GIB, 1, GIB / 2), u64::MAX);
        assert_eq!(p, GrowthPlan::default());
        assert!(!p.grows());
    }

    #[test]
    fn at_the_threshold_data_grows_by_step() {
        let p = plan(&config(), &status(8 * GIB, 10 * GIB, 1, GIB / 2), u64::MAX);
        assert_eq!(p.data, Some(15 * GIB));
        assert_eq!(p.metadata, None);
        assert!(p.limited.is_empty());
    }

    #[test]
    fn the_maximum_bounds_growth_and_then_stops_it() {
        let p = plan(&config(), &status(16 * GIB, 18 * GIB, 1, GIB / 2), u64::MAX);
        assert_eq!(p.data, Some(20 * GIB));
        let p = plan(&config(), &status(19 * GIB, 20 * GIB, 1, GIB / 2), u64::MAX);
        assert_eq!(p.data, None);
        assert!(p.limited[0].contains("max_data_size"), "{:?}", p.limited);
    }

    #[test]
    fn the_host_free_space_bounds_growth_in_whole_blocks() {
        let room = GIB + 1000;
        let p = plan(&config(), &status(9 * GIB, 10 * GIB, 1, GIB / 2), room);
        assert_eq!(p.data, Some(11 * GIB));
        assert!(p.limited[0].contains("host"), "{:?}", p.limited);
        let p = plan(&config(), &status(9 * GIB, 10 * GIB, 1, GIB / 2), 1000);
        assert_eq!(p.data, None, "less than one block of room");
    }

    #[test]
    fn metadata_grows_too_and_shares_the_room() {
        let p = plan(
            &config(),
            &status(9 * GIB, 10 * GIB, 450 << 20, 512 << 20),
            5 * GIB + (100 << 20),
        );
        assert_eq!(p.data, Some(15 * GIB));
        assert_eq!(p.metadata, Some((512 << 20) + (100 << 20)));
    }
}
