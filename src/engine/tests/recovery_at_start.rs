//! Recovery at start after a crash or a reboot (`super::super::recovery`): interrupted calls,
//! orphans, the pool's transaction id, shared pools, thin_ls.

use super::*;

#[tokio::test]
async fn crash_between_intent_and_outcome_is_undone_at_start() {
    let t = setup();
    prep(&t, "keep", "").await.expect("keep");
    // A crash after the intent and create_snap but before the outcome: simulate by recording the
    // intent and doing the kernel step by hand.
    let plan = intent_of(&t, "lost", true);
    t.pool.activate(plan.thin_id, plan.size).expect("kernel");
    t.engine.store.flush_sync().expect("flush");
    let (t, report) = t.restart();
    assert_eq!(report.undone_creates, vec![plan.thin_id]);
    assert!(!t.pool.thin_ids().contains(&plan.thin_id));
    assert!(t.engine.record("lost").expect("rec").is_none());
    prep(&t, "lost", "")
        .await
        .expect("the interrupted key can be prepared again");
    assert!(t.engine.stat("keep").await.is_ok());
}

#[tokio::test]
async fn reboot_leaves_active_snapshots_and_views_awaiting_activation() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    prep(&t, "b", "c").await.expect("b");
    t.engine
        .create(Kind::View, "v", "c", no_labels())
        .await
        .expect("v");
    let ids: Vec<ThinId> = ["b", "v", "c"]
        .iter()
        .map(|k| t.engine.record(k).expect("rec").expect("k").thin_id)
        .collect();
    t.pool.reboot();
    let (t, report) = t.restart();
    let mut re = report.awaiting_activation.clone();
    re.sort();
    let mut want = vec![ids[0], ids[1]];
    want.sort();
    assert_eq!(re, want);
    assert!(!t.pool.active().contains(&ids[2]));
    assert!(!report.base_created);
}

#[tokio::test]
async fn orphan_devices_are_deleted_at_start() {
    let t = setup();
    // A device with our prefix that no record owns (e.g. left by a lost database).
    t.pool.create_thin(ThinId::from(4242)).expect("orphan");
    t.pool
        .activate(ThinId::from(4242), 1)
        .expect("orphan active");
    let (t, report) = t.restart();
    assert_eq!(report.orphans_deleted, vec![4242]);
    assert!(!t.pool.thin_ids().contains(&ThinId::from(4242)));
}

#[tokio::test]
async fn unknown_thin_ids_are_orphans_in_our_pool_and_foreign_in_others() {
    let t = setup();
    // An inactive thin id no record knows (a lost database write, an older version's crash):
    // the pool's transaction id moved on without the store.
    t.pool.create_thin(ThinId::from(777)).expect("orphan");
    let txid = t.pool.status().expect("status").transaction_id;
    t.pool.set_transaction_id(txid, txid + 1).expect("txid");
    let (t, report) = t.restart();
    assert!(report.thin_ids_listed);
    assert_eq!(report.orphans_deleted, vec![777]);
    assert!(!t.pool.thin_ids().contains(&ThinId::from(777)));

    // A pool someone else made: refuse to start, unless told to share it.
    t.pool.create_thin(ThinId::from(888)).expect("foreign");
    let T {
        _dir,
        path,
        pool,
        engine,
    } = t;
    drop(engine);
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.owns_pool = false;
    let err = recovery::start(pool.clone(), reopen(&path), settings.clone(), &no_format)
        .err()
        .expect("foreign ids refused");
    assert!(
        matches!(&err, EngineError::FailedPrecondition(m) if m.contains("888") && m.contains("allow_foreign_devices")),
        "{err}"
    );
    settings.allow_foreign_devices = true;
    recovery::start(pool.clone(), reopen(&path), settings, &no_format)
        .expect("shared pool accepted");
    assert!(
        pool.thin_ids().contains(&ThinId::from(888)),
        "a foreign device was deleted"
    );
}

#[tokio::test]
async fn the_pool_transaction_id_marks_every_change_the_store_has_seen() {
    let t = setup();
    let before = t.pool.status().expect("status").transaction_id;
    assert_eq!(before, 1, "the base device's create_thin is numbered");
    t.engine
        .create(Kind::Active, "a", "", BTreeMap::new())
        .await
        .expect("prepare");
    t.engine
        .commit("c", "a", BTreeMap::new())
        .await
        .expect("commit");
    t.engine
        .create(Kind::Active, "b", "c", BTreeMap::new())
        .await
        .expect("prepare");
    t.engine.remove("b").await.expect("remove");
    // create_snap a, create_snap b, delete b: each numbered, in the pool and in the store.
    assert_eq!(t.pool.status().expect("status").transaction_id, before + 3);
    // A clean stop flushes the last call's outcome (each call flushes only its intent).
    t.engine.shutdown().await.expect("shutdown");
    let (t, report) = t.restart();
    assert!(
        !report.thin_ids_listed,
        "store and pool agree: no thin_ls needed"
    );

    // A change the store never saw the outcome of: its intent is pending, the ids are read.
    t.pool.fail_nth("activate", 1);
    assert!(t
        .engine
        .create(Kind::Active, "x", "c", BTreeMap::new())
        .await
        .is_err());
    t.engine.shutdown().await.expect("shutdown");
    let (t, report) = t.restart();
    assert!(
        !report.thin_ids_listed,
        "the failed prepare was undone and recorded"
    );
    let T {
        _dir,
        path,
        pool,
        engine,
    } = t;
    // A crash between the kernel's change and the outcome: the store is behind the pool.
    let store_txid = engine.store.pool_transaction_id().expect("read");
    drop(engine);
    let txid = pool.status().expect("status").transaction_id;
    assert_eq!(store_txid, Some(txid));
    pool.create_thin(ThinId::from(4242))
        .expect("change the store never saw");
    pool.set_transaction_id(txid, txid + 1).expect("txid");
    let (_engine, report) = start_on(&path, pool.clone());
    assert!(report.thin_ids_listed);
    assert_eq!(report.orphans_deleted, vec![4242]);
}

