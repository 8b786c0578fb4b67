//! The proxy helper every gateway here shares (`examples/common/proxy.rs`):
//! what it does to a request's URI and headers on the way to the upstream, which
//! protocol the request goes in (h2c for a gRPC call, else HTTP/1.1), and what it
//! does to a response's headers on the way back.

#[path = "../examples/common/proxy.rs"]
mod proxy;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::header::HeaderValue;
use http::{request, response, Request, Response, Version};

use proxy::{forward_request, forward_response, Target, UpstreamProtocol};

/// The caller every test's request comes from, unless it says otherwise.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 51000);

fn target() -> Target {
    Target::new("10.1.2.3:8080".parse().expect("an authority")).expect("a valid Host")
}

/// The head of a request to `uri` with `headers`, as a proxy received it.
fn request(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("a valid request").into_parts().0
}

/// `request` after forwarding it from `client`, at its own path and query.
fn forwarded_from(client: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut parts = request(uri, headers);
    let path = proxy::path_and_query(&parts.uri);
    forward_request(&mut parts, &target(), path, client).expect("a buildable URI");
    parts
}

fn forwarded(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    forwarded_from(CLIENT, uri, headers)
}

/// Every value of `name`, as text.
fn values(parts: &request::Parts, name: &str) -> Vec<String> {
    parts
        .headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn value(parts: &request::Parts, name: &str) -> Option<String> {
    let mut all = values(parts, name);
    assert!(all.len() <= 1, "{name} has several lines: {all:?}");
    all.pop()
}

// ---------------------------------------------------------------------------
// URI, version, Host
// ---------------------------------------------------------------------------

#[test]
fn the_uri_becomes_the_upstreams_keeping_path_and_query() {
    let parts = forwarded("/a/b?x=1&y=%20", &[("host", "public.example")]);

    assert_eq!(parts.uri, "http://10.1.2.3:8080/a/b?x=1&y=%20");
}

#[test]
fn an_absolute_form_target_is_re_aimed_at_the_upstream() {
    let parts = forwarded("http://public.example/page?q", &[]);

    assert_eq!(parts.uri, "http://10.1.2.3:8080/page?q");
    assert_eq!(
        value(&parts, "x-forwarded-host").as_deref(),
        Some("public.example"),
        "the target's authority is the original host"
    );
}

#[test]
fn a_request_that_is_no_grpc_call_is_http_1_1_whatever_the_caller_spoke() {
    let mut parts = request("/", &[]);
    parts.version = Version::HTTP_2;
    let path = proxy::path_and_query(&parts.uri);
    forward_request(&mut parts, &target(), path, CLIENT).expect("a buildable URI");

    assert_eq!(parts.version, Version::HTTP_11);
}

#[test]
fn host_becomes_the_upstreams_authority_and_the_callers_goes_to_x_forwarded_host() {
    let parts = forwarded("/", &[("host", "public.example:8443")]);

    assert_eq!(value(&parts, "host").as_deref(), Some("10.1.2.3:8080"));
    assert_eq!(
        value(&parts, "x-forwarded-host").as_deref(),
        Some("public.example:8443")
    );
}

// ---------------------------------------------------------------------------
// gRPC calls: h2c upstream
// ---------------------------------------------------------------------------

/// The head of a `POST` with `headers`, as a proxy received it over HTTP/2.
fn post(headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = Request::post("/grpc.health.v1.Health/Check").version(Version::HTTP_2);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("a valid request").into_parts().0
}

/// `parts` forwarded, and the protocol it goes upstream in.
fn forward(mut parts: request::Parts) -> (request::Parts, UpstreamProtocol) {
    let path = proxy::path_and_query(&parts.uri);
    let protocol = forward_request(&mut parts, &target(), path, CLIENT).expect("a buildable URI");
    (parts, protocol)
}

#[test]
fn a_grpc_call_over_http_2_goes_upstream_over_h2c() {
    let (parts, protocol) = forward(post(&[("content-type", "application/grpc")]));

    assert_eq!(protocol, UpstreamProtocol::H2c);
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(
        parts.uri,
        "http://10.1.2.3:8080/grpc.health.v1.Health/Check"
    );
}

#[test]
fn a_grpc_typed_request_over_http_1_1_stays_http_1_1_with_host_and_without_te() {
    let mut parts = post(&[
        ("content-type", "application/grpc"),
        ("connection", "te"),
        ("te", "trailers"),
    ]);
    parts.version = Version::HTTP_11;

    let (parts, protocol) = forward(parts);

    assert_eq!(protocol, UpstreamProtocol::Http1);
    assert_eq!(parts.version, Version::HTTP_11);
    assert_eq!(value(&parts, "host").as_deref(), Some("10.1.2.3:8080"));
    assert_eq!(value(&parts, "te"), None);
}

#[test]
fn grpc_content_types_with_a_suffix_or_parameters_go_over_h2c() {
    for content_type in ["application/grpc+proto", "application/grpc;charset=utf-8"] {
        let (parts, protocol) = forward(post(&[("content-type", content_type)]));

        assert_eq!(protocol, UpstreamProtocol::H2c, "{content_type}");
        assert_eq!(parts.version, Version::HTTP_2, "{content_type}");
    }
}

#[test]
fn grpc_web_and_other_requests_stay_http_1_1() {
    for content_type in [
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpcx",
        "application/json",
    ] {
        let (parts, protocol) = forward(post(&[("content-type", content_type)]));

        assert_eq!(protocol, UpstreamProtocol::Http1, "{content_type}");
        assert_eq!(parts.version, Version::HTTP_11, "{content_type}");
    }
    let (_, protocol) = forward(post(&[]));
    assert_eq!(protocol, UpstreamProtocol::Http1, "no content type");
    let get = request("/x", &[("content-type", "application/grpc")]);
    assert_eq!(forward(get).1, UpstreamProtocol::Http1, "not a POST");
}

#[test]
fn a_grpc_call_names_its_upstream_in_the_uri_not_in_host() {
    let (parts, _) = forward(post(&[
        ("content-type", "application/grpc"),
        ("host", "public.example"),
    ]));

    assert_eq!(value(&parts, "host"), None);
    assert_eq!(
        parts.uri.authority().map(|a| a.as_str()),
        Some("10.1.2.3:8080")
    );
    assert_eq!(
        value(&parts, "x-forwarded-host").as_deref(),
        Some("public.example")
    );
}

#[test]
fn a_grpc_call_keeps_te_trailers_and_nothing_else_of_te() {
    for te in [
        "trailers",
        "Trailers",
        "deflate;q=0.5, trailers",
        "trailers, gzip",
    ] {
        let (parts, _) = forward(post(&[("content-type", "application/grpc"), ("te", te)]));

        assert_eq!(value(&parts, "te").as_deref(), Some("trailers"), "{te}");
    }
}

#[test]
fn a_grpc_call_without_te_trailers_has_no_te() {
    for headers in [
        &[("content-type", "application/grpc")][..],
        &[("content-type", "application/grpc"), ("te", "gzip")][..],
    ] {
        let (parts, _) = forward(post(headers));

        assert_eq!(value(&parts, "te"), None, "{headers:?}");
    }
}

#[test]
fn every_other_hop_by_hop_header_is_removed_from_a_grpc_call() {
    let mut headers: Vec<(&str, &str)> = HOP_BY_HOP
        .iter()
        .copied()
        .filter(|(name, _)| *name != "te")
        .collect();
    headers.push(("content-type", "application/grpc"));
    headers.push(("te", "trailers"));
    let (parts, _) = forward(post(&headers));

    for (name, _) in HOP_BY_HOP.iter().filter(|(name, _)| *name != "te") {
        assert_eq!(values(&parts, name), Vec::<String>::new(), "{name} crossed");
    }
    assert_eq!(
        value(&parts, "content-type").as_deref(),
        Some("application/grpc")
    );
}

// ---------------------------------------------------------------------------
// Hop-by-hop headers
// ---------------------------------------------------------------------------

/// RFC 9110 §7.6.1's hop-by-hop headers, and the proxy credentials.
const HOP_BY_HOP: [(&str, &str); 9] = [
    ("connection", "keep-alive"),
    ("keep-alive", "timeout=5"),
    ("proxy-connection", "keep-alive"),
    ("te", "trailers"),
    ("trailer", "x-checksum"),
    ("transfer-encoding", "chunked"),
    ("upgrade", "websocket"),
    ("proxy-authenticate", "Basic"),
    ("proxy-authorization", "Basic Zm9vOmJhcg=="),
];

#[test]
fn every_hop_by_hop_request_header_is_removed_and_end_to_end_ones_are_kept() {
    let mut headers = HOP_BY_HOP.to_vec();
    headers.push(("x-end-to-end", "kept"));
    headers.push(("authorization", "Bearer abc"));
    let parts = forwarded("/", &headers);

    for (name, _) in HOP_BY_HOP {
        assert_eq!(values(&parts, name), Vec::<String>::new(), "{name} crossed");
    }
    assert_eq!(value(&parts, "x-end-to-end").as_deref(), Some("kept"));
    assert_eq!(
        value(&parts, "authorization").as_deref(),
        Some("Bearer abc")
    );
}

#[test]
fn each_hop_by_hop_request_header_is_removed_when_it_is_the_only_one() {
    for (name, hop_value) in HOP_BY_HOP {
        let parts = forwarded("/", &[(name, hop_value), ("x-end-to-end", "kept")]);

        assert_eq!(values(&parts, name), Vec::<String>::new(), "{name} crossed");
        assert_eq!(value(&parts, "x-end-to-end").as_deref(), Some("kept"));
    }
}

#[test]
fn headers_named_by_connection_are_removed_in_any_case_and_across_lines() {
    let parts = forwarded(
        "/",
        &[
            ("connection", "X-Hop-One ,close"),
            ("connection", " x-hop-two"),
            ("x-hop-one", "1"),
            ("x-hop-two", "2"),
            ("x-end-to-end", "kept"),
        ],
    );

    assert_eq!(value(&parts, "x-hop-one"), None);
    assert_eq!(value(&parts, "x-hop-two"), None);
    assert_eq!(value(&parts, "connection"), None);
    assert_eq!(value(&parts, "x-end-to-end").as_deref(), Some("kept"));
}

#[test]
fn connection_cannot_remove_the_forwarding_headers_this_proxy_adds() {
    let parts = forwarded(
        "/",
        &[
            ("connection", "x-forwarded-for, forwarded, host"),
            ("x-forwarded-for", "203.0.113.9"),
            ("host", "public.example"),
        ],
    );

    assert_eq!(
        value(&parts, "x-forwarded-for").as_deref(),
        Some("192.0.2.7"),
        "the named claim goes, our entry stays"
    );
    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=192.0.2.7;host=public.example;proto=http")
    );
    assert_eq!(value(&parts, "host").as_deref(), Some("10.1.2.3:8080"));
}

