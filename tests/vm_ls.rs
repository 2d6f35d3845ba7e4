//! `thinsnap ls` on real dm-thin (root, device-mapper; run in the VM by integration/test.sh with
//! `--ignored`), with `[spares] count = 1`: a committed snapshot, an active one, a view, the
//! base and its spare, plus what no record owns, made by hand behind the daemon's back: a thin
//! id with no device, one with a dm device named as thinsnap names its own, and someone else's
//! dm device with the prefix. `thinsnap ls --json` is checked against `dmsetup ls`,
//! `dmsetup table` and `thin_ls`: every thin id thin_ls reports is in it, owned by a record or
//! unowned; every dm device it names as present exists, with the table it says; the reverse
//! lookups name the owner, or fail saying unowned or not found.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// `dmsetup ARGS`, which must succeed; its stdout.
fn dmsetup(args: &[&str]) -> String {
    let out = Command::new("dmsetup")
        .args(args)
        .output()
        .expect("dmsetup");
    assert!(
        out.status.success(),
        "dmsetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `thinsnap ls --json ARGS`, once the daemon's own thin_ls (its audit after the start) no
/// longer holds the pool's metadata snapshot, so that ls lists the pool's thin ids itself.
fn ls_json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let mut all = vec!["ls", "--json"];
        all.extend_from_slice(args);
        let out = d.cli(&all);
        assert!(
            out.status.success(),
            "ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls json");
        if v["thin_ids_listed"] == true {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "ls could not list thin ids for 120 s: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn entries(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["entries"].as_array().expect("entries").clone()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn vm_ls_matches_dmsetup_and_thin_ls() {
    let d = Daemon::started(
        "vmtest",
        "tsvm",
        "ls",
        "data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"128MiB\"\n\
         [spares]\ncount = 1",
    );
    let (mut c, mut a) = d.clients().await;
    let m = prepare(&mut c, "l1", "").await.expect("l1");
    write_file(&d.dir, &m[0], "f", "parent file");
    commit(&mut c, "P", "l1").await.expect("commit P");
    let m = prepare(&mut c, "k8s.io/1/a", "P").await.expect("a");
    write_file(&d.dir, &m[0], "g", "child file");
    let a_dev = std::path::Path::new(&m[0].source)
        .file_name()
        .expect("device")
        .to_string_lossy()
        .into_owned();
    view(&mut c, "v", "P").await.expect("v");
    wait_spares(&d, &mut a, 1).await;

    // Behind the daemon's back: a thin id with no device, one whose dm device is named as
    // thinsnap names its own, and someone else's device with the prefix.
    let pool = d.pool.clone();
    dmsetup(&["message", &pool, "0", "create_thin 9000"]);
    dmsetup(&["message", &pool, "0", "create_thin 9001"]);
    let stray = format!("{pool}-snap-9001");
    let not_ours = format!("{pool}-snap-other");
    dmsetup(&[
        "create",
        &stray,
        "--table",
        &format!("0 2048 thin /dev/mapper/{pool} 9001"),
    ]);
    dmsetup(&["create", &not_ours, "--table", "0 2048 zero"]);

    let v = ls_json(&d, &[]);
    let all = entries(&v);
    let by_id: BTreeMap<u64, &serde_json::Value> = all
        .iter()
        .filter_map(|e| e["thin_id"].as_u64().map(|id| (id, e)))
        .collect();
    let key = |k: &str| {
        all.iter()
            .find(|e| e["key"] == k)
            .unwrap_or_else(|| panic!("{k} not in {v}"))
    };

    // Kinds, states, parents.
    let e = key("k8s.io/1/a");
    assert_eq!(
        (&e["kind"], &e["state"], &e["parent"], &e["device"]),
        (
            &"active".into(),
            &"active".into(),
            &"P".into(),
            &a_dev.clone().into()
        ),
        "{e}"
    );
    assert_eq!(e["mapped_source"], "kernel", "{e}");
    assert!(e["mapped_bytes"].as_u64().is_some_and(|m| m > 0), "{e}");
    let e = key("v");
    assert_eq!(
        (&e["kind"], &e["state"]),
        (&"view".into(), &"active".into())
    );
    let e = key("P");
    assert_eq!(
        (&e["kind"], &e["state"], &e["mapped_source"]),
        (&"committed".into(), &"inactive".into(), &"recorded".into()),
        "{e}"
    );
    let kind_count = |k: &str| all.iter().filter(|e| e["kind"] == k).count();
    assert_eq!((kind_count("base"), kind_count("spare")), (1, 1), "{v}");
    assert_eq!(by_id[&9000]["kind"], "unowned", "{v}");
    assert_eq!(by_id[&9000]["device"], serde_json::Value::Null, "{v}");
    assert_eq!(
        (&by_id[&9001]["kind"], &by_id[&9001]["device"]),
        (&"unowned".into(), &stray.clone().into()),
        "{v}"
    );
    let other = all
        .iter()
        .find(|e| e["device"] == not_ours.as_str())
        .unwrap_or_else(|| panic!("{not_ours} not in {v}"));
    assert_eq!(
        (&other["kind"], &other["thin_id"]),
        (&"unowned".into(), &serde_json::Value::Null)
    );

    // Every thin id thin_ls reports is in ls, and every thin id ls says is in the pool is one.
    let st = status(&mut a).await;
    let kernel = kernel_thin_ids(&pool, &metadata_device(&st));
    for id in &kernel {
        let e = by_id
            .get(&u64::from(*id))
            .unwrap_or_else(|| panic!("thin id {id} of thin_ls is not in ls: {v}"));
        assert_eq!(e["in_pool"], true, "{e}");
    }
    for (id, e) in &by_id {
        let listed = kernel.contains(&(*id as u32));
        assert_eq!(e["in_pool"] == true, listed, "thin id {id}: {e}");
    }
    assert!(kernel.contains(&9000) && kernel.contains(&9001));

    // Every dm device ls names as present exists (dmsetup ls), with the table it says, and ls
    // names every dm device with the prefix.
    let dm: BTreeSet<String> = dmsetup(&["ls"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n.starts_with(&format!("{pool}-snap-")))
        .collect();
    let present: BTreeSet<String> = all
        .iter()
        .filter(|e| e["state"] == "active" || e["state"] == "unowned")
        .filter_map(|e| e["device"].as_str().map(String::from))
        .collect();
    assert_eq!(present, dm, "ls devices vs dmsetup ls");
    let pool_dev = dmsetup(&["info", "-c", "--noheadings", "-o", "major,minor", &pool]);
    let pool_dev = pool_dev.trim().replace(' ', "");
    for e in all.iter().filter(|e| e["state"] == "active") {
        let name = e["device"].as_str().expect("device");
        let table = dmsetup(&["table", name]);
        let f: Vec<&str> = table.split_whitespace().collect();
        assert_eq!(
            (f[2], f[3], f[4]),
            ("thin", pool_dev.as_str(), e["thin_id"].to_string().as_str()),
            "{name}: {table}"
        );
        let sectors: u64 = f[1].parse().expect("length");
        assert_eq!(Some(sectors * 512), e["size_bytes"].as_u64(), "{name}: {e}");
    }
    // Inactive ones have no device.
    for e in all
        .iter()
        .filter(|e| e["state"] == "inactive" || e["state"] == "awaiting-activation")
    {
        let name = e["device"].as_str().expect("derived name");
        assert!(!dm.contains(name), "{name} is in dmsetup ls: {e}");
    }

    // Filters.
    let got = entries(&ls_json(&d, &["--kind", "committed"]));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["key"], "P");
    let got = entries(&ls_json(&d, &["--state", "unowned"]));
    assert_eq!(got.len(), 3, "{got:?}");

    // Reverse lookups.
    let out = d.cli(&["ls", "--device", &a_dev, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(e["key"], "k8s.io/1/a");
    let p_id = key("P")["thin_id"].to_string();
    let out = d.cli(&["ls", "--thin-id", &p_id]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(" P "));
    let err = failed(&d.cli(&["ls", "--device", &stray]));
    assert!(
        err.contains(&format!("dm device {stray}")) && err.contains("owned by no snapshot"),
        "{err}"
    );
    let err = failed(&d.cli(&["ls", "--thin-id", "9000"]));
    assert!(
        err.contains("thin id 9000") && err.contains("owned by no snapshot"),
        "{err}"
    );
    let err = failed(&d.cli(&["ls", "--thin-id", "123456"]));
    assert!(err.contains("thin id 123456 not found"), "{err}");
    let err = failed(&d.cli(&["ls", "--device", &format!("{pool}-snap-123456")]));
    assert!(err.contains("not found"), "{err}");

    // The table lists them too.
    let out = d.cli(&["ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("KIND") && text.contains(&a_dev) && text.contains(&stray),
        "{text}"
    );

    // What was made by hand goes before the daemon's pool destroy.
    dmsetup(&["remove", &stray]);
    dmsetup(&["remove", &not_ours]);
    dmsetup(&["message", &pool, "0", "delete 9000"]);
    dmsetup(&["message", &pool, "0", "delete 9001"]);
}
