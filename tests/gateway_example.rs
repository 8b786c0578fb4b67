//! Runs the built `gateway` example (`examples/gateway/`) in proxy mode in front
//! of the fault upstream, guarded and with `--no-guard`, and checks what it
//! answers over real HTTP.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test gateway_example`), build the example first
//! with `cargo build --example gateway`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use support::example_process::{get, send, Answer, Example, ExampleProcess};
use support::upstream::{refused_addr, Recorded, Silent, Upstream};

const GATEWAY: Example = Example("gateway");
/// The guard settings every proxy in these tests runs with.
const ATTEMPT_TIMEOUT_MS: u64 = 300;
const DEADLINE_MS: u64 = 800;

/// Starts the example in proxy mode in front of `upstream` and waits for it to
/// listen; dropping it kills the process.
async fn start_proxy(upstream: &str) -> ExampleProcess {
    start_proxy_with(upstream, &[]).await
}

/// The same proxy without the guard (`--no-guard`), with the same settings.
async fn start_unguarded_proxy(upstream: &str) -> ExampleProcess {
    start_proxy_with(upstream, &["--no-guard"]).await
}

async fn start_proxy_with(upstream: &str, flags: &[&str]) -> ExampleProcess {
    let (attempt_timeout, deadline) = (ATTEMPT_TIMEOUT_MS.to_string(), DEADLINE_MS.to_string());
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--attempt-timeout-ms",
        &attempt_timeout,
        "--deadline-ms",
        &deadline,
    ];
    args.extend(flags);
    GATEWAY.start(&args).await
}

/// An answer's headers but `date` (which differs by the second), in order:
/// what two proxies must agree on to pass a response through alike.
fn comparable_headers(answer: &Answer) -> Vec<(String, Vec<u8>)> {
    let mut headers: Vec<(String, Vec<u8>)> = answer
        .headers
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect();
    headers.sort();
    headers
}

#[tokio::test]
async fn healthy_responses_pass_through_whole() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream.url("")).await;

    let big = get(&proxy.url("/big/200000")).await;
    assert_eq!(big.status, StatusCode::OK);
    let expected: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(big.body.len(), expected.len());
    assert!(
        big.body == expected,
        "the big body differs from the pattern"
    );

    let streamed = get(&proxy.url("/stream/5/20")).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(
        streamed.body,
        "chunk-0\nchunk-1\nchunk-2\nchunk-3\nchunk-4\n"
    );
}

#[tokio::test]
async fn forwards_to_the_upstream_host_without_hop_by_hop_headers() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream.url("")).await;

    let request = Request::get(proxy.url("/echo?x=1"))
        .header("connection", "x-hop")
        .header("x-hop", "for this connection only")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);

    let seen = upstream.requests();
    let seen = seen
        .iter()
        .find(|r| r.path == "/echo?x=1")
        .expect("the upstream got the request, query included");
    assert_eq!(seen.header("host"), Some(upstream.authority().as_str()));
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    for hop in ["x-hop", "keep-alive"] {
        assert_eq!(seen.header(hop), None, "{hop} was forwarded");
    }
}

#[tokio::test]
async fn proxy_credentials_are_not_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream.url("")).await;

    let request = Request::get(proxy.url("/ok"))
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);

    let seen = only_request(&upstream);
    assert_eq!(seen.header("proxy-authorization"), None);
}

#[tokio::test]
async fn the_upstream_sees_the_caller_appended_to_x_forwarded_for() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream.url("")).await;

    let request = Request::get(proxy.url("/ok"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);

    let seen = only_request(&upstream);
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    let proxy_host = proxy.addr().to_string();
    assert_eq!(seen.header("x-forwarded-host"), Some(proxy_host.as_str()));
}

#[tokio::test]
async fn a_refused_upstream_answers_502_problem_json() {
    let proxy = start_proxy(&format!("http://{}", refused_addr())).await;

    let answer = get(&proxy.url("/anything")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let problem = answer.problem();
    assert_eq!(problem["status"], 502);
    assert_eq!(problem["type"], "urn:upstream-guard:problem:connect");
}

#[tokio::test]
async fn a_hanging_upstream_answers_504_within_the_deadline() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream.url("")).await;

    let started = Instant::now();
    let answer = get(&proxy.url("/hang")).await;
    let elapsed = started.elapsed();

    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.problem()["status"], 504);
    let limit = Duration::from_millis(DEADLINE_MS) + Duration::from_millis(1_500);
    assert!(
        elapsed < limit,
        "answered after {elapsed:?}, limit {limit:?}"
    );
}

