//! A round of attempts that may be hedged: the round's first attempt, pinned
//! in the response future, and the hedges sent after it ([`Flight`]).
//!
//! The rules (see [`HedgePolicy`](crate::HedgePolicy)):
//! - the first answer that is not a failure wins; the attempts still out are
//!   dropped with the round, and a dropped attempt records nothing;
//! - an attempt that fails while another is out does not end the request: it
//!   is reported, its failure is held, and the next hedge may go at once;
//! - held failures count against the breaker only if no attempt of the round
//!   wins (a loser's failure never opens a breaker);
//! - every hedge has its own attempt timeout, its own span, and is paid from
//!   the retry budget; none starts when the deadline is closer than the delay;
//! - when the last attempt out fails, the round is over and the request goes
//!   on as after any failed attempt: retry or answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::{pay_for_resend, tell_grpc_timeout, Attempted, Call, Kept};
use crate::body::RequestBody;
use crate::breaker::CircuitState;
use crate::bulkhead::{Full, Permit};
use crate::clock::{Clock, Times};
use crate::failure::FailureKind;
use crate::hedge::{decide, Flight, HedgeDecision, InFlight};
use crate::observe::{AttemptOutcome, HedgeDenied, HedgeOutcome};
use crate::panic;
use crate::report::Report;
use crate::BoxError;

/// A hedged request's state across its rounds.
#[derive(Debug)]
pub(super) struct Round {
    /// Hedges sent by the request, all rounds together.
    sent: u32,
    /// The number of the round's first attempt.
    first: u32,
    /// How long an attempt is out before it is hedged, this round.
    delay: Duration,
    /// When the next hedge is due; `None` once the round may send no more.
    due: Option<Instant>,
    /// Failures of attempts that ended while another was out.
    held: u32,
}

impl Round {
    pub(super) fn sent(&self) -> u32 {
        self.sent
    }

    /// The held failures, to be recorded; none are left held.
    pub(super) fn take_held(&mut self) -> u32 {
        std::mem::take(&mut self.held)
    }
}

/// What trying to send a due hedge did.
enum Tried {
    /// A hedge is out, or the round will send no more: look again.
    Changed,
    /// The service is not ready: it wakes the request when it is.
    NotReady,
}

impl<S, B, ResB> Call<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
{
    /// Starts a round, whose first attempt is number `first`, for a request
    /// that may be sent again, if the guard hedges and the request is safe to
    /// hedge: its clock starts now, and its first hedge is due after the
    /// policy's delay (none while a percentile has too few samples).
    pub(super) fn begin_round(&mut self, first: u32, times: &mut Times) {
        let Some(hedging) = &self.shared.hedge else {
            return;
        };
        if !self.safe_to_resend {
            return;
        }
        let now = Instant::now();
        times.start(now);
        let latencies = hedging.latencies(self.target);
        let delay = hedging.policy.delay(latencies, now);
        let sent = self.hedge.as_ref().map_or(0, Round::sent);
        self.hedge = Some(Round {
            sent,
            first,
            delay: delay.unwrap_or_default(),
            due: delay.map(|delay| crate::clock::later(now, delay)),
            held: 0,
        });
    }

    /// Whether this request's attempts go in hedged rounds.
    pub(crate) fn is_hedged(&self) -> bool {
        self.hedge.is_some()
    }

    pub(super) fn hedges_sent(&self) -> u32 {
        self.hedge.as_ref().map_or(0, Round::sent)
    }

    /// Adds an answered attempt's latency to its upstream's window, when
    /// hedges are timed by a percentile.
    pub(super) fn record_latency(&self, outcome: AttemptOutcome, started: Option<Instant>) {
        if outcome.is_failure() {
            return;
        }
        let Some(hedging) = &self.shared.hedge else {
            return;
        };
        if let (Some(window), Some(started)) = (hedging.latencies(self.target), started) {
            let now = Instant::now();
            window.record(now, now.saturating_duration_since(started));
        }
    }

