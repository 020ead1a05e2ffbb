//! The command line: `sluice run`, `sluice check`, `sluice demo`, `sluice calibrate`, and the
//! admin commands.
//!
//! Flags override the file's values and go through the same validation (see
//! [`crate::config::Overrides`]). Exit status: 0 on success, 2 for a configuration or usage
//! error (one message naming the key, the value and the fix), 1 for a failure at run time.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Overrides};

/// Exit status for a configuration or usage error.
pub const EXIT_CONFIG: i32 = 2;
/// Exit status for a failure at run time.
pub const EXIT_RUNTIME: i32 = 1;

/// The reference configuration, embedded: `sluice run` with no file serves it in front of a
/// demo backend.
pub const EMBEDDED_CONFIG: &str = include_str!("../../conf/sluice.toml");

/// sluice: an admission-control reverse proxy that holds a fragile legacy HTTP server at an
/// exact concurrency cap, queues the rest, and answers 503 + Retry-After when it must.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy. With neither --config nor --backend, serves the embedded reference config
    /// in front of a built-in emulated legacy server, for a first look.
    Run(RunArgs),
    /// Validate a configuration, print the effective limits and what request N+1 will get.
    Check(CheckArgs),
    /// Show sluice at work: a surge of POS terminals against an emulated legacy server, first
    /// directly, then through sluice.
    Demo(crate::demo::DemoArgs),
    /// Measure how many concurrent requests a live backend takes (throughput and latency at
    /// rising concurrency, never above --max) and propose admission.max_inflight.
    Calibrate(CalibrateArgs),
    /// Show the running proxy's backends, limits, in-flight counts and queue.
    Status(AdminArgs),
    /// Make the running proxy re-read its config file (same as SIGHUP).
    Reload(AdminArgs),
    /// Operate on a backend of the running proxy.
    Backend(BackendArgs),
}

/// How to reach a running sluice's admin listener.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Admin address of the running proxy (default: admin.listen from --config, else
    /// 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR", global = true)]
    pub admin: Option<String>,
    /// Configuration file of the running proxy, to find its admin address.
    #[arg(short = 'c', long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Print the raw JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// File holding the admin bearer token (default: admin.token_file from --config).
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

/// `sluice backend ...`
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: BackendAction,
    /// How to reach the proxy.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Backend operations.
#[derive(Debug, Subcommand, Clone)]
pub enum BackendAction {
    /// Send no new requests to NAME; in-flight ones finish.
    Drain {
        /// Backend name.
        name: String,
    },
    /// Take NAME back into service (it ramps up with slow start).
    Ready {
        /// Backend name.
        name: String,
    },
    /// Restart NAME's slow-start ramp.
    SlowStart {
        /// Backend name.
        name: String,
    },
}

impl BackendAction {
    /// The admin API path for this action.
    pub fn path(&self) -> String {
        let (name, action) = match self {
            BackendAction::Drain { name } => (name, "drain"),
            BackendAction::Ready { name } => (name, "ready"),
            BackendAction::SlowStart { name } => (name, "slow-start"),
        };
        format!("/backends/{name}/{action}")
    }
}

