//! What every reverse proxy in this repository does to a request on its way to
//! the upstream, and to the response on its way back, and the client that
//! sends it: one copy, included with `#[path]` by `examples/gateway/`,
//! `examples/reverse_proxy.rs`, the tests' gateway (`tests/support/gateway.rs`,
//! and through it `examples/soak.rs`) and the unit tests in
//! `tests/proxy_headers.rs`. It needs only `http`, `http-body`, `hyper-util`
//! and `tower` (dev-dependencies every includer has), so each of them can
//! include it as a plain module.
//!
//! On the way to the upstream ([`forward_request`]):
//!
//! - the protocol is chosen ([`UpstreamProtocol::for_request`]): a gRPC call
//!   that came over HTTP/2 goes over HTTP/2 without TLS (h2c, prior
//!   knowledge), everything else over HTTP/1.1;
//! - the URI becomes the upstream's absolute `http://` URI with the path and
//!   query the caller chooses (hyper-util's client wants absolute-form), and the
//!   version the chosen protocol's, which is what tells [`UpstreamClient`]
//!   which of its two clients sends it (the caller's version belongs to the
//!   caller's connection);
//! - hop-by-hop headers are removed ([`remove_hop_by_hop`], RFC 9110 §7.6.1):
//!   they describe the caller's connection, not the message. The one exception
//!   is `TE: trailers` on a request forwarded over h2c, when the caller sent it:
//!   in HTTP/2 it is the only `TE` allowed (RFC 9113 §8.2.2), and gRPC requires
//!   it (servers use it to detect proxies that would lose the trailers that
//!   carry the call's status);
//! - forwarding headers record the caller ([`add_forwarding_headers`]);
//! - `Host` becomes the upstream's authority. The upstream is addressed by its
//!   own name (an upstream that serves several virtual hosts routes on it, and
//!   an upstream's absolute links and redirects name it), not by the public name
//!   the caller used; that one is kept in `X-Forwarded-Host` and in the
//!   `host=` of `Forwarded`, for an upstream that wants to build public URLs.
//!   Over h2c the upstream's authority travels in the URI (`:authority`), and
//!   there is no `Host` header (RFC 9113 §8.3.1: `:authority` replaces it).
//!
//! On the way back ([`forward_response`]), hop-by-hop headers are removed again
//! and the version is HTTP/1.1: the upstream's connection is not the caller's.
//! (hyper's HTTP/2 server ignores a response's version.) Bodies are not the
//! helper's business; every proxy here streams them frame by frame, trailers
//! included, which is how a gRPC status that follows the response's messages
//! reaches the caller.
//!
//! # Why gRPC calls, and only they, go over h2c
//!
//! gRPC needs HTTP/2 end to end (trailers, and servers that speak nothing
//! else), so a gRPC call goes upstream over h2c. Any other request keeps
//! HTTP/1.1, also from an HTTP/2 caller: every upstream speaks it, and an
//! upstream that speaks only HTTP/1.1 keeps working when its callers move to
//! HTTP/2. A gRPC call is an HTTP/2 `POST` whose `content-type` is
//! `application/grpc`, alone or followed by `+` (`application/grpc+proto`) or
//! `;`. Not gRPC-Web (`application/grpc-web*`): it was made for HTTP/1.1, and
//! its servers speak that. Nor a gRPC-typed request over HTTP/1.1: no gRPC
//! client sends one, and whatever sends it gets what an HTTP/1.1 caller
//! always got, the HTTP/1.1 message it sent, forwarded as such (the tests'
//! fault upstream, which speaks HTTP/1.1 only, relies on that to play a gRPC
//! server that fails).
//!
//! # Forwarding headers
//!
//! Both families, because upstream frameworks read one or the other:
//!
//! - `X-Forwarded-For` and `Forwarded` (RFC 7239) are lists, one entry per hop:
//!   the caller's IP is **appended** to what arrived. What a caller sends there is
//!   a claim nobody checked, so it is neither dropped (a trusted proxy in front
//!   may have written it) nor trusted: the last entry is always the one this
//!   proxy saw on the socket, and an upstream that trusts only its own proxies
//!   reads the list from the right. Several header lines count as one list.
//! - `X-Forwarded-Proto` and `X-Forwarded-Host` hold one value, and describe the
//!   request as this proxy received it, so a caller's values are **replaced**
//!   (`X-Forwarded-Host` is removed when the request named no host at all).
//!   `Proto` is always `http`: the proxies here serve plain HTTP only.
//!
//! IPv6 callers are written bare in `X-Forwarded-For` (`2001:db8::1`, as nginx
//! and Envoy write them) and bracketed and quoted in `Forwarded`
//! (`for="[2001:db8::1]"`, as RFC 7239 §6 requires); an IPv4 caller that reached
//! a dual-stack socket (`::ffff:192.0.2.1`) is written as the IPv4 address it is.
#![allow(dead_code)]

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, response, Method, Request, Uri, Version};
use http_body::Body;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Builder, Client, Error, ResponseFuture};
use tower::Service;

