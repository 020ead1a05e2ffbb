//! The pingora `ProxyHttp` service: where admission meets the request lifecycle.
//!
//! Per request, in pingora's phase order:
//! 1. `request_filter`: wait for a backend slot ([`Admission::acquire`]). While a body-less
//!    request waits, the client socket is watched, so a terminal that hangs up leaves the queue
//!    and its request never reaches the backend. A request that is not admitted gets a 503 with
//!    `Retry-After` on a connection that stays open (pingora's `respond_error` would close it
//!    and turn every rejection into a reconnect).
//! 2. `upstream_peer`: the admitted backend's prebuilt `HttpPeer`. The same peer value for every
//!    request of a backend is what lets pingora reuse pooled connections.
//! 3. `logging`: runs when the response has been fully delivered (or the request failed); the
//!    [`Permit`] is dropped there. pingora returns the upstream connection to its pool before
//!    `logging`, so the backend never holds more connections than permits. If `logging` never
//!    runs (panic, shutdown), dropping the context drops the permit all the same.
//!
//! After admission the client's abort no longer cuts the upstream request short
//! (`set_abort_on_close(false)`): a payment the backend is already processing keeps its slot
//! until the backend answers, so the cap counts the work really at the backend.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use sluice_plugins::adaptive::Sample;
use sluice_plugins::BackendId;

use crate::access_log::{self, AccessLog};
use crate::admission::{Admission, Permit, Shed};
use crate::config::Config;
use crate::metrics::{Deadline, Metrics, Outcome, NO_BACKEND};

/// Request header carrying the health checker's secret: marks a request as a health probe.
pub const PROBE_HEADER: &str = "x-sluice-probe";
/// Request header naming the backend (by index) a health probe is for.
pub const PROBE_BACKEND_HEADER: &str = "x-sluice-probe-backend";

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// The backend slot, held from admission until the response is delivered.
    permit: Option<Permit>,
    /// The backend the request went (or last went) to.
    backend: Option<BackendId>,
    /// When the request entered admission.
    arrived: Option<Instant>,
    /// Its queue deadline, kept for a re-admission after a refused connection.
    deadline: Option<tokio::time::Instant>,
    /// The connection to the backend was refused: wait for a slot again, ahead of the queue.
    requeue: bool,
    /// A health probe from our own checker.
    probe: bool,
    /// How long it waited for a slot.
    queue_wait: Duration,
    /// When the request was sent upstream.
    upstream_start: Option<Instant>,
    /// Why it was refused, if it was.
    shed: Option<Shed>,
    /// Why it was invalid, if it was.
    invalid: Option<Invalid>,
    /// The whole body was received before admission (and a `100 Continue` sent if asked for):
    /// its length, the whole body when pingora's retry buffer holds only its tail, and its
    /// bytes in the buffered-body budget.
    body: Option<crate::body::Received>,
    /// The settings in force when the request arrived; one consistent snapshot per request.
    settings: Option<Arc<Settings>>,
    /// The request's Content-Length (one value, however many times the client repeated it).
    content_length: Option<u64>,
    /// The client speaks HTTP/1.0: its answer is never chunked.
    http10: bool,
    /// The backend connection the request was given, when sluice dialed it: after an upstream
    /// timeout its late answer is read from it ([`crate::ghost`]).
    conn: Option<crate::ghost::Claim>,
    /// The backend's answer header arrived.
    answer_started: bool,
}

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
}

/// The parts of the configuration the request path reads; swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Backends by index (an index never changes meaning while the process runs).
    pub upstreams: Vec<Upstream>,
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
    }
}

