//! The validation layer: the file layer, with command-line overrides applied, checked section by
//! section into a [`Validated`] configuration.
//!
//! Pure: nothing here looks a name up or reads a file (that is [`super::resolve`]), so any
//! text can be validated, host names included, and the fuzzer does exactly that. Each section
//! has one function (or `TryFrom`) that checks it; every integer range goes through
//! `ranged`, every duration that must not be zero through `positive`. The first problem is
//! returned as a [`ConfigError`] naming the key, the value and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    defaults, file, BackendTls, CheckKind, ClusterSettings, ConfigError, Expect, HealthConfig,
    Learning, LoadError, Overrides, ServerSettings, SlowStart, TlsListener, Upstream,
};
use crate::observe::access_log::Target;

/// A configuration that passed every check that needs no I/O: backend addresses are as
/// written (not yet resolved), and files (TLS certificate and key, CA bundle, admin token) are
/// named but not yet read.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// `[proxy]`
    pub proxy: ProxySettings,
    /// The queue and `Retry-After` from `[admission]` (the limits go to each backend).
    pub queue: QueueSettings,
    /// `[upstream]`; `ca_file` is not yet checked.
    pub upstream: Upstream,
    /// `[[backend]]`, in order; never empty.
    pub backends: Vec<BackendPlan>,
    /// `[server]`
    pub server: ServerSettings,
    /// `[health]`
    pub health: HealthConfig,
    /// `[admin]`
    pub admin: AdminSettings,
    /// `[cluster]`
    pub cluster: Option<ClusterSettings>,
    /// `[tls]`; the files are not yet read.
    pub tls: Option<TlsListener>,
    /// `[log] access`
    pub access_log: Target,
}

/// The validated `[proxy]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
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
    /// Largest request header, bytes.
    pub max_header_bytes: usize,
    /// Largest request body, bytes.
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
}

/// The queue settings of `[admission]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Queue bound, across all backends.
    pub max_queue: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// `Retry-After` on generated 503s.
    pub retry_after: Duration,
}

/// The validated `[admin]` section; the token file is not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Admin listener, if enabled.
    pub listen: Option<SocketAddr>,
    /// `admin.token_file`, as written.
    pub token_file: Option<String>,
    /// `GET /metrics` needs no token.
    pub metrics_open: bool,
}

/// One validated `[[backend]]`, its address not yet resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendPlan {
    /// Name used in logs and status output.
    pub name: String,
    /// Address as written (`host:port`).
    pub address: String,
    /// Host header override.
    pub host: Option<String>,
    /// Concurrency cap.
    pub max_inflight: u32,
    /// Request rate limit (per second) and burst.
    pub rate: Option<(f64, u32)>,
    /// Slow-start ramp, if enabled.
    pub slow_start: Option<SlowStart>,
    /// Learned-limit settings.
    pub learning: Learning,
    /// TLS toward the backend, if enabled.
    pub tls: Option<BackendTls>,
}

