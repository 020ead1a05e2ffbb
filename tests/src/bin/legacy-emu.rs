//! `legacy-emu`: runs the legacy-server emulator as a process.
//!
//! Prints `listening on <addr>` as its first line on stdout (so a script can
//! read the port), serves until SIGINT or SIGTERM, then prints the final
//! stats as one line of JSON on stdout. While running, `GET /__emu/stats`
//! returns the stats and `POST /__emu/reset` resets them.
//!
//! **Outage** (`--outage-at`, `--outage-for`): at `outage-at` on the clock
//! the server stops like a crashed IIS (listener closed, every connection
//! dropped, requests inside lost), and `outage-for` later it listens again on
//! the same address, applying the cold start if one is configured. The clock
//! starts when the emulator starts, or with `--clock sigusr1` at the first
//! SIGUSR1 (so a script can start it together with its load, after warm-up).
//! Counters are kept across the outage (the library's `stop`/`restart` keep
//! them): totals and maxima cover the time since start or the last
//! `POST /__emu/reset`, across the restart. Note that a configured cold start
//! also applies at the first start.
//!
//! **Slowdown** (`--slowdown AT:FOR:FACTOR`, e.g. `10s:20s:2`): at `AT` on the same clock
//! the server gets `FACTOR` times slower for `FOR`, then recovers: by default its service
//! time is multiplied by `FACTOR` (`--slowdown-of service-time`), or its workers are divided
//! by it (`--slowdown-of workers`, rounded, at least 1; requests being served are never cut).
//! Either way its capacity is divided by `FACTOR`. Applies to requests that start service
//! from then on; the timeline records `slow` and `recovered` events.
//!
//! `--timeline FILE` records the stats every `--timeline-interval` from the
//! clock's start, plus the outage events, as JSON lines. `--transactions-out
//! FILE` writes, at exit, every transaction id that got inside since the last
//! reset, one per line in order of arrival, duplicates kept (the stats
//! endpoint only has counts), and a summary of duplicates to stderr.
//!
//! `--framing` (default `mixed`) frames answers by Content-Length, chunked,
//! close-delimited, or alternating the first two; a request's `X-Framing`
//! header overrides it. Like http.sys, it answers an HTTP/1.1 request without
//! `Host` with `400` and closes.
//!
//! The soft open-files limit is raised to the hard limit at start; raise the
//! hard limit (`ulimit -n`) beforehand for very many connections.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use sluice_tests::emulator::{AnswerFraming, ColdStart, Emulator, EmulatorConfig, EmulatorHandle};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

/// Attempts to listen again after an outage (the port is normally free at once).
const RESTART_ATTEMPTS: u32 = 50;
/// Pause between those attempts.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// What a `--slowdown` makes slower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SlowdownOf {
    /// Multiply the service time by the factor.
    ServiceTime,
    /// Divide the workers by the factor.
    Workers,
}

/// A `--slowdown AT:FOR:FACTOR`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slowdown {
    at: Duration,
    lasts: Duration,
    factor: f64,
}

/// Parses `AT:FOR:FACTOR`, e.g. `10s:20s:2`.
fn parse_slowdown(s: &str) -> Result<Slowdown, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [at, lasts, factor] = parts.as_slice() else {
        return Err(format!("{s:?}: expected AT:FOR:FACTOR, e.g. 10s:20s:2"));
    };
    let dur = |v: &str, what: &str| {
        humantime::parse_duration(v.trim()).map_err(|e| format!("{what} {v:?}: {e}"))
    };
    let factor: f64 = factor
        .trim()
        .parse()
        .map_err(|e| format!("FACTOR {factor:?}: {e}"))?;
    if !(factor.is_finite() && (0.01..=1000.0).contains(&factor)) {
        return Err(format!("FACTOR {factor}: between 0.01 and 1000"));
    }
    Ok(Slowdown {
        at: dur(at, "AT")?,
        lasts: dur(lasts, "FOR")?,
        factor,
    })
}

