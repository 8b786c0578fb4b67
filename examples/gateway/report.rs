//! The demo's report: the intro, one row per scenario, the guard's counters and
//! the circuit breakers' timeline. Its format is read by `tests/gateway_demo.rs`
//! (see the crate docs in `main.rs`): cells are separated by at least two spaces,
//! never hold two spaces in a row, and are never empty.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::demo::{Scenario, DEMO_IN_FLIGHT, DEMO_SPREAD, DOWN, DOWN_RECOVERS_AT};
use crate::guard::{GuardSettings, BACKOFF_BASE, BACKOFF_MAX};
use crate::load::{Answer, Sample};
use crate::stats::{GuardStats, TimelineEvent};
use crate::upstream::Upstream;

/// One row of the summary table.
#[derive(Debug)]
pub struct ScenarioRow {
    scenario: Scenario,
    requests: usize,
    /// Responses per status code.
    statuses: BTreeMap<u16, usize>,
    /// Requests that got no (complete) response at all.
    errors: usize,
    /// The problem types of the guard's answers.
    problems: BTreeSet<String>,
    /// Mean attempts per request, when known.
    attempts: Option<f64>,
    p50: Duration,
    p99: Duration,
}

impl ScenarioRow {
    pub fn new(
        scenario: Scenario,
        samples: &[Sample],
        upstream: &Upstream,
        stats: &GuardStats,
    ) -> ScenarioRow {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.scenario == scenario).collect();
        let answers: Vec<&Answer> = mine
            .iter()
            .filter_map(|s| s.outcome.as_ref().ok())
            .collect();
        let mut statuses = BTreeMap::new();
        for answer in &answers {
            *statuses.entry(answer.status.as_u16()).or_default() += 1;
        }
        let mut latencies: Vec<Duration> = mine.iter().map(|s| s.latency).collect();
        latencies.sort_unstable();
        ScenarioRow {
            scenario,
            requests: mine.len(),
            statuses,
            errors: mine.len() - answers.len(),
            problems: answers
                .iter()
                .filter_map(|a| a.problem.as_ref().map(|p| p.kind.clone()))
                .collect(),
            attempts: mean_attempts(scenario, &answers, upstream, stats),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
        }
    }
}

