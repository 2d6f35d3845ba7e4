//! Each call of the Snapshots API against the fake pool: its success path, its status codes, the
//! limits of what a request may carry, calls that race.

use super::*;

/// The keys `list` answers for `filters`.
async fn keys_listed(t: &T, filters: &[String]) -> Vec<String> {
    t.engine
        .list(filters)
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key)
        .collect()
}

#[tokio::test]
async fn prepare_commit_prepare_child_remove() {
    let t = setup();
    let m = prep(&t, "a", "").await.expect("prepare");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].fs_type, "ext4");
    let a = t.engine.record("a").expect("rec").expect("a");
    assert_eq!(m[0].source, format!("/dev/mapper/fake-snap-{}", a.thin_id));
    assert!(t.pool.active().contains(&a.thin_id));
    assert!(t
        .pool
        .calls()
        .contains(&format!("create_snap {} {}", a.thin_id, t.base_id())));

    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    assert!(
        !t.pool.active().contains(&a.thin_id),
        "committed device still active"
    );
    assert_eq!(
        t.engine.stat("c").await.expect("stat").kind,
        Kind::Committed
    );
    assert_err!(t.engine.stat("a").await, NotFound);

    prep(&t, "b", "c").await.expect("child");
    let b = t.engine.record("b").expect("rec").expect("b");
    assert!(t
        .pool
        .calls()
        .contains(&format!("create_snap {} {}", b.thin_id, a.thin_id)));
    assert_err!(t.engine.remove("c").await, FailedPrecondition);
    t.engine.remove("b").await.expect("remove b");
    t.engine.remove("c").await.expect("remove c");
    assert_eq!(t.pool.thin_ids(), [t.base_id()].into());
    assert!(t.pool.active().is_empty());
}

#[tokio::test]
async fn status_codes_for_bad_requests() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    t.engine
        .create(Kind::View, "v", "", no_labels())
        .await
        .expect("view");
    assert_err!(prep(&t, "a", "").await, AlreadyExists);
    assert_err!(prep(&t, "", "").await, InvalidArgument);
    assert_err!(prep(&t, "x", "nope").await, NotFound);
    assert_err!(prep(&t, "x", "a").await, FailedPrecondition);
    assert_err!(
        t.engine.commit("n", "v", no_labels()).await,
        FailedPrecondition
    );
    assert_err!(t.engine.commit("v", "a", no_labels()).await, AlreadyExists);
    assert_err!(t.engine.remove("zz").await, NotFound);
    assert_err!(t.engine.mounts("zz").await, NotFound);
    assert_err!(
        t.engine.list(&["name==\"x".to_string()]).await,
        InvalidArgument
    );
    let huge = "k".repeat(MAX_KEY_LEN + 1);
    assert_err!(prep(&t, &huge, "").await, InvalidArgument);
    let mut labels = BTreeMap::new();
    labels.insert("l".to_string(), "v".repeat(MAX_LABEL_LEN));
    assert_err!(
        t.engine.create(Kind::Active, "big", "", labels).await,
        InvalidArgument
    );
    // Nothing of the refused calls was stored.
    let names: Vec<_> = keys_listed(&t, &[]).await;
    assert_eq!(names, vec!["a", "v"]);
    assert_eq!(t.pool.thin_ids().len(), 3);
}

#[tokio::test]
async fn usage_excludes_the_parent() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let a = t.engine.record("a").expect("rec").expect("a").thin_id;
    t.pool.write(a, 1000);
    assert_eq!(t.engine.usage("a").await.expect("usage").size, 1000);
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    assert_eq!(t.engine.usage("c").await.expect("usage").size, 1000);
    prep(&t, "b", "c").await.expect("b");
    let b = t.engine.record("b").expect("rec").expect("b").thin_id;
    assert_eq!(t.engine.usage("b").await.expect("usage").size, 0);
    t.pool.write(b, 300);
    assert_eq!(t.engine.usage("b").await.expect("usage").size, 300);
}

