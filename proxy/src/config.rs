//! Configuration: the TOML file format, its defaults, and validation into [`Config`].
//!
//! Two layers, as the file format and the running proxy have different needs:
//! - [`file`] holds the serde structs that mirror the file exactly. Unknown keys are rejected,
//!   durations are written as `"10s"` / `"250ms"`, and every optional key falls back to a
//!   named constant in [`defaults`].
//! - [`Config`] is the validated form the proxy runs on: every limit is known to be usable,
//!   every address resolved. It is built by [`Config::from_file`], which reports the first
//!   problem as a [`ConfigError`] naming the key, the value and the fix.
//!
//! Command-line flags are applied to the file layer ([`Overrides`]) before validation, so a
//! flag can never smuggle in a value the file would have refused.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
pub use sluice_plugins::health::Expect;

/// Every default value, with its unit and the reason for it.
pub mod defaults {
    use std::time::Duration;

    /// Address the proxy listens on when none is configured.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// Requests waiting for a backend slot, across all backends (requests).
    pub const MAX_QUEUE: usize = 1000;
    /// How long a request may wait in the queue before it is answered 503 (10 s).
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `Retry-After` sent with every 503 sluice generates (2 s).
    pub const RETRY_AFTER: Duration = Duration::from_secs(2);
    /// Timeout for opening a TCP connection to a backend (2 s).
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// A pooled backend connection idle this long is closed (60 s). It must stay below the
    /// backend's own keep-alive timeout (IIS: 120 s), so sluice never sends a request on a
    /// socket the backend is about to close.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Longest wait for each read from a backend, including the response header (60 s).
    pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
    /// Longest wait for each write to a backend (30 s).
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
    /// After an upstream timeout the backend is most likely still working on the request:
    /// its slot stays taken this much longer.
    pub const TIMEOUT_HOLD: Duration = Duration::from_secs(30);
    /// Longest wait for each write to a client (30 s). A client that reads slower than this
    /// would otherwise keep a backend slot busy.
    pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Idle time allowed between requests on a kept-alive client connection (120 s, as IIS).
    /// It must outlast the terminals' own: WinInet keeps an idle connection for 60 s, and when
    /// a connection it reuses turns out to be closed it may re-send a POST's headers without
    /// the body (KB 833301). Also the per-read timeout while a request header arrives.
    pub const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(120);
    /// Largest request header (request line and fields) accepted, bytes; larger gets 431.
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    /// Largest request body accepted, bytes; larger gets 413.
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;
    /// Open client connections, all clients together. Above it a new connection gets a 503
    /// and is closed. Thousands of terminals fit; a flood cannot exhaust file descriptors.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Open client connections per client IP; 0 = no per-IP cap (the default: many terminals
    /// share one store NAT address).
    pub const MAX_CONNECTIONS_PER_IP: usize = 0;
    /// Time a client has to send a whole request header, from its first byte (from the
    /// connection's accept for its first request). pingora alone only times each read.
    pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time a client has to send a whole request body, received before the request may take a
    /// backend slot.
    pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// Time within which a request body's first byte must arrive (a terminal that re-sent a
    /// POST's headers without its body is refused quickly).
    pub const CLIENT_BODY_START_TIMEOUT: Duration = Duration::from_secs(2);
    /// Slowest average rate a request body may arrive at once started, bytes per second
    /// (Kestrel's `MinRequestBodyDataRate` and IIS's `MinFileBytesPerSec` both use 240).
    pub const CLIENT_BODY_MIN_RATE: u64 = 240;
    /// Request body bytes held at once by all requests together while they are received and
    /// wait for a slot; a body that does not fit gets 503.
    pub const MAX_BUFFERED_BODY_BYTES: usize = 64 * 1024 * 1024;
    /// Longest a request may take, from its complete header to its delivered response.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
    /// pingora's retry buffer: a chunked request body (of unknown size) is received whole
    /// before admission up to this size; a larger one gets 413 (send a Content-Length).
    pub const BODY_BUFFER_BYTES: usize = 64 * 1024;
    /// Read buffer per client connection (bytes). 0: reads go straight from the socket into
    /// pingora's request buffers. pingora's default is 64 KiB; POS requests are small, and
    /// thousands of idle terminals would each hold one buffer (measured: 8 KiB of a 32 KiB idle
    /// connection).
    pub const CLIENT_READ_BUFFER_BYTES: usize = 0;
    /// Write buffer per client connection, bytes: one TCP segment, so a small response's
    /// header and body leave in one write. 0 saves ≈ 1.4 KiB per idle connection and costs
    /// ≈ 10 % throughput (measured).
    pub const CLIENT_WRITE_BUFFER_BYTES: usize = 1460;
    /// Worker threads of the proxy service.
    pub const THREADS: usize = 2;
    /// After a stop or upgrade signal, in-flight requests get this long to finish (10 s;
    /// pingora's own default of 300 s is longer than any POS terminal waits).
    pub const GRACE_PERIOD: Duration = Duration::from_secs(10);
    /// After the grace period, the runtime gets this long to wind down (5 s).
    pub const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    /// PID file, used by upgrades and the systemd unit.
    pub const PID_FILE: &str = "/tmp/sluice.pid";
    /// Unix socket over which listening sockets are handed to a new process on upgrade.
    pub const UPGRADE_SOCK: &str = "/tmp/sluice_upgrade.sock";
    /// Upper bound for `max_inflight`, far above what any legacy server takes; a larger value is
    /// almost certainly a typo.
    pub const MAX_INFLIGHT_CEILING: u32 = 100_000;
    /// Slow-start ramp length (10 s): after sluice starts, and after a backend recovers, its
    /// limit grows from `slow_start.initial` to `max_inflight` over this long. "0s" disables.
    pub const SLOW_START_DURATION: Duration = Duration::from_secs(10);
    /// Slow-start initial limit, as a share of `max_inflight` (10 %, at least 1 request).
    pub const SLOW_START_INITIAL_SHARE: f64 = 0.10;
    /// How the ramp grows: "latency" (doubling per round of completions whose latency stays
    /// near the backend's measured baseline; `duration` bounds it) or "clock" (linear over
    /// `duration`).
    pub const SLOW_START_MODE: &str = "latency";
    /// A round of completions is clean while its median latency is at most this × the
    /// backend's baseline (latency at low concurrency).
    pub const LATENCY_TOLERANCE: f64 = 1.3;
    /// Latency mode: the smallest rise over the baseline that counts as inflation.
    pub const MIN_LATENCY_RISE: Duration = Duration::from_millis(2);
    /// Share of failed requests in a round above which the latency ramp stops growing.
    pub const LATENCY_MAX_ERROR_RATE: f64 = 0.1;
    /// Adapt the limit below `max_inflight` in steady service (opt-in).
    pub const ADAPTIVE: bool = false;
    /// The learned limit never goes below this.
    pub const MIN_INFLIGHT: u32 = 1;
    /// Active health check: what to do ("http" GET, "tcp" connect, or "none").
    pub const HEALTH_CHECK: &str = "http";
    /// Path requested by the HTTP health check.
    pub const HEALTH_PATH: &str = "/";
    /// Time between health checks of a backend (2 s).
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    /// A health check that takes longer than this fails (1 s).
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    /// Consecutive passing checks that bring a down backend back.
    pub const HEALTH_RISE: u32 = 2;
    /// Consecutive failing checks that take a backend down.
    pub const HEALTH_FALL: u32 = 3;
    /// Consecutive connect failures or timeouts of real requests that take a backend down.
    pub const PASSIVE_FAILURES: u32 = 3;
    /// Admin listener (status, drain, ready, metrics). Loopback only by default.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    /// Access log target: one JSON line per request.
    pub const ACCESS_LOG: &str = "stdout";
    /// Redis key prefix of the shared budget: one hash per backend, `<key>:<backend name>`.
    pub const CLUSTER_KEY: &str = "sluice";
    /// Lease time to live (3 s), as Redis counts it; renewed every third of it.
    pub const CLUSTER_LEASE_TTL: Duration = Duration::from_secs(3);
    /// Shortest lease TTL accepted: renewals (a third of it) must outlast a Redis round trip
    /// on a busy network by far.
    pub const CLUSTER_MIN_LEASE_TTL: Duration = Duration::from_millis(300);
    /// A lease counts as valid on the instance's clock for TTL less this share of it, so that
    /// clock rates differing by up to 10 % never let an instance use a lease Redis has let go.
    pub const CLUSTER_MARGIN_SHARE: f64 = 0.10;
    /// Most instances a cluster may declare.
    pub const CLUSTER_MAX_INSTANCES: u32 = 1000;
}

