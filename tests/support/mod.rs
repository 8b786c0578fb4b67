//! Shared helpers for the integration tests.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod example_process;
pub mod guard;
pub mod observer;
pub mod spans;
pub mod upstream;
