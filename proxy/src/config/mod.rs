//! Configuration: the TOML file format, its defaults, validation, and the final [`Config`].
//!
//! Three layers, each with one job:
//! - [`file`](mod@file): serde structs that mirror the file exactly (unknown keys are
//!   rejected). Each section also lists its keys and what a reload does when one changes
//!   ([`file::keys`]).
//! - [`validate`]: the file with command-line [`Overrides`] applied, checked section by section
//!   into a [`Validated`] configuration. Pure: no DNS, no file reads, so it is fuzzed whole. The
//!   first problem comes back as a [`ConfigError`] naming the key, the value and the fix.
//! - [`resolve`]: the I/O. Backend addresses are looked up, the TLS certificate and key and the
//!   backend CA file are checked, the admin token is read; the result is the [`Config`] the
//!   proxy runs on.
//!
//! [`diff`](mod@diff) compares two configurations field by field, each field classified as
//! applied in place by a reload or needing an upgrade; the reload builds its report from it.
//! Every default value lives in [`defaults`].

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use sluice_plugins::health::Expect;

pub mod defaults;
pub mod diff;
pub mod file;
pub mod resolve;
pub mod validate;

pub use diff::{diff, Change, Effect};
pub use file::Reload;
pub use resolve::{read_token, Io, System};
pub use validate::Validated;

/// A configuration problem: which key, what value, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `admission.max_inflight`.
    pub key: String,
    /// The offending value as written (empty when the key is missing).
    pub value: String,
    /// What is wrong and how to fix it.
    pub fix: String,
}

