//! Invalid configuration is a `Result` error naming the field, never a panic.

use std::time::Duration;

use upstream_guard::{ConfigError, Retry, UpstreamGuardLayer};

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
        let err =
            error_of(UpstreamGuardLayer::builder().retry(Retry::default().max_attempts(attempts)));
        assert_eq!(err.field(), "retry.max_attempts", "attempts = {attempts}");
    }
}

#[test]
fn backoff_must_be_positive_and_ordered() {
    let err = error_of(
        UpstreamGuardLayer::builder()
            .retry(Retry::default().backoff(Duration::ZERO, Duration::from_secs(1))),
    );
    assert_eq!(err.field(), "retry.backoff_base");
    let err = error_of(
        UpstreamGuardLayer::builder()
            .retry(Retry::default().backoff(Duration::from_secs(2), Duration::from_secs(1))),
    );
    assert_eq!(err.field(), "retry.backoff_max");
}

#[test]
fn budget_ratio_must_be_a_sane_number() {
    for ratio in [-0.1, f64::NAN, f64::INFINITY, 1e9] {
        let err = error_of(UpstreamGuardLayer::builder().retry(Retry::default().budget(ratio, 10)));
        assert_eq!(err.field(), "retry.budget.ratio", "ratio = {ratio}");
    }
}

#[test]
fn budget_window_is_bounded() {
    for window in [Duration::ZERO, Duration::from_secs(61)] {
        let err =
            error_of(UpstreamGuardLayer::builder().retry(Retry::default().budget_window(window)));
        assert_eq!(err.field(), "retry.budget.window");
    }
}

#[test]
fn replay_cap_is_bounded() {
    let err =
        error_of(UpstreamGuardLayer::builder().retry(Retry::default().max_replay_body(usize::MAX)));
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
        .retry(Retry::disabled())
        .build()
        .is_ok());
}
