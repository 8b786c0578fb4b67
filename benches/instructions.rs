//! Instruction counts (callgrind, through gungraun) of one call through each peer:
//! poll_ready, call, the one poll that completes it, and dropping the future and
//! the response. The request is built, and a first call made to warm lazy state up
//! (tracing callsites, thread-locals), in the setup, which is not counted.
//!
//! Calls are driven with a no-op waker inside the tokio runtime context (every peer
//! answers on the first poll), so no executor is counted.
//!
//! Groups: `peers` (GET and POST 4 KiB through each peer, plus diagnostic GET
//! rows that take the guard apart), `open_circuit` (a GET rejected by an open
//! breaker, the response body read to its end), `many_keys` (a GET to one of
//! 10,000 authorities after every one was called once), `axum_app`,
//! `cloned_service` (a GET through a fresh clone of the guard, as axum's router
//! and hyper's `TowerToHyperService` call it: per-service state is cold).
//!
//! Run: `cargo bench --bench instructions` (needs valgrind and
//! `cargo install gungraun-runner --version 0.20.0`). Building it
//! (`cargo bench --no-run`) needs neither.

use std::hint::black_box;

use gungraun::{library_benchmark, library_benchmark_group, main};
use http::{Request, Response, StatusCode};
use http_body::Body as HttpBody;
use tower::Service;

#[macro_use]
mod support;

use support::{call_now, drain, inner, Body, ManyKeys, OpenPeer, Peer, Scenario, Template};

/// A peer ready to make one call: its runtime, and the call with its request.
pub struct Prepared {
    rt: tokio::runtime::Runtime,
    call: Box<dyn FnMut() -> StatusCode>,
}

impl Prepared {
    /// The measured call: `request` sent once through `svc`. `keep` (what the
    /// request was built from) lives as long as the call, so dropping the
    /// request only drops references, as with a connection's read buffer.
    fn one_call<S, ReqB, ResB, K>(
        rt: tokio::runtime::Runtime,
        mut svc: S,
        request: Request<ReqB>,
        keep: K,
    ) -> Prepared
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + 'static,
        ReqB: 'static,
        K: 'static,
    {
        let mut request = Some(request);
        let call = Box::new(move || {
            let request = request.take().expect("one call per benchmark");
            let _keep = &keep;
            call_now(&mut svc, request).status()
        });
        Prepared { rt, call }
    }
}

fn prepare(peer: Peer, scenario: Scenario) -> Prepared {
    with_peer!(peer, inner, svc => prepare_with(scenario, svc))
}

fn prepare_with<S, ResB>(scenario: Scenario, svc: S) -> Prepared
where
    S: Service<Request<Body>, Response = Response<ResB>> + 'static,
{
    let template = Template::new(scenario);
    // The template outlives the call (as a connection's read buffer outlives the
    // headers parsed from it): dropping the request only drops references.
    prepare_with_request(svc, move || template.request())
}

/// Makes a warm-up call and builds the request of the measured call.
fn prepare_with_request<S, ReqB, ResB, M>(mut svc: S, make: M) -> Prepared
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + 'static,
    ReqB: 'static,
    M: Fn() -> Request<ReqB> + 'static,
{
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        let warm = call_now(&mut svc, make()).status();
        assert_eq!(warm, StatusCode::OK);
    }
    let request = make();
    Prepared::one_call(rt, svc, request, make)
}

/// A rejection by an open circuit (or, for `OpenPeer::Bare`, the upstream's
/// answer), the response body read to its end.
fn prepare_open(peer: OpenPeer) -> Prepared {
    with_open_peer!(peer, svc => prepare_open_with(peer, svc))
}

fn prepare_open_with<S, ResB>(peer: OpenPeer, mut svc: S) -> Prepared
where
    S: Service<Request<Body>, Response = Response<ResB>> + 'static,
    ResB: HttpBody,
{
    let template = Template::new(Scenario::Get);
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        let warm = call_now(&mut svc, template.request());
        assert_eq!(warm.status(), peer.status());
        assert!(drain(warm.into_body()) > 0);
    }
    let mut request = Some(template.request());
    let call = Box::new(move || {
        let request = request.take().expect("one call per benchmark");
        let _keep = &template;
        let response = call_now(&mut svc, request);
        let status = response.status();
        black_box(drain(response.into_body()));
        status
    });
    Prepared { rt, call }
}

