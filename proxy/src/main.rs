//! The `sluice` binary: parse the command line, load and validate the config, run.

use std::process::ExitCode;

use clap::Parser;
use sluice::cli::{self, Cli, Command, EXIT_CONFIG, EXIT_RUNTIME};
use sluice::config::{Config, LoadError, Overrides};

// The allocator is measured, not assumed. 2026-12-02, same runs, mimalloc against the system
// allocator (tests/bench/results/allocator.md): 1.11 x the requests/s and 0.86 x the CPU per
// request (throughput.py, 6 runs; 1.05 x and 0.91 x in an earlier run); 2,000 idle client connections in a fresh process 0.97 KiB
// each against 1.33-1.38 (run.sh's memory step, 2 runs); ~16 MiB more RSS at start. So
// mimalloc is the default; `--no-default-features` builds with the system allocator. (On
// 2026-11-24, before the connection loop parked idle connections, the system allocator was
// the faster one: 29,960-31,363 req/s against 29,051-29,843.)
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG as u8),
            };
        }
    };
    sluice::observe::logging::init();
    match cli.command {
        Command::Check(args) => match args.config.load() {
            Ok(cfg) => {
                print!("{}", cli::describe(&cfg));
                println!("\nconfig OK");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run(args) => run(args),
        Command::Status(args) => status(&args),
        Command::Reload(args) => admin_post(&args, "/reload"),
        Command::Backend(args) => admin_post(&args.admin, &args.action.path()),
        Command::Calibrate(args) => sluice::calibrate::main(&args),
        Command::Demo(args) => match sluice::demo::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice demo: {e}");
                ExitCode::from(EXIT_RUNTIME as u8)
            }
        },
    }
}

/// The admin address and token for an admin command, or the exit code of a usage error.
fn admin_target(
    args: &cli::AdminArgs,
) -> Result<(std::net::SocketAddr, Option<sluice::config::Secret>), ExitCode> {
    match (args.addr(), args.token()) {
        (Ok(a), Ok(t)) => Ok((a, t)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("sluice: {e}");
            Err(ExitCode::from(EXIT_CONFIG as u8))
        }
    }
}

fn admin_post(args: &cli::AdminArgs, path: &str) -> ExitCode {
    let (addr, token) = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    match sluice::ops::admin::client::call_with_token(
        addr,
        "POST",
        path,
        token.as_ref().map(|t| t.expose()),
    ) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("sluice: admin answered {code}: {}", body.trim());
            ExitCode::from(EXIT_RUNTIME as u8)
        }
        Err(e) => {
            eprintln!("sluice: cannot reach the admin listener at {addr}: {e}");
            ExitCode::from(EXIT_RUNTIME as u8)
        }
    }
}

fn status(args: &cli::AdminArgs) -> ExitCode {
    let (addr, token) = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let body = match sluice::ops::admin::client::call_with_token(
        addr,
        "GET",
        "/status",
        token.as_ref().map(|t| t.expose()),
    ) {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("sluice: admin answered {code}: {}", body.trim());
            return ExitCode::from(EXIT_RUNTIME as u8);
        }
        Err(e) => {
            eprintln!("sluice: cannot reach the admin listener at {addr}: {e}");
            return ExitCode::from(EXIT_RUNTIME as u8);
        }
    };
    if args.json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<sluice::ops::admin::Status>(&body) {
        Ok(st) => {
            println!(
                "{:<16} {:<9} {:>7} {:>9} {:>9} {:>8} {:>7}  WHY",
                "BACKEND", "STATE", "HEALTHY", "INFLIGHT", "LIMIT", "RAMP", "TOKENS"
            );
            for b in &st.backends {
                println!(
                    "{:<16} {:<9} {:>7} {:>9} {:>4}/{:<4} {:>7.0}%{} {:>7}  {}",
                    b.name,
                    b.state,
                    if b.healthy { "yes" } else { "no" },
                    b.inflight,
                    b.effective_limit,
                    b.max_inflight,
                    b.ramp * 100.0,
                    if b.ramp_gated { "*" } else { " " },
                    b.tokens
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "-".into()),
                    match (&b.limit_phase, b.baseline_ms) {
                        (Some(p), Some(ms)) => format!("{p} (baseline {ms} ms)"),
                        (Some(p), None) => p.clone(),
                        _ => "-".into(),
                    }
                );
            }
            for b in &st.backends {
                if let Some(t) = &b.last_transition {
                    println!("{}: {t}", b.name);
                }
            }
            println!("queue: {} waiting (max {})", st.queued, st.max_queue);
            if let Some(c) = &st.cluster {
                print!("{}", sluice::cli::describe_cluster_status(c));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: unexpected status document: {e}");
            ExitCode::from(EXIT_RUNTIME as u8)
        }
    }
}

fn config_error(e: &LoadError) -> ExitCode {
    eprintln!("sluice: {e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn run(args: cli::RunArgs) -> ExitCode {
    let demo_backend = args.config.config.is_none() && args.config.backend.is_none();
    // With no file and no backend, serve the embedded reference config in front of an emulated
    // legacy server, so a first `sluice run` shows something real.
    let (cfg, _emulator) = if demo_backend {
        let emu = match sluice::demo::start_demo_backend() {
            Ok(emu) => emu,
            Err(e) => {
                eprintln!("sluice: cannot start the demo backend: {e}");
                return ExitCode::from(EXIT_RUNTIME as u8);
            }
        };
        let mut o: Overrides = args.config.overrides();
        o.backend = Some(emu.addr().to_string());
        o.listen = o.listen.or_else(|| Some("127.0.0.1:8080".into()));
        match Config::parse(
            cli::EMBEDDED_CONFIG,
            Some("<embedded conf/sluice.toml>".as_ref()),
            &o,
        ) {
            Ok(cfg) => {
                eprintln!(
                    "sluice: no --config or --backend given: serving the embedded conf/sluice.toml \
                     in front of a demo legacy server at {} ({}).\n        try: curl -i http://{}/pay?txn=1",
                    emu.addr(),
                    sluice::demo::DEMO_BACKEND_DESCRIPTION,
                    cfg.listen
                );
                (cfg, Some(emu))
            }
            Err(e) => return config_error(&e),
        }
    } else {
        match args.config.load() {
            Ok(cfg) => (cfg, None),
            Err(e) => return config_error(&e),
        }
    };
    // On upgrade the old process still holds the port; the sockets are handed over instead.
    if !args.upgrade {
        if let Err(e) = cfg.preflight_bind() {
            return config_error(&LoadError::Invalid {
                path: args.config.config.clone(),
                error: e,
            });
        }
    }
    let opt = pingora::server::configuration::Opt {
        upgrade: args.upgrade,
        daemon: args.daemon,
        ..Default::default()
    };
    let (mut server, shared) = sluice::run::build_server_from(
        &cfg,
        Some(opt),
        args.config.config.clone(),
        args.config.overrides(),
    );
    server.bootstrap();
    eprintln!(
        "sluice: listening on {}, {} backend(s), {} requests in flight at most",
        cfg.listen,
        cfg.backends.len(),
        cfg.total_inflight()
    );
    let signals = sluice::ops::handoff::Signals::new(shared, &cfg.server.upgrade_sock);
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(signals),
    });
    ExitCode::SUCCESS
}
