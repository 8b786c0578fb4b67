//! What went wrong when the guard, not the upstream, answers.
//!
//! Every synthesized response carries a [`GuardFailure`] in its extensions, so code
//! that calls a guarded service can `match` on [`FailureKind`] instead of parsing the
//! problem+json body.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, StatusCode};

/// Why the guard answered instead of the upstream.
///
/// Each kind maps to one HTTP status (see [`FailureKind::status`]) and one stable
/// problem `type` identifier (see [`FailureKind::problem_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// No connection to the upstream could be made: refused, DNS failure, TLS
    /// handshake failure, connect timeout. The request provably never left, so any
    /// method may be retried. Answered with `502 Bad Gateway`.
    Connect,
    /// The connection failed after the request may have been sent: reset, closed
    /// before a complete response, or any transport error not known to be a connect
    /// error. Answered with `502 Bad Gateway`.
    Transport,
    /// The upstream answered with something that is not valid HTTP. Answered with
    /// `502 Bad Gateway`.
    MalformedResponse,
    /// The last attempt did not produce response headers within the per-attempt
    /// timeout. Answered with `504 Gateway Timeout`.
    AttemptTimeout,
    /// The overall deadline (all attempts and backoff sleeps) passed. Answered with
    /// `504 Gateway Timeout`.
    DeadlineExceeded,
    /// The circuit breaker is open: the upstream was not called. Answered with
    /// `503 Service Unavailable` and `Retry-After`.
    CircuitOpen,
    /// The concurrency cap for this upstream is reached: the upstream was not called.
    /// Answered with `503 Service Unavailable`.
    ConcurrencyLimited,
    /// The client's own request body could not be read (it failed, or it broke its
    /// declared length). Nothing was sent upstream. Answered with `400 Bad Request`:
    /// this is not the upstream's fault and must not count against it.
    RequestBody,
    /// The client did not finish sending its request body in time: a body read for
    /// replay was not complete by the deadline, or a streamed body was still
    /// arriving when the attempt's time ran out. Answered with `408 Request
    /// Timeout` (as Envoy does); never counted against the upstream.
    RequestBodyTimeout,
    /// The inner service panicked while its response future was polled (an
    /// axum or tonic handler, in a server placement). Answered with `500
    /// Internal Server Error`, as tower-http's `CatchPanic` does; it counts
    /// against the breaker and the default [`Classify`](crate::Classify) never
    /// retries it: the handler may have done part of its work, and would most
    /// likely panic again.
    Panic,
}

impl FailureKind {
    /// The HTTP status the guard answers with for this kind.
    pub const fn status(self) -> StatusCode {
        match self {
            FailureKind::Connect | FailureKind::Transport | FailureKind::MalformedResponse => {
                StatusCode::BAD_GATEWAY
            }
            FailureKind::AttemptTimeout | FailureKind::DeadlineExceeded => {
                StatusCode::GATEWAY_TIMEOUT
            }
            FailureKind::CircuitOpen | FailureKind::ConcurrencyLimited => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FailureKind::RequestBody => StatusCode::BAD_REQUEST,
            FailureKind::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            FailureKind::Panic => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, stable, snake_case name: used as the `error.type` span field and as
    /// a metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Transport => "transport",
            FailureKind::MalformedResponse => "malformed_response",
            FailureKind::AttemptTimeout => "attempt_timeout",
            FailureKind::DeadlineExceeded => "deadline_exceeded",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::ConcurrencyLimited => "concurrency_limited",
            FailureKind::RequestBody => "request_body",
            FailureKind::RequestBodyTimeout => "request_body_timeout",
            FailureKind::Panic => "panic",
        }
    }

