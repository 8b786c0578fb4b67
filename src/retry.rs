//! Retry policy: how many attempts, how long to wait between them, which requests
//! are safe to send twice, and how many retries the upstream is allowed to absorb.
//!
//! The rules follow the best proxies:
//!
//! - **Backoff** is exponential with *full jitter* (a uniformly random sleep between
//!   zero and `min(max, base × 2ⁿ)`), which spreads retries from many clients
//!   instead of synchronising them. An upstream `Retry-After` (seconds or HTTP-date)
//!   replaces the backoff, capped by [`RetryPolicy::max_retry_after`]. No sleep ever ends
//!   past the deadline: if it would, the guard stops and answers with what it has.
//! - **Safety**: a request that may have reached the upstream is retried only if its
//!   method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) or it carries an
//!   `Idempotency-Key` header. A request that provably never left (connection
//!   refused) is retried whatever its method.
//! - **Budget** (Finagle/Linkerd style): retries may be at most `ratio` of the
//!   requests seen in the last `ttl`, plus `min_per_second × ttl`, so a failing
//!   upstream gets at most `(1 + ratio)` times its normal load, not `max_attempts`
//!   times.
//! - **Body replay**: a request body is buffered for replay only when it is
//!   already complete in memory or declares an exact length no larger than
//!   [`RetryPolicy::max_replay_body`]; anything else streams through once, untouched,
//!   and that request is not retried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method};
use tokio::time::Instant;

mod decision;

pub(crate) use decision::{decide, Decision, Failed, Resend};

use crate::error::ConfigError;

/// The most attempts a request may get: more only multiplies load on an upstream
/// that is already failing.
const MAX_ATTEMPTS: u32 = 10;

/// The largest body the guard will hold per request for replay.
const MAX_REPLAY_BODY: usize = 16 * 1024 * 1024;

/// The retry policy. `RetryPolicy::default()` is production-sane: 3 attempts in
/// total, 25 ms → 1 s full-jitter backoff, a 20 % retry budget with a floor of 10
/// retries per second over a 10 s window, `Retry-After` honored up to 5 s, bodies
/// up to 64 KiB replayed.
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::RetryPolicy;
///
/// let retry = RetryPolicy::default()
///     .max_attempts(4)
///     .backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .budget(0.1, 5);
/// # let _ = upstream_guard::UpstreamGuardLayer::builder().retry(retry).build().unwrap();
/// ```
///
/// With the `serde` feature it is the `[retry]` section of a
/// `GuardConfig` file: each key is a field below,
/// durations are written like `"800ms"`, a key left out keeps its
/// `RetryPolicy::default()` value, and an unknown key is an error.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct RetryPolicy {
    /// `max_attempts`; see [`RetryPolicy::max_attempts`].
    pub(crate) max_attempts: u32,
    /// `backoff_base`; see [`RetryPolicy::backoff`].
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) backoff_base: Duration,
    /// `backoff_max`; see [`RetryPolicy::backoff`].
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) backoff_max: Duration,
    /// `budget_enabled`: `false` after [`RetryPolicy::no_budget`]. The other
    /// `budget_*` values are kept (and still checked) while it is off.
    pub(crate) budget_enabled: bool,
    /// `budget_ratio`; see [`RetryPolicy::budget`].
    pub(crate) budget_ratio: f64,
    /// `budget_min_per_second`; see [`RetryPolicy::budget`].
    pub(crate) budget_min_per_second: u32,
    /// `budget_window`; see [`RetryPolicy::budget_window`].
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) budget_window: Duration,
    /// `max_retry_after`; see [`RetryPolicy::max_retry_after`].
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) max_retry_after: Duration,
    /// `max_replay_body`, in bytes; see [`RetryPolicy::max_replay_body`].
    pub(crate) max_replay_body: usize,
}

/// Retry budget parameters; see [`RetryPolicy::budget`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BudgetConfig {
    pub(crate) ratio: f64,
    pub(crate) min_per_second: u32,
    pub(crate) ttl: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            budget_enabled: true,
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(5),
            max_replay_body: 64 * 1024,
        }
    }
}

