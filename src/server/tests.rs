use std::collections::HashMap;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use tonic::Code;

use super::*;
use crate::admin::api::admin_client::AdminClient;
use crate::admin::api::StatusRequest;
use crate::config::FsConfig;
use crate::engine::recovery;
use crate::pool::fake::FakePool;

/// Only a stale socket is replaced: a regular file (a typo in `address`, a config file)
/// or a directory at the socket path is refused and kept.
#[tokio::test]
async fn bind_replaces_a_stale_socket_but_never_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "keep me").expect("write");
    let err = bind(&file).expect_err("a regular file is not replaced");
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");
    let sub = dir.path().join("d");
    std::fs::create_dir(&sub).expect("mkdir");
    assert!(matches!(bind(&sub), Err(ServerError::NotASocket(_))));
    assert!(sub.is_dir());
    // A socket no process serves (left by a dead one) is replaced.
    let sock = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    drop(bind(&sock).expect("a stale socket is replaced"));
}
use crate::pool::ThinPool;

fn prep(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

/// Starts the engine as the daemon does (`engine::start`) on `pool`, with the store at
/// `path` (opened again if it was just dropped).
async fn start_on(
    path: &Path,
    pool: impl FnOnce() -> Result<Arc<dyn ThinPool>, crate::pool::PoolError> + Send + 'static,
) -> (EngineHandle, Option<crate::engine::StartTask>) {
    crate::engine::start_opening(
        path,
        |p: &Path| Ok(crate::store::open_after_drop(p)),
        pool,
        crate::engine::Settings::with_fs(FsConfig::default()),
        |_: &Path| Ok(()),
    )
    .await
    .expect("start")
}

/// The engine [`start_on`] makes, once it is there.
async fn started(path: &Path, pool: Arc<FakePool>) -> Arc<crate::engine::Engine> {
    let (handle, task) = start_on(path, move || Ok(pool as Arc<dyn ThinPool>)).await;
    if let Some(task) = task {
        task.await.expect("join").expect("start task");
    }
    handle.engine().await.expect("engine")
}

/// An engine on a fresh fake pool with its store under `dir`.
async fn fake_engine(dir: &Path) -> Arc<crate::engine::Engine> {
    started(&dir.join("db"), Arc::new(FakePool::new())).await
}

#[tokio::test]
async fn grpc_over_unix_socket_maps_status_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = fake_engine(dir.path()).await;
    let sock = dir.path().join("run/thinsnap.sock");
    let admin_sock = dir.path().join("run/admin.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&admin_sock).expect("bind admin");
    for s in [&sock, &admin_sock] {
        let meta = std::fs::metadata(s).expect("socket");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", s.display());
    }
    assert!(
        matches!(bind(&sock), Err(ServerError::InUse(_))),
        "live socket taken over"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(
        listener,
        admin,
        EngineHandle::ready(engine),
        None,
        async {
            let _ = stop_rx.await;
        },
    ));

    let ch = connect(&sock).await.expect("connect");
    let mut c = SnapshotsClient::new(ch.clone());
    let m = c
        .prepare(prep("a", ""))
        .await
        .expect("prepare")
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "ext4");
    let code = |r: Result<tonic::Response<PrepareSnapshotResponse>, tonic::Status>| {
        r.expect_err("must fail").code()
    };
    assert_eq!(code(c.prepare(prep("a", "")).await), Code::AlreadyExists);
    assert_eq!(code(c.prepare(prep("", "")).await), Code::InvalidArgument);
    assert_eq!(code(c.prepare(prep("b", "missing")).await), Code::NotFound);
    assert_eq!(
        code(c.prepare(prep("b", "a")).await),
        Code::FailedPrecondition
    );
    let st = c
        .stat(StatSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: "a".into(),
        })
        .await
        .expect("stat")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(st.kind, 2, "active");
    let err = c
        .list(ListSnapshotsRequest {
            snapshotter: "thinsnap".into(),
            filters: vec!["name==".into()],
        })
        .await;
    // The wrapper streams: the error arrives with the first message.
    let code = match err {
        Err(s) => s.code(),
        Ok(r) => r
            .into_inner()
            .message()
            .await
            .expect_err("bad filter")
            .code(),
    };
    assert_eq!(code, Code::InvalidArgument);
    let upd = c
        .update(UpdateSnapshotRequest {
            snapshotter: "thinsnap".into(),
            info: Some(Info {
                name: "a".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["kind".into()],
            }),
        })
        .await;
    assert_eq!(upd.expect_err("immutable").code(), Code::InvalidArgument);
    // containerd's socket carries the Snapshots API alone: no admin call reaches the engine.
    let on_snapshots = AdminClient::new(ch).status(StatusRequest::default()).await;
    assert_eq!(
        on_snapshots
            .expect_err("admin on the Snapshots socket")
            .code(),
        Code::Unimplemented
    );
    let on_snapshots = AdminClient::new(connect(&sock).await.expect("connect"))
        .grow(crate::admin::api::GrowRequest {
            data_size_bytes: 1 << 40,
            metadata_size_bytes: 0,
        })
        .await;
    assert_eq!(
        on_snapshots
            .expect_err("grow on the Snapshots socket")
            .code(),
        Code::Unimplemented
    );
    let status = AdminClient::new(connect(&admin_sock).await.expect("connect admin"))
        .status(StatusRequest::default())
        .await
        .expect("admin")
        .into_inner();
    assert_eq!(status.snapshots_active, 1);
    assert_eq!(status.thin_ids_in_use, 2);
    // And the admin socket does not carry the Snapshots API.
    let on_admin = SnapshotsClient::new(connect(&admin_sock).await.expect("connect admin"))
        .prepare(prep("z", ""))
        .await;
    assert_eq!(
        on_admin.expect_err("Snapshots on the admin socket").code(),
        Code::Unimplemented
    );

    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");
}

