//! A load generator of POS terminals.
//!
//! Each terminal is one tokio task that runs transactions one after the other
//! (a terminal never has two in flight). Every transaction has a unique id
//! `t<terminal>-<seq>`, sent both as `X-Txn-Id` and in the path
//! (`/pay?txn=<id>`). A response that carries another id, or a `200` whose
//! body is not `ok <id>\n`, counts as **mismatched**: a response delivered to
//! the wrong client, which a proxy must never do.
//!
//! Scale: thousands of terminals run fine on one multi-thread runtime, but
//! each needs a socket, so the process needs more open files than the usual
//! soft limit of 1024; call [`crate::sys::raise_nofile_limit`] first (the
//! `terminals` binary does). In per-transaction mode every transaction uses a
//! new ephemeral port; the server closes first, so `TIME_WAIT` stays on its
//! side.
//!
//! Every run is bounded: by the transaction count per terminal (each
//! transaction bounded by [`LoadConfig::request_timeout`]) or by
//! [`LoadConfig::duration`] plus one request timeout, with a safety deadline
//! on top that abandons stuck terminals (counted in
//! [`Report::unfinished_terminals`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Conn, Request, Response};

/// Samples of mismatches and errors kept in a [`Report`], at most.
const MAX_SAMPLES: usize = 10;
/// Slack added to the computed end of a run before the safety deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

/// How terminals use TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnMode {
    /// Keep one connection per terminal open across transactions (reconnect
    /// when the server closes it).
    KeepAlive,
    /// Open a new TCP connection for every transaction (`Connection: close`).
    PerTransaction,
}

impl FromStr for ConnMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "keep-alive" | "keepalive" => Ok(ConnMode::KeepAlive),
            "per-transaction" | "per-txn" | "close" => Ok(ConnMode::PerTransaction),
            other => Err(format!(
                "unknown connection mode {other:?} (keep-alive | per-transaction)"
            )),
        }
    }
}

/// Which HTTP version terminals speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMix {
    /// HTTP/1.0 everywhere.
    Http10,
    /// HTTP/1.1 everywhere.
    Http11,
    /// Even terminals HTTP/1.1, odd ones HTTP/1.0.
    Mixed,
}

impl FromStr for HttpMix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "1.0" | "http10" | "http/1.0" => Ok(HttpMix::Http10),
            "1.1" | "http11" | "http/1.1" => Ok(HttpMix::Http11),
            "mixed" => Ok(HttpMix::Mixed),
            other => Err(format!("unknown HTTP mix {other:?} (1.0 | 1.1 | mixed)")),
        }
    }
}

/// When terminals start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// All terminals start at once.
    AllAtOnce,
    /// Start times spread evenly over this duration.
    Ramp(Duration),
}

/// The request method of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET /pay?txn=<id>`.
    Get,
    /// `POST /pay?txn=<id>` with a small form body and `Content-Length`.
    Post,
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "get" => Ok(Method::Get),
            "post" => Ok(Method::Post),
            other => Err(format!("unknown method {other:?} (get | post)")),
        }
    }
}

/// What load to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    /// Where to send transactions (the proxy, or the emulator directly).
    pub target: SocketAddr,
    /// Number of terminals (concurrent tasks).
    pub terminals: usize,
    /// Stop each terminal after this many transactions.
    pub transactions_per_terminal: Option<u64>,
    /// Stop starting new transactions after this long (measured from the
    /// start of the run). At least one of the two limits must be set.
    pub duration: Option<Duration>,
    /// Connection reuse.
    pub conn_mode: ConnMode,
    /// HTTP version(s).
    pub http: HttpMix,
    /// Start times of terminals.
    pub start: StartMode,
    /// Total offered transactions per second across all terminals. Each
    /// terminal fires every `terminals / rate` seconds (open loop); one that
    /// runs late starts the next right away. `None`: closed loop,
    /// back-to-back.
    pub offered_rate: Option<f64>,
    /// Request method.
    pub method: Method,
    /// Client-side bound on each transaction (connect + request + response).
    pub request_timeout: Duration,
    /// Extra header fields on every request.
    pub extra_headers: Vec<(String, String)>,
    /// Keep the ids of successful transactions in [`Report::ok_ids`].
    pub record_ids: bool,
}

