//! [`ResponseFuture`]: the attempt loop of one guarded request, as a state machine.
//!
//! ```text
//!            ┌────────────┐ body complete  ┌─────────┐ response / error / timeout
//!  call ───▶ │ Buffering  │ ─────────────▶ │ Calling │ ──────────────┐
//!    │       └────────────┘                └─────────┘               ▼
//!    │  (no replay needed)                      ▲              retry allowed?
//!    └──────────────────────────────────────────┘              │ yes     │ no
//!                                 ┌───────────┐  ┌─────────┐   │         ▼
//!                                 │ Readying  │◀─│ Backoff │◀──┘      finish
//!                                 └───────────┘  └─────────┘
//! ```
//!
//! One [`Sleep`] serves the whole request: it is armed only once an attempt has to
//! wait (an inner service that answers on the first poll costs no timer and no
//! clock read), and then reset for each attempt and each backoff. Its instant is
//! always capped by the request's single deadline.

use std::error::Error;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use tracing::Span;

use crate::body::{RequestBody, ResponseBody, SendState, SendWatch};
use crate::breaker::{Record, Target, Ticket, Transition};
use crate::bulkhead::Permit;
use crate::classify::ResponseClass;
use crate::failure::{FailureKind, GuardFailure};
use crate::grpc;
use crate::observe::{
    AttemptEvent, AttemptOutcome, CircuitEvent, Outcome, RejectedEvent, RequestFacts,
    ResponseEvent, RetryDenied, RetryDeniedEvent, RetryEvent,
};
use crate::replay::{usable_request_id, BodyBuffer, Fed, Head, Mode, ReplayBody};
use crate::response::{synthesize, Flavor};
use crate::retry::is_safe_to_resend;
use crate::shared::{Admission, Shared};
use crate::BoxError;

pin_project! {
    /// The response future of [`UpstreamGuard`](crate::UpstreamGuard).
    ///
    /// It never fails: every error of the inner service, every timeout and every
    /// rejection becomes a response.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        state: State<S::Future, B>,
        #[pin]
        timer: Option<Sleep>,
        ctx: Ctx<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // Reading a request body that will be replayed. Kept here rather than
        // in `Ctx`: the state's room is shared with the attempt's future, so the
        // request head waiting for its body costs the response future no size.
        Buffering {
            pending: Option<(Parts, B)>,
            buffer: Option<BodyBuffer>,
        },
        // An attempt is in flight.
        Calling {
            #[pin]
            future: F,
        },
        // Sleeping before a retry.
        Backoff,
        // Waiting for the inner service to be ready for a retry.
        Readying,
        // Answering without calling the upstream.
        Rejected {
            rejection: Option<Rejection>,
        },
        // The response was returned.
        Done,
    }
}

/// The `x-request-id` header name.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Facts about the request, kept for responses, events and spans.
struct Info {
    method: Method,
    is_grpc: bool,
    request_id: Option<HeaderValue>,
    authority: Option<Authority>,
    safe_to_resend: bool,
}

impl Info {
    /// The facts needed on every request. The request id is only needed for an
    /// error body: it is read later from the kept [`Head`], or kept here (see
    /// [`Info::keep_head_facts`]) when the request will not be kept.
    fn new(parts: &Parts) -> Info {
        Info {
            method: parts.method.clone(),
            is_grpc: grpc::is_grpc(&parts.headers),
            request_id: None,
            authority: None,
            safe_to_resend: is_safe_to_resend(&parts.method, &parts.headers),
        }
    }

    /// Keeps what is read lazily from the request head, for a request whose
    /// head will not be kept (no retries possible).
    fn keep_head_facts(&mut self, parts: &Parts) {
        // A linear scan of a few headers is cheaper than hashing a custom name.
        let id = parts.headers.iter().find(|(name, _)| *name == X_REQUEST_ID);
        self.request_id = request_id_in(id.map(|(_, value)| value));
        self.authority = parts.uri.authority().cloned();
    }
}

/// An `x-request-id` value fit to echo in an error body.
fn request_id_in(value: Option<&HeaderValue>) -> Option<HeaderValue> {
    value.filter(|v| usable_request_id(v)).cloned()
}

/// How an attempt ended, with what is needed to answer with it.
enum Attempted<R> {
    Response(R, StatusCode, ResponseClass),
    Failed(FailureKind, Option<Arc<dyn Error + Send + Sync>>),
}

impl<R> Attempted<R> {
    fn outcome(&self) -> AttemptOutcome {
        match self {
            Attempted::Response(_, status, class) => AttemptOutcome::Response {
                status: *status,
                class: *class,
            },
            Attempted::Failed(kind, _) => AttemptOutcome::Failure(*kind),
        }
    }

    fn failed(kind: FailureKind, error: BoxError) -> Self {
        Attempted::Failed(kind, Some(Arc::from(error)))
    }
}

