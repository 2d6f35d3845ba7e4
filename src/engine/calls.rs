//! The calls in flight: every gRPC call that reaches the engine's kernel or store work runs as a
//! task of its own ([`Calls::spawn`]), which its request only awaits (a client that gives up
//! does not stop it half way). Those tasks belong to this set, so that a clean stop waits for
//! them ([`Calls::wait`]) before the store's last flush: at SIGTERM a call in flight ends with
//! its outcome or its undo, as if nothing had stopped, instead of being dropped at its next
//! await when the runtime goes.
//!
//! It knows nothing of gRPC nor of the engine's calls: a task is a future and a description for
//! the log.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The set of calls in flight (see the module doc). Cheap to clone: clones share the set.
#[derive(Clone)]
pub struct Calls(Arc<Inner>);

struct Inner {
    next: AtomicU64,
    /// Call number -> what it is (`prepare "key"`), for the log of calls that did not end.
    running: watch::Sender<BTreeMap<u64, String>>,
    /// Set once a stop waits for the calls (tests wait for it).
    draining: watch::Sender<bool>,
}

impl Default for Calls {
    fn default() -> Calls {
        Calls(Arc::new(Inner {
            next: AtomicU64::new(0),
            running: watch::channel(BTreeMap::new()).0,
            draining: watch::channel(false).0,
        }))
    }
}

/// Takes a call out of the set when its task ends, or is dropped.
struct Done(Arc<Inner>, u64);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.running.send_modify(|m| {
            m.remove(&self.1);
        });
    }
}

impl Calls {
    /// Runs `call` as a task of the set; `what` names it in the log if a stop has to give up on
    /// it. Must be called within a tokio runtime.
    pub fn spawn<T, F>(&self, what: String, call: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let n = self.0.next.fetch_add(1, Ordering::Relaxed);
        self.0.running.send_modify(|m| {
            m.insert(n, what);
        });
        let done = Done(self.0.clone(), n);
        tokio::spawn(async move {
            let _done = done;
            call.await
        })
    }

    /// How many calls are in flight.
    pub fn len(&self) -> usize {
        self.0.running.borrow().len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no call is in flight, at most `bound`; returns what is still running then
    /// (empty: every call ended).
    pub async fn wait(&self, bound: Duration) -> Vec<String> {
        self.0.draining.send_replace(true);
        let mut rx = self.0.running.subscribe();
        let _ = tokio::time::timeout(bound, rx.wait_for(BTreeMap::is_empty)).await;
        let left = self.0.running.borrow().values().cloned().collect();
        left
    }

    /// Resolves once a stop has begun to wait for the calls ([`Calls::wait`]).
    pub async fn draining(&self) {
        let mut rx = self.0.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_waits_for_the_calls_and_names_those_that_did_not_end() {
        let calls = Calls::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let finishing = calls.spawn("prepare \"a\"".into(), async move {
            let _ = wait.await;
            7
        });
        let stuck = calls.spawn("remove \"b\"".into(), std::future::pending::<()>());
        assert_eq!(calls.len(), 2);
        let waiter = {
            let calls = calls.clone();
            tokio::spawn(async move { calls.wait(Duration::from_secs(3600)).await })
        };
        calls.draining().await;
        go.send(()).expect("the call waits");
        assert_eq!(finishing.await.expect("join"), 7);
        stuck.abort();
        let left = waiter.await.expect("join");
        assert!(left.is_empty(), "{left:?}");
        assert!(calls.is_empty());

        // A call that never ends is named once the bound is over.
        let _never = calls.spawn("commit \"c\"".into(), std::future::pending::<()>());
        let left = calls.wait(Duration::from_millis(1)).await;
        assert_eq!(left, vec!["commit \"c\"".to_string()]);
    }
}
