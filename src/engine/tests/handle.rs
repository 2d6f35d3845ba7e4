//! The engine handle while the daemon starts (`handle`): which stores are settled, the early
//! reads, calls waiting for the engine, and a failed start.

use std::time::Duration;

use super::recovery::Records;
use super::tests::{intent_of, no_labels, prep, setup};
use super::*;
use crate::store::CommitIntent;

/// Whether recovery could change anything a client reads in `store` (see `Records::settled`).
fn settled(store: &Store) -> Result<bool, StoreError> {
    Ok(Records::read(store)?.settled())
}

/// Whether `f` is still waiting after a moment (it must be: the engine is not there yet).
async fn still_waiting<F: std::future::Future>(f: F) -> bool {
    tokio::time::timeout(Duration::from_millis(100), f)
        .await
        .is_err()
}

/// An engine with "c" committed (from "a") and "b" active on it, every call whole.
async fn committed_c_with_child_b() -> super::tests::T {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    prep(&t, "b", "c").await.expect("b");
    t
}

#[tokio::test]
async fn a_store_is_settled_unless_a_call_was_cut_short() {
    let t = committed_c_with_child_b().await;
    assert!(settled(&t.engine.store).expect("read"), "after whole calls");

    // A Prepare cut short after its intent.
    let plan = intent_of(&t, "lost", false);
    assert!(!settled(&t.engine.store).expect("read"), "Creating record");
    t.engine.store.flush_sync().expect("flush");
    let (t, report) = t.restart();
    assert_eq!(report.undone_creates, vec![plan.thin_id]);
    assert!(settled(&t.engine.store).expect("read"), "recovery undid it");

    // A Commit cut short after its intent: recovery renames the key.
    let intent = CommitIntent {
        name: "c2".into(),
        labels: no_labels(),
        mapped: 0,
        now: 1,
    };
    t.engine.store.begin_commit("b", &intent).expect("intent");
    assert!(!settled(&t.engine.store).expect("read"), "Commit intent");
    t.engine.store.flush_sync().expect("flush");
    let (t, _) = t.restart();
    assert!(settled(&t.engine.store).expect("read"));
    assert!(t.engine.stat("c2").await.is_ok(), "the Commit was finished");

    // A snapshot whose device record is gone: recovery drops it.
    let id = t.engine.record("c2").expect("rec").expect("c2").thin_id;
    t.engine.store.forget_device(id).expect("forget");
    assert!(
        !settled(&t.engine.store).expect("read"),
        "dangling snapshot"
    );
}

#[tokio::test]
async fn a_settled_store_answers_stat_and_list_while_other_calls_wait_for_the_engine() {
    let t = committed_c_with_child_b().await;

    let (h, publisher) = EngineHandle::starting(Some(t.engine.store.clone()));
    let b = h.stat("b").await.expect("stat while starting");
    assert_eq!((b.kind, b.parent.as_str()), (Kind::Active, "c"));
    assert!(matches!(
        h.stat("nope").await,
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        h.stat("").await,
        Err(EngineError::InvalidArgument(_))
    ));
    let mut keys: Vec<String> = h
        .list(&[])
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key)
        .collect();
    keys.sort();
    assert_eq!(keys, ["b", "c"]);
    let committed = h.list(&["kind==committed".into()]).await.expect("filtered");
    assert_eq!(committed.len(), 1);
    assert!(h.now().is_none());
    assert!(
        still_waiting(h.engine()).await,
        "the engine is not there yet"
    );

    // A call waiting meanwhile gets the engine once it is published.
    let waiting = tokio::spawn({
        let h = h.clone();
        async move { h.engine().await.map(|e| e.base.thin_id) }
    });
    publisher.ready(t.engine.clone());
    assert_eq!(waiting.await.expect("join").expect("engine"), t.base_id());
    assert!(h.now().is_some());
    assert_eq!(h.stat("b").await.expect("stat").key, "b");
}

#[tokio::test]
async fn without_a_settled_store_reads_wait_for_the_engine_too() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let (h, publisher) = EngineHandle::starting(None);
    assert!(still_waiting(h.stat("a")).await);
    assert!(still_waiting(h.list(&[])).await);
    let stat = tokio::spawn({
        let h = h.clone();
        async move { h.stat("a").await }
    });
    publisher.ready(t.engine.clone());
    assert_eq!(stat.await.expect("join").expect("stat").key, "a");
}

#[tokio::test]
async fn a_failed_start_answers_unavailable_with_the_reason() {
    let t = setup();
    let (h, publisher) = EngineHandle::starting(Some(t.engine.store.clone()));
    let waiting = tokio::spawn({
        let h = h.clone();
        async move { h.engine().await.map(|_| ()) }
    });
    publisher.failed("thin pool x needs a check".into());
    match waiting.await.expect("join") {
        Err(EngineError::Unavailable(m)) => assert!(m.contains("needs a check"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Reads of a settled store are still the store's.
    assert!(h.list(&[]).await.is_ok());
    let (h, publisher) = EngineHandle::starting(None);
    drop(publisher);
    assert!(matches!(
        h.stat("a").await,
        Err(EngineError::Unavailable(_))
    ));
}
