//! sluice's own HTTP/1 connection loop: client connection caps, the request-header and
//! total-request deadlines, and small idle keep-alive connections.
//!
//! pingora waits for a connection's next request *inside* its per-request machinery: while a
//! terminal's kept-alive connection sits idle, the connection still holds pingora's boxed
//! request futures (≈ 13 KiB), a 4 KiB header buffer allocated before the first byte arrives,
//! and its connection task. With thousands of idle terminals that is most of sluice's memory
//! (measured: ≈ 30 KiB per idle connection; HAProxy ≈ 1 KiB).
//!
//! So sluice takes the connection loop over through pingora's custom-session hook
//! (`HttpServerOptions::force_custom` + `ProxyServiceBuilder::custom`): a connection's requests
//! run in a boxed future (its busy spell) that is dropped once the connection has idled for
//! `PARK_AFTER` (100 ms). Until then, between requests, the connection waits for one readable byte
//! (peeked, not consumed). After that, it gives pingora's stream up and waits, for the rest of
//! the client keep-alive timeout, on a bare duplicate of its socket
//! ([`crate::compat::take_socket`]), so an idle terminal costs its task and a socket
//! registration, not pingora's stream and buffers; the next request gets a new pingora stream
//! on the same socket. The requests themselves go through pingora's `process_new_http`,
//! exactly as in pingora's own loop (persistent keep-alive settings included). This serves
//! HTTP/1 (plain or over TLS); sluice offers no h2. A TLS stream cannot be peeked, so a
//! kept-alive TLS connection waits for its next request in pingora's header read instead
//! (bounded by the keep-alive timeout), holding more memory.
//!
//! Owning the loop is also what makes three protections sound:
//! - **Connection caps.** Every connection is counted from accept to close, in total and per
//!   client IP. One over `proxy.max_connections` (or `proxy.max_connections_per_ip`, off by
//!   default because a store's terminals share one NAT address) gets a `503` with
//!   `Retry-After` and `Connection: close` at once and is closed; it never reaches pingora.
//!   During a flood, at most 256 refusals are answered at a time; the rest are closed at once.
//! - **Header deadline.** pingora times each read of a request header separately (60 s), so a
//!   client trickling one byte at a time holds its connection for ever. Here the whole request
//!   runs in a future raced against `proxy.client_header_timeout`, counted from the accept (first
//!   request) or from the first byte (later requests). The service marks the moment the header
//!   is complete ([`progress::header_read`], at the start of `request_filter`, through a task-local); if the
//!   deadline passes before that, the future is dropped and the connection closed. Nothing has
//!   been admitted or sent upstream at that point, so dropping it is safe.
//! - **Request deadline.** From the complete header, the exchange has `proxy.request_timeout`
//!   in all; past it the future is dropped: the client's connection and the backend connection
//!   are closed and the backend slot is released with them.
//!
//! **Shutdown and upgrade.** When shutdown starts (SIGTERM, or SIGQUIT once the new process has
//! the listeners), a kept-alive connection is *not* closed: a terminal may already have sent
//! its next request, and closing under it fails that request (WinInet then re-sends a POST's
//! header without its body). The connection keeps waiting; its next request is served and
//! answered with `Connection: close` (pingora drops keep-alive once shutdown started), and the
//! connection closes after the answer. Idle ones are closed when pingora drops the runtime at
//! the end of the grace period. A TLS connection waiting in pingora's header read is still
//! closed at the start of shutdown.

pub mod reclaim;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, ProcessCustomSession};
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::conn::reclaim::Reclaimable;
use crate::observe::metrics::{Deadline, Metrics, Refused};
use crate::service::progress::{self, Progress};
use crate::service::{answers, Sluice};
use crate::shared::Shared;

type Proxy = HttpProxy<Sluice, ()>;

/// How long a refused connection is drained after its 503, so the client reads the answer
/// instead of a reset caused by its own unread request bytes.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// At most this much of a refused connection's request is read and discarded.
const REFUSE_LINGER_BYTES: usize = 64 * 1024;
/// At most this many refused connections get their 503 and linger at once; past it (a flood
/// of connections over the cap) a refused connection is closed at once, so refusals cannot
/// use up the file descriptors the cap protects.
const REFUSE_MAX_PENDING: usize = 256;

/// Longest request line read ahead of pingora; a longer one is left to pingora's limits.
const REQUEST_LINE_MAX: usize = 16 * 1024;

/// How reading ahead of pingora ended. Whatever was read is put back into the stream (except
/// after a timeout, when the stream is only good for a last answer), and left in the caller's
/// buffer.
enum ReadAhead {
    /// What was read so far satisfied the caller's test.
    Done(Stream),
    /// The limit was reached without that.
    Full(Stream),
    /// The client closed, or a read failed, first.
    Closed(Stream),
    /// The deadline passed first.
    TimedOut(Stream),
    /// Not a plain TCP stream: nothing was read (a TLS stream cannot be put back).
    Unsupported(Stream),
    /// The stream could not be recovered (not expected: its type is checked first).
    Lost,
}

