//! The daemon's running half: the gRPC servers on the two unix sockets (containerd's Snapshots
//! service alone on one, thinsnap's Admin service on its own) and the daemon's background tasks (the
//! `remove.async` reaper, `pool.autogrow`, the metrics endpoint). [`run`] owns all of them: at
//! shutdown it stops taking calls, lets in-flight ones finish, signals the tasks, joins them and
//! only then flushes the store. Also the client side of the socket, for the CLI and tests.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server};
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::engine::EngineHandle;
use crate::grpc::Service;
use crate::metrics::Metrics;

/// Errors of binding, serving and connecting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another process is serving on {0}; stop it first")]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; thinsnap only replaces a stale socket there: move the \
         file away or set `address` to another path"
    )]
    NotASocket(PathBuf),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(hyper::Error),
}

/// Fails if a live process answers on `address` (a stale socket file is fine).
///
/// Returns [`ServerError::InUse`] if something accepts connections there.
pub fn check_not_in_use(address: &Path) -> Result<(), ServerError> {
    if address.exists() && std::os::unix::net::UnixStream::connect(address).is_ok() {
        return Err(ServerError::InUse(address.to_path_buf()));
    }
    Ok(())
}

/// Removes the socket file at `address` left by a dead process; nothing to do if there is none.
///
/// Returns [`ServerError::NotASocket`] if something else is there (a regular file, a directory,
/// a symlink): it is never removed.
pub fn remove_stale_socket(address: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(address) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                op: "stat",
                path: address.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(address.to_path_buf()));
    }
    match std::fs::remove_file(address) {
        Ok(()) => warn!(socket = %address.display(), "replaced stale socket file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Io {
                op: "remove stale socket",
                path: address.to_path_buf(),
                source,
            })
        }
    }
    Ok(())
}

/// Binds the socket: creates its parent directory, replaces a stale socket file left by a dead
/// process, refuses a live one, and makes the socket 0600 (only root may drive the snapshotter).
///
/// Returns an error if the socket is in use or cannot be created.
pub fn bind(address: &Path) -> Result<UnixListener, ServerError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { op, path, source }
    };
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    check_not_in_use(address)?;
    remove_stale_socket(address)?;
    // Bind under a umask that leaves no window in which the socket is open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(address);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io("bind", address))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", address))?;
    Ok(listener)
}

/// Turns transparent huge pages off for the daemon (and what it spawns: mkfs, thin_ls).
///
/// sled maps large zeroed tables that it touches only here and there: its metrics histograms
/// (40 of 512 KiB, made even with its metrics compiled out) and its page table (6 MiB). Where
/// THP is `always` (the default of RHEL and of many distribution kernels, and of the test VM's
/// Debian kernel), khugepaged backs every 2 MiB of them that has one page touched with a whole
/// huge page, and the idle daemon grew by 20-28 MiB that nothing uses (benches/NOTES.md, Memory).
/// Nothing thinsnap does gains from huge pages. Where the kernel refuses (no THP), it is logged.
pub fn disable_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        warn!(error = %e, "cannot turn transparent huge pages off (prctl PR_SET_THP_DISABLE)");
    }
}

