//! The store's unit tests (records, transactions, flushes, thin id allocation).

use super::*;

/// sled 0.34's own `flush_async` never wakes when several are polled at once
/// (spacejam/sled#1241, #1308): the engine's flushes from concurrent calls hung the daemon
/// (found by benches/startup_store.rs, whose fake pool makes calls fast enough to overlap).
/// The bound turns a hang into a failure; it is not a timing assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_flushes_all_complete() {
    let (_dir, store) = open();
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u32 {
                store
                    .meta
                    .insert(format!("t{t}-{i}"), &i.to_be_bytes())
                    .expect("insert");
                store.flush().await.expect("flush");
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("task");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(300), all)
        .await
        .expect("every flush completes (sled's flush_async deadlock)");
    // plus the schema version and the writer
    assert_eq!(store.meta.len(), 32 * 50 + 2);
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("open");
    (dir, store)
}

fn base(store: &Store) -> BaseRecord {
    let id = store.begin_device(BASE_OWNER, 1 << 30).expect("base id");
    let b = BaseRecord {
        thin_id: id,
        fs_type: "ext4".into(),
        size: 1 << 30,
        mapped: 4096,
    };
    store.set_base(&b).expect("set base");
    b
}

fn new(key: &str, kind: Kind, parent: Option<&str>) -> NewSnapshot {
    NewSnapshot {
        key: key.to_string(),
        kind,
        parent: parent.map(str::to_string),
        labels: BTreeMap::new(),
        now: 1,
        size: None,
        roll_forward: false,
    }
}

#[test]
fn create_commit_remove_cycle() {
    let (_d, s) = open();
    let b = base(&s);
    let plan = s
        .begin_create(&new("a", Kind::Active, None), &b)
        .expect("begin");
    assert_eq!(plan.origin, b.thin_id);
    assert_ne!(plan.thin_id, b.thin_id);
    assert_eq!(s.get("a").expect("get").expect("a").state, State::Creating);
    s.finish_create("a").expect("finish");
    let c = s.commit("a", "c", BTreeMap::new(), 100, 2).expect("commit");
    assert_eq!(c.kind, Kind::Committed);
    assert_eq!(c.thin_id, plan.thin_id);
    assert!(s.get("a").expect("get").is_none());
    let child = s
        .begin_create(&new("b", Kind::Active, Some("c")), &b)
        .expect("child");
    assert_eq!(child.origin, plan.thin_id);
    s.finish_create("b").expect("finish b");
    assert!(s.get("c").expect("get").expect("exists").children > 0);
    let removed = s.begin_remove("b").expect("remove b");
    assert_eq!(removed.thin_id, child.thin_id);
    assert_eq!(s.get("c").expect("get").expect("exists").children, 0);
    let dev = s.devices().expect("devices");
    assert!(dev
        .iter()
        .any(|d| d.thin_id == child.thin_id && d.state == State::Deleting));
    s.forget_device(child.thin_id).expect("forget");
    assert!(!s
        .devices()
        .expect("devices")
        .iter()
        .any(|d| d.thin_id == child.thin_id));
}

#[test]
fn duplicate_keys_and_bad_parents_are_refused_without_change() {
    let (_d, s) = open();
    let b = base(&s);
    s.begin_create(&new("a", Kind::Active, None), &b)
        .expect("a");
    s.finish_create("a").expect("finish");
    let before = s.devices().expect("devices");
    assert!(matches!(
        s.begin_create(&new("a", Kind::Active, None), &b),
        Err(StoreError::AlreadyExists(k)) if k == "a"
    ));
    assert!(matches!(
        s.begin_create(&new("x", Kind::Active, Some("missing")), &b),
        Err(StoreError::NotFound(k)) if k == "missing"
    ));
    assert!(matches!(
        s.begin_create(&new("x", Kind::Active, Some("a")), &b),
        Err(StoreError::FailedPrecondition(_))
    ));
    assert_eq!(s.devices().expect("devices"), before);
    assert!(s.get("x").expect("get").is_none());
}

#[test]
fn commit_checks_kind_and_name() {
    let (_d, s) = open();
    let b = base(&s);
    s.begin_create(&new("v", Kind::View, None), &b).expect("v");
    s.finish_create("v").expect("finish");
    assert!(matches!(
        s.commit("v", "n", BTreeMap::new(), 0, 1),
        Err(StoreError::FailedPrecondition(_))
    ));
    s.begin_create(&new("a", Kind::Active, None), &b)
        .expect("a");
    s.finish_create("a").expect("finish");
    assert!(matches!(
        s.commit("a", "v", BTreeMap::new(), 0, 1),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.commit("zz", "n", BTreeMap::new(), 0, 1),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.get("a").expect("get").expect("a").kind, Kind::Active);
}

#[test]
fn thin_ids_are_unique_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let mut ids = std::collections::BTreeSet::new();
    {
        let s = Store::open(&path).expect("open");
        let b = base(&s);
        ids.insert(b.thin_id);
        for i in 0..20 {
            let p = s
                .begin_create(&new(&format!("k{i}"), Kind::Active, None), &b)
                .expect("c");
            assert!(ids.insert(p.thin_id), "thin id {} reused", p.thin_id);
        }
        s.flush_sync().expect("flush");
    }
    let s = open_after_drop(&path);
    let b = s.base().expect("base").expect("base kept");
    let p = s
        .begin_create(&new("after", Kind::Active, None), &b)
        .expect("c");
    assert!(
        ids.insert(p.thin_id),
        "thin id {} reused after reopen",
        p.thin_id
    );
    assert_eq!(s.snapshots().expect("list").len(), 21);
}

