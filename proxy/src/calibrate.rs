//! `sluice calibrate`: measure how much concurrent work a live backend takes, and propose
//! `admission.max_inflight` from the measurement instead of a guess.
//!
//! calibrate sends one request, over and over, from a number of concurrent workers, each on its
//! own kept-alive connection. It holds each concurrency for a *step* (a warm-up that is not
//! counted, then `--step-time` measured), records throughput and latency percentiles, and asks
//! [`sluice_plugins::calibrate::Calibration`] for the next step: 1, 2, 4, 8, then +25 % per step,
//! until throughput stops rising, p99 passes its bound, errors appear, or `--max` is reached;
//! then a few steps below the knee narrow it down. That module's docs hold the whole rule.
//!
//! Safety: never more than `--max` requests in flight and never more than `--max` connections
//! open (connections are reused across steps; a worker's connection is replaced only after it
//! closed). Every request is bounded by `--timeout`. Any 5xx, reset, timeout or refused
//! connection is an error: the step ends at once and calibrate sends nothing more. Ctrl-C
//! stops it after the requests in flight have finished, and prints the steps measured so far
//! (a second Ctrl-C exits at once).
//!
//! Exit status: 0 with a proposal, 2 for a usage error (bad option, or a `--path` that the
//! backend answers with a 4xx), 1 when the backend cannot be measured, 130 when interrupted.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_plugins::calibrate::{percentile, Calibration, Proposal, Step};
use sluice_tests::client::{Conn, Request};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{CalibrateArgs, Method, EXIT_CONFIG, EXIT_RUNTIME};
use crate::config::ConfigError;

/// Exit status after Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;
/// Highest `--max` accepted.
pub const MAX_CONCURRENCY: u32 = 4096;
/// Most steps in one calibration (the schedule ends long before).
const MAX_STEPS: usize = 100;
/// Most requests one worker sends in one step (time bounds it long before).
const MAX_REQUESTS_PER_WORKER_STEP: u64 = 10_000_000;

/// A validated calibration: what to send where, and how long to hold each step.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The backend's address.
    pub backend: SocketAddr,
    /// The request sent over and over.
    pub request: Request,
    /// Highest concurrency.
    pub max: u32,
    /// Measured part of each step.
    pub step_time: Duration,
    /// Unmeasured start of each step.
    pub warmup: Duration,
    /// p99 bound, if given.
    pub p99_bound: Option<Duration>,
    /// Bound on each request.
    pub timeout: Duration,
    /// Where to write the CSV and SVG.
    pub out: Option<PathBuf>,
    /// "GET /x on host:port", for titles.
    pub label: String,
}

impl Plan {
    /// A plan with the defaults of the command line for `path` on `backend`.
    pub fn new(backend: SocketAddr, path: &str) -> Plan {
        Plan {
            backend,
            request: Request::get(path).header("Host", backend.to_string()),
            max: 64,
            step_time: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            p99_bound: None,
            timeout: Duration::from_secs(10),
            out: None,
            label: format!("GET {path} on {backend}"),
        }
    }
}

fn usage(key: &str, value: impl std::fmt::Display, fix: impl Into<String>) -> ConfigError {
    ConfigError::new(key, value, fix)
}