#[tokio::test]
async fn update_changes_only_labels() {
    let t = setup();
    let mut l = BTreeMap::new();
    l.insert("a".to_string(), "1".to_string());
    l.insert("b".to_string(), "2".to_string());
    t.engine.create(Kind::Active, "k", "", l).await.expect("k");
    let mut new = BTreeMap::new();
    new.insert("b".to_string(), "3".to_string());
    new.insert("c".to_string(), "4".to_string());
    let info = t
        .engine
        .update("k", new.clone(), &["labels.b".into(), "labels.a".into()])
        .await
        .expect("update");
    let want: BTreeMap<String, String> = [("b".to_string(), "3".to_string())].into();
    assert_eq!(
        info.labels, want,
        "labels.a removed, labels.b set, c untouched"
    );
    let info = t
        .engine
        .update("k", new.clone(), &[])
        .await
        .expect("replace all");
    assert_eq!(info.labels, new);
    assert_err!(
        t.engine.update("k", new.clone(), &["parent".into()]).await,
        InvalidArgument
    );
    assert_err!(t.engine.update("nope", new, &[]).await, NotFound);
}

#[tokio::test]
async fn list_filters() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    let mut l = BTreeMap::new();
    l.insert("containerd.io/gc.root".to_string(), "y".to_string());
    t.engine.create(Kind::Active, "b", "c", l).await.expect("b");
    t.engine
        .create(Kind::View, "v", "c", no_labels())
        .await
        .expect("v");
    let names = |v: Vec<SnapshotInfo>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    let l = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(t.engine.list(&l(&["kind==committed"])).await.expect("l")),
        ["c"]
    );
    assert_eq!(
        names(
            t.engine
                .list(&l(&["kind==view", "name==b"]))
                .await
                .expect("l")
        ),
        ["b", "v"]
    );
    assert_eq!(
        names(t.engine.list(&l(&["parent!=\"\""])).await.expect("l")),
        ["b", "v"]
    );
    assert_eq!(
        names(
            t.engine
                .list(&l(&["labels.\"containerd.io/gc.root\"==y,kind==active"]))
                .await
                .expect("l")
        ),
        ["b"]
    );
}

#[tokio::test]
async fn concurrent_prepares_of_one_key_have_one_winner() {
    let t = Arc::new(setup());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let t = t.clone();
        tasks.push(tokio::spawn(
            async move { prep(&t, "same", "").await.is_ok() },
        ));
    }
    let mut wins = 0;
    for task in tasks {
        wins += task.await.expect("join") as usize;
    }
    assert_eq!(wins, 1);
    assert_eq!(t.pool.thin_ids().len(), 2);
}

#[tokio::test]
async fn a_key_named_like_the_base_owner_is_an_ordinary_snapshot() {
    // Keys are opaque: "<base>" is the base device record's owner name, and a client may use it
    // as a key. Its device must survive a restart with its snapshot.
    let t = setup();
    prep(&t, crate::store::BASE_OWNER, "")
        .await
        .expect("prepare");
    let id = t
        .engine
        .record(crate::store::BASE_OWNER)
        .expect("rec")
        .expect("snapshot")
        .thin_id;
    let (t, report) = t.restart();
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    assert!(t.pool.thin_ids().contains(&id), "its device was deleted");
    t.engine
        .stat(crate::store::BASE_OWNER)
        .await
        .expect("still there after a restart");
    t.engine
        .commit("c", crate::store::BASE_OWNER, no_labels())
        .await
        .expect("commit");
    let (t, report) = t.restart();
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    prep(&t, "child", "c").await.expect("child of it");
}

#[tokio::test]
async fn binary_keys_and_labels_are_opaque_and_too_many_labels_are_refused() {
    let t = setup();
    let key = "ns/1/\u{0}key\nwith\tcontrol\u{7f} and ünïcødé \u{1F600}";
    let mut labels = BTreeMap::new();
    labels.insert("bin\u{0}ary".to_string(), "\u{0}\u{1}\u{2}\n".to_string());
    t.engine
        .create(Kind::Active, key, "", labels.clone())
        .await
        .expect("a binary key is just bytes");
    let info = t.engine.stat(key).await.expect("stat");
    assert_eq!(info.key, key);
    assert_eq!(info.labels, labels);
    t.engine
        .commit("c\u{0}", key, no_labels())
        .await
        .expect("commit");
    prep(&t, "child\u{0}", "c\u{0}")
        .await
        .expect("child of a binary name");
    let keys: Vec<_> = keys_listed(&t, &[]).await;
    assert_eq!(keys, vec!["c\u{0}", "child\u{0}"]);

    let many: BTreeMap<String, String> = (0..=MAX_LABELS)
        .map(|i| (format!("l{i}"), "v".to_string()))
        .collect();
    let err = t
        .engine
        .create(Kind::Active, "many", "", many)
        .await
        .expect_err("257 labels");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains("at most 256")),
        "{err}"
    );
    assert!(t.engine.record("many").expect("read").is_none());
}