/// `peer` after one call to each of `keys` authorities; the measured call goes to
/// the first authority again (for the guard's default registry of 1024 keys and
/// 10,000 authorities, long evicted: an insert that evicts; for a registry that
/// holds them all, a lookup that misses the thread's cache of recent keys).
fn prepare_keys((peer, keys): (Peer, usize)) -> Prepared {
    with_peer!(peer, inner, svc => prepare_keys_with(keys, svc))
}

fn prepare_keys_with<S, ResB>(keys: usize, mut svc: S) -> Prepared
where
    S: Service<Request<Body>, Response = Response<ResB>> + 'static,
{
    let requests = ManyKeys::new(keys);
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        for i in 0..requests.keys() as u64 {
            assert_eq!(
                call_now(&mut svc, requests.request(i)).status(),
                StatusCode::OK
            );
        }
    }
    let request = requests.request(requests.keys() as u64);
    Prepared::one_call(rt, svc, request, requests)
}

/// A guard over a failing upstream whose registry of 1024 keys is full of open
/// breakers (2048 authorities called once each); the measured call goes to an
/// authority it has not seen: an insert that must evict among open breakers,
/// then the upstream's 503, which trips the new key's breaker.
fn prepare_evict_open(max_keys: usize) -> Prepared {
    let mut svc = support::guard_failing_keys(max_keys);
    let requests = ManyKeys::new(2 * max_keys + 1);
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        for i in 0..2 * max_keys as u64 {
            let status = call_now(&mut svc, requests.request(i)).status();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    let request = requests.request(2 * max_keys as u64);
    Prepared::one_call(rt, svc, request, requests)
}

/// The same guard with room in its registry: one authority called (and tripped)
/// in the setup; the measured call goes to a second one: an insert without
/// eviction, then the upstream's 503, which trips the new key's breaker.
fn prepare_insert(max_keys: usize) -> Prepared {
    let mut svc = support::guard_failing_keys(max_keys);
    let requests = ManyKeys::new(2);
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        let status = call_now(&mut svc, requests.request(0)).status();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let request = requests.request(1);
    Prepared::one_call(rt, svc, request, requests)
}

/// The end-to-end benchmark's axum app (`examples/bench_server.rs`), in process:
/// GET `/` (no guard) or `/guarded` through `axum::Router`, as `axum::serve`
/// drives it (state applied once; URI and header reference-counted, as hyper's).
fn prepare_axum(path: &'static str) -> Prepared {
    async fn handler() -> &'static str {
        "ok"
    }
    let guarded = axum::Router::new()
        .route("/guarded", axum::routing::get(handler))
        .layer(upstream_guard::UpstreamGuardLayer::new());
    let app = axum::Router::new()
        .route("/", axum::routing::get(handler))
        .merge(guarded)
        .with_state(());
    let request = move || {
        Request::get(http::Uri::from_static(path))
            .header(
                http::header::HOST,
                http::HeaderValue::from_static("127.0.0.1:8080"),
            )
            .body(axum::body::Body::empty())
            .expect("valid request")
    };
    prepare_with_request(app, request)
}

/// `UpstreamGuardLayer::new()` called through a fresh clone for every request,
/// as axum's router and hyper's `TowerToHyperService` do: whatever a service
/// keeps between calls is gone, only state shared by the clones is warm. The
/// clone (and dropping it) is part of the measured call.
fn prepare_cloned(scenario: Scenario) -> Prepared {
    let svc = tower::Layer::layer(
        &upstream_guard::UpstreamGuardLayer::new(),
        inner::<upstream_guard::RequestBody<Body>>(),
    );
    let template = Template::new(scenario);
    let rt = support::current_thread_runtime();
    {
        let _entered = rt.enter();
        let warm = call_now(&mut svc.clone(), template.request()).status();
        assert_eq!(warm, StatusCode::OK);
    }
    let mut request = Some(template.request());
    let call = Box::new(move || {
        let request = request.take().expect("one call per benchmark");
        let _keep = &template;
        call_now(&mut svc.clone(), request).status()
    });
    Prepared { rt, call }
}

