//! Runs the built `reverse_proxy` example (`examples/reverse_proxy.rs`) in front
//! of two fault upstreams (`tests/support/upstream.rs`) and checks, over real
//! HTTP, what reaches the upstreams and what comes back.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test reverse_proxy_example`), build the example
//! first with `cargo build --example reverse_proxy`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::example_process::{client, get, send, Example, ExampleProcess, STEP};
use support::upstream::{refused_addr, Recorded, Upstream};

const REVERSE_PROXY: Example = Example("reverse_proxy");

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn routes_by_path_prefix_and_by_host() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let proxy = start_proxy(&[
        &format!("/a/={}", a.url("/")),
        &format!("api.test/={}", a.url("")),
        &format!("/={}", b.url("")),
    ])
    .await;

    assert_eq!(get(&proxy.url("/a/ok?x=1")).await.status, StatusCode::OK);
    assert_eq!(get(&proxy.url("/ok")).await.status, StatusCode::OK);
    // `/ab` is not under `/a/`: it goes to the catch-all route.
    assert_eq!(get(&proxy.url("/ab")).await.status, StatusCode::NOT_FOUND);
    let by_host = Request::get(proxy.url("/status/201"))
        .header("host", "API.test:8080")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(by_host).await.status, StatusCode::CREATED);

    assert_eq!(
        paths(&a),
        ["/ok?x=1", "/status/201"],
        "the prefix is rewritten"
    );
    assert_eq!(paths(&b), ["/ok", "/ab"], "the path is forwarded unchanged");
}

#[tokio::test]
async fn the_upstream_sees_its_host_and_x_forwarded_headers() {
    let a = Upstream::start().await;
    let proxy = start_proxy(&[&format!("/={}", a.url(""))]).await;

    let request = Request::get(proxy.url("/ok"))
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);

    let seen = only_request(&a);
    assert_eq!(seen.header("host"), Some(a.authority().as_str()));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "the client is appended"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    let proxy_host = proxy.addr().to_string();
    assert_eq!(seen.header("x-forwarded-host"), Some(proxy_host.as_str()));
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped() {
    let a = Upstream::start().await;
    let proxy = start_proxy(&[&format!("/={}", a.url(""))]).await;

    let request = Request::get(proxy.url("/ok"))
        .header("connection", "x-hop, keep-alive")
        .header("x-hop", "for this connection only")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("upgrade", "websocket")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);

    let seen = only_request(&a);
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
        "te",
    ] {
        assert_eq!(seen.header(hop), None, "{hop} was forwarded: {seen:?}");
    }
    // hyper-util's client speaks keep-alive HTTP/1.1 on its own connection; any
    // `connection` header it sends is its own, never the caller's token list.
    assert_ne!(seen.header("connection"), Some("x-hop, keep-alive"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let upstream = HopUpstream::start().await;
    let proxy = start_proxy(&[&format!("/=http://{}", upstream.0)]).await;

    let answer = get(&proxy.url("/")).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "hello");
    assert_eq!(answer.headers["x-end-to-end"], "kept");
    for hop in ["x-secret", "keep-alive", "proxy-authenticate"] {
        assert!(
            !answer.headers.contains_key(hop),
            "{hop}: {:?}",
            answer.headers
        );
    }
}

#[tokio::test]
async fn a_1_mib_request_body_is_streamed_through_whole() {
    let a = Upstream::start().await;
    let proxy = start_proxy(&[&format!("/={}", a.url(""))]).await;
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();

    let request = Request::post(proxy.url("/echo"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(body.clone())))
        .expect("valid request");
    let answer = send(request).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), body.len());
    assert!(answer.body == body, "the echoed body differs");
    assert_eq!(only_request(&a).body.len(), body.len());
}

#[tokio::test]
async fn a_streamed_response_arrives_chunk_by_chunk() {
    let a = Upstream::start().await;
    let proxy = start_proxy(&[&format!("/={}", a.url(""))]).await;
    let client = client();

    let exchange = async {
        let started = Instant::now();
        let request = Request::get(proxy.url("/stream/4/200"))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let mut body = client
            .request(request)
            .await
            .expect("an answer")
            .into_body();
        let first = body.frame().await.expect("a frame").expect("no error");
        let first_after = started.elapsed();
        let rest = body.collect().await.expect("the rest").to_bytes();
        (first, first_after, rest, started.elapsed())
    };
    let (first, first_after, rest, total) = tokio::time::timeout(STEP, exchange)
        .await
        .expect("the exchange finished in time");

    assert_eq!(first.into_data().expect("data"), "chunk-0\n");
    assert_eq!(rest, "chunk-1\nchunk-2\nchunk-3\n");
    assert!(
        first_after + Duration::from_millis(400) < total,
        "the first chunk came after {first_after:?}, everything after {total:?}"
    );
}

