//! `remove.async` and the reaper (`super::super::reaper`): Remove answers at once, the device goes later.

use super::*;

#[tokio::test(start_paused = true)]
async fn async_remove_answers_at_once_and_reaps_when_unmounted() {
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.remove_async = true;
    let t = Arc::new(setup_with(settings));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let reaper = {
        let e = t.engine.clone();
        tokio::spawn(async move { e.run_reaper(stop).await })
    };
    prep(&t, "a", "").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.set_busy(id, true);
    t.engine
        .remove("a")
        .await
        .expect("remove does not wait for a busy device");
    assert!(t.engine.record("a").expect("rec").is_none());
    prep(&t, "a", "")
        .await
        .expect("the key is free again at once");
    // The reaper's first try meets the busy device and keeps it.
    let tried = format!("deactivate {id}");
    eventually("the reaper tries the device", || {
        t.pool.calls().contains(&tried)
    })
    .await;
    assert!(t.pool.thin_ids().contains(&id), "busy device deleted");
    assert!(
        t.engine.thin_ids().expect("ids").contains(&id),
        "record of a device not yet deleted dropped"
    );
    // Unmounted: a retry deletes it and forgets its record.
    t.pool.set_busy(id, false);
    eventually("the reaper retries", || !t.pool.thin_ids().contains(&id)).await;
    eventually("the record goes", || {
        !t.engine.thin_ids().expect("ids").contains(&id)
    })
    .await;
    stop_tx.send(true).expect("stop");
    reaper.await.expect("the reaper stops when told");
}

#[tokio::test(start_paused = true)]
async fn reaper_finishes_deletes_left_by_a_crash() {
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.remove_async = true;
    let t = setup_with(settings.clone());
    prep(&t, "a", "").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.set_busy(id, true);
    // Recovery cannot delete a busy device either: the record stays Deleting.
    t.engine.remove("a").await.expect("remove");
    let T {
        _dir,
        path,
        pool,
        engine,
    } = t;
    drop(engine);
    let store = reopen(&path);
    let (engine, _) = recovery::start(pool.clone(), store, settings, &no_format).expect("start");
    let engine = Arc::new(engine);
    assert!(engine.thin_ids().expect("ids").contains(&id));
    pool.set_busy(id, false);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let reaper = {
        let e = engine.clone();
        tokio::spawn(async move { e.run_reaper(stop).await })
    };
    eventually("the restarted reaper deletes the leftover", || {
        !pool.thin_ids().contains(&id)
    })
    .await;
    stop_tx.send(true).expect("stop");
    reaper.await.expect("join");
}

#[tokio::test]
async fn discard_precedes_delete_when_configured() {
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.discard = true;
    let t = setup_with(settings);
    prep(&t, "a", "").await.expect("a");
    let id = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.engine.remove("a").await.expect("remove");
    let calls = t.pool.calls();
    let d = calls
        .iter()
        .position(|c| c == &format!("discard {id}"))
        .expect("discarded");
    let del = calls
        .iter()
        .position(|c| c == &format!("delete {id}"))
        .expect("deleted");
    assert!(d < del);
}