/// The daemon's tokio runtime (`thinsnap serve` and the CLI's calls).
///
/// The daemon's own work is ioctls and store writes on the blocking pool; the async side only
/// carries gRPC. A few workers serve any node (the default, one per core, costs a thread and
/// its stack per core on a large machine, for nothing).
///
/// Returns an error if the runtime's threads cannot be started.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// How long a stop waits, from when it begins, for the calls in flight (those whose clients
/// wait, and those whose clients have gone) before it flushes and exits without them: well
/// within systemd's `TimeoutStopSec=90` (deploy/thinsnap.service), after which it kills.
pub const CALLS_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves containerd's Snapshots service on `listener` (and nothing else: a client of that socket
/// cannot grow the pool nor read its status) and thinsnap's Admin service on `admin`, and runs
/// the daemon's background tasks (the reaper and
/// autogrow when configured, the warm spares' refiller, the metrics endpoint on `metrics` if
/// given) until `shutdown` completes; then lets in-flight calls finish (also those whose client
/// has gone, for at most [`CALLS_BOUND`]: see `engine::Calls`), stops and joins the tasks, and
/// flushes the store.
///
/// `engine` may still be starting (see [`EngineHandle`]): calls wait for it (Stat and List on a
/// settled store do not), the background tasks start once it is there, and a shutdown
/// meanwhile waits for the start to end.
///
/// Returns an error if the transport fails or the metrics address cannot be bound.
pub async fn run(
    listener: UnixListener,
    admin: UnixListener,
    engine: EngineHandle,
    metrics: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let registry = Arc::new(Metrics::new());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (h, stop) = (engine.clone(), stop.clone());
        tasks.spawn(async move {
            if let Ok(e) = h.engine().await {
                e.run_reaper(stop).await
            }
        });
    }
    {
        let (h, stop) = (engine.clone(), stop.clone());
        tasks.spawn(async move {
            if let Ok(e) = h.engine().await {
                e.run_autogrow(stop).await
            }
        });
    }
    {
        let (h, stop) = (engine.clone(), stop.clone());
        tasks.spawn(async move {
            if let Ok(e) = h.engine().await {
                e.run_spares(stop).await
            }
        });
    }
    {
        // The audit of thin ids after the start (see `engine::audit`).
        let (h, stop) = (engine.clone(), stop.clone());
        tasks.spawn(async move {
            if let Ok(e) = h.engine().await {
                e.run_start_audit(stop).await
            }
        });
    }
    if let Some(addr) = metrics {
        let (e, r, mut stop) = (engine.clone(), registry.clone(), stop.clone());
        let stopped = async move { crate::engine::stopped(&mut stop).await };
        // Bound here, so a bad address fails the start instead of a task later.
        let endpoint = crate::metrics::bind(addr, e, r, stopped).map_err(ServerError::Metrics)?;
        tasks.spawn(async move {
            if let Err(err) = endpoint.await {
                warn!(address = %addr, error = %err, "metrics endpoint failed");
            }
        });
    }
    let snapshots = crate::grpc::server(Service::new(engine.clone(), registry));
    let admin_service = AdminService::new(engine.clone()).into_server();
    // When the stop began: the wait for the calls in flight is bounded from then on.
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(None);
    // One shutdown for both servers; either one ending (an error) stops the other too.
    let (down_tx, down) = tokio::sync::watch::channel(false);
    let down_tx = Arc::new(down_tx);
    let down_of = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        crate::engine::stopped(&mut rx).await
    };
    let signal = {
        let (tx, rx) = (down_tx.clone(), down.clone());
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = down_of(rx) => {}
            }
            stopping_tx.send_replace(Some(tokio::time::Instant::now()));
            let _ = tx.send(true);
        }
    };
    let serve = |server: tonic::transport::server::Router, incoming: UnixListener| {
        let (tx, rx) = (down_tx.clone(), down.clone());
        async move {
            let r = server
                .serve_with_incoming_shutdown(UnixListenerStream::new(incoming), down_of(rx))
                .await;
            let _ = tx.send(true);
            r
        }
    };
    let both = async {
        let (_, served, admin_served) = tokio::join!(
            signal,
            serve(Server::builder().add_service(snapshots), listener),
            serve(Server::builder().add_service(admin_service), admin),
        );
        (served, admin_served)
    };
    // The servers' graceful stop waits for the calls whose clients still wait; bounded too.
    let bounded = async {
        let began = *stopping
            .wait_for(Option::is_some)
            .await
            .map_or(None, |at| *at)
            .get_or_insert_with(tokio::time::Instant::now);
        tokio::time::sleep_until(began + CALLS_BOUND).await;
    };
    let (served, admin_served) = tokio::select! {
        served = both => served,
        () = bounded => {
            warn!(bound = ?CALLS_BOUND, "calls still answered at shutdown; closing their connections");
            (Ok(()), Ok(()))
        }
    };
    // The calls in flight whose clients are gone (the server waited for the others): each runs
    // to its outcome or its undo before the last flush, so a clean stop leaves a settled store.
    let calls = engine.calls();
    if !calls.is_empty() {
        info!(calls = calls.len(), "waiting for the calls in flight");
    }
    let began = (*stopping.borrow()).unwrap_or_else(tokio::time::Instant::now);
    let left = calls
        .wait((began + CALLS_BOUND).saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if !left.is_empty() {
        warn!(bound = ?CALLS_BOUND, calls = ?left,
              "calls still running at shutdown; stopping without them (the next start recovers them)");
    }
    let _ = stop_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            warn!(error = %e, "a background task failed");
        }
    }
    // The tasks above waited for the start to end: the engine is there unless it failed.
    if let Some(e) = engine.now() {
        if let Err(e) = e.shutdown().await {
            warn!(error = %e, "cannot flush the store at shutdown");
        }
    }
    served?;
    admin_served?;
    info!("server stopped");
    Ok(())
}

/// A gRPC channel to the socket at `address`.
///
/// Returns an error if nothing listens there.
pub async fn connect(address: &Path) -> Result<Channel, ServerError> {
    let path = address.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            UnixStream::connect(path.clone())
        }))
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
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
        let labels: std::collections::BTreeMap<String, String> = (0..MAX_LABELS_BYTES
            / MAX_LABEL_LEN)
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
}