#[tokio::test]
async fn a_dead_upstream_opens_its_own_breaker_while_the_other_serves() {
    let a = Upstream::start().await;
    let dead = refused_addr();
    let proxy = start_proxy_with(
        &[
            &format!("/dead/=http://{dead}/"),
            &format!("/={}", a.url("")),
        ],
        &["--breaker-failures", "3", "--breaker-open-ms", "30000"],
    )
    .await;

    let mut statuses = Vec::new();
    for _ in 0..10 {
        let answer = get(&proxy.url("/dead/anything")).await;
        statuses.push(answer.status);
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            let problem = answer.problem();
            assert_eq!(problem["type"], "urn:upstream-guard:problem:circuit-open");
            assert_eq!(problem["upstream"], dead.to_string());
            assert!(answer.headers.contains_key("retry-after"));
            break;
        }
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            answer.problem()["type"],
            "urn:upstream-guard:problem:connect"
        );
    }
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert_eq!(get(&proxy.url("/ok")).await.status, StatusCode::OK);

    let report = get(&proxy.url("/_guard/breakers")).await;
    assert_eq!(report.status, StatusCode::OK);
    let report: serde_json::Value =
        serde_json::from_slice(&report.body).expect("the breakers report is JSON");
    let breakers = &report["breakers"];
    assert_eq!(breakers[dead.to_string()]["state"], "open", "{report}");
    assert_eq!(breakers[a.authority()]["state"], "closed", "{report}");
    assert_eq!(
        breakers.as_object().map(|o| o.len()),
        Some(2),
        "one breaker per upstream: {report}"
    );
    assert_eq!(report["routes"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_request_without_a_route_is_404() {
    let a = Upstream::start().await;
    let proxy = start_proxy(&[&format!("/api={}", a.url(""))]).await;

    assert_eq!(
        get(&proxy.url("/other")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&proxy.url("/apis")).await.status, StatusCode::NOT_FOUND);
    assert!(a.requests().is_empty());
}

#[tokio::test]
async fn bad_arguments_exit_2_with_usage() {
    for args in [
        &["--bogus", "1"][..],
        &[][..],
        &["--route", "no-slash=http://127.0.0.1:1"][..],
        &["--route", "/=https://127.0.0.1:1"][..],
    ] {
        let output = REVERSE_PROXY.run_to_exit(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("usage:"), "{args:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// The example process
// ---------------------------------------------------------------------------

/// Starts the proxy with these routes and waits for it to listen; dropping it
/// kills the process.
async fn start_proxy(routes: &[&str]) -> ExampleProcess {
    start_proxy_with(routes, &[]).await
}

/// Starts the proxy with these routes and extra flags.
async fn start_proxy_with(routes: &[&str], flags: &[&str]) -> ExampleProcess {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    for route in routes {
        args.extend(["--route", route]);
    }
    args.extend(flags);
    REVERSE_PROXY.start(&args).await
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

/// The paths an upstream received, in order.
fn paths(upstream: &Upstream) -> Vec<String> {
    upstream.requests().into_iter().map(|r| r.path).collect()
}

/// The one request an upstream received.
fn only_request(upstream: &Upstream) -> Recorded {
    let mut seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.remove(0)
}

/// An upstream that answers every request with hop-by-hop headers in its
/// response: `Connection` naming `X-Secret`, `Keep-Alive` and
/// `Proxy-Authenticate`.
struct HopUpstream(SocketAddr, tokio::task::JoinHandle<()>);

impl HopUpstream {
    async fn start() -> HopUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a bound listener's address");
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = "HTTP/1.1 200 OK\r\n\
                        connection: x-secret, close\r\n\
                        x-secret: internal\r\n\
                        keep-alive: timeout=5\r\n\
                        proxy-authenticate: Basic\r\n\
                        x-end-to-end: kept\r\n\
                        content-length: 5\r\n\r\nhello";
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        HopUpstream(addr, task)
    }
}

impl Drop for HopUpstream {
    fn drop(&mut self) {
        self.1.abort();
    }
}
