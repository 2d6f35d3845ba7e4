//! The binary's behaviour that needs no device-mapper: configuration errors, a fatal error said
//! once, and the refusal to start on a kernel without device-mapper.
//!
//! The refusal tests need a kernel WITHOUT device-mapper (the host `cargo test` runs on), the
//! opposite of the VM tests (tests/vm_*.rs, `#[ignore]`d and run in the VM with `--ignored`). So
//! they are not ignored: the VM never runs them (it runs only the ignored tests), and on a
//! developer's kernel with device-mapper they say `SKIPPED:` on the terminal, past libtest's
//! output capture, and pass without asserting anything.

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Runs `thinsnap serve` on `config`; returns whether it succeeded and its stderr.
fn serve_with(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run thinsnap");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether this kernel has device-mapper. When it has, says that `test` is skipped, straight on
/// stderr: libtest's capture only takes the print macros' output, so the line shows in a plain
/// `cargo test` run.
fn skipped_on_device_mapper_kernel(test: &str) -> bool {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if !misc.contains("device-mapper") {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: this kernel has device-mapper, so the refusal cannot be observed here \
         (it runs where cargo test has no device-mapper, the VM tests where it has)"
    );
    true
}

/// A config whose root and socket are under `dir`.
fn config_under(dir: &Path) -> String {
    format!(
        "root = \"{0}/state\"\naddress = \"{0}/s.sock\"\n",
        dir.display()
    )
}

#[test]
fn invalid_config_is_refused_naming_the_key() {
    let (ok, err) = serve_with("[pool]\nblock_size = \"100KiB\"\n");
    assert!(!ok);
    assert!(err.contains("pool.block_size"), "{err}");
    let (ok, err) = serve_with("[fs]\nbase_sise = \"1GiB\"\n");
    assert!(!ok);
    assert!(err.contains("base_sise"), "{err}");
}

#[test]
fn a_fatal_error_is_said_once() {
    // Not a log line and then the same text again on stderr.
    let (ok, err) = serve_with("[pool]\nblock_size = \"100KiB\"\n");
    assert!(!ok);
    let said = err.matches("pool.block_size: 102400 bytes").count();
    assert_eq!(said, 1, "the error should be on stderr once:\n{err}");
}

/// Runs `serve` with its root and socket in a fresh directory, on a kernel without
/// device-mapper: `None` (skipped, said on stderr) on one with it; else whether it succeeded,
/// its stderr and the directory (root is `<dir>/state`).
fn serve_without_device_mapper(test: &str) -> Option<(bool, String, tempfile::TempDir)> {
    if skipped_on_device_mapper_kernel(test) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, err) = serve_with(&config_under(dir.path()));
    Some((ok, err, dir))
}

#[test]
fn serve_without_device_mapper_names_the_module() {
    let Some((ok, err, _dir)) =
        serve_without_device_mapper("serve_without_device_mapper_names_the_module")
    else {
        return;
    };
    assert!(!ok);
    assert!(err.contains("modprobe dm-thin-pool"), "{err}");
    assert_eq!(
        err.matches("modprobe dm-thin-pool").count(),
        1,
        "the refusal should be on stderr once:\n{err}"
    );
}

#[test]
fn serve_without_device_mapper_makes_no_database() {
    let Some((ok, err, dir)) =
        serve_without_device_mapper("serve_without_device_mapper_makes_no_database")
    else {
        return;
    };
    assert!(!ok);
    assert!(
        err.contains("dm-thin-pool"),
        "refused for another reason: {err}"
    );
    let root = dir.path().join("state");
    assert!(
        !root.join("db").exists(),
        "the database was created under {} before device-mapper was found missing",
        root.display()
    );
}

/// `THINSNAP_FAILPOINT` is obeyed only by a build with the `failpoints` feature (the crash
/// tests'); any other build says at start that it ignores it. (The packaged binary is checked
/// the same way by integration/deb-scripts-test.sh.)
#[test]
fn serve_says_whether_it_obeys_thinsnap_failpoint() {
    let out = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .args(["serve", "--config", "/nonexistent/thinsnap-config.toml"])
        .env("THINSNAP_FAILPOINT", "prepare:start")
        .output()
        .expect("run thinsnap");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    if cfg!(feature = "failpoints") {
        assert!(stderr.contains("failpoint armed"), "{stderr}");
    } else {
        assert!(stderr.contains("THINSNAP_FAILPOINT is ignored"), "{stderr}");
    }
}

