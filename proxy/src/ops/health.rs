//! Active health checks and the admission timer, as pingora background services.
//!
//! An HTTP check is sent *through sluice's own listener*, marked with a per-process secret
//! header naming the backend. The proxy admits it with a probe slot of that backend (whatever
//! the backend's state, never queued) and forwards it over the backend's pooled keep-alive
//! connections. So a check counts inside the backend's concurrency cap and its connection
//! budget: the backend never sees more than `max_inflight` requests or connections, checks
//! included. A check that finds every slot busy is skipped: the backend is evidently serving.
//!
//! A TCP check connects to the backend directly while holding a probe slot, then closes.
//!
//! With `check = "none"` nothing is probed while backends are up; a backend that passive
//! failures (real requests that got no answer) took down is probed with the HTTP check at
//! `health.path` until it answers again.
//!
//! Results feed [`Admission::observe_check`], which applies `rise`/`fall` and the recovery rule
//! (a passively-downed backend is alive on any answer below 500, whatever `expect_status`
//! says), logs each transition with what the check saw, and, on recovery, restarts the
//! slow-start ramp. When the backend gives no answer, sluice answers the probe itself with a
//! header saying why (connection refused, timed out), so the log names the backend's failure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use sluice_plugins::BackendId;

use crate::admission::{Admission, Seen};
use crate::config::{CheckKind, Config, HealthConfig};
use crate::service::{PROBE_BACKEND_HEADER, PROBE_ERROR_HEADER, PROBE_HEADER};
use crate::shared::Shared;