impl ConfigError {
    pub(crate) fn new(
        key: impl Into<String>,
        value: impl fmt::Display,
        fix: impl Into<String>,
    ) -> Self {
        ConfigError {
            key: key.into(),
            value: value.to_string(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "`{}`: {}", self.key, self.fix)
        } else {
            write!(f, "`{} = {}`: {}", self.key, self.value, self.fix)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where the running configuration comes from: the file it was started with (if any) and the
/// command-line flags that override it. A reload reads the same file with the same flags.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The file, if the process was started with one.
    pub path: Option<PathBuf>,
    /// Flags that override the file.
    pub overrides: Overrides,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and its line.
        message: String,
    },
    /// A value is out of range or unusable.
    #[error("config{}: {error}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, when the value came from one.
        path: Option<PathBuf>,
        /// The problem.
        error: ConfigError,
    },
}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--backend` (replaces every `[[backend]]` with this one)
    pub backend: Option<String>,
    /// `--max-inflight`
    pub max_inflight: Option<u32>,
    /// `--max-queue`
    pub max_queue: Option<usize>,
    /// `--queue-timeout`
    pub queue_timeout: Option<Duration>,
    /// `--threads`
    pub threads: Option<usize>,
    /// `--slow-start` (ramp duration; 0 disables)
    pub slow_start: Option<Duration>,
    /// `--rate`
    pub rate: Option<f64>,
    /// `--admin-listen` (`""` disables)
    pub admin_listen: Option<String>,
    /// `--health-check` (`http`, `tcp` or `none`; overrides `[health] check`)
    pub health_check: Option<String>,
    /// `--health-path` (overrides `[health] path`)
    pub health_path: Option<String>,
}

/// Validated configuration the proxy runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Client-facing listener.
    pub listen: SocketAddr,
    /// Read buffer per client connection, bytes.
    pub client_read_buffer_bytes: usize,
    /// Write buffer per client connection, bytes.
    pub client_write_buffer_bytes: usize,
    /// Per-write timeout toward clients.
    pub client_write_timeout: Duration,
    /// Idle time between requests on a kept-alive client connection.
    pub client_keepalive_timeout: Duration,
    /// Largest request header, bytes (431 above).
    pub max_header_bytes: usize,
    /// Largest request body, bytes (413 above).
    pub max_body_bytes: usize,
    /// Open client connections, all clients together.
    pub max_connections: usize,
    /// Open client connections per client IP; 0 = no per-IP cap.
    pub max_connections_per_ip: usize,
    /// Time to send a whole request header.
    pub client_header_timeout: Duration,
    /// Time to send a whole request body.
    pub client_body_timeout: Duration,
    /// Time for a request body's first byte.
    pub client_body_start_timeout: Duration,
    /// Slowest average rate of a request body, bytes per second; 0 = no rate rule.
    pub client_body_min_rate: u64,
    /// Request body bytes buffered at once, all requests together.
    pub max_buffered_body_bytes: usize,
    /// Longest a request may take, complete header to delivered response.
    pub request_timeout: Duration,
    /// Queue bound, across all backends.
    pub max_queue: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// `Retry-After` on generated 503s.
    pub retry_after: Duration,
    /// Upstream connection settings.
    pub upstream: Upstream,
    /// The backends, in order; never empty.
    pub backends: Vec<Backend>,
    /// Process settings.
    pub server: ServerSettings,
    /// Active and passive health checks.
    pub health: HealthConfig,
    /// Admin listener, if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// The admin API's bearer token, read from `admin.token_file`.
    pub admin_token: Option<Secret>,
    /// `GET /metrics` needs no token.
    pub metrics_open: bool,
    /// Shared budget across instances (`[cluster]`); `None`: this instance runs alone.
    pub cluster: Option<ClusterSettings>,
    /// The TLS listener for clients, if enabled.
    pub tls: Option<TlsListener>,
    /// Access log target.
    pub access_log: crate::observe::access_log::Target,
}

/// A secret read from a file: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `token` (the resolution layer reads it from `admin.token_file`).
    pub fn new(token: String) -> Self {
        Secret(token)
    }

    /// Whether `given` is the secret, in time that depends only on the lengths.
    pub fn matches(&self, given: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = u8::from(mine.len() != given.len());
        for (i, &b) in mine.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// The secret itself, to send it (the command-line client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// Redis, as parsed from `cluster.redis`.
    pub redis: crate::ops::resp::RedisUrl,
    /// This instance's id.
    pub id: String,
    /// Redis key prefix; a backend's hash is `<key>:<backend name>`.
    pub key: String,
    /// Lease time to live.
    pub lease_ttl: Duration,
    /// Subtracted from the TTL on this instance's clock.
    pub margin: Duration,
    /// This instance's share of each backend without a valid lease.
    pub safe_share: u32,
    /// Instances sharing the backends.
    pub instances: u32,
    /// Largest change of a share per renewal; `None`: an eighth of the backend's cap.
    pub step: Option<u32>,
    /// The longest a request may hold a slot (request deadline plus the timeout hold): a lost
    /// lease's share is handed out again only this long after it expired.
    pub grace: Duration,
}

impl ClusterSettings {
    /// The rebalancing step for a backend with cap `cap`.
    pub fn step_for(&self, cap: u32) -> u32 {
        self.step.unwrap_or(cap.div_ceil(8)).max(1)
    }

    /// The worst case: every instance at its safe share (Redis unreachable).
    pub fn worst_case(&self) -> u64 {
        u64::from(self.instances) * u64::from(self.safe_share)
    }
}

/// A client-facing TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Its address.
    pub listen: SocketAddr,
    /// Certificate chain file, PEM (re-read on every reload).
    pub cert: PathBuf,
    /// Private key file, PEM (re-read on every reload).
    pub key: PathBuf,
}

/// TLS toward one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// Server name sent (SNI) and verified.
    pub sni: String,
    /// Verify the backend's certificate chain and name.
    pub verify: bool,
}

/// The slow-start ramp of a backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// Limit at the start of the ramp.
    pub initial: u32,
    /// Time to reach `max_inflight`.
    pub duration: Duration,
    /// Hold the ramp while the error rate is above this.
    pub max_error_rate: Option<f64>,
    /// Hold the ramp while latency is above this.
    pub max_latency: Option<Duration>,
    /// Grow by latency rounds (true) or linearly with the clock (false).
    pub latency: bool,
    /// Latency mode: a clean round's mean is at most this × the baseline.
    pub tolerance: f64,
    /// Latency mode: a rise smaller than this over the baseline is never inflation.
    pub min_latency_rise: Duration,
}

/// The learned limit of a backend, beside its ramp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learning {
    /// Adapt below `max_inflight` in steady service (a gradient on latency).
    pub adaptive: bool,
    /// The learned limit's floor.
    pub min_inflight: u32,
}

/// What an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET health.path`, alive on an answer `health.expect_status` accepts.
    Http,
    /// A TCP connect.
    Tcp,
    /// No active checks. Passive checks still run; a backend they took down is probed with
    /// `GET health.path` (any answer below 500) until it is back.
    None,
}

impl CheckKind {
    /// The name used in the config (`"http"`, `"tcp"`, `"none"`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::None => "none",
        }
    }
}