impl Default for LoadConfig {
    /// 10 terminals × 10 transactions, keep-alive, HTTP/1.1, all at once,
    /// closed loop, GET, 30 s request timeout, no ids recorded. The target is
    /// `127.0.0.1:0`, which refuses connections: always set `target`.
    fn default() -> Self {
        LoadConfig {
            target: SocketAddr::from(([127, 0, 0, 1], 0)),
            terminals: 10,
            transactions_per_terminal: Some(10),
            duration: None,
            conn_mode: ConnMode::KeepAlive,
            http: HttpMix::Http11,
            start: StartMode::AllAtOnce,
            offered_rate: None,
            method: Method::Get,
            request_timeout: Duration::from_secs(30),
            extra_headers: Vec::new(),
            record_ids: false,
        }
    }
}

impl LoadConfig {
    /// The [`Default`] configuration aimed at `target`.
    pub fn new(target: SocketAddr) -> Self {
        LoadConfig {
            target,
            ..LoadConfig::default()
        }
    }

    /// Checks the configuration: at least one terminal, at least one of
    /// `transactions_per_terminal` and `duration`, a positive finite rate, a
    /// non-zero request timeout.
    pub fn validate(&self) -> io::Result<()> {
        let bad = |msg: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, msg.to_string()));
        if self.terminals == 0 {
            return bad("terminals must be at least 1");
        }
        if self.transactions_per_terminal.is_none() && self.duration.is_none() {
            return bad("set transactions_per_terminal or duration (or both)");
        }
        if let Some(rate) = self.offered_rate {
            if !(rate.is_finite() && rate > 0.0) {
                return bad("offered_rate must be a positive number");
            }
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive");
        }
        Ok(())
    }

    /// The interval between transactions of one terminal in open loop.
    fn interval(&self) -> Option<Duration> {
        self.offered_rate
            .map(|rate| Duration::from_secs_f64(self.terminals as f64 / rate))
    }

    /// The start offset of terminal `idx`.
    fn start_offset(&self, idx: usize) -> Duration {
        match self.start {
            StartMode::AllAtOnce => Duration::ZERO,
            StartMode::Ramp(d) => d.mul_f64(idx as f64 / self.terminals as f64),
        }
    }

    /// When the run must be over even if a terminal is stuck.
    fn safety_deadline(&self, t0: Instant) -> Instant {
        let ramp = match self.start {
            StartMode::AllAtOnce => Duration::ZERO,
            StartMode::Ramp(d) => d,
        };
        let by_duration = self.duration.map(|d| d + self.request_timeout);
        let by_count = self.transactions_per_terminal.map(|n| {
            let per_txn = self.request_timeout + self.interval().unwrap_or(Duration::ZERO);
            per_txn.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
        });
        let run = match (by_duration, by_count) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Duration::ZERO,
        };
        // Far-future deadlines saturate rather than overflow.
        let total = ramp.saturating_add(run).saturating_add(DEADLINE_SLACK);
        t0.checked_add(total)
            .unwrap_or_else(|| t0 + Duration::from_secs(86_400 * 365))
    }
}

/// Latency percentiles of successful transactions (serialised in ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub count: u64,
    /// Median.
    #[serde(rename = "p50_ms", serialize_with = "ser_ms")]
    pub p50: Duration,
    /// 90th percentile.
    #[serde(rename = "p90_ms", serialize_with = "ser_ms")]
    pub p90: Duration,
    /// 99th percentile.
    #[serde(rename = "p99_ms", serialize_with = "ser_ms")]
    pub p99: Duration,
    /// Maximum.
    #[serde(rename = "max_ms", serialize_with = "ser_ms")]
    pub max: Duration,
}

impl Latency {
    /// Nearest-rank percentiles of `samples` (microseconds; sorted in place).
    fn from_micros(samples: &mut [u64]) -> Latency {
        samples.sort_unstable();
        let n = samples.len();
        let pick = |p: f64| -> Duration {
            if n == 0 {
                return Duration::ZERO;
            }
            // Nearest rank: ceil(p * n), 1-based.
            let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
            Duration::from_micros(samples[rank - 1])
        };
        Latency {
            count: u64::try_from(n).unwrap_or(u64::MAX),
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            max: pick(1.0),
        }
    }
}