/// A fresh random secret for the probe header, from the OS's hash seeds (no extra crate).
pub fn probe_secret() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut s = String::new();
    for i in 0..2u8 {
        let mut h = RandomState::new().build_hasher();
        h.write_u8(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s
}

/// Where the checker reaches sluice's own listener: a wildcard address becomes loopback.
fn self_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Runs the active health checks of every backend.
pub struct HealthChecker(Arc<Checker>);

struct Checker {
    admission: Arc<Admission>,
    shared: Arc<Shared>,
    /// `[health]` as the process started with it (a change needs an upgrade); the backends,
    /// and everything reloadable, come from [`Shared::settings`].
    health: HealthConfig,
    /// sluice's own listener, which probes go through.
    listen: SocketAddr,
    secret: String,
}

impl HealthChecker {
    /// A checker for `cfg`'s backends, sending probes marked with `secret`.
    pub fn new(cfg: &Config, shared: Arc<Shared>, secret: String) -> Self {
        HealthChecker(Arc::new(Checker {
            admission: shared.admission.clone(),
            shared,
            health: cfg.health.clone(),
            listen: cfg.listen,
            secret,
        }))
    }
}

impl Checker {
    /// `GET path` through our own listener. `None` when every slot of the backend is busy
    /// (it is evidently serving: no verdict).
    async fn check_http(
        &self,
        connector: &Connector,
        peer: &HttpPeer,
        backend: usize,
        path: &str,
    ) -> Option<Seen> {
        let settings = self.shared.settings();
        let b = settings.upstreams.get(backend)?;
        let attempt = async {
            let (mut session, _reused) = connector
                .get_http_session(peer)
                .await
                .map_err(|e| format!("could not reach sluice's own listener: {e}"))?;
            let build = |e: Box<pingora::Error>| format!("could not build the request: {e}");
            let mut req = RequestHeader::build("GET", path.as_bytes(), Some(4)).map_err(build)?;
            req.insert_header("Host", b.host.as_deref().unwrap_or(&b.address))
                .map_err(build)?;
            req.insert_header(PROBE_HEADER, &self.secret)
                .map_err(build)?;
            req.insert_header(PROBE_BACKEND_HEADER, backend.to_string())
                .map_err(build)?;
            req.insert_header("User-Agent", "sluice-health-check")
                .map_err(build)?;
            let io = |e: Box<pingora::Error>| format!("{e}");
            session
                .write_request_header(Box::new(req))
                .await
                .map_err(io)?;
            session.finish_request_body().await.map_err(io)?;
            session.read_response_header().await.map_err(io)?;
            let header = session
                .response_header()
                .ok_or_else(|| "no response header".to_string())?;
            let status = header.status.as_u16();
            let seen = if status == 204 && header.headers.get(PROBE_HEADER).is_some() {
                None
            } else if let Some(why) = header.headers.get(PROBE_ERROR_HEADER) {
                // sluice's own answer: the backend gave none.
                Some(Seen::Failed(
                    String::from_utf8_lossy(why.as_bytes()).into_owned(),
                ))
            } else {
                Some(Seen::Answered(status))
            };
            // Read the body to its end so the connection can be reused (bounded: the response
            // of a health page is small; give up on the connection past 1 MiB).
            let mut read = 0usize;
            while let Ok(Some(chunk)) = session.read_response_body().await {
                read += chunk.len();
                if read > 1 << 20 {
                    return Ok(seen);
                }
            }
            connector
                .release_http_session(session, peer, Some(Duration::from_secs(60)))
                .await;
            Ok::<_, String>(seen)
        };
        match tokio::time::timeout(self.health.timeout, attempt).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(why)) => Some(Seen::Failed(why)),
            Err(_) => Some(Seen::Failed(format!(
                "no answer within {} (health.timeout)",
                humantime::format_duration(self.health.timeout)
            ))),
        }
    }

    /// A TCP connect to the backend while holding a probe slot. `None` when every slot is busy.
    async fn check_tcp(&self, backend: usize) -> Option<Seen> {
        let permit = self.admission.acquire_probe(BackendId(backend))?;
        let addr = self.shared.settings().upstreams.get(backend)?.addr;
        let seen =
            match tokio::time::timeout(self.health.timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(_)) => Seen::Connected,
                Ok(Err(e)) => Seen::Failed(e.to_string()),
                Err(_) => Seen::Failed(format!(
                    "no connection within {} (health.timeout)",
                    humantime::format_duration(self.health.timeout)
                )),
            };
        drop(permit);
        Some(seen)
    }

    async fn run_backend(self: Arc<Self>, backend: usize, mut shutdown: ShutdownWatch) {
        // Built on first use: a connector loads the TLS roots, which a `tcp` check never needs
        // and a `none` one only once a backend is down.
        let mut connector: Option<Connector> = None;
        let mut peer = HttpPeer::new(self_addr(self.listen), false, String::new());
        peer.options.connection_timeout = Some(self.health.timeout);
        peer.options.read_timeout = Some(self.health.timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        let health = &self.health;
        let id = BackendId(backend);
        let mut interval = tokio::time::interval(health.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
            let what = match health.check {
                CheckKind::Http => "health check",
                CheckKind::Tcp => "health check tcp connect",
                // No active check: probe only a backend that passive failures took down,
                // until it answers again.
                CheckKind::None if self.admission.passive_down(id) => "recovery probe",
                CheckKind::None => continue,
            };
            let (what, seen) = match health.check {
                CheckKind::Tcp => (what.to_string(), self.check_tcp(backend).await),
                CheckKind::Http | CheckKind::None => (
                    format!("{what} GET {}", health.path),
                    self.check_http(
                        connector.get_or_insert_with(|| Connector::new(None)),
                        &peer,
                        backend,
                        &health.path,
                    )
                    .await,
                ),
            };
            if let Some(seen) = seen {
                self.admission
                    .observe_check(id, &what, &health.expect, &seen);
            }
        }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        let health = &self.0.health;
        if health.check == CheckKind::None && health.passive_failures == 0 {
            // Nothing can take a backend down, so nothing needs to bring one back.
            return;
        }
        // One task per backend; backends added by a reload get theirs at the next interval.
        let mut started = 0;
        let mut tasks = Vec::new();
        let mut shutdown = shutdown;
        let mut tick = tokio::time::interval(self.0.health.interval);
        loop {
            let count = self.0.shared.settings().upstreams.len();
            while started < count {
                tasks.push(tokio::spawn(
                    self.0.clone().run_backend(started, shutdown.clone()),
                ));
                started += 1;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The admission timer as a background service (see [`Admission::run_timer`]).
pub struct AdmissionTimer(pub Arc<Admission>);

#[async_trait]
impl BackgroundService for AdmissionTimer {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().run_timer(shutdown).await;
    }
}
