//! The LVM metadata profile of the thin pool: `<vg>-<pool>.profile` in LVM's profile directory,
//! carrying `pool.lvm`'s autoextend threshold and percent, which dmeventd reads.
//!
//! It writes that one file and nothing else (applying it to the pool is [`super::provision`]'s);
//! it must not touch devices, groups or volumes.

use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::command::tool;
use crate::config::LvmConfig;
use crate::pool::PoolError;

/// LVM's built-in `config/profile_dir`.
const DEFAULT_PROFILE_DIR: &str = "/etc/lvm/profile";

/// The metadata profile's name (the file is `<profile_dir>/<name>.profile`).
pub fn profile_name(l: &LvmConfig) -> String {
    format!("{}-{}", l.volume_group, l.thin_pool)
}

fn profile_text(l: &LvmConfig) -> String {
    format!(
        "# Written by thinsnap from pool.lvm in its configuration: autoextend of the thin pool\n\
         # {vg}/{lv} (dmeventd extends it by autoextend_percent once usage crosses the threshold).\n\
         activation {{\n\
         \tthin_pool_autoextend_threshold = {t}\n\
         \tthin_pool_autoextend_percent = {p}\n\
         }}\n",
        vg = l.volume_group,
        lv = l.thin_pool,
        t = l.autoextend_threshold,
        p = l.autoextend_percent,
    )
}

/// LVM's profile directory (`config/profile_dir`, normally /etc/lvm/profile).
fn profile_dir() -> PathBuf {
    match tool(
        "read config/profile_dir of",
        Path::new("lvm.conf"),
        "lvmconfig",
        ["--typeconfig", "full", "config/profile_dir"],
    ) {
        Ok(out) => {
            let v = out.trim();
            let v = v
                .rsplit_once('=')
                .map_or(v, |(_, v)| v)
                .trim()
                .trim_matches('"');
            if v.starts_with('/') {
                return PathBuf::from(v);
            }
            warn!(value = %v, "unexpected config/profile_dir; using {DEFAULT_PROFILE_DIR}");
        }
        // Without an lvm.conf (a minimal system) lvmconfig cannot print defaults, and LVM uses
        // the built-in directory anyway.
        Err(e) if !Path::new("/etc/lvm/lvm.conf").exists() => {
            debug!(error = %e, "no lvm.conf: using {DEFAULT_PROFILE_DIR}")
        }
        Err(e) => warn!(error = %e, "using {DEFAULT_PROFILE_DIR}"),
    }
    PathBuf::from(DEFAULT_PROFILE_DIR)
}

/// Where the profile of this pool lives.
pub fn profile_path(l: &LvmConfig) -> PathBuf {
    profile_dir().join(format!("{}.profile", profile_name(l)))
}

/// Writes the autoextend profile (if its text changed) and returns its name.
pub(super) fn write_profile(l: &LvmConfig) -> Result<String, PoolError> {
    let path = profile_path(l);
    let text = profile_text(l);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        let dir = path.parent().expect("a profile path has a directory");
        let ioe = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| PoolError::Io {
                op,
                path: p,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(ioe("create", dir))?;
        let tmp = path.with_extension("profile.tmp");
        std::fs::write(&tmp, &text).map_err(ioe("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(ioe("rename into place", &path))?;
        info!(profile = %path.display(), threshold = l.autoextend_threshold,
              percent = l.autoextend_percent, "wrote LVM autoextend profile");
    }
    Ok(profile_name(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_carries_the_autoextend_settings() {
        let l = LvmConfig {
            volume_group: "vg".into(),
            thin_pool: "tp".into(),
            autoextend_threshold: 75,
            autoextend_percent: 30,
            ..LvmConfig::default()
        };
        assert_eq!(profile_name(&l), "vg-tp");
        let t = profile_text(&l);
        assert!(t.contains("activation {"), "{t}");
        assert!(t.contains("thin_pool_autoextend_threshold = 75"), "{t}");
        assert!(t.contains("thin_pool_autoextend_percent = 30"), "{t}");
        assert!(t.trim_end().ends_with('}'));
    }
}
