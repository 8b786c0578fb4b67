//! A guarded reverse proxy: a hyper server that forwards every request to an
//! upstream through a hyper-util client wrapped in
//! [`UpstreamGuardLayer`](upstream_guard::UpstreamGuardLayer).
//!
//! The guard gives each attempt a timeout, the whole request a deadline, retries
//! what is safe to retry (within a retry budget), stops calling an upstream that
//! keeps failing (circuit breaker), and turns every failure into a
//! `502`/`503`/`504` `application/problem+json` response, so the gateway never
//! hangs and never answers with an empty or broken response.
//!
//! # Demo mode
//!
//! ```text
//! cargo run --example gateway
//! ```
//!
//! Starts the fault-injecting upstream from `tests/support/upstream.rs` and a
//! guarded gateway in front of it (both on `127.0.0.1`), then sends a few hundred
//! requests through the gateway over real HTTP, spread over about eight seconds:
//!
//! | scenario    | upstream behaviour                   | what the guard does                         |
//! |-------------|--------------------------------------|---------------------------------------------|
//! | `healthy`   | `/ok` answers at once                | passes every `200` through                  |
//! | `slow`      | `/slow/{ms}`, below the timeout      | passes every `200` through                  |
//! | `hanging`   | `/hang` never answers                | `504` when time runs out; opens: `503`      |
//! | `resetting` | `/reset` resets the connection       | retries, `502`; opens: `503`                |
//! | `down`      | refused until halfway, then `200`    | `502`; opens: `503`; probes, closes: `200`  |
//! | `flaky`     | `/flaky/2/{key}`: two 503s, then 200 | retries until the `200` arrives             |
//!
//! It prints one row per scenario (responses per status, the guard's problem
//! types, attempts per request, p50/p99 latency), then the circuit breakers'
//! timeline: the `down` upstream starts listening halfway through (on the very
//! port that refused until then), and its breaker goes closed → open →
//! half-open → … → closed. It exits after about ten seconds.
//!
//! The report is meant for people, but it is also read by `tests/gateway_demo.rs`,
//! which checks the story above. Its cells are separated by at least two spaces
//! and never hold two spaces in a row (nor are they empty), so a line splits into
//! its cells on runs of two or more spaces: a scenario row into its eight
//! columns, with responses written `STATUS×COUNT` (`err×N`: no answer), and a
//! timeline line into time, breaker and event (`FROM → TO …`).
//!
//! # Proxy mode
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000
//! ```
//!
//! Runs the same guarded proxy until Ctrl-C (or SIGTERM). It prints
//! `listening on http://ADDR` once it accepts connections (port 0 picks a free
//! port). Run with `--help` for every flag; `RUST_LOG=upstream_guard=debug` logs
//! the guard's retries, with their request spans, on stderr.
//!
//! Replicas and hedging:
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:8080 \
//!     --upstream http://127.0.0.1:3001 --upstream http://127.0.0.1:3002 --hedge-after-ms 50
//! ```
//!
//! `--upstream` given more than once proxies to replicas of one upstream, with
//! [`Endpoints`](upstream_guard::endpoints::Endpoints) inside the guard: each
//! replica has its own circuit breaker (the same `--failure-threshold` and
//! `--open-ms`) and an attempt timeout a hair under the guard's, so one that
//! refuses or hangs is ejected while the other answers; retries go to a
//! replica the request has not tried. `--hedge-after-ms N` sends a second
//! attempt of a GET (or any request safe to resend) that has had no answer for
//! N ms, paid from the retry budget; the first answer wins. Requests carry the
//! first replica's name in `Host`.
//!
//! `--no-guard` runs the very same proxy without the layer (same client, same
//! connection settings, same header handling), for side-by-side benchmarks: a
//! failed upstream call is then the proxy's own plain-text `502`, and nothing
//! times out.
//!
//! Every request on its way through either proxy is rewritten by the helper the
//! repository's proxies share (`examples/common/proxy.rs`): the upstream's URI
//! and `Host`, hop-by-hop headers removed both ways, and the caller appended to
//! `X-Forwarded-For` and `Forwarded`.
//!
//! # Performance
//!
//! `benches/proxy_e2e.sh` runs the proxy, guarded and with `--no-guard`, side
//! by side with nginx and HAProxy in front of one upstream. For its speed, the
//! proxy is a plain hyper service, not an axum router: every request is
//! forwarded, so there is nothing to route, and the router's per-request
//! boxed bodies and futures and request extensions cost about a tenth of the
//! proxy's user-space instructions (more with the guard, whose copy of the
//! request for retries cloned those extensions too). Each connection
//! calls its own copy of the guard in place, and a process that may use one
//! CPU only runs a current-thread runtime (see `runtime()`).
//!
//! # Files
//!
//! `cli.rs` the command line, `guard.rs` the guard's settings, `server.rs` the
//! proxy and proxy mode, `demo.rs` the demo's scenarios, `load.rs` its load
//! generator, `stats.rs` what its guards report, `report.rs` what it prints.

#[path = "../../tests/support/upstream.rs"]
mod upstream;

#[path = "../common/proxy.rs"]
mod proxy;

mod cli;
mod demo;
mod guard;
mod load;
mod report;
mod server;
mod stats;

use std::fmt;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use upstream_guard::ConfigError;

use crate::cli::{Cli, Mode};

/// Why the program stops early; each maps to an exit code. (A bad command line
/// is clap's: exit code 2, with the usage.)
#[derive(Debug)]
pub enum Failure {
    /// A guard setting the builder rejected: exit code 2.
    Config(ConfigError),
    /// Anything that went wrong while running: exit code 1.
    Runtime(String),
}

impl Failure {
    pub fn runtime(what: &str, error: impl fmt::Display) -> Failure {
        Failure::Runtime(format!("{what}: {error}"))
    }

    fn report(&self) -> ExitCode {
        match self {
            Failure::Config(error) => {
                eprintln!("error: {error}");
                ExitCode::from(2)
            }
            Failure::Runtime(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure::Config(error)
    }
}

fn main() -> ExitCode {
    match runtime() {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => Failure::runtime("cannot start the tokio runtime", error).report(),
    }
}

/// A current-thread runtime when the process may run on one CPU only (as when
/// pinned with `taskset -c 0`), else a multi-threaded one. On one CPU the
/// multi-threaded scheduler's one worker buys nothing, and its cross-thread
/// machinery (shared queues, atomics, a separate I/O driver hand-off) costs
/// about 5-8 % of the proxy's requests per second.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

async fn run() -> ExitCode {
    let options = match Cli::try_parse() {
        Ok(cli) => cli.options(),
        // `--help` (exit code 0, on stdout) or a bad command line (2, on stderr).
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    if let Err(error) = options.guard.check() {
        return Failure::from(error).report();
    }
    // The demo prints its own circuit timeline; its breaker warnings would only
    // repeat it. Either way RUST_LOG decides.
    init_tracing(match options.mode {
        Mode::Demo => "error",
        Mode::Proxy { .. } => "warn",
    });
    let result = match options.mode {
        Mode::Demo => demo::run_demo(&options.guard).await,
        Mode::Proxy {
            listen,
            upstreams,
            guarded,
        } => server::run_proxy(&options.guard, listen, upstreams, guarded).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Logs and spans go to stderr, filtered by `RUST_LOG` (default: `default`).
fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}