    /// The RFC 9457 problem `type` for this kind: a stable URN that clients may
    /// match on. It never changes between releases.
    pub const fn problem_type(self) -> &'static str {
        match self {
            FailureKind::Connect => "urn:upstream-guard:problem:connect",
            FailureKind::Transport => "urn:upstream-guard:problem:transport",
            FailureKind::MalformedResponse => "urn:upstream-guard:problem:malformed-response",
            FailureKind::AttemptTimeout => "urn:upstream-guard:problem:attempt-timeout",
            FailureKind::DeadlineExceeded => "urn:upstream-guard:problem:deadline-exceeded",
            FailureKind::CircuitOpen => "urn:upstream-guard:problem:circuit-open",
            FailureKind::ConcurrencyLimited => "urn:upstream-guard:problem:concurrency-limited",
            FailureKind::RequestBody => "urn:upstream-guard:problem:request-body",
            FailureKind::RequestBodyTimeout => "urn:upstream-guard:problem:request-body-timeout",
            FailureKind::Panic => "urn:upstream-guard:problem:panic",
        }
    }

    /// A human-readable sentence that says what happened without leaking internals.
    /// This is the problem `detail` unless error details are exposed.
    pub const fn description(self) -> &'static str {
        match self {
            FailureKind::Connect => "could not connect to the upstream",
            FailureKind::Transport => "the connection to the upstream failed before a response",
            FailureKind::MalformedResponse => "the upstream sent a response that is not valid HTTP",
            FailureKind::AttemptTimeout => "the upstream did not answer within the attempt timeout",
            FailureKind::DeadlineExceeded => "the upstream did not answer within the deadline",
            FailureKind::CircuitOpen => "the upstream is failing; calls are paused",
            FailureKind::ConcurrencyLimited => "too many requests to the upstream are in flight",
            FailureKind::RequestBody => "the request body could not be read",
            FailureKind::RequestBodyTimeout => "the request body did not arrive in time",
            FailureKind::Panic => "the service failed while handling the request",
        }
    }

    /// The gRPC status code used for gRPC requests: `UNAVAILABLE` (14) for 502/503,
    /// `DEADLINE_EXCEEDED` (4) for 504 and for a request body that did not arrive
    /// in time, `INTERNAL` (13) for a broken request body and a panic.
    pub const fn grpc_code(self) -> u8 {
        match self {
            FailureKind::AttemptTimeout
            | FailureKind::DeadlineExceeded
            | FailureKind::RequestBodyTimeout => 4,
            FailureKind::RequestBody | FailureKind::Panic => 13,
            _ => 14,
        }
    }

    /// Whether the request provably never reached the upstream, which makes it safe
    /// to retry whatever its method.
    pub const fn request_never_sent(self) -> bool {
        matches!(
            self,
            FailureKind::Connect | FailureKind::CircuitOpen | FailureKind::ConcurrencyLimited
        )
    }

    /// Whether the caller, not the upstream, caused this failure: its request body
    /// broke or did not arrive in time. Such failures never count against the
    /// upstream's circuit breaker.
    pub const fn is_callers_fault(self) -> bool {
        matches!(
            self,
            FailureKind::RequestBody | FailureKind::RequestBodyTimeout
        )
    }

    /// Whether this kind is a timeout (a 504).
    pub const fn is_timeout(self) -> bool {
        matches!(
            self,
            FailureKind::AttemptTimeout | FailureKind::DeadlineExceeded
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a failure names its upstream.
#[derive(Clone)]
enum Upstream {
    /// The configured upstream name.
    Named(Arc<str>),
    /// The request URI's authority.
    Authority(Authority),
}

/// The failure behind a response the guard synthesized.
///
/// Found in the extensions of every synthesized response:
///
/// ```
/// # use upstream_guard::{GuardFailure, FailureKind};
/// # fn handle(response: http::Response<()>) {
/// if let Some(failure) = response.extensions().get::<GuardFailure>() {
///     match failure.kind() {
///         FailureKind::CircuitOpen => { /* serve a cached copy */ }
///         kind => eprintln!("upstream failed: {kind} after {} attempts", failure.attempts()),
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct GuardFailure {
    kind: FailureKind,
    attempts: u32,
    upstream: Option<Upstream>,
    request_id: Option<HeaderValue>,
    retry_after: Option<Duration>,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl GuardFailure {
    pub(crate) fn new(kind: FailureKind, attempts: u32) -> Self {
        GuardFailure {
            kind,
            attempts,
            upstream: None,
            request_id: None,
            retry_after: None,
            source: None,
        }
    }

    pub(crate) fn with_upstream(mut self, upstream: Option<Arc<str>>) -> Self {
        self.upstream = upstream.map(Upstream::Named);
        self
    }

    /// Names the upstream by a URI authority: a reference-count bump, no copy.
    pub(crate) fn with_authority(mut self, authority: Option<Authority>) -> Self {
        self.upstream = authority.map(Upstream::Authority);
        self
    }

    pub(crate) fn with_request_id(mut self, request_id: Option<HeaderValue>) -> Self {
        self.request_id = request_id;
        self
    }

    pub(crate) fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    pub(crate) fn with_source(mut self, source: Option<Arc<dyn Error + Send + Sync>>) -> Self {
        self.source = source;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The HTTP status of the synthesized response (before any user hook changed it).
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// How many attempts reached (or tried to reach) the upstream. Zero when the
    /// request was rejected up front (circuit open, concurrency cap, bad body).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The upstream this request was for: the configured upstream name, else the
    /// request URI's authority (`host:port`), if either is known.
    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_ref().map(|u| match u {
            Upstream::Named(name) => name,
            Upstream::Authority(authority) => authority.as_str(),
        })
    }

    /// The request's `x-request-id`, when it had a printable one.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }

    /// For `503`s: how long until the upstream may be called again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error from the inner service, if there was one.
    ///
    /// Its text is never put in the response body unless
    /// [`expose_error_details`](crate::Builder::expose_error_details) is on.
    pub fn error(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl fmt::Debug for GuardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardFailure")
            .field("kind", &self.kind)
            .field("attempts", &self.attempts)
            .field("upstream", &self.upstream())
            .field("request_id", &self.request_id)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source.as_ref().map(|e| e.to_string()))
            .finish()
    }
}

impl fmt::Display for GuardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.description())?;
        if let Some(upstream) = self.upstream() {
            write!(f, " ({upstream})")?;
        }
        write!(f, " after {} attempt(s)", self.attempts)
    }
}

impl Error for GuardFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

// The errors of `endpoints::Endpoints` live here, with the failure vocabulary
// the classifier maps them to, so that classifying needs no replica code.

/// No replica's breaker admits the attempt: every one is ejected. The guard
/// answers it `503` `circuit-open`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoEndpoint;

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("every replica's circuit breaker is open")
    }
}

impl std::error::Error for NoEndpoint {}

/// A replica did not answer within
/// [`EndpointsBuilder::attempt_timeout`](crate::endpoints::EndpointsBuilder::attempt_timeout); it
/// counts against that replica's breaker. The guard answers it as an attempt
/// timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointTimeout;

impl fmt::Display for EndpointTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the replica did not answer in time")
    }
}

impl std::error::Error for EndpointTimeout {}