/// Serialises a duration as fractional milliseconds.
fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Wall time of the run (serialised in ms).
    #[serde(rename = "elapsed_ms", serialize_with = "ser_ms")]
    pub elapsed: Duration,
    /// Transactions started.
    pub sent: u64,
    /// `200` responses with the right id and body.
    pub ok: u64,
    /// Responses by status code (mismatched ones included).
    pub by_status: BTreeMap<u16, u64>,
    /// Transactions that could not connect (refused, reset, connect timeout).
    pub errors_connect: u64,
    /// Transactions that failed after connecting: reset, EOF before a full
    /// response, malformed response.
    pub errors_io: u64,
    /// Transactions without a full response within the request timeout.
    pub errors_timeout: u64,
    /// Responses carrying another transaction's id (or a `200` without the
    /// right body): must always be zero.
    pub mismatched: u64,
    /// `503` responses with a `Retry-After` header.
    pub retry_after_seen: u64,
    /// Latency of the `ok` transactions.
    pub latency_ok: Latency,
    /// `ok` per second over `elapsed`.
    pub goodput: f64,
    /// Ids of the `ok` transactions, by terminal then sequence (only with
    /// [`LoadConfig::record_ids`]).
    pub ok_ids: Vec<String>,
    /// Up to 10 mismatches, as `sent <id>: got <status> <id> <body>`.
    pub mismatch_samples: Vec<String>,
    /// Up to 10 errors, as `<id>: <kind>: <error>`.
    pub error_samples: Vec<String>,
    /// Terminals abandoned at the safety deadline (their results are lost);
    /// should be zero.
    pub unfinished_terminals: u64,
}

impl Report {
    /// Total of the error counters (connect + io + timeout).
    pub fn errors(&self) -> u64 {
        self.errors_connect + self.errors_io + self.errors_timeout
    }

    /// Count of responses with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        writeln!(
            f,
            "sent {} ok {} mismatched {} | goodput {:.1}/s over {:.2}s",
            self.sent,
            self.ok,
            self.mismatched,
            self.goodput,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "status [{}] retry-after {} | errors connect {} io {} timeout {}{}",
            statuses.join(" "),
            self.retry_after_seen,
            self.errors_connect,
            self.errors_io,
            self.errors_timeout,
            if self.unfinished_terminals > 0 {
                format!(" | UNFINISHED terminals {}", self.unfinished_terminals)
            } else {
                String::new()
            }
        )?;
        write!(
            f,
            "latency ok (n={}) p50 {:.1}ms p90 {:.1}ms p99 {:.1}ms max {:.1}ms",
            self.latency_ok.count,
            ms(self.latency_ok.p50),
            ms(self.latency_ok.p90),
            ms(self.latency_ok.p99),
            ms(self.latency_ok.max)
        )?;
        for s in &self.mismatch_samples {
            write!(f, "\n  MISMATCH {s}")?;
        }
        for s in &self.error_samples {
            write!(f, "\n  error {s}")?;
        }
        Ok(())
    }
}

/// Per-terminal results, merged into the report.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    ok: u64,
    by_status: BTreeMap<u16, u64>,
    errors_connect: u64,
    errors_io: u64,
    errors_timeout: u64,
    mismatched: u64,
    retry_after_seen: u64,
    latencies_us: Vec<u64>,
    ok_ids: Vec<String>,
    mismatch_samples: Vec<String>,
    error_samples: Vec<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (s, n) in o.by_status {
            *self.by_status.entry(s).or_insert(0) += n;
        }
        self.errors_connect += o.errors_connect;
        self.errors_io += o.errors_io;
        self.errors_timeout += o.errors_timeout;
        self.mismatched += o.mismatched;
        self.retry_after_seen += o.retry_after_seen;
        self.latencies_us.extend(o.latencies_us);
        self.ok_ids.extend(o.ok_ids);
        for s in o.mismatch_samples {
            sample(&mut self.mismatch_samples, s);
        }
        for s in o.error_samples {
            sample(&mut self.error_samples, s);
        }
    }

    fn error(&mut self, id: &str, kind: &str, err: &io::Error) {
        sample(&mut self.error_samples, format!("{id}: {kind}: {err}"));
    }

    /// Classifies one response to transaction `id`.
    fn response(&mut self, id: &str, resp: &Response, latency: Duration, record_ids: bool) {
        *self.by_status.entry(resp.status).or_insert(0) += 1;
        if resp.status == 503 && resp.header("retry-after").is_some() {
            self.retry_after_seen += 1;
        }
        let wrong_id = match resp.txn_id() {
            Some(echoed) => echoed != id,
            None => resp.status == 200,
        };
        let wrong_body = resp.status == 200 && resp.body != format!("ok {id}\n").as_bytes();
        if wrong_id || wrong_body {
            self.mismatched += 1;
            let got = resp.txn_id().unwrap_or("-");
            sample(
                &mut self.mismatch_samples,
                format!(
                    "sent {id}: got {} {got} {:?}",
                    resp.status,
                    resp.text().chars().take(64).collect::<String>()
                ),
            );
        } else if resp.status == 200 {
            self.ok += 1;
            self.latencies_us
                .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            if record_ids {
                self.ok_ids.push(id.to_string());
            }
        }
    }
}