/// How much more room each read ahead of pingora asks for.
const READ_AHEAD_CHUNK: usize = 1024;

/// A connection's one timer, serving each of its deadlines in turn (the wait for the next
/// request, the header's, the request's; they never overlap). Moving the deadline later leaves
/// the timer as it is: it fires at the earlier instant, finds the deadline moved, and is set
/// again then. Setting a tokio timer registers it again with the runtime's timer wheel, under
/// its lock; done for every deadline, that was three times per request. Under load a
/// connection's timer is now set about once per [`PARK_AFTER`], whatever its request rate.
struct SpellTimer<'a> {
    timer: Pin<&'a mut Sleep>,
    /// The deadline in force; the timer is set at it or earlier.
    at: Instant,
    /// The waker the timer was last polled with, while it stays set. The connection's task is
    /// woken several times per request by its sockets; polling the timer each time would only
    /// register the same waker with it again, so [`Passed`] asks the timer whether it fired
    /// (a load) instead.
    armed_for: Option<Waker>,
}

impl<'a> SpellTimer<'a> {
    /// A deadline at the instant `timer` is set for.
    fn new(timer: Pin<&'a mut Sleep>) -> Self {
        let at = timer.deadline();
        SpellTimer {
            timer,
            at,
            armed_for: None,
        }
    }

    /// Move the deadline to `at` (earlier or later).
    fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.timer.deadline() {
            self.timer.as_mut().reset(at);
            self.armed_for = None;
        }
    }

    /// Completes once the deadline in force has passed.
    fn passed(&mut self) -> Passed<'_, 'a> {
        Passed(self)
    }
}

/// The future of [`SpellTimer::passed`].
struct Passed<'t, 'a>(&'t mut SpellTimer<'a>);

impl Future for Passed<'_, '_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let t = &mut *self.get_mut().0;
        loop {
            // Set, polled with this task's waker already, and not fired: nothing has changed.
            if t.armed_for
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
                && !t.timer.is_elapsed()
            {
                return Poll::Pending;
            }
            match t.timer.as_mut().poll(cx) {
                Poll::Pending => {
                    t.armed_for = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(()) => {
                    t.armed_for = None;
                    if t.timer.deadline() >= t.at {
                        return Poll::Ready(());
                    }
                    let at = t.at;
                    t.timer.as_mut().reset(at);
                }
            }
        }
    }
}

