//! Atomics for the breaker: std's normally, loom's when model-checked by the
//! `.ci/loom` crate (which sets `cfg(upstream_guard_loom)`).

#[cfg(upstream_guard_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(upstream_guard_loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
