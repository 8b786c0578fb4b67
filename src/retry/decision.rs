//! The retry decision: after a failed attempt, retry after how long, or why not.
//!
//! A pure function of what the guard knows at that moment — the attempt's
//! outcome, the request, the policy, the breaker's state, the budget and the
//! clock — so each rule is unit-tested without a runtime or a network.

use std::time::Duration;

use tokio::time::Instant;

use super::RetryPolicy;
use crate::observe::RetryDenied;

/// What the guard knows when an attempt has failed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Failed {
    /// Whether the classifier calls this failure retryable.
    pub(crate) retryable: bool,
    /// Whether the request provably never reached the upstream.
    pub(crate) never_sent: bool,
    /// Attempts made so far, this one included.
    pub(crate) attempts: u32,
    /// How long the upstream asked us to wait (`Retry-After`), if it did.
    pub(crate) retry_after: Option<Duration>,
}

/// What the guard knows about the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resend {
    /// The method is idempotent, or the request carries an `Idempotency-Key`.
    pub(crate) safe: bool,
    /// The body (and head) can be sent again.
    pub(crate) replayable: bool,
}

/// The decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing to decide: the failure is not retryable, or the attempts are
    /// spent. Not a denial, so no event.
    Stop,
    /// Retry after this backoff.
    Retry(Duration),
    /// The failure was retryable, and this rule said no.
    Deny(RetryDenied),
}

/// Decides whether to retry a failed attempt.
///
/// The rules, in order: a retry must be allowed by the policy (retryable,
/// attempts left), possible (the request can be sent again), safe (idempotent,
/// or never sent), welcome (the breaker is closed), in time (the backoff ends
/// before the deadline), and paid for (`withdraw` takes one from the budget;
/// asked last, so a denial for another reason spends nothing).
pub(crate) fn decide(
    policy: &RetryPolicy,
    failed: Failed,
    request: Resend,
    breaker_closed: bool,
    now: Instant,
    deadline: Instant,
    withdraw: impl FnOnce(Instant) -> bool,
) -> Decision {
    if !failed.retryable || failed.attempts >= policy.max_attempts {
        return Decision::Stop;
    }
    if !request.replayable {
        return Decision::Deny(RetryDenied::BodyNotReplayable);
    }
    if !request.safe && !failed.never_sent {
        return Decision::Deny(RetryDenied::NotIdempotent);
    }
    if !breaker_closed {
        return Decision::Deny(RetryDenied::CircuitOpen);
    }
    let backoff = match failed.retry_after {
        Some(asked) => asked.min(policy.max_retry_after),
        None => policy.backoff_for(failed.attempts),
    };
    // A retry must have time to run: the sleep must end before the deadline.
    if crate::clock::later(now, backoff) >= deadline {
        return Decision::Deny(RetryDenied::Deadline);
    }
    if !withdraw(now) {
        return Decision::Deny(RetryDenied::Budget);
    }
    Decision::Retry(backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn failed() -> Failed {
        Failed {
            retryable: true,
            never_sent: false,
            attempts: 1,
            retry_after: None,
        }
    }

    fn request() -> Resend {
        Resend {
            safe: true,
            replayable: true,
        }
    }

    /// Decides with the default policy, the deadline `left` from now.
    fn decide_with(
        failed: Failed,
        request: Resend,
        breaker_closed: bool,
        left: Duration,
        withdraw: impl FnOnce(Instant) -> bool,
    ) -> Decision {
        let now = Instant::now();
        let policy = RetryPolicy::default();
        decide(
            &policy,
            failed,
            request,
            breaker_closed,
            now,
            now + left,
            withdraw,
        )
    }

    /// Decides with a closed breaker, a 10 s deadline and a budget that pays.
    fn decide_now(failed: Failed, request: Resend) -> Decision {
        decide_with(failed, request, true, 10 * SEC, |_| true)
    }

    #[test]
    fn a_retryable_failure_of_a_safe_replayable_request_is_retried_within_the_backoff() {
        match decide_now(failed(), request()) {
            Decision::Retry(backoff) => assert!(backoff <= Duration::from_millis(25)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_that_is_not_retryable_stops_without_a_denial() {
        let failed = Failed {
            retryable: false,
            ..failed()
        };
        assert_eq!(decide_now(failed, request()), Decision::Stop);
    }

    #[test]
    fn the_last_attempt_stops_without_a_denial() {
        let failed = Failed {
            attempts: 3,
            ..failed()
        };
        assert_eq!(decide_now(failed, request()), Decision::Stop);
    }

    #[test]
    fn a_body_that_cannot_be_sent_again_is_denied() {
        let request = Resend {
            replayable: false,
            ..request()
        };
        assert_eq!(
            decide_now(failed(), request),
            Decision::Deny(RetryDenied::BodyNotReplayable)
        );
    }

    #[test]
    fn an_unsafe_request_is_retried_only_when_it_never_left() {
        let unsafe_request = Resend {
            safe: false,
            ..request()
        };
        assert_eq!(
            decide_now(failed(), unsafe_request),
            Decision::Deny(RetryDenied::NotIdempotent)
        );
        let never_sent = Failed {
            never_sent: true,
            ..failed()
        };
        assert!(matches!(
            decide_now(never_sent, unsafe_request),
            Decision::Retry(_)
        ));
    }

    #[test]
    fn an_open_breaker_denies_the_retry() {
        let decision = decide_with(failed(), request(), false, 10 * SEC, |_| true);
        assert_eq!(decision, Decision::Deny(RetryDenied::CircuitOpen));
    }

    #[test]
    fn retry_after_replaces_the_backoff_up_to_its_cap() {
        let asked = |after| Failed {
            retry_after: Some(after),
            ..failed()
        };
        assert_eq!(
            decide_now(asked(2 * SEC), request()),
            Decision::Retry(2 * SEC)
        );
        assert_eq!(
            decide_now(asked(9 * SEC), request()),
            Decision::Retry(5 * SEC),
            "capped by max_retry_after (5 s by default)"
        );
    }

    #[test]
    fn a_backoff_that_would_end_past_the_deadline_is_denied() {
        let failed = Failed {
            retry_after: Some(2 * SEC),
            ..failed()
        };
        let decision = decide_with(failed, request(), true, 2 * SEC, |_| true);
        assert_eq!(decision, Decision::Deny(RetryDenied::Deadline));
    }

    #[test]
    fn an_empty_budget_denies_and_is_asked_last() {
        let decision = decide_with(failed(), request(), true, 10 * SEC, |_| false);
        assert_eq!(decision, Decision::Deny(RetryDenied::Budget));
        let mut asked = false;
        let _ = decide_with(failed(), request(), false, 10 * SEC, |_| {
            asked = true;
            true
        });
        assert!(!asked, "a retry denied for another reason spends nothing");
    }
}