impl AdminArgs {
    /// The admin bearer token to send, if any: `--token-file`, else the config's
    /// `admin.token_file`.
    pub fn token(&self) -> Result<Option<crate::config::Secret>, String> {
        if let Some(path) = &self.token_file {
            let path = path.to_string_lossy();
            return crate::config::read_token("--token-file", &path)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        match &self.config {
            Some(path) => Config::load(path, &Overrides::default())
                .map(|c| c.admin_token)
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    /// The admin address to talk to.
    pub fn addr(&self) -> Result<std::net::SocketAddr, String> {
        let text = match (&self.admin, &self.config) {
            (Some(a), _) => a.clone(),
            (None, Some(path)) => {
                let cfg = Config::load(path, &Overrides::default()).map_err(|e| e.to_string())?;
                match cfg.admin_listen {
                    Some(a) => a.to_string(),
                    None => return Err(format!("{}: admin.listen is disabled", path.display())),
                }
            }
            (None, None) => crate::config::defaults::ADMIN_LISTEN.to_string(),
        };
        text.parse()
            .map_err(|_| format!("--admin {text:?}: not an IP:port address, e.g. 127.0.0.1:9090"))
    }
}

/// Flags shared by `run` and `check`.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// Configuration file (TOML). See conf/sluice.toml for every key.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8080 (overrides proxy.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Backend host:port (replaces every [[backend]] with this one).
    #[arg(long, value_name = "HOST:PORT")]
    pub backend: Option<String>,
    /// Concurrent requests allowed at the backend (overrides admission.max_inflight).
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u32>,
    /// Requests allowed to wait (overrides admission.max_queue).
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Longest wait in the queue, e.g. 10s or 500ms (overrides admission.queue_timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Worker threads (overrides server.threads).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Slow-start ramp length, e.g. 30s; 0s disables (overrides slow_start.duration).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub slow_start: Option<Duration>,
    /// Requests per second per backend (overrides admission.rate).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Admin listener address; "" disables it (overrides admin.listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Active health check: http (GET --health-path, alive on any answer below 500), tcp
    /// (a connect) or none (overrides health.check).
    #[arg(long, value_name = "http|tcp|none")]
    pub health_check: Option<String>,
    /// Path of the HTTP health check, e.g. /health (overrides health.path).
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
}

impl ConfigArgs {
    /// The command-line overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            backend: self.backend.clone(),
            max_inflight: self.max_inflight,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            threads: self.threads,
            slow_start: self.slow_start,
            rate: self.rate,
            admin_listen: self.admin_listen.clone(),
            health_check: self.health_check.clone(),
            health_path: self.health_path.clone(),
        }
    }

    /// Load the config file (or, with no file, build one from the flags alone).
    pub fn load(&self) -> Result<Config, crate::config::LoadError> {
        match &self.config {
            Some(path) => Config::load(path, &self.overrides()),
            None => Config::parse("", None, &self.overrides()),
        }
    }
}

/// `sluice run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration and overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Take over the listening sockets of a running sluice (zero-downtime upgrade; send the old
    /// process SIGQUIT within 5 seconds).
    #[arg(short = 'u', long)]
    pub upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long)]
    pub daemon: bool,
}

/// `sluice check`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration and overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 10s or 250ms"))
}

