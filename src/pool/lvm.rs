//! Lvm mode: provisions an LVM thin pool on a block device with the lvm2 tools, the way Docker's
//! `dm.directlvm_device` did, and names the dm device of the pool for [`super::dm::DmPool`].
//! Runs at start only (and on `pool destroy --remove-files`), never on a snapshot call.
//!
//! What it makes on `pool.lvm.device`, once: a physical volume, the volume group
//! `pool.lvm.volume_group` (tagged `thinsnap`), two linear volumes of `thinp_percent`% and
//! `thinp_metapercent`% of the group converted into the thin pool `pool.lvm.thin_pool`
//! (`--zero n`, chunk size = `pool.block_size`), and the metadata profile `<vg>-<pool>` in LVM's
//! profile directory (`/etc/lvm/profile`) carrying `activation/thin_pool_autoextend_threshold`
//! and `thin_pool_autoextend_percent`, applied with `lvchange --metadataprofile`. Monitoring by
//! dmeventd (which does the autoextending) is switched on where the host can run it.
//! At every later start the group and pool are found and only activated (`lvchange -ay`), so a
//! restart or a reboot reuses them. A device holding any signature (filesystem, partition
//! table, RAID or LVM label) is refused unless `pool.lvm.force`, which wipes it first; a device
//! that belongs to another volume group is always refused.
//!
//! The pool is thinsnap's alone. LVM knows nothing of thinsnap's thin devices: thinsnap creates
//! and deletes them with pool messages and gives them its own dm names, as Docker did on direct-lvm.
//! LVM tracks the pool's transaction id in its own metadata and checks it against the kernel's on
//! activation, so thinsnap must never send `set_transaction_id` to an LVM pool (it sends none
//! today: keep it that way), and nobody may create LVM thin volumes in it (LVM would hand out
//! thin ids thinsnap may already use).
//!
//! This module must not touch the pool's thin devices, the store or anything outside the
//! configured device, volume group and profile file. Tools are run with stdin closed (any prompt
//! answers "no"), `LC_ALL=C`, and `DM_DISABLE_UDEV=1` when no udev daemon runs (containers,
//! minimal VMs), so libdevmapper makes the device nodes itself instead of waiting for udev.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use devicemapper::{DevId, DmFlags, DmNameBuf, DmOptions};
use tracing::{debug, info, warn};

use super::dm::{device_exists, open_dm};
use super::PoolError;
use crate::config::{Config, LvmConfig};

/// The tag thinsnap puts on the volume group it creates: only in such a group does it clean up
/// half-made volumes of an interrupted provisioning, and only such a group does teardown remove.
pub const VG_TAG: &str = "thinsnap";
/// LVM's built-in `config/profile_dir`.
const DEFAULT_PROFILE_DIR: &str = "/etc/lvm/profile";

fn io_err(op: &'static str, path: impl Into<PathBuf>, msg: impl Into<String>) -> PoolError {
    PoolError::Io {
        op,
        path: path.into(),
        source: std::io::Error::other(msg.into()),
    }
}

