//! Typed configuration: the TOML file `thinsnap serve --config FILE` reads, with every default in
//! one place ([`Config::default`]) and validation that names the offending key.
//!
//! This module only parses and checks values; it must not touch the pool, the store or the disk
//! (beyond reading the file). Each section checks its own keys: `[pool]` with `[pool.lvm]` and
//! `[pool.autogrow]` in `pool`, `[fs]` in `fs`; the top-level keys, `[remove]`, `[spares]`,
//! `[metrics]` and `[store]` here.

use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

mod fs;
mod pool;

pub use fs::{FsConfig, FsType};
pub use pool::{AutogrowConfig, LvmConfig, PoolConfig, PoolMode};

/// Default socket path, also what deploy/containerd-config.toml points containerd at.
pub const DEFAULT_ADDRESS: &str = "/run/thinsnap/thinsnap.sock";
/// The admin socket's file name when `admin_address` is unset: beside the Snapshots socket.
pub const DEFAULT_ADMIN_FILE: &str = "admin.sock";
/// Default state directory: sled database and, in loop mode, the pool's files.
pub const DEFAULT_ROOT: &str = "/var/lib/thinsnap";
/// The configuration file the packages install: read by every command given no `--config`.
pub const INSTALLED_CONFIG: &str = "/etc/thinsnap/config.toml";

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
    /// The unix socket containerd talks to: the Snapshots API alone.
    pub address: PathBuf,
    /// The unix socket of thinsnap's Admin API (`thinsnap status`, `thinsnap pool grow`), 0600;
    /// unset: `admin.sock` in the directory of `address` ([`Config::admin_path`]).
    pub admin_address: Option<PathBuf>,
    pub pool: PoolConfig,
    pub fs: FsConfig,
    pub remove: RemoveConfig,
    pub spares: SparesConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
}

/// The default of `store.min_free`.
pub const DEFAULT_STORE_MIN_FREE: ByteSize = ByteSize::mib(64);

/// The sled database under `root`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The floor of free space on the filesystem that holds `root`: the database grows with
    /// every snapshot, and Prepare and View are refused below it (ResourceExhausted). Commit,
    /// Remove and the rest are never refused for it. 0 turns it off.
    #[serde(serialize_with = "exact_bytes")]
    pub min_free: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            min_free: DEFAULT_STORE_MIN_FREE,
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

/// The most warm spares `[spares] count` may ask for.
pub const MAX_SPARES: u32 = 64;

/// `[spares] count` when the file does not set it: the base's spare and seven of recently used
/// images' top layers (or layers in demand). Each spare costs one active dm device, a device
/// record in the pool's metadata and none of its data space until taken (see README.md, "Warm
/// spares"); a node already keeps one active device per container, so 8 is small beside them.
pub const DEFAULT_SPARES: u32 = 8;

/// Warm spares: thin snapshots of recently used committed snapshots (and of the base) made and
/// activated in the background, so that Prepare and View touch no kernel device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SparesConfig {
    /// How many spares to keep at most, in all; 0 turns the feature off.
    pub count: u32,
}

impl Default for SparesConfig {
    fn default() -> Self {
        SparesConfig {
            count: DEFAULT_SPARES,
        }
    }
}

impl SparesConfig {
    /// Checks `[spares]`.
    ///
    /// Returns an error naming `spares.count` when it is above [`MAX_SPARES`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.count > MAX_SPARES {
            return Err(invalid(
                "spares.count",
                format!("{} is more than the {MAX_SPARES} allowed", self.count),
            ));
        }
        Ok(())
    }
}

/// The opt-in Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ip:port` to serve `/metrics` on, a loopback address unless `allow_remote`; unset: no
    /// endpoint.
    pub address: Option<String>,
    /// Let `address` be other than loopback (the endpoint has no authentication: anyone who
    /// reaches it reads the pool's space and the snapshot counts, and may scrape it at will).
    pub allow_remote: bool,
}

