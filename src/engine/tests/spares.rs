//! Warm spares on the fake pool: a Prepare or View on a spare makes no device on its path and
//! gets its parent's lineage; `count = 0` never makes one; concurrent Prepares never share one;
//! Remove of the parent deletes its spares; a kill at each step of making or taking one
//! converges with nothing leaked; the free-space floor stops refills; eviction bounds the count.
//! The refiller is driven round by round (`refill_until_idle`), not by its background task.

use std::collections::BTreeSet;

use super::tests::{no_labels, prep, restart_with_settings, setup_with, T};
use super::*;
use crate::config::FsConfig;
use crate::engine::spares::{
    client_key, is_docker_init_layer, is_unpack_key, BUSY_GRACE, DEMAND_WINDOW, UNPACK_QUIET,
};
use crate::store::SPARE_OWNER;

fn settings(count: u32) -> Settings {
    let mut s = Settings::with_fs(FsConfig::default());
    s.spares = count;
    s
}

fn spares_on(count: u32) -> T {
    setup_with(settings(count))
}

/// Starts a new engine with `count` spares on the same store and pool (a restart).
fn restart_with(t: T, count: u32) -> (T, recovery::Report) {
    restart_with_settings(t, settings(count))
}

/// A committed snapshot `name` (made from an active one whose device maps `bytes`).
async fn committed(t: &T, name: &str, bytes: u64) -> ThinId {
    let key = format!("{name}-active");
    prep(t, &key, "").await.expect("prepare");
    let id = t.engine.record(&key).expect("rec").expect("rec").thin_id;
    t.pool.write(id, bytes);
    t.engine
        .commit(name, &key, no_labels())
        .await
        .expect("commit");
    id
}

/// Moves tokio's (paused) clock past [`DEMAND_WINDOW`]: the uses so far are no demand any more.
async fn past_the_demand_window() {
    tokio::time::advance(DEMAND_WINDOW + std::time::Duration::from_secs(1)).await;
}

/// The spares' device records in the store.
fn spare_records(t: &T) -> Vec<crate::store::DeviceRecord> {
    t.engine
        .store
        .devices()
        .expect("devices")
        .into_iter()
        .filter(|d| d.owner == SPARE_OWNER)
        .collect()
}

/// Nothing leaked: the pool's thin ids are exactly the store's device records.
fn assert_no_leak(t: &T, what: &str) {
    let store: BTreeSet<ThinId> = t.engine.thin_ids().expect("ids").into_iter().collect();
    assert_eq!(t.pool.thin_ids(), store, "{what}: pool and store disagree");
}

#[tokio::test]
async fn prepare_and_view_on_a_warm_spare_make_no_device_and_keep_the_lineage() {
    let t = spares_on(2);
    let c1 = committed(&t, "c1", 12345).await;
    t.engine.refill_until_idle().await;
    let spare = t.engine.spare_of("c1").expect("a spare of c1");
    assert!(t.engine.spare_of("").is_some(), "no spare of the base");
    assert!(
        t.pool.active().contains(&spare),
        "the spare's device is not active"
    );
    let (snaps, acts, flushes) = (
        t.pool.count("create_snap"),
        t.pool.count("activate"),
        t.engine.store_flushes(),
    );
    let m = prep(&t, "x", "c1").await.expect("prepare on the spare");
    assert_eq!(
        t.pool.count("create_snap"),
        snaps,
        "create_snap on the path"
    );
    assert_eq!(t.pool.count("activate"), acts, "activate on the path");
    assert_eq!(t.engine.store_flushes() - flushes, 1, "one flush");
    let x = t.engine.record("x").expect("rec").expect("x");
    assert_eq!((x.thin_id, x.state), (spare, crate::store::State::Ready));
    assert_eq!(x.parent.as_deref(), Some("c1"));
    assert_eq!(m[0].source, format!("/dev/mapper/fake-snap-{spare}"));
    // The lineage: the spare is a snapshot of c1's thin id and maps what c1 mapped.
    assert!(
        t.pool
            .calls()
            .contains(&format!("create_snap {spare} {c1}")),
        "{:?}",
        t.pool.calls()
    );
    assert_eq!(t.pool.mapped_bytes(spare).expect("mapped"), 12345);
    assert_eq!(x.origin_mapped, 12345);
    assert_eq!(t.engine.usage("x").await.expect("usage").size, 0);
    let c = t.engine.record("c1").expect("rec").expect("c1");
    assert_eq!((c.children, c.spares.clone()), (1, vec![]));
    // A View on the base's spare, likewise.
    t.engine.refill_until_idle().await;
    let base_spare = t.engine.spare_of("").expect("base spare");
    let snaps = t.pool.count("create_snap");
    let m = t
        .engine
        .create(Kind::View, "v", "", no_labels())
        .await
        .expect("view on the base's spare");
    assert_eq!(t.pool.count("create_snap"), snaps);
    assert!(m[0].options.contains(&"ro".to_string()), "{:?}", m[0]);
    assert_eq!(
        t.engine.record("v").expect("r").expect("v").thin_id,
        base_spare
    );
    let counts = t.engine.spare_counts();
    assert_eq!((counts.taken, counts.target), (2, 2));
    // Taken spares are ordinary snapshots: Remove works, nothing leaks.
    t.engine.remove("x").await.expect("remove x");
    t.engine.remove("v").await.expect("remove v");
    t.engine.refill_until_idle().await;
    assert_no_leak(&t, "after taking and removing");
}

