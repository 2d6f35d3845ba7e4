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
/// huge page, and the idle daemon grew by memory that nothing uses (how much: benches/RESULTS.md,
/// (e') resident memory split, and benches/NOTES.md, Memory).
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
mod tests;
