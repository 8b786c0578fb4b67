//! [`Call`]: one guarded request between its attempts — what it keeps to be
//! sent again, its admission to the breaker, how each attempt is sent and
//! judged, and the answer. The response future sequences these steps; this
//! module does them, and [`hedged`] does them for a round of attempts that
//! may be hedged.

mod hedged;

use std::error::Error;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::breaker::{Record, Target, Ticket};
use crate::bulkhead::Permit;
use crate::classify::ResponseClass;
use crate::clock::{Clock, Times};
use crate::failure::{FailureKind, GuardFailure};
use crate::grpc;
use crate::head::Head;
use crate::observe::{AttemptOutcome, Outcome, RequestFacts, ResponseEvent};
use crate::panic;
use crate::replay::{usable_request_id, Buffered, ReplayBody};
use crate::report::{upstream_name, Report};
use crate::response::{synthesize, Flavor};
use crate::retry::{decide, is_safe_to_resend, Budgets, Decision, Failed, Resend};
use crate::shared::{Admission, Shared};
use crate::watch::{SendState, SendWatch};
use crate::BoxError;

/// Why a request is answered without (another) upstream call.
pub(crate) struct Rejection {
    kind: FailureKind,
    source: Option<Arc<dyn Error + Send + Sync>>,
    retry_after: Option<Duration>,
}

/// What a request needs to be sent again.
struct Again<S> {
    /// A ready clone of the inner service.
    service: S,
    head: Head,
    body: ReplayBody,
}

/// What a request keeps of itself after its first attempt is sent.
enum Kept<S> {
    /// Nothing yet: the head is still with the body being read.
    Nothing,
    /// It goes once: what its events and error body name.
    Facts {
        authority: Option<Authority>,
        request_id: Option<HeaderValue>,
    },
    /// It may be sent again: the whole head, which also names it.
    Again(Again<S>),
}

/// The `x-request-id` header name.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl<S> Kept<S> {
    fn facts(parts: &Parts) -> Self {
        // A linear scan of a few headers is cheaper than hashing a custom name.
        let id = parts.headers.iter().find(|(name, _)| *name == X_REQUEST_ID);
        Kept::Facts {
            authority: parts.uri.authority().cloned(),
            request_id: id
                .map(|(_, value)| value)
                .filter(|v| usable_request_id(v))
                .cloned(),
        }
    }

    fn authority(&self) -> Option<&Authority> {
        match self {
            Kept::Nothing => None,
            Kept::Facts { authority, .. } => authority.as_ref(),
            Kept::Again(again) => again.head.authority(),
        }
    }

    fn request_id(&self) -> Option<HeaderValue> {
        match self {
            Kept::Nothing => None,
            Kept::Facts { request_id, .. } => request_id.clone(),
            Kept::Again(again) => again.head.header(&X_REQUEST_ID).filter(usable_request_id),
        }
    }
}

/// How an attempt ended, with what is needed to answer with it.
pub(crate) enum Attempted<R> {
    Response(R, StatusCode, ResponseClass),
    Failed(FailureKind, Option<Arc<dyn Error + Send + Sync>>),
}

impl<R> Attempted<R> {
    fn failed(kind: FailureKind, error: BoxError) -> Self {
        Attempted::Failed(kind, Some(Arc::from(error)))
    }

    fn outcome(&self) -> AttemptOutcome {
        match self {
            Attempted::Response(_, status, class) => AttemptOutcome::Response {
                status: *status,
                class: *class,
            },
            Attempted::Failed(kind, _) => AttemptOutcome::Failure(*kind),
        }
    }
}

/// The response the guard gives.
pub(crate) type Guarded<B> = Response<ResponseBody<B>>;

/// What trying to send an attempt gave: the attempt in flight, an attempt that
/// could not even start, or the answer without one.
pub(crate) enum Sending<F, A, R> {
    Sent(F),
    Failed(Attempted<A>),
    Answer(R),
}

