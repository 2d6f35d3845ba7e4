//! Typed configuration: the TOML file `thinsnap serve --config FILE` reads, with every default in
//! one place ([`Config::default`]) and validation that names the offending key.
//!
//! This module only parses and checks values; it must not touch the pool, the store or the disk
//! (beyond reading the file).

use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Default socket path, also what deploy/containerd-config.toml points containerd at.
pub const DEFAULT_ADDRESS: &str = "/run/thinsnap/thinsnap.sock";
/// Default state directory: sled database and, in loop mode, the pool's files.
pub const DEFAULT_ROOT: &str = "/var/lib/thinsnap";

/// dm-thin data block size bounds (thin-provisioning.rst: a multiple of 64KiB, 64KiB..1GiB).
const MIN_BLOCK: u64 = 64 * 1024;
const MAX_BLOCK: u64 = 1024 * 1024 * 1024;
/// dm-thin metadata device bounds: below 2MiB is useless, above ~16GiB the kernel ignores the rest.
const MIN_META: u64 = 2 * 1024 * 1024;
const MAX_META: u64 = 16 * 1024 * 1024 * 1024;
/// The largest size a TOML integer holds.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Writes a size as its exact number of bytes: `ByteSize`'s own form rounds to one decimal
/// (found by fuzz_config: "1.25GiB" came back as "1.2 GiB").
fn exact_bytes<S: serde::Serializer>(b: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(b.as_u64())
}

/// Errors of loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole configuration. Every key is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory: the sled database (`root/db`) and, in loop mode, the pool files
    /// (`root/pool/data`, `root/pool/metadata`).
    pub root: PathBuf,
    /// The unix socket containerd and `thinsnap status` talk to.
    pub address: PathBuf,
    pub pool: PoolConfig,
    pub fs: FsConfig,
    pub remove: RemoveConfig,
    pub metrics: MetricsConfig,
}

/// How the thin pool is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Sparse files under `root` on loop devices (Docker's loop-lvm); thinsnap creates the pool.
    Loop,
    /// A thin pool someone else made (LVM, say), adopted by its dm name.
    Existing,
    /// An LVM thin pool provisioned by thinsnap on `pool.device` (Docker's direct-lvm).
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

/// A percentage, written `"10%"` or `10` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PercentRepr", into = "String")]
pub struct Percent(pub f64);

#[derive(Deserialize)]
#[serde(untagged)]
enum PercentRepr {
    Num(f64),
    Text(String),
}

impl TryFrom<PercentRepr> for Percent {
    type Error = String;
    fn try_from(r: PercentRepr) -> Result<Percent, String> {
        let v = match r {
            PercentRepr::Num(n) => n,
            PercentRepr::Text(t) => t
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{t:?} is not a percentage like \"10%\""))?,
        };
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("{v}% is not between 0% and 100%"));
        }
        Ok(Percent(v))
    }
}

impl From<Percent> for String {
    fn from(p: Percent) -> String {
        format!("{}%", p.0)
    }
}

/// Lvm mode settings (Docker's `dm.directlvm_device` and friends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LvmConfig {
    /// The block device to give to LVM (it is wiped: a device holding a filesystem is refused
    /// unless `force`).
    pub device: Option<PathBuf>,
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

/// How Remove deletes thin devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RemoveConfig {
    /// Answer Remove once the snapshot is gone from the store; a background reaper deletes the
    /// device (retried while busy, and after a restart).
    #[serde(rename = "async")]
    pub asynchronous: bool,
    /// Discard a device's blocks before deleting it, so a loop pool's files give the space back.
    pub discard: bool,
}

/// The opt-in Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on (loopback recommended); unset: no endpoint.
    pub address: Option<String>,
}

