//! A raised `fs.base_size` (on the fake pool): new images' first layers get the new size, the
//! base is never rewritten nor shrunk, status says what new images get, and no warm spare of the
//! base is kept at the old size. (The grown filesystem itself is checked on real dm-thin:
//! `tests/vm_pool_ops.rs::vm_a_raised_base_size_reaches_new_images_only`.)

use super::tests::{restart_with_settings, setup_with, T};
use super::*;
use crate::config::FsConfig;

fn settings(base_size: &str, spares: u32) -> Settings {
    let fs = FsConfig {
        base_size: base_size.parse().expect("size"),
        ..FsConfig::default()
    };
    let mut s = Settings::with_fs(fs);
    s.spares = spares;
    s
}

/// A restart with `settings`.
fn restart(t: T, settings: Settings) -> T {
    restart_with_settings(t, settings).0
}

#[tokio::test]
async fn a_raised_base_size_is_for_new_images_and_a_smaller_one_shrinks_nothing() {
    let t = setup_with(settings("64MiB", 0));
    let base = t.engine.status().await.expect("status").base;
    assert_eq!(base.size, 64 << 20);
    assert_eq!(base.new_image_size, 64 << 20);
    assert_eq!(t.engine.grown_base_size(""), None);

    let t = restart(t, settings("128MiB", 0));
    let st = t.engine.status().await.expect("status").base;
    assert_eq!(st.size, 64 << 20, "the base device keeps its size");
    assert_eq!(st.thin_id, base.thin_id, "and stays the same device");
    assert_eq!(st.new_image_size, 128 << 20);
    assert_eq!(t.engine.grown_base_size(""), Some(128 << 20));
    assert_eq!(
        t.engine.grown_base_size("layer"),
        None,
        "only the base's children"
    );

    let t = restart(t, settings("32MiB", 0));
    let st = t.engine.status().await.expect("status").base;
    assert_eq!((st.size, st.new_image_size), (64 << 20, 64 << 20));
    assert_eq!(t.engine.grown_base_size(""), None);
}

#[tokio::test]
async fn no_spare_of_the_base_is_kept_at_the_old_size() {
    let t = setup_with(settings("64MiB", 2));
    t.engine.refill_until_idle().await;
    assert!(
        t.engine.spare_of("").is_some(),
        "a spare of the base at first"
    );
    let t = restart(t, settings("128MiB", 2));
    t.engine.refill_until_idle().await;
    assert_eq!(t.engine.spare_of(""), None);
}
