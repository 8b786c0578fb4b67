//! Heap allocations per call through each peer, counted by a wrapping global
//! allocator, printed as a markdown table.
//!
//! Requests are built before the counted window opens; the window covers
//! poll_ready, call, completing the future, and dropping it and the response.
//! Calls are driven with a no-op waker inside a tokio runtime context (every peer
//! answers on the first poll), as in the instruction-count benchmark, except in two
//! columns, where a call may have to wait and each call is `block_on`'d instead:
//! the two-thread column (a peer's lock can be contended; one multi-thread
//! runtime), and the retry column (the backoff sleeps; a paused current-thread
//! runtime). The `bare` row shows that the harness itself allocates nothing.
//!
//! Run: `cargo bench --bench allocations`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::ready;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use tower::Service;

#[macro_use]
mod support;

use support::{
    call, call_now, drain, inner, ok_body, Body, ManyKeys, OpenPeer, Peer, Scenario, Template,
};

/// Counts every allocation (and reallocation) made through the global allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Allocations of at least `POST_BODY_LEN` bytes: a copy of the body would be one.
static LARGE: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if size >= support::POST_BODY_LEN {
        LARGE.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged,
// so `System`'s guarantees are ours; counting touches only atomics and never
// allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy, Default)]
struct Counts {
    allocs: u64,
    bytes: u64,
    large: u64,
}

impl Counts {
    fn now() -> Counts {
        Counts {
            allocs: ALLOCS.load(Ordering::SeqCst),
            bytes: BYTES.load(Ordering::SeqCst),
            large: LARGE.load(Ordering::SeqCst),
        }
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            allocs: self.allocs - before.allocs,
            bytes: self.bytes - before.bytes,
            large: self.large - before.large,
        }
    }
}

/// Per-call averages.
#[derive(Clone, Copy)]
struct PerCall {
    allocs: f64,
    bytes: f64,
    large: f64,
}

impl PerCall {
    fn of(counts: Counts, calls: usize) -> PerCall {
        let n = calls as f64;
        PerCall {
            allocs: counts.allocs as f64 / n,
            bytes: counts.bytes as f64 / n,
            large: counts.large as f64 / n,
        }
    }
}

const CALLS: usize = 10_000;
const WARM_UP: usize = 100;
/// Requests in the retry column: each retried once, within the default budget's
/// reserve of 100 retries per 10 s.
const RETRIED_REQUESTS: usize = 50;
const RETRY_WARM_UP: usize = 10;

/// Calls `svc` with `CALLS` requests on this thread.
fn single<S, ResB>(svc: S, scenario: Scenario) -> PerCall
where
    S: Service<Request<Body>, Response = Response<ResB>>,
{
    single_with(svc, scenario, Template::request)
}

/// Calls `svc` with `CALLS` requests made by `make` on this thread.
fn single_with<S, ReqB, ResB>(
    mut svc: S,
    scenario: Scenario,
    make: fn(&Template) -> Request<ReqB>,
) -> PerCall
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let rt = support::current_thread_runtime();
    let _entered = rt.enter();
    let template = Template::new(scenario);
    for _ in 0..WARM_UP {
        assert_eq!(call_now(&mut svc, make(&template)).status(), StatusCode::OK);
    }
    let requests: Vec<_> = (0..CALLS).map(|_| make(&template)).collect();
    let before = Counts::now();
    for request in requests {
        drop(call_now(&mut svc, request));
    }
    PerCall::of(Counts::now().since(before), CALLS)
}

