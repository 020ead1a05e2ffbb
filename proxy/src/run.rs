//! Assembling the pingora server from a [`Config`], and running it in-process.
//!
//! [`build_server`] is what `sluice run` uses. [`RunningProxy`] runs the same server on a
//! background thread with a shutdown handle: the demo and the end-to-end tests use it, so they
//! exercise exactly the production assembly.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{ListenerConfig, TcpSocketOptions};
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::protocols::TcpKeepalive;
use pingora::proxy::ProxyServiceBuilder;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::watch;

use pingora::apps::http_app::HttpServer;
use pingora::services::background::GenBackgroundService;
use pingora::services::listening::Service;

use crate::admission::Admission;
use crate::config::Overrides;
use crate::config::{Config, ConfigError};
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::ops::admin::AdminApp;
use crate::ops::handoff;
use crate::ops::health::{probe_secret, AdmissionTimer, HealthChecker};
use crate::ops::reload::SighupReload;
use crate::service::Sluice;
use crate::shared::{Settings, Shared};
use std::path::PathBuf;

fn whole_seconds_rounded_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The TLS listener's certificate store, loaded from the files `cfg` names (already checked by
/// config validation; a file changed since then is reported and leaves TLS off).
fn tls_store(cfg: &Config) -> Option<Arc<crate::tls::CertStore>> {
    let tls = cfg.tls.as_ref()?;
    match crate::tls::load_certified_key(&tls.cert, &tls.key) {
        Ok(key) => Some(Arc::new(crate::tls::CertStore::new(key))),
        Err(e) => {
            log::error!("the TLS listener is off: {e}");
            None
        }
    }
}

/// pingora's process settings, taken from our `[server]` section.
pub fn server_conf(cfg: &Config) -> ServerConf {
    let mut conf = ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(whole_seconds_rounded_up(cfg.server.grace_period)),
        graceful_shutdown_timeout_seconds: Some(whole_seconds_rounded_up(
            cfg.server.graceful_shutdown_timeout,
        )),
        pid_file: cfg.server.pid_file.clone(),
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        error_log: cfg.server.error_log.clone(),
        ca_file: cfg.upstream.ca_file.clone(),
        ..ServerConf::default()
    };
    // Retries happen only where pingora judges them safe (idempotent requests on a reused
    // connection that closed before answering); keep that safety net small.
    // Connect failures are retried after waiting for a backend that is up again (see
    // `Sluice::fail_to_connect`); the request's queue deadline bounds them too.
    conf.max_retries = 5;
    // pingora's I/O timeouts (the backend's read, write and pool idle timeouts, the client's
    // write and keep-alive timeouts) run on tokio's timer, not pingora's "fast" timer, when
    // they are longer than this: 0 s, so every timeout of a second or more (all of sluice's).
    // pingora's timer reads the clock and checks its clock thread each time a timeout is made,
    // about six times per proxied request, though most (a write that completes at once) never
    // wait; a timeout that does wait (the backend's answer, an idle pooled connection) stays
    // in a per-thread tree until its deadline passes, done or not. tokio's timer costs nothing
    // until a timeout waits, and forgets it as soon as it is dropped.
    conf.fast_timeout_to_tokio_threshold_seconds = Some(0);
    conf
}

/// Build the pingora server for `cfg`. Returns the server and the admission state it uses.
///
/// `opt` carries pingora's process flags (`upgrade`, `daemon`); `None` for a plain start.
pub fn build_server(cfg: &Config, opt: Option<Opt>) -> (Server, Arc<Shared>) {
    build_server_from(cfg, opt, None, Overrides::default())
}

