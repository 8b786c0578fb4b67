//! The responses the guard synthesizes: RFC 9457 problem+json for HTTP, and
//! trailers-only responses for gRPC.

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS};

use crate::failure::GuardFailure;

/// What the synthesizer needs to know about the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flavor {
    pub(crate) is_head: bool,
    pub(crate) is_grpc: bool,
    pub(crate) expose_details: bool,
}

/// The RFC 9457 problem document.
struct Problem<'a> {
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    upstream: Option<&'a str>,
    attempts: u32,
    request_id: Option<&'a str>,
}

impl Problem<'_> {
    /// Writes the document as one JSON object.
    ///
    /// Written by hand rather than through `serde_json`: seven known members,
    /// most of them constants that need no escaping, where a generic serializer
    /// spent a third of a rejected request's instructions escaping byte by byte.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":");
        push_json_str(out, self.kind);
        out.extend_from_slice(b",\"title\":");
        push_json_str(out, self.title);
        out.extend_from_slice(b",\"status\":");
        push_decimal(out, u64::from(self.status));
        out.extend_from_slice(b",\"detail\":");
        push_json_str(out, self.detail);
        if let Some(upstream) = self.upstream {
            out.extend_from_slice(b",\"upstream\":");
            push_json_str(out, upstream);
        }
        out.extend_from_slice(b",\"attempts\":");
        push_decimal(out, u64::from(self.attempts));
        if let Some(request_id) = self.request_id {
            out.extend_from_slice(b",\"request_id\":");
            push_json_str(out, request_id);
        }
        out.push(b'}');
    }
}

/// Appends `text` as a JSON string (RFC 8259 §7): quotes, backslashes and
/// control characters escaped, everything else (UTF-8 included) as is.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    // Nearly every string here is a constant or a host name, with nothing to
    // escape: check the whole string at once (a loop without an early exit,
    // which the compiler vectorizes) and copy it in one go.
    let plain = !bytes.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // `n % 10` is a single digit: the cast cannot truncate.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The decimal digits of 0 to 999, three bytes each (zero-padded).
static SMALL_DECIMALS: [u8; 3000] = {
    let mut table = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        table[n * 3] = b'0' + (n / 100) as u8;
        table[n * 3 + 1] = b'0' + (n / 10 % 10) as u8;
        table[n * 3 + 2] = b'0' + (n % 10) as u8;
        n += 1;
    }
    table
};

/// A header value holding `n` in decimal: for numbers under 1000 (every
/// `grpc-status`, most lengths and `Retry-After`s) a view of a static table,
/// without the allocation `HeaderValue::from(n)` makes.
fn decimal_header(n: u64) -> HeaderValue {
    if let Ok(small) = usize::try_from(n) {
        if small < 1000 {
            let skip = match small {
                0..=9 => 2,
                10..=99 => 1,
                _ => 0,
            };
            let digits = &SMALL_DECIMALS[small * 3 + skip..small * 3 + 3];
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from_static(digits)) {
                return value;
            }
        }
    }
    HeaderValue::from(n)
}

/// A user's hook that may edit or replace a synthesized response.
pub(crate) type FailureHook = dyn Fn(&GuardFailure, &mut Response<Bytes>) + Send + Sync;

/// Builds the response for a failure, with the failure in its extensions, and
/// lets the user's hook edit it. `Content-Length` and the `HEAD` rule are
/// applied after the hook, so an edited body is never framed by a stale length.
pub(crate) fn synthesize(
    failure: &GuardFailure,
    flavor: Flavor,
    hook: Option<&FailureHook>,
) -> Response<Bytes> {
    let mut response = build(failure, flavor);
    if let Some(hook) = hook {
        hook(failure, &mut response);
    }
    finalize(&mut response, flavor);
    response
}

/// The response for a failure before the hook: the body is complete even for
/// `HEAD`, and `Content-Length` is not set yet.
fn build(failure: &GuardFailure, flavor: Flavor) -> Response<Bytes> {
    let mut response = if flavor.is_grpc {
        grpc_response(failure, flavor)
    } else {
        problem_response(failure, flavor)
    };
    response.extensions_mut().insert(failure.clone());
    response
}

