//! The `[pool]` section and its `[pool.lvm]` and `[pool.autogrow]` tables: how the thin pool is
//! obtained and sized, with their defaults and the checks of their values.
//!
//! It only checks values (dm-thin's bounds, LVM's name rule); it must not look at devices, run
//! lvm2 tools or touch the disk.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{exact_bytes, invalid, ConfigError, Percent, MAX_SIZE};

/// dm-thin data block size bounds (thin-provisioning.rst: a multiple of 64KiB, 64KiB..1GiB).
const MIN_BLOCK: u64 = 64 * 1024;
const MAX_BLOCK: u64 = 1024 * 1024 * 1024;
/// dm-thin metadata device bounds: below 2MiB is useless, above ~16GiB the kernel ignores the rest.
const MIN_META: u64 = 2 * 1024 * 1024;
const MAX_META: u64 = 16 * 1024 * 1024 * 1024;

/// How the thin pool is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Sparse files under `root` on loop devices (Docker's loop-lvm); thinsnap creates the pool.
    Loop,
    /// A thin pool someone else made (LVM, say), adopted by its dm name.
    Existing,
    /// An LVM thin pool provisioned by thinsnap on the block device `[pool.lvm] device`
    /// (Docker's direct-lvm).
    Lvm,
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::Loop => "loop",
            PoolMode::Existing => "existing",
            PoolMode::Lvm => "lvm",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// dm name of the thin pool; also the prefix of every device name thinsnap derives.
    pub name: String,
    pub mode: PoolMode,
    /// Loop mode: size of the sparse data file.
    #[serde(serialize_with = "exact_bytes")]
    pub data_size: ByteSize,
    /// Loop mode: size of the sparse metadata file.
    #[serde(serialize_with = "exact_bytes")]
    pub metadata_size: ByteSize,
    /// Loop mode: dm-thin data block size (allocation unit).
    #[serde(serialize_with = "exact_bytes")]
    pub block_size: ByteSize,
    /// Loop mode: zero newly provisioned blocks. Off by default, as in Docker and containerd:
    /// the filesystem never exposes blocks it did not write.
    pub zero_blocks: bool,
    /// Prepare and View are refused while free data or metadata space is below this share.
    pub min_free_space: Percent,
    /// Existing mode: adopt a pool that holds thin devices thinsnap does not know.
    pub allow_foreign_devices: bool,
    /// Lvm mode: how to provision the pool.
    pub lvm: LvmConfig,
    /// Loop mode: grow the pool's files by themselves as they fill.
    pub autogrow: AutogrowConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            name: "thinsnap-pool".to_string(),
            mode: PoolMode::Loop,
            data_size: ByteSize::gib(100),
            metadata_size: ByteSize::gib(2),
            block_size: ByteSize::kib(64),
            zero_blocks: false,
            min_free_space: Percent(10.0),
            allow_foreign_devices: false,
            lvm: LvmConfig::default(),
            autogrow: AutogrowConfig::default(),
        }
    }
}

impl PoolConfig {
    /// Checks `[pool]`, then `[pool.autogrow]` when enabled and `[pool.lvm]` in lvm mode.
    ///
    /// Returns an error naming the first `pool.*` key whose value is out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        // Derived names add "-snap-16777215" (14 bytes); dm names are at most 127 bytes.
        if name.is_empty() || name.len() > 100 {
            return Err(invalid("pool.name", "must be 1 to 100 characters"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            return Err(invalid(
                "pool.name",
                format!("{name:?}: only ASCII letters, digits and - _ . + are allowed"),
            ));
        }
        let block = self.block_size.as_u64();
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) || !block.is_multiple_of(MIN_BLOCK) {
            return Err(invalid(
                "pool.block_size",
                format!("{block} bytes: must be a multiple of 64KiB between 64KiB and 1GiB"),
            ));
        }
        let meta = self.metadata_size.as_u64();
        if !(MIN_META..=MAX_META).contains(&meta) || !meta.is_multiple_of(4096) {
            return Err(invalid(
                "pool.metadata_size",
                format!("{meta} bytes: must be a multiple of 4KiB between 2MiB and 16GiB"),
            ));
        }
        let data = self.data_size.as_u64();
        if data < 16 * block || !data.is_multiple_of(block) {
            return Err(invalid(
                "pool.data_size",
                format!(
                    "{data} bytes: must be a multiple of pool.block_size ({block}) and at least 16 blocks"
                ),
            ));
        }
        // TOML integers are i64 (and no pool reaches 8EiB): a larger size could not even be
        // written back to a config file (found by fuzz_config).
        if data > MAX_SIZE {
            return Err(invalid(
                "pool.data_size",
                format!("{data} bytes: must be below 8EiB"),
            ));
        }
        if self.autogrow.enabled {
            self.autogrow.validate(self.mode)?;
        }
        if self.mode == PoolMode::Lvm {
            self.lvm.validate()?;
        }
        Ok(())
    }
}