/// Headers that describe one connection, not the message, and so never cross a
/// proxy: RFC 9110 §7.6.1's list, plus `Proxy-Authenticate` and
/// `Proxy-Authorization`, which are addressed to the proxy (RFC 9110 §11.7) and
/// which proxies commonly consume (a caller's proxy credentials are nothing the
/// upstream should see). A `static`, not a `const`: a `const` array of names
/// is built (and dropped) anew wherever it is used, on every request.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// `X-Forwarded-For`: the hops so far, the caller last.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: the scheme the caller used.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`: the `Host` the caller asked for.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The scheme the proxies here serve: plain HTTP.
const PROTO: &str = "http";

/// An upstream a proxy forwards to: its authority, and the `Host` header for it
/// (made once, not per request).
#[derive(Clone, Debug)]
pub struct Target {
    authority: Authority,
    host: HeaderValue,
}

impl Target {
    /// Fails only for an authority that is no valid header value, which a parsed
    /// [`Authority`] never is in practice; callers report it instead of assuming.
    pub fn new(authority: Authority) -> Result<Target, InvalidHeaderValue> {
        let host = HeaderValue::from_str(authority.as_str())?;
        Ok(Target { authority, host })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `http://AUTHORITY{path_and_query}`.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// The request's path and query as they arrived (`/` when it had none, as an
/// authority-form target has not).
pub fn path_and_query(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// How a request goes to its upstream (see "Why gRPC, and only gRPC, goes over
/// h2c" in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1: every request but a gRPC call.
    Http1,
    /// HTTP/2 over plain TCP, with prior knowledge: gRPC calls.
    H2c,
}

impl UpstreamProtocol {
    /// The protocol for a request: h2c for a gRPC call (an HTTP/2 `POST` with
    /// gRPC's content type), else HTTP/1.1.
    pub fn for_request(parts: &request::Parts) -> UpstreamProtocol {
        let is_grpc_call = parts.version == Version::HTTP_2
            && parts.method == Method::POST
            && is_grpc_content_type(&parts.headers);
        if is_grpc_call {
            UpstreamProtocol::H2c
        } else {
            UpstreamProtocol::Http1
        }
    }

    /// The version a request sent in this protocol carries; [`UpstreamClient`]
    /// picks its client by it.
    pub fn version(self) -> Version {
        match self {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::H2c => Version::HTTP_2,
        }
    }
}

/// `application/grpc`, alone or followed by `+` or `;` (not gRPC-Web).
fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    match value.as_bytes().strip_prefix(b"application/grpc") {
        Some(rest) => matches!(rest.first(), None | Some(b'+' | b';')),
        None => false,
    }
}

/// Turns the head of a request a proxy received from `client` into the head of
/// the request it sends to `target`, at `path_and_query` (see the module docs),
/// and says which protocol it goes in. On error (a URI that cannot be built)
/// `parts` is left as it was.
pub fn forward_request(
    parts: &mut request::Parts,
    target: &Target,
    path_and_query: PathAndQuery,
    client: SocketAddr,
) -> Result<UpstreamProtocol, http::Error> {
    let uri = target.uri(path_and_query)?;
    let protocol = UpstreamProtocol::for_request(parts);
    // Read before the hop-by-hop headers go: `Connection` may name `Host`.
    let original_host = original_host(parts);
    let wants_trailers = protocol == UpstreamProtocol::H2c && accepts_trailers(&parts.headers);
    remove_hop_by_hop(&mut parts.headers);
    add_forwarding_headers(&mut parts.headers, client.ip(), original_host.as_ref());
    match protocol {
        UpstreamProtocol::Http1 => {
            parts.headers.insert(header::HOST, target.host.clone());
        }
        UpstreamProtocol::H2c => {
            parts.headers.remove(header::HOST);
            if wants_trailers {
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
    }
    parts.uri = uri;
    parts.version = protocol.version();
    Ok(protocol)
}

/// Whether a `TE` header lists `trailers` (in any case, across lines).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// Turns the head of an upstream's response into the head of the proxy's.
pub fn forward_response(parts: &mut response::Parts) {
    remove_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
}

/// The client every proxy here sends upstream with: a hyper-util client for
/// HTTP/1.1 and one for h2c, as one service that sends each request with the
/// client its version names (HTTP/2: h2c; any other: HTTP/1.1), as
/// [`forward_request`] set it. One service rather than two, so that one guard
/// wraps both: a call's retries, its upstream's circuit breaker and the retry
/// budget are the same whichever protocol it goes in. Each client pools its
/// own connections (an h2c connection carries many calls at once).
pub struct UpstreamClient<B> {
    http1: Client<HttpConnector, B>,
    h2c: Client<HttpConnector, B>,
}

impl<B> UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    /// Both clients from one `builder` (pool and timeouts alike) and one
    /// `connector`; the h2c one with `http2_only`, which is prior knowledge:
    /// no TLS, no `Upgrade: h2c` round trip.
    pub fn new(builder: &Builder, connector: HttpConnector) -> UpstreamClient<B> {
        let mut h2c = builder.clone();
        h2c.http2_only(true);
        UpstreamClient {
            http1: builder.build(connector.clone()),
            h2c: h2c.build(connector),
        }
    }
}

impl<B> UpstreamClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `request` with the client for its version.
    pub fn request(&self, request: Request<B>) -> ResponseFuture {
        if request.version() == Version::HTTP_2 {
            self.h2c.request(request)
        } else {
            self.http1.request(request)
        }
    }
}

impl<B> Service<Request<B>> for UpstreamClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<hyper::body::Incoming>;
    type Error = Error;
    type Future = ResponseFuture;

