//! Upgrades: a database written by an earlier release of thinsnap (kept as a fixture,
//! `src/store/fixtures/`) is migrated by `Store::open` and served by the engine as it was.
//!
//! The fixture of schema 1 was written by the test below that writes the current schema, on the
//! release that had schema 1: before a change of `SCHEMA_VERSION`, run
//! `THINSNAP_WRITE_FIXTURE=$PWD/src/store/fixtures/schema-N cargo test --lib
//! the_current_schema_is_written` to keep the outgoing schema's database, and add a test like
//! the one of schema 1 here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crash_tests::copy_dir;
use super::tests::start_on;
use super::*;
use crate::pool::fake::FakePool;
use crate::pool::ThinPool;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The calls behind every fixture: a layer committed with labels, a second layer on it, an
/// active snapshot and a view on the top layer, and a removed key (so thin ids have a gap).
async fn fill(engine: &Engine) {
    let gc = labels(&[("containerd.io/gc.root", "yes")]);
    engine
        .create(Kind::Active, "extract-1", "", BTreeMap::new())
        .await
        .expect("prepare extract-1");
    engine
        .commit("layer-1", "extract-1", gc.clone())
        .await
        .expect("commit layer-1");
    engine
        .create(Kind::Active, "extract-2", "layer-1", BTreeMap::new())
        .await
        .expect("prepare extract-2");
    engine
        .commit("layer-2", "extract-2", labels(&[("l", "two")]))
        .await
        .expect("commit layer-2");
    engine
        .create(Kind::Active, "gone", "layer-2", BTreeMap::new())
        .await
        .expect("prepare gone");
    engine.remove("gone").await.expect("remove gone");
    engine
        .create(Kind::Active, "container", "layer-2", labels(&[("c", "1")]))
        .await
        .expect("prepare container");
    engine
        .create(Kind::View, "view", "layer-2", BTreeMap::new())
        .await
        .expect("view");
    engine.shutdown().await.expect("flush");
}

/// Writes a database of the current schema with the calls of [`fill`], checks that it is stamped
/// with [`crate::store::SCHEMA_VERSION`] and reads back; with THINSNAP_WRITE_FIXTURE=<dir> (a
/// directory that does not exist yet) it is also kept there, as the fixture of this schema for
/// the release that replaces it.
#[tokio::test]
async fn the_current_schema_is_written_and_can_be_kept_as_a_fixture() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("db");
    let (engine, _) = start_on(&path, Arc::new(FakePool::new()));
    fill(&engine).await;
    drop(engine);
    let store = crate::store::open_after_drop(&path);
    assert_eq!(store.snapshots().expect("snapshots").len(), 4);
    drop(store);
    assert_eq!(
        crate::store::schema_version_at(&path).expect("schema"),
        crate::store::SCHEMA_VERSION
    );
    if let Ok(keep) = std::env::var("THINSNAP_WRITE_FIXTURE") {
        let keep = PathBuf::from(keep);
        assert!(!keep.exists(), "{} exists already", keep.display());
        copy_dir(&path, &keep);
    }
}

/// Copies the fixture `name` into a temporary directory (a test never writes the fixture).
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/store/fixtures")
        .join(name);
    assert!(src.is_dir(), "fixture {} missing", src.display());
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = tmp.path().join("db");
    copy_dir(&src, &dst);
    (tmp, dst)
}

#[tokio::test]
async fn a_database_of_schema_1_is_migrated_and_served_as_it_was() {
    let (_tmp, path) = copy_fixture("schema-1");
    assert_eq!(
        crate::store::schema_version_at(&path).expect("read the fixture's schema"),
        1
    );
    // The pool as the old release left it: every thin id its records name.
    let pool = Arc::new(FakePool::new());
    {
        let store = crate::store::open_after_drop(&path); // opens and migrates
        for dev in store.devices().expect("devices") {
            pool.create_thin(dev.thin_id).expect("thin id");
        }
        store.flush_sync().expect("flush");
    }
    assert_eq!(
        crate::store::schema_version_at(&path).expect("schema after open"),
        crate::store::SCHEMA_VERSION,
        "the migration is durable"
    );
    let (engine, _) = start_on(&path, pool.clone());
    let mut keys: Vec<(String, &str, String)> = engine
        .list(&[])
        .await
        .expect("list")
        .into_iter()
        .map(|i| (i.key, i.kind.as_str(), i.parent))
        .collect();
    keys.sort();
    let t = |k: &str, kind: Kind, p: &str| (k.to_string(), kind.as_str(), p.to_string());
    assert_eq!(
        keys,
        vec![
            t("container", Kind::Active, "layer-2"),
            t("layer-1", Kind::Committed, ""),
            t("layer-2", Kind::Committed, "layer-1"),
            t("view", Kind::View, "layer-2"),
        ]
    );
    let l1 = engine.stat("layer-1").await.expect("stat layer-1");
    assert_eq!(
        l1.labels.get("containerd.io/gc.root").map(String::as_str),
        Some("yes")
    );
    let c = engine.stat("container").await.expect("stat container");
    assert_eq!(c.labels.get("c").map(String::as_str), Some("1"));
    // Still a working database: new snapshots get fresh thin ids, old ones can go.
    engine
        .create(Kind::Active, "new", "layer-2", BTreeMap::new())
        .await
        .expect("prepare on a migrated database");
    engine.remove("view").await.expect("remove view");
    engine.remove("container").await.expect("remove container");
    engine.remove("new").await.expect("remove new");
    engine.remove("layer-2").await.expect("remove layer-2");
    engine.remove("layer-1").await.expect("remove layer-1");
    assert_eq!(engine.list(&[]).await.expect("list").len(), 0);
}
