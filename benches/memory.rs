//! Resident memory of a guard under sustained failure, printed as a markdown
//! table: does it stay flat?
//!
//! One guard (`UpstreamGuardLayer::new()`: retries with a budget, per-authority
//! breakers in a registry of at most 1024 keys) in front of an upstream that
//! always fails, half the calls with `503` and half with an `io::Error` of kind
//! `ConnectionRefused`. `TASKS` tasks on a 2-thread tokio runtime send GETs to
//! `http://host-{k}.test/` over `KEYS` (100,000) distinct authorities, `BURST`
//! requests per authority in a row (enough to trip its breaker, so the run mixes
//! upstream failures, retries, trips, open-circuit rejections and registry
//! evictions), and read every response body to its end.
//!
//! Every `--interval` seconds (default 5) it samples `VmRSS` (and `VmHWM`, the
//! peak) from `/proc/self/status`, the heap bytes live (a counting global
//! allocator), the requests answered so far, and the registry's key count.
//!
//! Run: `cargo bench --bench memory` (60 s), or shorter:
//! `cargo bench --bench memory -- --seconds 20`, or `MEMORY_SECONDS=20`. A filter
//! argument that does not match "memory" (`cargo bench -- get`) skips it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use upstream_guard::{RequestBody, UpstreamGuardLayer};

/// Heap bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);

/// Counts live heap bytes; forwards everything to `System`.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged,
// so `System`'s guarantees are ours; counting touches only an atomic and never
// allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Distinct upstream authorities.
const KEYS: u64 = 100_000;
/// Requests in a row to one authority: more than the 5 consecutive failures that
/// trip its breaker by default.
const BURST: u64 = 8;
/// Concurrent request loops.
const TASKS: usize = 256;

type Body = Full<Bytes>;

/// Outcome counters.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    /// Answers by status class: 502, 503, 504, other.
    s502: AtomicU64,
    s503: AtomicU64,
    s504: AtomicU64,
    other: AtomicU64,
    /// Upstream calls (attempts).
    upstream_calls: AtomicU64,
}

/// The failing upstream: 503 and connection refused, alternating per call.
fn failing(
    tally: Arc<Tally>,
) -> impl Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = std::io::Error,
    Future = Ready<Result<Response<Body>, std::io::Error>>,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_request: Request<RequestBody<Body>>| {
        let n = tally.upstream_calls.fetch_add(1, Ordering::Relaxed);
        ready(if n % 2 == 0 {
            let mut response = Response::new(Full::new(Bytes::from_static(b"unavailable")));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok(response)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))
        })
    })
}

/// `VmRSS` and `VmHWM` in kB.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `--NAME N` from the arguments, else the environment variable `ENV`, else
/// `default`.
fn setting(name: &str, env: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    let flag = format!("--{name}");
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .or_else(|| std::env::var(env).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

struct Sample {
    at: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    live: i64,
    requests: u64,
    keys: usize,
    open: usize,
}

/// Whether a filter argument (as `cargo bench -- FILTER` passes to every bench
/// binary) leaves this benchmark out.
fn filtered_out() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Positional arguments: not flags, and not the value of a flag that takes one.
    let takes_value =
        |i: usize| i > 0 && matches!(args[i - 1].as_str(), "--seconds" | "--interval");
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|&(i, a)| !a.starts_with('-') && !takes_value(i))
        .map(|(_, a)| a)
        .collect();
    !positional.is_empty() && !positional.iter().any(|f| "memory".contains(f.as_str()))
}