impl Validated {
    /// Parse configuration text and validate it, overrides applied. `path` only labels error
    /// messages. No I/O.
    pub fn parse(
        text: &str,
        path: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Validated, LoadError> {
        let file = super::parse_file(text, path)?;
        validate(file, overrides).map_err(|error| LoadError::Invalid {
            path: path.map(Path::to_owned),
            error,
        })
    }
}

/// Apply command-line overrides to the file layer (a flag goes through the same checks as the
/// file's value).
pub fn apply_overrides(f: &mut file::FileConfig, o: &Overrides) {
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
}

/// Validate the file layer with overrides applied. Pure.
pub fn validate(mut f: file::FileConfig, o: &Overrides) -> Result<Validated, ConfigError> {
    apply_overrides(&mut f, o);
    let proxy = ProxySettings::try_from(&f.proxy)?;
    let default_inflight = match f.admission.max_inflight {
        Some(n) => Some(limit("admission.max_inflight", n)?),
        None => None,
    };
    let queue = QueueSettings::try_from(&f.admission)?;
    if proxy.request_timeout <= queue.queue_timeout {
        return Err(ConfigError::new(
            "proxy.request_timeout",
            format!("\"{}\"", humantime::format_duration(proxy.request_timeout)),
            format!(
                "must be longer than admission.queue_timeout ({}): the request deadline \
                 counts the time in the queue, and a queued request must get its 503",
                humantime::format_duration(queue.queue_timeout)
            ),
        ));
    }
    let upstream = Upstream::try_from(&f.upstream)?;
    let backends = backends(&f, default_inflight)?;
    let server = ServerSettings::try_from(&f.server)?;
    let health = HealthConfig::try_from(&f.health)?;
    let admin = admin(&f.admin, proxy.listen)?;
    let tls = tls_listener(&f.tls, proxy.listen, admin.listen)?;
    let access_log = access_log(&f.log)?;
    let grace = proxy.request_timeout.saturating_add(upstream.timeout_hold);
    let cluster = match &f.cluster {
        None => None,
        Some(c) => Some(cluster_settings(c, &backends, grace)?),
    };
    Ok(Validated {
        proxy,
        queue,
        upstream,
        backends,
        server,
        health,
        admin,
        cluster,
        tls,
        access_log,
    })
}

/// The one range check: `value` (or `default` when absent) must lie in `min..=max`; otherwise
/// the error names the key, the value and `fix` (built only on error).
fn ranged<T: TryFrom<i64>>(
    key: &str,
    value: Option<i64>,
    default: T,
    (min, max): (i64, i64),
    fix: impl FnOnce() -> String,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(n) => match T::try_from(n) {
            Ok(v) if (min..=max).contains(&n) => Ok(v),
            _ => Err(ConfigError::new(key, n, fix())),
        },
    }
}

/// A duration that must be longer than zero; `default` when absent.
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

/// A concurrency cap: between 1 and [`defaults::MAX_INFLIGHT_CEILING`].
fn limit(key: &str, n: i64) -> Result<u32, ConfigError> {
    ranged(
        key,
        Some(n),
        0,
        (1, i64::from(defaults::MAX_INFLIGHT_CEILING)),
        || {
            format!(
                "must be between 1 and {}: the number of concurrent requests the backend can take",
                defaults::MAX_INFLIGHT_CEILING
            )
        },
    )
}

/// An IP:port address.
fn address(key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::new(key, format!("{text:?}"), example))
}

impl TryFrom<&file::ProxySection> for ProxySettings {
    type Error = ConfigError;

