//! Lazy activation and quarantine (`super::super::activate`) against the fake pool: a start after
//! a reboot makes no device, the first call that needs one makes it once, Remove never does, and
//! a snapshot whose device cannot be used is quarantined instead of blocking the start.

use super::*;

/// "a" and the view "v" (of committed "c"), with their devices gone as after a reboot; returns
/// the restarted engine, the report and the thin ids of a and v.
async fn rebooted() -> (T, Report, ThinId, ThinId) {
    let t = setup();
    prep(&t, "base-child", "").await.expect("prepare");
    t.engine
        .commit("c", "base-child", no_labels())
        .await
        .expect("commit");
    prep(&t, "a", "c").await.expect("a");
    t.engine
        .create(Kind::View, "v", "c", no_labels())
        .await
        .expect("v");
    let id = |t: &T, k: &str| t.engine.record(k).expect("rec").expect("k").thin_id;
    let (a, v) = (id(&t, "a"), id(&t, "v"));
    t.pool.reboot();
    let (t, report) = t.restart();
    (t, report, a, v)
}

fn activations_of(t: &T, id: ThinId) -> usize {
    let call = format!("activate {id}");
    t.pool.calls().iter().filter(|c| **c == call).count()
}

#[tokio::test]
async fn a_start_after_a_reboot_makes_no_device_and_first_use_activates() {
    let (t, report, a, v) = rebooted().await;
    assert_eq!(
        activations_of(&t, a),
        1,
        "a: only its Prepare before the reboot"
    );
    assert!(!t.pool.active().contains(&a), "start activated a");
    assert!(!t.pool.active().contains(&v), "start activated v");
    assert_eq!(report.awaiting_activation.len(), 2);
    let st = t.engine.status().await.expect("status");
    assert_eq!((st.active, st.views, st.inactive), (1, 1, 2));

    let m = t.engine.mounts("a").await.expect("mounts");
    assert_eq!(m[0].source, format!("/dev/mapper/fake-snap-{a}"));
    assert!(t.pool.active().contains(&a));
    assert_eq!(t.engine.status().await.expect("status").inactive, 1);
    // A second Mounts finds it live: no second activation.
    t.engine.mounts("a").await.expect("mounts again");
    assert_eq!(activations_of(&t, a), 2);
    // Usage needs the device too.
    t.engine.usage("v").await.expect("usage");
    assert!(t.pool.active().contains(&v));
    assert_eq!(t.engine.status().await.expect("status").inactive, 0);
    assert_eq!(t.engine.lazy_activations(), 2);
}

#[tokio::test]
async fn concurrent_mounts_of_an_inactive_snapshot_activate_it_once() {
    let (t, _, a, _) = rebooted().await;
    let before = activations_of(&t, a);
    let t = Arc::new(t);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { t.engine.mounts("a").await })
        })
        .collect();
    for c in calls {
        c.await.expect("task").expect("mounts");
    }
    assert_eq!(activations_of(&t, a) - before, 1, "{:?}", t.pool.calls());
    assert_eq!(t.engine.lazy_activations(), 1);
}

#[tokio::test]
async fn remove_and_commit_of_never_activated_snapshots() {
    let (t, _, a, v) = rebooted().await;
    t.engine.remove("v").await.expect("remove v");
    assert_eq!(
        activations_of(&t, v),
        1,
        "Remove activated v: {:?}",
        t.pool.calls()
    );
    assert!(!t.pool.thin_ids().contains(&v), "v's thin id not deleted");
    assert_eq!(t.engine.status().await.expect("status").inactive, 1);
    // Commit activates it (to read its usage), then lets it go.
    t.engine
        .commit("a-committed", "a", no_labels())
        .await
        .expect("commit");
    assert!(!t.pool.active().contains(&a));
    assert_eq!(t.engine.status().await.expect("status").inactive, 0);
    prep(&t, "child", "a-committed").await.expect("child");
}

#[tokio::test]
async fn a_failed_activation_is_the_calls_error_and_the_next_call_retries() {
    let (t, _, a, _) = rebooted().await;
    t.pool.fail_next("activate");
    let got = t.engine.mounts("a").await;
    assert!(matches!(got, Err(EngineError::Pool { .. })), "{got:?}");
    let st = t.engine.status().await.expect("status");
    assert!(
        st.quarantined.is_empty(),
        "a transient failure quarantined: {st:?}"
    );
    assert_eq!(st.inactive, 2);
    t.engine.mounts("a").await.expect("retry");
    assert!(t.pool.active().contains(&a));
}