/// Health checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// The active check.
    pub check: CheckKind,
    /// Path of HTTP checks (and of the recovery probe with `check = "none"`).
    pub path: String,
    /// Answers an HTTP check counts as alive (a backend down for passive failures comes back on
    /// any answer below 500 whatever this says).
    pub expect: Expect,
    /// Time between checks.
    pub interval: Duration,
    /// Check timeout.
    pub timeout: Duration,
    /// Passing checks in a row to come back up.
    pub rise: u32,
    /// Failing checks in a row to go down.
    pub fall: u32,
    /// Connect failures or timeouts of real requests in a row to go down; 0 disables.
    pub passive_failures: u32,
}

/// How sluice talks to backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub idle_timeout: Duration,
    /// Per-read timeout, including the wait for the response header.
    pub read_timeout: Duration,
    /// Per-write timeout.
    pub write_timeout: Duration,
    /// CA bundle for verifying TLS backends; the system's roots when `None`.
    pub ca_file: Option<String>,
    /// How long a slot stays taken after an upstream timeout (or a cut exchange); zero: none.
    pub timeout_hold: Duration,
}

/// One legacy server.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Name used in logs and status output.
    pub name: String,
    /// Address as written (kept for messages).
    pub address: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Host header override.
    pub host: Option<String>,
    /// Concurrency cap: requests in flight, and so TCP connections, at this backend.
    pub max_inflight: u32,
    /// Request rate limit (per second) and burst.
    pub rate: Option<(f64, u32)>,
    /// Slow-start ramp, if enabled.
    pub slow_start: Option<SlowStart>,
    /// Learned-limit settings (used with a latency ramp, or when adaptive).
    pub learning: Learning,
    /// TLS toward the backend, if enabled.
    pub tls: Option<BackendTls>,
}

/// Process settings handed to pingora.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Drain time after a stop or upgrade signal.
    pub grace_period: Duration,
    /// Runtime wind-down after the grace period.
    pub graceful_shutdown_timeout: Duration,
    /// PID file.
    pub pid_file: String,
    /// Upgrade socket.
    pub upgrade_sock: String,
    /// Error log file (daemon mode).
    pub error_log: Option<String>,
}
/// Parse configuration text into the file layer. `path` only labels error messages.
pub fn parse_file(text: &str, path: Option<&Path>) -> Result<file::FileConfig, LoadError> {
    toml::from_str(text).map_err(|e| LoadError::Parse {
        path: path
            .map(Path::to_owned)
            .unwrap_or_else(|| "<inline>".into()),
        message: one_line_toml_error(text, &e),
    })
}

impl Config {
    /// Read, parse and validate a configuration file, then apply command-line overrides.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path), overrides)
    }

    /// Parse and validate configuration text. `path` only labels error messages.
    pub fn parse(
        text: &str,
        path: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, LoadError> {
        Self::parse_with(text, path, overrides, &System)
    }

    /// [`Config::parse`], with the I/O of the resolution layer done by `io`.
    pub fn parse_with(
        text: &str,
        path: Option<&Path>,
        overrides: &Overrides,
        io: &dyn Io,
    ) -> Result<Config, LoadError> {
        let invalid = |error| LoadError::Invalid {
            path: path.map(Path::to_owned),
            error,
        };
        let validated = Validated::parse(text, path, overrides)?;
        resolve::resolve(validated, io).map_err(invalid)
    }

    /// Validate the file layer with overrides applied, and resolve it.
    pub fn from_file(f: file::FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        resolve::resolve(validate::validate(f, o)?, &System)
    }

    /// Check that the listen address can be bound now, so a port in use fails at once with a
    /// clear message (pingora alone retries for 30 s and then fails inside its service task).
    pub fn preflight_bind(&self) -> Result<(), ConfigError> {
        preflight("proxy.listen", self.listen)?;
        if let Some(tls) = &self.tls {
            preflight("tls.listen", tls.listen)?;
        }
        match self.admin_listen {
            Some(a) => preflight("admin.listen", a),
            None => Ok(()),
        }
    }

    /// Sum of every backend's cap: the most upstream connections sluice will ever hold.
    pub fn total_inflight(&self) -> usize {
        self.backends.iter().map(|b| b.max_inflight as usize).sum()
    }
}