/// Calls clones of `svc` from two threads at once, `CALLS` requests each, inside
/// one multi-thread runtime. A call may have to wait here (a peer's lock can be
/// contended), so each is `block_on`'d rather than polled once.
fn two_threads<S, ResB>(svc: S, scenario: Scenario) -> PerCall
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    const THREADS: usize = 2;
    let rt = support::multi_thread_runtime(THREADS);
    let handle = rt.handle();
    // Everyone (the threads and this one) meets: built, start, done, counted.
    let built = Barrier::new(THREADS + 1);
    let start = Barrier::new(THREADS + 1);
    let done = Barrier::new(THREADS + 1);
    let counted = Barrier::new(THREADS + 1);
    let counts = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let mut svc = svc.clone();
                let (built, start, done, counted) = (&built, &start, &done, &counted);
                scope.spawn(move || {
                    let template = Template::new(scenario);
                    // Meet at every barrier even if a call panics, or the others
                    // would wait forever; the panic is re-raised after.
                    let warm = catch_unwind(AssertUnwindSafe(|| {
                        for _ in 0..WARM_UP {
                            drop(handle.block_on(call(&mut svc, template.request())));
                        }
                    }));
                    let requests: Vec<_> = (0..CALLS).map(|_| template.request()).collect();
                    built.wait();
                    start.wait();
                    let run = warm.and_then(|()| {
                        catch_unwind(AssertUnwindSafe(|| {
                            for request in requests {
                                drop(handle.block_on(call(&mut svc, request)));
                            }
                        }))
                    });
                    done.wait();
                    counted.wait();
                    if let Err(panic) = run {
                        resume_unwind(panic);
                    }
                })
            })
            .collect();
        built.wait();
        let before = Counts::now();
        start.wait();
        done.wait();
        let after = Counts::now();
        counted.wait();
        for worker in workers {
            if let Err(panic) = worker.join() {
                resume_unwind(panic);
            }
        }
        after.since(before)
    });
    PerCall::of(counts, CALLS * THREADS)
}

thread_local! {
    /// Whether the next call of [`flaky`] answers 503.
    static FAIL_NEXT: Cell<bool> = const { Cell::new(true) };
    /// Where the caller's body bytes live.
    static EXPECTED_BODY: Cell<usize> = const { Cell::new(0) };
    /// Attempts whose body bytes were not the caller's (a copy).
    static COPIED: Cell<u64> = const { Cell::new(0) };
    /// Where the failed (first) attempt's body bytes were.
    static FIRST_ATTEMPT_BODY: Cell<usize> = const { Cell::new(0) };
    /// Retries whose body bytes were not the first attempt's (a copy per attempt).
    static REPLAY_DIFFERS: Cell<u64> = const { Cell::new(0) };
    static ATTEMPTS: Cell<u64> = const { Cell::new(0) };
}

/// An upstream that answers every other call with 503 (so each request fails once
/// and succeeds on its retry) and checks where the body bytes it gets live: the
/// caller's bytes, and, on the retry, the same bytes as on the first attempt.
fn flaky<B>() -> impl support::Upstream<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    tower::service_fn(|request: Request<B>| {
        let mut body = request.into_body();
        let mut cx = Context::from_waker(Waker::noop());
        let at = match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().map_or(0, |d| d.as_ptr() as usize),
            _ => 0,
        };
        if at != EXPECTED_BODY.get() {
            COPIED.set(COPIED.get() + 1);
        }
        ATTEMPTS.set(ATTEMPTS.get() + 1);
        let fail = FAIL_NEXT.get();
        FAIL_NEXT.set(!fail);
        if fail {
            FIRST_ATTEMPT_BODY.set(at);
        } else if at != FIRST_ATTEMPT_BODY.get() {
            REPLAY_DIFFERS.set(REPLAY_DIFFERS.get() + 1);
        }
        let mut response = Response::new(ok_body());
        if fail {
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        ready(Ok(response))
    })
}

/// The retry column's result.
struct Retried {
    per_request: PerCall,
    attempts_per_request: f64,
    copied: u64,
    replay_differs: u64,
}

/// POST 4 KiB (with an `Idempotency-Key`, so the guard may resend it) to an
/// upstream that fails the first attempt of every request.
fn retried<S, ResB>(svc: S) -> Retried
where
    S: Service<Request<Body>, Response = Response<ResB>>,
{
    retried_with(svc, Template::request)
}

/// Like [`retried`], with requests made by `make`.
fn retried_with<S, ReqB, ResB>(mut svc: S, make: fn(&Template) -> Request<ReqB>) -> Retried
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let template = Template::new(Scenario::Post4k).with_header("idempotency-key", "order-7f3a2c9e");
    EXPECTED_BODY.set(template.body().as_ptr() as usize);
    FAIL_NEXT.set(true);
    for _ in 0..RETRY_WARM_UP {
        let status = rt.block_on(call(&mut svc, make(&template))).status();
        assert_eq!(status, StatusCode::OK, "warm-up request was not retried");
    }
    COPIED.set(0);
    ATTEMPTS.set(0);
    REPLAY_DIFFERS.set(0);
    let requests: Vec<_> = (0..RETRIED_REQUESTS).map(|_| make(&template)).collect();
    let before = Counts::now();
    for request in requests {
        let response = rt.block_on(call(&mut svc, request));
        assert_eq!(response.status(), StatusCode::OK, "request was not retried");
    }
    let counts = Counts::now().since(before);
    Retried {
        per_request: PerCall::of(counts, RETRIED_REQUESTS),
        attempts_per_request: ATTEMPTS.get() as f64 / RETRIED_REQUESTS as f64,
        copied: COPIED.get(),
        replay_differs: REPLAY_DIFFERS.get(),
    }
}

