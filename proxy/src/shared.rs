//! The state every part of the running proxy shares: the admission pool, the request-path
//! settings snapshot (swapped whole on reload), metrics, the access log, and the backends as
//! the service dials them.

use std::sync::Arc;
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;

use crate::admission::Admission;
use crate::config::Config;
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::snapshot::Snapshot;

/// A backend as the service sees it.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Name, for logs and metrics.
    pub name: String,
    /// Address as configured (the default Host of health checks).
    pub address: String,
    /// Resolved address.
    pub addr: std::net::SocketAddr,
    /// The prebuilt peer: the same value for every request keeps connections pooled.
    pub peer: HttpPeer,
    /// Host header override.
    pub host: Option<String>,
    /// Its request-path metric series.
    pub metrics: crate::observe::metrics::BackendHandles,
}

/// The running configuration, one snapshot swapped whole on reload: the validated config in
/// force, and what the request path reads, prepared from it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The validated configuration in force (a reload diffs the new file against it).
    pub config: Arc<Config>,
    /// Backends by index (an index never changes meaning while the process runs).
    pub upstreams: Vec<Upstream>,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// `Retry-After` seconds.
    pub retry_after_secs: u64,
    /// Per-write timeout toward clients.
    pub client_write_timeout: Duration,
    /// Idle keep-alive timeout toward clients, whole seconds.
    pub client_keepalive_secs: u64,
    /// Largest request header, bytes.
    pub max_header_bytes: usize,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Open client connections, all clients together.
    pub max_connections: usize,
    /// Open client connections per client IP; 0 = no per-IP cap.
    pub max_connections_per_ip: usize,
    /// Idle keep-alive timeout toward clients.
    pub client_keepalive_timeout: Duration,
    /// Time to send a whole request header.
    pub client_header_timeout: Duration,
    /// How fast a request body must arrive.
    pub body_pace: sluice_plugins::body_pace::BodyPace,
    /// Request body bytes buffered at once, all requests together.
    pub max_buffered_body_bytes: usize,
    /// Longest a request may take, complete header to delivered response.
    pub request_timeout: Duration,
    /// How long a slot stays taken after an upstream timeout or a cut exchange.
    pub timeout_hold: Duration,
}

/// Build an upstream peer for a configured backend. A plain-TCP backend is dialed by sluice
/// (registered in `dialed`), so that a timed-out request's late answer can be read
/// ([`crate::ghost`]).
pub fn upstream(
    cfg: &Config,
    b: &crate::config::Backend,
    dialed: &Arc<crate::ghost::Conns>,
) -> Upstream {
    let (tls, sni) = match &b.tls {
        Some(t) => (true, t.sni.clone()),
        None => (false, String::new()),
    };
    let mut peer = HttpPeer::new(b.addr, tls, sni);
    let o = &mut peer.options;
    if let Some(t) = &b.tls {
        o.verify_cert = t.verify;
        o.verify_hostname = t.verify;
    }
    o.connection_timeout = Some(cfg.upstream.connect_timeout);
    o.idle_timeout = Some(cfg.upstream.idle_timeout);
    o.read_timeout = Some(cfg.upstream.read_timeout);
    o.write_timeout = Some(cfg.upstream.write_timeout);
    if b.tls.is_none() {
        o.custom_l4 = Some(Arc::new(crate::ghost::Dialer::new(
            dialed.clone(),
            cfg.upstream.connect_timeout,
        )));
    }
    Upstream {
        name: b.name.clone(),
        address: b.address.clone(),
        addr: b.addr,
        peer,
        host: b.host.clone(),
        metrics: Default::default(),
    }
}

impl Settings {
    /// Settings for a validated config, backends in config order; plain-TCP backends are
    /// dialed through `dialed`.
    pub fn new(cfg: &Config, dialed: &Arc<crate::ghost::Conns>) -> Self {
        Settings {
            config: Arc::new(cfg.clone()),
            upstreams: cfg
                .backends
                .iter()
                .map(|b| upstream(cfg, b, dialed))
                .collect(),
            queue_timeout: cfg.queue_timeout,
            // Retry-After takes whole seconds; never advertise 0 (an immediate retry storm).
            retry_after_secs: cfg.retry_after.as_secs().max(1),
            client_write_timeout: cfg.client_write_timeout,
            client_keepalive_secs: cfg.client_keepalive_timeout.as_secs().max(1),
            max_header_bytes: cfg.max_header_bytes,
            max_body_bytes: cfg.max_body_bytes,
            max_connections: cfg.max_connections,
            max_connections_per_ip: cfg.max_connections_per_ip,
            client_keepalive_timeout: cfg.client_keepalive_timeout,
            client_header_timeout: cfg.client_header_timeout,
            body_pace: sluice_plugins::body_pace::BodyPace {
                start: cfg.client_body_start_timeout,
                min_rate: cfg.client_body_min_rate,
                total: cfg.client_body_timeout,
            },
            max_buffered_body_bytes: cfg.max_buffered_body_bytes,
            request_timeout: cfg.request_timeout,
            timeout_hold: cfg.upstream.timeout_hold,
        }
    }
}

/// State shared by the proxy service, the admin API and reloads.
#[derive(Debug)]
pub struct Shared {
    /// Admission: pool, queue, health.
    pub admission: Arc<Admission>,
    /// Request-path settings (each worker thread reads its own copy).
    pub settings: Snapshot<Settings>,
    /// Metrics.
    pub metrics: Metrics,
    /// Access log (each worker thread reads its own handle).
    pub access_log: Snapshot<AccessLog>,
    /// The TLS listener's certificate, if there is one (replaced on reload).
    pub tls: Option<Arc<crate::tls::CertStore>>,
    /// Where a reload reads the configuration from.
    pub source: crate::config::Source,
    /// Held by the reload in progress: one at a time.
    pub reloading: std::sync::Mutex<()>,
    /// Request body bytes buffered before admission, all requests together.
    pub body_budget: Arc<crate::service::body::BodyBudget>,
    /// Backend connections held open, counted during an upgrade's hand-over.
    pub upstream: crate::ops::upstream_conns::UpstreamConns,
    /// The shared budget across instances (`[cluster]`), if configured.
    pub cluster: Option<Arc<crate::ops::cluster::Cluster>>,
}

impl Shared {
    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.get()
    }

    /// `f` of the current settings, without taking a reference to them (for a field or two).
    pub fn with_settings<R>(&self, f: impl FnOnce(&Settings) -> R) -> R {
        self.settings.with(f)
    }
}
