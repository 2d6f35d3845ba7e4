//! Lazy activation and quarantine on real dm-thin (root, device-mapper; run in the VM by
//! integration/test.sh with `--ignored`): after a reboot thinsnap serves before it makes any
//! snapshot's device, a call that needs a device makes it (once, however many ask), Remove never
//! needs it, a snapshot whose thin id was deleted behind thinsnap's back is quarantined while the
//! rest serves, and a kill in the middle of an activation leaves nothing that blocks the next start.

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;
use devicemapper::{DevId, DmName, DM};
use tonic::Code;

/// Active snapshots made before the reboot, each with a file of its own.
const N: usize = 6;

fn daemon(name: &str) -> Daemon {
    Daemon::started(
        "vmtest",
        "tsvm",
        name,
        "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"128MiB\"",
    )
}

/// The thin id of a mount's source (`/dev/mapper/<pool>-snap-<id>`).
fn thin_id_of(source: &str) -> u32 {
    source
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no thin id in {source}"))
}

/// A reboot: thinsnap stopped, every dm device and loop device of its pool gone, files kept.
fn reboot(d: &mut Daemon) {
    d.stop();
    let out = d.cli(&["pool", "destroy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.our_dm_devices().is_empty());
}

/// How many times the log says thinsnap activated thin id `id` on first use.
fn first_use_activations(d: &Daemon, id: u32) -> usize {
    d.log()
        .lines()
        .filter(|l| {
            l.contains("activated the snapshot's device on first use")
                && l.contains(&format!("thin_id={id}"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_lazy_activation_after_a_reboot_and_quarantine() {
    let mut d = daemon("lazy");
    let mut ids = Vec::new();
    {
        let (mut c, _) = d.clients().await;
        for i in 0..N {
            let key = format!("k{i}");
            let m = prepare(&mut c, &key, "").await.expect("prepare");
            write_file(&d.dir, &m[0], "f", &format!("data of {key}"));
            ids.push(thin_id_of(&m[0].source));
        }
    }
    reboot(&mut d);
    let t0 = Instant::now();
    d.start();
    eprintln!(
        "start after a reboot with {N} active snapshots: serving after {:?}",
        t0.elapsed()
    );
    // Serving, and not one snapshot device made.
    assert!(
        d.our_dm_devices().is_empty(),
        "devices made before serving: {:?}",
        d.our_dm_devices()
    );
    let (mut c, mut a) = d.clients().await;
    let st = status(&mut a).await;
    assert_eq!(
        (st.snapshots_active, st.snapshots_inactive),
        (N as u64, N as u64)
    );
    assert!(d.our_dm_devices().is_empty());

    // Mounts of one makes its device, and the data is there.
    let m = mounts(&mut c, "k0").await;
    assert!(Path::new(&m[0].source).exists(), "k0 not activated");
    with_mount(&d.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("f")).expect("f"),
            "data of k0"
        );
    });
    assert_eq!(d.our_dm_devices().len(), 1, "{:?}", d.our_dm_devices());
    assert_eq!(first_use_activations(&d, ids[0]), 1);

    // Concurrent Mounts of one key: one activation.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { mounts(&mut c, "k1").await }));
    }
    for t in tasks {
        let m = t.await.expect("task");
        assert_eq!(thin_id_of(&m[0].source), ids[1]);
    }
    assert_eq!(first_use_activations(&d, ids[1]), 1, "{}", d.log_tail(30));
    assert_eq!(d.our_dm_devices().len(), 2, "{:?}", d.our_dm_devices());

    // Remove of a never-activated snapshot: no device made, its thin id gone.
    remove(&mut c, "k2").await.expect("remove k2");
    assert_eq!(first_use_activations(&d, ids[2]), 0);
    assert_eq!(d.our_dm_devices().len(), 2, "{:?}", d.our_dm_devices());
    assert_eq!(status(&mut a).await.snapshots_inactive, (N - 3) as u64);
    assert_no_leak(&d, &mut a, "after lazy activations and a remove").await;

    // A thin id deleted behind thinsnap's back: that snapshot is quarantined, the rest serves.
    let doomed = ids[3];
    let dm = DM::new().expect("dm");
    dm.target_msg(
        &DevId::Name(DmName::new(&d.pool).expect("name")),
        None,
        &format!("delete {doomed}"),
    )
    .expect("delete behind thinsnap's back");
    let err = c
        .mounts(containerd_snapshots::api::snapshots::v1::MountsRequest {
            snapshotter: "thinsnap".into(),
            key: "k3".into(),
        })
        .await
        .expect_err("mounts of a snapshot whose thin id is gone");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("\"k3\"")
            && err.message().contains(&format!("thin id {doomed}"))
            && err.message().contains("quarantined"),
        "{err}"
    );
    assert_eq!(
        code(commit(&mut c, "k3-committed", "k3").await),
        Code::FailedPrecondition
    );
    let st = status(&mut a).await;
    assert_eq!(st.quarantined.len(), 1, "{st:?}");
    assert_eq!(st.quarantined[0].key, "k3");
    assert_eq!(st.quarantined[0].thin_id, doomed);
    let out = d.cli(&["status", "--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"k3\"") && json.contains("gone"), "{json}");
    let out = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Quarantined:               1"), "{text}");
    // The others serve: mount one, make a new one.
    let m = mounts(&mut c, "k4").await;
    with_mount(&d.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("f")).expect("f"),
            "data of k4"
        );
    });
    prepare(&mut c, "new", "").await.expect("prepare beside it");
    // Still quarantined after a restart.
    drop((c, a));
    d.stop();
    d.start();
    let (mut c, mut a) = d.clients().await;
    assert_eq!(status(&mut a).await.quarantined.len(), 1);
    // Remove clears it, without sending the pool a delete for a thin id that is gone.
    remove(&mut c, "k3").await.expect("remove quarantined k3");
    let st = status(&mut a).await;
    assert!(st.quarantined.is_empty(), "{st:?}");
    assert!(!d.log().contains(&format!("delete thin id {doomed}")));
    assert_no_leak(&d, &mut a, "after removing the quarantined snapshot").await;
    drop((c, a));
    d.shut_down();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_killed_during_lazy_activation_the_next_start_converges() {
    let mut d = daemon("lazykill");
    {
        let (mut c, _) = d.clients().await;
        for key in ["a", "b"] {
            let m = prepare(&mut c, key, "").await.expect("prepare");
            write_file(&d.dir, &m[0], "f", key);
        }
    }
    for (fp, key) in thinsnap::failpoint::LAZY.iter().zip(["a", "b"]) {
        reboot(&mut d);
        // A plain start and stop first: the pool is made again here (not by the armed run,
        // whose first dm device must be the snapshot's).
        d.start();
        d.stop();
        d.start_with(Some(fp));
        {
            let (mut c, _) = d.clients().await;
            let r = c
                .mounts(containerd_snapshots::api::snapshots::v1::MountsRequest {
                    snapshotter: "thinsnap".into(),
                    key: key.into(),
                })
                .await;
            assert!(r.is_err(), "{fp}: the call answered; failpoint not reached");
        }
        d.expect_killed(fp);
        eprintln!("{fp}: devices left by the kill: {:?}", d.our_dm_devices());
        d.start();
        let (mut c, mut a) = d.clients().await;
        for k in ["a", "b"] {
            let m = mounts(&mut c, k).await;
            with_mount(&d.dir, &m[0], |root| {
                assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), k);
            });
        }
        assert_no_leak(&d, &mut a, fp).await;
    }
    d.shut_down();
}
