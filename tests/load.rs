//! Load: thousands of concurrent requests with mixed faults through the guarded
//! axum gateway, then proof that nothing was left behind: every answer passed
//! the chaos checks (`support/gateway.rs`), and afterwards no tasks, no
//! connections (caller → gateway, gateway → upstream), no breaker permits, no
//! file descriptors and no memory beyond a generous bound are still held.
//!
//! The file-descriptor and memory checks read `/proc/self`; where it is missing
//! they are skipped with a note on stderr, and everything else still runs. The
//! tests here count process-wide resources, so they run one at a time.
//! `LOAD_SEED=<seed>` reruns a mix.

mod support;

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/process.rs"]
mod process;

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use gateway::{
    budget_bound, caller, random_call, run_checked, status_mix, verify_checked, Call, Counters,
    Fault, Gateway, Limits, Sent, KEY_HEADER, POOL_IDLE,
};
use process::{mib, open_fds, proc_available, rss_bytes, settle};
use support::upstream::{refused_addr, Upstream};
use upstream_guard::{BreakerHandle, BreakerPolicy};

/// Requests per run, and how many are in flight at once.
const REQUESTS: u64 = 4000;
const WARM_UP: u64 = 1000;
const IN_FLIGHT: usize = 200;
/// How long leftovers may take to go away once their owner is dropped.
const SETTLE: Duration = Duration::from_secs(10);
/// How much resident memory may grow over the whole test.
const RSS_BOUND: u64 = 64 * 1024 * 1024;
/// File descriptors that may come and go for reasons outside the test.
const FD_TOLERANCE: usize = 4;

/// The tests count process-wide file descriptors: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs a test alone, on a runtime of its own created after taking the lock (a
/// runtime holds file descriptors too), with two workers like the CI machine.
fn serially<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(test());
}

fn limits() -> Limits {
    Limits {
        attempt_timeout: Duration::from_millis(400),
        deadline: Duration::from_millis(1500),
        idle_timeout: Duration::from_millis(400),
        max_attempts: 3,
        // Thousands of requests on two cores in a debug build.
        slack: Duration::from_secs(3),
        breaker: true,
        budget_may_deny: true,
        max_replay_body: 64 * 1024,
        circuit_open: false,
    }
}

/// One breaker per fault family that opens after `failures` in a row, with a
/// concurrency cap high enough never to reject but present, so that every
/// breaker counts its requests in flight.
fn breaker(failures: u32) -> BreakerPolicy {
    BreakerPolicy::consecutive_failures(failures)
        .open_for(Duration::from_millis(300))
        .max_open_for(Duration::from_millis(600))
        .concurrency_limit(10_000)
        .per_key(|parts| parts.headers.get(KEY_HEADER)?.to_str().ok())
}

