//! `legacy-emu`: runs the legacy-server emulator as a process.
//!
//! Prints `listening on <addr>` as its first line on stdout (so a script can
//! read the port), serves until SIGINT or SIGTERM, then prints the final
//! stats as one line of JSON on stdout. While running, `GET /__emu/stats`
//! returns the stats and `POST /__emu/reset` resets them.
//!
//! The soft open-files limit is raised to the hard limit at start; raise the
//! hard limit (`ulimit -n`) beforehand for very many connections.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sluice_tests::emulator::{ColdStart, Emulator, EmulatorConfig};

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
    /// Cold start: fraction of workers available at start (0.0-1.0).
    #[arg(long, requires = "cold_start_duration")]
    cold_start_fraction: Option<f64>,
    /// Cold start: time to ramp up to all workers.
    #[arg(long, requires = "cold_start_fraction", value_parser = humantime::parse_duration)]
    cold_start_duration: Option<Duration>,
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
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
    };
    let emu = Emulator::start_on(cfg, args.listen).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", emu.addr())?;
        out.flush()?;
    }
    shutdown_signal().await?;
    emu.stop().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&emu.stats())?)?;
    out.flush()?;
    Ok(())
}