#[test]
fn every_hop_by_hop_response_header_is_removed_and_named_ones_too() {
    let mut builder = Response::builder().version(Version::HTTP_10);
    for (name, value) in HOP_BY_HOP {
        builder = builder.header(name, value);
    }
    let response = builder
        .header("connection", "x-secret")
        .header("x-secret", "internal")
        .header("x-end-to-end", "kept")
        .body(())
        .expect("a valid response");
    let mut parts: response::Parts = response.into_parts().0;

    forward_response(&mut parts);

    for (name, _) in HOP_BY_HOP {
        assert!(!parts.headers.contains_key(name), "{name} crossed");
    }
    assert!(!parts.headers.contains_key("x-secret"));
    assert_eq!(parts.headers["x-end-to-end"], "kept");
    assert_eq!(parts.version, Version::HTTP_11);
}

// ---------------------------------------------------------------------------
// Forwarding headers
// ---------------------------------------------------------------------------

#[test]
fn x_forwarded_for_names_the_client_when_none_came() {
    let parts = forwarded("/", &[]);

    assert_eq!(
        value(&parts, "x-forwarded-for").as_deref(),
        Some("192.0.2.7")
    );
}

#[test]
fn the_client_is_appended_to_a_client_sent_x_forwarded_for() {
    let parts = forwarded("/", &[("x-forwarded-for", "203.0.113.9, 198.51.100.2")]);

    assert_eq!(
        value(&parts, "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 198.51.100.2, 192.0.2.7")
    );
}