fn detail_text(failure: &GuardFailure, expose: bool) -> Cow<'static, str> {
    let description = failure.kind().description();
    if !expose || failure.error().is_none() {
        return Cow::Borrowed(description);
    }
    let mut detail = String::from(description);
    {
        let mut source = failure.error().map(|e| e as &(dyn Error + 'static));
        let mut depth = 0;
        while let Some(err) = source {
            let _ = write!(detail, ": {err}");
            source = err.source();
            depth += 1;
            if depth >= 8 {
                break;
            }
        }
    }
    Cow::Owned(detail)
}

fn problem_response(failure: &GuardFailure, flavor: Flavor) -> Response<Bytes> {
    let status = failure.status();
    let detail = detail_text(failure, flavor.expose_details);
    let problem = Problem {
        kind: failure.kind().problem_type(),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail: &detail,
        upstream: failure.upstream(),
        attempts: failure.attempts(),
        request_id: failure.request_id(),
    };
    // Sized for a typical problem document, so it is written without regrowing.
    let mut json = Vec::with_capacity(320);
    problem.write_json(&mut json);
    // Exactly sized, the buffer becomes the `Bytes` itself; with spare capacity
    // `Bytes` would allocate a shared header next to it.
    let mut response = Response::new(Bytes::from(json.into_boxed_slice()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(after) = failure.retry_after() {
            headers.insert(RETRY_AFTER, decimal_header(retry_after_secs(after)));
        }
    }
    response
}

/// Settles what a hook may have broken, right before the response leaves:
/// `Content-Length` is the body's length (for `HEAD`, the length a `GET` would
/// have had, as RFC 9110 allows), and a `HEAD` response has no body. A gRPC
/// trailers-only response with an empty body gets no `Content-Length`, as gRPC
/// servers send none.
fn finalize(response: &mut Response<Bytes>, flavor: Flavor) {
    let len = response.body().len();
    if flavor.is_grpc && len == 0 {
        response.headers_mut().remove(CONTENT_LENGTH);
    } else {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, decimal_header(len));
    }
    if flavor.is_head {
        *response.body_mut() = Bytes::new();
    }
}

/// Seconds for a `Retry-After` header: rounded up, and at least 1 (a `0` would
/// invite an immediate retry storm against a breaker that is still open).
pub(crate) fn retry_after_secs(after: std::time::Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

/// gRPC's percent-encoding for `grpc-message`: everything outside printable ASCII,
/// and `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

fn grpc_response(failure: &GuardFailure, flavor: Flavor) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let message = detail_text(failure, flavor.expose_details);
    let encoded = percent_encoding::utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(
        crate::grpc::GRPC_STATUS,
        decimal_header(u64::from(failure.kind().grpc_code())),
    );
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert(crate::grpc::GRPC_MESSAGE, value);
    }
    if let Some(after) = failure.retry_after() {
        // gRPC's server pushback (gRFC A6): how long a retrying client should wait.
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        headers.insert(crate::grpc::GRPC_RETRY_PUSHBACK_MS, decimal_header(ms));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureKind;
    use std::time::Duration;

    fn flavor() -> Flavor {
        Flavor {
            is_head: false,
            is_grpc: false,
            expose_details: false,
        }
    }

    fn json(response: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(response.body()).expect("valid JSON")
    }

    fn as_json_str(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        push_json_str(&mut out, text);
        out
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_control_characters() {
        assert_eq!(as_json_str("plain"), b"\"plain\"");
        assert_eq!(as_json_str("a\"b\\c"), br#""a\"b\\c""#);
        assert_eq!(as_json_str("\n\r\t\u{0}\u{1f}"), br#""\n\r\t\u0000\u001f""#);
        assert_eq!(as_json_str("é\u{7f}"), "\"é\u{7f}\"".as_bytes());
    }

    #[test]
    fn decimals_are_written_in_full() {
        for n in [0, 7, 10, 502, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_round_trips_through_a_json_parser(text in ".*", bytes in proptest::collection::vec(0u8..0x80, 0..64)) {
            let ascii = String::from_utf8(bytes).expect("ASCII");
            for text in [text, ascii] {
                let written = as_json_str(&text);
                let parsed: String = serde_json::from_slice(&written).expect("a JSON string");
                proptest::prop_assert_eq!(parsed, text);
            }
        }
    }

    #[test]
    fn problem_body_has_every_field_and_matching_status() {
        let failure = GuardFailure::new(FailureKind::Connect, 3)
            .with_upstream(Some("payments:8080".into()))
            .with_request_id(Some(HeaderValue::from_static("req-42")));
        let response = synthesize(&failure, flavor(), None);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(
            response.headers()[CONTENT_LENGTH],
            response.body().len().to_string().as_str()
        );
        let body = json(&response);
        assert_eq!(body["type"], "urn:upstream-guard:problem:connect");
        assert_eq!(body["title"], "Bad Gateway");
        assert_eq!(body["status"], 502);
        assert_eq!(body["upstream"], "payments:8080");
        assert_eq!(body["attempts"], 3);
        assert_eq!(body["request_id"], "req-42");
        assert!(body["detail"].is_string());
    }

    #[test]
    fn error_text_is_hidden_unless_exposed() {
        let source: std::sync::Arc<dyn Error + Send + Sync> =
            std::sync::Arc::new(std::io::Error::other("secret internal host 10.1.2.3"));
        let failure = GuardFailure::new(FailureKind::Transport, 1).with_source(Some(source));
        let hidden = synthesize(&failure, flavor(), None);
        assert!(!String::from_utf8_lossy(hidden.body()).contains("secret"));
        let shown = synthesize(
            &failure,
            Flavor {
                expose_details: true,
                ..flavor()
            },
            None,
        );
        assert!(json(&shown)["detail"]
            .as_str()
            .unwrap()
            .contains("secret internal host"));
    }

    #[test]
    fn a_hook_that_rewrites_the_body_gets_a_matching_content_length() {
        let failure = GuardFailure::new(FailureKind::Connect, 1);
        let hook = |_: &GuardFailure, response: &mut Response<Bytes>| {
            *response.body_mut() = Bytes::from(vec![b'x'; 322]);
        };
        let response = synthesize(&failure, flavor(), Some(&hook));
        assert_eq!(response.body().len(), 322);
        assert_eq!(response.headers()[CONTENT_LENGTH], "322");
    }

    #[test]
    fn a_head_answer_has_no_body_even_when_the_hook_sets_one() {
        let failure = GuardFailure::new(FailureKind::Connect, 1);
        let hook = |_: &GuardFailure, response: &mut Response<Bytes>| {
            *response.body_mut() = Bytes::from_static(b"replaced by the hook");
        };
        let head = Flavor {
            is_head: true,
            ..flavor()
        };
        let response = synthesize(&failure, head, Some(&hook));
        assert!(response.body().is_empty());
        assert_eq!(response.headers()[CONTENT_LENGTH], "20");
    }

    #[test]
    fn head_has_no_body_but_the_get_length() {
        let failure = GuardFailure::new(FailureKind::DeadlineExceeded, 1);
        let get = synthesize(&failure, flavor(), None);
        let head = synthesize(
            &failure,
            Flavor {
                is_head: true,
                ..flavor()
            },
            None,
        );
        assert!(head.body().is_empty());
        assert_eq!(head.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            head.headers()[CONTENT_LENGTH],
            get.body().len().to_string().as_str()
        );
    }

    #[test]
    fn circuit_open_has_retry_after_rounded_up() {
        let failure = GuardFailure::new(FailureKind::CircuitOpen, 0)
            .with_retry_after(Some(Duration::from_millis(1500)));
        let response = synthesize(&failure, flavor(), None);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn grpc_failures_are_trailers_only_responses() {
        let grpc = Flavor {
            is_grpc: true,
            expose_details: true,
            ..flavor()
        };
        let source: std::sync::Arc<dyn Error + Send + Sync> =
            std::sync::Arc::new(std::io::Error::other("100% broken\nnewline ü"));
        let failure = GuardFailure::new(FailureKind::Transport, 2).with_source(Some(source));
        let response = synthesize(&failure, grpc, None);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains("100%25 broken%0Anewline %C3%BC"),
            "{message}"
        );
        let timeout = synthesize(
            &GuardFailure::new(FailureKind::AttemptTimeout, 1),
            grpc,
            None,
        );
        assert_eq!(timeout.headers()["grpc-status"], "4");
        assert!(timeout.body().is_empty());
    }

    #[test]
    fn the_failure_is_in_the_extensions() {
        let response = synthesize(
            &GuardFailure::new(FailureKind::CircuitOpen, 0),
            flavor(),
            None,
        );
        let failure = response.extensions().get::<GuardFailure>().unwrap();
        assert_eq!(failure.kind(), FailureKind::CircuitOpen);
    }
}