impl CalibrateArgs {
    /// Validates the options into a [`Plan`]; the error names the option, its value and the
    /// fix.
    pub fn plan(&self) -> Result<Plan, ConfigError> {
        let backend = match self.backend.to_socket_addrs() {
            Ok(mut addrs) => addrs.next().ok_or_else(|| {
                usage(
                    "--backend",
                    format!("{:?}", self.backend),
                    "resolves to no address; use an IP:port",
                )
            })?,
            Err(e) => {
                return Err(usage(
                    "--backend",
                    format!("{:?}", self.backend),
                    format!("not a usable host:port ({e}); write it like \"10.0.0.5:80\""),
                ))
            }
        };
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(usage(
                "--path",
                format!("{:?}", self.path),
                "must be an origin-form URL starting with / and without spaces, e.g. /pos/balance.dll?check=1",
            ));
        }
        if self.max == 0 || self.max > MAX_CONCURRENCY {
            return Err(usage(
                "--max",
                self.max,
                format!(
                    "must be between 1 and {MAX_CONCURRENCY}: the highest number of concurrent \
                     requests calibrate may send; give one the server is known to survive, e.g. 64"
                ),
            ));
        }
        if self.step_time.is_zero() {
            return Err(usage(
                "--step-time",
                "0s",
                "must be longer than zero, e.g. 4s",
            ));
        }
        if self.timeout.is_zero() {
            return Err(usage(
                "--timeout",
                "0s",
                "must be longer than zero, e.g. 10s",
            ));
        }
        if self.p99_bound.is_some_and(|b| b.is_zero()) {
            return Err(usage(
                "--p99-bound",
                "0s",
                "must be longer than zero, e.g. 500ms (or leave it out: 5 × the p99 at concurrency 1)",
            ));
        }
        let host = self.host.clone().unwrap_or_else(|| self.backend.clone());
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(usage(
                "--host",
                format!("{host:?}"),
                "must be a host name without spaces, e.g. pos.example.local",
            ));
        }
        let method = match self.method {
            Method::Get => "GET",
            Method::Post => "POST",
        };
        let mut request = Request::new(method, self.path.clone()).header("Host", host);
        if let Some(file) = &self.body_file {
            if self.method == Method::Get {
                return Err(usage(
                    "--body-file",
                    file.display(),
                    "a body needs --method POST",
                ));
            }
            let body = std::fs::read(file).map_err(|e| {
                usage(
                    "--body-file",
                    file.display(),
                    format!("cannot be read ({e})"),
                )
            })?;
            request = request.body(body);
        }
        Ok(Plan {
            backend,
            request,
            max: self.max,
            step_time: self.step_time,
            warmup: self.warmup,
            p99_bound: self.p99_bound,
            timeout: self.timeout,
            out: self.out.clone(),
            label: format!("{method} {} on {}", self.path, self.backend),
        })
    }
}

/// Why a calibration could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// The request is wrong for this backend (exit 2).
    #[error("{0}")]
    Usage(ConfigError),
    /// The backend could not be measured (exit 1).
    #[error("{0}")]
    Backend(String),
}

