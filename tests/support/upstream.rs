//! A fault-injecting HTTP/1.1 upstream server for tests and examples.
//!
//! This is a raw TCP server (not hyper) so that it can produce protocol-level
//! faults: resets, truncated bodies, garbage, stalls and hangs.  It listens on
//! `127.0.0.1:0` only.  Every request is recorded (with its fully decoded
//! body) *before* the route's behaviour runs, so a request whose connection is
//! reset still shows up in [`Upstream::requests`].
//!
//! The file is self-contained (std, tokio and http only) so an example can use
//! it with `#[path = "../tests/support/upstream.rs"] mod upstream;`.
//!
//! Routes (by path; a query string after `?` is allowed everywhere):
//!
//! | path | behaviour |
//! |------|-----------|
//! | `/ok` | 200 `text/plain` body `ok` |
//! | `/echo` | 200, request body echoed byte for byte, request content-type copied |
//! | `/status/{code}` | that status (200..=999), body `status {code}`; `?retry_after=V` adds `retry-after: V` (V percent-decoded) |
//! | `/hang` | sends nothing; holds the socket up to 60 s (or until the peer closes), then closes |
//! | `/slow/{ms}` | waits `ms` (capped at 60 s), then 200 `ok` |
//! | `/slow-body/{ms}` | `content-length: 10`, sends `01234`, waits `ms`, sends `56789` |
//! | `/stall-body` | `content-length: 100`, sends 10 bytes, holds up to 60 s, then closes |
//! | `/reset` | TCP RST without a response |
//! | `/reset-after-headers` | 200 head with `content-length: 100`, 10 bytes, then RST |
//! | `/close` | clean close (FIN) without a response |
//! | `/garbage` | `this is not http\r\n\r\n` plus binary junk, then close |
//! | `/truncated` | 200 with `content-length: 100`, 50 bytes, then clean close |
//! | `/bad-content-length` | `content-length: abc`, some bytes, then close |
//! | `/flaky/{n}/{key}` | first `n` requests for `key` get 503 `flaky`, later ones 200 `ok` |
//! | `/flaky-reset/{n}/{key}` | first `n` requests for `key` are reset, later ones 200 `ok` |
//! | `/flaky-status/{n}/{code}/{key}` | first `n` get `code` (body `flaky`, `retry_after` honoured), then 200 `ok` |
//! | `/seq/{key}/{steps}` | request `n` for `key` takes step `n` of the comma-separated `steps` (the last repeats): `ok`, `slow{ms}` (200 `ok` after `ms`), `slow{ms}:{code}` (that status after `ms`), a status code (body `seq`), `reset`, `hang` |
//! | `/stream/{chunks}/{ms}` | chunked 200; chunks `chunk-0\n`, `chunk-1\n`, ... with `ms` between them |
//! | `/big/{bytes}` | 200 with `bytes` bytes, byte `i` = `(i % 251) as u8` |
//! | anything else | 404 |
//!
//! Malformed numeric parameters (e.g. `/slow/abc`) get a 400.  The flaky
//! counters are per route kind and key (`/flaky/1/a` and `/flaky-reset/1/a`
//! count separately) and are shared by all connections.
//!
//! Every response carries `x-upstream: fault` and echoes `x-request-id` when
//! the request had one; non-chunked responses carry `content-length`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Maximum size of a request head (request line + header fields).
const MAX_HEAD: usize = 64 * 1024;
/// Maximum size of a decoded request body.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Maximum length of a chunk-size line or a trailer line.
const MAX_LINE: usize = 8 * 1024;
/// How long a hang / stall lasts at most before the connection is closed.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// Bound on any single read or write (including idle keep-alive waits).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest delay any route parameter may ask for.
const MAX_DELAY_MS: u64 = 60_000;
/// Largest `/big/{bytes}` body.
const MAX_BIG: u64 = 256 * 1024 * 1024;
/// Largest `/stream/{chunks}` count.
const MAX_CHUNKS: u64 = 100_000;
/// Piece size used when writing large bodies.
const WRITE_PIECE: usize = 16 * 1024;

