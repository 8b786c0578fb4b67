//! Chaos: the guard inside an axum gateway, over real loopback sockets, against
//! every fault the upstream can produce, alone and in random mixes.
//!
//! A plain hyper-util client calls the gateway (`support/gateway.rs`), whose
//! fallback forwards through the guarded hyper-util client to the fault upstream
//! (`support/upstream.rs`). Every answer of every test is checked (see
//! `gateway::verify`):
//!
//! - it is answered, within its bound (deadline, plus body time for body faults,
//!   plus a generous slack for a shared machine);
//! - it is one of the answers allowed for its fault: the upstream's own response
//!   (byte-identical body), the upstream's head with a body that fails (never a
//!   short success), or a synthesized response of an allowed kind;
//! - a synthesized body is problem+json with `status` equal to the HTTP status,
//!   the documented `type` and `title`, the fixed `detail` (no inner error text),
//!   the configured upstream name (never `127.0.0.1`), the caller's request id,
//!   and at most `max_attempts` attempts; a gRPC call gets HTTP 200 with
//!   `grpc-status` 4 or 14 and a correctly percent-encoded `grpc-message`;
//! - the upstream received at most `max_attempts` requests for it, no more than
//!   the guard reports, each with exactly the body the caller sent.
//!
//! The random mix prints its seed; rerun one with `CHAOS_SEED=<seed>`.

mod support;

#[path = "support/gateway.rs"]
mod gateway;

use std::time::{Duration, Instant, SystemTime};

use axum::http::Method;
use bytes::Bytes;
use gateway::{
    budget_bound, caller, random_call, run, run_checked, status_mix, tally, verify, verify_checked,
    Call, Caller, Counters, Exchange, Fault, Gateway, Limits, Sent, KEY_HEADER,
};
use support::upstream::{refused_addr, Upstream};
use upstream_guard::{BreakerPolicy, Builder, CircuitState};

/// Extra time any answer may take beyond its bound.
const SLACK: Duration = Duration::from_millis(1500);

fn limits() -> Limits {
    Limits {
        attempt_timeout: Duration::from_millis(250),
        deadline: Duration::from_secs(1),
        idle_timeout: Duration::from_millis(300),
        max_attempts: 3,
        slack: SLACK,
        breaker: false,
        budget_may_deny: false,
        max_replay_body: 64 * 1024,
        circuit_open: false,
    }
}

/// A fault upstream, a gateway in front of it, and a caller.
struct Rig {
    upstream: Upstream,
    gateway: Gateway,
    caller: Caller,
    counters: Counters,
    limits: Limits,
}

impl Rig {
    /// `configure` gets the builder with `limits` and a counting observer set;
    /// it must add a breaker (or `no_circuit_breaker`).
    async fn start(limits: Limits, configure: impl FnOnce(Builder) -> Builder) -> Rig {
        let upstream = Upstream::start().await;
        let counters = Counters::default();
        let layer = configure(limits.builder().observer(counters.clone()))
            .build()
            .expect("a valid chaos configuration");
        let refused = refused_addr().to_string();
        let gateway = Gateway::start(&upstream.authority(), &refused, layer).await;
        Rig {
            upstream,
            gateway,
            caller: caller(),
            counters,
            limits,
        }
    }

    /// The usual rig: no breaker, so every request reaches the upstream.
    async fn without_breaker() -> Rig {
        Rig::start(limits(), Builder::no_circuit_breaker).await
    }

    fn sent(&self) -> Vec<Sent> {
        self.upstream
            .requests()
            .into_iter()
            .map(|r| Sent {
                request_id: r.header("x-request-id").map(str::to_owned),
                body: r.body,
            })
            .collect()
    }

    /// How many requests the upstream received for the call with this id.
    fn received(&self, id: &str) -> usize {
        self.upstream
            .requests()
            .iter()
            .filter(|r| r.header("x-request-id") == Some(id))
            .count()
    }

