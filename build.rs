//! Generates thinsnap's own admin API (proto/) with tonic-build. containerd's Snapshots service
//! comes ready-made from the `containerd-snapshots` crate.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&["proto/thinsnap/admin/v1/admin.proto"], &["proto"])?;
    Ok(())
}
