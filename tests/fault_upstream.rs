//! Self-tests for the fault-injecting upstream in `tests/support/upstream.rs`.

mod support;

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::upstream::{refused_addr, ReservedPort, Upstream};

/// Upper bound for any single step of a test.
const STEP: Duration = Duration::from_secs(10);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// Runs a future with an upper time bound, panicking if it is exceeded.
async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    bounded("request", client.request(req)).await
}

async fn get(
    client: &HttpClient,
    url: &str,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    send(client, req).await
}

async fn body_bytes(resp: Response<Incoming>) -> Result<Bytes, hyper::Error> {
    bounded("body", resp.into_body().collect())
        .await
        .map(|c| c.to_bytes())
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Writes `request` on a fresh connection and reads until EOF.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    bounded("raw exchange", async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok(out)
    })
    .await
}

/// Polls `cond` every 10 ms for up to 2 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ok_route_answers_and_records() {
    let up = Upstream::start().await;
    let client = client();
    let req = Request::get(up.url("/ok?x=1"))
        .header("x-request-id", "abc-123")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let resp = send(&client, req).await.expect("ok response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), Some("text/plain"));
    assert_eq!(header(&resp, "content-length"), Some("2"));
    assert_eq!(header(&resp, "x-upstream"), Some("fault"));
    assert_eq!(header(&resp, "x-request-id"), Some("abc-123"));
    assert_eq!(body_bytes(resp).await.expect("body"), "ok");

    let recorded = up.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "GET");
    assert_eq!(recorded[0].path, "/ok?x=1");
    assert_eq!(recorded[0].header("X-Request-Id"), Some("abc-123"));
    assert_eq!(recorded[0].header("host"), Some(up.authority().as_str()));
    assert!(recorded[0].body.is_empty());
    assert_eq!(up.count("/ok"), 1);
    assert_eq!(up.count("/echo"), 0);
    assert_eq!(up.url("/a?b"), format!("http://{}/a?b", up.addr()));
    assert_eq!(up.authority(), format!("127.0.0.1:{}", up.addr().port()));
    assert!(up.addr().ip().is_loopback());
}

#[tokio::test]
async fn unknown_path_is_404() {
    let up = Upstream::start().await;
    let resp = get(&client(), &up.url("/nope")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&resp, "x-upstream"), Some("fault"));
    assert_eq!(up.count("/nope"), 1);
}

#[tokio::test]
async fn echo_preserves_binary_body() {
    let up = Upstream::start().await;
    let payload: Vec<u8> = (0..10 * 1024u32)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 3)) as u8)
        .collect();
    assert!(payload.contains(&0) && payload.contains(&0xff));
    let req = Request::post(up.url("/echo"))
        .header("content-type", "application/x-test-binary")
        .body(Full::new(Bytes::from(payload.clone())))
        .expect("valid request");
    let resp = send(&client(), req).await.expect("echo response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-type"),
        Some("application/x-test-binary")
    );
    assert_eq!(header(&resp, "content-length"), Some("10240"));
    let body = body_bytes(resp).await.expect("body");
    assert_eq!(body.as_ref(), payload.as_slice());

    let recorded = up.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].body, payload);
    assert_eq!(recorded[0].header("content-length"), Some("10240"));
}

