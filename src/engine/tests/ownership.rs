//! Whose pool it is (`super::ownership`) against the fake pool: a database of another pool, a
//! new database in front of a pool with thin devices (refused; `pool adopt --keep-foreign` and
//! `--reset`), a database of the previous release (its identity recorded), a fresh pool.

use std::sync::Arc;

use super::recovery;
use super::tests::{no_format, prep, reopen, setup};
use super::*;
use crate::config::FsConfig;
use crate::pool::fake::FakePool;

fn settings(adopt: Option<Adopt>) -> Settings {
    let mut s = Settings::with_fs(FsConfig::default());
    s.adopt = adopt;
    s
}

fn start(
    path: &std::path::Path,
    pool: Arc<FakePool>,
    adopt: Option<Adopt>,
) -> Result<(Engine, recovery::Report), EngineError> {
    recovery::start(pool, reopen(path), settings(adopt), &no_format)
}

/// A pool with instance A's base and two snapshots in it, A's database, and the path of a
/// new (empty) database for the same pool.
async fn pool_of_a() -> (super::tests::T, std::path::PathBuf, tempfile::TempDir) {
    let t = setup();
    prep(&t, "a1", "").await.expect("prepare");
    prep(&t, "a2", "").await.expect("prepare");
    let other = tempfile::tempdir().expect("tempdir");
    let path = other.path().join("db");
    (t, path, other)
}

#[tokio::test]
async fn a_new_database_in_front_of_a_pool_with_thin_devices_is_refused() {
    let (t, new_db, _d) = pool_of_a().await;
    let before = t.pool.thin_ids();
    assert_eq!(before.len(), 3, "base and two snapshots");
    let err = start(&new_db, t.pool.clone(), None)
        .err()
        .expect("a new database in front of a used pool is refused");
    let msg = err.to_string();
    assert!(matches!(err, EngineError::FailedPrecondition(_)), "{msg}");
    assert!(msg.contains("pool adopt --keep-foreign"), "{msg}");
    assert!(msg.contains("--reset"), "{msg}");
    assert_eq!(t.pool.thin_ids(), before, "nothing deleted");
    assert_eq!(t.pool.count("delete_thin"), 0);
    // A's own database still starts on it, and its snapshots are there.
    let (t, _) = t.restart();
    assert!(t.engine.record("a1").expect("rec").is_some());
    assert_eq!(t.pool.thin_ids(), before);
}

#[tokio::test]
async fn keep_foreign_keeps_the_thin_devices_and_never_reuses_their_ids() {
    let (t, new_db, _d) = pool_of_a().await;
    let before = t.pool.thin_ids();
    let (engine, report) = start(&new_db, t.pool.clone(), Some(Adopt::KeepForeign)).expect("adopt");
    assert!(report.thin_ids_listed, "the thin ids were compared");
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    assert!(t.pool.thin_ids().is_superset(&before), "nothing deleted");
    let max = *before.iter().max().expect("ids");
    assert!(engine.base.thin_id > max, "the new base takes a new id");
    drop(engine);
    // Later starts need no flag, and still delete none of them.
    let (engine, report) = start(&new_db, t.pool.clone(), None).expect("restart");
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    assert!(t.pool.thin_ids().is_superset(&before));
    drop(engine);
}

#[tokio::test]
async fn reset_deletes_the_thin_devices_of_a_pool_the_database_does_not_know() {
    let (t, new_db, _d) = pool_of_a().await;
    let before = t.pool.thin_ids();
    let (engine, _) = start(&new_db, t.pool.clone(), Some(Adopt::Reset)).expect("reset");
    for id in &before {
        assert!(
            t.pool.calls().contains(&format!("delete {id}")),
            "{id} deleted"
        );
    }
    let after = t.pool.thin_ids();
    assert_eq!(after.len(), 1, "only the new base: {after:?}");
    assert!(after.contains(&engine.base.thin_id));
    drop(engine);
}

#[tokio::test]
async fn a_database_of_another_pool_is_refused_naming_both() {
    let t = setup();
    t.pool.set_identity(
        "loop pool p (dm uuid thinsnap-pool-aaaa) on /a/pool/data",
        false,
    );
    // The store's first start recorded the empty identity of the fake pool: any other is a
    // mismatch, whatever the pool holds.
    let (_dir, path, pool) = t.into_parts();
    let before = pool.thin_ids();
    let err = start(&path, pool.clone(), None)
        .err()
        .expect("another pool is refused");
    let msg = err.to_string();
    assert!(matches!(err, EngineError::FailedPrecondition(_)), "{msg}");
    assert!(
        msg.contains("thinsnap-pool-aaaa"),
        "names the kernel's pool: {msg}"
    );
    assert!(msg.contains("belongs to"), "names the store's: {msg}");
    assert_eq!(pool.thin_ids(), before);
    // Not even with an adopt flag: adopting is for a database with no record.
    assert!(start(&path, pool.clone(), Some(Adopt::Reset)).is_err());
    assert_eq!(pool.thin_ids(), before);
}

#[tokio::test]
async fn a_database_of_the_previous_release_records_its_pools_identity() {
    let t = setup();
    prep(&t, "a1", "").await.expect("prepare");
    let (_dir, path, pool) = t.into_parts();
    reopen(&path)
        .forget_pool_identity()
        .expect("as the previous release left it");
    pool.set_identity(
        "loop pool p (dm uuid thinsnap-pool-bbbb) on /a/pool/data",
        false,
    );
    let (engine, _) = start(&path, pool.clone(), None).expect("upgrade");
    assert!(engine.record("a1").expect("rec").is_some());
    drop(engine);
    assert_eq!(
        reopen(&path).pool_identity().expect("read").as_deref(),
        Some("loop pool p (dm uuid thinsnap-pool-bbbb) on /a/pool/data")
    );
}

/// A dm device under one of our names that is someone else's fails the call that needs the
/// name as a precondition (the operator must move it), naming the device; nothing is left.
#[tokio::test]
async fn a_foreign_device_under_our_name_fails_the_call_as_a_precondition() {
    let t = setup();
    t.pool.fail_nth_with(
        "activate",
        1,
        crate::pool::PoolError::ForeignDevice {
            name: "fake-snap-1".into(),
            id: ThinId::from(1),
            pool: "fake".into(),
            why: "its table is \"zero\"".into(),
        },
    );
    let err = prep(&t, "a", "").await.expect_err("refused");
    assert!(matches!(err, EngineError::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains("fake-snap-1"), "{err}");
    assert!(t.engine.record("a").expect("rec").is_none());
    prep(&t, "a", "").await.expect("the next try works");
}