/// While the engine is still being made, the socket answers Stat from a settled store and a
/// Prepare waits for the engine, then succeeds; a failed start answers Unavailable.
#[tokio::test]
async fn calls_during_the_start_wait_for_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let engine = started(&path, pool.clone()).await;
    engine
        .create(crate::engine::Kind::Active, "a", "", Default::default())
        .await
        .expect("a");
    drop(engine);
    // The next start: the store is settled, and the pool is made only when the test says.
    let (pool_made, make_pool) = std::sync::mpsc::channel::<()>();
    let (handle, task) = start_on(&path, move || {
        let _ = make_pool.recv();
        Ok(pool as Arc<dyn ThinPool>)
    })
    .await;
    let task = task.expect("a settled store is served while the engine is made");
    let waiting = handle.clone();
    let sock = dir.path().join("thinsnap.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&dir.path().join("admin.sock")).expect("bind admin");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, admin, handle, None, async {
        let _ = stop_rx.await;
    }));
    let mut c = SnapshotsClient::new(connect(&sock).await.expect("connect"));
    let stat = c
        .stat(StatSnapshotRequest {
            snapshotter: "thinsnap".into(),
            key: "a".into(),
        })
        .await
        .expect("stat answered while starting");
    assert_eq!(stat.into_inner().info.expect("info").name, "a");
    let mut c2 = c.clone();
    let prepare = tokio::spawn(async move { c2.prepare(prep("b", "")).await });
    // The Prepare has reached the handle and waits for the engine.
    while waiting.waiting() == 0 {
        tokio::task::yield_now().await;
    }
    assert!(!prepare.is_finished(), "Prepare must wait for the engine");
    pool_made.send(()).expect("make the pool");
    let m = prepare
        .await
        .expect("join")
        .expect("prepare after the start");
    assert_eq!(m.into_inner().mounts.len(), 1);
    task.await.expect("join").expect("start task");
    let engine = waiting.engine().await.expect("engine");
    assert!(engine.stat("b").await.is_ok());
    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");

    // A start that fails: calls that need the engine get Unavailable, with the reason.
    let (handle, publisher) = EngineHandle::starting(None);
    let sock = dir.path().join("failed.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&dir.path().join("failed-admin.sock")).expect("bind admin");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, admin, handle, None, async {
        let _ = stop_rx.await;
    }));
    publisher.failed("no pool".into());
    let mut c = SnapshotsClient::new(connect(&sock).await.expect("connect"));
    let err = c.prepare(prep("c", "")).await.expect_err("no engine");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("no pool"), "{}", err.message());
    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");
}

/// A stop (SIGTERM) while a call is in flight whose client has gone: the call ends with its
/// outcome before `run` returns, and the store's last flush makes it durable with the pool's
/// transaction id, so the next start finds it settled and skips thin_ls.
#[tokio::test]
async fn a_stop_waits_for_a_call_in_flight_and_flushes_its_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let settings = crate::engine::Settings::with_fs(FsConfig::default());
    let engine = started(&path, pool.clone()).await;
    let handle = EngineHandle::ready(engine.clone());
    let calls = handle.calls().clone();
    let sock = dir.path().join("thinsnap.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&dir.path().join("admin.sock")).expect("bind admin");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(run(listener, admin, handle, None, async {
        let _ = stop_rx.await;
    }));
    // A Prepare held in the kernel (its create_snap), whose client then gives up.
    let mut held = pool.pause_nth("create_snap", 1);
    let client = {
        let mut c = SnapshotsClient::new(connect(&sock).await.expect("connect"));
        tokio::spawn(async move { c.prepare(prep("a", "")).await })
    };
    held.reached().await;
    client.abort();
    assert!(client.await.expect_err("cancelled").is_cancelled());
    stop_tx.send(()).expect("stop");
    tokio::select! {
        biased;
        r = &mut server => panic!("the server stopped with a call in flight: {r:?}"),
        () = calls.draining() => {}
    }
    held.release();
    server.await.expect("join").expect("server");
    assert!(calls.is_empty());
    let rec = engine
        .record("a")
        .expect("read")
        .expect("the Prepare's outcome");
    assert_eq!(rec.state, crate::store::State::Ready);
    drop(engine);
    // The next start: the store is settled and its transaction id is the pool's.
    let store = crate::store::open_after_drop(&path);
    let records = recovery::Records::read(&store).expect("records");
    assert!(records.settled(), "{records:?}");
    let (engine, report) =
        recovery::start_from(pool.clone(), store, records, settings, &|_: &Path| Ok(()))
            .expect("restart");
    assert!(!report.thin_ids_listed, "{report:?}");
    assert!(engine.stat("a").await.is_ok());
}

