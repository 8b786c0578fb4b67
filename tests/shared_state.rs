//! Every clone of the layer, and every service it makes, shares one state.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::guard::{get, guarded, send};
use support::observer::Recording;
use support::upstream::Upstream;
use tower::Layer;
use upstream_guard::observe::RetryDenied;
use upstream_guard::{RetryPolicy, UpstreamGuardLayer};

#[tokio::test]
async fn clones_of_the_layer_and_service_report_to_one_observer() {
    let observer = Recording::default();
    let layer = UpstreamGuardLayer::builder()
        .observer(observer.clone())
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let a = guarded(&layer.clone());
    let b = guarded(&layer).clone();
    assert_eq!(
        send(&a, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&b, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
    assert_eq!(observer.responses().len(), 2);
}

#[tokio::test]
async fn clones_spend_one_retry_budget() {
    // No ratio, a floor of one retry per second over a one-second window: exactly
    // one retry in total, whichever clone asks for it.
    let observer = Recording::default();
    let layer = UpstreamGuardLayer::builder()
        .retry(
            RetryPolicy::default()
                .backoff(Duration::from_millis(1), Duration::from_millis(2))
                .budget(0.0, 1)
                .budget_window(Duration::from_secs(1)),
        )
        .observer(observer.clone())
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let services = [
        guarded(&layer),
        guarded(&layer.clone()),
        layer.layer(support::guard::http_client()),
    ];
    for service in &services {
        let answer = send(service, get(&upstream.url("/status/503"))).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(
        upstream.count("/status/503"),
        4,
        "3 requests + 1 budgeted retry"
    );
    assert!(observer.denials().contains(&RetryDenied::Budget));
}