/// What starts the clock of `--outage-at` and `--timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Clock {
    /// The emulator's start.
    Start,
    /// The first SIGUSR1 the process receives.
    Sigusr1,
}

/// Emulates a fragile legacy HTTP server (fixed worker pool, lock-ups).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads: at most this many requests served at once.
    #[arg(long, default_value_t = 256)]
    workers: usize,
    /// Time a worker spends on each request.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    service_time: Duration,
    /// Lock up when more than this many requests are inside.
    #[arg(long)]
    lockup_above: Option<usize>,
    /// How long a lock-up lasts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lockup_duration: Duration,
    /// Idle keep-alive timeout per connection.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// Answer framing: length, chunked, close (close-delimited) or mixed (alternating length
    /// and chunked); a request's `X-Framing` header overrides it.
    #[arg(long, default_value = "mixed", value_parser = |s: &str| s.parse::<AnswerFraming>())]
    framing: AnswerFraming,
    /// Cold start: fraction of workers available at start and after an outage (0.0-1.0).
    #[arg(long, requires = "cold_start_duration")]
    cold_start_fraction: Option<f64>,
    /// Cold start: time to ramp up to all workers.
    #[arg(long, requires = "cold_start_fraction", value_parser = humantime::parse_duration)]
    cold_start_duration: Option<Duration>,
    /// Cold start: the lock-up threshold ramps with the workers (a cold server is fragile too).
    #[arg(long, requires = "cold_start_fraction")]
    cold_start_lockup_scales: bool,
    /// Status answered at `/` (IIS 6 on an ISAPI-only site answers 403 or 404 there); every
    /// other path answers 200. 200 makes `/` like any other path.
    #[arg(long, default_value_t = 403, value_parser = clap::value_parser!(u16).range(100..=599))]
    root_status: u16,
    /// Crash at this time on the clock: close the listener and drop every connection.
    #[arg(long, requires = "outage_for", value_parser = humantime::parse_duration)]
    outage_at: Option<Duration>,
    /// Stay down this long, then listen again on the same address (cold, if configured).
    #[arg(long, requires = "outage_at", value_parser = humantime::parse_duration)]
    outage_for: Option<Duration>,
    /// Slow down at AT on the clock for FOR by FACTOR (capacity / FACTOR), then recover:
    /// e.g. `10s:20s:2`.
    #[arg(long, value_parser = parse_slowdown)]
    slowdown: Option<Slowdown>,
    /// What --slowdown makes slower: the service time (multiplied) or the workers (divided).
    #[arg(
        long,
        value_enum,
        default_value = "service-time",
        requires = "slowdown"
    )]
    slowdown_of: SlowdownOf,
    /// What starts the clock of --outage-at, --slowdown and --timeline: the emulator's start,
    /// or the first SIGUSR1.
    #[arg(long, value_enum, default_value = "start")]
    clock: Clock,
    /// Write the stats every --timeline-interval, and the outage events, to this file as
    /// JSON lines (`t_ms` on the clock).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Sampling interval of --timeline.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    timeline_interval: Duration,
    /// At exit, write every transaction id that got inside since the last reset to this
    /// file, one per line, in order of arrival, duplicates kept.
    #[arg(long)]
    transactions_out: Option<PathBuf>,
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// The `--timeline` file: JSON lines, shared by the sampler and the outage.
#[derive(Clone)]
struct Timeline(Option<Arc<Mutex<BufWriter<File>>>>);

impl Timeline {
    fn open(path: Option<&Path>) -> std::io::Result<Timeline> {
        Ok(Timeline(match path {
            Some(p) => Some(Arc::new(Mutex::new(BufWriter::new(File::create(p)?)))),
            None => None,
        }))
    }

