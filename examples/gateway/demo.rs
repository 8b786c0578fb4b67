//! Demo mode: the fault upstream, a guarded gateway in front of it, the load
//! ([`crate::load`]), then the report ([`crate::report`]).

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use axum::http::uri::Authority;
use axum::http::Request;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use tower::Layer;

use crate::guard::{BreakerKeys, GuardSettings};
use crate::load::drive_load;
use crate::report::{print_circuit_timeline, print_intro, print_summary, ScenarioRow};
use crate::server::{upstream_client, Forwarder, Route, Routes, Server, UPSTREAM_SWITCH};
use crate::stats::{GuardStats, TimelineEvent};
use crate::upstream::{ReservedPort, Upstream};
use crate::Failure;

/// How long the demo spreads its requests over.
pub const DEMO_SPREAD: Duration = Duration::from_secs(8);
/// At most this many demo requests are in flight at once.
pub const DEMO_IN_FLIGHT: usize = 16;
/// The demo's retry budget: retries may be up to 100 % of requests (plus 10 per
/// second). Most demo traffic fails on purpose, and the production default of
/// 20 % would rightly stop retrying much of it; this lets every scenario show
/// its retries. Proxy mode keeps the default.
const DEMO_BUDGET_RATIO: f64 = 1.0;
const DEMO_BUDGET_MIN_PER_SECOND: u32 = 10;
/// The upstream name the switch header selects for the `down` scenario.
pub const DOWN: &str = "down";

/// When the `down` upstream comes back, as a share of [`DEMO_SPREAD`].
pub const DOWN_RECOVERS_AT: f64 = 0.5;

/// Runs the demo: upstream, gateway, load, summary, circuit timeline.
pub async fn run_demo(settings: &GuardSettings) -> Result<(), Failure> {
    let started = Instant::now();
    let stats = GuardStats::new(started);
    let upstream = Upstream::start().await;
    let down = ReservedPort::new();
    let down_addr = down.addr();
    let routes = demo_routes(settings, &stats, upstream.addr(), down_addr)?;
    let server = Server::start(loopback(0), routes).await?;
    let recovery = tokio::spawn(recover_down_upstream(down, stats.clone()));

    let plan = demo_plan();
    let write = |e| Failure::runtime("cannot write to stdout", e);
    print_intro(
        &mut io::stdout().lock(),
        settings,
        &upstream,
        down_addr,
        server.addr,
        plan.len(),
    )
    .map_err(write)?;
    let samples = drive_load(server.addr, plan, settings.deadline).await;
    server.stop().await?;
    recovery.abort();

    let rows: Vec<ScenarioRow> = Scenario::ALL
        .iter()
        .map(|&scenario| ScenarioRow::new(scenario, &samples, &upstream, &stats))
        .collect();
    let mut out = io::stdout().lock();
    print_summary(&mut out, &rows, &stats).map_err(write)?;
    print_circuit_timeline(&mut out, settings, &stats, down_addr).map_err(write)?;
    writeln!(out, "\ndone in {:.1} s", started.elapsed().as_secs_f64()).map_err(write)
}

