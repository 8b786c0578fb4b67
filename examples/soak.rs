//! Soak: mixed upstream faults through a guarded axum gateway for minutes, with
//! a report every 10 s. Not run in CI (the `tests/load.rs` suite is its short
//! version); run it by hand before a release or after touching the attempt loop.
//!
//! ```text
//! cargo run --release --example soak                  # 3 minutes
//! cargo run --example soak -- --seconds 60 --in-flight 128 --seed 42
//! ```
//!
//! It starts the fault upstream of `tests/support/upstream.rs` and the gateway
//! of `tests/support/gateway.rs` (an axum router whose fallback forwards through
//! the guard and a hyper-util client), all on 127.0.0.1, and keeps `--in-flight`
//! callers (default 64) sending random calls: healthy, slow, hanging, resetting,
//! truncating, garbage-speaking, flaky, refused, gRPC, with and without bodies.
//! Every answer is checked as in `tests/chaos.rs` (allowed status for its fault,
//! problem+json well formed, within its time bound).
//!
//! Every 10 s it prints one line: requests (total and rate), resident memory,
//! open file descriptors, live tokio tasks, open connections (caller → gateway
//! and gateway → upstream), retries, invariant violations, and the status mix
//! of that interval. At the end it stops everything and prints what is left:
//! a steady RSS, and fds and tasks back at their starting values, mean nothing
//! leaks.
//!
//! The fault upstream records every request it receives, which would grow
//! forever; so every interval the gateway is switched to a fresh upstream (the
//! previous one is kept until its requests are over), like a redeploy.
//!
//! Flags: `--seconds N` (default 180), `--in-flight N` (default 64),
//! `--seed N` (default: from the clock; printed).

#[path = "../tests/support/gateway.rs"]
mod gateway;
#[path = "../tests/support/process.rs"]
mod process;
#[path = "../tests/support/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gateway::{
    caller, check, exchange, hard_bound, random_call, Counters, Gateway, Limits, KEY_HEADER,
};
use process::{mib, open_fds, rss_bytes, settle};
use upstream::{refused_addr, Upstream};
use upstream_guard::BreakerPolicy;

const INTERVAL: Duration = Duration::from_secs(10);

