//! A [tower](https://docs.rs/tower) layer that guards the calls your service makes
//! to an upstream: **per-attempt timeouts and a deadline**, **retries** with
//! jittered backoff inside a **retry budget**, a **circuit breaker** per upstream,
//! and every failure turned into a **well-formed response** — `502`, `503` or
//! `504` with an RFC 9457 `application/problem+json` body, or a trailers-only gRPC
//! status for gRPC requests. It emits [`tracing`] spans and calls an
//! [`Observer`] for metrics.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, Layer, ServiceExt};
//! use upstream_guard::{BreakerPolicy, FailureKind, GuardFailure, RequestBody, RetryPolicy, UpstreamGuardLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), upstream_guard::BoxError> {
//! let guard = UpstreamGuardLayer::builder()
//!     .attempt_timeout(Duration::from_millis(800))
//!     .deadline(Duration::from_secs(3))
//!     .retry(RetryPolicy::default().max_attempts(3))
//!     .circuit_breaker(BreakerPolicy::consecutive_failures(5).open_for(Duration::from_secs(10)))
//!     .build()?;
//!
//! // An "upstream client" whose connections are always refused.
//! let client = service_fn(|_: Request<RequestBody<Full<bytes::Bytes>>>| async {
//!     Err::<Response<Full<bytes::Bytes>>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
//! });
//!
//! let request = Request::get("http://payments.internal/charges").body(Full::default())?;
//! let response = guard.layer(client).oneshot(request).await?;
//!
//! // Three attempts (a refused connection is safe to retry), then a 502...
//! assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
//! let failure = response.extensions().get::<GuardFailure>().unwrap();
//! assert_eq!((failure.kind(), failure.attempts()), (FailureKind::Connect, 3));
//! // ...with a problem+json body that names the upstream but leaks no internals.
//! let body = response.into_body().collect().await?.to_bytes();
//! let problem: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(problem["type"], "urn:upstream-guard:problem:connect");
//! assert_eq!(problem["upstream"], "payments.internal");
//! # Ok(())
//! # }
//! ```
//!
//! # Where it goes
//!
//! The guard's error type is [`Infallible`](std::convert::Infallible): every
//! failure is already a response, so it drops in wherever tower services go.
//!
//! ```text
//!  axum service            client ──▶ Router ──▶ [ guard ] ──▶ handler ──▶ upstream
//!  (Router::layer)                               retries the handler, times it out,
//!                                                classifies its 5xx
//!
//!  reverse proxy           client ──▶ axum/hyper server ──▶ [ guard ] ──▶ hyper-util Client ──▶ upstream
//!                                                           per-host breakers (authority key)
//!
//!  gRPC client             tonic stub ──▶ [ GuardedChannel ] ──▶ server
//!  (feature tonic)                        grpc-status 14/4, grpc-timeout propagated
//!
//!  gRPC server             client ──▶ tonic Server ──▶ [ GuardedService ] ──▶ generated service
//!  (feature tonic)                                     per-service breakers (or Server::layer)
//! ```
//!
//! The inner service receives [`RequestBody<B>`]: the caller's body, or a buffered
//! copy when the request may be retried. axum's routes and hyper-util's
//! `Client<_, RequestBody<B>>` take it as it is; for tonic's `Channel`, the
//! `tonic` feature's [`GuardedChannel`](crate::tonic) adapts the body and
//! stamps the server's origin on every request (it keys the circuit breaker
//! and names the upstream in errors).
//!
//! Every clone of a layer, and every service it makes, shares one state (breakers,
//! retry budget, observer): axum calls `Layer::layer` once per route and clones
//! services per request, and the breaker still sees every failure.
//!
//! # Placements
//!
//! In front of a client, the default breaker key is the request URI's
//! authority: one breaker per upstream host. Behind a server the inner service
//! is a handler, and the URI's authority is the caller's to choose (HTTP/2's
//! `:authority`, an absolute-form HTTP/1 target) or absent. A key the caller
//! chooses is a breaker the caller can dodge (name another host, get a closed
//! breaker) or flood (one key per request), so the default keying
//! ([`BreakerPolicy::per_authority`]) never uses it there and keys by what the
//! server fixed instead:
//!
//! - `axum::Router::layer(guard)`, feature `axum`: one breaker per route axum
//!   matched (its pattern, `/orders/{id}`, not the path sent); requests no
//!   route matched share one. Five failures on one route leave the others,
//!   health checks included, answering.
//! - tonic `Server::builder().add_service(GuardedService::new(&guard, svc))`,
//!   feature `tonic`: one breaker per gRPC service.
//! - tonic `Server::builder().layer(guard)`, feature `tonic`: one breaker for
//!   the whole server, which a caller's `:authority` cannot get past. The layer
//!   runs before routing, where only the caller names the method.
//!
//! The guard tells a server placement from request extensions only the server
//! sets (axum's `MatchedPath` and `OriginalUri`, tonic's TCP or Unix socket
//! connection info); without the feature, or behind a TLS tonic listener, it
//! cannot, and keys by the URI authority. A handler that forwards the request
//! to an upstream through a guarded client is a client placement again (its
//! URI now names the upstream), as is every request a tonic stub makes.
//!
//! ```
//! use axum::{routing::get, Router};
//! use upstream_guard::{BreakerPolicy, UpstreamGuardLayer};
//!
//! // With the `axum` feature: `/orders/{id}` and `/health` have a breaker each.
//! let guard = UpstreamGuardLayer::builder()
//!     .circuit_breaker(BreakerPolicy::consecutive_failures(5))
//!     .upstream_name("orders-service") // else errors name the caller's authority
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/orders/{id}", get(|| async { "{}" }))
//!     .route("/health", get(|| async { "ok" }))
//!     .layer(guard);
//! # Ok::<(), upstream_guard::ConfigError>(())
//! ```
//!
//! Behind a server, the guard's work is the handler's:
//!
//! - **A retry runs the handler again**, with the replayed body, when it
//!   answered a retryable failure or ran out of its attempt timeout (its
//!   future is dropped mid-work), for safe methods and requests with an
//!   `Idempotency-Key` only.
//! - **A gRPC handler sees the guard's per-attempt `grpc-timeout`** in its
//!   metadata even when the caller sent none: what the attempt may still take.
//! - **A panicking handler is answered** like tower-http's `CatchPanic` does:
//!   `500` problem+json of type `urn:upstream-guard:problem:panic`, or
//!   `grpc-status` 13 (`INTERNAL`) for gRPC, rather than a reset stream
//!   ([`FailureKind::Panic`]). It counts against the breaker and the default
//!   classifier does not retry it. It is caught while the inner service's
//!   future is polled, where axum and tonic handlers run; a panic in
//!   `Service::call` itself or in a streaming response body, or under
//!   `panic = "abort"`, is not.
//!
//! # What the caller gets
//!
//! | what happened | status | problem `type` |
//! |---|---|---|
//! | connect refused, DNS, TLS | 502 | `urn:upstream-guard:problem:connect` |
//! | reset or closed before a response | 502 | `urn:upstream-guard:problem:transport` |
//! | response that is not valid HTTP | 502 | `urn:upstream-guard:problem:malformed-response` |
//! | last attempt timed out | 504 | `urn:upstream-guard:problem:attempt-timeout` |
//! | overall deadline passed | 504 | `urn:upstream-guard:problem:deadline-exceeded` |
//! | circuit open | 503 + `Retry-After` | `urn:upstream-guard:problem:circuit-open` |
//! | concurrency cap reached | 503 | `urn:upstream-guard:problem:concurrency-limited` |
//! | the caller's own request body failed | 400 | `urn:upstream-guard:problem:request-body` |
//! | the caller's request body did not arrive in time | 408 | `urn:upstream-guard:problem:request-body-timeout` |
//! | the handler behind the guard panicked | 500 | `urn:upstream-guard:problem:panic` |
//! | upstream answered 5xx, retries spent | the upstream's own response | — |
//!
//! Every synthesized response has `Cache-Control: no-store`, a correct
//! `Content-Length`, no body for `HEAD`, and a [`GuardFailure`] in its extensions.
//! The inner error's text is left out unless
//! [`expose_error_details`](Builder::expose_error_details) is on. gRPC requests
//! (`POST` with `content-type: application/grpc*`) get HTTP 200 with `grpc-status` 14
//! (`UNAVAILABLE`) for 502/503, 4 (`DEADLINE_EXCEEDED`) for 504 and 408, or 13
//! (`INTERNAL`) for 400 and 500.
//! [`map_failure_response`](Builder::map_failure_response) can change or replace
//! any synthesized response; `Content-Length` and the `HEAD` rule are applied
//! after it.
//!
//! # Defaults, and why
//!
//! - **Attempt timeout 5 s, deadline 15 s**: three attempts fit in the deadline,
//!   and 15 s (Envoy's route timeout) is below most callers' own timeouts, so the
//!   caller hears a 504 from us rather than giving up blind.
//! - **3 attempts, 25 ms → 1 s full-jitter backoff**: full jitter spreads the
//!   retries of many clients instead of synchronising them.
//! - **Retry budget 20 % + 10/s** (Finagle, Linkerd): a failing upstream gets at
//!   most 1.2× its normal load from retries, not 3×.
//! - **Only safe retries**: idempotent methods or an `Idempotency-Key` once a
//!   request may have reached the upstream; any method when it provably never left.
//! - **Circuit breaker: 5 failures in a row, open 5 s doubling to 60 s, per
//!   upstream authority**: a dead host is left alone quickly, and one dead host
//!   never opens another's breaker.
//! - **Replay bodies up to 64 KiB**: small bodies are buffered once and shared by
//!   every attempt; larger or still-streaming bodies are sent once, whole.
//!
//! # Deadlines
//!
//! Each attempt may wait [`attempt_timeout`](Builder::attempt_timeout) for response
//! headers; the whole request, with all attempts and backoff sleeps, may take
//! [`deadline`](Builder::deadline). No backoff sleeps past the deadline. An
//! inbound `grpc-timeout` shortens the deadline, and each attempt tells a gRPC
//! upstream what is left in its own `grpc-timeout`; a gRPC upstream that answers
//! `DEADLINE_EXCEEDED` is taken for the guard's own timer firing there (retried,
//! and answered, as that timeout). The clock starts the first time the guard has
//! to wait — for a body to replay, or for an attempt — or at once for gRPC, whose
//! caller counts from when it sent the request. A
//! [`body_idle_timeout`](Builder::body_idle_timeout) bounds a response body that
//! stalls after its headers.
//!
//! # Who pays for a failure
//!
//! A breaker that callers can open, or a probe a caller can sit on, would let
//! one client take an upstream away from every other. So:
//!
//! - **Only the upstream's own failures count against its breaker**: the guard's
//!   attempt timer expired (or the configured deadline cut an attempt short), or
//!   the upstream refused, reset, answered garbage or a failure status. A
//!   deadline the caller chose (an inbound `grpc-timeout` shorter than the
//!   configured deadline), the caller's body breaking (400) or stalling (408),
//!   and the caller going away never count.
//! - **A slow client holds nothing that others need.** The request is admitted
//!   to its breaker (a half-open probe) and to the concurrency cap only when its
//!   first attempt is about to be sent. A body read for replay is read before
//!   that, within the deadline: a body that has not arrived by then is answered
//!   `408 Request Timeout` and never reaches the upstream. A streamed body that
//!   is still arriving when an attempt's time runs out is also the caller's
//!   doing: `408`, not counted.
//! - **The concurrency cap bounds the upstream's work, not just its headers.** A
//!   permit travels with the response body and is given back when the body ends,
//!   fails, idles out ([`body_idle_timeout`](Builder::body_idle_timeout)) or is
//!   dropped: a streamed response keeps its permit while it streams.
//! - **Retries are paid for per upstream.** With a keyed breaker each key has its
//!   own retry budget (bounded like the breakers), so a failing upstream spends
//!   only what its own traffic paid in, and the window slides with real time: a
//!   quiet spell forgets only deposits older than the window.
//!
//! # Hedging and replicas
//!
//! [`Builder::hedge`] sends another attempt of a request that has had no answer
//! for a delay ([`HedgePolicy::after`]) or for a percentile of the upstream's
//! recent latency ([`HedgePolicy::at_percentile`]), without cancelling the
//! first; the first answer that is not a failure wins and the others are
//! dropped. Only requests safe to resend are hedged, every hedge is paid from
//! the retry budget, none starts when the deadline is closer than the delay or
//! while the breaker is not closed, and a loser never counts against a breaker
//! (see [`HedgePolicy`]).
//!
//! [`endpoints::Endpoints`] serves one upstream from several replicas, inside
//! the guard: each replica has its own breaker, each attempt goes to the less
//! loaded of two random admitted replicas, and a retry or a hedge to one the
//! request has not tried.
//!
//! # Adaptive concurrency
//!
//! [`BreakerPolicy::adaptive_concurrency`] limits each breaker key's requests in
//! flight to what the upstream serves without queueing, measured from the
//! latency of its answers, instead of a fixed
//! [`concurrency_limit`](BreakerPolicy::concurrency_limit). Use it when an
//! upstream's capacity is unknown or moves; keep a fixed limit when it is a
//! known, hard number. Requests over the limit are answered at once with `503`
//! `concurrency-limited` and a `Retry-After` derived from the latency measured,
//! and never reach the upstream; an open circuit answers before the limit does,
//! and the limit restarts conservatively when the circuit closes. See
//! [`adaptive`] for how the limit moves and what it costs.
//!
//! # Observability
//!
//! One span `upstream_guard.request` (INFO) per request with the fields
//! `http.request.method`, `server.address`, `http.response.status_code`,
//! `error.type`, `upstream_guard.outcome`, `upstream_guard.attempts` and
//! `upstream_guard.circuit_state`; one child `upstream_guard.attempt` (DEBUG) per
//! attempt with `upstream_guard.attempt`, `http.request.resend_count`,
//! `http.response.status_code`, `error.type` and, on a hedge,
//! `upstream_guard.hedge = true`. Retries are DEBUG events and
//! circuit transitions WARN events. Spans are made for `tracing` subscribers:
//! until one has been set (globally or scoped) the guard creates none, which
//! keeps their cost off the request path. An [`Observer`] receives every attempt,
//! retry, denied retry, hedge, transition, rejection and final response.
//!
//! # Features
//!
//! - `hyper` (default): recognise hyper and hyper-util client errors exactly
//!   (connect vs. reset vs. parse error).
//! - `metrics`: [`MetricsObserver`], which records requests, attempts, retries,
//!   hedges, rejections, circuit states and adaptive concurrency limits through
//!   the `metrics` facade, with bounded labels (see its module docs for every
//!   metric).
//! - `axum`: key a guard placed with `axum::Router::layer` by the route axum
//!   matched (see [Placements](#placements)).
//! - `tonic`: [`tonic::GuardedChannel`], a nameable guarded tonic `Channel`;
//!   [`tonic::GuardedService`] for `Server::add_service`; and a guard placed
//!   with tonic's `Server::layer` that ignores the caller's `:authority`.
//! - `serde`: [`GuardConfig`], a layer's whole configuration from a config file
//!   (TOML, YAML, JSON...), with durations written like `"800ms"`; `Deserialize`
//!   and `Serialize` for [`RetryPolicy`], [`BreakerPolicy`] (with its
//!   [`AdaptiveConcurrency`](adaptive::AdaptiveConcurrency)) and [`HedgePolicy`], `Serialize` for
//!   [`BreakerSnapshot`](breaker::BreakerSnapshot) (health endpoints). Without it
//!   the crate does not depend on serde.
//!
//! The minimum supported Rust version is 1.85.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

pub mod adaptive;
mod body;
pub mod breaker;
mod bulkhead;
mod call;
pub mod classify;
mod clock;
#[cfg(feature = "serde")]
pub mod config;
pub mod endpoints;
mod error;
mod failure;
mod future;
pub mod grpc;
mod head;
mod hedge;
mod keyed;
mod layer;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod observe;
mod panic;
mod placement;
mod replay;
mod report;
mod response;
pub mod retry;
mod service;
mod shared;
#[cfg(feature = "tonic")]
pub mod tonic;
mod watch;

pub use body::{BodyIdleTimeout, RequestBody, ResponseBody};
pub use breaker::{BreakerHandle, BreakerPolicy, CircuitState};
pub use classify::Classify;
#[cfg(feature = "serde")]
pub use config::GuardConfig;
pub use error::ConfigError;
pub use failure::{FailureKind, GuardFailure};
pub use future::ResponseFuture;
pub use hedge::HedgePolicy;
pub use layer::{Builder, UpstreamGuardLayer};
#[cfg(feature = "metrics")]
pub use metrics::MetricsObserver;
pub use observe::Observer;
pub use retry::RetryPolicy;
pub use service::UpstreamGuard;

/// A type-erased error, as used throughout the tower ecosystem.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
