//! The responses the guard synthesizes: RFC 9457 problem+json for HTTP, and
//! trailers-only responses for gRPC.

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS};
use serde::Serialize;

use crate::failure::GuardFailure;

/// What the synthesizer needs to know about the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flavor {
    pub(crate) is_head: bool,
    pub(crate) is_grpc: bool,
    pub(crate) expose_details: bool,
}

/// The RFC 9457 problem document.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

/// Builds the response for a failure, with the failure in its extensions.
pub(crate) fn synthesize(failure: &GuardFailure, flavor: Flavor) -> Response<Bytes> {
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
    // Serializing a struct of strings and integers to a Vec cannot fail.
    // Sized for a typical problem document, so it is written without regrowing.
    let mut json = Vec::with_capacity(320);
    let _ = serde_json::to_writer(&mut json, &problem);
    let len = json.len();
    let body = if flavor.is_head {
        Bytes::new()
    } else {
        Bytes::from(json)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // For HEAD this is the length a GET would have had, as RFC 9110 allows.
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(after) = failure.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
        }
    }
    response
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
        HeaderValue::from(u16::from(failure.kind().grpc_code())),
    );
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert(crate::grpc::GRPC_MESSAGE, value);
    }
    if let Some(after) = failure.retry_after() {
        // gRPC's server pushback (gRFC A6): how long a retrying client should wait.
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        headers.insert(crate::grpc::GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(ms));
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

    #[test]
    fn problem_body_has_every_field_and_matching_status() {
        let failure = GuardFailure::new(FailureKind::Connect, 3)
            .with_upstream(Some("payments:8080".into()))
            .with_request_id(Some(HeaderValue::from_static("req-42")));
        let response = synthesize(&failure, flavor());
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
        let hidden = synthesize(&failure, flavor());
        assert!(!String::from_utf8_lossy(hidden.body()).contains("secret"));
        let shown = synthesize(
            &failure,
            Flavor {
                expose_details: true,
                ..flavor()
            },
        );
        assert!(json(&shown)["detail"]
            .as_str()
            .unwrap()
            .contains("secret internal host"));
    }

    #[test]
    fn head_has_no_body_but_the_get_length() {
        let failure = GuardFailure::new(FailureKind::DeadlineExceeded, 1);
        let get = synthesize(&failure, flavor());
        let head = synthesize(
            &failure,
            Flavor {
                is_head: true,
                ..flavor()
            },
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
        let response = synthesize(&failure, flavor());
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
        let response = synthesize(&failure, grpc);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains("100%25 broken%0Anewline %C3%BC"),
            "{message}"
        );
        let timeout = synthesize(&GuardFailure::new(FailureKind::AttemptTimeout, 1), grpc);
        assert_eq!(timeout.headers()["grpc-status"], "4");
        assert!(timeout.body().is_empty());
    }

    #[test]
    fn the_failure_is_in_the_extensions() {
        let response = synthesize(&GuardFailure::new(FailureKind::CircuitOpen, 0), flavor());
        let failure = response.extensions().get::<GuardFailure>().unwrap();
        assert_eq!(failure.kind(), FailureKind::CircuitOpen);
    }
}
