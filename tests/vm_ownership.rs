//! Root-only tests on real dm-thin of what thinsnap may touch (issue 26): a second instance
//! with another root but the same pool name, a database moved away (refused, then `thinsnap
//! pool adopt --keep-foreign` and `--reset`), and a dm device that carries our name but is not
//! ours (neither reused nor removed).
//!
//! Like tests/vm_dm.rs they need root and device-mapper, so they are `#[ignore]`d and run in the
//! VM with `--ignored`. The harness is tests/common/mod.rs.

mod common;

use std::path::Path;

use common::*;
use devicemapper::{DevId, DmName, DmOptions, DM};

const POOL: &str = "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"";

/// The metadata loop device of `d`'s pool, from its status.
async fn meta_dev(d: &Daemon) -> (String, String) {
    let (_, mut a) = d.clients().await;
    let st = status(&mut a).await;
    let meta = metadata_device(&st);
    (st.pool_name, meta)
}

/// Creates dm device `name` with a `zero` target of 1MiB: someone else's device.
fn create_zero_device(name: &str) {
    let dm = DM::new().expect("dm");
    let n = DmName::new(name).expect("name");
    dm.device_create(n, None, DmOptions::default())
        .expect("create");
    let id = DevId::Name(n);
    dm.table_load(
        &id,
        &[(0, 2048, "zero".to_string(), String::new())],
        DmOptions::default(),
    )
    .expect("load");
    dm.device_suspend(&id, DmOptions::default())
        .expect("resume");
}

/// The table of dm device `name`, or None if there is no such device.
fn table(name: &str) -> Option<String> {
    let dm = DM::new().expect("dm");
    let n = DmName::new(name).expect("name");
    let (_, lines) = dm
        .table_status(
            &DevId::Name(n),
            DmOptions::default().set_flags(devicemapper::DmFlags::DM_STATUS_TABLE),
        )
        .ok()?;
    Some(
        lines
            .iter()
            .map(|(_, _, t, p)| format!("{t} {p}"))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

fn remove_device(name: &str) {
    let dm = DM::new().expect("dm");
    let n = DmName::new(name).expect("name");
    let _ = dm.device_remove(&DevId::Name(n), DmOptions::default());
}

/// Instance B (root /b) with the pool name of instance A (root /a) refuses to start, names
/// A's pool files, and leaves A's pool, devices and data as they were (before the fix B adopted
/// A's pool and deleted A's thin ids). B's `pool destroy` refuses too.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn a_second_instance_with_the_same_pool_name_refuses_and_the_first_keeps_its_data() {
    let a = Daemon::started("own", "tsown", "two", POOL);
    let (mut c, _) = a.clients().await;
    let m = prepare(&mut c, "layer", "").await.expect("prepare");
    write_file(&a.dir, &m[0], "f", "layer data");
    commit(&mut c, "layer-c", "layer").await.expect("commit");
    let m = prepare(&mut c, "ctr", "layer-c").await.expect("prepare");
    write_file(&a.dir, &m[0], "g", "container data");
    let (pool, meta) = meta_dev(&a).await;
    let ids_before = kernel_thin_ids(&pool, &meta);
    let devices_before = a.our_dm_devices();
    assert!(!devices_before.is_empty());

    let mut b = Daemon::prepare_dir("own", "tsown", "two-b");
    b.pool = a.pool.clone();
    b.write_config(POOL);
    let (st, log) = b.serve_until_exit();
    assert!(!st.success(), "B started on A's pool: {log}");
    assert!(
        log.contains("not the one on this root's files"),
        "B's refusal names the mismatch: {log}"
    );
    assert!(
        log.contains(&a.dir.join("state/pool/data").display().to_string()),
        "B's refusal names A's files: {log}"
    );
    assert!(
        !b.dir.join("state/pool/data").exists(),
        "B made no files before refusing"
    );
    // B's `pool destroy` (its drop runs one too) touches nothing of A's.
    let out = b.cli(&["pool", "destroy", "--remove-files"]);
    assert!(!out.status.success(), "B's pool destroy removed A's pool");
    drop(b);

    assert_eq!(kernel_thin_ids(&pool, &meta), ids_before, "A's thin ids");
    assert_eq!(a.our_dm_devices(), devices_before, "A's devices");
    let m = mounts(&mut c, "ctr").await;
    with_mount(&a.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("g")).expect("read"),
            "container data"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("f")).expect("read"),
            "layer data"
        );
    });
}

