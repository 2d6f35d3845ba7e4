//! Named failpoints for crash testing: `failpoint!("prepare:after-intent")` kills the process
//! with SIGKILL, at that instant, when the environment variable `THINSNAP_FAILPOINT` names it
//! (`name`, or `name@N` for its N-th hit). Without the variable they are inert: one load of a
//! cached `None`. The crash tests (tests/vm_crash.rs) run every mutating call against each of
//! them and check that a restart converges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every failpoint, in call order; the crash tests iterate over this list.
pub const ALL: &[&str] = &[
    "base:after-intent",
    "base:after-create",
    "base:after-format",
    "prepare:after-intent",
    "prepare:after-create-snap",
    "prepare:after-activate",
    "prepare:after-outcome",
    "commit:after-deactivate",
    "commit:after-record",
    "remove:after-deactivate",
    "remove:after-intent",
    "remove:after-delete",
    "remove:after-forget",
];

/// Failpoints of lazy activation (a device activated on first use), killed by
/// `tests/vm_lazy.rs` rather than by the crash tests' fixture: `dm:after-device-create` is hit by
/// every dm device made (a device left without a table), `lazy:after-activate` after a
/// snapshot's device is activated on first use.
pub const LAZY: &[&str] = &["dm:after-device-create", "lazy:after-activate"];

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

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

/// Kills the process if `name` is the armed failpoint and this is its N-th hit.
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
}

/// `failpoint!("name")`: see the module doc.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}