#[tokio::test]
async fn count_zero_never_makes_a_spare() {
    let t = spares_on(0);
    committed(&t, "c1", 10).await;
    assert_eq!(t.engine.refill_until_idle().await, 0);
    let snaps = t.pool.count("create_snap");
    prep(&t, "x", "c1").await.expect("prepare");
    assert_eq!(t.pool.count("create_snap"), snaps + 1, "the usual path");
    assert!(spare_records(&t).is_empty());
    let c = t.engine.spare_counts();
    assert_eq!((c.ready, c.target, c.taken, c.missed), (0, 0, 0, 0));
}

#[tokio::test]
async fn a_prepare_without_a_spare_is_counted_missed_and_takes_the_usual_path() {
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    let (snaps, missed) = (t.pool.count("create_snap"), t.engine.spare_counts().missed);
    prep(&t, "x", "c1").await.expect("prepare");
    assert_eq!(t.pool.count("create_snap"), snaps + 1);
    assert_eq!(t.engine.spare_counts().missed, missed + 1);
    // A size label never takes one.
    t.engine.refill_until_idle().await;
    let spare = t.engine.spare_of("c1").expect("spare");
    let mut labels = no_labels();
    labels.insert(SIZE_LABEL.to_string(), "1GiB".to_string());
    let _ = t.engine.create(Kind::Active, "big", "c1", labels).await;
    assert_eq!(
        t.engine.spare_of("c1"),
        Some(spare),
        "a sized Prepare took it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_prepares_on_one_parent_never_share_a_spare() {
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    t.engine.refill_until_idle().await;
    let spare = t.engine.spare_of("c1").expect("spare");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let e = t.engine.clone();
            tokio::spawn(async move {
                e.create(Kind::Active, &format!("k{i}"), "c1", no_labels())
                    .await
                    .expect("prepare")
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let ids: Vec<ThinId> = (0..8)
        .map(|i| {
            t.engine
                .record(&format!("k{i}"))
                .expect("r")
                .expect("k")
                .thin_id
        })
        .collect();
    let distinct: BTreeSet<ThinId> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 8, "two Prepares got one thin id: {ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == spare).count(), 1);
    assert_eq!(t.engine.spare_counts().taken, 1);
    assert_eq!(t.engine.record("c1").expect("r").expect("c1").children, 8);
    assert_no_leak(&t, "after concurrent prepares");
}

#[tokio::test]
async fn remove_of_the_parent_deletes_its_spares_first() {
    for remove_async in [false, true] {
        let mut s = settings(2);
        s.remove_async = remove_async;
        let t = setup_with(s);
        let c1 = committed(&t, "c1", 10).await;
        t.engine.refill_until_idle().await;
        let spare = t.engine.spare_of("c1").expect("spare");
        // A second spare still being made (intent only) is doomed too.
        let making = t
            .engine
            .store
            .begin_spare(Some("c1"), c1, 1 << 30)
            .expect("intent");
        t.engine.remove("c1").await.expect("remove c1");
        if remove_async {
            // The reaper deletes in the order of its queue: the spares, then the parent.
            let mut queue = t
                .engine
                .reaper_queue
                .lock()
                .expect("queue")
                .take()
                .expect("the reaper's queue");
            let mut queued = Vec::new();
            while let Ok(id) = queue.try_recv() {
                queued.push(id);
            }
            assert_eq!(queued, vec![spare, making, c1]);
            for id in queued {
                assert!(t.engine.reap(id).await, "reap {id}");
            }
        }
        let calls = t.pool.calls();
        let pos = |s: String| calls.iter().position(|c| *c == s);
        assert!(
            pos(format!("delete {spare}")) < pos(format!("delete {c1}"))
                && pos(format!("delete {spare}")).is_some(),
            "async={remove_async}: the spare is not deleted before its parent: {calls:?}"
        );
        assert!(!t.pool.thin_ids().contains(&spare));
        assert!(!t.pool.thin_ids().contains(&making));
        assert_eq!(t.engine.spare_of("c1"), None);
        assert!(
            spare_records(&t).iter().all(|d| d.origin != Some(c1)),
            "async={remove_async}: {:?}",
            spare_records(&t)
        );
        assert_no_leak(&t, "after removing the parent");
    }
}

/// Issue 24 item 3: a Remove of the parent between a spare's intent and its thin-id lock reaps
/// the intent-only spare (no thin device yet: the delete "succeeds") and drops its record; the
/// refiller, going on, must not make a device no record knows. Two ways the parent's own device
/// outlives that reap: `remove.async` (the reaper got to the spare first) and a sync Remove whose
/// delete of the parent fails (the snapshot is given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_is_not_made_for_a_parent_removed_between_its_intent_and_its_lock() {
    for remove_async in [true, false] {
        let mut s = settings(2);
        s.remove_async = remove_async;
        let t = setup_with(s);
        let c1 = committed(&t, "c1", 10).await;
        let (at, go) = t.engine.pause_spare_after_intent(c1);
        let engine = t.engine.clone();
        let refill = tokio::spawn(async move { engine.refill_until_idle().await });
        let spare = at.await.expect("the refiller reaches the pause");
        let rec = t.engine.store.device(spare).expect("read").expect("intent");
        assert_eq!(
            rec.origin,
            Some(c1),
            "async={remove_async}: paused on c1's spare"
        );
        if remove_async {
            t.engine.remove("c1").await.expect("remove c1");
            let mut queue = t
                .engine
                .reaper_queue
                .lock()
                .expect("queue")
                .take()
                .expect("the reaper's queue");
            assert_eq!(
                queue.try_recv().ok(),
                Some(spare),
                "the spare is queued first"
            );
            // The reaper deletes the spare (its record dropped); the parent waits its turn.
            assert!(t.engine.reap(spare).await, "reap the spare");
            assert!(t.engine.store.device(spare).expect("read").is_none());
            go.send(()).expect("resume");
            refill.await.expect("refiller");
            while let Ok(id) = queue.try_recv() {
                assert!(t.engine.reap(id).await, "reap {id}");
            }
        } else {
            // The spare's delete (a missing thin id) is the first; the parent's, the second, fails.
            t.pool
                .fail_nth_with("delete_thin", 2, crate::pool::PoolError::Busy("c1".into()));
            t.engine
                .remove("c1")
                .await
                .expect_err("the parent's delete fails");
            assert!(t.engine.store.device(spare).expect("read").is_none());
            go.send(()).expect("resume");
            refill.await.expect("refiller");
        }
        assert!(
            !t.pool.thin_ids().contains(&spare),
            "async={remove_async}: a device was made for the reaped spare {spare}: {:?}",
            t.pool.calls()
        );
        assert_no_leak(&t, "after the Remove and the refiller");
    }
}

#[tokio::test]
async fn a_kill_at_each_step_of_a_spare_converges_with_nothing_leaked() {
    // What SIGKILL leaves at each failpoint: spare:after-intent (the intent flushed),
    // spare:after-create-snap (and the thin device), spare:after-activate (and its dm device),
    // a finished spare (Ready, not flushed, then flushed by another call), prepare:after-take.
    for step in [
        "after-intent",
        "after-create-snap",
        "after-activate",
        "ready",
        "taken",
    ] {
        let t = spares_on(2);
        let c1 = committed(&t, "c1", 10).await;
        let mut taken = None;
        match step {
            "ready" | "taken" => {
                t.engine.refill_until_idle().await;
                let spare = t.engine.spare_of("c1").expect("spare");
                if step == "taken" {
                    prep(&t, "x", "c1").await.expect("take");
                    taken = Some(spare);
                } else {
                    // Another call's flush makes the Ready records durable.
                    t.engine
                        .update("c1", no_labels(), &[])
                        .await
                        .expect("update");
                }
            }
            _ => {
                let id = t
                    .engine
                    .store
                    .begin_spare(Some("c1"), c1, 1 << 30)
                    .expect("i");
                t.engine.flush().await.expect("flush");
                if step != "after-intent" {
                    t.engine.pool.create_snap(id, c1).expect("create_snap");
                }
                if step == "after-activate" {
                    t.engine.pool.activate(id, 1 << 30).expect("activate");
                }
            }
        }
        let (t, report) = t.crash();
        assert_no_leak(&t, step);
        assert!(spare_records(&t).is_empty(), "{step}: a spare survived");
        let c = t.engine.record("c1").expect("r").expect("c1");
        assert!(c.spares.is_empty(), "{step}: {:?}", c.spares);
        if step == "ready" {
            assert_eq!(report.spares_dropped.len(), 2, "{step}: {report:?}");
        }
        if let Some(id) = taken {
            let x = t
                .engine
                .record("x")
                .expect("r")
                .expect("the taken snapshot survives");
            assert_eq!(x.thin_id, id);
            assert_eq!(c.children, 1);
        }
        // With spares on again: nothing from the last run is handed out (the first Prepare
        // takes the usual path), then the refiller makes new ones that are taken.
        let (t, _) = restart_with(t, 2);
        let snaps = t.pool.count("create_snap");
        prep(&t, "y", "c1").await.expect("prepare after restart");
        assert_eq!(
            t.pool.count("create_snap"),
            snaps + 1,
            "{step}: old spare taken"
        );
        t.engine.refill_until_idle().await;
        let spare = t.engine.spare_of("c1").expect("a new spare");
        prep(&t, "z", "c1").await.expect("take the new spare");
        assert_eq!(t.engine.record("z").expect("r").expect("z").thin_id, spare);
        assert_no_leak(&t, step);
    }
}

#[tokio::test]
async fn the_free_space_floor_stops_refills() {
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    // 5% free: under the default 10% floor.
    t.pool.set_space(1000, 950);
    let snaps = t.pool.count("create_snap");
    t.engine.refill_until_idle().await;
    assert_eq!(
        t.pool.count("create_snap"),
        snaps,
        "a spare made under the floor"
    );
    assert!(spare_records(&t).is_empty());
    t.pool.set_space(0, 0);
    t.engine.refill_until_idle().await;
    assert_eq!(t.engine.spare_counts().ready, 2);
}

#[tokio::test(start_paused = true)]
async fn eviction_bounds_the_count_and_deletes_evicted_spares() {
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    t.engine.refill_until_idle().await;
    let old = t.engine.spare_of("c1").expect("spare of c1");
    // Two later commits: the base and the most recent one are wanted, c1 is not.
    committed(&t, "c2", 10).await;
    committed(&t, "c3", 10).await;
    // The Prepares on the base that made them are no demand any more (one spare each).
    past_the_demand_window().await;
    t.engine.refill_until_idle().await;
    assert!(t.engine.spare_of("").is_some());
    assert!(t.engine.spare_of("c3").is_some());
    assert_eq!(t.engine.spare_of("c1"), None);
    assert_eq!(t.engine.spare_of("c2"), None);
    assert!(
        !t.pool.thin_ids().contains(&old),
        "the evicted spare's device stays"
    );
    assert_eq!(spare_records(&t).len(), 2);
    assert_eq!(t.engine.spare_counts().ready, 2);
    assert!(t
        .engine
        .record("c1")
        .expect("r")
        .expect("c1")
        .spares
        .is_empty());
    // A Prepare on c1 makes it wanted again, in place of c3.
    prep(&t, "x", "c1").await.expect("prepare");
    t.engine.refill_until_idle().await;
    assert!(t.engine.spare_of("c1").is_some());
    assert_eq!(t.engine.spare_of("c3"), None);
    assert_eq!(spare_records(&t).len(), 2);
    assert_no_leak(&t, "after eviction");
}

#[tokio::test]
async fn a_quarantined_parent_is_refused_even_with_a_spare() {
    let t = spares_on(2);
    let c1 = committed(&t, "c1", 10).await;
    t.engine.refill_until_idle().await;
    assert!(t.engine.spare_of("c1").is_some());
    let q = crate::store::Quarantine {
        reason: "test".into(),
        thin_id_gone: false,
        since: 0,
    };
    t.engine
        .store
        .set_quarantine("c1", c1, &q)
        .expect("quarantine");
    let err = prep(&t, "x", "c1").await.expect_err("quarantined parent");
    assert!(matches!(err, EngineError::FailedPrecondition(_)), "{err}");
    assert!(t.engine.record("x").expect("r").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refiller_task_fills_in_the_background_and_stops_on_shutdown() {
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = {
        let e = t.engine.clone();
        tokio::spawn(async move { e.run_spares(stop_rx).await })
    };
    // Wait for the event (both spares ready), bounded so a broken refiller fails, not hangs.
    let filled = async {
        while t.engine.spare_counts().ready < 2 {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), filled)
        .await
        .expect("the refiller never made the base's and c1's spares");
    assert!(t.engine.spare_of("c1").is_some() && t.engine.spare_of("").is_some());
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(std::time::Duration::from_secs(60), task)
        .await
        .expect("the refiller did not stop")
        .expect("task");
    assert_no_leak(&t, "after the refiller ran");
}

#[tokio::test(start_paused = true)]
async fn the_refiller_gives_a_call_in_flight_its_grace_then_refills_at_a_bounded_share() {
    // 30 committed layers (each committed is wanted) and the base: 31 spares of work.
    let t = spares_on(31);
    let mut parent = String::new();
    for i in 0..30 {
        let key = format!("a{i}");
        prep(&t, &key, &parent).await.expect("prepare");
        let name = format!("c{i}");
        t.engine
            .commit(&name, &key, no_labels())
            .await
            .expect("commit");
        parent = name;
    }
    let snaps = t.pool.count("create_snap");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A call in flight from before the refiller starts (its first round is due at once).
    let call = t.engine.spares.call_in_flight();
    let t0 = tokio::time::Instant::now();
    let task = {
        let e = t.engine.clone();
        tokio::spawn(async move { e.run_spares(stop_rx).await })
    };
    // The time is tokio's paused clock: it moves only as this test sleeps.
    let step = std::time::Duration::from_millis(1);
    while t0.elapsed() < BUSY_GRACE - step * 2 {
        tokio::time::sleep(step).await;
    }
    assert_eq!(
        t.engine.spare_counts().rounds,
        0,
        "a round ran within the grace of a call in flight"
    );
    assert_eq!(t.pool.count("create_snap"), snaps);
    // Then, the call still in flight, the refiller goes on, at most one round per grace.
    let span = std::time::Duration::from_secs(1);
    while t0.elapsed() < span {
        tokio::time::sleep(step).await;
    }
    let rounds = t.engine.spare_counts().rounds;
    let most = (span.as_millis() / BUSY_GRACE.as_millis()) as u64 + 1;
    assert!(
        rounds >= 1 && t.engine.spare_counts().ready >= 1,
        "no spare made while a call was in flight for {span:?} ({rounds} rounds)"
    );
    assert!(
        rounds <= most,
        "{rounds} rounds in {span:?} with a call in flight: more than one per {BUSY_GRACE:?}"
    );
    // Once the call ends, the refiller goes on at once and fills every wanted spare.
    drop(call);
    while t.engine.spare_counts().ready < 31 {
        tokio::time::sleep(step).await;
    }
    stop_tx.send(true).expect("stop");
    task.await.expect("task");
}

#[tokio::test(start_paused = true)]
async fn an_origin_in_demand_gets_more_spares_within_the_count_until_its_demand_passes() {
    let t = spares_on(4);
    committed(&t, "c1", 10).await;
    committed(&t, "c2", 10).await;
    // The Prepares on the base that made them: no demand any more.
    past_the_demand_window().await;
    t.engine.refill_until_idle().await;
    let of = |t: &T| {
        (
            t.engine.spares_of(""),
            t.engine.spares_of("c1"),
            t.engine.spares_of("c2"),
        )
    };
    // Idle: the base and each committed origin, one each.
    assert_eq!(of(&t), (1, 1, 1));
    // Three Prepares on c1 in a row: its demand is 3, so it wants 3, ahead of c2's one; the
    // base keeps its one, and 4 in all.
    for i in 0..3 {
        prep(&t, &format!("k{i}"), "c1").await.expect("prepare");
    }
    t.engine.refill_until_idle().await;
    assert_eq!(of(&t), (1, 3, 0));
    assert_eq!(t.engine.spare_counts().ready, 4, "not the count");
    // A burst now takes the three at once: no create_snap on its path.
    let snaps = t.pool.count("create_snap");
    let mut calls = Vec::new();
    for i in 0..3 {
        let e = t.engine.clone();
        calls.push(tokio::spawn(async move {
            e.create(Kind::Active, &format!("b{i}"), "c1", no_labels())
                .await
        }));
    }
    for c in calls {
        c.await.expect("task").expect("prepare");
    }
    assert_eq!(
        t.pool.count("create_snap"),
        snaps,
        "a burst call made a device"
    );
    assert_eq!(t.engine.spares_of("c1"), 0);
    // Once its uses are older than the window, c1 is back to one and c2 gets its own again.
    past_the_demand_window().await;
    t.engine.refill_until_idle().await;
    assert_eq!(of(&t), (1, 1, 1));
    assert_no_leak(&t, "after the demand passed");
    // With a count of 2 an origin in demand never goes beyond it.
    let t = spares_on(2);
    committed(&t, "c1", 10).await;
    past_the_demand_window().await;
    for i in 0..5 {
        prep(&t, &format!("k{i}"), "c1").await.expect("prepare");
    }
    t.engine.refill_until_idle().await;
    assert_eq!((t.engine.spares_of(""), t.engine.spares_of("c1")), (1, 1));
}

#[test]
fn the_unpackers_keys_are_recognised() {
    assert!(is_unpack_key("extract-123456-abcd sha256:0f1e"));
    assert!(is_unpack_key("extract-1 c"));
    // As a proxy plugin receives them from containerd's metadata store (seen from Docker 28).
    assert!(is_unpack_key(
        "moby/1/extract-611387900-oyXs sha256:832eba9fb7a61d213930972306e6583e9752d7220cf612023574c9d57ce48cc6"
    ));
    assert!(is_unpack_key("k8s.io/12/extract-1 sha256:0f"));
    assert_eq!(
        client_key("k8s.io/12/extract-1 sha256:0f"),
        "extract-1 sha256:0f"
    );
    assert_eq!(client_key("a/b/extract-1 c"), "a/b/extract-1 c");
    assert_eq!(client_key("plain"), "plain");
    assert!(!is_unpack_key("k8s.io/x/extract-1 c"));
    assert!(is_docker_init_layer("moby/6/0274e6bb0335dae7-init"));
    assert!(is_docker_init_layer("c-init"));
    assert!(!is_docker_init_layer("moby/6/-init"));
    assert!(!is_docker_init_layer("moby/5/0274e6bb0335dae7-init-key"));
    assert!(!is_docker_init_layer("moby/2/sha256:832e"));
    for other in [
        "extract-",
        "extract-1",
        "extract- sha256:0f",
        "extract-1 ",
        "x-extract-1 c",
        "extract1 c",
        "ctr-1",
    ] {
        assert!(!is_unpack_key(other), "{other:?}");
    }
}

/// One layer of an unpack as containerd's unpacker makes it: Prepare `extract-<n> <name>` on
/// `parent`, Commit as `name`.
async fn unpack_layer(t: &T, n: usize, name: &str, parent: &str) {
    let key = format!("extract-{n} {name}");
    prep(t, &key, parent).await.expect("unpack prepare");
    t.engine
        .commit(name, &key, no_labels())
        .await
        .expect("unpack commit");
}

#[tokio::test(start_paused = true)]
async fn an_unpack_gets_a_spare_of_its_top_layer_only_once_it_has_gone_quiet() {
    let t = spares_on(8);
    t.engine.refill_until_idle().await;
    assert_eq!(t.engine.spares_of(""), 1);
    // The unpack's first layer takes the base's spare; no spare of a layer is made while the
    // unpack goes on, however often the refiller looks.
    let snaps = t.pool.count("create_snap");
    unpack_layer(&t, 0, "l0", "").await;
    assert_eq!(
        t.pool.count("create_snap"),
        snaps,
        "the first layer made a device"
    );
    t.engine.refill_until_idle().await;
    assert_eq!(
        t.engine.spares_of("l0"),
        0,
        "a spare of a layer the unpack goes on from"
    );
    unpack_layer(&t, 1, "l1", "l0").await;
    t.engine.refill_until_idle().await;
    unpack_layer(&t, 2, "l2", "l1").await;
    t.engine.refill_until_idle().await;
    assert_eq!(
        (
            t.engine.spares_of("l0"),
            t.engine.spares_of("l1"),
            t.engine.spares_of("l2")
        ),
        (0, 0, 0)
    );
    assert_eq!(t.engine.spares_of(""), 1, "the base's spare is made again");
    // Quiet: the top layer, where the containers will start, gets its spare; the layers below
    // it never do.
    tokio::time::advance(UNPACK_QUIET).await;
    t.engine.refill_until_idle().await;
    assert_eq!(
        (
            t.engine.spares_of("l0"),
            t.engine.spares_of("l1"),
            t.engine.spares_of("l2")
        ),
        (0, 0, 1)
    );
    assert_no_leak(&t, "after the unpack");
    // A container on a layer below the top (not an unpack's Prepare) wants that layer at once.
    prep(&t, "ctr", "l1").await.expect("prepare a container");
    t.engine.refill_until_idle().await;
    assert_eq!(t.engine.spares_of("l1"), 1);
    // A spare made before the unpack went on from its layer serves the unpack's Prepare, and
    // the layer is wanted no more.
    let before = t.pool.count("create_snap");
    unpack_layer(&t, 3, "l3", "l2").await;
    assert_eq!(
        t.pool.count("create_snap"),
        before,
        "l2's spare was not taken"
    );
    tokio::time::advance(UNPACK_QUIET).await;
    t.engine.refill_until_idle().await;
    assert_eq!((t.engine.spares_of("l2"), t.engine.spares_of("l3")), (0, 1));
    assert_no_leak(&t, "after the second unpack");
}

#[tokio::test(start_paused = true)]
async fn the_refiller_task_makes_the_top_layers_spare_once_the_unpack_is_quiet() {
    let t = spares_on(8);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = t.engine.clone();
    let task = tokio::spawn(async move { engine.run_spares(stop_rx).await });
    unpack_layer(&t, 0, "l0", "").await;
    unpack_layer(&t, 1, "l1", "l0").await;
    // Nothing pokes the refiller after the last Commit: it wakes by itself once the quiet time
    // has passed.
    tokio::time::sleep(UNPACK_QUIET * 2).await;
    for _ in 0..100 {
        if t.engine.spares_of("l1") == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!((t.engine.spares_of("l0"), t.engine.spares_of("l1")), (0, 1));
    stop_tx.send(true).expect("stop");
    task.await.expect("refiller");
}

#[tokio::test]
async fn a_docker_init_layer_never_gets_a_spare() {
    let t = spares_on(8);
    t.engine.refill_until_idle().await;
    committed(&t, "moby/2/sha256:top", 10).await;
    t.engine.refill_until_idle().await;
    assert_eq!(t.engine.spares_of("moby/2/sha256:top"), 1);
    // docker run: the init layer on the image, committed, then the container's layer on it.
    prep(&t, "moby/5/ctr-init-key", "moby/2/sha256:top")
        .await
        .expect("prepare the init layer");
    t.engine
        .commit("moby/6/ctr-init", "moby/5/ctr-init-key", no_labels())
        .await
        .expect("commit the init layer");
    t.engine.refill_until_idle().await;
    let missed = t.engine.spare_counts().missed;
    prep(&t, "moby/7/ctr", "moby/6/ctr-init")
        .await
        .expect("prepare the container");
    assert_eq!(t.engine.spare_counts().missed, missed, "counted as a miss");
    t.engine.refill_until_idle().await;
    assert_eq!(
        t.engine.spares_of("moby/6/ctr-init"),
        0,
        "a spare of an init layer"
    );
    // The image's top layer, used by the init layer's Prepare, keeps its spare.
    assert_eq!(t.engine.spares_of("moby/2/sha256:top"), 1);
    assert_no_leak(&t, "after docker run");
}
