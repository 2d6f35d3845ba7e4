//! An install that starts from nothing: `run.sh` and `integration/test.sh` check the Rust
//! toolchain first (`integration/check-toolchain.sh`) and say how to get one, instead of stopping
//! at `cargo: command not found`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/check-toolchain.sh")
}

/// Runs the check with PATH = `bin` plus a directory of only the basic tools the script uses (so
/// a toolchain installed in /usr/bin cannot be found), and an empty HOME.
fn check_with(bin: &Path) -> (i32, String) {
    let home = tempfile::tempdir().expect("tempdir");
    let tools = tempfile::tempdir().expect("tempdir");
    for tool in ["sed", "head", "awk", "sort", "dirname"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found in /usr/bin or /bin"));
        std::os::unix::fs::symlink(found, tools.path().join(tool)).expect("symlink a tool");
    }
    let out = Command::new("/bin/bash")
        .arg(script())
        .env(
            "PATH",
            format!("{}:{}", bin.display(), tools.path().display()),
        )
        .env("HOME", home.path())
        .output()
        .expect("run check-toolchain.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// A fake `cargo` and `rustc` that report `version`.
fn fake_toolchain(dir: &Path, version: &str) {
    use std::os::unix::fs::PermissionsExt;
    for (name, text) in [
        ("rustc", format!("rustc {version} (0000000 2020-01-01)")),
        ("cargo", format!("cargo {version} (0000000 2020-01-01)")),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\necho '{text}'\n")).expect("write fake tool");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

#[test]
fn a_machine_without_rust_is_told_how_to_get_it() {
    if Path::new("/usr/bin/cargo").exists() || Path::new("/usr/bin/rustc").exists() {
        // A system-wide toolchain would be found through /usr/bin: the "missing" case cannot be
        // made here. Say so on the terminal, past libtest's capture.
        let _ = std::fs::write(
            "/dev/tty",
            "SKIPPED: a_machine_without_rust_is_told_how_to_get_it (/usr/bin has cargo)\n",
        );
        return;
    }
    let empty = tempfile::tempdir().expect("tempdir");
    let (code, out) = check_with(empty.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cargo/rustc not found"), "{out}");
    assert!(out.contains("rustup"), "{out}");
}

#[test]
fn an_old_toolchain_is_refused_with_the_version_it_needs() {
    let bin = tempfile::tempdir().expect("tempdir");
    fake_toolchain(bin.path(), "1.63.0");
    let (code, out) = check_with(bin.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rustc 1.63.0"), "{out}");
    assert!(out.contains("older than thinsnap's rust-version"), "{out}");
}

#[test]
fn a_new_enough_toolchain_passes() {
    let bin = tempfile::tempdir().expect("tempdir");
    fake_toolchain(bin.path(), "1.200.0");
    let (code, out) = check_with(bin.path());
    assert_eq!(code, 0, "{out}");
}
