//! [`Clock`]: when a request started, when its deadline and its current
//! attempt end, and the one timer that wakes the request for either.
//!
//! The clock starts lazily, the first time the request has to wait: an inner
//! service that answers on the first poll costs no clock read and no timer.
//! gRPC requests start it at once, because their caller's deadline counts from
//! when it sent the request and the upstream must be told what is left.
//!
//! One [`Sleep`] serves the whole request. It is armed for one wait at a time
//! (reading a body, an attempt, a backoff, waiting for the service to be
//! ready) and reset for the next; every instant is capped by the deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::failure::FailureKind;

/// The longest the guard ever waits for anything: about thirty years, which no
/// request will live to see.
///
/// Longer settings (`Duration::MAX` reads as "no limit") are cut to this. Not
/// only to avoid overflow: tokio's timer wheel spans about 2.2 years, and a
/// timer further out is re-filed once per span. A timer a billion years away
/// is harmless in real time, but a runtime with a paused clock (as in tests)
/// would spend hours stepping its clock through the spans.
const HORIZON: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + d`, with `d` cut to the [`HORIZON`]; cannot overflow.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(HORIZON)).unwrap_or(now)
}

/// How early an inner failure may come and still be taken for our timeout: an
/// inner timer started from the `grpc-timeout` we sent (rounded down to its
/// unit) can fire a hair before ours.
const TIMER_TOLERANCE: Duration = Duration::from_millis(5);

pin_project! {
    /// A request's clock and its one timer.
    pub(crate) struct Clock {
        #[pin]
        timer: Option<Sleep>,
        times: Times,
    }
}

/// A request's instants: when it and its current attempt started, and so
/// when each must end. A plain value, for code that only reads the clock.
#[derive(Debug)]
pub(crate) struct Times {
    // Whether the timer is set for the current wait.
    armed: bool,
    // The deadline's length: the configured one, or a shorter inbound
    // `grpc-timeout`.
    budget: Duration,
    // Whether the caller chose the deadline (it is shorter than ours).
    callers_deadline: bool,
    attempt_timeout: Duration,
    started: Option<Instant>,
    attempt_started: Option<Instant>,
}

impl Clock {
    /// A clock for a request with the configured `deadline` and
    /// `attempt_timeout`, and the caller's `inbound` deadline if it sent one.
    pub(crate) fn new(
        deadline: Duration,
        inbound: Option<Duration>,
        attempt_timeout: Duration,
    ) -> Clock {
        let budget = inbound.map_or(deadline, |inbound| inbound.min(deadline));
        Clock {
            timer: None,
            times: Times {
                armed: false,
                budget,
                callers_deadline: budget < deadline,
                attempt_timeout,
                started: None,
                attempt_started: None,
            },
        }
    }

    /// The instants, to read or start.
    pub(crate) fn times(self: Pin<&mut Self>) -> &mut Times {
        self.project().times
    }

    /// The instants, before the clock is pinned.
    pub(crate) fn times_mut(&mut self) -> &mut Times {
        &mut self.times
    }

    /// A new attempt is being sent: its clock starts the first time it waits,
    /// and the next wait arms the timer anew.
    pub(crate) fn new_attempt(self: Pin<&mut Self>) {
        let times = self.project().times;
        times.attempt_started = None;
        times.armed = false;
    }

    /// Waits for the current attempt's end.
    pub(crate) fn poll_attempt(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.times.armed {
            let end = self.as_mut().times().attempt_end();
            self.as_mut().arm(end);
        }
        self.poll_timer(cx)
    }

    /// Waits for the deadline.
    pub(crate) fn poll_deadline(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.times.armed {
            let deadline = self.as_mut().times().deadline();
            self.as_mut().arm(deadline);
        }
        self.poll_timer(cx)
    }

    /// Sets the timer for a sleep of `d` from now; [`Clock::poll_timer`] waits
    /// for it, and the wait after it arms the timer anew.
    pub(crate) fn sleep(mut self: Pin<&mut Self>, d: Duration) {
        self.as_mut().arm(later(Instant::now(), d));
        self.project().times.armed = false;
    }

    /// Waits until `at` (for a request with several attempts out, the next of
    /// their ends and its next hedge). Re-arms the timer only when `at` moved;
    /// the next ordinary wait arms it anew.
    pub(crate) fn poll_at(mut self: Pin<&mut Self>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let set = self
            .timer
            .as_ref()
            .is_some_and(|sleep| sleep.deadline() == at);
        if !set {
            self.as_mut().arm(at);
        }
        self.as_mut().project().times.armed = false;
        self.poll_timer(cx)
    }

    /// Waits for the timer as it is set.
    pub(crate) fn poll_timer(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project().timer.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => Poll::Ready(()),
        }
    }

    fn arm(self: Pin<&mut Self>, at: Instant) {
        let mut this = self.project();
        this.times.armed = true;
        match this.timer.as_mut().as_pin_mut() {
            Some(sleep) => sleep.reset(at),
            None => this.timer.set(Some(tokio::time::sleep_until(at))),
        }
    }
}

impl Times {
    /// When the request's clock started, if it has.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }

    /// When the current attempt's clock started, if it has.
    pub(crate) fn attempt_started(&self) -> Option<Instant> {
        self.attempt_started
    }

    /// Whether the caller shortened the deadline: running out of it then says
    /// nothing about the upstream.
    pub(crate) fn callers_deadline(&self) -> bool {
        self.callers_deadline
    }

    /// Starts the request's clock and the current attempt's, where not started.
    pub(crate) fn start(&mut self, now: Instant) {
        self.started.get_or_insert(now);
        self.attempt_started.get_or_insert(now);
    }

    /// The request's deadline; starts the clock if needed.
    pub(crate) fn deadline(&mut self) -> Instant {
        let started = *self.started.get_or_insert_with(Instant::now);
        later(started, self.budget)
    }

    /// Makes `started` the current attempt's start: a hedge that answered is
    /// the attempt the request is judged by.
    pub(crate) fn set_attempt_started(&mut self, started: Instant) {
        self.attempt_started = Some(started);
    }

    /// How long one attempt may take.
    pub(crate) fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// When the current attempt must end: its own timeout, capped by the
    /// deadline. Starts the clocks if needed.
    pub(crate) fn attempt_end(&mut self) -> Instant {
        if self.attempt_started.is_none() {
            self.start(Instant::now());
        }
        let deadline = self.deadline();
        let started = self.attempt_started.unwrap_or(deadline);
        later(started, self.attempt_timeout).min(deadline)
    }

    /// If the current attempt's time is up, which timeout ended it. Asked when
    /// an attempt that had to wait fails: a failure within a hair of the end is
    /// an inner timer started from our `grpc-timeout`, not a broken connection.
    pub(crate) fn timed_out(&mut self) -> Option<FailureKind> {
        if !self.armed {
            return None;
        }
        let end = self.attempt_end();
        let tolerance = (self.attempt_timeout / 100).min(TIMER_TOLERANCE);
        if later(Instant::now(), tolerance) < end {
            return None;
        }
        Some(self.kind_of_end(end))
    }

    /// Which of our timeouts ends at `end`.
    fn kind_of_end(&mut self, end: Instant) -> FailureKind {
        if end >= self.deadline() {
            FailureKind::DeadlineExceeded
        } else {
            FailureKind::AttemptTimeout
        }
    }

    /// What to tell a gRPC upstream in `grpc-timeout`: what is left of the
    /// deadline, or the attempt timeout if that is shorter; and which of our
    /// timeouts that stands for.
    pub(crate) fn grpc_timeout(&mut self) -> (Duration, FailureKind) {
        let left = match self.started {
            Some(_) => self.deadline().saturating_duration_since(Instant::now()),
            None => self.budget,
        };
        if self.attempt_timeout < left {
            (self.attempt_timeout, FailureKind::AttemptTimeout)
        } else {
            (left, FailureKind::DeadlineExceeded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_shorter_inbound_deadline_is_the_callers() {
        assert!(Clock::new(10 * SEC, Some(SEC), 5 * SEC)
            .times
            .callers_deadline());
        assert!(!Clock::new(10 * SEC, Some(60 * SEC), 5 * SEC)
            .times
            .callers_deadline());
        assert!(!Clock::new(10 * SEC, None, 5 * SEC).times.callers_deadline());
    }

    #[test]
    fn an_attempt_ends_at_its_timeout_or_the_deadline_whichever_is_first() {
        let now = Instant::now();
        let mut clock = Clock::new(10 * SEC, None, 4 * SEC);
        let times = clock.times_mut();
        times.start(now);
        assert_eq!(times.attempt_end(), now + 4 * SEC);
        times.attempt_started = Some(now + 8 * SEC);
        assert_eq!(times.attempt_end(), now + 10 * SEC);
        assert_eq!(
            times.kind_of_end(now + 10 * SEC),
            FailureKind::DeadlineExceeded
        );
        assert_eq!(
            times.kind_of_end(now + 4 * SEC),
            FailureKind::AttemptTimeout
        );
    }

    #[test]
    fn the_grpc_timeout_is_what_is_left_or_the_attempt_timeout() {
        let mut clock = Clock::new(10 * SEC, None, 4 * SEC);
        let expected = (4 * SEC, FailureKind::AttemptTimeout);
        assert_eq!(clock.times_mut().grpc_timeout(), expected);
        let mut clock = Clock::new(10 * SEC, Some(2 * SEC), 4 * SEC);
        let expected = (2 * SEC, FailureKind::DeadlineExceeded);
        assert_eq!(clock.times_mut().grpc_timeout(), expected);
    }

    #[test]
    fn waits_are_cut_to_the_horizon() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::MAX), now + HORIZON);
    }
}
