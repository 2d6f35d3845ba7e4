//! The harness the root-only VM tests share (tests/vm_dm.rs, vm_crash.rs, vm_lvm.rs,
//! vm_pool_ops.rs): a `thinsnap serve` process on a config of the test's own under
//! `/tmp/thinsnap-<kind>-<name>-<pid>` ([`Daemon`]), the containerd Snapshots and admin gRPC calls
//! the tests make, and mounting what thinsnap returns.
//!
//! It holds no test and asserts nothing about thinsnap's behaviour beyond "it started", "it
//! stopped cleanly" and "the call answered" where a helper says so; the tests own their
//! assertions. It needs root and device-mapper ([`require_dm`]): it is only used by tests that are
//! `#[ignore]`d on the host and run in the VM with `--ignored`, where a missing device-mapper is a
//! failure, never a skip.

// Each test file uses part of the harness; what one leaves unused is not dead.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::api::types::Mount;
use thinsnap::admin::api::admin_client::AdminClient;
use thinsnap::admin::api::{StatusRequest, StatusResponse};
use tonic::transport::Channel;
use tonic::Code;

/// How long a start may take: lvm2 and mkfs under software emulation are slow.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// The binary under test: `THINSNAP_BIN` if set (integration/test.sh sets it to the one it
/// built), else cargo's.
pub fn bin() -> String {
    std::env::var("THINSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_thinsnap").to_string())
}

/// Fails the test unless it runs as root on a kernel with device-mapper.
pub fn require_dm() {
    assert!(
        Path::new("/dev/mapper/control").exists(),
        "device-mapper is missing: these tests must run in the VM (modprobe dm-thin-pool)"
    );
    assert!(nix::unistd::geteuid().is_root(), "these tests need root");
}

/// A `thinsnap serve` on a config of its own. Dropping it kills the process, destroys the pool
/// with its files (`pool destroy --remove-files`) and removes the test directory; the daemon's
/// log is printed to the test's captured output (shown when the test fails).
pub struct Daemon {
    /// The test's directory: config, socket, log, `state/` (the configured `root`), mountpoints.
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `pool.name`: the prefix of thinsnap's dm device names.
    pub pool: String,
    pub child: Option<Child>,
    /// Environment variables every later spawn of `thinsnap serve` gets (a PATH without a tool).
    pub env: Vec<(String, String)>,
    /// Set once the process is gone and the pool destroyed ([`Daemon::shut_down`]).
    shut_down: bool,
}

/// Whether the daemon whose admin socket is `sock` has started: it answers the admin Status call (which waits for
/// the start to end) within `within`. False if nothing listens, the start failed or is still
/// running. On a thread of its own, so that sync tests and tokio tests alike can call it.
fn answers_status(sock: &Path, within: Duration) -> bool {
    if std::os::unix::net::UnixStream::connect(sock).is_err() {
        return false;
    }
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let call = async {
                let ch = thinsnap::server::connect(&sock).await.ok()?;
                AdminClient::new(ch)
                    .status(StatusRequest::default())
                    .await
                    .ok()
            };
            matches!(tokio::time::timeout(within, call).await, Ok(Some(_)))
        })
    })
    .join()
    .unwrap_or(false)
}

impl Daemon {
    /// A fresh (emptied) directory `/tmp/thinsnap-<kind>-<name>-<pid>` and a pool named
    /// `<pool_prefix>-<name>-<pid>`; writes no config and starts nothing.
    pub fn prepare_dir(kind: &str, pool_prefix: &str, name: &str) -> Daemon {
        require_dm();
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/thinsnap-{kind}-{name}-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        Daemon {
            config: dir.join("config.toml"),
            dir,
            pool: format!("{pool_prefix}-{name}-{pid}"),
            child: None,
            env: Vec::new(),
            shut_down: false,
        }
    }

    /// [`Daemon::prepare_dir`], [`Daemon::write_config`] with `sections`, then
    /// [`Daemon::start`].
    pub fn started(kind: &str, pool_prefix: &str, name: &str, sections: &str) -> Daemon {
        let mut d = Daemon::prepare_dir(kind, pool_prefix, name);
        d.write_config(sections);
        d.start();
        d
    }