/// A 4 KiB body arriving as four 1 KiB frames, with an exact size hint (as a
/// `Content-Length` request read from the network does): the guard must join the
/// frames into one buffer to replay them.
struct Chunked {
    chunks: [Option<Bytes>; CHUNKS],
    next: usize,
}

const CHUNKS: usize = 4;

impl Chunked {
    fn request(template: &Template) -> Request<Chunked> {
        let body = template.body();
        let size = body.len() / CHUNKS;
        let chunks = std::array::from_fn(|i| Some(body.slice(i * size..(i + 1) * size)));
        template.request_with(Chunked { chunks, next: 0 })
    }
}

impl HttpBody for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let next = self.next;
        let chunk = self.chunks.get_mut(next).and_then(Option::take);
        self.next += 1;
        Poll::Ready(chunk.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= CHUNKS
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let left = self.chunks.iter().flatten().map(Bytes::len).sum::<usize>();
        http_body::SizeHint::with_exact(left as u64)
    }
}

/// The guard (default config) over a chunked POST: once straight through, once
/// with a retry.
fn guard_chunked() -> (PerCall, Retried) {
    let layer = upstream_guard::UpstreamGuardLayer::new();
    let once = single_with(
        tower::Layer::layer(&layer, inner::<upstream_guard::RequestBody<Chunked>>()),
        Scenario::Post4k,
        Chunked::request,
    );
    let retried = retried_with(
        tower::Layer::layer(&layer, flaky::<upstream_guard::RequestBody<Chunked>>()),
        Chunked::request,
    );
    (once, retried)
}

/// The harness itself, driven like `retried`, over an upstream that always answers.
fn retried_control() -> PerCall {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let mut svc = inner::<Body>();
    let template = Template::new(Scenario::Post4k);
    for _ in 0..RETRY_WARM_UP {
        rt.block_on(call(&mut svc, template.request()));
    }
    let requests: Vec<_> = (0..RETRIED_REQUESTS).map(|_| template.request()).collect();
    let before = Counts::now();
    for request in requests {
        drop(rt.block_on(call(&mut svc, request)));
    }
    PerCall::of(Counts::now().since(before), RETRIED_REQUESTS)
}

/// The app of `examples/bench_server.rs`: one trivial handler, directly at `/` and
/// through `UpstreamGuardLayer::new()` (`Router::layer`) at `/guarded`.
fn axum_app() -> axum::Router {
    async fn handler() -> &'static str {
        "ok"
    }
    let guarded = axum::Router::new()
        .route("/guarded", axum::routing::get(handler))
        .layer(upstream_guard::UpstreamGuardLayer::new());
    axum::Router::new()
        .route("/", axum::routing::get(handler))
        .merge(guarded)
}

/// Allocations per request through the end-to-end benchmark's axum app, in
/// process: the router and the handler's response included, the HTTP server not.
/// As `axum::serve` does, the router gets its state (`with_state`) once, so layers
/// are applied to the routes once, not per request; and the URI and header are
/// reference-counted, as hyper's are.
fn axum_path(path: &'static str) -> PerCall {
    let rt = support::current_thread_runtime();
    let _entered = rt.enter();
    let mut app = axum_app().with_state(());
    let request = || {
        Request::get(http::Uri::from_static(path))
            .header(
                http::header::HOST,
                HeaderValue::from_static("127.0.0.1:8080"),
            )
            .body(axum::body::Body::empty())
            .expect("valid request")
    };
    for _ in 0..WARM_UP {
        assert_eq!(call_now(&mut app, request()).status(), StatusCode::OK);
    }
    let requests: Vec<_> = (0..CALLS).map(|_| request()).collect();
    let before = Counts::now();
    for request in requests {
        drop(call_now(&mut app, request));
    }
    PerCall::of(Counts::now().since(before), CALLS)
}

