//! A clean stop (SIGTERM) on real dm-thin (root + device-mapper; run in the VM by
//! integration/test.sh with `--ignored`): the calls in flight when it comes end with their
//! outcome or their undo, also those whose clients have gone, before the store's last flush; the
//! next start finds the store settled and skips thin_ls.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use containerd_snapshots::api::snapshots::v1::*;
use tonic::Code;

/// The failpoints the calls stall at (`THINSNAP_STALL`), each inside the kernel step of its
/// call, on a blocking thread: a Prepare's create_snap done, a Commit's deactivation done, a
/// Remove's delete done. Each call's outcome is still to be written.
const STALLS: [&str; 3] = [
    "prepare:after-create-snap",
    "commit:after-deactivate",
    "remove:after-delete",
];

/// Waits until the daemon's log says every failpoint of `STALLS` has stalled its call.
fn wait_stalled(d: &Daemon) {
    let t0 = Instant::now();
    loop {
        let log = d.log();
        if STALLS
            .iter()
            .all(|f| log.contains(&format!("failpoint {f}: stalled")))
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the calls never reached their failpoints:\n{}",
            d.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_sigterm_lets_the_calls_in_flight_finish() {
    let mut d = Daemon::prepare_dir("stop", "tsst", "sigterm");
    d.write_config(
        "data_size = \"1GiB\"\nmetadata_size = \"16MiB\"\nmin_free_space = \"1%\"\n\
         [fs]\nbase_size = \"64MiB\"",
    );
    d.start();
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "k", "").await.expect("k");
    write_file(&d.dir, &m[0], "f", "K");
    prepare(&mut c, "r", "").await.expect("r");
    // A clean stop with nothing in flight: the next start skips thin_ls.
    d.stop();
    let matched = "the pool's transaction id is the one last recorded";
    let before = d.log().len();
    d.env = vec![("THINSNAP_STALL".into(), STALLS.join(","))];
    d.start();
    assert!(d.log()[before..].contains(matched), "{}", d.log_tail(40));

    // Prepare "p" and Remove "r", whose clients give up while they run, and Commit "k" as "c",
    // whose client waits.
    let (c2, c3) = (c.clone(), c.clone());
    let prep_p = tokio::spawn(async move {
        let mut c = c2;
        prepare(&mut c, "p", "").await
    });
    let remove_r = tokio::spawn(async move {
        let mut c = c3;
        remove(&mut c, "r").await
    });
    let commit_k = {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.commit(CommitSnapshotRequest {
                snapshotter: "thinsnap".into(),
                name: "c".into(),
                key: "k".into(),
                labels: HashMap::new(),
            })
            .await
        })
    };
    wait_stalled(&d);
    prep_p.abort();
    remove_r.abort();
    assert!(prep_p.await.expect_err("cut short").is_cancelled());
    assert!(remove_r.await.expect_err("cut short").is_cancelled());
    // SIGTERM: the stalls go on, and the daemon must exit with success once the calls end.
    let stopping = d.log().len();
    d.stop();
    commit_k
        .await
        .expect("join")
        .expect("the waiting client gets its Commit's answer");
    let stop_log = d.log()[stopping..].to_string();
    for f in STALLS {
        assert!(
            stop_log.contains(&format!("failpoint {f}: released")),
            "{f}: {stop_log}"
        );
    }
    assert!(
        !stop_log.contains("calls still running at shutdown"),
        "{stop_log}"
    );

    // The next start: the store is settled, thin_ls is skipped, and every call is done.
    d.env.clear();
    let before = d.log().len();
    d.start();
    let start_log = d.log()[before..].to_string();
    assert!(start_log.contains(matched), "{start_log}");
    assert!(!start_log.contains("recovery done"), "{start_log}");
    let (mut c, mut a) = d.clients().await;
    with_mount(&d.dir, &mounts(&mut c, "p").await[0], |_| {});
    assert_eq!(code(remove(&mut c, "r").await), Code::NotFound);
    assert_eq!(code(remove(&mut c, "k").await), Code::NotFound);
    let v = view(&mut c, "check", "c").await.expect("c is committed");
    with_mount(&d.dir, &v[0], |root| {
        assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "K");
    });
    assert_no_leak(&d, &mut a, "after a SIGTERM with calls in flight").await;
}
