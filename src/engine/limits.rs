//! What a request may carry: key and label limits, and the size label. Pure checks, run before
//! a call takes any lock or touches the store.

use std::collections::BTreeMap;

use super::EngineError;

/// Longest snapshot key or name accepted, in bytes (containerd's keys are a namespace, a counter
/// and a digest: far below this).
pub const MAX_KEY_LEN: usize = 4096;
/// Longest label key plus value, in bytes (containerd's own limit for labels).
pub const MAX_LABEL_LEN: usize = 4096;
/// Most labels one snapshot may carry.
pub const MAX_LABELS: usize = 256;
/// Most bytes of label keys and values one snapshot may carry in all. containerd caps each
/// label (key and value) at 4096 bytes (labels.Validate, checked by its metadata store) but not
/// their sum; the labels it sets itself on a snapshot are a handful (the unpacker's
/// `containerd.io/snapshot.ref`, the CRI's `containerd.io/snapshot/cri.*`, each kept within
/// that 4096) and `gc.root`. 64 KiB is sixteen maximal labels, room for all of them many times
/// over, and keeps one snapshot's info near 75 KiB: containerd's own Snapshots service sends
/// List in batches of 100 infos (services/snapshots), 7.5 MiB at most, under the 16 MiB its
/// clients accept; 256 labels of 4096 bytes (1 MiB each) would have made those batches 100 MiB.
pub const MAX_LABELS_BYTES: usize = 64 * 1024;
/// Most field paths one Update may name: every label of the request set or removed one by one
/// (`labels.<key>`, with at most [`MAX_LABELS`] on the snapshot before and after), and `labels`.
pub const MAX_FIELD_PATHS: usize = 2 * MAX_LABELS + 1;

/// The label that makes a snapshot's device larger than its parent's (human units).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinsnap.size";

/// Checks a key or name (`what` says which).
///
/// Returns InvalidArgument if it is empty or longer than [`MAX_KEY_LEN`].
pub fn check_key(what: &str, key: &str) -> Result<(), EngineError> {
    if key.is_empty() {
        return Err(EngineError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(EngineError::InvalidArgument(format!(
            "{what} is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels against the documented limits: [`MAX_LABEL_LEN`] each, [`MAX_LABELS`] and
/// [`MAX_LABELS_BYTES`] in all.
///
/// Returns InvalidArgument naming the offending label, or the count or total that is too large.
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), EngineError> {
    let (mut n, mut bytes) = (0, 0usize);
    for (k, v) in labels {
        n += 1;
        bytes += k.len() + v.len();
        if k.is_empty() {
            return Err(EngineError::InvalidArgument(
                "label key must not be empty".into(),
            ));
        }
        if k.len() + v.len() > MAX_LABEL_LEN {
            let shown: String = k.chars().take(64).collect();
            return Err(EngineError::InvalidArgument(format!(
                "label {shown:?}: key and value are {} bytes; at most {MAX_LABEL_LEN} are allowed",
                k.len() + v.len()
            )));
        }
    }
    if n > MAX_LABELS {
        return Err(EngineError::InvalidArgument(format!(
            "{n} labels; at most {MAX_LABELS} are allowed"
        )));
    }
    if bytes > MAX_LABELS_BYTES {
        return Err(EngineError::InvalidArgument(format!(
            "labels total {bytes} bytes (keys and values); at most {MAX_LABELS_BYTES} are allowed per snapshot"
        )));
    }
    Ok(())
}

/// Checks an Update's field paths before any work: at most [`MAX_FIELD_PATHS`], each `labels`
/// or `labels.<key>` (the only mutable fields). Returns whether one of them is `labels` (the
/// request's labels replace the snapshot's).
///
/// Returns InvalidArgument naming the count, or the first immutable field and the snapshot.
pub fn check_field_paths(key: &str, paths: &[String]) -> Result<bool, EngineError> {
    if paths.len() > MAX_FIELD_PATHS {
        return Err(EngineError::InvalidArgument(format!(
            "update of snapshot {key:?}: {} field paths; at most {MAX_FIELD_PATHS} are allowed",
            paths.len()
        )));
    }
    let mut all = false;
    for path in paths {
        if path == "labels" {
            all = true;
        } else if !path.starts_with("labels.") {
            return Err(EngineError::InvalidArgument(format!(
                "cannot update field {path:?} of snapshot {key:?}: only labels are mutable"
            )));
        }
    }
    Ok(all)
}

/// Where the size of a new snapshot's device comes from when it is not its parent's: named in
/// every error about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeSource {
    /// thinsnap's own label, [`SIZE_LABEL`] (human units).
    Label,
    /// containerd's standard label, [`MAX_SIZE_LABEL`] (decimal bytes).
    MaxSizeLabel,
    /// A raised `fs.base_size`, for a new image's first layer (see `Engine::grown_base_size`).
    BaseSize,
}

impl std::fmt::Display for SizeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeSource::Label => write!(f, "label {SIZE_LABEL}"),
            SizeSource::MaxSizeLabel => write!(f, "label {MAX_SIZE_LABEL}"),
            SizeSource::BaseSize => write!(f, "fs.base_size"),
        }
    }
}

/// A device size asked for a new snapshot, in bytes, and who asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeAsk {
    pub bytes: u64,
    pub from: SizeSource,
}

