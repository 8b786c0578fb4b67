//! The demo's load generator: a plain client that sends the plan to the
//! gateway at a steady pace, and what each request got back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::demo::{Scenario, DEMO_IN_FLIGHT, DEMO_SPREAD};

/// What one demo request got back.
#[derive(Debug)]
pub struct Sample {
    pub scenario: Scenario,
    pub outcome: Result<Answer, String>,
    pub latency: Duration,
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Set when the guard answered (a problem+json body).
    pub problem: Option<Problem>,
}

/// The parts of a problem+json body the summary shows.
#[derive(Debug)]
pub struct Problem {
    pub kind: String,
    pub attempts: u64,
}

impl Problem {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Option<Problem> {
        let content_type = headers.get(header::CONTENT_TYPE)?;
        if content_type != "application/problem+json" {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let kind = value["type"].as_str()?;
        Some(Problem {
            kind: kind
                .trim_start_matches("urn:upstream-guard:problem:")
                .to_owned(),
            attempts: value["attempts"].as_u64()?,
        })
    }
}

/// The plain (unguarded) client the demo uses to call the gateway.
type LoadClient = Client<HttpConnector, Full<Bytes>>;

/// Sends `plan` to the gateway at a steady pace over [`DEMO_SPREAD`], with at
/// most [`DEMO_IN_FLIGHT`] requests in flight, and collects what came back.
pub async fn drive_load(
    gateway: SocketAddr,
    plan: Vec<Scenario>,
    deadline: Duration,
) -> Vec<Sample> {
    let client: LoadClient = Client::builder(TokioExecutor::new()).build_http();
    // The guard answers within its deadline; this only catches a broken gateway.
    let patience = deadline + Duration::from_secs(2);
    let in_flight = Arc::new(Semaphore::new(DEMO_IN_FLIGHT));
    let pace = DEMO_SPREAD / u32::try_from(plan.len().max(1)).unwrap_or(u32::MAX);
    let mut ticker = tokio::time::interval(pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    let total = plan.len();
    for (seq, scenario) in plan.into_iter().enumerate() {
        ticker.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let client = client.clone();
        tasks.spawn(async move {
            let sample = send(&client, scenario, gateway, seq, patience).await;
            drop(permit);
            sample
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(sample) => samples.push(sample),
            Err(error) => tracing::warn!("a demo request task failed: {error}"),
        }
    }
    samples
}

/// Sends one demo request and reads the whole response, within `patience`.
async fn send(
    client: &LoadClient,
    scenario: Scenario,
    gateway: SocketAddr,
    seq: usize,
    patience: Duration,
) -> Sample {
    let started = Instant::now();
    let exchange = async {
        let response = client
            .request(scenario.request(gateway, seq)?)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            problem: Problem::parse(&parts.headers, &body),
        })
    };
    let outcome = tokio::time::timeout(patience, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {patience:?}")));
    Sample {
        scenario,
        outcome,
        latency: started.elapsed(),
    }
}