/// One guarded request: the non-pinned part of its response future.
pub(crate) struct Call<S, B> {
    shared: Arc<Shared>,
    method: Method,
    is_grpc: bool,
    safe_to_resend: bool,
    kept: Kept<S>,
    /// Attempts started so far (hedges included).
    attempt: u32,
    /// The number of the attempt being judged: the last one sent, or, in a
    /// hedged round, the one that answered.
    judged: u32,
    /// The request's hedging, once it is known to be hedged.
    hedge: Option<hedged::Round>,
    /// The request's breaker, found on arrival; admitted to right before the
    /// first attempt is sent.
    target: Option<Target>,
    ticket: Option<Ticket>,
    /// The request's concurrency permit, until the response body takes it.
    permit: Option<Permit>,
    /// How far the caller got in sending a streamed body.
    watch: Option<SendWatch>,
    /// Which of our timeouts the `grpc-timeout` of the current attempt stands for.
    grpc_timeout_kind: FailureKind,
    report: Report,
    body: PhantomData<fn() -> B>,
}

impl<S, B> Drop for Call<S, B> {
    /// A request dropped mid-flight (the caller went away) gives back its
    /// half-open probe and concurrency permit, and records nothing.
    fn drop(&mut self) {
        if let (Some(ticket), Some(breakers)) = (self.ticket.as_mut(), &self.shared.breakers) {
            breakers.release(ticket);
        }
    }
}

impl<S, B, ResB> Call<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
{
    /// A request as it arrives: named, and its breaker found (not admitted).
    pub(crate) fn new(shared: Arc<Shared>, parts: &Parts, is_grpc: bool) -> Self {
        let authority = parts.uri.authority().map(Authority::as_str);
        let upstream = upstream_name(shared.upstream_name.as_deref(), authority);
        let target = (shared.breakers.as_ref()).map(|b| b.target(parts));
        Call {
            report: Report::new(&parts.method, upstream),
            method: parts.method.clone(),
            is_grpc,
            safe_to_resend: is_safe_to_resend(&parts.method, &parts.headers),
            kept: Kept::Nothing,
            attempt: 0,
            judged: 0,
            hedge: None,
            target,
            ticket: None,
            permit: None,
            watch: None,
            grpc_timeout_kind: FailureKind::AttemptTimeout,
            body: PhantomData,
            shared,
        }
    }

    /// Sends the first attempt of a request whose body streams through once.
    pub(crate) fn send_streamed(
        &mut self,
        inner: &mut S,
        parts: Parts,
        body: B,
        times: &mut Times,
    ) -> Result<S::Future, Rejection> {
        self.kept = Kept::facts(&parts);
        if let Some(rejection) = self.admit() {
            return Err(rejection);
        }
        let body = self.stream(Bytes::new(), body);
        let request = self.first_request(parts, body, times);
        Ok(self.send(inner, request))
    }

    /// Sends the first attempt of a request without a body, keeping what a
    /// retry needs: a ready clone of the service (the caller's copy is left a
    /// fresh clone, to be polled ready before its next call) and the head.
    pub(crate) fn send_empty(
        &mut self,
        inner: &mut S,
        parts: Parts,
        body: B,
        times: &mut Times,
    ) -> Result<S::Future, Rejection>
    where
        S: Clone,
    {
        if let Some(rejection) = self.admit() {
            self.kept = Kept::facts(&parts);
            return Err(rejection);
        }
        let clone = inner.clone();
        let mut service = std::mem::replace(inner, clone);
        let head = Head::copy_of(&parts);
        self.begin_round(self.attempt + 1, times);
        let request = self.first_request(parts, RequestBody::new(body), times);
        let future = self.send(&mut service, request);
        let body = ReplayBody::default();
        self.kept = Kept::Again(Again {
            service,
            head,
            body,
        });
        Ok(future)
    }

