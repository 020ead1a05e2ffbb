//! The file layer: serde structs that mirror the configuration file exactly.
//!
//! Unknown keys are rejected, durations are written as `"10s"` / `"250ms"`, and every key is
//! optional here (defaults and ranges are the validation layer's business, [`super::validate`]).
//!
//! Each section is declared through the `section!` macro, which also lists the section's keys in
//! [`Section::KEYS`], each with what a reload does when it changes ([`Reload`]) and an example
//! value. A key cannot be declared without saying how a reload treats it, and [`keys`] lists
//! every key of the file; the reload test changes each one and checks the reload diff
//! ([`super::diff()`]) reports it as that class.

use std::time::Duration;

use serde::Deserialize;

/// What a reload does when a key changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The change is applied to the running proxy.
    InPlace,
    /// The change takes effect only after an upgrade (`sluice run --upgrade`).
    Upgrade,
}

/// One key of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Its section, e.g. `proxy` (`backend` for the `[[backend]]` entries).
    pub section: &'static str,
    /// The key inside its section, e.g. `listen`.
    pub field: &'static str,
    /// Dotted name, e.g. `proxy.listen`.
    pub name: &'static str,
    /// What a reload does when it changes.
    pub reload: Reload,
    /// A valid value for it, as TOML (`"\"10s\""`), differing from the default.
    pub example: &'static str,
}

/// A section of the file, with its keys.
pub trait Section {
    /// Every key of the section.
    const KEYS: &'static [Key];
}

impl<T: Section> Section for Option<T> {
    const KEYS: &'static [Key] = T::KEYS;
}

impl<T: Section> Section for Vec<T> {
    const KEYS: &'static [Key] = T::KEYS;
}

/// Declares a section struct (serde, unknown keys refused) and its [`Section::KEYS`]: every
/// field must say how a reload treats it (`InPlace` / `Upgrade`) and give an example value.
macro_rules! section {
    (
        $(#[$meta:meta])*
        $name:ident = $section:literal {
            $(
                $(#[$fmeta:meta])*
                $field:ident: $ty:ty => $reload:ident($example:expr),
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                pub $field: $ty,
            )*
        }

        impl Section for $name {
            const KEYS: &'static [Key] = &[
                $(
                    Key {
                        section: $section,
                        field: stringify!($field),
                        name: concat!($section, ".", stringify!($field)),
                        reload: Reload::$reload,
                        example: $example,
                    },
                )*
            ];
        }
    };
}

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

/// Every key of the file, section by section.
pub fn keys() -> Vec<Key> {
    fn of<S: Section>(_: &S) -> &'static [Key] {
        S::KEYS
    }
    // Destructured without `..`: a new section does not compile until it is listed here (an
    // unused binding is a warning, and warnings fail the build).
    let FileConfig {
        proxy,
        admission,
        upstream,
        backends,
        tls,
        server,
        slow_start,
        health,
        admin,
        log,
        cluster,
    } = FileConfig::default();
    [
        of(&proxy),
        of(&admission),
        of(&upstream),
        of(&backends),
        of(&tls),
        of(&server),
        of(&slow_start),
        of(&health),
        of(&admin),
        of(&log),
        of(&cluster),
    ]
    .concat()
}

