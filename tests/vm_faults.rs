//! Faults that are not a crash of thinsnap itself, on real dm-thin (root + device-mapper; run in
//! the VM by integration/test.sh with `--ignored`):
//! - calls cut short by their client (a kubelet timeout, a containerd restart, a ^C: the gRPC
//!   call is cancelled and the server drops the handler): nothing may be left stuck or lost;
//! - a thinsnap killed while its start-up reads the pool's metadata (thin_ls on a reserved
//!   metadata snapshot): the next start must serve; without thin_ls it refuses to start;
//! - a thinsnap killed with devices suspended (a pool grow, a snapshot of an active origin): the
//!   next start resumes them and serves;
//! - a pool gone read-only (its metadata full or failed): changes are refused with a clear error,
//!   status says what to run, nothing is lost, and all works again once it is writable.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A daemon (not started) on a 1GiB loop pool with a 1% floor.
fn daemon(name: &str) -> Daemon {
    let d = Daemon::prepare_dir("faults", "tsft", name);
    d.write_config(
        "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"\nmin_free_space = \"1%\"\n\
         [fs]\nbase_size = \"64MiB\"",
    );
    d
}

/// A started daemon ([`daemon`]) with one active snapshot "a" holding file "f" = "A"; returns
/// the snapshot's mounts too.
async fn started_with_a(name: &str) -> (Daemon, Vec<containerd_snapshots::api::types::Mount>) {
    let mut d = daemon(name);
    d.start();
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("a");
    write_file(&d.dir, &m[0], "f", "A");
    (d, m)
}

/// `req` with a gRPC deadline of `deadline`, as containerd sends its caller's context.
fn with_deadline<T>(req: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(req);
    r.set_timeout(deadline);
    r
}

/// Runs `call` as a client with a deadline: the server is told (grpc-timeout) and the client
/// gives up (drops the call, which resets the stream) when it passes. Returns whether the call
/// answered OK in time; any other outcome (deadline exceeded, cancelled) is "cut short".
async fn cut_short<F, T>(deadline: Duration, call: F) -> bool
where
    F: std::future::Future<Output = Result<T, tonic::Status>>,
{
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(_)) => true,
        Ok(Err(s)) => {
            assert!(
                matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
                "a call cut short must fail only by its deadline, not with {s:?}"
            );
            false
        }
        Err(_) => false,
    }
}

