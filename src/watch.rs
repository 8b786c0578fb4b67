//! [`SendWatch`]: how far the caller got in sending a body that streams
//! through, shared between that body and the request's response future.
//!
//! A failed attempt is blamed on whoever caused it: an attempt that timed out
//! while the caller was still sending its body is the caller's doing, not the
//! upstream's (see the crate docs, "Who pays for a failure"). The body lives
//! in the inner service (hyper's connection task, say) and the future in the
//! caller's task, so the two share one small cell. Cells are recycled through
//! a small per-thread pool once both ends are gone, so in the steady state a
//! streamed request allocates nothing.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// How far the caller got in sending a streamed request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendState {
    /// Still arriving.
    Sending,
    /// Sent to the end.
    Sent,
    /// The caller's body failed (it broke its length, or the caller went away).
    Failed,
}

/// One end of a shared [`SendState`].
#[derive(Clone, Debug)]
pub(crate) struct SendWatch(Option<Arc<AtomicU8>>);

impl SendWatch {
    /// A watch on a body that has not started arriving.
    pub(crate) fn new() -> SendWatch {
        let cell = pool::take().unwrap_or_default();
        cell.store(SendState::Sending as u8, Ordering::Release);
        SendWatch(Some(cell))
    }

    pub(crate) fn set(&self, state: SendState) {
        if let Some(cell) = &self.0 {
            cell.store(state as u8, Ordering::Release);
        }
    }

    pub(crate) fn state(&self) -> SendState {
        match self.0.as_ref().map(|cell| cell.load(Ordering::Acquire)) {
            Some(x) if x == SendState::Sent as u8 => SendState::Sent,
            Some(x) if x == SendState::Failed as u8 => SendState::Failed,
            _ => SendState::Sending,
        }
    }
}

impl Drop for SendWatch {
    /// The last end gives the cell back to this thread's pool. No `Weak` is
    /// ever made, so a strong count of one means nobody else can see it.
    fn drop(&mut self) {
        if let Some(cell) = self.0.take() {
            if Arc::strong_count(&cell) == 1 {
                pool::recycle(cell);
            }
        }
    }
}

/// Recycled cells, per thread: no lock, bounded.
mod pool {
    use super::*;

    /// Cells kept per thread.
    const MAX_CELLS: usize = 64;

    thread_local! {
        static POOL: RefCell<Vec<Arc<AtomicU8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Option<Arc<AtomicU8>> {
        POOL.try_with(|pool| pool.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
    }

    pub(super) fn recycle(cell: Arc<AtomicU8>) {
        // During thread teardown the pool may be gone: then the cell just drops.
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.len() < MAX_CELLS {
                    pool.push(cell);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell_of(watch: &SendWatch) -> *const AtomicU8 {
        Arc::as_ptr(watch.0.as_ref().unwrap())
    }

    #[test]
    fn both_ends_see_the_state() {
        let future_end = SendWatch::new();
        let body_end = future_end.clone();
        assert_eq!(future_end.state(), SendState::Sending);
        body_end.set(SendState::Failed);
        assert_eq!(future_end.state(), SendState::Failed);
    }

    #[test]
    fn a_cell_is_reused_once_both_ends_are_gone_and_starts_over() {
        let first = SendWatch::new();
        let cell = cell_of(&first);
        let other_end = first.clone();
        other_end.set(SendState::Sent);
        drop(first);
        drop(other_end);
        let next = SendWatch::new();
        assert_eq!(cell_of(&next), cell, "the cell came back from the pool");
        assert_eq!(next.state(), SendState::Sending);
    }

    #[test]
    fn a_cell_still_held_by_one_end_is_not_reused() {
        let first = SendWatch::new();
        let cell = cell_of(&first);
        let body_end = first.clone();
        drop(first);
        let next = SendWatch::new();
        assert_ne!(cell_of(&next), cell);
        drop(body_end);
    }
}