/// Filesystem of the base device (and so of every snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The name used for mkfs.<name> and as the mount type.
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            pool: PoolConfig::default(),
            fs: FsConfig::default(),
            remove: RemoveConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
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

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            fs_type: FsType::Ext4,
            base_size: ByteSize::gib(10),
            mkfs_options: Vec::new(),
            mount_options: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates `path`; `None` gives the embedded defaults.
    ///
    /// Returns an error naming the file, or the key, when it cannot be read, parsed or validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { source, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    },
                    other => other,
                })?
            }
        };
        Ok(config)
    }

    /// Parses and validates TOML text.
    ///
    /// Returns an error when the text is not valid TOML, has unknown keys, or fails [`Config::validate`].
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that the type system does not.
    ///
    /// Returns an error naming the first key whose value is out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.root.is_absolute() {
            return Err(invalid("root", "must be an absolute path"));
        }
        if !self.address.is_absolute() {
            return Err(invalid("address", "must be an absolute path"));
        }
        // sockaddr_un.sun_path is 108 bytes including the NUL.
        if self.address.as_os_str().len() > 107 {
            return Err(invalid(
                "address",
                "longer than the 107 bytes a unix socket path may have",
            ));
        }
        let name = &self.pool.name;
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
        let block = self.pool.block_size.as_u64();
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) || !block.is_multiple_of(MIN_BLOCK) {
            return Err(invalid(
                "pool.block_size",
                format!("{block} bytes: must be a multiple of 64KiB between 64KiB and 1GiB"),
            ));
        }
        let meta = self.pool.metadata_size.as_u64();
        if !(MIN_META..=MAX_META).contains(&meta) || !meta.is_multiple_of(4096) {
            return Err(invalid(
                "pool.metadata_size",
                format!("{meta} bytes: must be a multiple of 4KiB between 2MiB and 16GiB"),
            ));
        }
        let data = self.pool.data_size.as_u64();
        if data < 16 * block || !data.is_multiple_of(block) {
            return Err(invalid(
                "pool.data_size",
                format!(
                    "{data} bytes: must be a multiple of pool.block_size ({block}) and at least 16 blocks"
                ),
            ));
        }
        // TOML integers are i64 (and no filesystem or pool reaches 8EiB): a larger size could
        // not even be written back to a config file (found by fuzz_config).
        for (key, size) in [
            ("pool.data_size", self.pool.data_size),
            ("fs.base_size", self.fs.base_size),
        ] {
            if size.as_u64() > MAX_SIZE {
                return Err(invalid(
                    key,
                    format!("{} bytes: must be below 8EiB", size.as_u64()),
                ));
            }
        }
        let g = &self.pool.autogrow;
        if g.enabled {
            if self.pool.mode != PoolMode::Loop {
                return Err(invalid(
                    "pool.autogrow.enabled",
                    format!(
                        "only loop pools grow by themselves (pool.mode is {}; use pool.lvm.autoextend_* for lvm)",
                        self.pool.mode
                    ),
                ));
            }
            if g.step.0 <= 0.0 {
                return Err(invalid("pool.autogrow.step", "must be above 0%"));
            }
            if g.threshold.0 <= 0.0 {
                return Err(invalid("pool.autogrow.threshold", "must be above 0%"));
            }
            if g.max_data_size.as_u64() > MAX_SIZE {
                return Err(invalid("pool.autogrow.max_data_size", "must be below 8EiB"));
            }
            if g.max_metadata_size.as_u64() > MAX_META {
                return Err(invalid(
                    "pool.autogrow.max_metadata_size",
                    "must be at most 16GiB (the kernel uses no more)",
                ));
            }
            if g.interval_seconds == 0 {
                return Err(invalid(
                    "pool.autogrow.interval_seconds",
                    "must be at least 1",
                ));
            }
        }
        let base = self.fs.base_size.as_u64();
        let min_base = match self.fs.fs_type {
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
                    self.fs.fs_type
                ),
            ));
        }
        if self.pool.mode == PoolMode::Lvm {
            let l = &self.pool.lvm;
            if l.device.is_none() {
                return Err(invalid(
                    "pool.lvm.device",
                    "lvm mode needs the block device to use",
                ));
            }
            if l.thinp_percent == 0
                || l.thinp_percent + l.thinp_metapercent > 100
                || l.thinp_metapercent == 0
            {
                return Err(invalid(
                    "pool.lvm.thinp_percent",
                    "thinp_percent and thinp_metapercent must be above 0 and add up to at most 100",
                ));
            }
            if l.autoextend_threshold > 100 {
                return Err(invalid(
                    "pool.lvm.autoextend_threshold",
                    "must be at most 100",
                ));
            }
        }
        if let Some(addr) = &self.metrics.address {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics.address",
                    format!("{addr:?} is not host:port"),
                ));
            }
        }
        for opt in &self.fs.mount_options {
            if opt.is_empty() || opt.contains(',') {
                return Err(invalid(
                    "fs.mount_options",
                    format!("{opt:?}: give one option per list entry"),
                ));
            }
        }
        Ok(())
    }

    /// Where the sled database lives.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Where the loop mode's sparse files live.
    pub fn pool_dir(&self) -> PathBuf {
        self.root.join("pool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").expect("empty config is valid");
        assert_eq!(c.root, PathBuf::from("/var/lib/thinsnap"));
        assert_eq!(c.address, PathBuf::from("/run/thinsnap/thinsnap.sock"));
        assert_eq!(c.pool.name, "thinsnap-pool");
        assert_eq!(c.pool.mode, PoolMode::Loop);
        assert_eq!(c.pool.data_size, ByteSize::gib(100));
        assert_eq!(c.pool.metadata_size, ByteSize::gib(2));
        assert_eq!(c.pool.block_size, ByteSize::kib(64));
        assert_eq!(c.fs.fs_type, FsType::Ext4);
        assert_eq!(c.fs.base_size, ByteSize::gib(10));
        assert_eq!(c.pool.min_free_space, Percent(10.0));
        assert!(!c.remove.asynchronous && !c.remove.discard);
        assert_eq!(c.metrics.address, None);
    }

    #[test]
    fn sizes_survive_a_round_trip_exactly() {
        let c = Config::parse("[pool]\ndata_size = \"1.25GiB\"\n").expect("valid");
        let text = toml::to_string(&c).expect("serialize");
        assert_eq!(Config::parse(&text).expect("reparse"), c);
    }

    #[test]
    fn percentages_and_sections() {
        let c = Config::parse(
            "[pool]\nmin_free_space = \"5%\"\n[remove]\nasync = true\ndiscard = true\n[metrics]\naddress = \"127.0.0.1:9323\"\n",
        )
        .expect("valid");
        assert_eq!(c.pool.min_free_space, Percent(5.0));
        assert!(c.remove.asynchronous && c.remove.discard);
        assert_eq!(
            Config::parse("[pool]\nmin_free_space = 0")
                .expect("num")
                .pool
                .min_free_space,
            Percent(0.0)
        );
        assert!(err_of("[pool]\nmin_free_space = \"150%\"").contains("min_free_space"));
        assert!(err_of("[pool]\nmode = \"lvm\"").contains("pool.lvm.device"));
        assert!(err_of("[metrics]\naddress = \"nowhere\"").contains("metrics.address"));
    }

    #[test]
    fn human_units_are_accepted() {
        let c = Config::parse(
            r#"
            root = "/tmp/x"
            [pool]
            data_size = "2GiB"
            metadata_size = "64 MiB"
            block_size = "128KiB"
            mode = "existing"
            [fs]
            type = "xfs"
            base_size = "1GiB"
            mount_options = ["noatime"]
            "#,
        )
        .expect("valid");
        assert_eq!(c.pool.data_size.as_u64(), 2 << 30);
        assert_eq!(c.pool.metadata_size.as_u64(), 64 << 20);
        assert_eq!(c.pool.block_size.as_u64(), 128 << 10);
        assert_eq!(c.pool.mode, PoolMode::Existing);
        assert_eq!(c.fs.fs_type, FsType::Xfs);
    }

    fn err_of(text: &str) -> String {
        Config::parse(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn invalid_values_name_their_key() {
        assert!(err_of("[pool]\nblock_size = \"100KiB\"").contains("pool.block_size"));
        assert!(err_of("[pool]\nmetadata_size = \"1MiB\"").contains("pool.metadata_size"));
        assert!(err_of("[pool]\ndata_size = \"64KiB\"").contains("pool.data_size"));
        assert!(err_of("[pool]\nname = \"a/b\"").contains("pool.name"));
        assert!(err_of("root = \"relative\"").contains("root"));
        assert!(err_of("[fs]\ntype = \"xfs\"\nbase_size = \"100MiB\"").contains("fs.base_size"));
        assert!(err_of("[fs]\nmount_options = [\"a,b\"]").contains("fs.mount_options"));
        assert!(
            err_of("[pool]\nmode = \"existing\"\n[pool.autogrow]\nenabled = true")
                .contains("pool.autogrow.enabled")
        );
        assert!(
            err_of("[pool.autogrow]\nenabled = true\nstep = \"0%\"").contains("pool.autogrow.step")
        );
        assert!(
            err_of("[pool.autogrow]\nenabled = true\nmax_metadata_size = \"32GiB\"")
                .contains("pool.autogrow.max_metadata_size")
        );
        assert!(
            err_of("[pool.autogrow]\nenabled = true\ninterval_seconds = 0")
                .contains("pool.autogrow.interval_seconds")
        );
        let c = Config::parse("[pool.autogrow]\nenabled = true\nthreshold = \"90%\"")
            .expect("valid autogrow");
        assert_eq!(c.pool.autogrow.threshold, Percent(90.0));
        assert_eq!(c.pool.autogrow.max_data_size, ByteSize::tib(1));
        let huge = err_of("[fs]\nbase_size = \"10EiB\"");
        assert!(
            huge.contains("fs.base_size") && huge.contains("8EiB"),
            "{huge}"
        );
        assert!(err_of("[pool]\ndata_size = \"9EiB\"").contains("pool.data_size"));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        assert!(err_of("colour = 1").contains("colour"));
        assert!(err_of("[pool]\nmode = \"lvm2\"").contains("mode"));
        assert!(err_of("[pool]\ndata_size = \"lots\"").contains("data_size"));
    }
}
