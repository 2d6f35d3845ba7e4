//! A call whose kernel step fails is undone (by failing the N-th pool call): nothing half made
//! is left, nothing that is not ours is touched.

use super::*;

#[tokio::test]
async fn failed_kernel_steps_of_prepare_are_undone() {
    for op in ["create_snap", "activate"] {
        let t = setup();
        t.pool.fail_nth(op, 1);
        let err = prep(&t, "a", "").await.expect_err("injected failure");
        assert!(matches!(err, EngineError::Pool { .. }), "{op}: {err}");
        assert_eq!(
            t.pool.thin_ids(),
            [t.base_id()].into(),
            "{op}: thin id leaked"
        );
        assert!(t.pool.active().is_empty(), "{op}: device left active");
        assert!(t.engine.record("a").expect("rec").is_none());
        assert_eq!(t.engine.store.devices().expect("devices").len(), 1);
        prep(&t, "a", "").await.expect("retry works");
    }
}

#[tokio::test]
async fn failed_delete_fails_remove_and_keeps_the_snapshot() {
    let t = setup();
    prep(&t, "c0", "").await.expect("c0");
    t.engine
        .commit("p", "c0", no_labels())
        .await
        .expect("commit");
    prep(&t, "a", "p").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.fail_nth("delete_thin", 1);
    assert!(
        t.engine.remove("a").await.is_err(),
        "Remove said OK while the kernel kept the device"
    );
    // Nothing changed: the snapshot, its active device, its parent's child count.
    t.engine.stat("a").await.expect("still there");
    assert!(t.pool.active().contains(&id), "device left inactive");
    assert_err!(t.engine.remove("p").await, FailedPrecondition);
    let dev: Vec<DeviceRecord> = t.engine.store.devices().expect("devices");
    assert!(dev
        .iter()
        .any(|d| d.thin_id == id && d.state == State::Ready));
    // A retry finishes it.
    t.engine.remove("a").await.expect("retry");
    assert!(!t.pool.thin_ids().contains(&id));
    t.engine.remove("p").await.expect("then the parent");
}

#[tokio::test]
async fn cleanup_reaps_devices_left_deleting() {
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.remove_async = true;
    // No reaper running: the device stays Deleting until Cleanup.
    let t = setup_with(settings);
    prep(&t, "a", "").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.engine.remove("a").await.expect("remove");
    assert!(t.pool.thin_ids().contains(&id));
    let dev: Vec<DeviceRecord> = t.engine.store.devices().expect("devices");
    assert!(dev
        .iter()
        .any(|d| d.thin_id == id && d.state == State::Deleting));
    assert_eq!(t.engine.cleanup().await.expect("cleanup"), 1);
    assert!(!t.pool.thin_ids().contains(&id));
    assert_eq!(t.engine.store.devices().expect("devices").len(), 1);
}

#[tokio::test]
async fn a_half_made_snapshot_is_rolled_back_without_a_restart() {
    let t = setup();
    // A Prepare whose undo could not finish (its store write failed): the record stays
    // Creating. Made here by hand, as the crash-free path cannot leave it.
    let plan = intent_of(&t, "k", true);
    assert_err!(t.engine.stat("k").await, NotFound);
    // A retry of the Prepare heals it and succeeds.
    prep(&t, "k", "").await.expect("retry is not AlreadyExists");
    assert!(
        !t.pool.thin_ids().contains(&plan.thin_id),
        "half-made device kept"
    );
    // Cleanup heals one whose key nobody retries.
    let plan = intent_of(&t, "j", true);
    t.engine.cleanup().await.expect("cleanup");
    assert!(t.engine.record("j").expect("rec").is_none());
    assert!(!t.pool.thin_ids().contains(&plan.thin_id));
    prep(&t, "j", "").await.expect("key free");
}

#[tokio::test]
async fn a_thin_id_held_by_a_foreign_device_is_skipped_never_deleted() {
    let t = setup();
    // The next ids the store will hand out are held by someone else's volumes.
    let next = ThinId::from(t.base_id().get() + 1);
    t.pool.create_thin(next).expect("foreign");
    let after = ThinId::from(next.get() + 1);
    t.pool.create_thin(after).expect("foreign");
    t.pool.write(next, 4096);
    prep(&t, "a", "")
        .await
        .expect("prepare skips the taken ids");
    let a = t.engine.record("a").expect("rec").expect("a").thin_id;
    assert!(a > after, "took a foreign id: {a}");
    assert!(t.pool.thin_ids().contains(&next) && t.pool.thin_ids().contains(&after));
    assert!(
        !t.pool.calls().iter().any(|c| c == &format!("delete {next}")
            || c == &format!("delete {after}")
            || c == &format!("discard {next}")),
        "touched a foreign device: {:?}",
        t.pool.calls()
    );
}

#[tokio::test]
async fn busy_devices_refuse_remove_and_commit_defers() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.set_busy(id, true);
    assert!(matches!(
        t.engine.remove("a").await,
        Err(EngineError::FailedPrecondition(m)) if m.contains("busy")
    ));
    assert_eq!(t.engine.stat("a").await.expect("a").kind, Kind::Active);
    assert!(t.pool.active().contains(&id));
    // containerd's suite commits mounted snapshots: flushed, removal deferred.
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit while mounted");
    assert!(t
        .pool
        .calls()
        .contains(&format!("deactivate_deferred {id}")));
    assert_eq!(t.engine.stat("c").await.expect("c").kind, Kind::Committed);
}