/// `pool adopt` needs the operator to say what to do: exactly one of --keep-foreign and --reset.
#[test]
fn pool_adopt_needs_keep_foreign_or_reset() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_thinsnap"))
            .args(["pool", "adopt", "--config", "/nonexistent/config.toml"])
            .args(args)
            .output()
            .expect("run thinsnap")
    };
    for args in [&[][..], &["--keep-foreign", "--reset"][..]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: a usage error");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--keep-foreign") && err.contains("--reset"),
            "{err}"
        );
    }
}

/// A stand-in for the daemon's Admin service: a fixed status, and a grow it refuses.
struct StubAdmin;

#[tonic::async_trait]
impl thinsnap::admin::api::admin_server::Admin for StubAdmin {
    async fn status(
        &self,
        _: tonic::Request<thinsnap::admin::api::StatusRequest>,
    ) -> Result<tonic::Response<thinsnap::admin::api::StatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(thinsnap::admin::api::StatusResponse {
            pool_name: "stub-pool".into(),
            ..Default::default()
        }))
    }

    async fn inventory(
        &self,
        _: tonic::Request<thinsnap::admin::api::InventoryRequest>,
    ) -> Result<tonic::Response<thinsnap::admin::api::InventoryResponse>, tonic::Status> {
        use thinsnap::admin::api::InventoryEntry;
        let e = |kind: &str, state: &str, id: u32, device: &str, key: &str| InventoryEntry {
            kind: kind.into(),
            state: state.into(),
            has_thin_id: true,
            thin_id: id,
            device: device.into(),
            key: key.into(),
            in_pool: "yes".into(),
            ..Default::default()
        };
        Ok(tonic::Response::new(
            thinsnap::admin::api::InventoryResponse {
                pool_name: "stub-pool".into(),
                thin_ids_listed: true,
                thin_ids_error: String::new(),
                entries: vec![
                    e("active", "active", 3, "stub-pool-snap-3", "k8s.io/1/a"),
                    e("committed", "inactive", 2, "stub-pool-snap-2", "c"),
                    e("unowned", "unowned", 77, "stub-pool-snap-77", ""),
                ],
            },
        ))
    }

    async fn grow(
        &self,
        req: tonic::Request<thinsnap::admin::api::GrowRequest>,
    ) -> Result<tonic::Response<thinsnap::admin::api::StatusResponse>, tonic::Status> {
        Err(tonic::Status::invalid_argument(format!(
            "stub: data size {} refused",
            req.into_inner().data_size_bytes
        )))
    }
}

/// `thinsnap status`, `thinsnap ls` and `thinsnap pool grow` talk to the admin socket (admin.sock beside
/// `address` when `admin_address` is unset), not to containerd's socket, which here nothing
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_grow_use_the_admin_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_under(dir.path())).expect("write config");
    let listener = thinsnap::server::bind(&dir.path().join("admin.sock")).expect("bind");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(thinsnap::admin::api::admin_server::AdminServer::new(
                StubAdmin,
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let run = |args: &'static [&'static str]| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_thinsnap"))
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .expect("run thinsnap")
        })
    };
    let out = run(&["status", "--json"]).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("stub-pool"), "{stdout}");
    let out = run(&["pool", "grow", "--data-size", "1TiB"])
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("1099511627776 refused"),
        "{stderr}"
    );
    // `thinsnap ls`: the table, JSON with a filter, and the reverse lookups.
    let out = run(&["ls"]).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.starts_with("KIND") && stdout.contains("k8s.io/1/a"),
        "{stdout}"
    );
    let out = run(&["ls", "--json", "--state", "inactive"])
        .await
        .expect("join");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["entries"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["entries"][0]["key"], "c");
    let out = run(&["ls", "--device", "stub-pool-snap-3", "--json"])
        .await
        .expect("join");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["key"].as_str(), v["thin_id"].as_u64()),
        (Some("k8s.io/1/a"), Some(3))
    );
    let out = run(&["ls", "--thin-id", "77"]).await.expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("thin id 77") && stderr.contains("owned by no snapshot"),
        "{stderr}"
    );
    let out = run(&["ls", "--device", "stub-pool-snap-4711"])
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dm device stub-pool-snap-4711 not found"),
        "{stderr}"
    );
    let out = run(&["ls", "--kind", "nonsense"]).await.expect("join");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(
        !dir.path().join("s.sock").exists(),
        "nothing serves address"
    );
    stop_tx.send(()).expect("stop");
    server.await.expect("join").expect("server");
}