/// Whether a udev daemon runs (the file libudev itself checks).
fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// Runs `program args` (an lvm2 or util-linux tool) and returns its stdout.
///
/// Returns [`PoolError::Io`] with `op` and `subject` (the device or volume group concerned) if the
/// tool cannot be run or fails; the message carries the command line and the tool's stderr.
fn tool<I, S>(op: &'static str, subject: &Path, program: &str, args: I) -> Result<String, PoolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmdline = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        // thinsnap's own descriptors are close-on-exec; lvm's warning about inherited ones would
        // only be noise from whatever started thinsnap.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1");
    if !udev_running() {
        // libdevmapper then creates /dev/mapper nodes itself and does not wait for udev.
        cmd.env("DM_DISABLE_UDEV", "1");
    }
    debug!(command = %cmdline, "running");
    let out = cmd.output().map_err(|e| PoolError::Io {
        op,
        path: subject.to_path_buf(),
        source: std::io::Error::new(
            e.kind(),
            format!("cannot run `{cmdline}` (is {program} installed and in PATH?): {e}"),
        ),
    })?;
    let stderr = one_line(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(io_err(
            op,
            subject,
            format!(
                "`{cmdline}` failed ({}): {}",
                out.status,
                if stderr.is_empty() {
                    "no message"
                } else {
                    &stderr
                }
            ),
        ));
    }
    if !stderr.is_empty() {
        debug!(command = %cmdline, stderr = %stderr, "tool said");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A tool's multi-line message as one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses an lvm2 report printed with `--noheadings --nameprefixes`: one row per line, fields
/// `LVM2_FIELD='value'`; keys come back lower case without the `LVM2_` prefix.
fn parse_report(text: &str) -> Vec<HashMap<String, String>> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let mut row = HashMap::new();
        let mut rest = line.trim_start();
        while let Some(eq) = rest.find("='") {
            let key = rest[..eq].trim();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        end = Some(eq + 2 + i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let Some(key) = key.strip_prefix("LVM2_") else {
                break;
            };
            row.insert(key.to_ascii_lowercase(), value);
            match end {
                Some(e) => rest = rest[e..].trim_start(),
                None => break,
            }
        }
        if !row.is_empty() {
            rows.push(row);
        }
    }
    rows
}

fn field(row: &HashMap<String, String>, key: &str) -> String {
    row.get(key).cloned().unwrap_or_default()
}

/// LVM's rule for volume group and logical volume names (lvm(8), "VALID NAMES"), checked before
/// a name is used in a path (the profile file) or a command line.
fn check_name(key: &'static str, name: &str) -> Result<(), PoolError> {
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
        Err(PoolError::Io {
            op: "invalid name in",
            path: PathBuf::from(key),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{name:?}: LVM names use only ASCII letters, digits and + _ . -, and do not \
                     start with -"
                ),
            ),
        })
    }
}

/// The dm name LVM gives `vg/lv` (dashes inside a name doubled, `-` between them).
pub fn dm_name_of(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The dm names under which LVM may expose the thin-pool target of `vg/lv`, most specific first:
/// `<vg>-<lv>-tpool` when the pool has LVM thin volumes (then `<vg>-<lv>` is a linear layer on
/// top), plain `<vg>-<lv>` when it has none.
pub fn pool_dm_candidates(vg: &str, lv: &str) -> [String; 2] {
    let base = dm_name_of(vg, lv);
    [format!("{base}-tpool"), base]
}

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

/// The device number of block device `dev` (following symlinks such as /dev/disk/by-id/...).
fn block_device_number(dev: &Path) -> Result<u64, PoolError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(dev).map_err(|source| PoolError::Io {
        op: "pool.lvm.device",
        path: dev.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(io_err(
            "pool.lvm.device",
            dev,
            "not a block device (lvm mode needs a disk or partition)",
        ));
    }
    Ok(meta.rdev())
}

fn same_device(path: &str, rdev: u64) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        .unwrap_or(false)
}

#[derive(Debug, Clone)]
struct Pv {
    name: String,
    vg: String,
    /// The tags of the PV's volume group.
    vg_tags: Vec<String>,
}