#[tokio::test]
async fn with_two_replicas_one_refusing_every_get_is_answered_by_the_other() {
    let upstream = Upstream::start().await;
    let refused = format!("http://{}", refused_addr());
    let proxy = start_proxy_with(&upstream.url(""), &["--upstream", &refused]).await;
    for _ in 0..20 {
        let answer = get(&proxy.url("/ok")).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(upstream.count("/ok"), 20);
}

#[tokio::test]
async fn with_hedging_a_hanging_replica_costs_about_the_hedge_delay() {
    let upstream = Upstream::start().await;
    let hanging = Silent::start().await;
    let hanging = format!("http://{}", hanging.addr());
    let flags = ["--upstream", &hanging, "--hedge-after-ms", "50"];
    let proxy = start_proxy_with(&upstream.url(""), &flags).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let answer = get(&proxy.url("/ok")).await;
        assert_eq!(answer.status, StatusCode::OK);
        slowest = slowest.max(started.elapsed());
    }
    // Without the hedge, a GET sent to the hanging replica first would wait
    // for the 300 ms attempt timeout before its retry.
    assert!(slowest < Duration::from_millis(250), "{slowest:?}");
}

#[tokio::test]
async fn no_guard_takes_one_upstream_only() {
    let output = GATEWAY
        .run_to_exit(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
            "--upstream",
            "http://127.0.0.1:2",
            "--no-guard",
        ])
        .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("one --upstream"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn without_the_guard_a_refused_upstream_gets_the_proxys_own_plain_502() {
    let refused = format!("http://{}", refused_addr());
    let (guarded, unguarded) = (
        start_proxy(&refused).await,
        start_unguarded_proxy(&refused).await,
    );

    let plain = get(&unguarded.url("/anything")).await;
    let problem = get(&guarded.url("/anything")).await;

    assert_eq!(plain.status, StatusCode::BAD_GATEWAY);
    let content_type = |answer: &Answer| answer.headers.get("content-type").cloned();
    assert_eq!(
        content_type(&plain).as_ref().map(|v| v.as_bytes()),
        Some(&b"text/plain; charset=utf-8"[..])
    );
    assert_eq!(plain.body, "bad gateway\n");
    assert_eq!(
        problem.problem()["type"],
        "urn:upstream-guard:problem:connect"
    );
    assert_ne!(content_type(&plain), content_type(&problem));
}

#[tokio::test]
async fn without_the_guard_healthy_responses_pass_through_as_with_it() {
    let upstream = Upstream::start().await;
    let (guarded, unguarded) = (
        start_proxy(&upstream.url("")).await,
        start_unguarded_proxy(&upstream.url("")).await,
    );

    for path in ["/ok", "/status/404", "/big/200000", "/stream/3/20"] {
        let with = get(&guarded.url(path)).await;
        let without = get(&unguarded.url(path)).await;
        assert_eq!(with.status, without.status, "{path}");
        assert_eq!(
            comparable_headers(&with),
            comparable_headers(&without),
            "{path}"
        );
        assert!(with.body == without.body, "{path}: the bodies differ");
    }
}

#[tokio::test]
async fn without_the_guard_the_upstream_sees_the_same_request() {
    let upstream = Upstream::start().await;
    let (guarded, unguarded) = (
        start_proxy(&upstream.url("")).await,
        start_unguarded_proxy(&upstream.url("")).await,
    );

    for proxy in [&guarded, &unguarded] {
        let request = Request::get(proxy.url("/echo?x=1"))
            .header("connection", "x-hop")
            .header("x-hop", "for this connection only")
            .header("x-forwarded-for", "203.0.113.7")
            // The same public name for both, as behind one load balancer.
            .header("host", "public.example")
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        assert_eq!(send(request).await.status, StatusCode::OK);
    }

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let comparable = |i: usize| (&seen[i].method, &seen[i].path, &seen[i].headers);
    assert_eq!(comparable(0), comparable(1));
}

#[tokio::test]
async fn an_unknown_flag_exits_2_with_usage() {
    let output = GATEWAY.run_to_exit(&["--bogus"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("--bogus"), "stderr:\n{stderr}");
    assert!(
        stderr.to_lowercase().contains("usage:"),
        "stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn no_guard_without_an_upstream_exits_2_naming_what_is_missing() {
    let output = GATEWAY.run_to_exit(&["--no-guard"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("required"), "stderr:\n{stderr}");
    assert!(stderr.contains("--listen"), "stderr:\n{stderr}");
    assert!(stderr.contains("--upstream"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn a_zero_attempt_timeout_exits_2_naming_the_field() {
    let output = GATEWAY.run_to_exit(&["--attempt-timeout-ms", "0"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("attempt_timeout"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn a_zero_attempt_timeout_exits_2_with_no_guard_too() {
    let upstream = format!("http://{}", refused_addr());
    let output = GATEWAY
        .run_to_exit(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--no-guard",
            "--attempt-timeout-ms",
            "0",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("attempt_timeout"), "stderr:\n{stderr}");
}

/// The one request an upstream received.
fn only_request(upstream: &Upstream) -> Recorded {
    let mut seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.remove(0)
}
