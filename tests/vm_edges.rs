//! Issue 24, items 6, 7 and 8 on real dm-thin (root, device-mapper; run in the VM with
//! `--ignored`): a Remove right after the unmount of a snapshot committed while mounted (its dm
//! device's removal deferred to that unmount) does not fail on the kernel's own clean-up; the
//! audit of thin ids finds a thin device made behind the store's back after a start that skipped
//! thin_ls, reports it and leaves it alone; the store's floor (`store.min_free`) refuses Prepare
//! and View on a small root filesystem, and never Commit or Remove.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use containerd_snapshots::api::snapshots::v1::CleanupRequest;
use tonic::Code;

/// Rounds of the loops below: `THINSNAP_VM_ROUNDS`, else `default`.
fn rounds(default: usize) -> usize {
    std::env::var("THINSNAP_VM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `msg` to thin pool `pool`.
fn pool_message(pool: &str, msg: &str) {
    use devicemapper::{DevId, DmName, DM};
    let dm = DM::new().expect("dm");
    dm.target_msg(&DevId::Name(DmName::new(pool).expect("name")), None, msg)
        .unwrap_or_else(|e| panic!("message {msg:?} to {pool}: {e}"));
}

/// Item 6: Prepare, mount, Commit while mounted (the device's removal is deferred to its last
/// close), unmount, Remove at once: every Remove answers OK, many times; nothing leaks.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_remove_right_after_the_unmount_of_a_snapshot_committed_while_mounted() {
    let n = rounds(100);
    let d = Daemon::started(
        "vmtest",
        "tsvm",
        "unmount-remove",
        "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"",
    );
    let (mut c, mut a) = d.clients().await;
    let target = d.dir.join("mnt");
    for i in 0..n {
        let (key, name) = (format!("a{i}"), format!("c{i}"));
        let m = prepare(&mut c, &key, "").await.expect("prepare");
        mount(&m[0], &target);
        std::fs::write(target.join("f"), format!("{i}")).expect("write");
        commit(&mut c, &name, &key)
            .await
            .expect("commit while mounted");
        umount(&target);
        if let Err(e) = remove(&mut c, &name).await {
            panic!(
                "round {i}: Remove right after the unmount: {e:?}\n{}",
                d.log_tail(30)
            );
        }
    }
    assert_no_leak(&d, &mut a, "after the rounds").await;
    let log = d.log();
    let deferred = log
        .lines()
        .filter(|l| l.contains("removal deferred to its last close"))
        .count();
    let waited = log
        .lines()
        .filter(|l| l.contains("once the kernel had removed its dm device"))
        .count();
    assert!(deferred >= n, "{deferred} deferred removals in {n} rounds");
    eprintln!(
        "{n} rounds: {deferred} deferred removals; {waited} Remove(s) met EBUSY while the kernel \
         removed the device and waited it out"
    );
}

/// Item 7: a thin device made behind the store's back while the daemon is stopped; the next
/// start finds the store consistent and skips thin_ls; the audit after it reports the thin id
/// in status and leaves it in the pool; Cleanup audits again.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_the_audit_reports_a_thin_id_leaked_behind_a_consistent_store() {
    let mut d = Daemon::started(
        "vmtest",
        "tsvm",
        "audit",
        "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"",
    );
    let (mut c, mut a) = d.clients().await;
    prepare(&mut c, "a", "").await.expect("prepare");
    wait_audit(&mut a, 1).await;
    let st = status(&mut a).await;
    assert!(st.audit_unknown_thin_ids.is_empty(), "{st:?}");
    d.stop();
    // Not numbered with a transaction id: the store stays consistent with the pool.
    pool_message(&d.pool, "create_thin 500");
    let log_before = d.log().len();
    d.start();
    let (mut c, mut a) = d.clients().await;
    let new_log = d.log()[log_before..].to_string();
    assert!(
        new_log.contains("the pool's transaction id is the one last recorded"),
        "the start listed thin ids: it would have found the leak itself\n{new_log}"
    );
    wait_audit(&mut a, 1).await;
    let st = status(&mut a).await;
    assert_eq!(st.audit_unknown_thin_ids, vec![500], "{st:?}");
    assert!(st.audit_missing_thin_ids.is_empty(), "{st:?}");
    let meta = metadata_device(&st);
    assert!(
        kernel_thin_ids(&st.pool_name, &meta).contains(&500),
        "the audit deleted a thin id that is not provably thinsnap's"
    );
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("1 in the pool with no record, left alone (ids 500)"),
        "{text}"
    );
    c.cleanup(CleanupRequest {
        snapshotter: "thinsnap".into(),
    })
    .await
    .expect("cleanup");
    let st = status(&mut a).await;
    assert!(st.audit_runs >= 2, "Cleanup did not audit: {st:?}");
    assert_eq!(st.audit_unknown_thin_ids, vec![500]);
    // Ours to clean up by hand, as an admin would; then nothing is unknown.
    pool_message(&d.pool, "delete 500");
    c.cleanup(CleanupRequest {
        snapshotter: "thinsnap".into(),
    })
    .await
    .expect("cleanup");
    let st = status(&mut a).await;
    assert!(st.audit_unknown_thin_ids.is_empty(), "{st:?}");
    assert_no_leak(&d, &mut a, "after the leak is gone").await;
    d.stop();
}

