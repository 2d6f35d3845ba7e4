//! Faults around the kernel work against the fake pool: a caller cancelled in the middle of an
//! activation (its locks stay with the ioctl, its outcome is recorded), a failed re-activation
//! (remembered), and a roll-forward whose activation fails at start (the start goes on).

use super::*;

/// "a" (active, thin id returned), with its device gone as after a reboot.
async fn rebooted_a() -> (Arc<T>, ThinId) {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let a = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.reboot();
    let (t, report) = t.restart();
    assert_eq!(report.awaiting_activation, vec![a]);
    (Arc::new(t), a)
}

fn activations_of(t: &T, id: ThinId) -> usize {
    let call = format!("activate {id}");
    t.pool.calls().iter().filter(|c| **c == call).count()
}

/// A Mounts whose caller gives up while its first-use activation runs: the thin id's lock stays
/// with the ioctl (a Remove of the key waits for it), and the activation's outcome is recorded
/// although nobody awaits it, so the next Mounts neither activates again nor finds it missing.
#[tokio::test]
async fn a_cancelled_mounts_keeps_the_device_lock_until_its_activation_ends() {
    let (t, a) = rebooted_a().await;
    let mut held = t.pool.pause_nth("activate", 1);
    let mounts = {
        let t = t.clone();
        tokio::spawn(async move { t.engine.mounts("a").await })
    };
    held.reached().await;
    // The client gives up: the call's future is dropped while the ioctl runs.
    mounts.abort();
    assert!(mounts.await.expect_err("cancelled").is_cancelled());
    assert!(
        t.engine.thin_locks.try_lock(&a).is_none(),
        "the thin id's lock was released while its activation still runs"
    );
    // A Remove of the key now waits for the activation, then takes the device down.
    let remove = {
        let t = t.clone();
        tokio::spawn(async move { t.engine.remove("a").await })
    };
    held.release();
    remove.await.expect("join").expect("remove");
    let calls = t.pool.calls();
    let activated = calls.iter().position(|c| *c == format!("activate {a}"));
    let deactivated = calls.iter().rposition(|c| *c == format!("deactivate {a}"));
    assert!(activated < deactivated, "{calls:?}");
    assert!(!t.pool.active().contains(&a), "{calls:?}");
    assert!(!t.pool.thin_ids().contains(&a), "{calls:?}");
    assert!(!t.engine.lazy.is_pending(a));
    assert_err_not_found(t.engine.mounts("a").await);
}

fn assert_err_not_found<T: std::fmt::Debug>(got: Result<T, EngineError>) {
    assert!(matches!(got, Err(EngineError::NotFound(_))), "{got:?}");
}

#[tokio::test]
async fn a_cancelled_activation_records_its_outcome() {
    // Succeeded: the device is live and known to be; the next Mounts does not activate again.
    let (t, a) = rebooted_a().await;
    let mut held = t.pool.pause_nth("activate", 1);
    let mounts = {
        let t = t.clone();
        tokio::spawn(async move { t.engine.mounts("a").await })
    };
    held.reached().await;
    mounts.abort();
    assert!(mounts.await.expect_err("cancelled").is_cancelled());
    held.release();
    // The lock is free once the activation (and its bookkeeping) has ended.
    drop(t.engine.thin_locks.lock(&[&a]).await);
    assert!(t.pool.active().contains(&a));
    assert!(!t.engine.lazy.is_pending(a), "a live device still pending");
    assert_eq!(t.engine.lazy_activations(), 1);
    let before = activations_of(&t, a);
    t.engine.mounts("a").await.expect("mounts");
    assert_eq!(activations_of(&t, a), before, "activated twice");

    // Failed: still pending; the next Mounts makes the device.
    let (t, a) = rebooted_a().await;
    t.pool.fail_next("activate");
    let mut held = t.pool.pause_nth("activate", 1);
    let mounts = {
        let t = t.clone();
        tokio::spawn(async move { t.engine.mounts("a").await })
    };
    held.reached().await;
    mounts.abort();
    assert!(mounts.await.expect_err("cancelled").is_cancelled());
    held.release();
    drop(t.engine.thin_locks.lock(&[&a]).await);
    assert!(
        t.engine.lazy.is_pending(a),
        "a failed activation marked done"
    );
    t.engine.mounts("a").await.expect("mounts");
    assert!(t.pool.active().contains(&a));
}

