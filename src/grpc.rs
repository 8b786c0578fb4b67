//! gRPC wire details: recognising gRPC requests and the `grpc-timeout` header.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};

use http::HeaderName;

/// The `grpc-timeout` header name. Header names are constants throughout: a
/// `&str` name is parsed again on every lookup.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The `grpc-status` header name.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The `grpc-message` header name.
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The `grpc-retry-pushback-ms` header name (gRFC A6).
pub(crate) const GRPC_RETRY_PUSHBACK_MS: HeaderName =
    HeaderName::from_static("grpc-retry-pushback-ms");

/// Whether a request is a gRPC call: a `POST` (every gRPC call is one) whose
/// `content-type` starts with `application/grpc` (this covers
/// `application/grpc+proto`, `application/grpc-web` and friends). Other
/// methods are answered without looking a header up.
pub(crate) fn is_grpc(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::POST && is_grpc_content(headers)
}

/// Whether a message's `content-type` is gRPC's.
pub(crate) fn is_grpc_content(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The deadline an inbound gRPC call carries in `grpc-timeout`, if valid.
pub(crate) fn inbound_timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get(GRPC_TIMEOUT)?.as_bytes())
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits then one unit of `H`, `M`,
/// `S`, `m`, `u` or `n`. Anything else is `None` (and is ignored by the guard, as the
/// gRPC spec tells servers to do with a malformed timeout).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: fits in u64 with room to spare.
    let n = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a duration as a `grpc-timeout` value, in the finest unit whose value fits
/// the 8-digit limit, rounding down (the upstream should give up before we do) but
/// never to zero.
pub fn encode_grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let (value, unit) = if nanos <= MAX {
        (nanos, b'n')
    } else if nanos / 1_000 <= MAX {
        (nanos / 1_000, b'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos / 1_000_000, b'm')
    } else if nanos / 1_000_000_000 <= MAX {
        (nanos / 1_000_000_000, b'S')
    } else if nanos / 60_000_000_000 <= MAX {
        (nanos / 60_000_000_000, b'M')
    } else {
        ((nanos / 3_600_000_000_000).min(MAX), b'H')
    };
    // Format into a stack buffer: at most 8 digits and the unit.
    let mut value = value.clamp(1, MAX);
    let mut buf = [0u8; 9];
    let mut start = 8;
    buf[8] = unit;
    while value > 0 {
        start -= 1;
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    // Digits and an ASCII unit letter are always a valid header value.
    HeaderValue::from_bytes(&buf[start..]).unwrap_or_else(|_| HeaderValue::from_static("1n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_post_with_a_grpc_content_type_is_a_grpc_call() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&Method::POST, &headers));
        assert!(!is_grpc(&Method::GET, &headers));
        assert!(!is_grpc(&Method::POST, &HeaderMap::new()));
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"4S"), Some(Duration::from_secs(4)));
        assert_eq!(
            parse_grpc_timeout(b"150m"),
            Some(Duration::from_millis(150))
        );
        assert_eq!(parse_grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            &b""[..],
            b"m",
            b"10",
            b"123456789m",
            b"1x",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(
                parse_grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encodes_in_the_finest_unit_that_fits() {
        assert_eq!(encode_grpc_timeout(Duration::from_millis(50)), "50000000n");
        assert_eq!(encode_grpc_timeout(Duration::from_millis(800)), "800000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(3)), "3000000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(1000)), "1000000m");
        assert_eq!(encode_grpc_timeout(Duration::ZERO), "1n");
    }

    #[test]
    fn encoding_round_trips_within_one_unit() {
        for ms in [1u64, 17, 999, 12_345, 86_400_000] {
            let d = Duration::from_millis(ms);
            let back = parse_grpc_timeout(encode_grpc_timeout(d).as_bytes()).unwrap();
            assert!(
                back <= d && d - back < Duration::from_millis(1),
                "{d:?} -> {back:?}"
            );
        }
    }
}
