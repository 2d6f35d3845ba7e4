//! The engine's tests against the in-memory fake pool, one file a subject under `tests/`, and the
//! fixture they share ([`T`] and the helpers here).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::recovery::{self, Report};
use super::*;
use crate::config::FsConfig;
use crate::fs::FsError;
use crate::pool::fake::FakePool;
use crate::pool::{PoolError, ThinPool};
use crate::store::{DeviceRecord, State, Store};

/// Asserts that `$call` failed with `EngineError::$variant`, saying what it got otherwise.
macro_rules! assert_err {
    ($call:expr, $variant:ident) => {{
        let got = $call;
        assert!(
            matches!(got, Err(EngineError::$variant(_))),
            "expected {}, got {:?}",
            stringify!($variant),
            got.map(|_| ())
        );
    }};
}

mod base_size;
mod calls;
mod faults;
mod handle;
mod lazy;
mod ownership;
mod reaper;
mod recovery_at_start;
mod rollback;
mod space;
mod spares;
mod upgrade;

// The subject files name this module `super::tests` (they lived beside it, in `engine/`, until
// they moved here whole): the alias keeps them as they were.
use super::tests;

/// The test fixture ("T" for short, as every test names it): an engine on the fake pool, with
/// its store in a temporary directory that lives as long as the fixture.
pub(super) struct T {
    pub(super) _dir: tempfile::TempDir,
    pub(super) path: std::path::PathBuf,
    pub(super) pool: Arc<FakePool>,
    pub(super) engine: Arc<Engine>,
}

pub(super) fn no_format(_: &std::path::Path) -> Result<(), FsError> {
    Ok(())
}

/// Opens the store at `path` again after a simulated crash. sled releases its file lock from
/// its own background thread a moment after the last handle is dropped (a real crash ends the
/// process, so the daemon never meets this): a bounded number of tries, each only after a
/// failed open.
pub(super) fn reopen(path: &std::path::Path) -> Store {
    crate::store::open_after_drop(path)
}

pub(super) fn start_on(path: &std::path::Path, pool: Arc<FakePool>) -> (Arc<Engine>, Report) {
    let store = reopen(path);
    let (e, r) = recovery::start(
        pool,
        store,
        Settings::with_fs(FsConfig::default()),
        &no_format,
    )
    .expect("start");
    (Arc::new(e), r)
}

pub(super) fn setup() -> T {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let (engine, report) = start_on(&path, pool.clone());
    assert!(report.base_created);
    T {
        _dir: dir,
        path,
        pool,
        engine,
    }
}

/// The intent of a parentless Prepare of `key`, recorded by hand as a call that never finished
/// leaves it (state Creating, `roll_forward` false: recovery undoes it), and, with `made`, its
/// `create_snap` done in the pool.
pub(super) fn intent_of(t: &T, key: &str, made: bool) -> crate::store::CreatePlan {
    intent_with(t, key, made, false)
}

/// [`intent_of`] with `roll_forward` as given (true: a Prepare that answered with only its
/// intent durable, which recovery completes when the pool has its thin device).
pub(super) fn intent_with(
    t: &T,
    key: &str,
    made: bool,
    roll_forward: bool,
) -> crate::store::CreatePlan {
    let new = crate::store::NewSnapshot {
        key: key.into(),
        kind: Kind::Active,
        parent: None,
        labels: no_labels(),
        now: 1,
        size: None,
        roll_forward,
    };
    let plan = t
        .engine
        .store
        .begin_create(&new, &t.engine.base)
        .expect("intent");
    if made {
        t.pool
            .create_snap(plan.thin_id, plan.origin)
            .expect("kernel");
    }
    plan
}

impl T {
    /// Drops the engine (as a crash would, without any further call) and starts a new one.
    pub(super) fn restart(self) -> (T, Report) {
        let (_dir, path, pool) = self.into_parts();
        let (engine, report) = start_on(&path, pool.clone());
        (
            T {
                _dir,
                path,
                pool,
                engine,
            },
            report,
        )
    }

    /// Drops the engine (as a crash would) and gives back what a new start needs.
    pub(super) fn into_parts(self) -> (tempfile::TempDir, std::path::PathBuf, Arc<FakePool>) {
        let T {
            _dir,
            path,
            pool,
            engine,
        } = self;
        drop(engine);
        (_dir, path, pool)
    }

    pub(super) fn base_id(&self) -> ThinId {
        self.engine.base.thin_id
    }
}

pub(super) fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

pub(super) async fn prep(t: &T, key: &str, parent: &str) -> Result<Vec<Mount>, EngineError> {
    t.engine
        .create(Kind::Active, key, parent, no_labels())
        .await
}

/// Starts a new engine with `settings` on the same store and pool (a restart).
pub(super) fn restart_with_settings(t: T, settings: Settings) -> (T, Report) {
    let (_dir, path, pool) = t.into_parts();
    let store = reopen(&path);
    let (engine, report) =
        recovery::start(pool.clone(), store, settings, &no_format).expect("start");
    let engine = Arc::new(engine);
    (
        T {
            _dir,
            path,
            pool,
            engine,
        },
        report,
    )
}

pub(super) fn setup_with(settings: Settings) -> T {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let store = reopen(&path);
    let (engine, _) = recovery::start(pool.clone(), store, settings, &no_format).expect("start");
    let engine = Arc::new(engine);
    T {
        _dir: dir,
        path,
        pool,
        engine,
    }
}

/// Waits, in the paused clock's virtual time, until `done` holds: a bound on progress (a minute
/// of virtual time, against the reaper's 2 s retry), never on how fast this machine is.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: not within a minute of virtual time"
    );
}
