//! Running the lvm2 and util-linux tools lvm mode needs, and reading what they print: one
//! [`tool`] runner (stdin closed, `LC_ALL=C`, `DM_DISABLE_UDEV=1` without udev), lvm2's
//! `--reportformat json` reports parsed into physical volumes, volume groups and logical volumes,
//! `wipefs` signatures, and the block device a path names.
//!
//! It only reads: whatever changes a device, group or volume is decided in [`super::provision`]
//! or [`super::teardown`], which call [`tool`] themselves. It knows nothing of device-mapper.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::debug;

use super::LvmError;
use crate::pool::PoolError;

/// One row of an lvm2 report: field name (lower case, no `LVM2_`) -> value.
type Row = HashMap<String, String>;

fn tool_err(op: &'static str, path: impl Into<PathBuf>, msg: impl Into<String>) -> PoolError {
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
pub(super) fn tool<I, S>(
    op: &'static str,
    subject: &Path,
    program: &str,
    args: I,
) -> Result<String, PoolError>
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
        return Err(tool_err(
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

/// Parses an lvm2 report printed with `--reportformat json`:
/// `{"report": [{"pv": [{"pv_name": "/dev/sdb", ...}, ...]}]}`, one object per row whose keys
/// are the field names (`pv_name`, `segtype`, ...). Values are strings in that format; numbers,
/// lists (`json_std`) and nulls are taken as their text, a list joined by commas.
///
/// Returns an error naming the tool's output if it is not such a report.
fn parse_report(text: &str) -> Result<Vec<Row>, String> {
    #[derive(serde::Deserialize)]
    struct Report {
        report: Vec<HashMap<String, Vec<HashMap<String, serde_json::Value>>>>,
    }
    fn text_of(v: serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            serde_json::Value::Array(items) => {
                items.into_iter().map(text_of).collect::<Vec<_>>().join(",")
            }
            other => other.to_string(),
        }
    }
    let parsed: Report = serde_json::from_str(text.trim())
        .map_err(|e| format!("not an lvm2 JSON report ({e}): {}", one_line(text)))?;
    Ok(parsed
        .report
        .into_iter()
        .flat_map(|section| section.into_values().flatten())
        .map(|row| row.into_iter().map(|(k, v)| (k, text_of(v))).collect())
        .collect())
}

fn field(row: &Row, key: &str) -> String {
    row.get(key).cloned().unwrap_or_default()
}

/// Runs lvm2 report `program` (`pvs`, `vgs`, `lvs`) for `fields`, sizes in bytes if
/// `sizes_in_bytes`, limited to volume group `select` if given, and parses its rows.
///
/// Returns [`PoolError::Io`] as [`tool`] does.
fn report(
    op: &'static str,
    subject: &Path,
    program: &str,
    sizes_in_bytes: bool,
    fields: &str,
    select: Option<&str>,
) -> Result<Vec<Row>, PoolError> {
    let mut args = vec!["--reportformat", "json"];
    if sizes_in_bytes {
        args.extend(["--units", "b", "--nosuffix"]);
    }
    args.extend(["-o", fields]);
    args.extend(select);
    parse_report(&tool(op, subject, program, args)?).map_err(|msg| tool_err(op, subject, msg))
}

/// The device number of block device `dev` (following symlinks such as /dev/disk/by-id/...).
///
/// Returns [`LvmError::NotABlockDevice`] if it is something else, [`PoolError::Io`] if it cannot
/// be inspected.
pub(super) fn block_device_number(dev: &Path) -> Result<u64, PoolError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(dev).map_err(|source| PoolError::Io {
        op: "pool.lvm.device",
        path: dev.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(LvmError::NotABlockDevice(dev.to_path_buf()).into());
    }
    Ok(meta.rdev())
}

pub(super) fn same_device(path: &str, rdev: u64) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        .unwrap_or(false)
}

#[derive(Debug, Clone)]
pub(super) struct Pv {
    pub(super) name: String,
    pub(super) vg: String,
    /// The tags of the PV's volume group.
    pub(super) vg_tags: Vec<String>,
}

fn tags(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every physical volume with its group (one scan: each lvm2 command scans all devices).
pub(super) fn list_pvs(device: &Path) -> Result<Vec<Pv>, PoolError> {
    let rows = report(
        "list physical volumes for",
        device,
        "pvs",
        false,
        "pv_name,vg_name,vg_tags",
        None,
    )?;
    Ok(rows
        .iter()
        .map(|r| Pv {
            name: field(r, "pv_name"),
            vg: field(r, "vg_name"),
            vg_tags: tags(&field(r, "vg_tags")),
        })
        .collect())
}

#[derive(Debug, Clone)]
pub(super) struct Vg {
    pub(super) tags: Vec<String>,
    pub(super) free_bytes: u64,
}

pub(super) fn find_vg(vg: &str) -> Result<Option<Vg>, PoolError> {
    let rows = report(
        "list volume groups for",
        Path::new(vg),
        "vgs",
        true,
        "vg_name,vg_tags,vg_free",
        None,
    )?;
    Ok(rows.iter().find(|r| field(r, "vg_name") == vg).map(|r| Vg {
        tags: tags(&field(r, "vg_tags")),
        free_bytes: field(r, "vg_free").parse().unwrap_or(0),
    }))
}

#[derive(Debug, Clone, Default)]
pub(super) struct Lv {
    pub(super) name: String,
    pub(super) segtype: String,
    pub(super) active: bool,
    pub(super) profile: String,
    pub(super) chunk_bytes: u64,
    pub(super) monitor: String,
    pub(super) size_bytes: u64,
    /// The thin pool a thin volume lives in.
    pub(super) pool_lv: String,
}

/// The visible logical volumes of `vg` (one row each; hidden sub-volumes are left out).
pub(super) fn list_lvs(vg: &str) -> Result<Vec<Lv>, PoolError> {
    let rows = report(
        "list logical volumes of volume group",
        Path::new(vg),
        "lvs",
        true,
        "lv_name,segtype,lv_active,lv_profile,chunk_size,seg_monitor,lv_size,pool_lv",
        Some(vg),
    )?;
    let mut lvs: Vec<Lv> = Vec::new();
    for r in rows {
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
pub(super) fn signatures(dev: &Path) -> Result<Vec<String>, PoolError> {
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

/// The LVM thin volumes in thin pool `lv` (thinsnap's own thin devices are not LVM volumes).
pub(super) fn lvm_thin_volumes(lvs: &[Lv], lv: &str) -> Vec<String> {
    lvs.iter()
        .filter(|v| v.pool_lv == lv && v.segtype == "thin")
        .map(|v| v.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_reports_are_parsed() {
        // As Debian 12's lvm2 (2.03.16) prints them.
        let out = r#"  {
      "report": [
          {
              "pv": [
                  {"pv_name":"/dev/loop0", "vg_name":"tvg", "pv_size":"62914560", "pv_tags":""},
                  {"pv_name":"/dev/sdb", "vg_name":"", "pv_size":"1024", "pv_tags":"a,b"}
              ]
          }
      ]
  }
"#;
        let rows = parse_report(out).expect("parse");
        assert_eq!(rows.len(), 2);
        assert_eq!(field(&rows[0], "pv_name"), "/dev/loop0");
        assert_eq!(field(&rows[0], "vg_name"), "tvg");
        assert_eq!(field(&rows[0], "pv_size"), "62914560");
        assert_eq!(field(&rows[1], "vg_name"), "");
        assert_eq!(tags(&field(&rows[1], "pv_tags")), vec!["a", "b"]);
        // Quotes and backslashes in names come back as they are; json_std's numbers and lists
        // as their text.
        let rows = parse_report(
            r#"{"report":[{"lv":[{"lv_name":"pool","segtype":"thin-pool","lv_profile":"a b'c\\d","chunk_size":65536,"lv_tags":["x","y"],"pool_lv":null}]}]}"#,
        )
        .expect("parse");
        assert_eq!(field(&rows[0], "segtype"), "thin-pool");
        assert_eq!(field(&rows[0], "lv_profile"), "a b'c\\d");
        assert_eq!(field(&rows[0], "chunk_size"), "65536");
        assert_eq!(field(&rows[0], "lv_tags"), "x,y");
        assert_eq!(field(&rows[0], "pool_lv"), "");
        assert!(parse_report(r#"{"report":[{"lv":[]}]}"#)
            .expect("empty")
            .is_empty());
        let err = parse_report("  WARNING: something\n").expect_err("not json");
        assert!(err.contains("WARNING: something"), "{err}");
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