impl RetryPolicy {
    /// No retries: every request gets exactly one attempt, and bodies are never
    /// buffered. In a config file: `max_attempts = 1`.
    pub fn disabled() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Total attempts per request, the first included (default 3; 1 disables
    /// retries; at most 10).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Exponential backoff: the n-th retry sleeps a uniformly random time in
    /// `[0, min(max, base × 2ⁿ⁻¹)]` (full jitter). Defaults: 25 ms and 1 s.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// The retry budget: retries may be at most `ratio` of the requests of the last
    /// 10 seconds, plus `min_per_second` retries per second (so a quiet client can
    /// still retry). Defaults: 0.2 and 10. Turns the budget back on after
    /// [`no_budget`](Self::no_budget).
    pub fn budget(mut self, ratio: f64, min_per_second: u32) -> Self {
        self.budget_enabled = true;
        self.budget_ratio = ratio;
        self.budget_min_per_second = min_per_second;
        self
    }

    /// How long deposits into the retry budget count (default 10 s, 1 to 60 s).
    /// Turns the budget back on after [`no_budget`](Self::no_budget).
    pub fn budget_window(mut self, ttl: Duration) -> Self {
        self.budget_enabled = true;
        self.budget_window = ttl;
        self
    }

    /// Turns the retry budget off: every retryable failure is retried up to
    /// `max_attempts`. Only do this when something else bounds retry load.
    pub fn no_budget(mut self) -> Self {
        self.budget_enabled = false;
        self
    }

    /// The longest upstream `Retry-After` the guard will wait for before a retry
    /// (default 5 s). Longer values are capped to this.
    pub fn max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// The largest request body buffered for replay (default 64 KiB). Larger bodies,
    /// or bodies of unknown length that are not already complete, stream through
    /// once and the request is not retried.
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.max_replay_body = bytes;
        self
    }

    /// The retry budget's parameters; `None` when it is off.
    pub(crate) fn budget_config(&self) -> Option<BudgetConfig> {
        self.budget_enabled.then_some(BudgetConfig {
            ratio: self.budget_ratio,
            min_per_second: self.budget_min_per_second,
            ttl: self.budget_window,
        })
    }

