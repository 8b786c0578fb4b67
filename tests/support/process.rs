//! What this process holds, read from `/proc/self`: open file descriptors and
//! resident memory. Linux only; every reader returns `None` where `/proc` is
//! missing, so callers can skip their checks with a note instead of failing.
//!
//! Self-contained (std and tokio only), like `upstream.rs`, so that
//! `examples/soak.rs` can include it with `#[path]`. It is deliberately not
//! declared in `support/mod.rs`: the tests that use it include it themselves.
#![allow(dead_code)]

use std::time::Duration;

/// How many file descriptors this process has open (`/proc/self/fd` entries).
pub fn open_fds() -> Option<usize> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(|e| e.is_ok()).count())
}

/// Resident set size in bytes (`VmRSS` in `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Whether `/proc/self` can be read at all.
pub fn proc_available() -> bool {
    open_fds().is_some() && rss_bytes().is_some()
}

/// Polls `done` every 20 ms until it holds or `within` has passed; whether it held.
pub async fn settle(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mebibytes, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