/// What one worker saw during one step.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// One worker: sends the request back to back on its connection until `end`, an error, or a
/// stop. Returns its connection (if still usable) and what it saw.
async fn worker(
    mut conn: Option<Conn>,
    plan: Arc<Plan>,
    window: Instant,
    end: Instant,
    trouble: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) -> (Option<Conn>, Tally) {
    let mut tally = Tally::default();
    for _ in 0..MAX_REQUESTS_PER_WORKER_STEP {
        if Instant::now() >= end || *stop.borrow() || trouble.load(Ordering::Relaxed) {
            break;
        }
        // The old connection is dropped (closed) before a new one opens: never more than one
        // connection per worker.
        let reusable = conn
            .take()
            .and_then(|mut c| (!c.is_closed_now()).then_some(c));
        let mut c = match reusable {
            Some(c) => c,
            None => match Conn::connect_timeout(plan.backend, plan.timeout).await {
                Ok(c) => c,
                Err(e) => {
                    tally.error(format!("connect: {e}"));
                    trouble.store(true, Ordering::Relaxed);
                    break;
                }
            },
        };
        let started = Instant::now();
        match c.send(&plan.request).await {
            Ok(resp) => {
                let done = Instant::now();
                if !c.peer_closing() {
                    conn = Some(c);
                }
                if resp.status >= 500 {
                    tally.error(format!("answered {}", resp.status));
                    trouble.store(true, Ordering::Relaxed);
                    break;
                }
                if done >= window && done <= end {
                    tally.latencies.push(done - started);
                }
            }
            Err(e) => {
                tally.error(e.to_string());
                trouble.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    (conn, tally)
}

/// Holds `c` concurrent requests for one step. Returns the step and, if errors, the first
/// error seen.
async fn run_step(
    plan: &Arc<Plan>,
    pool: &mut [Option<Conn>],
    c: u32,
    stop: &watch::Receiver<bool>,
) -> (Step, Option<String>) {
    let start = Instant::now();
    let window = start + plan.warmup;
    let end = window + plan.step_time;
    let trouble = Arc::new(AtomicBool::new(false));
    let mut set = JoinSet::new();
    for (i, slot) in pool.iter_mut().enumerate().take(c as usize) {
        let conn = slot.take();
        let fut = worker(
            conn,
            plan.clone(),
            window,
            end,
            trouble.clone(),
            stop.clone(),
        );
        set.spawn(async move { (i, fut.await) });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, (conn, tally))) => {
                if let Some(slot) = pool.get_mut(i) {
                    *slot = conn;
                }
                latencies.extend(tally.latencies);
                errors += tally.errors;
                if first_error.is_none() {
                    first_error = tally.first_error;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    latencies.sort_unstable();
    let step = Step {
        concurrency: c,
        completed: latencies.len() as u64,
        throughput: latencies.len() as f64 / plan.step_time.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p90: percentile(&latencies, 0.90),
        p99: percentile(&latencies, 0.99),
        errors,
    };
    (step, first_error)
}

/// The outcome of [`calibrate`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The steps, the stop reason and the proposal.
    pub calibration: Calibration,
    /// Stopped by the operator.
    pub interrupted: bool,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

/// Runs a calibration on the current tokio runtime. `on_step` is called after each step;
/// setting `stop` to true ends it after the requests in flight (the step under way is
/// discarded).
pub async fn calibrate(
    plan: Plan,
    stop: watch::Receiver<bool>,
    mut on_step: impl FnMut(&Step),
) -> Result<Outcome, CalibrateError> {
    let plan = Arc::new(plan);
    let mut pool: Vec<Option<Conn>> = (0..plan.max).map(|_| None).collect();
    // One request first: is this URL worth measuring at all?
    let mut conn = Conn::connect_timeout(plan.backend, plan.timeout)
        .await
        .map_err(|e| CalibrateError::Backend(format!("cannot connect to {}: {e}", plan.backend)))?;
    let resp = conn.send(&plan.request).await.map_err(|e| {
        CalibrateError::Backend(format!(
            "no answer from {} to {}: {e}",
            plan.backend, plan.label
        ))
    })?;
    if resp.status >= 500 {
        return Err(CalibrateError::Backend(format!(
            "{} answered {} before any load: the server is not healthy; calibrate when it answers",
            plan.backend, resp.status
        )));
    }
    if resp.status >= 400 {
        return Err(CalibrateError::Usage(usage(
            "--path",
            format!("{:?}", plan.request.path),
            format!(
                "the backend answered {} to it: an error page measures nothing; give a URL the \
                 application serves (the terminals' usual request), and --host if the site is \
                 bound to a host name",
                resp.status
            ),
        )));
    }
    if !conn.peer_closing() {
        if let Some(slot) = pool.first_mut() {
            *slot = Some(conn);
        }
    }

    let mut cal = Calibration::new(plan.max, plan.p99_bound);
    let mut interrupted = false;
    let mut first_error = None;
    for _ in 0..MAX_STEPS {
        let Some(c) = cal.next_concurrency() else {
            break;
        };
        if *stop.borrow() {
            break;
        }
        let c = c.min(plan.max);
        let (step, err) = run_step(&plan, &mut pool, c, &stop).await;
        if *stop.borrow() {
            break;
        }
        if first_error.is_none() {
            first_error = err;
        }
        on_step(&step);
        cal.record(step);
    }
    if *stop.borrow() {
        interrupted = true;
        cal.interrupt();
    }
    Ok(Outcome {
        calibration: cal,
        interrupted,
        first_error,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One table row.
fn row(s: &Step, mark: &str) -> String {
    format!(
        "{:>11} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>7}  {mark}",
        s.concurrency,
        s.throughput,
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        s.errors
    )
    .trim_end()
    .to_string()
}

/// The table header.
pub const TABLE_HEADER: &str = "concurrency     req/s   p50 ms   p90 ms   p99 ms  errors";

/// The steps sorted by concurrency (a refined step between two ramp steps).
fn sorted_steps(cal: &Calibration) -> Vec<&Step> {
    let mut steps: Vec<&Step> = cal.steps().iter().collect();
    steps.sort_by_key(|s| s.concurrency);
    steps
}

/// The full report: table, why it stopped, the proposal.
pub fn report(plan: &Plan, out: &Outcome) -> String {
    let cal = &out.calibration;
    let proposal = cal.proposal();
    let mut s = String::new();
    let _ = writeln!(s, "{TABLE_HEADER}");
    for step in sorted_steps(cal) {
        let mark = match &proposal {
            Some(p) if p.max_inflight == step.concurrency && p.knee == step.concurrency => {
                "<- knee, proposed"
            }
            Some(p) if p.max_inflight == step.concurrency => "<- proposed",
            Some(p) if p.knee == step.concurrency => "<- knee",
            _ => "",
        };
        let _ = writeln!(s, "{}", row(step, mark));
    }
    let _ = writeln!(s);
    if let Some(b) = cal.p99_bound() {
        let how = if plan.p99_bound.is_some() {
            "--p99-bound"
        } else {
            "5 × p99 at concurrency 1, at least 25 ms"
        };
        let _ = writeln!(s, "p99 bound: {:.1} ms ({how})", ms(b));
    }
    if let Some(r) = cal.stop_reason() {
        let _ = writeln!(s, "stopped:   {r}");
    }
    if let Some(e) = &out.first_error {
        let _ = writeln!(s, "first error: {e}");
    }
    match &proposal {
        Some(p) => {
            let _ = writeln!(
                s,
                "proposal:  admission.max_inflight = {}{}",
                p.max_inflight,
                if out.interrupted {
                    " (from an interrupted calibration: run it again to the end)"
                } else {
                    ""
                }
            );
            let _ = writeln!(s, "           {}", p.rationale());
        }
        None => {
            let _ = writeln!(s, "proposal:  none: no step completed without errors");
        }
    }
    s
}

/// The table as CSV.
pub fn csv(cal: &Calibration) -> String {
    let mut s = String::from("concurrency,requests_per_s,p50_ms,p90_ms,p99_ms,errors,completed\n");
    for st in sorted_steps(cal) {
        let _ = writeln!(
            s,
            "{},{:.1},{:.2},{:.2},{:.2},{},{}",
            st.concurrency,
            st.throughput,
            ms(st.p50),
            ms(st.p90),
            ms(st.p99),
            st.errors,
            st.completed
        );
    }
    s
}

/// A round axis maximum and tick step for values up to `v` (1, 2, 5 × 10^k steps, ~5 ticks).
fn nice_axis(v: f64) -> (f64, f64) {
    let v = if v.is_finite() && v > 0.0 { v } else { 1.0 };
    let raw = v / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((v / step).ceil() * step, step)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A hand-written SVG plot: throughput (left axis) and p99 latency (right axis) against
/// concurrency, steps with errors marked, the p99 bound and the proposal drawn in.
pub fn svg(cal: &Calibration, title: &str) -> String {
    const W: f64 = 800.0;
    const H: f64 = 480.0;
    const L: f64 = 80.0;
    const R: f64 = 720.0;
    const T: f64 = 70.0;
    const B: f64 = 390.0;
    const BLUE: &str = "#1f5fbf";
    const ORANGE: &str = "#d9730d";
    const GREEN: &str = "#2a8c3a";
    let steps = sorted_steps(cal);
    let proposal = cal.proposal();
    let max_c = steps.iter().map(|s| s.concurrency).max().unwrap_or(1);
    let (xmax, xstep) = nice_axis(f64::from(max_c));
    let best = steps.iter().map(|s| s.throughput).fold(0.0, f64::max);
    let (ymax, ystep) = nice_axis(best * 1.1);
    let top_p99 = steps.iter().map(|s| ms(s.p99)).fold(0.0, f64::max);
    let bound = cal.p99_bound().map(ms);
    let shown_bound = bound.filter(|b| *b <= top_p99 * 2.0);
    let (pmax, pstep) = nice_axis(top_p99.max(shown_bound.unwrap_or(0.0)) * 1.1);
    let x = |c: f64| L + (R - L) * c / xmax;
    let y = |v: f64| B - (B - T) * v / ymax;
    let yp = |v: f64| B - (B - T) * v / pmax;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">sluice calibrate: {}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    // Grid and axes.
    let mut t = 0.0;
    for _ in 0..=20 {
        if t > xmax + 1e-9 {
            break;
        }
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{T}" x2="{0:.1}" y2="{B}" stroke="#e6e6e6"/><text x="{0:.1}" y="{1}" text-anchor="middle">{2}</text>"##,
            x(t),
            B + 18.0,
            t
        );
        t += xstep;
    }
    let mut t = 0.0;
    for _ in 0..=20 {
        if t > ymax + 1e-9 {
            break;
        }
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{0:.1}" x2="{R}" y2="{0:.1}" stroke="#e6e6e6"/><text x="{1}" y="{2:.1}" text-anchor="end" fill="{BLUE}">{3}</text>"##,
            y(t),
            L - 6.0,
            y(t) + 4.0,
            t
        );
        t += ystep;
    }
    let mut t = 0.0;
    for _ in 0..=20 {
        if t > pmax + 1e-9 {
            break;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" fill="{ORANGE}">{}</text>"#,
            R + 6.0,
            yp(t) + 4.0,
            t
        );
        t += pstep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        R - L,
        B - T
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">concurrent requests</text>"#,
        (L + R) / 2.0,
        B + 40.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle" fill="{BLUE}">throughput (req/s)</text>"#,
        (T + B) / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({} {}) rotate(90)" text-anchor="middle" fill="{ORANGE}">p99 latency (ms)</text>"#,
        W - 18.0,
        (T + B) / 2.0
    );
    // The p99 bound.
    if let Some(b) = shown_bound {
        let _ = writeln!(
            s,
            r#"<line x1="{L}" y1="{0:.1}" x2="{R}" y2="{0:.1}" stroke="{ORANGE}" stroke-dasharray="3 4"/><text x="{1}" y="{2:.1}" text-anchor="end" fill="{ORANGE}">p99 bound {3:.0} ms</text>"#,
            yp(b),
            R - 6.0,
            yp(b) - 5.0,
            b
        );
    }
    // The proposal.
    if let Some(p) = &proposal {
        let px = x(f64::from(p.max_inflight));
        let _ = writeln!(
            s,
            r#"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{B}" stroke="{GREEN}" stroke-width="2" stroke-dasharray="8 5"/><text x="{:.1}" y="{}" fill="{GREEN}" font-weight="bold" text-anchor="{}">proposed max_inflight = {}</text>"#,
            if px > (L + R) / 2.0 {
                px - 6.0
            } else {
                px + 6.0
            },
            T + 16.0,
            if px > (L + R) / 2.0 { "end" } else { "start" },
            p.max_inflight
        );
    }
    // The curves.
    let tput: Vec<String> = steps
        .iter()
        .map(|st| {
            format!(
                "{:.1},{:.1}",
                x(f64::from(st.concurrency)),
                y(st.throughput)
            )
        })
        .collect();
    let lat: Vec<String> = steps
        .iter()
        .map(|st| format!("{:.1},{:.1}", x(f64::from(st.concurrency)), yp(ms(st.p99))))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{BLUE}" stroke-width="2.5"/>"#,
        tput.join(" ")
    );
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{ORANGE}" stroke-width="2"/>"#,
        lat.join(" ")
    );
    for st in &steps {
        let cx = x(f64::from(st.concurrency));
        let _ = writeln!(
            s,
            r#"<circle cx="{cx:.1}" cy="{:.1}" r="4" fill="{BLUE}"/><rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{ORANGE}"/>"#,
            y(st.throughput),
            cx - 3.5,
            yp(ms(st.p99)) - 3.5
        );
        if st.errors > 0 {
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#c00" font-weight="bold">✕ {} err</text>"##,
                B - 8.0,
                st.errors
            );
        }
    }
    // Legend.
    let _ = writeln!(
        s,
        r#"<g transform="translate({} {})"><line x1="0" y1="0" x2="24" y2="0" stroke="{BLUE}" stroke-width="2.5"/><circle cx="12" cy="0" r="4" fill="{BLUE}"/><text x="30" y="4">throughput</text><line x1="120" y1="0" x2="144" y2="0" stroke="{ORANGE}" stroke-width="2"/><rect x="128.5" y="-3.5" width="7" height="7" fill="{ORANGE}"/><text x="150" y="4">p99 latency</text></g>"#,
        L + 10.0,
        T - 16.0
    );
    if let Some(p) = &proposal {
        let _ = writeln!(
            s,
            r#"<text x="{L}" y="{}" font-size="12">knee {}: 95 % of the best throughput ({:.0} req/s); seen clean up to {}</text>"#,
            H - 30.0,
            p.knee,
            p.best_throughput,
            p.highest_clean,
        );
    }
    if let Some(r) = cal.stop_reason() {
        let _ = writeln!(
            s,
            r#"<text x="{L}" y="{}" font-size="12">stopped: {}</text>"#,
            H - 12.0,
            xml_escape(&r.to_string())
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn write_out(dir: &std::path::Path, plan: &Plan, cal: &Calibration) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("calibrate.csv"), csv(cal))?;
    std::fs::write(dir.join("calibrate.svg"), svg(cal, &plan.label))?;
    Ok(())
}

/// The proposal of a finished calibration, if any (convenience for callers).
pub fn proposal(out: &Outcome) -> Option<Proposal> {
    out.calibration.proposal()
}

/// `sluice calibrate` from the command line: validate, run, print, write the files.
pub fn main(args: &CalibrateArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sluice: calibrate: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: calibrate: cannot start a runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME as u8);
        }
    };
    eprintln!(
        "sluice calibrate: {}, up to {} concurrent requests, {} per step after a {} warm-up; \
         Ctrl-C stops it with the steps measured so far.",
        plan.label,
        plan.max,
        humantime::format_duration(plan.step_time),
        humantime::format_duration(plan.warmup),
    );
    let (tx, rx) = watch::channel(false);
    let outcome = rt.block_on(async {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nsluice calibrate: stopping after the requests in flight (Ctrl-C again to quit now)");
                let _ = tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(i32::from(EXIT_INTERRUPTED));
                }
            }
        });
        let mut first = true;
        calibrate(plan.clone(), rx, |step| {
            if std::mem::take(&mut first) {
                eprintln!("{TABLE_HEADER}");
            }
            eprintln!("{}", row(step, ""));
        })
        .await
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(CalibrateError::Usage(e)) => {
            eprintln!("sluice: calibrate: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        Err(CalibrateError::Backend(e)) => {
            eprintln!("sluice: calibrate: {e}");
            return ExitCode::from(EXIT_RUNTIME as u8);
        }
    };
    eprintln!();
    print!("{}", report(&plan, &outcome));
    if let Some(dir) = &plan.out {
        match write_out(dir, &plan, &outcome.calibration) {
            Ok(()) => println!(
                "wrote {} and {}",
                dir.join("calibrate.csv").display(),
                dir.join("calibrate.svg").display()
            ),
            Err(e) => {
                eprintln!(
                    "sluice: calibrate: cannot write into {}: {e}",
                    dir.display()
                );
                return ExitCode::from(EXIT_RUNTIME as u8);
            }
        }
    }
    // Leave no task behind: the signal task is detached with the runtime.
    rt.shutdown_background();
    if outcome.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if outcome.calibration.proposal().is_none() {
        ExitCode::from(EXIT_RUNTIME as u8)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Plan, ConfigError> {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: CalibrateArgs,
        }
        let mut argv = vec!["t", "--backend", "127.0.0.1:8080", "--path", "/pay"];
        argv.extend_from_slice(extra);
        let t = <T as clap::Parser>::try_parse_from(argv).expect("parses");
        t.a.plan()
    }

    #[test]
    fn plan_builds_the_request_with_host() {
        let p = args(&[]).expect("valid");
        assert_eq!(p.request.method, "GET");
        assert_eq!(p.request.header_value("host"), Some("127.0.0.1:8080"));
        let p = args(&["--host", "pos.local"]).expect("valid");
        assert_eq!(p.request.header_value("host"), Some("pos.local"));
        assert_eq!(p.max, 64);
    }

    #[test]
    fn plan_refuses_bad_values_naming_the_option() {
        for (extra, key) in [
            (&["--max", "0"][..], "--max"),
            (&["--max", "5000"][..], "--max"),
            (&["--step-time", "0s"][..], "--step-time"),
            (&["--timeout", "0s"][..], "--timeout"),
            (&["--host", "a b"][..], "--host"),
            (&["--body-file", "/nonexistent"][..], "--body-file"),
        ] {
            let e = args(extra).expect_err("invalid");
            assert_eq!(e.key, key, "{extra:?}: {e}");
        }
    }

    #[test]
    fn nice_axis_is_round_and_covers_the_value() {
        assert_eq!(nice_axis(1760.0), (2000.0, 500.0));
        assert_eq!(nice_axis(40.0), (40.0, 10.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        let (m, s) = nice_axis(33.3);
        assert!(m >= 33.3 && s > 0.0);
    }

    #[test]
    fn svg_marks_the_proposal_and_escapes_the_title() {
        let mut cal = Calibration::new(8, None);
        for (c, t) in [(1, 50.0), (2, 100.0), (4, 110.0), (8, 110.0)] {
            cal.record(Step {
                concurrency: c,
                completed: 100,
                throughput: t,
                p50: Duration::from_millis(20),
                p90: Duration::from_millis(21),
                p99: Duration::from_millis(22),
                errors: 0,
            });
        }
        let svg = svg(&cal, "GET /a?x=1&y=<2>");
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("proposed max_inflight = 4"), "{svg}");
        assert!(svg.contains("&amp;y=&lt;2&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        let csv = csv(&cal);
        assert_eq!(csv.lines().count(), 5);
        assert!(csv.lines().nth(3).expect("row").starts_with("4,110.0,"));
    }
}
