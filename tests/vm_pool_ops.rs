//! Operating the pool on real dm-thin (root + device-mapper; run in the VM by
//! integration/test.sh with `--ignored`): the free-space floor on a pool filled by writes, online
//! growth, discard on remove, asynchronous removal of a busy device, the size label.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use thinsnap::admin::api::StatusResponse;
use tonic::Code;

/// A started daemon; `pool` goes on in `[pool]` (and may open `[pool.autogrow]` and `[fs]`),
/// `extra` holds other sections.
fn daemon(name: &str, pool: &str, extra: &str) -> Daemon {
    Daemon::started("ops", "tsops", name, &format!("{pool}\n{extra}"))
}

/// Writes `mib` MiB of incompressible-enough data (dm-thin does not compress; any data maps blocks).
fn fill(path: &Path, mib: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        block[0] = i as u8;
        f.write_all(&block)?;
    }
    f.sync_all()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_full_pool_refuses_prepare_and_remove_wins_space_back() {
    // 96MiB of data, a 20% floor: after ~66MiB of writes (plus the filesystem's own) Prepare
    // must be refused.
    let d = daemon(
        "full",
        "data_size = \"96MiB\"\nmetadata_size = \"8MiB\"\nmin_free_space = \"20%\"\n[fs]\nbase_size = \"256MiB\"",
        "",
    );
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "filler", "").await.expect("prepare");
    let keep = prepare(&mut c, "keep", "").await.expect("prepare keep");
    let mk = d.dir.join("keep");
    mount(&keep[0], &mk);
    std::fs::write(mk.join("precious"), b"must survive").expect("write");
    umount(&mk);
    let target = d.dir.join("filler");
    mount(&m[0], &target);
    fill(&target.join("blob"), 66).expect("fill 66MiB");
    umount(&target);
    let st = status(&mut a).await;
    let data = st.data.expect("data");
    assert!(
        data.used_bytes * 100 / data.total_bytes > 75,
        "pool not full enough: {data:?}"
    );
    let err = prepare(&mut c, "refused", "")
        .await
        .expect_err("must be refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("free") && err.message().contains("20%"),
        "{}",
        err.message()
    );
    assert_eq!(
        status(&mut a).await.snapshots_active,
        2,
        "nothing half made"
    );
    // Remove frees the space; Prepare works again; nothing else was harmed.
    remove(&mut c, "filler")
        .await
        .expect("remove works on a full pool");
    prepare(&mut c, "again", "")
        .await
        .expect("prepare works again");
    let keep = mounts(&mut c, "keep").await;
    mount(&keep[0], &mk);
    assert_eq!(
        std::fs::read(mk.join("precious")).expect("read"),
        b"must survive"
    );
    umount(&mk);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_grow_loop_pool_online_with_a_mounted_snapshot() {
    let d = daemon(
        "grow",
        "data_size = \"256MiB\"\nmetadata_size = \"8MiB\"\n[fs]\nbase_size = \"128MiB\"",
        "",
    );
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "busy", "").await.expect("prepare");
    let target = d.dir.join("busy");
    mount(&m[0], &target);
    std::fs::write(target.join("before"), b"x").expect("write");
    let out = d.cli(&[
        "pool",
        "grow",
        "--data-size",
        "512MiB",
        "--metadata-size",
        "16MiB",
    ]);
    assert!(
        out.status.success(),
        "grow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status(&mut a).await;
    assert_eq!(st.data.expect("data").total_bytes, 512 << 20);
    assert_eq!(st.metadata.expect("meta").total_bytes, 16 << 20);
    // The mounted container went on working through the reload.
    std::fs::write(target.join("after"), b"y").expect("write after grow");
    umount(&target);
    let out = d.cli(&["pool", "grow", "--data-size", "128MiB"]);
    assert!(!out.status.success(), "shrinking was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller"));
    prepare(&mut c, "new", "")
        .await
        .expect("prepare after grow");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_discard_on_remove_gives_space_back_to_the_host() {
    let d = daemon(
        "discard",
        "data_size = \"512MiB\"\nmetadata_size = \"16MiB\"\n[fs]\nbase_size = \"256MiB\"",
        "[remove]\ndiscard = true",
    );
    let (mut c, mut a) = d.clients().await;
    let data_file = d.dir.join("state/pool/data");
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&data_file).expect("data file").blocks() * 512
    };
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    let target = d.dir.join("a");
    mount(&m[0], &target);
    fill(&target.join("blob"), 32).expect("fill");
    umount(&target);
    let used_before = status(&mut a).await.data.expect("data").used_bytes;
    let file_before = allocated();
    remove(&mut c, "a").await.expect("remove");
    let used_after = status(&mut a).await.data.expect("data").used_bytes;
    let file_after = allocated();
    assert!(
        used_before - used_after >= 28 << 20,
        "pool: {used_before} -> {used_after}"
    );
    assert!(
        file_before - file_after >= 28 << 20,
        "host file kept its blocks: {file_before} -> {file_after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_async_remove_of_a_mounted_snapshot_never_blocks() {
    let d = daemon(
        "async",
        "data_size = \"512MiB\"\nmetadata_size = \"16MiB\"\n[fs]\nbase_size = \"128MiB\"",
        "[remove]\nasync = true",
    );
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    let target = d.dir.join("a");
    mount(&m[0], &target);
    remove(&mut c, "a")
        .await
        .expect("async remove answers while mounted");
    assert_eq!(status(&mut a).await.snapshots_active, 0);
    assert!(Path::new(&m[0].source).exists(), "mounted device vanished");
    umount(&target);
    let t0 = Instant::now();
    while status(&mut a).await.thin_ids_in_use != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "reaper never deleted the device"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!Path::new(&m[0].source).exists());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_size_label_grows_the_filesystem() {
    let d = daemon(
        "size",
        "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"\n[fs]\nbase_size = \"128MiB\"",
        "",
    );
    let (mut c, _) = d.clients().await;
    let label = "containerd.io/snapshot/thinsnap.size";
    let m = prepare_labelled(&mut c, "big", "", &[(label, "512MiB")])
        .await
        .expect("prepare big");
    let target = d.dir.join("big");
    mount(&m[0], &target);
    let entries = std::fs::read_dir(&target).expect("readdir").count();
    let st = nix::sys::statvfs::statvfs(&target).expect("statvfs");
    let size = st.blocks() as u64 * st.fragment_size() as u64;
    umount(&target);
    assert!(
        size > 400 << 20,
        "filesystem is {size} bytes, not grown to ~512MiB"
    );
    assert_eq!(
        entries, 0,
        "the grown snapshot is not empty (lost+found back?)"
    );
    let err = prepare_labelled(&mut c, "small", "", &[(label, "64MiB")])
        .await
        .expect_err("smaller");
    assert_eq!(err.code(), Code::InvalidArgument);

    // containerd's standard label, in decimal bytes, through the Snapshots API: the same growth.
    let max = "containerd.io/snapshot/max-size";
    let m = prepare_labelled(&mut c, "max", "", &[(max, &(384u64 << 20).to_string())])
        .await
        .expect("prepare with max-size");
    let size = fs_size(&d, &m[0], "max");
    assert!(
        size > 300 << 20 && size <= 384 << 20,
        "filesystem is {size} bytes, not ~384MiB"
    );
    // Both: thinsnap's own label wins.
    let both = [
        (label, "256MiB"),
        (max, &(384u64 << 20).to_string() as &str),
    ];
    let m = prepare_labelled(&mut c, "both", "", &both)
        .await
        .expect("prepare with both labels");
    let size = fs_size(&d, &m[0], "both");
    assert!(
        size > 200 << 20 && size <= 256 << 20,
        "filesystem is {size} bytes, not ~256MiB (thinsnap.size wins)"
    );
    // Units are not containerd's format: refused, naming the label.
    let err = prepare_labelled(&mut c, "units", "", &[(max, "384MiB")])
        .await
        .expect_err("units");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(max), "{}", err.message());
}

