//! The guard with [tonic](https://docs.rs/tonic), on both sides of a gRPC call
//! (feature `tonic`).
//!
//! - **Client**: [`GuardedChannel`], a tonic `Channel` behind the guard, with a
//!   name you can write in a struct field or a function's return type:
//!
//!   ```no_run
//!   # use tonic::transport::Endpoint;
//!   # use tonic_health::pb::health_client::HealthClient;
//!   use upstream_guard::tonic::GuardedChannel;
//!   use upstream_guard::UpstreamGuardLayer;
//!
//!   fn health_client(guard: &UpstreamGuardLayer) -> Result<HealthClient<GuardedChannel>, upstream_guard::BoxError> {
//!       let origin: http::Uri = "http://127.0.0.1:50051".parse()?;
//!       let channel = Endpoint::from(origin.clone()).connect_lazy();
//!       let guarded = GuardedChannel::new(guard, channel, origin.clone())?;
//!       Ok(HealthClient::with_origin(guarded, origin))
//!   }
//!   ```
//!
//!   The channel's origin keys the circuit breaker and names the upstream in
//!   failures: [`GuardedChannel`] stamps it on every request, so a stub built
//!   with `XClient::new` is keyed as well as one built with `with_origin`.
//!
//! - **Server, one breaker per service**: [`GuardedService`] wraps a generated
//!   server for `Server::add_service`. Its breaker key is the service's gRPC
//!   name (`NamedService::NAME`), fixed by the server: failures of one service
//!   never open another's breaker, and no caller can pick a key.
//!
//! - **Server, in front of everything**: `Server::builder().layer(guard)` needs
//!   nothing from this module. With the `tonic` feature the guard recognises a
//!   request a tonic server received over TCP or a Unix socket (by the
//!   connection info tonic attaches) and keys it by the one shared breaker,
//!   never by the caller's `:authority`: a caller that names another host
//!   cannot get past an open breaker nor fill the registry with keys. A TLS
//!   listener (tonic's `TlsConnectInfo`) or a custom `Connected` type is not
//!   recognised: use [`GuardedService`] there, or
//!   [`single()`](crate::BreakerPolicy::single).

use std::convert::Infallible;
use std::task::{Context, Poll};

use ::tonic::body::Body;
use ::tonic::server::NamedService;
use ::tonic::transport::Channel;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::error::ConfigError;
use crate::{BreakerHandle, ResponseFuture, UpstreamGuard, UpstreamGuardLayer};

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// A tonic [`Channel`] behind the guard: what a generated client takes.
///
/// Build it once with [`GuardedChannel::new`] and clone it freely; clones share
/// the guard's state and the channel's connections. Its error type is
/// [`Infallible`]: every failure reaches the stub as a gRPC status.
#[derive(Clone, Debug)]
pub struct GuardedChannel {
    guard: UpstreamGuard<IntoTonicBody<Channel>>,
    scheme: Scheme,
    authority: Authority,
}

impl GuardedChannel {
    /// `channel` behind `guard`, for the server at `origin` (`http://host:port`,
    /// the URI the channel connects to).
    ///
    /// The origin is what the guard keys its breaker by and names in failures,
    /// so it is asked for here, once: every request through this channel
    /// carries it, whether the stub was built with `new` or `with_origin`.
    pub fn new(
        guard: &UpstreamGuardLayer,
        channel: Channel,
        origin: Uri,
    ) -> Result<GuardedChannel, ConfigError> {
        let parts = origin.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(ConfigError::new(
                "origin",
                "must be an absolute URI with a scheme and an authority, like http://host:port",
            ));
        };
        let guard = tower_layer::Layer::layer(guard, IntoTonicBody { inner: channel });
        Ok(GuardedChannel {
            guard,
            scheme,
            authority,
        })
    }

    /// Operator access to the guard's circuit breakers; `None` if the breaker
    /// was turned off.
    pub fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.guard.breaker_handle()
    }

    /// Puts the channel's origin on a request, keeping its path: a stub built
    /// with `new` sends a bare path, one built with `with_origin` may name
    /// another origin than the channel really connects to.
    fn stamp_origin(&self, request: &mut Request<Body>) {
        if request.uri().authority() == Some(&self.authority) {
            return;
        }
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        // A scheme, an authority and a path always make a valid URI.
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

impl Service<Request<Body>> for GuardedChannel {
    type Response = Response<ResponseBody<Body>>;
    type Error = Infallible;
    type Future = ResponseFuture<IntoTonicBody<Channel>, Body>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.guard.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        self.stamp_origin(&mut request);
        self.guard.call(request)
    }
}

/// The guard's request body turned into the body a tonic [`Channel`] takes.
/// Part of [`GuardedChannel`]'s future type; not built on its own.
#[derive(Clone, Debug)]
pub struct IntoTonicBody<S> {
    inner: S,
}

impl<S> Service<Request<RequestBody<Body>>> for IntoTonicBody<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody<Body>>) -> S::Future {
        self.inner.call(request.map(Body::new))
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// A generated tonic server behind the guard, keyed by its service name: for
/// `Server::builder().add_service(..)`.
///
/// ```no_run
/// # async fn run(guard: upstream_guard::UpstreamGuardLayer) -> Result<(), Box<dyn std::error::Error>> {
/// use tonic::transport::Server;
/// use upstream_guard::tonic::GuardedService;
///
/// let (_reporter, health) = tonic_health::server::health_reporter();
/// Server::builder()
///     .add_service(GuardedService::new(&guard, health))
///     .serve("127.0.0.1:50051".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
///
/// Every `GuardedService` made from one layer shares its state (retry budget,
/// observer, breaker registry), each service with a breaker of its own.
#[derive(Clone, Debug)]
pub struct GuardedService<S> {
    guard: UpstreamGuard<S>,
}

impl<S: NamedService> GuardedService<S> {
    /// `service` behind `guard`.
    pub fn new(guard: &UpstreamGuardLayer, service: S) -> GuardedService<S> {
        GuardedService {
            guard: tower_layer::Layer::layer(guard, service),
        }
    }

    /// Operator access to the guard's circuit breakers; `None` if the breaker
    /// was turned off.
    pub fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.guard.breaker_handle()
    }
}

impl<S: NamedService> NamedService for GuardedService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<Request<B>> for GuardedService<S>
where
    S: NamedService,
    UpstreamGuard<S>: Service<Request<B>>,
{
    type Response = <UpstreamGuard<S> as Service<Request<B>>>::Response;
    type Error = <UpstreamGuard<S> as Service<Request<B>>>::Error;
    type Future = <UpstreamGuard<S> as Service<Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.guard.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(crate::placement::ServiceKey(S::NAME));
        self.guard.call(request)
    }
}
