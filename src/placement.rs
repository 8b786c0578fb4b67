//! Where a guard sits — in front of a client, behind a server before its
//! routing, or on a route the server fixed — as far as a request can tell.
//!
//! Only request extensions tell, because a server sets them and a caller
//! never can: axum's `MatchedPath` and `OriginalUri` (feature `axum`), tonic's
//! connection info and method tag, and the key a
//! [`GuardedService`](crate::tonic::GuardedService) adds (feature `tonic`). The
//! default breaker keying reads it, so that behind a server no breaker is ever
//! keyed by a value the caller picked.

use http::request::Parts;

/// Where a guard sits, as far as a request can tell. Without the `axum` and
/// `tonic` features nothing tells: every request is a client's.
#[cfg_attr(not(any(feature = "axum", feature = "tonic")), allow(dead_code))]
pub(crate) enum Placement<'a> {
    /// Behind a server, on a route the server fixed (axum's matched route, a
    /// tonic service's name): the route's key.
    Route(&'a str),
    /// Behind a server, before its routing: the only route facts there are
    /// the caller's own (`:authority`, path), so none of them is a key.
    Server,
    /// In front of a client: the request's URI names its upstream.
    Client,
}

impl Placement<'_> {
    /// Where the guard that sees this request sits. Only request extensions,
    /// which a server sets and a caller never can, say "server".
    pub(crate) fn of(parts: &Parts) -> Placement<'_> {
        #[cfg(feature = "tonic")]
        if let Some(seen) = tonic_placement::seen_by(parts) {
            return match seen {
                tonic_placement::Seen::Client => Placement::Client,
                tonic_placement::Seen::Service(name) => Placement::Route(name),
                tonic_placement::Seen::Server => Placement::Server,
            };
        }
        #[cfg(feature = "axum")]
        if let Some(placement) = axum_placement(parts) {
            return placement;
        }
        let _ = parts; // Read only by the features above.
        Placement::Client
    }
}

/// A request routed by an axum `Router` and not since rewritten for an
/// upstream: keyed by the route axum matched (a pattern from the route table,
/// so a bounded set), or the shared breaker when none matched. A handler that
/// forwards the request to an upstream changes its URI's authority, which
/// makes it a client request again (its extensions travel with it).
#[cfg(feature = "axum")]
fn axum_placement(parts: &Parts) -> Option<Placement<'_>> {
    let received = parts.extensions.get::<axum::extract::OriginalUri>()?;
    if received.authority() != parts.uri.authority() {
        return None;
    }
    Some(match parts.extensions.get::<axum::extract::MatchedPath>() {
        Some(route) => Placement::Route(route.as_str()),
        None => Placement::Server,
    })
}

#[cfg(feature = "tonic")]
pub(crate) use tonic_placement::ServiceKey;

/// What tonic's request extensions say.
#[cfg(feature = "tonic")]
mod tonic_placement {
    /// The breaker key a [`GuardedService`](crate::tonic::GuardedService) gives its requests: a request
    /// extension, which only server code can set.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct ServiceKey(pub(crate) &'static str);

    /// Who a request tells the guard it came from.
    pub(crate) enum Seen {
        /// A tonic stub made it: a client placement.
        Client,
        /// A [`GuardedService`](crate::tonic::GuardedService) passed it on: that service's key.
        Service(&'static str),
        /// A tonic server received it, before any routing.
        Server,
    }

    /// What tonic's own request extensions say about where the guard sits;
    /// `None` when they say nothing.
    pub(crate) fn seen_by(parts: &http::request::Parts) -> Option<Seen> {
        let extensions = &parts.extensions;
        // Checked first: a server handler may pass its request's extensions on to
        // a client call, and the stub then adds its method.
        if extensions.get::<::tonic::GrpcMethod<'static>>().is_some() {
            return Some(Seen::Client);
        }
        if let Some(ServiceKey(name)) = extensions.get::<ServiceKey>() {
            return Some(Seen::Service(name));
        }
        if received_by_a_tonic_server(extensions) {
            return Some(Seen::Server);
        }
        None
    }

    /// Whether tonic's server attached its connection info: it does so to every
    /// request, before the layers of `Server::layer`.
    fn received_by_a_tonic_server(extensions: &http::Extensions) -> bool {
        use ::tonic::transport::server::TcpConnectInfo;
        #[cfg(unix)]
        if extensions
            .get::<::tonic::transport::server::UdsConnectInfo>()
            .is_some()
        {
            return true;
        }
        extensions.get::<TcpConnectInfo>().is_some()
    }

    #[cfg(test)]
    mod tests {
        use ::tonic::transport::server::TcpConnectInfo;

        use http::Request;

        use super::*;

        fn received_by_a_tonic_server() -> http::request::Parts {
            let (mut parts, ()) = Request::post("http://caller-chosen.example/pkg.Svc/Do")
                .body(())
                .expect("a valid request")
                .into_parts();
            parts.extensions.insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            });
            parts
        }

        #[test]
        fn a_request_a_tonic_server_received_is_seen_as_a_server_request() {
            let parts = received_by_a_tonic_server();
            assert!(matches!(seen_by(&parts), Some(Seen::Server)));
        }

        #[test]
        fn a_stub_call_that_carries_a_server_requests_extensions_is_a_client_request() {
            // A handler may pass its request on to a client stub, extensions and
            // all; the stub adds the method it calls.
            let mut parts = received_by_a_tonic_server();
            (parts.extensions).insert(::tonic::GrpcMethod::new("pkg.Other", "Call"));
            assert!(matches!(seen_by(&parts), Some(Seen::Client)));
        }
    }
}
