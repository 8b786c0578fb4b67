//! Runs the built `gateway` example (`examples/gateway.rs`) in proxy mode in front
//! of the fault upstream, and checks what it answers over real HTTP.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test gateway_example`), build the example first
//! with `cargo build --example gateway`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use support::example_process::{get, send, Example, ExampleProcess};
use support::upstream::{refused_addr, Upstream};

const GATEWAY: Example = Example("gateway");
/// The guard settings every proxy in these tests runs with.
const ATTEMPT_TIMEOUT_MS: u64 = 300;
const DEADLINE_MS: u64 = 800;

/// Starts the example in proxy mode in front of `upstream` and waits for it to
/// listen; dropping it kills the process.
async fn start_proxy(upstream: &str) -> ExampleProcess {
    GATEWAY
        .start(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--attempt-timeout-ms",
            &ATTEMPT_TIMEOUT_MS.to_string(),
            "--deadline-ms",
            &DEADLINE_MS.to_string(),
        ])
        .await
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
async fn an_unknown_flag_exits_2_with_usage() {
    let output = GATEWAY.run_to_exit(&["--bogus"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("--bogus"), "stderr:\n{stderr}");
    assert!(stderr.contains("usage:"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn a_zero_attempt_timeout_exits_2_naming_the_field() {
    let output = GATEWAY.run_to_exit(&["--attempt-timeout-ms", "0"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("attempt_timeout"), "stderr:\n{stderr}");
}
