//! `terminals`: runs the POS-terminal load generator as a process.
//!
//! Prints the report as human text on stderr, and as JSON on stdout with
//! `--json`. Exits non-zero on an invalid configuration. The soft open-files
//! limit is raised to the hard limit at start; for more terminals than the
//! hard limit allows, raise it first (`ulimit -n 65536`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, Method, StartMode};

/// Generates load from simulated POS terminals.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to send transactions to.
    #[arg(long)]
    target: SocketAddr,
    /// Number of terminals.
    #[arg(long, default_value_t = 100)]
    terminals: usize,
    /// Transactions per terminal.
    #[arg(long)]
    transactions: Option<u64>,
    /// Stop starting transactions after this long (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Connection mode: keep-alive | per-transaction.
    #[arg(long, default_value = "keep-alive")]
    conn_mode: ConnMode,
    /// HTTP version: 1.0 | 1.1 | mixed.
    #[arg(long, default_value = "1.1")]
    http: HttpMix,
    /// Spread terminal start times over this duration.
    #[arg(long, value_parser = humantime::parse_duration)]
    ramp: Option<Duration>,
    /// Total offered transactions per second (open loop); default closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Request method: get | post.
    #[arg(long, default_value = "get")]
    method: Method,
    /// Client-side timeout per transaction.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Extra header on every request, as `Name: value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Include the ids of successful transactions in the JSON.
    #[arg(long)]
    record_ids: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Parses `Name: value`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected `Name: value`, got {s:?}"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    match sluice_tests::sys::raise_nofile_limit() {
        Ok(limit) if (limit as u128) < args.terminals as u128 + 64 => eprintln!(
            "terminals: open-files limit {limit} is low for {} terminals; raise it with `ulimit -n`",
            args.terminals
        ),
        Ok(_) => {}
        Err(e) => eprintln!("terminals: could not raise the open-files limit: {e}"),
    }
    let cfg = LoadConfig {
        terminals: args.terminals,
        transactions_per_terminal: args.transactions,
        duration: args.duration,
        conn_mode: args.conn_mode,
        http: args.http,
        start: args.ramp.map_or(StartMode::AllAtOnce, StartMode::Ramp),
        offered_rate: args.rate,
        method: args.method,
        request_timeout: args.timeout,
        extra_headers: args.headers,
        record_ids: args.record_ids,
        ..LoadConfig::new(args.target)
    };
    let report = terminals::try_run(cfg).await?;
    eprintln!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