/// A human summary of the effective configuration, for `sluice check`.
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut s = String::new();
    let _ = writeln!(s, "listen            {}", cfg.listen);
    if let Some(tls) = &cfg.tls {
        let _ = writeln!(
            s,
            "listen (TLS)      {}, certificate {}, key {} (re-read on reload)",
            tls.listen,
            tls.cert.display(),
            tls.key.display()
        );
    }
    let _ = writeln!(
        s,
        "clients           at most {} connections{}; header within {}; body received whole \
         before admission (first byte within {}, then at least {} B/s, all within {}; at most \
         {} bytes of bodies held at once); whole request within {}; idle {}",
        cfg.max_connections,
        match cfg.max_connections_per_ip {
            0 => String::new(),
            n => format!(", {n} per client IP"),
        },
        d(cfg.client_header_timeout),
        d(cfg.client_body_start_timeout),
        cfg.client_body_min_rate,
        d(cfg.client_body_timeout),
        cfg.max_buffered_body_bytes,
        d(cfg.request_timeout),
        d(cfg.client_keepalive_timeout)
    );
    for b in &cfg.backends {
        let _ = writeln!(
            s,
            "backend {:<9} {} (resolved {}), max_inflight {}{}{}",
            b.name,
            b.address,
            b.addr,
            b.max_inflight,
            b.host
                .as_deref()
                .map(|h| format!(", Host: {h}"))
                .unwrap_or_default(),
            b.tls
                .as_ref()
                .map(|t| format!(
                    ", TLS to {}{}",
                    t.sni,
                    if t.verify {
                        " (verified)"
                    } else {
                        " (NOT verified)"
                    }
                ))
                .unwrap_or_default()
        );
    }
    for b in &cfg.backends {
        if b.learning.adaptive {
            let _ = writeln!(
                s,
                "adaptive {:<8} the limit falls below {} when the backend's latency inflates \
                 (never below {}), and climbs back by one per healthy round",
                b.name, b.max_inflight, b.learning.min_inflight
            );
        }
        if let Some((rate, burst)) = b.rate {
            let _ = writeln!(s, "rate {:<12} {rate} requests/s, burst {burst}", b.name);
        }
        if let Some(ss) = b.slow_start.filter(|ss| ss.latency) {
            let _ = writeln!(
                s,
                "slow start {:<6} from {} to {}, doubling per round of answers within {} × the \
                 backend's baseline latency (a rise under {} never counts), and no slower than a \
                 linear ramp over {} (at start, on recovery, on ready); collapses to {} when the \
                 backend stops answering",
                b.name,
                ss.initial,
                b.max_inflight,
                ss.tolerance,
                d(ss.min_latency_rise),
                d(ss.duration),
                b.learning.min_inflight,
            );
        } else if let Some(ss) = b.slow_start {
            let _ = writeln!(
                s,
                "slow start {:<6} from {} to {} over {} (at start, on recovery, on ready){}",
                b.name,
                ss.initial,
                b.max_inflight,
                d(ss.duration),
                match (ss.max_error_rate, ss.max_latency) {
                    (None, None) => String::new(),
                    (e, l) => format!(
                        "; held while{}{}",
                        e.map(|e| format!(" errors > {:.0} %", e * 100.0))
                            .unwrap_or_default(),
                        l.map(|l| format!(" latency > {}", d(l)))
                            .unwrap_or_default()
                    ),
                }
            );
        }
    }
    let _ = writeln!(s, "health            {}", describe_health(&cfg.health));
    let _ = writeln!(
        s,
        "admin             {}{}",
        cfg.admin_listen
            .map(|a| a.to_string())
            .unwrap_or_else(|| "disabled".into()),
        match (&cfg.admin_token, cfg.metrics_open) {
            (None, _) => ", no token (loopback only)",
            (Some(_), false) => ", bearer token required",
            (Some(_), true) => ", bearer token required (not for GET /metrics)",
        }
    );
    if let Some(c) = &cfg.cluster {
        let _ = writeln!(
            s,
            "cluster           instance {:?} of {}, leases in {} (key {}:<backend>), TTL {} \
             (renewed every {}, trusted for TTL - {}), safe share {}",
            c.id,
            c.instances,
            c.redis.redacted(),
            c.key,
            d(c.lease_ttl),
            d(c.lease_ttl / 3),
            d(c.margin),
            c.safe_share
        );
        for b in &cfg.backends {
            let safe = c.safe_share.min(b.max_inflight);
            let worst = u64::from(c.instances) * u64::from(safe);
            let _ = writeln!(
                s,
                "cluster {:<9} cap {} shared by {} instances, moved by at most {} per renewal; \
                 worst case (every instance on its safe share, Redis unreachable): {} × {} = {} \
                 ≤ {}; a lost lease's share is handed out again {} after it expired",
                b.name,
                b.max_inflight,
                c.instances,
                c.step_for(b.max_inflight),
                c.instances,
                safe,
                worst,
                b.max_inflight,
                d(c.grace),
            );
        }
    }
    let _ = writeln!(
        s,
        "queue             up to {} waiting, FIFO, each for at most {}",
        cfg.max_queue,
        d(cfg.queue_timeout)
    );
    let _ = writeln!(
        s,
        "rejections        503 with Retry-After: {} on a connection kept open",
        cfg.retry_after.as_secs().max(1)
    );
    let _ = writeln!(
        s,
        "upstream          connect {}, idle {}, read {}, write {}",
        d(cfg.upstream.connect_timeout),
        d(cfg.upstream.idle_timeout),
        d(cfg.upstream.read_timeout),
        d(cfg.upstream.write_timeout)
    );
    let _ = writeln!(
        s,
        "process           {} threads, grace period {}, pid {}, upgrade socket {}",
        cfg.server.threads,
        d(cfg.server.grace_period),
        cfg.server.pid_file,
        cfg.server.upgrade_sock
    );
    let cap = cfg.total_inflight();
    if cfg.cluster.is_some() {
        let _ = writeln!(
            s,
            "\nWith [cluster], this instance admits up to its leased share of each cap (its safe \
             share without a valid lease); all instances together stay within the caps below."
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "With {cap} requests already in flight, request {} waits in the queue (FIFO) for up to {}; \
         with {} more waiting, request {} gets 503 at once.",
        cap + 1,
        d(cfg.queue_timeout),
        cfg.max_queue,
        cap + cfg.max_queue + 1
    );
    let _ = writeln!(
        s,
        "The backends never see more than {cap} concurrent requests, over at most {cap} TCP connections."
    );
    s
}

