//! What the demo's guards report, counted for the summary and the circuit
//! timeline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upstream_guard::observe::{AttemptEvent, CircuitEvent, RetryDeniedEvent, RetryEvent};
use upstream_guard::Observer;

use crate::demo::DOWN;

/// Counts what the guard reports, across both demo upstreams.
#[derive(Clone, Debug)]
pub struct GuardStats(Arc<GuardCounters>);

#[derive(Debug)]
struct GuardCounters {
    started: Instant,
    attempts: AtomicU64,
    /// Attempts to the `down` upstream: no server records the refused ones.
    down_attempts: AtomicU64,
    retries: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    timeline: Mutex<Vec<TimelineEntry>>,
}

/// A line of the circuit timeline.
#[derive(Clone, Debug)]
pub struct TimelineEntry {
    pub at: Duration,
    pub what: TimelineEvent,
}

#[derive(Clone, Debug)]
pub enum TimelineEvent {
    /// A breaker changed state: key, from, to, open period.
    Transition {
        key: String,
        from: &'static str,
        to: &'static str,
        open_for: Option<Duration>,
    },
    /// The `down` upstream started listening.
    Recovered,
}

impl GuardStats {
    pub fn new(started: Instant) -> GuardStats {
        GuardStats(Arc::new(GuardCounters {
            started,
            attempts: AtomicU64::new(0),
            down_attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            denied: Mutex::default(),
            timeline: Mutex::default(),
        }))
    }

    pub fn note(&self, what: TimelineEvent) {
        let at = self.0.started.elapsed();
        if let Ok(mut timeline) = self.0.timeline.lock() {
            timeline.push(TimelineEntry { at, what });
        }
    }

    pub fn timeline(&self) -> Vec<TimelineEntry> {
        self.0
            .timeline
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    pub fn attempts(&self) -> u64 {
        self.0.attempts.load(Ordering::Relaxed)
    }

    pub fn down_attempts(&self) -> u64 {
        self.0.down_attempts.load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.0.retries.load(Ordering::Relaxed)
    }

    /// Retries the guard wanted but did not make, by reason.
    pub fn denied(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .denied
            .lock()
            .map(|denied| denied.clone())
            .unwrap_or_default()
    }
}

impl Observer for GuardStats {
    fn on_attempt(&self, event: &AttemptEvent<'_>) {
        self.0.attempts.fetch_add(1, Ordering::Relaxed);
        if event.request().upstream() == Some(DOWN) {
            self.0.down_attempts.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_retry(&self, _: &RetryEvent<'_>) {
        self.0.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        if let Ok(mut denied) = self.0.denied.lock() {
            *denied.entry(event.reason().as_str()).or_default() += 1;
        }
    }

    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        self.note(TimelineEvent::Transition {
            key: event.key().unwrap_or("-").to_owned(),
            from: event.from().as_str(),
            to: event.to().as_str(),
            open_for: event.open_for(),
        });
    }
}
