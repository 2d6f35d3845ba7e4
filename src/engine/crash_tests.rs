//! One durable write per call, and what a crash leaves of an answered call: the flush counts of
//! Prepare, View, Commit, Remove and Update, and recovery's roll-forward of each call whose
//! outcome was written but not flushed (on the fake pool).
//!
//! A crash is simulated as SIGKILL leaves it: the database directory is copied while the engine
//! still runs (sled writes nothing to its files between flushes here: `flush_every_ms` is off
//! and the records are far smaller than its write buffer), and a new engine starts on the copy
//! with the same pool (the kernel keeps its devices across a crash of the daemon).

use std::path::Path;

use super::recovery::Report;
use super::tests::{no_labels, prep, setup, start_on, T};
use super::*;
use crate::store::{CommitIntent, State};

pub(super) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("readdir") {
        let entry = entry.expect("entry");
        let dest = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).expect("copy");
        }
    }
}

impl T {
    /// What a SIGKILL now leaves: the database as of its last flush, the pool as it is.
    pub(super) fn crash(self) -> (T, Report) {
        let T {
            _dir,
            path,
            pool,
            engine,
        } = self;
        let copy = path.with_file_name(format!(
            "{}-crashed",
            path.file_name().expect("name").to_string_lossy()
        ));
        copy_dir(&path, &copy);
        drop(engine);
        let (engine, report) = start_on(&copy, pool.clone());
        (
            T {
                _dir,
                path: copy,
                pool,
                engine,
            },
            report,
        )
    }

    fn flushes(&self) -> u64 {
        self.engine.store_flushes()
    }

    fn id(&self, key: &str) -> ThinId {
        self.engine.record(key).expect("read").expect(key).thin_id
    }
}

#[tokio::test]
async fn one_durable_write_per_call_on_the_common_path() {
    let t = setup();
    let mut counts = Vec::new();
    let mut count =
        |call: &str, before: u64, t: &T| counts.push((call.to_string(), t.flushes() - before));
    let n = t.flushes();
    prep(&t, "a", "").await.expect("prepare");
    count("prepare", n, &t);
    let n = t.flushes();
    t.engine
        .create(Kind::View, "v", "", no_labels())
        .await
        .expect("view");
    count("view", n, &t);
    let n = t.flushes();
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    count("commit", n, &t);
    let n = t.flushes();
    prep(&t, "b", "c").await.expect("prepare on a parent");
    count("prepare on a parent", n, &t);
    let n = t.flushes();
    t.engine.remove("v").await.expect("remove");
    count("remove of a view", n, &t);
    let n = t.flushes();
    t.engine.remove("b").await.expect("remove");
    count("remove of an active snapshot", n, &t);
    let n = t.flushes();
    t.engine.remove("c").await.expect("remove");
    count("remove of a committed snapshot", n, &t);
    prep(&t, "u", "").await.expect("prepare");
    let n = t.flushes();
    t.engine
        .update("u", no_labels(), &[])
        .await
        .expect("update");
    count("update", n, &t);
    for (call, flushes) in &counts {
        assert_eq!(*flushes, 1, "{call}: {flushes} durable writes: {counts:?}");
    }
}

#[tokio::test]
async fn answered_prepare_and_view_survive_a_crash_before_any_other_flush() {
    let t = setup();
    prep(&t, "keep", "").await.expect("prepare");
    prep(&t, "a", "").await.expect("prepare");
    t.engine
        .create(Kind::View, "v", "", no_labels())
        .await
        .expect("view");
    let (a, v, keep) = (t.id("a"), t.id("v"), t.id("keep"));
    assert_eq!(
        t.engine
            .store
            .device(v)
            .expect("read")
            .map(|d| d.roll_forward),
        Some(true)
    );
    let (t, report) = t.crash();
    // The View's outcome was not durable (the call flushed only its intent): completed from
    // the intent because the pool has its thin device. The earlier Prepares' outcomes were
    // made durable by the next call's intent flush.
    assert_eq!(report.completed_creates, vec![v], "{report:?}");
    assert!(report.undone_creates.is_empty(), "{report:?}");
    for (key, id, kind) in [
        ("a", a, Kind::Active),
        ("v", v, Kind::View),
        ("keep", keep, Kind::Active),
    ] {
        let st = t
            .engine
            .stat(key)
            .await
            .unwrap_or_else(|e| panic!("{key} lost: {e}"));
        assert_eq!(st.kind, kind);
        assert!(t.pool.active().contains(&id), "{key}: no device");
        t.engine.mounts(key).await.expect("mounts");
    }
    assert!(matches!(
        prep(&t, "a", "").await,
        Err(EngineError::AlreadyExists(_))
    ));
    // Nothing is left to complete at the next start.
    let (t, report) = t.restart();
    assert!(report.completed_creates.is_empty() && report.undone_creates.is_empty());
    t.engine.stat("a").await.expect("a");
}

