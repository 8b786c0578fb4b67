//! The circuit breaker's lock-free state machine, compiled against loom's atomics
//! so `model.rs` can check it under every interleaving loom explores.
#![allow(dead_code, unreachable_pub)]

#[path = "../../../src/breaker/sync.rs"]
mod sync;

#[path = "../../../src/breaker/window.rs"]
mod window;

#[path = "../../../src/breaker/state.rs"]
mod state;

#[cfg(test)]
mod model;