/// Whether `r` succeeded or failed with `code`: a retry's two acceptable answers.
fn ok_or<T>(r: &Result<T, tonic::Status>, code: Code) -> bool {
    r.as_ref().map_or_else(|s| s.code() == code, |_| true)
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<Info, tonic::Status> {
    c.stat(StatSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

/// The deadlines to try: a few ms up to a little more than the call takes (`took`).
fn deadlines(took: Duration) -> Vec<Duration> {
    let mut out: Vec<Duration> = [1u64, 3, 8]
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect();
    for pct in [10u32, 25, 50, 75, 100, 130] {
        out.push(took * pct / 100);
    }
    out
}

/// Checks that active snapshot `key` (on the fixture's parent) mounts, holds the parent's file,
/// keeps what is written into it, and can be removed; then that the key is free again.
async fn check_active_then_free(d: &Daemon, c: &mut SnapshotsClient<Channel>, key: &str) {
    let info = stat(c, key)
        .await
        .unwrap_or_else(|e| panic!("{key}: Stat after the retry: {e}"));
    assert_eq!(info.kind, 2, "{key}: not active");
    let m = mounts(c, key).await;
    write_file(&d.dir, &m[0], "mine", key);
    with_mount(&d.dir, &mounts(c, key).await[0], |root| {
        let parent = std::fs::read_to_string(root.join("f")).expect("parent's file");
        assert_eq!(parent, "P", "{key}: parent's data");
        let mine = std::fs::read_to_string(root.join("mine")).expect("own file");
        assert_eq!(mine, key, "{key}: lost what was written");
    });
    remove(c, key)
        .await
        .unwrap_or_else(|e| panic!("{key}: remove: {e}"));
    assert_eq!(code(stat(c, key).await), Code::NotFound, "{key}");
    prepare(c, key, "P")
        .await
        .unwrap_or_else(|e| panic!("{key}: the removed key cannot be prepared again: {e}"));
    remove(c, key).await.expect("remove again");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_calls_cut_short_by_their_client_leave_nothing_stuck() {
    let mut d = daemon("cancel");
    d.start();
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "P-a", "").await.expect("parent");
    write_file(&d.dir, &m[0], "f", "P");
    commit(&mut c, "P", "P-a").await.expect("commit parent");

    // How long a Prepare and a Remove take here (the emulated VM is slow, and varies).
    let mut took = Duration::ZERO;
    for i in 0..3 {
        let t0 = Instant::now();
        prepare(&mut c, &format!("probe{i}"), "P")
            .await
            .expect("probe");
        took += t0.elapsed();
        remove(&mut c, &format!("probe{i}")).await.expect("probe");
    }
    let took = took / 3;
    let mut answered = [0u32; 4];
    let mut cut = [0u32; 4];

    for (i, deadline) in deadlines(took).into_iter().enumerate() {
        // Prepare: after it, a retry and Stat agree, and the snapshot is whole.
        let key = format!("prep{i}");
        let req = PrepareSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: key.clone(),
            parent: "P".into(),
            labels: HashMap::new(),
        };
        let ok = cut_short(deadline, c.clone().prepare(with_deadline(req, deadline))).await;
        let retry = prepare(&mut c, &key, "P").await;
        if ok {
            assert_eq!(
                code(retry),
                Code::AlreadyExists,
                "{key}: answered, then gone"
            );
        } else {
            assert!(
                ok_or(&retry, Code::AlreadyExists),
                "{key}: retry after a cut-short Prepare: {retry:?}"
            );
        }
        check_active_then_free(&d, &mut c, &key).await;
        (answered[0], cut[0]) = (answered[0] + ok as u32, cut[0] + !ok as u32);

        // View: the same, read-only.
        let key = format!("view{i}");
        let req = ViewSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: key.clone(),
            parent: "P".into(),
            labels: HashMap::new(),
        };
        let ok = cut_short(deadline, c.clone().view(with_deadline(req, deadline))).await;
        let retry = view(&mut c, &key, "P").await;
        assert!(
            ok_or(&retry, Code::AlreadyExists),
            "{key}: retry after a cut-short View: {retry:?}"
        );
        assert_eq!(stat(&mut c, &key).await.expect("view there").kind, 1);
        with_mount(&d.dir, &mounts(&mut c, &key).await[0], |root| {
            assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "P");
        });
        remove(&mut c, &key).await.expect("remove view");
        (answered[1], cut[1]) = (answered[1] + ok as u32, cut[1] + !ok as u32);

        // Commit: either done or not done, never half; a retry finishes it.
        let (key, name) = (format!("tocommit{i}"), format!("committed{i}"));
        let m = prepare(&mut c, &key, "P").await.expect("to commit");
        write_file(&d.dir, &m[0], "c", &name);
        let req = CommitSnapshotRequest {
            snapshotter: "thinsnap".into(),
            name: name.clone(),
            key: key.clone(),
            labels: HashMap::new(),
        };
        let ok = cut_short(deadline, c.clone().commit(with_deadline(req, deadline))).await;
        let retry = commit(&mut c, &name, &key).await;
        if ok {
            assert_eq!(
                code(retry),
                Code::NotFound,
                "{name}: answered, then not done"
            );
        } else {
            assert!(
                ok_or(&retry, Code::NotFound),
                "{name}: retry after a cut-short Commit: {retry:?}"
            );
        }
        assert_eq!(stat(&mut c, &name).await.expect("committed").kind, 3);
        assert_eq!(code(stat(&mut c, &key).await), Code::NotFound, "{key}");
        let check = format!("check{i}");
        with_mount(
            &d.dir,
            &view(&mut c, &check, &name).await.expect("view")[0],
            |root| {
                assert_eq!(std::fs::read_to_string(root.join("c")).expect("c"), name);
            },
        );
        remove(&mut c, &check).await.expect("remove check");
        (answered[2], cut[2]) = (answered[2] + ok as u32, cut[2] + !ok as u32);

        // Remove: either removed or still whole; a retry removes it; the key is free after.
        let req = RemoveSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: name.clone(),
        };
        let ok = cut_short(deadline, c.clone().remove(with_deadline(req, deadline))).await;
        let retry = remove(&mut c, &name).await;
        if ok {
            assert_eq!(
                code(retry),
                Code::NotFound,
                "{name}: answered, then still there"
            );
        } else {
            assert!(
                ok_or(&retry, Code::NotFound),
                "{name}: retry after a cut-short Remove: {retry:?}"
            );
        }
        assert_eq!(code(stat(&mut c, &name).await), Code::NotFound, "{name}");
        let m = prepare(&mut c, &name, "P")
            .await
            .expect("a removed name can be prepared again");
        assert_eq!(m.len(), 1);
        remove(&mut c, &name).await.expect("remove");
        (answered[3], cut[3]) = (answered[3] + ok as u32, cut[3] + !ok as u32);
    }
    println!(
        "Prepare took {took:?}; answered/cut short: prepare {}/{}, view {}/{}, commit {}/{}, remove {}/{}",
        answered[0], cut[0], answered[1], cut[1], answered[2], cut[2], answered[3], cut[3]
    );
    // The short deadlines cut every kind of call at least once: the test saw what it is for.
    assert!(
        cut.iter().all(|&n| n > 0),
        "some call was never cut short: {cut:?}"
    );
    assert_no_leak(&d, &mut a, "after the cut-short calls").await;
    // And after a restart: dm devices equal the active snapshots, thin_ls equals the store.
    d.stop();
    d.start();
    let (mut c, mut a) = d.clients().await;
    assert_eq!(
        list(&mut c, &[]).await.expect("list"),
        vec!["P".to_string()]
    );
    assert_no_leak(&d, &mut a, "after a restart").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_killed_during_thin_ls_the_next_start_serves() {
    let (mut d, _) = started_with_a("thinls").await;
    d.stop();
    // A store behind the pool (the pool's transaction id moved on without it) makes the next
    // start read the pool's thin ids with thin_ls.
    {
        use devicemapper::{DevId, DmName, DmOptions, ThinPoolStatus, DM};
        use std::str::FromStr;
        let dm = DM::new().expect("dm");
        let name = DmName::new(&d.pool).expect("name");
        let (_, table) = dm
            .table_status(&DevId::Name(name), DmOptions::default())
            .expect("status");
        let txid = match ThinPoolStatus::from_str(&table[0].3).expect("parse") {
            ThinPoolStatus::Working(w) => w.transaction_id,
            other => panic!("pool not working: {other:?}"),
        };
        dm.target_msg(
            &DevId::Name(name),
            None,
            &format!("set_transaction_id {txid} {}", txid + 1),
        )
        .expect("set_transaction_id");
    }
    // Without thin_ls this start cannot tell its own thin ids from someone else's: it refuses,
    // saying what to install, rather than guess (it used to go on without looking).
    d.env = vec![("PATH".into(), "/usr/bin".into())];
    assert!(
        !std::path::Path::new("/usr/bin/thin_ls").exists(),
        "thin_ls is in /usr/bin: the test cannot hide it"
    );
    let (st, log) = d.serve_until_exit();
    assert!(!st.success());
    assert!(log.contains("install thin-provisioning-tools"), "{log}");
    d.env.clear();
    // Killed with the metadata snapshot reserved.
    let fp = "recovery:metadata-snap-held";
    d.child = Some(d.spawn(Some(fp)));
    d.expect_killed(fp);
    // The next start must serve (it used to fail with EBUSY at every start from then on).
    d.start();
    let (mut c, mut a) = d.clients().await;
    with_mount(&d.dir, &mounts(&mut c, "a").await[0], |root| {
        assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "A");
    });
    assert_no_leak(&d, &mut a, "after a kill during thin_ls").await;
    prepare(&mut c, "b", "").await.expect("serves");
}