fn main() {
    if filtered_out() {
        return;
    }
    let seconds = setting("seconds", "MEMORY_SECONDS", 60).max(1);
    let interval = setting("interval", "MEMORY_INTERVAL", 5).clamp(1, seconds);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let tally = Arc::new(Tally::default());
    let layer = UpstreamGuardLayer::new();
    let handle = layer.breaker_handle().expect("a breaker is on by default");
    let svc = tower::Layer::layer(&layer, failing(tally.clone()));
    let next_request = Arc::new(AtomicU64::new(0));

    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let sample = |at: Duration| {
        let (rss_kb, hwm_kb) = rss_kb();
        let snapshots = handle.snapshots();
        Sample {
            at,
            rss_kb,
            hwm_kb,
            live: LIVE.load(Ordering::Relaxed),
            requests: tally.requests.load(Ordering::Relaxed),
            keys: snapshots.len(),
            open: snapshots
                .iter()
                .filter(|(_, s)| s.state != upstream_guard::CircuitState::Closed)
                .count(),
        }
    };
    let mut samples = vec![sample(Duration::ZERO)];

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut svc = svc.clone();
            let tally = tally.clone();
            let next_request = next_request.clone();
            rt.spawn(async move {
                // Bounded by the run's end (each call is bounded by the guard's
                // 15 s deadline; the upstream answers at once).
                while Instant::now() < stop_at {
                    let n = next_request.fetch_add(1, Ordering::Relaxed);
                    let key = (n / BURST) % KEYS;
                    let request = Request::get(format!("http://host-{key}.test/v1/items/42"))
                        .header("accept", "application/json")
                        .header("x-request-id", format!("req-{n}"))
                        .body(Full::new(Bytes::new()))
                        .expect("valid request");
                    let Ok(ready) = svc.ready().await;
                    let Ok(response) = ready.call(request).await;
                    let counter = match response.status().as_u16() {
                        502 => &tally.s502,
                        503 => &tally.s503,
                        504 => &tally.s504,
                        _ => &tally.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = response.into_body().collect().await;
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut k = 1;
    while k * interval <= seconds {
        let at = started + Duration::from_secs(k * interval);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        samples.push(sample(at - started));
        k += 1;
    }
    rt.block_on(async {
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    });
    drop(svc);
    let took = started.elapsed();

    println!("## Memory under sustained failure\n");
    println!(
        "`UpstreamGuardLayer::new()` over an upstream failing every call (503 and \
         connection refused, alternating); {TASKS} tasks on 2 threads; GETs over {KEYS} \
         authorities, {BURST} in a row each; sampled every {interval} s for {seconds} s."
    );
    println!();
    println!(
        "| t | VmRSS | VmHWM (peak) | heap live | requests answered | requests/s since last \
         | keys in registry | breakers not closed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut last: Option<&Sample> = None;
    for s in &samples {
        let rate = last.map_or(String::from("–"), |l| {
            let dt = (s.at - l.at).as_secs_f64().max(1e-9);
            format!("{:.0}", (s.requests - l.requests) as f64 / dt)
        });
        println!(
            "| {} s | {:.1} MiB | {:.1} MiB | {:.2} MiB | {} | {} | {} | {} |",
            s.at.as_secs(),
            s.rss_kb as f64 / 1024.0,
            s.hwm_kb as f64 / 1024.0,
            s.live as f64 / (1024.0 * 1024.0),
            s.requests,
            rate,
            s.keys,
            s.open,
        );
        last = Some(s);
    }

    let requests = tally.requests.load(Ordering::Relaxed);
    let calls = tally.upstream_calls.load(Ordering::Relaxed);
    println!();
    println!(
        "{requests} requests in {:.1} s ({} distinct authorities used), {calls} upstream \
         calls ({:.2} per request); answers: 502 {}, 503 {}, 504 {}, other {}.",
        took.as_secs_f64(),
        (next_request.load(Ordering::Relaxed) / BURST).min(KEYS),
        calls as f64 / requests.max(1) as f64,
        tally.s502.load(Ordering::Relaxed),
        tally.s503.load(Ordering::Relaxed),
        tally.s504.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    // Flatness: from the first sample after start-up to the last.
    if let (Some(first), Some(end)) = (samples.get(1), samples.last()) {
        let after = &samples[1..];
        let min = after.iter().map(|s| s.rss_kb).min().unwrap_or(0);
        let max = after.iter().map(|s| s.rss_kb).max().unwrap_or(0);
        println!(
            "VmRSS from {} s to {} s: {:+.2} MiB (min {:.1} MiB, max {:.1} MiB); heap live: \
             {:+.3} MiB.",
            first.at.as_secs(),
            end.at.as_secs(),
            (end.rss_kb as f64 - first.rss_kb as f64) / 1024.0,
            min as f64 / 1024.0,
            max as f64 / 1024.0,
            (end.live - first.live) as f64 / (1024.0 * 1024.0),
        );
    }
}
