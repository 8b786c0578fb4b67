//! [`LatencyWindow`]: recent attempt latencies of one upstream, as a
//! histogram a percentile is read from, lock-free.
//!
//! Two histograms take turns: the current window is written, the one before it
//! is kept, and a percentile reads both (so there is always between one and two
//! windows of history). The first request to see a new window empties the
//! oldest histogram and makes it current; a quiet spell of two windows or more
//! empties both, so a burst after it is not hedged on stale numbers.
//!
//! Buckets are logarithmic, four per power of two of microseconds (exact below
//! 16 µs): a percentile is at most 25 % above the true value, never below it,
//! so a hedge errs towards waiting a little longer. Samples recorded while
//! another request is emptying a histogram may be lost; a percentile is a
//! statistic, and the loss of a few samples per window does not change it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::keyed::KeyState;

/// Exact buckets for 0..16 µs, then four per power of two up to 2^36 µs.
const EXACT: usize = 16;
const PER_OCTAVE: usize = 4;
const MAX_EXPONENT: u32 = 36;
const BUCKETS: usize = EXACT + (MAX_EXPONENT as usize - 4) * PER_OCTAVE;

/// How a latency window is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LatencyConfig {
    /// How long one histogram is written before the next takes over.
    pub(crate) window: Duration,
}

/// Recent latencies of one upstream.
pub(crate) struct LatencyWindow {
    start: Instant,
    window: Duration,
    /// The number of the current window (windows since `start`).
    epoch: AtomicU64,
    histograms: [Box<[AtomicU32]>; 2],
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow")
            .field("window", &self.window)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl KeyState for LatencyWindow {
    type Config = LatencyConfig;

    fn new(config: &LatencyConfig) -> Self {
        LatencyWindow::starting_at(*config, Instant::now())
    }

    fn reset(&self, _: &LatencyConfig) {
        for count in self.histograms.iter().flat_map(|h| h.iter()) {
            count.store(0, Ordering::Relaxed);
        }
    }
}

impl LatencyWindow {
    /// A window whose epoch 0 begins at `start`.
    pub(crate) fn starting_at(config: LatencyConfig, start: Instant) -> Self {
        let histogram = || (0..BUCKETS).map(|_| AtomicU32::new(0)).collect();
        LatencyWindow {
            start,
            window: config.window.max(Duration::from_millis(1)),
            epoch: AtomicU64::new(0),
            histograms: [histogram(), histogram()],
        }
    }

