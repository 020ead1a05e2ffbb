//! The admin listener: status as JSON and operator commands (loopback by default).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/metrics` | Prometheus metrics ([`crate::observe::metrics`]) |
//! | GET | `/status` | backends (state, health, limits, in-flight, ramp, tokens, health transitions and the last one's reason) and the queue |
//! | POST | `/reload` | re-read the config file ([`crate::ops::reload`]) |
//! | POST | `/backends/NAME/drain` | no new requests to NAME; in-flight ones finish |
//! | POST | `/backends/NAME/ready` | NAME takes requests again, ramping up with slow start |
//! | POST | `/backends/NAME/slow-start` | restart NAME's slow-start ramp |
//!
//! `sluice status` and `sluice backend drain|ready NAME` are clients of this API ([`client`]).
//!
//! With `admin.token_file`, every request must carry `Authorization: Bearer <token>`,
//! compared in constant time; anything else gets `401` and changes nothing. A listener on a
//! non-loopback address without a token is refused by config validation. `admin.metrics_open`
//! lets `GET /metrics` through without the token (for a Prometheus that cannot send one).

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;
use sluice_plugins::BackendState;

use crate::admission::{Admission, BackendStatus};
use crate::shared::Shared;

/// Status document served at `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    /// Backends, in configuration order.
    pub backends: Vec<BackendView>,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// The queue's bound.
    pub max_queue: usize,
    /// The shared budget across instances (`[cluster]`), if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::ops::cluster::ClusterStatus>,
}

/// One backend in [`Status`].
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BackendView {
    /// Name.
    pub name: String,
    /// `up`, `down` or `draining`.
    pub state: String,
    /// Health from checks.
    pub healthy: bool,
    /// Full concurrency limit.
    pub max_inflight: u32,
    /// Limit in force now (lower while slow start runs).
    pub effective_limit: u32,
    /// Requests in flight.
    pub inflight: u32,
    /// Slow-start progress, 0 to 1.
    pub ramp: f64,
    /// Whether the ramp is held by its error/latency gate.
    pub ramp_gated: bool,
    /// Why the learned limit is where it is: `ramp`, `steady` or `collapsed` (absent with a
    /// clock ramp or a fixed cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_phase: Option<String>,
    /// The backend's measured baseline latency (ms), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_ms: Option<f64>,
    /// Tokens available, when a rate is set.
    pub tokens: Option<u32>,
    /// Times health took the backend down since start.
    #[serde(default)]
    pub downs: u64,
    /// Times health brought it back up since start.
    #[serde(default)]
    pub ups: u64,
    /// The last transition by health and why (e.g. `down: 3 passive failures in a row, last:
    /// connection refused`); absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<String>,
}

fn state_name(s: BackendState) -> &'static str {
    match s {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Draining => "draining",
    }
}

impl From<BackendStatus> for BackendView {
    fn from(b: BackendStatus) -> Self {
        BackendView {
            name: b.name,
            state: state_name(b.state).into(),
            healthy: b.healthy,
            max_inflight: b.limit,
            effective_limit: b.effective_limit,
            inflight: b.inflight,
            ramp: (b.ramp * 1000.0).round() / 1000.0,
            ramp_gated: b.ramp_gated,
            limit_phase: b.limit_phase.map(str::to_string),
            baseline_ms: b
                .baseline
                .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            tokens: b.tokens,
            downs: b.downs,
            ups: b.ups,
            last_transition: b.last_transition,
        }
    }
}

/// Build the status document.
pub fn status(admission: &Admission) -> Status {
    let snap = admission.snapshot();
    Status {
        cluster: None,
        backends: admission
            .status()
            .into_iter()
            .map(BackendView::from)
            .collect(),
        queued: snap.queued,
        max_queue: snap.max_queue,
    }
}

/// The admin HTTP app.
pub struct AdminApp {
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    token: Option<crate::config::Secret>,
    metrics_open: bool,
}

impl AdminApp {
    /// An admin app over this proxy's shared state; with `token`, every request must carry
    /// it as a bearer token (`GET /metrics` too, unless `metrics_open`).
    pub fn new(
        shared: Arc<Shared>,
        token: Option<crate::config::Secret>,
        metrics_open: bool,
    ) -> Self {
        AdminApp {
            admission: shared.admission.clone(),
            shared,
            token,
            metrics_open,
        }
    }