/// The serde structs that mirror the configuration file.
pub mod file {
    use super::*;

    /// The whole file.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct FileConfig {
        /// `[proxy]`: the client-facing side.
        #[serde(default)]
        pub proxy: ProxySection,
        /// `[admission]`: limits and the queue.
        #[serde(default)]
        pub admission: AdmissionSection,
        /// `[upstream]`: how sluice talks to backends.
        #[serde(default)]
        pub upstream: UpstreamSection,
        /// `[[backend]]`: the legacy servers.
        #[serde(default, rename = "backend")]
        pub backends: Vec<BackendSection>,
        /// `[tls]`: an optional TLS listener for clients.
        #[serde(default)]
        pub tls: TlsSection,
        /// `[server]`: process settings passed to pingora.
        #[serde(default)]
        pub server: ServerSection,
        /// `[slow_start]`: the ramp after a start or a recovery.
        #[serde(default)]
        pub slow_start: SlowStartSection,
        /// `[health]`: active and passive health checks.
        #[serde(default)]
        pub health: HealthSection,
        /// `[admin]`: the admin listener.
        #[serde(default)]
        pub admin: AdminSection,
        /// `[log]`: the access log.
        #[serde(default)]
        pub log: LogSection,
        /// `[cluster]`: share the backends' caps with other instances through Redis leases.
        pub cluster: Option<ClusterSection>,
    }

    /// `[cluster]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ClusterSection {
        /// `redis = "redis://10.0.0.5:6379/0"`
        pub redis: Option<String>,
        /// `id = "store-a"`: this instance's name, unique in the cluster.
        pub id: Option<String>,
        /// `key = "sluice"`: Redis key prefix.
        pub key: Option<String>,
        /// `lease_ttl = "3s"`
        #[serde(default, with = "opt_duration")]
        pub lease_ttl: Option<Duration>,
        /// `safe_share = 8`: what this instance uses of each backend without a valid lease.
        pub safe_share: Option<i64>,
        /// `instances = 3`: how many instances share the backends.
        pub instances: Option<i64>,
        /// `step = 4`: largest change of a share per renewal (default: an eighth of the cap).
        pub step: Option<i64>,
    }

    /// `[log]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct LogSection {
        /// `access = "stdout"` | `"off"` | `"/var/log/sluice/access.log"`
        pub access: Option<String>,
    }

    /// `[slow_start]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SlowStartSection {
        /// `duration = "10s"` ("0s" disables the ramp)
        #[serde(default, with = "opt_duration")]
        pub duration: Option<Duration>,
        /// `initial = 5`: the limit at the start of the ramp.
        pub initial: Option<i64>,
        /// `max_error_rate = 0.2`: hold the ramp while more errors than this.
        pub max_error_rate: Option<f64>,
        /// `max_latency = "500ms"`: hold the ramp while slower than this.
        #[serde(default, with = "opt_duration")]
        pub max_latency: Option<Duration>,
        /// `mode = "latency"` or `"clock"`.
        pub mode: Option<String>,
        /// `tolerance = 1.3`: latency mode's bound on a clean round's mean latency, × the
        /// baseline.
        pub tolerance: Option<f64>,
        /// `min_latency_rise = "2ms"`: a rise over the baseline smaller than this is never
        /// inflation, whatever the ratio.
        #[serde(default, with = "opt_duration")]
        pub min_latency_rise: Option<Duration>,
    }

    /// `[health]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthSection {
        /// `check = "http"` | `"tcp"` | `"none"`
        pub check: Option<String>,
        /// `path = "/"`
        pub path: Option<String>,
        /// `expect_status = [200]` (absent: any answer below 500)
        pub expect_status: Option<Vec<i64>>,
        /// `interval = "2s"`
        #[serde(default, with = "opt_duration")]
        pub interval: Option<Duration>,
        /// `timeout = "1s"`
        #[serde(default, with = "opt_duration")]
        pub timeout: Option<Duration>,
        /// `rise = 2`
        pub rise: Option<i64>,
        /// `fall = 3`
        pub fall: Option<i64>,
        /// `passive_failures = 3` (0 disables passive checks)
        pub passive_failures: Option<i64>,
    }

    /// `[admin]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AdminSection {
        /// `listen = "127.0.0.1:9090"`; `""` disables the admin listener.
        pub listen: Option<String>,
        /// `token_file = "/etc/sluice/admin.token"`: every admin request must carry
        /// `Authorization: Bearer <the file's content>`.
        pub token_file: Option<String>,
        /// `metrics_open = true`: `GET /metrics` needs no token.
        pub metrics_open: Option<bool>,
    }

    /// `[proxy]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ProxySection {
        /// `listen = "0.0.0.0:8080"`
        pub listen: Option<String>,
        /// `client_read_buffer_bytes = 8192`
        pub client_read_buffer_bytes: Option<usize>,
        /// `client_write_buffer_bytes = 1460`
        pub client_write_buffer_bytes: Option<usize>,
        /// `client_write_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        pub client_write_timeout: Option<Duration>,
        /// `client_keepalive_timeout = "120s"`
        #[serde(default, with = "opt_duration")]
        pub client_keepalive_timeout: Option<Duration>,
        /// `max_header_bytes = 16384`
        pub max_header_bytes: Option<i64>,
        /// `max_body_bytes = 1048576`
        pub max_body_bytes: Option<i64>,
        /// `max_connections = 10000`
        pub max_connections: Option<i64>,
        /// `max_connections_per_ip = 0`
        pub max_connections_per_ip: Option<i64>,
        /// `client_header_timeout = "10s"`
        #[serde(default, with = "opt_duration")]
        pub client_header_timeout: Option<Duration>,
        /// `client_body_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        pub client_body_timeout: Option<Duration>,
        /// `client_body_start_timeout = "2s"`
        #[serde(default, with = "opt_duration")]
        pub client_body_start_timeout: Option<Duration>,
        /// `client_body_min_rate = 240` (bytes per second; 0 disables)
        pub client_body_min_rate: Option<i64>,
        /// `max_buffered_body_bytes = 67108864`
        pub max_buffered_body_bytes: Option<i64>,
        /// `request_timeout = "300s"`
        #[serde(default, with = "opt_duration")]
        pub request_timeout: Option<Duration>,
    }

    /// `[admission]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AdmissionSection {
        /// `max_inflight = 50`: per backend, unless the backend sets its own.
        pub max_inflight: Option<i64>,
        /// `max_queue = 1000`
        pub max_queue: Option<i64>,
        /// `rate = 100.0`: requests per second per backend (unset: no rate limit).
        pub rate: Option<f64>,
        /// `burst = 20`: requests allowed at once above the rate (default: max_inflight).
        pub burst: Option<i64>,
        /// `queue_timeout = "10s"`
        #[serde(default, with = "opt_duration")]
        pub queue_timeout: Option<Duration>,
        /// `retry_after = "2s"`
        #[serde(default, with = "opt_duration")]
        pub retry_after: Option<Duration>,
        /// `adaptive = false`: lower the limit below max_inflight when latency inflates.
        pub adaptive: Option<bool>,
        /// `min_inflight = 1`: the learned limit's floor.
        pub min_inflight: Option<i64>,
    }

    /// `[upstream]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct UpstreamSection {
        /// `connect_timeout = "2s"`
        #[serde(default, with = "opt_duration")]
        pub connect_timeout: Option<Duration>,
        /// `idle_timeout = "60s"`
        #[serde(default, with = "opt_duration")]
        pub idle_timeout: Option<Duration>,
        /// `read_timeout = "60s"`
        #[serde(default, with = "opt_duration")]
        pub read_timeout: Option<Duration>,
        /// `write_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        pub write_timeout: Option<Duration>,
        /// `ca_file = "/etc/sluice/backend-ca.pem"`: CAs for TLS backends.
        pub ca_file: Option<String>,
        /// `timeout_hold = "30s"`
        #[serde(default, with = "opt_duration")]
        pub timeout_hold: Option<Duration>,
    }

    /// `[tls]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TlsSection {
        /// `listen = "0.0.0.0:8443"`
        pub listen: Option<String>,
        /// `cert = "/etc/sluice/tls/cert.pem"`: certificate chain, PEM.
        pub cert: Option<String>,
        /// `key = "/etc/sluice/tls/key.pem"`: private key, PEM.
        pub key: Option<String>,
    }

    /// One `[[backend]]` entry.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BackendSection {
        /// `name = "iis-1"` (defaults to the address)
        pub name: Option<String>,
        /// `address = "10.0.0.5:80"`
        pub address: Option<String>,
        /// `host = "pos.example.com"`: Host header sent to this backend.
        pub host: Option<String>,
        /// `max_inflight = 50`: overrides `[admission] max_inflight`.
        pub max_inflight: Option<i64>,
        /// `rate = 100.0`: overrides `[admission] rate`.
        pub rate: Option<f64>,
        /// `tls = true`: speak TLS to this backend.
        pub tls: Option<bool>,
        /// `sni = "pos.example.com"`: the name sent and verified (TLS backends).
        pub sni: Option<String>,
        /// `tls_verify = true`: verify the backend's certificate and name.
        pub tls_verify: Option<bool>,
    }

    /// `[server]`
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ServerSection {
        /// `threads = 2`
        pub threads: Option<i64>,
        /// `grace_period = "10s"`
        #[serde(default, with = "opt_duration")]
        pub grace_period: Option<Duration>,
        /// `graceful_shutdown_timeout = "5s"`
        #[serde(default, with = "opt_duration")]
        pub graceful_shutdown_timeout: Option<Duration>,
        /// `pid_file = "/run/sluice/sluice.pid"`
        pub pid_file: Option<String>,
        /// `upgrade_sock = "/run/sluice/upgrade.sock"`
        pub upgrade_sock: Option<String>,
        /// `error_log = "/var/log/sluice/error.log"` (daemon mode only)
        pub error_log: Option<String>,
    }

    /// `Option<Duration>` written as a humantime string such as `"10s"` or `"250ms"`.
    mod opt_duration {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = String::deserialize(d)?;
            humantime::parse_duration(&s).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write it like \"10s\", \"250ms\" or \"1m 30s\""
                ))
            })
        }
    }
}

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