    fn try_from(f: &file::ProxySection) -> Result<Self, ConfigError> {
        let listen_text = f.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = address(
            "proxy.listen",
            listen_text,
            "not an IP:port address; write it like \"0.0.0.0:8080\" or \"[::]:8080\"",
        )?;
        let as_i64 = |v: Option<usize>| v.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let client_read_buffer_bytes = ranged(
            "proxy.client_read_buffer_bytes",
            as_i64(f.client_read_buffer_bytes),
            defaults::CLIENT_READ_BUFFER_BYTES,
            (0, 1024 * 1024),
            || "must be between 0 (unbuffered, the default) and 1048576 bytes".into(),
        )?;
        let client_write_buffer_bytes = ranged(
            "proxy.client_write_buffer_bytes",
            as_i64(f.client_write_buffer_bytes),
            defaults::CLIENT_WRITE_BUFFER_BYTES,
            (0, 1024 * 1024),
            || "must be between 0 (unbuffered) and 1048576 bytes (default 1460)".into(),
        )?;
        let client_write_timeout = positive(
            "proxy.client_write_timeout",
            f.client_write_timeout,
            defaults::CLIENT_WRITE_TIMEOUT,
        )?;
        let client_keepalive_timeout = positive(
            "proxy.client_keepalive_timeout",
            f.client_keepalive_timeout,
            defaults::CLIENT_KEEPALIVE_TIMEOUT,
        )?;
        let bytes = |key: &str, v: Option<i64>, default: usize, range: (i64, i64)| {
            ranged(key, v, default, range, || {
                format!(
                    "must be between {} and {} bytes (default {default})",
                    range.0, range.1
                )
            })
        };
        let max_header_bytes = bytes(
            "proxy.max_header_bytes",
            f.max_header_bytes,
            defaults::MAX_HEADER_BYTES,
            (1024, 1024 * 1024),
        )?;
        let max_body_bytes = bytes(
            "proxy.max_body_bytes",
            f.max_body_bytes,
            defaults::MAX_BODY_BYTES,
            (0, 1 << 40),
        )?;
        let connections = |key: &str, v: Option<i64>, default: usize, min: i64, what: &str| {
            ranged(key, v, default, (min, 1_000_000), || {
                format!("must be between {min}{what} and 1000000 (default {default})")
            })
        };
        let max_connections = connections(
            "proxy.max_connections",
            f.max_connections,
            defaults::MAX_CONNECTIONS,
            1,
            "",
        )?;
        let max_connections_per_ip = connections(
            "proxy.max_connections_per_ip",
            f.max_connections_per_ip,
            defaults::MAX_CONNECTIONS_PER_IP,
            0,
            " (no per-IP cap)",
        )?;
        let client_header_timeout = positive(
            "proxy.client_header_timeout",
            f.client_header_timeout,
            defaults::CLIENT_HEADER_TIMEOUT,
        )?;
        let client_body_timeout = positive(
            "proxy.client_body_timeout",
            f.client_body_timeout,
            defaults::CLIENT_BODY_TIMEOUT,
        )?;
        // The default start deadline gives way to a shorter whole-body deadline; one set
        // explicitly must fit in it.
        let client_body_start_timeout = positive(
            "proxy.client_body_start_timeout",
            f.client_body_start_timeout,
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
        let client_body_min_rate = ranged(
            "proxy.client_body_min_rate",
            f.client_body_min_rate,
            defaults::CLIENT_BODY_MIN_RATE,
            (0, 1_000_000_000),
            || {
                format!(
                    "must be between 0 (no rate rule) and 1000000000 bytes per second \
                     (default {})",
                    defaults::CLIENT_BODY_MIN_RATE
                )
            },
        )?;
        let max_buffered_body_bytes = bytes(
            "proxy.max_buffered_body_bytes",
            f.max_buffered_body_bytes,
            defaults::MAX_BUFFERED_BODY_BYTES,
            (0, 1 << 40),
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
            f.request_timeout,
            defaults::REQUEST_TIMEOUT,
        )?;
        Ok(ProxySettings {
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
        })
    }
}

impl TryFrom<&file::AdmissionSection> for QueueSettings {
    type Error = ConfigError;

    fn try_from(f: &file::AdmissionSection) -> Result<Self, ConfigError> {
        let max_queue = ranged(
            "admission.max_queue",
            f.max_queue,
            defaults::MAX_QUEUE,
            (0, 1_000_000),
            || "must be between 0 (no queue: reject when the backend is full) and 1000000".into(),
        )?;
        let queue_timeout = positive(
            "admission.queue_timeout",
            f.queue_timeout,
            defaults::QUEUE_TIMEOUT,
        )?;
        Ok(QueueSettings {
            max_queue,
            queue_timeout,
            retry_after: f.retry_after.unwrap_or(defaults::RETRY_AFTER),
        })
    }
}

impl TryFrom<&file::UpstreamSection> for Upstream {
    type Error = ConfigError;

