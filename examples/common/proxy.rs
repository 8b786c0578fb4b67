//! What every reverse proxy in this repository does to a request on its way to
//! the upstream, and to the response on its way back: one copy, included with
//! `#[path]` by `examples/gateway/`, `examples/reverse_proxy.rs`, the tests'
//! gateway (`tests/support/gateway.rs`, and through it `examples/soak.rs`) and
//! the unit tests in `tests/proxy_headers.rs`. It needs only the `http` crate,
//! so each of them can include it as a plain module.
//!
//! On the way to the upstream ([`forward_request`]):
//!
//! - the URI becomes the upstream's absolute `http://` URI with the path and
//!   query the caller chooses (hyper-util's client wants absolute-form), and the
//!   version HTTP/1.1 (what the client speaks to the upstream; the caller's
//!   version belongs to the caller's connection);
//! - hop-by-hop headers are removed ([`remove_hop_by_hop`], RFC 9110 §7.6.1):
//!   they describe the caller's connection, not the message;
//! - forwarding headers record the caller ([`add_forwarding_headers`]);
//! - `Host` becomes the upstream's authority. The upstream is addressed by its
//!   own name (an upstream that serves several virtual hosts routes on it, and
//!   an upstream's absolute links and redirects name it), not by the public name
//!   the caller used; that one is kept in `X-Forwarded-Host` and in the
//!   `host=` of `Forwarded`, for an upstream that wants to build public URLs.
//!
//! On the way back ([`forward_response`]), hop-by-hop headers are removed again
//! and the version is HTTP/1.1: the upstream's connection is not the caller's.
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

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, response, Uri, Version};

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

/// Turns the head of a request a proxy received from `client` into the head of
/// the request it sends to `target`, at `path_and_query` (see the module docs).
/// On error (a URI that cannot be built) `parts` is left as it was.
pub fn forward_request(
    parts: &mut request::Parts,
    target: &Target,
    path_and_query: PathAndQuery,
    client: SocketAddr,
) -> Result<(), http::Error> {
    let uri = target.uri(path_and_query)?;
    // Read before the hop-by-hop headers go: `Connection` may name `Host`.
    let original_host = original_host(parts);
    remove_hop_by_hop(&mut parts.headers);
    add_forwarding_headers(&mut parts.headers, client.ip(), original_host.as_ref());
    parts.headers.insert(header::HOST, target.host.clone());
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Turns the head of an upstream's response into the head of the proxy's.
pub fn forward_response(parts: &mut response::Parts) {
    remove_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
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
