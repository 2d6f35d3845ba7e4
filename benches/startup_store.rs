//! Start-up, thinsnap's own share (benches/README.md, part d'): how long opening the sled store
//! and running recovery take with 10,000 snapshots (1,000 of them active) on the host's real CPU,
//! with the kernel taken out of the measurement. The VM phase `startup` measures the whole start
//! on real dm-thin, but under software emulation and, there, with fewer snapshots (filling the
//! store through the kernel runs at a few calls a second in the emulated VM).
//!
//! The pool here is the in-memory fake of the unit tests (`thinsnap::pool::fake`): its calls cost
//! nothing, so what is timed is exactly what thinsnap adds to a start on top of the kernel's
//! ioctls (a restart where the devices are still active does two of those: list devices and the
//! pool's status). The product never runs on the fake; this only splits the cost.
//!
//! Usage (no root needed):
//!   cargo bench --bench startup_store -- [--snapshots N] [--active N] [--restarts N] [--dir DIR]
//! The store lives in DIR (default /dev/shm when it exists, as the VM phases keep theirs on
//! tmpfs; pass a directory on a disk to include real fsyncs in the fill).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use thinsnap::config::FsConfig;
use thinsnap::engine::{self, Engine, Settings};
use thinsnap::fs::FsError;
use thinsnap::pool::fake::FakePool;
use thinsnap::pool::ThinPool;
use thinsnap::store::Kind;

type BoxError = Box<dyn std::error::Error>;

struct Args {
    snapshots: usize,
    active: usize,
    restarts: usize,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        snapshots: 10_000,
        active: 1_000,
        restarts: 5,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--snapshots" => args.snapshots = value()?.parse()?,
            "--active" => args.active = value()?.parse()?,
            "--restarts" => args.restarts = value()?.parse()?,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            // `cargo bench` passes --bench
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.active == 0 || args.active > args.snapshots {
        return Err("--active must be between 1 and --snapshots".into());
    }
    Ok(args)
}

fn no_format(_: &Path) -> Result<(), FsError> {
    Ok(())
}

/// What the daemon's start does besides the kernel's work (`thinsnap::engine::start`, as
/// `thinsnap serve` runs it): open the store, read its records and check them settled, then
/// recovery from those records.
fn start(
    rt: &tokio::runtime::Runtime,
    db: &Path,
    pool: Arc<FakePool>,
) -> Result<Arc<Engine>, BoxError> {
    rt.block_on(async {
        let (handle, starting) = engine::start(
            db,
            move || Ok(pool as Arc<dyn ThinPool>),
            Settings::with_fs(FsConfig::default()),
            no_format,
        )
        .await?;
        if let Some(task) = starting {
            task.await??;
        }
        Ok(handle.engine().await?)
    })
}

/// `active` chains, each of committed layers with an active snapshot on top, `snapshots` in all:
/// the shape of the VM phase (and of a node: images' layers, a container on each).
async fn fill(engine: Arc<Engine>, snapshots: usize, active: usize) -> Result<(), BoxError> {
    let per_chain = snapshots / active;
    let mut tasks = Vec::new();
    // 8 clients, as in the VM phase; sled coalesces their flushes.
    for client in 0..8 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut chain = client;
            while chain < active {
                let mut parent = String::new();
                for layer in 0..per_chain - 1 {
                    let key = format!("c{chain}-l{layer}-active");
                    let name = format!("c{chain}-l{layer}");
                    engine
                        .create(Kind::Active, &key, &parent, BTreeMap::new())
                        .await?;
                    engine.commit(&name, &key, BTreeMap::new()).await?;
                    parent = name;
                }
                engine
                    .create(
                        Kind::Active,
                        &format!("c{chain}-container"),
                        &parent,
                        BTreeMap::new(),
                    )
                    .await?;
                chain += 8;
            }
            Ok::<_, thinsnap::engine::EngineError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let parent = args.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("thinsnap-startup-bench-")
        .tempdir_in(&parent)?;
    let db = dir.path().join("db");
    let pool = Arc::new(FakePool::new());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;

    let t = Instant::now();
    let engine = start(&rt, &db, pool.clone())?;
    rt.block_on(fill(engine.clone(), args.snapshots, args.active))?;
    let status = rt.block_on(engine.status())?;
    let filled = t.elapsed();
    let total = status.active + status.views + status.committed;
    println!(
        "filled {total} snapshots ({} active, {} committed) in {:.1} s",
        status.active,
        status.committed,
        filled.as_secs_f64()
    );
    drop(engine);

    let mut times = Vec::new();
    for i in 0..args.restarts {
        let t = Instant::now();
        let engine = start(&rt, &db, pool.clone())?;
        let took = t.elapsed();
        let status = rt.block_on(engine.status())?;
        let seen = status.active + status.views + status.committed;
        if seen != total {
            return Err(format!("restart {i} sees {seen} snapshots, not {total}").into());
        }
        println!(
            "restart {i}: store open + recovery {:.1} ms ({seen} snapshots)",
            took.as_secs_f64() * 1000.0
        );
        times.push(took.as_secs_f64() * 1000.0);
        drop(engine);
    }
    times.sort_by(f64::total_cmp);
    if let Some(median) = times.get(times.len() / 2) {
        println!(
            "startup_store: {} snapshots, {} active: median {median:.1} ms over {} restarts (store in {})",
            args.snapshots,
            args.active,
            times.len(),
            parent.display()
        );
    }
    Ok(())
}