/// The non-pinned state of a request.
struct Ctx<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    shared: Arc<Shared>,
    info: Info,
    /// The service for calls made after `call` returned: the first attempt of a
    /// buffered request, and retries. `None` when no such call can happen.
    service: Option<S>,
    /// What is needed to send the request again; `None` if it cannot be.
    head: Option<Head>,
    replay: Option<ReplayBody>,
    /// Attempts started so far.
    attempt: u32,
    /// The guard's clock starts lazily, the first time an attempt has to wait.
    started: Option<Instant>,
    attempt_started: Option<Instant>,
    deadline: Option<Instant>,
    /// The deadline's length: the configured one, or a shorter inbound `grpc-timeout`.
    budget: Duration,
    /// Whether the timer is armed for the current attempt.
    armed: bool,
    /// Which breaker the request belongs to; `None` without breakers. Found
    /// when the request arrives, admitted to only when an attempt is about to
    /// be sent.
    target: Option<Target>,
    /// The request's hold on its circuit breaker.
    ticket: Option<Ticket>,
    /// The request's concurrency permit, until the response body takes it.
    permit: Option<Permit>,
    /// How far the caller got in sending the body of a streamed attempt.
    watch: Option<SendWatch>,
    /// Which of our timeouts the `grpc-timeout` sent with the current attempt
    /// stands for: an upstream's `DEADLINE_EXCEEDED` is that timeout firing.
    grpc_timeout_kind: FailureKind,
    request_span: Span,
    attempt_span: Span,
    /// The request body type the inner service's requests carry (the body
    /// itself lives in [`State`] while buffered).
    body: PhantomData<fn() -> B>,
}

/// Why a request is answered without (another) upstream call.
struct Rejection {
    kind: FailureKind,
    source: Option<Arc<dyn Error + Send + Sync>>,
    retry_after: Option<Duration>,
}

impl<S, B> Drop for Ctx<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    /// A request dropped mid-flight (the client went away) gives back its
    /// half-open probe and concurrency permit, so neither can leak.
    fn drop(&mut self) {
        if let (Some(ticket), Some(breakers)) = (self.ticket.as_mut(), &self.shared.breakers) {
            breakers.release(ticket);
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
{
    /// Starts a guarded request: the first attempt is made right away unless the
    /// body has to be buffered first.
    ///
    /// The request is admitted to its circuit breaker (and concurrency cap) only
    /// when its first attempt is about to be sent: a client that is slow to send
    /// a body the guard must buffer holds no half-open probe and no permit.
    pub(crate) fn start(request: Request<B>, inner: &mut S, shared: Arc<Shared>) -> Self {
        let (parts, body) = request.into_parts();
        let info = Info::new(&parts);
        let budget = inbound_deadline(&shared, &info, &parts);
        let mut ctx = Ctx::new(shared, info, budget, &parts);
        ctx.target = ctx
            .shared
            .breakers
            .as_ref()
            .map(|breakers| breakers.target(&parts));
        if ctx.info.is_grpc {
            // The caller's gRPC deadline runs from when it sent the request, and we
            // must tell the upstream how much of it is left: start the clock now.
            ctx.start_clock(Instant::now());
        }

        let plan = if ctx.shared.retry.enabled() {
            replay_plan(&body, ctx.shared.retry.max_replay_body)
        } else {
            Plan::Stream
        };
        let state = match plan {
            Plan::Stream => {
                ctx.info.keep_head_facts(&parts);
                if let Some(rejection) = ctx.admit(None) {
                    return ResponseFuture::rejected(ctx, rejection);
                }
                let body = ctx.stream(Bytes::new(), body);
                let request = ctx.first_request(parts, body);
                State::Calling {
                    future: ctx.call(inner, request),
                }
            }
            Plan::Empty => {
                if let Some(rejection) = ctx.admit(Some(&parts)) {
                    return ResponseFuture::rejected(ctx, rejection);
                }
                // Keep the ready service for retries and leave a clone in its place
                // (it must be polled ready again before its next call anyway).
                let mut service = take_ready(inner);
                ctx.head = Some(Head::copy_of(&parts));
                ctx.replay = Some(ReplayBody::default());
                let request = ctx.first_request(parts, RequestBody::new(body));
                let future = ctx.call(&mut service, request);
                ctx.service = Some(service);
                State::Calling { future }
            }
            Plan::Buffer(mode) => {
                ctx.service = Some(take_ready(inner));
                State::Buffering {
                    pending: Some((parts, body)),
                    buffer: Some(BodyBuffer::new(mode, ctx.shared.retry.max_replay_body)),
                }
            }
        };
        ResponseFuture {
            state,
            timer: None,
            ctx,
        }
    }

    /// Answers a request without calling the upstream.
    fn rejected(ctx: Ctx<S, B>, rejection: Rejection) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(rejection),
            },
            timer: None,
            ctx,
        }
    }

    /// Answers a request for which the inner service failed to become ready.
    pub(crate) fn not_ready(request: Request<B>, shared: Arc<Shared>, error: BoxError) -> Self {
        let (parts, _body) = request.into_parts();
        let mut info = Info::new(&parts);
        info.keep_head_facts(&parts);
        let kind = shared.classifier.error_kind(&*error);
        let budget = shared.deadline;
        let ctx = Ctx::new(shared, info, budget, &parts);
        let rejection = Rejection {
            kind,
            source: Some(Arc::from(error)),
            retry_after: None,
        };
        ResponseFuture::rejected(ctx, rejection)
    }
}