/// Read an admin token file: the first line, trimmed; at least 16 characters. At most 4 KiB
/// is read (a path such as `/dev/zero` must not hang the start).
pub fn read_token(key: &str, path: &str) -> Result<Secret, ConfigError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| {
        ConfigError::new(
            key,
            format!("{path:?}"),
            format!("cannot read it ({e}); write a random token into it, e.g. `openssl rand -hex 32 > {path}`"),
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            key,
            format!("{path:?}"),
            "the token must be printable ASCII without spaces (it is sent in an HTTP header); write a random one, e.g. `openssl rand -hex 32`",
        ));
    }
    if token.len() < 16 {
        return Err(ConfigError::new(
            key,
            format!("{path:?}"),
            "the token in it is shorter than 16 characters; write a random one, e.g. `openssl rand -hex 32`",
        ));
    }
    Ok(Secret(token))
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
        let file: file::FileConfig = toml::from_str(text).map_err(|e| LoadError::Parse {
            path: path
                .map(Path::to_owned)
                .unwrap_or_else(|| "<inline>".into()),
            message: one_line_toml_error(text, &e),
        })?;
        Self::from_file(file, overrides).map_err(|error| LoadError::Invalid {
            path: path.map(Path::to_owned),
            error,
        })
    }

    /// Validate the file layer with overrides applied.
    pub fn from_file(mut f: file::FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        if let Some(listen) = &o.listen {
            f.proxy.listen = Some(listen.clone());
        }
        if let Some(backend) = &o.backend {
            // A single named backend keeps its name (and Host) with the new address.
            let (name, host) = match f.backends.as_slice() {
                [only] => (only.name.clone(), only.host.clone()),
                _ => (None, None),
            };
            f.backends = vec![file::BackendSection {
                address: Some(backend.clone()),
                name,
                host,
                ..Default::default()
            }];
        }
        if let Some(n) = o.max_inflight {
            f.admission.max_inflight = Some(n.into());
            // The flag is the cap for the quick start's single backend.
            for b in &mut f.backends {
                b.max_inflight = None;
            }
        }
        if let Some(n) = o.max_queue {
            f.admission.max_queue = Some(n.try_into().unwrap_or(i64::MAX));
        }
        if let Some(d) = o.queue_timeout {
            f.admission.queue_timeout = Some(d);
        }
        if let Some(n) = o.threads {
            f.server.threads = Some(n.try_into().unwrap_or(i64::MAX));
        }
        if let Some(d) = o.slow_start {
            f.slow_start.duration = Some(d);
        }
        if let Some(r) = o.rate {
            f.admission.rate = Some(r);
            for b in &mut f.backends {
                b.rate = None;
            }
        }
        if let Some(a) = &o.admin_listen {
            f.admin.listen = Some(a.clone());
        }
        if let Some(c) = &o.health_check {
            f.health.check = Some(c.clone());
        }
        if let Some(p) = &o.health_path {
            f.health.path = Some(p.clone());
        }

        let listen_text = f.proxy.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "proxy.listen",
                format!("{listen_text:?}"),
                "not an IP:port address; write it like \"0.0.0.0:8080\" or \"[::]:8080\"",
            )
        })?;

        let client_read_buffer_bytes = f
            .proxy
            .client_read_buffer_bytes
            .unwrap_or(defaults::CLIENT_READ_BUFFER_BYTES);
        if client_read_buffer_bytes > 1024 * 1024 {
            return Err(ConfigError::new(
                "proxy.client_read_buffer_bytes",
                client_read_buffer_bytes,
                "must be between 0 (unbuffered, the default) and 1048576 bytes",
            ));
        }
        let client_write_buffer_bytes = f
            .proxy
            .client_write_buffer_bytes
            .unwrap_or(defaults::CLIENT_WRITE_BUFFER_BYTES);
        if client_write_buffer_bytes > 1024 * 1024 {
            return Err(ConfigError::new(
                "proxy.client_write_buffer_bytes",
                client_write_buffer_bytes,
                "must be between 0 (unbuffered) and 1048576 bytes (default 1460)",
            ));
        }
        let client_write_timeout = positive(
            "proxy.client_write_timeout",
            f.proxy.client_write_timeout,
            defaults::CLIENT_WRITE_TIMEOUT,
        )?;

        let client_keepalive_timeout = positive(
            "proxy.client_keepalive_timeout",
            f.proxy.client_keepalive_timeout,
            defaults::CLIENT_KEEPALIVE_TIMEOUT,
        )?;
        let bytes = |key: &str, v: Option<i64>, default: usize, min: i64, max: i64| match v {
            None => Ok(default),
            Some(n) if (min..=max).contains(&n) => Ok(n as usize),
            Some(n) => Err(ConfigError::new(
                key,
                n,
                format!("must be between {min} and {max} bytes (default {default})"),
            )),
        };
        let max_header_bytes = bytes(
            "proxy.max_header_bytes",
            f.proxy.max_header_bytes,
            defaults::MAX_HEADER_BYTES,
            1024,
            1024 * 1024,
        )?;
        let max_body_bytes = bytes(
            "proxy.max_body_bytes",
            f.proxy.max_body_bytes,
            defaults::MAX_BODY_BYTES,
            0,
            1 << 40,
        )?;

        let connections = |key: &str, v: Option<i64>, default: usize, min: i64, what: &str| match v
        {
            None => Ok(default),
            Some(n) if (min..=1_000_000).contains(&n) => Ok(n as usize),
            Some(n) => Err(ConfigError::new(
                key,
                n,
                format!("must be between {min}{what} and 1000000 (default {default})"),
            )),
        };
        let max_connections = connections(
            "proxy.max_connections",
            f.proxy.max_connections,
            defaults::MAX_CONNECTIONS,
            1,
            "",
        )?;
        let max_connections_per_ip = connections(
            "proxy.max_connections_per_ip",
            f.proxy.max_connections_per_ip,
            defaults::MAX_CONNECTIONS_PER_IP,
            0,
            " (no per-IP cap)",
        )?;
        let client_header_timeout = positive(
            "proxy.client_header_timeout",
            f.proxy.client_header_timeout,
            defaults::CLIENT_HEADER_TIMEOUT,
        )?;
        let client_body_timeout = positive(
            "proxy.client_body_timeout",
            f.proxy.client_body_timeout,
            defaults::CLIENT_BODY_TIMEOUT,
        )?;
        // The default start deadline gives way to a shorter whole-body deadline; one set
        // explicitly must fit in it.
        let client_body_start_timeout = positive(
            "proxy.client_body_start_timeout",
            f.proxy.client_body_start_timeout,
            defaults::CLIENT_BODY_START_TIMEOUT.min(client_body_timeout),
        )?;
        if client_body_start_timeout > client_body_timeout {
            return Err(ConfigError::new(
                "proxy.client_body_start_timeout",
                format!(
                    "\"{}\"",
                    humantime::format_duration(client_body_start_timeout)
                ),
                format!(
                    "must not exceed proxy.client_body_timeout ({}), the time for the whole body",
                    humantime::format_duration(client_body_timeout)
                ),
            ));
        }
        let client_body_min_rate = match f.proxy.client_body_min_rate {
            None => defaults::CLIENT_BODY_MIN_RATE,
            Some(n) if (0..=1_000_000_000).contains(&n) => n as u64,
            Some(n) => {
                return Err(ConfigError::new(
                    "proxy.client_body_min_rate",
                    n,
                    format!(
                        "must be between 0 (no rate rule) and 1000000000 bytes per second \
                         (default {})",
                        defaults::CLIENT_BODY_MIN_RATE
                    ),
                ))
            }
        };
        let max_buffered_body_bytes = bytes(
            "proxy.max_buffered_body_bytes",
            f.proxy.max_buffered_body_bytes,
            defaults::MAX_BUFFERED_BODY_BYTES,
            0,
            1 << 40,
        )?;
        if max_buffered_body_bytes < max_body_bytes {
            return Err(ConfigError::new(
                "proxy.max_buffered_body_bytes",
                max_buffered_body_bytes,
                format!(
                    "must be at least proxy.max_body_bytes ({max_body_bytes}), or no body of the \
                     largest allowed size could ever be received"
                ),
            ));
        }
        let request_timeout = positive(
            "proxy.request_timeout",
            f.proxy.request_timeout,
            defaults::REQUEST_TIMEOUT,
        )?;

        let default_inflight = match f.admission.max_inflight {
            Some(n) => Some(limit("admission.max_inflight", n)?),
            None => None,
        };
        let max_queue = match f.admission.max_queue {
            None => defaults::MAX_QUEUE,
            Some(n) if (0..=1_000_000).contains(&n) => n as usize,
            Some(n) => {
                return Err(ConfigError::new(
                    "admission.max_queue",
                    n,
                    "must be between 0 (no queue: reject when the backend is full) and 1000000",
                ))
            }
        };
        let queue_timeout = positive(
            "admission.queue_timeout",
            f.admission.queue_timeout,
            defaults::QUEUE_TIMEOUT,
        )?;
        let retry_after = f.admission.retry_after.unwrap_or(defaults::RETRY_AFTER);
        if request_timeout <= queue_timeout {
            return Err(ConfigError::new(
                "proxy.request_timeout",
                format!("\"{}\"", humantime::format_duration(request_timeout)),
                format!(
                    "must be longer than admission.queue_timeout ({}): the request deadline \
                     counts the time in the queue, and a queued request must get its 503",
                    humantime::format_duration(queue_timeout)
                ),
            ));
        }

        let upstream = Upstream {
            connect_timeout: positive(
                "upstream.connect_timeout",
                f.upstream.connect_timeout,
                defaults::CONNECT_TIMEOUT,
            )?,
            idle_timeout: positive(
                "upstream.idle_timeout",
                f.upstream.idle_timeout,
                defaults::IDLE_TIMEOUT,
            )?,
            read_timeout: positive(
                "upstream.read_timeout",
                f.upstream.read_timeout,
                defaults::READ_TIMEOUT,
            )?,
            write_timeout: positive(
                "upstream.write_timeout",
                f.upstream.write_timeout,
                defaults::WRITE_TIMEOUT,
            )?,
            timeout_hold: f.upstream.timeout_hold.unwrap_or(defaults::TIMEOUT_HOLD),
            ca_file: match &f.upstream.ca_file {
                None => None,
                Some(p) => Some(crate::tls::check_ca_file("upstream.ca_file", p)?),
            },
        };

        if f.backends.is_empty() {
            return Err(ConfigError::new(
                "backend",
                "",
                "no backend configured; add a [[backend]] section with `address = \"host:port\"` \
                 (or pass --backend host:port)",
            ));
        }
        let mut backends: Vec<Backend> = Vec::with_capacity(f.backends.len());
        for (i, b) in f.backends.iter().enumerate() {
            let key = |k: &str| format!("backend[{i}].{k}");
            let address = b.address.clone().ok_or_else(|| {
                ConfigError::new(
                    key("address"),
                    "",
                    "missing; set it to the backend's \"host:port\"",
                )
            })?;
            let addr = resolve(&address)
                .map_err(|why| ConfigError::new(key("address"), format!("{address:?}"), why))?;
            let max_inflight = match (b.max_inflight, default_inflight) {
                (Some(n), _) => limit(&key("max_inflight"), n)?,
                (None, Some(n)) => n,
                (None, None) => {
                    return Err(ConfigError::new(
                        "admission.max_inflight",
                        "",
                        "missing; set it to the number of concurrent requests the backend can \
                         take (for example 50), or set max_inflight on every [[backend]]",
                    ))
                }
            };
            let name = b.name.clone().unwrap_or_else(|| address.clone());
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{name:?}"),
                    "must be a non-empty word without spaces",
                ));
            }
            if backends.iter().any(|o| o.name == name) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{name:?}"),
                    "another backend has this name; give each backend a unique name",
                ));
            }
            if let Some(h) = &b.host {
                if h.is_empty() || h.bytes().any(|c| c.is_ascii_control() || c == b' ') {
                    return Err(ConfigError::new(
                        key("host"),
                        format!("{h:?}"),
                        "must be a host name without spaces or control characters",
                    ));
                }
            }
            let rate = match b.rate.or(f.admission.rate) {
                None => None,
                Some(r) if r.is_finite() && r > 0.0 && r <= 1e6 => {
                    let burst = match f.admission.burst {
                        None => max_inflight,
                        Some(n) if (1..=1_000_000).contains(&n) => n as u32,
                        Some(n) => {
                            return Err(ConfigError::new(
                                "admission.burst",
                                n,
                                "must be between 1 and 1000000 requests",
                            ))
                        }
                    };
                    Some((r, burst))
                }
                Some(r) => {
                    let k = if b.rate.is_some() {
                        key("rate")
                    } else {
                        "admission.rate".into()
                    };
                    return Err(ConfigError::new(
                        k,
                        r,
                        "must be a number of requests per second above 0 and at most 1000000; \
                         remove the key for no rate limit",
                    ));
                }
            };
            let slow_start = slow_start_for(&f.slow_start, max_inflight)?;
            let learning = learning_for(&f.admission, max_inflight)?;
            let tls = backend_tls(b, &address, &key)?;
            backends.push(Backend {
                name,
                address,
                addr,
                host: b.host.clone(),
                max_inflight,
                rate,
                slow_start,
                learning,
                tls,
            });
        }

        let threads = match f.server.threads {
            None => defaults::THREADS,
            Some(n) if (1..=256).contains(&n) => n as usize,
            Some(n) => {
                return Err(ConfigError::new(
                    "server.threads",
                    n,
                    "must be between 1 and 256 (one or two per core is plenty)",
                ))
            }
        };
        let server = ServerSettings {
            threads,
            grace_period: f.server.grace_period.unwrap_or(defaults::GRACE_PERIOD),
            graceful_shutdown_timeout: f
                .server
                .graceful_shutdown_timeout
                .unwrap_or(defaults::GRACEFUL_SHUTDOWN_TIMEOUT),
            pid_file: f
                .server
                .pid_file
                .unwrap_or_else(|| defaults::PID_FILE.into()),
            upgrade_sock: f
                .server
                .upgrade_sock
                .unwrap_or_else(|| defaults::UPGRADE_SOCK.into()),
            error_log: f.server.error_log,
        };

        let health = health_config(&f.health)?;
        let admin_text = f.admin.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN);
        let admin_listen = if admin_text.is_empty() {
            None
        } else {
            let a: SocketAddr = admin_text.parse().map_err(|_| {
                ConfigError::new(
                    "admin.listen",
                    format!("{admin_text:?}"),
                    "not an IP:port address; write it like \"127.0.0.1:9090\", or \"\" to disable",
                )
            })?;
            if a == listen {
                return Err(ConfigError::new(
                    "admin.listen",
                    format!("{admin_text:?}"),
                    "must differ from proxy.listen",
                ));
            }
            Some(a)
        };
        let tls = tls_listener(&f.tls, listen, admin_listen)?;

        let access_text = f.log.access.as_deref().unwrap_or(defaults::ACCESS_LOG);
        let access_log = crate::observe::access_log::Target::parse(access_text);
        if let crate::observe::access_log::Target::File(p) = &access_log {
            if !p.is_absolute() {
                return Err(ConfigError::new(
                    "log.access",
                    format!("{access_text:?}"),
                    "must be \"stdout\", \"off\" or an absolute file path",
                ));
            }
        }

        let admin_token = match f.admin.token_file.as_deref() {
            Some(path) => Some(read_token("admin.token_file", path)?),
            None => None,
        };
        if let (Some(a), None) = (admin_listen, &admin_token) {
            if !a.ip().is_loopback() {
                return Err(ConfigError::new(
                    "admin.listen",
                    format!("{admin_text:?}"),
                    "is not a loopback address and admin.token_file is not set: anyone who \
                     reaches it could drain backends or reload; set admin.token_file to a file \
                     holding a random token (e.g. `openssl rand -hex 32`), or listen on 127.0.0.1",
                ));
            }
        }
        let metrics_open = f.admin.metrics_open.unwrap_or(false);
        let grace = request_timeout.saturating_add(upstream.timeout_hold);
        let cluster = match &f.cluster {
            None => None,
            Some(c) => Some(cluster_settings(c, &backends, grace)?),
        };

        Ok(Config {
            admin_token,
            metrics_open,
            cluster,
            access_log,
            health,
            admin_listen,
            tls,
            listen,
            client_read_buffer_bytes,
            client_write_buffer_bytes,
            client_write_timeout,
            client_keepalive_timeout,
            max_header_bytes,
            max_body_bytes,
            max_connections,
            max_connections_per_ip,
            client_header_timeout,
            client_body_timeout,
            client_body_start_timeout,
            client_body_min_rate,
            max_buffered_body_bytes,
            request_timeout,
            max_queue,
            queue_timeout,
            retry_after,
            upstream,
            backends,
            server,
        })
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

