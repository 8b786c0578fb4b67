//! upstream-guard (work in progress)
#![forbid(unsafe_code)]
