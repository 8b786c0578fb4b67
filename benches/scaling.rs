//! ns/call of GET through one service shared by 1 and 2 threads, measured in
//! interleaved rounds, printed as a markdown table.
//!
//! The criterion group `get_threads` (in `overhead.rs`) measures the same thing
//! row after row; on a small shared VM, where the second core comes and goes,
//! rows measured a minute apart are hard to compare. Here every round measures
//! every row once (in a rotating order), so interference falls on all rows alike,
//! and the table shows the best and the median round of each row. The best round
//! is the cost with the least interference; compare rows by it.
//!
//! Run: `cargo bench --bench scaling` (about 40 s).

use http::{Request, Response};
use tower::Service;

#[macro_use]
mod support;

use support::{inner, Body, Peer};

const ROUNDS: usize = 15;
const CALLS_PER_THREAD: u64 = 50_000;
const THREADS: [usize; 2] = [1, 2];

fn ns_per_call<S, ResB>(handle: &tokio::runtime::Handle, svc: S, threads: usize) -> f64
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    // A short warm-up of this fresh service, then the measured run.
    support::run_threads(handle, &svc, threads, CALLS_PER_THREAD / 10);
    let elapsed = support::run_threads(handle, &svc, threads, CALLS_PER_THREAD);
    elapsed.as_nanos() as f64 / CALLS_PER_THREAD as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() {
    let rt = support::multi_thread_runtime(2);
    let handle = rt.handle();
    let peers = Peer::ALL;
    // samples[peer][threads index] = ns/call of each round
    let mut samples = vec![[Vec::new(), Vec::new()]; peers.len()];
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        for (t, &threads) in THREADS.iter().enumerate() {
            for k in 0..peers.len() {
                let i = (k + round) % peers.len();
                let ns = with_peer!(peers[i], inner, svc => ns_per_call(handle, svc, threads));
                samples[i][t].push(ns);
            }
        }
    }
    let took = started.elapsed();

    let timeout = peers
        .iter()
        .position(|p| *p == Peer::Timeout)
        .expect("tower Timeout row");
    let timeout_2t = best(&samples[timeout][1]);
    println!("## GET through one shared service: 1 vs 2 threads\n");
    println!(
        "{ROUNDS} interleaved rounds of {CALLS_PER_THREAD} calls per thread; ns/call on each \
         thread (the slowest thread's); best and median round. Took {:.0} s.\n",
        took.as_secs_f64()
    );
    println!(
        "| peer | 1 thread best | 1 thread median | 2 threads best | 2 threads median \
         | 2 threads / 1 thread (best) | 2 threads vs tower Timeout's (best) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (peer, [one, two]) in peers.iter().zip(&samples) {
        let (b1, b2) = (best(one), best(two));
        println!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2}× | {:.2}× |",
            peer.name(),
            b1,
            median(one.clone()),
            b2,
            median(two.clone()),
            b2 / b1,
            b2 / timeout_2t,
        );
    }
}
