//! [`Flight`]: the hedges of one request still waiting for an answer.
//!
//! The request's first attempt of each round stays pinned in the response
//! future, where it costs no allocation; only a hedge, sent while that attempt
//! is out, is boxed here. A request that is never hedged never allocates.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tracing::Span;

use crate::bulkhead::Permit;
use crate::failure::FailureKind;
use crate::BoxError;

/// A hedge in flight.
pub(crate) struct InFlight<F> {
    pub(crate) future: Pin<Box<F>>,
    /// Its attempt number.
    pub(crate) number: u32,
    pub(crate) started: Instant,
    /// Its own span (the attempt span, marked as a hedge).
    pub(crate) span: Span,
    /// Which of our timeouts the `grpc-timeout` it was sent with stands for.
    pub(crate) grpc_timeout_kind: FailureKind,
    /// Its place under the upstream's concurrency limit, if there is one.
    pub(crate) permit: Option<Permit>,
}

impl<F: Future> InFlight<F> {
    /// Polls the attempt inside its span; a panic in it is caught (see
    /// [`crate::panic`]) and comes back as the error.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<F::Output, BoxError>> {
        let future = self.future.as_mut();
        let polled = if self.span.is_disabled() {
            crate::panic::poll(future, cx)
        } else {
            self.span.in_scope(|| crate::panic::poll(future, cx))
        };
        match polled {
            Ok(polled) => polled.map(Ok),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The hedges of one request in flight.
pub(crate) struct Flight<F> {
    hedges: Vec<InFlight<F>>,
}

impl<F> Default for Flight<F> {
    fn default() -> Self {
        Flight { hedges: Vec::new() }
    }
}

impl<F> Flight<F> {
    pub(crate) fn push(&mut self, hedge: InFlight<F>) {
        self.hedges.push(hedge);
    }

    pub(crate) fn len(&self) -> usize {
        self.hedges.len()
    }

    /// Drops every hedge in flight (their connections close with them).
    pub(crate) fn clear(&mut self) {
        self.hedges.clear();
    }

    /// The first hedge to answer, taken out of the flight, with its answer.
    pub(crate) fn poll_next<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut InFlight<F>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<(InFlight<F>, T)> {
        for i in 0..self.hedges.len() {
            if let Poll::Ready(output) = poll(&mut self.hedges[i], cx) {
                return Poll::Ready((self.hedges.swap_remove(i), output));
            }
        }
        Poll::Pending
    }

    /// When the oldest hedge's time runs out.
    pub(crate) fn first_end(&self, timeout: Duration) -> Option<Instant> {
        let oldest = self.hedges.iter().map(|h| h.started).min()?;
        Some(crate::clock::later(oldest, timeout))
    }

    /// A hedge whose time ran out by `now`, taken out of the flight.
    pub(crate) fn take_expired(&mut self, now: Instant, timeout: Duration) -> Option<InFlight<F>> {
        let i =
            (self.hedges.iter()).position(|h| crate::clock::later(h.started, timeout) <= now)?;
        Some(self.hedges.swap_remove(i))
    }
}
