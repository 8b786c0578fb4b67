//! [`Head`]: what the guard keeps of a request's head to send it again.
//!
//! The guard never clones a whole `Request`. It keeps the method, version and
//! extensions as they are, and the URI and headers as bytes in one buffer:
//! copying a few dozen bytes per header is cheaper than cloning a
//! reference-counted name and value for each (an atomic increment now, an
//! atomic decrement when the request ends) and then building a map. Most
//! requests are never retried: their buffer goes back to a small per-thread
//! pool, so keeping a copy allocates nothing. The URI and the header map are
//! built again only when a retry happens.

use std::cell::RefCell;
use std::ops::Range;

use bytes::Bytes;
use http::request::Parts;
use http::uri::Authority;
use http::{Extensions, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// A copy of a request's head.
#[derive(Debug)]
pub(crate) struct Head {
    method: Method,
    version: Version,
    extensions: Extensions,
    /// The URI's text, then each header as: name length and value length (u32,
    /// little-endian), whether the value is sensitive (one byte), the name, the
    /// value.
    bytes: Vec<u8>,
    /// Where the URI ends in `bytes`.
    uri_end: u32,
    /// The URI's authority, which every event names (one reference count).
    authority: Option<Authority>,
}

impl Head {
    pub(crate) fn copy_of(parts: &Parts) -> Head {
        let mut bytes = pool::take();
        write_uri(&mut bytes, &parts.uri);
        let uri_end = offset(&bytes);
        for (name, value) in &parts.headers {
            let (name, value_bytes) = (name.as_str().as_bytes(), value.as_bytes());
            bytes.extend_from_slice(&length(name).to_le_bytes());
            bytes.extend_from_slice(&length(value_bytes).to_le_bytes());
            bytes.push(u8::from(value.is_sensitive()));
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(value_bytes);
        }
        Head {
            method: parts.method.clone(),
            version: parts.version,
            extensions: parts.extensions.clone(),
            bytes,
            uri_end,
            authority: parts.uri.authority().cloned(),
        }
    }

    /// The request URI's authority.
    pub(crate) fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    /// The first value of a header.
    pub(crate) fn header(&self, wanted: &HeaderName) -> Option<HeaderValue> {
        let wanted = wanted.as_str().as_bytes();
        let (_, value, _) = self
            .headers()
            .find(|(name, _, _)| self.bytes.get(name.clone()) == Some(wanted))?;
        HeaderValue::from_bytes(self.bytes.get(value)?).ok()
    }

    /// The kept headers.
    fn headers(&self) -> Headers<'_> {
        Headers {
            bytes: &self.bytes,
            at: self.uri_end as usize,
        }
    }

    /// Builds a request for another attempt. `last` moves the extensions out
    /// instead of cloning them, for the final attempt.
    pub(crate) fn request<B>(&mut self, body: B, last: bool) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.version_mut() = self.version;
        // One copy of the kept bytes; the URI and every value share it.
        let shared = Bytes::copy_from_slice(&self.bytes);
        if let Ok(uri) = Uri::from_maybe_shared(shared.slice(..self.uri_end as usize)) {
            *request.uri_mut() = uri;
        }
        let headers = request.headers_mut();
        for (name, value, sensitive) in self.headers() {
            // Both came from a valid header a moment ago, so both parse again.
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(&shared[name]),
                HeaderValue::from_maybe_shared(shared.slice(value)),
            ) else {
                continue;
            };
            value.set_sensitive(sensitive);
            headers.append(name, value);
        }
        *request.extensions_mut() = if last {
            std::mem::take(&mut self.extensions)
        } else {
            self.extensions.clone()
        };
        request
    }
}

impl Drop for Head {
    /// The buffer goes back to the pool for the next request.
    fn drop(&mut self) {
        pool::recycle(std::mem::take(&mut self.bytes));
    }
}

/// Writes the URI's text, in a form `Uri` parses back to the same URI.
fn write_uri(bytes: &mut Vec<u8>, uri: &Uri) {
    if let Some(scheme) = uri.scheme_str() {
        bytes.extend_from_slice(scheme.as_bytes());
        bytes.extend_from_slice(b"://");
    }
    if let Some(authority) = uri.authority() {
        bytes.extend_from_slice(authority.as_str().as_bytes());
    }
    // Absent only in the authority form (CONNECT's `host:port`).
    if let Some(path) = uri.path_and_query() {
        bytes.extend_from_slice(path.as_str().as_bytes());
    }
}

