//! The server of the end-to-end benchmark (`benches/e2e.sh`): an axum app on
//! loopback that serves one trivial handler twice, directly at `/` and through
//! `UpstreamGuardLayer::new()` (applied with `Router::layer`) at `/guarded`, so
//! the two paths differ only by the guard.
//!
//! ```text
//! cargo run --release --example bench_server -- 127.0.0.1:0
//! ```
//!
//! It prints `listening on http://ADDR` once bound, and stops by itself after
//! `BENCH_SERVER_MAX_SECS` seconds (default 600), or on Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use upstream_guard::UpstreamGuardLayer;

/// What the "upstream" answers: the same for both paths.
async fn handler() -> &'static str {
    "ok"
}

fn app() -> Router {
    let guarded = Router::new()
        .route("/guarded", get(handler))
        .layer(UpstreamGuardLayer::new());
    Router::new().route("/", get(handler)).merge(guarded)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned())
        .parse()?;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing to listen on {addr}: loopback addresses only").into());
    }
    let max_secs = match std::env::var("BENCH_SERVER_MAX_SECS") {
        Ok(secs) => secs.parse()?,
        Err(_) => 600,
    };

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let stop = async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(max_secs)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app())
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