/// Automatic growth of a loop pool (what LVM's autoextend does for its thin pools).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutogrowConfig {
    /// Off by default: a loop pool stays at `data_size` / `metadata_size` unless told otherwise.
    pub enabled: bool,
    /// Grow when data (or metadata) use reaches this share of its size.
    pub threshold: Percent,
    /// Grow by this share of the current size (less if a maximum or the host's disk says so).
    pub step: Percent,
    /// Never grow the data file beyond this.
    #[serde(serialize_with = "exact_bytes")]
    pub max_data_size: ByteSize,
    /// Never grow the metadata file beyond this (the kernel uses at most 16GiB of it).
    #[serde(serialize_with = "exact_bytes")]
    pub max_metadata_size: ByteSize,
    /// How often the pool's use is checked, in seconds (it is also checked before every Prepare
    /// or View that the free-space floor would refuse).
    pub interval_seconds: u64,
}

impl Default for AutogrowConfig {
    fn default() -> Self {
        AutogrowConfig {
            enabled: false,
            threshold: Percent(80.0),
            step: Percent(20.0),
            max_data_size: ByteSize::tib(1),
            max_metadata_size: ByteSize::gib(16),
            interval_seconds: 10,
        }
    }
}

impl AutogrowConfig {
    /// Checks an enabled `[pool.autogrow]` of a pool in `mode`.
    ///
    /// Returns an error naming the `pool.autogrow.*` key when the pool is not a loop pool or a
    /// value is out of range.
    fn validate(&self, mode: PoolMode) -> Result<(), ConfigError> {
        if mode != PoolMode::Loop {
            return Err(invalid(
                "pool.autogrow.enabled",
                format!(
                    "only loop pools grow by themselves (pool.mode is {mode}; use pool.lvm.autoextend_* for lvm)"
                ),
            ));
        }
        if self.step.0 <= 0.0 {
            return Err(invalid("pool.autogrow.step", "must be above 0%"));
        }
        if self.threshold.0 <= 0.0 {
            return Err(invalid("pool.autogrow.threshold", "must be above 0%"));
        }
        if self.max_data_size.as_u64() > MAX_SIZE {
            return Err(invalid("pool.autogrow.max_data_size", "must be below 8EiB"));
        }
        if self.max_metadata_size.as_u64() > MAX_META {
            return Err(invalid(
                "pool.autogrow.max_metadata_size",
                "must be at most 16GiB (the kernel uses no more)",
            ));
        }
        if self.interval_seconds == 0 {
            return Err(invalid(
                "pool.autogrow.interval_seconds",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Lvm mode settings (Docker's `dm.directlvm_device` and friends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LvmConfig {
    /// The block device to give to LVM (it is wiped: a device holding a filesystem is refused
    /// unless `force`).
    pub device: Option<std::path::PathBuf>,
    /// Volume group name.
    pub volume_group: String,
    /// Thin pool logical volume name.
    pub thin_pool: String,
    /// Share of the volume group for data.
    pub thinp_percent: u32,
    /// Share of the volume group for metadata.
    pub thinp_metapercent: u32,
    /// LVM autoextends the pool when its data usage crosses this percentage...
    pub autoextend_threshold: u32,
    /// ...by this percentage of its size.
    pub autoextend_percent: u32,
    /// Wipe a device that holds a filesystem or other signature.
    pub force: bool,
}

impl Default for LvmConfig {
    fn default() -> Self {
        LvmConfig {
            device: None,
            volume_group: "thinsnap".to_string(),
            thin_pool: "thinpool".to_string(),
            thinp_percent: 95,
            thinp_metapercent: 1,
            autoextend_threshold: 80,
            autoextend_percent: 20,
            force: false,
        }
    }
}

impl LvmConfig {
    /// Checks `[pool.lvm]` of a pool in lvm mode (in other modes the section is unused).
    ///
    /// Returns an error naming the `pool.lvm.*` key when the device is missing, a name breaks
    /// LVM's rule or a share is out of range.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.device.is_none() {
            return Err(invalid(
                "pool.lvm.device",
                "lvm mode needs the block device to use",
            ));
        }
        // The names end up in a path (the profile file) and on lvm2 command lines.
        check_lvm_name("pool.lvm.volume_group", &self.volume_group)?;
        check_lvm_name("pool.lvm.thin_pool", &self.thin_pool)?;
        if self.thinp_percent == 0
            || self.thinp_percent + self.thinp_metapercent > 100
            || self.thinp_metapercent == 0
        {
            return Err(invalid(
                "pool.lvm.thinp_percent",
                "thinp_percent and thinp_metapercent must be above 0 and add up to at most 100",
            ));
        }
        if self.autoextend_threshold > 100 {
            return Err(invalid(
                "pool.lvm.autoextend_threshold",
                "must be at most 100",
            ));
        }
        Ok(())
    }
}

/// LVM's rule for volume group and logical volume names (lvm(8), "VALID NAMES").
///
/// Returns an error naming `key` when `name` is empty, longer than 127 bytes, starts with `-`,
/// is `.` or `..`, or holds anything but ASCII letters, digits and `+ _ . -`.
fn check_lvm_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{name:?}: LVM names use only ASCII letters, digits and + _ . -, are 1 to 127 \
                 characters, do not start with - and are not . or .."
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn lvm_with(key: &str, value: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[pool]\nmode = \"lvm\"\n[pool.lvm]\ndevice = \"/dev/vdb\"\n{key} = {value:?}\n"
        ))
    }