    /// Writes the config: `root` and `address` in the test directory, `[pool] name`, then
    /// `sections`, which go on inside `[pool]` until they open a table of their own. Warm spares
    /// (on by default) are turned off (`[spares] count = 0`) unless `sections` has a `[spares]`
    /// table (an empty one: the default count): the tests about something else count devices and
    /// thin ids, and the spares' own tests say how many they want.
    pub fn write_config(&self, sections: &str) {
        let spares = if sections.contains("[spares]") {
            ""
        } else {
            "[spares]\ncount = 0\n"
        };
        std::fs::write(
            &self.config,
            format!(
                "root = \"{root}\"\naddress = \"{sock}\"\n[pool]\nname = \"{pool}\"\n{sections}\n{spares}",
                root = self.dir.join("state").display(),
                sock = self.sock().display(),
                pool = self.pool,
            ),
        )
        .expect("config");
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join("thinsnap.sock")
    }

    /// The admin socket: `admin_address` is unset, so admin.sock beside [`Daemon::sock`].
    pub fn admin_sock(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("thinsnap.log")
    }

    /// What thinsnap logged (stderr of every start, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of [`Daemon::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Spawns `thinsnap serve`, its stderr appended to the log, with `THINSNAP_FAILPOINT` set
    /// to `failpoint` if given; does not wait.
    pub fn spawn(&self, failpoint: Option<&str>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .stderr(log)
            .stdout(Stdio::null());
        if let Some(fp) = failpoint {
            cmd.env("THINSNAP_FAILPOINT", fp);
        }
        #[cfg(not(feature = "failpoints"))]
        if failpoint.is_some()
            || self
                .env
                .iter()
                .any(|(k, _)| k == "THINSNAP_FAILPOINT" || k == "THINSNAP_STALL")
        {
            panic!(
                "this test arms a failpoint: build it with `cargo test --features failpoints` \
                 (integration/test.sh does)"
            );
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.spawn().expect("spawn thinsnap")
    }

    /// Starts thinsnap and waits until it serves.
    pub fn start(&mut self) {
        self.start_with(None);
    }

    /// Starts thinsnap with `failpoint` (see [`Daemon::spawn`]) and waits until it has started
    /// (answers the admin Status call, which waits for recovery: the socket may answer reads
    /// before); fails the test if it exits first or takes over 600s.
    pub fn start_with(&mut self, failpoint: Option<&str>) {
        self.child = Some(self.spawn(failpoint));
        let t0 = Instant::now();
        while !answers_status(&self.admin_sock(), Duration::from_secs(5)) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("thinsnap exited with {st}: {}", self.log());
            }
            assert!(t0.elapsed() < START_TIMEOUT, "no socket: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `serve`, which must give up: returns its exit status and what it logged (the log is
    /// emptied first). Fails the test if it starts instead (its socket may answer reads for a
    /// moment while the pool is made: that is not a start).
    pub fn serve_until_exit(&self) -> (ExitStatus, String) {
        let _ = std::fs::remove_file(self.log_path());
        let mut child = self.spawn(None);
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return (st, self.log());
            }
            if t0.elapsed() > START_TIMEOUT
                || answers_status(&self.admin_sock(), Duration::from_secs(2))
            {
                let _ = child.kill();
                let _ = child.wait();
                panic!("thinsnap did not refuse to start: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops thinsnap with SIGTERM; fails the test unless it exits with success.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM");
            let st = c.wait().expect("wait");
            assert!(st.success(), "thinsnap exited with {st}: {}", self.log());
        }
    }

    /// Kills thinsnap with SIGKILL (a crash), if it runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for thinsnap to die of SIGKILL (a failpoint), failing the test if it exits
    /// otherwise or is still alive after 60s.
    pub fn expect_killed(&mut self, what: &str) {
        let mut c = self.child.take().expect("running");
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    st.signal(),
                    Some(9),
                    "{what}: exited with {st}, not SIGKILL: {}",
                    self.log_tail(40)
                );
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what}: failpoint never hit: {}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `thinsnap ARGS --config CONFIG` to its end.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run thinsnap")
    }

    /// Clients of both services, each on its own socket.
    pub async fn clients(&self) -> (SnapshotsClient<Channel>, AdminClient<Channel>) {
        let ch = thinsnap::server::connect(&self.sock())
            .await
            .expect("connect");
        let admin = thinsnap::server::connect(&self.admin_sock())
            .await
            .expect("connect to the admin socket");
        (SnapshotsClient::new(ch), AdminClient::new(admin))
    }

    /// The active dm devices of this daemon's snapshots (`<pool>-snap-*`).
    pub fn our_dm_devices(&self) -> Vec<String> {
        let prefix = format!("{}-snap-", self.pool);
        std::fs::read_dir("/dev/mapper")
            .expect("/dev/mapper")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// Kills thinsnap, prints its log to the captured output and destroys the pool with its
    /// files; once only (later calls, and the drop, do nothing more). The test directory and
    /// config stay until the drop, for cleanup that needs them after this (lvm's teardown).
    pub fn shut_down(&mut self) {
        if std::mem::replace(&mut self.shut_down, true) {
            return;
        }
        self.kill9();
        eprintln!("---- thinsnap log of {}:\n{}", self.pool, self.log());
        let out = self.cli(&["pool", "destroy", "--remove-files"]);
        if !out.status.success() {
            eprintln!(
                "pool destroy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shut_down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prepare `key` on `parent` with `labels`.
pub async fn prepare_labelled(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    labels: &[(&str, &str)],
) -> Result<Vec<Mount>, tonic::Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Prepare `key` on `parent` (`""`: none), without labels.
pub async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<Mount>, tonic::Status> {
    prepare_labelled(c, key, parent, &[]).await
}

/// View `key` of `parent`, without labels.
pub async fn view(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<Mount>, tonic::Status> {
    c.view(ViewSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// Commit active `key` as `name`, without labels.
pub async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
) -> Result<(), tonic::Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "thinsnap".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|_| ())
}

pub async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

/// The mounts of `key`; fails the test if the call fails.
pub async fn mounts(c: &mut SnapshotsClient<Channel>, key: &str) -> Vec<Mount> {
    c.mounts(MountsRequest {
        snapshotter: "thinsnap".into(),
        key: key.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("mounts {key}: {e}"))
    .into_inner()
    .mounts
}

/// Every snapshot `filters` select, as (name, kind), sorted by name.
pub async fn list_kinds(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<BTreeMap<String, i32>, tonic::Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "thinsnap".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = BTreeMap::new();
    while let Some(resp) = stream.message().await? {
        out.extend(resp.info.into_iter().map(|i| (i.name, i.kind)));
    }
    Ok(out)
}

/// The names of the snapshots `filters` select, sorted.
pub async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<String>, tonic::Status> {
    Ok(list_kinds(c, filters).await?.into_keys().collect())
}

/// The admin status (without the list of thin ids); fails the test if the call fails.
pub async fn status(a: &mut AdminClient<Channel>) -> StatusResponse {
    status_of(a, false).await
}

/// The admin status with the store's list of thin ids; fails the test if the call fails.
pub async fn status_with_thin_ids(a: &mut AdminClient<Channel>) -> StatusResponse {
    status_of(a, true).await
}

async fn status_of(a: &mut AdminClient<Channel>, list_thin_ids: bool) -> StatusResponse {
    a.status(StatusRequest { list_thin_ids })
        .await
        .expect("status")
        .into_inner()
}

/// The status code of a call that must fail.
pub fn code(r: Result<impl std::fmt::Debug, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Mounts `m` on `target` (made if missing): "ro" as the read-only flag, the other options as
/// the filesystem's data.
pub fn mount(m: &Mount, target: &Path) {
    std::fs::create_dir_all(target).expect("mountpoint");
    let mut flags = nix::mount::MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        if o == "ro" {
            flags |= nix::mount::MsFlags::MS_RDONLY;
        } else {
            data.push(o.as_str());
        }
    }
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        Some(m.r#type.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
}

pub fn umount(target: &Path) {
    nix::mount::umount(target).expect("umount");
}

/// Mounts `m` on a fresh directory under `dir`, runs `f` on it, unmounts.
pub fn with_mount<T>(dir: &Path, m: &Mount, f: impl FnOnce(&Path) -> T) -> T {
    let target = dir.join(format!(
        "mnt-{}",
        m.source.rsplit('-').next().unwrap_or("x")
    ));
    mount(m, &target);
    let out = f(&target);
    umount(&target);
    out
}

/// Writes `content` to `name` in the filesystem of `m`, synced before the unmount.
pub fn write_file(dir: &Path, m: &Mount, name: &str, content: &str) {
    with_mount(dir, m, |root| {
        std::fs::write(root.join(name), content).expect("write");
        nix::unistd::sync();
    });
}

/// The thin ids in the pool's metadata, read with thin_ls from a metadata snapshot.
/// The loop device holding the pool's metadata, from a loop pool's status.
///
/// Panics if the status lists none (not a loop pool).
pub fn metadata_device(st: &StatusResponse) -> String {
    st.loop_files
        .iter()
        .find(|l| l.role == "metadata")
        .expect("metadata loop device")
        .device
        .clone()
}

pub fn kernel_thin_ids(pool: &str, meta_dev: &str) -> std::collections::BTreeSet<u32> {
    use devicemapper::{DevId, DmName, DM};
    let dm = DM::new().expect("dm");
    let name = DmName::new(pool).expect("name");
    // The daemon's own audit of thin ids (after a start, at Cleanup) may hold the one metadata
    // snapshot for as long as its thin_ls runs: EBUSY until it releases it.
    let t0 = Instant::now();
    while let Err(e) = dm.target_msg(&DevId::Name(name), None, "reserve_metadata_snap") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "reserve_metadata_snap: {e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("thin_ls")
        .args(["--no-headers", "-m", "-o", "DEV", meta_dev])
        .output();
    let _ = dm.target_msg(&DevId::Name(name), None, "release_metadata_snap");
    let out = out.expect("run thin_ls");
    assert!(
        out.status.success(),
        "thin_ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|t| t.parse().expect("thin id"))
        .collect()
}

/// Nothing leaked: the pool's thin ids are the store's, and the active dm devices with our
/// prefix are those of active snapshots and views (but those awaiting activation) and of ready
/// warm spares. With spares on, checked between two rounds of the refiller (it makes and deletes
/// devices in the background): a check that a round overlapped is made again.
pub async fn assert_no_leak(d: &Daemon, a: &mut AdminClient<Channel>, what: &str) {
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < START_TIMEOUT,
            "{what}: the spares' refiller never idles\n{}",
            d.log_tail(40)
        );
        let st = status_with_thin_ids(a).await;
        if st.spares_refilling {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let meta = metadata_device(&st);
        let store: std::collections::BTreeSet<u32> = st.thin_ids.iter().copied().collect();
        let kernel = kernel_thin_ids(&st.pool_name, &meta);
        let active = d.our_dm_devices().len() as u64;
        let after = status(a).await;
        if after.spares_refilling || after.spares_rounds != st.spares_rounds {
            continue;
        }
        assert_eq!(
            kernel,
            store,
            "{what}: pool thin ids != store thin ids\n{}",
            d.log_tail(40)
        );
        // Every active dm device with our prefix belongs to an active snapshot or view, or is
        // a ready spare, and every active snapshot or view has one, but those still awaiting
        // activation (after a reboot).
        assert_eq!(
            active,
            st.snapshots_active + st.snapshots_view - st.snapshots_inactive + st.spares_ready,
            "{what}: active dm devices != active snapshots + views - awaiting activation + spares"
        );
        return;
    }
}

/// Waits until at least `n` warm spares are ready and the refiller is idle.
pub async fn wait_spares(d: &Daemon, a: &mut AdminClient<Channel>, n: u64) {
    let t0 = Instant::now();
    loop {
        let st = status(a).await;
        if st.spares_ready >= n && !st.spares_refilling {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of {n} spares ready after 120s\n{}",
            st.spares_ready,
            d.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
