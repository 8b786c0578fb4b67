//! Runs the built `gateway` example (`examples/gateway.rs`) in proxy mode in front
//! of the fault upstream, and checks what it answers over real HTTP.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test gateway_example`), build the example first
//! with `cargo build --example gateway`.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use support::upstream::{refused_addr, Upstream};

/// How long the example may take to print its `listening on` line.
const STARTUP: Duration = Duration::from_secs(20);
/// Upper bound for any other single step.
const STEP: Duration = Duration::from_secs(10);
/// The guard settings every proxy in these tests runs with.
const ATTEMPT_TIMEOUT_MS: u64 = 300;
const DEADLINE_MS: u64 = 800;

/// The example binary, next to this test binary's `deps/` directory.
fn example_binary() -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's own path");
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps/");
    let path = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the gateway example is not built (looked for {}); run `cargo build --example gateway` \
         or a plain `cargo test`, which builds examples",
        path.display()
    );
    path
}

/// The example running in proxy mode; dropping it kills the process.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Proxy {
    /// Starts the proxy in front of `upstream` and waits for it to listen.
    async fn start(upstream: &str) -> Proxy {
        let mut child = Command::new(example_binary())
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(["--attempt-timeout-ms", &ATTEMPT_TIMEOUT_MS.to_string()])
            .args(["--deadline-ms", &DEADLINE_MS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the gateway example");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let mut proxy = Proxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
        };
        match tokio::time::timeout(STARTUP, listening_addr(stdout)).await {
            Ok(Some(addr)) => proxy.addr = addr,
            Ok(None) => panic!(
                "the gateway exited without listening; stderr:\n{}",
                proxy.stderr()
            ),
            Err(_) => panic!(
                "the gateway did not print `listening on` within {STARTUP:?}; stderr:\n{}",
                proxy.stderr()
            ),
        }
        proxy
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads stdout until the `listening on http://ADDR` line; `None` at EOF. The rest
/// of stdout is drained in the background so the proxy never blocks on it.
async fn listening_addr(stdout: impl AsyncRead + Unpin + Send + 'static) -> Option<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = line.trim().strip_prefix("listening on http://") {
            let addr = addr.parse().expect("`listening on` names a socket address");
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Some(addr);
        }
    }
    None
}

/// Collects a child's stderr in the background.
fn drain(stderr: impl AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = sink.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    text
}

/// Runs the example with `args` to completion (it is killed after [`STEP`]).
async fn run_to_exit(args: &[&str]) -> Output {
    let output = Command::new(example_binary())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(STEP, output)
        .await
        .unwrap_or_else(|_| panic!("the gateway {args:?} did not exit within {STEP:?}"))
        .expect("run the gateway example")
}

/// A collected response.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// The problem+json body, after checking the content type and `status` field.
    fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..]),
            "not a problem+json response: {:?} {:?}",
            self.status,
            self.headers
        );
        let problem: serde_json::Value =
            serde_json::from_slice(&self.body).expect("the problem body is valid JSON");
        assert_eq!(problem["status"], self.status.as_u16(), "{problem}");
        problem
    }
}

/// Sends one request through a plain client and reads the whole response.
async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let exchange = async {
        let response = client.request(request).await.expect("the gateway answered");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the body arrived").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("the exchange finished in time")
}

async fn get(url: &str) -> Answer {
    send(
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}

#[tokio::test]
async fn healthy_responses_pass_through_whole() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&upstream.url("")).await;

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
    let proxy = Proxy::start(&upstream.url("")).await;

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
    let proxy = Proxy::start(&format!("http://{}", refused_addr())).await;

    let answer = get(&proxy.url("/anything")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let problem = answer.problem();
    assert_eq!(problem["status"], 502);
    assert_eq!(problem["type"], "urn:upstream-guard:problem:connect");
}

#[tokio::test]
async fn a_hanging_upstream_answers_504_within_the_deadline() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&upstream.url("")).await;

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
    let output = run_to_exit(&["--bogus"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("--bogus"), "stderr:\n{stderr}");
    assert!(stderr.contains("usage:"), "stderr:\n{stderr}");
}

#[tokio::test]
async fn a_zero_attempt_timeout_exits_2_naming_the_field() {
    let output = run_to_exit(&["--attempt-timeout-ms", "0"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("attempt_timeout"), "stderr:\n{stderr}");
}
