//! The binary's behaviour that needs no device-mapper: configuration errors and the refusal to
//! start on a kernel without device-mapper.

use std::process::Command;

fn serve_with(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run thinsnap");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_is_refused_naming_the_key() {
    let (ok, err) = serve_with("[pool]\nblock_size = \"100KiB\"\n");
    assert!(!ok);
    assert!(err.contains("pool.block_size"), "{err}");
    let (ok, err) = serve_with("[fs]\nbase_sise = \"1GiB\"\n");
    assert!(!ok);
    assert!(err.contains("base_sise"), "{err}");
}

#[test]
fn serve_without_device_mapper_names_the_module() {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if misc.contains("device-mapper") {
        eprintln!("this kernel has device-mapper: the refusal cannot be observed here");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, err) = serve_with(&format!(
        "root = \"{0}/state\"\naddress = \"{0}/s.sock\"\n",
        dir.path().display()
    ));
    assert!(!ok);
    assert!(err.contains("modprobe dm-thin-pool"), "{err}");
}