#[tokio::test]
async fn remove_racing_prepare_of_a_child_never_orphans_the_child() {
    let t = setup();
    for round in 0..20 {
        let parent = format!("p{round}");
        let tmp = format!("t{round}");
        let child = format!("c{round}");
        prep(&t, &tmp, "").await.expect("prepare");
        t.engine
            .commit(&parent, &tmp, no_labels())
            .await
            .expect("commit");
        let (e1, e2) = (t.engine.clone(), t.engine.clone());
        let (p1, p2, c2) = (parent.clone(), parent.clone(), child.clone());
        let remove = tokio::spawn(async move { e1.remove(&p1).await });
        let prepare =
            tokio::spawn(async move { e2.create(Kind::Active, &c2, &p2, BTreeMap::new()).await });
        let removed = remove.await.expect("join");
        let prepared = prepare.await.expect("join");
        match (&removed, &prepared) {
            // The child came first: the parent is refused as a parent.
            (Err(EngineError::FailedPrecondition(_)), Ok(_)) => {
                assert!(t.engine.record(&parent).expect("read").is_some());
            }
            // The removal came first: the child's parent is gone.
            (Ok(()), Err(EngineError::NotFound(_))) => {
                assert!(t.engine.record(&child).expect("read").is_none());
            }
            other => panic!("round {round}: both or neither won: {other:?}"),
        }
    }
    // Every thin id belongs to a record: nothing leaked either way.
    let known = t.engine.thin_ids().expect("ids");
    let in_pool: Vec<_> = t.pool.thin_ids().into_iter().collect();
    assert_eq!(in_pool, known);
}

/// An active snapshot (or view) that is already mounted, as a running container's root
/// filesystem is, is answered as a bind mount of where it is mounted: containerd's differ mounts
/// Mounts' answer read-only, which the kernel refuses for a device mounted read-write elsewhere.
#[tokio::test]
async fn mounts_of_a_mounted_snapshot_is_a_bind_of_its_mount_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = dir.path().join("mountinfo");
    let mut settings = Settings::with_fs(FsConfig::default());
    settings.mount_table = table.clone();
    let t = setup_with(settings);
    let made = prep(&t, "a", "").await.expect("a");
    t.engine
        .create(Kind::View, "v", "", no_labels())
        .await
        .expect("v");
    let id = |k: &str| t.engine.record(k).expect("rec").expect(k).thin_id;
    let (a, v) = (id("a"), id("v"));
    // The table cannot be read: the device, as ever.
    assert_eq!(t.engine.mounts("a").await.expect("mounts"), made);
    // Nothing of ours mounted: the device.
    std::fs::write(&table, "22 1 0:21 / /proc rw - proc proc rw\n").expect("write");
    assert_eq!(t.engine.mounts("a").await.expect("mounts"), made);
    let before = t.pool.thin_ids();
    std::fs::write(
        &table,
        format!(
            "22 1 0:21 / /proc rw - proc proc rw\n\
             90 22 254:{a} / /run/c/a/rootfs rw - ext4 /dev/mapper/fake-snap-{a} rw\n\
             91 22 254:{v} / /run/c/v/rootfs ro - ext4 /dev/mapper/fake-snap-{v} ro\n"
        ),
    )
    .expect("write");
    let bind = |source: &str, mode: &str| {
        vec![Mount {
            fs_type: "bind".into(),
            source: source.into(),
            options: vec!["bind".into(), mode.into()],
        }]
    };
    assert_eq!(
        t.engine.mounts("a").await.expect("mounts"),
        bind("/run/c/a/rootfs", "rw")
    );
    assert_eq!(
        t.engine.mounts("v").await.expect("mounts"),
        bind("/run/c/v/rootfs", "ro")
    );
    // Nothing made for it, and the snapshot commits and goes as any other.
    assert_eq!(t.pool.thin_ids(), before);
    std::fs::write(&table, "").expect("write");
    assert_eq!(t.engine.mounts("a").await.expect("mounts"), made);
    t.engine.remove("v").await.expect("remove v");
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit a");
    t.engine.remove("c").await.expect("remove c");
    assert_eq!(t.pool.thin_ids().len(), before.len() - 2);
}

