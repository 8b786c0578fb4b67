//! Model checks of the breaker's state machine, and of the registry's in-flight
//! counts across re-keying, under every interleaving loom can find. Run with
//! `cargo test --release` in `.ci/loom`.

use loom::sync::Arc;
use loom::thread;

use crate::state::{Admission, Breaker, CircuitState, Policy, Record};
use crate::tenancy::{Acquired, Tenancy};

const SEC: u64 = 1_000_000_000;

fn policy(probes: u32) -> Policy {
    Policy {
        consecutive_failures: 1,
        failure_rate: None,
        slow_call_rate: None,
        min_calls: 1,
        open_nanos: SEC,
        max_open_nanos: SEC,
        probes,
    }
}

const FAIL: Record = Record {
    failure: true,
    slow: false,
};
const OK: Record = Record {
    failure: false,
    slow: false,
};

/// A breaker that tripped at time 0 and may go half-open at 1 s.
fn tripped(p: &Policy) -> Breaker {
    let b = Breaker::new(10 * SEC);
    b.record(p, FAIL, None, || 0);
    assert_eq!(b.state(), CircuitState::Open);
    b
}

fn probe_of(b: &Breaker, p: &Policy) -> Option<u64> {
    match b.admit(p, || 2 * SEC).0 {
        Admission::Admitted { probe } => probe,
        Admission::Rejected { .. } => None,
    }
}

#[test]
fn half_open_never_admits_more_probes_than_configured() {
    loom::model(|| {
        let p = policy(1);
        let b = Arc::new(tripped(&p));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || probe_of(&b, &policy(1)).is_some())
            })
            .collect();
        let admitted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|a| *a)
            .count();
        assert_eq!(admitted, 1);
    });
}

#[test]
fn two_probes_out_of_three_callers() {
    loom::model(|| {
        let p = policy(2);
        let b = Arc::new(tripped(&p));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || probe_of(&b, &policy(2)).is_some())
            })
            .collect();
        let admitted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|a| *a)
            .count();
        assert_eq!(admitted, 2);
    });
}

#[test]
fn a_probe_result_racing_an_admission_leaves_a_consistent_state() {
    loom::model(|| {
        let p = policy(1);
        let b = Arc::new(tripped(&p));
        let epoch = probe_of(&b, &p).expect("first probe");
        let recorder = {
            let b = b.clone();
            thread::spawn(move || b.record(&policy(1), OK, Some(epoch), || 2 * SEC))
        };
        let admitter = {
            let b = b.clone();
            thread::spawn(move || probe_of(&b, &policy(1)))
        };
        let transition = recorder.join().unwrap();
        let second = admitter.join().unwrap();
        // The probe closed the breaker; a concurrent caller either came before
        // (rejected: the one probe was out) or after (admitted, closed, no probe).
        assert_eq!(transition.map(|t| t.to), Some(CircuitState::Closed));
        assert_eq!(second, None);
        assert_eq!(b.state(), CircuitState::Closed);
    });
}

#[test]
fn concurrent_failures_trip_exactly_once() {
    loom::model(|| {
        let b = Arc::new(Breaker::new(10 * SEC));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || {
                    let p = Policy {
                        consecutive_failures: 2,
                        ..policy(1)
                    };
                    b.record(&p, FAIL, None, || 0)
                })
            })
            .collect();
        let transitions = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .count();
        assert_eq!(transitions, 1);
        assert_eq!(b.state(), CircuitState::Open);
    });
}

#[test]
fn a_failed_probe_and_a_released_probe_do_not_reopen_twice() {
    loom::model(|| {
        let p = policy(2);
        let b = Arc::new(tripped(&p));
        let first = probe_of(&b, &p).expect("first probe");
        let second = probe_of(&b, &p).expect("second probe");
        let failer = {
            let b = b.clone();
            thread::spawn(move || b.record(&policy(2), FAIL, Some(first), || 2 * SEC))
        };
        let releaser = {
            let b = b.clone();
            thread::spawn(move || b.release_probe(second))
        };
        let transition = failer.join().unwrap();
        releaser.join().unwrap();
        assert_eq!(transition.map(|t| t.to), Some(CircuitState::Open));
        assert_eq!(b.state(), CircuitState::Open);
    });
}