    /// Checks every value, naming the offending one by its config file key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "retry.max_attempts",
                "must be at least 1 (1 means no retries)",
            ));
        }
        if self.max_attempts > MAX_ATTEMPTS {
            return Err(ConfigError::new(
                "retry.max_attempts",
                format!("must be at most {MAX_ATTEMPTS}, got {}", self.max_attempts),
            ));
        }
        if self.backoff_base.is_zero() {
            return Err(ConfigError::new(
                "retry.backoff_base",
                "must be greater than zero",
            ));
        }
        if self.backoff_max < self.backoff_base {
            return Err(ConfigError::new(
                "retry.backoff_max",
                "must not be shorter than retry.backoff_base",
            ));
        }
        if self.max_replay_body > MAX_REPLAY_BODY {
            return Err(ConfigError::new(
                "retry.max_replay_body",
                format!("must be at most {MAX_REPLAY_BODY} bytes"),
            ));
        }
        if let Some(budget) = self.budget_config() {
            if !budget.ratio.is_finite() || !(0.0..=1000.0).contains(&budget.ratio) {
                return Err(ConfigError::new(
                    "retry.budget_ratio",
                    format!("must be a number from 0 to 1000, got {}", budget.ratio),
                ));
            }
            if budget.ttl < Duration::from_secs(1) || budget.ttl > Duration::from_secs(60) {
                return Err(ConfigError::new(
                    "retry.budget_window",
                    "must be from 1 to 60 seconds",
                ));
            }
        }
        Ok(())
    }

    /// Whether more than one attempt is allowed.
    pub(crate) fn enabled(&self) -> bool {
        self.max_attempts > 1
    }

    /// The full-jitter backoff before retry number `retry` (1 for the first retry).
    pub(crate) fn backoff_for(&self, retry: u32) -> Duration {
        let ceiling = backoff_ceiling(self.backoff_base, self.backoff_max, retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

/// `min(max, base × 2^(retry-1))`, without overflow.
pub(crate) fn backoff_ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    let shift = retry.saturating_sub(1).min(32);
    base.checked_mul(1u32 << shift.min(31))
        .map_or(max, |d| d.min(max))
}

/// Whether a method is idempotent per RFC 9110 §9.2.2.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The `Idempotency-Key` header name.
const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Whether a request may be retried after it may have reached the upstream.
pub(crate) fn is_safe_to_resend(method: &Method, headers: &HeaderMap) -> bool {
    is_idempotent(method) || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (relative to `now`).
/// Garbage, negative numbers and dates in the past give `None` (no wait requested).
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        // Saturate absurdly long values instead of failing: they get capped anyway.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    when.duration_since(now).ok()
}

/// How many stripes the budget spreads its deposit counters over, so that threads
/// depositing concurrently rarely write the same cache line.
const STRIPES: usize = 8;

/// Rows of slot words: one per deposit stripe, then one for withdrawals. Withdrawals
/// are rare (one per retry decision), so they share a single row.
const ROWS: usize = STRIPES + 1;

/// Slot words per cache line.
const WORDS_PER_LINE: usize = 8;

/// One cache line of slot words. Rows start on a line boundary, so two rows never
/// share a line.
#[repr(align(64))]
#[derive(Default)]
struct Line([AtomicU64; WORDS_PER_LINE]);

/// A slot word packs the second it counts for (high 32 bits, seconds since the
/// budget's start) with its count (low 32 bits), so that one CAS both checks that
/// the slot is current and counts into it. The all-zero word reads as "second 0,
/// count 0", which is as good as empty.
fn pack(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    // Truncation is the point: the halves are the two packed fields.
    ((word >> 32) as u32, word as u32)
}

/// What a slot word looks like to a writer at a given second.
enum SlotAge {
    /// Counts for the writer's second: add to it.
    Current(u32),
    /// Counts for a second that has left the writer's window: reclaim it.
    Stale,
    /// Counts for a second later than the writer's (the writer read the clock a lap
    /// or more before another thread did): the writer's count would already be
    /// outside the window, so it is not recorded.
    Newer,
}

fn age(word: u64, second: u32) -> SlotAge {
    let (held, count) = unpack(word);
    match held.cmp(&second) {
        std::cmp::Ordering::Equal => SlotAge::Current(count),
        std::cmp::Ordering::Less => SlotAge::Stale,
        std::cmp::Ordering::Greater => SlotAge::Newer,
    }
}

/// The stripe this thread deposits into.
fn stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

/// A lock-free retry budget over a window of `len` one-second slots that slides
/// with real time: a withdrawal at second `s` (since the budget's start) counts the
/// deposits and withdrawals of seconds `(s - len, s]`, however long the budget sat
/// idle before.
///
/// Every slot word carries the second it counts for (see `pack`), so nothing has
/// to sweep expired slots: a word whose second left the window reads as empty, and
/// the first writer of a new second reclaims it with the same CAS that counts.
/// Deposits happen on every request and must be cheap: one CAS on a word of a
/// per-thread stripe, on a cache line no other stripe writes. Withdrawals reserve
/// first and check after, with sequentially consistent reservation and reads, so
/// concurrent withdrawals can never overspend (at worst two racing for the last
/// token both fail). No call locks or allocates.
///
/// Memory is laid out stripe-major: each row (8 deposit stripes, then one
/// withdrawal row) holds its `len` slot words contiguously, padded to whole
/// 64-byte cache lines. A budget thus takes `9 × ⌈len / 8⌉ × 64` bytes of slots
/// plus a 56-byte header: 1,208 bytes for the default 10 s window (about 1.2 MB
/// for the default 1,024 per-key budgets), 4,664 bytes for the longest, 60 s.
///
/// Seconds are counted in 32 bits and counts saturate at `u32::MAX` per stripe
/// per second; neither limit is reachable in practice (136 years, 4 billion
/// requests per second per stripe).
pub(crate) struct RetryBudget {
    ratio: f64,
    reserve: u64,
    start: Instant,
    /// The window length in seconds, also the number of slots per row (1 to 60).
    len: usize,
    /// `ROWS` rows of `⌈len / 8⌉` lines each.
    lines: Box<[Line]>,
}

/// The retry budgets of one guard, one per breaker key (see [`crate::keyed`]).
pub(crate) type Budgets = crate::keyed::PerKey<RetryBudget>;

impl crate::keyed::KeyState for RetryBudget {
    type Config = BudgetConfig;

    fn new(config: &BudgetConfig) -> Self {
        RetryBudget::new(*config)
    }

    fn reset(&self, _: &BudgetConfig) {
        RetryBudget::reset(self);
    }
}

impl RetryBudget {
    pub(crate) fn new(config: BudgetConfig) -> Self {
        RetryBudget::starting_at(config, Instant::now())
    }

    /// A budget whose second 0 begins at `start` (tests pin it to know which
    /// second an instant falls in).
    fn starting_at(config: BudgetConfig, start: Instant) -> Self {
        let seconds = config.ttl.as_secs().clamp(1, 60);
        // At most 60, so the cast is lossless.
        let len = seconds as usize;
        let lines = (0..ROWS * len.div_ceil(WORDS_PER_LINE))
            .map(|_| Line::default())
            .collect::<Vec<_>>();
        RetryBudget {
            ratio: config.ratio,
            reserve: u64::from(config.min_per_second) * seconds,
            start,
            len,
            lines: lines.into_boxed_slice(),
        }
    }

    /// Forgets every deposit and withdrawal, as if the budget were new.
    // A registry slot handed to a new key must not inherit the old key's
    // history (see `crate::keyed`).
    pub(crate) fn reset(&self) {
        for word in self.lines.iter().flat_map(|line| &line.0) {
            word.store(0, Ordering::SeqCst);
        }
    }

    /// Records one request seen at `now`.
    pub(crate) fn deposit(&self, now: Instant) {
        let second = self.second(now);
        // Relaxed: deposits only ever make a withdrawal more permissive, and a
        // withdrawal that misses one in flight is no worse than one that ran first.
        count(self.word(stripe(), second), second, Ordering::Relaxed);
    }

    /// Tries to take one retry out of the budget at `now`.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let second = self.second(now);
        let reservation = self.word(STRIPES, second);
        // Reserve first, then check: two racing withdrawals cannot both succeed on
        // the last token (at worst both fail). SeqCst orders every reservation
        // before every later sum, even across different slot words.
        if !count(reservation, second, Ordering::SeqCst) {
            return false;
        }
        let (deposits, withdrawals) = self.sums(second);
        let allowed = (deposits as f64 * self.ratio) as u64 + self.reserve;
        if withdrawals <= allowed {
            true
        } else {
            uncount(reservation, second);
            false
        }
    }

    /// The second since `start` that `now` falls in.
    fn second(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.start).as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// The word of `row` that counts for `second`.
    fn word(&self, row: usize, second: u32) -> &AtomicU64 {
        let index = row * self.lines_per_row() * WORDS_PER_LINE + second as usize % self.len;
        // `row < ROWS` and the slot index is below `len`, so the word is in range.
        &self.lines[index / WORDS_PER_LINE].0[index % WORDS_PER_LINE]
    }

    fn lines_per_row(&self) -> usize {
        self.len.div_ceil(WORDS_PER_LINE)
    }

    /// Deposits and withdrawals (reservations included) of the window ending at
    /// `second`.
    fn sums(&self, second: u32) -> (u64, u64) {
        let mut rows = self.lines.chunks_exact(self.lines_per_row());
        let deposits = rows
            .by_ref()
            .take(STRIPES)
            .map(|row| self.windowed(row, second))
            .sum();
        let withdrawals = rows.map(|row| self.windowed(row, second)).sum();
        (deposits, withdrawals)
    }

    /// The counts of one row for seconds `(second - len, second]`.
    fn windowed(&self, row: &[Line], second: u32) -> u64 {
        let oldest = u64::from(second) + 1;
        let len = self.len as u64;
        row.iter()
            .flat_map(|line| &line.0)
            .take(self.len)
            .map(|word| unpack(word.load(Ordering::SeqCst)))
            .filter(|&(held, _)| held <= second && u64::from(held) + len >= oldest)
            .map(|(_, count)| u64::from(count))
            .sum()
    }
}