impl Settings {
    /// Settings for a validated config, backends in config order; plain-TCP backends are
    /// dialed through `dialed`.
    pub fn new(cfg: &Config, dialed: &Arc<crate::ghost::Conns>) -> Self {
        Settings {
            upstreams: cfg
                .backends
                .iter()
                .map(|b| upstream(cfg, b, dialed))
                .collect(),
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

/// Why a request is refused before admission, with the status it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Ambiguous or unsupported framing (both Content-Length and Transfer-Encoding, several
    /// Content-Length values, a transfer coding other than `chunked`): 400. Such requests are
    /// how request smuggling starts; the connection is closed after the answer.
    Framing(&'static str),
    /// Request header over `max_header_bytes`: 431.
    HeaderTooLarge,
    /// Declared body over `max_body_bytes`: 413.
    BodyTooLarge,
    /// A chunked body longer than the pre-admission buffer (and so of unknown size): 413.
    ChunkedTooLarge,
    /// The body did not arrive in time (start, rate or whole-body deadline): 408.
    BodyTimeout,
    /// The body did not fit in `proxy.max_buffered_body_bytes`: 503.
    BodyBudget,
    /// A malformed request (an HTTP/1.1 request without `Host`, a request target with a
    /// control character or a space): 400, never forwarded, connection closed.
    Malformed(&'static str),
}

impl Invalid {
    fn status(self) -> u16 {
        match self {
            Invalid::Framing(_) | Invalid::Malformed(_) => 400,
            Invalid::HeaderTooLarge => 431,
            Invalid::BodyTooLarge | Invalid::ChunkedTooLarge => 413,
            Invalid::BodyTimeout => 408,
            Invalid::BodyBudget => 503,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Invalid::Framing(why) | Invalid::Malformed(why) => why,
            Invalid::HeaderTooLarge => "request header too large",
            Invalid::BodyTooLarge => "request body too large",
            Invalid::ChunkedTooLarge => {
                "chunked request body over 64 KiB: send a Content-Length for larger bodies"
            }
            Invalid::BodyTimeout => "request body not received in time",
            Invalid::BodyBudget => "too many request bodies in transit, retry later",
        }
    }
}

/// Whether a raw HTTP/1 header block has a field named `name` (lowercase ASCII).
fn raw_has_header(raw: &[u8], name: &[u8]) -> bool {
    raw.split(|&c| c == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()..].trim_ascii_start().first() == Some(&b':')
    })
}

/// Check a request's framing and size before it may wait for, or reach, a backend; returns its
/// declared Content-Length, if any.
///
/// `raw` is the header block as the client sent it: pingora drops Content-Length when
/// Transfer-Encoding is also present (RFC 9112 lets a server do that), while a payment proxy
/// refuses such a request, so the raw header is consulted when Transfer-Encoding is present.
pub fn validate(
    req: &RequestHeader,
    raw: Option<&[u8]>,
    settings: &Settings,
) -> std::result::Result<Option<u64>, Invalid> {
    let header_bytes: usize = req.uri.to_string().len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > settings.max_header_bytes {
        return Err(Invalid::HeaderTooLarge);
    }
    let te: Vec<&[u8]> = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let cl: Vec<&[u8]> = req
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if !te.is_empty() {
        if !cl.is_empty() || raw.is_some_and(|r| raw_has_header(r, b"content-length")) {
            return Err(Invalid::Framing(
                "both Content-Length and Transfer-Encoding: ambiguous framing",
            ));
        }
        let only_chunked = te.len() == 1 && te[0].trim_ascii().eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(Invalid::Framing(
                "unsupported Transfer-Encoding: only a single `chunked` is accepted",
            ));
        }
    }
    let mut value: Option<u64> = None;
    if !cl.is_empty() {
        for v in &cl {
            for part in v.split(|&c| c == b',') {
                let part = part.trim_ascii();
                let n = std::str::from_utf8(part)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Invalid::Framing("invalid Content-Length"))?;
                if value.is_some_and(|v| v != n) {
                    return Err(Invalid::Framing("conflicting Content-Length values"));
                }
                value = Some(n);
            }
        }
        if value.is_some_and(|n| n > settings.max_body_bytes as u64) {
            return Err(Invalid::BodyTooLarge);
        }
    }
    Ok(value)
}

/// Whether `b` may not appear in a request line: a control character (NUL, CR, LF, TAB, ...)
/// or DEL. A space is allowed only as the two separators.
fn is_control(b: u8) -> bool {
    b < b' ' || b == 0x7f
}

/// Whether a request target carries a percent-escape of a control character (`%00`–`%1F`,
/// `%7F`). pingora escapes a raw control character or space in the target this way before
/// sluice sees the request, so this is how a raw NUL or bare CR shows in the parsed request;
/// the legacy server refuses such escapes anyway.
fn has_escaped_control(target: &[u8]) -> bool {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    target.windows(3).any(|w| {
        w[0] == b'%'
            && matches!((hex(w[1]), hex(w[2])), (Some(h), Some(l)) if h * 16 + l < 0x20 || h * 16 + l == 0x7f)
    })
}

/// Check a request line as the client sent it (up to and including its LF): `METHOD SP TARGET
/// SP VERSION CRLF`, no control character anywhere (a bare CR, a NUL), no space in the target.
fn check_request_line(line: &[u8]) -> std::result::Result<(), Invalid> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|&b| is_control(b)) {
        return Err(Invalid::Malformed(
            "control character (NUL, bare CR, ...) in the request line",
        ));
    }
    if line.iter().filter(|&&b| b == b' ').count() != 2 {
        return Err(Invalid::Malformed("space in the request target"));
    }
    Ok(())
}

/// Refuse what a strict HTTP/1.1 server refuses and the legacy server may misread: an HTTP/1.1
/// request without exactly one `Host`, a request target with a control character or a space.
///
/// `line` is the request line exactly as the client sent it, when sluice's connection loop
/// could read it before pingora (plain TCP, not a pipelined request): pingora percent-encodes a
/// target with illegal bytes (a space becomes `%20`) instead of refusing it, so only the
/// original shows a space. `raw` is pingora's copy of the header block (after that escaping):
/// a control character shows there as `%00`–`%1F`.
pub fn check_request(
    req: &RequestHeader,
    raw: Option<&[u8]>,
    line: Option<&[u8]>,
) -> std::result::Result<(), Invalid> {
    if let Some(line) = line {
        check_request_line(line)?;
    }
    let parsed_line = raw.and_then(|r| r.split(|&c| c == b'\n').next());
    let target: &[u8] = match parsed_line {
        Some(l) => {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let start = l.iter().position(|&c| c == b' ').map_or(0, |i| i + 1);
            let end = l.iter().rposition(|&c| c == b' ').unwrap_or(l.len());
            l.get(start..end.max(start)).unwrap_or_default()
        }
        None => req.raw_path(),
    };
    if target.iter().any(|&b| is_control(b) || b == b' ') || has_escaped_control(target) {
        return Err(Invalid::Malformed(
            "control character in the request target",
        ));
    }
    let hosts = req.headers.get_all(http::header::HOST).iter().count();
    if hosts > 1 {
        return Err(Invalid::Malformed("more than one Host header"));
    }
    if hosts == 0 && req.version >= http::Version::HTTP_11 {
        return Err(Invalid::Malformed("HTTP/1.1 request without Host"));
    }
    Ok(())
}

/// Whether the client asked to keep its connection: HTTP/1.1 unless it sent
/// `Connection: close` (pingora applies that one), HTTP/1.0 only with `Connection: keep-alive`.
fn client_wants_keepalive(req: &RequestHeader) -> bool {
    if req.version >= http::Version::HTTP_11 {
        return true;
    }
    req.headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
}