#[library_benchmark]
#[bench::bare_get(args = (Peer::Bare, Scenario::Get), setup = prepare)]
#[bench::bare_post_4k(args = (Peer::Bare, Scenario::Post4k), setup = prepare)]
#[bench::tower_timeout_get(args = (Peer::Timeout, Scenario::Get), setup = prepare)]
#[bench::tower_timeout_post_4k(args = (Peer::Timeout, Scenario::Post4k), setup = prepare)]
#[bench::tower_retry_timeout_get(args = (Peer::RetryTimeout, Scenario::Get), setup = prepare)]
#[bench::tower_retry_timeout_post_4k(args = (Peer::RetryTimeout, Scenario::Post4k), setup = prepare)]
#[bench::resilience_get(args = (Peer::ResilienceBreaker, Scenario::Get), setup = prepare)]
#[bench::resilience_post_4k(args = (Peer::ResilienceBreaker, Scenario::Post4k), setup = prepare)]
#[bench::upstream_guard_get(args = (Peer::Guard, Scenario::Get), setup = prepare)]
#[bench::upstream_guard_post_4k(args = (Peer::Guard, Scenario::Post4k), setup = prepare)]
#[bench::upstream_guard_no_retry_get(args = (Peer::GuardNoRetry, Scenario::Get), setup = prepare)]
#[bench::upstream_guard_no_retry_post_4k(args = (Peer::GuardNoRetry, Scenario::Post4k), setup = prepare)]
#[bench::upstream_guard_no_breaker_get(args = (Peer::GuardNoBreaker, Scenario::Get), setup = prepare)]
#[bench::upstream_guard_no_retry_no_breaker_get(args = (Peer::GuardLean, Scenario::Get), setup = prepare)]
fn one_call(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::bare_200(args = (OpenPeer::Bare), setup = prepare_open)]
#[bench::upstream_guard_tripped(args = (OpenPeer::GuardTripped), setup = prepare_open)]
#[bench::upstream_guard_forced_open(args = (OpenPeer::GuardForcedOpen), setup = prepare_open)]
#[bench::resilience_forced_open_mapped(args = (OpenPeer::ResilienceForcedOpen), setup = prepare_open)]
fn rejection(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::bare_10k(args = ((Peer::Bare, support::MANY_KEYS)), setup = prepare_keys)]
#[bench::tower_retry_timeout_10k(args = ((Peer::RetryTimeout, support::MANY_KEYS)), setup = prepare_keys)]
#[bench::upstream_guard_1_key(args = ((Peer::Guard, 1)), setup = prepare_keys)]
#[bench::upstream_guard_10k_evicts(args = ((Peer::Guard, support::MANY_KEYS)), setup = prepare_keys)]
#[bench::upstream_guard_max_keys_16384_10k_lookup(args = ((Peer::GuardMaxKeys, support::MANY_KEYS)), setup = prepare_keys)]
fn keyed_call(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::upstream_guard_503_inserts_new_key(args = (1024), setup = prepare_insert)]
#[bench::upstream_guard_503_evicts_among_1024_open(args = (1024), setup = prepare_evict_open)]
fn failing_keyed_call(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::direct(args = ("/"), setup = prepare_axum)]
#[bench::guarded(args = ("/guarded"), setup = prepare_axum)]
fn axum_request(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::upstream_guard_get(args = (Scenario::Get), setup = prepare_cloned)]
fn cloned_per_request(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

/// Makes the prepared call inside the runtime's context.
#[inline(always)]
fn run(mut prepared: Prepared) -> (StatusCode, Prepared) {
    let status = {
        let _entered = prepared.rt.enter();
        (prepared.call)()
    };
    // Hand everything back: dropping the runtime is not part of the call.
    (black_box(status), prepared)
}

library_benchmark_group!(name = peers, benchmarks = [one_call]);
library_benchmark_group!(name = open_circuit, benchmarks = [rejection]);
library_benchmark_group!(
    name = many_keys,
    benchmarks = [keyed_call, failing_keyed_call]
);
library_benchmark_group!(name = axum_app, benchmarks = [axum_request]);
library_benchmark_group!(name = cloned_service, benchmarks = [cloned_per_request]);

main!(
    library_benchmark_groups = peers,
    open_circuit,
    many_keys,
    axum_app,
    cloned_service
);