/// Read a plain TCP connection's next bytes into `buf` (emptied first; a busy spell reuses one
/// buffer for all its requests), by `at` (on the connection's `deadline`), until `done` holds
/// for what was read or `max` bytes came, and put them back into the stream for pingora to
/// parse as usual.
async fn read_ahead(
    stream: Stream,
    buf: &mut Vec<u8>,
    deadline: &mut SpellTimer<'_>,
    at: Instant,
    max: usize,
    done: impl Fn(&[u8]) -> bool,
) -> ReadAhead {
    if !stream.as_any().is::<L4Stream>() {
        return ReadAhead::Unsupported(stream);
    }
    let mut l4 = match stream.into_any().downcast::<L4Stream>() {
        Ok(l4) => l4,
        Err(_) => {
            log::error!("client stream changed type while being read; connection dropped");
            return ReadAhead::Lost;
        }
    };
    buf.clear();
    deadline.set(at);
    let read = async {
        loop {
            if done(buf) {
                return Some(true);
            }
            if buf.len() >= max {
                return Some(false);
            }
            // Straight into the vector: no chunk buffer in this future (it is part of every
            // busy spell's boxed future).
            buf.reserve(READ_AHEAD_CHUNK);
            match l4.read_buf(&mut *buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    let read = tokio::select! {
        biased;
        ended = read => Some(ended),
        _ = deadline.passed() => None,
    };
    let Some(ended) = read else {
        return ReadAhead::TimedOut(l4 as Stream);
    };
    l4.rewind(buf);
    match ended {
        Some(true) => ReadAhead::Done(l4 as Stream),
        Some(false) => ReadAhead::Full(l4 as Stream),
        None => ReadAhead::Closed(l4 as Stream),
    }
}

/// What reading a request line gave.
enum LineRead {
    /// The stream, with every byte read put back, and whether the buffer holds the line (not
    /// for a TLS stream, or when the client closed or sent more than [`REQUEST_LINE_MAX`] bytes
    /// without a LF).
    Read(Stream, bool),
    /// The header deadline passed first; the stream, to be answered `408`.
    TimedOut(Stream),
    /// The stream could not be recovered (not expected: its type is checked first).
    Lost,
}

/// The first line of `bytes` (up to and including its LF), if they hold one.
fn first_line(bytes: &[u8]) -> Option<&[u8]> {
    let end = bytes.iter().position(|&c| c == b'\n')?;
    Some(&bytes[..=end])
}

/// Read a plain TCP connection's next request line (until its LF) into `buf`, by `deadline`,
/// and put every byte read back into the stream, for pingora to parse as usual.
async fn read_request_line(
    stream: Stream,
    buf: &mut Vec<u8>,
    deadline: &mut SpellTimer<'_>,
    at: Instant,
) -> LineRead {
    match read_ahead(stream, buf, deadline, at, REQUEST_LINE_MAX, |b| {
        b.contains(&b'\n')
    })
    .await
    {
        ReadAhead::Done(stream) => LineRead::Read(stream, true),
        ReadAhead::Full(stream) | ReadAhead::Closed(stream) | ReadAhead::Unsupported(stream) => {
            LineRead::Read(stream, false)
        }
        ReadAhead::TimedOut(stream) => LineRead::TimedOut(stream),
        ReadAhead::Lost => LineRead::Lost,
    }
}

/// Open client connections, in total and per client IP.
#[derive(Debug, Default)]
struct Connections {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Refused connections still being answered.
    refusing: AtomicUsize,
}

/// A refused connection being answered; uncounted when dropped.
struct Refusing(Arc<Connections>);

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One counted connection; uncounted when dropped.
struct Counted {
    conns: Arc<Connections>,
    ip: Option<IpAddr>,
    /// `sluice_client_connections` (one handle, not the whole metrics set: this lives as long
    /// as the connection).
    gauge: IntGauge,
}

impl Connections {
    /// Room to answer one more refused connection, unless [`REFUSE_MAX_PENDING`] are already
    /// being answered.
    fn refusing(self: &Arc<Self>) -> Option<Refusing> {
        if self.refusing.fetch_add(1, Ordering::AcqRel) < REFUSE_MAX_PENDING {
            Some(Refusing(self.clone()))
        } else {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    fn per_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection, unless a cap is reached.
    fn open(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        max: usize,
        max_per_ip: usize,
        metrics: &Metrics,
    ) -> Result<Counted, Refused> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total);
        }
        // Every connection is counted per IP, capped or not, so a cap set by a reload is
        // right from the start.
        if let Some(ip) = ip {
            let mut per_ip = self.per_ip();
            let n = per_ip.entry(ip).or_insert(0);
            if max_per_ip > 0 && *n >= max_per_ip {
                if *n == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::PerIp);
            }
            *n += 1;
        }
        let gauge = metrics.client_connections();
        gauge.inc();
        Ok(Counted {
            conns: self.clone(),
            ip,
            gauge,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.conns.per_ip();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.conns.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// What the wait for a kept-alive connection's next request saw.
enum Next {
    /// A byte of the next request arrived.
    Request,
    /// The client closed, or the stream failed.
    Done,
    /// Nothing arrived in the time given.
    Idle,
    /// The stream cannot be peeked (TLS): pingora's own header read waits for the request.
    Unpeekable,
}

/// Wait until the client sends a byte, closes, or idles out.
///
/// Shutdown does not end the wait: during the grace period a kept-alive connection stays open,
/// so a request a terminal already sent is served (with `Connection: close`) instead of meeting
/// a closed socket. The connection is closed when pingora drops the runtime at the end of the
/// grace period.
async fn wait_readable(stream: &mut Stream, idle: Duration) -> Next {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(idle, stream.try_peek(&mut byte)).await {
        Ok(Ok(true)) => Next::Request,
        Ok(Ok(false)) => Next::Unpeekable,
        Ok(Err(_)) => Next::Done,
        Err(_) => Next::Idle,
    }
}

/// Wait for a kept-alive connection's next request, for `idle` at most (on the connection's
/// `deadline`). On a plain TCP stream its first bytes are read ahead (and put back into the stream
/// for the request) rather than peeked: one system call per request instead of two. The read
/// ahead ends as soon as anything came, so a timeout means nothing was read and the stream is
/// whole. The bytes read stay in `buf`, and the last value says whether they did: they usually
/// hold the whole request line, which then need not be read again. The stream is `None` only if
/// it could not be recovered (not expected: its type is checked first).
async fn wait_request(
    stream: Stream,
    buf: &mut Vec<u8>,
    deadline: &mut SpellTimer<'_>,
    idle: Duration,
) -> (Option<Stream>, Next, bool) {
    let at = Instant::now() + idle;
    match read_ahead(stream, buf, deadline, at, READ_AHEAD_CHUNK, |b| {
        !b.is_empty()
    })
    .await
    {
        ReadAhead::Done(stream) => (Some(stream), Next::Request, true),
        ReadAhead::Full(stream) => (Some(stream), Next::Request, false),
        ReadAhead::Closed(stream) => (Some(stream), Next::Done, false),
        ReadAhead::TimedOut(stream) => (Some(stream), Next::Idle, false),
        ReadAhead::Unsupported(mut stream) => {
            let next = wait_readable(&mut stream, idle).await;
            (Some(stream), next, false)
        }
        ReadAhead::Lost => (None, Next::Done, false),
    }
}

/// A kept-alive connection idle this long gives pingora's stream up and waits for its next
/// request as a bare socket (see [`serve`]). Long enough that a client sending its requests
/// back to back never pays for it (the next one arrives within a round trip); short, so that
/// the pingora streams of connections that have just gone idle are few at any moment, and the
/// allocator does not keep their memory for good once they park. With 1 s, 2,000 connections
/// opened 16 at a time cost a fresh process 2.3–2.6 KiB each against 1.1–1.3 KiB once warm.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// One in a gauge for as long as it lives.
struct Gauged<'a>(&'a IntGauge);

impl<'a> Gauged<'a> {
    fn inc(g: &'a IntGauge) -> Self {
        g.inc();
        Gauged(g)
    }
}

impl Drop for Gauged<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// At most this much of a request is buffered ahead of pingora's header read during shutdown.
const SHUTDOWN_HEADER_BYTES: usize = 64 * 1024;

/// Whether `buf` holds a complete request header (an empty line after the request line; a
/// bare LF is accepted, as pingora's parser does).
fn header_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Once shutdown started, pingora drops a request whose header is not complete in the first
/// read of its header (its header read races the shutdown notice). So, during shutdown, read
/// the next request's header here first (by `deadline`) and put it back into the stream: the
/// header read then finds it whole. Returns the stream, or `None` if the client closed or the
/// deadline passed before the header was complete. A stream other than plain TCP (which
/// cannot be put back) is returned as it is.
async fn buffer_header(stream: Stream, deadline: Instant) -> Option<Stream> {
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    match read_ahead(
        stream,
        &mut Vec::new(),
        &mut SpellTimer::new(timer),
        deadline,
        SHUTDOWN_HEADER_BYTES,
        header_complete,
    )
    .await
    {
        ReadAhead::Done(stream) | ReadAhead::Full(stream) | ReadAhead::Unsupported(stream) => {
            Some(stream)
        }
        ReadAhead::Closed(_) | ReadAhead::TimedOut(_) | ReadAhead::Lost => None,
    }
}

/// How one request ended.
enum Ended {
    /// The connection stays open for the next request; the bytes the request took from the
    /// stream, as the service saw them ([`Progress::consumed`]).
    KeepAlive(ReusedHttpStream, Option<u64>),
    /// The connection is closed.
    Closed,
    /// The header deadline passed: the client stream, to be answered `408` and closed, if
    /// the request's future never had it; otherwise the future, now dropped, handed it back to
    /// the spell's progress record ([`Progress::take_back`]).
    HeaderTimeout(Option<Stream>),
}

/// What a busy spell keeps from one request to the next, so that a request allocates neither:
/// the buffer requests' first bytes are read ahead into, and the progress record, renewed for
/// each request ([`Progress::renew`]). Both go with the spell's box when the connection parks.
struct SpellState {
    buf: Vec<u8>,
    progress: Arc<Progress>,
}

/// The connection's state pingora carries from one request to the next, and whether it holds
/// a pipelined next request (read once, see [`crate::compat::has_pipelined_request`]).
struct Carried {
    persistent: Option<HttpPersistentSettings>,
    pipelined: bool,
}

impl Carried {
    /// A connection's first request, or its first after parking.
    const FRESH: Carried = Carried {
        persistent: None,
        pipelined: false,
    };

    /// `whole`: the request took every byte read from the stream, so nothing is pipelined
    /// behind it and pingora's settings need not be looked into (which costs more than the
    /// rest of the connection loop's bookkeeping of a request).
    fn from(persistent: Option<HttpPersistentSettings>, whole: bool) -> Self {
        let pipelined = !whole && crate::compat::has_pipelined_request(persistent.as_ref());
        Carried {
            persistent,
            pipelined,
        }
    }
}

/// One request, under its header and request deadlines (both on the connection's `deadline`).
/// Its state lives in the spell's own box ([`busy`]), not a box of its own: a box per request
/// cost an allocation and a copy of this state each time. `started` is when the header
/// deadline starts counting; `ahead`, whether the wait for the request read its first bytes
/// (into the spell's buffer).
#[allow(clippy::too_many_arguments)] // one request's whole context, passed once
async fn one(
    proxy: &Arc<Proxy>,
    shared: &Shared,
    stream: Stream,
    carried: Carried,
    started: Instant,
    shutdown: &ShutdownWatch,
    deadline: &mut SpellTimer<'_>,
    spell: &mut SpellState,
    ahead: bool,
) -> Ended {
    // The three deadlines this request runs under, copied out of the settings in force.
    let (header_timeout, keepalive, request_timeout) = shared.with_settings(|s| {
        (
            s.client_header_timeout,
            s.client_keepalive_timeout,
            s.request_timeout,
        )
    });
    let Carried {
        persistent,
        pipelined,
    } = carried;
    // The request line as sent, before pingora's parser escapes it; under the header deadline.
    let header_deadline = started + header_timeout;
    let (stream, has_line) = if pipelined {
        (stream, false)
    } else if ahead && first_line(&spell.buf).is_some() {
        (stream, true)
    } else {
        match read_request_line(stream, &mut spell.buf, deadline, header_deadline).await {
            LineRead::Read(stream, line) => (stream, line),
            LineRead::Lost => return Ended::Closed,
            LineRead::TimedOut(stream) => {
                shared.metrics.client_timeout(Deadline::Header);
                log::debug!(
                    "client cut off: no complete request line within proxy.client_header_timeout"
                );
                return Ended::HeaderTimeout(Some(stream));
            }
        }
    };
    let line = if has_line {
        first_line(&spell.buf)
    } else {
        None
    };
    // The spell's record, renewed; a new one only if the last request's were still referenced
    // (not expected: its future and stream wrapper are gone).
    match Arc::get_mut(&mut spell.progress) {
        Some(progress) => progress.renew(line),
        None => spell.progress = Arc::new(Progress::new(line)),
    }
    let progress = &spell.progress;
    // Lent to pingora for this request; handed back if the header deadline drops the request.
    let stream = Reclaimable::wrap(stream, progress.clone());
    let mut session = ServerSession::new_http1(stream);
    match persistent {
        Some(p) => p.apply_to_session(&mut session),
        None => {
            let keepalive = (!shutting_down(shutdown)).then_some(keepalive.as_secs().max(1));
            session.set_keepalive(keepalive);
            // Bytes a client sends after its complete request (a pipelined next request) are
            // kept for the next request instead of failing this one: pingora would otherwise
            // abort the exchange and drop the backend connection while the backend still works
            // on the request, and its slot would be reused too early.
            if let ServerSession::H1(h1) = &mut session {
                h1.set_pipelining_enabled(true);
            }
        }
    }
    let exchange = progress::scope(progress.clone(), proxy.process_new_http(session, shutdown));
    tokio::pin!(exchange);
    let ended = |r: Option<ReusedHttpStream>| {
        r.map_or(Ended::Closed, |r| Ended::KeepAlive(r, progress.consumed()))
    };
    // One timer for both deadlines: the header's, then the whole request's. The header's
    // completion wakes nobody: the timer is looked at when it fires. The request deadline
    // (the complete header + proxy.request_timeout) is never before `started` +
    // proxy.request_timeout, so the timer first fires at that or at the header deadline,
    // whichever is first; a request done before then never wakes it.
    let mut waiting_until = header_deadline.min(started + request_timeout);
    deadline.set(waiting_until);
    let header_read = loop {
        tokio::select! {
            biased;
            r = &mut exchange => return ended(r),
            _ = deadline.passed() => {}
        }
        if let Some(header_read) = progress.header_read_at() {
            break header_read;
        }
        if waiting_until >= header_deadline {
            shared.metrics.client_timeout(Deadline::Header);
            log::debug!(
                "client cut off: no complete request header within proxy.client_header_timeout"
            );
            // Returning drops the request's future, which hands the stream back.
            return Ended::HeaderTimeout(None);
        }
        waiting_until = header_deadline;
        deadline.set(waiting_until);
    };
    deadline.set(header_read + request_timeout);
    tokio::select! {
        biased;
        r = &mut exchange => ended(r),
        _ = deadline.passed() => {
            shared.metrics.client_timeout(Deadline::Request);
            log::warn!("request cut off after proxy.request_timeout ({request_timeout:?})");
            Ended::Closed
        }
    }
}

/// What a client connection keeps for its whole life, besides its socket.
struct Conn {
    proxy: Arc<Proxy>,
    shared: Arc<Shared>,
    /// Read through [`shutting_down`] (made by [`watch_shutdown`]).
    shutdown: ShutdownWatch,
    /// Holds the connection's place under the connection caps until it is dropped.
    _counted: Counted,
}

/// A connection's own receiver of the shutdown signal, for [`shutting_down`]: it has seen the
/// value in force now, and is marked changed if that is already `true`.
fn watch_shutdown(shutdown: &ShutdownWatch) -> ShutdownWatch {
    let mut watch = shutdown.clone();
    if *watch.borrow_and_update() {
        watch.mark_changed();
    }
    watch
}

/// Whether shutdown has started, read on a receiver made by [`watch_shutdown`]. Unchanged, the
/// receiver still holds `false`, so the value is read under the channel's lock only once it has
/// changed: until then this is a load, not a write to the lock's count that every worker
/// thread shares (twice per request).
fn shutting_down(watch: &ShutdownWatch) -> bool {
    !matches!(watch.has_changed(), Ok(false)) && *watch.borrow()
}

/// How a busy spell of a connection begins.
enum Resume {
    /// Just accepted, at this instant.
    Accepted(Stream, Instant),
    /// A request's first byte arrived on a parked connection.
    Unparked(Parked),
}

/// A connection idle past [`PARK_AFTER`], pingora's stream dropped: a duplicate of the client
/// socket, nothing more. What pingora keeps from one request to the next
/// (`HttpPersistentSettings`) is not kept: a connection parks only without a pipelined
/// request, sluice sets no per-connection reuse limit and no user context, and the keep-alive
/// timeout and pipelining a new session gets in [`one`] are the same (from current settings).
struct Parked {
    sock: tokio::net::TcpStream,
}

impl Parked {
    /// Wait for the next request's first byte, for `idle` at most: whether it came.
    async fn wait(&self, idle: Duration) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let peek = std::future::poll_fn(|cx| self.sock.poll_peek(cx, &mut buf));
        matches!(tokio::time::timeout(idle, peek).await, Ok(Ok(_)))
    }
}

/// How a busy spell of a connection ended.
enum Spell {
    /// Parked, and how much longer it may idle.
    Parked(Parked, Duration),
    /// The connection is done.
    Closed,
}

/// A connection's whole life, as a small task: its requests, and its first second of idle,
/// run in a boxed future ([`busy`]) allocated only for that spell. A connection idle longer
/// waits here on a bare duplicate of its socket ([`crate::compat::take_socket`]), pingora's
/// stream dropped: an idle terminal costs this task, the socket's registration with the
/// runtime and its idle timer, not pingora's stream and buffers (about 2.5 KiB more).
///
/// Written as a function returning an `async move` block so that its arguments are stored once
/// in the task, not once as arguments and again as locals.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn serve(conn: Conn, stream: Stream, accepted: Instant) -> impl Future<Output = ()> + Send {
    async move {
        let mut resume = Resume::Accepted(stream, accepted);
        loop {
            // A statement of its own: the spell's box is freed here, not kept while parked.
            let (parked, idle) = match Box::pin(busy(&conn, resume)).await {
                Spell::Parked(parked, idle) => (parked, idle),
                Spell::Closed => break,
            };
            let ready = {
                let _parked = Gauged::inc(conn.shared.metrics.parked_connections());
                parked.wait(idle).await
            };
            if !ready {
                break;
            }
            resume = Resume::Unparked(parked);
        }
        drop(conn);
    }
}

/// The first byte of a request arrived on `stream`: the stream to serve it on and the instant
/// its header deadline counts from. During shutdown the header is buffered first (`None` if it
/// never completes), so the answer can say `Connection: close` before anything is admitted.
async fn arrived(conn: &Conn, stream: Stream) -> Option<(Stream, Instant)> {
    let started = Instant::now();
    if !shutting_down(&conn.shutdown) {
        return Some((stream, started));
    }
    let deadline = started + conn.shared.with_settings(|s| s.client_header_timeout);
    // Boxed: its read buffer must not grow every idle connection's task.
    Box::pin(buffer_header(stream, deadline))
        .await
        .map(|s| (s, started))
}

/// A connection's busy spell: its requests, one after another, until it closes or idles past
/// [`PARK_AFTER`]. One timer serves every deadline of the spell ([`SpellTimer`]): a timer made
/// per wait costs a registration with the runtime and a shared reference count each time.
async fn busy(conn: &Conn, resume: Resume) -> Spell {
    let mut spell = SpellState {
        buf: Vec::new(),
        progress: Arc::new(Progress::default()),
    };
    let mut ahead = false;
    let (mut stream, mut carried, mut started) = match resume {
        Resume::Accepted(stream, accepted) => (stream, Carried::FRESH, accepted),
        Resume::Unparked(Parked { sock }) => {
            let stream = crate::compat::stream_from_socket(sock);
            match arrived(conn, stream).await {
                Some((stream, started)) => (stream, Carried::FRESH, started),
                None => return Spell::Closed,
            }
        }
    };
    // Armed at the first request's header deadline; every use moves it.
    let timer =
        tokio::time::sleep_until(started + conn.shared.with_settings(|s| s.client_header_timeout));
    tokio::pin!(timer);
    let mut deadline = SpellTimer::new(timer);
    loop {
        // The connection's handles are lent, not cloned: a clone is a write to a reference
        // count every worker thread shares.
        let request = one(
            &conn.proxy,
            &conn.shared,
            stream,
            carried,
            started,
            &conn.shutdown,
            &mut deadline,
            &mut spell,
            std::mem::take(&mut ahead),
        );
        let (s, p, consumed) = match request.await {
            Ended::KeepAlive(reused, consumed) => {
                let (s, p) = reused.consume();
                (s, p, consumed)
            }
            Ended::Closed => return Spell::Closed,
            Ended::HeaderTimeout(stream) => {
                if let Some(stream) = stream.or_else(|| spell.progress.take_back()) {
                    // Boxed: its write must not grow every connection's spell.
                    Box::pin(answer_and_close(stream, answers::HEADER_TIMEOUT.as_bytes())).await;
                }
                return Spell::Closed;
            }
        };
        let (s, read) = Reclaimable::unwrap(s);
        stream = s;
        carried = Carried::from(p, read.is_some() && read == consumed);
        if carried.pipelined {
            started = Instant::now();
            continue;
        }
        let idle = conn.shared.with_settings(|s| s.client_keepalive_timeout);
        let first = idle.min(PARK_AFTER);
        let (waited, mut next, read) =
            wait_request(stream, &mut spell.buf, &mut deadline, first).await;
        let Some(waited) = waited else {
            return Spell::Closed;
        };
        ahead = read;
        stream = waited;
        if matches!(next, Next::Idle) && first < idle {
            if let Some(sock) = crate::compat::take_socket(&stream) {
                drop(stream);
                return match tokio::net::TcpStream::from_std(sock) {
                    Ok(sock) => Spell::Parked(Parked { sock }, idle - first),
                    Err(_) => Spell::Closed,
                };
            }
            // Not parkable (the kernel refused the duplicate): wait on pingora's stream.
            next = wait_readable(&mut stream, idle - first).await;
        }
        (stream, started) = match next {
            Next::Request => match arrived(conn, stream).await {
                Some(arrived) => arrived,
                None => return Spell::Closed,
            },
            Next::Done | Next::Idle => return Spell::Closed,
            // A TLS connection waits inside pingora's header read (bounded by the keep-alive
            // timeout), so its header deadline starts after the longest idle wait.
            Next::Unpeekable => (stream, Instant::now() + idle),
        };
    }
}

/// Answer a connection over a cap with a 503 and close it.
async fn refuse(stream: Stream, reason: Refused, retry_after_secs: u64) {
    let response = answers::over_connection_cap(reason == Refused::PerIp, retry_after_secs);
    answer_and_close(stream, response.as_bytes()).await;
}

/// Write `response` (bounded in time), close the sending side, and read what the client still
/// sends for a moment, so closing does not reset the connection before the client has read it.
async fn answer_and_close(mut stream: Stream, response: &[u8]) {
    let written = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(response).await?;
        stream.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = AsyncWriteExt::shutdown(&mut stream).await;
    // Read (and discard) what the client sent, briefly, so closing does not reset the
    // connection before the client has read the answer.
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let mut buf = [0u8; 4096];
        let mut seen = 0;
        while seen < REFUSE_LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// The connection handler: counts each connection against the caps and runs it in its own
/// small task.
pub fn handler(shared: Arc<Shared>) -> ProcessCustomSession<Sluice, ()> {
    let conns = Arc::new(Connections::default());
    Arc::new(
        move |proxy: Arc<Proxy>,
              stream: Stream,
              shutdown: &ShutdownWatch|
              -> Pin<Box<dyn Future<Output = Option<Stream>> + Send + 'static>> {
            let accepted = Instant::now();
            let settings = shared.settings();
            let ip = stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
            match conns.open(
                ip,
                settings.max_connections,
                settings.max_connections_per_ip,
                &shared.metrics,
            ) {
                // Returning at once frees pingora's own connection task and future; the
                // spawned task holds only what an idle connection needs.
                Ok(counted) => {
                    let conn = Conn {
                        proxy,
                        shared: shared.clone(),
                        shutdown: watch_shutdown(shutdown),
                        _counted: counted,
                    };
                    tokio::spawn(serve(conn, stream, accepted));
                }
                Err(reason) => {
                    shared.metrics.connection_refused(reason);
                    log::debug!("client connection from {ip:?} refused: {}", reason.as_str());
                    match conns.refusing() {
                        Some(refusing) => {
                            let retry_after = settings.retry_after_secs;
                            tokio::spawn(async move {
                                refuse(stream, reason, retry_after).await;
                                drop(refusing);
                            });
                        }
                        // Too many refusals in progress: close without an answer.
                        None => drop(stream),
                    }
                }
            }
            Box::pin(std::future::ready(None))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A connection's shutdown receiver says `true` once shutdown started, whether the
    /// connection came before the signal or after it, and whoever else read the channel.
    #[test]
    fn a_connection_sees_shutdown_whenever_it_came() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let before = watch_shutdown(&rx);
        assert!(!shutting_down(&before));
        assert!(
            !shutting_down(&before),
            "reading does not change the answer"
        );
        tx.send(true).expect("send");
        assert!(shutting_down(&before));
        assert!(shutting_down(&before), "reading does not change the answer");
        let after = watch_shutdown(&rx);
        assert!(shutting_down(&after));
        let mut seen = rx.clone();
        assert!(*seen.borrow_and_update());
        assert!(shutting_down(&watch_shutdown(&seen)));
        drop(tx);
        assert!(
            shutting_down(&before),
            "the sender gone, the last value stands"
        );
    }

    /// The spell's timer completes at the deadline in force, whether it was moved later
    /// (the timer fires early, unseen, and is set again) or earlier.
    #[tokio::test(start_paused = true)]
    async fn the_spell_timer_passes_at_the_deadline_in_force() {
        let t0 = Instant::now();
        let timer = tokio::time::sleep_until(t0 + Duration::from_millis(100));
        tokio::pin!(timer);
        let mut deadline = SpellTimer::new(timer);
        // Later: the timer stays set at 100 ms, the deadline is 1 s.
        deadline.set(t0 + Duration::from_secs(1));
        deadline.passed().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(1));
        // Earlier than the timer: set again at once.
        let t1 = Instant::now();
        deadline.set(t1 + Duration::from_secs(5));
        deadline.set(t1 + Duration::from_millis(10));
        deadline.passed().await;
        assert_eq!(Instant::now() - t1, Duration::from_millis(10));
        // Moved later several times before it fires: only the last one counts.
        let t2 = Instant::now();
        deadline.set(t2 + Duration::from_millis(50));
        for ms in [60, 70, 300] {
            deadline.set(t2 + Duration::from_millis(ms));
        }
        let early = tokio::time::timeout(Duration::from_millis(299), deadline.passed()).await;
        assert!(early.is_err(), "not before the deadline in force");
        deadline.passed().await;
        assert_eq!(Instant::now() - t2, Duration::from_millis(300));
        // The same, with the task woken every 100 ms by something else meanwhile: each wake
        // asks the timer whether it fired instead of polling it. A timer set for 10 s, the
        // deadline 20 s: it fires at 10 s, unseen, while the wakes ask it, and is set again.
        let t3 = Instant::now();
        let timer = tokio::time::sleep_until(t3 + Duration::from_secs(10));
        tokio::pin!(timer);
        let mut deadline = SpellTimer::new(timer);
        deadline.set(t3 + Duration::from_secs(20));
        let wakes = passed_amid_ticks(&mut deadline).await;
        assert_eq!(t3.elapsed(), Duration::from_secs(20));
        assert!(wakes >= 190, "the task was woken {wakes} times");
        let t4 = Instant::now();
        deadline.set(t4 + Duration::from_secs(30));
        deadline.set(t4 + Duration::from_secs(1));
        passed_amid_ticks(&mut deadline).await;
        assert_eq!(t4.elapsed(), Duration::from_secs(1));
    }

    /// Wait for `deadline` while a neighbour wakes the task every 100 ms; how many times it did.
    async fn passed_amid_ticks(deadline: &mut SpellTimer<'_>) -> u32 {
        let mut wakes = 0u32;
        let ticks = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                wakes += 1;
            }
        };
        tokio::select! {
            biased;
            _ = ticks => unreachable!("the ticks never end"),
            _ = deadline.passed() => {}
        }
        wakes
    }

    #[test]
    fn refusals_answered_at_once_are_bounded() {
        let c = Arc::new(Connections::default());
        let held: Vec<_> = (0..REFUSE_MAX_PENDING)
            .map(|_| c.refusing().expect("room"))
            .collect();
        assert!(
            c.refusing().is_none(),
            "a flood past the bound is closed unanswered"
        );
        drop(held);
        assert!(
            c.refusing().is_some(),
            "room again once the answers are done"
        );
        assert_eq!(c.refusing.load(Ordering::Acquire), 0);
    }

    #[test]
    fn caps_count_total_and_per_ip_and_release_on_drop() {
        let s = Metrics::new();
        let c = Arc::new(Connections::default());
        let a = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let b = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let a1 = c.open(a, 3, 2, &s).expect("first from a");
        let a2 = c.open(a, 3, 2, &s).expect("second from a");
        assert_eq!(c.open(a, 3, 2, &s).err(), Some(Refused::PerIp));
        let b1 = c.open(b, 3, 2, &s).expect("first from b");
        assert_eq!(c.open(b, 3, 2, &s).err(), Some(Refused::Total));
        assert_eq!(c.open.load(Ordering::Acquire), 3);
        drop(a1);
        let a3 = c.open(a, 3, 2, &s).expect("a again after a close");
        drop((a2, a3, b1));
        assert_eq!(c.open.load(Ordering::Acquire), 0);
        assert!(c.per_ip().is_empty(), "no per-IP entry is left behind");
        // Without a per-IP cap, one address may use the whole total.
        let all: Vec<_> = (0..3).map(|_| c.open(a, 3, 0, &s).expect("open")).collect();
        assert_eq!(c.open(a, 3, 0, &s).err(), Some(Refused::Total));
        drop(all);
        assert!(c.per_ip().is_empty());
    }
}
