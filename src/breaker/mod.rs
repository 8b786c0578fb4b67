//! Circuit breaking: stop calling an upstream that keeps failing, answer at once
//! with `503` and `Retry-After`, and probe it again after a while.
//!
//! - **States**: closed (calls flow, failures are counted) → open (calls are
//!   rejected without touching the upstream) → half-open (a few probes go through;
//!   all succeed → closed, one fails → open again, for longer) → closed.
//! - **Trip policies**: consecutive failures (the default, 5); failure rate over a
//!   sliding time window with a minimum number of calls; slow-call rate. Any
//!   configured policy can trip the breaker. What counts as a failure comes from
//!   the [`Classify`](crate::Classify) implementation: by default transport errors,
//!   timeouts and 5xx.
//! - **Per key**: one breaker per upstream by default — per request authority
//!   (`host:port`) in front of a client, per matched route or gRPC service
//!   behind a server (see the crate docs, "Placements") — or per a key of your
//!   choosing, in a registry bounded by
//!   [`max_keys`](BreakerPolicy::max_keys). Requests without a key share one
//!   breaker.
//! - **Concurrency cap** ([`concurrency_limit`](BreakerPolicy::concurrency_limit)):
//!   at most N requests in flight per key; more get `503` at once. Or an
//!   [adaptive](BreakerPolicy::adaptive_concurrency) N per key that follows the
//!   upstream's latency (`crate::adaptive`). It is the bulkhead's
//!   (`crate::bulkhead`), a concept of its own that counts per breaker key, on
//!   the breakers' registry slots.
//! - **Operators** can force a breaker open, disable it, and read snapshots for
//!   health endpoints through a [`BreakerHandle`].
//!
//! The parts, one job each:
//!
//! | module | job |
//! |---|---|
//! | `policy` | [`BreakerPolicy`]: the configuration, its checks, how requests are keyed |
//! | `admission` | `Breakers`: a request's breaker, its admission, its outcome, its release |
//! | `handle` | [`BreakerHandle`] and [`BreakerMode`]: the operator's override |
//! | `snapshot` | [`BreakerSnapshot`]: one breaker's state, for health endpoints |
//! | `registry` | breakers by key, bounded, with CLOCK eviction |
//! | `recent` | each thread's recent key lookups, to skip the registry's map |
//! | `state` | one breaker's lock-free state machine |
//! | `window` | the sliding window of the rate policies |
//! | `tenancy` | which key holds a registry slot, and its requests in flight |
//! | `sync` | std's atomics, or loom's under the model checker |

mod admission;
mod handle;
mod policy;
mod recent;
mod registry;
mod snapshot;
mod state;
mod sync;
mod tenancy;
mod window;

pub use handle::{BreakerHandle, BreakerMode};
pub use policy::BreakerPolicy;
pub use snapshot::BreakerSnapshot;
pub use state::CircuitState;

pub(crate) use admission::{Admit, Breakers, Ticket};
pub(crate) use registry::Target;
pub(crate) use state::{Record, Transition};
pub(crate) use tenancy::Acquired;
