//! The hedging decision: may another attempt go out now, or why not.
//!
//! A pure function, like the retry decision, so each rule is unit-tested
//! without a runtime.

use std::time::Duration;

use tokio::time::Instant;

use crate::observe::HedgeDenied;

/// The decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HedgeDecision {
    /// Send a hedge now.
    Send,
    /// The request has sent all the hedges it may: nothing to report.
    Stop,
    /// A hedge was due, and this rule said no.
    Deny(HedgeDenied),
}

/// Decides whether a due hedge goes out.
///
/// The rules, in order: the policy allows another (`sent < max`), the breaker
/// is closed, the deadline leaves at least `delay` (the time an attempt is
/// given before it is hedged, so the time it is expected to take), and the
/// budget pays (`withdraw`, asked last, so a denial for another reason spends
/// nothing).
pub(crate) fn decide(
    sent: u32,
    max: u32,
    breaker_closed: bool,
    now: Instant,
    delay: Duration,
    deadline: Instant,
    withdraw: impl FnOnce(Instant) -> bool,
) -> HedgeDecision {
    if sent >= max {
        return HedgeDecision::Stop;
    }
    if !breaker_closed {
        return HedgeDecision::Deny(HedgeDenied::CircuitOpen);
    }
    if crate::clock::later(now, delay) > deadline {
        return HedgeDecision::Deny(HedgeDenied::Deadline);
    }
    if !withdraw(now) {
        return HedgeDecision::Deny(HedgeDenied::Budget);
    }
    HedgeDecision::Send
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_millis(50);

    fn decide_with(sent: u32, closed: bool, left: Duration, pays: bool) -> HedgeDecision {
        let now = Instant::now();
        decide(sent, 2, closed, now, DELAY, now + left, |_| pays)
    }

    #[test]
    fn a_hedge_goes_when_every_rule_allows_it() {
        assert_eq!(decide_with(1, true, DELAY * 2, true), HedgeDecision::Send);
    }

    #[test]
    fn no_more_hedges_than_the_policy_allows_and_no_event_for_it() {
        assert_eq!(decide_with(2, true, DELAY * 2, true), HedgeDecision::Stop);
    }

    #[test]
    fn an_open_breaker_denies_a_hedge() {
        let denied = HedgeDecision::Deny(HedgeDenied::CircuitOpen);
        assert_eq!(decide_with(0, false, DELAY * 2, true), denied);
    }

    #[test]
    fn a_deadline_closer_than_the_delay_denies_a_hedge() {
        let denied = HedgeDecision::Deny(HedgeDenied::Deadline);
        assert_eq!(decide_with(0, true, DELAY / 2, true), denied);
    }

    #[test]
    fn a_spent_budget_denies_a_hedge() {
        let denied = HedgeDecision::Deny(HedgeDenied::Budget);
        assert_eq!(decide_with(0, true, DELAY * 2, false), denied);
    }

    #[test]
    fn a_denial_for_another_reason_spends_no_budget() {
        let now = Instant::now();
        let mut asked = false;
        let decision = decide(0, 1, true, now, DELAY, now + DELAY / 2, |_| {
            asked = true;
            true
        });
        assert_eq!(decision, HedgeDecision::Deny(HedgeDenied::Deadline));
        assert!(!asked);
    }
}