fn tags(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every physical volume with its group (one scan: each lvm2 command scans all devices).
fn list_pvs(device: &Path) -> Result<Vec<Pv>, PoolError> {
    let out = tool(
        "list physical volumes for",
        device,
        "pvs",
        [
            "--noheadings",
            "--nameprefixes",
            "-o",
            "pv_name,vg_name,vg_tags",
        ],
    )?;
    Ok(parse_report(&out)
        .iter()
        .map(|r| Pv {
            name: field(r, "pv_name"),
            vg: field(r, "vg_name"),
            vg_tags: tags(&field(r, "vg_tags")),
        })
        .collect())
}

#[derive(Debug, Clone)]
struct Vg {
    tags: Vec<String>,
    free_bytes: u64,
}

fn find_vg(vg: &str) -> Result<Option<Vg>, PoolError> {
    let out = tool(
        "list volume groups for",
        Path::new(vg),
        "vgs",
        [
            "--noheadings",
            "--nameprefixes",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_name,vg_tags,vg_free",
        ],
    )?;
    Ok(parse_report(&out)
        .iter()
        .find(|r| field(r, "vg_name") == vg)
        .map(|r| Vg {
            tags: tags(&field(r, "vg_tags")),
            free_bytes: field(r, "vg_free").parse().unwrap_or(0),
        }))
}

#[derive(Debug, Clone, Default)]
struct Lv {
    name: String,
    segtype: String,
    active: bool,
    profile: String,
    chunk_bytes: u64,
    monitor: String,
    size_bytes: u64,
    /// The thin pool a thin volume lives in.
    pool_lv: String,
}

/// The visible logical volumes of `vg` (one row each; hidden sub-volumes are left out).
fn list_lvs(vg: &str) -> Result<Vec<Lv>, PoolError> {
    let out = tool(
        "list logical volumes of volume group",
        Path::new(vg),
        "lvs",
        [
            "--noheadings",
            "--nameprefixes",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,segtype,lv_active,lv_profile,chunk_size,seg_monitor,lv_size,pool_lv",
            vg,
        ],
    )?;
    let mut lvs: Vec<Lv> = Vec::new();
    for r in parse_report(&out) {
        let name = field(&r, "lv_name");
        // A volume of several segments has one row per segment: keep the first.
        if lvs.iter().any(|l| l.name == name) {
            continue;
        }
        lvs.push(Lv {
            name,
            segtype: field(&r, "segtype"),
            active: field(&r, "lv_active") == "active",
            profile: field(&r, "lv_profile"),
            chunk_bytes: field(&r, "chunk_size").parse().unwrap_or(0),
            monitor: field(&r, "seg_monitor"),
            size_bytes: field(&r, "lv_size").parse().unwrap_or(0),
            pool_lv: field(&r, "pool_lv"),
        });
    }
    Ok(lvs)
}

/// Signatures (filesystem, partition table, RAID, LVM label...) `wipefs` finds on `dev`, as
/// "TYPE at offset OFFSET".
fn signatures(dev: &Path) -> Result<Vec<String>, PoolError> {
    let out = tool(
        "look for signatures on",
        dev,
        "wipefs",
        [
            OsStr::new("--noheadings"),
            OsStr::new("--parsable"),
            OsStr::new("--output"),
            OsStr::new("TYPE,OFFSET"),
            dev.as_os_str(),
        ],
    )?;
    Ok(parse_signatures(&out))
}

fn parse_signatures(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(',') {
            Some((t, o)) => format!("{t} at offset {o}"),
            None => l.to_string(),
        })
        .collect()
}

/// Makes `dev` an LVM physical volume: refuses it if it holds a signature (unless `force`, which
/// wipes them), then `pvcreate`.
fn make_pv(dev: &Path, force: bool) -> Result<(), PoolError> {
    let found = signatures(dev)?;
    if !found.is_empty() {
        if !force {
            return Err(io_err(
                "refusing to use",
                dev,
                format!(
                    "it holds {} (a filesystem or other data?); lvm mode would destroy it. \
                     Use another device, or set pool.lvm.force = true to wipe it",
                    found.join(", ")
                ),
            ));
        }
        warn!(device = %dev.display(), signatures = %found.join(", "),
              "pool.lvm.force: wiping the device's signatures");
        tool(
            "wipe signatures of",
            dev,
            "wipefs",
            [OsStr::new("--all"), dev.as_os_str()],
        )?;
    }
    // --yes only when forced: otherwise a signature lvm finds and wipefs did not makes pvcreate
    // ask, and the closed stdin answers no.
    let mut args: Vec<&OsStr> = Vec::new();
    if force {
        args.push(OsStr::new("--yes"));
    }
    args.push(dev.as_os_str());
    tool("create a physical volume on", dev, "pvcreate", args)?;
    info!(device = %dev.display(), "created LVM physical volume");
    Ok(())
}

