//! Giving the heap back after a burst of calls.
//!
//! glibc's allocator keeps the memory a burst freed: a free chunk in the middle of a heap, or at
//! the top of a thread's arena below its trim threshold, stays resident until the same thread
//! allocates again. After a burst of calls (sled's 512 KiB log buffers, gRPC frames, records
//! decoded by thousands) an idle daemon held 3-4 times what it held fresh (benches/NOTES.md,
//! memory). [`trim_when_idle`] asks glibc to return every free page (`malloc_trim(0)`, which
//! also `madvise`s away free pages inside the heaps, not only at their tops) once calls have
//! stopped: at most once per quiet spell, never while calls are running.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::debug;

use crate::metrics::Metrics;

/// How long without a call before the heap is trimmed.
pub const QUIET: Duration = Duration::from_secs(2);

/// Returns free heap memory to the kernel (glibc's `malloc_trim(0)`); whether any was.
/// A no-op on other C libraries.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists under its locks.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims the heap (see the module doc) each time calls stop for [`QUIET`] after some ran,
/// until `stop`.
pub async fn trim_when_idle(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut seen = metrics.calls();
    let mut ran = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(QUIET) => {}
            _ = crate::engine::stopped(&mut stop) => return,
        }
        let now = metrics.calls();
        if now != seen {
            (seen, ran) = (now, true);
            continue;
        }
        if std::mem::take(&mut ran) {
            let released = tokio::task::spawn_blocking(release_free_memory)
                .await
                .unwrap_or(false);
            debug!(calls = now, released, "calls stopped: heap trimmed");
        }
    }
}
