//! The floor (benches/README.md, part f): the least device-mapper work each snapshot call needs,
//! timed directly with ioctls through the same `devicemapper` crate thinsnap uses, on a thin pool
//! of its own (made by benches/guest.sh with the same settings as the others). No store, no gRPC,
//! no locking: thinsnap's latency divided by these is its own overhead.
//!
//! Per operation, for an origin that is the (formatted, inactive) base device ("no parent") and
//! for one at the top of a chain of committed snapshots ("with parent"):
//! - prepare/view: message `create_snap NEW ORIGIN`, device create, table load, resume;
//! - commit: thin status (the usage containerd asks for) and device remove;
//! - remove of a committed snapshot: message `delete`;
//! - remove of an active snapshot: device remove and message `delete`;
//! - activate (only): device create, table load, resume of a snapshot that exists in the pool but
//!   has no device, as after a reboot (the floor of thinsnap's lazy activation on a first Mounts);
//!   its device is removed again, untimed.
//!
//!
//! Each series runs twice: with `DmOptions::default()` (udev runs every rule for the new device,
//! as it does for a disk) and, as `*_private`, with the udev flags of a private device
//! (`DmOptions::private()`: udev makes `/dev/mapper/NAME` but skips the disk rules, no `blkid`
//! probe, no `by-uuid` links, no inotify watch, and the subsystem and other rules). Where udev
//! runs, the resume and the remove wait for udev's rules (the cookie), so the two show what udev
//! costs each call.
//!
//! Usage (root, a kernel with dm-thin):
//!   dm_floor --pool NAME --ops N --chain DEPTH --base-size BYTES --out FILE.json
//! `cargo bench --bench dm_floor` passes `--bench`, which is ignored.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use devicemapper::{DevId, DmFlags, DmName, DmNameBuf, DmOptions, DM};

type BoxError = Box<dyn std::error::Error>;

const SECTOR: u64 = 512;

struct Args {
    pool: String,
    ops: usize,
    chain: u32,
    base_size: u64,
    out: String,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        pool: String::new(),
        ops: 500,
        chain: 16,
        base_size: 128 << 20,
        out: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--pool" => args.pool = val()?,
            "--ops" => args.ops = val()?.parse()?,
            "--chain" => args.chain = val()?.parse()?,
            "--base-size" => args.base_size = val()?.parse()?,
            "--out" => args.out = val()?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.pool.is_empty() || args.out.is_empty() {
        return Err(
            "usage: dm_floor --pool NAME --out FILE [--ops N] [--chain D] [--base-size BYTES]"
                .into(),
        );
    }
    Ok(args)
}

/// Nanosecond samples of one step.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    fn summary(&self) -> serde_json::Value {
        let mut v = self.0.clone();
        v.sort_unstable();
        let pct = |p: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        let sum: u64 = v.iter().sum();
        serde_json::json!({
            "n": v.len(),
            "p50_ns": pct(50.0),
            "p99_ns": pct(99.0),
            "mean_ns": if v.is_empty() { 0 } else { sum / v.len() as u64 },
            "min_ns": v.first().copied().unwrap_or(0),
            "max_ns": v.last().copied().unwrap_or(0),
        })
    }
}

struct Floor {
    dm: DM,
    pool: DmNameBuf,
    pool_dev: String,
    size_sectors: u64,
    /// Options of the ioctls that make a uevent (create, load, resume, remove).
    opts: DmOptions,
}

impl Floor {
    fn msg(&self, m: &str) -> Result<(), BoxError> {
        self.dm
            .target_msg(&DevId::Name(&self.pool), None, m)
            .map_err(|e| format!("message {m:?} to {}: {e}", &*self.pool))?;
        Ok(())
    }

    fn name(&self, id: u32) -> Result<DmNameBuf, BoxError> {
        Ok(DmNameBuf::new(format!("{}-floor-{id}", &*self.pool))?)
    }

    /// create + load + resume of thin device `id`; returns the three step times.
    fn activate(&self, id: u32) -> Result<[Duration; 3], BoxError> {
        let name = self.name(id)?;
        let t0 = Instant::now();
        self.dm
            .device_create(&name, None, self.opts)
            .map_err(|e| format!("create {}: {e}", &*name))?;
        let t1 = Instant::now();
        let table = vec![(
            0u64,
            self.size_sectors,
            "thin".to_string(),
            format!("{} {id}", self.pool_dev),
        )];
        self.dm
            .table_load(&DevId::Name(&name), &table, self.opts)
            .map_err(|e| format!("load {}: {e}", &*name))?;
        let t2 = Instant::now();
        self.dm
            .device_suspend(&DevId::Name(&name), self.opts)
            .map_err(|e| format!("resume {}: {e}", &*name))?;
        let t3 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2])
    }

    fn remove(&self, id: u32) -> Result<(), BoxError> {
        let name = self.name(id)?;
        self.dm
            .device_remove(&DevId::Name(&name), self.opts)
            .map_err(|e| format!("remove {}: {e}", &*name))?;
        Ok(())
    }

    fn status(&self, id: u32) -> Result<(), BoxError> {
        let name = self.name(id)?;
        self.dm
            .table_status(
                &DevId::Name(&name),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
            )
            .map_err(|e| format!("status {}: {e}", &*name))?;
        Ok(())
    }
}