/// Creates the data and metadata volumes and converts them into the thin pool.
fn create_pool(config: &Config) -> Result<(), PoolError> {
    let l = &config.pool.lvm;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    let subject = PathBuf::from(format!("{vg}/{lv}"));
    let meta = format!("{lv}meta");
    tool(
        "create the thin pool's data volume",
        &subject,
        "lvcreate",
        [
            "--yes",
            "--wipesignatures",
            "y",
            "--name",
            lv,
            "--extents",
            &format!("{}%VG", l.thinp_percent),
            vg,
        ],
    )?;
    tool(
        "create the thin pool's metadata volume",
        &subject,
        "lvcreate",
        [
            "--yes",
            "--wipesignatures",
            "y",
            "--name",
            &meta,
            "--extents",
            &format!("{}%VG", l.thinp_metapercent),
            vg,
        ],
    )?;
    let chunk = format!("{}k", config.pool.block_size.as_u64() / 1024);
    let data_path = format!("{vg}/{lv}");
    let meta_path = format!("{vg}/{meta}");
    let mut args = vec![
        "--yes",
        "--zero",
        "n",
        "--chunksize",
        &chunk,
        "--thinpool",
        &data_path,
        "--poolmetadata",
        &meta_path,
    ];
    // LVM keeps a spare metadata volume (as big as the metadata) for `lvconvert --repair`; when
    // the percentages leave no room for it, do without rather than fail.
    let free = find_vg(vg)?.map_or(0, |g| g.free_bytes);
    let meta_size = list_lvs(vg)?
        .iter()
        .find(|v| v.name == meta)
        .map_or(0, |v| v.size_bytes);
    if free < meta_size {
        warn!(volume_group = %vg, free, meta_size,
              "no room for LVM's spare metadata volume: creating the pool without one");
        args.extend(["--poolmetadataspare", "n"]);
    }
    tool("convert into a thin pool", &subject, "lvconvert", args)?;
    info!(pool = %subject.display(), chunk = %chunk, data_percent = l.thinp_percent,
          metadata_percent = l.thinp_metapercent, "created LVM thin pool");
    Ok(())
}