    /// The rejection of a request whose inner service failed to become ready.
    pub(crate) fn not_ready(&mut self, parts: &Parts, error: BoxError) -> Rejection {
        self.kept = Kept::facts(parts);
        Rejection {
            kind: self.shared.classifier.error_kind(&*error),
            source: Some(Arc::from(error)),
            retry_after: None,
        }
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.method,
            upstream: upstream_name(
                self.shared.upstream_name.as_deref(),
                self.kept.authority().map(Authority::as_str),
            ),
        }
    }

    // ----- Admission -----

    /// Admits the request to its breaker and concurrency cap, right before its
    /// first attempt is sent; the rejection if not. An admitted request pays
    /// into its upstream's retry budget.
    fn admit(&mut self) -> Option<Rejection> {
        if let Some(breakers) = &self.shared.breakers {
            let target = self.target?;
            let (admit, transition, state) = self.shared.admit(breakers, target);
            self.report.circuit_state(state);
            if let Some(transition) = transition {
                let key = breakers.key_of(target);
                let observer = self.shared.observer.as_deref();
                self.report.transition(observer, key.as_deref(), transition);
            }
            match admit {
                Admission::Go(ticket, permit) => {
                    self.ticket = Some(ticket);
                    self.permit = permit;
                }
                Admission::Reject(kind, retry_after) => {
                    return Some(Rejection {
                        kind,
                        source: None,
                        retry_after: Some(retry_after),
                    })
                }
            }
        }
        if let Some(budget) = self.shared.budget.as_ref().and_then(|b| b.of(self.target)) {
            budget.deposit(Instant::now());
        }
        None
    }

    /// Feeds an attempt's outcome to the circuit breaker. Only the upstream's
    /// own failures count against it (see the crate docs, "Who pays for a
    /// failure"): not the caller's body, not a deadline the caller chose.
    fn record_breaker(&mut self, outcome: AttemptOutcome, times: &Times) {
        let failure = match outcome {
            AttemptOutcome::Failure(kind) if kind.is_callers_fault() => return,
            AttemptOutcome::Failure(FailureKind::DeadlineExceeded) if times.callers_deadline() => {
                return
            }
            other => other.is_failure(),
        };
        if let Some(permit) = &self.permit {
            permit.attempt_ended(outcome, times.attempt_started());
        }
        let (Some(breakers), Some(ticket)) = (&self.shared.breakers, self.ticket.as_mut()) else {
            return;
        };
        let slow = breakers.slow_threshold().is_some_and(|threshold| {
            times
                .attempt_started()
                .is_some_and(|started| started.elapsed() >= threshold)
        });
        let target = ticket.target;
        // Failures of attempts that ended while another was out count only
        // now that none of them won.
        let held = self.hedge.as_mut().map_or(0, hedged::Round::take_held);
        if failure {
            for _ in 0..held {
                let held = Record {
                    failure,
                    slow: false,
                };
                if let Some(transition) = breakers.record(ticket, held) {
                    let key = breakers.key_of(target);
                    let observer = self.shared.observer.as_deref();
                    self.report.transition(observer, key.as_deref(), transition);
                }
            }
        }
        if let Some(transition) = breakers.record(ticket, Record { failure, slow }) {
            let key = breakers.key_of(target);
            let observer = self.shared.observer.as_deref();
            self.report.transition(observer, key.as_deref(), transition);
        }
    }

    /// Whether the breaker lets this request be retried now (it is closed).
    fn breaker_allows_retry(&self) -> bool {
        match (&self.shared.breakers, &self.ticket) {
            (Some(breakers), Some(ticket)) => breakers.allows_retry(ticket),
            _ => true,
        }
    }

    // ----- Sending -----

    /// The caller's body to stream through once, after `prefix` (bytes already
    /// read), watched so that a failed attempt can be blamed on the caller when
    /// its body stalled or broke. An empty body needs no watch.
    fn stream(&mut self, prefix: Bytes, body: B) -> RequestBody<B> {
        let watch = (!prefix.is_empty() || !body.is_end_stream()).then(SendWatch::new);
        self.watch.clone_from(&watch);
        RequestBody::watched(prefix, body, watch)
    }

    /// The first attempt's request, from the original head.
    fn first_request(
        &mut self,
        parts: Parts,
        body: RequestBody<B>,
        times: &mut Times,
    ) -> Request<RequestBody<B>> {
        let mut request = Request::from_parts(parts, body);
        self.set_grpc_timeout(&mut request, times);
        request
    }

    /// Tells a gRPC upstream how long it has, and remembers which of our
    /// timeouts that is.
    fn set_grpc_timeout(&mut self, request: &mut Request<RequestBody<B>>, times: &mut Times) {
        if self.is_grpc {
            self.grpc_timeout_kind = tell_grpc_timeout(request, times);
        }
    }

    /// Calls the inner service for the next attempt, inside a new attempt span.
    fn send(&mut self, service: &mut S, request: Request<RequestBody<B>>) -> S::Future {
        self.attempt += 1;
        self.judged = self.attempt;
        self.report.attempt_started(self.attempt);
        self.report.in_attempt(|| service.call(request))
    }

    /// Sends the first attempt of a request whose body was read for replay;
    /// or the answer, when the body broke or the request is not admitted.
    pub(crate) fn send_buffered(
        &mut self,
        buffered: Buffered<S, B>,
        mut clock: Pin<&mut Clock>,
    ) -> Sending<S::Future, S::Response, Guarded<ResB>> {
        clock.as_mut().new_attempt();
        match buffered {
            Buffered::Failed { parts, error } => {
                self.kept = Kept::facts(&parts);
                let failure = self.failure(FailureKind::RequestBody, Some(Arc::from(error)));
                Sending::Answer(self.answer(failure, clock.times().started()))
            }
            Buffered::Replayable {
                parts,
                mut service,
                replay,
            } => {
                if let Some(rejection) = self.admit() {
                    self.kept = Kept::facts(&parts);
                    return Sending::Answer(self.reject(rejection, clock.times().started()));
                }
                let head = Head::copy_of(&parts);
                self.begin_round(self.attempt + 1, clock.as_mut().times());
                let request = self.first_request(parts, replay.body(), clock.times());
                let future = self.send(&mut service, request);
                let body = replay;
                self.kept = Kept::Again(Again {
                    service,
                    head,
                    body,
                });
                Sending::Sent(future)
            }
            Buffered::Stream {
                parts,
                mut service,
                prefix,
                body,
            } => {
                self.kept = Kept::facts(&parts);
                if let Some(rejection) = self.admit() {
                    return Sending::Answer(self.reject(rejection, clock.times().started()));
                }
                let body = self.stream(prefix, body);
                let request = self.first_request(parts, body, clock.times());
                Sending::Sent(self.send(&mut service, request))
            }
        }
    }

    /// Waits for the current attempt: its response, its error, or its timeout.
    pub(crate) fn poll_attempt(
        &mut self,
        future: Pin<&mut S::Future>,
        mut clock: Pin<&mut Clock>,
        cx: &mut Context<'_>,
    ) -> Poll<Attempted<S::Response>> {
        let polled = match self.report.in_attempt(|| panic::poll(future, cx)) {
            Ok(polled) => polled,
            Err(panic) => return Poll::Ready(Attempted::failed(FailureKind::Panic, panic)),
        };
        Poll::Ready(match polled {
            Poll::Ready(Ok(response)) => self.judge_response(response, self.grpc_timeout_kind),
            Poll::Ready(Err(error)) => {
                // An inner timer run from the grpc-timeout we sent fired with
                // ours: that is our timeout, not a broken connection.
                let timed_out = clock.times().timed_out();
                self.judge_error(error.into(), timed_out)
            }
            Poll::Pending => {
                ready!(clock.as_mut().poll_attempt(cx));
                let times = clock.times();
                let kind = times.timed_out().unwrap_or(FailureKind::AttemptTimeout);
                Attempted::Failed(self.blame(kind), None)
            }
        })
    }

    /// How an attempt that got a response went; `grpc_timeout_kind` is what the
    /// `grpc-timeout` it was sent with stood for.
    fn judge_response(
        &self,
        response: S::Response,
        grpc_timeout_kind: FailureKind,
    ) -> Attempted<S::Response> {
        match self.upstream_deadline_exceeded(&response, grpc_timeout_kind) {
            // The upstream ran out of the grpc-timeout we gave it: our
            // timer, firing at the upstream.
            Some(kind) => Attempted::Failed(kind, None),
            None => {
                let status = response.status();
                let classifier = &self.shared.classifier;
                let class = classifier.classify_response(status, response.headers());
                Attempted::Response(response, status, class)
            }
        }
    }

    /// How an attempt that failed went; `timed_out` is which of our timeouts
    /// had just run out, if one had.
    fn judge_error(
        &self,
        error: BoxError,
        timed_out: Option<FailureKind>,
    ) -> Attempted<S::Response> {
        let kind = timed_out.unwrap_or_else(|| self.shared.classifier.error_kind(&*error));
        Attempted::failed(self.blame(kind), error)
    }

    /// For a gRPC attempt answered `DEADLINE_EXCEEDED` (trailers-only): which
    /// of our timeouts that is. We told the upstream how long it had, so its
    /// deadline is ours, and it tends to fire a hair before our own timer.
    fn upstream_deadline_exceeded(
        &self,
        response: &Response<ResB>,
        grpc_timeout_kind: FailureKind,
    ) -> Option<FailureKind> {
        if !self.is_grpc {
            return None;
        }
        let status = response.headers().get(grpc::GRPC_STATUS)?;
        (status.as_bytes() == b"4").then_some(grpc_timeout_kind)
    }

    /// The kind of an attempt's failure, blamed on the caller when its body was
    /// the cause: it broke (400), or it was still arriving when the attempt's
    /// time ran out (408).
    fn blame(&self, kind: FailureKind) -> FailureKind {
        let sent = self
            .watch
            .as_ref()
            .map_or(SendState::Sent, SendWatch::state);
        match sent {
            SendState::Failed => FailureKind::RequestBody,
            SendState::Sending if kind.is_timeout() => FailureKind::RequestBodyTimeout,
            _ => kind,
        }
    }

    // ----- Retrying -----

    /// Records an attempt's end and decides: `None` to retry (the clock is set
    /// for the backoff), or the response.
    pub(crate) fn after_attempt(
        &mut self,
        attempted: Attempted<S::Response>,
        mut clock: Pin<&mut Clock>,
    ) -> Option<Guarded<ResB>> {
        let outcome = attempted.outcome();
        let times = clock.as_mut().times();
        let observer = self.shared.observer.as_deref();
        let started = times.attempt_started();
        self.report
            .attempt_ended(observer, self.facts(), self.judged, outcome, started);
        self.record_breaker(outcome, times);
        self.record_latency(outcome, started);
        let retryable = match outcome {
            AttemptOutcome::Response { class, .. } => class.is_retryable(),
            AttemptOutcome::Failure(kind) => self.shared.classifier.is_retryable(kind),
        };
        if !retryable {
            // The common case, a success, reads no clock.
            return Some(self.finish(attempted, times));
        }
        let failed = Failed {
            retryable,
            never_sent: matches!(outcome, AttemptOutcome::Failure(k) if k.request_never_sent()),
            // Hedges are paid for on their own: they do not use up retries.
            attempts: self.attempt - self.hedges_sent(),
            retry_after: retry_after_asked(&attempted, self.shared.retry.max_retry_after),
        };
        let request = Resend {
            safe: self.safe_to_resend,
            replayable: matches!(self.kept, Kept::Again(_)),
        };
        let (now, deadline) = (Instant::now(), times.deadline());
        let withdraw = |now| pay_for_resend(&self.shared.budget, self.target, now);
        let breaker_closed = self.breaker_allows_retry();
        let policy = &self.shared.retry;
        let observer = self.shared.observer.as_deref();
        match decide(
            policy,
            failed,
            request,
            breaker_closed,
            now,
            deadline,
            withdraw,
        ) {
            Decision::Retry(backoff) => {
                (self.report).retry(observer, self.facts(), self.judged, outcome, backoff);
                clock.sleep(backoff);
                None
            }
            Decision::Deny(reason) => {
                (self.report).retry_denied(observer, self.facts(), self.judged, reason);
                Some(self.finish(attempted, clock.times()))
            }
            Decision::Stop => Some(self.finish(attempted, clock.times())),
        }
    }

    /// After a backoff: waits for the service to be ready (within the
    /// deadline) and sends the next attempt.
    pub(crate) fn poll_resend(
        &mut self,
        mut clock: Pin<&mut Clock>,
        cx: &mut Context<'_>,
    ) -> Poll<Sending<S::Future, S::Response, Guarded<ResB>>> {
        let breaker_closed = self.breaker_allows_retry();
        let Kept::Again(again) = &mut self.kept else {
            // Broken invariant (see the module docs): answer, never hang.
            debug_assert!(false, "a retry without what a resend needs");
            let failure = self.failure(FailureKind::Transport, None);
            let started = clock.times().started();
            return Poll::Ready(Sending::Answer(self.answer(failure, started)));
        };
        let answer = match again.service.poll_ready(cx) {
            Poll::Pending => {
                ready!(clock.as_mut().poll_deadline(cx));
                self.failure(FailureKind::DeadlineExceeded, None)
            }
            Poll::Ready(Err(error)) => {
                // The attempt could not even start: it counts as one.
                self.attempt += 1;
                self.judged = self.attempt;
                let error: BoxError = error.into();
                let kind = self.shared.classifier.error_kind(&*error);
                return Poll::Ready(Sending::Failed(Attempted::failed(kind, error)));
            }
            Poll::Ready(Ok(())) if !breaker_closed => {
                // The breaker opened while we slept: do not add load.
                let failure = self.failure(FailureKind::CircuitOpen, None);
                failure.with_retry_after(Some(Duration::from_secs(1)))
            }
            Poll::Ready(Ok(())) => {
                let retries = self.attempt - self.hedge.as_ref().map_or(0, hedged::Round::sent);
                let last = retries + 1 >= self.shared.retry.max_attempts && self.hedge.is_none();
                let mut request = again.head.request(again.body.body(), last);
                clock.as_mut().new_attempt();
                if self.is_grpc {
                    self.grpc_timeout_kind =
                        tell_grpc_timeout(&mut request, clock.as_mut().times());
                }
                self.attempt += 1;
                self.judged = self.attempt;
                self.report.attempt_started(self.attempt);
                let future = self.report.in_attempt(|| again.service.call(request));
                if self.hedge.is_some() {
                    // The attempt just sent opens the new round.
                    self.begin_round(self.attempt, clock.times());
                }
                return Poll::Ready(Sending::Sent(future));
            }
        };
        let started = clock.times().started();
        Poll::Ready(Sending::Answer(self.answer(answer, started)))
    }

    // ----- Answering -----

    /// The final response from the last attempt's outcome.
    fn finish(&mut self, attempted: Attempted<S::Response>, times: &Times) -> Guarded<ResB> {
        match attempted {
            Attempted::Response(response, status, class) => {
                let outcome = if class.is_failure() {
                    Outcome::UpstreamFailure
                } else {
                    Outcome::Success
                };
                self.responded(status, outcome, times.started());
                let idle = self.shared.body_idle_timeout;
                let permit = self.permit_for_body();
                response.map(|body| ResponseBody::guarded(body, idle, permit))
            }
            Attempted::Failed(kind, source) => {
                let failure = self.failure(kind, source);
                self.answer(failure, times.started())
            }
        }
    }

    /// The concurrency permit to carry in the response body, which then holds
    /// it until the upstream's work is over.
    fn permit_for_body(&mut self) -> Option<Permit> {
        self.permit.take()
    }

    /// The answer for a request that was not let through.
    pub(crate) fn reject(
        &mut self,
        rejection: Rejection,
        started: Option<Instant>,
    ) -> Guarded<ResB> {
        if let Some(retry_after) = rejection.retry_after {
            let observer = self.shared.observer.as_deref();
            Report::rejected(observer, self.facts(), rejection.kind, retry_after);
        }
        let failure = self.failure(rejection.kind, rejection.source);
        self.answer(failure.with_retry_after(rejection.retry_after), started)
    }

    /// The failure for a body that was still being read for replay when the
    /// deadline passed.
    pub(crate) fn body_timed_out(
        &mut self,
        parts: Option<&Parts>,
        started: Option<Instant>,
    ) -> Guarded<ResB> {
        if let Some(parts) = parts {
            self.kept = Kept::facts(parts);
        }
        let failure = self.failure(FailureKind::RequestBodyTimeout, None);
        self.answer(failure, started)
    }

    fn failure(
        &self,
        kind: FailureKind,
        source: Option<Arc<dyn Error + Send + Sync>>,
    ) -> GuardFailure {
        let failure = GuardFailure::new(kind, self.attempt)
            .with_request_id(self.kept.request_id())
            .with_source(source);
        match &self.shared.upstream_name {
            Some(name) => failure.with_upstream(Some(name.clone())),
            None => failure.with_authority(self.kept.authority().cloned()),
        }
    }

    /// Synthesizes the response for a failure (the user's hook included) and
    /// records it. Whatever the request held is given back first.
    fn answer(&mut self, failure: GuardFailure, started: Option<Instant>) -> Guarded<ResB> {
        if let (Some(breakers), Some(ticket)) = (&self.shared.breakers, self.ticket.as_mut()) {
            breakers.release(ticket);
        }
        self.permit = None;
        let flavor = Flavor {
            is_head: self.method == Method::HEAD,
            is_grpc: self.is_grpc,
            expose_details: self.shared.expose_error_details,
        };
        let hook = self.shared.failure_hook.as_deref();
        let response = synthesize(&failure, flavor, hook);
        self.responded(response.status(), Outcome::Failure(failure.kind()), started);
        response.map(ResponseBody::full)
    }

    fn responded(&self, status: StatusCode, outcome: Outcome, started: Option<Instant>) {
        let event = ResponseEvent {
            request: self.facts(),
            status,
            outcome,
            attempts: self.attempt,
            started,
        };
        self.report.response(self.shared.observer.as_deref(), event);
    }
}