/// Allocations per rejection by an open circuit (for `OpenPeer::Bare`, per
/// answered call), the response body read to its end; and the body's length.
fn open_circuit<S, ResB>(peer: OpenPeer, mut svc: S) -> (PerCall, usize)
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    ResB: HttpBody,
{
    let rt = support::current_thread_runtime();
    let _entered = rt.enter();
    let template = Template::new(Scenario::Get);
    let mut len = 0;
    for _ in 0..WARM_UP {
        let response = call_now(&mut svc, template.request());
        assert_eq!(response.status(), peer.status(), "{}", peer.name());
        len = drain(response.into_body());
    }
    let requests: Vec<_> = (0..CALLS).map(|_| template.request()).collect();
    let before = Counts::now();
    for request in requests {
        drain(call_now(&mut svc, request).into_body());
    }
    (PerCall::of(Counts::now().since(before), CALLS), len)
}

/// Allocations per call of GETs cycling over `keys` authorities, after every
/// authority was called twice (the registry and its map at their steady size).
fn many_keys<S, ResB>(mut svc: S, keys: usize) -> PerCall
where
    S: Service<Request<Body>, Response = Response<ResB>>,
{
    let rt = support::current_thread_runtime();
    let _entered = rt.enter();
    let source = ManyKeys::new(keys);
    let warm = 2 * source.keys() as u64;
    for i in 0..warm {
        assert_eq!(
            call_now(&mut svc, source.request(i)).status(),
            StatusCode::OK
        );
    }
    let requests: Vec<_> = (warm..warm + CALLS as u64)
        .map(|i| source.request(i))
        .collect();
    let before = Counts::now();
    for request in requests {
        drop(call_now(&mut svc, request));
    }
    PerCall::of(Counts::now().since(before), CALLS)
}

/// The size of the future `svc.call` returns for a GET: what is moved around
/// (and, under axum, boxed) per request.
fn future_size<S>(mut svc: S) -> usize
where
    S: Service<Request<Body>>,
{
    let rt = support::current_thread_runtime();
    let _entered = rt.enter();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let template = Template::new(Scenario::Get);
    let future = svc.call(template.request());
    std::mem::size_of_val(&future)
}

struct Row {
    peer: Peer,
    get: PerCall,
    post: PerCall,
    get_2t: PerCall,
    retried: Option<Retried>,
}

