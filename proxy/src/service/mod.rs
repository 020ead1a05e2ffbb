//! The pingora `ProxyHttp` service: each hook is a few lines around the request's
//! [`Exchange`], which owns its backend slot.
//!
//! Per request, in pingora's phase order:
//! 1. `request_filter`: check the request ([`request`]), receive its body whole, then wait for
//!    a backend slot ([`Exchange::admit`]). While it waits the client socket is watched, so a
//!    terminal that hangs up leaves the queue and its request never reaches the backend. A
//!    request that is not admitted gets a 503 with `Retry-After` on a connection that stays
//!    open ([`answers`]).
//! 2. `upstream_peer`: the admitted backend's prebuilt `HttpPeer` (the same peer value for
//!    every request of a backend is what lets pingora reuse pooled connections), after a new
//!    wait for a slot if the last connect was refused.
//! 3. `upstream_request_filter` .. `upstream_response_filter`: the request is sent, its answer
//!    seen ([`Exchange::sent`], [`Exchange::answered`]).
//! 4. `logging`: runs when the response has been fully delivered (or the request failed):
//!    [`Exchange::finish`] releases the slot, or holds it when the backend is most likely still
//!    working. pingora returns the upstream connection to its pool before `logging`, so the
//!    backend never holds more connections than slots. If `logging` never runs (a panic, the
//!    request deadline), dropping the context drops the exchange, which releases or holds
//!    the slot all the same.
//!
//! After admission the client's abort no longer cuts the upstream request short
//! (`set_abort_on_close(false)`): a payment the backend is already processing keeps its slot
//! until the backend answers, so the cap counts the work really at the backend.

pub mod answers;
pub mod body;
pub mod exchange;
pub mod progress;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use sluice_plugins::BackendId;
use tokio::time::Instant;

use crate::admission::{Admission, Shed};
use crate::observe::access_log;
use crate::observe::metrics::{Deadline, Disposition, NO_BACKEND};
use crate::shared::{Settings, Shared};
use exchange::{classify, Exchange, Finished, Held, NotAdmitted, Outcome};
use request::{Invalid, Upload};

pub use answers::PROBE_ERROR_HEADER;
pub use exchange::failure_text;
pub use request::{PROBE_BACKEND_HEADER, PROBE_HEADER};

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// The settings in force when the request arrived (refreshed once it is admitted): one
    /// consistent snapshot per request, taken on first use.
    settings: Option<Arc<Settings>>,
    /// Where the request is.
    state: State,
}

/// Where a request is; each state holds only what it uses.
// Most requests are admitted, so a boxed `Admitted` would not make the context smaller where it
// counts, and would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Default)]
enum State {
    /// Not yet through `request_filter` (or refused by pingora before it).
    #[default]
    Arrived,
    /// Refused before admission, and answered (400 / 408 / 413 / 431 / 503).
    Invalid(Invalid),
    /// Never admitted: shed with a 503, or (`shed` = `None`) the client left while it waited.
    NotAdmitted {
        /// Why it was refused.
        shed: Option<Shed>,
        /// How long it waited.
        queue_wait: Duration,
    },
    /// A health probe found its backend's cap full and was answered 204.
    ProbeBusy,
    /// Admitted: an exchange with a backend.
    Admitted(Admitted),
}

/// An admitted request.
#[derive(Debug)]
struct Admitted {
    exchange: Exchange,
    upload: Upload,
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

    /// The request's settings snapshot, taken on first use (one lock per request, and a reload
    /// never changes a request half-way).
    fn settings(&self, ctx: &mut RequestCtx) -> Arc<Settings> {
        ctx.settings
            .get_or_insert_with(|| self.shared.settings())
            .clone()
    }