/// Labels of `n` entries of `len` bytes each (key plus value), keys `l000`...
fn labels_of(n: usize, len: usize) -> BTreeMap<String, String> {
    (0..n)
        .map(|i| {
            let k = format!("l{i:03}");
            let v = "v".repeat(len - k.len());
            (k, v)
        })
        .collect()
}

/// A snapshot's labels total at most MAX_LABELS_BYTES (64 KiB): sixteen maximal labels pass,
/// one byte more is refused on Prepare, Commit and Update alike.
#[tokio::test]
async fn labels_are_capped_in_total() {
    let t = setup();
    let full = labels_of(MAX_LABELS_BYTES / MAX_LABEL_LEN, MAX_LABEL_LEN);
    assert_eq!(
        full.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
        64 * 1024
    );
    t.engine
        .create(Kind::Active, "a", "", full.clone())
        .await
        .expect("64 KiB of labels");
    let mut over = full.clone();
    over.insert("x".into(), String::new());
    let err = t
        .engine
        .create(Kind::Active, "b", "", over.clone())
        .await
        .expect_err("64 KiB + 1");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains("65537") && m.contains("65536")),
        "{err}"
    );
    assert!(t.engine.record("b").expect("read").is_none());
    assert_err!(
        t.engine.commit("c", "a", over.clone()).await,
        InvalidArgument
    );
    assert_err!(
        t.engine.update("a", over, &["labels.x".to_string()]).await,
        InvalidArgument
    );
    assert_eq!(t.engine.stat("a").await.expect("stat").labels, full);
}

/// Update checks what the request carries before it reads the snapshot or copies a label: an
/// immutable field, too many paths or labels beyond the limits are InvalidArgument even for a
/// snapshot that does not exist; and however many times `labels` is named, the result is the
/// request's labels.
#[tokio::test]
async fn update_validates_before_any_work() {
    let t = setup();
    let one = || labels_of(1, 8);
    assert_err!(
        t.engine
            .update("missing", one(), &["kind".to_string()])
            .await,
        InvalidArgument
    );
    let paths: Vec<String> = (0..=MAX_FIELD_PATHS)
        .map(|_| "labels".to_string())
        .collect();
    let err = t
        .engine
        .update("missing", one(), &paths)
        .await
        .expect_err("too many paths");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains(&MAX_FIELD_PATHS.to_string())),
        "{err}"
    );
    assert_err!(
        t.engine
            .update(
                "missing",
                labels_of(MAX_LABELS + 1, 8),
                &["labels.l000".to_string()]
            )
            .await,
        InvalidArgument
    );
    // The bounds are not in the way of a real update.
    t.engine
        .create(Kind::Active, "a", "", labels_of(3, 8))
        .await
        .expect("a");
    let mut want = BTreeMap::new();
    want.insert("new".to_string(), "1".to_string());
    for paths in [
        vec!["labels.l000", "labels"],
        vec!["labels", "labels.l001", "labels", "labels.new"],
    ] {
        let paths: Vec<String> = paths.into_iter().map(String::from).collect();
        let info = t
            .engine
            .update("a", want.clone(), &paths)
            .await
            .expect("update");
        assert_eq!(info.labels, want, "{paths:?}");
    }
    let paths: Vec<String> = (0..MAX_FIELD_PATHS).map(|_| "labels".to_string()).collect();
    t.engine
        .update("a", want.clone(), &paths)
        .await
        .expect("MAX_FIELD_PATHS paths");
    // Set one, remove another (absent from the request).
    let info = t
        .engine
        .update(
            "a",
            labels_of(1, 8),
            &["labels.l000".to_string(), "labels.new".to_string()],
        )
        .await
        .expect("update");
    assert_eq!(info.labels, labels_of(1, 8));
}

/// List takes at most MAX_FILTERS filters; one more is InvalidArgument naming both counts.
#[tokio::test]
async fn list_bounds_its_filters() {
    let t = setup();
    prep(&t, "a", "").await.expect("a");
    let filters: Vec<String> = (0..filter::MAX_FILTERS)
        .map(|i| format!("name==k{i}"))
        .collect();
    assert!(t
        .engine
        .list(&filters)
        .await
        .expect("64 filters")
        .is_empty());
    let mut more = filters.clone();
    more.push("name==a".into());
    let err = t.engine.list(&more).await.expect_err("65 filters");
    assert!(
        matches!(&err, EngineError::InvalidArgument(m) if m.contains("65 filters") && m.contains("64")),
        "{err}"
    );
}