/// A length that fits the kept layout: header names and values are far below
/// 4 GiB (hyper caps a whole head at a few hundred KiB).
fn length(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

fn offset(bytes: &[u8]) -> u32 {
    length(bytes)
}

/// Iterates the kept headers: where each name and value is in the buffer.
struct Headers<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Iterator for Headers<'_> {
    type Item = (Range<usize>, Range<usize>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        let lengths = self.bytes.get(self.at..)?.first_chunk::<9>()?;
        let [n0, n1, n2, n3, v0, v1, v2, v3, sensitive] = *lengths;
        let name_len = u32::from_le_bytes([n0, n1, n2, n3]) as usize;
        let value_len = u32::from_le_bytes([v0, v1, v2, v3]) as usize;
        let name = self.at + 9..self.at + 9 + name_len;
        let value = name.end..name.end + value_len;
        if value.end > self.bytes.len() {
            return None;
        }
        self.at = value.end;
        Some((name, value, sensitive != 0))
    }
}

/// A small per-thread pool of head buffers.
mod pool {
    use super::*;

    /// Buffers kept per thread.
    const MAX_BUFFERS: usize = 32;
    /// Larger buffers are not kept: one huge request must not pin memory.
    const MAX_CAPACITY: usize = 16 * 1024;
    /// A new buffer's room: a typical head fits without growing.
    const INITIAL_CAPACITY: usize = 512;

    thread_local! {
        static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Vec<u8> {
        POOL.try_with(|pool| pool.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Vec::with_capacity(INITIAL_CAPACITY))
    }

    pub(super) fn recycle(mut bytes: Vec<u8>) {
        if bytes.capacity() == 0 || bytes.capacity() > MAX_CAPACITY {
            return;
        }
        bytes.clear();
        // During thread teardown the pool may be gone: then the buffer just drops.
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.len() < MAX_BUFFERS {
                    pool.push(bytes);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    #[test]
    fn a_copy_rebuilds_the_method_uri_headers_and_extensions() {
        let mut request = Request::builder()
            .method("PUT")
            .uri("http://example.test:8080/a?b=c")
            .header("x-one", "1")
            .header("set-cookie", "a")
            .header("set-cookie", "b")
            .body(())
            .unwrap();
        request.extensions_mut().insert(7u8);
        let parts = parts(request);
        for _ in 0..3 {
            // Recycled buffers must come back empty: nothing may leak across requests.
            let mut head = Head::copy_of(&parts);
            let copy = head.request((), false);
            assert_eq!(copy.method(), "PUT");
            assert_eq!(copy.uri(), "http://example.test:8080/a?b=c");
            assert_eq!(copy.headers(), &parts.headers);
            let cookies: Vec<_> = copy.headers().get_all("set-cookie").iter().collect();
            assert_eq!(cookies, ["a", "b"]);
            assert_eq!(copy.extensions().get::<u8>(), Some(&7));
            assert_eq!(head.authority().unwrap(), "example.test:8080");
        }
    }

    #[test]
    fn origin_and_authority_forms_come_back_as_they_were() {
        for uri in ["/only/a/path?x=1", "example.test:443", "*", "https://h/"] {
            let parts = parts(Request::builder().uri(uri).body(()).unwrap());
            let mut head = Head::copy_of(&parts);
            assert_eq!(head.request((), true).uri(), &parts.uri, "{uri}");
        }
        let origin = parts(Request::builder().uri("/p").body(()).unwrap());
        assert!(Head::copy_of(&origin).authority().is_none());
    }

    #[test]
    fn sensitive_values_stay_sensitive() {
        let mut secret = HeaderValue::from_static("Bearer x");
        secret.set_sensitive(true);
        let parts = parts(
            Request::builder()
                .uri("/")
                .header("authorization", secret)
                .body(())
                .unwrap(),
        );
        let copy = Head::copy_of(&parts).request((), true);
        assert!(copy.headers()["authorization"].is_sensitive());
    }

    #[test]
    fn a_header_is_found_by_name() {
        let parts = parts(
            Request::builder()
                .uri("/")
                .header("x-request-id", "abc")
                .body(())
                .unwrap(),
        );
        let head = Head::copy_of(&parts);
        let id = HeaderName::from_static("x-request-id");
        assert_eq!(head.header(&id).unwrap(), "abc");
        assert!(head.header(&HeaderName::from_static("x-other")).is_none());
    }

    #[test]
    fn the_last_attempt_takes_the_extensions_instead_of_cloning_them() {
        let mut request = Request::builder().uri("/").body(()).unwrap();
        request.extensions_mut().insert(String::from("moved"));
        let mut head = Head::copy_of(&parts(request));
        let last = head.request((), true);
        assert_eq!(last.extensions().get::<String>().unwrap(), "moved");
    }
}
