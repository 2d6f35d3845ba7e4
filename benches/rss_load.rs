//! Memory after a burst (benches/README.md, part e'): what the daemon keeps resident once a load
//! is over, split the way /proc/PID/status splits it (RssAnon: heap, stacks, sled's buffers;
//! RssFile: the binary's pages touched so far), on the host's real CPU.
//!
//! The bench runs the real server (`thinsnap::server::run`, the daemon's runtime from
//! `thinsnap::server::runtime`, the sled store with the daemon's settings) in a child process,
//! on the in-memory fake pool of the unit tests (the kernel's ioctls cost nothing here and hold
//! no memory of the daemon's), and drives it from this process over the unix socket with the
//! load of the VM bench: a chain of 16 committed layers, then 8 clients, one connection each,
//! making Prepare, Commit, View and Remove calls, then 10,000 snapshots (1,000 active) as in the
//! start-up phase. After each stage it waits for the daemon to be quiet and reads the child's
//! VmRSS, RssAnon and RssFile. The VM phase measures the same figures on real dm-thin.
//!
//! Usage (no root needed):
//!   cargo bench --bench rss_load --features fake-pool -- [--clients N] [--ops N] [--snapshots N]
//!       [--active N] [--idle-secs N] [--pool-delay-ms N] [--dir DIR]
//! `--pool-delay-ms` puts the kernel's latency back into the fake pool's device changes, so
//! concurrent calls overlap on the blocking pool as they do on real dm-thin.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, ViewSnapshotRequest,
};
use thinsnap::config::FsConfig;
use thinsnap::engine::recovery;
use thinsnap::engine::Settings;
use thinsnap::fs::FsError;
use thinsnap::pool::fake::FakePool;
use thinsnap::pool::{HostRoom, PoolError, PoolInfo, PoolStatus, ThinId, ThinPool};
use thinsnap::store::Store;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    clients: usize,
    ops: usize,
    snapshots: usize,
    active: usize,
    idle_secs: u64,
    pool_delay_ms: u64,
    dir: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, BoxError> {
    let mut args = Args {
        clients: 8,
        ops: 64,
        snapshots: 10_000,
        active: 1_000,
        idle_secs: 12,
        pool_delay_ms: 0,
        dir: None,
    };
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--clients" => args.clients = value()?.parse()?,
            "--ops" => args.ops = value()?.parse()?,
            "--snapshots" => args.snapshots = value()?.parse()?,
            "--active" => args.active = value()?.parse()?,
            "--idle-secs" => args.idle_secs = value()?.parse()?,
            "--pool-delay-ms" => args.pool_delay_ms = value()?.parse()?,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.clients == 0 || args.active == 0 || args.active > args.snapshots {
        return Err("--clients must be at least 1, --active between 1 and --snapshots".into());
    }
    Ok(args)
}

fn no_format(_: &Path) -> Result<(), FsError> {
    Ok(())
}

/// The fake pool with the kernel's latency put back: each call that changes a device sleeps
/// `delay`, as a resume or a metadata commit takes time on real dm-thin (how long:
/// benches/RESULTS.md, (f) the floor). Concurrent calls then overlap on the blocking pool as they do on a node, which is what
/// decides how many threads (and malloc arenas) the daemon grows under load.
struct SlowPool {
    inner: FakePool,
    delay: Duration,
}

impl SlowPool {
    fn wait(&self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }
}