/// A policy whose open period grows: 1 s, then 2 s, up to 4 s.
fn growing(probes: u32) -> Policy {
    Policy {
        max_open_nanos: 4 * SEC,
        ..policy(probes)
    }
}

/// The open period each racer's trip reported, of those that did.
fn reported_open_periods(transitions: Vec<Option<crate::state::Transition>>) -> Vec<u64> {
    transitions
        .into_iter()
        .flatten()
        .filter_map(|t| t.open_nanos)
        .collect()
}

#[test]
fn two_trips_from_closed_store_the_open_period_the_winner_reports() {
    loom::model(|| {
        let b = Arc::new(Breaker::new(10 * SEC));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.record(&growing(1), FAIL, None, || 0))
            })
            .collect();
        let transitions = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let reported = reported_open_periods(transitions);
        assert_eq!(reported, vec![SEC], "one trip, the first of a row");
        assert_eq!(b.nanos_until_half_open(0), SEC);
    });
}

#[test]
fn two_failed_probes_store_the_open_period_the_winner_reports() {
    loom::model(|| {
        let p = growing(2);
        let b = Arc::new(tripped(&p));
        let probes = [probe_of(&b, &p), probe_of(&b, &p)];
        let threads: Vec<_> = probes
            .into_iter()
            .map(|probe| {
                let b = b.clone();
                let epoch = probe.expect("two probes");
                thread::spawn(move || b.record(&growing(2), FAIL, Some(epoch), || 2 * SEC))
            })
            .collect();
        let transitions = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let reported = reported_open_periods(transitions);
        assert_eq!(
            reported,
            vec![2 * SEC],
            "one reopening, the second trip in a row"
        );
        assert_eq!(b.nanos_until_half_open(2 * SEC), 2 * SEC);
    });
}

#[test]
fn an_admission_racing_a_trip_never_probes_before_the_open_period_ends() {
    loom::model(|| {
        let b = Arc::new(Breaker::new(10 * SEC));
        let tripper = {
            let b = b.clone();
            thread::spawn(move || b.record(&growing(1), FAIL, None, || 0))
        };
        let admitter = {
            let b = b.clone();
            thread::spawn(move || b.admit(&growing(1), || 0))
        };
        assert!(tripper.join().unwrap().is_some());
        let (admission, transition) = admitter.join().unwrap();
        // Before the trip: admitted, closed. After: rejected. Never a probe at
        // time 0, which the trip's 1 s open period does not allow.
        assert!(
            matches!(
                admission,
                Admission::Admitted { probe: None } | Admission::Rejected { .. }
            ),
            "{admission:?}"
        );
        assert_eq!(transition, None);
        assert_eq!(b.state(), CircuitState::Open);
    });
}

// Re-keying a registry slot (eviction giving it to a new key) racing requests
// of the key that held it.

#[test]
fn a_rekey_racing_a_release_of_the_old_key_leaves_the_new_key_at_zero() {
    loom::model(|| {
        let slot = Arc::new(Tenancy::new());
        let old = slot.generation();
        assert_eq!(slot.acquire(old, 1), Acquired::Permit);
        let releaser = {
            let slot = slot.clone();
            thread::spawn(move || slot.release(old))
        };
        let rekeyer = {
            let slot = slot.clone();
            thread::spawn(move || slot.rekey())
        };
        releaser.join().unwrap();
        let new = rekeyer.join().unwrap();
        assert_ne!(new, old);
        assert_eq!(slot.in_flight(), 0, "neither wrapped nor left behind");
    });
}

#[test]
fn a_rekey_racing_an_admission_of_the_old_key_leaks_no_permit_into_the_new_key() {
    loom::model(|| {
        let slot = Arc::new(Tenancy::new());
        let old = slot.generation();
        // An old-key request: admitted (or not), then done.
        let admitter = {
            let slot = slot.clone();
            thread::spawn(move || {
                if slot.acquire(old, 1) == Acquired::Permit {
                    assert!(slot.release(old) || slot.generation() != old);
                }
            })
        };
        // The eviction, then the new key's first request.
        let rekeyer = {
            let slot = slot.clone();
            thread::spawn(move || {
                let new = slot.rekey();
                slot.acquire(new, 1)
            })
        };
        admitter.join().unwrap();
        assert_eq!(rekeyer.join().unwrap(), Acquired::Permit);
        assert_eq!(slot.in_flight(), 1, "only the new key's request");
    });
}