    /// Check a request before it may wait for a slot, and receive its body whole (see
    /// [`crate::service::body`]): a slow or stalled sender never holds the backend's capacity, and a
    /// body that cannot be parsed is refused before any of it reaches the backend.
    /// `no_probe_headers`: the caller found none of sluice's probe headers on the request.
    async fn check(
        &self,
        session: &mut Session,
        settings: &Settings,
        no_probe_headers: bool,
    ) -> Result<std::result::Result<Upload, Invalid>> {
        let raw = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        if let Some(raw) = &raw {
            progress::header_bytes(raw.len());
        }
        let req = session.req_header();
        let checked =
            progress::with_request_line(|line| request::check_request(req, raw.as_deref(), line))
                .and_then(|()| request::validate(req, raw.as_deref(), settings));
        let content_length = match checked {
            Ok(declared) => declared,
            Err(invalid) => return Ok(Err(invalid)),
        };
        let http10 = req.version < http::Version::HTTP_11;
        // Idle time between requests on this connection (pingora carries it to the next
        // request on the same connection). An HTTP/1.0 client that did not ask for keep-alive
        // keeps pingora's default for it: close after the answer. Once shutdown started, this
        // answer closes the connection too: pingora turned keep-alive off when it read the
        // header (its shutdown notice), and its process-wide flag only follows once the
        // listeners are closed, so both are looked at (a request in between was answered
        // kept alive).
        if request::client_wants_keepalive(req)
            && session.as_downstream().get_keepalive().is_some()
            && !session.is_process_shutting_down()
        {
            session
                .as_downstream_mut()
                .set_keepalive(Some(settings.client_keepalive_secs));
        }
        Ok(self
            .receive_body(session, settings, content_length)
            .await?
            .map(|body| Upload {
                http10,
                content_length,
                body,
                no_probe_headers,
            }))
    }