/// Appends to a bounded sample list.
fn sample(list: &mut Vec<String>, s: String) {
    if list.len() < MAX_SAMPLES {
        list.push(s);
    }
}

/// How one transaction ended.
enum Outcome {
    Response(Response),
    Connect(io::Error),
    Io(io::Error),
    Timeout,
}

/// Builds the request of transaction `id`.
fn build_request(cfg: &LoadConfig, version: u8, id: &str) -> Request {
    let path = format!("/pay?txn={id}");
    let mut req = match cfg.method {
        Method::Get => Request::get(path),
        Method::Post => Request::post(path, format!("amount=12.34&txn={id}")),
    }
    .version(version)
    .txn(id)
    .header("User-Agent", "sluice-terminals");
    for (name, value) in &cfg.extra_headers {
        req = req.header(name, value);
    }
    match (cfg.conn_mode, version) {
        (ConnMode::PerTransaction, 1) => req.header("Connection", "close"),
        (ConnMode::KeepAlive, 0) => req.header("Connection", "keep-alive"),
        _ => req,
    }
}

/// Runs one transaction, reusing or replacing the terminal's connection.
async fn transaction(
    cfg: &LoadConfig,
    version: u8,
    slot: &mut Option<Conn>,
    id: &str,
    deadline: Instant,
) -> Outcome {
    // Don't send on a kept connection the server has already closed.
    if slot.as_mut().is_some_and(|c| c.is_closed_now()) {
        *slot = None;
    }
    let mut conn = match slot.take() {
        Some(conn) => conn,
        None => {
            let left = deadline.saturating_duration_since(Instant::now());
            match Conn::connect_timeout(cfg.target, left).await {
                Ok(conn) => conn,
                Err(e) => return Outcome::Connect(e),
            }
        }
    };
    conn.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let req = build_request(cfg, version, id);
    match tokio::time::timeout_at(deadline, conn.send(&req)).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Outcome::Timeout,
        Ok(Err(e)) => Outcome::Io(e),
        Ok(Ok(resp)) => {
            if cfg.conn_mode == ConnMode::KeepAlive && !conn.peer_closing() {
                *slot = Some(conn);
            }
            Outcome::Response(resp)
        }
    }
}

/// Runs terminal `idx` until its limits are reached.
async fn terminal(idx: usize, cfg: Arc<LoadConfig>, t0: Instant) -> Tally {
    let mut tally = Tally::default();
    let version = match cfg.http {
        HttpMix::Http10 => 0,
        HttpMix::Http11 => 1,
        HttpMix::Mixed => u8::from(idx % 2 == 0),
    };
    let stop_at = cfg.duration.map(|d| t0 + d);
    let begin = t0 + cfg.start_offset(idx);
    tokio::time::sleep_until(begin).await;
    let interval = cfg.interval();
    let mut next_fire = begin;
    let mut conn: Option<Conn> = None;
    let max = cfg.transactions_per_terminal.unwrap_or(u64::MAX);
    // Bounded by `max` transactions or by `stop_at`.
    for seq in 0..max {
        if let Some(interval) = interval {
            if stop_at.is_some_and(|stop| next_fire >= stop) {
                break;
            }
            tokio::time::sleep_until(next_fire).await;
            next_fire += interval;
        }
        let started = Instant::now();
        if stop_at.is_some_and(|stop| started >= stop) {
            break;
        }
        let id = format!("t{idx}-{seq}");
        tally.sent += 1;
        match transaction(&cfg, version, &mut conn, &id, started + cfg.request_timeout).await {
            Outcome::Response(resp) => {
                tally.response(&id, &resp, started.elapsed(), cfg.record_ids);
            }
            Outcome::Connect(e) => {
                tally.errors_connect += 1;
                tally.error(&id, "connect", &e);
            }
            Outcome::Io(e) => {
                tally.errors_io += 1;
                tally.error(&id, "io", &e);
            }
            Outcome::Timeout => {
                tally.errors_timeout += 1;
                sample(&mut tally.error_samples, format!("{id}: timeout"));
            }
        }
        // Late: start the next one right away, without a catch-up burst.
        let now = Instant::now();
        if interval.is_some() && next_fire < now {
            next_fire = now;
        }
    }
    tally
}