/// Takes one resend (a retry or a hedge) out of the budget of `target`'s
/// upstream at `now`; whether it was paid. No budget configured: resends are
/// free. A request whose budget slot went to another key cannot pay.
fn pay_for_resend(budgets: &Option<Budgets>, target: Option<Target>, now: Instant) -> bool {
    budgets
        .as_ref()
        .is_none_or(|b| b.of(target).is_some_and(|b| b.withdraw(now)))
}

/// Tells a gRPC upstream in `grpc-timeout` how long it has; which of our
/// timeouts that stands for.
fn tell_grpc_timeout<B>(request: &mut Request<B>, times: &mut Times) -> FailureKind {
    let (left, kind) = times.grpc_timeout();
    let value = grpc::encode_grpc_timeout(left);
    request.headers_mut().insert(grpc::GRPC_TIMEOUT, value);
    kind
}

/// How long the upstream asked to wait before a retry (`Retry-After` on its
/// response), capped.
fn retry_after_asked<R>(attempted: &Attempted<Response<R>>, cap: Duration) -> Option<Duration> {
    let Attempted::Response(response, _, _) = attempted else {
        return None;
    };
    let value = response.headers().get(http::header::RETRY_AFTER)?;
    let asked = crate::retry::parse_retry_after(value.as_bytes(), std::time::SystemTime::now())?;
    Some(asked.min(cap))
}
