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

fn labelled(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// containerd's standard size label (`containerd.io/snapshot/max-size`, decimal bytes, what its
/// CRI copies from a pod's annotations) sizes a snapshot as thinsnap's own label does, with the
/// same checks, each error naming the label that asked; given both, thinsnap's own wins. (The
/// grown device and filesystem on real dm-thin, through containerd's CRI:
/// `integration/cri-test`'s `max-size annotation` checks.)
#[tokio::test]
async fn containerds_max_size_label_is_checked_as_the_size_label_is() {
    const GIB: u64 = 1 << 30;
    let mut s = settings("1GiB", 0);
    s.fs.max_size = Some("8GiB".parse().expect("size"));
    let t = setup_with(s);
    let max = |v: &str| labelled(&[(MAX_SIZE_LABEL, v)]);
    let refused = |r: Result<Vec<Mount>, EngineError>, what: &str| match r {
        Err(EngineError::InvalidArgument(m)) => {
            assert!(m.contains(MAX_SIZE_LABEL) && m.contains(what), "{m}");
        }
        other => panic!("{what}: {other:?}"),
    };
    // Smaller than the parent (the base, 1 GiB), units, a part of a sector, above fs.max_size.
    refused(
        t.engine
            .create(Kind::Active, "small", "", max(&(GIB / 2).to_string()))
            .await,
        "smaller than its parent",
    );
    refused(
        t.engine
            .create(Kind::Active, "units", "", max("2GiB"))
            .await,
        "decimal",
    );
    refused(
        t.engine
            .create(Kind::Active, "odd", "", max("1073742000"))
            .await,
        "sector",
    );
    refused(
        t.engine
            .create(Kind::Active, "huge", "", max(&(9 * GIB).to_string()))
            .await,
        "fs.max_size",
    );
    // The parent's size exactly: no growth, a snapshot like any other.
    t.engine
        .create(Kind::Active, "same", "", max(&GIB.to_string()))
        .await
        .expect("the parent's size");
    // Larger: the growth is reserved in the floor under the label's name (here refused, the
    // fake pool's 100 GiB holding less than a 90 GiB growth above its floor).
    t.pool.set_space(100 * GIB, 0);
    let err = t
        .engine
        .create(Kind::Active, "big", "", max(&(91 * GIB).to_string()))
        .await
        .expect_err("more than the floor leaves");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) | EngineError::ResourceExhausted(m) if m.contains(MAX_SIZE_LABEL)),
        "{err}"
    );
    // Both labels: thinsnap's own wins (a valid 2 GiB would pass; its 512 MiB is refused as
    // smaller than the parent, naming it), and a bad max-size is refused even then.
    let both = labelled(&[
        (SIZE_LABEL, "512MiB"),
        (MAX_SIZE_LABEL, &(2 * GIB).to_string()),
    ]);
    let err = t
        .engine
        .create(Kind::Active, "both", "", both)
        .await
        .expect_err("thinsnap's own label wins");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains(SIZE_LABEL) && !m.contains(MAX_SIZE_LABEL)),
        "{err}"
    );
    let both = labelled(&[(SIZE_LABEL, "1GiB"), (MAX_SIZE_LABEL, "lots")]);
    refused(
        t.engine.create(Kind::Active, "both2", "", both).await,
        "decimal",
    );
}
