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

/// The device size the [`SIZE_LABEL`] asks for, if `labels` carry it.
///
/// Returns InvalidArgument if the value is not a size or not a whole number of sectors.
pub fn size_label(
    key: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<u64>, EngineError> {
    let Some(v) = labels.get(SIZE_LABEL) else {
        return Ok(None);
    };
    let size = v.trim().parse::<bytesize::ByteSize>().map_err(|e| {
        EngineError::InvalidArgument(format!(
            "label {SIZE_LABEL}={v:?} of {key:?} is not a size: {e}"
        ))
    })?;
    let size = size.as_u64();
    // dm tables, discards and the filesystems all count 512-byte sectors: a size that is not a
    // whole number of them would make every discard of the device fail.
    if size == 0 || size % SECTOR != 0 {
        return Err(EngineError::InvalidArgument(format!(
            "label {SIZE_LABEL}={v:?} of {key:?}: {size} bytes is not a positive multiple of {SECTOR} (a sector)"
        )));
    }
    Ok(Some(size))
}

/// The kernel's sector, the unit of every device size.
const SECTOR: u64 = 512;