/// Waits until the daemon has run at least `runs` audits (the start's runs in the background).
async fn wait_audit(
    a: &mut thinsnap::admin::api::admin_client::AdminClient<tonic::transport::Channel>,
    runs: u64,
) {
    let t0 = Instant::now();
    loop {
        let st = status(a).await;
        if st.audit_runs >= runs {
            assert!(st.audit_error.is_empty(), "the audit failed: {st:?}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no audit after 300 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 8: `root` on a 48 MiB tmpfs of its own (the pool's files on the test's filesystem
/// through a symlink `root/pool`), `store.min_free = 24MiB`: Prepare works while the root has
/// room; with the root filled past the floor, Prepare and View are refused with
/// RESOURCE_EXHAUSTED naming the root and the bytes, while Commit and Remove still answer OK;
/// with room again, Prepare works.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_store_floor_on_a_small_root_filesystem() {
    let mut d = Daemon::prepare_dir("vmtest", "tsvm", "store-floor");
    let root = d.dir.join("state");
    std::fs::create_dir_all(&root).expect("root");
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=48m,mode=0700"),
    )
    .expect("mount a small tmpfs as root");
    let pool_files = d.dir.join("pool-files");
    std::fs::create_dir_all(&pool_files).expect("pool files");
    std::os::unix::fs::symlink(&pool_files, root.join("pool")).expect("symlink");
    d.write_config(
        "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"\n\
         [store]\nmin_free = \"24MiB\"",
    );
    d.start();
    let (mut c, mut a) = d.clients().await;
    prepare(&mut c, "a", "").await.expect("prepare with room");
    prepare(&mut c, "b", "").await.expect("prepare with room");
    commit(&mut c, "cb", "b").await.expect("commit");

    // Fill the root past the floor: what is free is less than 24 MiB.
    let free = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
        s.blocks_available() as u64 * s.fragment_size() as u64
    };
    let filler = root.join("filler");
    let fill = free(&root).saturating_sub(8 << 20);
    std::fs::write(&filler, vec![1u8; fill as usize]).expect("fill the root");
    assert!(free(&root) < 24 << 20, "{} free", free(&root));

    let err = prepare(&mut c, "x", "").await.expect_err("under the floor");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let msg = err.message().to_string();
    assert!(
        msg.contains(&format!("root {}", root.display()))
            && msg.contains("store.min_free")
            && msg.contains(&format!("({} bytes)", 24u64 << 20)),
        "{msg}"
    );
    let err = view(&mut c, "v", "cb").await.expect_err("under the floor");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // What wins space back is never refused.
    commit(&mut c, "ca", "a")
        .await
        .expect("commit under the floor");
    remove(&mut c, "ca").await.expect("remove under the floor");
    remove(&mut c, "cb").await.expect("remove under the floor");

    std::fs::remove_file(&filler).expect("free the root");
    prepare(&mut c, "y", "")
        .await
        .expect("prepare with room again");
    assert_no_leak(&d, &mut a, "after the floor").await;
    d.shut_down();
    let _ = nix::mount::umount(&root);
}