/// Whether dm device `name` is suspended.
fn suspended(name: &str) -> bool {
    use devicemapper::{DevId, DmFlags, DmName, DM};
    let dm = DM::new().expect("dm");
    let info = dm
        .device_info(&DevId::Name(DmName::new(name).expect("name")))
        .unwrap_or_else(|e| panic!("info of {name}: {e}"));
    info.flags().contains(DmFlags::DM_SUSPEND)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_killed_with_devices_suspended_the_next_start_resumes_them() {
    let (mut d, m) = started_with_a("suspended").await;
    let a_dev = m[0].source.trim_start_matches("/dev/mapper/").to_string();
    d.stop();
    // An active snapshot's device left suspended, as a thinsnap killed while it snapshotted an
    // active origin leaves it (thin-provisioning.rst: the origin is suspended meanwhile).
    {
        use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
        DM::new()
            .expect("dm")
            .device_suspend(
                &DevId::Name(DmName::new(&a_dev).expect("name")),
                DmOptions::default().set_flags(DmFlags::DM_SUSPEND),
            )
            .expect("suspend a");
    }
    assert!(suspended(&a_dev));
    // Killed in the middle of a pool grow: the new table loaded, the pool suspended.
    let fp = "grow:pool-suspended";
    d.start_with(Some(fp));
    let out = d.cli(&["pool", "grow", "--data-size", "2GiB"]);
    assert!(!out.status.success(), "{fp}: the grow answered");
    d.expect_killed(fp);
    assert!(suspended(&d.pool), "{fp}: the pool is not suspended");
    // The next start resumes both, and serves.
    d.start();
    assert!(!suspended(&d.pool), "the pool is still suspended");
    assert!(!suspended(&a_dev), "{a_dev} is still suspended");
    let (mut c, mut a) = d.clients().await;
    let st = status(&mut a).await;
    assert_eq!(
        st.data.expect("data").total_bytes,
        2 << 30,
        "the grow, done but for its resume, is live"
    );
    with_mount(&d.dir, &mounts(&mut c, "a").await[0], |root| {
        assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "A");
    });
    let m = prepare(&mut c, "b", "").await.expect("serves");
    write_file(&d.dir, &m[0], "g", "B");
    assert_no_leak(&d, &mut a, "after a kill with devices suspended").await;
    assert!(d.log().contains("left suspended"), "{}", d.log_tail(30));
}