/// containerd's standard label for the size of an active snapshot's filesystem, in bytes as a
/// decimal integer (`snapshots.LabelSnapshotMaxSize`, containerd 2.4). containerd's CRI copies a
/// pod sandbox's `containerd.io/snapshot/*` annotations onto the sandbox's snapshot (1.6, 1.7,
/// 2.x), and containerd 1.6 also a container's onto the container's.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// The device size `labels` ask for: [`SIZE_LABEL`] (human units) or [`MAX_SIZE_LABEL`]
/// (decimal bytes). Both are checked when both are given; thinsnap's own label wins, as the
/// more specific one (a node's operator may set it on purpose where containerd's comes from a
/// pod's annotations).
///
/// Returns InvalidArgument naming the label, its value and the key if a value is not a size
/// (for [`MAX_SIZE_LABEL`]: not a decimal number of bytes) or not a positive whole number of
/// sectors.
pub fn size_label(
    key: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<SizeAsk>, EngineError> {
    let max_size = match labels.get(MAX_SIZE_LABEL) {
        Some(v) => {
            let bytes = v.trim().parse::<u64>().map_err(|e| {
                EngineError::InvalidArgument(format!(
                    "label {MAX_SIZE_LABEL}={v:?} of {key:?} is not a number of bytes (a decimal integer, as containerd defines it): {e}"
                ))
            })?;
            Some(sectors(
                key,
                MAX_SIZE_LABEL,
                v,
                bytes,
                SizeSource::MaxSizeLabel,
            )?)
        }
        None => None,
    };
    let own = match labels.get(SIZE_LABEL) {
        Some(v) => {
            let size = v.trim().parse::<bytesize::ByteSize>().map_err(|e| {
                EngineError::InvalidArgument(format!(
                    "label {SIZE_LABEL}={v:?} of {key:?} is not a size: {e}"
                ))
            })?;
            Some(sectors(
                key,
                SIZE_LABEL,
                v,
                size.as_u64(),
                SizeSource::Label,
            )?)
        }
        None => None,
    };
    Ok(own.or(max_size))
}

/// `bytes` asked by `label`=`v` as a [`SizeAsk`] from `from`.
///
/// Returns InvalidArgument unless it is a positive whole number of sectors: dm tables, discards
/// and the filesystems all count 512-byte sectors, and a size that is not a whole number of
/// them would make every discard of the device fail.
fn sectors(
    key: &str,
    label: &str,
    v: &str,
    bytes: u64,
    from: SizeSource,
) -> Result<SizeAsk, EngineError> {
    if bytes == 0 || !bytes.is_multiple_of(SECTOR) {
        return Err(EngineError::InvalidArgument(format!(
            "label {label}={v:?} of {key:?}: {bytes} bytes is not a positive multiple of {SECTOR} (a sector)"
        )));
    }
    Ok(SizeAsk { bytes, from })
}

/// The kernel's sector, the unit of every device size.
const SECTOR: u64 = 512;

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(pairs: &[(&str, &str)]) -> Result<Option<SizeAsk>, EngineError> {
        let labels = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        size_label("k", &labels)
    }

    #[test]
    fn containerds_max_size_label_is_decimal_bytes() {
        assert_eq!(
            ask(&[(MAX_SIZE_LABEL, "1073741824")]).expect("valid"),
            Some(SizeAsk {
                bytes: 1 << 30,
                from: SizeSource::MaxSizeLabel
            })
        );
        assert_eq!(ask(&[]).expect("no label"), None);
        // containerd defines the value as a decimal int64: units are refused, naming the label.
        for bad in ["1GiB", "-512", "lots", ""] {
            let err = ask(&[(MAX_SIZE_LABEL, bad)]).expect_err(bad).to_string();
            assert!(
                err.contains(MAX_SIZE_LABEL) && err.contains("\"k\""),
                "{bad}: {err}"
            );
        }
        for bad in ["0", "1000"] {
            let err = ask(&[(MAX_SIZE_LABEL, bad)]).expect_err(bad).to_string();
            assert!(err.contains("multiple of 512"), "{bad}: {err}");
        }
    }

    #[test]
    fn thinsnaps_own_label_wins_and_both_are_checked() {
        let both = ask(&[(SIZE_LABEL, "2GiB"), (MAX_SIZE_LABEL, "1073741824")]).expect("valid");
        assert_eq!(
            both,
            Some(SizeAsk {
                bytes: 2 << 30,
                from: SizeSource::Label
            })
        );
        let err = ask(&[(SIZE_LABEL, "2GiB"), (MAX_SIZE_LABEL, "1G")])
            .expect_err("a bad max-size is refused even when the own label wins")
            .to_string();
        assert!(err.contains(MAX_SIZE_LABEL), "{err}");
    }
}