/// A database moved away: the next start refuses (before the fix it deleted every thin id of
/// the pool), naming `pool adopt`; `pool adopt --keep-foreign` keeps them (the old container's
/// data is intact and its device stays), the daemon then starts and serves; with the database
/// moved away again, `pool adopt --reset` deletes them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn a_moved_database_is_refused_until_the_operator_adopts_or_resets_the_pool() {
    let mut d = Daemon::started("own", "tsown", "moved", POOL);
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "ctr", "").await.expect("prepare");
    write_file(&d.dir, &m[0], "g", "container data");
    let (pool, meta) = meta_dev(&d).await;
    let ids_before = kernel_thin_ids(&pool, &meta);
    assert_eq!(ids_before.len(), 2, "base and ctr");
    d.stop();
    let db = d.dir.join("state/db");
    std::fs::rename(&db, d.dir.join("db.moved")).expect("move the database away");

    let (st, log) = d.serve_until_exit();
    assert!(
        !st.success(),
        "started on a pool it has no record of: {log}"
    );
    assert!(log.contains("pool adopt --keep-foreign"), "{log}");
    assert_eq!(kernel_thin_ids(&pool, &meta), ids_before, "nothing deleted");

    let out = d.cli(&["pool", "adopt", "--keep-foreign"]);
    assert!(
        out.status.success(),
        "adopt --keep-foreign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = kernel_thin_ids(&pool, &meta);
    assert!(
        after.is_superset(&ids_before),
        "{after:?} lost some of {ids_before:?}"
    );
    // The old container's device and data are still there.
    with_mount(&d.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("g")).expect("read"),
            "container data"
        );
    });
    d.start();
    let (mut c, _) = d.clients().await;
    let m2 = prepare(&mut c, "new", "")
        .await
        .expect("prepare after adopt");
    assert_ne!(m2[0].source, m[0].source, "a foreign thin id was reused");
    d.stop();
    assert!(
        kernel_thin_ids(&pool, &meta).is_superset(&ids_before),
        "a later start deleted adopted thin ids"
    );

    std::fs::remove_dir_all(&db).expect("drop the second database");
    let out = d.cli(&["pool", "adopt", "--reset"]);
    assert!(
        out.status.success(),
        "adopt --reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = kernel_thin_ids(&pool, &meta);
    assert_eq!(after.len(), 1, "only the new base is left: {after:?}");
    assert!(!Path::new(&m[0].source).exists(), "the old device is gone");
    d.start();
}

/// A dm device named like one of ours (`<pool>-snap-<id>`) but someone else's (a `zero` target
/// here) is neither removed by recovery nor reused by an activation (before the fix recovery
/// deleted "unowned" devices by name and activate returned any device with the name).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn a_foreign_device_with_our_name_is_neither_reused_nor_removed() {
    let mut d = Daemon::started("own", "tsown", "foreign", POOL);
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "ctr", "").await.expect("prepare");
    let ours = m[0].source.trim_start_matches("/dev/mapper/").to_string();
    // An unowned name recovery would have deleted as an orphan.
    let stray = format!("{}-snap-4000", d.pool);
    create_zero_device(&stray);
    d.stop();
    // The snapshot's own device replaced by someone else's of the same name.
    remove_device(&ours);
    create_zero_device(&ours);
    d.start();
    let (mut c, _) = d.clients().await;
    assert_eq!(
        table(&stray).as_deref(),
        Some("zero "),
        "stray device removed"
    );
    let err = c
        .mounts(containerd_snapshots::api::snapshots::v1::MountsRequest {
            snapshotter: "thinsnap".into(),
            key: "ctr".into(),
        })
        .await
        .expect_err("the foreign device was handed out as the snapshot's");
    assert!(err.message().contains("not that device"), "{err:?}");
    assert_eq!(
        table(&ours).as_deref(),
        Some("zero "),
        "foreign device changed"
    );
    // Remove of the snapshot deletes its thin id but leaves the foreign device alone.
    remove(&mut c, "ctr").await.expect("remove");
    assert_eq!(
        table(&ours).as_deref(),
        Some("zero "),
        "foreign device removed"
    );
    d.stop();
    remove_device(&stray);
    remove_device(&ours);
}
