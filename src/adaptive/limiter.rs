//! The adaptive limits of one guard: a [`Limiter`] per breaker key, kept beside
//! the breakers' registry slots the way the retry budgets are (allocated in
//! chunks on first use, reset when a slot is given to another key), and one for
//! requests without a key.
//!
//! A limiter is a handful of atomics. Requests read [`Limiter::limit`] on
//! admission and add their latency with [`Limiter::record`]; the record that
//! finds the sample window over wins a compare-and-swap on the window's start
//! and alone recomputes the limit, so the controller's own state (the baseline
//! buckets, the fractional limit) has a single writer at a time without a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::controller::{retry_after, whole, Measured, Rule};
use super::AdaptiveConcurrency;
use crate::keyed::{KeyState, PerKey, Target};

/// The fewest measurements a sample window needs to close: a mean of fewer
/// is mostly noise, and the baseline is the lowest mean seen.
const MIN_SAMPLES: u64 = 8;

/// The fewest round trips (last window's mean latency) a window lasts. A
/// window measures the attempts that started in it and ended before it
/// closed, which leaves out the slowest of those started late in it: over
/// one round trip, the measured mean comes out well below the true one and
/// the limit grows past its mark; over several, the few left out barely move
/// the mean.
const ROUND_TRIPS_PER_WINDOW: u64 = 3;

/// The baseline window is kept as this many buckets, each the lowest window
/// mean seen in its stretch of time; the oldest is dropped as time moves on.
const BUCKETS: usize = 8;

/// An empty baseline bucket.
const NO_BASELINE: u64 = u64::MAX;

/// The configuration, in the limiters' units: nanoseconds since `epoch`.
#[derive(Debug)]
pub(crate) struct Tuning {
    rule: Rule,
    initial: u32,
    window_nanos: u64,
    bucket_nanos: u64,
    epoch: Instant,
}

impl Tuning {
    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }
}

/// The adaptive limits of one guard.
#[derive(Debug)]
pub(crate) struct Limits {
    /// One per registry slot, and one for requests without a key.
    limiters: PerKey<Limiter>,
}

/// One attempt's measurement.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// When the attempt started (ns since the epoch).
    started: u64,
    latency: u64,
    in_flight: u32,
    timed_out: bool,
}

/// What a window's close computed, for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Update {
    pub(crate) previous: u32,
    pub(crate) limit: u32,
    pub(crate) rtt: Duration,
    pub(crate) baseline: Duration,
    pub(crate) samples: u64,
    pub(crate) shed: u64,
    pub(crate) retry_after: Duration,
}

impl Limits {
    /// Limits for `keys` breaker keys (`0`: one limit for everything).
    pub(crate) fn new(config: &AdaptiveConcurrency, keys: usize) -> Limits {
        let buckets = u32::try_from(BUCKETS).unwrap_or(u32::MAX);
        let tuning = Tuning {
            rule: Rule::new(config),
            initial: config.initial_limit,
            window_nanos: nanos(config.sample_window),
            // At least 1: validation keeps the baseline window ≥ 1 ms.
            bucket_nanos: nanos(config.baseline_window / buckets).max(1),
            epoch: Instant::now(),
        };
        Limits {
            limiters: PerKey::new(tuning, keys),
        }
    }

    fn tuning(&self) -> &Tuning {
        self.limiters.config()
    }

    /// The limiter of the breaker `target`; `None` for a request whose
    /// registry slot was given to another key since it was keyed.
    pub(crate) fn of(&self, target: Target) -> Option<&Limiter> {
        self.limiters.of(Some(target))
    }

    /// Adds the latency of an attempt that started at `started` and saw
    /// `in_flight` requests in flight; what changed if this closed the sample
    /// window. `timed_out`: the latency is a timeout's, a lower bound.
    pub(crate) fn record(
        &self,
        limiter: &Limiter,
        started: Instant,
        in_flight: u32,
        timed_out: bool,
    ) -> Option<Update> {
        let sample = Sample {
            started: nanos(started.saturating_duration_since(self.tuning().epoch)),
            latency: nanos(started.elapsed()),
            in_flight,
            timed_out,
        };
        limiter.record(self.tuning(), sample)
    }

    /// Starts `limiter` over: its circuit breaker is letting probes through.
    pub(crate) fn restart(&self, limiter: &Limiter) {
        limiter.restart(self.tuning());
    }
}

