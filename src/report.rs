//! [`Report`]: everything a request tells the world — its `tracing` spans and
//! events, and the [`Observer`](crate::Observer)'s calls — in one place, so
//! the response future only says *what* happened.
//!
//! Spans are made for `tracing` subscribers: until one has been set (globally
//! or scoped) the request span is [`Span::none`], no attempt span is made, and
//! no field is recorded. Creating and dropping a disabled span still costs
//! ~240 instructions when `tracing`'s `log` feature is on (axum turns it on).

use std::time::Duration;

use http::Method;
use tokio::time::Instant;
use tracing::Span;

use crate::breaker::{CircuitState, Transition};
use crate::failure::FailureKind;
use crate::observe::{
    AttemptEvent, AttemptOutcome, CircuitEvent, HedgeEvent, HedgeOutcome, Observer, Outcome,
    RejectedEvent, RequestFacts, ResponseEvent, RetryDenied, RetryDeniedEvent, RetryEvent,
};

/// A request's spans.
pub(crate) struct Report {
    request: Span,
    attempt: Span,
}

impl Report {
    /// The request's span, named after its method and upstream.
    pub(crate) fn new(method: &Method, upstream: Option<&str>) -> Report {
        let request = if tracing::dispatcher::has_been_set() {
            tracing::info_span!(
                "upstream_guard.request",
                "http.request.method" = %method,
                "server.address" = upstream,
                "http.response.status_code" = tracing::field::Empty,
                "error.type" = tracing::field::Empty,
                "upstream_guard.outcome" = tracing::field::Empty,
                "upstream_guard.attempts" = tracing::field::Empty,
                "upstream_guard.circuit_state" = tracing::field::Empty,
            )
        } else {
            Span::none()
        };
        Report {
            request,
            attempt: Span::none(),
        }
    }

    /// The breaker's state when the request was admitted.
    pub(crate) fn circuit_state(&self, state: CircuitState) {
        if !self.request.is_disabled() {
            self.request
                .record("upstream_guard.circuit_state", state.as_str());
        }
    }

    /// Opens the span of attempt number `attempt`.
    pub(crate) fn attempt_started(&mut self, attempt: u32) {
        self.attempt = self.new_attempt_span(attempt, false);
    }

    /// The span of hedge `attempt`, kept by the hedge while it is in flight.
    pub(crate) fn hedge_span(&self, attempt: u32) -> Span {
        self.new_attempt_span(attempt, true)
    }

    /// The current attempt's span.
    pub(crate) fn attempt_span(&self) -> &Span {
        &self.attempt
    }

    /// Makes a hedge's span the current attempt's: the hedge is the attempt
    /// the request is answered with.
    pub(crate) fn adopt(&mut self, span: Span) {
        self.attempt = span;
    }

    fn new_attempt_span(&self, attempt: u32, hedge: bool) -> Span {
        if self.request.is_disabled() {
            return Span::none();
        }
        let span = tracing::debug_span!(
            parent: &self.request,
            "upstream_guard.attempt",
            "upstream_guard.attempt" = attempt,
            "upstream_guard.hedge" = tracing::field::Empty,
            "http.request.resend_count" = tracing::field::Empty,
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        if !span.is_disabled() {
            if attempt > 1 {
                span.record("http.request.resend_count", attempt - 1);
            }
            if hedge {
                span.record("upstream_guard.hedge", true);
            }
        }
        span
    }

    /// Runs `f` inside the current attempt's span (the inner service's own
    /// spans and events become its children).
    pub(crate) fn in_attempt<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.attempt.is_disabled() {
            f()
        } else {
            self.attempt.in_scope(f)
        }
    }

    /// An attempt ended.
    pub(crate) fn attempt_ended(
        &self,
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        attempt: u32,
        outcome: AttemptOutcome,
        started: Option<Instant>,
    ) {
        Report::attempt_ended_in(&self.attempt, observer, request, attempt, outcome, started);
    }