/// Mounts (and so Usage) may activate a device after a reboot: it runs as a call of its
/// own, which goes on when its client gives up.
#[tokio::test]
async fn a_mounts_cut_short_still_activates_the_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let engine = started(&path, pool.clone()).await;
    engine
        .create(crate::engine::Kind::Active, "a", "", Default::default())
        .await
        .expect("a");
    let id = engine.record("a").expect("read").expect("a").thin_id;
    drop(engine);
    pool.reboot();
    let engine = started(&path, pool.clone()).await;
    let handle = EngineHandle::ready(engine);
    let calls = handle.calls().clone();
    let sock = dir.path().join("thinsnap.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&dir.path().join("admin.sock")).expect("bind admin");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, admin, handle, None, async {
        let _ = stop_rx.await;
    }));
    let mut held = pool.pause_nth("activate", 1);
    let client = {
        let mut c = SnapshotsClient::new(connect(&sock).await.expect("connect"));
        tokio::spawn(async move {
            c.mounts(MountsRequest {
                snapshotter: "thinsnap".into(),
                key: "a".into(),
            })
            .await
        })
    };
    held.reached().await;
    assert_eq!(calls.len(), 1, "Mounts is not a call of its own");
    client.abort();
    assert!(client.await.expect_err("cancelled").is_cancelled());
    held.release();
    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");
    assert!(pool.active().contains(&id), "the activation was cut short");
}

/// List replies are cut by bytes: snapshots with the largest labels the API allows (64 KiB
/// each, long keys and parents), more than 4 MiB of them, come in several messages, each
/// under MAX_LIST_REPLY_BYTES (grpc-go's default receive limit; containerd's proxy client
/// takes 16 MiB), and a client that accepts no more than that reads every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_replies_stay_under_what_clients_accept() {
    use crate::engine::{MAX_KEY_LEN, MAX_LABELS_BYTES, MAX_LABEL_LEN};
    use crate::grpc::MAX_LIST_REPLY_BYTES;
    use prost::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = fake_engine(dir.path()).await;
    let labels: std::collections::BTreeMap<String, String> = (0..MAX_LABELS_BYTES / MAX_LABEL_LEN)
        .map(|i| {
            let k = format!("containerd.io/snapshot/l{i:02}");
            let v = "v".repeat(MAX_LABEL_LEN - k.len());
            (k, v)
        })
        .collect();
    let long = |p: &str, i: usize| format!("{p}{i:04}{}", "k".repeat(MAX_KEY_LEN - 5));
    let parent = long("p", 0);
    engine
        .create(
            crate::engine::Kind::Active,
            &long("a", 0),
            "",
            labels.clone(),
        )
        .await
        .expect("parent");
    engine
        .commit(&parent, &long("a", 0), labels.clone())
        .await
        .expect("commit");
    let n = 80;
    for i in 0..n {
        engine
            .create(
                crate::engine::Kind::View,
                &long("v", i),
                &parent,
                labels.clone(),
            )
            .await
            .expect("view");
    }
    let sock = dir.path().join("thinsnap.sock");
    let listener = bind(&sock).expect("bind");
    let admin = bind(&dir.path().join("admin.sock")).expect("bind admin");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(
        listener,
        admin,
        EngineHandle::ready(engine),
        None,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut c = SnapshotsClient::new(connect(&sock).await.expect("connect"))
        .max_decoding_message_size(MAX_LIST_REPLY_BYTES);
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "thinsnap".into(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let (mut messages, mut infos, mut total) = (0, 0, 0);
    while let Some(reply) = stream.message().await.expect("every reply readable") {
        let len = reply.encoded_len();
        assert!(len <= MAX_LIST_REPLY_BYTES, "a reply of {len} bytes");
        messages += 1;
        infos += reply.info.len();
        total += len;
        assert!(reply.info.iter().all(|i| i.labels.len() == labels.len()));
    }
    assert_eq!(infos, n + 1);
    assert!(
        total > MAX_LIST_REPLY_BYTES,
        "the test must need several replies"
    );
    assert!(messages >= 2, "{messages} replies");
    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");
}

#[test]
fn the_daemon_turns_huge_pages_off() {
    super::disable_huge_pages();
    assert!(nix::sys::prctl::get_thp_disable().expect("PR_GET_THP_DISABLE"));
}
