//! Crash safety on real dm-thin (root + device-mapper; run in the VM by integration/test.sh with
//! `--ignored`): every mutating call is killed with SIGKILL at each named failpoint
//! (`THINSNAP_FAILPOINT`, see src/failpoint.rs), thinsnap is restarted, and then
//! - every snapshot it lists can be mounted and holds what was written;
//! - the thin ids in the pool's metadata (thin_ls on a metadata snapshot) are exactly the ones the
//!   store knows: nothing leaked, nothing pointing at nothing;
//! - the interrupted call has the one outcome its kill point allows (done or not done);
//! - a call that answered OK before the kill, with only its intent durable, survives;
//! - the interrupted call can be made again.
//!
//! Then random SIGKILLs under a concurrent load of Prepare/Commit/Remove, repeated.
//!
//! With warm spares on (`[spares] count = 2`), the same at each of `failpoint::SPARES`: a kill
//! while the refiller makes a spare, or right after a Prepare took one, leaves nothing leaked,
//! the taken snapshot survives, and no spare is handed out twice.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use tonic::transport::Channel;
use tonic::Code;

/// A daemon (not started) on a 1GiB loop pool with a 1% floor; `name` may be a failpoint's name.
fn daemon(name: &str) -> Daemon {
    daemon_with(name, "")
}

/// [`daemon`] with `more` appended to its config (`"[spares]"`: warm spares at the default count).
fn daemon_with(name: &str, more: &str) -> Daemon {
    let d = Daemon::prepare_dir("crash", "tscr", &name.replace(':', "-"));
    d.write_config(&format!(
        "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"\nmin_free_space = \"1%\"\n\
         [fs]\nbase_size = \"64MiB\"\n{more}"
    ));
    d
}

/// Every snapshot, as (name, kind).
async fn list_all(c: &mut SnapshotsClient<Channel>) -> std::collections::BTreeMap<String, i32> {
    list_kinds(c, &[]).await.expect("list")
}

/// The fixture every failpoint run starts from: (key, kind, files it must hold).
async fn fixture(
    d: &Daemon,
    c: &mut SnapshotsClient<Channel>,
    p: &str,
) -> Vec<(String, &'static str, Vec<(String, String)>)> {
    let k = |s: &str| format!("{p}{s}");
    let m = prepare(c, &k("l1"), "").await.expect("l1");
    write_file(&d.dir, &m[0], "f", "L1");
    commit(c, &k("C1"), &k("l1")).await.expect("C1");
    let m = prepare(c, &k("A"), &k("C1")).await.expect("A");
    write_file(&d.dir, &m[0], "a", "A");
    view(c, &k("V"), &k("C1")).await.expect("V");
    let m = prepare(c, &k("toCommit"), &k("C1"))
        .await
        .expect("toCommit");
    write_file(&d.dir, &m[0], "t", "T");
    prepare(c, &k("toRemoveActive"), &k("C1"))
        .await
        .expect("toRemoveActive");
    let m = prepare(c, &k("r1"), &k("C1")).await.expect("r1");
    write_file(&d.dir, &m[0], "r", "R");
    commit(c, &k("toRemoveCommitted"), &k("r1"))
        .await
        .expect("toRemoveCommitted");
    let f = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    vec![
        (k("C1"), "committed", f(&[("f", "L1")])),
        (k("A"), "active", f(&[("f", "L1"), ("a", "A")])),
        (k("V"), "view", f(&[("f", "L1")])),
    ]
}

