//! Runs a built example (`examples/<name>.rs` or `examples/<name>/main.rs`) as a
//! child process and talks to it over real HTTP: [`Example::start`] spawns it
//! and waits for its `listening on http://ADDR` line, [`Example::run_to_exit`] and
//! [`Example::run_to_exit_within`] run it to its end, and [`send`] / [`get`]
//! collect whole answers, each step bounded in time.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; a test that
//! runs alone (`cargo test --test NAME`) needs `cargo build --example <name>`
//! first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// How long an example may take to print its `listening on` line.
pub const STARTUP: Duration = Duration::from_secs(20);
/// Upper bound for any other single step.
pub const STEP: Duration = Duration::from_secs(10);

/// A built example, by name (`gateway` for `examples/gateway/main.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Example(pub &'static str);

impl Example {
    /// The example binary, next to this test binary's `deps/` directory.
    pub fn binary(self) -> PathBuf {
        let name = self.0;
        let test_binary = std::env::current_exe().expect("the test binary's own path");
        let profile_dir = test_binary
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test binary lives in target/<profile>/deps/");
        let path = profile_dir
            .join("examples")
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        assert!(
            path.is_file(),
            "the {name} example is not built (looked for {}); run \
             `cargo build --example {name}` or a plain `cargo test`, which builds examples",
            path.display()
        );
        path
    }

    /// Starts the example with `args` and waits (up to [`STARTUP`]) for it to
    /// print `listening on http://ADDR`.
    pub async fn start(self, args: &[&str]) -> ExampleProcess {
        let name = self.0;
        let mut child = Command::new(self.binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn the {name} example: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let addr = match tokio::time::timeout(STARTUP, listening_addr(stdout)).await {
            Ok(Some(addr)) => addr,
            Ok(None) => panic!(
                "the {name} example exited without listening; stderr:\n{}",
                text(&stderr)
            ),
            Err(_) => panic!(
                "the {name} example did not print `listening on` within {STARTUP:?}; \
                 stderr:\n{}",
                text(&stderr)
            ),
        };
        ExampleProcess {
            name,
            child,
            addr,
            stderr,
        }
    }

    /// Runs the example with `args` to completion (it is killed after [`STEP`]).
    pub async fn run_to_exit(self, args: &[&str]) -> Output {
        self.run_to_exit_within(args, STEP).await
    }

    /// Runs the example with `args` to completion, for examples that take
    /// longer than [`STEP`] (it is killed after `limit`).
    pub async fn run_to_exit_within(self, args: &[&str], limit: Duration) -> Output {
        let name = self.0;
        let output = Command::new(self.binary())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(limit, output)
            .await
            .unwrap_or_else(|_| panic!("the {name} example {args:?} did not exit within {limit:?}"))
            .unwrap_or_else(|error| panic!("run the {name} example: {error}"))
    }
}

/// A running example; dropping it kills the process (and prints its stderr if
/// the test is failing).
pub struct ExampleProcess {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl ExampleProcess {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }
}

impl Drop for ExampleProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("{} stderr:\n{}", self.name, self.stderr());
        }
    }
}

fn text(shared: &Mutex<String>) -> String {
    shared.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Reads stdout until the `listening on http://ADDR` line; `None` at EOF. The rest
/// of stdout is drained in the background so the example never blocks on it.
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

/// A collected response.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The problem+json body, after checking the content type and `status` field.
    pub fn problem(&self) -> serde_json::Value {
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

/// A plain HTTP/1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request through a plain client and reads the whole response
/// (bounded by [`STEP`]).
pub async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client = client();
    let exchange = async {
        let response = client.request(request).await.expect("the example answered");
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

/// `GET url` with an empty body, through [`send`].
pub async fn get(url: &str) -> Answer {
    send(
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}
