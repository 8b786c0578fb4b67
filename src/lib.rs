//! A [tower](https://docs.rs/tower) layer that guards calls to an upstream service with **timeouts**,
//! **retries** and a **retry budget**, and turns every failure into a
//! **well-formed response**: `502`, `503` or `504` with an RFC 9457
//! `application/problem+json` body, or a trailers-only gRPC status for gRPC
//! requests. It emits [`tracing`] spans and calls an [`Observer`] for metrics.
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use upstream_guard::{Retry, UpstreamGuardLayer};
//!
//! # async fn call_upstream() -> &'static str { "ok" }
//! # fn main() -> Result<(), upstream_guard::ConfigError> {
//! let guard = UpstreamGuardLayer::builder()
//!     .attempt_timeout(Duration::from_millis(800))
//!     .deadline(Duration::from_secs(3))
//!     .retry(Retry::default().max_attempts(3))
//!     .build()?;
//!
//! let app: Router = Router::new()
//!     .route("/api", get(call_upstream))
//!     .layer(guard);
//! # Ok(())
//! # }
//! ```
//!
//! # What the guard answers
//!
//! | what happened | status | problem `type` |
//! |---|---|---|
//! | connect refused, DNS, TLS | 502 | `urn:upstream-guard:problem:connect` |
//! | reset or closed before a response | 502 | `urn:upstream-guard:problem:transport` |
//! | response that is not valid HTTP | 502 | `urn:upstream-guard:problem:malformed-response` |
//! | last attempt timed out | 504 | `urn:upstream-guard:problem:attempt-timeout` |
//! | overall deadline passed | 504 | `urn:upstream-guard:problem:deadline-exceeded` |
//! | upstream answered 5xx, retries spent | the upstream's own response | — |
//!
//! Every synthesized response has `Cache-Control: no-store`, a correct
//! `Content-Length`, no body for `HEAD`, and a [`GuardFailure`] in its extensions.
//! The inner error's text is left out unless
//! [`expose_error_details`](Builder::expose_error_details) is on. gRPC requests
//! (`content-type: application/grpc*`) get HTTP 200 with `grpc-status` 14
//! (`UNAVAILABLE`) for 502/503 or 4 (`DEADLINE_EXCEEDED`) for 504.
//!
//! # Deadlines
//!
//! Each attempt may wait [`attempt_timeout`](Builder::attempt_timeout) for response
//! headers; the whole request, with all attempts and backoff sleeps, may take
//! [`deadline`](Builder::deadline). An inbound `grpc-timeout` shortens the
//! deadline, and each attempt tells a gRPC upstream what is left in its own
//! `grpc-timeout`. The clock starts once the request body needed for replay has
//! been read (as in Envoy), or at once for gRPC.
//!
//! # Observability
//!
//! One span `upstream_guard.request` (INFO) per request with the fields
//! `http.request.method`, `server.address`, `http.response.status_code`,
//! `error.type`, `upstream_guard.outcome` and `upstream_guard.attempts`; one child
//! `upstream_guard.attempt` (DEBUG) per attempt with `upstream_guard.attempt`,
//! `http.request.resend_count`, `http.response.status_code` and `error.type`.
//! Retries are DEBUG events.
//!
//! # Placement
//!
//! The guard's error type is [`Infallible`](std::convert::Infallible), so it fits:
//!
//! - `axum::Router::layer`, over handlers that call upstreams;
//! - around a `hyper_util` client (`Client<_, RequestBody<B>>`) in a reverse proxy;
//! - around a tonic `Channel`, with the body adapter shown on [`RequestBody`].
//!
//! # Features
//!
//! - `hyper` (default): recognise hyper and hyper-util client errors exactly
//!   (connect vs. reset vs. parse error).
//! - `metrics`: [`MetricsObserver`], which records requests, attempts, retries,
//!   rejections and circuit states through the `metrics` facade, with bounded
//!   labels (see its module docs for every metric).
//! - `serde`: [`GuardConfig`], a layer's whole configuration from a config file
//!   (TOML, YAML, JSON...), with durations written like `"800ms"`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod body;
mod breaker;
mod classify;
#[cfg(feature = "serde")]
mod config;
mod failure;
mod future;
mod grpc;
mod layer;
#[cfg(feature = "metrics")]
pub mod metrics;
mod observe;
mod replay;
mod response;
mod retry;
mod service;

#[cfg(feature = "metrics")]
pub use self::metrics::MetricsObserver;
pub use body::{BodyIdleTimeout, RequestBody, ResponseBody};
pub use breaker::{BreakerHandle, BreakerMode, BreakerSnapshot, CircuitBreaker, CircuitState};
pub use classify::{
    classify_fn, failure_kind_of, Classify, ClassifyFn, DefaultClassifier, ResponseClass,
};
#[cfg(feature = "serde")]
pub use config::{BreakerKeys, CircuitBreakerConfig, GuardConfig, RetryConfig};
pub use failure::{FailureKind, GuardFailure};
pub use future::ResponseFuture;
pub use grpc::{encode_grpc_timeout, parse_grpc_timeout};
pub use layer::{Builder, ConfigError, UpstreamGuardLayer};
pub use observe::{
    AttemptEvent, AttemptOutcome, CircuitEvent, NoopObserver, Observer, Outcome, RejectedEvent,
    RequestFacts, ResponseEvent, RetryDenied, RetryDeniedEvent, RetryEvent,
};
pub use retry::{parse_retry_after, Retry};
pub use service::UpstreamGuard;

/// The README's code blocks, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// A type-erased error, as used throughout the tower ecosystem.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
