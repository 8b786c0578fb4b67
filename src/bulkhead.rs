//! The concurrency cap's permit, carried by the response body.
//!
//! A permit stands for work the upstream is doing for one request. That work
//! does not end with the response headers: a streamed body keeps the upstream
//! (and the connection to it) busy until its last frame. So the permit moves
//! from the response future into the [`ResponseBody`](crate::ResponseBody), and
//! is given back when the body ends, fails, idles out, or is dropped — whichever
//! comes first, and exactly once.

use std::fmt;
use std::sync::Arc;

use crate::breaker::Ticket;
use crate::shared::Shared;

/// A held concurrency permit (and anything else the ticket still holds).
/// Dropping it gives everything back.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    ticket: Ticket,
}

impl Permit {
    /// Takes over a request's ticket; it is released when the permit drops.
    pub(crate) fn new(shared: Arc<Shared>, ticket: Ticket) -> Permit {
        Permit { shared, ticket }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breakers) = &self.shared.breakers {
            breakers.release(&mut self.ticket);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("target", &self.ticket.target)
            .finish()
    }
}