/// Frame an answer for an HTTP/1.0 client, which cannot read a chunked body (RFC 9112 §6.1).
/// A `Content-Length` answer goes as it is. Otherwise (the backend answered chunked, or
/// close-delimited, which pingora turns into chunked before this point) `Transfer-Encoding` is
/// removed: pingora then writes the de-chunked body as it arrives, close-delimited. Returns
/// whether the connection must close after the answer (the body has no length).
pub fn frame_for_http10(resp: &mut ResponseHeader, head_request: bool) -> bool {
    if resp.status.is_informational() {
        return false;
    }
    resp.remove_header(&http::header::TRANSFER_ENCODING);
    let no_body = head_request || matches!(resp.status.as_u16(), 204 | 304);
    !no_body && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
}

/// State shared by the proxy service, the admin API and reloads.
#[derive(Debug)]
pub struct Shared {
    /// Admission: pool, queue, health.
    pub admission: Arc<Admission>,
    /// Request-path settings.
    pub settings: RwLock<Arc<Settings>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Access log.
    pub access_log: RwLock<AccessLog>,
    /// The TLS listener's certificate, if there is one (replaced on reload).
    pub tls: Option<Arc<crate::tls::CertStore>>,
    /// Where a reload reads the configuration from.
    pub reload: crate::reload::Reloader,
    /// Request body bytes buffered before admission, all requests together.
    pub body_budget: Arc<crate::body::BodyBudget>,
    /// Backend connections held open, counted during an upgrade's hand-over.
    pub upstream: crate::upstream_conns::UpstreamConns,
    /// The shared budget across instances (`[cluster]`), if configured.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The current access log.
    pub fn access_log(&self) -> AccessLog {
        self.access_log
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// The admission-control proxy.
pub struct Sluice {
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    probe_secret: String,
}

impl Sluice {
    /// Build the service over the shared state.
    pub fn new(shared: Arc<Shared>, probe_secret: String) -> Self {
        Sluice {
            admission: shared.admission.clone(),
            shared,
            probe_secret,
        }
    }

    /// After an upstream timeout the backend is most likely still working on the request: its
    /// slot stays taken. When sluice still holds the connection ([`crate::ghost`]), the slot is
    /// released when the backend answers or closes it, and at `hold` at the latest; otherwise
    /// (a TLS backend) it is held for `hold`.
    fn hold_timed_out(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        mut permit: Permit,
        hold: Duration,
    ) {
        let settings = self.settings(ctx);
        let Some(up) = settings.upstreams.get(permit.backend().0) else {
            return; // dropped with its hold
        };
        self.shared.metrics.timeout_hold(&up.name);
        let Some((addr, sock)) = ctx.conn.take().and_then(crate::ghost::Claim::orphan) else {
            log::warn!(
                "backend {}: upstream timeout; its slot stays taken for {hold:?} \
                 (upstream.timeout_hold), the backend is likely still working",
                up.name
            );
            return;
        };
        log::warn!(
            "backend {}: upstream timeout; its slot stays taken until the backend answers or \
             closes the connection, {hold:?} at most (upstream.timeout_hold)",
            up.name
        );
        permit.hold_on_drop(None);
        let ghost = crate::ghost::Ghost {
            head: session.req_header().method == http::Method::HEAD,
            answer_started: ctx.answer_started,
            until: tokio::time::Instant::now() + hold,
            park_idle: self
                .shared
                .upstream
                .idle_timeout(up.peer.options.idle_timeout)
                .unwrap_or(hold),
        };
        let sent = ctx.upstream_start.unwrap_or_else(Instant::now);
        let shared = self.shared.clone();
        let name = up.name.clone();
        tokio::spawn(async move {
            let end = crate::ghost::watch(shared.upstream.dialed(), addr, sock, ghost).await;
            drop(permit);
            let took = sent.elapsed();
            shared.metrics.ghost(&name, end, took);
            log::info!(
                "backend {name}: the timed-out request's slot is free ({}, {took:?} after it \
                 was sent)",
                end.as_str()
            );
        });
    }

    /// The request's settings snapshot, taken on first use (one lock per request, and a reload
    /// never changes a request half-way).
    fn settings(&self, ctx: &mut RequestCtx) -> Arc<Settings> {
        ctx.settings
            .get_or_insert_with(|| self.shared.settings())
            .clone()
    }

    /// Write a 503 with `Retry-After` and keep the client connection open.
    async fn reject(&self, session: &mut Session, shed: Shed, retry_after_secs: u64) -> Result<()> {
        let body = Bytes::from(match shed {
            Shed::QueueFull => "503 service busy: queue full, retry later\n",
            Shed::QueueTimeout => "503 service busy: waited too long in the queue, retry later\n",
            Shed::BackendDown => "503 service unavailable: the backend is down, retry later\n",
        });
        let mut h = ResponseHeader::build(503, Some(4))?;
        h.insert_header("Retry-After", retry_after_secs.to_string())?;
        h.insert_header("Content-Type", "text/plain")?;
        h.insert_header("Content-Length", body.len().to_string())?;
        h.insert_header("Cache-Control", "no-store")?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

impl Sluice {
    /// Receive the request body whole before the request may take a backend slot (see
    /// [`crate::body`]): a slow or stalled sender never holds the backend's capacity, and a body
    /// that cannot be parsed (a bad chunk size) is refused before any of it reaches the backend.
    async fn receive_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        settings: &Settings,
        declared: Option<u64>,
    ) -> Result<std::result::Result<(), Invalid>> {
        if session.as_downstream_mut().is_body_done() {
            return Ok(Ok(()));
        }
        let expects_continue = session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let downstream = session.as_downstream_mut();
        if expects_continue {
            downstream.write_continue_response().await?;
        }
        let limits = crate::body::Limits {
            pace: settings.body_pace,
            max_body_bytes: settings.max_body_bytes,
            max_buffered: settings.max_buffered_body_bytes,
        };
        use crate::body::Refusal;
        match crate::body::receive(downstream, declared, limits, &self.shared.body_budget).await? {
            Ok(received) => {
                ctx.body = Some(received);
                Ok(Ok(()))
            }
            Err(Refusal::TooSlow) => {
                self.shared.metrics.client_timeout(Deadline::Body);
                Ok(Err(Invalid::BodyTimeout))
            }
            Err(Refusal::TooLarge) => Ok(Err(Invalid::BodyTooLarge)),
            Err(Refusal::ChunkedTooLarge) => Ok(Err(Invalid::ChunkedTooLarge)),
            Err(Refusal::Budget) => Ok(Err(Invalid::BodyBudget)),
        }
    }

    /// A health probe from our own checker: take a slot on the named backend whatever its
    /// state (the probe counts inside the backend's cap and uses its pooled connections), or
    /// answer 204 at once when the backend is too busy to probe.
    async fn admit_probe(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        authentic: bool,
    ) -> Result<bool> {
        let backend = session
            .req_header()
            .headers
            .get(PROBE_BACKEND_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&i| i < self.settings(ctx).upstreams.len());
        let (true, Some(backend)) = (authentic, backend) else {
            // Not our checker: refuse rather than let a client pick a backend.
            return Err(Error::explain(
                ErrorType::HTTPStatus(400),
                "invalid probe headers",
            ));
        };
        ctx.probe = true;
        match self.admission.acquire_probe(BackendId(backend)) {
            Some(permit) => {
                ctx.backend = Some(permit.backend());
                ctx.permit = Some(permit);
                // Like any request: once sent, let the backend answer even if the checker gave
                // up, so the upstream connection ends cleanly and the slot counts real work.
                session.as_downstream_mut().set_abort_on_close(false);
                Ok(false)
            }
            None => {
                let mut h = ResponseHeader::build(204, Some(2))?;
                h.insert_header("X-Sluice-Probe", "busy")?;
                session.write_response_header(Box::new(h), true).await?;
                Ok(true)
            }
        }
    }
}

/// The error returned when the client closed its connection while waiting.
fn client_gone() -> Box<Error> {
    Error::create(
        ErrorType::ConnectionClosed,
        ErrorSource::Downstream,
        Some("client closed the connection while queued".into()),
        None,
    )
}

#[async_trait]
impl ProxyHttp for Sluice {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn early_request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The header is complete: its deadline is met, the request deadline starts.
        crate::idle::header_read();
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let arrived = Instant::now();
        ctx.arrived = Some(arrived);
        if let Some(probe) = session.req_header().headers.get(PROBE_HEADER) {
            return self
                .admit_probe(
                    session,
                    ctx,
                    probe.as_bytes() == self.probe_secret.as_bytes(),
                )
                .await;
        }
        let settings = self.settings(ctx);
        let raw = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        let line = crate::idle::request_line();
        if let Err(invalid) = check_request(session.req_header(), raw.as_deref(), line.as_deref()) {
            return refuse_invalid(session, ctx, invalid).await;
        }
        let declared = match validate(session.req_header(), raw.as_deref(), &settings) {
            Ok(declared) => declared,
            Err(invalid) => return refuse_invalid(session, ctx, invalid).await,
        };
        ctx.content_length = declared;
        ctx.http10 = session.req_header().version < http::Version::HTTP_11;
        // Idle time between requests on this connection (pingora carries it to the next
        // request on the same connection). An HTTP/1.0 client that did not ask for keep-alive
        // keeps pingora's default for it: close after the answer. Once shutdown started, this
        // answer closes the connection too.
        if client_wants_keepalive(session.req_header()) && !session.is_process_shutting_down() {
            session
                .as_downstream_mut()
                .set_keepalive(Some(settings.client_keepalive_secs));
        }
        if let Err(invalid) = self.receive_body(session, ctx, &settings, declared).await? {
            return refuse_invalid(session, ctx, invalid).await;
        }
        let deadline = self.admission.deadline();
        ctx.deadline = Some(deadline);
        let downstream = session.as_downstream_mut();
        // The whole request has been received, so any readable event on the socket means the
        // client hung up (or broke protocol): stop waiting for it.
        let admitted = {
            let acquire = self.admission.acquire_until(deadline, false);
            tokio::pin!(acquire);
            tokio::select! {
                biased;
                r = &mut acquire => r,
                _ = downstream.read_body_or_idle(true) => return Err(client_gone()),
            }
        };
        ctx.queue_wait = arrived.elapsed();
        match admitted {
            Ok(permit) => {
                let downstream = session.as_downstream_mut();
                // A slot granted in the very instant the client hung up: look once more before
                // the request is forwarded, so a leaver's payment never reaches the backend.
                if permit.was_queued() && downstream.is_body_done() {
                    let gone = tokio::select! {
                        biased;
                        _ = downstream.read_body_or_idle(true) => true,
                        _ = std::future::ready(()) => false,
                    };
                    if gone {
                        drop(permit);
                        return Err(client_gone());
                    }
                }
                ctx.backend = Some(permit.backend());
                ctx.permit = Some(permit);
                // From here on the backend may be working on this request: keep its slot until
                // the backend answers, even if the client leaves.
                downstream.set_abort_on_close(false);
                downstream.set_write_timeout(Some(settings.client_write_timeout));
                Ok(false)
            }
            Err(shed) => {
                ctx.shed = Some(shed);
                self.reject(session, shed, settings.retry_after_secs)
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if ctx.permit.is_none() && ctx.requeue {
            // The last backend refused the connection, so nothing reached it: wait for a slot
            // again (ahead of the queue, within the original deadline) instead of failing.
            ctx.requeue = false;
            let deadline = ctx.deadline.unwrap_or_else(tokio::time::Instant::now);
            match self.admission.acquire_until(deadline, true).await {
                Ok(permit) => {
                    ctx.backend = Some(permit.backend());
                    ctx.permit = Some(permit);
                }
                Err(shed) => {
                    ctx.shed = Some(shed);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(503),
                        "no backend could take the request before its deadline",
                    ));
                }
            }
        }
        let backend = ctx.permit.as_ref().map(Permit::backend).ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "upstream_peer reached without an admission permit",
            )
        })?;
        // Refresh the snapshot now that the request is admitted: a reload while it waited may
        // have added the backend it was admitted to.
        ctx.settings = Some(self.shared.settings());
        let settings = self.settings(ctx);
        let up = settings.upstreams.get(backend.0).ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "permit for an unknown backend")
        })?;
        let mut peer = up.peer.clone();
        // Connections pooled before the backend last came back are never reused.
        peer.group_key = self.admission.generation(backend);
        peer.options.idle_timeout = self.shared.upstream.idle_timeout(peer.options.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let settings = self.settings(ctx);
        let up = ctx
            .permit
            .as_ref()
            .and_then(|p| settings.upstreams.get(p.backend().0));
        if let Some(up) = up {
            match &up.host {
                Some(host) => upstream_request.insert_header("Host", host)?,
                // Only an HTTP/1.0 request gets here without one (an HTTP/1.1 one was
                // refused), and it goes upstream as HTTP/1.1, which must carry a Host: the
                // backend's address.
                None if !upstream_request.headers.contains_key(http::header::HOST) => {
                    upstream_request.insert_header("Host", &up.address)?
                }
                None => {}
            }
        }
        // A legacy server expects origin-form: turn an absolute-form target
        // (`GET http://host/path`) into `/path`, keeping the Host header.
        if upstream_request.uri.authority().is_some() {
            let origin = upstream_request
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            if let Ok(uri) = origin.parse::<http::Uri>() {
                upstream_request.set_uri(uri);
            }
        }
        match (&ctx.body, ctx.content_length) {
            (Some(body), _) => {
                // sluice already answered `100 Continue` and holds the whole body: it goes to
                // the backend with a Content-Length (a legacy server may not take a chunked
                // upload).
                upstream_request.remove_header(&http::header::EXPECT);
                upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
                upstream_request
                    .insert_header(http::header::CONTENT_LENGTH, body.len.to_string())?;
            }
            // An empty body's Content-Length the client repeated (`0, 0`, or two identical
            // headers) goes as one.
            (None, Some(n))
                if upstream_request
                    .headers
                    .contains_key(http::header::CONTENT_LENGTH) =>
            {
                upstream_request.insert_header(http::header::CONTENT_LENGTH, n.to_string())?;
            }
            (None, _) => {}
        }
        upstream_request.remove_header(PROBE_HEADER);
        upstream_request.remove_header(PROBE_BACKEND_HEADER);
        ctx.upstream_start = Some(Instant::now());
        if !ctx.probe {
            // From here the backend may be working on the request. Should the exchange end
            // without its answer (an upstream timeout, or the request deadline cutting it), the
            // slot stays taken a while longer: that work still occupies the backend.
            let hold = settings.timeout_hold;
            if let Some(p) = ctx.permit.as_mut() {
                p.hold_on_drop(Some(hold));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.answer_started = true;
        if let (Some(backend), false) = (ctx.backend, ctx.probe) {
            let latency = ctx.upstream_start.map(|t| t.elapsed()).unwrap_or_default();
            let sample = if upstream_response.status.is_server_error() {
                Sample::Failed(latency)
            } else {
                Sample::Ok(latency)
            };
            self.admission.record_outcome(backend, sample);
            self.admission.observe_passive(backend, None);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.http10 {
            let head = session.req_header().method == http::Method::HEAD;
            if frame_for_http10(response, head) {
                // No length: the body ends when the connection does. Said before the header
                // is written, so the client reads `Connection: close`.
                session.as_downstream_mut().set_keepalive(None);
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Every body was received and checked whole before admission; pingora sends it from its
        // retry buffer (again on a retry). For a body larger than that buffer, the buffer holds
        // only the tail, and the whole body goes instead.
        if let (Some(whole), Some(_)) = (ctx.body.as_ref().and_then(|b| b.whole.as_ref()), &body) {
            *body = Some(whole.clone());
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.probe {
            return e;
        }
        if let Some(backend) = ctx.backend {
            // No answer: nothing was sent, but the backend is not taking connections.
            self.admission.record_outcome(backend, Sample::Lost);
            self.admission
                .observe_passive(backend, Some(failure_text(e.etype())));
        }
        // Nothing reached the backend: give the slot back and wait for one again, while the
        // request's deadline allows. Each retry waits for a backend that is (again) up.
        let in_time = ctx
            .deadline
            .is_some_and(|d| d > tokio::time::Instant::now());
        if in_time {
            // Not held after release: this connection was refused, and a backend that refuses
            // connections is not working on anything this request sent before (a retry after
            // a reused connection closed under it).
            if let Some(mut permit) = ctx.permit.take() {
                permit.hold_on_drop(None);
            }
            ctx.requeue = true;
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // A connection parked after a late answer is a reused one, whatever pingora saw.
        let client_reused =
            client_reused || ctx.conn.as_ref().is_some_and(crate::ghost::Claim::recycled);
        if let (Some(backend), false) = (ctx.backend, ctx.probe) {
            if matches!(e.esource(), ErrorSource::Upstream) {
                let latency = ctx.upstream_start.map(|t| t.elapsed()).unwrap_or_default();
                let sample = match e.etype() {
                    // The backend never answered what it was sent.
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout => Some(Sample::Lost),
                    // A fresh connection cut after the request was sent; on a pooled one it is
                    // most likely the backend's idle close racing the reuse: no evidence.
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                        (!client_reused).then_some(Sample::Lost)
                    }
                    _ => Some(Sample::Failed(latency)),
                };
                if let Some(sample) = sample {
                    self.admission.record_outcome(backend, sample);
                }
                if matches!(
                    e.etype(),
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout
                ) {
                    self.admission
                        .observe_passive(backend, Some(failure_text(e.etype())));
                }
            }
        }
        // pingora's policy: never retry a non-idempotent request once it may have reached the
        // backend; idempotent ones only on a reused connection that closed before answering.
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent()
            || session.as_downstream().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => match e.etype() {
                    ErrorType::ReadTimedout | ErrorType::ConnectTimedout => 504,
                    _ => 502,
                },
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError
                    | ErrorType::ReadError
                    | ErrorType::ConnectionClosed
                    | ErrorType::WriteTimedout
                    | ErrorType::ReadTimedout => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // Nothing can be sent once the response has started, or to a client that is gone.
        if ctx.probe && code > 0 && final_response(session).is_none() {
            // Our own health checker: tell it why, so that a transition is logged with the
            // backend's failure rather than with sluice's 502.
            if let Err(err) = write_probe_error(session, code, failure_text(e.etype())).await {
                log::debug!("could not answer the health check: {err}");
            }
        } else if code > 0 && final_response(session).is_none() {
            let retry_after = self.settings(ctx).retry_after_secs;
            if let Err(err) = write_error(session, code, retry_after).await {
                log::debug!("could not send {code} to the client: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(b), false) = (ctx.backend, reused) {
            self.shared.upstream.opened(b.0, fd);
        }
        ctx.conn = self.shared.upstream.dialed().claim(fd);
        if let Some(b) = ctx.backend {
            if let Some(up) = self.settings(ctx).upstreams.get(b.0) {
                self.shared.metrics.upstream_connection(&up.name, reused);
            }
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // A failed health probe is reported once per transition by admission (with the
        // reason), not once per check.
        ctx.probe
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Release the backend slot first: the response has been delivered or the request is
        // over, and the next waiter should not wait for bookkeeping. After an upstream timeout
        // the backend is most likely still working on the request: the slot is held a while.
        let mut limit = None;
        if let Some(permit) = ctx.permit.take() {
            let timed_out = e.is_some_and(|e| {
                matches!(e.esource(), ErrorSource::Upstream)
                    && matches!(
                        e.etype(),
                        ErrorType::ReadTimedout | ErrorType::WriteTimedout
                    )
            });
            let hold = self.settings(ctx).timeout_hold;
            if timed_out && !ctx.probe && !hold.is_zero() {
                self.hold_timed_out(session, ctx, permit, hold);
            } else {
                // The connection is no longer this request's before its slot goes to the
                // next one, whose dial must see it as idle (see `ghost`).
                ctx.conn = None;
                limit = permit.release();
            }
        }
        // The connection's spare descriptor closes now if pingora is done with it.
        ctx.conn = None;
        if ctx.probe {
            return;
        }
        let status = final_response(session)
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        let outcome = match (ctx.shed, e) {
            _ if ctx.invalid == Some(Invalid::BodyBudget) => Outcome::BodyBudget,
            _ if ctx.invalid.is_some() => Outcome::BadRequest,
            (Some(Shed::QueueFull), _) => Outcome::QueueFull,
            (Some(Shed::QueueTimeout), _) => Outcome::QueueTimeout,
            (Some(Shed::BackendDown), _) => Outcome::BackendDown,
            (None, Some(e)) => match e.esource() {
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::InvalidHTTPHeader | ErrorType::H1Error => Outcome::BadRequest,
                    _ => Outcome::ClientAbort,
                },
                ErrorSource::Upstream => Outcome::UpstreamError,
                _ => match e.etype() {
                    ErrorType::HTTPStatus(400) => Outcome::BadRequest,
                    _ => Outcome::UpstreamError,
                },
            },
            (None, None) if status >= 500 => Outcome::BackendError,
            (None, None) => Outcome::Ok,
        };
        let settings = self.settings(ctx);
        let backend = ctx
            .backend
            .and_then(|b| settings.upstreams.get(b.0))
            .map(|u| u.name.as_str());
        let metrics = &self.shared.metrics;
        metrics.request(backend.unwrap_or(NO_BACKEND), outcome);
        metrics.queue_wait(ctx.queue_wait.as_secs_f64());
        let upstream = ctx.upstream_start.map(|t| t.elapsed());
        if let (Some(name), Some(d)) = (backend, upstream) {
            metrics.upstream_duration(name, d.as_secs_f64());
        }
        let log = self.shared.access_log();
        if log.enabled() {
            let req = session.req_header();
            let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            log.log(&access_log::Entry {
                time: std::time::SystemTime::now(),
                client: session.client_addr(),
                method: req.method.as_str(),
                path,
                status,
                queue_ms: ctx.queue_wait.as_secs_f64() * 1000.0,
                upstream_ms: upstream.map(|d| d.as_secs_f64() * 1000.0),
                bytes: session.body_bytes_sent(),
                backend,
                outcome: outcome.as_str(),
                limit: limit.map(|l| l.limit),
                limit_why: limit.and_then(|l| l.why),
                error: e,
            });
        }
    }
}

/// A short error response with `Connection: close`.
/// Answer a request refused before admission (400 / 408 / 413 / 431) and close the connection:
/// the rest of it cannot be trusted to be framed as the client meant.
async fn refuse_invalid(
    session: &mut Session,
    ctx: &mut RequestCtx,
    invalid: Invalid,
) -> Result<bool> {
    ctx.invalid = Some(invalid);
    session.as_downstream_mut().set_keepalive(None);
    // A 503 (no room to buffer the body) is worth retrying: say when.
    let retry_after = (invalid.status() == 503).then(|| {
        ctx.settings
            .as_ref()
            .map(|s| s.retry_after_secs)
            .unwrap_or(1)
    });
    write_error_with(session, invalid.status(), invalid.message(), retry_after).await?;
    Ok(true)
}

/// The final (non-1xx) response header sent to the client, if any: a `100 Continue` does not
/// count, an error can still follow it.
fn final_response(session: &Session) -> Option<&ResponseHeader> {
    session
        .response_written()
        .filter(|h| !h.status.is_informational())
}

async fn write_error_with(
    session: &mut Session,
    code: u16,
    message: &str,
    retry_after_secs: Option<u64>,
) -> Result<()> {
    let body = Bytes::from(format!("{code} {message}\n"));
    let mut h = ResponseHeader::build(code, Some(4))?;
    if let Some(secs) = retry_after_secs {
        h.insert_header("Retry-After", secs.to_string())?;
    }
    h.insert_header("Content-Type", "text/plain")?;
    h.insert_header("Content-Length", body.len().to_string())?;
    h.insert_header("Cache-Control", "no-store")?;
    session.as_downstream_mut().set_keepalive(None);
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Header on sluice's own answer to a health probe that could not reach the backend: why.
pub const PROBE_ERROR_HEADER: &str = "x-sluice-probe-error";

/// Why a request could not get an answer from its backend, in words, for logs.
pub fn failure_text(e: &ErrorType) -> &'static str {
    match e {
        ErrorType::ConnectRefused => "connection refused",
        ErrorType::ConnectTimedout => "connect timed out (upstream.connect_timeout)",
        ErrorType::ConnectNoRoute => "no route to host",
        ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => "TLS handshake failed",
        ErrorType::ReadTimedout => "no answer within upstream.read_timeout",
        ErrorType::WriteTimedout => "write timed out (upstream.write_timeout)",
        ErrorType::ConnectionClosed => "connection closed before the answer",
        ErrorType::ReadError => "read error",
        ErrorType::WriteError => "write error",
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error => "malformed answer",
        other => other.as_str(),
    }
}

/// sluice's answer to its own health probe when the backend gave none: `code`, with the reason
/// in [`PROBE_ERROR_HEADER`].
async fn write_probe_error(session: &mut Session, code: u16, why: &str) -> Result<()> {
    let body = Bytes::from(format!("{code} {why}\n"));
    let mut h = ResponseHeader::build(code, Some(4))?;
    h.insert_header(PROBE_ERROR_HEADER, why)?;
    h.insert_header("Content-Type", "text/plain")?;
    h.insert_header("Content-Length", body.len().to_string())?;
    session.as_downstream_mut().set_keepalive(None);
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// An error response after the request was admitted. The connection is closed afterwards: its
/// state toward the backend is unknown.
async fn write_error(session: &mut Session, code: u16, retry_after_secs: u64) -> Result<()> {
    let reason = match code {
        502 => "bad gateway: the backend failed to answer",
        503 => "service unavailable",
        504 => "gateway timeout: the backend did not answer in time",
        400 => "bad request",
        413 => "request body too large",
        431 => "request header too large",
        _ => "error",
    };
    let retry_after = (code >= 500).then_some(retry_after_secs);
    write_error_with(session, code, reason, retry_after).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            upstreams: Vec::new(),
            retry_after_secs: 1,
            client_write_timeout: Duration::from_secs(1),
            client_keepalive_secs: 1,
            max_header_bytes: 2048,
            max_body_bytes: 100,
            max_connections: 10,
            max_connections_per_ip: 0,
            client_keepalive_timeout: Duration::from_secs(1),
            client_header_timeout: Duration::from_secs(1),
            body_pace: sluice_plugins::body_pace::BodyPace {
                start: Duration::from_secs(1),
                min_rate: 240,
                total: Duration::from_secs(1),
            },
            max_buffered_body_bytes: 1000,
            request_timeout: Duration::from_secs(1),
            timeout_hold: Duration::from_secs(1),
        }
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/pay", None).expect("request");
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    fn validate_parsed(
        req: &RequestHeader,
        s: &Settings,
    ) -> std::result::Result<Option<u64>, Invalid> {
        validate(req, None, s)
    }

    #[test]
    fn framing_and_size_rules() {
        let s = settings();
        assert_eq!(
            validate_parsed(&req(&[("content-length", "10")]), &s),
            Ok(Some(10))
        );
        assert_eq!(
            validate_parsed(&req(&[("content-length", "10, 10")]), &s),
            Ok(Some(10))
        );
        assert_eq!(
            validate_parsed(&req(&[("transfer-encoding", "chunked")]), &s),
            Ok(None)
        );
        assert!(matches!(
            validate_parsed(
                &req(&[("content-length", "10"), ("content-length", "11")]),
                &s
            ),
            Err(Invalid::Framing(_))
        ));
        assert!(matches!(
            validate_parsed(&req(&[("transfer-encoding", "gzip, chunked")]), &s),
            Err(Invalid::Framing(_))
        ));
        assert!(matches!(
            validate_parsed(&req(&[("content-length", "+5")]), &s),
            Err(Invalid::Framing(_))
        ));
        assert_eq!(
            validate_parsed(&req(&[("content-length", "101")]), &s),
            Err(Invalid::BodyTooLarge)
        );
        let pad = "a".repeat(3000);
        assert_eq!(
            validate_parsed(&req(&[("x-pad", &pad)]), &s),
            Err(Invalid::HeaderTooLarge)
        );
    }

    #[test]
    fn content_length_hidden_by_the_parser_is_still_refused() {
        let s = settings();
        let te = req(&[("transfer-encoding", "chunked")]);
        let raw = b"POST /pay HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            validate(&te, Some(raw), &s),
            Err(Invalid::Framing(_))
        ));
        let raw = b"POST /pay HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(validate(&te, Some(raw), &s), Ok(None));
    }

    fn get(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/pay?txn=1", None).expect("request");
        r.set_version(version);
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    #[test]
    fn host_rules() {
        use http::Version;
        let host = [("host", "pos")];
        assert_eq!(
            check_request(&get(Version::HTTP_11, &host), None, None),
            Ok(())
        );
        assert!(matches!(
            check_request(&get(Version::HTTP_11, &[]), None, None),
            Err(Invalid::Malformed(_))
        ));
        assert_eq!(
            check_request(&get(Version::HTTP_10, &[]), None, None),
            Ok(())
        );
        assert!(matches!(
            check_request(
                &get(Version::HTTP_10, &[("host", "a"), ("host", "b")]),
                None,
                None
            ),
            Err(Invalid::Malformed(_))
        ));
    }

    #[test]
    fn request_line_rules() {
        let r = get(http::Version::HTTP_11, &[("host", "pos")]);
        let ok: &[&[u8]] = &[
            b"GET /pay?txn=1 HTTP/1.1\r\n",
            b"GET /pay?txn=1 HTTP/1.1\n",
            b"GET /a%20b%41 HTTP/1.1\r\n",
        ];
        for line in ok {
            assert_eq!(check_request(&r, None, Some(line)), Ok(()), "{line:?}");
        }
        let bad: &[&[u8]] = &[
            b"GET /a b HTTP/1.1\r\n",
            b"GET /a\0b HTTP/1.1\r\n",
            b"GET /a\rb HTTP/1.1\r\n",
            b"GET /a\x01b HTTP/1.1\r\n",
            b"GET /a\x7fb HTTP/1.1\r\n",
            b"GET /a\tb HTTP/1.1\r\n",
            b"GET  /a HTTP/1.1\r\n",
        ];
        for line in bad {
            assert!(
                matches!(
                    check_request(&r, None, Some(line)),
                    Err(Invalid::Malformed(_))
                ),
                "{line:?}"
            );
        }
        // What pingora's parser leaves of a raw control character: its escape.
        for raw in [
            &b"GET /a%00b HTTP/1.1\r\nHost: pos\r\n\r\n"[..],
            b"GET /a%0db HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /a%1F HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /a%7f HTTP/1.1\r\nHost: pos\r\n\r\n",
        ] {
            assert!(
                matches!(
                    check_request(&r, Some(raw), None),
                    Err(Invalid::Malformed(_))
                ),
                "{raw:?}"
            );
        }
        for raw in [
            &b"GET /a%20b HTTP/1.1\r\nHost: pos\r\n\r\n"[..],
            b"GET /a%2 HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /%e2%82%ac HTTP/1.1\r\nHost: pos\r\n\r\n",
        ] {
            assert_eq!(check_request(&r, Some(raw), None), Ok(()), "{raw:?}");
        }
    }

    #[test]
    fn keepalive_and_http10_framing() {
        use http::Version;
        assert!(client_wants_keepalive(&get(Version::HTTP_11, &[])));
        assert!(!client_wants_keepalive(&get(Version::HTTP_10, &[])));
        assert!(client_wants_keepalive(&get(
            Version::HTTP_10,
            &[("connection", "Keep-Alive")]
        )));
        let mut chunked = ResponseHeader::build(200, None).expect("response");
        chunked
            .insert_header("transfer-encoding", "chunked")
            .expect("te");
        assert!(frame_for_http10(&mut chunked, false), "no length: close");
        assert!(!chunked.headers.contains_key("transfer-encoding"));
        let mut sized = ResponseHeader::build(200, None).expect("response");
        sized.insert_header("content-length", "3").expect("cl");
        assert!(!frame_for_http10(&mut sized, false), "a length: may keep");
        let mut head = ResponseHeader::build(200, None).expect("response");
        head.insert_header("transfer-encoding", "chunked")
            .expect("te");
        assert!(!frame_for_http10(&mut head, true), "HEAD has no body");
        assert!(!head.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn raw_header_scan() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n";
        assert!(raw_has_header(raw, b"content-length"));
        assert!(!raw_has_header(raw, b"transfer-encoding"));
        assert!(!raw_has_header(
            b"GET /content-length: HTTP/1.1\r\n\r\n",
            b"content-length"
        ));
    }
}