    /// An attempt with its own span ended (a hedge, or an attempt that lost
    /// to one).
    pub(crate) fn attempt_ended_in(
        span: &Span,
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        attempt: u32,
        outcome: AttemptOutcome,
        started: Option<Instant>,
    ) {
        // Recording on a disabled span still costs (tracing's `log` feature
        // looks at every field): skip it when nobody listens.
        if !span.is_disabled() {
            match outcome {
                AttemptOutcome::Response { status, .. } => {
                    span.record("http.response.status_code", status.as_u16());
                }
                AttemptOutcome::Failure(kind) => {
                    span.record("error.type", kind.as_str());
                }
            }
        }
        if let Some(observer) = observer {
            observer.on_attempt(&AttemptEvent {
                request,
                attempt,
                outcome,
                started,
            });
        }
    }

    /// A hedge was sent, won, or denied.
    pub(crate) fn hedge(
        &self,
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        attempt: u32,
        outcome: HedgeOutcome,
    ) {
        if let Some(observer) = observer {
            observer.on_hedge(&HedgeEvent {
                request,
                attempt,
                outcome,
            });
        }
        if let HedgeOutcome::Denied(reason) = outcome {
            tracing::debug!(parent: &self.request, attempt, reason = reason.as_str(), "not hedging upstream request");
        }
    }

    /// A retry was scheduled after attempt `failed_attempt`.
    pub(crate) fn retry(
        &self,
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        failed_attempt: u32,
        reason: AttemptOutcome,
        backoff: Duration,
    ) {
        if let Some(observer) = observer {
            observer.on_retry(&RetryEvent {
                request,
                failed_attempt,
                reason,
                backoff,
            });
        }
        tracing::debug!(
            parent: &self.request,
            attempt = failed_attempt,
            backoff_ms = backoff.as_millis() as u64,
            reason = %reason,
            "retrying upstream request"
        );
    }

    /// A retryable failure was not retried.
    pub(crate) fn retry_denied(
        &self,
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        failed_attempt: u32,
        reason: RetryDenied,
    ) {
        if let Some(observer) = observer {
            observer.on_retry_denied(&RetryDeniedEvent {
                request,
                failed_attempt,
                reason,
            });
        }
        tracing::debug!(
            parent: &self.request,
            attempt = failed_attempt,
            reason = reason.as_str(),
            "not retrying upstream request"
        );
    }

    /// A breaker changed state.
    pub(crate) fn transition(
        &self,
        observer: Option<&dyn Observer>,
        key: Option<&str>,
        transition: Transition,
    ) {
        let open_for = transition.open_nanos.map(Duration::from_nanos);
        if let Some(observer) = observer {
            observer.on_circuit_transition(&CircuitEvent {
                key,
                from: transition.from,
                to: transition.to,
                open_for,
            });
        }
        tracing::warn!(
            parent: &self.request,
            key = key.unwrap_or("-"),
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            "circuit breaker state changed"
        );
    }

    /// The request was answered without calling the upstream.
    pub(crate) fn rejected(
        observer: Option<&dyn Observer>,
        request: RequestFacts<'_>,
        kind: FailureKind,
        retry_after: Duration,
    ) {
        if let Some(observer) = observer {
            observer.on_rejected(&RejectedEvent {
                request,
                kind,
                retry_after,
            });
        }
    }

    /// The final response was produced.
    pub(crate) fn response(&self, observer: Option<&dyn Observer>, event: ResponseEvent<'_>) {
        let span = &self.request;
        if !span.is_disabled() {
            span.record("http.response.status_code", event.status.as_u16());
            span.record("upstream_guard.outcome", event.outcome.as_str());
            span.record("upstream_guard.attempts", event.attempts);
            match event.outcome {
                Outcome::UpstreamFailure => span.record("error.type", event.status.as_str()),
                Outcome::Failure(kind) => span.record("error.type", kind.as_str()),
                Outcome::Success => span,
            };
        }
        if let Some(observer) = observer {
            observer.on_response(&event);
        }
    }
}

/// The name of the upstream in events, spans and error bodies: the configured
/// one, else the request's authority.
pub(crate) fn upstream_name<'a>(
    configured: Option<&'a str>,
    authority: Option<&'a str>,
) -> Option<&'a str> {
    configured.or(authority)
}
