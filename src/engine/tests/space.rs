//! The free-space floor, the size label, autogrow and `thinsnap pool grow` (`super::super::space`).

use super::*;

#[tokio::test]
async fn prepare_below_the_free_space_floor_is_refused_and_remove_still_works() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    // 1000 bytes total, 950 used: 5% free, under the default 10% floor.
    t.pool.set_space(1000, 950);
    let err = prep(&t, "b", "").await.expect_err("below floor");
    match &err {
        EngineError::ResourceExhausted(m) => {
            assert!(m.contains("data space free") && m.contains("10%"), "{m}")
        }
        e => panic!("wrong error {e}"),
    }
    assert!(
        t.engine.record("b").expect("rec").is_none(),
        "nothing half made"
    );
    assert_err!(
        t.engine.create(Kind::View, "v", "", no_labels()).await,
        ResourceExhausted
    );
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit works on a full pool");
    t.engine
        .remove("c")
        .await
        .expect("remove works on a full pool");
    t.pool.set_space(1000, 0);
    prep(&t, "b", "").await.expect("prepare works again");
}

#[tokio::test]
async fn a_host_that_cannot_back_the_sparse_files_is_under_the_floor() {
    const GIB: u64 = 1 << 30;
    let t = setup();
    t.pool.set_space(10 * GIB, 0);
    // Plenty on the host: Prepare works.
    t.pool.set_host_space(100 * GIB, 9 * GIB);
    prep(&t, "a", "").await.expect("host backs the pool");
    // The files promise 9.8 GiB more but the host has 0.5 GiB: only 0.7 GiB of the pool's
    // free space can be written, under the 10% floor (1 GiB): refused, saying why.
    t.pool.set_host_space(GIB / 2, 98 * GIB / 10);
    match prep(&t, "b", "").await {
        Err(EngineError::ResourceExhausted(m)) => {
            assert!(m.contains("host filesystem"), "{m}")
        }
        other => panic!("expected ResourceExhausted, got {:?}", other.map(|_| ())),
    }
    assert!(t.engine.record("b").expect("rec").is_none());
    // Remove still works, and space on the host lets Prepare go on.
    t.engine.remove("a").await.expect("remove");
    t.pool.set_host_space(20 * GIB, 9 * GIB);
    prep(&t, "b", "").await.expect("host freed");
}

#[tokio::test]
async fn size_label_is_checked() {
    let t = setup();
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), "1MiB".to_string());
    assert!(matches!(
        t.engine.create(Kind::Active, "small", "", l).await,
        Err(EngineError::InvalidArgument(m)) if m.contains("smaller")
    ));
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), "lots".to_string());
    assert_err!(
        t.engine.create(Kind::Active, "bad", "", l).await,
        InvalidArgument
    );
    // Not a whole number of sectors: every discard of the device would fail.
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), "10737418241".to_string());
    assert!(matches!(
        t.engine.create(Kind::Active, "odd", "", l).await,
        Err(EngineError::InvalidArgument(m)) if m.contains("sector")
    ));
    // More than the pool can ever hold.
    let total = t.pool.status().expect("status").data_total_bytes;
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), format!("{}", total + 512));
    assert!(matches!(
        t.engine.create(Kind::Active, "huge", "", l).await,
        Err(EngineError::InvalidArgument(m)) if m.contains("can ever hold")
    ));
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), "10GiB".to_string());
    t.engine
        .create(Kind::Active, "same", "", l)
        .await
        .expect("equal size needs no growth");
    assert_eq!(t.pool.thin_ids().len(), 2);
}

fn autogrow_settings() -> Settings {
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.autogrow = Some(crate::config::AutogrowConfig {
        enabled: true,
        threshold: crate::config::Percent(80.0),
        step: crate::config::Percent(100.0),
        max_data_size: bytesize::ByteSize::gib(4),
        ..Default::default()
    });
    settings.grow_max = (4 << 30, 16 << 30);
    settings
}

