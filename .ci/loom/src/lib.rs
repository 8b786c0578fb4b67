//! The circuit breaker's lock-free state machine, and the registry slot word that
//! ties in-flight counts to the key holding the slot, compiled against loom's
//! atomics so `model.rs` can check them under every interleaving loom explores.
#![allow(dead_code, unreachable_pub)]

#[path = "../../../src/breaker/sync.rs"]
mod sync;

#[path = "../../../src/breaker/window.rs"]
mod window;

#[path = "../../../src/breaker/state.rs"]
mod state;

#[path = "../../../src/breaker/tenancy.rs"]
mod tenancy;

#[cfg(test)]
mod model;