struct Options {
    seconds: u64,
    in_flight: usize,
    seed: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        seconds: 180,
        in_flight: 64,
        seed: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("`{flag}` needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("expected a whole number, got `{v}`"))
        };
        match flag.as_str() {
            "--seconds" => options.seconds = number(value()?)?,
            "--in-flight" => options.in_flight = number(value()?)?.max(1) as usize,
            "--seed" => options.seed = number(value()?)?,
            "-h" | "--help" => {
                return Err("usage: soak [--seconds N] [--in-flight N] [--seed N]".into())
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

fn limits() -> Limits {
    Limits {
        attempt_timeout: Duration::from_millis(400),
        deadline: Duration::from_millis(1500),
        idle_timeout: Duration::from_millis(400),
        max_attempts: 3,
        slack: Duration::from_secs(3),
        breaker: true,
        budget_may_deny: true,
        max_replay_body: 64 * 1024,
        circuit_open: false,
    }
}

/// What the callers saw, per interval and in total.
#[derive(Default)]
struct Seen {
    interval: BTreeMap<String, u64>,
    total: BTreeMap<String, u64>,
    violations: u64,
    examples: Vec<String>,
}

fn tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

fn fds() -> String {
    open_fds().map_or_else(|| "n/a".into(), |n| n.to_string())
}

fn rss() -> String {
    rss_bytes().map_or_else(|| "n/a".into(), |b| format!("{:.1} MiB", mib(b)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if open_fds().is_none() {
        eprintln!("note: /proc/self is not available; fds and RSS are not reported");
    }
    let start_fds = fds();
    let start_rss = rss();
    let start_tasks = tasks();
    println!(
        "soak: {} s, {} in flight, seed {} | start: rss {start_rss}, fds {start_fds}, tasks {start_tasks}",
        options.seconds, options.in_flight, options.seed
    );

    let limits = limits();
    let counters = Counters::default();
    let layer = limits
        .builder()
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(20)
                .open_for(Duration::from_millis(300))
                .max_open_for(Duration::from_millis(600))
                .per_key(|parts| parts.headers.get(KEY_HEADER)?.to_str().ok()),
        )
        .observer(counters.clone())
        .build()
        .expect("a valid soak configuration");
    let mut upstreams = vec![Upstream::start().await];
    let gateway = Arc::new(
        Gateway::start(
            &upstreams[0].authority(),
            &refused_addr().to_string(),
            layer,
        )
        .await,
    );
    let caller = caller();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let requests = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(options.seconds);

    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..options.in_flight {
        let (gateway, caller, seen, requests) = (
            gateway.clone(),
            caller.clone(),
            seen.clone(),
            requests.clone(),
        );
        let mut rng = fastrand::Rng::with_seed(options.seed.wrapping_add(worker as u64));
        workers.spawn(async move {
            while Instant::now() < end {
                let n = requests.fetch_add(1, Ordering::Relaxed);
                let call = random_call(&mut rng, format!("soak-{n}"), &limits);
                let bound = hard_bound(&call, &limits);
                let answer = exchange(&caller, call.request(&gateway), bound).await;
                let label = match &answer {
                    Ok(a) => a.label(),
                    Err(_) => "unanswered".to_string(),
                };
                let verdict = check(&call, &answer, &limits);
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                *seen.interval.entry(label.clone()).or_default() += 1;
                *seen.total.entry(label).or_default() += 1;
                if let Err(why) = verdict {
                    seen.violations += 1;
                    if seen.examples.len() < 10 {
                        seen.examples
                            .push(format!("{} {:?}: {why}", call.id, call.fault));
                    }
                }
            }
        });
    }

    let mut last = (0, Instant::now());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => Instant::now() >= end,
            _ = tokio::time::sleep_until(end.into()) => true,
        };
        let total = requests.load(Ordering::Relaxed);
        let (mix, violations) = {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut seen.interval), seen.violations)
        };
        let upstream_conns: usize = upstreams.iter().map(Upstream::open_connections).sum();
        let rate = (total - last.0) as f64 / last.1.elapsed().as_secs_f64().max(0.001);
        println!(
            "[{:>4}s] requests {total} (+{rate:.0}/s) | rss {} | fds {} | tasks {} | conns \
             caller→gw {} gw→upstream {} | attempts {} retries {} denied {} | violations \
             {violations}",
            started.elapsed().as_secs(),
            rss(),
            fds(),
            tasks(),
            gateway.open_connections(),
            upstream_conns,
            counters.attempts(),
            counters.retries(),
            counters.denied(),
        );
        println!("        mix {mix:?}");
        last = (total, Instant::now());
        if finished {
            break;
        }
        // Rotate the upstream; keep the previous one until its requests are over.
        let fresh = Upstream::start().await;
        gateway.set_upstream(&fresh.authority());
        upstreams.push(fresh);
        if upstreams.len() > 2 {
            upstreams.remove(0);
        }
    }

    while workers.join_next().await.is_some() {}
    let seen = Arc::try_unwrap(seen)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default();
    let total = requests.load(Ordering::Relaxed);
    println!(
        "done: {total} requests in {:.0} s ({:.0}/s), {} violations",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64(),
        seen.violations
    );
    println!("total mix {:?}", seen.total);
    for example in &seen.examples {
        println!("  violation: {example}");
    }

    // Stop everything and see what is left.
    drop(caller);
    let drained = settle(Duration::from_secs(10), || gateway.open_connections() == 0).await;
    drop(gateway);
    let closed = settle(Duration::from_secs(10), || {
        upstreams.iter().all(|u| u.open_connections() == 0)
    })
    .await;
    drop(upstreams);
    settle(Duration::from_secs(10), || tasks() <= start_tasks).await;
    println!(
        "after stopping: rss {} (start {start_rss}) | fds {} (start {start_fds}) | tasks {} \
         (start {start_tasks}) | caller connections drained: {drained} | upstream connections \
         closed: {closed}",
        rss(),
        fds(),
        tasks()
    );
    if seen.violations > 0 || !drained || !closed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