/// One key's adaptive limit and its measurements.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// What admission reads: the whole part of `estimate`.
    limit: AtomicU32,
    /// The limit as the controller keeps it, fractional (`f64` bits), so that
    /// small steps add up.
    estimate: AtomicU64,
    /// Whole seconds a request turned away should wait.
    retry_after_secs: AtomicU32,
    /// When the current sample window started (ns since the epoch).
    window_start: AtomicU64,
    /// The current window's measurements: total latency (ns), how many, the
    /// most requests in flight any of them saw, and requests turned away.
    sum: AtomicU64,
    count: AtomicU64,
    peak: AtomicU32,
    shed: AtomicU64,
    /// The last closed window's mean latency (ns; 0 before the first).
    rtt: AtomicU64,
    /// The lowest window mean per baseline bucket (ns).
    baseline: [AtomicU64; BUCKETS],
    /// The number of the newest baseline bucket, plus one (0: none yet).
    bucket: AtomicU64,
}

impl KeyState for Limiter {
    type Config = Tuning;

    fn new(tuning: &Tuning) -> Limiter {
        Limiter::new(tuning)
    }

    /// A new key took the registry slot: it starts afresh.
    fn reset(&self, tuning: &Tuning) {
        self.restart(tuning);
    }
}

impl Limiter {
    fn new(tuning: &Tuning) -> Limiter {
        Limiter {
            limit: AtomicU32::new(tuning.initial),
            estimate: AtomicU64::new(f64::from(tuning.initial).to_bits()),
            retry_after_secs: AtomicU32::new(1),
            window_start: AtomicU64::new(tuning.now()),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            peak: AtomicU32::new(0),
            shed: AtomicU64::new(0),
            rtt: AtomicU64::new(0),
            baseline: std::array::from_fn(|_| AtomicU64::new(NO_BASELINE)),
            bucket: AtomicU64::new(0),
        }
    }

    /// The current limit: how many requests of the key may be in flight.
    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts a request turned away; how long it should wait before trying
    /// again.
    pub(crate) fn shed(&self) -> Duration {
        self.shed.fetch_add(1, Ordering::Relaxed);
        Duration::from_secs(u64::from(self.retry_after_secs.load(Ordering::Relaxed)))
    }

    /// Back to the initial limit, with nothing measured and no baseline.
    fn restart(&self, tuning: &Tuning) {
        let initial = f64::from(tuning.initial).to_bits();
        if self.estimate.swap(initial, Ordering::AcqRel) == initial
            && self.rtt.load(Ordering::Relaxed) == 0
        {
            // Already fresh: a half-open breaker restarts it on every probe.
            return;
        }
        self.limit.store(tuning.initial, Ordering::Release);
        self.retry_after_secs.store(1, Ordering::Relaxed);
        self.window_start.store(tuning.now(), Ordering::Release);
        for word in [&self.sum, &self.count, &self.shed, &self.rtt, &self.bucket] {
            word.store(0, Ordering::Relaxed);
        }
        self.peak.store(0, Ordering::Relaxed);
        for bucket in &self.baseline {
            bucket.store(NO_BASELINE, Ordering::Relaxed);
        }
    }

    /// Adds one measurement; closes the window if it is over (see the module
    /// docs).
    ///
    /// An attempt that started before the window did is left out: it was
    /// admitted under the limit the last window replaced, and measuring it
    /// would answer for that limit again (the limit would swing past its mark
    /// and back, a round trip late each time). A timeout is the exception: it
    /// always started long ago, and it is the loudest sign of a queue.
    fn record(&self, tuning: &Tuning, sample: Sample) -> Option<Update> {
        let start = self.window_start.load(Ordering::Acquire);
        if sample.started < start && !sample.timed_out {
            return None;
        }
        self.sum.fetch_add(sample.latency, Ordering::Relaxed);
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.peak.load(Ordering::Relaxed) < sample.in_flight {
            self.peak.fetch_max(sample.in_flight, Ordering::Relaxed);
        }
        if count < MIN_SAMPLES {
            return None;
        }
        let now = tuning.now();
        let rtt = self.rtt.load(Ordering::Relaxed);
        let length = (tuning.window_nanos).max(rtt.saturating_mul(ROUND_TRIPS_PER_WINDOW));
        if now.saturating_sub(start) < length {
            return None;
        }
        // Elects the one request that closes this window.
        (self.window_start)
            .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        Some(self.close(tuning, now, now - start))
    }

