//! A time-based sliding window of call counts, for the rate trip policies.
//!
//! The window is split into ten buckets. A bucket belongs to one slice of time;
//! the first writer of a new slice claims the bucket (one compare-and-swap) and
//! zeroes it. Totals only include buckets whose slice is still inside the
//! window, so old calls age out as time passes, whether or not the breaker
//! changes state (a count-based window that only resets on transitions would,
//! after a long healthy run, practically never open).

use super::sync::{AtomicU64, Ordering};

const BUCKETS: usize = 10;

#[derive(Debug)]
struct Bucket {
    /// The time slice this bucket counts, plus one (zero: never used).
    slice: AtomicU64,
    /// Calls in the low 32 bits, failures in the high 32 bits: one add per call.
    calls_failures: AtomicU64,
    slow: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Window {
    bucket_nanos: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    pub(crate) fn new(window_nanos: u64) -> Window {
        Window {
            bucket_nanos: (window_nanos / BUCKETS as u64).max(1),
            buckets: std::array::from_fn(|_| Bucket {
                slice: AtomicU64::new(0),
                calls_failures: AtomicU64::new(0),
                slow: AtomicU64::new(0),
            }),
        }
    }

    fn slice(&self, now: u64) -> u64 {
        now / self.bucket_nanos + 1
    }

    pub(crate) fn record(&self, now: u64, failure: bool, slow: bool) {
        let slice = self.slice(now);
        let bucket = &self.buckets[(slice % BUCKETS as u64) as usize];
        let seen = bucket.slice.load(Ordering::Acquire);
        if seen < slice
            && bucket
                .slice
                .compare_exchange(seen, slice, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // We claimed the bucket for a new slice: drop what it counted before.
            // A call recorded concurrently by another thread may be lost here;
            // the window is a rate estimate, and losing one call is harmless.
            bucket.calls_failures.store(0, Ordering::Release);
            bucket.slow.store(0, Ordering::Release);
        }
        bucket
            .calls_failures
            .fetch_add(1 | (u64::from(failure) << 32), Ordering::AcqRel);
        if slow {
            bucket.slow.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Calls, failures and slow calls inside the window ending at `now`.
    pub(crate) fn totals(&self, now: u64) -> (u64, u64, u64) {
        let current = self.slice(now);
        let oldest = current.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| {
                let slice = b.slice.load(Ordering::Acquire);
                slice >= oldest && slice <= current && slice != 0
            })
            .fold((0, 0, 0), |(c, f, s), b| {
                let cf = b.calls_failures.load(Ordering::Acquire);
                (
                    c + (cf & 0xffff_ffff),
                    f + (cf >> 32),
                    s + b.slow.load(Ordering::Acquire),
                )
            })
    }

    pub(crate) fn clear(&self) {
        for b in &self.buckets {
            b.slice.store(0, Ordering::Release);
            b.calls_failures.store(0, Ordering::Release);
            b.slow.store(0, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(upstream_guard_loom)))]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn counts_inside_the_window() {
        let w = Window::new(10 * SEC);
        w.record(0, true, false);
        w.record(SEC, false, true);
        w.record(2 * SEC, false, false);
        assert_eq!(w.totals(2 * SEC), (3, 1, 1));
    }

    #[test]
    fn old_calls_age_out() {
        let w = Window::new(10 * SEC);
        for i in 0..10 {
            w.record(i * SEC, true, false);
        }
        assert_eq!(w.totals(9 * SEC).0, 10);
        assert_eq!(w.totals(14 * SEC).0, 5);
        assert_eq!(w.totals(30 * SEC).0, 0);
    }

    #[test]
    fn a_reused_bucket_starts_from_zero() {
        let w = Window::new(10 * SEC);
        w.record(0, true, false);
        w.record(10 * SEC, false, false);
        assert_eq!(w.totals(10 * SEC), (1, 0, 0));
    }
}