#[test]
fn concurrent_creates_of_one_key_have_one_winner() {
    let (_d, s) = open();
    let b = base(&s);
    let wins: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                let b = b.clone();
                scope.spawn(move || s.begin_create(&new("same", Kind::Active, None), &b).is_ok())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join") as usize)
            .sum()
    });
    assert_eq!(wins, 1);
    assert_eq!(s.devices().expect("devices").len(), 2);
}

#[test]
fn keys_with_any_bytes_keep_children_apart() {
    let (_d, s) = open();
    let b = base(&s);
    for key in ["p", "p\u{0}x"] {
        s.begin_create(&new(key, Kind::Active, None), &b)
            .expect("c");
        s.finish_create(key).expect("f");
        s.commit(key, &format!("{key}-c"), BTreeMap::new(), 0, 1)
            .expect("commit");
    }
    s.begin_create(&new("child", Kind::Active, Some("p\u{0}x-c")), &b)
        .expect("child");
    assert_eq!(s.get("p-c").expect("get").expect("exists").children, 0);
    assert!(s.get("p\u{0}x-c").expect("get").expect("exists").children > 0);
}

/// Writes `version` and `writer` into a database's metadata as a release of that schema would.
fn stamp(path: &std::path::Path, version: u32, writer: Option<&str>) {
    let store = open_after_drop(path);
    store
        .meta
        .insert(META_SCHEMA, &version.to_be_bytes())
        .expect("stamp schema");
    match writer {
        Some(w) => store.meta.insert(META_WRITER, w.as_bytes()).map(|_| ()),
        None => store.meta.remove(META_WRITER).map(|_| ()),
    }
    .expect("stamp writer");
    store.flush_sync().expect("flush");
}

#[test]
fn a_new_database_is_stamped_with_the_schema_and_its_writer() {
    let (dir, store) = open();
    assert_eq!(store.writer().expect("writer").as_deref(), Some(WRITER));
    drop(store);
    assert_eq!(
        schema_version_at(&dir.path().join("db")).expect("schema"),
        SCHEMA_VERSION
    );
}

#[test]
fn a_database_of_a_newer_thinsnap_is_refused_naming_both_versions() {
    let (dir, store) = open();
    let path = dir.path().join("db");
    drop(store);
    stamp(&path, SCHEMA_VERSION + 1, Some("thinsnap 9.9.9"));
    let Err(err) = retry_while_locked(|| Store::open(&path)) else {
        panic!("a newer database was opened");
    };
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Newer { .. }), "{msg}");
    assert!(
        msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{msg}"
    );
    assert!(msg.contains("thinsnap 9.9.9"), "{msg}");
    assert!(msg.contains(WRITER), "{msg}");
    assert!(msg.contains(&format!("up to {SCHEMA_VERSION}")), "{msg}");
    // Nothing was written: the newer release still finds its own version.
    assert_eq!(
        schema_version_at(&path).expect("schema"),
        SCHEMA_VERSION + 1
    );
}

#[test]
fn an_older_schema_is_migrated_step_by_step_and_durably() {
    let (dir, store) = open();
    let path = dir.path().join("db");
    drop(store);
    // Schema 1 as that release left it: no writer.
    stamp(&path, 1, None);
    let store = open_after_drop(&path);
    assert_eq!(store.writer().expect("writer").as_deref(), Some(WRITER));
    drop(store);
    assert_eq!(schema_version_at(&path).expect("schema"), SCHEMA_VERSION);
}

#[test]
fn every_older_schema_has_a_migration_step() {
    for v in 1..SCHEMA_VERSION {
        assert!(
            MIGRATIONS.iter().any(|m| m.from == v),
            "no migration from schema {v}"
        );
    }
    assert!(MIGRATIONS.iter().all(|m| m.from < SCHEMA_VERSION));
}

/// Adopted foreign thin ids are never handed out, also when the allocator comes round to them
/// again (the 24-bit space wraps).
#[test]
fn foreign_ids_are_never_allocated() {
    let (_dir, store) = open();
    assert_eq!(store.pool_identity().expect("read"), None);
    store.set_pool_identity("loop pool p").expect("set");
    assert_eq!(
        store.pool_identity().expect("read").as_deref(),
        Some("loop pool p")
    );
    let foreign: std::collections::BTreeSet<ThinId> =
        [0, 1, 3].into_iter().map(ThinId::from).collect();
    store.add_foreign_ids(&foreign).expect("adopt");
    assert_eq!(store.foreign_ids().expect("read"), foreign);
    assert_eq!(store.begin_device("a", 1).expect("alloc"), 4);
    // As if the ids had wrapped: the allocator starts at 0 again and skips the foreign ones.
    store
        .meta
        .insert(META_NEXT_ID, &0u32.to_be_bytes())
        .expect("rewind");
    assert_eq!(store.begin_device("b", 1).expect("alloc"), 2);
    assert_eq!(store.begin_device("c", 1).expect("alloc"), 5);
}

/// The retry of tests that reopen a database waits only for sled's lock: a held lock is
/// recognised as such, other errors are not.
#[test]
fn a_held_lock_is_told_apart_from_other_errors() {
    let (dir, store) = open();
    let err = Store::open(&dir.path().join("db"))
        .err()
        .expect("opened twice");
    assert!(is_locked(&err), "{err}");
    drop(store);
    let newer = StoreError::Newer {
        path: "db".into(),
        found: SCHEMA_VERSION + 1,
        supported: SCHEMA_VERSION,
        writer: "thinsnap 9.9.9".into(),
    };
    assert!(!is_locked(&newer));
}
