//! The systemd unit's sandbox (deploy/thinsnap.service) against the daemon: the capability
//! bounding set is enough to run it, CAP_SYS_ADMIN is needed, and
//! every system call the daemon (and what it runs: mkfs, thin_ls) makes is in the unit's
//! `SystemCallFilter=` sets.
//!
//! There is no systemd as PID 1 in the VM, so the unit is applied by hand, as
//! integration/e2e/run-guest.sh does: `setpriv --bounding-set <the unit's set> --no-new-privs`
//! around the binary. The system-call filter is not enforced here (nothing in Debian applies a
//! seccomp filter to a command outside systemd): instead `strace -f` records every call through
//! a start, Prepare, Commit, View, Remove and a stop, and each must be in the sets as
//! `systemd-analyze syscall-filter` expands them (with `@default`, which systemd always allows).
//! That is what this test proves, and no more: lvm mode's tools are not run under it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::*;

fn unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/thinsnap.service"))
        .expect("read deploy/thinsnap.service")
}

/// The words of every `key=` line of the unit's [Service] section.
fn unit_values(key: &str) -> Vec<String> {
    unit()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// The host-side check: the unit keeps exactly the capabilities its comment names, none of
/// those no code uses, and has a system-call filter.
#[test]
fn the_unit_keeps_only_the_capabilities_the_code_needs() {
    let caps = unit_values("CapabilityBoundingSet");
    assert_eq!(
        caps,
        [
            "CAP_SYS_ADMIN",
            "CAP_MKNOD",
            "CAP_DAC_OVERRIDE",
            "CAP_IPC_LOCK",
            "CAP_SYS_NICE"
        ]
    );
    for unused in [
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_CHOWN",
        "CAP_SYS_RESOURCE",
    ] {
        assert!(!caps.iter().any(|c| c == unused), "{unused} is kept");
    }
    assert_eq!(
        unit_values("SystemCallFilter"),
        ["@system-service", "@mount"]
    );
    assert_eq!(unit_values("SystemCallErrorNumber"), ["EPERM"]);
}

/// setpriv's form of a bounding set: `-all,+sys_admin,...`, leaving out `drop`.
fn setpriv_caps(caps: &[String], drop: Option<&str>) -> String {
    let mut s = "-all".to_string();
    for c in caps {
        if Some(c.as_str()) == drop {
            continue;
        }
        s.push_str(",+");
        s.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    s
}

/// Every system call the filter sets name, their groups expanded (`systemd-analyze
/// syscall-filter` lists each group's members, groups among them).
fn allowed_syscalls(sets: &[String]) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if let Some(g) = &current {
            let w = line.trim();
            if !w.is_empty() && !w.starts_with('#') {
                groups.get_mut(g).expect("group").push(w.to_string());
            }
        }
    }
    let mut todo: Vec<String> = sets.to_vec();
    todo.push("@default".to_string());
    let (mut seen, mut calls) = (BTreeSet::new(), BTreeSet::new());
    while let Some(s) = todo.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        if s.starts_with('@') {
            todo.extend(groups.get(&s).cloned().unwrap_or_default());
        } else {
            calls.insert(s);
        }
    }
    assert!(calls.contains("ioctl"), "could not expand {sets:?}");
    calls
}

/// The system call names in strace output files under `dir`.
fn traced_syscalls(dir: &Path) -> BTreeSet<String> {
    let mut calls = BTreeSet::new();
    for e in std::fs::read_dir(dir).expect("trace dir").flatten() {
        let text = std::fs::read_to_string(e.path()).expect("trace");
        for line in text.lines() {
            // "PID name(args) = ret", "PID <... name resumed>...", "PID +++ exited", "--- SIG".
            let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
            let name = if let Some(r) = rest.strip_prefix("<... ") {
                r.split(' ').next().unwrap_or("")
            } else {
                rest.split('(').next().unwrap_or("")
            };
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                calls.insert(name.to_string());
            }
        }
    }
    calls
}

/// The pid of the only child of process `pid` (the daemon strace runs).
fn child_of(pid: u32) -> i32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("children of strace");
    text.split_whitespace()
        .next()
        .expect("strace has a child")
        .parse()
        .expect("pid")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and device-mapper: run in the VM by integration/test.sh"]
async fn the_daemon_runs_under_the_units_capabilities_and_system_call_filter() {
    let caps = unit_values("CapabilityBoundingSet");
    let filter = unit_values("SystemCallFilter");
    let mut d = Daemon::prepare_dir("unit", "tsunit", "caps");
    d.write_config("data_size = \"1GiB\"\nmetadata_size = \"32MiB\"\n[fs]\nbase_size = \"64MiB\"");
    let traces = d.dir.join("traces");
    std::fs::create_dir_all(&traces).expect("trace dir");
    // The binary as systemd would run it (the unit's bounding set and no_new_privs), traced.
    let wrapper = d.dir.join("thinsnap-as-unit");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ -n \"$UNIT_CAPS\" ] || exec {bin} \"$@\"\n\
             [ -n \"$TRACE_DIR\" ] || exec setpriv --bounding-set \"$UNIT_CAPS\" --no-new-privs -- {bin} \"$@\"\n\
             exec setpriv --bounding-set \"$UNIT_CAPS\" --no-new-privs -- \
             strace -f -qq -o \"$TRACE_DIR/strace.$$\" {bin} \"$@\"\n",
            bin = bin()
        ),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::env::set_var("THINSNAP_BIN", &wrapper);

    // Without CAP_SYS_ADMIN the daemon cannot start (device-mapper and loop ioctls). CAP_MKNOD
    // is not shown needed here: the VM's /dev/mapper nodes were made without it.
    d.env = vec![(
        "UNIT_CAPS".into(),
        setpriv_caps(&caps, Some("CAP_SYS_ADMIN")),
    )];
    let (st, log) = d.serve_until_exit();
    assert!(!st.success(), "started without CAP_SYS_ADMIN: {log}");
    let out = d.cli(&["pool", "destroy", "--remove-files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    d.env = vec![
        ("UNIT_CAPS".into(), setpriv_caps(&caps, None)),
        ("TRACE_DIR".into(), traces.display().to_string()),
    ];
    d.start();
    let (mut c, _) = d.clients().await;
    let m = prepare(&mut c, "a", "").await.expect("prepare");
    write_file(&d.dir, &m[0], "f", "data");
    commit(&mut c, "c", "a").await.expect("commit");
    view(&mut c, "v", "c").await.expect("view");
    remove(&mut c, "v").await.expect("remove");
    drop(c);
    // SIGTERM to the daemon (strace's child); strace exits with its status.
    let mut strace = d.child.take().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child_of(strace.id())),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = strace.wait().expect("wait");
    assert!(
        st.success(),
        "the daemon under the unit's sandbox: {st}: {}",
        d.log()
    );

    let allowed = allowed_syscalls(&filter);
    let used = traced_syscalls(&traces);
    assert!(used.contains("ioctl"), "nothing traced: {used:?}");
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "system calls outside SystemCallFilter={filter:?}: {outside:?}"
    );
    std::env::remove_var("THINSNAP_BIN");
}