/// Reloads pool `pool`'s table with the `read_only` feature added (`on`) or taken out.
fn set_pool_read_only(pool: &str, on: bool) {
    use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
    let dm = DM::new().expect("dm");
    let name = DmName::new(pool).expect("name");
    let id = DevId::Name(name);
    let (_, table) = dm
        .table_status(
            &id,
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .expect("table");
    let (start, len, target, params) = table[0].clone();
    // <metadata dev> <data dev> <block size> <low water mark> <#features> [<feature>...]
    let words: Vec<&str> = params.split_whitespace().collect();
    let mut features: Vec<&str> = words[5..]
        .iter()
        .copied()
        .filter(|f| *f != "read_only")
        .collect();
    if on {
        features.push("read_only");
    }
    let params = format!(
        "{} {} {}",
        words[..4].join(" "),
        features.len(),
        features.join(" ")
    );
    dm.table_load(&id, &[(start, len, target, params)], DmOptions::default())
        .expect("load table");
    dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
        .expect("suspend");
    dm.device_suspend(&id, DmOptions::default())
        .expect("resume");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_a_read_only_pool_refuses_changes_clearly_and_loses_nothing() {
    let (d, _) = started_with_a("readonly").await;
    let (mut c, _) = d.clients().await;
    set_pool_read_only(&d.pool, true);
    // Remove cannot win space back from a pool that takes no changes: it says why, and the
    // snapshot is still there.
    let err = remove(&mut c, "a")
        .await
        .expect_err("remove on a read-only pool");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("read-only"), "{err:?}");
    assert!(stat(&mut c, "a").await.is_ok(), "the snapshot is gone");
    let err = prepare(&mut c, "b", "")
        .await
        .expect_err("prepare on a read-only pool");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // status says what to do.
    let out = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Action Needed:") && text.contains("read-only"),
        "{text}"
    );
    // Writable again: the same Remove works, and nothing leaked.
    set_pool_read_only(&d.pool, false);
    let out = d.cli(&["status"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Action Needed"));
    with_mount(&d.dir, &mounts(&mut c, "a").await[0], |root| {
        assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "A");
    });
    remove(&mut c, "a").await.expect("remove once writable");
    let (_, mut a) = d.clients().await;
    assert_no_leak(&d, &mut a, "after a read-only spell").await;
}