#[tokio::test]
async fn a_snapshot_whose_thin_id_is_gone_is_quarantined_and_others_serve() {
    let (t, _, a, v) = rebooted().await;
    // Deleted behind thinsnap's back (no transaction id change: thin_ls is not run).
    t.pool.delete_thin(a).expect("delete behind our back");
    let deletes = t.pool.count("delete_thin");
    let got = t.engine.mounts("a").await;
    let msg = precondition_message(&got);
    assert!(
        msg.contains("\"a\"") && msg.contains(&format!("thin id {a}")),
        "{msg}"
    );
    assert!(msg.contains("quarantined"), "{msg}");
    assert_err!(t.engine.usage("a").await, FailedPrecondition);
    assert_err!(
        t.engine.commit("x", "a", no_labels()).await,
        FailedPrecondition
    );
    // Others serve.
    t.engine.mounts("v").await.expect("v");
    prep(&t, "new", "c").await.expect("new");
    // Kept, reported, and still so after a restart.
    assert!(t.engine.stat("a").await.is_ok());
    let (t, _) = t.restart();
    let st = t.engine.status().await.expect("status");
    assert_eq!(st.quarantined.len(), 1, "{st:?}");
    assert_eq!(
        (st.quarantined[0].key.as_str(), st.quarantined[0].thin_id),
        ("a", a)
    );
    assert!(st.quarantined[0].reason.contains("gone"), "{st:?}");
    assert_err!(t.engine.mounts("a").await, FailedPrecondition);
    let _ = v;
    // Remove clears it without sending the pool a delete for an id that is not ours any more.
    t.engine.remove("a").await.expect("remove");
    assert_eq!(t.pool.count("delete_thin"), deletes, "{:?}", t.pool.calls());
    assert_err!(t.engine.stat("a").await, NotFound);
    assert!(t
        .engine
        .status()
        .await
        .expect("status")
        .quarantined
        .is_empty());
    assert!(!t.engine.thin_ids().expect("ids").contains(&a));
}

#[tokio::test]
async fn the_thin_ls_pass_quarantines_a_committed_parent_that_is_gone() {
    let (t, _, _, _) = rebooted().await;
    let c = t.engine.record("c").expect("rec").expect("c");
    t.engine.remove("a").await.expect("remove a");
    t.engine.remove("v").await.expect("remove v");
    t.pool
        .delete_thin(c.thin_id)
        .expect("delete behind our back");
    // Someone changed the pool: its transaction id is not the one recorded, so thin_ls runs.
    let txid = t.pool.status().expect("status").transaction_id;
    t.pool.set_transaction_id(txid, txid + 7).expect("txid");
    let (t, report) = t.restart();
    assert!(report.thin_ids_listed);
    assert_eq!(report.quarantined, vec![c.thin_id]);
    let got = prep(&t, "child", "c").await;
    let msg = precondition_message(&got);
    assert!(
        msg.contains("\"c\"") && msg.contains("quarantined"),
        "{msg}"
    );
    prep(&t, "fresh", "").await.expect("others serve");
    t.engine
        .remove("c")
        .await
        .expect("remove the quarantined parent");
    assert_err!(t.engine.stat("c").await, NotFound);
}

#[tokio::test]
async fn an_undo_the_pool_refuses_at_start_does_not_block_the_start() {
    let t = setup();
    // An intent recovery undoes (with roll_forward it would complete it instead).
    let plan = intent_of(&t, "k", true);
    // A read-only pool refuses the delete that undoes the interrupted create.
    t.pool.fail_next("delete_thin");
    let (t, report) = t.restart();
    assert_eq!(report.left_for_later, vec![plan.thin_id]);
    prep(&t, "other", "").await.expect("the daemon serves");
    // The next Prepare of the key rolls it back and makes it.
    prep(&t, "k", "").await.expect("k");
    assert!(!t.pool.thin_ids().contains(&plan.thin_id));
}

/// The message of `got`, which must be FailedPrecondition (a quarantined snapshot's answer).
fn precondition_message<T: std::fmt::Debug>(got: &Result<T, EngineError>) -> String {
    match got {
        Err(e @ EngineError::FailedPrecondition(_)) => e.to_string(),
        other => panic!("not FailedPrecondition: {other:?}"),
    }
}