fn slow_start_for(
    f: &file::SlowStartSection,
    max_inflight: u32,
) -> Result<Option<SlowStart>, ConfigError> {
    let duration = f.duration.unwrap_or(defaults::SLOW_START_DURATION);
    if duration.is_zero() {
        return Ok(None);
    }
    let initial = match f.initial {
        None => ((f64::from(max_inflight) * defaults::SLOW_START_INITIAL_SHARE).ceil() as u32).max(1),
        Some(n) if n >= 1 && n <= i64::from(defaults::MAX_INFLIGHT_CEILING) => n as u32,
        Some(n) => {
            return Err(ConfigError::new(
                "slow_start.initial",
                n,
                "must be at least 1 (the limit the ramp starts from); set slow_start.duration = \"0s\" to disable the ramp",
            ))
        }
    };
    if let Some(r) = f.max_error_rate {
        if !(r.is_finite() && (0.0..1.0).contains(&r)) {
            return Err(ConfigError::new(
                "slow_start.max_error_rate",
                r,
                "must be a fraction between 0 and 1, such as 0.1 for 10 %",
            ));
        }
    }
    if f.max_latency.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError::new(
            "slow_start.max_latency",
            "\"0s\"",
            "must be longer than zero; remove the key to disable the latency gate",
        ));
    }
    let latency =
        match f.mode.as_deref().unwrap_or(defaults::SLOW_START_MODE) {
            "latency" => true,
            "clock" => false,
            other => return Err(ConfigError::new(
                "slow_start.mode",
                format!("{other:?}"),
                "must be \"latency\" (grow while the backend's latency stays near its baseline) \
                 or \"clock\" (grow linearly over slow_start.duration)",
            )),
        };
    let tolerance = f.tolerance.unwrap_or(defaults::LATENCY_TOLERANCE);
    if !(tolerance.is_finite() && (1.0..=100.0).contains(&tolerance)) {
        return Err(ConfigError::new(
            "slow_start.tolerance",
            tolerance,
            "must be a factor between 1 and 100, such as 1.3 (a round is clean while its mean \
             latency is at most 1.3 × the baseline)",
        ));
    }
    let min_latency_rise = f.min_latency_rise.unwrap_or(defaults::MIN_LATENCY_RISE);
    if min_latency_rise > Duration::from_secs(10) {
        return Err(ConfigError::new(
            "slow_start.min_latency_rise",
            format!("{min_latency_rise:?}"),
            "must be at most 10s, such as \"2ms\" (a smaller rise of the latency over the \
             backend's baseline is scheduling noise, not a queue); \"0s\" judges by \
             slow_start.tolerance alone",
        ));
    }
    Ok(Some(SlowStart {
        initial: initial.min(max_inflight),
        duration,
        max_error_rate: f.max_error_rate,
        max_latency: f.max_latency,
        latency,
        tolerance,
        min_latency_rise,
    }))
}

