//! Hedging against a heavy-tailed upstream: latency percentiles with and
//! without hedging, and the extra upstream load hedging costs.
//!
//! The upstream is a hyper server on 127.0.0.1 whose requests take 2 ms, except
//! a random 5 % that take 200 ms (a GC pause, a cold cache, a slow disk). A
//! closed loop of 16 concurrent callers sends GETs through a guarded hyper-util
//! client; every row runs the same number of requests, and the rows are
//! interleaved in rounds so that a noisy neighbour hurts them all alike.
//!
//! Run: `cargo bench --bench hedging` (about a minute). Prints a markdown table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};
use upstream_guard::{HedgePolicy, RequestBody, RetryPolicy, UpstreamGuardLayer};

const CALLERS: usize = 16;
const REQUESTS_PER_ROUND: usize = 2_000;
const ROUNDS: usize = 3;
const BASE: Duration = Duration::from_millis(2);
const TAIL: Duration = Duration::from_millis(200);
const TAIL_SHARE: f64 = 0.05;

/// Starts the heavy-tailed upstream; counts the requests it receives.
async fn upstream(served: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<Incoming>| {
                    served.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let pause = if fastrand::f64() < TAIL_SHARE {
                            TAIL
                        } else {
                            BASE
                        };
                        tokio::time::sleep(pause).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Row {
    name: &'static str,
    hedge: Option<HedgePolicy>,
    latencies: Vec<Duration>,
    sent: u64,
    served: u64,
}

async fn run_round(row: &mut Row, addr: SocketAddr, served: &AtomicU64) {
    let mut builder = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::default());
    if let Some(hedge) = &row.hedge {
        builder = builder.hedge(hedge.clone());
    }
    let layer = builder.build().expect("valid guard");
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http::<RequestBody<Empty<Bytes>>>();
    let guarded = layer.layer(client);
    let url = format!("http://{addr}/");
    let before = served.load(Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (mut service, url, next) = (guarded.clone(), url.clone(), Arc::clone(&next));
        callers.spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < REQUESTS_PER_ROUND as u64 {
                let request = Request::get(&url).body(Empty::new()).expect("request");
                let started = Instant::now();
                let ready = service.ready().await.expect("infallible");
                let response = ready.call(request).await.expect("infallible");
                let _ = response.into_body().collect().await;
                seen.push(started.elapsed());
            }
            seen
        });
    }
    while let Some(seen) = callers.join_next().await {
        row.latencies.extend(seen.expect("caller"));
    }
    row.sent += REQUESTS_PER_ROUND as u64;
    row.served += served.load(Ordering::Relaxed) - before;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let served = Arc::new(AtomicU64::new(0));
        let addr = upstream(Arc::clone(&served)).await;
        let ten = Duration::from_millis(10);
        let mut rows: Vec<Row> = [
            ("no hedging", None),
            ("hedge after 10 ms", Some(HedgePolicy::after(ten))),
            ("hedge after 10 ms, up to 2", Some(HedgePolicy::after(ten).max_hedges(2))),
            (
                "hedge at p90 (min 3 ms)",
                Some(HedgePolicy::at_percentile(0.9).min_delay(Duration::from_millis(3))),
            ),
        ]
        .into_iter()
        .map(|(name, hedge)| Row { name, hedge, latencies: vec![], sent: 0, served: 0 })
        .collect();
        for round in 0..ROUNDS {
            for i in 0..rows.len() {
                let n = rows.len();
                let row = &mut rows[(i + round) % n];
                run_round(row, addr, &served).await;
            }
        }
        println!("| row | requests | p50 ms | p99 ms | p99.9 ms | max ms | upstream requests | extra load |");
        println!("|---|---|---|---|---|---|---|---|");
        for row in &mut rows {
            row.latencies.sort();
            let l = &row.latencies;
            let extra = row.served as f64 / row.sent as f64 - 1.0;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:+.1} % |",
                row.name,
                row.sent,
                ms(percentile(l, 0.5)),
                ms(percentile(l, 0.99)),
                ms(percentile(l, 0.999)),
                ms(l[l.len() - 1]),
                row.served,
                extra * 100.0,
            );
        }
    });
}
