//! Instruction counts (callgrind, through gungraun) of one call through each peer:
//! poll_ready, call, the one poll that completes it, and dropping the future and
//! the response. The request is built, and a first call made to warm lazy state up
//! (tracing callsites, thread-locals), in the setup, which is not counted.
//!
//! Calls are driven with a no-op waker inside the tokio runtime context (every peer
//! answers on the first poll), so no executor is counted.
//!
//! Run: `cargo bench --bench instructions` (needs valgrind and
//! `cargo install gungraun-runner --version 0.20.0`). Building it
//! (`cargo bench --no-run`) needs neither.

use std::hint::black_box;

use gungraun::{library_benchmark, library_benchmark_group, main};
use http::{Request, Response, StatusCode};
use tower::Service;

#[macro_use]
mod support;

use support::{call_now, inner, Body, Peer, Scenario, Template};

/// A peer ready to make one call: its runtime, and the call with its request.
pub struct Prepared {
    rt: tokio::runtime::Runtime,
    call: Box<dyn FnMut() -> StatusCode>,
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
    let mut request = Some(make());
    let call = Box::new(move || {
        let request = request.take().expect("one call per benchmark");
        let _keep = &make;
        call_now(&mut svc, request).status()
    });
    Prepared { rt, call }
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
fn one_call(prepared: Prepared) -> (StatusCode, Prepared) {
    run(prepared)
}

#[library_benchmark]
#[bench::direct(args = ("/"), setup = prepare_axum)]
#[bench::guarded(args = ("/guarded"), setup = prepare_axum)]
fn axum_request(prepared: Prepared) -> (StatusCode, Prepared) {
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
library_benchmark_group!(name = axum_app, benchmarks = [axum_request]);

main!(library_benchmark_groups = peers, axum_app);