    async fn receive_body(
        &self,
        session: &mut Session,
        settings: &Settings,
        declared: Option<u64>,
    ) -> Result<std::result::Result<Option<crate::service::body::Received>, Invalid>> {
        if session.as_downstream_mut().is_body_done() {
            return Ok(Ok(None));
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
        let limits = crate::service::body::Limits {
            pace: settings.body_pace,
            max_body_bytes: settings.max_body_bytes,
            max_buffered: settings.max_buffered_body_bytes,
        };
        use crate::service::body::Refusal;
        Ok(
            match crate::service::body::receive(
                downstream,
                declared,
                limits,
                &self.shared.body_budget,
            )
            .await?
            {
                Ok(received) => Ok(Some(received)),
                Err(Refusal::TooSlow) => {
                    self.shared.metrics.client_timeout(Deadline::Body);
                    Err(Invalid::BodyTimeout)
                }
                Err(Refusal::TooLarge) => Err(Invalid::BodyTooLarge),
                Err(Refusal::ChunkedTooLarge) => Err(Invalid::ChunkedTooLarge),
                Err(Refusal::Budget) => Err(Invalid::BodyBudget),
            },
        )
    }

    /// A request that was not admitted: a 503 with `Retry-After` on a connection kept open, or
    /// nothing for a client that left.
    async fn not_admitted(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        why: NotAdmitted,
        queue_wait: Duration,
    ) -> Result<bool> {
        let shed = match why {
            NotAdmitted::Shed(shed) => shed,
            NotAdmitted::ClientGone => {
                ctx.state = State::NotAdmitted {
                    shed: None,
                    queue_wait,
                };
                return Err(client_gone());
            }
        };
        ctx.state = State::NotAdmitted {
            shed: Some(shed),
            queue_wait,
        };
        let retry_after = self.settings(ctx).retry_after_secs;
        answers::shed(session, shed, retry_after).await?;
        Ok(true)
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
        match Exchange::probe(&self.admission, BackendId(backend)) {
            Some(exchange) => {
                ctx.state = State::Admitted(Admitted {
                    exchange,
                    upload: Upload::default(),
                });
                // Like any request: once sent, let the backend answer even if the checker gave
                // up, so the upstream connection ends cleanly and the slot counts real work.
                session.as_downstream_mut().set_abort_on_close(false);
                Ok(false)
            }
            None => {
                ctx.state = State::ProbeBusy;
                answers::probe_busy(session).await?;
                Ok(true)
            }
        }
    }

    /// After an upstream timeout the backend is most likely still working on the request: its
    /// slot stays taken. When sluice still holds the connection ([`crate::ghost`]), the slot is
    /// released when the backend answers or closes it, and at `hold` at the latest; otherwise
    /// (a TLS backend) it is held for `hold`.
    fn hold(&self, session: &Session, backend: BackendId, held: Held, settings: &Settings) {
        let Some(up) = settings.upstreams.get(backend.0) else {
            return; // dropped with its hold
        };
        self.shared.metrics.timeout_hold(&up.name);
        let Held {
            mut permit,
            conn,
            sent,
            answer_started,
            hold,
        } = held;
        let Some((addr, sock)) = conn.and_then(crate::ghost::Claim::orphan) else {
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
            answer_started,
            until: Instant::now() + hold,
            park_idle: self
                .shared
                .upstream
                .idle_timeout(up.peer.options.idle_timeout)
                .unwrap_or(hold),
        };
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

    /// Count a finished request in the metrics and write its access-log entry.
    fn observe(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        e: Option<&Error>,
        outcome: Outcome,
        limit: Option<crate::admission::LimitNow>,
        now: Instant,
    ) {
        let status = final_response(session).map_or(0, |h| h.status.as_u16());
        let disposition = disposition(&ctx.state, outcome, status);
        let exchange = match &ctx.state {
            State::Admitted(a) => Some(&a.exchange),
            _ => None,
        };
        let queue_wait = match &ctx.state {
            State::NotAdmitted { queue_wait, .. } => *queue_wait,
            _ => exchange.map_or(Duration::ZERO, Exchange::queue_wait),
        };
        let up = exchange
            .zip(ctx.settings.as_ref())
            .and_then(|(x, s)| s.upstreams.get(x.backend().0));
        let backend = up.map(|u| u.name.as_str());
        let metrics = &self.shared.metrics;
        let upstream = exchange.and_then(|x| x.upstream_elapsed_at(now));
        match up {
            Some(u) => {
                metrics.backend_request(&u.metrics, &u.name, disposition);
                if let Some(d) = upstream {
                    metrics.backend_upstream_duration(&u.metrics, &u.name, d.as_secs_f64());
                }
            }
            None => metrics.request(NO_BACKEND, disposition),
        }
        metrics.queue_wait(queue_wait.as_secs_f64());
        // Read in this thread's handle, not cloned out of it.
        self.shared.access_log.with(|log| {
            if !log.enabled() {
                return;
            }
            let req = session.req_header();
            let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            log.log(&access_log::Entry {
                time: access_log::wall_clock(now),
                client: session.client_addr(),
                method: req.method.as_str(),
                path,
                status,
                queue: queue_wait,
                upstream,
                bytes: session.body_bytes_sent(),
                backend,
                outcome: disposition.as_str(),
                limit: limit.map(|l| l.limit),
                limit_why: limit.and_then(|l| l.why),
                error: e,
            });
        });
    }
}

/// The metrics label of a finished request.
fn disposition(state: &State, outcome: Outcome, status: u16) -> Disposition {
    let shed = match state {
        State::Invalid(Invalid::BodyBudget) => return Disposition::BodyBudget,
        State::Invalid(_) => return Disposition::BadRequest,
        State::NotAdmitted { shed, .. } => *shed,
        State::Admitted(a) => a.exchange.shed(),
        State::Arrived | State::ProbeBusy => None,
    };
    match (shed, outcome) {
        (Some(Shed::QueueFull), _) => Disposition::QueueFull,
        (Some(Shed::QueueTimeout), _) => Disposition::QueueTimeout,
        (Some(Shed::BackendDown), _) => Disposition::BackendDown,
        (None, Outcome::Answered) if status >= 500 => Disposition::BackendError,
        (None, Outcome::Answered) => Disposition::Ok,
        (None, Outcome::ClientGone) => Disposition::ClientAbort,
        (None, Outcome::BadRequest | Outcome::Refused(400)) => Disposition::BadRequest,
        (None, _) => Disposition::UpstreamError,
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

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let arrived = Instant::now();
        // The header is complete: its deadline is met, the request deadline starts. (pingora
        // does no I/O between reading the header and this hook: only `early_request_filter`
        // and its modules' header filters run in between.)
        progress::header_read(arrived);
        let no_probe_headers = request::without_probe_headers(session.req_header());
        if !no_probe_headers {
            if let Some(probe) = session.req_header().headers.get(PROBE_HEADER) {
                let authentic = probe.as_bytes() == self.probe_secret.as_bytes();
                return self.admit_probe(session, ctx, authentic).await;
            }
        }
        // Borrowed from the request's snapshot, not cloned (see `connected_to_upstream`).
        let settings = ctx.settings.get_or_insert_with(|| self.shared.settings());
        let upload = match self.check(session, settings, no_probe_headers).await? {
            Ok(upload) => upload,
            Err(invalid) => {
                ctx.state = State::Invalid(invalid);
                answers::invalid(session, invalid, settings.retry_after_secs).await?;
                return Ok(true);
            }
        };
        let (queue_timeout, hold, write_timeout) = (
            settings.queue_timeout,
            settings.timeout_hold,
            settings.client_write_timeout,
        );
        // The whole request has been received, so any readable event on the socket means the
        // client hung up (or broke protocol): stop waiting for it.
        // The queue deadline counts from the request's arrival, or from the end of its body
        // (the clock read again only then).
        let now = if upload.body.is_some() {
            Instant::now()
        } else {
            arrived
        };
        let gone = session.as_downstream_mut().read_body_or_idle(true);
        let deadline = now + queue_timeout;
        let (admitted, queue_wait) =
            Exchange::admit(&self.admission, (arrived, now), deadline, hold, gone).await;
        let exchange = match admitted {
            Ok(exchange) => exchange,
            Err(why) => return self.not_admitted(session, ctx, why, queue_wait).await,
        };
        ctx.state = State::Admitted(Admitted { exchange, upload });
        // From here on the backend may be working on this request: keep its slot until the
        // backend answers, even if the client leaves.
        let downstream = session.as_downstream_mut();
        downstream.set_abort_on_close(false);
        downstream.set_write_timeout(Some(write_timeout));
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let State::Admitted(admitted) = &mut ctx.state else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "upstream_peer reached without an admission",
            ));
        };
        // After a refused connect, nothing reached the backend: wait for a slot again.
        let backend = admitted
            .exchange
            .readmit(&self.admission)
            .await
            .map_err(|_| {
                Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no backend could take the request before its deadline",
                )
            })?;
        // Refresh the snapshot now that the request is admitted if a reload came while it
        // waited (it may have added the backend the request was admitted to). Checked without
        // taking a reference: every copy of a snapshot shares its config.
        let settings = match &mut ctx.settings {
            Some(held)
                if self
                    .shared
                    .with_settings(|now| Arc::ptr_eq(&now.config, &held.config)) =>
            {
                held
            }
            slot => slot.insert(self.shared.settings()),
        };
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
        let settings = ctx.settings.get_or_insert_with(|| self.shared.settings());
        let State::Admitted(Admitted { exchange, upload }) = &mut ctx.state else {
            return Ok(());
        };
        let up = settings.upstreams.get(exchange.backend().0);
        request::rewrite_upstream(upstream_request, up, upload)?;
        exchange.sent();
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let State::Admitted(a) = &mut ctx.state {
            a.exchange.answered(upstream_response.status.as_u16());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let State::Admitted(a) = &ctx.state {
            let head = session.req_header().method == http::Method::HEAD;
            if a.upload.http10 && request::frame_for_http10(response, head) {
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
        if let State::Admitted(a) = &ctx.state {
            let whole = a.upload.body.as_ref().and_then(|b| b.whole.as_ref());
            if let (Some(whole), Some(_)) = (whole, &body) {
                *body = Some(whole.clone());
            }
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
        if let State::Admitted(a) = &mut ctx.state {
            if a.exchange
                .connect_refused(&self.admission, failure_text(e.etype()))
            {
                e.set_retry(true);
            }
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
        let reused = match &ctx.state {
            State::Admitted(a) => client_reused || a.exchange.reused(),
            _ => client_reused,
        };
        // pingora's policy: never retry a non-idempotent request once it may have reached the
        // backend; idempotent ones only on a reused connection that closed before answering.
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent()
            || session.as_downstream().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = classify(e).status();
        let probe = matches!(&ctx.state, State::Admitted(a) if a.exchange.is_probe());
        // Nothing can be sent once the response has started, or to a client that is gone.
        if code > 0 && final_response(session).is_none() {
            let written = if probe {
                // Our own health checker: tell it why, so that a transition is logged with the
                // backend's failure rather than with sluice's 502.
                answers::probe_failed(session, code, failure_text(e.etype())).await
            } else {
                let retry_after = self.settings(ctx).retry_after_secs;
                answers::failed(session, code, retry_after).await
            };
            if let Err(err) = written {
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
        // Borrowed, not cloned: a clone writes a reference count another worker thread may
        // hold (the request's task moves between them).
        let RequestCtx { settings, state } = ctx;
        let State::Admitted(a) = state else {
            return Ok(());
        };
        let backend = a.exchange.backend();
        if !reused {
            self.shared.upstream.opened(backend.0, fd);
        }
        a.exchange
            .connected(reused, self.shared.upstream.dialed().claim(fd));
        // A connection rescued from pingora's pool race is new to pingora but not to the
        // backend: it counts as reused, so that `reused="false"` is what the backend accepted.
        // Taken by `upstream_peer`, which comes first.
        if let Some(up) = settings.as_ref().and_then(|s| s.upstreams.get(backend.0)) {
            self.shared.metrics.backend_upstream_connection(
                &up.metrics,
                &up.name,
                a.exchange.reused(),
            );
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // A failed health probe is reported once per transition by admission (with the
        // reason), not once per check.
        matches!(&ctx.state, State::Admitted(a) if a.exchange.is_probe())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The slot first: the response has been delivered or the request is over, and the next
        // waiter should not wait for bookkeeping.
        let outcome = e.map_or(Outcome::Answered, classify);
        // One clock read for the release, the latency sample and the log line.
        let now = Instant::now();
        if let Some(h1) = session.as_downstream().as_http1() {
            progress::body_bytes(h1.body_bytes_read());
        }
        let mut limit = None;
        let RequestCtx { settings, state } = &mut *ctx;
        match state {
            State::Admitted(a) => {
                match a.exchange.finish_at(&self.admission, outcome, now) {
                    Finished::Released(now) => limit = now,
                    // An admitted request took its settings first (dropped with its hold
                    // otherwise, which cannot happen).
                    Finished::Held(held) => {
                        if let Some(settings) = settings.as_deref() {
                            self.hold(session, a.exchange.backend(), held, settings)
                        }
                    }
                    Finished::Nothing => {}
                }
                if a.exchange.is_probe() {
                    return;
                }
            }
            State::ProbeBusy => return,
            _ => {}
        }
        self.observe(session, ctx, e, outcome, limit, now);
    }
}

/// The final (non-1xx) response header sent to the client, if any: a `100 Continue` does not
/// count, an error can still follow it.
fn final_response(session: &Session) -> Option<&ResponseHeader> {
    session
        .response_written()
        .filter(|h| !h.status.is_informational())
}
