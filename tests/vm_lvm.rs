//! Root-only tests of lvm mode on real LVM and dm-thin: a sparse file under /tmp attached to a
//! loop device stands in for the disk given as `pool.lvm.device`; the `thinsnap` binary
//! provisions the volume group and thin pool on it with the lvm2 tools and serves snapshots from
//! it, then reuses it after a restart and after a "reboot" (everything deactivated).
//!
//! Like tests/vm_dm.rs they need root, device-mapper and lvm2, so they are `#[ignore]`d: plain
//! `cargo test` lists them as ignored, and `integration/test.sh` runs them inside the VM with
//! `--ignored`. Every test cleans up (thinsnap's devices, the volume group, the physical volume
//! label, the profile, the loop device) also when it fails.
//!
//! One test uses existing mode on an LVM thin pool that holds a thin volume of LVM's own: the
//! volume must come out of Prepares, crashes and restarts intact, byte for byte.

mod common;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use devicemapper::{DevId, DmName, DmOptions, DM};
use thinsnap::config::Config;

const DISK_SIZE: u64 = 2 << 30;

fn require_root_dm_lvm() {
    require_dm();
    let v = Command::new("lvm").arg("version").output();
    assert!(
        v.is_ok_and(|o| o.status.success()),
        "lvm2 is missing (apt-get install lvm2)"
    );
}