/// Moves the ready service out, leaving a clone in its place.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// How the request body will be handled.
enum Plan {
    /// Stream it through once; the request cannot be retried.
    Stream,
    /// The body is empty: nothing to buffer, always replayable.
    Empty,
    /// Buffer it for replay.
    Buffer(Mode),
}

fn replay_plan<B: Body>(body: &B, cap: usize) -> Plan {
    if body.is_end_stream() {
        return Plan::Empty;
    }
    let hint = body.size_hint();
    let cap64 = u64::try_from(cap).unwrap_or(u64::MAX);
    match hint.exact() {
        Some(n) if n <= cap64 => Plan::Buffer(Mode::Exact(n)),
        Some(_) => Plan::Stream,
        None if hint.lower() > cap64 => Plan::Stream,
        None => Plan::Buffer(Mode::Ready),
    }
}

/// The deadline's length: the configured deadline, shortened by an inbound
/// `grpc-timeout` on gRPC requests.
fn inbound_deadline(shared: &Shared, info: &Info, parts: &Parts) -> Duration {
    let configured = shared.deadline;
    if !info.is_grpc {
        return configured;
    }
    parts
        .headers
        .get(grpc::GRPC_TIMEOUT)
        .and_then(|v| grpc::parse_grpc_timeout(v.as_bytes()))
        .map_or(configured, |t| t.min(configured))
}

/// The request's span; [`Span::none`] when no `tracing` subscriber was ever
/// set (globally or scoped), which makes it free.
///
/// Without a subscriber a span is disabled, yet creating and dropping it still
/// costs ~240 instructions when `tracing`'s `log` feature is on (axum turns it
/// on): that feature's fallback writes span lines to the `log` crate. The guard
/// skips that fallback; its spans are for `tracing` subscribers.
fn request_span(shared: &Shared, info: &Info, parts: &Parts) -> Span {
    if !tracing::dispatcher::has_been_set() {
        return Span::none();
    }
    tracing::info_span!(
        "upstream_guard.request",
        "http.request.method" = %info.method,
        "server.address" = upstream_name(shared, parts.uri.authority()),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
        "upstream_guard.outcome" = tracing::field::Empty,
        "upstream_guard.attempts" = tracing::field::Empty,
        "upstream_guard.circuit_state" = tracing::field::Empty,
    )
}

fn upstream_name<'a>(shared: &'a Shared, authority: Option<&'a Authority>) -> Option<&'a str> {
    shared
        .upstream_name
        .as_deref()
        .or(authority.map(Authority::as_str))
}

/// How early an inner failure may come and still be taken for our timeout.
const TIMER_TOLERANCE: Duration = Duration::from_millis(5);

/// What to do after an attempt.
enum Next<R> {
    Retry { backoff: Duration },
    Finish(Attempted<R>),
}

