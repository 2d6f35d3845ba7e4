//! Named failpoints for crash testing: `failpoint!("prepare:after-intent")` kills the process
//! with SIGKILL, at that instant, when the environment variable `THINSNAP_FAILPOINT` names it
//! (`name`, or `name@N` for its N-th hit). Without the variable they are inert: one load of a
//! cached `None`. The crash tests (tests/vm_crash.rs) run every mutating call against each of
//! them and check that a restart converges.
//!
//! `THINSNAP_STALL=name[,name...]` holds the first hit of each named failpoint instead: its
//! thread blocks (saying `failpoint NAME: stalled` on stderr) until the process is told to stop
//! ([`release_stalls`], at SIGTERM or SIGINT), then goes on. The SIGTERM test
//! (tests/vm_faults.rs) uses it to have calls in flight when the stop begins. Only for
//! failpoints hit on a blocking thread (inside a pool closure): a stalled async worker could
//! keep the signal from being handled. Inert without the variable.
//!
//! Only in builds with the cargo feature `failpoints` (the crash tests' build): in any other
//! build, the product and its Debian package among them, `failpoint!` expands to nothing and
//! `THINSNAP_FAILPOINT` and `THINSNAP_STALL` are ignored ([`announce`] says so at start).

#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// Every failpoint, in call order; the crash tests iterate over this list.
pub const ALL: &[&str] = &[
    "base:after-intent",
    "base:after-create",
    "base:after-format",
    // `<call>:start` is hit when a call has its keys locked, before it touches anything: armed
    // as `<call>:start@2` it kills the second call, after the first one answered OK with only
    // its intent durable (its outcome is written, not flushed): the crash test then checks that
    // the answered call survives.
    "prepare:start",
    "prepare:after-intent",
    "prepare:after-create-snap",
    "prepare:after-activate",
    "prepare:after-outcome",
    "commit:start",
    "commit:after-intent",
    "commit:after-deactivate",
    "commit:after-record",
    "remove:start",
    "remove:after-deactivate",
    "remove:after-intent",
    "remove:after-delete",
    "remove:after-forget",
    // Inside the pool wrapper, hit by every change: the crash test reaches it with a Remove.
    "pool:before-txid-bump",
];

/// Failpoints outside the Prepare/Commit/Remove calls, each killed at by a test of its own in
/// tests/vm_faults.rs (hence the name): start-up's thin_ls with the pool's metadata snapshot
/// reserved, and a pool grow with the pool suspended.
pub const FAULTS: &[&str] = &["recovery:metadata-snap-held", "grow:pool-suspended"];

/// Failpoints of lazy activation (a device activated on first use), killed by
/// `tests/vm_lazy.rs` rather than by the crash tests' fixture: `dm:after-device-create` is hit by
/// every dm device made (a device left without a table), `lazy:after-activate` after a
/// snapshot's device is activated on first use.
pub const LAZY: &[&str] = &["dm:after-device-create", "lazy:after-activate"];

/// Failpoints of warm spares (`engine::spares`), reached only with `[spares] count` > 0 and
/// killed by the crash test's daemon with spares on (tests/vm_crash.rs): a Prepare's take of a
/// spare (after its flush), and the refiller's three steps.
pub const SPARES: &[&str] = &[
    "prepare:after-take",
    "spare:after-intent",
    "spare:after-create-snap",
    "spare:after-activate",
];

#[cfg(feature = "failpoints")]
struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

/// Says at start whether `THINSNAP_FAILPOINT` will be obeyed: arms it (logging which) in a build
/// with failpoints, warns that it is ignored in any other.
pub fn announce() {
    #[cfg(not(feature = "failpoints"))]
    if let Ok(v) = std::env::var("THINSNAP_STALL") {
        tracing::warn!(
            stall = ?v,
            "THINSNAP_STALL is ignored: this build has no failpoints (cargo feature `failpoints`)"
        );
    }
    let Ok(v) = std::env::var("THINSNAP_FAILPOINT") else {
        return;
    };
    #[cfg(feature = "failpoints")]
    {
        let _ = (v, armed());
    }
    #[cfg(not(feature = "failpoints"))]
    tracing::warn!(
        failpoint = ?v,
        "THINSNAP_FAILPOINT is ignored: this build has no failpoints (cargo feature `failpoints`)"
    );
}

#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("THINSNAP_FAILPOINT").ok()?;
            let (name, nth) = match v.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                None => (v, 1),
            };
            tracing::warn!(failpoint = %name, nth, "failpoint armed: this process will SIGKILL itself");
            Some(Armed {
                name,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process if `name` is the armed failpoint and this is its N-th hit; holds it if it
/// is a stall failpoint (see the module doc).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
            eprintln!("failpoint {name}: SIGKILL");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            // SIGKILL cannot be caught; nothing after this line runs.
            std::process::abort();
        }
    }
    stall(name);
}

/// The failpoints `THINSNAP_STALL` names, not hit yet, and whether they are released.
#[cfg(feature = "failpoints")]
struct Stalls {
    waiting: std::sync::Mutex<(Vec<String>, bool)>,
    released: std::sync::Condvar,
}