/// Runs a tool (never through a shell).
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C")
        // Without a udev daemon (the VM) libdevmapper makes the /dev/mapper nodes itself.
        .env(
            "DM_DISABLE_UDEV",
            if Path::new("/run/udev/control").exists() {
                "0"
            } else {
                "1"
            },
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a tool that must succeed; returns its stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rows of an lvm2 report (`--noheadings --nameprefixes`), keys without the `LVM2_` prefix,
/// lower case.
fn report(program: &str, args: &[&str]) -> Vec<HashMap<String, String>> {
    let mut all = vec![
        "--noheadings",
        "--nameprefixes",
        "--units",
        "b",
        "--nosuffix",
    ];
    all.extend_from_slice(args);
    ok(program, &all)
        .lines()
        .filter(|l| l.contains("LVM2_"))
        .map(|l| {
            l.split("' ")
                .filter_map(|kv| {
                    let (k, v) = kv.trim().split_once("='")?;
                    Some((
                        k.trim_start_matches("LVM2_").to_ascii_lowercase(),
                        v.trim_end_matches('\'').to_string(),
                    ))
                })
                .collect()
        })
        .collect()
}

fn vg_exists(vg: &str) -> bool {
    report("vgs", &["-o", "vg_name"])
        .iter()
        .any(|r| r["vg_name"] == vg)
}

/// Signature types wipefs finds on `dev`.
fn signatures(dev: &str) -> Vec<String> {
    ok(
        "wipefs",
        &["--noheadings", "--parsable", "--output", "TYPE", dev],
    )
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect()
}

fn dm_device_exists(name: &str) -> bool {
    let dm = DM::new().expect("device-mapper");
    let n = DmName::new(name).expect("dm name");
    dm.device_info(&DevId::Name(n)).is_ok()
}

/// Removes every dm device whose name starts with `prefix` (what a reboot does to thinsnap's).
fn remove_dm_devices(prefix: &str) {
    let dm = DM::new().expect("device-mapper");
    for (name, _, _) in dm.list_devices().expect("list dm devices") {
        if name.to_string().starts_with(prefix) {
            dm.device_remove(&DevId::Name(&name), DmOptions::default())
                .unwrap_or_else(|e| panic!("remove {}: {e}", &*name));
        }
    }
}

/// A sparse file on a loop device: the "disk".
struct Disk {
    file: PathBuf,
    dev: String,
}

impl Disk {
    fn new(name: &str) -> Disk {
        require_root_dm_lvm();
        let file = PathBuf::from(format!(
            "/tmp/thinsnap-lvmdisk-{name}-{}",
            std::process::id()
        ));
        let f = std::fs::File::create(&file).expect("disk file");
        f.set_len(DISK_SIZE).expect("sparse disk file");
        drop(f);
        let dev = ok(
            "losetup",
            &["--find", "--show", file.to_str().expect("utf-8 path")],
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        Disk { file, dev }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let out = run("losetup", &["--detach", &self.dev]);
        if !out.status.success() {
            eprintln!(
                "losetup -d {} failed: {}",
                self.dev,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A daemon in lvm mode on a [`Disk`] (the harness's [`Daemon`] plus the names LVM sees).
/// Dropping it also tears the LVM setup down (pool, volume group, physical volume label,
/// profile), by force if thinsnap's own teardown fails.
struct LvmDaemon {
    d: Daemon,
    vg: String,
    lv: String,
    dev: String,
}

impl Deref for LvmDaemon {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl DerefMut for LvmDaemon {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.d
    }
}

impl LvmDaemon {
    /// Writes the config (lvm mode on `disk`); does not start thinsnap.
    fn new(name: &str, disk: &Disk, force: bool) -> LvmDaemon {
        let d = LvmDaemon {
            d: Daemon::prepare_dir("vmlvm", "tslvm", name),
            // Dashes on purpose: LVM doubles them in dm names.
            vg: format!("ts-vg-{name}-{}", std::process::id()),
            lv: "thin-pool".to_string(),
            dev: disk.dev.clone(),
        };
        d.write_config(force);
        d
    }

    fn write_config(&self, force: bool) {
        self.d.write_config(&format!(
            "mode = \"lvm\"\n\
             [pool.lvm]\ndevice = \"{dev}\"\nvolume_group = \"{vg}\"\nthin_pool = \"{lv}\"\n\
             autoextend_threshold = 70\nautoextend_percent = 25\nforce = {force}\n\
             [fs]\nbase_size = \"128MiB\"",
            dev = self.dev,
            vg = self.vg,
            lv = self.lv,
        ));
    }

    fn load_config(&self) -> Config {
        Config::load(Some(&self.config)).expect("config is valid")
    }

    /// The dm name of the thin-pool device LVM makes (no LVM thin volumes: no -tpool layer).
    fn pool_dm(&self) -> String {
        format!(
            "{}-{}",
            self.vg.replace('-', "--"),
            self.lv.replace('-', "--")
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status --json: {}: {}{}\nthinsnap log: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// The visible logical volumes of the group, with the fields the tests look at.
    fn lvs(&self) -> Vec<HashMap<String, String>> {
        report(
            "lvs",
            &[
                "-o",
                "lv_name,segtype,lv_active,lv_profile,chunk_size,lv_size,seg_monitor,zero",
                &self.vg,
            ],
        )
    }
}

impl Drop for LvmDaemon {
    fn drop(&mut self) {
        // Kills thinsnap, prints its log, destroys the pool; the directory goes with `self.d`.
        self.d.shut_down();
        if let Ok(config) = Config::load(Some(&self.config)) {
            if let Err(e) = thinsnap::pool::lvm::teardown(&config) {
                eprintln!("lvm teardown failed: {e}");
            }
        }
        // Backstop, so one failure does not leave the next test a busy loop device.
        if DM::new().is_ok() {
            remove_dm_devices(&format!("{}-snap-", self.pool));
        }
        if vg_exists(&self.vg) {
            eprintln!("volume group {} left behind: removing it by force", self.vg);
            let _ = run("vgremove", &["--force", "--force", "--yes", &self.vg]);
            let _ = run("pvremove", &["--force", "--force", "--yes", &self.dev]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, device-mapper and lvm2: run in the VM by integration/test.sh"]
async fn vm_lvm_provisions_reuses_after_restart_and_reboot_and_tears_down() {
    let disk = Disk::new("life");
    let mut d = LvmDaemon::new("life", &disk, false);
    d.start();

    // What LVM has: one visible volume, the thin pool, as configured.
    let lvs = d.lvs();
    assert_eq!(lvs.len(), 1, "{lvs:?}");
    let pool = &lvs[0];
    assert_eq!(pool["lv_name"], d.lv);
    assert_eq!(pool["segtype"], "thin-pool", "{pool:?}");
    assert_eq!(pool["lv_active"], "active", "{pool:?}");
    let profile = format!("{}-{}", d.vg, d.lv);
    assert_eq!(pool["lv_profile"], profile, "{pool:?}");
    assert_eq!(pool["chunk_size"], "65536", "pool.block_size: {pool:?}");
    assert_ne!(pool["zero"], "zero", "--zero n: {pool:?}");
    let vg = report("vgs", &["-o", "vg_name,vg_size,vg_tags", &d.vg]);
    assert!(vg[0]["vg_tags"].contains("thinsnap"), "{vg:?}");
    let vg_size: u64 = vg[0]["vg_size"].parse().expect("vg_size");
    let data_size: u64 = pool["lv_size"].parse().expect("lv_size");
    let share = data_size as f64 * 100.0 / vg_size as f64;
    assert!((94.0..=95.5).contains(&share), "data is {share}% of the VG");
    let pv = report("pvs", &["-o", "pv_name,vg_name", &d.dev]);
    assert_eq!(pv[0]["vg_name"], d.vg, "{pv:?}");
    let config = d.load_config();
    let profile_file = thinsnap::pool::lvm::profile_path(&config.pool.lvm);
    assert!(profile_file.ends_with(format!("{profile}.profile")));
    let text = std::fs::read_to_string(&profile_file).expect("profile file");
    assert!(
        text.contains("thin_pool_autoextend_threshold = 70")
            && text.contains("thin_pool_autoextend_percent = 25"),
        "{text}"
    );
    // LVM's own view of the setting through the profile.
    let eff = ok(
        "lvmconfig",
        &[
            "--type",
            "full",
            "--metadataprofile",
            &profile,
            "activation/thin_pool_autoextend_threshold",
        ],
    );
    assert!(eff.contains("=70"), "lvmconfig says {eff}");
    eprintln!(
        "seg_monitor of the pool: {:?}",
        pool.get("seg_monitor").cloned().unwrap_or_default()
    );

    // thinsnap serves from the LVM pool's dm device.
    let st = d.status_json();
    assert_eq!(st["pool_name"], d.pool_dm(), "{st}");
    assert_eq!(st["pool_mode"], "lvm", "{st}");
    assert_eq!(st["data"]["total_bytes"], data_size, "{st}");
    assert_eq!(st["block_size_bytes"], 65536, "{st}");

    {
        let (mut c, _) = d.clients().await;
        let m = prepare(&mut c, "a", "").await.expect("prepare");
        assert!(
            m[0].source
                .starts_with(&format!("/dev/mapper/{}-snap-", d.pool)),
            "{m:?}"
        );
        with_mount(&d.dir, &m[0], |root| {
            std::fs::write(root.join("hello"), b"on lvm").expect("write")
        });
        commit(&mut c, "c1", "a").await.expect("commit");
        let mb = prepare(&mut c, "b", "c1").await.expect("prepare");
        with_mount(&d.dir, &mb[0], |root| {
            assert_eq!(std::fs::read(root.join("hello")).expect("read"), b"on lvm");
            std::fs::write(root.join("mine"), b"b's own").expect("write");
        });
    }

    // A restart reuses the group and the pool: nothing new is made.
    d.stop();
    d.start();
    let lvs = d.lvs();
    assert_eq!(lvs.len(), 1, "{lvs:?}");
    assert_eq!(lvs[0]["lv_name"], d.lv);
    {
        let (mut c, _) = d.clients().await;
        assert_eq!(list(&mut c, &[]).await.expect("list"), vec!["b", "c1"]);
    }

    // A reboot: every dm device gone, the pool inactive; the next start activates it again.
    d.stop();
    remove_dm_devices(&format!("{}-snap-", d.pool));
    ok("vgchange", &["--activate", "n", &d.vg]);
    assert!(!dm_device_exists(&d.pool_dm()), "pool still active");
    assert_eq!(d.lvs()[0]["lv_active"], "", "{:?}", d.lvs());
    d.start();
    assert_eq!(d.lvs()[0]["lv_active"], "active", "{:?}", d.lvs());
    assert!(dm_device_exists(&d.pool_dm()));
    {
        let (mut c, _) = d.clients().await;
        assert_eq!(list(&mut c, &[]).await.expect("list"), vec!["b", "c1"]);
        let mb = mounts(&mut c, "b").await;
        assert!(Path::new(&mb[0].source).exists(), "b not reactivated");
        with_mount(&d.dir, &mb[0], |root| {
            assert_eq!(std::fs::read(root.join("hello")).expect("read"), b"on lvm");
            assert_eq!(std::fs::read(root.join("mine")).expect("read"), b"b's own");
        });
        // And it still takes new snapshots.
        let m = prepare(&mut c, "after-reboot", "c1")
            .await
            .expect("prepare");
        with_mount(&d.dir, &m[0], |root| {
            assert_eq!(std::fs::read(root.join("hello")).expect("read"), b"on lvm")
        });
    }
    let st = d.status_json();
    assert_eq!(st["pool_name"], d.pool_dm(), "{st}");
    assert_eq!(st["snapshots"]["active"], 2, "{st}");

    // Tear down: pool, group, PV label and profile go; a second teardown has nothing to do.
    d.stop();
    let out = d.cli(&["pool", "destroy", "--remove-files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    thinsnap::pool::lvm::teardown(&config).expect("teardown");
    assert!(!vg_exists(&d.vg), "volume group left");
    assert!(
        !report("pvs", &["-o", "pv_name"])
            .iter()
            .any(|r| r["pv_name"] == d.dev),
        "physical volume left"
    );
    assert!(signatures(&d.dev).is_empty(), "{:?}", signatures(&d.dev));
    assert!(!profile_file.exists(), "profile left");
    thinsnap::pool::lvm::teardown(&config).expect("second teardown");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, device-mapper and lvm2: run in the VM by integration/test.sh"]
async fn vm_lvm_refuses_a_device_with_a_filesystem_unless_forced() {
    let disk = Disk::new("fs");
    ok("mkfs.ext4", &["-q", "-F", &disk.dev]);
    let mut d = LvmDaemon::new("fs", &disk, false);

    let (st, log) = d.serve_until_exit();
    assert!(!st.success(), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&disk.dev) && last.contains("ext4") && last.contains("force"),
        "the refusal must name the device, what it holds and the way out: {log}"
    );
    assert_eq!(
        signatures(&disk.dev),
        vec!["ext4"],
        "the device was touched"
    );
    assert!(!vg_exists(&d.vg));

    // With force the filesystem is wiped and the pool made.
    d.write_config(true);
    d.start();
    assert!(
        signatures(&disk.dev).contains(&"LVM2_member".to_string()),
        "{:?}",
        signatures(&disk.dev)
    );
    assert_eq!(d.lvs()[0]["segtype"], "thin-pool");
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    with_mount(&d.dir, &m[0], |root| {
        std::fs::write(root.join("f"), b"x").expect("write")
    });
    assert_eq!(d.status_json()["pool_name"], d.pool_dm());
    d.stop();
}

#[test]
#[ignore = "needs root, device-mapper and lvm2: run in the VM by integration/test.sh"]
fn vm_lvm_never_takes_over_another_volume_group() {
    let disk = Disk::new("other");
    let other = format!("tsother{}", std::process::id());
    ok("pvcreate", &["--yes", &disk.dev]);
    ok("vgcreate", &[&other, &disk.dev]);
    let d = LvmDaemon::new("other", &disk, true);
    let (st, log) = d.serve_until_exit();
    assert!(!st.success(), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&disk.dev) && last.contains(&other),
        "the refusal must name the device and its group: {log}"
    );
    assert!(vg_exists(&other), "force must not take over a group");
    assert!(!vg_exists(&d.vg));
    drop(d);
    ok("vgremove", &["--yes", &other]);
    ok("pvremove", &["--yes", &disk.dev]);
}

/// A volume group on a [`Disk`] made by hand with an LVM thin pool and a thin volume of LVM's
/// own; removed by force when dropped.
struct ForeignVg {
    vg: String,
    dev: String,
}

impl Drop for ForeignVg {
    fn drop(&mut self) {
        let _ = run("vgremove", &["--force", "--force", "--yes", &self.vg]);
        let _ = run("pvremove", &["--force", "--force", "--yes", &self.dev]);
    }
}

/// The bytes of block device `dev`.
fn read_device(dev: &str) -> Vec<u8> {
    std::fs::read(dev).unwrap_or_else(|e| panic!("read {dev}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, device-mapper and lvm2: run in the VM by integration/test.sh"]
async fn vm_existing_lvm_pool_keeps_its_own_thin_volume_byte_for_byte() {
    let disk = Disk::new("foreign");
    let vg = format!("tsfvg{}", std::process::id());
    let _cleanup = ForeignVg {
        vg: vg.clone(),
        dev: disk.dev.clone(),
    };
    ok("pvcreate", &["--yes", &disk.dev]);
    ok("vgcreate", &["--yes", &vg, &disk.dev]);
    ok(
        "lvcreate",
        &[
            "--yes",
            "--type",
            "thin-pool",
            "-L",
            "1G",
            "-n",
            "pool",
            &vg,
        ],
    );
    ok(
        "lvcreate",
        &[
            "--yes",
            "-V",
            "32M",
            "--thinpool",
            "pool",
            "-n",
            "mine",
            &vg,
        ],
    );
    // LVM's volume, filled with data no snapshot of thinsnap's could produce.
    let lv_dev = format!("/dev/mapper/{vg}-mine");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&lv_dev, &data).unwrap_or_else(|e| panic!("write {lv_dev}: {e}"));
    let thin_id: u32 = report("lvs", &["-o", "thin_id", &format!("{vg}/mine")])[0]["thin_id"]
        .trim()
        .parse()
        .expect("thin id of LVM's volume");
    // Inactive, as an LVM volume nobody uses right now is; the pool stays active.
    ok("lvchange", &["--yes", "-an", &format!("{vg}/mine")]);
    ok("lvchange", &["--yes", "-ay", &format!("{vg}/pool")]);
    let pool_dm = format!("{vg}-pool-tpool");
    assert!(
        DM::new()
            .expect("dm")
            .device_info(&DevId::Name(DmName::new(&pool_dm).expect("name")))
            .is_ok(),
        "LVM's thin-pool device {pool_dm} is not active"
    );

    let mut d = Daemon::prepare_dir("vmlvm", "unused", "foreign");
    // write_config names the pool `d.pool`: LVM's thin-pool device.
    d.pool = pool_dm.clone();
    d.write_config(
        "mode = \"existing\"\nallow_foreign_devices = true\n[fs]\nbase_size = \"64MiB\"",
    );
    d.start();
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "l1", "").await.expect("prepare l1");
    write_file(&d.dir, &m[0], "f", "L1");
    commit(&mut c, "c1", "l1").await.expect("commit");
    // An active snapshot that must come through every crash with its data.
    let m = prepare(&mut c, "live", "c1").await.expect("prepare live");
    write_file(&d.dir, &m[0], "g", "LIVE");
    let mut n = 0;
    // Killed at every step of a Prepare (the interrupted create's thin id is left alone in a
    // shared pool), of a Commit and of a Remove, then restarted: LVM's volume is never touched.
    for fp in [
        "prepare:after-intent",
        "prepare:after-create-snap",
        "prepare:after-activate",
        "commit:after-deactivate",
        "remove:after-intent",
        "remove:after-delete",
    ] {
        n += 1;
        d.stop();
        d.start_with(Some(fp));
        let (mut c, _) = d.clients().await;
        let key = format!("k{n}");
        // Commit and Remove need a snapshot first: made now, the armed failpoint not hit yet.
        let call = match fp.split_once(':').expect("group:step").0 {
            "prepare" => prepare(&mut c, &key, "c1").await.map(|_| ()),
            "commit" => {
                let m = prepare(&mut c, &key, "c1")
                    .await
                    .expect("prepare to commit");
                write_file(&d.dir, &m[0], "g", "G");
                commit(&mut c, &format!("{key}c"), &key).await
            }
            _ => {
                prepare(&mut c, &key, "c1")
                    .await
                    .expect("prepare to remove");
                commit(&mut c, &format!("{key}c"), &key)
                    .await
                    .expect("commit to remove");
                remove(&mut c, &format!("{key}c")).await
            }
        };
        assert!(
            call.is_err(),
            "{fp}: the call answered; failpoint not reached"
        );
        d.expect_killed(fp);
        d.start();
        let (mut c, _) = d.clients().await;
        with_mount(&d.dir, &mounts(&mut c, "live").await[0], |root| {
            assert_eq!(std::fs::read_to_string(root.join("f")).expect("f"), "L1");
            assert_eq!(std::fs::read_to_string(root.join("g")).expect("g"), "LIVE");
        });
        let (_, mut a) = d.clients().await;
        let ids = status_with_thin_ids(&mut a).await.thin_ids;
        assert!(
            !ids.contains(&thin_id),
            "{fp}: thinsnap lists LVM's thin id {thin_id} as its own: {ids:?}"
        );
        println!("{fp}: ok");
    }
    // thinsnap gone, its devices deleted from the pool (existing mode leaves the pool itself).
    d.stop();
    let out = d.cli(&["pool", "destroy"]);
    assert!(
        out.status.success(),
        "pool destroy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.shut_down();
    ok("lvchange", &["--yes", "-ay", &format!("{vg}/mine")]);
    assert!(
        read_device(&lv_dev) == data,
        "LVM's thin volume {vg}/mine changed"
    );
}

/// lvm mode names thin devices `<pool.name>-snap-<id>`, so a second daemon with the same
/// `pool.name` (here a loop-mode one on a root of its own) has devices under our names. They are
/// someone else's (their tables name another pool): a Prepare that wants that name fails
/// instead of handing out the other daemon's device, and neither a restart nor `pool destroy`
/// removes them. Before the fix the lvm daemon returned the other's device as its snapshot's
/// and its recovery removed it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, device-mapper and lvm2: run in the VM by integration/test.sh"]
async fn vm_lvm_leaves_a_foreign_thin_device_with_our_name_alone() {
    require_root_dm_lvm();
    let disk = Disk::new("fthin");
    let mut b = LvmDaemon::new("fthin", &disk, false);
    b.start();
    let mut a = Daemon::prepare_dir("vmlvm", "tslvm", "fthin-a");
    a.pool = b.pool.clone();
    a.write_config("data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"");
    a.start();
    let (mut ca, _) = a.clients().await;
    let ma = prepare(&mut ca, "a1", "").await.expect("prepare on a");
    write_file(&a.dir, &ma[0], "f", "a's data");
    let a_dev = ma[0].source.clone();

    // b's next thin id is a's: b's Prepare wants the very name of a's device.
    let (mut cb, _) = b.clients().await;
    let err = prepare(&mut cb, "b1", "")
        .await
        .expect_err("b handed out a's device");
    assert!(err.message().contains("not that device"), "{err:?}");
    let mb = prepare(&mut cb, "b2", "").await.expect("prepare on b");
    assert_ne!(mb[0].source, a_dev);
    b.stop();
    b.start();
    let out = b.cli(&["status"]);
    assert!(out.status.success());
    b.stop();
    let out = b.cli(&["pool", "destroy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(&a_dev).exists(), "a's device was removed");
    let m = mounts(&mut ca, "a1").await;
    assert_eq!(m[0].source, a_dev);
    with_mount(&a.dir, &m[0], |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("f")).expect("read"),
            "a's data"
        );
    });
}
