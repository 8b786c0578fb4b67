//! Invalid configuration is a `Result` error naming the field, never a panic.

use std::time::Duration;

use upstream_guard::{ConfigError, RetryPolicy, UpstreamGuardLayer};

fn error_of(builder: upstream_guard::Builder) -> ConfigError {
    builder
        .build()
        .expect_err("the configuration should be rejected")
}

#[test]
fn zero_attempt_timeout_names_the_field() {
    let err = error_of(UpstreamGuardLayer::builder().attempt_timeout(Duration::ZERO));
    assert_eq!(err.field(), "attempt_timeout");
    assert!(err.to_string().contains("`attempt_timeout`"), "{err}");
}

#[test]
fn zero_deadline_names_the_field() {
    let err = error_of(UpstreamGuardLayer::builder().deadline(Duration::ZERO));
    assert_eq!(err.field(), "deadline");
}

#[test]
fn deadline_shorter_than_attempt_timeout_is_rejected() {
    let err = error_of(
        UpstreamGuardLayer::builder()
            .attempt_timeout(Duration::from_secs(2))
            .deadline(Duration::from_secs(1)),
    );
    assert_eq!(err.field(), "deadline");
    assert!(err.message().contains("attempt_timeout"), "{err}");
}

#[test]
fn zero_and_huge_max_attempts_are_rejected() {
    for attempts in [0, 11, u32::MAX] {
        let err = error_of(
            UpstreamGuardLayer::builder().retry(RetryPolicy::default().max_attempts(attempts)),
        );
        assert_eq!(err.field(), "retry.max_attempts", "attempts = {attempts}");
    }
}

#[test]
fn backoff_must_be_positive_and_ordered() {
    let err = error_of(
        UpstreamGuardLayer::builder()
            .retry(RetryPolicy::default().backoff(Duration::ZERO, Duration::from_secs(1))),
    );
    assert_eq!(err.field(), "retry.backoff_base");
    let err = error_of(
        UpstreamGuardLayer::builder()
            .retry(RetryPolicy::default().backoff(Duration::from_secs(2), Duration::from_secs(1))),
    );
    assert_eq!(err.field(), "retry.backoff_max");
}

#[test]
fn budget_ratio_must_be_a_sane_number() {
    for ratio in [-0.1, f64::NAN, f64::INFINITY, 1e9] {
        let err =
            error_of(UpstreamGuardLayer::builder().retry(RetryPolicy::default().budget(ratio, 10)));
        assert_eq!(err.field(), "retry.budget_ratio", "ratio = {ratio}");
    }
}

#[test]
fn budget_window_is_bounded() {
    for window in [Duration::ZERO, Duration::from_secs(61)] {
        let err = error_of(
            UpstreamGuardLayer::builder().retry(RetryPolicy::default().budget_window(window)),
        );
        assert_eq!(err.field(), "retry.budget_window");
    }
}

#[test]
fn replay_cap_is_bounded() {
    let err = error_of(
        UpstreamGuardLayer::builder().retry(RetryPolicy::default().max_replay_body(usize::MAX)),
    );
    assert_eq!(err.field(), "retry.max_replay_body");
}

#[test]
fn empty_upstream_name_is_rejected() {
    let err = error_of(UpstreamGuardLayer::builder().upstream_name(""));
    assert_eq!(err.field(), "upstream_name");
}

#[test]
fn the_defaults_are_valid() {
    assert!(UpstreamGuardLayer::builder().build().is_ok());
    assert!(UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .build()
        .is_ok());
}

mod circuit_breaker {
    use super::*;
    use upstream_guard::BreakerPolicy;

    fn field_of(breaker: BreakerPolicy) -> &'static str {
        error_of(UpstreamGuardLayer::builder().circuit_breaker(breaker)).field()
    }

    #[test]
    fn rates_must_be_in_zero_to_one() {
        for rate in [0.0, -1.0, 1.5, f64::NAN] {
            assert_eq!(
                field_of(BreakerPolicy::failure_rate(rate, 10)),
                "circuit_breaker.failure_rate"
            );
            assert_eq!(
                field_of(BreakerPolicy::slow_call_rate(
                    rate,
                    Duration::from_secs(1),
                    10
                )),
                "circuit_breaker.slow_call_rate"
            );
        }
    }

    #[test]
    fn a_breaker_that_can_never_trip_is_rejected() {
        assert_eq!(
            field_of(BreakerPolicy::consecutive_failures(0)),
            "circuit_breaker.consecutive_failures"
        );
    }

    #[test]
    fn min_calls_and_slow_threshold_must_be_positive() {
        assert_eq!(
            field_of(BreakerPolicy::failure_rate(0.5, 0)),
            "circuit_breaker.min_calls"
        );
        assert_eq!(
            field_of(BreakerPolicy::slow_call_rate(0.5, Duration::ZERO, 10)),
            "circuit_breaker.slow_call_threshold"
        );
    }

    #[test]
    fn open_periods_must_be_positive_and_ordered() {
        assert_eq!(
            field_of(BreakerPolicy::default().open_for(Duration::ZERO)),
            "circuit_breaker.open_for"
        );
        assert_eq!(
            field_of(
                BreakerPolicy::default()
                    .open_for(Duration::from_secs(10))
                    .max_open_for(Duration::from_secs(5))
            ),
            "circuit_breaker.max_open_for"
        );
    }

    #[test]
    fn probes_keys_window_and_concurrency_are_bounded() {
        assert_eq!(
            field_of(BreakerPolicy::default().half_open_probes(0)),
            "circuit_breaker.half_open_probes"
        );
        assert_eq!(
            field_of(BreakerPolicy::default().half_open_probes(5000)),
            "circuit_breaker.half_open_probes"
        );
        assert_eq!(
            field_of(BreakerPolicy::default().max_keys(0)),
            "circuit_breaker.max_keys"
        );
        assert_eq!(
            field_of(BreakerPolicy::default().window(Duration::from_millis(1))),
            "circuit_breaker.window"
        );
        assert_eq!(
            field_of(BreakerPolicy::default().concurrency_limit(0)),
            "circuit_breaker.concurrency_limit"
        );
    }
}

#[test]
fn a_long_open_period_alone_is_valid_and_does_not_grow() {
    // The default growth cap (60 s) makes way for a longer open_for.
    let breaker =
        upstream_guard::BreakerPolicy::consecutive_failures(1).open_for(Duration::from_secs(3600));
    assert!(UpstreamGuardLayer::builder()
        .circuit_breaker(breaker)
        .build()
        .is_ok());
}