    /// Always ready, as hyper-util's client is: it waits for a connection
    /// inside the call.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        self.request(request)
    }
}

// By hand: derived, they would require `B: Clone` and `B: Debug`, which the
// clients do not.
impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        UpstreamClient {
            http1: self.http1.clone(),
            h2c: self.h2c.clone(),
        }
    }
}

impl<B> fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

/// The host the caller asked for: its `Host` header, or the authority of an
/// absolute-form (or HTTP/2) request target.
pub fn original_host(parts: &request::Parts) -> Option<HeaderValue> {
    if let Some(host) = parts.headers.get(header::HOST) {
        return Some(host.clone());
    }
    let authority = parts.uri.authority()?;
    HeaderValue::from_str(authority.as_str()).ok()
}

/// Removes the [`HOP_BY_HOP`] headers and every header that `Connection` names
/// (RFC 9110 §7.6.1), in any case and across several `Connection` lines.
/// Tokens that are no header name (`close`) name nothing to remove.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the few names a message
    // has tells, for less than the nine lookups that would all miss.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// One of [`HOP_BY_HOP`]. (Any header that `Connection` names is removed too,
/// but only where there is a `Connection` header, itself one of them.)
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Records `client` and the request as this proxy received it (see the module
/// docs): appends to `X-Forwarded-For` and `Forwarded`, replaces
/// `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn add_forwarding_headers(
    headers: &mut HeaderMap,
    client: IpAddr,
    original_host: Option<&HeaderValue>,
) {
    let client = client.to_canonical();
    let mut ip = String::with_capacity(IP_TEXT_CAPACITY);
    push_ip(&mut ip, client);
    append_to_list(headers, X_FORWARDED_FOR, ip.as_bytes());
    append_to_list(
        headers,
        header::FORWARDED,
        forwarded_element(&ip, client.is_ipv6(), original_host).as_bytes(),
    );
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(PROTO));
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host.clone()),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// Replaces every `name` line with one: the lines' values joined with `, `
/// (one list, as RFC 9110 §5.3 says they are), then `entry`. Works on bytes, so
/// that an earlier value that is not UTF-8 is kept as it came, not dropped.
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, entry: &[u8]) {
    let mut list = Vec::new();
    for earlier in headers.get_all(&name) {
        list.extend_from_slice(earlier.as_bytes());
        list.extend_from_slice(b", ");
    }
    // Usually there is no earlier line: then the entry is the whole list.
    let whole = if list.is_empty() {
        entry
    } else {
        list.extend_from_slice(entry);
        &list
    };
    // Every part is a valid header value (no CR, LF or NUL), so the whole is;
    // should that ever not hold, our entry alone still replaces the claims.
    let value = HeaderValue::from_bytes(whole)
        .or_else(|_| HeaderValue::from_bytes(entry))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    headers.insert(name, value);
}

/// Room for the longest IP address text (`ffff:...:255.255.255.255`, 45 bytes).
const IP_TEXT_CAPACITY: usize = 48;

/// Writes `ip` as `Display` would. IPv4 by hand: `Ipv4Addr`'s `Display` goes
/// through the formatting machinery four times, which costs more than all
/// the rest of the forwarding headers together.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, octet);
            }
        }
        IpAddr::V6(ip) => {
            // Writing to a String cannot fail.
            let _ = write!(out, "{ip}");
        }
    }
}

/// Writes `n` in decimal, without leading zeros.
fn push_decimal(out: &mut String, n: u8) {
    if n >= 100 {
        out.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        out.push(char::from(b'0' + n / 10 % 10));
    }
    out.push(char::from(b'0' + n % 10));
}

/// This hop's `Forwarded` element: `for=192.0.2.1;host=example.com;proto=http`,
/// for the caller's address written as `ip`. An IPv6 address is a `"[...]"`
/// quoted string (RFC 7239 §6); a host with a port (or anything else outside
/// `token`) is quoted too.
fn forwarded_element(ip: &str, is_ipv6: bool, original_host: Option<&HeaderValue>) -> String {
    let host = original_host.and_then(|h| h.to_str().ok());
    let mut element = String::with_capacity(32 + ip.len() + host.map_or(0, str::len));
    if is_ipv6 {
        element.push_str("for=\"[");
        element.push_str(ip);
        element.push_str("]\"");
    } else {
        element.push_str("for=");
        element.push_str(ip);
    }
    if let Some(host) = host {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    element.push_str(";proto=");
    element.push_str(PROTO);
    element
}

/// Appends `value` as an RFC 9110 `token` if it is one, else as a quoted string
/// (with `"` and `\` escaped).
fn push_token_or_quoted(out: &mut String, value: &str) {
    if !value.is_empty() && value.bytes().all(is_tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