    /// Recomputes the limit from the window that just closed.
    fn close(&self, tuning: &Tuning, now: u64, elapsed: u64) -> Update {
        let sum = self.sum.swap(0, Ordering::Relaxed);
        let samples = self.count.swap(0, Ordering::Relaxed).max(1);
        let peak_in_flight = self.peak.swap(0, Ordering::Relaxed);
        let shed = self.shed.swap(0, Ordering::Relaxed);
        let rtt = sum / samples;
        let baseline = self.baseline(tuning, now, rtt);
        let bits = self.estimate.load(Ordering::Acquire);
        let measured = Measured {
            rtt,
            baseline,
            peak_in_flight,
        };
        let next = tuning.rule.next(f64::from_bits(bits), measured);
        let previous = self.limit();
        let mut limit = whole(next);
        // A restart since the window closed wins over what it measured.
        match (self.estimate).compare_exchange(
            bits,
            next.to_bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => self.limit.store(limit, Ordering::Release),
            Err(_) => limit = self.limit(),
        }
        self.rtt.store(rtt, Ordering::Relaxed);
        let rtt = Duration::from_nanos(rtt);
        let retry_after = retry_after(rtt, shed, Duration::from_nanos(elapsed), limit);
        let secs = u32::try_from(retry_after.as_secs()).unwrap_or(u32::MAX);
        self.retry_after_secs.store(secs, Ordering::Relaxed);
        Update {
            previous,
            limit,
            rtt,
            baseline: Duration::from_nanos(baseline),
            samples,
            shed,
            retry_after,
        }
    }

    /// Files a window's mean in the current baseline bucket, empties the
    /// buckets time has moved past, and returns the lowest mean of all.
    fn baseline(&self, tuning: &Tuning, now: u64, rtt: u64) -> u64 {
        let current = now / tuning.bucket_nanos;
        let newest = self.bucket.load(Ordering::Relaxed);
        if newest != current + 1 {
            // `newest` is the first bucket number not filed yet (0: none);
            // only the last `BUCKETS` numbers have a place.
            let oldest_kept = (current + 1).saturating_sub(BUCKETS as u64);
            for number in newest.max(oldest_kept)..=current {
                self.bucket_of(number).store(NO_BASELINE, Ordering::Relaxed);
            }
            self.bucket.store(current + 1, Ordering::Relaxed);
        }
        self.bucket_of(current).fetch_min(rtt, Ordering::Relaxed);
        (self.baseline.iter())
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .min()
            .unwrap_or(rtt)
    }

    fn bucket_of(&self, number: u64) -> &AtomicU64 {
        // The remainder is below `BUCKETS`, a small `usize`.
        &self.baseline[(number % BUCKETS as u64) as usize]
    }
}

