//! Body types: the request body the inner service sees, and the response body the
//! guard returns.
//!
//! [`RequestBody`] is either the caller's body streaming through untouched, or a
//! buffered copy that can be sent again on a retry. [`ResponseBody`] is either the
//! upstream's body, streamed through untouched, or the body of a response the guard
//! synthesized. Both are plain enums: no boxing, no per-request allocation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::bulkhead::Permit;
use crate::watch::{SendState, SendWatch};
use crate::BoxError;

pin_project! {
    /// The request body handed to the inner service.
    ///
    /// A request whose body is small enough to replay (see
    /// [`RetryPolicy::max_replay_body`](crate::RetryPolicy::max_replay_body)) gets a buffered copy
    /// on each attempt; any other body streams through exactly once, never truncated.
    ///
    /// Inner services that accept any [`Body`] (axum's `Route`, hyper-util's client
    /// with `Client<_, RequestBody<B>>`) take it as it is; a service with one fixed
    /// body type, like tonic's `Channel`, needs a one-line adapter:
    /// `.map_request(|r: http::Request<RequestBody<B>>| r.map(tonic::body::Body::new))`.
    pub struct RequestBody<B> {
        #[pin]
        inner: RequestInner<B>,
    }
}

pin_project! {
    #[project = RequestInnerProj]
    enum RequestInner<B> {
        // The caller's body, passed through once. `prefix` holds bytes the guard
        // already read while checking whether the body could be replayed;
        // `watch` tells the guard how far the caller got in sending it.
        Stream {
            prefix: Option<Bytes>,
            #[pin]
            body: B,
            watch: Option<SendWatch>,
        },
        // A replayable copy.
        Replay {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
    }
}

impl<B> RequestBody<B> {
    /// Passes `body` through as it is.
    pub fn new(body: B) -> Self {
        RequestBody {
            inner: RequestInner::Stream {
                prefix: None,
                body,
                watch: None,
            },
        }
    }

    /// Sends `prefix` and then the rest of `body`, telling `watch` whether the
    /// caller finished sending it.
    pub(crate) fn watched(prefix: Bytes, body: B, watch: Option<SendWatch>) -> Self {
        RequestBody {
            inner: RequestInner::Stream {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body,
                watch,
            },
        }
    }

    /// A replay of a buffered body.
    pub(crate) fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        RequestBody {
            inner: RequestInner::Replay {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// Whether this body is a buffered copy (and so the request may be retried).
    pub fn is_replay(&self) -> bool {
        matches!(self.inner, RequestInner::Replay { .. })
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            RequestInner::Stream { prefix, .. } => f
                .debug_struct("RequestBody::Stream")
                .field("prefix_len", &prefix.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
            RequestInner::Replay { data, .. } => f
                .debug_struct("RequestBody::Replay")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().inner.project() {
            RequestInnerProj::Stream {
                prefix,
                mut body,
                watch,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                let polled = body.as_mut().poll_frame(cx);
                if let Some(watch) = watch {
                    match &polled {
                        Poll::Ready(None) => watch.set(SendState::Sent),
                        Poll::Ready(Some(Err(_))) => watch.set(SendState::Failed),
                        Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                            watch.set(SendState::Sent);
                        }
                        _ => {}
                    }
                }
                polled.map(|frame| frame.map(|r| r.map(|f| f.map_data(into_bytes))))
            }
            RequestInnerProj::Replay { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Stream { prefix, body, .. } => prefix.is_none() && body.is_end_stream(),
            RequestInner::Replay { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Stream { prefix, body, .. } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
            RequestInner::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Turns any [`Buf`] into [`Bytes`]; for `Bytes` itself this is a move, not a copy.
pub(crate) fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

pin_project! {
    /// The response body the guard returns: the upstream's body streamed through
    /// untouched, or the body of a response the guard synthesized.
    pub struct ResponseBody<B> {
        #[pin]
        inner: ResponseInner<B>,
    }
}

pin_project! {
    #[project = ResponseInnerProj]
    enum ResponseInner<B> {
        Upstream {
            #[pin]
            body: B,
            // Armed only when a body idle timeout is configured, and only once the
            // body makes its reader wait.
            #[pin]
            idle: Option<Sleep>,
            idle_timeout: Option<Duration>,
            // The concurrency permit, given back when the body ends, fails,
            // idles out or is dropped.
            permit: Option<Permit>,
        },
        Synthesized {
            data: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the upstream's body.
    pub fn upstream(body: B) -> Self {
        ResponseBody::upstream_with_idle_timeout(body, None)
    }

    /// Wraps the upstream's body; the body fails with [`BodyIdleTimeout`] if
    /// `idle_timeout` passes without a frame.
    pub(crate) fn upstream_with_idle_timeout(body: B, idle_timeout: Option<Duration>) -> Self {
        ResponseBody::guarded(body, idle_timeout, None)
    }

    /// Wraps the upstream's body, holding `permit` until the body is over.
    pub(crate) fn guarded(body: B, idle_timeout: Option<Duration>, permit: Option<Permit>) -> Self {
        ResponseBody {
            inner: ResponseInner::Upstream {
                body,
                idle: None,
                idle_timeout,
                permit,
            },
        }
    }

    /// A complete body held in memory, as the guard synthesizes.
    pub fn full(data: Bytes) -> Self {
        ResponseBody {
            inner: ResponseInner::Synthesized {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether this body was synthesized by the guard.
    pub fn is_synthesized(&self) -> bool {
        matches!(self.inner, ResponseInner::Synthesized { .. })
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            ResponseInner::Upstream { .. } => f
                .debug_struct("ResponseBody::Upstream")
                .finish_non_exhaustive(),
            ResponseInner::Synthesized { data } => f
                .debug_struct("ResponseBody::Synthesized")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            ResponseInnerProj::Upstream {
                mut body,
                mut idle,
                idle_timeout,
                permit,
            } => match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => {
                    // The end, an error, or a last frame: the upstream's work is over.
                    let over = !matches!(frame, Some(Ok(_))) || body.is_end_stream();
                    if over {
                        *permit = None;
                    }
                    // Progress: the next wait starts a fresh idle period.
                    if let (Some(timeout), Some(sleep)) = (idle_timeout, idle.as_mut().as_pin_mut())
                    {
                        sleep.reset(crate::clock::later(Instant::now(), *timeout));
                    }
                    Poll::Ready(
                        frame.map(|r| r.map(|f| f.map_data(into_bytes)).map_err(Into::into)),
                    )
                }
                Poll::Pending => {
                    let Some(timeout) = *idle_timeout else {
                        return Poll::Pending;
                    };
                    if idle.is_none() {
                        idle.set(Some(tokio::time::sleep_until(crate::clock::later(
                            Instant::now(),
                            timeout,
                        ))));
                    }
                    match idle.as_pin_mut().map(|sleep| sleep.poll(cx)) {
                        Some(Poll::Ready(())) => {
                            *permit = None;
                            Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(timeout)))))
                        }
                        _ => Poll::Pending,
                    }
                }
            },
            ResponseInnerProj::Synthesized { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseInner::Upstream { body, .. } => body.is_end_stream(),
            ResponseInner::Synthesized { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseInner::Upstream { body, .. } => body.size_hint(),
            ResponseInner::Synthesized { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The error a response body fails with when the upstream sent nothing for the
/// configured [`body_idle_timeout`](crate::Builder::body_idle_timeout): the
/// caller sees a body error, never a silently truncated success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyIdleTimeout(Duration);

impl BodyIdleTimeout {
    /// The idle timeout that passed.
    pub fn timeout(&self) -> Duration {
        self.0
    }
}

impl fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upstream sent no body data for {:?}", self.0)
    }
}

impl std::error::Error for BodyIdleTimeout {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn replay_yields_data_then_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let body = RequestBody::<Full<Bytes>>::replay(Bytes::from_static(b"hello"), Some(trailers));
        assert_eq!(body.size_hint().exact(), Some(5));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "hello");
    }

    #[tokio::test]
    async fn prefix_comes_before_the_rest_of_the_stream() {
        let rest = StreamBody::new(futures_util_stream(vec![b"world".to_vec()]));
        let body = RequestBody::watched(Bytes::from_static(b"hello "), rest, None);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello world");
    }

    #[tokio::test]
    async fn synthesized_body_is_exact_and_ends() {
        let body = ResponseBody::<Full<Bytes>>::full(Bytes::from_static(b"{}"));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
        assert!(ResponseBody::<Full<Bytes>>::full(Bytes::new()).is_end_stream());
    }

    fn futures_util_stream(
        chunks: Vec<Vec<u8>>,
    ) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> {
        struct Iter(std::vec::IntoIter<Vec<u8>>);
        impl futures_core::Stream for Iter {
            type Item = Result<Frame<Bytes>, std::convert::Infallible>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.next().map(|c| Ok(Frame::data(Bytes::from(c)))))
            }
        }
        Iter(chunks.into_iter())
    }
}