#[tokio::test]
async fn recovery_never_deletes_an_interrupted_creates_thin_id_in_a_shared_pool() {
    let t = setup();
    // Killed right after create_snap answered EEXIST (another owner's volume holds the id)
    // and before the records were dropped: the intent is durable (never rolled forward, as the
    // engine writes it in a pool it does not own), the id is someone else's.
    let plan = intent_of(&t, "k", false);
    t.engine.store.flush_sync().expect("flush");
    let (_dir, path, pool) = t.into_parts();
    pool.create_thin(plan.thin_id)
        .expect("the other owner's volume");
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.owns_pool = false;
    settings.allow_foreign_devices = true;
    let (engine, report) =
        recovery::start(pool.clone(), reopen(&path), settings, &no_format).expect("start");
    assert!(
        pool.thin_ids().contains(&plan.thin_id),
        "the other owner's volume was deleted"
    );
    assert_eq!(report.left_alone, vec![plan.thin_id]);
    // The key is free again, and a new Prepare takes another id.
    assert!(engine.record("k").expect("read").is_none());
    let engine = Arc::new(engine);
    engine
        .create(Kind::Active, "k", "", BTreeMap::new())
        .await
        .expect("prepare again");
    assert_ne!(
        engine.record("k").expect("read").expect("k").thin_id,
        plan.thin_id
    );
}

#[tokio::test]
async fn a_shared_pools_foreign_ids_are_never_taken_nor_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    // Another owner's volumes, on the ids a fresh store would hand out first.
    pool.create_thin(ThinId::from(0)).expect("foreign 0");
    pool.create_thin(ThinId::from(5)).expect("foreign 5");
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.owns_pool = false;
    settings.allow_foreign_devices = true;
    let (engine, report) = recovery::start(pool.clone(), reopen(&path), settings, &no_format)
        .expect("start on a shared pool");
    assert!(report.base_created);
    assert!(
        engine.base.thin_id > ThinId::from(5),
        "the base took id {}, not past the pool's ids",
        engine.base.thin_id
    );
    let engine = Arc::new(engine);
    engine
        .create(Kind::Active, "a", "", BTreeMap::new())
        .await
        .expect("prepare");
    assert!(engine.record("a").expect("read").expect("a").thin_id > ThinId::from(5));
    let ids = pool.thin_ids();
    assert!(
        ids.contains(&ThinId::from(0)) && ids.contains(&ThinId::from(5)),
        "a foreign volume is gone: {ids:?}"
    );
    // No id was found taken by trying it: nothing was even attempted on theirs.
    let calls = pool.calls();
    let tried: Vec<&String> = calls[2..]
        .iter()
        .filter(|c| c.ends_with(" 0") || c.ends_with(" 5") || c.contains(" 5 "))
        .collect();
    assert!(tried.is_empty(), "{tried:?}");
}

#[tokio::test]
async fn a_start_that_must_list_thin_ids_without_thin_ls_fails_saying_so() {
    let t = setup();
    prep(&t, "a", "").await.expect("prepare");
    let (_dir, path, pool) = t.into_parts();
    // A change the store never saw: this start must read the pool's thin ids.
    let txid = pool.status().expect("status").transaction_id;
    pool.create_thin(ThinId::from(4242))
        .expect("change the store never saw");
    pool.set_transaction_id(txid, txid + 1).expect("txid");
    pool.fail_nth_with("list_thin_ids", 1, PoolError::ThinLsMissing("pool".into()));
    let err = recovery::start(
        pool.clone(),
        reopen(&path),
        Settings::with_fs(FsConfig::default()),
        &no_format,
    )
    .err()
    .expect("a start without thin_ls guessed");
    assert!(
        err.to_string().contains("install thin-provisioning-tools"),
        "{err}"
    );
    // Nothing was deleted on a guess, and the next start (thin_ls back) deletes the orphan.
    assert!(pool.thin_ids().contains(&ThinId::from(4242)));
    let (engine, report) = start_on(&path, pool.clone());
    assert_eq!(report.orphans_deleted, vec![4242]);
    assert!(engine.record("a").expect("read").is_some());
}
