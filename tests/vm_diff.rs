//! Root-only tests on real dm-thin: the diff of an active snapshot that is mounted, as
//! containerd's differ takes it for `docker commit` / `nerdctl commit` of a running container
//! (rootfs.CreateDiff: Mounts of the container's snapshot, then a read-only temporary mount of
//! the answer). The kernel refuses a read-only mount of a block device that is mounted
//! read-write elsewhere (EBUSY); thinsnap answers a bind mount of where it is mounted instead.
//!
//! `#[ignore]`d on the host (no device-mapper); integration/test.sh runs them in the VM. The
//! same path through real containerd and Docker: integration/e2e/docker-guest.sh.

mod common;

use std::path::Path;

use common::*;
use containerd_snapshots::api::types::Mount;
use nix::mount::MsFlags;

fn daemon(name: &str, fs: &str) -> Daemon {
    Daemon::started(
        "vmtest",
        "tsdf",
        name,
        &format!("data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\n{fs}"),
    )
}

/// Mounts `m` on `target` as containerd does (`mount.Mount.Mount`): a bind, then for a read-only
/// one a remount of the bind read-only (MS_RDONLY is ignored by the first MS_BIND call); any
/// other type with its options as data and "ro" as the flag. Returns the kernel's error.
fn mount_as_containerd(m: &Mount, target: &Path, read_only: bool) -> nix::Result<()> {
    std::fs::create_dir_all(target).expect("mountpoint");
    let ro = read_only || m.options.iter().any(|o| o == "ro");
    let rdonly = if ro {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    if m.r#type == "bind" {
        assert!(
            m.options.iter().any(|o| o == "bind" || o == "rbind"),
            "{m:?}"
        );
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        if ro {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )?;
        }
        return Ok(());
    }
    let data: Vec<&str> = m
        .options
        .iter()
        .map(String::as_str)
        .filter(|o| *o != "ro" && *o != "rw")
        .collect();
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        Some(m.r#type.as_str()),
        rdonly,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

async fn diff_of_a_mounted_snapshot(fs: &str, fs_section: &str) {
    let d = daemon(&format!("diff-{fs}"), fs_section);
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "ctr", "").await.expect("prepare ctr");
    assert_eq!(m[0].r#type, fs);
    // The container: its root filesystem mounted read-write, a file written and not synced.
    let root = d.dir.join("rootfs");
    mount_as_containerd(&m[0], &root, false).expect("mount the container's root");
    std::fs::write(root.join("before"), b"1").expect("write before");

    // What the fix replaces: the device itself, mounted read-only while mounted read-write.
    let busy = mount_as_containerd(&m[0], &d.dir.join("direct"), true);
    assert_eq!(
        busy,
        Err(nix::errno::Errno::EBUSY),
        "a read-only mount of the device mounted read-write elsewhere"
    );

    // Mounts now: a bind of where it is mounted, read-only as the differ mounts it.
    let again = mounts(&mut c, "ctr").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].r#type, "bind", "{again:?}");
    assert_eq!(Path::new(&again[0].source), root, "{again:?}");
    let diff = d.dir.join("diff");
    mount_as_containerd(&again[0], &diff, true).expect("read-only mount for the diff");
    assert_eq!(std::fs::read(diff.join("before")).expect("read"), b"1");
    let refused = std::fs::write(diff.join("x"), b"x").expect_err("read-only");
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    // The container sees no change: still read-write, and what it writes is in the same
    // filesystem the diff reads.
    std::fs::write(root.join("after"), b"2").expect("the container still writes");
    assert_eq!(std::fs::read(diff.join("after")).expect("read"), b"2");
    umount(&diff);

    // A read-write mount of the answer (`docker cp` into a running container mounts it so)
    // writes into the container's filesystem, not into a copy that goes away.
    let cp = d.dir.join("cp");
    mount_as_containerd(&again[0], &cp, false).expect("read-write mount of the answer");
    std::fs::write(cp.join("copied"), b"3").expect("write through the bind");
    umount(&cp);
    assert_eq!(std::fs::read(root.join("copied")).expect("read"), b"3");

    // Nothing made for it: the pool and the dm devices are the store's.
    assert_eq!(d.our_dm_devices().len(), 1, "{:?}", d.our_dm_devices());
    assert_no_leak(&d, &mut a, "after the diff of a mounted snapshot").await;

    // The container stops: Mounts is the device again, and the commit after the stop has
    // every file the diff of the running container read.
    umount(&root);
    let stopped = mounts(&mut c, "ctr").await;
    assert_eq!(stopped, m);
    commit(&mut c, "layer", "ctr").await.expect("commit");
    let child = prepare(&mut c, "child", "layer").await.expect("child");
    with_mount(&d.dir, &child[0], |r| {
        for (f, want) in [("before", b"1"), ("after", b"2"), ("copied", b"3")] {
            assert_eq!(std::fs::read(r.join(f)).expect(f), want, "{f}");
        }
    });
    // A Remove works at once: nothing of the diff is left to clean up.
    remove(&mut c, "child").await.expect("remove child");
    remove(&mut c, "layer").await.expect("remove layer");
    assert_eq!(d.our_dm_devices().len(), 0, "{:?}", d.our_dm_devices());
    assert_no_leak(&d, &mut a, "after removing everything").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_diff_of_a_mounted_active_snapshot_ext4() {
    diff_of_a_mounted_snapshot("ext4", "base_size = \"128MiB\"").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_diff_of_a_mounted_active_snapshot_xfs() {
    diff_of_a_mounted_snapshot("xfs", "type = \"xfs\"\nbase_size = \"320MiB\"").await;
}

/// A removal while the bind answered for the diff is still mounted is refused as for any
/// mounted snapshot (the bind holds the filesystem), and works once it is unmounted.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_remove_after_the_diff_mount_goes_works_at_once() {
    let d = daemon("diff-remove", "base_size = \"128MiB\"");
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "ctr", "").await.expect("prepare ctr");
    let root = d.dir.join("rootfs");
    mount_as_containerd(&m[0], &root, false).expect("mount");
    let again = mounts(&mut c, "ctr").await;
    let diff = d.dir.join("diff");
    mount_as_containerd(&again[0], &diff, true).expect("diff mount");
    umount(&root);
    // Only the diff's bind holds the filesystem now.
    assert_eq!(
        code(remove(&mut c, "ctr").await),
        tonic::Code::FailedPrecondition
    );
    umount(&diff);
    remove(&mut c, "ctr").await.expect("remove at once");
    assert_eq!(d.our_dm_devices().len(), 0);
    assert_no_leak(&d, &mut a, "after the remove").await;
}
