//! [`EndpointFuture`]: one attempt on one replica, recorded by its breaker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::{EndpointTimeout, NoEndpoint, Set};
use crate::breaker::{Record, Ticket};
use crate::BoxError;

pin_project! {
    /// The response future of [`Endpoints`](super::Endpoints).
    pub struct EndpointFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, S::Future, R>,
        #[pin]
        timer: Option<Sleep>,
        hold: Option<Hold<S>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, R> {
        // Waiting for the replica's service to be ready.
        Readying { service: S, request: Option<R> },
        Calling { #[pin] future: F },
        // No replica admitted the attempt.
        Unavailable,
        Done,
    }
}

/// An attempt's hold on its replica: one in its load, and its breaker ticket.
/// Dropped without a record (the attempt was dropped), it records nothing and
/// gives back a half-open probe.
struct Hold<S> {
    set: Arc<Set<S>>,
    index: usize,
    ticket: Ticket,
}

impl<S> Hold<S> {
    /// Records the attempt's outcome on its replica's breaker.
    fn record(mut self, failure: bool) {
        let set = Arc::clone(&self.set);
        let record = Record {
            failure,
            slow: false,
        };
        if let Some(transition) = set.breakers.record(&mut self.ticket, record) {
            set.report(self.index, transition);
        }
    }
}

impl<S> Drop for Hold<S> {
    fn drop(&mut self) {
        self.set.breakers.release(&mut self.ticket);
        self.set.replicas[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> EndpointFuture<S, Request<B>>
where
    S: Service<Request<B>>,
{
    pub(super) fn new(
        set: Arc<Set<S>>,
        index: usize,
        ticket: Ticket,
        service: S,
        request: Request<B>,
    ) -> Self {
        set.replicas[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        let timer = set.attempt_timeout.map(tokio::time::sleep);
        EndpointFuture {
            state: State::Readying {
                service,
                request: Some(request),
            },
            timer,
            hold: Some(Hold { set, index, ticket }),
        }
    }

    pub(super) fn unavailable() -> Self {
        EndpointFuture {
            state: State::Unavailable,
            timer: None,
            hold: None,
        }
    }
}

impl<S, B, ResB> Future for EndpointFuture<S, Request<B>>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::Readying { service, request } => match service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let Some(request) = request.take() else {
                            // Taken only here, right before leaving this state.
                            this.state.set(State::Done);
                            continue;
                        };
                        let future = service.call(request);
                        this.state.set(State::Calling { future });
                        continue;
                    }
                    Poll::Ready(Err(error)) => Err(error.into()),
                    Poll::Pending => {
                        ready!(poll_timer(this.timer.as_mut(), cx));
                        Err(EndpointTimeout.into())
                    }
                },
                StateProj::Calling { future } => match future.poll(cx) {
                    Poll::Ready(Ok(response)) => Ok(response),
                    Poll::Ready(Err(error)) => Err(error.into()),
                    Poll::Pending => {
                        ready!(poll_timer(this.timer.as_mut(), cx));
                        Err(EndpointTimeout.into())
                    }
                },
                StateProj::Unavailable => {
                    this.state.set(State::Done);
                    return Poll::Ready(Err(NoEndpoint.into()));
                }
                StateProj::Done => return Poll::Pending,
            };
            this.state.set(State::Done);
            if let Some(hold) = this.hold.take() {
                let failure = match &result {
                    Ok(response) => {
                        let classifier = &hold.set.classifier;
                        let class =
                            classifier.classify_response(response.status(), response.headers());
                        class.is_failure()
                    }
                    Err(_) => true,
                };
                hold.record(failure);
            }
            return Poll::Ready(result);
        }
    }
}

/// Waits for the attempt timer, if there is one.
fn poll_timer(timer: Pin<&mut Option<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
    match timer.as_pin_mut() {
        Some(sleep) => sleep.poll(cx),
        None => Poll::Pending,
    }
}