#[tokio::test]
async fn chunked_request_body_is_decoded_and_recorded() {
    let up = Upstream::start().await;
    let request: &[u8] = b"POST /echo HTTP/1.1\r\n\
        Host: test\r\n\
        Content-Type: text/plain\r\n\
        Transfer-Encoding: chunked\r\n\
        Connection: close\r\n\
        \r\n\
        5;name=value\r\nhello\r\n\
        7\r\n, world\r\n\
        A\r\n0123456789\r\n\
        0\r\n\
        X-Trailer: yes\r\n\
        \r\n";

    // Send it in tiny pieces so the parser has to cope with partial reads.
    let response = bounded("chunked exchange", async {
        let mut stream = TcpStream::connect(up.addr()).await.expect("connect");
        for piece in request.chunks(3) {
            stream.write_all(piece).await.expect("write");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("read");
        out
    })
    .await;
    let text = String::from_utf8(response).expect("utf-8 response");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 22\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello, world0123456789"), "{text}");

    let recorded = up.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].body, b"hello, world0123456789");
    assert_eq!(recorded[0].header("transfer-encoding"), Some("chunked"));
    assert_eq!(recorded[0].header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn status_and_retry_after() {
    let up = Upstream::start().await;
    let client = client();

    let resp = get(&client, &up.url("/status/503?retry_after=7"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "retry-after"), Some("7"));

    let resp = get(
        &client,
        &up.url("/status/429?retry_after=Wed%2C%2021%20Oct%202015%2007:28:00%20GMT"),
    )
    .await
    .expect("response");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&resp, "retry-after"),
        Some("Wed, 21 Oct 2015 07:28:00 GMT")
    );
    assert!(!body_bytes(resp).await.expect("body").is_empty());

    let resp = get(&client, &up.url("/status/500"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(header(&resp, "retry-after"), None);

    let resp = get(&client, &up.url("/status/204"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(body_bytes(resp).await.expect("body").is_empty());

    let resp = get(&client, &up.url("/status/abc"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    assert_eq!(up.count("/status/"), 5);
}

#[tokio::test]
async fn flaky_counts_per_key() {
    let up = Upstream::start().await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = get(&client, &up.url("/flaky/2/a")).await.expect("response");
        statuses.push(resp.status().as_u16());
        let body = body_bytes(resp).await.expect("body");
        let expected = if statuses.len() <= 2 { "flaky" } else { "ok" };
        assert_eq!(body, expected);
    }
    assert_eq!(statuses, [503, 503, 200]);

    // A different key has its own counter.
    let resp = get(&client, &up.url("/flaky/2/b")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // n = 0 never fails.
    let resp = get(&client, &up.url("/flaky/0/c")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);

    assert_eq!(up.count("/flaky/2/a"), 3);
    assert_eq!(up.count("/flaky/"), 5);
}

#[tokio::test]
async fn flaky_status_honours_code_and_retry_after() {
    let up = Upstream::start().await;
    let client = client();
    let url = up.url("/flaky-status/1/429/k?retry_after=3");
    let first = get(&client, &url).await.expect("response");
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&first, "retry-after"), Some("3"));
    let second = get(&client, &url).await.expect("response");
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(body_bytes(second).await.expect("body"), "ok");
}

#[tokio::test]
async fn reset_fails_the_client_and_is_recorded() {
    let up = Upstream::start().await;
    let req = Request::post(up.url("/reset"))
        .body(Full::new(Bytes::from_static(b"payload before reset")))
        .expect("valid request");
    let err = send(&client(), req).await.expect_err("reset must fail");
    assert!(
        !err.is_connect(),
        "the connection itself succeeded: {err:?}"
    );

    let recorded = up.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].path, "/reset");
    assert_eq!(recorded[0].body, b"payload before reset");

    // At the socket level it really is an RST, not a clean close.
    let err = raw_exchange(up.addr(), b"GET /reset HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect_err("reset must fail the read");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert_eq!(up.count("/reset"), 2);
}

#[tokio::test]
async fn flaky_reset_resets_first_n_then_ok() {
    let up = Upstream::start().await;
    let client = client();
    let url = up.url("/flaky-reset/1/key");
    assert!(get(&client, &url).await.is_err());
    let resp = get(&client, &url).await.expect("second attempt succeeds");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.count("/flaky-reset/1/key"), 2);
}

#[tokio::test]
async fn reset_after_headers_fails_the_body() {
    let up = Upstream::start().await;
    let resp = get(&client(), &up.url("/reset-after-headers"))
        .await
        .expect("head arrives before the reset");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), Some("100"));
    assert!(body_bytes(resp).await.is_err());
}

#[tokio::test]
async fn refused_addr_refuses() {
    let addr = refused_addr();
    assert!(addr.ip().is_loopback());
    let err = bounded("connect", TcpStream::connect(addr))
        .await
        .expect_err("nothing listens there");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    let err = get(&client(), &format!("http://{addr}/ok"))
        .await
        .expect_err("client must fail");
    assert!(err.is_connect(), "{err:?}");
}

#[tokio::test]
async fn hang_times_out_and_closes_when_the_client_leaves() {
    let up = Upstream::start().await;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_millis(300),
        client().get(up.url("/hang").parse().expect("uri")),
    )
    .await;
    assert!(result.is_err(), "hang must not answer");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(up.count("/hang"), 1);

    // Raw (on a fresh upstream, so the hyper connection above does not count):
    // nothing arrives; once the client goes away the server closes too.
    let up = Upstream::start().await;
    let mut stream = bounded("connect", TcpStream::connect(up.addr()))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
    assert!(read.is_err(), "hang must send nothing: {read:?}");
    assert_eq!(up.count("/hang"), 1);
    assert_eq!(up.open_connections(), 1);
    drop(stream);
    eventually("hung raw connection closed", || up.open_connections() == 0).await;
}

