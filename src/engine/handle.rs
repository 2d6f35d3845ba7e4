//! The engine as the services reach it, also while the daemon is still starting:
//! [`EngineHandle`].
//!
//! After a reboot most of a start is the kernel's: attaching the loop devices and making the thin
//! pool (0.5-0.7 s in the VM) come before recovery can run. The store is open long before that.
//! When it is *settled* (every record Ready, no Commit intent, every snapshot's device recorded:
//! no call was cut short, so recovery cannot add, drop or rename anything a client sees), Stat
//! and List (Walk) are answered from it at once, with the code the engine itself answers them
//! with ([`stat_in`], [`list_in`]). Every other call (and, on a store that is not settled, every
//! call) waits until recovery has made the engine, or gets Unavailable if the start failed.
//!
//! Nothing is written before the engine exists: the early reads only read.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

#[cfg(doc)]
use super::recovery::Records;
use super::{filter, Calls, Engine, EngineError, SnapshotInfo};
use crate::store::{SnapshotRecord, State, Store};

/// What the start ended with: the engine, or why there is none.
type Outcome = Option<Result<Arc<Engine>, String>>;

/// The engine, or the promise of it while the daemon starts (see the module doc). Cheap to
/// clone: the gRPC services, the metrics endpoint and the background tasks each hold one.
#[derive(Clone)]
pub struct EngineHandle {
    /// The settled store, answering Stat and List before the engine exists.
    early: Option<Store>,
    engine: watch::Receiver<Outcome>,
    /// The calls in flight, each a task of its own ([`EngineHandle::detached`]).
    calls: Calls,
}

/// The start's end of an [`EngineHandle`]: publishes the engine once recovery has made it, or
/// the start's failure.
pub struct Publisher(watch::Sender<Outcome>);

impl Publisher {
    /// Hands the engine to every call waiting for it.
    pub fn ready(self, engine: Arc<Engine>) {
        self.0.send_replace(Some(Ok(engine)));
    }

    /// The start failed: waiting calls (and later ones) get Unavailable with `why`.
    pub fn failed(self, why: String) {
        self.0.send_replace(Some(Err(why)));
    }
}

impl EngineHandle {
    /// A handle on an engine that is already there.
    pub fn ready(engine: Arc<Engine>) -> EngineHandle {
        let (tx, rx) = watch::channel(None);
        Publisher(tx).ready(engine);
        EngineHandle {
            early: None,
            engine: rx,
            calls: Calls::default(),
        }
    }

    /// A handle on an engine still to be made, answering Stat and List from `early` meanwhile
    /// (give it only a settled store: see [`Records::settled`]).
    pub fn starting(early: Option<Store>) -> (EngineHandle, Publisher) {
        let (tx, rx) = watch::channel(None);
        (
            EngineHandle {
                early,
                engine: rx,
                calls: Calls::default(),
            },
            Publisher(tx),
        )
    }

    /// The engine, waiting for it while the daemon starts.
    ///
    /// Returns Unavailable if the start failed.
    pub async fn engine(&self) -> Result<Arc<Engine>, EngineError> {
        let mut rx = self.engine.clone();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| EngineError::Unavailable("thinsnap stopped while starting".into()))?;
        match outcome.as_ref() {
            Some(Ok(engine)) => Ok(engine.clone()),
            Some(Err(why)) => Err(EngineError::Unavailable(format!(
                "thinsnap failed to start: {why}"
            ))),
            None => unreachable!("wait_for returned an outcome"),
        }
    }

    /// Runs `f` on the engine (waiting for it while the daemon starts) as a task of its own in
    /// the set of calls in flight ([`Calls`]): the caller only awaits it, so a caller that is
    /// dropped (a client gone) does not stop the engine's work half way, and a clean stop waits
    /// for it. `what` names the call in the log (`prepare "key"`).
    ///
    /// Returns what `f` returns; Unavailable if the start failed; Internal if the task panicked.
    pub async fn detached<T, F, Fut>(&self, what: String, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Engine>) -> Fut,
        Fut: Future<Output = Result<T, EngineError>> + Send + 'static,
    {
        // A caller gone while the daemon starts has changed nothing.
        let engine = self.engine().await?;
        let call = f(engine);
        let task = self.calls.spawn(what.clone(), call);
        task.await
            .map_err(|e| EngineError::Internal(format!("{what}: task failed: {e}")))?
    }

    /// The calls in flight (see [`Calls`]).
    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// The engine if it is there now (none while starting or after a failed start).
    pub fn now(&self) -> Option<Arc<Engine>> {
        match self.engine.borrow().as_ref() {
            Some(Ok(engine)) => Some(engine.clone()),
            _ => None,
        }
    }

    /// The store that answers reads now: the engine's, or the settled store while starting.
    async fn reader(&self) -> Result<Store, EngineError> {
        if let Some(engine) = self.now() {
            return Ok(engine.store.clone());
        }
        match &self.early {
            Some(store) => Ok(store.clone()),
            None => Ok(self.engine().await?.store.clone()),
        }
    }

    /// Stat (see [`Engine::stat`]), answered during the start when the store is settled.
    pub async fn stat(&self, key: &str) -> Result<SnapshotInfo, EngineError> {
        stat_in(&self.reader().await?, key)
    }

    /// List (see [`Engine::list`]), answered during the start when the store is settled.
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, EngineError> {
        list_blocking(self.reader().await?, filters).await
    }
}

/// A snapshot's record as clients see it.
pub(super) fn info_of(key: &str, rec: &SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        key: key.to_string(),
        kind: rec.kind,
        parent: rec.parent.clone().unwrap_or_default(),
        labels: rec.labels.clone(),
        created_at: super::to_time(rec.created_at),
        updated_at: super::to_time(rec.updated_at),
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
    super::limits::check_key("key", key)?;
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