fn seed() -> u64 {
    std::env::var("LOAD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// What the process held before a test started.
struct Baseline {
    tasks: usize,
    fds: Option<usize>,
    rss: Option<u64>,
}

impl Baseline {
    fn take() -> Baseline {
        if !proc_available() {
            eprintln!(
                "NOTE: /proc/self is not available: the file-descriptor and memory checks \
                 of this test are SKIPPED (connections and tasks are still checked)"
            );
        }
        Baseline {
            tasks: alive_tasks(),
            fds: open_fds(),
            rss: rss_bytes(),
        }
    }

    /// Takes the memory baseline again (after a warm-up).
    fn rebase_rss(&mut self) {
        if let (Some(before), Some(now)) = (self.rss, rss_bytes()) {
            println!(
                "RSS after the warm-up: {:.1} MiB (at the start {:.1} MiB)",
                mib(now),
                mib(before)
            );
            self.rss = Some(now);
        }
    }

    fn check_rss(&self, when: &str) {
        let (Some(before), Some(now)) = (self.rss, rss_bytes()) else {
            return;
        };
        println!(
            "RSS {when}: {:.1} MiB (baseline {:.1} MiB)",
            mib(now),
            mib(before)
        );
        assert!(
            now <= before + RSS_BOUND,
            "RSS {when} is {:.1} MiB, more than {:.0} MiB over the baseline of {:.1} MiB",
            mib(now),
            mib(RSS_BOUND),
            mib(before)
        );
    }

    /// Once everything is dropped: tasks and file descriptors back to the baseline.
    async fn check_released(&self) {
        let tasks = self.tasks;
        let settled = settle(SETTLE, || alive_tasks() <= tasks).await;
        assert!(
            settled,
            "{} tasks still alive, baseline {tasks}",
            alive_tasks()
        );
        if let Some(before) = self.fds {
            let settled = settle(SETTLE, || {
                open_fds().is_some_and(|n| n <= before + FD_TOLERANCE)
            })
            .await;
            let now = open_fds().unwrap_or_default();
            println!("file descriptors: {now} (baseline {before})");
            assert!(
                settled,
                "{now} file descriptors open, baseline {before} (+{FD_TOLERANCE} tolerated)"
            );
        }
        self.check_rss("after dropping everything");
    }
}

fn sent(upstream: &Upstream) -> Vec<Sent> {
    upstream
        .requests()
        .into_iter()
        .map(|r| Sent {
            request_id: r.header("x-request-id").map(str::to_owned),
            body: r.body,
        })
        .collect()
}

/// Every keyed breaker has given back every permit it handed out.
fn assert_no_permits_held(handle: &BreakerHandle) {
    let held: Vec<_> = handle
        .snapshots()
        .into_iter()
        .filter(|(_, s)| s.in_flight != 0)
        .collect();
    assert!(
        held.is_empty(),
        "breakers still count requests in flight: {held:?}"
    );
}

#[test]
fn thousands_of_mixed_requests_leak_no_fds_tasks_connections_or_memory() {
    serially(thousands_of_mixed_requests);
}

async fn thousands_of_mixed_requests() {
    let mut baseline = Baseline::take();
    let seed = seed();
    println!("load: LOAD_SEED={seed}, {REQUESTS} requests, {IN_FLIGHT} in flight");
    let limits = limits();

    let upstream = Upstream::start().await;
    let counters = Counters::default();
    let layer = limits
        .builder()
        .circuit_breaker(breaker(50))
        .observer(counters.clone())
        .build()
        .unwrap();
    let handle = layer.breaker_handle().unwrap();
    let gateway = Gateway::start(&upstream.authority(), &refused_addr().to_string(), layer).await;
    let caller = caller();

    let mut rng = fastrand::Rng::with_seed(seed);
    // A warm-up round first: the allocator's high-water mark for this workload is
    // not a leak. The memory baseline is taken after it; a leak of even a few
    // KiB per request would still show over the thousands that follow.
    let warm_up: Vec<Call> = (0..WARM_UP)
        .map(|i| random_call(&mut rng, format!("warm-{i}"), &limits))
        .collect();
    let warmed_at = Instant::now();
    let warm = run_checked(&gateway, &caller, warm_up, IN_FLIGHT, &limits).await;
    assert!(
        warm.iter().all(|c| c.label != "unanswered"),
        "the warm-up was answered"
    );
    drop(warm);
    baseline.rebase_rss();
    let counted = counters.responses();

    let calls: Vec<Call> = (0..REQUESTS)
        .map(|i| random_call(&mut rng, format!("load-{i}"), &limits))
        .collect();
    let hangs = calls.iter().filter(|c| c.fault == Fault::Hang).count();
    let started = Instant::now();
    let results = run_checked(&gateway, &caller, calls, IN_FLIGHT, &limits).await;
    let elapsed = started.elapsed();
    println!(
        "{} answers in {elapsed:?} ({:.0}/s); {} attempts, {} retries, {} denied; {} hangs",
        results.len(),
        results.len() as f64 / elapsed.as_secs_f64(),
        counters.attempts(),
        counters.retries(),
        counters.denied(),
        hangs
    );
    println!("status mix: {:?}", status_mix(&results));

    let violations = verify_checked(&results, &sent(&upstream), &limits);
    assert!(
        violations.is_empty(),
        "LOAD_SEED={seed}: {} of {REQUESTS} calls broke an invariant; the first ones:\n{}",
        violations.len(),
        violations[..violations.len().min(30)].join("\n")
    );
    // The warm-up's requests count too: they are in the same budget window.
    let total = REQUESTS + WARM_UP;
    let bound = budget_bound(total, 0.2, 10, Duration::from_secs(10), warmed_at.elapsed());
    assert!(
        counters.retries() <= bound,
        "{} retries > budget bound {bound}",
        counters.retries()
    );
    assert_eq!(counters.responses() - counted, REQUESTS);
    drop(results);
    baseline.check_rss("after the run");

    // Every request is over: no breaker still counts one in flight.
    assert_no_permits_held(&handle);
    // The guard gave up on hung attempts: their upstream connections are closed,
    // and only the gateway's idle pool is left.
    let pool_bound = POOL_IDLE;
    let settled = settle(SETTLE, || upstream.open_connections() <= pool_bound).await;
    println!(
        "after the run: {} upstream connections open of {} accepted; {} caller connections open",
        upstream.open_connections(),
        upstream.connections(),
        gateway.open_connections()
    );
    assert!(
        settled,
        "{} upstream connections still open after the run ({} accepted), more than the \
         {pool_bound} the idle pool may keep: hung attempts leak connections",
        upstream.open_connections(),
        upstream.connections()
    );

    drop(caller);
    assert!(
        settle(SETTLE, || gateway.open_connections() == 0).await,
        "{} caller connections still open at the gateway after the caller was dropped",
        gateway.open_connections()
    );
    drop(handle);
    drop(gateway);
    assert!(
        settle(SETTLE, || upstream.open_connections() == 0).await,
        "{} upstream connections still open after the gateway was dropped",
        upstream.open_connections()
    );
    drop(upstream);
    baseline.check_released().await;
}

#[test]
fn requests_abandoned_mid_flight_leak_no_permits_tasks_or_connections() {
    serially(requests_abandoned_mid_flight);
}

async fn requests_abandoned_mid_flight() {
    let baseline = Baseline::take();
    let seed = seed();
    println!("abandoned: LOAD_SEED={seed}");
    let limits = limits();

    let upstream = Upstream::start().await;
    // Timeouts far longer than the test: only the callers leaving can end these
    // requests in time, so permits coming back prove that dropping works.
    let layer = limits
        .builder()
        .attempt_timeout(Duration::from_secs(60))
        .deadline(Duration::from_secs(60))
        .body_idle_timeout(Duration::from_secs(60))
        // Never opens: every request must reach the point where its caller leaves.
        .circuit_breaker(breaker(u32::MAX))
        .build()
        .unwrap();
    let handle = layer.breaker_handle().unwrap();
    let gateway = Gateway::start(&upstream.authority(), &refused_addr().to_string(), layer).await;
    let caller = caller();

    // Callers that give up at a random moment: while the guard waits for headers
    // (hang), sleeps before a retry (a 503 asking for Retry-After: 30, which the
    // guard waits 5 s for), or streams a body (stall, slow stream). The upstream
    // notices a closed connection on all of these routes.
    let mut rng = fastrand::Rng::with_seed(seed);
    let faults = [
        Fault::Hang,
        Fault::StallBody,
        Fault::Stream(100, 200),
        Fault::FlakyStatus(1, 503),
    ];
    let abandoned: Vec<(Call, Duration)> = (0..600)
        .map(|i| {
            let mut call = Call::new(format!("gone-{i}"), faults[rng.usize(0..faults.len())]);
            if matches!(call.fault, Fault::FlakyStatus(..)) {
                call = call.query("retry_after=30");
            }
            (call, Duration::from_millis(rng.u64(50..400)))
        })
        .collect();
    // A 503 leaves its connection idle in the gateway's pool; nothing else may.
    let may_idle = abandoned
        .iter()
        .filter(|(c, _)| matches!(c.fault, Fault::FlakyStatus(..)))
        .count();
    let mut tasks = tokio::task::JoinSet::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    for (call, patience) in abandoned {
        let request = call.request(&gateway);
        let caller = caller.clone();
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::time::timeout(patience, async {
                if let Ok(response) = caller.request(request).await {
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                }
            })
            .await
            .is_err()
        });
    }
    let mut gave_up = 0;
    while let Some(joined) = tasks.join_next().await {
        gave_up += usize::from(joined.expect("caller task"));
    }
    println!("{gave_up} of 600 callers gave up before their answer ended");
    assert!(
        gave_up >= 500,
        "the callers were meant to give up mid-flight"
    );

    // The gateway notices each caller leaving and drops its request, and the
    // guard gives everything back, long before any timeout could end them.
    assert!(
        settle(Duration::from_secs(3), || handle
            .snapshots()
            .iter()
            .all(|(_, s)| s.in_flight == 0))
        .await,
        "permits still held after every caller left: {:?}",
        handle.snapshots()
    );
    assert_no_permits_held(&handle);
    // ...and closes their upstream connections (the upstream would hold a hung
    // one for 60 s): only the idle pool is left.
    assert!(
        settle(Duration::from_secs(3), || upstream.open_connections()
            <= may_idle)
        .await,
        "{} upstream connections still open after every caller left; at most {may_idle} \
         may be idle in the pool",
        upstream.open_connections()
    );

    // The guard still works: a fresh caller is answered.
    let fresh = gateway::exchange(
        &gateway::caller(),
        Call::new("after", Fault::Ok).request(&gateway),
        Duration::from_secs(10),
    )
    .await
    .expect("answered after the abandoned requests");
    assert_eq!(fresh.status, 200);

    drop(caller);
    assert!(
        settle(SETTLE, || gateway.open_connections() == 0).await,
        "{} caller connections still open at the gateway",
        gateway.open_connections()
    );
    drop(handle);
    drop(gateway);
    assert!(
        settle(SETTLE, || upstream.open_connections() == 0).await,
        "{} upstream connections still open after the gateway was dropped",
        upstream.open_connections()
    );
    drop(upstream);
    baseline.check_released().await;
}
