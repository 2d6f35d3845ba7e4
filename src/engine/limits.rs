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

/// Checks labels against the documented limits.
///
/// Returns InvalidArgument naming the offending label.
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), EngineError> {
    let mut n = 0;
    for (k, v) in labels {
        n += 1;
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
    Ok(())
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
