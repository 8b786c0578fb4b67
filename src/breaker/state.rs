//! One circuit breaker's state machine, lock-free.
//!
//! The state lives in one packed `AtomicU64` so that every transition, and every
//! half-open probe admission, is a single compare-and-swap: there is no moment in
//! which another thread can see a half-updated state, and half-open can never admit
//! more probes than configured.
//!
//! ```text
//!  bits 0..2    state: closed, open, half-open, opening
//!  bits 2..12   probes admitted in this half-open period
//!  bits 12..22  probes that succeeded in this half-open period
//!  bits 22..64  epoch: incremented by every transition
//! ```
//!
//! The end of the open period does not fit in the word, so tripping takes two
//! steps: the compare-and-swap that wins the trip moves the word to *opening*,
//! the winner alone writes the open period, then moves the word to *open*. A
//! racer that loses the trip writes nothing, so the stored period is always the
//! one the reported transition names. Opening behaves as open to everyone else.
//!
//! The closed-state hot path is one load to admit, and one load to record a
//! success (the consecutive-failure counter is only written when it is not zero).
//! Time is passed in as nanoseconds since the registry's epoch: this module never
//! reads a clock, which keeps it deterministic and lets loom model it.

use super::sync::{AtomicU32, AtomicU64, Ordering};
use super::window::Window;

const STATE_MASK: u64 = 0b11;
const PROBES_SHIFT: u32 = 2;
const SUCCESS_SHIFT: u32 = 12;
const EPOCH_SHIFT: u32 = 22;
const COUNT_MASK: u64 = 0x3ff;

/// Most probes a half-open breaker can be configured to admit.
pub(crate) const MAX_PROBES: u32 = COUNT_MASK as u32;

/// A breaker's state. With the `serde` feature it serializes as its
/// [`as_str`](CircuitState::as_str) name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls flow; failures are counted.
    Closed,
    /// Calls are rejected at once with 503 until the open period ends.
    Open,
    /// A few probe calls are let through to test the upstream.
    HalfOpen,
    /// Forced open by an operator: every call is rejected.
    ForcedOpen,
    /// Disabled by an operator: every call flows and nothing is counted.
    Disabled,
}

impl CircuitState {
    /// A short, stable name for spans and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::Disabled => "disabled",
        }
    }

    /// The gauge value used by the metrics observer: 0 closed, 1 half-open,
    /// 2 open (forced open counts as open, disabled as closed).
    pub const fn gauge(self) -> u8 {
        match self {
            CircuitState::Closed | CircuitState::Disabled => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open | CircuitState::ForcedOpen => 2,
        }
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
/// Tripped, and the winner of the trip is still writing the open period.
const OPENING: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Word(u64);

impl Word {
    fn state(self) -> u64 {
        self.0 & STATE_MASK
    }
    fn probes(self) -> u32 {
        ((self.0 >> PROBES_SHIFT) & COUNT_MASK) as u32
    }
    fn successes(self) -> u32 {
        ((self.0 >> SUCCESS_SHIFT) & COUNT_MASK) as u32
    }
    fn epoch(self) -> u64 {
        self.0 >> EPOCH_SHIFT
    }
    fn next(self, state: u64) -> Word {
        Word(((self.epoch() + 1) << EPOCH_SHIFT) | state)
    }
    /// The same word in another state, in the same epoch.
    fn with_state(self, state: u64) -> Word {
        Word((self.0 & !STATE_MASK) | state)
    }
    fn with_probes(self, probes: u32) -> Word {
        Word((self.0 & !(COUNT_MASK << PROBES_SHIFT)) | (u64::from(probes) << PROBES_SHIFT))
    }
    fn with_successes(self, successes: u32) -> Word {
        Word((self.0 & !(COUNT_MASK << SUCCESS_SHIFT)) | (u64::from(successes) << SUCCESS_SHIFT))
    }
    fn public(self) -> CircuitState {
        match self.state() {
            CLOSED => CircuitState::Closed,
            OPEN | OPENING => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }
}

/// The trip policies and timings of a breaker, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Policy {
    /// Trip after this many consecutive failures (0: policy off).
    pub(crate) consecutive_failures: u32,
    /// Trip when failures / calls ≥ this over the window (with enough calls).
    pub(crate) failure_rate: Option<f64>,
    /// Trip when slow calls / calls ≥ this over the window (with enough calls).
    pub(crate) slow_call_rate: Option<f64>,
    /// Calls the window must hold before a rate policy may trip.
    pub(crate) min_calls: u32,
    pub(crate) open_nanos: u64,
    pub(crate) max_open_nanos: u64,
    pub(crate) probes: u32,
}

impl Policy {
    pub(crate) fn uses_window(&self) -> bool {
        self.failure_rate.is_some() || self.slow_call_rate.is_some()
    }

    /// How long the `trips`-th consecutive trip keeps the breaker open: doubling
    /// from the base, capped.
    fn open_for(&self, trips: u32) -> u64 {
        let shift = trips.saturating_sub(1).min(32);
        self.open_nanos
            .saturating_mul(1u64 << shift)
            .min(self.max_open_nanos.max(self.open_nanos))
    }
}

/// A state change, for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
    /// For transitions to open: how long it stays open, in nanoseconds.
    pub(crate) open_nanos: Option<u64>,
}