impl ThinPool for SlowPool {
    fn create_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.wait();
        self.inner.create_thin(id)
    }
    fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<(), PoolError> {
        self.wait();
        self.inner.create_snap(id, origin)
    }
    fn delete_thin(&self, id: ThinId) -> Result<(), PoolError> {
        self.wait();
        self.inner.delete_thin(id)
    }
    fn activate(&self, id: ThinId, size_bytes: u64) -> Result<PathBuf, PoolError> {
        self.wait();
        self.inner.activate(id, size_bytes)
    }
    fn deactivate(&self, id: ThinId) -> Result<(), PoolError> {
        self.wait();
        self.inner.deactivate(id)
    }
    fn deactivate_deferred(&self, id: ThinId) -> Result<(), PoolError> {
        self.inner.deactivate_deferred(id)
    }
    fn mapped_bytes(&self, id: ThinId) -> Result<u64, PoolError> {
        self.inner.mapped_bytes(id)
    }
    fn active_ids(&self) -> Result<Vec<ThinId>, PoolError> {
        self.inner.active_ids()
    }
    fn device_path(&self, id: ThinId) -> PathBuf {
        self.inner.device_path(id)
    }
    fn prefixed_devices(&self) -> Result<Vec<thinsnap::pool::PrefixedDevice>, PoolError> {
        self.inner.prefixed_devices()
    }
    fn status(&self) -> Result<PoolStatus, PoolError> {
        self.inner.status()
    }
    fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), PoolError> {
        self.inner.set_transaction_id(old, new)
    }
    fn info(&self) -> PoolInfo {
        self.inner.info()
    }
    fn discard(&self, id: ThinId, size_bytes: u64) -> Result<(), PoolError> {
        self.inner.discard(id, size_bytes)
    }
    fn list_thin_ids(&self) -> Result<BTreeSet<ThinId>, PoolError> {
        self.inner.list_thin_ids()
    }
    fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        self.inner.grow(data_bytes, metadata_bytes)
    }
    fn host_room(&self) -> Result<Option<HostRoom>, PoolError> {
        self.inner.host_room()
    }
}

/// The child: the daemon's server on the fake pool, until SIGTERM.
fn serve(dir: &Path, sock: &Path, delay: Duration) -> Result<(), BoxError> {
    thinsnap::server::disable_huge_pages();
    let rt = thinsnap::server::runtime()?;
    let store = Store::open(&dir.join("db"))?;
    let pool = SlowPool {
        inner: FakePool::new(),
        delay,
    };
    let (engine, _) = recovery::start(
        Arc::new(pool),
        store,
        Settings::with_fs(FsConfig::default()),
        &no_format,
    )?;
    rt.block_on(async {
        let listener = thinsnap::server::bind(sock)?;
        let admin = thinsnap::server::bind(&sock.with_file_name("admin.sock"))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            term.recv().await;
        };
        thinsnap::server::run(
            listener,
            admin,
            thinsnap::engine::EngineHandle::ready(Arc::new(engine)),
            None,
            shutdown,
        )
        .await?;
        Ok::<_, BoxError>(())
    })
}

/// Resident memory of a process, in KiB, as /proc/PID/status gives it.
#[derive(Debug, Clone, Copy)]
struct Rss {
    vm_rss: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn rss_of(pid: u32) -> Result<Rss, BoxError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64, BoxError> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line[name.len()..]
            .split_whitespace()
            .next()
            .ok_or("empty field")?
            .parse()?)
    };
    Ok(Rss {
        vm_rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
        threads: field("Threads:")?,
    })
}

/// Reads the child's memory once it has been quiet for `idle` (blocking threads of the load
/// have timed out and exited by then: tokio keeps an idle one for 10 s).
async fn settle(pid: u32, idle: Duration, what: &str) -> Result<Rss, BoxError> {
    tokio::time::sleep(idle).await;
    let r = rss_of(pid)?;
    println!(
        "{what:<34} VmRSS {:>6.1} MiB  RssAnon {:>6.1} MiB  RssFile {:>5.1} MiB  threads {}",
        r.vm_rss as f64 / 1024.0,
        r.anon as f64 / 1024.0,
        r.file as f64 / 1024.0,
        r.threads
    );
    Ok(r)
}

async fn connect(sock: &Path) -> Result<SnapshotsClient<Channel>, BoxError> {
    Ok(SnapshotsClient::new(thinsnap::server::connect(sock).await?))
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<(), BoxError> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await?;
    Ok(())
}

async fn view(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Result<(), BoxError> {
    c.view(ViewSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await?;
    Ok(())
}

async fn commit(c: &mut SnapshotsClient<Channel>, name: &str, key: &str) -> Result<(), BoxError> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "thinsnap".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await?;
    Ok(())
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), BoxError> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
    })
    .await?;
    Ok(())
}

