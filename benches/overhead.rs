//! Wall-clock cost of one call through each peer, in process, over a trivial
//! always-ready upstream. "Overhead" is a row minus the `bare` row.
//!
//! Every row is driven the same way: `iter_custom`, one `block_on` per sample
//! running `iters` calls in a loop, each call building its request from a
//! template, waiting for readiness, calling, and dropping the response.
//!
//! - `get`, `post_4k`: one thread, a current-thread runtime. `get` also has the
//!   diagnostic rows that take the guard apart (`Peer::DIAGNOSTIC`).
//! - `get_threads/1`, `get_threads/2`: one service shared by 1 or 2 threads (each
//!   thread calls its own clone, as axum does per request), all inside one
//!   multi-thread runtime (`Handle::block_on` on each thread). The time is per call
//!   on each thread (the slowest thread's), so perfect scaling keeps it flat.
//! - `open_circuit`: a GET rejected by an open breaker, the response body read to
//!   its end (`OpenPeer`); `bare_200` is the upstream answering, for scale.
//! - `many_keys`: GETs cycling over 1 or 10,000 upstream authorities through one
//!   guard (per-authority breakers; `max_keys` 1024, the default, evicts;
//!   16,384 holds them all).
//! - `many_keys_threads`: the same with 10,000 authorities from 1 and 2 threads.
//! - `many_keys_failing`: every upstream failing, so every breaker in the
//!   registry is open (`consecutive_failures(1)`, no retries): what a registry
//!   insert costs when it has to evict among open breakers.
//!
//! Run: `cargo bench --bench overhead` (filter rows: `-- upstream_guard`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use http::{Request, Response, StatusCode};
use http_body::Body as HttpBody;
use tower::Service;

#[macro_use]
mod support;

use support::{call, drain, inner, Body, ManyKeys, OpenPeer, Peer, Scenario, Template};

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// The scenarios run on one thread.
fn single_thread(c: &mut Criterion) {
    let rt = support::current_thread_runtime();
    for scenario in Scenario::ALL {
        let mut group = c.benchmark_group(scenario.name());
        let diagnostic: &[Peer] = match scenario {
            Scenario::Get => &Peer::DIAGNOSTIC,
            Scenario::Post4k => &[],
        };
        for &peer in Peer::ALL.iter().chain(diagnostic) {
            with_peer!(peer, inner, svc => bench_one(&mut group, &rt, peer, scenario, svc));
        }
        group.finish();
    }
}

fn bench_one<S, ResB>(
    group: &mut Group<'_>,
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
    group: &mut Group<'_>,
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

/// A GET rejected by an open circuit, the response read to its end.
fn open_circuit(c: &mut Criterion) {
    let rt = support::current_thread_runtime();
    let mut group = c.benchmark_group("open_circuit");
    for peer in OpenPeer::ALL {
        with_open_peer!(peer, svc => bench_open(&mut group, &rt, peer, svc));
    }
    group.finish();
}

fn bench_open<S, ResB>(
    group: &mut Group<'_>,
    rt: &tokio::runtime::Runtime,
    peer: OpenPeer,
    mut svc: S,
) where
    S: Service<Request<Body>, Response = Response<ResB>>,
    ResB: HttpBody,
{
    let template = Template::new(Scenario::Get);
    let response = rt.block_on(call(&mut svc, template.request()));
    assert_eq!(response.status(), peer.status(), "{}", peer.name());
    assert!(
        drain(response.into_body()) > 0,
        "{}: empty body",
        peer.name()
    );
    group.bench_function(peer.name(), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let response = call(&mut svc, template.request()).await;
                    black_box(drain(black_box(response).into_body()));
                }
                start.elapsed()
            })
        })
    });
}

/// GETs cycling over 1 and 10,000 upstream authorities, one thread.
fn many_keys(c: &mut Criterion) {
    let rt = support::current_thread_runtime();
    let mut group = c.benchmark_group("many_keys");
    for keys in [1, support::MANY_KEYS] {
        let requests = ManyKeys::new(keys);
        for peer in Peer::MANY_KEYS {
            with_peer!(peer, inner, svc => bench_keys(&mut group, &rt, peer, &requests, svc));
        }
    }
    group.finish();
}