fn learning_for(f: &file::AdmissionSection, max_inflight: u32) -> Result<Learning, ConfigError> {
    let min_inflight = match f.min_inflight {
        None => defaults::MIN_INFLIGHT.min(max_inflight.max(1)),
        Some(n) if n >= 1 && n <= i64::from(max_inflight.max(1)) => n as u32,
        Some(n) => {
            return Err(ConfigError::new(
                "admission.min_inflight",
                n,
                format!(
                    "must be between 1 and max_inflight ({max_inflight}): the learned limit's \
                     floor"
                ),
            ))
        }
    };
    Ok(Learning {
        adaptive: f.adaptive.unwrap_or(defaults::ADAPTIVE),
        min_inflight,
    })
}

fn health_config(f: &file::HealthSection) -> Result<HealthConfig, ConfigError> {
    let check_text = f.check.as_deref().unwrap_or(defaults::HEALTH_CHECK);
    let check = match check_text {
        "http" => CheckKind::Http,
        "tcp" => CheckKind::Tcp,
        "none" => CheckKind::None,
        other => {
            return Err(ConfigError::new(
                "health.check",
                format!("{other:?}"),
                "must be \"http\" (GET health.path), \"tcp\" (a connect) or \"none\"",
            ))
        }
    };
    let path = f
        .path
        .clone()
        .unwrap_or_else(|| defaults::HEALTH_PATH.into());
    if !path.starts_with('/') || path.bytes().any(|c| c.is_ascii_control() || c == b' ') {
        return Err(ConfigError::new(
            "health.path",
            format!("{path:?}"),
            "must be an absolute path such as \"/\" or \"/health\", without spaces",
        ));
    }
    let expect = match &f.expect_status {
        None => Expect::Below500,
        Some(v) if !v.is_empty() && v.iter().all(|c| (100..=599).contains(c)) => {
            Expect::Statuses(v.iter().map(|&c| c as u16).collect())
        }
        Some(v) => {
            return Err(ConfigError::new(
                "health.expect_status",
                format!("{v:?}"),
                "must list HTTP statuses between 100 and 599, such as [200, 204]; \
                 remove the key to count any answer below 500 as alive (the default)",
            ))
        }
    };
    let count = |key: &str, v: Option<i64>, default: u32, min: i64| -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if n >= min && n <= 1000 => Ok(n as u32),
            Some(n) => Err(ConfigError::new(
                key,
                n,
                format!("must be between {min} and 1000"),
            )),
        }
    };
    Ok(HealthConfig {
        check,
        path,
        expect,
        interval: positive("health.interval", f.interval, defaults::HEALTH_INTERVAL)?,
        timeout: positive("health.timeout", f.timeout, defaults::HEALTH_TIMEOUT)?,
        rise: count("health.rise", f.rise, defaults::HEALTH_RISE, 1)?,
        fall: count("health.fall", f.fall, defaults::HEALTH_FALL, 1)?,
        passive_failures: count(
            "health.passive_failures",
            f.passive_failures,
            defaults::PASSIVE_FAILURES,
            0,
        )?,
    })
}