/// Checks that `key` holds `files`: active and view through their mounts, committed through a
/// view of it.
async fn check_content(
    d: &Daemon,
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    files: &[(String, String)],
) {
    let st = c
        .stat(StatSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: key.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{key} lost: {e}\n{}", d.log_tail(40)))
        .into_inner()
        .info
        .expect("info");
    let (m, tmp) = if st.kind == 3 {
        let k = format!("check-{key}");
        (view(c, &k, key).await.expect("view for check"), Some(k))
    } else {
        (mounts(c, key).await, None)
    };
    with_mount(&d.dir, &m[0], |root| {
        for (name, want) in files {
            let got = std::fs::read_to_string(root.join(name))
                .unwrap_or_else(|e| panic!("{key}/{name}: {e}"));
            assert_eq!(&got, want, "{key}/{name}");
        }
    });
    if let Some(k) = tmp {
        remove(c, &k).await.expect("remove check view");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_sigkill_at_every_failpoint_converges() {
    let mut report = Vec::new();
    // One pool for every failpoint but the base's (each needs a pool of its own): each round
    // works on keys of its own prefix, and the leak check covers the whole pool.
    let mut shared = daemon("calls");
    shared.start();
    for (i, &fp) in thinsnap::failpoint::ALL.iter().enumerate() {
        if fp.starts_with("base:") {
            let mut d = daemon(fp);
            // The base device is made at the first start: die there, then start clean.
            d.child = Some(d.spawn(Some(fp)));
            d.expect_killed(fp);
            d.start();
            let (mut c, mut a) = d.clients().await;
            assert_no_leak(&d, &mut a, fp).await;
            let m = prepare(&mut c, "after", "")
                .await
                .expect("prepare after base crash");
            with_mount(&d.dir, &m[0], |root| {
                let n = std::fs::read_dir(root).expect("readdir").count();
                assert_eq!(n, 0, "{fp}: base not empty (lost+found?)");
            });
            assert_no_leak(&d, &mut a, fp).await;
            report.push(format!("{fp}: ok"));
            continue;
        }
        let d = &mut shared;
        let p = format!("p{i}-");
        let k = |s: &str| format!("{p}{s}");
        let expected = {
            let (mut c, _) = d.clients().await;
            fixture(d, &mut c, &p).await
        };
        let (group, step) = fp.split_once(':').expect("group:step");
        if step == "start" {
            // The first call answers OK with only its intent durable; the second is killed
            // before it writes anything, so nothing flushed the first one's outcome.
            let armed = format!("{fp}@2");
            d.stop();
            d.start_with(Some(&armed));
            let (mut c, _) = d.clients().await;
            let second = match group {
                "prepare" => {
                    let m = prepare(&mut c, &k("victim"), &k("C1"))
                        .await
                        .expect("the first prepare answers");
                    write_file(&d.dir, &m[0], "v", "V");
                    prepare(&mut c, &k("victim2"), &k("C1")).await.map(|_| ())
                }
                "commit" => {
                    commit(&mut c, &k("victimC"), &k("toCommit"))
                        .await
                        .expect("the first commit answers");
                    commit(&mut c, &k("never"), &k("toRemoveActive")).await
                }
                _ => {
                    remove(&mut c, &k("toRemoveActive"))
                        .await
                        .expect("the first remove answers");
                    remove(&mut c, &k("toRemoveCommitted")).await
                }
            };
            assert!(second.is_err(), "{armed}: the second call answered");
            d.expect_killed(fp);
            d.start();
            let (mut c, mut a) = d.clients().await;
            assert_no_leak(d, &mut a, fp).await;
            for (key, _, files) in &expected {
                check_content(d, &mut c, key, files).await;
            }
            let names = list_all(&mut c).await;
            let has = |key: &str| names.contains_key(&k(key));
            let l1 = ("f".to_string(), "L1".to_string());
            match group {
                "prepare" => {
                    assert!(
                        has("victim"),
                        "{fp}: an answered Prepare was lost: {names:?}"
                    );
                    assert!(
                        !has("victim2"),
                        "{fp}: the killed Prepare happened: {names:?}"
                    );
                    check_content(d, &mut c, &k("victim"), &[l1, ("v".into(), "V".into())]).await;
                    prepare(&mut c, &k("victim2"), &k("C1"))
                        .await
                        .expect("the killed prepare can be made");
                }
                "commit" => {
                    assert!(
                        has("victimC") && !has("toCommit"),
                        "{fp}: an answered Commit was lost: {names:?}"
                    );
                    assert!(
                        has("toRemoveActive") && !has("never"),
                        "{fp}: the killed Commit happened: {names:?}"
                    );
                    check_content(d, &mut c, &k("victimC"), &[l1, ("t".into(), "T".into())]).await;
                }
                _ => {
                    assert!(
                        !has("toRemoveActive"),
                        "{fp}: an answered Remove came back: {names:?}"
                    );
                    assert!(
                        has("toRemoveCommitted"),
                        "{fp}: the killed Remove happened: {names:?}"
                    );
                    check_content(
                        d,
                        &mut c,
                        &k("toRemoveCommitted"),
                        &[("r".into(), "R".into())],
                    )
                    .await;
                    prepare(&mut c, &k("toRemoveActive"), &k("C1"))
                        .await
                        .expect("the removed key can be prepared again");
                }
            }
            assert_no_leak(d, &mut a, fp).await;
            let outcome = "the answered call survived, the killed one did not happen: ok";
            println!("{fp}: {outcome}");
            report.push(format!("{fp}: {outcome}"));
            continue;
        }
        d.stop();
        d.start_with(Some(fp));
        let (mut c, _) = d.clients().await;
        let call = match (group, fp) {
            ("prepare", _) => prepare(&mut c, &k("victim"), &k("C1")).await.map(|_| ()),
            ("commit", _) => commit(&mut c, &k("victimC"), &k("toCommit")).await,
            (_, "remove:after-deactivate") => remove(&mut c, &k("toRemoveActive")).await,
            _ => remove(&mut c, &k("toRemoveCommitted")).await,
        };
        assert!(
            call.is_err(),
            "{fp}: the call answered; failpoint not reached"
        );
        d.expect_killed(fp);
        d.start();
        let (mut c, mut a) = d.clients().await;
        assert_no_leak(d, &mut a, fp).await;
        for (key, _, files) in &expected {
            check_content(d, &mut c, key, files).await;
        }
        let names = list_all(&mut c).await;
        let (victim, victim_c, to_commit) = (k("victim"), k("victimC"), k("toCommit"));
        // Each kill point has one outcome (done or not done), decided by what is durable: the
        // intent, and for Prepare whether the pool has the thin device.
        let outcome = match group {
            "prepare" => {
                let made = fp != "prepare:after-intent";
                assert_eq!(
                    names.contains_key(&victim),
                    made,
                    "{fp}: the Prepare should be {}: {names:?}",
                    if made { "completed" } else { "undone" }
                );
                if made {
                    assert_eq!(
                        prepare(&mut c, &victim, &k("C1"))
                            .await
                            .expect_err("dup")
                            .code(),
                        Code::AlreadyExists
                    );
                    check_content(d, &mut c, &victim, &[("f".into(), "L1".into())]).await;
                    remove(&mut c, &victim).await.expect("remove victim");
                }
                prepare(&mut c, &victim, &k("C1"))
                    .await
                    .expect("prepare the interrupted key again");
                if made {
                    "completed by recovery; removed, prepared again: ok"
                } else {
                    "undone; prepared again: ok"
                }
            }
            "commit" => {
                let before = names.contains_key(&to_commit);
                let after = names.contains_key(&victim_c);
                assert!(before ^ after, "{fp}: commit half done: {names:?}");
                assert!(
                    after,
                    "{fp}: a Commit whose intent is durable was undone: {names:?}"
                );
                let files = [
                    ("f".to_string(), "L1".to_string()),
                    ("t".to_string(), "T".to_string()),
                ];
                check_content(d, &mut c, &victim_c, &files).await;
                "commit completed by recovery: ok"
            }
            _ => {
                let key = if fp == "remove:after-deactivate" {
                    k("toRemoveActive")
                } else {
                    k("toRemoveCommitted")
                };
                let done = fp != "remove:after-deactivate";
                assert_eq!(
                    !names.contains_key(&key),
                    done,
                    "{fp}: the Remove should be {}: {names:?}",
                    if done { "done" } else { "not done" }
                );
                if !done {
                    remove(&mut c, &key).await.expect("remove again");
                    "remove not done (before its intent), then again: ok"
                } else {
                    "remove completed: ok"
                }
            }
        };
        assert_no_leak(d, &mut a, fp).await;
        println!("{fp}: {outcome}");
        report.push(format!("{fp}: {outcome}"));
    }
    shared.stop();
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_sigkill_at_spare_failpoints_converges() {
    let mut d = Daemon::prepare_dir("crash", "tscr", "spares");
    d.write_config(
        "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"\nmin_free_space = \"1%\"\n\
         [fs]\nbase_size = \"64MiB\"\n[spares]\ncount = 2",
    );
    d.start();
    {
        let (mut c, _) = d.clients().await;
        let m = prepare(&mut c, "l1", "").await.expect("l1");
        write_file(&d.dir, &m[0], "f", "L1");
        commit(&mut c, "C1", "l1").await.expect("C1");
    }
    let l1 = [("f".to_string(), "L1".to_string())];
    let mut report = Vec::new();
    for (n, &fp) in thinsnap::failpoint::SPARES.iter().enumerate() {
        d.stop();
        let log_before = d.log().len();
        let victim = format!("victim{n}");
        if fp == "prepare:after-take" {
            d.start_with(Some(fp));
            let (mut c, mut a) = d.clients().await;
            // C1's spares went with the restart: this Prepare misses and makes C1 wanted.
            prepare(&mut c, &format!("touch{n}"), "C1")
                .await
                .expect("touch");
            wait_spares(&d, &mut a, 2).await;
            let r = prepare(&mut c, &victim, "C1").await;
            assert!(r.is_err(), "{fp}: the take answered; failpoint not reached");
        } else {
            // Hit 1 is the base's spare, made at start; hit 2 is C1's, wanted once a Prepare
            // used C1. The refiller waits for that Prepare to return, but its answer may still
            // be on the wire when the kill comes: whether it arrived is not asserted.
            let armed = format!("{fp}@2");
            d.start_with(Some(&armed));
            let (mut c, _) = d.clients().await;
            let _ = prepare(&mut c, &format!("touch{n}"), "C1").await;
        }
        d.expect_killed(fp);
        d.start();
        let new_log = d.log()[log_before..].to_string();
        let (mut c, mut a) = d.clients().await;
        assert_no_leak(&d, &mut a, fp).await;
        check_content(&d, &mut c, "C1", &l1).await;
        let names = list_all(&mut c).await;
        let outcome = if fp == "prepare:after-take" {
            // The take was flushed before the kill: the snapshot is there, on its device.
            assert!(
                names.contains_key(&victim),
                "{fp}: the taken Prepare was lost"
            );
            assert_eq!(
                code(prepare(&mut c, &victim, "C1").await),
                Code::AlreadyExists
            );
            check_content(&d, &mut c, &victim, &l1).await;
            "the taken snapshot survived: ok"
        } else {
            // The spare being made is undone at start (its thin id deleted if the pool has it).
            assert!(
                new_log
                    .lines()
                    .any(|l| l.contains("undoing interrupted create")
                        && l.contains(thinsnap::engine::SPARE_OWNER)),
                "{fp}: the interrupted spare was not undone\n{new_log}"
            );
            "the interrupted spare was undone: ok"
        };
        // No spare is handed out twice: C1 wanted again, then two concurrent Prepares on it get
        // two devices, neither another snapshot's.
        prepare(&mut c, &format!("again{n}"), "C1")
            .await
            .expect("again");
        wait_spares(&d, &mut a, 2).await;
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (k1, k2) = (format!("twin{n}a"), format!("twin{n}b"));
        let (m1, m2) = tokio::join!(prepare(&mut c1, &k1, "C1"), prepare(&mut c2, &k2, "C1"));
        let (m1, m2) = (m1.expect("twin a"), m2.expect("twin b"));
        assert_ne!(
            m1[0].source, m2[0].source,
            "{fp}: one spare handed out twice"
        );
        for key in list_all(&mut c).await.keys() {
            if key != &k1 && key != &k2 && !key.starts_with('C') {
                let m = mounts(&mut c, key).await;
                assert!(
                    m[0].source != m1[0].source && m[0].source != m2[0].source,
                    "{fp}: {key} shares a device with a new snapshot"
                );
            }
        }
        assert_no_leak(&d, &mut a, fp).await;
        println!("{fp}: {outcome}");
        report.push(format!("{fp}: {outcome}"));
    }
    d.stop();
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_random_sigkill_under_concurrent_load() {
    random_sigkill_under_concurrent_load(daemon("random")).await;
}

/// The same with warm spares on at the default count (an empty `[spares]` table): the refiller
/// makes and deletes spares between the calls, so the kills also land in its steps.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_random_sigkill_under_concurrent_load_with_default_spares() {
    let d = daemon_with("random-spares", "[spares]");
    let text = std::fs::read_to_string(&d.config).expect("config");
    assert!(!text.contains("count"), "the default count: {text}");
    random_sigkill_under_concurrent_load(d).await;
}

/// Rounds of a concurrent Prepare/Commit/Remove load, each ended by a SIGKILL after a random
/// number of answered calls; after each restart nothing leaked, every commit that was answered
/// is still listed, and every listed active snapshot has its device.
async fn random_sigkill_under_concurrent_load(mut d: Daemon) {
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    d.start();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut seed: u64 = 0x5eed ^ std::process::id() as u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut total_ops = 0u64;
    for round in 0..rounds {
        let (c, _) = d.clients().await;
        // The kill comes after a random number of answered calls, not after a fixed time: a slow
        // (emulated) machine still gets a real load.
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for client in 0..4u64 {
            let mut c = c.clone();
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                // Counts the calls that answered; ends at the first error (the kill).
                let mut ok = 0u64;
                let mut committed: Vec<String> = Vec::new();
                for i in 0u64.. {
                    let key = format!("r{round}-c{client}-{i}");
                    let parent = committed.last().cloned().unwrap_or_default();
                    if let Err(e) = prepare(&mut c, &key, &parent).await {
                        return (ok, e, committed);
                    }
                    ok += 1;
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i % 3 == 2 {
                        if let Err(e) = remove(&mut c, &key).await {
                            return (ok, e, committed);
                        }
                    } else {
                        let name = format!("{key}-c");
                        if let Err(e) = commit(&mut c, &name, &key).await {
                            return (ok, e, committed);
                        }
                        committed.push(name);
                    }
                    ok += 1;
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                unreachable!("the loop only ends by returning")
            }));
        }
        let target = 4 + rand(20);
        let t0 = Instant::now();
        while answered.load(std::sync::atomic::Ordering::SeqCst) < target {
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "round {round}: only {} calls answered in 300s\n{}",
                answered.load(std::sync::atomic::Ordering::SeqCst),
                d.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand(300))).await;
        d.kill9();
        let mut ops = 0;
        for t in tasks {
            let (ok, err, committed) = t.await.expect("client task");
            acknowledged.extend(committed);
            // The calls in flight die with the connection, nothing else may fail.
            assert!(
                matches!(
                    err.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                ),
                "round {round}: a call failed before the kill: {err}"
            );
            ops += ok;
        }
        total_ops += ops;
        d.start();
        let (mut c, mut a) = d.clients().await;
        assert_no_leak(&d, &mut a, &format!("round {round}")).await;
        // Nothing answered is lost: every commit that was answered is still there, committed.
        let listed = list_all(&mut c).await;
        for name in &acknowledged {
            assert_eq!(
                listed.get(name),
                Some(&3),
                "round {round}: the answered commit {name:?} is lost or not committed\n{}",
                d.log_tail(40)
            );
        }
        // Every listed snapshot is usable: active ones have their device.
        for (key, kind) in listed {
            if kind != 3 {
                let m = mounts(&mut c, &key).await;
                assert!(
                    Path::new(&m[0].source).exists(),
                    "round {round}: {key} has no device"
                );
            }
        }
        println!(
            "round {round}: {ops} calls answered before the kill, {} snapshots after restart, no leak",
            list_all(&mut c).await.len()
        );
    }
    assert!(
        total_ops > 0,
        "no call completed before any kill: the load never ran"
    );
    d.stop();
}
