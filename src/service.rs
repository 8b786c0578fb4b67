//! [`UpstreamGuard`], the service the layer produces.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::breaker::BreakerHandle;
use crate::future::ResponseFuture;
use crate::shared::Shared;
use crate::BoxError;

/// Guards calls to an inner service that talks to an upstream.
///
/// Made by [`UpstreamGuardLayer`](crate::UpstreamGuardLayer). Its error type is
/// [`Infallible`]: every failure of the inner service becomes a response, so it
/// drops into `axum::Router::layer`, hyper servers and tonic.
///
/// The inner service receives [`RequestBody<B>`], which is the caller's body, or a
/// buffered copy of it when the request may be retried.
pub struct UpstreamGuard<S> {
    inner: S,
    shared: Arc<Shared>,
    /// An error from the inner service's `poll_ready`, answered on the next call.
    ready_error: Option<BoxError>,
}

impl<S> UpstreamGuard<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        UpstreamGuard {
            inner,
            shared,
            ready_error: None,
        }
    }

    /// Operator access to the circuit breakers this service shares with its
    /// layer; `None` if the breaker was turned off.
    pub fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.shared.breaker_handle()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for UpstreamGuard<S> {
    fn clone(&self) -> Self {
        UpstreamGuard {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            ready_error: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for UpstreamGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamGuard")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for UpstreamGuard<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    ResB: Body,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            // A service that cannot become ready is a failed upstream: remember the
            // error and answer the next call with a response for it.
            Poll::Ready(Err(e)) => {
                self.ready_error = Some(e.into());
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(error) = self.ready_error.take() {
            return ResponseFuture::not_ready(request, self.shared.clone(), error);
        }
        ResponseFuture::start(request, &mut self.inner, self.shared.clone())
    }
}
