//! `GuardConfig` (feature `serde`): config files land in the builder, every key
//! is optional, and mistakes are errors that name the key.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::guard::{get, guarded, send};
use support::upstream::Upstream;
use upstream_guard::{
    BreakerPolicy, FailureKind, GuardConfig, HedgePolicy, RetryPolicy, UpstreamGuardLayer,
};

/// A file that sets every key, each to a value other than its default.
const FULL: &str = r#"
attempt_timeout = "750ms"
deadline = "4s"
body_idle_timeout = "20s"
upstream_name = "inventory"
expose_error_details = true

[retry]
max_attempts = 4
backoff_base = "10ms"
backoff_max = "400ms"
budget_enabled = true
budget_ratio = 0.35
budget_min_per_second = 3
budget_window = "20s"
max_retry_after = "2s"
max_replay_body = 1024

[circuit_breaker]
consecutive_failures = 7
failure_rate = 0.4
slow_call_rate = 0.9
slow_call_threshold = "1500ms"
min_calls = 12
window = "45s"
open_for = "3s"
max_open_for = "1m 30s"
half_open_probes = 3
keys = "single"
max_keys = 64
concurrency_limit = 50
"#;

fn parse(text: &str) -> Result<GuardConfig, toml::de::Error> {
    toml::from_str(text)
}

fn debug(builder: upstream_guard::Builder) -> String {
    format!("{builder:?}")
}

#[test]
fn a_full_file_sets_every_builder_option() {
    let config = parse(FULL).expect("the full file parses");
    let expected = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(750))
        .deadline(Duration::from_secs(4))
        .body_idle_timeout(Duration::from_secs(20))
        .upstream_name("inventory")
        .expose_error_details(true)
        .retry(
            RetryPolicy::default()
                .max_attempts(4)
                .backoff(Duration::from_millis(10), Duration::from_millis(400))
                .budget(0.35, 3)
                .budget_window(Duration::from_secs(20))
                .max_retry_after(Duration::from_secs(2))
                .max_replay_body(1024),
        )
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(7)
                .with_failure_rate(0.4, 12)
                .with_slow_call_rate(0.9, Duration::from_millis(1500), 12)
                .window(Duration::from_secs(45))
                .open_for(Duration::from_secs(3))
                .max_open_for(Duration::from_secs(90))
                .half_open_probes(3)
                .single()
                .max_keys(64)
                .concurrency_limit(50),
        );
    assert_eq!(debug(config.clone().into_builder()), debug(expected));
    UpstreamGuardLayer::from_config(config).expect("the full file is valid");
}

#[test]
fn a_config_serializes_back_to_the_same_config() {
    let config = parse(FULL).unwrap();
    let text = toml::to_string(&config).expect("serializes");
    assert!(text.contains("max_open_for = \"1m 30s\""), "{text}");
    assert_eq!(parse(&text).unwrap(), config);
}