    fn try_from(f: &file::UpstreamSection) -> Result<Self, ConfigError> {
        Ok(Upstream {
            connect_timeout: positive(
                "upstream.connect_timeout",
                f.connect_timeout,
                defaults::CONNECT_TIMEOUT,
            )?,
            idle_timeout: positive(
                "upstream.idle_timeout",
                f.idle_timeout,
                defaults::IDLE_TIMEOUT,
            )?,
            read_timeout: positive(
                "upstream.read_timeout",
                f.read_timeout,
                defaults::READ_TIMEOUT,
            )?,
            write_timeout: positive(
                "upstream.write_timeout",
                f.write_timeout,
                defaults::WRITE_TIMEOUT,
            )?,
            timeout_hold: f.timeout_hold.unwrap_or(defaults::TIMEOUT_HOLD),
            // Checked (read) by the resolution layer.
            ca_file: f.ca_file.clone(),
        })
    }
}

/// Every `[[backend]]`, with the `[admission]` and `[slow_start]` settings they inherit.
fn backends(
    f: &file::FileConfig,
    default_inflight: Option<u32>,
) -> Result<Vec<BackendPlan>, ConfigError> {
    if f.backends.is_empty() {
        return Err(ConfigError::new(
            "backend",
            "",
            "no backend configured; add a [[backend]] section with `address = \"host:port\"` \
             (or pass --backend host:port)",
        ));
    }
    let mut backends: Vec<BackendPlan> = Vec::with_capacity(f.backends.len());
    for (i, b) in f.backends.iter().enumerate() {
        let key = |k: &str| format!("backend[{i}].{k}");
        let address = b.address.clone().ok_or_else(|| {
            ConfigError::new(
                key("address"),
                "",
                "missing; set it to the backend's \"host:port\"",
            )
        })?;
        check_address(&address)
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
                let burst = ranged(
                    "admission.burst",
                    f.admission.burst,
                    max_inflight,
                    (1, 1_000_000),
                    || "must be between 1 and 1000000 requests".into(),
                )?;
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
        backends.push(BackendPlan {
            name,
            address,
            host: b.host.clone(),
            max_inflight,
            rate,
            slow_start,
            learning,
            tls,
        });
    }
    Ok(backends)
}

/// The checks on a backend's `host:port` that need no lookup, with the messages the lookup
/// would give (`to_socket_addrs` refuses the same texts before any DNS query).
fn check_address(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(format!(
            "not a usable host:port ({why}); write it like \"10.0.0.5:80\""
        ))
    };
    // An empty or unknown host is left to the lookup.
    let Some((_host, port)) = address.rsplit_once(':') else {
        return bad("invalid socket address");
    };
    if port.parse::<u16>().is_err() {
        return bad("invalid port value");
    }
    Ok(())
}

fn slow_start_for(
    f: &file::SlowStartSection,
    max_inflight: u32,
) -> Result<Option<SlowStart>, ConfigError> {
    let duration = f.duration.unwrap_or(defaults::SLOW_START_DURATION);
    if duration.is_zero() {
        return Ok(None);
    }
    let default_initial =
        ((f64::from(max_inflight) * defaults::SLOW_START_INITIAL_SHARE).ceil() as u32).max(1);
    let initial = ranged(
        "slow_start.initial",
        f.initial,
        default_initial,
        (1, i64::from(defaults::MAX_INFLIGHT_CEILING)),
        || {
            "must be at least 1 (the limit the ramp starts from); set slow_start.duration = \
             \"0s\" to disable the ramp"
                .into()
        },
    )?;
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
    let ceiling = max_inflight.max(1);
    let min_inflight = ranged(
        "admission.min_inflight",
        f.min_inflight,
        defaults::MIN_INFLIGHT.min(ceiling),
        (1, i64::from(ceiling)),
        || {
            format!(
                "must be between 1 and max_inflight ({max_inflight}): the learned limit's \
                 floor"
            )
        },
    )?;
    Ok(Learning {
        adaptive: f.adaptive.unwrap_or(defaults::ADAPTIVE),
        min_inflight,
    })
}

impl TryFrom<&file::ServerSection> for ServerSettings {
    type Error = ConfigError;