    fn route(&self, method: &str, path: &str) -> (u16, String) {
        let path = path.split('?').next().unwrap_or(path);
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("GET", ["metrics"]) => {
                if let Some(c) = &self.shared.cluster {
                    self.shared.metrics.set_cluster(&c.status());
                }
                self.shared.metrics.set_dials(self.shared.upstream.dialed());
                (200, self.shared.metrics.render(&self.admission))
            }
            ("POST", ["reload"]) => match crate::ops::reload::reload(&self.shared) {
                Ok(report) => match serde_json::to_string_pretty(&report) {
                    Ok(json) => (200, json + "\n"),
                    Err(e) => (500, json_error(&e.to_string())),
                },
                Err(e) => (400, json_error(&e.to_string())),
            },
            ("GET", ["status"]) => {
                let mut st = status(&self.admission);
                st.cluster = self.shared.cluster.as_ref().map(|c| c.status());
                match serde_json::to_string_pretty(&st) {
                    Ok(json) => (200, json + "\n"),
                    Err(e) => (500, format!("{{\"error\":\"{e}\"}}\n")),
                }
            }
            ("POST", ["backends", name, action]) => {
                let result = match *action {
                    "drain" => self.admission.drain(name),
                    "ready" => self.admission.ready(name),
                    "slow-start" => self.admission.restart_ramp(name),
                    _ => {
                        return (
                            404,
                            json_error("unknown action; use drain, ready or slow-start"),
                        )
                    }
                };
                match result {
                    Ok(()) => (
                        200,
                        format!("{{\"backend\":{name:?},\"done\":{action:?}}}\n"),
                    ),
                    Err(e) => (404, json_error(&e.to_string())),
                }
            }
            (_, ["status"]) | (_, ["metrics"]) | (_, ["reload"]) | (_, ["backends", _, _]) => (405, json_error("method not allowed")),
            _ => (
                404,
                json_error(
                    "not found; try GET /status, GET /metrics, POST /reload or POST /backends/NAME/drain|ready|slow-start",
                ),
            ),
        }
    }
}

/// Whether a request with this `Authorization` header (and method and path) may proceed:
/// always without a token; with one, only with `Bearer <token>`, except `GET /metrics` when
/// `metrics_open`.
fn authorized(
    token: Option<&crate::config::Secret>,
    metrics_open: bool,
    method: &str,
    path: &str,
    authorization: Option<&[u8]>,
) -> bool {
    let Some(token) = token else {
        return true;
    };
    if metrics_open && method == "GET" && path.trim_end_matches('/') == "/metrics" {
        return true;
    }
    authorization
        .and_then(|h| h.strip_prefix(b"Bearer "))
        .is_some_and(|given| token.matches(given.trim_ascii()))
}

fn json_error(msg: &str) -> String {
    format!("{{\"error\":{msg:?}}}\n")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.as_str().to_owned();
        let path = session.req_header().uri.path().to_owned();
        let authorization = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let allowed = authorized(
            self.token.as_ref(),
            self.metrics_open,
            &method,
            &path,
            authorization,
        );
        let (code, body) = if allowed {
            self.route(&method, &path)
        } else {
            (
                401,
                json_error(
                    "admin token required: send Authorization: Bearer <admin.token_file's content>",
                ),
            )
        };
        let content_type = if path == "/metrics" {
            "text/plain; version=0.0.4"
        } else {
            "application/json"
        };
        Response::builder()
            .status(code)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len())
            .body(body.into_bytes())
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// A minimal client of the admin API for the command line (HTTP/1.0 over std's TcpStream).
pub mod client {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    /// Send `method path` to the admin listener; returns status and body.
    pub fn call(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        call_with_token(addr, method, path, None)
    }

    /// Like [`call`], with a bearer token.
    pub fn call_with_token(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let timeout = Duration::from_secs(5);
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.take(4 << 20).read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
            })?;
        Ok((status, body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::authorized;

    #[test]
    fn the_token_is_required_everywhere_but_open_metrics() {
        let dir = std::env::temp_dir().join(format!("sluice-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "s3cret-s3cret-s3cret\n").expect("write");
        let token =
            crate::config::read_token("admin.token_file", &file.to_string_lossy()).expect("token");
        let _ = std::fs::remove_dir_all(&dir);
        let t = Some(&token);
        let good: Option<&[u8]> = Some(b"Bearer s3cret-s3cret-s3cret");
        assert!(
            authorized(None, false, "POST", "/reload", None),
            "no token configured"
        );
        assert!(authorized(t, false, "POST", "/reload", good));
        for bad in [
            None,
            Some(&b"s3cret-s3cret-s3cret"[..]),
            Some(b"Bearer s3cret"),
            Some(b"Basic x"),
        ] {
            assert!(!authorized(t, false, "POST", "/reload", bad), "{bad:?}");
            assert!(!authorized(t, false, "GET", "/metrics", bad), "{bad:?}");
            assert!(!authorized(t, true, "GET", "/status", bad), "{bad:?}");
            assert!(!authorized(t, true, "POST", "/metrics", bad), "{bad:?}");
            assert!(authorized(t, true, "GET", "/metrics", bad), "metrics_open");
        }
    }
}