#[tokio::test]
async fn an_answered_commit_survives_a_crash_before_any_other_flush() {
    let t = setup();
    prep(&t, "a", "").await.expect("prepare");
    t.engine.store.flush_sync().expect("flush");
    let id = t.id("a");
    t.engine
        .commit("c", "a", no_labels())
        .await
        .expect("commit");
    let (t, report) = t.crash();
    assert_eq!(report.completed_commits, vec![id], "{report:?}");
    assert_eq!(t.engine.stat("c").await.expect("c").kind, Kind::Committed);
    assert!(t.engine.stat("a").await.is_err(), "the key is gone");
    assert!(
        !t.pool.active().contains(&id),
        "committed device left active"
    );
    let dev = t.engine.store.device(id).expect("read").expect("device");
    assert_eq!((dev.owner.as_str(), dev.commit), ("c", None));
    prep(&t, "child", "c")
        .await
        .expect("a child of the committed snapshot");
}

#[tokio::test]
async fn an_answered_remove_survives_a_crash_before_any_other_flush() {
    let t = setup();
    prep(&t, "a", "").await.expect("prepare");
    t.engine.store.flush_sync().expect("flush");
    let id = t.id("a");
    t.engine.remove("a").await.expect("remove");
    let (t, report) = t.crash();
    // The record came back Deleting; the delete is finished again (the thin id is gone already).
    assert_eq!(report.finished_deletes, vec![id], "{report:?}");
    assert!(t.engine.stat("a").await.is_err());
    assert!(!t.pool.thin_ids().contains(&id));
    assert!(t.engine.store.device(id).expect("read").is_none());
    prep(&t, "a", "").await.expect("the key is free");
}

fn intent(key: &str) -> crate::store::NewSnapshot {
    crate::store::NewSnapshot {
        key: key.into(),
        kind: Kind::Active,
        parent: None,
        labels: no_labels(),
        now: 1,
        size: None,
        roll_forward: true,
    }
}

#[tokio::test]
async fn recovery_completes_a_create_iff_the_pool_has_its_thin_device() {
    let t = setup();
    // Killed after create_snap, before activate: completed (and activated).
    let made = t
        .engine
        .store
        .begin_create(&intent("made"), &t.engine.base)
        .expect("intent");
    t.pool
        .create_snap(made.thin_id, made.origin)
        .expect("kernel");
    // Killed after the intent, before create_snap: undone.
    let not_made = t
        .engine
        .store
        .begin_create(&intent("not-made"), &t.engine.base)
        .expect("intent");
    t.engine
        .store
        .flush_sync()
        .expect("the intents are durable");
    let (t, report) = t.crash();
    assert_eq!(report.completed_creates, vec![made.thin_id], "{report:?}");
    assert_eq!(report.undone_creates, vec![not_made.thin_id], "{report:?}");
    let rec = t.engine.record("made").expect("read").expect("made");
    assert_eq!(rec.state, State::Ready);
    assert!(t.pool.active().contains(&made.thin_id));
    assert!(t.engine.record("not-made").expect("read").is_none());
    assert!(!t.pool.thin_ids().contains(&not_made.thin_id));
    prep(&t, "not-made", "").await.expect("the key is free");
    // An intent without roll_forward (the size label, a pool thinsnap does not own) is undone
    // even though its thin device exists: its call flushes the outcome before answering.
    let old = t
        .engine
        .store
        .begin_create(
            &crate::store::NewSnapshot {
                roll_forward: false,
                ..intent("flushed-outcome")
            },
            &t.engine.base,
        )
        .expect("intent");
    t.pool.create_snap(old.thin_id, old.origin).expect("kernel");
    t.engine.store.flush_sync().expect("flush");
    let (t, report) = t.crash();
    assert_eq!(report.undone_creates, vec![old.thin_id], "{report:?}");
    assert!(t.engine.record("flushed-outcome").expect("read").is_none());
}