#[test]
fn several_x_forwarded_for_lines_become_one_list_ending_with_the_client() {
    let parts = forwarded(
        "/",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.2"),
        ],
    );

    assert_eq!(
        values(&parts, "x-forwarded-for"),
        ["203.0.113.9, 198.51.100.2, 192.0.2.7"]
    );
}

#[test]
fn a_non_utf8_x_forwarded_for_is_kept_as_it_came_before_the_client() {
    let mut parts = request("/", &[]);
    parts.headers.insert(
        "x-forwarded-for",
        HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is a valid value"),
    );
    let path = proxy::path_and_query(&parts.uri);
    forward_request(&mut parts, &target(), path, CLIENT).expect("a buildable URI");

    assert_eq!(
        parts.headers["x-forwarded-for"].as_bytes(),
        b"caf\xe9, 192.0.2.7"
    );
}

#[test]
fn the_client_is_appended_to_a_client_sent_forwarded() {
    let parts = forwarded(
        "/",
        &[
            ("forwarded", "for=203.0.113.9;proto=https"),
            ("host", "public.example"),
        ],
    );

    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=203.0.113.9;proto=https, for=192.0.2.7;host=public.example;proto=http")
    );
}

#[test]
fn a_forwarded_host_with_a_port_is_quoted() {
    let parts = forwarded("/", &[("host", "public.example:8443")]);

    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=192.0.2.7;host=\"public.example:8443\";proto=http")
    );
}

