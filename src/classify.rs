//! Deciding what counts as a failure, and what may be retried.
//!
//! The guard asks a [`Classify`] implementation three questions:
//!
//! 1. Is this upstream *response* a failure, and may it be retried?
//!    ([`Classify::classify_response`]) — only the status and headers are looked at;
//!    the body is never read.
//! 2. What *kind* of failure is this inner-service error? ([`Classify::error_kind`])
//!    — connect errors are told apart from resets, timeouts and malformed responses
//!    by walking the error's `source()` chain (see [`failure_kind_of`]).
//! 3. May a failure of this kind be retried? ([`Classify::is_retryable`])
//!
//! The same answers drive retries and the circuit breaker, so they never disagree.
//! Whether a retry is *safe* (idempotent method, `Idempotency-Key`, request never
//! sent) is decided by the guard, not the classifier: a classifier cannot make a
//! non-idempotent request retryable after it may have reached the upstream.
//!
//! # Errors of other clients
//!
//! [`FailureKind::Connect`] says the request never left, which lets the guard
//! retry even a `POST`, so it is given only when the error proves it. The proof is
//! *where* a failure happened, not what it looks like: the clients this crate knows
//! (hyper-util's, reqwest, tonic) report whatever goes wrong while connecting —
//! DNS, TCP, the TLS handshake, a connect timeout — inside a connect-phase error,
//! and the walk, which goes from the outermost error inwards, stops at that
//! wrapper. TLS shows why: tokio-rustls reports a failed handshake as an
//! `io::Error` of kind `InvalidData` around a `rustls::Error`, and a corrupt record
//! *after* the handshake, when the request may have been sent, as the very same
//! value. Only the wrapper (hyper-util's connect error, under which reqwest's sit,
//! or tonic's `ConnectError`) tells the two apart; so TLS errors need no rule of
//! their own, and this crate no dependency on rustls.
//!
//! Some of these errors cannot be named from here: hyper-util's `HttpConnector`
//! error and reqwest's timeout are private types, and neither tonic nor tower (this
//! crate builds on `tower-service` and `tower-layer` only) is a dependency.
//! They are recognised by the type name their `Debug` output starts with (see
//! [`failure_kind_of`]); the others by their type. An error that nothing
//! recognises stays [`FailureKind::Transport`]: the request may have been sent.

use std::error::Error;
use std::fmt::{self, Write as _};
use std::io;

use http::{HeaderMap, StatusCode};

use crate::failure::FailureKind;

/// How the guard should treat an upstream response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseClass {
    /// A success: it resets the breaker's failure count and is never retried.
    Success,
    /// A failure: the breaker counts it. When `retryable`, the guard retries it if
    /// the request is safe to retry; when retries are spent, the upstream's own
    /// response is returned.
    Failure {
        /// Whether this response may be retried.
        retryable: bool,
    },
}

impl ResponseClass {
    /// Whether this class is a failure.
    pub fn is_failure(self) -> bool {
        matches!(self, ResponseClass::Failure { .. })
    }

    /// Whether this class may be retried.
    pub fn is_retryable(self) -> bool {
        matches!(self, ResponseClass::Failure { retryable: true })
    }
}

/// Classifies upstream outcomes for retries and the circuit breaker.
///
/// The default, [`DefaultClassifier`], treats 5xx as failures and 502/503/504 (and
/// gRPC `UNAVAILABLE`) as retryable. Use [`classify_fn`] to classify responses with
/// a closure, or implement this trait for full control (e.g. to recognise your own
/// inner-service error types).
pub trait Classify: Send + Sync + 'static {
    /// Classifies a response from the upstream by its status and headers.
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> ResponseClass;

    /// Tells what kind of failure an error from the inner service is.
    ///
    /// The default walks the `source()` chain: see [`failure_kind_of`].
    fn error_kind(&self, error: &(dyn Error + 'static)) -> FailureKind {
        failure_kind_of(error)
    }

    /// Whether a failure of this kind may be retried (when the request is safe to
    /// retry). The default retries connect errors, transport errors (resets,
    /// connections closed before a response) and attempt timeouts; a malformed
    /// response is not retried, since the same upstream will most likely send it
    /// again.
    fn is_retryable(&self, kind: FailureKind) -> bool {
        matches!(
            kind,
            FailureKind::Connect | FailureKind::Transport | FailureKind::AttemptTimeout
        )
    }
}