impl<S, B> Ctx<S, B>
where
    S: Service<Request<RequestBody<B>>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
{
    /// A request's state before anything has happened to it.
    #[inline]
    fn new(shared: Arc<Shared>, info: Info, budget: Duration, parts: &Parts) -> Self {
        Ctx {
            service: None,
            head: None,
            replay: None,
            attempt: 0,
            started: None,
            attempt_started: None,
            deadline: None,
            budget,
            armed: false,
            target: None,
            ticket: None,
            permit: None,
            watch: None,
            grpc_timeout_kind: FailureKind::AttemptTimeout,
            request_span: request_span(&shared, &info, parts),
            body: PhantomData,
            attempt_span: Span::none(),
            info,
            shared,
        }
    }

    /// The request URI's authority: kept in [`Info`], or read from the kept head
    /// (no copy needed), or from the head waiting for its body.
    fn authority(&self) -> Option<&Authority> {
        self.info
            .authority
            .as_ref()
            .or_else(|| self.head.as_ref()?.uri().authority())
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.info.method,
            upstream: upstream_name(&self.shared, self.authority()),
        }
    }

    /// Asks the circuit breaker (and concurrency cap) whether the request may go
    /// ahead, right before its first attempt is sent; the answer if not.
    ///
    /// `head` is the request head when it will not be kept otherwise: a
    /// rejection then keeps what its event and error body name.
    fn admit(&mut self, head: Option<&Parts>) -> Option<Rejection> {
        let rejection = self.admit_to_breaker(head);
        if rejection.is_none() {
            // A request that goes to the upstream pays into its retry budget.
            if let Some(budget) = self.shared.budget.as_ref().and_then(|b| b.of(self.target)) {
                budget.deposit(Instant::now());
            }
        }
        rejection
    }

    fn admit_to_breaker(&mut self, head: Option<&Parts>) -> Option<Rejection> {
        let breakers = self.shared.breakers.as_ref()?;
        let target = self.target?;
        let (admit, transition, state) = self.shared.admit(breakers, target);
        if !self.request_span.is_disabled() {
            self.request_span
                .record("upstream_guard.circuit_state", state.as_str());
        }
        if let Some(transition) = transition {
            self.emit_transition(target, transition);
        }
        match admit {
            Admission::Go(ticket, permit) => {
                self.ticket = Some(ticket);
                self.permit = permit;
                None
            }
            Admission::Reject(kind, retry_after) => {
                // The head is not kept for a rejected request: keep what the
                // event and the error body name (the upstream, the request id).
                if let Some(parts) = head {
                    self.info.keep_head_facts(parts);
                }
                self.shared.observer.on_rejected(&RejectedEvent {
                    request: self.facts(),
                    kind,
                    retry_after,
                });
                Some(Rejection {
                    kind,
                    source: None,
                    retry_after: Some(retry_after),
                })
            }
        }
    }

    /// Tells the observer and the logs that a breaker changed state.
    fn emit_transition(&self, target: Target, transition: Transition) {
        let Some(breakers) = &self.shared.breakers else {
            return;
        };
        let key = breakers.key_of(target);
        let open_for = transition.open_nanos.map(Duration::from_nanos);
        self.shared.observer.on_circuit_transition(&CircuitEvent {
            key: key.as_deref(),
            from: transition.from,
            to: transition.to,
            open_for,
        });
        tracing::warn!(
            parent: &self.request_span,
            key = key.as_deref().unwrap_or("-"),
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            "circuit breaker state changed"
        );
    }

    /// Feeds an attempt's outcome to the circuit breaker.
    fn record_breaker(&mut self, outcome: AttemptOutcome) {
        let callers_deadline = self.callers_deadline();
        let (Some(breakers), Some(ticket)) = (&self.shared.breakers, self.ticket.as_mut()) else {
            return;
        };
        let failure = match outcome {
            // Only the upstream's own failures count against it (see the crate
            // docs, "Who pays for a failure"): not the caller's body...
            AttemptOutcome::Failure(kind) if kind.is_callers_fault() => return,
            // ...and not a deadline the caller chose shorter than ours.
            AttemptOutcome::Failure(FailureKind::DeadlineExceeded) if callers_deadline => return,
            other => other.is_failure(),
        };
        let slow = breakers.slow_threshold().is_some_and(|threshold| {
            self.attempt_started
                .is_some_and(|started| started.elapsed() >= threshold)
        });
        let target = ticket.target;
        if let Some(transition) = breakers.record(ticket, Record { failure, slow }) {
            self.emit_transition(target, transition);
        }
    }

    /// Whether the caller shortened the deadline (an inbound `grpc-timeout`
    /// below the configured deadline): the deadline is then the caller's choice,
    /// and running out of it says nothing about the upstream.
    fn callers_deadline(&self) -> bool {
        self.budget < self.shared.deadline
    }

    /// Gives back the breaker's probe and concurrency permit.
    fn release_ticket(&mut self) {
        if let (Some(breakers), Some(ticket)) = (&self.shared.breakers, self.ticket.as_mut()) {
            breakers.release(ticket);
        }
        self.permit = None;
    }

    /// Whether the breaker lets this request be retried now.
    fn breaker_allows_retry(&self) -> bool {
        match (&self.shared.breakers, &self.ticket) {
            (Some(breakers), Some(ticket)) => breakers.allows_retry(ticket),
            _ => true,
        }
    }

    /// Starts the request's clock if it has not started, without starting an
    /// attempt's; the deadline.
    fn start_deadline(&mut self, now: Instant) -> Instant {
        if self.started.is_none() {
            self.started = Some(now);
            self.deadline = Some(later(now, self.budget));
        }
        self.deadline.unwrap_or(later(now, self.budget))
    }

    /// The failure for a body that was still being read for replay when the
    /// deadline passed.
    fn body_timed_out(&mut self, pending: &Option<(Parts, B)>) -> GuardFailure {
        // The head is not kept: keep what the error body names.
        if let Some((parts, _)) = pending {
            self.info.keep_head_facts(parts);
        }
        self.failure(FailureKind::RequestBodyTimeout, None)
    }

    /// The answer for a request that was not (or no longer) let through.
    fn reject<ResB>(&mut self, rejection: Rejection) -> Response<ResponseBody<ResB>> {
        let failure = self
            .failure(rejection.kind, rejection.source)
            .with_retry_after(rejection.retry_after);
        self.answer(failure)
    }

    /// For a gRPC attempt answered `DEADLINE_EXCEEDED` (a trailers-only
    /// response): which of our timeouts that is. We told the upstream how long
    /// it had, so its deadline is ours firing, and it races our own timer (the
    /// upstream tends to win): the attempt is treated exactly as if our timer
    /// had fired, retry included.
    fn upstream_deadline_exceeded<ResB>(&self, response: &Response<ResB>) -> Option<FailureKind> {
        if !self.info.is_grpc {
            return None;
        }
        let status = response.headers().get(grpc::GRPC_STATUS)?;
        (status.as_bytes() == b"4").then_some(self.grpc_timeout_kind)
    }

    fn start_clock(&mut self, now: Instant) {
        if self.started.is_none() {
            self.started = Some(now);
            self.deadline = Some(later(now, self.budget));
        }
        if self.attempt_started.is_none() {
            self.attempt_started = Some(now);
        }
    }

    /// The instant the current attempt must end: its own timeout, capped by the
    /// deadline. Starts the clock if it has not started yet.
    fn attempt_end(&mut self) -> (Instant, Instant) {
        if self.attempt_started.is_none() {
            self.start_clock(Instant::now());
        }
        let now = self.attempt_started.unwrap_or_else(Instant::now);
        let deadline = self.deadline.unwrap_or(later(now, self.budget));
        (
            later(now, self.shared.attempt_timeout).min(deadline),
            deadline,
        )
    }

    /// If the current attempt's time is up: which timeout ended it. Only asked
    /// when an attempt that had to wait fails, so it costs no clock read on the
    /// fast path.
    fn timed_out_kind(&mut self) -> Option<FailureKind> {
        if !self.armed {
            return None;
        }
        let (end, deadline) = self.attempt_end();
        // An inner timer started from the grpc-timeout we sent (rounded down to
        // the unit) can fire a hair before ours: a failure that close to the end
        // is that timer, not a broken connection.
        let tolerance = (self.shared.attempt_timeout / 100).min(TIMER_TOLERANCE);
        if later(Instant::now(), tolerance) < end {
            return None;
        }
        Some(if end >= deadline {
            FailureKind::DeadlineExceeded
        } else {
            FailureKind::AttemptTimeout
        })
    }

    /// The caller's body to stream through once, after `prefix` (bytes already
    /// read), watched so that a failed attempt can be blamed on the caller when
    /// its body stalled or broke. An empty body needs no watch.
    fn stream(&mut self, prefix: Bytes, body: B) -> RequestBody<B> {
        let watch = (!prefix.is_empty() || !body.is_end_stream()).then(SendWatch::new);
        self.watch.clone_from(&watch);
        RequestBody::watched(prefix, body, watch)
    }

    /// Whether the caller's streamed body of the current attempt is still
    /// arriving, or failed.
    fn send_state(&self) -> SendState {
        self.watch
            .as_ref()
            .map_or(SendState::Sent, SendWatch::state)
    }

    /// The kind of an attempt's failure, blamed on the caller when its body was
    /// the cause: it broke (400), or the attempt's time ran out while the body
    /// was still arriving (408).
    fn blame(&self, kind: FailureKind) -> FailureKind {
        match self.send_state() {
            SendState::Failed => FailureKind::RequestBody,
            SendState::Sending if kind.is_timeout() => FailureKind::RequestBodyTimeout,
            _ => kind,
        }
    }

    /// The first attempt's request, from the original head.
    fn first_request(&mut self, parts: Parts, body: RequestBody<B>) -> Request<RequestBody<B>> {
        let mut request = Request::from_parts(parts, body);
        self.set_grpc_timeout(&mut request);
        request
    }

    /// Tells a gRPC upstream how long it has: what is left of the deadline, or the
    /// attempt timeout if that is shorter.
    fn set_grpc_timeout(&mut self, request: &mut Request<RequestBody<B>>) {
        if !self.info.is_grpc {
            return;
        }
        let now = Instant::now();
        let left = self
            .deadline
            .map_or(self.budget, |d| d.saturating_duration_since(now));
        self.grpc_timeout_kind = if self.shared.attempt_timeout < left {
            FailureKind::AttemptTimeout
        } else {
            FailureKind::DeadlineExceeded
        };
        let left = left.min(self.shared.attempt_timeout);
        request
            .headers_mut()
            .insert(grpc::GRPC_TIMEOUT, grpc::encode_grpc_timeout(left));
    }

    /// Calls the inner service for the next attempt, inside a new attempt span.
    fn call(&mut self, service: &mut S, request: Request<RequestBody<B>>) -> S::Future {
        self.attempt += 1;
        self.armed = false;
        if self.request_span.is_disabled() {
            return service.call(request);
        }
        self.attempt_span = tracing::debug_span!(
            parent: &self.request_span,
            "upstream_guard.attempt",
            "upstream_guard.attempt" = self.attempt,
            "http.request.resend_count" = tracing::field::Empty,
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        if self.attempt_span.is_disabled() {
            return service.call(request);
        }
        if self.attempt > 1 {
            self.attempt_span
                .record("http.request.resend_count", self.attempt - 1);
        }
        let _entered = self.attempt_span.enter();
        service.call(request)
    }

    /// Reads more of the body being buffered. Gives the first attempt's request
    /// when done (a replayable one, or a streaming one if the body turned out not to
    /// be replayable), or the failure if the body broke.
    fn poll_buffer(
        &mut self,
        cx: &mut Context<'_>,
        pending: &mut Option<(Parts, B)>,
        buffer: &mut Option<BodyBuffer>,
    ) -> Poll<Result<Request<RequestBody<B>>, GuardFailure>>
    where
        B::Error: Into<BoxError>,
    {
        let (Some((parts, body)), Some(buf)) = (pending.as_mut(), buffer.as_mut()) else {
            // Buffering state always has both; answer rather than panic if not.
            return Poll::Ready(Err(self.failure(FailureKind::RequestBody, None)));
        };
        loop {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match buf.feed(frame) {
                    Fed::More if body.is_end_stream() => break,
                    Fed::More => continue,
                    Fed::Overflow => return Poll::Ready(Ok(self.stream_pending(pending, buffer))),
                },
                Poll::Ready(Some(Err(error))) => {
                    let source: Arc<dyn Error + Send + Sync> = Arc::from(error.into());
                    // The head is not kept: keep what the error body names.
                    self.info.keep_head_facts(parts);
                    return Poll::Ready(Err(self.failure(FailureKind::RequestBody, Some(source))));
                }
                Poll::Ready(None) => break,
                Poll::Pending if buf.mode() == Mode::Ready => {
                    return Poll::Ready(Ok(self.stream_pending(pending, buffer)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let (Some((parts, _body)), Some(buffer)) = (pending.take(), buffer.take()) else {
            return Poll::Ready(Err(self.failure(FailureKind::RequestBody, None)));
        };
        let replay = buffer.finish();
        self.head = Some(Head::copy_of(&parts));
        let request = self.first_request(parts, replay.body());
        self.replay = Some(replay);
        Poll::Ready(Ok(request))
    }

    /// Gives up on buffering: the request streams through once with what was read
    /// so far in front of the rest of the body.
    fn stream_pending(
        &mut self,
        pending: &mut Option<(Parts, B)>,
        buffer: &mut Option<BodyBuffer>,
    ) -> Request<RequestBody<B>> {
        let prefix = buffer
            .take()
            .map(BodyBuffer::into_prefix)
            .unwrap_or_default();
        // `pending` is always set while buffering; this branch only runs then.
        let (parts, body) = match pending.take() {
            Some(pending) => pending,
            None => unreachable_pending(),
        };
        self.info.keep_head_facts(&parts);
        let body = self.stream(prefix, body);
        self.first_request(parts, body)
    }

    fn failure(
        &self,
        kind: FailureKind,
        source: Option<Arc<dyn Error + Send + Sync>>,
    ) -> GuardFailure {
        let request_id =
            self.info.request_id.clone().or_else(|| {
                request_id_in(self.head.as_ref().and_then(|h| h.header(&X_REQUEST_ID)))
            });
        let failure = GuardFailure::new(kind, self.attempt)
            .with_request_id(request_id)
            .with_source(source);
        match &self.shared.upstream_name {
            Some(name) => failure.with_upstream(Some(name.clone())),
            None => failure.with_authority(self.authority().cloned()),
        }
    }

    /// Records an attempt's end, then decides between a retry and the answer.
    fn after_attempt<ResB>(&mut self, attempted: Attempted<S::Response>) -> Next<S::Response>
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResB>>,
    {
        let outcome = attempted.outcome();
        self.record_attempt(outcome);
        self.record_breaker(outcome);
        let retryable = match outcome {
            AttemptOutcome::Response { class, .. } => class.is_retryable(),
            AttemptOutcome::Failure(kind) => self.shared.classifier.is_retryable(kind),
        };
        if !retryable || self.attempt >= self.shared.retry.max_attempts {
            return Next::Finish(attempted);
        }
        match self.retry_backoff(&attempted) {
            Ok(backoff) => {
                self.shared.observer.on_retry(&RetryEvent {
                    request: self.facts(),
                    failed_attempt: self.attempt,
                    reason: outcome,
                    backoff,
                });
                tracing::debug!(
                    parent: &self.request_span,
                    attempt = self.attempt,
                    backoff_ms = backoff.as_millis() as u64,
                    reason = %outcome,
                    "retrying upstream request"
                );
                Next::Retry { backoff }
            }
            Err(reason) => {
                self.shared.observer.on_retry_denied(&RetryDeniedEvent {
                    request: self.facts(),
                    failed_attempt: self.attempt,
                    reason,
                });
                tracing::debug!(
                    parent: &self.request_span,
                    attempt = self.attempt,
                    reason = reason.as_str(),
                    "not retrying upstream request"
                );
                Next::Finish(attempted)
            }
        }
    }

    fn record_attempt(&self, outcome: AttemptOutcome) {
        // Recording on a disabled span still costs (tracing's `log` feature
        // looks at every field): skip it when nobody listens.
        let traced = !self.attempt_span.is_disabled();
        match outcome {
            _ if !traced => {}
            AttemptOutcome::Response { status, .. } => {
                self.attempt_span
                    .record("http.response.status_code", status.as_u16());
            }
            AttemptOutcome::Failure(kind) => {
                self.attempt_span.record("error.type", kind.as_str());
            }
        }
        self.shared.observer.on_attempt(&AttemptEvent {
            request: self.facts(),
            attempt: self.attempt,
            outcome,
            started: self.attempt_started,
        });
    }

    /// Whether a retry may be made, and after how long; or why not.
    fn retry_backoff<ResB>(
        &mut self,
        attempted: &Attempted<Response<ResB>>,
    ) -> Result<Duration, RetryDenied> {
        if self.head.is_none() || self.replay.is_none() || self.service.is_none() {
            return Err(RetryDenied::BodyNotReplayable);
        }
        let never_sent =
            matches!(attempted, Attempted::Failed(kind, _) if kind.request_never_sent());
        if !never_sent && !self.info.safe_to_resend {
            return Err(RetryDenied::NotIdempotent);
        }
        if !self.breaker_allows_retry() {
            return Err(RetryDenied::CircuitOpen);
        }
        let retry = &self.shared.retry;
        let asked = match attempted {
            Attempted::Response(response, _, _) => response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| {
                    crate::retry::parse_retry_after(v.as_bytes(), std::time::SystemTime::now())
                })
                .map(|d| d.min(retry.max_retry_after)),
            Attempted::Failed(..) => None,
        };
        let backoff = asked.unwrap_or_else(|| retry.backoff_for(self.attempt));
        let now = Instant::now();
        self.start_clock(now);
        let deadline = self.deadline.unwrap_or(later(now, self.budget));
        // A retry must have time to run: the sleep must end before the deadline.
        if later(now, backoff) >= deadline {
            return Err(RetryDenied::Deadline);
        }
        if let Some(budgets) = &self.shared.budget {
            // This upstream's own budget: what its own traffic paid in.
            if !budgets.of(self.target).is_some_and(|b| b.withdraw(now)) {
                return Err(RetryDenied::Budget);
            }
        }
        Ok(backoff)
    }

    /// Builds the final response from the last attempt's outcome.
    fn finish<ResB>(
        &mut self,
        attempted: Attempted<Response<ResB>>,
    ) -> Response<ResponseBody<ResB>> {
        match attempted {
            Attempted::Response(response, status, class) => {
                let outcome = if class.is_failure() {
                    Outcome::UpstreamFailure
                } else {
                    Outcome::Success
                };
                self.record_response(status, outcome);
                let idle = self.shared.body_idle_timeout;
                let permit = self.permit_for_body();
                response.map(|body| ResponseBody::guarded(body, idle, permit))
            }
            Attempted::Failed(kind, source) => {
                let failure = self.failure(kind, source);
                self.answer(failure)
            }
        }
    }

    /// The concurrency permit to carry in the response body, which then holds
    /// it until the upstream's work is over.
    fn permit_for_body(&mut self) -> Option<Permit> {
        self.permit.take()
    }

    /// Synthesizes the response for a failure, runs the user's hook, and records it.
    fn answer<ResB>(&mut self, failure: GuardFailure) -> Response<ResponseBody<ResB>> {
        self.release_ticket();
        let flavor = Flavor {
            is_head: self.info.method == Method::HEAD,
            is_grpc: self.info.is_grpc,
            expose_details: self.shared.expose_error_details,
        };
        let response = synthesize(&failure, flavor, self.shared.failure_hook.as_deref());
        if !self.request_span.is_disabled() {
            self.request_span
                .record("error.type", failure.kind().as_str());
        }
        self.record_response(response.status(), Outcome::Failure(failure.kind()));
        response.map(ResponseBody::full)
    }

    fn record_response(&self, status: StatusCode, outcome: Outcome) {
        let span = &self.request_span;
        if !span.is_disabled() {
            span.record("http.response.status_code", status.as_u16());
            span.record("upstream_guard.outcome", outcome.as_str());
            span.record("upstream_guard.attempts", self.attempt);
            if outcome == Outcome::UpstreamFailure {
                span.record("error.type", status.as_str());
            }
        }
        self.shared.observer.on_response(&ResponseEvent {
            request: self.facts(),
            status,
            outcome,
            attempts: self.attempt,
            started: self.started,
        });
    }
}

#[cold]
fn unreachable_pending<T>() -> T {
    // Only reachable if the state machine is broken; fail loudly in tests, and
    // never silently in release.
    unreachable!("upstream-guard: buffering without a pending request")
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResB>>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let ctx = this.ctx;
        loop {
            let attempted = match this.state.as_mut().project() {
                StateProj::Buffering { pending, buffer } => {
                    match ctx.poll_buffer(cx, pending, buffer) {
                        Poll::Pending => {
                            // Reading the body is bounded by the deadline: a client
                            // that stops sending holds nothing past it.
                            if !ctx.armed {
                                let deadline = ctx.start_deadline(Instant::now());
                                arm(this.timer.as_mut(), deadline);
                                ctx.armed = true;
                            }
                            match this.timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                                Some(Poll::Ready(())) => {
                                    let failure = ctx.body_timed_out(pending);
                                    this.state.set(State::Done);
                                    return Poll::Ready(Ok(ctx.answer(failure)));
                                }
                                _ => return Poll::Pending,
                            }
                        }
                        Poll::Ready(Err(failure)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(ctx.answer(failure)));
                        }
                        Poll::Ready(Ok(request)) => {
                            if let Some(rejection) = ctx.admit(None) {
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(ctx.reject(rejection)));
                            }
                            // The attempt's own clock starts when it is sent.
                            ctx.attempt_started = None;
                            let Some(mut service) = ctx.service.take() else {
                                // Buffering always keeps the ready service for this call.
                                this.state.set(State::Done);
                                let failure = ctx.failure(FailureKind::Transport, None);
                                return Poll::Ready(Ok(ctx.answer(failure)));
                            };
                            let future = ctx.call(&mut service, request);
                            // Keep the service only if the request can be sent again.
                            if ctx.head.is_some() {
                                ctx.service = Some(service);
                            }
                            this.state.set(State::Calling { future });
                            continue;
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let polled = if ctx.attempt_span.is_disabled() {
                        future.poll(cx)
                    } else {
                        let _entered = ctx.attempt_span.enter();
                        future.poll(cx)
                    };
                    match polled {
                        Poll::Ready(Ok(response)) => {
                            match ctx.upstream_deadline_exceeded(&response) {
                                // The upstream ran out of the grpc-timeout we gave it:
                                // our timer, firing at the upstream.
                                Some(kind) => Attempted::Failed(kind, None),
                                None => {
                                    let status = response.status();
                                    let class = ctx
                                        .shared
                                        .classifier
                                        .classify_response(status, response.headers());
                                    Attempted::Response(response, status, class)
                                }
                            }
                        }
                        Poll::Ready(Err(error)) => {
                            let error: BoxError = error.into();
                            let kind = match ctx.timed_out_kind() {
                                // The inner service's own timer (e.g. tonic's, run
                                // from the grpc-timeout we sent) fired with ours:
                                // it is our timeout, not a broken connection.
                                Some(timeout) => timeout,
                                None => ctx.shared.classifier.error_kind(&*error),
                            };
                            Attempted::failed(ctx.blame(kind), error)
                        }
                        Poll::Pending => {
                            if !ctx.armed {
                                let (end, _) = ctx.attempt_end();
                                arm(this.timer.as_mut(), end);
                                ctx.armed = true;
                            }
                            match this.timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                                Some(Poll::Ready(())) => {
                                    // The timer fired, so the attempt's time is up.
                                    let kind =
                                        ctx.timed_out_kind().unwrap_or(FailureKind::AttemptTimeout);
                                    Attempted::Failed(ctx.blame(kind), None)
                                }
                                _ => return Poll::Pending,
                            }
                        }
                    }
                }
                StateProj::Backoff => {
                    if let Some(timer) = this.timer.as_mut().as_pin_mut() {
                        if timer.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    // Between attempts, only the deadline limits waiting for the
                    // service to be ready.
                    let deadline = ctx
                        .deadline
                        .unwrap_or_else(|| later(Instant::now(), ctx.budget));
                    arm(this.timer.as_mut(), deadline);
                    this.state.set(State::Readying);
                    continue;
                }
                StateProj::Readying => {
                    let Some(service) = ctx.service.as_mut() else {
                        this.state.set(State::Done);
                        let failure = ctx.failure(FailureKind::Transport, None);
                        return Poll::Ready(Ok(ctx.answer(failure)));
                    };
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) if !ctx.breaker_allows_retry() => {
                            // The breaker opened while we slept: do not add load.
                            this.state.set(State::Done);
                            let retry_after =
                                ctx.shared.breakers.as_ref().map(|_| Duration::from_secs(1));
                            let failure = ctx
                                .failure(FailureKind::CircuitOpen, None)
                                .with_retry_after(retry_after);
                            return Poll::Ready(Ok(ctx.answer(failure)));
                        }
                        Poll::Ready(Ok(())) => {
                            let now = Instant::now();
                            ctx.attempt_started = Some(now);
                            let last = ctx.attempt + 1 >= ctx.shared.retry.max_attempts;
                            let (Some(head), Some(replay)) =
                                (ctx.head.as_mut(), ctx.replay.as_ref())
                            else {
                                this.state.set(State::Done);
                                let failure = ctx.failure(FailureKind::Transport, None);
                                return Poll::Ready(Ok(ctx.answer(failure)));
                            };
                            let mut request = head.request(replay.body(), last);
                            ctx.set_grpc_timeout(&mut request);
                            // Take the service out to call it while `ctx` is borrowed.
                            let mut service = match ctx.service.take() {
                                Some(s) => s,
                                None => unreachable_pending(),
                            };
                            let future = ctx.call(&mut service, request);
                            ctx.service = Some(service);
                            ctx.attempt_started = Some(now);
                            let (end, _) = ctx.attempt_end();
                            arm(this.timer.as_mut(), end);
                            ctx.armed = true;
                            this.state.set(State::Calling { future });
                            continue;
                        }
                        Poll::Ready(Err(error)) => {
                            let error: BoxError = error.into();
                            let kind = ctx.shared.classifier.error_kind(&*error);
                            // The attempt could not even start: count it as one.
                            ctx.attempt += 1;
                            Attempted::failed(kind, error)
                        }
                        Poll::Pending => match this.timer.as_mut().as_pin_mut().map(|t| t.poll(cx))
                        {
                            Some(Poll::Ready(())) => {
                                this.state.set(State::Done);
                                let failure = ctx.failure(FailureKind::DeadlineExceeded, None);
                                return Poll::Ready(Ok(ctx.answer(failure)));
                            }
                            _ => return Poll::Pending,
                        },
                    }
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().unwrap_or(Rejection {
                        kind: FailureKind::Transport,
                        source: None,
                        retry_after: None,
                    });
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(ctx.reject(rejection)));
                }
                // Polled after completion: a caller bug. Never panic on the request
                // path; there is nothing left to return.
                StateProj::Done => return Poll::Pending,
            };

            match ctx.after_attempt(attempted) {
                Next::Retry { backoff } => {
                    let now = Instant::now();
                    arm(this.timer.as_mut(), later(now, backoff));
                    this.state.set(State::Backoff);
                }
                Next::Finish(attempted) => {
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(ctx.finish(attempted)));
                }
            }
        }
    }
}

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

/// Sets the request's one timer to `at`, creating it the first time.
fn arm(mut timer: Pin<&mut Option<Sleep>>, at: Instant) {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) => sleep.reset(at),
        None => timer.set(Some(tokio::time::sleep_until(at))),
    }
}