/// A running fault-injecting upstream.  Dropping it shuts the server down
/// (the accept task is aborted, which aborts every connection task).
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// One request as received by the upstream.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Request target including the query, exactly as sent.
    pub path: String,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The full decoded body (chunked encoding removed).
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A loopback address (127.0.0.1:port) where nothing listens: connecting is refused.
///
/// The port stays bound, never listening, until the test process exits: a port
/// merely freed again could be handed to the next `bind(0)` (a proxy under test,
/// say), and the "refused" upstream would answer.
pub fn refused_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<ReservedPort>> = std::sync::Mutex::new(Vec::new());
    let reserved = ReservedPort::new();
    let addr = reserved.addr();
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(reserved);
    addr
}

/// A server on 127.0.0.1 that accepts connections and never answers: a replica
/// that hangs, whatever the path. Each connection is held until the peer
/// closes it or 60 s pass. Dropping it stops accepting.
pub struct Silent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("silent upstream: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("silent upstream: local_addr");
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, live) = (Arc::clone(&accepted), Arc::clone(&open));
        let accept = tokio::spawn(async move {
            let mut held = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let live = Arc::clone(&live);
                live.fetch_add(1, Ordering::SeqCst);
                held.spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::time::timeout(MAX_HOLD, async {
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Silent {
            addr,
            accepted,
            open,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections still held open by the peer.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A loopback port that refuses connections until it is told to listen: an
/// upstream that is down and later comes back on the same address.
///
/// The socket stays bound the whole time (bound, not listening, is what makes
/// connecting fail), so no other `bind(0)` can take the port in between, and
/// [`ReservedPort::listen`] cannot fail with "address in use".
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// Binds `127.0.0.1:0` without listening.
    pub fn new() -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("reserved port: a TCP socket");
        socket
            .bind((Ipv4Addr::LOCALHOST, 0).into())
            .expect("reserved port: bind 127.0.0.1:0");
        let addr = socket.local_addr().expect("reserved port: local_addr");
        ReservedPort { socket, addr }
    }

    /// The address connections are refused on (until [`ReservedPort::listen`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts listening on the same address; needs a tokio runtime.
    pub fn listen(self) -> io::Result<TcpListener> {
        self.socket.listen(1024)
    }
}

impl Upstream {
    /// Binds `127.0.0.1:0` and spawns the accept loop on the current tokio runtime.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("fault upstream: bind 127.0.0.1:0");
        Upstream::serve(listener)
    }

    /// Serves on a listener already bound (e.g. a [`ReservedPort`] that starts
    /// listening: an upstream coming back on its old address).
    pub fn serve(listener: TcpListener) -> Upstream {
        let addr = listener
            .local_addr()
            .expect("fault upstream: local_addr of a bound listener");
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Upstream {
            addr,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path_and_query}`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// `127.0.0.1:PORT`.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    /// Snapshot of all requests received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Number of recorded requests whose path starts with `path_prefix`.
    pub fn count(&self, path_prefix: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .count()
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Number of currently open connections.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    flaky: Mutex<HashMap<String, u64>>,
    connections: AtomicUsize,
    open: AtomicUsize,
}

impl Shared {
    fn record(&self, rec: Recorded) {
        lock(&self.requests).push(rec);
    }

    /// Increments the counter for `kind/key` and returns the new (1-based) count.
    fn bump(&self, kind: &str, key: &str) -> u64 {
        let mut map = lock(&self.flaky);
        let n = map.entry(format!("{kind}/{key}")).or_insert(0);
        *n += 1;
        *n
    }
}

/// Locks a mutex, ignoring poisoning (the data is plain bookkeeping).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Decrements the open-connection count when the connection task ends or is aborted.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: Arc<Shared>) -> OpenGuard {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Accept loop and connection handling
// ---------------------------------------------------------------------------

/// Runs until the task is aborted (when the `Upstream` is dropped); the
/// `JoinSet` owning the connection tasks is dropped with it, aborting them.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard::new(Arc::clone(&shared));
                    conns.spawn(serve_connection(stream, Arc::clone(&shared), guard));
                }
                // e.g. too many open files: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connection tasks so the set does not grow forever.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What to do with the connection after a route has run.
enum Next {
    /// Serve the next request unless the client asked to close.
    KeepAlive,
    /// Close cleanly (FIN).
    Close,
    /// Abort with a TCP RST.
    Reset,
    /// Keep the socket open, sending nothing, for up to [`MAX_HOLD`], then close.
    Hold,
}

/// Why reading a request failed.
enum ReadError {
    /// Peer went away, I/O error or timeout: just close.
    Gone,
    /// Protocol error: answer with this status and close.
    Reject(u16, &'static str),
}

struct Request {
    rec: Recorded,
    /// Client asked for the connection to be closed after this exchange.
    close: bool,
    request_id: Option<String>,
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, _open: OpenGuard) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let req = match read_request(&mut conn).await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Reject(status, msg)) => {
                let resp = Resp {
                    close: true,
                    request_id: None,
                    head_only: false,
                };
                let _ = resp.simple(&mut conn, status, &[], msg.as_bytes()).await;
                conn.close().await;
                return;
            }
        };
        // Record before acting on the fault.
        shared.record(req.rec.clone());
        let next = match route(&mut conn, &shared, &req).await {
            Ok(next) => next,
            Err(_) => return,
        };
        match next {
            Next::KeepAlive if !req.close => continue,
            Next::KeepAlive | Next::Close => conn.close().await,
            Next::Reset => conn.reset(),
            Next::Hold => conn.hold().await,
        }
        return;
    }
}

/// A connection with a read buffer (bytes received but not yet consumed).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads more bytes into the buffer; returns how many (0 on EOF).
    async fn fill(&mut self) -> Result<usize, ReadError> {
        let mut tmp = [0u8; 16 * 1024];
        match tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut tmp)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Ok(Err(_)) | Err(_) => Err(ReadError::Gone),
        }
    }

    /// Reads the request head (through the blank line).  `Ok(None)` on a
    /// clean EOF before any byte of a new request.
    async fn read_head(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let mut scanned = 0;
        loop {
            // Ignore empty lines preceding the request line (RFC 9112 §2.2).
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            while self.buf.starts_with(b"\n") {
                self.buf.drain(..1);
            }
            scanned = scanned.min(self.buf.len());
            if let Some(pos) = find(&self.buf[scanned..], b"\r\n\r\n") {
                let end = scanned + pos + 4;
                if end > MAX_HEAD {
                    return Err(ReadError::Reject(431, "request head too large"));
                }
                return Ok(Some(self.buf.drain(..end).collect()));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Reject(431, "request head too large"));
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Gone)
                };
            }
        }
    }

    /// Reads one line terminated by LF (CR before it is stripped).
    async fn read_line(&mut self) -> Result<Vec<u8>, ReadError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(ReadError::Reject(400, "line too long in chunked body"));
            }
            scanned = self.buf.len();
            if self.fill().await? == 0 {
                return Err(ReadError::Gone);
            }
        }
    }

    /// Reads exactly `n` bytes.
    async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(ReadError::Gone);
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match tokio::time::timeout(IO_TIMEOUT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
        }
    }

    /// Clean close: send FIN, then drop the socket.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// Abortive close: TCP RST.
    fn reset(self) {
        let _ = self.stream.set_zero_linger();
        drop(self.stream);
    }

    /// Sends nothing more; waits until the peer closes or [`MAX_HOLD`] elapses, then closes.
    async fn hold(mut self) {
        let _ = tokio::time::timeout(MAX_HOLD, async {
            let mut tmp = [0u8; 4096];
            loop {
                match self.stream.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        self.close().await;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

async fn read_request(conn: &mut Conn) -> Result<Option<Request>, ReadError> {
    let head = match conn.read_head().await? {
        Some(head) => head,
        None => return Ok(None),
    };
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));

    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(ReadError::Reject(400, "malformed request line")),
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Reject(505, "only HTTP/1.0 and HTTP/1.1")),
    };

    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            return Err(ReadError::Reject(400, "obsolete line folding"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Reject(400, "malformed header line"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ReadError::Reject(400, "malformed header name"));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.trim_matches(|c| c == ' ' || c == '\t').to_string(),
        ));
    }

    let tokens = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let connection = tokens("connection");
    let close = if http10 {
        !connection.iter().any(|t| t == "keep-alive")
    } else {
        connection.iter().any(|t| t == "close")
    };

    let transfer_encoding = tokens("transfer-encoding");
    let body_kind = if !transfer_encoding.is_empty() {
        if transfer_encoding.last().map(String::as_str) != Some("chunked") {
            return Err(ReadError::Reject(400, "unsupported transfer-encoding"));
        }
        BodyKind::Chunked
    } else {
        let mut length: Option<usize> = None;
        for (_, v) in headers.iter().filter(|(n, _)| n == "content-length") {
            for part in v.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ReadError::Reject(400, "invalid content-length"));
                }
                let Ok(n) = part.parse::<usize>() else {
                    return Err(ReadError::Reject(413, "request body too large"));
                };
                if length.is_some_and(|prev| prev != n) {
                    return Err(ReadError::Reject(400, "conflicting content-length"));
                }
                length = Some(n);
            }
        }
        match length {
            Some(n) if n > MAX_BODY => {
                return Err(ReadError::Reject(413, "request body too large"))
            }
            Some(n) => BodyKind::Length(n),
            None => BodyKind::Length(0),
        }
    };

    let expects_continue = headers
        .iter()
        .any(|(n, v)| n == "expect" && v.eq_ignore_ascii_case("100-continue"));
    let has_body = !matches!(body_kind, BodyKind::Length(0));
    if expects_continue && has_body && !http10 {
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Gone)?;
    }

    let body = match body_kind {
        BodyKind::Length(n) => conn.read_exact(n).await?,
        BodyKind::Chunked => read_chunked(conn).await?,
    };

    let request_id = headers
        .iter()
        .find(|(n, _)| n == "x-request-id")
        .map(|(_, v)| v.clone());
    Ok(Some(Request {
        rec: Recorded {
            method: method.to_string(),
            path: target.to_string(),
            headers,
            body,
        },
        close,
        request_id,
    }))
}

enum BodyKind {
    Length(usize),
    Chunked,
}

/// Decodes a chunked request body, consuming the trailer section.
async fn read_chunked(conn: &mut Conn) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let line = conn.read_line().await?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReadError::Reject(400, "invalid chunk size"));
        }
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| ReadError::Reject(400, "invalid chunk size"))?;
        if size == 0 {
            break;
        }
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(ReadError::Reject(413, "request body too large"));
        }
        let data = conn.read_exact(size).await?;
        body.extend_from_slice(&data);
        if conn.read_exact(2).await? != b"\r\n" {
            return Err(ReadError::Reject(400, "missing CRLF after chunk data"));
        }
    }
    // Trailer section: header lines until an empty line.
    let mut trailer_bytes = 0usize;
    loop {
        let line = conn.read_line().await?;
        if line.is_empty() {
            return Ok(body);
        }
        trailer_bytes += line.len();
        if trailer_bytes > MAX_HEAD {
            return Err(ReadError::Reject(431, "trailer section too large"));
        }
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// How the response body length is announced.
enum Length<'a> {
    Known(u64),
    /// A verbatim (possibly invalid) content-length value.
    Raw(&'a str),
    Chunked,
    /// No content-length at all (204 / 304).
    Omitted,
}

/// Per-request response settings.
struct Resp {
    /// Add `connection: close` (the client asked for it, or we will close).
    close: bool,
    request_id: Option<String>,
    /// HEAD request: regular routes send no body.
    head_only: bool,
}

impl Resp {
    fn head(&self, status: u16, extra: &[(&str, &str)], length: Length<'_>) -> Vec<u8> {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
        match length {
            Length::Known(n) => out.push_str(&format!("content-length: {n}\r\n")),
            Length::Raw(v) => out.push_str(&format!("content-length: {v}\r\n")),
            Length::Chunked => out.push_str("transfer-encoding: chunked\r\n"),
            Length::Omitted => {}
        }
        out.push_str("x-upstream: fault\r\n");
        if let Some(id) = &self.request_id {
            out.push_str(&format!("x-request-id: {}\r\n", sanitize(id)));
        }
        for (name, value) in extra {
            out.push_str(&format!("{name}: {}\r\n", sanitize(value)));
        }
        if self.close {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// A complete response with a fixed body (`content-type: text/plain` unless overridden).
    async fn simple(
        &self,
        conn: &mut Conn,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 1);
        if !extra
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("content-type", "text/plain"));
        }
        headers.extend_from_slice(extra);
        let bodyless = status == 204 || status == 304;
        let length = if bodyless {
            Length::Omitted
        } else {
            Length::Known(body.len() as u64)
        };
        let mut out = self.head(status, &headers, length);
        if !bodyless && !self.head_only {
            out.extend_from_slice(body);
        }
        conn.write(&out).await
    }

    async fn ok(&self, conn: &mut Conn) -> io::Result<Next> {
        self.simple(conn, 200, &[], b"ok").await?;
        Ok(Next::KeepAlive)
    }

    async fn bad_param(&self, conn: &mut Conn, what: &str) -> io::Result<Next> {
        let body = format!("bad parameter: {what}");
        self.simple(conn, 400, &[], body.as_bytes()).await?;
        Ok(Next::KeepAlive)
    }
}

/// Strips CR/LF so a header value cannot inject extra lines.
fn sanitize(value: &str) -> String {
    value.chars().filter(|&c| c != '\r' && c != '\n').collect()
}

/// Strips an absolute-form target (`http://host/path`) down to its path.
fn origin_form(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    target
}

/// Percent-decodes `%XX` sequences (invalid escapes are kept literally).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            out.push(hex_value(bytes[i + 1]) << 4 | hex_value(bytes[i + 2]));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// The (percent-decoded) value of the first `name=` query parameter.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Parses a final status code (200..=999).
fn final_status(code: &str) -> Option<u16> {
    code.parse::<u16>().ok().filter(|c| (200..=999).contains(c))
}

fn delay(ms: u64) -> Duration {
    Duration::from_millis(ms.min(MAX_DELAY_MS))
}

fn big_body_piece(start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((start + i) % 251) as u8).collect()
}

async fn route(conn: &mut Conn, shared: &Shared, req: &Request) -> io::Result<Next> {
    let target = origin_form(&req.rec.path);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let retry_after = query_param(query, "retry_after");
    let resp = Resp {
        close: req.close,
        request_id: req.request_id.clone(),
        head_only: req.rec.method == "HEAD",
    };
    // Fault responses never announce `connection: close`, like a crashing server.
    let raw = Resp {
        close: false,
        request_id: req.request_id.clone(),
        head_only: false,
    };

    match segments.as_slice() {
        ["ok"] => resp.ok(conn).await,

        ["echo"] => {
            let content_type = req
                .rec
                .header("content-type")
                .unwrap_or("application/octet-stream");
            resp.simple(conn, 200, &[("content-type", content_type)], &req.rec.body)
                .await?;
            Ok(Next::KeepAlive)
        }

        ["status", code] => {
            let Some(code) = final_status(code) else {
                return resp.bad_param(conn, "status code").await;
            };
            let body = format!("status {code}");
            let extra: Vec<(&str, &str)> = retry_after
                .as_deref()
                .map(|v| ("retry-after", v))
                .into_iter()
                .collect();
            resp.simple(conn, code, &extra, body.as_bytes()).await?;
            Ok(Next::KeepAlive)
        }

        ["hang"] => Ok(Next::Hold),

        ["slow", ms] => {
            let Ok(ms) = ms.parse::<u64>() else {
                return resp.bad_param(conn, "milliseconds").await;
            };
            tokio::time::sleep(delay(ms)).await;
            resp.ok(conn).await
        }

        ["slow-body", ms] => {
            let Ok(ms) = ms.parse::<u64>() else {
                return resp.bad_param(conn, "milliseconds").await;
            };
            let mut out = resp.head(200, &[("content-type", "text/plain")], Length::Known(10));
            out.extend_from_slice(b"01234");
            conn.write(&out).await?;
            tokio::time::sleep(delay(ms)).await;
            conn.write(b"56789").await?;
            Ok(Next::KeepAlive)
        }

        ["stall-body"] => {
            let mut out = raw.head(200, &[("content-type", "text/plain")], Length::Known(100));
            out.extend_from_slice(b"0123456789");
            conn.write(&out).await?;
            Ok(Next::Hold)
        }

        ["reset"] => Ok(Next::Reset),

        ["reset-after-headers"] => {
            let mut out = raw.head(200, &[("content-type", "text/plain")], Length::Known(100));
            out.extend_from_slice(b"0123456789");
            conn.write(&out).await?;
            // Let the client see the head before the RST arrives.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Next::Reset)
        }

        ["close"] => Ok(Next::Close),

        ["garbage"] => {
            let mut out = b"this is not http\r\n\r\n".to_vec();
            out.extend_from_slice(&[0x00, 0xff, 0xfe, 0x80, 0x01, 0x1b, 0x7f, 0xc3, 0x28, 0x00]);
            conn.write(&out).await?;
            Ok(Next::Close)
        }

        ["truncated"] => {
            let mut out = raw.head(200, &[("content-type", "text/plain")], Length::Known(100));
            out.extend_from_slice(&[b'x'; 50]);
            conn.write(&out).await?;
            Ok(Next::Close)
        }

        ["bad-content-length"] => {
            let mut out = raw.head(200, &[("content-type", "text/plain")], Length::Raw("abc"));
            out.extend_from_slice(b"some bytes");
            conn.write(&out).await?;
            Ok(Next::Close)
        }

        ["flaky", n, key] => {
            let Ok(n) = n.parse::<u64>() else {
                return resp.bad_param(conn, "count").await;
            };
            if shared.bump("flaky", key) <= n {
                resp.simple(conn, 503, &[], b"flaky").await?;
                Ok(Next::KeepAlive)
            } else {
                resp.ok(conn).await
            }
        }

        ["flaky-reset", n, key] => {
            let Ok(n) = n.parse::<u64>() else {
                return resp.bad_param(conn, "count").await;
            };
            if shared.bump("flaky-reset", key) <= n {
                Ok(Next::Reset)
            } else {
                resp.ok(conn).await
            }
        }

        ["flaky-status", n, code, key] => {
            let Ok(n) = n.parse::<u64>() else {
                return resp.bad_param(conn, "count").await;
            };
            let Some(code) = final_status(code) else {
                return resp.bad_param(conn, "status code").await;
            };
            if shared.bump("flaky-status", key) <= n {
                let extra: Vec<(&str, &str)> = retry_after
                    .as_deref()
                    .map(|v| ("retry-after", v))
                    .into_iter()
                    .collect();
                resp.simple(conn, code, &extra, b"flaky").await?;
                Ok(Next::KeepAlive)
            } else {
                resp.ok(conn).await
            }
        }

        ["seq", key, steps] => {
            let steps: Vec<&str> = steps.split(',').collect();
            let n = shared.bump("seq", key) as usize;
            let step = steps[(n - 1).min(steps.len() - 1)];
            match step {
                "ok" => resp.ok(conn).await,
                "reset" => Ok(Next::Reset),
                "hang" => Ok(Next::Hold),
                _ => {
                    let (step, slow) = match step.strip_prefix("slow") {
                        Some(rest) => match rest.split_once(':') {
                            Some((ms, code)) => (code, ms.parse().ok()),
                            None => ("ok", rest.parse().ok()),
                        },
                        None => (step, Some(0)),
                    };
                    let Some(ms) = slow else {
                        return resp.bad_param(conn, "seq step").await;
                    };
                    tokio::time::sleep(delay(ms)).await;
                    if step == "ok" {
                        return resp.ok(conn).await;
                    }
                    let Some(code) = final_status(step) else {
                        return resp.bad_param(conn, "seq step").await;
                    };
                    resp.simple(conn, code, &[], b"seq").await?;
                    Ok(Next::KeepAlive)
                }
            }
        }

        ["stream", chunks, ms] => {
            let (Ok(chunks), Ok(ms)) = (chunks.parse::<u64>(), ms.parse::<u64>()) else {
                return resp.bad_param(conn, "chunks/milliseconds").await;
            };
            if chunks > MAX_CHUNKS || chunks.saturating_mul(ms) > MAX_DELAY_MS {
                return resp.bad_param(conn, "stream too long").await;
            }
            let head = resp.head(200, &[("content-type", "text/plain")], Length::Chunked);
            conn.write(&head).await?;
            for i in 0..chunks {
                if i > 0 {
                    tokio::time::sleep(delay(ms)).await;
                }
                let data = format!("chunk-{i}\n");
                let frame = format!("{:x}\r\n{data}\r\n", data.len());
                conn.write(frame.as_bytes()).await?;
            }
            conn.write(b"0\r\n\r\n").await?;
            Ok(Next::KeepAlive)
        }

        ["big", bytes] => {
            let Ok(total) = bytes.parse::<u64>() else {
                return resp.bad_param(conn, "bytes").await;
            };
            if total > MAX_BIG {
                return resp.bad_param(conn, "body too large").await;
            }
            let head = resp.head(
                200,
                &[("content-type", "application/octet-stream")],
                Length::Known(total),
            );
            conn.write(&head).await?;
            if !resp.head_only {
                let mut sent = 0u64;
                while sent < total {
                    let len = (total - sent).min(WRITE_PIECE as u64) as usize;
                    conn.write(&big_body_piece(sent, len)).await?;
                    sent += len as u64;
                }
            }
            Ok(Next::KeepAlive)
        }

        _ => {
            resp.simple(conn, 404, &[], b"not found").await?;
            Ok(Next::KeepAlive)
        }
    }
}