#[tokio::test]
async fn stream_delivers_all_chunks() {
    let up = Upstream::start().await;
    let started = Instant::now();
    let resp = get(&client(), &up.url("/stream/5/20"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "transfer-encoding"), Some("chunked"));
    assert_eq!(header(&resp, "content-length"), None);

    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = bounded("frame", body.frame()).await {
        if let Ok(data) = frame.expect("frame").into_data() {
            frames.push(data);
        }
    }
    let all: Vec<u8> = frames.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(all, b"chunk-0\nchunk-1\nchunk-2\nchunk-3\nchunk-4\n");
    assert!(frames.len() >= 2, "chunks arrive separately: {frames:?}");
    assert!(started.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn big_delivers_deterministic_bytes() {
    let up = Upstream::start().await;
    let size = 300_000usize;
    let resp = get(&client(), &up.url(&format!("/big/{size}")))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-length"),
        Some(size.to_string().as_str())
    );
    let body = body_bytes(resp).await.expect("body");
    assert_eq!(body.len(), size);
    assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[tokio::test]
async fn truncated_gives_a_body_error() {
    let up = Upstream::start().await;
    let resp = get(&client(), &up.url("/truncated"))
        .await
        .expect("head arrives");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), Some("100"));
    assert!(body_bytes(resp).await.is_err());

    // Raw: the connection is closed cleanly after exactly 50 body bytes.
    let raw = raw_exchange(up.addr(), b"GET /truncated HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("clean close");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end")
        + 4;
    assert_eq!(raw.len() - end, 50);
}

#[tokio::test]
async fn slow_body_arrives_in_two_parts() {
    let up = Upstream::start().await;
    let started = Instant::now();
    let resp = get(&client(), &up.url("/slow-body/300"))
        .await
        .expect("response");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "head comes first"
    );
    assert_eq!(body_bytes(resp).await.expect("body"), "0123456789");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let started = Instant::now();
    let resp = get(&client(), &up.url("/slow/100"))
        .await
        .expect("response");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn protocol_faults_give_client_errors() {
    let up = Upstream::start().await;
    let client = client();
    for path in ["/close", "/garbage", "/bad-content-length"] {
        let result = get(&client, &up.url(path)).await;
        assert!(result.is_err(), "{path} must fail: {result:?}");
        assert_eq!(up.count(path), 1, "{path} recorded");
    }
    let raw = raw_exchange(up.addr(), b"GET /garbage HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("garbage then close");
    assert!(raw.starts_with(b"this is not http\r\n\r\n"));
    assert!(raw.len() > 20);
    let raw = raw_exchange(up.addr(), b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("clean close");
    assert!(raw.is_empty());
}

#[tokio::test]
async fn stall_body_sends_part_then_stalls() {
    let up = Upstream::start().await;
    let resp = get(&client(), &up.url("/stall-body"))
        .await
        .expect("head arrives");
    assert_eq!(header(&resp, "content-length"), Some("100"));
    let collected =
        tokio::time::timeout(Duration::from_millis(300), resp.into_body().collect()).await;
    assert!(collected.is_err(), "body must stall");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let up = Upstream::start().await;
    let client = client();
    for _ in 0..2 {
        let resp = get(&client, &up.url("/ok")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp).await.expect("body"), "ok");
        // Let the client return the connection to its pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.count("/ok"), 2);
    assert_eq!(up.connections(), 1);

    // Raw pipelining: two requests in one write, answered in order, then
    // `Connection: close` on the second ends the connection.
    let raw = raw_exchange(
        up.addr(),
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc\
          GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("two responses");
    let text = String::from_utf8(raw).expect("utf-8");
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
    assert!(text.contains("\r\n\r\nabcHTTP/1.1 200 OK"), "{text}");
    assert_eq!(up.connections(), 2);
    eventually("connections closed", || up.open_connections() <= 1).await;
}

#[tokio::test]
async fn dropping_the_upstream_shuts_it_down() {
    let up = Upstream::start().await;
    let addr = up.addr();
    let mut stream = bounded("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    eventually("connection accepted", || up.open_connections() == 1).await;
    drop(up);
    // The open connection is closed by the server...
    let mut buf = [0u8; 8];
    let n = bounded("read after shutdown", stream.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    // ...and nothing listens any more.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "listener still accepting after drop");
}

#[tokio::test]
async fn a_reserved_port_refuses_until_it_listens_on_the_same_address() {
    let reserved = ReservedPort::new();
    let addr = reserved.addr();
    let refused = bounded("connect", TcpStream::connect(addr)).await;
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused)
    );

    let listener = reserved.listen().expect("listen on the reserved port");
    assert_eq!(listener.local_addr().expect("local_addr"), addr);
    let (accepted, connected) = bounded("connect and accept", async {
        tokio::join!(listener.accept(), TcpStream::connect(addr))
    })
    .await;
    assert!(accepted.is_ok() && connected.is_ok());
}