/// Runs the load on the current tokio runtime (use a multi-thread runtime
/// for large runs) and reports.
///
/// # Panics
///
/// If the configuration is invalid (see [`LoadConfig::validate`]); use
/// [`try_run`] to get an error instead.
pub async fn run(cfg: LoadConfig) -> Report {
    match try_run(cfg).await {
        Ok(report) => report,
        Err(e) => panic!("invalid load configuration: {e}"),
    }
}

/// Like [`run`], but an invalid configuration is an `InvalidInput` error.
pub async fn try_run(cfg: LoadConfig) -> io::Result<Report> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    let t0 = Instant::now();
    let deadline = cfg.safety_deadline(t0);
    let mut tasks = JoinSet::new();
    for idx in 0..cfg.terminals {
        tasks.spawn(terminal(idx, Arc::clone(&cfg), t0));
    }
    let mut total = Tally::default();
    let mut unfinished = 0u64;
    // Bounded: one pass per terminal, and by the safety deadline.
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(tally))) => total.merge(tally),
            Ok(Some(Err(e))) => {
                unfinished += 1;
                sample(
                    &mut total.error_samples,
                    format!("terminal task failed: {e}"),
                );
            }
            Ok(None) => break,
            Err(_) => {
                unfinished += u64::try_from(tasks.len()).unwrap_or(u64::MAX);
                tasks.abort_all();
                break;
            }
        }
    }
    let elapsed = t0.elapsed();
    let latency_ok = Latency::from_micros(&mut total.latencies_us);
    let goodput = if elapsed.is_zero() {
        0.0
    } else {
        total.ok as f64 / elapsed.as_secs_f64()
    };
    Ok(Report {
        elapsed,
        sent: total.sent,
        ok: total.ok,
        by_status: total.by_status,
        errors_connect: total.errors_connect,
        errors_io: total.errors_io,
        errors_timeout: total.errors_timeout,
        mismatched: total.mismatched,
        retry_after_seen: total.retry_after_seen,
        latency_ok,
        goodput,
        ok_ids: total.ok_ids,
        mismatch_samples: total.mismatch_samples,
        error_samples: total.error_samples,
        unfinished_terminals: unfinished,
    })
}

/// Blocking [`run`]: runs on a new multi-thread runtime in a new thread, so it
/// can be called from anywhere, including inside another runtime.
///
/// # Panics
///
/// Like [`run`], on an invalid configuration; also if no thread or runtime
/// can be created. [`try_run_blocking`] returns errors instead.
pub fn run_blocking(cfg: LoadConfig) -> Report {
    match try_run_blocking(cfg) {
        Ok(report) => report,
        Err(e) => panic!("load generator failed to run: {e}"),
    }
}

