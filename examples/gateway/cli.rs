//! The command line, through clap: which mode, and the guard's settings.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use crate::guard::{
    GuardSettings, DEFAULT_ATTEMPT_TIMEOUT_MS, DEFAULT_DEADLINE_MS, DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_OPEN_MS,
};

/// The gateway's command line. Each field's doc comment is its `--help` line.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    about = ABOUT,
    long_about = None,
    override_usage = "gateway [OPTIONS]\n       \
                      gateway --listen <ADDR> --upstream <URL>... [--no-guard] [OPTIONS]",
    after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=upstream_guard=debug) for more."
)]
pub struct Cli {
    /// Address to serve on, e.g. 127.0.0.1:8080 (port 0 picks one)
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Option<SocketAddr>,

    /// Upstream to proxy to, http only, e.g. http://127.0.0.1:3000; repeat it for
    /// replicas of one upstream (each behind its own circuit breaker)
    #[arg(long, value_name = "URL", requires = "listen", value_parser = parse_upstream)]
    upstream: Vec<Authority>,

    /// Per-attempt timeout for response headers
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ATTEMPT_TIMEOUT_MS)]
    attempt_timeout_ms: u64,

    /// Deadline for the whole request, retries included
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DEADLINE_MS)]
    deadline_ms: u64,

    /// Attempts per request, the first included (1 = no retries)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,

    /// Circuit breaker: failures in a row that open it
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FAILURE_THRESHOLD)]
    failure_threshold: u32,

    /// Circuit breaker: how long it stays open before a probe
    #[arg(long, value_name = "N", default_value_t = DEFAULT_OPEN_MS)]
    open_ms: u64,

    /// Hedging: send another attempt of a GET (or any request safe to resend)
    /// when one has had no answer for N ms (0 or absent: no hedging)
    #[arg(long, value_name = "N", default_value_t = 0)]
    hedge_after_ms: u64,

    /// Adaptive concurrency limit per upstream, with the latency TOLERANCE it
    /// allows over the upstream's baseline (default 0.2): requests over the
    /// limit get a fast 503 with Retry-After (off when absent)
    #[arg(
        long,
        value_name = "TOLERANCE",
        num_args = 0..=1,
        default_missing_value = "0.2",
        conflicts_with = "concurrency_limit"
    )]
    adaptive_concurrency: Option<f64>,

    /// Fixed concurrency limit per upstream (off when absent)
    #[arg(long, value_name = "N")]
    concurrency_limit: Option<u32>,

    /// Proxy mode only: the same proxy without the guard, for side-by-side benchmarks
    /// (a failed upstream call is a plain 502; guard flags are still checked)
    #[arg(long, requires = "listen")]
    no_guard: bool,
}

/// What `--help` says first.
const ABOUT: &str = "\
A guarded reverse proxy: hyper -> UpstreamGuardLayer -> hyper-util client.

Without --listen/--upstream, runs a self-contained demo (about 10 s): a fault-injecting
upstream, a guarded gateway in front of it, and a few hundred requests through it.
With them, runs the guarded reverse proxy in front of URL until Ctrl-C.";

/// Everything the command line asks for.
#[derive(Debug)]
pub struct Options {
    pub mode: Mode,
    pub guard: GuardSettings,
}

#[derive(Debug)]
pub enum Mode {
    Demo,
    Proxy {
        listen: SocketAddr,
        /// One upstream, or replicas of one (at least one).
        upstreams: Vec<Authority>,
        guarded: bool,
    },
}

impl Cli {
    pub fn options(self) -> Options {
        let guard = GuardSettings {
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
            deadline: Duration::from_millis(self.deadline_ms),
            max_attempts: self.max_attempts,
            failure_threshold: self.failure_threshold,
            open_for: Duration::from_millis(self.open_ms),
            hedge_after: (self.hedge_after_ms > 0)
                .then(|| Duration::from_millis(self.hedge_after_ms)),
            adaptive_concurrency: self.adaptive_concurrency,
            concurrency_limit: self.concurrency_limit,
        };
        // clap's `requires` makes `--listen` and `--upstream` come together.
        let mode = match self.listen {
            Some(listen) if !self.upstream.is_empty() => Mode::Proxy {
                listen,
                upstreams: self.upstream,
                guarded: !self.no_guard,
            },
            _ => Mode::Demo,
        };
        Options { mode, guard }
    }
}

/// Accepts `http://host:port` (a trailing `/` is fine) and returns its authority.
fn parse_upstream(value: &str) -> Result<Authority, String> {
    let uri: Uri = value
        .parse()
        .map_err(|_| "expected a URL like http://127.0.0.1:3000".to_owned())?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err("only http:// upstreams are supported".into());
    }
    if !matches!(
        uri.path_and_query().map(PathAndQuery::as_str),
        None | Some("/")
    ) {
        return Err("must not have a path or query; requests keep their own".into());
    }
    uri.authority()
        .cloned()
        .ok_or_else(|| "missing host".to_owned())
}