    /// Appends one line (best effort: a full disk must not stop the emulator).
    fn record(&self, line: &Value) {
        if let Some(w) = &self.0 {
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    }
}

/// Milliseconds since `t0`, rounded to 0.1 ms.
fn ms_since(t0: Instant) -> f64 {
    (t0.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
}

/// One timeline sample: the stats plus whether the server is listening.
fn sample(emu: &EmulatorHandle, t0: Instant) -> Value {
    let mut v = serde_json::to_value(emu.stats()).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("t_ms".into(), json!(ms_since(t0)));
        m.insert("running".into(), json!(emu.is_running()));
    }
    v
}

/// Logs an event to stderr and the timeline.
fn event(timeline: &Timeline, t0: Instant, name: &str, mut detail: Value, text: &str) {
    let t = ms_since(t0);
    eprintln!("legacy-emu: +{:.3}s {text}", t / 1000.0);
    if let Value::Object(m) = &mut detail {
        m.insert("t_ms".into(), json!(t));
        m.insert("event".into(), json!(name));
    }
    timeline.record(&detail);
}

/// Runs a `--slowdown` from `t0`: slower at `at`, back `lasts` later.
async fn slowdown(
    emu: EmulatorHandle,
    s: Slowdown,
    of: SlowdownOf,
    timeline: Timeline,
    t0: Instant,
) {
    tokio::time::sleep_until(t0 + s.at).await;
    let (service, workers) = (emu.service_time(), emu.workers());
    match of {
        SlowdownOf::ServiceTime => {
            let slow = service.mul_f64(s.factor);
            emu.set_service_time(slow);
            event(
                &timeline,
                t0,
                "slow",
                json!({ "service_time_ms": slow.as_secs_f64() * 1000.0, "workers": workers }),
                &format!(
                    "slowdown: service time {service:?} -> {slow:?} for {:?}",
                    s.lasts
                ),
            );
        }
        SlowdownOf::Workers => {
            // Rounded; at least one worker.
            let fewer = ((workers as f64 / s.factor).round() as usize).max(1);
            emu.set_workers(fewer);
            event(
                &timeline,
                t0,
                "slow",
                json!({ "service_time_ms": service.as_secs_f64() * 1000.0, "workers": fewer }),
                &format!("slowdown: workers {workers} -> {fewer} for {:?}", s.lasts),
            );
        }
    }
    tokio::time::sleep_until(t0 + s.at + s.lasts).await;
    emu.set_service_time(service);
    emu.set_workers(workers);
    event(
        &timeline,
        t0,
        "recovered",
        json!({ "service_time_ms": service.as_secs_f64() * 1000.0, "workers": workers }),
        &format!("slowdown over: service time {service:?}, workers {workers}"),
    );
}

/// What the clock drives.
struct Schedule {
    outage: Option<(Duration, Duration)>,
    slowdown: Option<(Slowdown, SlowdownOf)>,
    timeline: Timeline,
    interval: Duration,
}

/// Waits for the clock to start, then samples the timeline and runs the outage and the
/// slowdown.
async fn schedule(emu: EmulatorHandle, usr1: Option<Signal>, plan: Schedule) {
    let Schedule {
        outage,
        slowdown: slow,
        timeline,
        interval,
    } = plan;
    // Registered before the address was announced (see main), so no early signal is lost.
    if let Some(mut usr1) = usr1 {
        usr1.recv().await;
    }
    let t0 = Instant::now();
    let epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    event(
        &timeline,
        t0,
        "clock",
        json!({ "epoch_ms": epoch_ms }),
        "clock started",
    );
    if timeline.0.is_some() && !interval.is_zero() {
        let (emu, timeline) = (emu.clone(), timeline.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(t0, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Runs until the process exits.
            loop {
                tick.tick().await;
                timeline.record(&sample(&emu, t0));
            }
        });
    }
    if let Some((s, of)) = slow {
        tokio::spawn(slowdown(emu.clone(), s, of, timeline.clone(), t0));
    }
    let Some((at, down_for)) = outage else {
        return;
    };
    tokio::time::sleep_until(t0 + at).await;
    let before = emu.stats();
    emu.stop().await;
    event(
        &timeline,
        t0,
        "down",
        json!({ "inside_before": before.inside_now, "open_connections_before": before.open_connections }),
        &format!(
            "outage: listener closed, {} connections dropped with {} requests inside",
            before.open_connections, before.inside_now
        ),
    );
    tokio::time::sleep_until(t0 + at + down_for).await;
    for attempt in 1..=RESTART_ATTEMPTS {
        match emu.restart().await {
            Ok(()) => {
                let cold = emu.config().cold_start.map_or_else(
                    || "at full capacity".to_string(),
                    |c| {
                        format!(
                            "cold: {} of {} workers, ramping to all over {:?}",
                            emu.stats().workers_now,
                            emu.config().workers,
                            c.duration
                        )
                    },
                );
                event(
                    &timeline,
                    t0,
                    "up",
                    json!({ "workers_now": emu.stats().workers_now, "attempt": attempt }),
                    &format!("outage over: listening again on {}, {cold}", emu.addr()),
                );
                return;
            }
            Err(e) if attempt < RESTART_ATTEMPTS => {
                eprintln!("legacy-emu: restart attempt {attempt} failed: {e}; retrying");
                tokio::time::sleep(RESTART_BACKOFF).await;
            }
            Err(e) => event(
                &timeline,
                t0,
                "restart_failed",
                json!({ "error": e.to_string() }),
                &format!("outage: could not listen again: {e}; staying down"),
            ),
        }
    }
}

/// Writes the transaction ids and prints a summary of duplicates to stderr.
fn write_transactions(path: &Path, ids: &[String]) -> std::io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    let mut seen: HashMap<&str, u32> = HashMap::with_capacity(ids.len());
    for id in ids {
        writeln!(w, "{id}")?;
        *seen.entry(id.as_str()).or_insert(0) += 1;
    }
    w.flush()?;
    let dup_ids = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "legacy-emu: transactions: {} arrivals, {} distinct ids, {dup_ids} ids arrived more than once",
        ids.len(),
        seen.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Err(e) = sluice_tests::sys::raise_nofile_limit() {
        eprintln!("legacy-emu: could not raise the open-files limit: {e}");
    }
    let cold_start = match (args.cold_start_fraction, args.cold_start_duration) {
        (Some(initial_fraction), Some(duration)) => Some(ColdStart {
            initial_fraction,
            duration,
            lockup_scales: args.cold_start_lockup_scales,
        }),
        _ => None,
    };
    let cfg = EmulatorConfig {
        workers: args.workers,
        service_time: args.service_time,
        lockup_above: args.lockup_above,
        lockup_duration: args.lockup_duration,
        keepalive_timeout: args.keepalive_timeout,
        cold_start,
        framing: args.framing,
        root_status: args.root_status,
    };
    let timeline = Timeline::open(args.timeline.as_deref())?;
    let emu = Emulator::start_on(cfg, args.listen).await?;
    let outage = args.outage_at.zip(args.outage_for);
    let needs_schedule = outage.is_some() || args.slowdown.is_some() || args.timeline.is_some();
    // With --clock sigusr1, register the handler before announcing the address: a script
    // that signals right after reading it must not kill the process (SIGUSR1's default).
    let usr1 = if args.clock == Clock::Sigusr1 {
        Some(signal(SignalKind::user_defined1())?)
    } else {
        None
    };
    let scheduler = needs_schedule.then(|| {
        tokio::spawn(schedule(
            emu.handle(),
            usr1,
            Schedule {
                outage,
                slowdown: args.slowdown.map(|s| (s, args.slowdown_of)),
                timeline: timeline.clone(),
                interval: args.timeline_interval,
            },
        ))
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", emu.addr())?;
        out.flush()?;
    }
    shutdown_signal().await?;
    if let Some(task) = scheduler {
        task.abort();
    }
    emu.stop().await;
    let stats = emu.stats();
    if timeline.0.is_some() {
        let mut last = serde_json::to_value(&stats).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut last {
            m.insert("event".into(), json!("exit"));
        }
        timeline.record(&last);
    }
    if let Some(path) = &args.transactions_out {
        if let Err(e) = write_transactions(path, &emu.transactions()) {
            eprintln!("legacy-emu: could not write {}: {e}", path.display());
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&stats)?)?;
    out.flush()?;
    Ok(())
}