    /// Records one attempt's latency, seen at `now`.
    pub(crate) fn record(&self, now: Instant, latency: Duration) {
        let epoch = self.turn(now);
        let histogram = &self.histograms[(epoch % 2) as usize];
        let bucket = bucket_of(latency);
        // Relaxed: a count is a statistic; no other memory hangs on it.
        histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency at `percentile` of the last one to two windows, if there are
    /// at least `min_samples` of them; the upper edge of its bucket.
    pub(crate) fn percentile(
        &self,
        now: Instant,
        percentile: f64,
        min_samples: u32,
    ) -> Option<Duration> {
        self.turn(now);
        let mut counts = [0u64; BUCKETS];
        for histogram in &self.histograms {
            for (sum, count) in counts.iter_mut().zip(histogram.iter()) {
                *sum += u64::from(count.load(Ordering::Relaxed));
            }
        }
        let total: u64 = counts.iter().sum();
        if total < u64::from(min_samples) || total == 0 {
            return None;
        }
        // The rank of the wanted sample, 1-based: ⌈p × total⌉.
        let rank = ((percentile * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        let bucket = counts.iter().position(|&count| {
            seen += count;
            seen >= rank
        })?;
        Some(upper_edge(bucket))
    }

    /// Moves to the window `now` falls in, emptying what is too old; the
    /// current epoch.
    fn turn(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let epoch = (elapsed / self.window.as_nanos()) as u64;
        let mut seen = self.epoch.load(Ordering::Acquire);
        while seen < epoch {
            match self
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // The winner empties what no longer counts: the histogram
                    // that becomes current, and the other one too if it is
                    // older than the window just before.
                    self.empty((epoch % 2) as usize);
                    if epoch - seen >= 2 {
                        self.empty(((epoch + 1) % 2) as usize);
                    }
                    return epoch;
                }
                Err(actual) => seen = actual,
            }
        }
        seen
    }

    fn empty(&self, which: usize) {
        for count in self.histograms[which].iter() {
            count.store(0, Ordering::Relaxed);
        }
    }
}

/// The bucket of a latency.
fn bucket_of(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    let micros = micros.min((1 << MAX_EXPONENT) - 1);
    if micros < EXACT as u64 {
        return micros as usize;
    }
    let exponent = 63 - micros.leading_zeros(); // 4..MAX_EXPONENT
    let sub = (micros >> (exponent - 2)) & 3;
    EXACT + (exponent as usize - 4) * PER_OCTAVE + sub as usize
}

/// The largest latency a bucket holds (exclusive upper edge, in µs).
fn upper_edge(bucket: usize) -> Duration {
    if bucket < EXACT {
        return Duration::from_micros(bucket as u64 + 1);
    }
    let exponent = (bucket - EXACT) / PER_OCTAVE + 4;
    let sub = ((bucket - EXACT) % PER_OCTAVE) as u64;
    Duration::from_micros((5 + sub) << (exponent - 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    fn window(now: Instant) -> LatencyWindow {
        LatencyWindow::starting_at(LatencyConfig { window: WINDOW }, now)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn every_latency_falls_in_a_bucket_whose_edge_is_at_most_a_quarter_above_it() {
        for micros in (0..5000).chain([65_535, 1 << 20, 123_456_789]) {
            let latency = Duration::from_micros(micros);
            let bucket = bucket_of(latency);
            assert!(bucket < BUCKETS, "{micros}");
            let edge = upper_edge(bucket);
            assert!(edge > latency, "{micros} µs: edge {edge:?}");
            assert!(
                edge.as_micros() as f64 <= (micros as f64 + 1.0) * 1.25 + 1.0,
                "{micros}"
            );
        }
        assert_eq!(bucket_of(Duration::MAX), BUCKETS - 1);
    }

    #[test]
    fn the_percentile_is_read_from_the_samples() {
        let now = Instant::now();
        let w = window(now);
        for _ in 0..95 {
            w.record(now, ms(10));
        }
        for _ in 0..5 {
            w.record(now, ms(200));
        }
        let p50 = w.percentile(now, 0.5, 20).expect("enough samples");
        assert!(p50 > ms(10) && p50 <= ms(13), "{p50:?}");
        let p99 = w.percentile(now, 0.99, 20).expect("enough samples");
        assert!(p99 > ms(200) && p99 <= ms(250), "{p99:?}");
    }

    #[test]
    fn too_few_samples_give_no_percentile() {
        let now = Instant::now();
        let w = window(now);
        for _ in 0..19 {
            w.record(now, ms(10));
        }
        assert_eq!(w.percentile(now, 0.9, 20), None);
        w.record(now, ms(10));
        assert!(w.percentile(now, 0.9, 20).is_some());
    }

    #[test]
    fn the_previous_window_still_counts() {
        let now = Instant::now();
        let w = window(now);
        for _ in 0..30 {
            w.record(now, ms(10));
        }
        assert!(w.percentile(now + WINDOW + ms(1), 0.9, 20).is_some());
    }

    #[test]
    fn a_quiet_spell_of_two_windows_forgets_everything() {
        let now = Instant::now();
        let w = window(now);
        for _ in 0..30 {
            w.record(now, ms(10));
        }
        let later = now + WINDOW * 2 + ms(1);
        assert_eq!(w.percentile(later, 0.9, 20), None);
        for _ in 0..30 {
            w.record(later, ms(40));
        }
        let p = w.percentile(later, 0.9, 20).expect("the burst's samples");
        assert!(p > ms(40), "only the burst counts: {p:?}");
    }
}