fn measure(peer: Peer) -> Row {
    let get = with_peer!(peer, inner, svc => single(svc, Scenario::Get));
    let post = with_peer!(peer, inner, svc => single(svc, Scenario::Post4k));
    let get_2t = with_peer!(peer, inner, svc => two_threads(svc, Scenario::Get));
    let retried = if peer.retries() {
        Some(with_peer!(peer, flaky, svc => retried(svc)))
    } else {
        None
    };
    Row {
        peer,
        get,
        post,
        get_2t,
        retried,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks rows by name.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let rows: Vec<Row> = Peer::ALL
        .into_iter()
        .filter(|p| p.name().contains(&filter))
        .map(measure)
        .collect();
    let control = retried_control();
    let chunked = Peer::Guard.name().contains(&filter).then(guard_chunked);

    println!("## Heap allocations per call\n");
    println!(
        "{CALLS} calls per cell ({RETRIED_REQUESTS} requests in the retry column), after \
         {WARM_UP} warm-up calls; requests are built outside the counted window."
    );
    println!();
    println!(
        "| peer | GET allocs/call | GET bytes/call | POST 4 KiB allocs/call | POST 4 KiB bytes/call \
         | POST allocs ≥ 4 KiB/call | GET, 2 threads allocs/call |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} |",
            row.peer.name(),
            row.get.allocs,
            row.get.bytes,
            row.post.allocs,
            row.post.bytes,
            row.post.large,
            row.get_2t.allocs,
        );
    }
    println!();
    println!("## POST 4 KiB retried once (upstream answers 503, then 200)\n");
    println!(
        "Per request (both attempts, the backoff sleep included). The upstream checks \
         on every attempt where the body bytes live: the caller's bytes (a one-frame body \
         is kept as it is), and on the retry the same bytes as on the first attempt. A \
         body of 4 frames must be joined into one buffer, so its attempts are not on \
         the caller's bytes; its retries must still be on that one buffer."
    );
    println!();
    println!(
        "| peer | body | attempts/request | allocs/request | bytes/request \
         | allocs ≥ 4 KiB/request | attempts not on the caller's bytes \
         | retries not on the first attempt's bytes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| bare (harness control, no retry) | `Full` | 1.00 | {:.2} | {:.0} | {:.2} | – | – |",
        control.allocs, control.bytes, control.large
    );
    let retried_rows = rows
        .iter()
        .filter_map(|row| Some((row.peer.name(), "`Full`", row.retried.as_ref()?)))
        .chain(
            chunked
                .iter()
                .map(|(_, r)| (Peer::Guard.name(), "4 frames", r)),
        );
    for (name, body, r) in retried_rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {} | {} |",
            name,
            body,
            r.attempts_per_request,
            r.per_request.allocs,
            r.per_request.bytes,
            r.per_request.large,
            r.copied,
            r.replay_differs,
        );
    }
    if Peer::Guard.name().contains(&filter) {
        let direct = axum_path("/");
        let guarded = axum_path("/guarded");
        println!();
        println!("## Through the end-to-end benchmark's axum app, in process\n");
        println!(
            "GET with a `Host` header through `axum::Router` (`examples/bench_server.rs`'s \
             app); the handler's response included, the HTTP server not."
        );
        println!();
        println!("| path | allocs/request | bytes/request |");
        println!("|---|---:|---:|");
        for (path, c) in [("`/` (no guard)", direct), ("`/guarded`", guarded)] {
            println!("| {path} | {:.2} | {:.0} |", c.allocs, c.bytes);
        }
    }
    let open_rows: Vec<_> = OpenPeer::ALL
        .into_iter()
        .filter(|p| p.name().contains(&filter))
        .map(|peer| (peer, with_open_peer!(peer, svc => open_circuit(peer, svc))))
        .collect();
    if !open_rows.is_empty() {
        println!();
        println!("## Open circuit: a GET rejected without calling the upstream\n");
        println!(
            "{CALLS} rejections per row, the response body read to its end; `bare_200` is \
             the upstream answering 200, for reference."
        );
        println!();
        println!("| row | allocs/call | bytes/call | response body bytes |");
        println!("|---|---:|---:|---:|");
        for (peer, (c, len)) in &open_rows {
            println!(
                "| {} | {:.2} | {:.0} | {} |",
                peer.name(),
                c.allocs,
                c.bytes,
                len
            );
        }
    }
    let key_rows: Vec<_> = Peer::MANY_KEYS
        .into_iter()
        .filter(|p| p.name().contains(&filter))
        .map(|peer| {
            let one = with_peer!(peer, inner, svc => many_keys(svc, 1));
            let many = with_peer!(peer, inner, svc => many_keys(svc, support::MANY_KEYS));
            (peer, one, many)
        })
        .collect();
    if !key_rows.is_empty() {
        println!();
        println!("## Many keys: GETs cycling over many upstream authorities\n");
        println!(
            "{CALLS} calls per cell, after two warm-up cycles over every authority; \
             `upstream_guard` has the default registry of 1024 keys (10,000 authorities \
             evict), `upstream_guard_max_keys_16384` holds them all."
        );
        println!();
        println!(
            "| row | 1 authority allocs/call | bytes/call | {} authorities allocs/call | bytes/call |",
            support::MANY_KEYS
        );
        println!("|---|---:|---:|---:|---:|");
        for (peer, one, many) in &key_rows {
            println!(
                "| {} | {:.2} | {:.0} | {:.2} | {:.0} |",
                peer.name(),
                one.allocs,
                one.bytes,
                many.allocs,
                many.bytes
            );
        }
    }
    let sizes: Vec<_> = Peer::ALL
        .into_iter()
        .chain(Peer::DIAGNOSTIC)
        .filter(|p| p.name().contains(&filter))
        .map(|peer| (peer, with_peer!(peer, inner, svc => future_size(svc))))
        .collect();
    if !sizes.is_empty() {
        println!();
        println!(
            "## Size of the response future (GET)
"
        );
        println!("| peer | bytes |");
        println!("|---|---:|");
        for (peer, size) in &sizes {
            println!("| {} | {} |", peer.name(), size);
        }
    }
    if let Some((once, _)) = &chunked {
        println!();
        println!("## POST 4 KiB as four 1 KiB frames (exact length), no retry\n");
        println!("| peer | allocs/call | bytes/call | allocs ≥ 4 KiB/call |");
        println!("|---|---:|---:|---:|");
        println!(
            "| {} | {:.2} | {:.0} | {:.2} |",
            Peer::Guard.name(),
            once.allocs,
            once.bytes,
            once.large
        );
    }
}