    /// Sends the calls, checks every invariant, and returns the answers by call.
    async fn run_checked(&self, calls: Vec<Call>, in_flight: usize) -> Vec<(Call, Exchange)> {
        let results = run(&self.gateway, &self.caller, calls, in_flight, &self.limits).await;
        let violations = verify(&results, &self.sent(), &self.limits);
        assert!(
            violations.is_empty(),
            "{} of {} calls broke an invariant:\n{}",
            violations.len(),
            results.len(),
            violations.join("\n")
        );
        results
            .into_iter()
            .map(|(call, answer)| (call, answer.expect("verified as answered")))
            .collect()
    }
}

fn problem(exchange: &Exchange) -> serde_json::Value {
    serde_json::from_slice(exchange.body.as_ref().expect("a complete body"))
        .expect("a problem+json body")
}

fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Bytes {
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Percent-encodes a query parameter value.
fn query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// One test per fault family
// ---------------------------------------------------------------------------

#[tokio::test]
async fn healthy_routes_pass_through_byte_identical_with_one_attempt() {
    let rig = Rig::without_breaker().await;
    let mut rng = fastrand::Rng::with_seed(7);
    let calls = vec![
        Call::new("ok", Fault::Ok),
        Call::new("head", Fault::Ok).method(Method::HEAD, Bytes::new()),
        Call::new("echo-put", Fault::Echo).method(Method::PUT, random_bytes(&mut rng, 10_240)),
        Call::new("echo-post", Fault::Echo).method(Method::POST, random_bytes(&mut rng, 100)),
        Call::new("stream", Fault::Stream(5, 20)),
        Call::new("big", Fault::Big(1024 * 1024)),
        Call::new("empty", Fault::Big(0)),
        Call::new("slow", Fault::Slow(20)),
        Call::new("slow-body", Fault::SlowBody(20)),
        Call::new("status-200", Fault::Status(200)),
        Call::new("status-404", Fault::Status(404)),
        Call::new("flaky-0", Fault::Flaky(0)),
    ];
    let ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
    rig.run_checked(calls, 4).await;
    for id in ids {
        assert_eq!(rig.received(&id), 1, "{id}: one upstream request");
    }
    assert_eq!(rig.counters.retries(), 0);
}

#[tokio::test]
async fn hanging_or_too_slow_upstreams_get_504_within_the_deadline() {
    let rig = Rig::without_breaker().await;
    let too_slow = rig.limits.attempt_timeout.as_millis() as u64 * 8;
    let calls = vec![
        Call::new("hang-1", Fault::Hang),
        Call::new("hang-2", Fault::Hang),
        Call::new("hang-put", Fault::Hang).method(Method::PUT, "payload"),
        Call::new("hang-post", Fault::Hang).method(Method::POST, "order"),
        Call::new("slow-1", Fault::Slow(too_slow)),
        Call::new("slow-2", Fault::Slow(too_slow)),
    ];
    for (call, answer) in rig.run_checked(calls, 6).await {
        assert!(
            answer.elapsed >= rig.limits.attempt_timeout,
            "{}: answered after {:?}, before any timeout could fire",
            call.id,
            answer.elapsed
        );
        let received = rig.received(&call.id);
        if call.retry_safe() {
            assert!(received >= 2, "{}: a timed-out GET is retried", call.id);
        } else {
            assert_eq!(received, 1, "{}: a timed-out POST is not resent", call.id);
            assert_eq!(problem(&answer)["attempts"], 1);
        }
    }
}

#[tokio::test]
async fn resets_and_closes_before_a_response_are_502_transport_retried_only_if_safe() {
    let rig = Rig::without_breaker().await;
    let calls = vec![
        Call::new("reset-get", Fault::Reset),
        Call::new("close-get", Fault::Close),
        Call::new("reset-put", Fault::Reset).method(Method::PUT, "v2"),
        Call::new("close-delete", Fault::Close).method(Method::DELETE, Bytes::new()),
        Call::new("reset-keyed-post", Fault::Reset)
            .method(Method::POST, "order")
            .idempotency_key(),
        Call::new("reset-post", Fault::Reset).method(Method::POST, "order"),
        Call::new("close-patch", Fault::Close).method(Method::PATCH, "diff"),
    ];
    for (call, answer) in rig.run_checked(calls, 7).await {
        let expected = if call.retry_safe() { 3 } else { 1 };
        assert_eq!(problem(&answer)["attempts"], expected, "{}", call.id);
        assert_eq!(rig.received(&call.id), expected, "{}", call.id);
    }
}

#[tokio::test]
async fn malformed_responses_are_502_and_not_retried() {
    let rig = Rig::without_breaker().await;
    let calls = vec![
        Call::new("garbage", Fault::Garbage),
        Call::new("bad-length", Fault::BadContentLength),
        Call::new("garbage-put", Fault::Garbage).method(Method::PUT, "x"),
    ];
    for (call, answer) in rig.run_checked(calls, 3).await {
        if cfg!(feature = "hyper") {
            assert_eq!(
                problem(&answer)["type"],
                "urn:upstream-guard:problem:malformed-response"
            );
            assert_eq!(rig.received(&call.id), 1, "{}: not retried", call.id);
        }
    }
}

#[tokio::test]
async fn bodies_that_break_after_the_head_end_in_an_error_never_a_short_success() {
    let rig = Rig::without_breaker().await;
    let stall = rig.limits.idle_timeout.as_millis() as u64 * 3;
    let calls = vec![
        Call::new("reset-after-headers", Fault::ResetAfterHeaders),
        Call::new("truncated", Fault::Truncated),
        Call::new("stall", Fault::StallBody),
        Call::new("slow-body", Fault::SlowBody(stall)),
    ];
    for (call, answer) in rig.run_checked(calls, 4).await {
        assert_eq!(
            rig.received(&call.id),
            1,
            "{}: a started response is not retried",
            call.id
        );
        if matches!(call.fault, Fault::StallBody | Fault::SlowBody(_)) {
            assert!(
                answer.elapsed >= rig.limits.idle_timeout,
                "{}: failed after {:?}, before the idle timeout",
                call.id,
                answer.elapsed
            );
        }
    }
}

#[tokio::test]
async fn a_refused_upstream_is_502_connect_retried_for_every_method() {
    let rig = Rig::without_breaker().await;
    let calls = vec![
        Call::new("get", Fault::Refused),
        Call::new("head", Fault::Refused).method(Method::HEAD, Bytes::new()),
        Call::new("post", Fault::Refused).method(Method::POST, "order"),
        Call::new("put", Fault::Refused).method(Method::PUT, "v2"),
        Call::new("patch", Fault::Refused).method(Method::PATCH, "diff"),
        Call::new("grpc", Fault::Refused).grpc(None),
    ];
    for (call, answer) in rig.run_checked(calls, 6).await {
        if !call.grpc && call.method != Method::HEAD {
            assert_eq!(
                problem(&answer)["attempts"],
                3,
                "{}: a request that never left is retried",
                call.id
            );
        }
    }
    assert_eq!(rig.upstream.requests().len(), 0);
}

#[tokio::test]
async fn flaky_upstreams_are_retried_until_they_answer() {
    let rig = Rig::without_breaker().await;
    let calls = vec![
        Call::new("flaky-1", Fault::Flaky(1)),
        Call::new("flaky-2", Fault::Flaky(2)),
        Call::new("flaky-3", Fault::Flaky(3)),
        Call::new("flaky-reset-1", Fault::FlakyReset(1)),
        Call::new("flaky-reset-2", Fault::FlakyReset(2)),
        Call::new("flaky-502", Fault::FlakyStatus(2, 502)),
        Call::new("flaky-504", Fault::FlakyStatus(2, 504)),
        Call::new("flaky-500", Fault::FlakyStatus(1, 500)),
        Call::new("flaky-post", Fault::Flaky(1)).method(Method::POST, "order"),
        Call::new("flaky-keyed-post", Fault::FlakyReset(1))
            .method(Method::POST, "order")
            .idempotency_key(),
    ];
    let expected = [
        ("flaky-1", 200, 2),
        ("flaky-2", 200, 3),
        ("flaky-3", 503, 3),
        ("flaky-reset-1", 200, 2),
        ("flaky-reset-2", 200, 3),
        ("flaky-502", 200, 3),
        ("flaky-504", 200, 3),
        ("flaky-500", 500, 1),
        ("flaky-post", 503, 1),
        ("flaky-keyed-post", 200, 2),
    ];
    let answers = rig.run_checked(calls, 10).await;
    for (id, status, received) in expected {
        let (_, answer) = answers.iter().find(|(c, _)| c.id == id).expect("answered");
        assert_eq!(answer.status.as_u16(), status, "{id}");
        assert_eq!(rig.received(id), received, "{id}: upstream requests");
    }
}

#[tokio::test]
async fn replayed_request_bodies_are_byte_identical_on_every_attempt() {
    let rig = Rig::without_breaker().await;
    let mut rng = fastrand::Rng::with_seed(99);
    let cap = rig.limits.max_replay_body;
    let mut calls = Vec::new();
    for len in [0, 1, 1000, 16 * 1024, cap] {
        calls.push(
            Call::new(format!("put-{len}"), Fault::FlakyStatus(2, 503))
                .method(Method::PUT, random_bytes(&mut rng, len)),
        );
    }
    calls.push(
        Call::new("keyed-post", Fault::FlakyReset(2))
            .method(Method::POST, random_bytes(&mut rng, 4096))
            .idempotency_key(),
    );
    calls.push(
        Call::new("over-cap", Fault::FlakyStatus(2, 503))
            .method(Method::PUT, random_bytes(&mut rng, cap + 1)),
    );
    // `verify` checks that every attempt carried exactly the body that was sent.
    let answers = rig.run_checked(calls, 7).await;
    for (call, answer) in &answers {
        if call.id == "over-cap" {
            assert_eq!(answer.status, 503, "a body over the cap is not retried");
            assert_eq!(rig.received(&call.id), 1);
        } else {
            assert_eq!(answer.status, 200, "{}", call.id);
            assert_eq!(rig.received(&call.id), 3, "{}: three attempts", call.id);
        }
    }
}

// ---------------------------------------------------------------------------
// Retry-After
// ---------------------------------------------------------------------------

/// Limits for Retry-After: room in the deadline for a wait of up to `cap`.
fn retry_after_limits(cap: Duration) -> Limits {
    Limits {
        attempt_timeout: Duration::from_secs(1),
        deadline: cap + Duration::from_secs(3),
        ..limits()
    }
}

const RETRY_AFTER_CAP: Duration = Duration::from_millis(1500);

/// A rig that honours `Retry-After` up to `cap`, with a tiny backoff otherwise.
async fn retry_after_rig(cap: Duration) -> Rig {
    let limits = retry_after_limits(cap);
    Rig::start(limits, |b| {
        b.no_circuit_breaker().retry(
            limits
                .retry()
                .backoff(Duration::from_millis(1), Duration::from_millis(5))
                .max_retry_after(cap),
        )
    })
    .await
}

fn flaky_with_retry_after(id: &str, value: &str) -> Call {
    Call::new(id, Fault::FlakyStatus(1, 503)).query(format!("retry_after={}", query_value(value)))
}

#[tokio::test]
async fn retry_after_seconds_and_dates_are_waited_for_up_to_the_cap() {
    let rig = retry_after_rig(RETRY_AFTER_CAP).await;
    let in_two_seconds = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    let waits = [
        ("seconds", "1".to_string(), Duration::from_secs(1)),
        ("huge", "99999999999999999999999".into(), RETRY_AFTER_CAP),
        ("beyond-cap", "3".into(), RETRY_AFTER_CAP),
        // The date has whole seconds: it is at least ~1 s away when the 503 is sent.
        ("http-date", in_two_seconds, Duration::from_millis(900)),
    ];
    let calls = waits
        .iter()
        .map(|(id, value, _)| flaky_with_retry_after(id, value))
        .collect();
    let answers = rig.run_checked(calls, 4).await;
    for (id, value, wait) in waits {
        let (_, answer) = answers.iter().find(|(c, _)| c.id == id).expect("answered");
        assert_eq!(answer.status, 200, "{id}: retried after the wait");
        assert_eq!(rig.received(id), 2, "{id}");
        assert!(
            answer.elapsed >= wait,
            "{id} (Retry-After: {value}) answered after {:?}, before the {wait:?} wait",
            answer.elapsed
        );
        assert!(
            answer.elapsed < RETRY_AFTER_CAP + SLACK,
            "{id}: waited {:?}, past the cap",
            answer.elapsed
        );
    }
}

#[tokio::test]
async fn retry_after_that_is_negative_past_fractional_or_garbage_is_ignored() {
    // Honoured, any of these would wait 2 s or more (the cap is 5 s); ignored,
    // the retry follows a backoff of at most 5 ms.
    let rig = retry_after_rig(Duration::from_secs(5)).await;
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
    let values = [
        ("negative", "-3".to_string()),
        ("fractional", "2.5".into()),
        ("hex", "0x10".into()),
        ("garbage", "soon".into()),
        ("empty", String::new()),
        ("past-date", past),
        ("bad-date", "Mon, 99 Foo 2025 99:99:99 GMT".into()),
    ];
    let calls = values
        .iter()
        .map(|(id, value)| flaky_with_retry_after(id, value))
        .collect();
    let answers = rig.run_checked(calls, 7).await;
    for (id, value) in values {
        let (_, answer) = answers.iter().find(|(c, _)| c.id == id).expect("answered");
        assert_eq!(answer.status, 200, "{id}");
        assert_eq!(rig.received(id), 2, "{id}");
        assert!(
            answer.elapsed < Duration::from_millis(1800),
            "{id} (Retry-After: {value:?}) waited {:?}: it was not ignored",
            answer.elapsed
        );
    }
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_returns_the_upstreams_503_at_once() {
    let limits = limits();
    let rig = Rig::start(limits, |b| {
        b.no_circuit_breaker()
            .retry(limits.retry().max_retry_after(Duration::from_secs(30)))
    })
    .await;
    let calls = vec![Call::new("later", Fault::Status(503)).query("retry_after=5")];
    let answers = rig.run_checked(calls, 1).await;
    let (_, answer) = &answers[0];
    assert_eq!(answer.header("retry-after"), Some("5"), "passed through");
    assert_eq!(rig.received("later"), 1, "no retry can fit in the deadline");
    assert!(
        answer.elapsed < limits.deadline,
        "waited {:?} for a retry that could never be made",
        answer.elapsed
    );
}

// ---------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------

#[tokio::test]
async fn grpc_calls_get_grpc_status_4_or_14_never_an_http_error() {
    let rig = Rig::without_breaker().await;
    let too_slow = rig.limits.attempt_timeout.as_millis() as u64 * 8;
    let calls = vec![
        Call::new("hang", Fault::Hang).grpc(None),
        Call::new("hang-300m", Fault::Hang).grpc(Some("300m")),
        Call::new("slow", Fault::Slow(too_slow)).grpc(None),
        Call::new("reset", Fault::Reset).grpc(None),
        Call::new("close", Fault::Close).grpc(None),
        Call::new("garbage", Fault::Garbage).grpc(None),
        Call::new("refused", Fault::Refused).grpc(Some("5S")),
        Call::new("ok", Fault::Ok).grpc(Some("5S")),
    ];
    let answers = rig.run_checked(calls, 8).await;
    for (call, answer) in &answers {
        let expected = match call.fault {
            Fault::Ok => None,
            Fault::Hang | Fault::Slow(_) => Some("4"),
            _ => Some("14"),
        };
        assert_eq!(answer.header("grpc-status"), expected, "{}", call.id);
    }
    let (_, short) = answers.iter().find(|(c, _)| c.id == "hang-300m").unwrap();
    assert!(
        short.elapsed < Duration::from_millis(300) + SLACK,
        "an inbound grpc-timeout of 300m bounds the answer: {:?}",
        short.elapsed
    );
    for r in rig.upstream.requests() {
        if r.header("x-request-id") == Some("hang-300m") {
            let told = r
                .header("grpc-timeout")
                .and_then(|t| upstream_guard::grpc::parse_grpc_timeout(t.as_bytes()))
                .expect("the upstream is told its grpc-timeout");
            assert!(told <= Duration::from_millis(300), "{told:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Circuit breaker and retry budget
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_upstream_request_is_made_while_the_breaker_is_open() {
    let limits = Limits {
        breaker: true,
        ..limits()
    };
    let open_for = Duration::from_secs(60);
    let rig = Rig::start(limits, |b| {
        b.circuit_breaker(
            BreakerPolicy::consecutive_failures(3)
                .open_for(open_for)
                .max_open_for(open_for),
        )
    })
    .await;
    let handle = rig.gateway.layer().breaker_handle().unwrap();
    let key = rig.upstream.authority();

    // Trip it: each reset GET fails three attempts in a row.
    let mut tripped = false;
    for i in 0..10 {
        let call = Call::new(format!("trip-{i}"), Fault::Reset);
        let answers = rig.run_checked(vec![call], 1).await;
        if problem(&answers[0].1)["type"] == "urn:upstream-guard:problem:circuit-open" {
            tripped = true;
            break;
        }
    }
    assert!(tripped, "three failures in a row open the breaker");
    assert_eq!(handle.snapshot_for(&key).unwrap().state, CircuitState::Open);

    let requests = rig.upstream.requests().len();
    let connections = rig.upstream.connections();
    let mut rng = fastrand::Rng::with_seed(3);
    let open_limits = Limits {
        circuit_open: true,
        ..limits
    };
    let calls: Vec<Call> = (0..80)
        .map(|i| random_call(&mut rng, format!("open-{i}"), &open_limits))
        .filter(|c| c.fault != Fault::Refused)
        .collect();
    let results = run(&rig.gateway, &rig.caller, calls, 16, &open_limits).await;
    // Every call is answered 503 circuit-open (or grpc-status 14), checked in full.
    let violations = verify(&results, &rig.sent(), &open_limits);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    for (call, answer) in results {
        let answer = answer.expect("verified");
        assert!(
            answer.elapsed < SLACK,
            "{}: an open breaker answers at once, took {:?}",
            call.id,
            answer.elapsed
        );
        if !call.grpc && call.method != Method::HEAD {
            assert_eq!(problem(&answer)["attempts"], 0, "{}", call.id);
            let after: u64 = answer.header("retry-after").unwrap().parse().unwrap();
            assert!(
                (1..=open_for.as_secs()).contains(&after),
                "Retry-After {after}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rig.upstream.requests().len(),
        requests,
        "the upstream received requests while the breaker was open"
    );
    assert_eq!(
        rig.upstream.connections(),
        connections,
        "the gateway connected to the upstream while the breaker was open"
    );
    assert_eq!(handle.snapshot_for(&key).unwrap().state, CircuitState::Open);
}

#[tokio::test]
async fn the_retry_budget_bounds_upstream_attempts_when_everything_fails() {
    const REQUESTS: u64 = 300;
    const RATIO: f64 = 0.1;
    const MIN_PER_SECOND: u32 = 1;
    const WINDOW: Duration = Duration::from_secs(10);
    let limits = Limits {
        budget_may_deny: true,
        ..limits()
    };
    let rig = Rig::start(limits, |b| {
        b.no_circuit_breaker().retry(
            limits
                .retry()
                .budget(RATIO, MIN_PER_SECOND)
                .budget_window(WINDOW),
        )
    })
    .await;
    let faults = [
        Fault::Status(503),
        Fault::Reset,
        Fault::Close,
        Fault::Flaky(5),
        Fault::FlakyReset(5),
        Fault::FlakyStatus(5, 502),
    ];
    let calls = (0..REQUESTS as usize)
        .map(|i| Call::new(format!("b{i}"), faults[i % faults.len()]))
        .collect();
    let started = Instant::now();
    rig.run_checked(calls, 30).await;
    let elapsed = started.elapsed();

    let retries = rig.counters.retries();
    let attempts = rig.counters.attempts();
    let bound = budget_bound(REQUESTS, RATIO, MIN_PER_SECOND, WINDOW, elapsed);
    let received = rig.upstream.requests().len() as u64;
    println!(
        "budget: {REQUESTS} requests, {attempts} attempts, {retries} retries (bound {bound}), \
         {} denied, {received} reached the upstream, in {elapsed:?}",
        rig.counters.denied()
    );
    assert!(retries <= bound, "{retries} retries > budget bound {bound}");
    assert!(
        attempts <= REQUESTS + bound,
        "{attempts} attempts > (1+ratio)·requests + reserve = {}",
        REQUESTS + bound
    );
    assert!(
        received <= attempts,
        "{received} upstream requests > {attempts} attempts"
    );
    assert!(retries > 0, "the budget's reserve allows some retries");
    assert!(
        rig.counters.denied() > 0 && bound < REQUESTS * 2,
        "the budget, not max_attempts, was the limit"
    );
}

// ---------------------------------------------------------------------------
// Random mixes
// ---------------------------------------------------------------------------

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

#[tokio::test]
async fn random_fault_mixes_keep_every_invariant() {
    const REQUESTS: u64 = 800;
    let seed = seed();
    println!("random fault mix: CHAOS_SEED={seed}");
    let limits = Limits {
        breaker: true,
        budget_may_deny: true,
        ..limits()
    };
    // One breaker per fault family, in a registry small enough to evict.
    let breaker = BreakerPolicy::consecutive_failures(5)
        .open_for(Duration::from_millis(300))
        .max_open_for(Duration::from_millis(600))
        .max_keys(16)
        .per_key(|parts| parts.headers.get(KEY_HEADER)?.to_str().ok());
    let rig = Rig::start(limits, |b| b.circuit_breaker(breaker)).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let calls = (0..REQUESTS)
        .map(|i| random_call(&mut rng, format!("mix-{i}"), &limits))
        .collect::<Vec<_>>();
    let started = Instant::now();
    let results = run_checked(&rig.gateway, &rig.caller, calls, 32, &limits).await;
    let elapsed = started.elapsed();
    for (family, labels) in tally(&results) {
        println!("  {family:<24} {labels:?}");
    }
    println!("  all: {:?}", status_mix(&results));
    let violations = verify_checked(&results, &rig.sent(), &limits);
    assert!(
        violations.is_empty(),
        "CHAOS_SEED={seed}: {} of {REQUESTS} calls broke an invariant:\n{}",
        violations.len(),
        violations.join("\n")
    );
    // The default budget: 20 % of requests plus 10 retries/s over 10 s.
    let bound = budget_bound(REQUESTS, 0.2, 10, Duration::from_secs(10), elapsed);
    assert!(
        rig.counters.retries() <= bound,
        "CHAOS_SEED={seed}: {} retries > budget bound {bound}",
        rig.counters.retries()
    );
    assert!(rig.upstream.requests().len() as u64 <= rig.counters.attempts());
    assert_eq!(
        rig.counters.responses(),
        REQUESTS,
        "one response event per call"
    );
}