    /// Waits for the round's attempts, sending hedges as they fall due: the
    /// attempt to judge (one that won, or the last one out, failed).
    pub(crate) fn poll_hedged(
        &mut self,
        mut first: Pin<&mut Option<S::Future>>,
        flight: &mut Flight<S::Future>,
        mut clock: Pin<&mut Clock>,
        cx: &mut Context<'_>,
    ) -> Poll<Attempted<S::Response>> {
        loop {
            if let Some(future) = first.as_mut().as_pin_mut() {
                let polled = match self.report.in_attempt(|| panic::poll(future, cx)) {
                    Ok(polled) => polled.map(Ok),
                    Err(panic) => Poll::Ready(Err(panic)),
                };
                if let Poll::Ready(result) = polled {
                    first.set(None);
                    let attempted = self.judge(result, self.grpc_timeout_kind);
                    let started = clock.as_mut().times().attempt_started();
                    let number = self.first_number();
                    let ended = Ended::first(number, started);
                    match self.settle(attempted, ended, flight.len(), clock.as_mut()) {
                        Some(attempted) => return Poll::Ready(attempted),
                        None => continue,
                    }
                }
            }
            let polled = flight.poll_next(cx, |hedge, cx| hedge.poll(cx));
            if let Poll::Ready((hedge, result)) = polled {
                let attempted = self.judge(result, hedge.grpc_timeout_kind);
                let others = flight.len() + usize::from(first.is_some());
                match self.settle(attempted, Ended::of(hedge), others, clock.as_mut()) {
                    Some(attempted) => return Poll::Ready(attempted),
                    None => continue,
                }
            }
            if let Some(attempted) = self.expire(first.as_mut(), flight, clock.as_mut()) {
                return Poll::Ready(attempted);
            }
            let now = Instant::now();
            let mut due = self.hedge.as_ref().and_then(|round| round.due);
            if due.is_some_and(|due| due <= now) {
                match self.try_hedge(flight, clock.as_mut(), now, cx) {
                    Tried::Changed => continue,
                    // The service's readiness wakes us; the timer must not.
                    Tried::NotReady => due = None,
                }
            }
            let timeout = clock.as_mut().times().attempt_timeout();
            let first_end = first
                .is_some()
                .then(|| clock.as_mut().times().attempt_end());
            let deadline = clock.as_mut().times().deadline();
            let wake = [due, first_end, flight.first_end(timeout)]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            if clock.as_mut().poll_at(wake, cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// How an attempt of a hedged round went: its answer, its error, or a
    /// panic caught while it was polled.
    fn judge(
        &self,
        result: Result<Result<S::Response, S::Error>, BoxError>,
        grpc_timeout_kind: FailureKind,
    ) -> Attempted<S::Response> {
        match result {
            Ok(Ok(response)) => self.judge_response(response, grpc_timeout_kind),
            Ok(Err(error)) => self.judge_error(error.into(), None),
            Err(panic) => Attempted::failed(FailureKind::Panic, panic),
        }
    }

    /// The number of the round's first attempt.
    fn first_number(&self) -> u32 {
        self.hedge
            .as_ref()
            .map_or(self.attempt, |round| round.first)
    }

    /// Ends the attempts whose time ran out: the attempt to judge if that was
    /// the last one out, else `None` (the expired ones were settled as lost).
    fn expire(
        &mut self,
        mut first: Pin<&mut Option<S::Future>>,
        flight: &mut Flight<S::Future>,
        mut clock: Pin<&mut Clock>,
    ) -> Option<Attempted<S::Response>> {
        let now = Instant::now();
        let times = clock.as_mut().times();
        let deadline = times.deadline();
        let timeout = times.attempt_timeout();
        let kind = |end: Instant| {
            if end >= deadline {
                FailureKind::DeadlineExceeded
            } else {
                FailureKind::AttemptTimeout
            }
        };
        if first.is_some() {
            let end = clock.as_mut().times().attempt_end();
            if end <= now {
                first.set(None);
                let started = clock.as_mut().times().attempt_started();
                let ended = Ended::first(self.first_number(), started);
                let attempted = Attempted::Failed(kind(end), None);
                if let Some(judged) = self.settle(attempted, ended, flight.len(), clock.as_mut()) {
                    return Some(judged);
                }
            }
        }
        while let Some(hedge) = flight.take_expired(now, timeout) {
            let end = crate::clock::later(hedge.started, timeout).min(deadline);
            let attempted = Attempted::Failed(kind(end), None);
            let others = flight.len() + usize::from(first.is_some());
            if let Some(judged) = self.settle(attempted, Ended::of(hedge), others, clock.as_mut()) {
                return Some(judged);
            }
        }
        if now >= deadline {
            // Everything still out ends with the deadline.
            flight.clear();
            first.set(None);
            let started = clock.as_mut().times().attempt_started();
            let ended = Ended::first(self.first_number(), started);
            let attempted = Attempted::Failed(FailureKind::DeadlineExceeded, None);
            return self.settle(attempted, ended, 0, clock);
        }
        None
    }

    /// Settles an attempt that ended with `others` still out: the attempt to
    /// judge if it won or was the last one out, else `None` (its failure is
    /// reported and held, and the next hedge may go at once).
    fn settle(
        &mut self,
        attempted: Attempted<S::Response>,
        ended: Ended,
        others: usize,
        clock: Pin<&mut Clock>,
    ) -> Option<Attempted<S::Response>> {
        let won = match &attempted {
            Attempted::Response(_, _, class) => !class.is_failure(),
            Attempted::Failed(..) => false,
        };
        if won || others == 0 {
            self.judge_as(ended, clock.times());
            if won {
                if let Some(round) = self.hedge.as_mut() {
                    round.held = 0;
                    round.due = None;
                }
                if self.judged != self.first_number() {
                    let observer = self.shared.observer.as_deref();
                    (self.report).hedge(observer, self.facts(), self.judged, HedgeOutcome::Won);
                }
            }
            return Some(attempted);
        }
        let outcome = attempted.outcome();
        // What it measured feeds an adaptive limit: through its own place, or
        // the request's for the round's first attempt.
        if let Some(permit) = ended.permit.as_ref().or(self.permit.as_ref()) {
            permit.attempt_ended(outcome, ended.started);
        }
        let observer = self.shared.observer.as_deref();
        let span = ended.span.as_ref().unwrap_or(self.report.attempt_span());
        Report::attempt_ended_in(
            span,
            observer,
            self.facts(),
            ended.number,
            outcome,
            ended.started,
        );
        if let Some(round) = self.hedge.as_mut() {
            round.held += 1;
            if round.due.is_some() {
                round.due = Some(Instant::now());
            }
        }
        None
    }

    /// Makes `ended` the attempt the request is judged by.
    fn judge_as(&mut self, ended: Ended, times: &mut Times) {
        self.judged = ended.number;
        if let Some(started) = ended.started {
            times.set_attempt_started(started);
        }
        if let Some(span) = ended.span {
            self.report.adopt(span);
        }
    }

    /// Sends the due hedge if the rules allow it (see [`decide`]).
    fn try_hedge(
        &mut self,
        flight: &mut Flight<S::Future>,
        mut clock: Pin<&mut Clock>,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Tried {
        let breaker_closed = self.breaker_allows_retry();
        let Some(round) = self.hedge.as_mut() else {
            return Tried::Changed;
        };
        let Kept::Again(again) = &mut self.kept else {
            round.due = None;
            return Tried::Changed;
        };
        match again.service.poll_ready(cx) {
            Poll::Pending => return Tried::NotReady,
            Poll::Ready(Err(_)) => {
                // Not a hedge's business: the round goes on without one.
                round.due = None;
                return Tried::Changed;
            }
            Poll::Ready(Ok(())) => {}
        }
        // A hedge is one more request in flight: it takes a place under the
        // upstream's concurrency limit like any other, or is not sent.
        let permit = match (&self.shared.bulkhead, self.target) {
            (Some(bulkhead), Some(target)) => {
                match bulkhead.acquire(target, CircuitState::Closed) {
                    Ok(permit) => permit,
                    Err(Full(_)) => {
                        round.due = None;
                        let observer = self.shared.observer.as_deref();
                        let outcome = HedgeOutcome::Denied(HedgeDenied::ConcurrencyLimited);
                        self.report
                            .hedge(observer, self.facts(), self.attempt + 1, outcome);
                        return Tried::Changed;
                    }
                }
            }
            _ => None,
        };
        let hedging = self.shared.hedge.as_ref();
        let max = hedging.map_or(0, |h| h.policy.max_hedges_per_request());
        let deadline = clock.as_mut().times().deadline();
        let withdraw = |now| pay_for_resend(&self.shared.budget, self.target, now);
        let decision = decide(
            round.sent,
            max,
            breaker_closed,
            now,
            round.delay,
            deadline,
            withdraw,
        );
        let number = self.attempt + 1;
        match decision {
            HedgeDecision::Stop => {
                round.due = None;
                Tried::Changed
            }
            HedgeDecision::Deny(reason) => {
                round.due = None;
                let observer = self.shared.observer.as_deref();
                let outcome = HedgeOutcome::Denied(reason);
                self.report.hedge(observer, self.facts(), number, outcome);
                Tried::Changed
            }
            HedgeDecision::Send => {
                round.sent += 1;
                round.due = (round.sent < max).then(|| crate::clock::later(now, round.delay));
                let after = round.delay;
                let mut request = again.head.request(again.body.body(), false);
                let grpc_timeout_kind = if self.is_grpc {
                    tell_grpc_timeout(&mut request, clock.as_mut().times())
                } else {
                    FailureKind::AttemptTimeout
                };
                self.attempt = number;
                let span = self.report.hedge_span(number);
                let future = if span.is_disabled() {
                    again.service.call(request)
                } else {
                    span.in_scope(|| again.service.call(request))
                };
                flight.push(InFlight {
                    future: Box::pin(future),
                    number,
                    started: now,
                    span,
                    grpc_timeout_kind,
                    permit,
                });
                let observer = self.shared.observer.as_deref();
                let outcome = HedgeOutcome::Sent { after };
                self.report.hedge(observer, self.facts(), number, outcome);
                Tried::Changed
            }
        }
    }
}

/// An attempt that ended: its number, start and, for a hedge, its own span
/// (`None`: the round's first attempt, whose span is the report's).
struct Ended {
    number: u32,
    started: Option<Instant>,
    span: Option<tracing::Span>,
    /// A hedge's own place under the concurrency limit, given back with it.
    permit: Option<Permit>,
}

impl Ended {
    /// The round's first attempt, whose span is the report's and whose place
    /// under the concurrency limit is the request's.
    fn first(number: u32, started: Option<Instant>) -> Ended {
        Ended {
            number,
            started,
            span: None,
            permit: None,
        }
    }

    fn of<F>(hedge: InFlight<F>) -> Ended {
        Ended {
            number: hedge.number,
            started: Some(hedge.started),
            span: Some(hedge.span),
            permit: hedge.permit,
        }
    }
}