/// The cluster part of `sluice status`: this instance's lease, then every instance's share
/// as its last renewal saw them in Redis.
pub fn describe_cluster_status(c: &crate::ops::cluster::ClusterStatus) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cluster: instance {:?} of {}, {} (lease TTL {} ms, safe share {})",
        c.id, c.instances, c.redis, c.lease_ttl_ms, c.safe_share
    );
    for b in &c.backends {
        let _ = writeln!(
            s,
            "{}: this instance may use {} of {} ({}{}{}); renewals {} ok, {} failed{}",
            b.name,
            b.share,
            b.cap,
            b.basis,
            if b.basis == "lease" {
                format!(", valid {} ms more", b.valid_for_ms)
            } else {
                String::new()
            },
            if b.learning {
                ", Redis state new: safe shares only"
            } else {
                ""
            },
            b.renewals,
            b.renewal_failures,
            b.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  {:<20} {:>6} {:>7} {:>6} {:>5}",
            "INSTANCE", "SHARE", "DEMAND", "SAFE", "LIVE"
        );
        for p in &b.peers {
            let _ = writeln!(
                s,
                "  {:<20} {:>6} {:>7} {:>6} {:>5}",
                if p.id == c.id {
                    format!("{} (this)", p.id)
                } else {
                    p.id.clone()
                },
                p.share,
                p.demand,
                p.safe_share,
                if p.live { "yes" } else { "no" }
            );
        }
        let total: u32 = b.peers.iter().filter(|p| p.live).map(|p| p.share).sum();
        let _ = writeln!(s, "  live shares add up to {total} of {}", b.cap);
    }
    s
}

/// What the health checks do and accept, in one line (for `sluice check`).
pub fn describe_health(h: &crate::config::HealthConfig) -> String {
    use crate::config::CheckKind;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let active = match h.check {
        CheckKind::Http => format!(
            "http GET {} every {}, alive on {} within {}; rise {}, fall {}",
            h.path,
            d(h.interval),
            h.expect,
            d(h.timeout),
            h.rise,
            h.fall
        ),
        CheckKind::Tcp => format!(
            "tcp connect every {}, alive on a connection within {}; rise {}, fall {}",
            d(h.interval),
            d(h.timeout),
            h.rise,
            h.fall
        ),
        CheckKind::None => "no active check".to_string(),
    };
    let passive = match (h.passive_failures, h.check) {
        (0, _) => "passive: off".to_string(),
        (n, CheckKind::Tcp) => format!(
            "passive: {n} failures (connect failures or timeouts in a row) take a backend down; \
             back after {} tcp connects in a row",
            h.rise
        ),
        (n, CheckKind::Http) if h.expect == crate::config::Expect::Below500 => format!(
            "passive: {n} failures (connect failures or timeouts in a row) take a backend down; \
             back after {} answers in a row",
            h.rise
        ),
        (n, _) => format!(
            "passive: {n} failures (connect failures or timeouts in a row) take a backend down; \
             back after {} answers below 500 in a row to GET {} every {}",
            h.rise,
            h.path,
            d(h.interval)
        ),
    };
    format!("{active}; {passive}")
}
/// Request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// GET (the default): use a read-only URL.
    Get,
    /// POST with `--body-file`: only to an endpoint where repeating the request is harmless.
    Post,
}

/// `sluice calibrate`
#[derive(Debug, Args, Clone)]
pub struct CalibrateArgs {
    /// The backend to measure, host:port (directly, not through sluice).
    #[arg(long, value_name = "HOST:PORT")]
    pub backend: String,
    /// The URL to request, e.g. /pos/balance.dll?check=1. Required: a legacy IIS answers `/`
    /// with 403 or 404, which measures nothing. Choose a read-only URL that the application
    /// itself serves, as cheap or as costly as the terminals' usual request.
    #[arg(long, value_name = "PATH")]
    pub path: String,
    /// Request method.
    #[arg(long, value_enum, default_value_t = Method::Get)]
    pub method: Method,
    /// Body of each request (POST only), sent with a Content-Length.
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,
    /// Host header (default: the --backend value as written).
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Highest concurrency calibrate may try. Never more requests in flight, nor connections.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max: u32,
    /// How long each step is measured, after its warm-up.
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = parse_duration)]
    pub step_time: Duration,
    /// Start of each step that is not measured.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Stop when a step's p99 latency passes this (default: 5 × the p99 at concurrency 1, at
    /// least 25ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub p99_bound: Option<Duration>,
    /// Bound on each request (connect, send, answer); a timeout is an error.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Directory to write calibrate.csv and calibrate.svg into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}