#[cfg(feature = "failpoints")]
fn stalls() -> Option<&'static Stalls> {
    static STALLS: OnceLock<Option<Stalls>> = OnceLock::new();
    STALLS
        .get_or_init(|| {
            let v = std::env::var("THINSNAP_STALL").ok()?;
            let names: Vec<String> = v.split(',').map(str::to_string).collect();
            tracing::warn!(failpoints = ?names, "stall failpoints armed: calls will wait for a stop");
            Some(Stalls {
                waiting: std::sync::Mutex::new((names, false)),
                released: std::sync::Condvar::new(),
            })
        })
        .as_ref()
}

/// Holds the calling thread if `name` is a stall failpoint not hit yet (see the module doc).
#[cfg(feature = "failpoints")]
fn stall(name: &str) {
    let Some(s) = stalls() else { return };
    let mut w = s.waiting.lock().unwrap_or_else(|p| p.into_inner());
    let Some(i) = w.0.iter().position(|n| n == name) else {
        return;
    };
    w.0.remove(i);
    eprintln!("failpoint {name}: stalled");
    while !w.1 {
        w = s.released.wait(w).unwrap_or_else(|p| p.into_inner());
    }
    eprintln!("failpoint {name}: released");
}

/// Lets every stalled failpoint (`THINSNAP_STALL`) go on, and the later ones not stall: the
/// process is stopping. Nothing to do without the variable.
pub fn release_stalls() {
    #[cfg(feature = "failpoints")]
    if let Some(s) = stalls() {
        let mut w = s.waiting.lock().unwrap_or_else(|p| p.into_inner());
        w.1 = true;
        w.0.clear();
        s.released.notify_all();
    }
}

/// `failpoint!("name")`: see the module doc.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}

/// `failpoint!("name")` in a build without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {};
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The lists every failpoint name must be in.
    const LISTS: [&[&str]; 4] = [super::ALL, super::FAULTS, super::LAZY, super::SPARES];

    fn listed(name: &str) -> bool {
        LISTS.iter().any(|list| list.contains(&name))
    }

    /// Every file under `dir` (recursively) whose name ends with one of `exts`.
    fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                files(&p, exts, out);
            } else if p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)) {
                out.push(p);
            }
        }
    }

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Every `failpoint!` in the source is in [`super::ALL`], [`super::FAULTS`],
    /// [`super::LAZY`] or [`super::SPARES`], so a crash test kills at it: a failpoint no test
    /// arms proves nothing.
    #[test]
    fn every_failpoint_in_the_source_is_listed() {
        let mut paths = Vec::new();
        files(&root().join("src"), &["rs"], &mut paths);
        let mut found = Vec::new();
        for p in paths.iter().filter(|p| !p.ends_with("failpoint.rs")) {
            let text = std::fs::read_to_string(p).expect("read file");
            for part in text.split("failpoint!(\"").skip(1) {
                found.push(part.split('"').next().expect("name").to_string());
            }
        }
        assert!(found.len() >= super::ALL.len(), "found {found:?}");
        for name in super::SPARES {
            assert!(found.iter().any(|f| f == name), "{name:?} is in no source");
        }
        for name in found {
            assert!(
                listed(&name),
                "failpoint {name:?} is in no list: no crash test kills at it"
            );
        }
    }

    /// The failpoint names the tests arm (`THINSNAP_FAILPOINT`, `THINSNAP_STALL`: in the Rust
    /// tests, their helpers and the integration scripts) are the listed ones: a test that arms
    /// a name no `failpoint!` has (a typo, a renamed failpoint) would kill nothing and pass.
    /// A name is any word `<prefix>:<name>` (an `@N` after it dropped) whose prefix is one of
    /// the listed names' prefixes.
    #[test]
    fn every_failpoint_a_test_arms_is_listed() {
        let prefixes: std::collections::BTreeSet<&str> = LISTS
            .iter()
            .flat_map(|list| list.iter())
            .map(|n| n.split(':').next().expect("prefix"))
            .collect();
        let mut paths = Vec::new();
        files(&root().join("tests"), &["rs"], &mut paths);
        files(&root().join("integration"), &["sh", "py", "rs"], &mut paths);
        files(&root().join("src"), &["rs"], &mut paths);
        let mut seen = Vec::new();
        for p in &paths {
            if p.ends_with("failpoint.rs") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(p) else {
                continue;
            };
            for prefix in &prefixes {
                let at = format!("{prefix}:");
                for (i, _) in text.match_indices(&at) {
                    // Only a whole word: a quote, `=`, `,` or a space before it.
                    let before = text[..i].chars().next_back();
                    if !matches!(before, Some('"' | '\'' | '=' | ',' | ' ')) {
                        continue;
                    }
                    let rest = &text[i + at.len()..];
                    let tail: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                        .collect();
                    if tail.is_empty()
                        || !rest[tail.len()..].starts_with(['"', '@', ',', '\'', ' ', '\n'])
                    {
                        continue;
                    }
                    let name = format!("{at}{tail}");
                    assert!(
                        listed(&name),
                        "{}: failpoint {name:?} is in no list of src/failpoint.rs",
                        p.display()
                    );
                    seen.push(name);
                }
            }
        }
        // The scan sees what the tests arm: the SIGTERM test's stalls and the fault tests' kills.
        for name in [
            "recovery:metadata-snap-held",
            "prepare:after-take",
            "remove:after-delete",
        ] {
            assert!(
                seen.iter().any(|s| s == name),
                "{name:?} not seen: {seen:?}"
            );
        }
    }
}