/// Mean attempts per request. The guard's own answers say how many attempts they
/// took; responses it passed through do not, so when there are any, count the
/// requests the upstream received for this scenario instead (which covers every
/// attempt, failed or not). The `down` upstream records nothing (its refused
/// attempts never arrive anywhere), so for it the guard's own count is used.
fn mean_attempts(
    scenario: Scenario,
    answers: &[&Answer],
    upstream: &Upstream,
    stats: &GuardStats,
) -> Option<f64> {
    if answers.is_empty() {
        return None;
    }
    let passed_through = answers.iter().any(|a| a.problem.is_none());
    let total = match (passed_through, scenario.upstream_prefix()) {
        (true, Some(prefix)) => upstream.count(prefix) as u64,
        (true, None) => stats.down_attempts(),
        (false, _) => answers
            .iter()
            .filter_map(|a| a.problem.as_ref())
            .map(|p| p.attempts)
            .sum(),
    };
    Some(total as f64 / answers.len() as f64)
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn print_intro(
    out: &mut impl Write,
    settings: &GuardSettings,
    upstream: &Upstream,
    down: SocketAddr,
    gateway: SocketAddr,
    requests: usize,
) -> io::Result<()> {
    writeln!(out, "upstream-guard gateway demo")?;
    writeln!(
        out,
        "  fault upstream  http://{}  (tests/support/upstream.rs)",
        upstream.addr()
    )?;
    writeln!(
        out,
        "  down upstream   http://{down}  (refuses connections until {:.0} s in)",
        DEMO_SPREAD.as_secs_f64() * DOWN_RECOVERS_AT
    )?;
    writeln!(
        out,
        "  gateway         http://{gateway}  (hyper -> UpstreamGuardLayer -> hyper-util client)"
    )?;
    writeln!(
        out,
        "  guard           attempt timeout {} ms, deadline {} ms, up to {} attempts, backoff {}-{} ms",
        settings.attempt_timeout.as_millis(),
        settings.deadline.as_millis(),
        settings.max_attempts,
        BACKOFF_BASE.as_millis(),
        BACKOFF_MAX.as_millis(),
    )?;
    writeln!(
        out,
        "  breaker         opens after {} failures in a row, for {} ms (doubling, at most {} ms)",
        settings.failure_threshold,
        settings.open_for.as_millis(),
        settings.max_open_for().as_millis(),
    )?;
    writeln!(
        out,
        "\nsending {requests} requests over {} s, at most {DEMO_IN_FLIGHT} in flight...\n",
        DEMO_SPREAD.as_secs()
    )?;
    out.flush()
}

/// Prints the per-scenario table and the guard's retry counters.
pub fn print_summary(
    out: &mut impl Write,
    rows: &[ScenarioRow],
    stats: &GuardStats,
) -> io::Result<()> {
    let cells: Vec<[String; 8]> = rows.iter().map(summary_cells).collect();
    print_table(out, &SUMMARY_COLUMNS, &cells)?;
    writeln!(out)?;
    let requests: usize = rows.iter().map(|r| r.requests).sum();
    writeln!(
        out,
        "guard: {} upstream attempts for {requests} requests, {} retries; retries denied: {}",
        stats.attempts(),
        stats.retries(),
        denied_counts(&stats.denied()),
    )
}

/// The summary's columns: title, and whether it is right-aligned (numbers).
const SUMMARY_COLUMNS: [(&str, bool); 8] = [
    ("scenario", false),
    ("upstream", false),
    ("requests", true),
    ("responses", false),
    ("guard answer", false),
    ("attempts", true),
    ("p50 ms", true),
    ("p99 ms", true),
];

fn summary_cells(row: &ScenarioRow) -> [String; 8] {
    [
        row.scenario.name().to_owned(),
        row.scenario.route().to_owned(),
        row.requests.to_string(),
        status_counts(row),
        problem_kinds(row),
        row.attempts
            .map_or_else(|| "-".to_owned(), |a| format!("{a:.2}")),
        millis_text(row.p50),
        millis_text(row.p99),
    ]
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table<const N: usize>(
    out: &mut impl Write,
    columns: &[(&str, bool); N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let widths: [usize; N] = std::array::from_fn(|i| {
        rows.iter()
            .map(|row| row[i].chars().count())
            .chain([columns[i].0.len()])
            .max()
            .unwrap_or(0)
    });
    let header: [String; N] = std::array::from_fn(|i| columns[i].0.to_owned());
    let line = |cells: &[String; N]| {
        let padded: Vec<String> = (0..N)
            .map(|i| match columns[i].1 {
                true => format!("{:>w$}", cells[i], w = widths[i]),
                false => format!("{:<w$}", cells[i], w = widths[i]),
            })
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(&header))?;
    let total = widths.iter().sum::<usize>() + 2 * N.saturating_sub(1);
    writeln!(out, "{}", "-".repeat(total))?;
    for row in rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

fn millis_text(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1_000.0)
}

/// `200×118 502×2`, plus `err×N` for requests that got no response (`-` for
/// none at all: a cell is never empty, see the module docs).
fn status_counts(row: &ScenarioRow) -> String {
    let mut parts: Vec<String> = row
        .statuses
        .iter()
        .map(|(status, count)| format!("{status}×{count}"))
        .collect();
    if row.errors > 0 {
        parts.push(format!("err×{}", row.errors));
    }
    if parts.is_empty() {
        return "-".to_owned();
    }
    parts.join(" ")
}

/// The guard's problem types (without the URN prefix), or `-` if it answered none.
fn problem_kinds(row: &ScenarioRow) -> String {
    if row.problems.is_empty() {
        return "-".to_owned();
    }
    row.problems.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn denied_counts(denied: &BTreeMap<&'static str, u64>) -> String {
    if denied.is_empty() {
        return "none".to_owned();
    }
    denied
        .iter()
        .map(|(reason, count)| format!("{reason}×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints every circuit state change of the run, in order. Keys are route
/// names for the fault upstream (one breaker per route) and `down` for the
/// upstream that recovers.
pub fn print_circuit_timeline(
    out: &mut impl Write,
    settings: &GuardSettings,
    stats: &GuardStats,
    down: SocketAddr,
) -> io::Result<()> {
    writeln!(
        out,
        "\ncircuit breakers (--failure-threshold {}, --open-ms {}):",
        settings.failure_threshold,
        settings.open_for.as_millis()
    )?;
    let timeline = stats.timeline();
    if timeline.is_empty() {
        return writeln!(out, "  no state changes");
    }
    let down = down.to_string();
    for entry in timeline {
        let at = entry.at.as_secs_f64();
        match entry.what {
            TimelineEvent::Recovered => {
                timeline_line(out, at, DOWN, "upstream starts listening again")?;
            }
            TimelineEvent::Transition {
                key,
                from,
                to,
                open_for,
            } => {
                let key = if key == down { DOWN } else { key.as_str() };
                let open =
                    open_for.map_or_else(String::new, |d| format!(" for {} ms", d.as_millis()));
                timeline_line(out, at, key, &format!("{from} → {to}{open}"))?;
            }
        }
    }
    Ok(())
}

/// One timeline line: seconds since the start, the breaker, what happened.
fn timeline_line(out: &mut impl Write, at: f64, key: &str, what: &str) -> io::Result<()> {
    writeln!(out, "  {at:6.2} s  {key:<10}  {what}")
}