/// Whether a call may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Go ahead. `probe` holds the half-open epoch when this call is a probe: its
    /// result decides the breaker, and it must be released if it never reports.
    Admitted { probe: Option<u64> },
    /// Rejected; the upstream may be tried again after this many nanoseconds.
    Rejected { retry_after_nanos: u64 },
}

/// How a call ended, as far as the breaker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

/// The state of one breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    word: AtomicU64,
    open_until: AtomicU64,
    consecutive: AtomicU32,
    trips: AtomicU32,
    window: Window,
}

/// Retry-After for a half-open breaker whose probes are all out: one second.
const HALF_OPEN_RETRY_NANOS: u64 = 1_000_000_000;

impl Breaker {
    pub(crate) fn new(window_nanos: u64) -> Breaker {
        Breaker {
            word: AtomicU64::new(CLOSED),
            open_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            trips: AtomicU32::new(0),
            window: Window::new(window_nanos),
        }
    }

    /// Forgets everything: closed, no counts. Used when a registry slot is reused.
    pub(crate) fn reset(&self) {
        let word = Word(self.word.load(Ordering::Acquire));
        self.word.store(word.next(CLOSED).0, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        self.trips.store(0, Ordering::Relaxed);
        self.window.clear();
    }

    pub(crate) fn state(&self) -> CircuitState {
        Word(self.word.load(Ordering::Acquire)).public()
    }

    /// Whether the breaker is closed right now (no clock needed).
    pub(crate) fn is_closed(&self) -> bool {
        Word(self.word.load(Ordering::Acquire)).state() == CLOSED
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    pub(crate) fn trips(&self) -> u32 {
        self.trips.load(Ordering::Relaxed)
    }

    pub(crate) fn window_counts(&self, now: u64) -> (u64, u64, u64) {
        self.window.totals(now)
    }

    /// Nanoseconds until an open breaker turns half-open (zero if not open, or
    /// if the trip that opened it is still writing the open period).
    pub(crate) fn nanos_until_half_open(&self, now: u64) -> u64 {
        if Word(self.word.load(Ordering::Acquire)).state() != OPEN {
            return 0;
        }
        self.open_until.load(Ordering::Acquire).saturating_sub(now)
    }

    /// Decides whether a call may go ahead. `now` is only called when the breaker
    /// is not closed.
    pub(crate) fn admit(
        &self,
        policy: &Policy,
        now: impl FnOnce() -> u64,
    ) -> (Admission, Option<Transition>) {
        let mut word = Word(self.word.load(Ordering::Acquire));
        if word.state() == CLOSED {
            return (Admission::Admitted { probe: None }, None);
        }
        let now = now();
        loop {
            match word.state() {
                CLOSED => return (Admission::Admitted { probe: None }, None),
                OPEN => {
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        let retry_after_nanos = until - now;
                        return (Admission::Rejected { retry_after_nanos }, None);
                    }
                    // The open period is over: become half-open, taking the first
                    // probe in the same step.
                    let next = word.next(HALF_OPEN).with_probes(1);
                    match self.word.compare_exchange(
                        word.0,
                        next.0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            let transition = Transition {
                                from: CircuitState::Open,
                                to: CircuitState::HalfOpen,
                                open_nanos: None,
                            };
                            let admission = Admission::Admitted {
                                probe: Some(next.epoch()),
                            };
                            return (admission, Some(transition));
                        }
                        Err(actual) => word = Word(actual),
                    }
                }
                OPENING => {
                    // Just tripped; the open period is not written yet, but it is
                    // at least the base one.
                    let retry_after_nanos = policy.open_nanos;
                    return (Admission::Rejected { retry_after_nanos }, None);
                }
                _ => {
                    if word.probes() >= policy.probes {
                        let rejected = Admission::Rejected {
                            retry_after_nanos: HALF_OPEN_RETRY_NANOS,
                        };
                        return (rejected, None);
                    }
                    let next = word.with_probes(word.probes() + 1);
                    match self.word.compare_exchange(
                        word.0,
                        next.0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            let admission = Admission::Admitted {
                                probe: Some(word.epoch()),
                            };
                            return (admission, None);
                        }
                        Err(actual) => word = Word(actual),
                    }
                }
            }
        }
    }

    /// Gives back a probe that will never report (its request was dropped), so
    /// half-open cannot get stuck with all its probes out.
    pub(crate) fn release_probe(&self, epoch: u64) {
        let mut word = Word(self.word.load(Ordering::Acquire));
        while word.state() == HALF_OPEN && word.epoch() == epoch && word.probes() > 0 {
            let next = word.with_probes(word.probes() - 1);
            match self
                .word
                .compare_exchange(word.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => word = Word(actual),
            }
        }
    }

    /// Records how a call ended. `now` is only called when a clock is needed: a
    /// rate policy is configured, or the breaker trips.
    pub(crate) fn record(
        &self,
        policy: &Policy,
        record: Record,
        probe: Option<u64>,
        now: impl Fn() -> u64,
    ) -> Option<Transition> {
        if let Some(epoch) = probe {
            return self.record_probe(policy, record, epoch, &now);
        }
        let word = Word(self.word.load(Ordering::Acquire));
        if word.state() != CLOSED {
            // A late result of a call admitted before the breaker opened.
            return None;
        }
        let mut trip = false;
        if record.failure {
            let failures = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
            trip |= policy.consecutive_failures > 0 && failures >= policy.consecutive_failures;
        } else if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Release);
        }
        if policy.uses_window() {
            let now = now();
            self.window.record(now, record.failure, record.slow);
            trip |= self.rates_exceeded(policy, now);
        }
        if trip {
            self.trip(policy, word, CircuitState::Closed, now())
        } else {
            None
        }
    }

    fn rates_exceeded(&self, policy: &Policy, now: u64) -> bool {
        let (calls, failures, slow) = self.window.totals(now);
        if calls == 0 || calls < u64::from(policy.min_calls) {
            return false;
        }
        let over =
            |rate: Option<f64>, count: u64| rate.is_some_and(|r| count as f64 / calls as f64 >= r);
        over(policy.failure_rate, failures) || over(policy.slow_call_rate, slow)
    }

    fn record_probe(
        &self,
        policy: &Policy,
        record: Record,
        epoch: u64,
        now: &impl Fn() -> u64,
    ) -> Option<Transition> {
        let mut word = Word(self.word.load(Ordering::Acquire));
        loop {
            if word.state() != HALF_OPEN || word.epoch() != epoch {
                // The half-open period this probe belonged to is over.
                return None;
            }
            if record.failure || record.slow {
                // Other probes change the word concurrently (admissions, releases,
                // successes): retry until this failure reopens the breaker or the
                // half-open period is over.
                match self.try_trip(policy, word, CircuitState::HalfOpen, now()) {
                    Ok(transition) => return Some(transition),
                    Err(actual) => {
                        word = actual;
                        continue;
                    }
                }
            }
            let successes = word.successes() + 1;
            let (next, closes) = if successes >= policy.probes {
                (word.next(CLOSED), true)
            } else {
                (word.with_successes(successes), false)
            };
            match self
                .word
                .compare_exchange(word.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if closes => {
                    self.consecutive.store(0, Ordering::Release);
                    self.trips.store(0, Ordering::Release);
                    self.window.clear();
                    return Some(Transition {
                        from: CircuitState::HalfOpen,
                        to: CircuitState::Closed,
                        open_nanos: None,
                    });
                }
                Ok(_) => return None,
                Err(actual) => word = Word(actual),
            }
        }
    }

    /// Opens a closed breaker. Only the thread whose compare-and-swap wins reports
    /// the transition; a closed word only changes by a transition, so losing means
    /// someone else tripped it.
    fn trip(
        &self,
        policy: &Policy,
        word: Word,
        from: CircuitState,
        now: u64,
    ) -> Option<Transition> {
        self.try_trip(policy, word, from, now).ok()
    }

    /// Opens the breaker if it is still exactly `word`; else gives the new word.
    ///
    /// Only the winner of the compare-and-swap writes the open period (and the
    /// trip count it grows from): a racer that computed a period too, from a trip
    /// count the winner already bumped, must not overwrite the winner's.
    fn try_trip(
        &self,
        policy: &Policy,
        word: Word,
        from: CircuitState,
        now: u64,
    ) -> Result<Transition, Word> {
        let opening = word.next(OPENING);
        if let Err(actual) =
            self.word
                .compare_exchange(word.0, opening.0, Ordering::AcqRel, Ordering::Acquire)
        {
            return Err(Word(actual));
        }
        let trips = self.trips.load(Ordering::Acquire) + 1;
        let open_nanos = policy.open_for(trips);
        self.open_until
            .store(now.saturating_add(open_nanos), Ordering::Release);
        self.trips.store(trips, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        self.window.clear();
        // Open only now that the period is written: readers of an open word read
        // it. This fails only if the slot was reset (given to another key)
        // meanwhile, which leaves the breaker as the reset made it.
        let _ = self.word.compare_exchange(
            opening.0,
            opening.with_state(OPEN).0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(Transition {
            from,
            to: CircuitState::Open,
            open_nanos: Some(open_nanos),
        })
    }
}

#[cfg(all(test, not(upstream_guard_loom)))]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn policy() -> Policy {
        Policy {
            consecutive_failures: 3,
            failure_rate: None,
            slow_call_rate: None,
            min_calls: 10,
            open_nanos: 5 * SEC,
            max_open_nanos: 20 * SEC,
            probes: 2,
        }
    }

    const FAIL: Record = Record {
        failure: true,
        slow: false,
    };
    const OK: Record = Record {
        failure: false,
        slow: false,
    };

    fn admitted(b: &Breaker, p: &Policy, now: u64) -> Option<Option<u64>> {
        match b.admit(p, || now).0 {
            Admission::Admitted { probe } => Some(probe),
            Admission::Rejected { .. } => None,
        }
    }

    #[test]
    fn trips_at_exactly_the_consecutive_threshold() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        assert_eq!(b.record(&p, FAIL, None, || 0), None);
        assert_eq!(b.record(&p, FAIL, None, || 0), None);
        assert_eq!(b.state(), CircuitState::Closed);
        let t = b.record(&p, FAIL, None, || 0).unwrap();
        assert_eq!((t.from, t.to), (CircuitState::Closed, CircuitState::Open));
        assert_eq!(t.open_nanos, Some(5 * SEC));
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        b.record(&p, FAIL, None, || 0);
        b.record(&p, FAIL, None, || 0);
        b.record(&p, OK, None, || 0);
        b.record(&p, FAIL, None, || 0);
        b.record(&p, FAIL, None, || 0);
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn open_rejects_until_the_period_ends_then_admits_probes() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        for _ in 0..3 {
            b.record(&p, FAIL, None, || 0);
        }
        match b.admit(&p, || SEC).0 {
            Admission::Rejected { retry_after_nanos } => assert_eq!(retry_after_nanos, 4 * SEC),
            other => panic!("{other:?}"),
        }
        let first = admitted(&b, &p, 5 * SEC).expect("first probe");
        assert!(first.is_some());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(admitted(&b, &p, 5 * SEC).unwrap().is_some(), "second probe");
        assert_eq!(admitted(&b, &p, 5 * SEC), None, "no third probe");
    }

    #[test]
    fn probes_succeeding_close_the_breaker() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        for _ in 0..3 {
            b.record(&p, FAIL, None, || 0);
        }
        let a = admitted(&b, &p, 6 * SEC).unwrap();
        let c = admitted(&b, &p, 6 * SEC).unwrap();
        assert_eq!(b.record(&p, OK, a, || 6 * SEC), None);
        let t = b.record(&p, OK, c, || 6 * SEC).unwrap();
        assert_eq!(
            (t.from, t.to),
            (CircuitState::HalfOpen, CircuitState::Closed)
        );
        assert_eq!(b.trips(), 0);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        for _ in 0..3 {
            b.record(&p, FAIL, None, || 0);
        }
        let probe = admitted(&b, &p, 5 * SEC).unwrap();
        let t = b.record(&p, FAIL, probe, || 5 * SEC).unwrap();
        assert_eq!((t.from, t.to), (CircuitState::HalfOpen, CircuitState::Open));
        assert_eq!(t.open_nanos, Some(10 * SEC), "second trip doubles");
        assert_eq!(b.nanos_until_half_open(5 * SEC), 10 * SEC);
    }

    #[test]
    fn a_trip_still_writing_its_open_period_rejects_for_at_least_the_base_period() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        // The word as a trip's winner leaves it before writing `open_until`.
        b.word
            .store(Word(CLOSED).next(OPENING).0, Ordering::Release);
        match b.admit(&p, || 7 * SEC) {
            (Admission::Rejected { retry_after_nanos }, None) => {
                assert_eq!(retry_after_nanos, 5 * SEC)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.is_closed());
    }

    #[test]
    fn open_duration_growth_is_capped() {
        let p = policy();
        assert_eq!(p.open_for(1), 5 * SEC);
        assert_eq!(p.open_for(2), 10 * SEC);
        assert_eq!(p.open_for(3), 20 * SEC);
        assert_eq!(p.open_for(9), 20 * SEC);
        assert_eq!(p.open_for(u32::MAX), 20 * SEC);
    }

    #[test]
    fn a_released_probe_can_be_taken_again() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        for _ in 0..3 {
            b.record(&p, FAIL, None, || 0);
        }
        let one = admitted(&b, &p, 5 * SEC).unwrap().unwrap();
        admitted(&b, &p, 5 * SEC).unwrap();
        assert_eq!(admitted(&b, &p, 5 * SEC), None);
        b.release_probe(one);
        assert!(admitted(&b, &p, 5 * SEC).is_some());
    }

    #[test]
    fn stale_probe_results_are_ignored() {
        let (b, p) = (Breaker::new(10 * SEC), policy());
        for _ in 0..3 {
            b.record(&p, FAIL, None, || 0);
        }
        let probe = admitted(&b, &p, 5 * SEC).unwrap();
        b.record(&p, FAIL, probe, || 5 * SEC);
        // The half-open period is over: this late success changes nothing.
        assert_eq!(b.record(&p, OK, probe, || 5 * SEC), None);
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn failure_rate_trips_at_exactly_the_rate_with_enough_calls() {
        let p = Policy {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            min_calls: 10,
            ..policy()
        };
        let b = Breaker::new(10 * SEC);
        // Nine calls, four failing: below min_calls, whatever the rate.
        for i in 0..9 {
            let r = if i % 2 == 1 { FAIL } else { OK };
            assert_eq!(b.record(&p, r, None, || SEC), None, "call {i}");
        }
        // The tenth call fails: 5 of 10 = 50 %, exactly the threshold.
        let t = b.record(&p, FAIL, None, || SEC).unwrap();
        assert_eq!(t.to, CircuitState::Open);
    }

    #[test]
    fn failure_rate_below_the_threshold_does_not_trip() {
        let p = Policy {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            min_calls: 10,
            ..policy()
        };
        let b = Breaker::new(10 * SEC);
        for i in 0..100 {
            let r = if i % 3 == 0 { FAIL } else { OK };
            assert_eq!(b.record(&p, r, None, || SEC), None, "call {i}");
        }
    }

    #[test]
    fn the_window_slides_so_old_successes_do_not_mask_a_burst() {
        let p = Policy {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            min_calls: 20,
            ..policy()
        };
        let b = Breaker::new(10 * SEC);
        for i in 0..10_000u64 {
            b.record(&p, OK, None, || i * 1_000_000);
        }
        // 11 s later the successes have left the window: a burst trips it.
        let later = 21 * SEC;
        let mut tripped = None;
        for i in 0..20 {
            if let Some(t) = b.record(&p, FAIL, None, || later) {
                tripped = Some(i + 1);
                assert_eq!(t.to, CircuitState::Open);
                break;
            }
        }
        assert_eq!(tripped, Some(20), "trips at exactly min_calls failures");
    }

    #[test]
    fn slow_call_rate_trips_on_slow_successes() {
        let p = Policy {
            consecutive_failures: 0,
            slow_call_rate: Some(0.8),
            min_calls: 5,
            ..policy()
        };
        let b = Breaker::new(10 * SEC);
        let slow = Record {
            failure: false,
            slow: true,
        };
        for _ in 0..4 {
            assert_eq!(b.record(&p, slow, None, || SEC), None);
        }
        assert_eq!(
            b.record(&p, slow, None, || SEC).unwrap().to,
            CircuitState::Open
        );
    }
}