#[tokio::test]
async fn autogrow_grows_a_full_pool_before_the_floor_refuses() {
    const GIB: u64 = 1 << 30;
    let t = setup_with(autogrow_settings());
    t.pool.set_host_room(Some(100 * GIB));
    // 1 GiB, 95% used: under the 10% floor, over the 80% threshold.
    t.pool.set_space(GIB, GIB / 100 * 95);
    prep(&t, "a", "").await.expect("grown, then prepared");
    assert_eq!(t.pool.status().expect("status").data_total_bytes, 2 * GIB);
    assert!(t.pool.calls().iter().any(|c| c.starts_with("grow")));

    // The maximum (4 GiB) stops it: 2 -> 4, then no further.
    t.pool.set_space(2 * GIB, 2 * GIB / 100 * 95);
    assert!(t.engine.autogrow().await.expect("autogrow"));
    assert_eq!(t.pool.status().expect("status").data_total_bytes, 4 * GIB);
    t.pool.set_space(4 * GIB, 4 * GIB / 100 * 95);
    assert!(!t.engine.autogrow().await.expect("autogrow"));
    let err = prep(&t, "b", "")
        .await
        .expect_err("at the maximum: refused");
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
    assert!(t.engine.record("b").expect("read").is_none());
}

#[tokio::test]
async fn autogrow_never_takes_more_than_the_host_has() {
    const GIB: u64 = 1 << 30;
    let t = setup_with(autogrow_settings());
    t.pool.set_space(GIB, GIB / 100 * 95);
    t.pool.set_host_room(Some(0));
    let err = prep(&t, "a", "")
        .await
        .expect_err("no room on the host: refused");
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
    assert_eq!(t.pool.status().expect("status").data_total_bytes, GIB);
    // Room for half the step: it grows by that much.
    t.pool.set_host_room(Some(GIB / 2));
    prep(&t, "a", "").await.expect("grown by what the host has");
    assert_eq!(
        t.pool.status().expect("status").data_total_bytes,
        GIB + GIB / 2
    );
}

#[tokio::test]
async fn without_autogrow_a_full_pool_is_refused_and_never_grown() {
    const GIB: u64 = 1 << 30;
    let t = setup();
    t.pool.set_host_room(Some(100 * GIB));
    t.pool.set_space(GIB, GIB / 100 * 95);
    assert!(prep(&t, "a", "").await.is_err());
    assert!(!t.engine.autogrow().await.expect("autogrow"));
    assert!(!t.pool.calls().iter().any(|c| c.starts_with("grow")));
}

/// `thinsnap pool grow` keeps to autogrow's bounds: above the configured maximum it is refused
/// (InvalidArgument naming both sizes), beyond the host's room too (ResourceExhausted), and the
/// pool is not grown; within both it grows.
#[tokio::test]
async fn a_requested_grow_is_capped_like_autogrow() {
    const GIB: u64 = 1 << 30;
    let t = setup_with(autogrow_settings());
    t.pool.set_space(GIB, 0);
    // Free 10 GiB, of which the sparse files already promise 8: room for 2 GiB more.
    t.pool.set_host_space(10 * GIB, 8 * GIB);
    let err = t
        .engine
        .grow_on_request(Some(100 * 1024 * GIB), None)
        .await
        .expect_err("100TiB is above max_data_size");
    let EngineError::InvalidArgument(msg) = &err else {
        panic!("expected InvalidArgument, got {err:?}");
    };
    assert!(
        msg.contains("100.0 TiB") && msg.contains("4.0 GiB") && msg.contains("max_data_size"),
        "{msg}"
    );
    let err = t
        .engine
        .grow_on_request(None, Some(32 * GIB))
        .await
        .expect_err("above max_metadata_size");
    assert!(matches!(err, EngineError::InvalidArgument(_)), "{err}");
    // 1 -> 4 GiB wants 3 GiB more: the host has room for 2.
    let err = t
        .engine
        .grow_on_request(Some(4 * GIB), None)
        .await
        .expect_err("beyond the host's room");
    let EngineError::ResourceExhausted(msg) = &err else {
        panic!("expected ResourceExhausted, got {err:?}");
    };
    assert!(msg.contains("3.0 GiB") && msg.contains("2.0 GiB"), "{msg}");
    assert!(!t.pool.calls().iter().any(|c| c.starts_with("grow")));
    assert_eq!(t.pool.status().expect("status").data_total_bytes, GIB);
    t.engine
        .grow_on_request(Some(3 * GIB), None)
        .await
        .expect("within both bounds");
    assert_eq!(t.pool.status().expect("status").data_total_bytes, 3 * GIB);
}

