//! Driving a guarded hyper-util client, and reading what it answers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use upstream_guard::{GuardFailure, RequestBody, UpstreamGuard, UpstreamGuardLayer};

/// The inner service of most tests: a plain hyper-util HTTP/1 client.
pub type HttpClient = Client<HttpConnector, RequestBody<Full<Bytes>>>;

/// The guard around a hyper-util client.
pub type Guarded = UpstreamGuard<HttpClient>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn guarded(layer: &UpstreamGuardLayer) -> Guarded {
    layer.layer(http_client())
}

/// A request with a method, URL and body.
pub fn request(method: &str, url: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body.into()))
        .expect("valid test request")
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    request("GET", url, Bytes::new())
}

/// A collected response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub failure: Option<GuardFailure>,
}

impl Answer {
    /// The problem+json body, after checking it is one and that `status` matches.
    pub fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..]),
            "not a problem+json response: {self:?}"
        );
        let value: serde_json::Value =
            serde_json::from_slice(&self.body).expect("problem body is valid JSON");
        assert_eq!(
            value["status"],
            self.status.as_u16(),
            "status field matches"
        );
        assert_eq!(
            self.headers["content-length"].to_str().unwrap(),
            self.body.len().to_string()
        );
        assert_eq!(self.headers["cache-control"], "no-store");
        value
    }
}

/// Sends one request through (a clone of) the service and collects the answer,
/// bounded by 30 s so a broken guard fails the test instead of hanging it.
pub async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> Answer
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = tokio::time::timeout(Duration::from_secs(30), service.clone().oneshot(request))
        .await
        .expect("the guard answered within 30 s")
        .expect("infallible");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("the body ended within 30 s")
        .expect("the body did not fail")
        .to_bytes();
    Answer {
        status: parts.status,
        failure: parts.extensions.get::<GuardFailure>().cloned(),
        headers: parts.headers,
        body,
    }
}