/// The size of the filesystem on a snapshot's device, mounted for the moment.
fn fs_size(d: &Daemon, m: &containerd_snapshots::api::types::Mount, name: &str) -> u64 {
    let target = d.dir.join(name);
    mount(m, &target);
    let st = nix::sys::statvfs::statvfs(&target).expect("statvfs");
    umount(&target);
    st.blocks() as u64 * st.fragment_size() as u64
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_a_raised_base_size_reaches_new_images_only() {
    const POOL: &str = "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"";
    let mut d = daemon("basesize", POOL, "[fs]\nbase_size = \"96MiB\"");
    {
        let (mut c, _) = d.clients().await;
        let m = prepare(&mut c, "old-layer-a", "").await.expect("prepare");
        write_file(&d.dir, &m[0], "f", "old");
        commit(&mut c, "old-layer", "old-layer-a")
            .await
            .expect("commit");
    }
    d.stop();
    // Docker's dm.basesize raised: thinsnap restarted with a larger fs.base_size.
    d.write_config(&format!("{POOL}\n[fs]\nbase_size = \"192MiB\""));
    d.start();
    let (mut c, mut a) = d.clients().await;
    let st = status(&mut a).await;
    assert_eq!(
        st.base_size_bytes,
        96 << 20,
        "the base device is not rewritten"
    );
    assert_eq!(st.new_image_size_bytes, 192 << 20);
    // A new image's first layer, and a container on it, get the new size.
    let m = prepare(&mut c, "new-layer-a", "")
        .await
        .expect("prepare new");
    let new_fs = fs_size(&d, &m[0], "new");
    assert!(
        new_fs > 160 << 20,
        "new image's filesystem is {new_fs} bytes, not ~192MiB"
    );
    commit(&mut c, "new-layer", "new-layer-a")
        .await
        .expect("commit new");
    let m = prepare(&mut c, "new-ctr", "new-layer")
        .await
        .expect("container on new");
    let ctr_fs = fs_size(&d, &m[0], "newctr");
    assert!(
        ctr_fs > 160 << 20,
        "new image's container is {ctr_fs} bytes"
    );
    // An existing image keeps its size, and its data.
    let m = prepare(&mut c, "old-ctr", "old-layer")
        .await
        .expect("container on old");
    let old_fs = fs_size(&d, &m[0], "oldctr");
    assert!(
        old_fs < 100 << 20,
        "an old image's container is {old_fs} bytes: it grew"
    );
    with_mount(&d.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("f")).expect("read"),
            "old"
        )
    });
    // A smaller fs.base_size shrinks nothing: new images keep the base's size.
    d.stop();
    d.write_config(&format!("{POOL}\n[fs]\nbase_size = \"64MiB\""));
    d.start();
    let (mut c, mut a) = d.clients().await;
    let st = status(&mut a).await;
    assert_eq!(
        (st.base_size_bytes, st.new_image_size_bytes),
        (96 << 20, 96 << 20)
    );
    let m = prepare(&mut c, "after-shrink", "").await.expect("prepare");
    let fs = fs_size(&d, &m[0], "shrink");
    assert!(fs > 80 << 20 && fs < 100 << 20, "{fs} bytes");
    assert!(
        d.log().contains("nothing shrinks"),
        "the smaller size is logged"
    );
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_metrics_endpoint_reports_pool_and_calls() {
    let addr = "127.0.0.1:19323";
    let d = daemon(
        "metrics",
        "data_size = \"512MiB\"\nmetadata_size = \"16MiB\"\n[fs]\nbase_size = \"64MiB\"",
        &format!("[metrics]\naddress = \"{addr}\""),
    );
    let (mut c, _) = d.clients().await;
    prepare(&mut c, "a", "").await.expect("prepare");
    let _ = prepare(&mut c, "a", "").await.expect_err("duplicate");
    let body = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .expect("join");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("thinsnap_pool_bytes{space=\"data\",state=\"total\"} 536870912"),
        "{body}"
    );
    assert!(
        body.contains("thinsnap_snapshots{kind=\"active\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("thinsnap_call_duration_seconds_count{method=\"prepare\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("thinsnap_call_errors_total{code=\"AlreadyExists\",method=\"prepare\"} 1"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_autogrow_grows_a_filling_loop_pool_up_to_its_maximum() {
    let d = daemon(
        "autogrow",
        "data_size = \"256MiB\"\nmetadata_size = \"8MiB\"\n\
         [pool.autogrow]\nenabled = true\nthreshold = \"40%\"\nstep = \"100%\"\n\
         max_data_size = \"512MiB\"\ninterval_seconds = 1\n\
         [fs]\nbase_size = \"256MiB\"",
        "",
    );
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    let target = d.dir.join("a");
    mount(&m[0], &target);
    // A running container fills the pool past the threshold; no call is made meanwhile.
    // 120 MiB and the filesystem's own blocks: past 40% of 256 MiB.
    fill(&target.join("blob"), 120).expect("fill");
    let total = |st: &StatusResponse| st.data.as_ref().expect("data").total_bytes;
    let mut st = status(&mut a).await;
    for _ in 0..600 {
        if total(&st) != 256 << 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        st = status(&mut a).await;
    }
    assert_eq!(total(&st), 512 << 20, "grown once, by step, to the maximum");
    let data_file = d.dir.join("state/pool/data");
    assert_eq!(
        std::fs::metadata(&data_file).expect("data file").len(),
        512 << 20
    );
    // The container's data went through the reload intact, and it keeps writing.
    let blob = std::fs::read(target.join("blob")).expect("read back");
    assert_eq!(blob.len(), 120 << 20);
    assert!(blob
        .chunks(1 << 20)
        .enumerate()
        .all(|(i, c)| c[0] == i as u8));
    fill(&target.join("more"), 100).expect("fill after growth");
    umount(&target);
    // Over the threshold again, but at the maximum: several checks later it is still there.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let st = status(&mut a).await;
    // Past 40% of 512 MiB: due again, but at the maximum.
    assert!(st.data.as_ref().expect("data").used_bytes > 220 << 20);
    assert_eq!(total(&st), 512 << 20);
    assert!(d.log().contains("autogrow limited"), "{}", d.log());
    prepare(&mut c, "b", "")
        .await
        .expect("prepare above the floor");
}