fn bench_keys<S, ResB>(
    group: &mut Group<'_>,
    rt: &tokio::runtime::Runtime,
    peer: Peer,
    requests: &ManyKeys,
    mut svc: S,
) where
    S: Service<Request<Body>, Response = Response<ResB>>,
{
    let keys = requests.keys() as u64;
    let mut next = 0;
    let id = BenchmarkId::new(peer.name(), format!("{keys}_keys"));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // Once, and only if this benchmark runs (not filtered out): every
                // key once, so that a registry that can hold them all does.
                while next < keys {
                    black_box(call(&mut svc, requests.request(next)).await);
                    next += 1;
                }
                let start = Instant::now();
                for i in next..next + iters {
                    black_box(call(&mut svc, requests.request(i)).await);
                }
                next += iters;
                start.elapsed()
            })
        })
    });
}

/// GETs cycling over 10,000 authorities from 1 and 2 threads sharing one guard.
fn many_keys_threads(c: &mut Criterion) {
    let rt = support::multi_thread_runtime(2);
    let handle = rt.handle();
    let mut group = c.benchmark_group("many_keys_threads");
    for threads in [1, 2] {
        for peer in [Peer::Bare, Peer::Guard, Peer::GuardMaxKeys] {
            with_peer!(peer, inner, svc => {
                bench_keys_threads(&mut group, handle, peer, threads, svc)
            });
        }
    }
    group.finish();
}

fn bench_keys_threads<S, ResB>(
    group: &mut Group<'_>,
    handle: &tokio::runtime::Handle,
    peer: Peer,
    threads: usize,
    svc: S,
) where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    let keys = support::MANY_KEYS as u64;
    let mut filled = false;
    group.bench_function(BenchmarkId::new(peer.name(), threads), |b| {
        b.iter_custom(|iters| {
            if !filled {
                // Once, and only if this benchmark runs: fill the registry with
                // every key (one thread, not timed).
                support::run_threads_with(
                    handle,
                    &svc,
                    1,
                    keys,
                    |_| ManyKeys::new(support::MANY_KEYS),
                    |r, i| r.request(i),
                );
                filled = true;
            }
            // Each thread starts at its own place in the cycle of keys.
            support::run_threads_with(
                handle,
                &svc,
                threads,
                iters,
                |thread| (ManyKeys::new(support::MANY_KEYS), thread as u64 * keys / 2),
                |(r, offset), i| r.request(i + offset),
            )
        })
    });
}

/// Every upstream failing: the registry fills with open breakers.
fn many_keys_failing(c: &mut Criterion) {
    let rt = support::current_thread_runtime();
    let mut group = c.benchmark_group("many_keys_failing");
    for (max_keys, keys) in [
        (1024, 1),
        (1024, support::MANY_KEYS),
        (support::MANY_KEYS_MAX, support::MANY_KEYS),
        (support::MANY_KEYS_MAX, 100_000),
    ] {
        let requests = ManyKeys::new(keys);
        let mut svc = support::guard_failing_keys(max_keys);
        // Until the registry is full of open breakers (every key once, or twice
        // the registry's size).
        let warm = (2 * keys as u64).min(2 * max_keys as u64 + 1);
        let mut next = 0;
        let id = BenchmarkId::new(
            format!("max_keys_{max_keys}"),
            format!("{keys}_authorities"),
        );
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    // Once, and only if this benchmark runs (not filtered out).
                    while next < warm {
                        let response = call(&mut svc, requests.request(next)).await;
                        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                        next += 1;
                    }
                    let start = Instant::now();
                    for i in next..next + iters {
                        black_box(call(&mut svc, requests.request(i)).await);
                    }
                    next += iters;
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
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
    targets = single_thread, shared_threads, open_circuit, many_keys, many_keys_threads,
        many_keys_failing
}
criterion_main!(benches);
