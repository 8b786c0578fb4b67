//! Runs the built `gateway` example (`examples/gateway/`) in demo mode, reads
//! its report, and checks the story that the example's docs and the README tell:
//! what each scenario gets, and that the `down` upstream comes back and its
//! circuit closes. The demo's timing is real, so these tests assert the story
//! (which statuses, which breaker transitions, in which order), never exact
//! counts or latencies.
//!
//! The demo runs once (about ten seconds) and every test reads the same report.
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test gateway_demo`), build the example first
//! with `cargo build --example gateway`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::Duration;

use support::example_process::Example;

const GATEWAY: Example = Example("gateway");
/// The demo takes about ten seconds; a loaded machine may stretch it a lot.
const DEMO_LIMIT: Duration = Duration::from_secs(90);
/// The scenarios the demo's docs describe, in the order of its table.
const SCENARIOS: [&str; 6] = ["healthy", "slow", "hanging", "resetting", "down", "flaky"];
/// The timeline line that says the `down` upstream started listening.
const RECOVERED: &str = "upstream starts listening again";

/// The demo's report, parsed.
#[derive(Debug)]
struct Report {
    /// Summary rows by scenario name, in the order printed.
    rows: Vec<Row>,
    /// The circuit breaker timeline, in order.
    timeline: Vec<TimelineLine>,
    /// The whole stdout, for failure messages.
    text: String,
}

/// One scenario row of the summary table.
#[derive(Debug)]
struct Row {
    scenario: String,
    requests: usize,
    /// Responses per status (`err` for requests that got no answer).
    statuses: BTreeMap<String, usize>,
    /// The guard's problem types.
    problems: BTreeSet<String>,
    /// Mean attempts per request, when shown.
    attempts: Option<f64>,
}

/// One line of the circuit breaker timeline.
#[derive(Debug)]
struct TimelineLine {
    breaker: String,
    /// `FROM → TO`, maybe followed by ` for N ms`, or [`RECOVERED`].
    event: String,
}

impl Report {
    fn row(&self, scenario: &str) -> &Row {
        self.rows
            .iter()
            .find(|row| row.scenario == scenario)
            .unwrap_or_else(|| panic!("no `{scenario}` row in the report:\n{}", self.text))
    }

    /// The timeline lines of one breaker, with their positions in the whole timeline.
    fn breaker(&self, breaker: &str) -> Vec<(usize, &str)> {
        self.timeline
            .iter()
            .enumerate()
            .filter(|(_, line)| line.breaker == breaker)
            .map(|(at, line)| (at, line.event.as_str()))
            .collect()
    }

    /// Where the `down` upstream started listening in the timeline.
    fn recovery(&self) -> usize {
        self.breaker("down")
            .into_iter()
            .find(|(_, event)| *event == RECOVERED)
            .map(|(at, _)| at)
            .unwrap_or_else(|| panic!("the down upstream never came back:\n{}", self.text))
    }
}

impl Row {
    fn count(&self, status: &str) -> usize {
        self.statuses.get(status).copied().unwrap_or(0)
    }

    /// Asserts the row's statuses are exactly `expected`, each at least once.
    fn assert_statuses(&self, expected: &[&str], report: &Report) {
        let seen: Vec<&str> = self.statuses.keys().map(String::as_str).collect();
        assert_eq!(
            seen, expected,
            "`{}` got other statuses than the story says:\n{}",
            self.scenario, report.text
        );
    }
}

/// Whether a timeline event is the transition `from → to` (open periods aside).
fn is_transition(event: &str, from: &str, to: &str) -> bool {
    let transition = event.split(" for ").next().unwrap_or(event);
    transition == format!("{from} → {to}")
}

/// The demo's report: the demo runs once, the first time a test asks.
fn report() -> &'static Report {
    static REPORT: OnceLock<Result<Report, String>> = OnceLock::new();
    match REPORT.get_or_init(run_demo) {
        Ok(report) => report,
        Err(why) => panic!("{why}"),
    }
}

/// Runs the demo to its end and parses what it printed. A failure becomes an
/// error kept for every test, so a broken demo runs (and fails) only once.
fn run_demo() -> Result<Report, String> {
    let run = panic::catch_unwind(AssertUnwindSafe(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(GATEWAY.run_to_exit_within(&[], DEMO_LIMIT))
    }));
    let output = run.map_err(|panicked| {
        let why = panicked
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panicked.downcast_ref::<&str>().map(|s| (*s).to_owned()));
        format!("the demo did not run: {}", why.unwrap_or_default())
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "the demo failed ({}); stdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        ));
    }
    parse_report(&stdout).map_err(|why| format!("{why}; stdout:\n{stdout}"))
}

/// A report line's cells: they are separated by runs of two or more spaces and
/// never hold two spaces in a row (the demo's docs promise this).
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|cell| !cell.is_empty())
        .collect()
}

/// The summary table (its header starts `scenario`, a rule follows), then the
/// timeline (after `circuit breakers ...:`).
fn parse_report(stdout: &str) -> Result<Report, String> {
    Ok(Report {
        rows: section(stdout, "scenario ")?
            .into_iter()
            .skip(1)
            .map(parse_row)
            .collect::<Result<_, _>>()?,
        timeline: section(stdout, "circuit breakers")?
            .into_iter()
            .map(parse_timeline_line)
            .collect::<Result<_, _>>()?,
        text: stdout.to_owned(),
    })
}

/// The lines after the first line starting with `title`, up to a blank line.
fn section<'a>(stdout: &'a str, title: &str) -> Result<Vec<&'a str>, String> {
    let mut lines = stdout.lines().skip_while(|line| !line.starts_with(title));
    if lines.next().is_none() {
        return Err(format!("no `{title}...` section in the report"));
    }
    Ok(lines.take_while(|line| !line.trim().is_empty()).collect())
}

/// `scenario  upstream  requests  responses  guard answer  attempts  p50  p99`.
fn parse_row(line: &str) -> Result<Row, String> {
    let bad = || format!("not a scenario row: `{line}`");
    let [scenario, _upstream, requests, responses, problems, attempts, _p50, _p99] =
        <[&str; 8]>::try_from(cells(line)).map_err(|_| bad())?;
    let statuses = responses
        .split(' ')
        .filter(|part| *part != "-")
        .map(|part| {
            let (status, count) = part.split_once('×').ok_or_else(bad)?;
            Ok((status.to_owned(), count.parse().map_err(|_| bad())?))
        })
        .collect::<Result<_, String>>()?;
    Ok(Row {
        scenario: scenario.to_owned(),
        requests: requests.parse().map_err(|_| bad())?,
        statuses,
        problems: problems
            .split(", ")
            .filter(|kind| *kind != "-")
            .map(str::to_owned)
            .collect(),
        attempts: match attempts {
            "-" => None,
            mean => Some(mean.parse().map_err(|_| bad())?),
        },
    })
}

/// `  1.38 s  down        half_open → open for 2000 ms`.
fn parse_timeline_line(line: &str) -> Result<TimelineLine, String> {
    match cells(line)[..] {
        [_at, breaker, event] => Ok(TimelineLine {
            breaker: breaker.to_owned(),
            event: event.to_owned(),
        }),
        _ => Err(format!("not a timeline line: `{line}`")),
    }
}

#[test]
fn the_report_has_a_row_for_each_scenario_the_docs_describe() {
    let report = report();
    let scenarios: Vec<&str> = report.rows.iter().map(|r| r.scenario.as_str()).collect();
    assert_eq!(scenarios, SCENARIOS, "{}", report.text);
}

#[test]
fn every_demo_request_gets_a_complete_answer() {
    let report = report();
    for row in &report.rows {
        assert_eq!(row.count("err"), 0, "`{}`:\n{}", row.scenario, report.text);
        let answered: usize = row.statuses.values().sum();
        assert_eq!(
            answered, row.requests,
            "`{}`:\n{}",
            row.scenario, report.text
        );
        assert!(row.requests > 0, "`{}` sent nothing", row.scenario);
    }
}

#[test]
fn healthy_requests_all_get_200() {
    let report = report();
    report.row("healthy").assert_statuses(&["200"], report);
}

#[test]
fn slow_requests_below_the_timeout_all_get_200() {
    let report = report();
    report.row("slow").assert_statuses(&["200"], report);
}

#[test]
fn hanging_requests_get_504_then_503_once_their_circuit_opens() {
    let report = report();
    report
        .row("hanging")
        .assert_statuses(&["503", "504"], report);
    let opened = report
        .breaker("hang")
        .iter()
        .any(|(_, event)| is_transition(event, "closed", "open"));
    assert!(opened, "the hang circuit never opened:\n{}", report.text);
}

#[test]
fn resetting_requests_get_502_then_503_once_their_circuit_opens() {
    let report = report();
    let row = report.row("resetting");
    row.assert_statuses(&["502", "503"], report);
    assert!(row.problems.contains("transport"), "{}", report.text);
    assert!(row.problems.contains("circuit-open"), "{}", report.text);
    let opened = report
        .breaker("reset")
        .iter()
        .any(|(_, event)| is_transition(event, "closed", "open"));
    assert!(opened, "the reset circuit never opened:\n{}", report.text);
}

/// The `503`s made no attempt and every `502` made at least one, so more
/// attempts than `502`s means some `502` came after a retry. The mean is
/// printed with two decimals: the total is known to ±0.005 per request.
#[test]
fn resetting_requests_are_retried_before_the_502() {
    let report = report();
    let row = report.row("resetting");
    let mean = row.attempts.expect("the resetting row shows attempts");
    let attempts = mean * row.requests as f64;
    let rounding = 0.005 * row.requests as f64;
    assert!(
        attempts - rounding > row.count("502") as f64,
        "{attempts:.1} attempts for {} 502s: none was retried\n{}",
        row.count("502"),
        report.text
    );
}

#[test]
fn down_requests_get_502_then_503_while_its_circuit_is_open() {
    let report = report();
    let row = report.row("down");
    assert!(row.count("502") > 0, "no 502:\n{}", report.text);
    assert!(row.count("503") > 0, "no 503:\n{}", report.text);
    assert!(row.problems.contains("connect"), "{}", report.text);
    assert!(row.problems.contains("circuit-open"), "{}", report.text);
    // Its first timeline line: before anything else (coming back included).
    let first = report.breaker("down").first().map(|&(_, event)| event);
    assert!(
        first.is_some_and(|event| is_transition(event, "closed", "open")),
        "the down circuit did not open while nothing listened:\n{}",
        report.text
    );
}

#[test]
fn down_requests_get_200_once_the_upstream_is_back() {
    let report = report();
    report
        .row("down")
        .assert_statuses(&["200", "502", "503"], report);
}

#[test]
fn the_down_circuit_closes_after_the_upstream_comes_back_and_stays_closed() {
    let report = report();
    let recovery = report.recovery();
    let down = report.breaker("down");
    let closed_after_recovery = down
        .iter()
        .any(|&(at, event)| at > recovery && is_transition(event, "half_open", "closed"));
    assert!(
        closed_after_recovery,
        "no half_open → closed for down after it came back:\n{}",
        report.text
    );
    let (_, last) = down.last().expect("the down breaker has a timeline");
    assert!(
        is_transition(last, "half_open", "closed"),
        "the down circuit does not end closed:\n{}",
        report.text
    );
}

/// Each flaky key answers 503 twice before its 200, so every 200 took at
/// least three attempts (the mean is printed with two decimals).
#[test]
fn flaky_requests_are_retried_until_each_gets_its_200() {
    let report = report();
    let row = report.row("flaky");
    row.assert_statuses(&["200"], report);
    let mean = row.attempts.expect("the flaky row shows attempts");
    assert!(
        mean >= 2.995,
        "{mean} attempts per request:\n{}",
        report.text
    );
}
