//! A panicking inner service, caught: in a server placement the inner service
//! is a handler, and a panic unwinding out of the guard would reset the
//! caller's stream (or kill the connection) with no answer at all. Caught, it
//! becomes an attempt that failed with [`FailureKind::Panic`]: a `500`
//! problem+json, or `grpc-status` 13 for gRPC, as tower-http's `CatchPanic`
//! answers.
//!
//! Catching costs nothing until something panics: no allocation, no extra
//! state, only the unwinding tables. A build with `panic = "abort"` has
//! nothing to catch.
//!
//! [`FailureKind::Panic`]: crate::FailureKind::Panic

use std::any::Any;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::BoxError;

/// Polls `future`; a panic is caught and returned as the error.
///
/// `AssertUnwindSafe`: the future is never polled again after it panicked
/// (the attempt is over and its future dropped), so no broken invariant of
/// it can be observed.
pub(crate) fn poll<F: Future>(
    future: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Result<Poll<F::Output>, BoxError> {
    catch_unwind(AssertUnwindSafe(|| future.poll(cx)))
        .map_err(|payload| Box::new(Panicked::from_payload(payload)) as BoxError)
}

/// The error of a caught panic: its message, when it had a printable one.
/// It reaches the caller's body only with `expose_error_details`.
#[derive(Debug)]
pub(crate) struct Panicked {
    message: Option<String>,
}

impl Panicked {
    /// The message of a `panic!("...")` is a `&'static str` or a `String`;
    /// any other payload has none to show.
    fn from_payload(payload: Box<dyn Any + Send>) -> Panicked {
        let message = match payload.downcast::<String>() {
            Ok(message) => Some(*message),
            Err(payload) => payload.downcast_ref::<&str>().map(|s| s.to_string()),
        };
        Panicked { message }
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(message) => write!(f, "the inner service panicked: {message}"),
            None => f.write_str("the inner service panicked"),
        }
    }
}

impl Error for Panicked {}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once<F: Future>(future: F) -> Result<Poll<F::Output>, BoxError> {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        poll(future.as_mut(), &mut cx)
    }

    #[test]
    fn a_future_that_does_not_panic_is_polled_as_it_is() {
        let polled = poll_once(async { 7 }).expect("no panic");
        assert_eq!(polled, Poll::Ready(7));
    }

    #[test]
    fn a_panic_becomes_an_error_that_keeps_its_message() {
        let error = poll_once(async { panic!("handler bug {}", 42) }).expect_err("a panic");
        assert_eq!(
            error.to_string(),
            "the inner service panicked: handler bug 42"
        );
    }

    #[test]
    fn a_panic_with_a_static_message_keeps_it_too() {
        let error = poll_once(async { panic!("plain") }).expect_err("a panic");
        assert_eq!(error.to_string(), "the inner service panicked: plain");
    }
}