fn sized(size: &str) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(SIZE_LABEL.to_string(), size.to_string());
    l
}

/// Prepares with the size label reserve their growth in the free-space floor until they end: of
/// three that meet (each growing a 10 GiB base to 50 GiB in a 100 GiB pool whose floor keeps
/// 10 GiB), two reach the kernel and the third is refused before it, while the two are still
/// under way; once they have ended, their reservations are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_labels_reserve_their_growth_in_the_floor() {
    const GIB: u64 = 1 << 30;
    let t = setup();
    t.pool.set_space(100 * GIB, 0);
    // Activation is the first pool call after create_snap that does not hold the pool's change
    // lock: several calls can wait there together.
    let gate = t.pool.gate("activate");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        let (e, tx) = (t.engine.clone(), tx.clone());
        tokio::spawn(async move {
            let r = e
                .create(Kind::Active, &format!("big{i}"), "", sized("50GiB"))
                .await;
            let _ = tx.send(r.map(|_| ()));
        });
    }
    // Two hold their reservations at the kernel (their activations wait at the gate).
    gate.waiting(2).await;
    let first = tokio::select! {
        r = rx.recv() => r.expect("a result"),
        _ = gate.waiting(3) => panic!("all three passed the floor check together"),
    };
    let err = first.expect_err("the third is refused");
    assert!(
        matches!(&err, EngineError::ResourceExhausted(m)
            if m.contains("40.0 GiB") && m.contains("80.0 GiB") && m.contains(SIZE_LABEL)),
        "{err}"
    );
    gate.open();
    for _ in 0..2 {
        // On the fake pool, growing the filesystem fails (there is no device): the point is
        // that the floor let them through.
        let r = rx.recv().await.expect("a result");
        assert!(
            !matches!(r, Err(EngineError::ResourceExhausted(_))),
            "{r:?}"
        );
    }
    assert_eq!(t.pool.count("create_snap"), 2);
    // Both ended: nothing is reserved any more, and one more passes the floor.
    let r = t
        .engine
        .create(Kind::Active, "big3", "", sized("50GiB"))
        .await;
    assert!(
        !matches!(r, Err(EngineError::ResourceExhausted(_))),
        "{r:?}"
    );
    assert_eq!(t.pool.count("create_snap"), 3);
    assert_eq!(t.pool.count("create_snap"), 3);
}

/// `fs.max_size` bounds the size label: beyond it, InvalidArgument naming the key, before the
/// pool is asked anything.
#[tokio::test]
async fn size_label_beyond_fs_max_size_is_refused() {
    let mut settings = Settings::with_fs(FsConfig {
        max_size: Some(bytesize::ByteSize::gib(20)),
        ..FsConfig::default()
    });
    settings.min_free_percent = 0.0;
    let t = setup_with(settings);
    t.pool.set_space(100 << 30, 0);
    let calls = t.pool.calls().len();
    let err = t
        .engine
        .create(Kind::Active, "big", "", sized("21GiB"))
        .await
        .expect_err("above fs.max_size");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m)
            if m.contains("fs.max_size") && m.contains("\"big\"") && m.contains("20.0 GiB")),
        "{err}"
    );
    assert_eq!(t.pool.calls().len(), calls, "{:?}", t.pool.calls());
    assert!(t.engine.record("big").expect("read").is_none());
    let r = t
        .engine
        .create(Kind::Active, "ok", "", sized("20GiB"))
        .await;
    assert!(!matches!(r, Err(EngineError::InvalidArgument(_))), "{r:?}");
}