    fn try_from(f: &file::ServerSection) -> Result<Self, ConfigError> {
        let threads = ranged(
            "server.threads",
            f.threads,
            defaults::THREADS,
            (1, 256),
            || "must be between 1 and 256 (one or two per core is plenty)".into(),
        )?;
        Ok(ServerSettings {
            threads,
            grace_period: f.grace_period.unwrap_or(defaults::GRACE_PERIOD),
            graceful_shutdown_timeout: f
                .graceful_shutdown_timeout
                .unwrap_or(defaults::GRACEFUL_SHUTDOWN_TIMEOUT),
            pid_file: f
                .pid_file
                .clone()
                .unwrap_or_else(|| defaults::PID_FILE.into()),
            upgrade_sock: f
                .upgrade_sock
                .clone()
                .unwrap_or_else(|| defaults::UPGRADE_SOCK.into()),
            error_log: f.error_log.clone(),
        })
    }
}

impl TryFrom<&file::HealthSection> for HealthConfig {
    type Error = ConfigError;

    fn try_from(f: &file::HealthSection) -> Result<Self, ConfigError> {
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
        let count = |key: &str, v: Option<i64>, default: u32, min: i64| {
            ranged(key, v, default, (min, 1000), || {
                format!("must be between {min} and 1000")
            })
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
}

/// `[admin]`: the listener must differ from the proxy's, and one off loopback needs a token.
fn admin(f: &file::AdminSection, listen: SocketAddr) -> Result<AdminSettings, ConfigError> {
    let admin_text = f.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN);
    let admin_listen = if admin_text.is_empty() {
        None
    } else {
        let a = address(
            "admin.listen",
            admin_text,
            "not an IP:port address; write it like \"127.0.0.1:9090\", or \"\" to disable",
        )?;
        if a == listen {
            return Err(ConfigError::new(
                "admin.listen",
                format!("{admin_text:?}"),
                "must differ from proxy.listen",
            ));
        }
        Some(a)
    };
    if let (Some(a), None) = (admin_listen, &f.token_file) {
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
    Ok(AdminSettings {
        listen: admin_listen,
        token_file: f.token_file.clone(),
        metrics_open: f.metrics_open.unwrap_or(false),
    })
}

/// `[log] access`: stdout, off, or an absolute file path.
fn access_log(f: &file::LogSection) -> Result<Target, ConfigError> {
    let access_text = f.access.as_deref().unwrap_or(defaults::ACCESS_LOG);
    let access_log = Target::parse(access_text);
    if let Target::File(p) = &access_log {
        if !p.is_absolute() {
            return Err(ConfigError::new(
                "log.access",
                format!("{access_text:?}"),
                "must be \"stdout\", \"off\" or an absolute file path",
            ));
        }
    }
    Ok(access_log)
}

/// The client-facing TLS listener: all of `[tls]` or none of it. The files are read by the
/// resolution layer, so `sluice check` and a reload report a bad file before anything changes.
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
    let addr = address(
        "tls.listen",
        text,
        "not an IP:port address; write it like \"0.0.0.0:8443\"",
    )?;
    if addr == listen || Some(addr) == admin {
        return Err(ConfigError::new(
            "tls.listen",
            format!("{text:?}"),
            "must differ from proxy.listen and admin.listen",
        ));
    }
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

/// `[cluster]`: the shared budget; every instance's safe share must fit every backend's cap.
fn cluster_settings(
    c: &file::ClusterSection,
    backends: &[BackendPlan],
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
        Some(n) => ranged(
            "cluster.instances",
            Some(n),
            0,
            (1, i64::from(defaults::CLUSTER_MAX_INSTANCES)),
            || {
                format!(
                    "must be between 1 and {}: how many sluice instances share the backends",
                    defaults::CLUSTER_MAX_INSTANCES
                )
            },
        )?,
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
        Some(n) => ranged("cluster.safe_share", Some(n), 0, (0, i64::from(min_cap)), || {
            format!("must be between 0 and the smallest backend cap ({min_cap}): what this instance uses of each backend when it holds no valid lease")
        })?,
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
    let step = c
        .step
        .map(|n| {
            ranged(
                "cluster.step",
                Some(n),
                0,
                (1, i64::from(defaults::MAX_INFLIGHT_CEILING)),
                || {
                    "must be at least 1: the largest change of a share per renewal (default: an eighth of the cap)"
                        .into()
                },
            )
        })
        .transpose()?;
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