fn node_path(name: &DmName) -> String {
    format!("/dev/mapper/{name}")
}

/// Makes the base: create_thin, activate, mkfs.ext4 (as thinsnap does once per pool), deactivate.
fn make_base(f: &Floor, id: u32) -> Result<(), BoxError> {
    f.msg(&format!("create_thin {id}"))?;
    f.activate(id)?;
    let name = f.name(id)?;
    let path = node_path(&name);
    if !Path::new(&path).exists() {
        // Without udev nobody makes the node: make it as libdevmapper would (as thinsnap's
        // ensure_node does). Where udev runs it may have made it meanwhile: EEXIST is fine.
        let info = f.dm.device_info(&DevId::Name(&name))?;
        let dev = info.device();
        match nix::sys::stat::mknod(
            Path::new(&path),
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(dev.major.into(), dev.minor.into()),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("mknod {path}: {e}").into()),
        }
    }
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        return Err(format!("mkfs.ext4 {path}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    f.remove(id)?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// One series of `ops` snapshots of `origin`, with ids from `first`.
fn series(
    f: &Floor,
    origin: u32,
    first: u32,
    ops: usize,
) -> Result<BTreeMap<String, Samples>, BoxError> {
    let mut s: BTreeMap<String, Samples> = BTreeMap::new();
    let mut add = |k: &str, d: Duration| s.entry(k.to_string()).or_default().push(d);
    let ids: Vec<u32> = (0..ops as u32).map(|i| first + i).collect();
    // Prepare: create_snap, device create, table load, resume; then commit, then delete.
    for &id in &ids {
        let t0 = Instant::now();
        f.msg(&format!("create_snap {id} {origin}"))?;
        let msg = t0.elapsed();
        let [create, load, resume] = f.activate(id)?;
        add("prepare", t0.elapsed());
        add("prepare.create_snap", msg);
        add("prepare.device_create", create);
        add("prepare.table_load", load);
        add("prepare.resume", resume);
    }
    for &id in &ids {
        let t0 = Instant::now();
        f.status(id)?;
        f.remove(id)?;
        add("commit", t0.elapsed());
    }
    // Activate only: the committed snapshots have no device now, as every snapshot after a reboot.
    for &id in &ids {
        let t0 = Instant::now();
        f.activate(id)?;
        add("activate", t0.elapsed());
        f.remove(id)?;
    }
    for &id in &ids {
        let t0 = Instant::now();
        f.msg(&format!("delete {id}"))?;
        add("remove_committed", t0.elapsed());
    }
    // Active snapshots removed while active: device remove + delete.
    for &id in &ids {
        f.msg(&format!("create_snap {id} {origin}"))?;
        f.activate(id)?;
    }
    for &id in &ids {
        let t0 = Instant::now();
        f.remove(id)?;
        f.msg(&format!("delete {id}"))?;
        add("remove_active", t0.elapsed());
    }
    Ok(s)
}

fn run(args: &Args) -> Result<serde_json::Value, BoxError> {
    let dm = DM::new()?;
    let pool = DmNameBuf::new(args.pool.clone())?;
    let info = dm.device_info(&DevId::Name(&pool))?;
    let pool_dev = info.device().to_string();
    let mut f = Floor {
        dm,
        pool,
        pool_dev,
        size_sectors: args.base_size / SECTOR,
        opts: DmOptions::default(),
    };
    let base = 1;
    make_base(&f, base)?;
    // A chain of committed (inactive) snapshots: the origin of the "with parent" series.
    let mut top = base;
    for i in 0..args.chain {
        let id = 2 + i;
        f.msg(&format!("create_snap {id} {top}"))?;
        top = id;
    }
    let t0 = Instant::now();
    let no_parent = series(&f, base, 1000, args.ops)?;
    let with_parent = series(&f, top, 1000, args.ops)?;
    let wall = t0.elapsed();
    f.opts = DmOptions::private();
    let no_parent_private = series(&f, base, 1000, args.ops)?;
    let with_parent_private = series(&f, top, 1000, args.ops)?;
    let sum = |m: &BTreeMap<String, Samples>| -> serde_json::Value {
        m.iter()
            .map(|(k, v)| (k.clone(), v.summary()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    for id in (2..2 + args.chain).rev() {
        f.msg(&format!("delete {id}"))?;
    }
    f.msg(&format!("delete {base}"))?;
    Ok(serde_json::json!({
        "pool": args.pool,
        "ops": args.ops,
        "chain": args.chain,
        "base_size_bytes": args.base_size,
        "wall_s": wall.as_secs_f64(),
        "no_parent": sum(&no_parent),
        "with_parent": sum(&with_parent),
        "no_parent_private": sum(&no_parent_private),
        "with_parent_private": sum(&with_parent_private),
        "udev_running": Path::new("/run/udev/control").exists(),
    }))
}

fn main() {
    let result = parse_args().and_then(|a| {
        let v = run(&a)?;
        std::fs::write(&a.out, serde_json::to_string_pretty(&v)?)?;
        println!("dm_floor: wrote {}", a.out);
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("dm_floor: {e}");
        std::process::exit(1);
    }
}