#[test]
fn x_forwarded_proto_and_host_replace_what_the_client_claimed() {
    let parts = forwarded(
        "/",
        &[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("host", "public.example"),
        ],
    );

    assert_eq!(value(&parts, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        value(&parts, "x-forwarded-host").as_deref(),
        Some("public.example")
    );
}

#[test]
fn a_request_without_any_host_drops_a_client_sent_x_forwarded_host() {
    let parts = forwarded("/", &[("x-forwarded-host", "bank.example")]);

    assert_eq!(value(&parts, "x-forwarded-host"), None);
    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=192.0.2.7;proto=http")
    );
}

#[test]
fn an_ipv6_client_is_bare_in_x_forwarded_for_and_bracketed_in_forwarded() {
    let client = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x17)),
        51000,
    );
    let parts = forwarded_from(client, "/", &[("x-forwarded-for", "203.0.113.9")]);

    assert_eq!(
        value(&parts, "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 2001:db8::17")
    );
    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=\"[2001:db8::17]\";proto=http")
    );
}

#[test]
fn an_ipv4_client_on_a_dual_stack_socket_is_written_as_ipv4() {
    let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
    let parts = forwarded_from(SocketAddr::new(IpAddr::V6(mapped), 51000), "/", &[]);

    assert_eq!(
        value(&parts, "x-forwarded-for").as_deref(),
        Some("192.0.2.7")
    );
    assert_eq!(
        value(&parts, "forwarded").as_deref(),
        Some("for=192.0.2.7;proto=http")
    );
}

#[test]
fn an_ipv4_client_is_written_as_display_writes_it() {
    // Every octet width (1, 2, 3 digits) and its edges, in every position.
    const OCTETS: [u8; 10] = [0, 1, 9, 10, 99, 100, 199, 200, 250, 255];
    for a in OCTETS {
        for b in OCTETS {
            for c in OCTETS {
                for d in OCTETS {
                    let ip = Ipv4Addr::new(a, b, c, d);
                    let parts = forwarded_from(SocketAddr::new(IpAddr::V4(ip), 51000), "/", &[]);

                    let expected = ip.to_string();
                    assert_eq!(value(&parts, "x-forwarded-for"), Some(expected.clone()));
                    assert_eq!(
                        value(&parts, "forwarded"),
                        Some(format!("for={expected};proto=http"))
                    );
                }
            }
        }
    }
}