#[tokio::test]
async fn a_loaded_config_drives_retries_and_the_breaker() {
    let upstream = Upstream::start().await;
    let config = parse(
        r#"
        upstream_name = "from-file"
        [retry]
        max_attempts = 2
        backoff_base = "1ms"
        backoff_max = "2ms"
        [circuit_breaker]
        consecutive_failures = 2
        keys = "single"
        open_for = "30s"
        "#,
    )
    .unwrap();
    let client = guarded(&UpstreamGuardLayer::from_config(config).unwrap());

    // Two attempts (max_attempts = 2) of a 503: the breaker sees two failures
    // in a row and opens.
    let answer = send(&client, get(&upstream.url("/status/503"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.count("/status/503"), 2);

    let answer = send(&client, get(&upstream.url("/ok"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let failure = answer.failure.expect("synthesized by the guard");
    assert_eq!(failure.kind(), FailureKind::CircuitOpen);
    assert_eq!(failure.upstream(), Some("from-file"));
    assert_eq!(upstream.count("/ok"), 0, "the open breaker kept it away");
}

#[test]
fn every_key_is_optional() {
    let default = debug(UpstreamGuardLayer::builder());
    for text in [
        "",
        "[retry]",
        "[circuit_breaker]",
        "[retry]\n[circuit_breaker]",
    ] {
        let config = parse(text).unwrap();
        assert_eq!(debug(config.clone().into_builder()), default, "{text:?}");
        UpstreamGuardLayer::from_config(config).unwrap();
    }
    // Each key of the full file works on its own, next to the defaults.
    let mut section = "";
    for line in FULL.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        // Alone, a short deadline would undercut the default attempt timeout.
        let line = if line.starts_with("deadline") {
            "deadline = \"6s\""
        } else {
            line
        };
        let text = format!("{section}\n{line}");
        let config = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        UpstreamGuardLayer::from_config(config).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    for (text, key) in [
        ("atempt_timeout = \"1s\"", "atempt_timeout"),
        ("[retry]\nmax_attempt = 3", "max_attempt"),
        ("[circuit_breaker]\nopen_duration = \"5s\"", "open_duration"),
        ("[circuit_brekaer]\nenabled = false", "circuit_brekaer"),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
    }
}

#[test]
fn bad_values_for_the_type_are_errors_that_name_the_key() {
    for (text, key) in [
        ("deadline = \"3 parsecs\"", "deadline"),
        ("[retry]\nbackoff_max = \"soon\"", "backoff_max"),
        ("[circuit_breaker]\nopen_for = 10", "open_for"),
        ("[retry]\nmax_attempts = \"three\"", "max_attempts"),
        ("[circuit_breaker]\nkeys = \"tenant\"", "keys"),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
    let err = parse("deadline = \"3 parsecs\"").unwrap_err().to_string();
    assert!(err.contains("expected a duration"), "{err}");
    let err = parse("[circuit_breaker]\nkeys = \"tenant\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("authority") && err.contains("single"),
        "lists the choices: {err}"
    );
}

#[test]
fn invalid_values_are_config_errors_naming_the_field() {
    for (text, field) in [
        ("[retry]\nmax_attempts = 0", "retry.max_attempts"),
        ("[retry]\nmax_attempts = 11", "retry.max_attempts"),
        ("[retry]\nbudget_ratio = -0.5", "retry.budget_ratio"),
        ("[retry]\nbudget_window = \"5m\"", "retry.budget_window"),
        ("[retry]\nbackoff_max = \"1ms\"", "retry.backoff_max"),
        ("attempt_timeout = \"20s\"", "deadline"),
        ("attempt_timeout = \"0s\"", "attempt_timeout"),
        ("upstream_name = \"\"", "upstream_name"),
        (
            "[circuit_breaker]\nfailure_rate = 1.5",
            "circuit_breaker.failure_rate",
        ),
        (
            "[circuit_breaker]\nhalf_open_probes = 0",
            "circuit_breaker.half_open_probes",
        ),
        (
            "[circuit_breaker]\nconsecutive_failures = 0",
            "circuit_breaker.consecutive_failures",
        ),
        (
            "[circuit_breaker]\nopen_for = \"2m\"\nmax_open_for = \"1m\"",
            "circuit_breaker.max_open_for",
        ),
    ] {
        let config = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let err = UpstreamGuardLayer::from_config(config).expect_err(text);
        assert_eq!(err.field(), field, "{text}: {err}");
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
}

#[test]
fn one_attempt_and_circuit_breaker_false_turn_features_off() {
    let config = parse("circuit_breaker = false\n[retry]\nmax_attempts = 1").unwrap();
    assert_eq!(config.retry, RetryPolicy::disabled());
    let builder = debug(config.clone().into_builder());
    assert!(builder.contains("circuit_breaker: None"), "{builder}");
    let layer = UpstreamGuardLayer::from_config(config).unwrap();
    assert!(layer.breaker_handle().is_none());
}

#[test]
fn circuit_breaker_is_a_section_or_false() {
    let err = parse("circuit_breaker = \"off\"").unwrap_err().to_string();
    assert!(err.contains("false for no circuit breaker"), "{err}");
}

#[test]
fn other_serde_formats_work_too() {
    let config: GuardConfig =
        serde_json::from_str(r#"{"deadline": "20s", "retry": {"max_attempts": 2}}"#).unwrap();
    assert_eq!(config.deadline, Duration::from_secs(20));
    UpstreamGuardLayer::from_config(config).unwrap();
}

#[test]
fn the_example_config_parses_and_builds() {
    let text = include_str!("../examples/config.toml");
    let config = parse(text).expect("examples/config.toml parses");
    assert_eq!(
        config.retry,
        RetryPolicy::default(),
        "the example's [retry] section lists the defaults"
    );
    let breaker = BreakerPolicy::default()
        .with_failure_rate(0.5, 20)
        .with_slow_call_rate(0.8, Duration::from_secs(2), 20)
        .window(Duration::from_secs(30))
        .open_for(Duration::from_secs(10))
        .max_open_for(Duration::from_secs(120))
        .half_open_probes(2)
        .concurrency_limit(100);
    assert_eq!(config.circuit_breaker, Some(breaker));
    let hedge = HedgePolicy::at_percentile(0.95)
        .min_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(500));
    assert_eq!(config.hedge, Some(hedge));
    UpstreamGuardLayer::from_config(config).expect("examples/config.toml is valid");
}
