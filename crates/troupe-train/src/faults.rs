//! Fault injection for the crash tests. `TROUPE_CRASH_AT_WRITE=N` aborts the process (as
//! `kill -9` would: no unwinding, no cleanup) right after the N-th write, fsync, rename or
//! removal of a run's files; `TROUPE_CRASH_AFTER_STEP=N` right after optimizer step N.
//! Unset, both cost one relaxed atomic increment per write.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

fn env(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// Marks one completed write to a run's files.
pub(crate) fn write_point() {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    if let Some(n) = *LIMIT.get_or_init(|| env("TROUPE_CRASH_AT_WRITE"))
        && COUNT.fetch_add(1, Ordering::Relaxed) + 1 == n
    {
        std::process::abort();
    }
}

/// Marks the end of optimizer step `step`.
pub(crate) fn step_point(step: u64) {
    static AFTER: OnceLock<Option<u64>> = OnceLock::new();
    if *AFTER.get_or_init(|| env("TROUPE_CRASH_AFTER_STEP")) == Some(step) {
        std::process::abort();
    }
}