impl MetricsConfig {
    /// Checks `[metrics]`.
    ///
    /// Returns an error naming `metrics.address` when it is set and not `ip:port`, or not a
    /// loopback address while `allow_remote` is false.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = &self.address {
            let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
                return Err(invalid(
                    "metrics.address",
                    format!("{addr:?} is not ip:port"),
                ));
            };
            if !sock.ip().is_loopback() && !self.allow_remote {
                return Err(invalid(
                    "metrics.address",
                    format!(
                        "{addr:?} is not a loopback address: the endpoint has no authentication; \
                         use 127.0.0.1 or [::1], or set metrics.allow_remote = true"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            admin_address: None,
            pool: PoolConfig::default(),
            fs: FsConfig::default(),
            remove: RemoveConfig::default(),
            spares: SparesConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Config {
    /// The file a command reads: `explicit` (`--config`) if given, else `installed` if it
    /// exists (the daemon's [`INSTALLED_CONFIG`]), else none (the embedded defaults).
    pub fn path_to_read(explicit: Option<&Path>, installed: &Path) -> Option<PathBuf> {
        match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => installed.exists().then(|| installed.to_path_buf()),
        }
    }

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

    /// Checks every value that the type system does not: the top-level keys, then each section
    /// in turn (`[pool]`, `[fs]`, `[metrics]`).
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
        if let Some(admin) = &self.admin_address {
            if !admin.is_absolute() {
                return Err(invalid("admin_address", "must be an absolute path"));
            }
        }
        let admin = self.admin_path();
        if admin.as_os_str().len() > 107 {
            return Err(invalid(
                "admin_address",
                format!(
                    "{}: longer than the 107 bytes a unix socket path may have",
                    admin.display()
                ),
            ));
        }
        if admin == self.address {
            return Err(invalid(
                "admin_address",
                "must differ from address: containerd's socket carries the Snapshots API alone",
            ));
        }
        self.pool.validate()?;
        self.fs.validate()?;
        self.spares.validate()?;
        self.metrics.validate()?;
        if self.store.min_free.as_u64() > MAX_SIZE {
            return Err(invalid(
                "store.min_free",
                format!(
                    "{} bytes is more than a TOML integer holds",
                    self.store.min_free.as_u64()
                ),
            ));
        }
        Ok(())
    }

    /// The admin socket: `admin_address`, or `admin.sock` in the directory of `address`.
    pub fn admin_path(&self) -> PathBuf {
        match &self.admin_address {
            Some(a) => a.clone(),
            None => self
                .address
                .parent()
                .unwrap_or_else(|| Path::new("/"))
                .join(DEFAULT_ADMIN_FILE),
        }
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

    /// Without --config a command reads the installed file when there is one, so `thinsnap
    /// status` and `pool destroy` talk to the daemon's socket and pool, not the defaults'.
    #[test]
    fn the_installed_config_is_read_without_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let installed = dir.path().join("config.toml");
        assert_eq!(Config::path_to_read(None, &installed), None);
        std::fs::write(&installed, "").expect("write");
        assert_eq!(
            Config::path_to_read(None, &installed),
            Some(installed.clone())
        );
        let other = dir.path().join("other.toml");
        assert_eq!(
            Config::path_to_read(Some(&other), &installed),
            Some(other.clone())
        );
        assert_eq!(INSTALLED_CONFIG, "/etc/thinsnap/config.toml");
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").expect("empty config is valid");
        assert_eq!(c.root, PathBuf::from("/var/lib/thinsnap"));
        assert_eq!(c.address, PathBuf::from("/run/thinsnap/thinsnap.sock"));
        assert_eq!(c.admin_path(), PathBuf::from("/run/thinsnap/admin.sock"));
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

    /// deploy/config.toml, the annotated example that lists every key.
    const DEPLOY_EXAMPLE: &str = include_str!("../../deploy/config.toml");

    #[test]
    fn deploy_example_parses_to_the_defaults() {
        let c = Config::parse(DEPLOY_EXAMPLE).expect("deploy/config.toml is valid");
        assert_eq!(
            c,
            Config::default(),
            "deploy/config.toml promises to behave exactly like an empty file"
        );
    }

    #[test]
    fn deploy_example_names_every_key() {
        // Every key the defaults serialize (those unset by default are commented out in the
        // example, and not serialized) stands in the example under its own table.
        let defaults = toml::Value::try_from(Config::default()).expect("serialize the defaults");
        let example: toml::Value = toml::from_str(DEPLOY_EXAMPLE).expect("TOML");
        fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let key = format!("{prefix}{k}");
                    keys(v, &format!("{key}."), out);
                    out.push(key);
                }
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(&defaults, "", &mut want);
        keys(&example, "", &mut have);
        want.sort();
        have.sort();
        assert_eq!(
            want, have,
            "keys of the defaults vs keys of deploy/config.toml"
        );
        for unset in [
            "# device = ",
            "# address = \"127.0.0.1:",
            "# admin_address = ",
            "# max_size = ",
        ] {
            assert!(DEPLOY_EXAMPLE.contains(unset), "{unset:?} not documented");
        }
    }

    #[test]
    fn sections_are_checked_in_order_top_level_first() {
        // With several bad keys the first one in the file's order of sections is named.
        let e = err_of("root = \"rel\"\n[pool]\nname = \"\"\n[fs]\nbase_size = \"1KiB\"");
        assert!(e.contains("root"), "{e}");
        let e = err_of("[pool]\nname = \"\"\n[fs]\nbase_size = \"1KiB\"");
        assert!(e.contains("pool.name"), "{e}");
        let e = err_of("[fs]\nbase_size = \"1KiB\"\n[metrics]\naddress = \"x\"");
        assert!(e.contains("fs.base_size"), "{e}");
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
        // Loopback unless told otherwise.
        for remote in ["0.0.0.0:9487", "10.1.2.3:9487", "[::]:9487"] {
            let e = err_of(&format!("[metrics]\naddress = \"{remote}\""));
            assert!(
                e.contains("metrics.address") && e.contains("allow_remote"),
                "{e}"
            );
            let c = Config::parse(&format!(
                "[metrics]\naddress = \"{remote}\"\nallow_remote = true"
            ))
            .expect("told otherwise");
            assert!(c.metrics.allow_remote);
        }
        Config::parse("[metrics]\naddress = \"[::1]:9487\"").expect("IPv6 loopback");
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
        assert!(err_of("[spares]\ncount = 65").contains("spares.count"));
        assert!(err_of("admin_address = \"rel.sock\"").contains("admin_address"));
        assert!(err_of("[fs]\nmax_size = \"1GiB\"").contains("fs.max_size"));
        assert!(err_of("[fs]\nmax_size = \"20000000001\"").contains("fs.max_size"));
        assert_eq!(
            Config::parse("[fs]\nmax_size = \"100GiB\"")
                .expect("valid")
                .fs
                .max_size,
            Some(ByteSize::gib(100))
        );
        assert!(
            err_of("address = \"/run/x/a.sock\"\nadmin_address = \"/run/x/a.sock\"")
                .contains("admin_address")
        );
        let c = Config::parse("address = \"/run/x/a.sock\"").expect("valid");
        assert_eq!(c.admin_path(), PathBuf::from("/run/x/admin.sock"));
        // Spares are on unless the file turns them off.
        assert_eq!(
            Config::parse("").expect("empty").spares.count,
            DEFAULT_SPARES
        );
        const { assert!(DEFAULT_SPARES > 0) };
        assert_eq!(
            Config::parse("[spares]\ncount = 0")
                .expect("off")
                .spares
                .count,
            0
        );
        assert_eq!(
            Config::parse("[spares]\ncount = 64")
                .expect("64 spares")
                .spares
                .count,
            64
        );
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