/// The demo gateway's routes: the fault upstream by default, the refused port
/// when the switch header says `down`. Each upstream gets its own guard (and so
/// its own retry budget); both report to `stats`.
fn demo_routes(
    settings: &GuardSettings,
    stats: &GuardStats,
    fault_addr: SocketAddr,
    down_addr: SocketAddr,
) -> Result<Routes, Failure> {
    let retry = settings
        .retry()
        .budget(DEMO_BUDGET_RATIO, DEMO_BUDGET_MIN_PER_SECOND);
    let fault_layer = settings.layer(
        retry.clone(),
        BreakerKeys::PerRoute,
        "fault-upstream",
        stats.clone(),
    )?;
    let down_layer = settings.layer(retry, BreakerKeys::PerUpstream, DOWN, stats.clone())?;
    let client = upstream_client();
    let fault = Forwarder::Guarded(fault_layer.layer(client.clone()));
    let down = Forwarder::Guarded(down_layer.layer(client));
    Ok(Routes {
        default: Route::new(authority_of(fault_addr)?, fault)?,
        alternates: vec![(DOWN, Route::new(authority_of(down_addr)?, down)?)],
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn authority_of(addr: SocketAddr) -> Result<Authority, Failure> {
    Authority::try_from(addr.to_string()).map_err(|e| Failure::runtime("bad address", e))
}

/// One kind of traffic the demo sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Healthy,
    Slow,
    Hanging,
    Resetting,
    Down,
    Flaky,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Healthy,
        Scenario::Slow,
        Scenario::Hanging,
        Scenario::Resetting,
        Scenario::Down,
        Scenario::Flaky,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Slow => "slow",
            Scenario::Hanging => "hanging",
            Scenario::Resetting => "resetting",
            Scenario::Down => "down",
            Scenario::Flaky => "flaky",
        }
    }

    /// How many requests the demo sends. Few hanging ones: each takes a whole
    /// deadline.
    fn requests(self) -> usize {
        match self {
            Scenario::Healthy => 120,
            Scenario::Slow => 60,
            Scenario::Hanging => 10,
            Scenario::Resetting => 40,
            Scenario::Down => 40,
            Scenario::Flaky => 50,
        }
    }

    /// The upstream route, as shown in the summary.
    pub fn route(self) -> &'static str {
        match self {
            Scenario::Healthy => "/ok",
            Scenario::Slow => "/slow/{50..150}",
            Scenario::Hanging => "/hang",
            Scenario::Resetting => "/reset",
            Scenario::Down => "(refused, then up)",
            Scenario::Flaky => "/flaky/2/{key}",
        }
    }

    /// The path of the demo's `seq`-th request.
    fn path(self, seq: usize) -> String {
        match self {
            Scenario::Healthy => "/ok".into(),
            // 50..=150 ms: slow, yet well below the default 300 ms attempt
            // timeout even on a busy machine, so every one passes through.
            Scenario::Slow => format!("/slow/{}", 50 + (seq * 37) % 101),
            Scenario::Hanging => "/hang".into(),
            Scenario::Resetting => "/reset".into(),
            Scenario::Down => format!("/down/{seq}"),
            // A fresh key per request: each fails twice, then succeeds.
            Scenario::Flaky => format!("/flaky/2/demo-{seq}"),
        }
    }

    /// The prefix of this scenario's requests as the fault upstream records them;
    /// `None` when they never reach it (`down`: the guard counts its attempts).
    pub fn upstream_prefix(self) -> Option<&'static str> {
        match self {
            Scenario::Healthy => Some("/ok"),
            Scenario::Slow => Some("/slow/"),
            Scenario::Hanging => Some("/hang"),
            Scenario::Resetting => Some("/reset"),
            Scenario::Down => None,
            Scenario::Flaky => Some("/flaky/"),
        }
    }

    pub fn request(self, gateway: SocketAddr, seq: usize) -> Result<Request<Full<Bytes>>, String> {
        let mut request = Request::get(format!("http://{gateway}{}", self.path(seq)));
        if self == Scenario::Down {
            request = request.header(UPSTREAM_SWITCH, DOWN);
        }
        request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())
    }
}

/// The order of the demo's requests: each scenario's requests spread evenly over
/// the run, so the scenarios interleave as real traffic would.
fn demo_plan() -> Vec<Scenario> {
    let mut slots: Vec<(f64, Scenario)> = Scenario::ALL
        .iter()
        .flat_map(|&scenario| {
            let n = scenario.requests();
            (0..n).map(move |k| ((k as f64 + 0.5) / n as f64, scenario))
        })
        .collect();
    slots.sort_by(|a, b| a.0.total_cmp(&b.0));
    slots.into_iter().map(|(_, scenario)| scenario).collect()
}

/// Halfway through the demo, the `down` upstream comes back: its port, bound
/// but refusing until now, starts listening, so its circuit can be seen closing
/// again. Listening on the reserved socket (rather than binding the address
/// anew) cannot lose the port to anyone else, nor fail with "address in use".
async fn recover_down_upstream(down: ReservedPort, stats: GuardStats) {
    tokio::time::sleep(DEMO_SPREAD.mul_f64(DOWN_RECOVERS_AT)).await;
    let addr = down.addr();
    let listener = match down.listen() {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!("the down upstream cannot come back on {addr}: {error}");
            return;
        }
    };
    stats.note(TimelineEvent::Recovered);
    let app = Router::new().fallback(|| async { "back" });
    if let Err(error) = axum::serve(listener, app).await {
        tracing::warn!("the recovered upstream stopped: {error}");
    }
}
