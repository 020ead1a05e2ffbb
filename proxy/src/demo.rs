//! `sluice demo`: a surge of POS terminals against an emulated legacy server, first directly,
//! then through sluice, with the numbers side by side.
//!
//! The emulated server has 32 workers of 20 ms each (1,600 transactions/s) and locks up when
//! more than 64 requests are inside it at once, as IIS does when its thread pool runs dry. The
//! terminals all start at once, open one connection per transaction, and offer 1.5 times the
//! server's capacity.

use std::time::Duration;

use clap::Args;
use sluice_tests::emulator::{EmulatorConfig, EmulatorThread};
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, Report, StartMode};

use crate::config::{Config, Overrides};
use crate::run::{free_local_addr, RunningProxy};

/// What the demo backend is, for messages.
pub const DEMO_BACKEND_DESCRIPTION: &str =
    "32 workers x 20 ms, locks up for 3 s when more than 64 requests are inside";

/// `sluice demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of terminals, all starting at once.
    #[arg(long, default_value_t = 2000)]
    pub terminals: usize,
    /// Length of each phase, seconds.
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
    /// Offered load as a multiple of the backend's capacity.
    #[arg(long, default_value_t = 1.5)]
    pub load: f64,
    /// Skip the phase that hits the backend directly.
    #[arg(long)]
    pub skip_direct: bool,
}

/// The demo's legacy server: 32 workers × 20 ms, locking up for 3 s above 64 requests inside.
pub fn demo_backend_config() -> EmulatorConfig {
    EmulatorConfig {
        workers: 32,
        service_time: Duration::from_millis(20),
        lockup_above: Some(64),
        lockup_duration: Duration::from_secs(3),
        ..EmulatorConfig::default()
    }
}

/// Start the demo backend on its own thread and runtime.
pub fn start_demo_backend() -> std::io::Result<EmulatorThread> {
    EmulatorThread::start(demo_backend_config())
}

/// Run the demo and print what happened.
pub fn run(args: &DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    sluice_tests::raise_fd_limit();
    let backend = start_demo_backend()?;
    let capacity = 32.0 / 0.020;
    let offered = capacity * args.load;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load = |target| LoadConfig {
        target,
        terminals: args.terminals,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(args.seconds)),
        conn_mode: ConnMode::PerTransaction,
        http: HttpMix::Mixed,
        start: StartMode::AllAtOnce,
        offered_rate: Some(offered),
        request_timeout: Duration::from_secs(15),
        ..LoadConfig::default()
    };
    println!(
        "sluice demo: an emulated legacy server ({DEMO_BACKEND_DESCRIPTION}; capacity {capacity:.0} tx/s)\n\
         {} terminals start at once, one connection per transaction, offering {offered:.0} tx/s for {} s.\n",
        args.terminals, args.seconds
    );

    let mut rows = Vec::new();
    if !args.skip_direct {
        println!("phase 1: terminals hit the server directly ...");
        backend.reset_stats();
        let report = rt.block_on(terminals::run(load(backend.addr())));
        rows.push(("direct", report, backend.stats()));
        // Let the server recover from any lock-up before the next phase.
        wait_idle(&backend);
    }

    println!(
        "phase 2: terminals go through sluice (max_inflight 32, queue 4000, 10 s deadline) ..."
    );
    let o = Overrides {
        listen: Some(free_local_addr()?.to_string()),
        backend: Some(backend.addr().to_string()),
        max_inflight: Some(32),
        max_queue: Some(4000),
        queue_timeout: Some(Duration::from_secs(10)),
        threads: Some(2),
        // The demo compares steady admission; `sluice run` shows the ramp.
        slow_start: Some(Duration::ZERO),
        admin_listen: Some(String::new()),
        ..Overrides::default()
    };
    // The demo prints its own summary; no access log lines.
    let cfg = Config::parse("[log]\naccess = \"off\"\n", None, &o)?;
    let proxy = RunningProxy::start(&cfg)?;
    backend.reset_stats();
    let report = rt.block_on(terminals::run(load(proxy.addr())));
    rows.push(("sluice", report, backend.stats()));
    proxy.stop();

    println!();
    println!(
        "{:<8} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "path", "ok", "goodput", "errors", "503s", "backend", "backend", "lockups", "p99"
    );
    println!(
        "{:<8} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "", "", "tx/s", "", "", "max conc", "conns", "", "ms"
    );
    for (name, r, s) in &rows {
        println!(
            "{:<8} {:>9} {:>9.0} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8.0}",
            name,
            r.ok,
            r.goodput,
            errors(r),
            r.by_status.get(&503).copied().unwrap_or(0),
            s.max_inside,
            s.accepted_connections,
            s.lockups,
            r.latency_ok.p99.as_secs_f64() * 1000.0
        );
    }
    println!(
        "\nThrough sluice the server never has more than 32 requests inside, never locks up, and \
         sees a handful of pooled connections instead of one per transaction."
    );
    Ok(())
}

fn errors(r: &Report) -> u64 {
    r.errors_connect + r.errors_io + r.errors_timeout + r.mismatched
}

/// Wait (bounded) until the backend has nothing inside, e.g. after a lock-up.
fn wait_idle(backend: &EmulatorThread) {
    for _ in 0..2000 {
        if backend.inside_now() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
