//! [`ResponseFuture`]: the attempts of one guarded request, as a state machine.
//!
//! ```text
//!            ┌───────────┐ body read   ┌─────────┐ response / error / timeout
//!  call ───▶ │ Buffering │ ──────────▶ │ Calling │ ──────────────┐
//!    │       └───────────┘             └─────────┘               ▼
//!    │  (nothing to read)                   ▲              retry? (retry::decide)
//!    └──────────────────────────────────────┘               │ yes        │ no
//!                                ┌──────────┐  ┌─────────┐  │            ▼
//!                                │ Readying │◀─│ Backoff │◀─┘          answer
//!                                └──────────┘  └─────────┘
//! ```
//!
//! The future only sequences; each concern has its own module: the deadline
//! and the one timer in [`clock`](crate::clock), reading a body to replay in
//! [`replay`](crate::replay), the retry decision in [`retry`](crate::retry),
//! spans and observer calls in [`report`](crate::report), admission in
//! [`breaker`](crate::breaker).
//!
//! A future polled after it gave its response stays pending, whatever state it
//! was in. The one invariant the types do not carry — a retry is only ever
//! scheduled for a request that kept what it needs to be sent again — is
//! checked where it is used, and if it were broken the request would get a
//! 502, never a panic or a hang.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::call::{Call, Rejection, Sending};
use crate::clock::Clock;
use crate::grpc;
use crate::hedge::Flight;
use crate::replay::{Buffering, Plan};
use crate::shared::Shared;
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
        state: State<S, S::Future, B>,
        #[pin]
        clock: Clock,
        call: Call<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, B> {
        // Reading a body to replay (its room is shared with the attempt's
        // future, so it costs the response future no size).
        Buffering { buffering: Buffering<S, B> },
        // An attempt is in flight: the round's first (taken out when it ends
        // before the round does) and, in a hedged round, its hedges.
        Calling { #[pin] future: Option<F>, flight: Flight<F> },
        // Sleeping before a retry.
        Backoff,
        // Waiting for the inner service to be ready for a retry.
        Readying,
        // Answering without calling the upstream.
        Rejected { rejection: Option<Rejection> },
        // The response was given.
        Done,
    }
}

impl<S, F, B> State<S, F, B> {
    fn calling(future: F) -> Self {
        State::Calling {
            future: Some(future),
            flight: Flight::default(),
        }
    }
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Starts a guarded request: the first attempt is sent at once unless a
    /// body must be read first to be sent again on a retry.
    pub(crate) fn start(request: Request<B>, inner: &mut S, shared: Arc<Shared>) -> Self {
        let headers = request.headers();
        let is_grpc = grpc::is_grpc(request.method(), headers);
        let inbound = is_grpc.then(|| grpc::inbound_timeout(headers)).flatten();
        let mut clock = Clock::new(shared.deadline, inbound, shared.attempt_timeout);
        if is_grpc {
            // The caller's deadline runs from when it sent the request, and the
            // upstream must be told what is left of it: start the clock now.
            clock.times_mut().start(Instant::now());
        }
        let retry = &shared.retry;
        // A body is kept to be sent again when it may be: on a retry, or as a hedge.
        let resendable = retry.enabled() || shared.hedge.is_some();
        let plan = Plan::for_body(request.body(), resendable, retry.max_replay_body);
        let cap = retry.max_replay_body;
        let (parts, body) = request.into_parts();
        let mut call = Call::new(shared, &parts, is_grpc);
        let sent = match plan {
            Plan::Stream => call.send_streamed(inner, parts, body, clock.times_mut()),
            Plan::Empty => call.send_empty(inner, parts, body, clock.times_mut()),
            Plan::Buffer(mode) => {
                let clone = inner.clone();
                let service = std::mem::replace(inner, clone);
                let buffering = Buffering::new(parts, body, service, mode, cap);
                let state = State::Buffering { buffering };
                return ResponseFuture { state, clock, call };
            }
        };
        let state = match sent {
            Ok(future) => State::calling(future),
            Err(rejection) => State::Rejected {
                rejection: Some(rejection),
            },
        };
        ResponseFuture { state, clock, call }
    }

    /// Answers a request for which the inner service failed to become ready.
    pub(crate) fn not_ready(request: Request<B>, shared: Arc<Shared>, error: BoxError) -> Self {
        let (parts, _body) = request.into_parts();
        let clock = Clock::new(shared.deadline, None, shared.attempt_timeout);
        let is_grpc = grpc::is_grpc(&parts.method, &parts.headers);
        let mut call = Call::new(shared, &parts, is_grpc);
        let rejection = Some(call.not_ready(&parts, error));
        let state = State::Rejected { rejection };
        ResponseFuture { state, clock, call }
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let call = this.call;
        loop {
            let attempted = match this.state.as_mut().project() {
                StateProj::Buffering { buffering } => {
                    let sending = match buffering.poll(cx) {
                        Poll::Ready(buffered) => call.send_buffered(buffered, this.clock.as_mut()),
                        Poll::Pending => {
                            // Reading the body is bounded by the deadline: a
                            // client that stops sending holds nothing past it.
                            ready!(this.clock.as_mut().poll_deadline(cx));
                            let started = this.clock.as_mut().times().started();
                            Sending::Answer(call.body_timed_out(buffering.parts(), started))
                        }
                    };
                    match sending {
                        Sending::Sent(future) => {
                            this.state.set(State::calling(future));
                            continue;
                        }
                        Sending::Failed(attempted) => attempted,
                        Sending::Answer(response) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                    }
                }
                StateProj::Calling { mut future, flight } => {
                    if call.is_hedged() {
                        ready!(call.poll_hedged(future, flight, this.clock.as_mut(), cx))
                    } else {
                        let Some(future) = future.as_mut().as_pin_mut() else {
                            // Only a hedged round ends its first attempt early.
                            return Poll::Pending;
                        };
                        ready!(call.poll_attempt(future, this.clock.as_mut(), cx))
                    }
                }
                StateProj::Backoff => {
                    ready!(this.clock.as_mut().poll_timer(cx));
                    this.state.set(State::Readying);
                    continue;
                }
                StateProj::Readying => match ready!(call.poll_resend(this.clock.as_mut(), cx)) {
                    Sending::Sent(future) => {
                        this.state.set(State::calling(future));
                        continue;
                    }
                    Sending::Failed(attempted) => attempted,
                    Sending::Answer(response) => {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                },
                StateProj::Rejected { rejection } => {
                    let Some(rejection) = rejection.take() else {
                        return Poll::Pending;
                    };
                    this.state.set(State::Done);
                    let started = this.clock.as_mut().times().started();
                    return Poll::Ready(Ok(call.reject(rejection, started)));
                }
                StateProj::Done => return Poll::Pending,
            };
            match call.after_attempt(attempted, this.clock.as_mut()) {
                Some(response) => {
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                None => this.state.set(State::Backoff),
            }
        }
    }
}