/// The burst: `clients` connections at once, each `ops` x (Prepare on the chain's top, Commit
/// it, View the committed one, Remove the view and the committed snapshot).
async fn burst(sock: &Path, top: &str, clients: usize, ops: usize) -> Result<(), BoxError> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (sock, top) = (sock.to_path_buf(), top.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&sock).await?;
            for i in 0..ops {
                let (key, name, v) = (
                    format!("b{client}-{i}"),
                    format!("b{client}-{i}-c"),
                    format!("b{client}-{i}-v"),
                );
                prepare(&mut c, &key, &top).await?;
                commit(&mut c, &name, &key).await?;
                view(&mut c, &v, &name).await?;
                remove(&mut c, &v).await?;
                remove(&mut c, &name).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The start-up phase's store: `active` chains of committed layers, an active snapshot on each.
async fn fill(
    sock: &Path,
    clients: usize,
    snapshots: usize,
    active: usize,
) -> Result<(), BoxError> {
    let per_chain = snapshots / active;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let sock = sock.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&sock).await?;
            let mut chain = client;
            while chain < active {
                let mut parent = String::new();
                for layer in 0..per_chain - 1 {
                    let (key, name) = (format!("f{chain}-{layer}-a"), format!("f{chain}-{layer}"));
                    prepare(&mut c, &key, &parent).await?;
                    commit(&mut c, &name, &key).await?;
                    parent = name;
                }
                prepare(&mut c, &format!("f{chain}-container"), &parent).await?;
                chain += clients;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

async fn drive(args: Args, dir: &Path) -> Result<(), BoxError> {
    let sock = dir.join("thinsnap.sock");
    // RSS_LOAD_WRAP runs the server under a profiler, e.g. "valgrind --tool=massif".
    let wrap = std::env::var("RSS_LOAD_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(std::env::current_exe()?);
            cmd
        }
        None => Command::new(std::env::current_exe()?),
    };
    let child = cmd
        .arg("--serve")
        .arg(dir)
        .arg(&sock)
        .arg(args.pool_delay_ms.to_string())
        .spawn()?;
    let server = Server(child);
    let pid = server.0.id();
    let t = Instant::now();
    let mut c = loop {
        match connect(&sock).await {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(format!("the server did not start: {e}").into()),
        }
    };
    let idle = Duration::from_secs(args.idle_secs);
    let fresh = settle(pid, Duration::from_millis(500), "fresh, idle").await?;
    let mut parent = String::new();
    for layer in 0..16 {
        let (key, name) = (format!("chain-{layer}-a"), format!("chain-{layer}"));
        prepare(&mut c, &key, &parent).await?;
        commit(&mut c, &name, &key).await?;
        parent = name;
    }
    let t = Instant::now();
    burst(&sock, &parent, args.clients, args.ops).await?;
    println!(
        "burst: {} clients x {} x (Prepare, Commit, View, Remove x2) in {:.1} s",
        args.clients,
        args.ops,
        t.elapsed().as_secs_f64()
    );
    let after = settle(pid, idle, "idle after the burst").await?;
    let t = Instant::now();
    fill(&sock, args.clients, args.snapshots, args.active).await?;
    println!(
        "fill: {} snapshots, {} active in {:.1} s",
        args.snapshots,
        args.active,
        t.elapsed().as_secs_f64()
    );
    let filled = settle(pid, idle, "idle after the fill").await?;
    println!(
        "rss_load: fresh {:.1} MiB, after the burst {:.1} MiB (anon {:.1}, file {:.1}), after the fill {:.1} MiB (anon {:.1}, file {:.1})",
        fresh.vm_rss as f64 / 1024.0,
        after.vm_rss as f64 / 1024.0,
        after.anon as f64 / 1024.0,
        after.file as f64 / 1024.0,
        filled.vm_rss as f64 / 1024.0,
        filled.anon as f64 / 1024.0,
        filled.file as f64 / 1024.0,
    );
    drop(server);
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("--serve") {
        argv.next();
        let dir = PathBuf::from(argv.next().ok_or("--serve DIR SOCK")?);
        let sock = PathBuf::from(argv.next().ok_or("--serve DIR SOCK DELAY_MS")?);
        let delay: u64 = argv.next().ok_or("--serve DIR SOCK DELAY_MS")?.parse()?;
        return serve(&dir, &sock, Duration::from_millis(delay));
    }
    let args = parse_args(argv)?;
    let parent = args.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("thinsnap-rss-bench-")
        .tempdir_in(&parent)?;
    // The client side: a runtime of its own in this process, apart from the measured one.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(drive(args, dir.path()))
}
