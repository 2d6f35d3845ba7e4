//! The read path: Stat and List (and the record lookup every call starts with), answered from
//! the store alone. Below both [`Engine`](super::Engine) and [`EngineHandle`](super::EngineHandle):
//! the engine answers with these, and so does the handle while the daemon starts (from a settled
//! store, see `super::handle`). Nothing here writes.

use std::time::{SystemTime, UNIX_EPOCH};

use super::filter;
use super::limits::check_key;
use super::{EngineError, SnapshotInfo};
use crate::store::{SnapshotRecord, State, Store};

/// A record's time (nanoseconds since the epoch) as clients see it.
fn to_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

/// A snapshot's record as clients see it.
pub(super) fn info_of(key: &str, rec: &SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        key: key.to_string(),
        kind: rec.kind,
        parent: rec.parent.clone().unwrap_or_default(),
        labels: rec.labels.clone(),
        created_at: to_time(rec.created_at),
        updated_at: to_time(rec.updated_at),
    }
}

/// The record of `key` if clients see it (Ready).
///
/// Returns NotFound otherwise.
pub(super) fn ready_in(store: &Store, key: &str) -> Result<SnapshotRecord, EngineError> {
    match store.get(key)? {
        Some(rec) if rec.state == State::Ready => Ok(rec),
        _ => Err(EngineError::NotFound(format!("snapshot {key:?} not found"))),
    }
}

/// Stat of `key` in `store`.
///
/// Returns InvalidArgument for a bad key, NotFound if clients do not see it.
pub(super) fn stat_in(store: &Store, key: &str) -> Result<SnapshotInfo, EngineError> {
    check_key("key", key)?;
    Ok(info_of(key, &ready_in(store, key)?))
}

/// [`list_in`] on a blocking thread: a scan of the whole store and every filter evaluated on
/// every snapshot is no work for the async workers that carry every other call. The number of
/// filters is checked first, before anything is copied or parsed.
///
/// Returns InvalidArgument for more than [`filter::MAX_FILTERS`] filters; as [`list_in`].
pub(super) async fn list_blocking(
    store: Store,
    filters: &[String],
) -> Result<Vec<SnapshotInfo>, EngineError> {
    if filters.len() > filter::MAX_FILTERS {
        return Err(EngineError::InvalidArgument(format!(
            "{} filters; at most {} are allowed per List",
            filters.len(),
            filter::MAX_FILTERS
        )));
    }
    let filters = filters.to_vec();
    tokio::task::spawn_blocking(move || list_in(&store, &filters))
        .await
        .map_err(|e| EngineError::Internal(format!("list task failed: {e}")))?
}

/// Every snapshot in `store` that passes `filters` (containerd's syntax: several filters OR,
/// `,` AND).
///
/// Returns InvalidArgument for a filter that does not parse.
pub(super) fn list_in(store: &Store, filters: &[String]) -> Result<Vec<SnapshotInfo>, EngineError> {
    let parsed =
        filter::parse_all(filters).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    let mut out = Vec::new();
    for (key, rec) in store.snapshots()? {
        if rec.state != State::Ready {
            continue;
        }
        let parent = rec.parent.clone().unwrap_or_default();
        let fields = filter::Fields {
            kind: rec.kind.as_str(),
            name: &key,
            parent: &parent,
            labels: &rec.labels,
        };
        if filter::any_matches(&parsed, &fields) {
            out.push(info_of(&key, &rec));
        }
    }
    Ok(out)
}
