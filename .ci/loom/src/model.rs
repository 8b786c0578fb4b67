//! Model checks of the breaker's state machine under every interleaving loom can
//! find. Run with `cargo test --release` in `.ci/loom`.

use loom::sync::Arc;
use loom::thread;

use crate::state::{Admission, Breaker, CircuitState, Policy, Record};

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
