//! The adaptive concurrency benchmark's load side (run by
//! `benches/adaptive_e2e.sh`): a real upstream on 127.0.0.1 with a fixed
//! capacity, the gateway example in front of it in one configuration after
//! another, and an open-loop load at a multiple of the upstream's capacity.
//!
//! The upstream serves `CAPACITY` requests at once, each in `SERVICE_MS`, and
//! queues the rest in arrival order (a tokio semaphore, then a sleep): it
//! never refuses work, like most servers, so what it cannot serve waits. The
//! load arrives at a fixed rate, whatever the answers (open loop: clients do
//! not slow down because the service does), `LOAD_FACTOR` times the
//! capacity.
//!
//! For each configuration it starts the gateway (`GATEWAY`, a built
//! `examples/gateway` binary; `GATEWAY_CPU` pins it with `taskset`), sends
//! load for `DURATION` seconds, and prints one markdown row over what was sent
//! after the first `WARMUP` seconds: goodput (`200`s per second, and as a
//! share of the capacity), the `200`s' latency, the requests shed with
//! `503 concurrency-limited` (how many, how fast, whether they carry
//! `Retry-After`), the `503 circuit-open`s, and everything else (`504`s,
//! errors, no answer within the client's 10 s).
//!
//! Without `GATEWAY` it prints how to run it and exits: `cargo bench` runs
//! every bench, and this one needs a gateway binary and a quiet machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The benchmark's settings, from the environment.
struct Settings {
    gateway: String,
    gateway_cpu: Option<String>,
    capacity: usize,
    service: Duration,
    load_factor: f64,
    duration: Duration,
    warmup: Duration,
    /// Gateway flag sets to compare, `;`-separated, each `name=flags`.
    variants: Vec<(String, Vec<String>)>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env(gateway: String) -> Settings {
        let capacity: usize = env_or("CAPACITY", 16);
        let default_variants = format!(
            "no limit=;static {low}=--concurrency-limit {low};static {high}=--concurrency-limit {high};\
             static {capacity} (oracle)=--concurrency-limit {capacity};\
             static {above} (oracle + 1)=--concurrency-limit {above};\
             adaptive=--adaptive-concurrency;adaptive, tolerance 0.1=--adaptive-concurrency 0.1",
            low = (capacity / 4).max(1),
            high = capacity * 8,
            above = capacity + 1,
        );
        let variants = env_or("VARIANTS", default_variants)
            .split(';')
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                let (name, flags) = v.split_once('=').unwrap_or((v, ""));
                let flags = flags.split_whitespace().map(str::to_owned).collect();
                (name.trim().to_owned(), flags)
            })
            .collect();
        Settings {
            gateway,
            gateway_cpu: std::env::var("GATEWAY_CPU").ok(),
            capacity,
            service: Duration::from_millis(env_or("SERVICE_MS", 50)),
            load_factor: env_or("LOAD_FACTOR", 4.0),
            duration: Duration::from_secs(env_or("DURATION", 20)),
            warmup: Duration::from_secs(env_or("WARMUP", 5)),
            variants,
        }
    }

    /// The upstream's capacity, in requests per second.
    fn capacity_per_sec(&self) -> f64 {
        self.capacity as f64 / self.service.as_secs_f64()
    }
}