/// Like [`build_server`], remembering the file and flags `cfg` came from, for reloads.
pub fn build_server_from(
    cfg: &Config,
    opt: Option<Opt>,
    path: Option<PathBuf>,
    overrides: Overrides,
) -> (Server, Arc<Shared>) {
    let conf = server_conf(cfg);
    let opt_upgrade = opt.as_ref().is_some_and(|o| o.upgrade);
    let admission = Admission::from_config(cfg);
    let secret = probe_secret();
    let access_log = AccessLog::open(&cfg.access_log).unwrap_or_else(|e| {
        log::error!(
            "cannot open the access log {:?}: {e}; access logging is off",
            cfg.access_log
        );
        AccessLog::off()
    });
    let metrics = Metrics::new();
    let upstream = crate::ops::upstream_conns::UpstreamConns::default();
    // Before any listener accepts: a fresh start admits nothing until its first grant.
    let cluster = cfg
        .cluster
        .clone()
        .map(|c| crate::ops::cluster::Cluster::new(c, admission.clone(), !opt_upgrade));
    let shared = Arc::new(Shared {
        cluster: cluster.clone(),
        admission: admission.clone(),
        settings: crate::snapshot::Snapshot::new(Settings::new(cfg, upstream.dialed())),
        body_budget: crate::service::body::BodyBudget::new(metrics.buffered_body_bytes()),
        metrics,
        access_log: crate::snapshot::Snapshot::new(access_log),
        tls: tls_store(cfg),
        source: crate::config::Source { path, overrides },
        reloading: Default::default(),
        upstream,
    });

    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let conf = server.configuration.clone();

    // Idle upstream connections are kept in one LRU shared by all backends. Size it to hold
    // every permitted connection, so no idle socket is evicted and reopened under load.
    let mut client = ConnectorOptions::from_server_conf(&conf);
    client.keepalive_pool_size = cfg.total_inflight().max(1);

    // pingora's HTTP/1 loop is replaced by sluice's own (see `crate::conn`), so an idle
    // keep-alive connection holds a few KiB instead of pingora's per-request state.
    let mut server_options = HttpServerOptions::default();
    server_options.force_custom = true;

    let sluice = Sluice::new(shared.clone(), secret.clone());
    let mut service = ProxyServiceBuilder::new(&conf, sluice)
        .name("sluice")
        .client_options(client)
        .server_options(server_options)
        .custom((), crate::conn::handler(shared.clone()))
        .build();
    let mut socket = TcpSocketOptions::default();
    // Detect terminals that vanished without a FIN (power loss, NAT timeouts).
    socket.tcp_keepalive = Some(TcpKeepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        count: 5,
        #[cfg(target_os = "linux")]
        user_timeout: Duration::from_secs(0),
    });
    let buffers =
        L4BufferSettings::new(cfg.client_read_buffer_bytes, cfg.client_write_buffer_bytes);
    if let (Some(tls), Some(store)) = (&cfg.tls, &shared.tls) {
        let mut settings = TlsSettings::intermediate("", "")
            .unwrap_or_else(|e| unreachable!("TlsSettings::intermediate never fails: {e}"));
        settings.set_cert_resolver(store.clone());
        service.add_listener(
            ListenerConfig::tcp(tls.listen.to_string())
                .tls(settings)
                .l4_buffer(buffers)
                .tcp_socket_options(socket.clone()),
        );
    }
    service.add_listener(
        ListenerConfig::tcp(cfg.listen.to_string())
            .l4_buffer(buffers)
            .tcp_socket_options(socket),
    );
    server.add_service(service);

    // Admits waiters whose turn comes from time alone (rate-limit tokens, ramp steps).
    let mut timer = GenBackgroundService::new(
        "admission timer".into(),
        Arc::new(AdmissionTimer(admission.clone())),
    );
    timer.threads = Some(1);
    server.add_service(timer);
    let mut checks = GenBackgroundService::new(
        "health checks".into(),
        Arc::new(HealthChecker::new(cfg, shared.clone(), secret)),
    );
    checks.threads = Some(1);
    server.add_service(checks);
    if opt_upgrade {
        // Take nothing of the backend's cap until the old process hands it over.
        handoff::reserve_all(&shared);
        let receiver = handoff::Receiver::new(
            shared.clone(),
            handoff::socket_path(&cfg.server.upgrade_sock),
        );
        let mut svc = GenBackgroundService::new("upgrade hand-over".into(), Arc::new(receiver));
        svc.threads = Some(1);
        server.add_service(svc);
    }
    if let Some(cluster) = cluster {
        let mut svc = GenBackgroundService::new(
            "cluster leases".into(),
            Arc::new(crate::ops::cluster::ClusterService(cluster)),
        );
        svc.threads = Some(1);
        server.add_service(svc);
    }
    crate::ops::reload::keep_sighup_from_killing();
    let mut hup =
        GenBackgroundService::new("reload".into(), Arc::new(SighupReload(shared.clone())));
    hup.threads = Some(1);
    server.add_service(hup);

    if let Some(admin) = cfg.admin_listen {
        let mut svc = Service::new(
            "admin".into(),
            HttpServer::new_app(AdminApp::new(
                shared.clone(),
                cfg.admin_token.clone(),
                cfg.metrics_open,
            )),
        );
        svc.threads = Some(1);
        svc.add_tcp(&admin.to_string());
        server.add_service(svc);
    }
    (server, shared)
}

/// Shutdown trigger for an in-process server.
struct ChannelSignal(watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        // Err means the sender is gone: the handle was dropped, so stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// Why an in-process proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot be served (for example, the port is taken).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The listener did not accept connections in time.
    #[error("sluice did not start listening on {0} within {1:?}")]
    NotListening(SocketAddr, Duration),
}

/// A sluice server running on a background thread. Dropping it stops the server.
pub struct RunningProxy {
    addr: SocketAddr,
    admission: Arc<Admission>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// How long [`RunningProxy::start`] waits for the listener.
    pub const START_TIMEOUT: Duration = Duration::from_secs(10);

    /// Start sluice for `cfg` and wait until its listener accepts connections.
    pub fn start(cfg: &Config) -> Result<RunningProxy, StartError> {
        Self::start_from(cfg, None, Overrides::default())
    }

    /// Start sluice for `cfg`, loaded from `path` with `overrides` (so it can reload).
    pub fn start_from(
        cfg: &Config,
        path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Result<RunningProxy, StartError> {
        cfg.preflight_bind()?;
        let (mut server, shared) = build_server_from(cfg, None, path, overrides);
        let admission = shared.admission.clone();
        server.bootstrap();
        let (stop, rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("sluice-server".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelSignal(rx)),
                })
            })
            .map_err(|e| {
                StartError::Config(ConfigError {
                    key: "server.threads".into(),
                    value: String::new(),
                    fix: format!("cannot start the server thread: {e}"),
                })
            })?;
        let running = RunningProxy {
            addr: cfg.listen,
            admission,
            shared,
            stop,
            thread: Some(thread),
        };
        // pingora exposes no "listening" event; probe the port, bounded in time.
        let started = Instant::now();
        while TcpStream::connect_timeout(&running.addr, Duration::from_millis(200)).is_err() {
            if started.elapsed() > Self::START_TIMEOUT {
                return Err(StartError::NotListening(running.addr, Self::START_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(running)
    }

    /// The client-facing address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live admission state (limits, in-flight counts, queue).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The shared state (metrics, settings, access log).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop the server and wait for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A free port on 127.0.0.1, for tests and the demo. The port is released before returning,
/// so another process could take it first; [`RunningProxy::start`] then fails clearly.
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}