/// Like [`run_blocking`], but returns errors instead of panicking.
pub fn try_run_blocking(cfg: LoadConfig) -> io::Result<Report> {
    let worker = std::thread::Builder::new()
        .name("terminals".to_string())
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(try_run(cfg))
        })?;
    worker
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("load generator thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::{Emulator, EmulatorConfig};

    fn emu_cfg() -> EmulatorConfig {
        EmulatorConfig {
            service_time: Duration::from_millis(2),
            ..EmulatorConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn keep_alive_closed_loop_is_all_ok() {
        let emu = Emulator::start(emu_cfg()).await.expect("start");
        let report = run(LoadConfig {
            terminals: 20,
            transactions_per_terminal: Some(10),
            method: Method::Post,
            record_ids: true,
            ..LoadConfig::new(emu.addr())
        })
        .await;
        assert_eq!(report.sent, 200, "{report}");
        assert_eq!(report.ok, report.sent, "{report}");
        assert_eq!(report.mismatched, 0);
        assert_eq!(report.errors(), 0);
        assert_eq!(report.status(200), 200);
        assert_eq!(report.latency_ok.count, 200);
        assert!(report.latency_ok.p50 <= report.latency_ok.max);
        let s = emu.stats();
        assert_eq!(s.accepted_connections, 20);
        assert!(s.max_inside <= 20);
        let mut seen = emu.transactions();
        let mut ok_ids = report.ok_ids.clone();
        seen.sort();
        ok_ids.sort();
        assert_eq!(seen, ok_ids);
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["ok"], 200);
        assert!(json["latency_ok"]["p99_ms"].is_number());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn per_transaction_mode_opens_one_connection_each() {
        let emu = Emulator::start(emu_cfg()).await.expect("start");
        let report = run(LoadConfig {
            terminals: 8,
            transactions_per_terminal: Some(5),
            conn_mode: ConnMode::PerTransaction,
            http: HttpMix::Mixed,
            start: StartMode::Ramp(Duration::from_millis(50)),
            ..LoadConfig::new(emu.addr())
        })
        .await;
        assert_eq!(report.sent, 40, "{report}");
        assert_eq!(report.ok, 40, "{report}");
        assert_eq!(report.mismatched, 0);
        let s = emu
            .wait_for(Duration::from_secs(5), |s| s.open_connections == 0)
            .await
            .expect("all closed");
        assert_eq!(s.accepted_connections, report.sent);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn http10_keep_alive_reuses_connections() {
        let emu = Emulator::start(emu_cfg()).await.expect("start");
        let report = run(LoadConfig {
            terminals: 4,
            transactions_per_terminal: Some(5),
            http: HttpMix::Http10,
            ..LoadConfig::new(emu.addr())
        })
        .await;
        assert_eq!(report.ok, 20, "{report}");
        assert_eq!(emu.stats().accepted_connections, 4);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_loop_offers_roughly_the_rate_for_the_duration() {
        let emu = Emulator::start(emu_cfg()).await.expect("start");
        let report = run(LoadConfig {
            terminals: 4,
            transactions_per_terminal: None,
            duration: Some(Duration::from_millis(500)),
            offered_rate: Some(100.0),
            ..LoadConfig::new(emu.addr())
        })
        .await;
        // 100/s for 0.5 s is 50; generous bounds.
        assert!((20..=80).contains(&report.sent), "{report}");
        assert_eq!(report.ok, report.sent, "{report}");
        assert!(report.elapsed < Duration::from_secs(3));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn detects_mismatches_errors_and_retry_after() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A broken "proxy" answering every request with the same foreign id,
        // then a 503 with Retry-After, then closing the connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let replies: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\nX-Txn-Id: someone-else\r\nContent-Length: 16\r\n\r\nok someone-else\n",
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
            ];
            for reply in replies {
                let _ = s.read(&mut buf).await.expect("read");
                s.write_all(reply).await.expect("write");
            }
            let _ = s.read(&mut buf).await;
            // Dropped: the third transaction sees a closed connection.
        });
        let report = run(LoadConfig {
            terminals: 1,
            transactions_per_terminal: Some(3),
            request_timeout: Duration::from_secs(2),
            ..LoadConfig::new(addr)
        })
        .await;
        server.await.expect("server");
        assert_eq!(report.sent, 3, "{report}");
        assert_eq!(report.ok, 0);
        assert_eq!(report.mismatched, 1, "{report}");
        assert_eq!(report.retry_after_seen, 1);
        assert_eq!(report.status(503), 1);
        assert_eq!(report.errors_io + report.errors_connect, 1, "{report}");
        assert_eq!(report.mismatch_samples.len(), 1);
        assert!(report.to_string().contains("MISMATCH"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn invalid_configs_are_rejected() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let no_limit = LoadConfig {
            transactions_per_terminal: None,
            duration: None,
            ..LoadConfig::new(addr)
        };
        assert!(try_run(no_limit).await.is_err());
        let no_terminals = LoadConfig {
            terminals: 0,
            ..LoadConfig::new(addr)
        };
        assert!(try_run(no_terminals).await.is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let l = Latency::from_micros(&mut v);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, Duration::from_micros(50));
        assert_eq!(l.p90, Duration::from_micros(90));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.max, Duration::from_micros(100));
        assert_eq!(Latency::from_micros(&mut []), Latency::default());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("per-transaction".parse(), Ok(ConnMode::PerTransaction));
        assert_eq!("1.0".parse(), Ok(HttpMix::Http10));
        assert_eq!("POST".parse(), Ok(Method::Post));
        assert!("x".parse::<Method>().is_err());
    }
}