/// Adds one to `word` for `second`, reclaiming it if it holds an expired
/// second. Returns whether the count was recorded (not when the word already
/// holds a later second).
fn count(word: &AtomicU64, second: u32, order: Ordering) -> bool {
    let mut seen = word.load(order);
    loop {
        let next = match age(seen, second) {
            SlotAge::Current(count) => pack(second, count.saturating_add(1)),
            SlotAge::Stale => pack(second, 1),
            SlotAge::Newer => return false,
        };
        match word.compare_exchange_weak(seen, next, order, order) {
            Ok(_) => return true,
            Err(actual) => seen = actual,
        }
    }
}

/// Takes back a reservation made for `second`, unless the word has since moved
/// on to another second (then the reservation has left the window anyway).
fn uncount(word: &AtomicU64, second: u32) {
    let mut seen = word.load(Ordering::SeqCst);
    while let SlotAge::Current(count @ 1..) = age(seen, second) {
        match word.compare_exchange_weak(
            seen,
            pack(second, count - 1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => return,
            Err(actual) => seen = actual,
        }
    }
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("reserve", &self.reserve)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_per_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn idempotency_key_makes_a_post_safe_to_resend() {
        let mut headers = HeaderMap::new();
        assert!(!is_safe_to_resend(&Method::POST, &headers));
        headers.insert("idempotency-key", "k1".parse().unwrap());
        assert!(is_safe_to_resend(&Method::POST, &headers));
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(b"3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(b" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            parse_retry_after(later.as_bytes(), now),
            Some(Duration::from_secs(7))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(past.as_bytes(), now), None);
        for bad in [&b"-1"[..], b"soon", b"", b"1.5", b"\xff"] {
            assert_eq!(parse_retry_after(bad, now), None);
        }
        assert_eq!(
            parse_retry_after(b"99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn backoff_ceiling_doubles_then_caps() {
        let base = Duration::from_millis(25);
        let max = Duration::from_secs(1);
        assert_eq!(backoff_ceiling(base, max, 1), Duration::from_millis(25));
        assert_eq!(backoff_ceiling(base, max, 2), Duration::from_millis(50));
        assert_eq!(backoff_ceiling(base, max, 3), Duration::from_millis(100));
        assert_eq!(backoff_ceiling(base, max, 10), max);
        assert_eq!(backoff_ceiling(base, max, u32::MAX), max);
    }

    #[test]
    fn budget_allows_ratio_of_deposits_plus_reserve() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.25,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        });
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit(now);
        }
        let granted = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(granted, 25);
    }

    #[test]
    fn budget_reserve_is_per_second_over_the_window() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_second: 2,
            ttl: Duration::from_secs(3),
        });
        let granted = (0..100).filter(|_| budget.withdraw(Instant::now())).count();
        assert_eq!(granted, 6);
    }

    /// A budget over a 10 s window with its second 0 at `start`.
    fn ten_second_budget(ratio: f64, min_per_second: u32, start: Instant) -> RetryBudget {
        RetryBudget::starting_at(
            BudgetConfig {
                ratio,
                min_per_second,
                ttl: Duration::from_secs(10),
            },
            start,
        )
    }

    #[test]
    fn a_burst_after_a_quiet_spell_shorter_than_the_window_keeps_the_busy_deposits() {
        let start = Instant::now();
        let budget = ten_second_budget(0.2, 1, start);
        let at = |secs| start + Duration::from_secs(secs);
        // Busy: 100 requests a second for three seconds, well after the first lap.
        for second in 30..33 {
            for _ in 0..100 {
                budget.deposit(at(second));
            }
        }
        // Quiet for four seconds, then an incident: every request wants a retry.
        let granted = (0..1000).filter(|_| budget.withdraw(at(36))).count();
        assert_eq!(granted, 300 / 5 + 10, "ratio × deposits + reserve");
    }

    #[test]
    fn deposits_older_than_the_window_no_longer_count() {
        let start = Instant::now();
        let budget = ten_second_budget(1.0, 0, start);
        let at = |secs| start + Duration::from_secs(secs);
        budget.deposit(at(5));
        budget.deposit(at(5));
        budget.deposit(at(6));
        // Second 14's window is (4, 14]: all three deposits count.
        assert!(budget.withdraw(at(14)));
        // Second 15's window is (5, 15]: only second 6's deposit is left, and
        // second 14's withdrawal still counts against it.
        assert!(!budget.withdraw(at(15)));
        // Second 16's window is (6, 16]: nothing was deposited in it.
        assert!(!budget.withdraw(at(16)));
    }

    #[test]
    fn reset_forgets_deposits_and_withdrawals() {
        let budget = ten_second_budget(1.0, 1, Instant::now());
        let now = Instant::now();
        for _ in 0..5 {
            budget.deposit(now);
        }
        let before = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(before, 15, "5 deposits + a reserve of 10");
        budget.reset();
        let after = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(after, 10, "only the reserve");
    }

    #[test]
    fn a_deposit_read_a_lap_behind_a_newer_second_is_not_counted_there() {
        let start = Instant::now();
        let budget = ten_second_budget(1.0, 0, start);
        let at = |secs| start + Duration::from_secs(secs);
        budget.deposit(at(12));
        // A thread that read the clock ten seconds earlier hits the same slot.
        budget.deposit(at(2));
        assert!(budget.withdraw(at(12)));
        assert!(
            !budget.withdraw(at(12)),
            "second 2's deposit is out of the window"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn backoff_is_within_zero_and_the_capped_exponential(
                base_ms in 1u64..1_000,
                extra_ms in 0u64..10_000,
                retry in 1u32..64,
            ) {
                let base = Duration::from_millis(base_ms);
                let max = base + Duration::from_millis(extra_ms);
                let policy = RetryPolicy::default().backoff(base, max);
                let ceiling = backoff_ceiling(base, max, retry);
                prop_assert!(ceiling <= max);
                prop_assert!(ceiling >= base.min(max));
                let exp = base.saturating_mul(1u32 << (retry - 1).min(31));
                prop_assert_eq!(ceiling, exp.min(max));
                for _ in 0..8 {
                    prop_assert!(policy.backoff_for(retry) <= ceiling);
                }
            }

            #[test]
            fn budget_never_grants_more_than_ratio_times_deposits_plus_reserve(
                ratio in 0.0f64..2.0,
                min_per_second in 0u32..20,
                ttl_secs in 1u64..20,
                ops in proptest::collection::vec(any::<bool>(), 0..400),
            ) {
                let budget = RetryBudget::new(BudgetConfig {
                    ratio,
                    min_per_second,
                    ttl: Duration::from_secs(ttl_secs),
                });
                let now = Instant::now();
                let (mut deposits, mut granted) = (0u64, 0u64);
                for deposit in ops {
                    if deposit {
                        budget.deposit(now);
                        deposits += 1;
                    } else if budget.withdraw(now) {
                        granted += 1;
                    }
                    let allowed = (deposits as f64 * ratio) as u64
                        + u64::from(min_per_second) * ttl_secs;
                    prop_assert!(granted <= allowed, "granted {} > allowed {}", granted, allowed);
                }
            }
        }

        /// The budget's specification, written plainly: every deposit and granted
        /// withdrawal with its second, and a withdrawal at second `s` is allowed iff
        /// the granted withdrawals of `(s - len, s]`, plus this one, fit within
        /// `floor(deposits of (s - len, s] × ratio) + reserve`.
        struct Model {
            len: u64,
            ratio: f64,
            reserve: u64,
            deposits: Vec<u64>,
            withdrawals: Vec<u64>,
        }

        impl Model {
            fn in_window(&self, events: &[u64], second: u64) -> u64 {
                events
                    .iter()
                    .filter(|&&t| t <= second && t + self.len > second)
                    .count() as u64
            }

            #[allow(
                clippy::int_plus_one,
                reason = "written as the specification states it"
            )]
            fn withdraw(&mut self, second: u64) -> bool {
                let deposits = self.in_window(&self.deposits, second);
                let granted = self.in_window(&self.withdrawals, second);
                let allowed = granted + 1 <= (deposits as f64 * self.ratio) as u64 + self.reserve;
                if allowed {
                    self.withdrawals.push(second);
                }
                allowed
            }
        }

        /// Time between two operations: mostly within a second, sometimes a few
        /// seconds, sometimes a quiet period longer than any window tested.
        fn gap() -> impl Strategy<Value = Duration> {
            prop_oneof![
                8 => 0u64..300,
                3 => 300u64..3_000,
                1 => 3_000u64..40_000,
            ]
            .prop_map(Duration::from_millis)
        }

        proptest! {
            #[test]
            fn budget_grants_exactly_the_withdrawals_the_reference_model_allows(
                ratio in 0.0f64..2.0,
                min_per_second in 0u32..3,
                ttl_secs in 1u64..13,
                ops in proptest::collection::vec((gap(), proptest::bool::weighted(0.4)), 0..300),
            ) {
                let start = Instant::now();
                let config = BudgetConfig {
                    ratio,
                    min_per_second,
                    ttl: Duration::from_secs(ttl_secs),
                };
                let budget = RetryBudget::starting_at(config, start);
                let mut model = Model {
                    len: ttl_secs,
                    ratio,
                    reserve: u64::from(min_per_second) * ttl_secs,
                    deposits: Vec::new(),
                    withdrawals: Vec::new(),
                };
                let mut elapsed = Duration::ZERO;
                for (i, (gap, deposit)) in ops.into_iter().enumerate() {
                    elapsed += gap;
                    let second = elapsed.as_secs();
                    if deposit {
                        budget.deposit(start + elapsed);
                        model.deposits.push(second);
                    } else {
                        let expected = model.withdraw(second);
                        prop_assert_eq!(
                            budget.withdraw(start + elapsed),
                            expected,
                            "operation {} (a withdrawal at {:?})",
                            i,
                            elapsed
                        );
                    }
                }
            }
        }

        #[test]
        fn concurrent_withdrawals_never_overspend() {
            let budget = std::sync::Arc::new(RetryBudget::new(BudgetConfig {
                ratio: 0.0,
                min_per_second: 5,
                ttl: Duration::from_secs(10),
            }));
            let now = Instant::now();
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let budget = budget.clone();
                    std::thread::spawn(move || (0..1000).filter(|_| budget.withdraw(now)).count())
                })
                .collect();
            let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(granted, 50);
        }

        #[tokio::test(start_paused = true)]
        async fn old_deposits_leave_the_window() {
            let budget = RetryBudget::new(BudgetConfig {
                ratio: 1.0,
                min_per_second: 0,
                ttl: Duration::from_secs(2),
            });
            for _ in 0..10 {
                budget.deposit(Instant::now());
            }
            tokio::time::advance(Duration::from_secs(5)).await;
            assert!(
                !budget.withdraw(Instant::now()),
                "deposits 5 s old are gone"
            );
            budget.deposit(Instant::now());
            assert!(budget.withdraw(Instant::now()));
            assert!(!budget.withdraw(Instant::now()));
        }
    }
}
