//! Wall-clock cost of one call through each peer, in process, over a trivial
//! always-ready upstream. "Overhead" is a row minus the `bare` row.
//!
//! Every row is driven the same way: `iter_custom`, one `block_on` per sample
//! running `iters` calls in a loop, each call building its request from a
//! template, waiting for readiness, calling, and dropping the response.
//!
//! - `get`, `post_4k`: one thread, a current-thread runtime.
//! - `get_threads/1`, `get_threads/2`: one service shared by 1 or 2 threads (each
//!   thread calls its own clone, as axum does per request), all inside one
//!   multi-thread runtime (`Handle::block_on` on each thread). The time is per call
//!   on each thread (the slowest thread's), so perfect scaling keeps it flat.
//!
//! Run: `cargo bench --bench overhead` (filter rows: `-- upstream_guard`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use http::{Request, Response, StatusCode};
use tower::Service;

#[macro_use]
mod support;

use support::{call, inner, Body, Peer, Scenario, Template};

/// The scenarios run on one thread.
fn single_thread(c: &mut Criterion) {
    let rt = support::current_thread_runtime();
    for scenario in Scenario::ALL {
        let mut group = c.benchmark_group(scenario.name());
        for peer in Peer::ALL {
            with_peer!(peer, inner, svc => bench_one(&mut group, &rt, peer, scenario, svc));
        }
        group.finish();
    }
}

fn bench_one<S, ResB>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    peer: Peer,
    scenario: Scenario,
    mut svc: S,
) where
    S: Service<Request<Body>, Response = Response<ResB>>,
{
    let template = Template::new(scenario);
    let status = rt.block_on(call(&mut svc, template.request())).status();
    assert_eq!(status, StatusCode::OK, "{}", peer.name());
    group.bench_function(peer.name(), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(call(&mut svc, template.request()).await);
                }
                start.elapsed()
            })
        })
    });
}

/// GET through one service shared by 1 and 2 threads.
fn shared_threads(c: &mut Criterion) {
    let rt = support::multi_thread_runtime(2);
    let mut group = c.benchmark_group("get_threads");
    for threads in [1, 2] {
        for peer in Peer::ALL {
            with_peer!(peer, inner, svc => {
                bench_threads(&mut group, &rt, peer, threads, svc)
            });
        }
    }
    group.finish();
}

fn bench_threads<S, ResB>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    peer: Peer,
    threads: usize,
    svc: S,
) where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    let handle = rt.handle();
    group.bench_function(BenchmarkId::new(peer.name(), threads), |b| {
        b.iter_custom(|iters| support::run_threads(handle, &svc, threads, iters))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = single_thread, shared_threads
}
criterion_main!(benches);