/// Writes the autoextend profile (if its text changed) and returns its name.
fn write_profile(l: &LvmConfig) -> Result<String, PoolError> {
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

/// Makes sure the thin pool `vg/lv` exists (creating it, or cleaning up the half-made volumes of
/// an interrupted provisioning in a group thinsnap made), is active, carries the autoextend
/// profile and is monitored where possible.
fn ensure_pool(config: &Config, vg_tagged: bool) -> Result<(), PoolError> {
    let l = &config.pool.lvm;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    let subject = PathBuf::from(format!("{vg}/{lv}"));
    let meta = format!("{lv}meta");
    let lvs = list_lvs(vg)?;
    let thin_lvs = lvm_thin_volumes(&lvs, lv);
    if !thin_lvs.is_empty() {
        warn!(pool = %subject.display(), volumes = %thin_lvs.join(", "),
              "the pool holds LVM thin volumes: their thin ids may collide with thinsnap's");
    }
    let pool = lvs.iter().find(|v| v.name == lv);
    // Whether the pool was made or changed here (then its monitoring state is asked again).
    let mut changed = true;
    let pool = match pool {
        Some(p) if p.segtype == "thin-pool" => {
            changed = false;
            p.clone()
        }
        _ => {
            let leftovers: Vec<&Lv> = lvs
                .iter()
                .filter(|v| v.name == lv || v.name == meta)
                .collect();
            if !leftovers.is_empty() {
                let ours = vg_tagged;
                let linear = leftovers.iter().all(|v| v.segtype == "linear");
                let names = leftovers
                    .iter()
                    .map(|v| format!("{} ({})", v.name, v.segtype))
                    .collect::<Vec<_>>()
                    .join(", ");
                if !(ours && linear) {
                    return Err(io_err(
                        "refusing to use",
                        &subject,
                        format!(
                            "volume group {vg} holds {names}, not a thin pool{}; remove them or \
                             choose another pool.lvm.thin_pool",
                            if ours {
                                ""
                            } else {
                                " (and the group was not made by thinsnap)"
                            }
                        ),
                    ));
                }
                warn!(volume_group = %vg, volumes = %names,
                      "removing the half-made volumes of an interrupted provisioning");
                let mut args = vec!["--yes".to_string()];
                args.extend(leftovers.iter().map(|v| format!("{vg}/{}", v.name)));
                tool("remove half-made volumes", &subject, "lvremove", args)?;
            }
            create_pool(config)?;
            list_lvs(vg)?
                .into_iter()
                .find(|v| v.name == lv)
                .ok_or_else(|| PoolError::PoolMissing(format!("{vg}/{lv}")))?
        }
    };
    if !pool.active {
        changed = true;
        tool(
            "activate",
            &subject,
            "lvchange",
            ["--activate", "y", &format!("{vg}/{lv}")],
        )?;
        info!(pool = %subject.display(), "activated LVM thin pool");
    }
    let want = config.pool.block_size.as_u64();
    if pool.chunk_bytes != 0 && pool.chunk_bytes != want {
        warn!(pool = %subject.display(), existing = pool.chunk_bytes, configured = want,
              "pool.block_size differs from the existing pool's chunk size; the pool's own is used");
    }
    let profile = write_profile(l)?;
    if pool.profile != profile {
        tool(
            "apply the autoextend profile to",
            &subject,
            "lvchange",
            ["--metadataprofile", &profile, &format!("{vg}/{lv}")],
        )?;
        info!(pool = %subject.display(), profile = %profile, "applied LVM metadata profile");
    }
    // dmeventd does the autoextending; without it (no dmeventd, monitoring off) the pool still
    // works, it just does not grow.
    let monitored = if changed {
        list_lvs(vg)?
            .iter()
            .find(|v| v.name == lv)
            .is_some_and(|v| v.monitor == "monitored")
    } else {
        pool.monitor == "monitored"
    };
    if !monitored {
        match tool(
            "monitor",
            &subject,
            "lvchange",
            ["--monitor", "y", &format!("{vg}/{lv}")],
        ) {
            Ok(_) => info!(pool = %subject.display(), "dmeventd monitors the pool"),
            Err(e) => warn!(pool = %subject.display(), error = %e,
                            "cannot have dmeventd monitor the pool: it will not autoextend"),
        }
    }
    Ok(())
}

/// The LVM thin volumes in thin pool `lv` (thinsnap's own thin devices are not LVM volumes).
fn lvm_thin_volumes(lvs: &[Lv], lv: &str) -> Vec<String> {
    lvs.iter()
        .filter(|v| v.pool_lv == lv && v.segtype == "thin")
        .map(|v| v.name.clone())
        .collect()
}

/// The dm name of `vg/lv`'s device whose table is a thin-pool target.
fn find_pool_device(vg: &str, lv: &str) -> Result<String, PoolError> {
    let dm = open_dm()?;
    let candidates = pool_dm_candidates(vg, lv);
    for name in &candidates {
        if !device_exists(&dm, name)? {
            continue;
        }
        let n = DmNameBuf::new(name.clone()).map_err(|source| PoolError::Dm {
            op: "name",
            target: name.clone(),
            source,
        })?;
        let (_, table) = dm
            .table_status(
                &DevId::Name(&n),
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|source| PoolError::Dm {
                op: "table",
                target: name.clone(),
                source,
            })?;
        if let [(_, _, target, _)] = table.as_slice() {
            if target == "thin-pool" {
                return Ok(name.clone());
            }
        }
        debug!(device = %name, "not the thin-pool target");
    }
    Err(PoolError::PoolMissing(format!(
        "{vg}/{lv} (no active dm device {} or {} with a thin-pool table after activation; is \
         it excluded by activation/volume_list in lvm.conf?)",
        candidates[0], candidates[1]
    )))
}

/// Makes sure the volume group, the thin pool and its autoextend profile exist on
/// `pool.lvm.device`, creating them if not, activates the pool, and returns the dm name of the
/// thin-pool device (`<vg>-<pool>`, or `<vg>-<pool>-tpool` when LVM layers it; dashes in the
/// names doubled).
///
/// Idempotent: after a restart or a reboot it only activates what exists. thinsnap must never
/// send `set_transaction_id` to the pool this returns: LVM owns its transaction id (see the
/// module documentation).
///
/// Returns an error naming the device or volume group if the device is not a block device, holds
/// a signature (a filesystem, say) and `pool.lvm.force` is off, belongs to another volume group,
/// the volume group lives on other devices, the group holds volumes of the pool's names that are
/// not a thin pool, or an lvm2 tool fails (its stderr included).
pub fn provision(config: &Config) -> Result<String, PoolError> {
    let l = &config.pool.lvm;
    let device = l.device.as_deref().ok_or_else(|| {
        io_err(
            "lvm mode needs",
            "pool.lvm.device",
            "the block device to use is not configured",
        )
    })?;
    check_name("pool.lvm.volume_group", &l.volume_group)?;
    check_name("pool.lvm.thin_pool", &l.thin_pool)?;
    let vg = l.volume_group.as_str();
    let rdev = block_device_number(device)?;
    let pvs = list_pvs(device)?;
    let this = pvs.iter().find(|p| same_device(&p.name, rdev));
    let tagged = match this {
        Some(pv) if pv.vg == vg => {
            debug!(device = %device.display(), volume_group = %vg, "found the volume group");
            pv.vg_tags.iter().any(|t| t == VG_TAG)
        }
        Some(pv) if !pv.vg.is_empty() => {
            return Err(io_err(
                "refusing to use",
                device,
                format!(
                    "it is a physical volume of volume group {}, not of pool.lvm.volume_group \
                     {vg}; thinsnap does not take over another group (remove it with vgremove, or \
                     configure volume_group = {:?} to put the pool in it)",
                    pv.vg, pv.vg
                ),
            ));
        }
        _ => {
            let elsewhere: Vec<&str> = pvs
                .iter()
                .filter(|p| p.vg == vg)
                .map(|p| p.name.as_str())
                .collect();
            if !elsewhere.is_empty() {
                return Err(io_err(
                    "refusing to use",
                    device,
                    format!(
                        "volume group {vg} already exists on {}, not on this device",
                        elsewhere.join(", ")
                    ),
                ));
            }
            // An orphan physical volume counts as a signature like any other: wipefs lists it.
            make_pv(device, l.force)?;
            tool(
                "create volume group",
                Path::new(vg),
                "vgcreate",
                [
                    OsStr::new("--addtag"),
                    OsStr::new(VG_TAG),
                    OsStr::new(vg),
                    device.as_os_str(),
                ],
            )?;
            info!(device = %device.display(), volume_group = %vg, "created LVM volume group");
            true
        }
    };
    ensure_pool(config, tagged)?;
    let name = find_pool_device(vg, &l.thin_pool)?;
    info!(pool = %name, device = %device.display(), volume_group = %vg,
          "LVM thin pool ready");
    Ok(name)
}

/// `pool destroy --remove-files` in lvm mode: removes the thin pool, then the volume group and
/// the physical volume label if thinsnap made the group (tagged `thinsnap`) and nothing else is in
/// it, and the autoextend profile. What is already gone is skipped, so it can be run again.
/// thinsnap's own dm devices on the pool must have been removed first.
///
/// Returns an error naming the volume group or device if an lvm2 tool fails (the pool is still
/// open, say) or the group holds volumes thinsnap did not make.
pub fn teardown(config: &Config) -> Result<(), PoolError> {
    let l = &config.pool.lvm;
    check_name("pool.lvm.volume_group", &l.volume_group)?;
    check_name("pool.lvm.thin_pool", &l.thin_pool)?;
    let (vg, lv) = (l.volume_group.as_str(), l.thin_pool.as_str());
    if let Some(info) = find_vg(vg)? {
        let lvs = list_lvs(vg)?;
        let thin_lvs = lvm_thin_volumes(&lvs, lv);
        if !thin_lvs.is_empty() {
            return Err(io_err(
                "not removing the thin pool",
                format!("{vg}/{lv}"),
                format!(
                    "it holds LVM thin volumes thinsnap did not make: {}",
                    thin_lvs.join(", ")
                ),
            ));
        }
        let tagged = info.tags.iter().any(|t| t == VG_TAG);
        let meta = format!("{lv}meta");
        // The pool; in a group thinsnap made, also the linear volumes of a half-made pool.
        let ours: Vec<String> = lvs
            .iter()
            .filter(|v| {
                (v.name == lv && v.segtype == "thin-pool")
                    || (tagged && (v.name == lv || v.name == meta) && v.segtype == "linear")
            })
            .map(|v| format!("{vg}/{}", v.name))
            .collect();
        if !ours.is_empty() {
            let mut args = vec!["--yes".to_string()];
            args.extend(ours.iter().cloned());
            tool(
                "remove the thin pool",
                Path::new(&format!("{vg}/{lv}")),
                "lvremove",
                args,
            )?;
            info!(pool = %format!("{vg}/{lv}"), "removed LVM thin pool");
        }
        if tagged {
            let others: Vec<String> = list_lvs(vg)?.into_iter().map(|v| v.name).collect();
            if !others.is_empty() {
                return Err(io_err(
                    "not removing volume group",
                    vg,
                    format!(
                        "it still holds logical volumes thinsnap did not make: {}",
                        others.join(", ")
                    ),
                ));
            }
            tool(
                "remove volume group",
                Path::new(vg),
                "vgremove",
                ["--yes", vg],
            )?;
            info!(volume_group = %vg, "removed LVM volume group");
        } else {
            info!(volume_group = %vg, "volume group not made by thinsnap: kept");
        }
    }
    if let Some(device) = l.device.as_deref() {
        if let Ok(rdev) = block_device_number(device) {
            let orphan = list_pvs(device)?
                .iter()
                .any(|p| p.vg.is_empty() && same_device(&p.name, rdev));
            if orphan {
                tool(
                    "remove the physical volume label of",
                    device,
                    "pvremove",
                    [OsStr::new("--yes"), device.as_os_str()],
                )?;
                info!(device = %device.display(), "removed LVM physical volume label");
            }
        }
    }
    let profile = profile_path(l);
    match std::fs::remove_file(&profile) {
        Ok(()) => info!(profile = %profile.display(), "removed LVM profile"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PoolError::Io {
                op: "remove",
                path: profile,
                source,
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_with_name_prefixes_are_parsed() {
        let out = "  LVM2_PV_NAME='/dev/loop0' LVM2_VG_NAME='tvg'\n  LVM2_PV_NAME='/dev/sdb' LVM2_VG_NAME=''\n\n";
        let rows = parse_report(out);
        assert_eq!(rows.len(), 2);
        assert_eq!(field(&rows[0], "pv_name"), "/dev/loop0");
        assert_eq!(field(&rows[0], "vg_name"), "tvg");
        assert_eq!(field(&rows[1], "vg_name"), "");
        let rows = parse_report(
            "  LVM2_LV_NAME='pool' LVM2_SEGTYPE='thin-pool' LVM2_LV_ACTIVE='active' LVM2_LV_PROFILE='a b\\'c' LVM2_CHUNK_SIZE='65536'\n",
        );
        assert_eq!(field(&rows[0], "segtype"), "thin-pool");
        assert_eq!(field(&rows[0], "lv_profile"), "a b'c");
        assert_eq!(field(&rows[0], "chunk_size"), "65536");
        assert!(parse_report("  WARNING: something\n").is_empty());
    }

    #[test]
    fn dm_names_double_dashes() {
        assert_eq!(dm_name_of("tvg", "pool"), "tvg-pool");
        assert_eq!(dm_name_of("my-vg", "thin-pool"), "my--vg-thin--pool");
        assert_eq!(
            pool_dm_candidates("my-vg", "p"),
            ["my--vg-p-tpool".to_string(), "my--vg-p".to_string()]
        );
    }

    #[test]
    fn names_lvm_refuses_are_refused_early() {
        assert!(check_name("k", "thinsnap_vg-1.a+b").is_ok());
        for bad in ["", "-x", ".", "..", "a/b", "a b", "../../etc"] {
            let e = check_name("pool.lvm.volume_group", bad).expect_err(bad);
            assert!(e.to_string().contains("pool.lvm.volume_group"), "{e}");
        }
    }

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

    #[test]
    fn wipefs_output_is_described() {
        assert_eq!(
            parse_signatures("ext4,0x438\ndos,0x1fe\n"),
            vec!["ext4 at offset 0x438", "dos at offset 0x1fe"]
        );
        assert!(parse_signatures("\n").is_empty());
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let e = block_device_number(f.path()).expect_err("a file");
        assert!(e.to_string().contains("not a block device"), "{e}");
        assert!(e.to_string().contains(&f.path().display().to_string()));
    }

    #[test]
    fn tool_errors_name_the_subject_and_carry_stderr() {
        let e = tool(
            "test",
            Path::new("/dev/xyz"),
            "sh",
            ["-c", "echo '  first line' >&2; echo second >&2; exit 3"],
        )
        .expect_err("exit 3");
        let s = e.to_string();
        assert!(s.starts_with("test /dev/xyz: `sh -c"), "{s}");
        assert!(s.contains("first line; second"), "{s}");
        let e = tool("test", Path::new("vg"), "no-such-tool-xyz", ["a"]).expect_err("missing");
        assert!(e.to_string().contains("no-such-tool-xyz"), "{e}");
    }
}