/// The client-facing TLS listener: all of `[tls]` or none of it; the certificate and key are
/// loaded now, so `sluice check` and a reload report a bad file before anything changes.
fn tls_listener(
    t: &file::TlsSection,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
) -> Result<Option<TlsListener>, ConfigError> {
    let (text, cert, key) = match (&t.listen, &t.cert, &t.key) {
        (None, None, None) => return Ok(None),
        (Some(l), Some(c), Some(k)) => (l, c, k),
        (l, c, _) => {
            let missing = if l.is_none() {
                "tls.listen"
            } else if c.is_none() {
                "tls.cert"
            } else {
                "tls.key"
            };
            return Err(ConfigError::new(
                missing,
                "",
                "missing; a TLS listener needs listen, cert and key (remove [tls] for none)",
            ));
        }
    };
    let addr: SocketAddr = text.parse().map_err(|_| {
        ConfigError::new(
            "tls.listen",
            format!("{text:?}"),
            "not an IP:port address; write it like \"0.0.0.0:8443\"",
        )
    })?;
    if addr == listen || Some(addr) == admin {
        return Err(ConfigError::new(
            "tls.listen",
            format!("{text:?}"),
            "must differ from proxy.listen and admin.listen",
        ));
    }
    crate::tls::load_certified_key(Path::new(cert), Path::new(key))?;
    Ok(Some(TlsListener {
        listen: addr,
        cert: PathBuf::from(cert),
        key: PathBuf::from(key),
    }))
}