/// A set of HTTP status codes, stored as a bitmap (no allocation, O(1) lookup).
#[derive(Clone, Copy, PartialEq, Eq)]
struct StatusSet([u64; 16]);

impl StatusSet {
    const EMPTY: StatusSet = StatusSet([0; 16]);

    fn insert(&mut self, status: u16) {
        let i = usize::from(status % 1024);
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn contains(&self, status: u16) -> bool {
        let i = usize::from(status % 1024);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn from_iter(codes: impl IntoIterator<Item = u16>) -> StatusSet {
        let mut set = StatusSet::EMPTY;
        for code in codes {
            set.insert(code);
        }
        set
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (100u16..1000).filter(|c| self.contains(*c))
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The classifier used unless you configure another.
///
/// - Responses: statuses in the *failure* set (default: 500–599) are failures;
///   those also in the *retryable* set (default: 502, 503, 504) are retryable.
/// - gRPC: on a response whose `content-type` is `application/grpc*`, a
///   `grpc-status` header (a trailers-only gRPC response) of
///   `UNAVAILABLE` (14) is a retryable failure; `UNKNOWN` (2), `DEADLINE_EXCEEDED`
///   (4), `INTERNAL` (13) and `DATA_LOSS` (15) are failures. Statuses carried in
///   trailers after a body are not seen: the guard never waits for the body.
/// - Errors: [`failure_kind_of`], and the retryable kinds of [`Classify::is_retryable`].
///
/// ```
/// use upstream_guard::{Classify};
/// use upstream_guard::classify::{DefaultClassifier, ResponseClass};
/// use http::{HeaderMap, StatusCode};
///
/// // Also retry 429 Too Many Requests (the breaker will count it as a failure).
/// let classifier = DefaultClassifier::new().retryable_statuses([429, 502, 503, 504]);
/// assert_eq!(
///     classifier.classify_response(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new()),
///     ResponseClass::Failure { retryable: true },
/// );
/// ```
#[derive(Clone, Debug)]
pub struct DefaultClassifier {
    failure: StatusSet,
    retryable: StatusSet,
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        DefaultClassifier::new()
    }
}

impl DefaultClassifier {
    /// 5xx are failures; 502, 503 and 504 are retryable.
    pub fn new() -> Self {
        DefaultClassifier {
            failure: StatusSet::from_iter(500..600),
            retryable: StatusSet::from_iter([502, 503, 504]),
        }
    }

    /// Replaces the set of statuses that count as failures.
    pub fn failure_statuses(mut self, codes: impl IntoIterator<Item = u16>) -> Self {
        self.failure = StatusSet::from_iter(codes);
        self
    }

    /// Replaces the set of statuses that may be retried. A retryable status always
    /// counts as a failure too.
    pub fn retryable_statuses(mut self, codes: impl IntoIterator<Item = u16>) -> Self {
        self.retryable = StatusSet::from_iter(codes);
        self
    }
}

/// gRPC status codes the default classifier looks at.
const GRPC_UNKNOWN: &[u8] = b"2";
const GRPC_DEADLINE_EXCEEDED: &[u8] = b"4";
const GRPC_INTERNAL: &[u8] = b"13";
const GRPC_UNAVAILABLE: &[u8] = b"14";
const GRPC_DATA_LOSS: &[u8] = b"15";

impl Classify for DefaultClassifier {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> ResponseClass {
        let code = status.as_u16();
        if self.retryable.contains(code) {
            return ResponseClass::Failure { retryable: true };
        }
        if self.failure.contains(code) {
            return ResponseClass::Failure { retryable: false };
        }
        // Only a gRPC response can carry a grpc-status header worth reading; the
        // content-type check (a standard header) is cheaper than looking it up.
        if !crate::grpc::is_grpc_content(headers) {
            return ResponseClass::Success;
        }
        if let Some(grpc_status) = headers.get(crate::grpc::GRPC_STATUS) {
            return match grpc_status.as_bytes() {
                GRPC_UNAVAILABLE => ResponseClass::Failure { retryable: true },
                GRPC_UNKNOWN | GRPC_DEADLINE_EXCEEDED | GRPC_INTERNAL | GRPC_DATA_LOSS => {
                    ResponseClass::Failure { retryable: false }
                }
                _ => ResponseClass::Success,
            };
        }
        ResponseClass::Success
    }
}

/// A [`Classify`] that classifies responses with a closure; see [`classify_fn`].
#[derive(Clone)]
pub struct ClassifyFn<F> {
    f: F,
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn").finish_non_exhaustive()
    }
}

/// Classifies responses with a closure; errors are classified as by
/// [`DefaultClassifier`].
///
/// ```
/// use upstream_guard::classify::{classify_fn, ResponseClass};
///
/// // Only 503 is a failure, and it is retryable.
/// let classifier = classify_fn(|status: http::StatusCode, _headers: &http::HeaderMap| {
///     if status == http::StatusCode::SERVICE_UNAVAILABLE {
///         ResponseClass::Failure { retryable: true }
///     } else {
///         ResponseClass::Success
///     }
/// });
/// # let _ = upstream_guard::UpstreamGuardLayer::builder().classifier(classifier);
/// ```
pub fn classify_fn<F>(f: F) -> ClassifyFn<F>
where
    F: Fn(StatusCode, &HeaderMap) -> ResponseClass + Send + Sync + 'static,
{
    ClassifyFn { f }
}

impl<F> Classify for ClassifyFn<F>
where
    F: Fn(StatusCode, &HeaderMap) -> ResponseClass + Send + Sync + 'static,
{
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> ResponseClass {
        (self.f)(status, headers)
    }
}

/// Tells what kind of failure an inner-service error is, by walking its `source()`
/// chain from the outermost error inwards; the first link that is recognised
/// decides:
///
/// - hyper-util's legacy client error with `is_connect()` → [`FailureKind::Connect`]
///   (feature `hyper`, on by default). reqwest's connect errors (DNS, refused,
///   TLS handshake, `connect_timeout`) sit under it;
/// - an error type named `ConnectError` → [`FailureKind::Connect`]: tonic's
///   `tonic::ConnectError`, which wraps everything a `Channel`'s connector does —
///   DNS, TCP, the TLS handshake — and hyper-util's `HttpConnector` error (DNS,
///   TCP connect, connect timeout), also without the `hyper` feature;
/// - an `io::Error` of kind `ConnectionRefused`, `AddrNotAvailable`,
///   `NetworkUnreachable` or `HostUnreachable` → [`FailureKind::Connect`]; of kind
///   `InvalidData` → [`FailureKind::MalformedResponse`];
/// - a hyper parse error → [`FailureKind::MalformedResponse`] (feature `hyper`);
/// - tokio's `Elapsed` (a `tokio::time::timeout` inside the inner service) →
///   [`FailureKind::AttemptTimeout`];
/// - an error type named `Elapsed` (tower's: a `tower::timeout::Timeout` inside
///   the inner service), `TimedOut` (reqwest's `timeout()`) or `TimeoutExpired`
///   (`tonic::TimeoutExpired`: a `Channel`'s `Endpoint::timeout` or `grpc-timeout`)
///   → [`FailureKind::AttemptTimeout`];
/// - [`Endpoints`](crate::endpoints::Endpoints)' errors: [`EndpointTimeout`](crate::endpoints::EndpointTimeout)
///   → [`FailureKind::AttemptTimeout`], [`NoEndpoint`](crate::endpoints::NoEndpoint)
///   (every replica ejected) → [`FailureKind::CircuitOpen`];
/// - anything else → [`FailureKind::Transport`].
///
/// The outermost recognised link wins because it knows the phase: a TLS handshake
/// failure is an `io::Error` of kind `InvalidData` (which alone would mean a
/// malformed response), but under a connect error it is a connect failure; a
/// reqwest `connect_timeout` is a `TimedOut` under hyper-util's connect error, and
/// so a connect failure (an attempt timeout without the `hyper` feature). An
/// `InvalidData` error on its own is never taken for a TLS handshake failure:
/// tokio-rustls reports a corrupt record after the handshake, when the request may
/// have been sent, with the same value.
///
/// "Named" means the name a type's `Debug` output starts with, as a derived
/// `Debug` writes it: these types are private to their crates (hyper-util's
/// `HttpConnector` error, reqwest's `TimedOut`) or their crate is not a dependency
/// of this one (tonic, tower). The name is read without allocating, and only on the
/// error path; `tests/classify_clients.rs` checks the names against the real
/// clients.
///
/// The walk is bounded (at most 32 links), so a cyclic chain cannot hang it.
pub fn failure_kind_of(error: &(dyn Error + 'static)) -> FailureKind {
    let mut current = Some(error);
    let mut depth = 0;
    while let Some(err) = current {
        if let Some(kind) = kind_of_link(err) {
            return kind;
        }
        depth += 1;
        if depth >= 32 {
            break;
        }
        current = err.source();
    }
    FailureKind::Transport
}

fn kind_of_link(err: &(dyn Error + 'static)) -> Option<FailureKind> {
    #[cfg(feature = "hyper")]
    {
        if let Some(e) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            if e.is_connect() {
                return Some(FailureKind::Connect);
            }
        }
        if let Some(e) = err.downcast_ref::<hyper::Error>() {
            if e.is_parse() || e.is_parse_status() {
                return Some(FailureKind::MalformedResponse);
            }
        }
    }
    if let Some(e) = err.downcast_ref::<io::Error>() {
        return match e.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable => Some(FailureKind::Connect),
            io::ErrorKind::InvalidData => Some(FailureKind::MalformedResponse),
            // Keep walking: an io::Error may wrap a more telling cause.
            _ => None,
        };
    }
    if err.is::<tokio::time::error::Elapsed>() || err.is::<crate::failure::EndpointTimeout>() {
        return Some(FailureKind::AttemptTimeout);
    }
    if err.is::<crate::failure::NoEndpoint>() {
        return Some(FailureKind::CircuitOpen);
    }
    kind_of_type_name(err)
}

/// Error types recognised by the name their `Debug` output starts with, because
/// they cannot be named from this crate.
const NAMED_KINDS: &[(&str, FailureKind)] = &[
    // `tonic::ConnectError` (all of a `Channel`'s connector: DNS, TCP, TLS
    // handshake) and hyper-util's private `HttpConnector` error (DNS, TCP connect,
    // connect timeout).
    ("ConnectError", FailureKind::Connect),
    // `tower::timeout::error::Elapsed`: a `tower::timeout::Timeout` elapsed.
    ("Elapsed", FailureKind::AttemptTimeout),
    // reqwest's private `TimedOut`: the `timeout()` of a request elapsed.
    ("TimedOut", FailureKind::AttemptTimeout),
    // `tonic::TimeoutExpired`: a `Channel`'s `Endpoint::timeout` or `grpc-timeout`.
    ("TimeoutExpired", FailureKind::AttemptTimeout),
];

fn kind_of_type_name(err: &(dyn Error + 'static)) -> Option<FailureKind> {
    let mut name = TypeName::default();
    // `TypeName` reports an error to stop the formatting once the name has ended,
    // so an `Err` here is the normal outcome, not a failure.
    let _ = write!(name, "{err:?}");
    NAMED_KINDS
        .iter()
        .find(|(known, _)| name.is(known))
        .map(|&(_, kind)| kind)
}

/// The type name a `Debug` output starts with (`ConnectError` for
/// `ConnectError("dns error", ..)`), captured without allocating.
///
/// It ends the formatting at the first character that cannot be part of a name,
/// so a long `Debug` output (a whole error chain) is never produced. A name that
/// fills the buffer is cut there, and so never equals one of [`NAMED_KINDS`],
/// which are all shorter.
#[derive(Default)]
struct TypeName {
    bytes: [u8; 32],
    len: usize,
    ended: bool,
}

impl TypeName {
    fn is(&self, name: &str) -> bool {
        self.bytes[..self.len] == *name.as_bytes()
    }
}

impl fmt::Write for TypeName {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if self.ended {
                return Err(fmt::Error);
            }
            match self.bytes.get_mut(self.len) {
                Some(slot) if byte.is_ascii_alphanumeric() || byte == b'_' => {
                    *slot = byte;
                    self.len += 1;
                }
                _ => self.ended = true,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Box<dyn Error + Send + Sync>);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn refused_io_error_deep_in_the_chain_is_a_connect_failure() {
        let err = Wrapper(Box::new(Wrapper(Box::new(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        )))));
        assert_eq!(failure_kind_of(&err), FailureKind::Connect);
    }

    #[test]
    fn reset_is_a_transport_failure() {
        let err = Wrapper(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert_eq!(failure_kind_of(&err), FailureKind::Transport);
    }

    #[test]
    fn invalid_data_is_a_malformed_response() {
        let err = io::Error::from(io::ErrorKind::InvalidData);
        assert_eq!(failure_kind_of(&err), FailureKind::MalformedResponse);
    }

    #[test]
    fn a_tonic_connect_error_is_a_connect_failure_whatever_it_wraps() {
        // How a tonic `Channel` reports a failed TLS handshake: tokio-rustls's
        // `InvalidData` error, which alone reads as a malformed response, inside
        // tonic's connect-phase wrapper.
        let handshake = io::Error::from(io::ErrorKind::InvalidData);
        let err = Wrapper(Box::new(tonic::ConnectError(Box::new(handshake))));
        assert_eq!(failure_kind_of(&err), FailureKind::Connect);
    }

    #[test]
    fn a_tonic_timeout_expired_is_an_attempt_timeout() {
        let err = Wrapper(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(failure_kind_of(&err), FailureKind::AttemptTimeout);
    }

    #[test]
    fn a_tower_timeout_elapsed_is_an_attempt_timeout() {
        let err = Wrapper(Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(failure_kind_of(&err), FailureKind::AttemptTimeout);
    }

    #[test]
    fn a_type_whose_name_only_begins_with_a_known_name_is_not_recognised() {
        #[derive(Debug)]
        struct ConnectErrorCount(#[allow(dead_code)] u32);
        impl fmt::Display for ConnectErrorCount {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect errors")
            }
        }
        impl Error for ConnectErrorCount {}

        let err = Wrapper(Box::new(ConnectErrorCount(3)));
        assert_eq!(failure_kind_of(&err), FailureKind::Transport);
    }

    #[test]
    fn unknown_errors_are_transport_failures() {
        let err = Wrapper("boom".into());
        assert_eq!(failure_kind_of(&err), FailureKind::Transport);
    }

    #[test]
    fn default_classifier_retries_only_gateway_statuses() {
        let c = DefaultClassifier::new();
        let h = HeaderMap::new();
        for (code, class) in [
            (200, ResponseClass::Success),
            (404, ResponseClass::Success),
            (500, ResponseClass::Failure { retryable: false }),
            (502, ResponseClass::Failure { retryable: true }),
            (503, ResponseClass::Failure { retryable: true }),
            (504, ResponseClass::Failure { retryable: true }),
            (599, ResponseClass::Failure { retryable: false }),
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(c.classify_response(status, &h), class, "status {code}");
        }
    }

    #[test]
    fn grpc_unavailable_in_headers_is_a_retryable_failure() {
        let c = DefaultClassifier::new();
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/grpc".parse().unwrap());
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(
            c.classify_response(StatusCode::OK, &h),
            ResponseClass::Failure { retryable: true }
        );
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(
            c.classify_response(StatusCode::OK, &h),
            ResponseClass::Success
        );
        h.insert("grpc-status", "13".parse().unwrap());
        assert_eq!(
            c.classify_response(StatusCode::OK, &h),
            ResponseClass::Failure { retryable: false }
        );
    }

    #[test]
    fn grpc_status_on_a_non_grpc_response_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("grpc-status", "14".parse().unwrap());
        let class = DefaultClassifier::new().classify_response(StatusCode::OK, &h);
        assert_eq!(class, ResponseClass::Success);
    }
}