    #[test]
    fn lvm_names_follow_lvms_rule() {
        for good in ["thinsnap_vg-1.a+b", "x", "a..b", &"v".repeat(127)] {
            assert!(check_lvm_name("k", good).is_ok(), "{good}");
        }
        let long = "v".repeat(128);
        for bad in [
            "",
            "-x",
            ".",
            "..",
            "a/b",
            "a b",
            "../../etc",
            "é",
            "a\n",
            &long,
        ] {
            let e = check_lvm_name("pool.lvm.volume_group", bad).expect_err(bad);
            assert!(e.to_string().contains("pool.lvm.volume_group"), "{e}");
        }
    }

    #[test]
    fn lvm_mode_refuses_bad_volume_group_and_thin_pool_names() {
        for key in ["volume_group", "thin_pool"] {
            for bad in ["", "-vg", "..", "a/b", "../../etc/x"] {
                let e = lvm_with(key, bad).expect_err(bad).to_string();
                assert!(e.contains(&format!("pool.lvm.{key}")), "{key}={bad:?}: {e}");
                assert!(e.contains("LVM names"), "{e}");
            }
            let c = lvm_with(key, "ok_name-1.2+3").expect("a valid LVM name");
            assert_eq!(c.pool.mode, PoolMode::Lvm);
        }
    }

    #[test]
    fn lvm_names_are_not_checked_outside_lvm_mode() {
        // [pool.lvm] is unused in loop and existing mode: as before, nothing there is refused.
        let c = Config::parse("[pool.lvm]\nvolume_group = \"a/b\"\n").expect("loop mode");
        assert_eq!(c.pool.lvm.volume_group, "a/b");
    }
}