fn preflight(key: &str, addr: SocketAddr) -> Result<(), ConfigError> {
    {
        TcpListener::bind(addr).map(drop).map_err(|e| {
            let fix = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the address is already in use by another process; stop it or choose another port"
                        .to_string()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE".into()
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "this machine has no such address; use 0.0.0.0 or one of its own IPs".into()
                }
                _ => format!("cannot listen there: {e}"),
            };
            ConfigError::new(key, format!("{:?}", addr.to_string()), fix)
        })
    }
}

/// The parser's message on one line, with the line number and the enclosing `[section]`.
fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| format!(" in {l}"))
        .unwrap_or_default();
    // The whole line names both the key and its value: `queue_timeout = "ten"`.
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let key = text[line_start..]
        .lines()
        .next()
        .map(str::trim)
        .filter(|l| !l.is_empty() && l.len() <= 100 && !l.starts_with('['))
        .map(|l| format!(", `{l}`"))
        .unwrap_or_default();
    format!("line {line}{section}{key}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, LoadError> {
        Config::parse(text, None, &Overrides::default())
    }

    const MINIMAL: &str =
        "[admission]\nmax_inflight = 16\n[[backend]]\naddress = \"127.0.0.1:9\"\n";

    fn invalid(text: &str) -> ConfigError {
        match parse(text) {
            Err(LoadError::Invalid { error, .. }) => error,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    const CLUSTER: &str = "[cluster]\nredis = \"redis://127.0.0.1:6379\"\nid = \"a\"\ninstances = 3\nsafe_share = 4\n";

    #[test]
    fn the_cluster_section_has_defaults_and_names_each_bad_value() {
        let cfg = parse(&format!("{MINIMAL}{CLUSTER}")).expect("valid");
        let c = cfg.cluster.expect("cluster");
        assert_eq!(c.lease_ttl, defaults::CLUSTER_LEASE_TTL);
        assert_eq!(c.margin, Duration::from_millis(300));
        assert_eq!(c.key, "sluice");
        assert_eq!(c.step_for(16), 2);
        assert_eq!(c.worst_case(), 12);
        // The longest request deadline: request_timeout + timeout_hold.
        assert_eq!(c.grace, defaults::REQUEST_TIMEOUT + defaults::TIMEOUT_HOLD);
        assert!(parse(MINIMAL).expect("valid").cluster.is_none());

        let e = invalid(&format!(
            "{MINIMAL}{}",
            CLUSTER.replace("safe_share = 4", "safe_share = 6")
        ));
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("cluster.safe_share", "6")
        );
        assert!(
            e.fix.contains("3 instances × 6 = 18") && e.fix.contains("at most 5"),
            "{e}"
        );
        let e = invalid(&format!(
            "{MINIMAL}{}",
            CLUSTER.replace("safe_share = 4\n", "")
        ));
        assert_eq!(e.key, "cluster.safe_share");
        let e = invalid(&format!(
            "{MINIMAL}{}",
            CLUSTER.replace("instances = 3\n", "")
        ));
        assert_eq!(e.key, "cluster.instances");
        let e = invalid(&format!(
            "{MINIMAL}{}",
            CLUSTER.replace("id = \"a\"", "id = \"a b\"")
        ));
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("cluster.id", "\"a b\"")
        );
        let e = invalid(&format!(
            "{MINIMAL}{}",
            CLUSTER.replace("redis://127.0.0.1:6379", "http://x")
        ));
        assert_eq!(e.key, "cluster.redis");
        assert!(e.fix.contains("redis://"), "{e}");
        let e = invalid(&format!("{MINIMAL}{CLUSTER}lease_ttl = \"100ms\"\n"));
        assert_eq!(e.key, "cluster.lease_ttl");
        let e = invalid(&format!("{MINIMAL}{CLUSTER}step = 0\n"));
        assert_eq!(e.key, "cluster.step");
        assert!(matches!(
            parse(&format!("{MINIMAL}{CLUSTER}ttl = \"1s\"\n")),
            Err(LoadError::Parse { .. })
        ));
    }

    #[test]
    fn a_non_loopback_admin_needs_a_token_file_and_the_token_is_checked() {
        let e = invalid(&format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9090\"\n"));
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("admin.listen", "\"0.0.0.0:9090\"")
        );
        assert!(e.fix.contains("admin.token_file"), "{e}");
        let dir = std::env::temp_dir().join(format!("sluice-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").expect("write");
        let e = invalid(&format!(
            "{MINIMAL}[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_file = \"{}\"\n",
            short.display()
        ));
        assert_eq!(e.key, "admin.token_file");
        let e = invalid(&format!(
            "{MINIMAL}[admin]\ntoken_file = \"{}\"\n",
            dir.join("missing").display()
        ));
        assert!(e.fix.contains("cannot read it"), "{e}");
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef0123\n").expect("write");
        let cfg = parse(&format!(
            "{MINIMAL}[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_file = \"{}\"\n",
            good.display()
        ))
        .expect("valid");
        let t = cfg.admin_token.expect("token");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef012"));
        assert!(!t.matches(b"0123456789abcdef01234"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Secret(***)");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn validation_takes_host_names_without_a_lookup_and_resolution_names_the_key() {
        let text = "[admission]\nmax_inflight = 4\n[[backend]]\naddress = \"pos.invalid:80\"\n";
        let v = Validated::parse(text, None, &Overrides::default()).expect("valid, no DNS");
        assert_eq!(v.backends[0].address, "pos.invalid:80");
        assert_eq!(v.backends[0].name, "pos.invalid:80");
        // A missing or bad port is refused before any lookup, with the lookup's own message.
        for bad in ["pos.invalid", "pos.invalid:http", "pos.invalid:70000"] {
            let e = invalid(&text.replace("pos.invalid:80", bad));
            assert_eq!(e.key, "backend[0].address", "{bad}");
            assert!(e.fix.contains("not a usable host:port"), "{bad}: {e}");
        }
        // The lookup itself belongs to the resolution layer (here one that refuses host names:
        // tests make no DNS query).
        let e = match Config::parse_with(text, None, &Overrides::default(), &resolve::NoIo) {
            Err(LoadError::Invalid { error, .. }) => error,
            other => panic!("expected the lookup's error, got {other:?}"),
        };
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("backend[0].address", "\"pos.invalid:80\"")
        );
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.backends[0].max_inflight, 16);
        assert_eq!(c.backends[0].name, "127.0.0.1:9");
        assert_eq!(c.max_queue, defaults::MAX_QUEUE);
        assert_eq!(c.queue_timeout, defaults::QUEUE_TIMEOUT);
        assert_eq!(c.upstream.idle_timeout, defaults::IDLE_TIMEOUT);
        assert!(c.upstream.idle_timeout < Duration::from_secs(120));
        assert_eq!(c.server.grace_period, defaults::GRACE_PERIOD);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("{MINIMAL}[server]\nthreadz = 4\n")).expect_err("must be rejected");
        let msg = e.to_string();
        assert!(msg.contains("threadz"), "{msg}");
    }

    #[test]
    fn zero_limit_is_named_with_fix() {
        let e = parse("[admission]\nmax_inflight = 0\n[[backend]]\naddress = \"127.0.0.1:9\"\n")
            .expect_err("must be rejected");
        let msg = e.to_string();
        assert!(msg.contains("admission.max_inflight = 0"), "{msg}");
        assert!(msg.contains("between 1 and"), "{msg}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = parse(&format!("{MINIMAL}queue_timeout = \"ten seconds\"\n"))
            .expect_err("must be rejected");
        // The key lands in [[backend]] here, which has no such key: move it to [admission].
        assert!(e.to_string().contains("queue_timeout"), "{e}");
        let e = parse(
            "[admission]\nmax_inflight = 4\nqueue_timeout = \"ten seconds\"\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
        )
        .expect_err("must be rejected");
        let msg = e.to_string();
        assert!(
            msg.contains("queue_timeout") && msg.contains("\"10s\""),
            "{msg}"
        );
    }

    #[test]
    fn overrides_replace_file_values() {
        let o = Overrides {
            backend: Some("127.0.0.1:7".into()),
            max_inflight: Some(3),
            queue_timeout: Some(Duration::from_millis(250)),
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, None, &o).expect("valid");
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.backends[0].addr.port(), 7);
        assert_eq!(c.backends[0].max_inflight, 3);
        assert_eq!(c.queue_timeout, Duration::from_millis(250));
    }

    #[test]
    fn health_check_defaults_to_any_answer_below_500_and_takes_a_strict_list() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.health.check, CheckKind::Http);
        assert_eq!(c.health.path, "/");
        assert_eq!(c.health.expect, Expect::Below500);
        assert!(c.health.expect.accepts(403) && c.health.expect.accepts(404));
        assert!(!c.health.expect.accepts(500));
        assert_eq!(c.health.passive_failures, defaults::PASSIVE_FAILURES);
        let c = parse(&format!(
            "{MINIMAL}[health]\npath = \"/health\"\nexpect_status = [200, 204]\n"
        ))
        .expect("valid");
        assert_eq!(c.health.path, "/health");
        assert_eq!(c.health.expect, Expect::Statuses(vec![200, 204]));
        // `none` keeps passive checks (a downed backend is probed back).
        let c = parse(&format!("{MINIMAL}[health]\ncheck = \"none\"\n")).expect("valid");
        assert_eq!(c.health.check, CheckKind::None);
        assert_eq!(c.health.passive_failures, defaults::PASSIVE_FAILURES);
    }

    #[test]
    fn bad_health_values_are_named_with_the_fix() {
        for (line, key, value, fix) in [
            (
                "expect_status = []",
                "health.expect_status",
                "[]",
                "below 500",
            ),
            (
                "expect_status = [200, 700]",
                "health.expect_status",
                "[200, 700]",
                "between 100 and 599",
            ),
            ("check = \"https\"", "health.check", "\"https\"", "\"tcp\""),
            (
                "path = \"health\"",
                "health.path",
                "\"health\"",
                "absolute path",
            ),
            (
                "path = \"/a b\"",
                "health.path",
                "\"/a b\"",
                "without spaces",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[health]\n{line}\n")).expect_err(line);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{key} = {value}")) && msg.contains(fix),
                "{line}: {msg}"
            );
        }
        // The flags go through the same validation.
        let o = Overrides {
            health_check: Some("ping".into()),
            ..Default::default()
        };
        let e = Config::parse(MINIMAL, None, &o).expect_err("bad --health-check");
        assert!(e.to_string().contains("health.check = \"ping\""), "{e}");
        let o = Overrides {
            health_check: Some("tcp".into()),
            health_path: Some("/ping".into()),
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, None, &o).expect("valid");
        assert_eq!(
            (c.health.check, c.health.path.as_str()),
            (CheckKind::Tcp, "/ping")
        );
    }

    #[test]
    fn missing_backend_and_missing_limit_explain_the_fix() {
        let e = parse("[admission]\nmax_inflight = 4\n").expect_err("must be rejected");
        assert!(e.to_string().contains("[[backend]]"), "{e}");
        let e = parse("[[backend]]\naddress = \"127.0.0.1:9\"\n").expect_err("must be rejected");
        assert!(e.to_string().contains("admission.max_inflight"), "{e}");
    }

    #[test]
    fn duplicate_backend_names_are_refused() {
        let e = parse(
            "[admission]\nmax_inflight = 4\n[[backend]]\nname=\"a\"\naddress = \"127.0.0.1:9\"\n[[backend]]\nname=\"a\"\naddress = \"127.0.0.1:8\"\n",
        )
        .expect_err("must be rejected");
        assert!(e.to_string().contains("backend[1].name"), "{e}");
    }

    #[test]
    fn listen_in_use_is_reported_at_once() {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let o = Overrides {
            listen: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, None, &o).expect("valid");
        let e = c.preflight_bind().expect_err("must be rejected");
        assert_eq!(e.key, "proxy.listen");
        assert!(e.fix.contains("already in use"), "{e}");
    }

    #[test]
    fn client_protections_have_defaults_and_checked_bounds() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.max_connections, defaults::MAX_CONNECTIONS);
        assert_eq!(c.max_connections_per_ip, 0, "no per-IP cap unless asked");
        assert_eq!(c.client_header_timeout, defaults::CLIENT_HEADER_TIMEOUT);
        assert_eq!(c.client_body_timeout, defaults::CLIENT_BODY_TIMEOUT);
        assert_eq!(c.client_body_start_timeout, Duration::from_secs(2));
        assert_eq!(c.client_body_min_rate, 240);
        assert_eq!(c.max_buffered_body_bytes, 64 << 20);
        assert!(
            c.client_keepalive_timeout > Duration::from_secs(60),
            "must outlast WinInet's 60 s idle keep-alive"
        );
        assert_eq!(c.request_timeout, defaults::REQUEST_TIMEOUT);
        assert_eq!(c.client_write_buffer_bytes, 1460);
        for (line, key) in [
            ("max_connections = 0", "proxy.max_connections"),
            (
                "max_connections_per_ip = -1",
                "proxy.max_connections_per_ip",
            ),
            (
                "client_header_timeout = \"0s\"",
                "proxy.client_header_timeout",
            ),
            ("client_body_timeout = \"0s\"", "proxy.client_body_timeout"),
            (
                "client_body_start_timeout = \"31s\"",
                "proxy.client_body_start_timeout",
            ),
            ("client_body_min_rate = -1", "proxy.client_body_min_rate"),
            (
                "max_buffered_body_bytes = 1000",
                "proxy.max_buffered_body_bytes",
            ),
            ("request_timeout = \"5s\"", "proxy.request_timeout"),
            (
                "client_write_buffer_bytes = 2000000",
                "proxy.client_write_buffer_bytes",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[proxy]\n{line}\n")).expect_err(line);
            assert!(e.to_string().contains(key), "{line}: {e}");
        }
        // The request deadline must outlast the queue deadline, which it includes.
        let e = parse(&format!("{MINIMAL}[proxy]\nrequest_timeout = \"10s\"\n"))
            .expect_err("not longer than queue_timeout");
        assert!(e.to_string().contains("admission.queue_timeout"), "{e}");
        let c = parse(&format!(
            "{MINIMAL}[proxy]\nmax_connections_per_ip = 8\nrequest_timeout = \"11s\"\n"
        ))
        .expect("valid");
        assert_eq!(c.max_connections_per_ip, 8);
        assert_eq!(c.request_timeout, Duration::from_secs(11));
    }

    #[test]
    fn the_learned_limit_has_defaults_and_checked_bounds() {
        let c = parse(MINIMAL).expect("valid");
        let b = &c.backends[0];
        let ss = b.slow_start.expect("a ramp by default");
        assert!(ss.latency, "the latency ramp is the default");
        assert_eq!(ss.tolerance, 1.3);
        assert_eq!(ss.min_latency_rise, Duration::from_millis(2));
        assert_eq!(
            b.learning,
            Learning {
                adaptive: false,
                min_inflight: 1
            }
        );
        let c = parse(
            "[admission]\nmax_inflight = 16\nadaptive = true\nmin_inflight = 4\n\
             [slow_start]\nmode = \"clock\"\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
        )
        .expect("valid");
        assert!(!c.backends[0].slow_start.expect("ramp").latency);
        assert_eq!(c.backends[0].learning.min_inflight, 4);
        assert!(c.backends[0].learning.adaptive);
        for (section, line, key) in [
            ("slow_start", "mode = \"fast\"", "slow_start.mode"),
            ("slow_start", "tolerance = 0.5", "slow_start.tolerance"),
            ("slow_start", "tolerance = nan", "slow_start.tolerance"),
            (
                "slow_start",
                "min_latency_rise = \"1h\"",
                "slow_start.min_latency_rise",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[{section}]\n{line}\n")).expect_err(line);
            assert!(e.to_string().contains(key), "{line}: {e}");
        }
        for line in ["min_inflight = 0", "min_inflight = 17"] {
            let e = parse(&format!(
                "[admission]\nmax_inflight = 16\n{line}\n[[backend]]\naddress = \"127.0.0.1:9\"\n"
            ))
            .expect_err(line);
            assert!(
                e.to_string().contains("admission.min_inflight"),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn tls_settings_are_all_or_nothing_and_backend_tls_keys_need_tls() {
        let e = parse(&format!(
            "{MINIMAL}[tls]\nlisten = \"127.0.0.1:8443\"\ncert = \"/x/cert.pem\"\n"
        ))
        .expect_err("no key");
        assert!(e.to_string().contains("tls.key"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}[tls]\nlisten = \"127.0.0.1:8443\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n"
        ))
        .expect_err("unreadable certificate");
        assert!(e.to_string().contains("tls.cert"), "{e}");
        let e = parse(
            "[admission]\nmax_inflight = 4\n[[backend]]\naddress = \"127.0.0.1:9\"\nsni = \"pos\"\n",
        )
        .expect_err("sni without tls");
        assert!(e.to_string().contains("backend[0].sni"), "{e}");
        let c = parse(
            "[admission]\nmax_inflight = 4\n[[backend]]\naddress = \"127.0.0.1:9\"\ntls = true\n",
        )
        .expect("valid");
        let tls = c.backends[0].tls.clone().expect("tls on");
        assert_eq!(
            tls.sni, "127.0.0.1",
            "the name defaults to the address's host"
        );
        assert!(tls.verify, "verified unless turned off");
        assert!(c.tls.is_none(), "no TLS listener unless configured");
    }
}