section! {
    /// `[cluster]`
    ClusterSection = "cluster" {
        /// `redis = "redis://10.0.0.5:6379/0"`
        redis: Option<String> => Upgrade(r#""redis://127.0.0.1:6380""#),
        /// `id = "store-a"`: this instance's name, unique in the cluster.
        id: Option<String> => Upgrade(r#""store-b""#),
        /// `key = "sluice"`: Redis key prefix.
        key: Option<String> => Upgrade(r#""other""#),
        /// `lease_ttl = "3s"`
        #[serde(default, with = "opt_duration")]
        lease_ttl: Option<Duration> => Upgrade(r#""4s""#),
        /// `safe_share = 8`: what this instance uses of each backend without a valid lease.
        safe_share: Option<i64> => Upgrade("3"),
        /// `instances = 3`: how many instances share the backends.
        instances: Option<i64> => Upgrade("3"),
        /// `step = 4`: largest change of a share per renewal (default: an eighth of the cap).
        step: Option<i64> => Upgrade("2"),
    }
}

section! {
    /// `[log]`
    LogSection = "log" {
        /// `access = "stdout"` | `"off"` | `"/var/log/sluice/access.log"`
        access: Option<String> => InPlace(r#""off""#),
    }
}

section! {
    /// `[slow_start]`
    SlowStartSection = "slow_start" {
        /// `duration = "10s"` ("0s" disables the ramp)
        #[serde(default, with = "opt_duration")]
        duration: Option<Duration> => InPlace(r#""20s""#),
        /// `initial = 5`: the limit at the start of the ramp.
        initial: Option<i64> => InPlace("5"),
        /// `max_error_rate = 0.2`: hold the ramp while more errors than this.
        max_error_rate: Option<f64> => InPlace("0.2"),
        /// `max_latency = "500ms"`: hold the ramp while slower than this.
        #[serde(default, with = "opt_duration")]
        max_latency: Option<Duration> => InPlace(r#""500ms""#),
        /// `mode = "latency"` or `"clock"`.
        mode: Option<String> => InPlace(r#""clock""#),
        /// `tolerance = 1.3`: latency mode's bound on a clean round's mean latency, × the
        /// baseline.
        tolerance: Option<f64> => InPlace("1.5"),
        /// `min_latency_rise = "2ms"`: a rise over the baseline smaller than this is never
        /// inflation, whatever the ratio.
        #[serde(default, with = "opt_duration")]
        min_latency_rise: Option<Duration> => InPlace(r#""3ms""#),
    }
}

section! {
    /// `[health]`
    HealthSection = "health" {
        /// `check = "http"` | `"tcp"` | `"none"`
        check: Option<String> => Upgrade(r#""tcp""#),
        /// `path = "/"`
        path: Option<String> => Upgrade(r#""/health""#),
        /// `expect_status = [200]` (absent: any answer below 500)
        expect_status: Option<Vec<i64>> => Upgrade("[200]"),
        /// `interval = "2s"`
        #[serde(default, with = "opt_duration")]
        interval: Option<Duration> => Upgrade(r#""3s""#),
        /// `timeout = "1s"`
        #[serde(default, with = "opt_duration")]
        timeout: Option<Duration> => Upgrade(r#""2s""#),
        /// `rise = 2`
        rise: Option<i64> => Upgrade("3"),
        /// `fall = 3`
        fall: Option<i64> => Upgrade("4"),
        /// `passive_failures = 3` (0 disables passive checks)
        passive_failures: Option<i64> => Upgrade("0"),
    }
}

section! {
    /// `[admin]`
    AdminSection = "admin" {
        /// `listen = "127.0.0.1:9090"`; `""` disables the admin listener.
        listen: Option<String> => Upgrade(r#""127.0.0.1:9091""#),
        /// `token_file = "/etc/sluice/admin.token"`: every admin request must carry
        /// `Authorization: Bearer <the file's content>`.
        token_file: Option<String> => Upgrade(r#""/etc/sluice/admin.token""#),
        /// `metrics_open = true`: `GET /metrics` needs no token.
        metrics_open: Option<bool> => Upgrade("true"),
    }
}

section! {
    /// `[proxy]`
    ProxySection = "proxy" {
        /// `listen = "0.0.0.0:8080"`
        listen: Option<String> => Upgrade(r#""0.0.0.0:8081""#),
        /// `client_read_buffer_bytes = 8192`
        client_read_buffer_bytes: Option<usize> => Upgrade("8192"),
        /// `client_write_buffer_bytes = 1460`
        client_write_buffer_bytes: Option<usize> => Upgrade("0"),
        /// `client_write_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        client_write_timeout: Option<Duration> => InPlace(r#""31s""#),
        /// `client_keepalive_timeout = "120s"`
        #[serde(default, with = "opt_duration")]
        client_keepalive_timeout: Option<Duration> => InPlace(r#""121s""#),
        /// `max_header_bytes = 16384`
        max_header_bytes: Option<i64> => InPlace("32768"),
        /// `max_body_bytes = 1048576`
        max_body_bytes: Option<i64> => InPlace("2048"),
        /// `max_connections = 10000`
        max_connections: Option<i64> => InPlace("500"),
        /// `max_connections_per_ip = 0`
        max_connections_per_ip: Option<i64> => InPlace("8"),
        /// `client_header_timeout = "10s"`
        #[serde(default, with = "opt_duration")]
        client_header_timeout: Option<Duration> => InPlace(r#""11s""#),
        /// `client_body_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        client_body_timeout: Option<Duration> => InPlace(r#""29s""#),
        /// `client_body_start_timeout = "2s"`
        #[serde(default, with = "opt_duration")]
        client_body_start_timeout: Option<Duration> => InPlace(r#""3s""#),
        /// `client_body_min_rate = 240` (bytes per second; 0 disables)
        client_body_min_rate: Option<i64> => InPlace("100"),
        /// `max_buffered_body_bytes = 67108864`
        max_buffered_body_bytes: Option<i64> => InPlace("1073741824"),
        /// `request_timeout = "300s"`
        #[serde(default, with = "opt_duration")]
        request_timeout: Option<Duration> => InPlace(r#""301s""#),
    }
}

section! {
    /// `[admission]`
    AdmissionSection = "admission" {
        /// `max_inflight = 50`: per backend, unless the backend sets its own.
        max_inflight: Option<i64> => InPlace("17"),
        /// `max_queue = 1000`
        max_queue: Option<i64> => InPlace("10"),
        /// `rate = 100.0`: requests per second per backend (unset: no rate limit).
        rate: Option<f64> => InPlace("50.0"),
        /// `burst = 20`: requests allowed at once above the rate (default: max_inflight).
        burst: Option<i64> => InPlace("5"),
        /// `queue_timeout = "10s"`
        #[serde(default, with = "opt_duration")]
        queue_timeout: Option<Duration> => InPlace(r#""9s""#),
        /// `retry_after = "2s"`
        #[serde(default, with = "opt_duration")]
        retry_after: Option<Duration> => InPlace(r#""3s""#),
        /// `adaptive = false`: lower the limit below max_inflight when latency inflates.
        adaptive: Option<bool> => InPlace("true"),
        /// `min_inflight = 1`: the learned limit's floor.
        min_inflight: Option<i64> => InPlace("2"),
    }
}

section! {
    /// `[upstream]`
    UpstreamSection = "upstream" {
        /// `connect_timeout = "2s"`
        #[serde(default, with = "opt_duration")]
        connect_timeout: Option<Duration> => InPlace(r#""3s""#),
        /// `idle_timeout = "60s"`
        #[serde(default, with = "opt_duration")]
        idle_timeout: Option<Duration> => InPlace(r#""61s""#),
        /// `read_timeout = "60s"`
        #[serde(default, with = "opt_duration")]
        read_timeout: Option<Duration> => InPlace(r#""61s""#),
        /// `write_timeout = "30s"`
        #[serde(default, with = "opt_duration")]
        write_timeout: Option<Duration> => InPlace(r#""31s""#),
        /// `ca_file = "/etc/sluice/backend-ca.pem"`: CAs for TLS backends.
        ca_file: Option<String> => Upgrade(r#""/etc/sluice/backend-ca.pem""#),
        /// `timeout_hold = "30s"`
        #[serde(default, with = "opt_duration")]
        timeout_hold: Option<Duration> => InPlace(r#""31s""#),
    }
}

section! {
    /// `[tls]`
    TlsSection = "tls" {
        /// `listen = "0.0.0.0:8443"`
        listen: Option<String> => Upgrade(r#""127.0.0.1:8444""#),
        /// `cert = "/etc/sluice/tls/cert.pem"`: certificate chain, PEM.
        cert: Option<String> => InPlace(r#""/etc/sluice/tls/other-cert.pem""#),
        /// `key = "/etc/sluice/tls/key.pem"`: private key, PEM.
        key: Option<String> => InPlace(r#""/etc/sluice/tls/other-key.pem""#),
    }
}

section! {
    /// One `[[backend]]` entry.
    BackendSection = "backend" {
        /// `name = "iis-1"` (defaults to the address)
        name: Option<String> => InPlace(r#""iis-2""#),
        /// `address = "10.0.0.5:80"`
        address: Option<String> => InPlace(r#""127.0.0.1:10""#),
        /// `host = "pos.example.com"`: Host header sent to this backend.
        host: Option<String> => InPlace(r#""pos.example.com""#),
        /// `max_inflight = 50`: overrides `[admission] max_inflight`.
        max_inflight: Option<i64> => InPlace("15"),
        /// `rate = 100.0`: overrides `[admission] rate`.
        rate: Option<f64> => InPlace("10.0"),
        /// `tls = true`: speak TLS to this backend.
        tls: Option<bool> => InPlace("false"),
        /// `sni = "pos.example.com"`: the name sent and verified (TLS backends).
        sni: Option<String> => InPlace(r#""pos.example.com""#),
        /// `tls_verify = true`: verify the backend's certificate and name.
        tls_verify: Option<bool> => InPlace("false"),
    }
}

section! {
    /// `[server]`
    ServerSection = "server" {
        /// `threads = 2`
        threads: Option<i64> => Upgrade("3"),
        /// `grace_period = "10s"`
        #[serde(default, with = "opt_duration")]
        grace_period: Option<Duration> => Upgrade(r#""11s""#),
        /// `graceful_shutdown_timeout = "5s"`
        #[serde(default, with = "opt_duration")]
        graceful_shutdown_timeout: Option<Duration> => Upgrade(r#""6s""#),
        /// `pid_file = "/run/sluice/sluice.pid"`
        pid_file: Option<String> => Upgrade(r#""/run/sluice/other.pid""#),
        /// `upgrade_sock = "/run/sluice/upgrade.sock"`
        upgrade_sock: Option<String> => Upgrade(r#""/run/sluice/other.sock""#),
        /// `error_log = "/var/log/sluice/error.log"` (daemon mode only)
        error_log: Option<String> => Upgrade(r#""/var/log/sluice/error.log""#),
    }
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