fn main() -> Result<(), BoxError> {
    let Ok(gateway) = std::env::var("GATEWAY") else {
        println!("adaptive_e2e: skipped; run `bash benches/adaptive_e2e.sh` (it sets GATEWAY)");
        return Ok(());
    };
    let settings = Settings::from_env(gateway);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> Result<(), BoxError> {
    let upstream = start_upstream(settings.capacity, settings.service).await?;
    let rate = settings.capacity_per_sec() * settings.load_factor;
    println!(
        "upstream: {} at once, {:?} each: capacity {:.0} requests/s; load {:.0} requests/s ({}x), \
         {} s per run, the first {} s not counted",
        settings.capacity,
        settings.service,
        settings.capacity_per_sec(),
        rate,
        settings.load_factor,
        settings.duration.as_secs(),
        settings.warmup.as_secs(),
    );
    println!();
    println!(
        "| gateway | goodput (200/s) | of capacity | 200 p50 | 200 p99 | shed (503 concurrency-limited/s) | shed p99 | shed with Retry-After, its values | 503 circuit-open/s | other/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, flags) in &settings.variants {
        let mut gateway = start_gateway(&settings, upstream, flags).await?;
        let addr = gateway.addr;
        let tally = drive(addr, rate, settings.duration, settings.warmup).await;
        gateway.child.kill().await.ok();
        println!("{}", tally.row(name, &settings));
        // Let the upstream's queue of abandoned requests drain between runs.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The upstream
// ---------------------------------------------------------------------------

/// Serves `capacity` requests at once, `service` each; queues the rest.
async fn start_upstream(capacity: usize, service: Duration) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(capacity));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let slots = Arc::clone(&slots);
            tokio::spawn(async move {
                let serve = service_fn(move |_request: Request<Incoming>| {
                    let slots = Arc::clone(&slots);
                    async move {
                        let _slot = slots.acquire().await;
                        tokio::time::sleep(service).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), serve)
                    .await;
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

/// Starts the gateway in front of `upstream` with `flags`; waits for its
/// `listening on http://ADDR` line (at most 10 s).
async fn start_gateway(
    settings: &Settings,
    upstream: SocketAddr,
    flags: &[String],
) -> Result<Gateway, BoxError> {
    let mut command = match &settings.gateway_cpu {
        Some(cpu) => {
            let mut command = Command::new("taskset");
            command.args(["-c", cpu, &settings.gateway]);
            command
        }
        None => Command::new(&settings.gateway),
    };
    command
        .args(["--listen", "127.0.0.1:0", "--upstream"])
        .arg(format!("http://{upstream}"))
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(gateway_log()?)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("listening on http://") {
                return Ok::<_, BoxError>(addr.trim().parse::<SocketAddr>()?);
            }
        }
        Err("the gateway exited before listening".into())
    })
    .await??;
    Ok(Gateway { child, addr })
}

/// Where the gateway's log goes: the file `GATEWAY_LOG` names (appended to;
/// with `RUST_LOG=upstream_guard=debug` it shows every recomputed limit), or
/// nowhere.
fn gateway_log() -> Result<Stdio, BoxError> {
    let Ok(path) = std::env::var("GATEWAY_LOG") else {
        return Ok(Stdio::null());
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Stdio::from(file))
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

/// What the requests sent after the warm-up got.
#[derive(Default)]
struct Tally {
    ok: Vec<Duration>,
    shed: Vec<Duration>,
    /// The `Retry-After` of each shed request that had one, in seconds.
    retry_after: Vec<u64>,
    circuit_open: usize,
    other: usize,
    seconds: f64,
}

/// How one request ended.
enum Answer {
    Ok,
    /// `503 concurrency-limited`, with its `Retry-After` in seconds.
    Shed {
        retry_after: Option<u64>,
    },
    /// `503 circuit-open`.
    CircuitOpen,
    Other,
}

/// Sends `rate` requests per second to `gateway` for `duration`, open-loop.
async fn drive(gateway: SocketAddr, rate: f64, duration: Duration, warmup: Duration) -> Tally {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(connector);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    let mut tasks = JoinSet::new();
    while start.elapsed() < duration {
        ticker.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            let counted = start.elapsed() >= warmup;
            let client = client.clone();
            tasks.spawn(async move {
                let sent_at = Instant::now();
                let answer = send(&client, gateway).await;
                (counted, answer, sent_at.elapsed())
            });
        }
    }
    let mut tally = Tally {
        seconds: (duration - warmup).as_secs_f64(),
        ..Tally::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let Ok((true, answer, latency)) = joined else {
            continue;
        };
        match answer {
            Answer::Ok => tally.ok.push(latency),
            Answer::Shed { retry_after } => {
                tally.shed.push(latency);
                tally.retry_after.extend(retry_after);
            }
            Answer::CircuitOpen => tally.circuit_open += 1,
            Answer::Other => tally.other += 1,
        }
    }
    tally
}

/// One request, and its whole body, within 10 s.
async fn send(client: &Client<HttpConnector, Empty<Bytes>>, gateway: SocketAddr) -> Answer {
    let exchange = async {
        let request = Request::get(format!("http://{gateway}/"))
            .body(Empty::new())
            .ok()?;
        let response = client.request(request).await.ok()?;
        let status = response.status();
        let retry_after = (response.headers().get(http::header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, retry_after, body))
    };
    let limited = |body: &[u8]| contains(body, b"problem:concurrency-limited");
    let open = |body: &[u8]| contains(body, b"problem:circuit-open");
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Some((StatusCode::OK, _, _))) => Answer::Ok,
        Ok(Some((StatusCode::SERVICE_UNAVAILABLE, retry_after, body))) if limited(&body) => {
            Answer::Shed { retry_after }
        }
        Ok(Some((StatusCode::SERVICE_UNAVAILABLE, _, body))) if open(&body) => Answer::CircuitOpen,
        _ => Answer::Other,
    }
}

impl Tally {
    fn row(&self, name: &str, settings: &Settings) -> String {
        let goodput = self.ok.len() as f64 / self.seconds;
        let share = goodput / settings.capacity_per_sec() * 100.0;
        format!(
            "| {name} | {goodput:.0} | {share:.0} % | {} | {} | {:.0} | {} | {} | {:.0} | {:.0} |",
            ms(percentile(&self.ok, 0.50)),
            ms(percentile(&self.ok, 0.99)),
            self.shed.len() as f64 / self.seconds,
            ms(percentile(&self.shed, 0.99)),
            self.retry_after_cell(),
            self.circuit_open as f64 / self.seconds,
            self.other as f64 / self.seconds,
        )
    }
}

impl Tally {
    /// How many shed requests had a `Retry-After`, and its range.
    fn retry_after_cell(&self) -> String {
        let (Some(low), Some(high)) =
            (self.retry_after.iter().min(), self.retry_after.iter().max())
        else {
            return "-".to_owned();
        };
        let share = self.retry_after.len() as f64 / self.shed.len() as f64 * 100.0;
        match low == high {
            true => format!("{share:.0} %, {low} s"),
            false => format!("{share:.0} %, {low}–{high} s"),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn percentile(latencies: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied()
}

fn ms(latency: Option<Duration>) -> String {
    match latency {
        Some(d) if d < Duration::from_millis(10) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        None => "-".to_owned(),
    }
}