/// A Remove whose delete fails gives the snapshot back; if its device cannot be activated again
/// either, the snapshot awaits activation: Mounts makes the device instead of handing out a
/// path to nothing.
#[tokio::test]
async fn a_failed_reactivation_after_a_failed_remove_is_remembered() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let a = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.fail_next("delete_thin");
    t.pool.fail_next("activate");
    assert!(t.engine.remove("a").await.is_err());
    assert!(
        !t.pool.active().contains(&a),
        "the reactivation did not fail"
    );
    assert!(t.engine.stat("a").await.is_ok(), "the snapshot stays");
    assert_eq!(t.engine.status().await.expect("status").inactive, 1);
    let m = t.engine.mounts("a").await.expect("mounts");
    assert_eq!(m[0].source, format!("/dev/mapper/fake-snap-{a}"));
    assert!(
        t.pool.active().contains(&a),
        "Mounts handed out a missing device"
    );
    assert_eq!(t.engine.status().await.expect("status").inactive, 0);
}

/// The same for a Commit that fails and cannot give its device back: the snapshot awaits
/// activation, and the next call that needs the device activates it (or says why not).
#[tokio::test]
async fn a_failed_reactivation_after_a_failed_commit_is_remembered() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let a = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.fail_next("deactivate");
    // The Commit's own activate (to read the usage) is the first; the reactivation the second.
    t.pool.fail_nth("activate", 2);
    assert!(t.engine.commit("c", "a", no_labels()).await.is_err());
    assert_eq!(t.engine.stat("a").await.expect("a").kind, Kind::Active);
    assert_eq!(t.engine.status().await.expect("status").inactive, 1);
    let before = activations_of(&t, a);
    t.engine.mounts("a").await.expect("mounts");
    assert_eq!(
        activations_of(&t, a),
        before + 1,
        "Mounts did not make the device"
    );
    assert_eq!(t.engine.status().await.expect("status").inactive, 0);
    // When it cannot, Mounts says why instead of answering a path.
    t.pool.fail_next("deactivate");
    t.pool.fail_nth("activate", 2);
    assert!(t.engine.commit("c", "a", no_labels()).await.is_err());
    t.pool.fail_next("activate");
    assert!(matches!(
        t.engine.mounts("a").await,
        Err(EngineError::Pool { .. })
    ));
    t.engine.usage("a").await.expect("the next call makes it");
    assert_eq!(t.engine.status().await.expect("status").inactive, 0);
}

/// The intent of a Prepare that answered with only its intent durable (`roll_forward`), and,
/// with `made`, its thin device made in the pool.
fn rolling_intent(t: &T, key: &str, made: bool) -> ThinId {
    let plan = intent_with(t, key, made, true);
    t.engine.store.flush_sync().expect("flush");
    plan.thin_id
}

/// Finishing a create at start, an activation error other than "thin id gone" does not stop
/// the start: the snapshot awaits activation (the pool has its thin id), or is undone (the
/// thin_ls pass of the same start finds the pool without it).
#[tokio::test]
async fn a_roll_forward_whose_activation_fails_does_not_stop_the_start() {
    // The pool has the thin id; its activation is refused (an ioctl error).
    let t = setup();
    let made = rolling_intent(&t, "made", true);
    t.pool.fail_next("activate");
    let (t, report) = t.restart();
    assert!(report.thin_ids_listed, "{report:?}");
    assert_eq!(report.unverified_creates, vec![made], "{report:?}");
    assert_eq!(report.awaiting_activation, vec![made], "{report:?}");
    assert!(report.undone_creates.is_empty(), "{report:?}");
    prep(&t, "other", "").await.expect("the daemon serves");
    // Complete: the first call that needs its device makes it.
    assert!(!t.pool.active().contains(&made));
    let m = t.engine.mounts("made").await.expect("mounts");
    assert_eq!(m[0].source, format!("/dev/mapper/fake-snap-{made}"));
    assert!(t.pool.active().contains(&made));

    // The pool has no such thin id (the create_snap never ran), and the activation fails with
    // another error than saying so (a busy pool): thin_ls tells, and the create is undone.
    let t = setup();
    let lost = rolling_intent(&t, "lost", false);
    t.pool
        .fail_nth_with("activate", 1, crate::pool::PoolError::Busy("fake".into()));
    let (t, report) = t.restart();
    assert!(report.unverified_creates.is_empty(), "{report:?}");
    assert!(report.awaiting_activation.is_empty(), "{report:?}");
    assert_eq!(report.undone_creates, vec![lost], "{report:?}");
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_err_not_found(t.engine.stat("lost").await);
    prep(&t, "lost", "").await.expect("the key is free");
    // Nothing leaked: every thin id of the pool is a record's.
    let known = t.engine.thin_ids().expect("ids");
    assert_eq!(t.pool.thin_ids().into_iter().collect::<Vec<_>>(), known);
}