/// A duration in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        let config = AdaptiveConcurrency::default()
            .min_limit(2)
            .initial_limit(10)
            .max_limit(100)
            .sample_window(100 * MS)
            .baseline_window(Duration::from_secs(8));
        Limits::new(&config, 8)
    }

    fn key(index: u32, generation: u32) -> Target {
        Target::Keyed { index, generation }
    }

    /// Records `n` measurements of `latency`, each seeing `in_flight`; the
    /// last window close, if any. They started `latency` ago: measure after
    /// advancing the clock by at least that much.
    fn feed(
        limits: &Limits,
        target: Target,
        n: usize,
        latency: Duration,
        in_flight: u32,
    ) -> Option<Update> {
        let limiter = limits.of(target).expect("the key's limiter");
        let started = Instant::now() - latency;
        (0..n)
            .filter_map(|_| limits.record(limiter, started, in_flight, false))
            .last()
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_does_not_close_before_its_time() {
        let limits = limits();
        limits.of(key(0, 0)).expect("created at 0");
        tokio::time::advance(60 * MS).await;
        assert_eq!(feed(&limits, key(0, 0), 100, 50 * MS, 10), None);
        tokio::time::advance(40 * MS).await;
        let update = feed(&limits, key(0, 0), 1, 50 * MS, 10).expect("closed");
        assert_eq!(update.samples, 101);
        assert_eq!((update.previous, update.limit), (10, 11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_needs_enough_measurements_to_close() {
        let limits = limits();
        limits.of(key(0, 0)).expect("created at 0");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(feed(&limits, key(0, 0), 7, 50 * MS, 10), None);
        assert!(feed(&limits, key(0, 0), 1, 50 * MS, 10).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_limit() {
        let limits = limits();
        limits.of(key(0, 0)).expect("created at 0");
        tokio::time::advance(100 * MS).await;
        feed(&limits, key(0, 0), 10, 50 * MS, 10);
        assert_eq!(limits.of(key(0, 0)).unwrap().limit(), 11);
        assert_eq!(limits.of(key(1, 0)).unwrap().limit(), 10);
        assert_eq!(limits.of(Target::Default).unwrap().limit(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_given_to_a_new_key_starts_at_the_initial_limit() {
        let limits = limits();
        limits.of(key(3, 0)).expect("created at 0");
        tokio::time::advance(100 * MS).await;
        feed(&limits, key(3, 0), 10, 50 * MS, 10);
        assert_eq!(limits.of(key(3, 0)).unwrap().limit(), 11);
        assert_eq!(limits.of(key(3, 1)).unwrap().limit(), 10);
        assert!(limits.of(key(3, 0)).is_none(), "a straggler of the old key");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_forgets_the_limit_and_the_baseline() {
        let limits = limits();
        let limiter = limits.of(key(0, 0)).unwrap();
        for _ in 0..5 {
            tokio::time::advance(100 * MS).await;
            feed(&limits, key(0, 0), 10, 50 * MS, 100);
        }
        assert!(limiter.limit() > 10);
        limits.restart(limiter);
        assert_eq!(limiter.limit(), 10);
        // A slower upstream after the restart is its new baseline: no queue.
        tokio::time::advance(200 * MS).await;
        let update = feed(&limits, key(0, 0), 10, 200 * MS, 10).expect("closed");
        assert_eq!(update.baseline, 200 * MS);
        assert!(update.limit > 10, "{update:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_baseline_ages_out_after_the_baseline_window() {
        let limits = limits();
        limits.of(key(0, 0)).expect("created at 0");
        // Eight measurements each: every window closes on its last one.
        tokio::time::advance(100 * MS).await;
        feed(&limits, key(0, 0), 8, 50 * MS, 10);
        tokio::time::advance(Duration::from_secs(4)).await;
        let update = feed(&limits, key(0, 0), 8, 200 * MS, 10).expect("closed");
        assert_eq!(update.baseline, 50 * MS, "still within the window");
        tokio::time::advance(Duration::from_secs(5)).await;
        let update = feed(&limits, key(0, 0), 8, 200 * MS, 10).expect("closed");
        assert_eq!(update.baseline, 200 * MS, "the 50 ms window aged out");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_started_before_the_window_are_left_out_but_timeouts_are_not() {
        let limits = limits();
        let limiter = limits.of(key(0, 0)).unwrap();
        tokio::time::advance(100 * MS).await;
        feed(&limits, key(0, 0), 8, 50 * MS, 10).expect("closed at 100 ms");
        // Three round trips of 50 ms make the next window at least 150 ms.
        tokio::time::advance(200 * MS).await;
        let before = Instant::now() - 250 * MS;
        for _ in 0..20 {
            assert_eq!(limits.record(limiter, before, 10, false), None);
        }
        let update = (0..8)
            .filter_map(|_| limits.record(limiter, before, 10, true))
            .last()
            .expect("eight timeouts close the window");
        assert_eq!((update.samples, update.rtt), (8, 250 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_turned_away_lengthen_retry_after() {
        let limits = limits();
        let limiter = limits.of(key(0, 0)).unwrap();
        assert_eq!(limiter.shed(), Duration::from_secs(1), "nothing measured");
        // 1 s round trips; 60 turned away in a 2 s window at a limit of 10.
        for _ in 0..59 {
            limiter.shed();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let update = feed(&limits, key(0, 0), 10, Duration::from_secs(1), 10).expect("closed");
        assert_eq!((update.shed, update.limit), (60, 11));
        // 30 turned away per round trip: 1 s × (1 + 30 / 11) = 3.7 s, so 4 s.
        assert_eq!(update.retry_after, Duration::from_secs(4));
        assert_eq!(limiter.shed(), update.retry_after);
    }
}