#[tokio::test]
async fn recovery_completes_a_commit_whose_intent_is_durable() {
    let t = setup();
    prep(&t, "a", "").await.expect("prepare");
    let id = t.id("a");
    // Killed after the intent, before the device was deactivated.
    let intent = CommitIntent {
        name: "c".into(),
        labels: [("l".to_string(), "v".to_string())].into(),
        mapped: 7,
        now: 5,
    };
    t.engine.store.begin_commit("a", &intent).expect("intent");
    t.engine.store.flush_sync().expect("flush");
    assert!(t.pool.active().contains(&id));
    let (t, report) = t.crash();
    assert_eq!(report.completed_commits, vec![id], "{report:?}");
    assert_eq!(report.deactivated, vec![id], "{report:?}");
    let c = t.engine.record("c").expect("read").expect("c");
    assert_eq!(
        (c.kind, c.mapped, c.labels),
        (Kind::Committed, 7, intent.labels)
    );
    assert!(t.engine.record("a").expect("read").is_none());
    assert!(!t.pool.active().contains(&id));
}

#[tokio::test]
async fn a_commit_whose_kernel_step_fails_is_not_done_and_stays_not_done() {
    let t = setup();
    prep(&t, "a", "").await.expect("prepare");
    let id = t.id("a");
    t.pool.fail_next("deactivate");
    assert!(t.engine.commit("c", "a", no_labels()).await.is_err());
    // Told "failed": the snapshot is active with its device and no intent, also after a crash.
    assert_eq!(t.engine.stat("a").await.expect("a").kind, Kind::Active);
    assert!(t.pool.active().contains(&id));
    assert_eq!(
        t.engine
            .store
            .device(id)
            .expect("read")
            .expect("dev")
            .commit,
        None
    );
    let (t, report) = t.crash();
    assert!(report.completed_commits.is_empty(), "{report:?}");
    assert_eq!(t.engine.stat("a").await.expect("a").kind, Kind::Active);
    assert!(t.engine.stat("c").await.is_err());
    t.engine.commit("c", "a", no_labels()).await.expect("retry");
}

/// A `tracing` writer into a shared buffer: what the daemon's log would hold.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issue 24 item 8: a key (and a commit's name) with a newline in it forges no log line, neither
/// in recovery's lines (a completed and an undone create, a completed commit) nor in the calls'
/// own: every key is logged escaped. The log is the daemon's text format, captured.
#[tokio::test]
async fn a_key_with_a_newline_forges_no_log_line() {
    const FORGED: &str = "\n2000-01-01T00:00:00.000000Z  INFO thinsnap: FORGED";
    let buf = LogBuf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);
    // Callsites met first by another test's thread (no subscriber there) may have cached that
    // nobody wants them: ask again, now that this thread has one.
    tracing::callsite::rebuild_interest_cache();
    let key = |what: &str| format!("{what}{FORGED}");

    let t = setup();
    // Interrupted creates (one the pool has, one it has not) and an interrupted commit.
    let made = t
        .engine
        .store
        .begin_create(&intent(&key("made")), &t.engine.base)
        .expect("intent");
    t.pool
        .create_snap(made.thin_id, made.origin)
        .expect("kernel");
    t.engine
        .store
        .begin_create(&intent(&key("not-made")), &t.engine.base)
        .expect("intent");
    prep(&t, &key("a"), "").await.expect("prepare");
    let commit = CommitIntent {
        name: key("c"),
        labels: no_labels(),
        mapped: 7,
        now: 5,
    };
    t.engine
        .store
        .begin_commit(&key("a"), &commit)
        .expect("intent");
    t.engine.store.flush_sync().expect("flush");
    let (t, report) = t.crash();
    assert_eq!(report.completed_commits.len(), 1, "{report:?}");
    assert_eq!(report.undone_creates.len(), 1, "{report:?}");
    // The calls' own lines.
    prep(&t, &key("p"), "").await.expect("prepare");
    t.engine
        .commit(&key("q"), &key("p"), no_labels())
        .await
        .expect("commit");
    t.engine.remove(&key("q")).await.expect("remove");
    t.engine.remove(&key("made")).await.expect("remove");

    let text = String::from_utf8(buf.0.lock().expect("log").clone()).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    let with_keys = lines.iter().filter(|l| l.contains("FORGED")).count();
    assert!(
        with_keys >= 6,
        "the keys are not logged at all ({with_keys} lines):\n{text}"
    );
    for line in &lines {
        assert!(
            !line.starts_with("2000-01-01"),
            "a key forged a log line: {line:?}\n{text}"
        );
    }
    for what in [
        "completing an interrupted create",
        "undoing interrupted create",
        "completing an interrupted commit",
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line:\n{text}"));
        assert!(line.contains("\\n2000-01-01"), "{what}: {line}");
    }
}