/// TLS toward a backend: off unless `tls = true`; the name defaults to the Host override, else
/// the address's host part (never empty: pingora skips verification for an empty name).
fn backend_tls(
    b: &file::BackendSection,
    address: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Option<BackendTls>, ConfigError> {
    if !b.tls.unwrap_or(false) {
        for (k, set) in [
            ("sni", b.sni.is_some()),
            ("tls_verify", b.tls_verify.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(
                    key(k),
                    "set",
                    "applies only to a TLS backend; add `tls = true` or remove the key",
                ));
            }
        }
        return Ok(None);
    }
    let host_part = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(address);
    let sni = b
        .sni
        .clone()
        .or_else(|| b.host.clone())
        .unwrap_or_else(|| host_part.to_string());
    if sni.is_empty() || sni.bytes().any(|c| c.is_ascii_control() || c == b' ') {
        return Err(ConfigError::new(
            key("sni"),
            format!("{sni:?}"),
            "must be the backend's DNS name or IP address, as its certificate names it",
        ));
    }
    Ok(Some(BackendTls {
        sni,
        verify: b.tls_verify.unwrap_or(true),
    }))
}

fn cluster_settings(
    c: &file::ClusterSection,
    backends: &[Backend],
    grace: Duration,
) -> Result<ClusterSettings, ConfigError> {
    let redis_text = c.redis.as_deref().ok_or_else(|| {
        ConfigError::new(
            "cluster.redis",
            "",
            "is required with [cluster]: the Redis that holds the leases, e.g. \"redis://10.0.0.5:6379/0\"",
        )
    })?;
    let redis = crate::ops::resp::RedisUrl::parse(redis_text).map_err(|why| {
        ConfigError::new(
            "cluster.redis",
            format!("{redis_text:?}"),
            format!("{why}; write it like \"redis://10.0.0.5:6379/0\" (password: redis://:PASSWORD@host)"),
        )
    })?;
    let id = c.id.clone().unwrap_or_default();
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
    if !id_ok {
        return Err(ConfigError::new(
            "cluster.id",
            format!("{id:?}"),
            "must name this instance, unique in the cluster: 1 to 64 letters, digits, '-', '_' or '.' (e.g. \"store-a\")",
        ));
    }
    let key = c
        .key
        .clone()
        .unwrap_or_else(|| defaults::CLUSTER_KEY.to_string());
    if key.is_empty() || key.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(ConfigError::new(
            "cluster.key",
            format!("{key:?}"),
            format!(
                "must be a non-empty Redis key prefix without spaces (default {:?})",
                defaults::CLUSTER_KEY
            ),
        ));
    }
    let lease_ttl = c.lease_ttl.unwrap_or(defaults::CLUSTER_LEASE_TTL);
    if lease_ttl < defaults::CLUSTER_MIN_LEASE_TTL || lease_ttl > Duration::from_secs(300) {
        return Err(ConfigError::new(
            "cluster.lease_ttl",
            format!("{:?}", humantime::format_duration(lease_ttl).to_string()),
            "must be between 300ms and 5m (default 3s): renewals run every third of it",
        ));
    }
    let instances = match c.instances {
        Some(n) if (1..=i64::from(defaults::CLUSTER_MAX_INSTANCES)).contains(&n) => n as u32,
        Some(n) => {
            return Err(ConfigError::new(
                "cluster.instances",
                n,
                format!(
                    "must be between 1 and {}: how many sluice instances share the backends",
                    defaults::CLUSTER_MAX_INSTANCES
                ),
            ))
        }
        None => {
            return Err(ConfigError::new(
                "cluster.instances",
                "",
                "is required with [cluster]: how many sluice instances share the backends (the same on every instance)",
            ))
        }
    };
    let min_cap = backends.iter().map(|b| b.max_inflight).min().unwrap_or(0);
    let safe_share = match c.safe_share {
        Some(n) if n >= 0 && n <= i64::from(min_cap) => n as u32,
        Some(n) => {
            return Err(ConfigError::new(
                "cluster.safe_share",
                n,
                format!("must be between 0 and the smallest backend cap ({min_cap}): what this instance uses of each backend when it holds no valid lease"),
            ))
        }
        None => {
            return Err(ConfigError::new(
                "cluster.safe_share",
                "",
                format!("is required with [cluster]: what this instance uses of each backend when it holds no valid lease (Redis unreachable); at most the cap / instances = {}", min_cap / instances),
            ))
        }
    };
    if let Some(b) = backends
        .iter()
        .find(|b| u64::from(instances) * u64::from(safe_share) > u64::from(b.max_inflight))
    {
        return Err(ConfigError::new(
            "cluster.safe_share",
            safe_share,
            format!(
                "{instances} instances × {safe_share} = {} exceeds backend {:?}'s cap of {}: with Redis unreachable every instance uses its safe share, and the backend would see more than its cap; use at most {}",
                u64::from(instances) * u64::from(safe_share),
                b.name,
                b.max_inflight,
                b.max_inflight / instances
            ),
        ));
    }
    let step = match c.step {
        None => None,
        Some(n) if (1..=i64::from(defaults::MAX_INFLIGHT_CEILING)).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ConfigError::new(
                "cluster.step",
                n,
                "must be at least 1: the largest change of a share per renewal (default: an eighth of the cap)",
            ))
        }
    };
    Ok(ClusterSettings {
        redis,
        id,
        key,
        lease_ttl,
        margin: lease_ttl.mul_f64(defaults::CLUSTER_MARGIN_SHARE),
        safe_share,
        instances,
        step,
        grace,
    })
}

fn limit(key: &str, n: i64) -> Result<u32, ConfigError> {
    if n < 1 || n > i64::from(defaults::MAX_INFLIGHT_CEILING) {
        return Err(ConfigError::new(
            key,
            n,
            format!(
                "must be between 1 and {}: the number of concurrent requests the backend can take",
                defaults::MAX_INFLIGHT_CEILING
            ),
        ));
    }
    Ok(n as u32)
}

fn positive(
    key: &str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(d) if d.is_zero() => Err(ConfigError::new(
            key,
            "\"0s\"",
            format!(
                "must be longer than zero (default {})",
                humantime::format_duration(default)
            ),
        )),
        Some(d) => Ok(d),
    }
}

fn resolve(address: &str) -> Result<SocketAddr, String> {
    match address.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| "resolves to no address; use an IP:port".to_string()),
        Err(e) => Err(format!(
            "not a usable host:port ({e}); write it like \"10.0.0.5:80\""
        )),
    }
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
