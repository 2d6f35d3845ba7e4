//! Root-only tests on real dm-thin: they start the `thinsnap` binary on a loop pool under a
//! temporary directory and drive it over its socket as containerd would, mounting what it returns.
//!
//! They need root and a kernel with device-mapper, so they are `#[ignore]`d: plain `cargo test`
//! lists them as ignored (this host kernel has no device-mapper), and `integration/test.sh` runs
//! them inside the VM with `--ignored`. Inside the VM a missing device-mapper is a failure, never
//! a skip. The harness (daemon, calls, mounts) is tests/common/mod.rs.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use containerd_snapshots::api::snapshots::v1::*;
use tonic::Code;

/// A started daemon on a 1GiB loop pool; `fs` is the `[fs]` section's body (default: a 128MiB
/// ext4 base).
fn daemon(name: &str, fs: &str) -> Daemon {
    let fs = if fs.is_empty() {
        "base_size = \"128MiB\""
    } else {
        fs
    };
    Daemon::started(
        "vmtest",
        "tsvm",
        name,
        &format!("data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\n{fs}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_lifecycle_on_real_dm_thin() {
    let d = daemon("life", "");
    let (mut c, mut a) = d.clients().await;

    // The daemon runs without transparent huge pages (`server::disable_huge_pages`).
    let pid = d.child.as_ref().expect("the daemon runs").id();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    assert!(
        proc_status
            .lines()
            .any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])),
        "{proc_status}"
    );

    // A parentless snapshot is an empty filesystem: no lost+found.
    let m = prepare(&mut c, "a", "").await.expect("prepare a");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "ext4");
    assert!(
        m[0].source
            .starts_with(&format!("/dev/mapper/{}-snap-", d.pool)),
        "{m:?}"
    );
    assert!(Path::new(&m[0].source).exists());
    with_mount(&d.dir, &m[0], |root| {
        let entries: Vec<_> = std::fs::read_dir(root).expect("readdir").collect();
        assert!(entries.is_empty(), "new snapshot is not empty: {entries:?}");
        std::fs::write(root.join("hello"), b"layer one").expect("write");
        std::fs::write(root.join("big"), vec![7u8; 4 << 20]).expect("write big");
    });
    let usage = c
        .usage(UsageRequest {
            snapshotter: "thinsnap".into(),
            key: "a".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert!(
        usage.size >= 4 << 20,
        "usage {} below the 4MiB written",
        usage.size
    );
    commit(&mut c, "c1", "a").await.expect("commit");
    assert!(
        !Path::new(&m[0].source).exists(),
        "committed device still active"
    );
    assert_eq!(code(prepare(&mut c, "c1", "").await), Code::AlreadyExists);

    // A child sees its parent's files, and its writes stay its own.
    let mb = prepare(&mut c, "b", "c1").await.expect("prepare b");
    with_mount(&d.dir, &mb[0], |root| {
        assert_eq!(
            std::fs::read(root.join("hello")).expect("read"),
            b"layer one"
        );
        std::fs::write(root.join("hello"), b"changed in b").expect("write");
    });
    let mv = view(&mut c, "v", "c1").await.expect("view");
    assert!(mv[0].options.contains(&"ro".to_string()), "{mv:?}");
    with_mount(&d.dir, &mv[0], |root| {
        assert_eq!(
            std::fs::read(root.join("hello")).expect("read"),
            b"layer one"
        );
        assert!(
            std::fs::write(root.join("x"), b"x").is_err(),
            "view is writable"
        );
    });

    // Status codes containerd relies on.
    assert_eq!(code(prepare(&mut c, "b", "c1").await), Code::AlreadyExists);
    assert_eq!(code(prepare(&mut c, "x", "missing").await), Code::NotFound);
    assert_eq!(
        code(prepare(&mut c, "x", "b").await),
        Code::FailedPrecondition
    );
    assert_eq!(code(prepare(&mut c, "", "").await), Code::InvalidArgument);
    assert_eq!(code(remove(&mut c, "c1").await), Code::FailedPrecondition);
    assert_eq!(
        code(commit(&mut c, "n", "v").await),
        Code::FailedPrecondition
    );
    assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);
    assert_eq!(
        code(list(&mut c, &["name==\"open"]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        list(&mut c, &["kind==committed"]).await.expect("list"),
        vec!["c1"]
    );
    assert_eq!(
        list(&mut c, &["parent==c1"]).await.expect("list"),
        vec!["b", "v"]
    );
    assert_eq!(list(&mut c, &[]).await.expect("list"), vec!["b", "c1", "v"]);

    // Removing a mounted snapshot is refused and loses nothing.
    let target = d.dir.join("busy");
    std::fs::create_dir_all(&target).expect("dir");
    nix::mount::mount(
        Some(mb[0].source.as_str()),
        &target,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount b");
    assert_eq!(code(remove(&mut c, "b").await), Code::FailedPrecondition);
    nix::mount::umount(&target).expect("umount");
    assert!(Path::new(&mb[0].source).exists());

    let st = status(&mut a).await;
    assert_eq!(
        (
            st.snapshots_active,
            st.snapshots_view,
            st.snapshots_committed
        ),
        (1, 1, 1)
    );
    assert_eq!(st.thin_ids_in_use, 4, "base + c1 + b + v");
    assert!(st.data.expect("data").used_bytes >= 4 << 20);

    // Remove everything: no device and no thin id is left but the base.
    remove(&mut c, "v").await.expect("remove v");
    remove(&mut c, "b").await.expect("remove b");
    remove(&mut c, "c1").await.expect("remove c1");
    assert!(d.our_dm_devices().is_empty(), "{:?}", d.our_dm_devices());
    let st = status(&mut a).await;
    assert_eq!(st.thin_ids_in_use, 1);
    assert_eq!(
        st.snapshots_active + st.snapshots_view + st.snapshots_committed,
        0
    );
}

/// udev's properties of the device at `path` (`udevadm info`), after udev has settled.
fn udev_properties(path: &str) -> String {
    let settle = Command::new("udevadm")
        .arg("settle")
        .status()
        .expect("udevadm settle");
    assert!(settle.success(), "udevadm settle: {settle}");
    let out = Command::new("udevadm")
        .args(["info", "--query=property", "--name", path])
        .output()
        .expect("udevadm info");
    assert!(out.status.success(), "udevadm info {path}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_thin_devices_are_private_to_udev() {
    // The VM runs udevd (virtme-ng starts it), as every node does: without it there is nothing
    // to check, and that is a failure of the test bed, not a pass.
    assert!(
        Path::new("/run/udev/control").exists(),
        "udevd is not running in this VM: this test checks what udev does with thinsnap's devices"
    );
    let d = daemon("udev", "");
    let (mut c, _a) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare a");
    // Written and unmounted: with the disk rules, udev's watch would probe it again now.
    with_mount(&d.dir, &m[0], |root| {
        std::fs::write(root.join("f"), b"data").expect("write");
    });
    let props = udev_properties(&m[0].source);
    let has = |p: &str, k: &str| p.lines().any(|l| l == k);
    // udev made /dev/mapper/NAME and knows the device as a private one: no blkid probe (no
    // filesystem type or uuid in its database, so no by-uuid link that every snapshot of the
    // base would claim), no systemd unit.
    assert!(has(&props, "DM_UDEV_DISABLE_DISK_RULES_FLAG=1"), "{props}");
    assert!(has(&props, "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1"), "{props}");
    assert!(!props.lines().any(|l| l.starts_with("ID_FS_")), "{props}");
    let name = m[0].source.trim_start_matches("/dev/mapper/");
    assert!(
        !Path::new(&format!("/dev/disk/by-id/dm-name-{name}")).exists(),
        "udev ran the disk rules on {name}"
    );
    // A Remove right after the unmount finds nobody holding the device.
    remove(&mut c, "a")
        .await
        .expect("remove a right after its unmount");
    assert!(!Path::new(&m[0].source).exists());
    // The pool itself is a disk to udev, as any device an admin looks at.
    let pool = udev_properties(&format!("/dev/mapper/{}", d.pool));
    assert!(!has(&pool, "DM_UDEV_DISABLE_DISK_RULES_FLAG=1"), "{pool}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_restart_and_reboot_keep_everything() {
    let mut d = daemon("reboot", "");
    {
        let (mut c, _) = d.clients().await;
        let m = prepare(&mut c, "a", "").await.expect("prepare");
        with_mount(&d.dir, &m[0], |root| {
            std::fs::write(root.join("f"), b"one").expect("write")
        });
        commit(&mut c, "c", "a").await.expect("commit");
        let m = prepare(&mut c, "active", "c")
            .await
            .expect("prepare active");
        with_mount(&d.dir, &m[0], |root| {
            std::fs::write(root.join("g"), b"two").expect("write")
        });
        view(&mut c, "view", "c").await.expect("view");
    }
    // A restart: devices stay, nothing is lost.
    d.stop();
    d.start();
    {
        let (mut c, _) = d.clients().await;
        assert_eq!(
            list(&mut c, &[]).await.expect("list"),
            vec!["active", "c", "view"]
        );
    }
    // A reboot: every dm device and loop device gone, files kept.
    d.stop();
    let out = d.cli(&["pool", "destroy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.our_dm_devices().is_empty());
    assert!(!Path::new("/dev/mapper").join(&d.pool).exists());
    d.start();
    let (mut c, mut a) = d.clients().await;
    assert_eq!(
        list(&mut c, &[]).await.expect("list"),
        vec!["active", "c", "view"]
    );
    let m = mounts(&mut c, "active").await;
    assert!(
        Path::new(&m[0].source).exists(),
        "active snapshot not reactivated"
    );
    with_mount(&d.dir, &m[0], |root| {
        assert_eq!(std::fs::read(root.join("f")).expect("f"), b"one");
        assert_eq!(std::fs::read(root.join("g")).expect("g"), b"two");
    });
    let st = status(&mut a).await;
    assert_eq!(st.thin_ids_in_use, 4);
    // The view's device is made by the first call that needs it (lazy activation).
    assert_eq!(st.snapshots_inactive, 1, "the view awaits activation");
    let mv = mounts(&mut c, "view").await;
    assert!(Path::new(&mv[0].source).exists(), "view not activated");
    assert_eq!(
        d.our_dm_devices().len(),
        2,
        "active + view: {:?}",
        d.our_dm_devices()
    );
    // The interrupted key can be prepared again after everything is removed.
    for k in ["view", "active", "c"] {
        remove(&mut c, k).await.expect("remove");
    }
    prepare(&mut c, "a", "").await.expect("prepare again");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_concurrent_prepares_of_one_key_have_one_winner() {
    let d = daemon("race", "");
    let (c, mut a) = d.clients().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            prepare(&mut c, "same", "").await.map(|_| ())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::AlreadyExists, "{s}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(status(&mut a).await.thin_ids_in_use, 2);
    assert_eq!(d.our_dm_devices().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_xfs_snapshots_mount_with_nouuid() {
    let d = daemon("xfs", "type = \"xfs\"\nbase_size = \"320MiB\"");
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    assert_eq!(m[0].r#type, "xfs");
    assert!(m[0].options.contains(&"nouuid".to_string()));
    with_mount(&d.dir, &m[0], |root| {
        std::fs::write(root.join("f"), b"x").expect("write")
    });
    commit(&mut c, "c", "a").await.expect("commit");
    let m1 = prepare(&mut c, "b1", "c").await.expect("b1");
    let m2 = prepare(&mut c, "b2", "c").await.expect("b2");
    // Two snapshots of one filesystem mounted at once: only possible with nouuid.
    with_mount(&d.dir, &m1[0], |r1| {
        with_mount(&d.dir, &m2[0], |r2| {
            assert_eq!(std::fs::read(r1.join("f")).expect("f1"), b"x");
            assert_eq!(std::fs::read(r2.join("f")).expect("f2"), b"x");
        })
    });
}

#[test]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
fn vm_live_socket_is_refused_and_stale_one_replaced() {
    let mut d = daemon("sock", "");
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&d.config)
        .output()
        .expect("second serve");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    for sock in [d.sock(), d.admin_sock()] {
        let meta = std::fs::metadata(&sock).expect("socket");
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            sock.display()
        );
    }
    // Kill -9 leaves a stale socket file; the next start replaces it.
    if let Some(mut c) = d.child.take() {
        c.kill().expect("kill");
        c.wait().expect("wait");
    }
    assert!(d.sock().exists());
    d.start();
    d.stop();
}
