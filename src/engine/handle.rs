//! The engine as the services reach it, also while the daemon is still starting:
//! [`EngineHandle`].
//!
//! After a reboot most of a start is the kernel's: attaching the loop devices and making the thin
//! pool (how long: benches/RESULTS.md, (d') after a reboot) come before recovery can run. The store is open long before that.
//! When it is *settled* (every record Ready, no Commit intent, every snapshot's device recorded:
//! no call was cut short, so recovery cannot add, drop or rename anything a client sees), Stat
//! and List (Walk) are answered from it at once, with the code the engine itself answers them
//! with (`super::reads`). Every other call (and, on a store that is not settled, every
//! call) waits until recovery has made the engine, or gets Unavailable if the start failed.
//!
//! Nothing is written before the engine exists: the reads from the settled store only read.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::reads::{list_blocking, stat_in};
#[cfg(doc)]
use super::recovery::Records;
use super::{Calls, Engine, EngineError, SnapshotInfo};
use crate::store::Store;

/// What the start ended with: the engine, or why there is none.
type Outcome = Option<Result<Arc<Engine>, String>>;

/// The engine, or the promise of it while the daemon starts (see the module doc). Cheap to
/// clone: the gRPC services, the metrics endpoint and the background tasks each hold one.
#[derive(Clone)]
pub struct EngineHandle {
    /// The settled store, answering Stat and List before the engine exists (none: every call
    /// waits for the engine).
    settled_store: Option<Store>,
    engine: watch::Receiver<Outcome>,
    /// The calls in flight, each a task of its own ([`EngineHandle::detached`]).
    calls: Calls,
    /// How many calls wait for the engine now ([`EngineHandle::waiting`]).
    waiting: Arc<AtomicUsize>,
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
            settled_store: None,
            engine: rx,
            calls: Calls::default(),
            waiting: Arc::default(),
        }
    }

    /// A handle on an engine still to be made, answering Stat and List from `settled_store` meanwhile
    /// (give it only a settled store: see [`Records::settled`]).
    pub fn starting(settled_store: Option<Store>) -> (EngineHandle, Publisher) {
        let (tx, rx) = watch::channel(None);
        (
            EngineHandle {
                settled_store,
                engine: rx,
                calls: Calls::default(),
                waiting: Arc::default(),
            },
            Publisher(tx),
        )
    }

    /// The engine, waiting for it while the daemon starts.
    ///
    /// Returns Unavailable if the start failed.
    pub async fn engine(&self) -> Result<Arc<Engine>, EngineError> {
        let mut rx = self.engine.clone();
        /// Counts a call among those waiting for as long as it waits.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&self.waiting);
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| EngineError::Unavailable("thinsnap stopped while starting".into()))?;
        let outcome = match outcome.as_ref() {
            Some(Ok(engine)) => Ok(engine.clone()),
            Some(Err(why)) => Err(EngineError::Unavailable(format!(
                "thinsnap failed to start: {why}"
            ))),
            None => unreachable!("wait_for returned an outcome"),
        };
        drop(waiting);
        outcome
    }

    /// How many calls are waiting for the engine now (while the daemon starts; 0 once it is
    /// there).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
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
        match &self.settled_store {
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
