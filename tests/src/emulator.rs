//! An emulator of the fragile legacy HTTP server (an old IIS) that sluice
//! protects.
//!
//! The model:
//!
//! * A request is **inside** the server from the moment its head has been read
//!   until its response has been written (or it was dropped by a fault).
//!   [`Stats::max_inside`] is the number tests assert as "backend max
//!   concurrency".
//! * At most [`EmulatorConfig::workers`] requests are **served** at once; the
//!   others wait inside for a worker, first come first served. A worker spends
//!   [`EmulatorConfig::service_time`] on each request (overridable per request
//!   with `X-Service-Time: 250ms`). `X-Pad-Bytes: N` adds N bytes to the
//!   response body (a large response).
//! * When more than [`EmulatorConfig::lockup_above`] requests are inside, the
//!   server **locks up**: for [`EmulatorConfig::lockup_duration`] it answers
//!   nothing (requests that finish their service time stall before writing
//!   their response, so their workers stay busy too), then recovers. A new
//!   episode starts only when a request enters while the count is above the
//!   limit and the server is not already locked up.
//! * After a start or [`EmulatorHandle::restart`], capacity can ramp up from a
//!   fraction of the workers ([`ColdStart`]), like an app pool warming up.
//! * The service time and the number of workers can change while it runs
//!   ([`EmulatorHandle::set_service_time`], [`EmulatorHandle::set_workers`]): a
//!   backend that slows down and recovers. A change applies to requests that
//!   start service from then on; fewer workers never cut a request being
//!   served, they only hold back the next ones until the busy count is below
//!   the new size.
//! * On request ([`EmulatorHandle::record_timings`]) it keeps, per answered
//!   request, when it entered, how long it waited for a worker and how long it
//!   was inside ([`Timing`]): latency as the backend itself sees it.
//! * Idle keep-alive connections are closed after
//!   [`EmulatorConfig::keepalive_timeout`].
//!
//! Each response is `200`, `text/plain`, body `ok <id>\n`, with the request's
//! transaction id (header `X-Txn-Id`, else query parameter `txn=`) echoed in
//! `X-Txn-Id`, except at the site root: `/` (any query) answers
//! [`EmulatorConfig::root_status`], by default `403` with an HTML body, as IIS 6
//! does on a site that only hosts an ISAPI extension (served like any request:
//! inside, by a worker, after the service time; counted in
//! [`Stats::root_requests`]). Answers are framed by `Content-Length`, chunked, or
//! close-delimited ([`AnswerFraming`]; by default they alternate between the
//! first two). An HTTP/1.1 request without `Host` gets `400` and the connection
//! is closed, as http.sys does; what each request carried is recorded
//! ([`EmulatorHandle::seen`]). Faults are injected per request with `X-Fault`: see [`Fault`].
//! `GET /__emu/stats` (the [`Stats`] as JSON) and `POST /__emu/reset` are
//! answered at once and counted nowhere (their TCP connection is, however,
//! counted as accepted).
//!
//! Run it on the current tokio runtime with [`Emulator`], or on a dedicated
//! runtime usable from synchronous code with [`EmulatorThread`]. Both
//! dereference to an [`EmulatorHandle`], a cheap clonable handle with the
//! query and control API.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::wire::{self, Framing, Wire};

/// Bound on how long reading a request body or writing a response may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on how long [`EmulatorHandle::stop`] waits for connections to close.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Largest `X-Pad-Bytes`.
const MAX_PAD_BYTES: usize = 64 * 1024 * 1024;
/// Longest a `X-Fault: hang` request is held if the peer never closes.
const HANG_MAX: Duration = Duration::from_secs(600);
/// Requests served on one connection before the emulator closes it.
const MAX_REQUESTS_PER_CONN: u64 = 1_000_000;
/// Pause after a failed `accept` (e.g. out of file descriptors), to not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Number of capacity increments during a cold start.
const RAMP_STEPS: u32 = 50;

/// Configuration of the emulated server.
#[derive(Debug, Clone, PartialEq)]
pub struct EmulatorConfig {
    /// Number of worker threads: at most this many requests are served at
    /// once; further requests wait inside, FIFO.
    pub workers: usize,
    /// Time a worker spends on each request.
    pub service_time: Duration,
    /// Lock up when more than this many requests are inside (waiting or
    /// being served). `None` never locks up.
    pub lockup_above: Option<usize>,
    /// How long a lock-up lasts.
    pub lockup_duration: Duration,
    /// Idle keep-alive timeout per connection (IIS default: 120 s).
    pub keepalive_timeout: Duration,
    /// Capacity ramp after a start or restart; `None` starts at full capacity.
    pub cold_start: Option<ColdStart>,
    /// How answers are framed (a request's `X-Framing` header overrides it).
    pub framing: AnswerFraming,
    /// Status of the answer at `/` (default 403, what IIS 6 answers at the root of a site
    /// that only hosts an ISAPI extension; 404 is the other common one). `200` answers `/`
    /// like every other path.
    pub root_status: u16,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            workers: 256,
            service_time: Duration::from_millis(20),
            lockup_above: None,
            lockup_duration: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(120),
            cold_start: None,
            framing: AnswerFraming::Mixed,
            root_status: 403,
        }
    }
}

/// Capacity ramp after a start or restart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColdStart {
    /// Fraction of [`EmulatorConfig::workers`] available at once (0.0–1.0,
    /// rounded down).
    pub initial_fraction: f64,
    /// Time to ramp linearly from there to all workers.
    pub duration: Duration,
    /// The lock-up threshold ramps too: while warming, the server locks up above
    /// `lockup_above × workers_now / workers` (a cold app pool is fragile as well as slow).
    /// `workers_now` also follows [`EmulatorHandle::set_workers`].
    pub lockup_scales: bool,
}

/// A snapshot of the emulator's counters.
///
/// Concurrency levels (`*_now`, `max_*`, `workers_now`) are `usize`, like the
/// configuration; event totals are `u64`, like the load generator's report.
///
/// Maxima and totals cover the time since start or the last
/// [`EmulatorHandle::reset_stats`]; they survive [`EmulatorHandle::stop`] and
/// [`EmulatorHandle::restart`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests answered with a full response (counted as the response is
    /// written; faulted ones excluded, except `X-Fault: close`).
    pub requests: u64,
    /// Requests inside now (head read, response not yet written).
    pub inside_now: usize,
    /// Maximum number of requests inside at once: the backend's observed
    /// concurrency.
    pub max_inside: usize,
    /// Requests being served by a worker now.
    pub serving_now: usize,
    /// Maximum number of requests served at once.
    pub max_serving: usize,
    /// Total TCP connections accepted.
    pub accepted_connections: u64,
    /// TCP connections open now.
    pub open_connections: usize,
    /// Maximum number of TCP connections open at once.
    pub max_open_connections: usize,
    /// Number of lock-up episodes.
    pub lockups: u64,
    /// Whether the server is locked up now.
    pub locked: bool,
    /// Requests rejected as malformed (answered `400` and closed).
    pub bad_requests: u64,
    /// Requests that carried an `X-Fault` header.
    pub faults: u64,
    /// Workers available now (below `workers` during a cold start).
    pub workers_now: usize,
    /// Requests answered at `/` (with [`EmulatorConfig::root_status`]), included in
    /// `requests`.
    #[serde(default)]
    pub root_requests: u64,
}

/// A fault injected with the `X-Fault` request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `reset`: after the service time, abort the connection (TCP RST)
    /// without answering.
    Reset,
    /// `hang`: take a worker and never answer; hold until the peer closes the
    /// connection or the emulator stops (at most 10 minutes).
    Hang,
    /// `truncate`: announce a `Content-Length` larger than the body sent,
    /// then close.
    Truncate,
    /// `malformed`: send a garbage status line, then close.
    Malformed,
    /// `close`: answer normally with `Connection: close`, then close.
    Close,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reset" => Ok(Fault::Reset),
            "hang" => Ok(Fault::Hang),
            "truncate" => Ok(Fault::Truncate),
            "malformed" => Ok(Fault::Malformed),
            "close" => Ok(Fault::Close),
            other => Err(format!("unknown fault {other:?}")),
        }
    }
}

/// How the emulator frames an answer's body, as an ISAPI extension may (KB 278998, KB 332143).
///
/// Set for all answers with [`EmulatorConfig::framing`], or per request with the header
/// `X-Framing: length|chunked|close`. Applies to ordinary answers (not to `/__emu/*`, errors
/// or faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnswerFraming {
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`, to HTTP/1.0 clients too (nothing stopped an ISAPI).
    Chunked,
    /// No length: the body ends when the emulator closes the connection (it sends no
    /// `Connection: close`). Defeats connection reuse.
    Close,
    /// The default: answers alternate deterministically between `Length` and `Chunked`
    /// (the first answer has a length), so every test meets chunked answers.
    #[default]
    Mixed,
}

impl FromStr for AnswerFraming {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "length" => Ok(AnswerFraming::Length),
            "chunked" => Ok(AnswerFraming::Chunked),
            "close" => Ok(AnswerFraming::Close),
            "mixed" => Ok(AnswerFraming::Mixed),
            other => Err(format!(
                "unknown framing {other:?}: one of length, chunked, close, mixed"
            )),
        }
    }
}

/// What the emulator saw of one request (ordinary requests only, not `/__emu/*`), in arrival
/// order: see [`EmulatorHandle::seen`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Minor HTTP version of the request line.
    pub version: u8,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// Every `Content-Length` header value, in order (a proxy must send at most one).
    pub content_lengths: Vec<String>,
    /// The transaction id, if any.
    pub txn: Option<String>,
    /// The connection it came on: a serial number, unique for the emulator's
    /// life (not reset), in accept order from 0.
    pub conn: u64,
}

impl Seen {
    fn of(head: &ReqHead, txn: Option<&str>, conn: u64) -> Seen {
        Seen {
            method: head.method.clone(),
            path: head.path.clone(),
            version: head.version,
            host: wire::find_header(&head.headers, "host").map(str::to_string),
            content_lengths: head
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.clone())
                .collect(),
            txn: txn.map(str::to_string),
            conn,
        }
    }
}

/// How long one answered request spent inside the emulator (see
/// [`EmulatorHandle::record_timings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// When its head had been read (it entered the server).
    pub entered: std::time::Instant,
    /// From entering until a worker took it (its body read, then the wait for a free
    /// worker): the queueing inside the backend.
    pub waited: Duration,
    /// From entering until its answer was ready to write: what a proxy in front measures as
    /// the backend's latency, less the network.
    pub inside: Duration,
}

/// The framing of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framed {
    Length,
    Chunked,
    Close,
}

impl Shared {
    /// The framing of the next ordinary answer: the request's `X-Framing`, else the config's
    /// (`Mixed` alternates, one shared counter for all connections).
    fn framing(&self, head: &ReqHead) -> Result<Framed, String> {
        let chosen = match wire::find_header(&head.headers, "x-framing") {
            Some(v) => v.parse::<AnswerFraming>()?,
            None => self.cfg.framing,
        };
        Ok(match chosen {
            AnswerFraming::Length => Framed::Length,
            AnswerFraming::Chunked => Framed::Chunked,
            AnswerFraming::Close => Framed::Close,
            AnswerFraming::Mixed => {
                if self.answers.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                    Framed::Length
                } else {
                    Framed::Chunked
                }
            }
        })
    }

    fn record_seen(&self, seen: Seen) {
        lock(&self.seen).push(seen);
    }
}

/// Counters, all updated with relaxed atomics.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    inside_now: AtomicUsize,
    max_inside: AtomicUsize,
    serving_now: AtomicUsize,
    max_serving: AtomicUsize,
    accepted: AtomicU64,
    open_now: AtomicUsize,
    max_open: AtomicUsize,
    lockups: AtomicU64,
    bad_requests: AtomicU64,
    faults: AtomicU64,
    workers_now: AtomicUsize,
    root_requests: AtomicU64,
}

/// What stalls responses: a lock-up, or a test's [`EmulatorHandle::hold`].
#[derive(Debug, Clone, Copy, Default)]
struct Gate {
    locked: bool,
    held: bool,
}

/// State shared by the accept loop, the connection tasks and the handles.
#[derive(Debug)]
struct Shared {
    cfg: EmulatorConfig,
    service_time_ns: AtomicU64,
    counters: Counters,
    transactions: Mutex<Vec<String>>,
    /// Ordinary requests as they arrived.
    seen: Mutex<Vec<Seen>>,
    /// Answers framed under [`AnswerFraming::Mixed`].
    answers: AtomicU64,
    /// The next connection's serial number ([`Seen::conn`]).
    next_conn: AtomicU64,
    gate: watch::Sender<Gate>,
    unlock_task: Mutex<Option<AbortHandle>>,
    /// Woken on every counter change, for [`EmulatorHandle::wait_for`].
    changed: Notify,
    /// The workers the server has now, and the pool of the running listening period.
    workers: Mutex<WorkerSlot>,
    /// Per-request timings, while recorded ([`EmulatorHandle::record_timings`]).
    timings: Mutex<Option<Vec<Timing>>>,
}

/// The server's worker count ([`EmulatorHandle::set_workers`]) and the running pool.
#[derive(Debug)]
struct WorkerSlot {
    target: usize,
    pool: Option<Arc<Workers>>,
}

/// The worker pool of one listening period: at most `capacity` requests are served at once,
/// the others wait first come first served. Its size can change while requests are served: a
/// larger pool takes waiters at once; a smaller one lets the requests being served finish
/// and takes the next waiter only once fewer than the new size are busy.
#[derive(Debug)]
struct Workers {
    state: Mutex<WorkersState>,
}

#[derive(Debug)]
struct WorkersState {
    /// Workers the server has ([`EmulatorHandle::set_workers`]).
    target: usize,
    /// Workers a cold start has made available so far (`usize::MAX` once warm).
    ramped: usize,
    busy: usize,
    waiters: VecDeque<oneshot::Sender<()>>,
}

impl WorkersState {
    fn capacity(&self) -> usize {
        self.target.min(self.ramped)
    }

    /// Hands free workers to waiters, in arrival order (a waiter that has gone is skipped).
    fn grant(&mut self) {
        while self.busy < self.capacity() {
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            if waiter.send(()).is_ok() {
                self.busy += 1;
            }
        }
    }
}

impl Workers {
    fn new(target: usize, ramped: usize) -> Arc<Workers> {
        Arc::new(Workers {
            state: Mutex::new(WorkersState {
                target,
                ramped,
                busy: 0,
                waiters: VecDeque::new(),
            }),
        })
    }

    /// Changes the size (the server's workers, or the cold start's share); returns the
    /// workers available now.
    fn resize(&self, target: Option<usize>, ramped: Option<usize>) -> usize {
        let mut s = lock(&self.state);
        if let Some(t) = target {
            s.target = t;
        }
        if let Some(r) = ramped {
            s.ramped = r;
        }
        s.grant();
        s.capacity()
    }

    /// Waits for a worker, first come first served. `None` only if the pool went away.
    async fn acquire(self: &Arc<Self>) -> Option<Worker> {
        let rx = {
            let mut s = lock(&self.state);
            if s.waiters.is_empty() && s.busy < s.capacity() {
                s.busy += 1;
                return Some(Worker(Arc::clone(self)));
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            rx
        };
        let mut waiting = Waiting {
            rx,
            workers: self,
            granted: false,
        };
        (&mut waiting.rx).await.ok()?;
        waiting.granted = true;
        Some(Worker(Arc::clone(self)))
    }

    fn release(&self) {
        let mut s = lock(&self.state);
        s.busy = s.busy.saturating_sub(1);
        s.grant();
    }
}

/// A request waiting for a worker; if it goes away after a worker was handed to it, the
/// worker is given back.
struct Waiting<'a> {
    rx: oneshot::Receiver<()>,
    workers: &'a Workers,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.granted {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.workers.release();
            }
        }
    }
}

/// A busy worker, freed on drop.
struct Worker(Arc<Workers>);

impl Drop for Worker {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Locks a mutex, ignoring poisoning (the data stays usable for stats).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn touch(&self) {
        self.changed.notify_waiters();
    }

    fn service_time(&self) -> Duration {
        Duration::from_nanos(self.service_time_ns.load(Ordering::Relaxed))
    }

    /// The lock-up threshold now: scaled with the workers available while a cold start
    /// ramps, when [`ColdStart::lockup_scales`] says so.
    fn lockup_threshold(&self) -> Option<usize> {
        let limit = self.cfg.lockup_above?;
        match &self.cfg.cold_start {
            Some(c) if c.lockup_scales && self.cfg.workers > 0 => {
                let now = self.counters.workers_now.load(Ordering::Relaxed);
                Some((limit * now / self.cfg.workers).max(1))
            }
            _ => Some(limit),
        }
    }

    fn record_txn(&self, id: &str) {
        lock(&self.transactions).push(id.to_string());
    }

    fn record_timing(&self, t: Timing) {
        if let Some(v) = lock(&self.timings).as_mut() {
            v.push(t);
        }
    }

    /// Resizes the running pool (if any); returns the workers available now and counts them.
    fn resize_workers(&self, target: Option<usize>, ramped: Option<usize>) {
        let mut slot = lock(&self.workers);
        if let Some(t) = target {
            slot.target = t;
        }
        let now = match &slot.pool {
            Some(pool) => pool.resize(target, ramped),
            None => slot.target,
        };
        drop(slot);
        self.counters.workers_now.store(now, Ordering::Relaxed);
        self.touch();
    }

    /// Starts a lock-up episode unless one is running.
    fn trigger_lockup(self: &Arc<Self>) {
        // Counted inside the gate update, and `snapshot` reads the gate
        // first: a snapshot that sees `locked` also sees the episode counted.
        let started = self.gate.send_if_modified(|g| {
            if g.locked {
                false
            } else {
                self.counters.lockups.fetch_add(1, Ordering::Relaxed);
                g.locked = true;
                true
            }
        });
        if !started {
            return;
        }
        let shared = Arc::clone(self);
        let task = tokio::spawn(async move {
            tokio::time::sleep(shared.cfg.lockup_duration).await;
            shared.gate.send_modify(|g| g.locked = false);
            shared.touch();
        });
        if let Some(old) = lock(&self.unlock_task).replace(task.abort_handle()) {
            old.abort();
        }
        self.touch();
    }

    /// Ends any lock-up at once (used when the server is stopped).
    fn clear_lockup(&self) {
        if let Some(task) = lock(&self.unlock_task).take() {
            task.abort();
        }
        self.gate.send_modify(|g| g.locked = false);
        self.touch();
    }

    /// Waits until responses may be written (not locked up, not held).
    async fn gate_open(&self) {
        let mut rx = self.gate.subscribe();
        // The sender lives in `self`, so this only ends by the gate opening
        // (or the task being aborted by a stop).
        let _ = rx.wait_for(|g| !g.locked && !g.held).await;
    }

    fn snapshot(&self) -> Stats {
        let locked = self.gate.borrow().locked;
        let c = &self.counters;
        let total = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let level = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        Stats {
            requests: total(&c.requests),
            inside_now: level(&c.inside_now),
            max_inside: level(&c.max_inside),
            serving_now: level(&c.serving_now),
            max_serving: level(&c.max_serving),
            accepted_connections: total(&c.accepted),
            open_connections: level(&c.open_now),
            max_open_connections: level(&c.max_open),
            lockups: total(&c.lockups),
            locked,
            bad_requests: total(&c.bad_requests),
            faults: total(&c.faults),
            workers_now: level(&c.workers_now),
            root_requests: total(&c.root_requests),
        }
    }

    fn reset(&self) {
        let c = &self.counters;
        for a in [
            &c.requests,
            &c.accepted,
            &c.lockups,
            &c.bad_requests,
            &c.faults,
            &c.root_requests,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        c.max_inside
            .store(c.inside_now.load(Ordering::Relaxed), Ordering::Relaxed);
        c.max_serving
            .store(c.serving_now.load(Ordering::Relaxed), Ordering::Relaxed);
        c.max_open
            .store(c.open_now.load(Ordering::Relaxed), Ordering::Relaxed);
        lock(&self.transactions).clear();
        lock(&self.seen).clear();
        if let Some(v) = lock(&self.timings).as_mut() {
            v.clear();
        }
        self.answers.store(0, Ordering::Relaxed);
        self.touch();
    }
}

/// Increments a gauge and its maximum; decrements the gauge on drop.
struct GaugeGuard<'a> {
    shared: &'a Shared,
    gauge: &'a AtomicUsize,
}

impl<'a> GaugeGuard<'a> {
    fn new(shared: &'a Shared, gauge: &'a AtomicUsize, max: &'a AtomicUsize) -> (Self, usize) {
        let now = gauge.fetch_add(1, Ordering::Relaxed) + 1;
        max.fetch_max(now, Ordering::Relaxed);
        (GaugeGuard { shared, gauge }, now)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
        self.shared.touch();
    }
}

/// Counts one open connection for as long as it lives (owned, movable into
/// the connection task).
struct OpenConn(Arc<Shared>);

impl OpenConn {
    fn new(shared: &Arc<Shared>) -> Self {
        let c = &shared.counters;
        c.accepted.fetch_add(1, Ordering::Relaxed);
        let now = c.open_now.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_open.fetch_max(now, Ordering::Relaxed);
        shared.touch();
        OpenConn(Arc::clone(shared))
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.counters.open_now.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// One listening period, between a start and a stop.
#[derive(Debug)]
struct Generation {
    stop_tx: oneshot::Sender<()>,
    accept: JoinHandle<()>,
    ramp: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    rt: Handle,
    running: Mutex<Option<Generation>>,
    /// Set when the owning [`Emulator`] is dropped: no more restarts.
    dropped: AtomicBool,
}

/// A cheap, clonable, thread-safe handle on a running emulator: queries and
/// controls. Obtained from [`Emulator`] or [`EmulatorThread`] (both
/// dereference to it).
#[derive(Debug, Clone)]
pub struct EmulatorHandle {
    inner: Arc<Inner>,
}

impl EmulatorHandle {
    /// The address the emulator listens on (kept across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &EmulatorConfig {
        &self.inner.shared.cfg
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.shared.snapshot()
    }

    /// Requests inside now (one atomic read; cheap enough for sampling).
    pub fn inside_now(&self) -> usize {
        self.inner
            .shared
            .counters
            .inside_now
            .load(Ordering::Relaxed)
    }

    /// Every transaction id that got inside, in order of arrival, duplicates
    /// kept (faulted requests included).
    pub fn transactions(&self) -> Vec<String> {
        lock(&self.inner.shared.transactions).clone()
    }

    /// What the emulator saw of each ordinary request (method, target, `Host`,
    /// `Content-Length` headers, transaction id), in arrival order since start or
    /// the last reset. A request refused with `400` (e.g. HTTP/1.1 without
    /// `Host`) is not in it.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner.shared.seen).clone()
    }

    /// Resets totals, maxima (to the current gauges) and the transaction list.
    pub fn reset_stats(&self) {
        self.inner.shared.reset();
    }

    /// Changes the service time of requests that start service from now on.
    pub fn set_service_time(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .shared
            .service_time_ns
            .store(ns, Ordering::Relaxed);
    }

    /// The current default service time.
    pub fn service_time(&self) -> Duration {
        self.inner.shared.service_time()
    }

    /// Changes the number of workers (at least 1) at once, kept across restarts. More
    /// workers take waiting requests at once; fewer never cut a request being served: the
    /// next waiting request gets a worker once fewer than `n` are busy. During a cold start,
    /// the ramp's share applies on top (capacity is the smaller of the two).
    pub fn set_workers(&self, n: usize) {
        self.inner.shared.resize_workers(Some(n.max(1)), None);
    }

    /// The number of workers set ([`EmulatorHandle::set_workers`], else the configuration's).
    pub fn workers(&self) -> usize {
        lock(&self.inner.shared.workers).target
    }

    /// Starts (`true`, with an empty record) or stops (`false`, dropping it) recording a
    /// [`Timing`] for every answered request. Off by default: the record grows with every
    /// request (24 bytes each).
    pub fn record_timings(&self, on: bool) {
        *lock(&self.inner.shared.timings) = on.then(Vec::new);
    }

    /// The timings recorded since recording started or the last reset, in answer order.
    pub fn timings(&self) -> Vec<Timing> {
        lock(&self.inner.shared.timings).clone().unwrap_or_default()
    }

    /// Test control: requests that finish their service time stall (keeping
    /// their worker) until [`EmulatorHandle::release`]. Makes concurrency
    /// assertions deterministic: hold, send N requests, wait for
    /// `inside_now == N`, release.
    pub fn hold(&self) {
        self.inner.shared.gate.send_modify(|g| g.held = true);
    }

    /// Ends a [`EmulatorHandle::hold`].
    pub fn release(&self) {
        self.inner.shared.gate.send_modify(|g| g.held = false);
        self.inner.shared.touch();
    }

    /// Whether the emulator is listening (not stopped).
    pub fn is_running(&self) -> bool {
        lock(&self.inner.running).is_some()
    }

    /// Waits until `pred` holds for the stats, re-checking on every change.
    /// Returns `Ok(stats)` once it holds, or `Err(last stats)` after
    /// `timeout`. Works from any tokio runtime.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Stats) -> bool,
    ) -> Result<Stats, Stats> {
        let deadline = Instant::now() + timeout;
        let shared = &self.inner.shared;
        // Bounded in time by the deadline; each pass needs a change.
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = shared.snapshot();
            if pred(&stats) {
                return Ok(stats);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let stats = shared.snapshot();
                return if pred(&stats) { Ok(stats) } else { Err(stats) };
            }
        }
    }

    /// Stops like a crashed server: closes the listener and every open
    /// connection at once (counters are kept). Returns once they are closed
    /// (bounded by a few seconds). Does nothing if already stopped.
    pub async fn stop(&self) {
        let generation = lock(&self.inner.running).take();
        if let Some(mut generation) = generation {
            if let Some(ramp) = generation.ramp.take() {
                ramp.abort();
            }
            let _ = generation.stop_tx.send(());
            if tokio::time::timeout(STOP_WAIT, &mut generation.accept)
                .await
                .is_err()
            {
                generation.accept.abort();
            }
        }
        self.inner.shared.clear_lockup();
    }

    /// Listens again on the same address (stopping first if running),
    /// applying the cold start if configured.
    pub async fn restart(&self) -> io::Result<()> {
        self.stop().await;
        self.launch(None)
    }

    /// Binds (unless given a bound listener) and spawns the accept loop.
    fn launch(&self, bound: Option<std::net::TcpListener>) -> io::Result<()> {
        let inner = &self.inner;
        if inner.dropped.load(Ordering::Relaxed) {
            return Err(io::Error::other("the emulator was dropped"));
        }
        let mut running = lock(&inner.running);
        if running.is_some() {
            return Ok(());
        }
        // std's bind sets SO_REUSEADDR on Unix, so the port can be rebound
        // right after a stop despite connections in TIME_WAIT.
        let std_listener = match bound {
            Some(l) => l,
            None => std::net::TcpListener::bind(inner.addr)?,
        };
        std_listener.set_nonblocking(true)?;
        let _enter = inner.rt.enter();
        let listener = TcpListener::from_std(std_listener)?;

        let shared = &inner.shared;
        let workers = shared.cfg.workers;
        let cold = match shared.cfg.cold_start {
            Some(cs) => {
                let f = if cs.initial_fraction.is_nan() {
                    0.0
                } else {
                    cs.initial_fraction.clamp(0.0, 1.0)
                };
                // Truncation intended: rounded down, then clamped.
                Some(((workers as f64 * f).floor() as usize).min(workers))
            }
            None => None,
        };
        let initial = cold.filter(|&c| c < workers);
        let pool = {
            let mut slot = lock(&shared.workers);
            let pool = Workers::new(slot.target, initial.unwrap_or(usize::MAX));
            slot.pool = Some(Arc::clone(&pool));
            let now = slot.target.min(initial.unwrap_or(usize::MAX));
            shared.counters.workers_now.store(now, Ordering::Relaxed);
            pool
        };
        let ramp = match (shared.cfg.cold_start, initial) {
            (Some(cs), Some(initial)) => Some(inner.rt.spawn(ramp_up(
                Arc::clone(shared),
                initial,
                cs.duration,
            ))),
            _ => None,
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let accept = inner
            .rt
            .spawn(accept_loop(listener, Arc::clone(shared), pool, stop_rx));
        *running = Some(Generation {
            stop_tx,
            accept,
            ramp,
        });
        shared.touch();
        Ok(())
    }

    /// Aborts every task at once, without waiting (for `Drop`).
    fn abort_all(&self) {
        self.inner.dropped.store(true, Ordering::Relaxed);
        if let Some(generation) = lock(&self.inner.running).take() {
            if let Some(ramp) = generation.ramp {
                ramp.abort();
            }
            // Dropping the accept task drops its JoinSet, which aborts every
            // connection task.
            generation.accept.abort();
        }
        if let Some(task) = lock(&self.inner.shared.unlock_task).take() {
            task.abort();
        }
    }

    /// Creates the shared state, binds `addr` and starts listening.
    fn start(cfg: EmulatorConfig, addr: SocketAddr, rt: Handle) -> io::Result<Self> {
        if cfg.workers == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "workers must be at least 1",
            ));
        }
        let listener = std::net::TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let (gate, _) = watch::channel(Gate::default());
        let service_time_ns =
            AtomicU64::new(u64::try_from(cfg.service_time.as_nanos()).unwrap_or(u64::MAX));
        let cfg_workers = cfg.workers;
        let shared = Arc::new(Shared {
            cfg,
            service_time_ns,
            counters: Counters::default(),
            transactions: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            answers: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            gate,
            unlock_task: Mutex::new(None),
            changed: Notify::new(),
            workers: Mutex::new(WorkerSlot {
                target: cfg_workers,
                pool: None,
            }),
            timings: Mutex::new(None),
        });
        let handle = EmulatorHandle {
            inner: Arc::new(Inner {
                shared,
                addr,
                rt,
                running: Mutex::new(None),
                dropped: AtomicBool::new(false),
            }),
        };
        handle.launch(Some(listener))?;
        Ok(handle)
    }
}

/// The emulator running on the current tokio runtime. Stops (abruptly) when
/// dropped. Dereferences to [`EmulatorHandle`] for queries and control.
#[derive(Debug)]
pub struct Emulator {
    handle: EmulatorHandle,
}

impl Emulator {
    /// Starts on `127.0.0.1:0` (a free port) on the current tokio runtime.
    pub async fn start(cfg: EmulatorConfig) -> io::Result<Emulator> {
        Emulator::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr` on the current tokio runtime.
    pub async fn start_on(cfg: EmulatorConfig, addr: SocketAddr) -> io::Result<Emulator> {
        let handle = EmulatorHandle::start(cfg, addr, Handle::current())?;
        Ok(Emulator { handle })
    }

    /// A clonable handle, usable after moving it to other tasks or threads.
    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }
}

impl Deref for Emulator {
    type Target = EmulatorHandle;

    fn deref(&self) -> &EmulatorHandle {
        &self.handle
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.handle.abort_all();
    }
}

/// The emulator on its own dedicated tokio runtime (two worker threads), for
/// synchronous code and for tests whose own runtime must stay free (e.g. one
/// running pingora). The runtime is shut down when this is dropped.
/// Dereferences to [`EmulatorHandle`].
#[derive(Debug)]
pub struct EmulatorThread {
    handle: EmulatorHandle,
    emulator: Option<Emulator>,
    runtime: Option<Runtime>,
}

impl EmulatorThread {
    /// Starts on `127.0.0.1:0` on a new dedicated runtime.
    pub fn start(cfg: EmulatorConfig) -> io::Result<EmulatorThread> {
        EmulatorThread::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on `addr` on a new dedicated runtime.
    pub fn start_on(cfg: EmulatorConfig, addr: SocketAddr) -> io::Result<EmulatorThread> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("legacy-emu")
            .enable_all()
            .build()?;
        let handle = EmulatorHandle::start(cfg, addr, runtime.handle().clone())?;
        Ok(EmulatorThread {
            handle: handle.clone(),
            emulator: Some(Emulator { handle }),
            runtime: Some(runtime),
        })
    }

    /// A clonable handle, usable from other threads.
    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }

    /// The dedicated runtime's handle (to spawn helpers next to the emulator).
    pub fn runtime(&self) -> Option<Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Runs `fut` on the dedicated runtime and blocks for its result
    /// (bounded by `limit`). Safe to call from inside another runtime.
    fn block_on<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let rt = self.runtime.as_ref()?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(limit).ok()
    }

    /// Blocking [`EmulatorHandle::stop`].
    pub fn stop(&self) {
        let h = self.handle();
        let _ = self.block_on(
            STOP_WAIT + Duration::from_secs(1),
            async move { h.stop().await },
        );
    }

    /// Blocking [`EmulatorHandle::restart`].
    pub fn restart(&self) -> io::Result<()> {
        let h = self.handle();
        self.block_on(STOP_WAIT + Duration::from_secs(1), async move {
            h.restart().await
        })
        .unwrap_or_else(|| Err(io::Error::other("restart did not finish in time")))
    }

    /// Blocking [`EmulatorHandle::wait_for`].
    pub fn wait_for_blocking(
        &self,
        timeout: Duration,
        pred: impl FnMut(&Stats) -> bool + Send + 'static,
    ) -> Result<Stats, Stats> {
        let h = self.handle();
        self.block_on(timeout + Duration::from_secs(1), async move {
            h.wait_for(timeout, pred).await
        })
        .unwrap_or_else(|| Err(self.stats()))
    }
}

impl Deref for EmulatorThread {
    type Target = EmulatorHandle;

    fn deref(&self) -> &EmulatorHandle {
        &self.handle
    }
}

impl Drop for EmulatorThread {
    fn drop(&mut self) {
        drop(self.emulator.take());
        if let Some(rt) = self.runtime.take() {
            // Unlike dropping a runtime, this is allowed inside async code.
            rt.shutdown_background();
        }
    }
}

/// Adds workers linearly until all are available (all the configured workers, then no
/// bound but [`EmulatorHandle::set_workers`]).
async fn ramp_up(shared: Arc<Shared>, initial: usize, duration: Duration) {
    let start = Instant::now();
    let extra = shared.cfg.workers - initial;
    let mut added = 0usize;
    for k in 1..=RAMP_STEPS {
        tokio::time::sleep_until(start + duration * k / RAMP_STEPS).await;
        // u32 -> usize is lossless; target <= extra.
        let target = extra * k as usize / RAMP_STEPS as usize;
        if target > added {
            added = target;
            shared.resize_workers(None, Some(initial + added));
        }
    }
    shared.resize_workers(None, Some(usize::MAX));
}

/// Accepts connections until told to stop, then closes all of them.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    pool: Arc<Workers>,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    // Runs for the life of the server; ends on stop (or the handle's drop).
    loop {
        tokio::select! {
            biased;
            _ = &mut stop_rx => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let open = OpenConn::new(&shared);
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    let conn = (stream, id);
                    conns.spawn(serve_conn(Arc::clone(&shared), Arc::clone(&pool), conn, open));
                }
                // E.g. EMFILE: back off briefly rather than spin.
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// A parsed request head.
#[derive(Debug)]
struct ReqHead {
    method: String,
    path: String,
    version: u8,
    headers: Vec<(String, String)>,
}

/// Parses a request head from `buf`, if complete.
fn parse_request_head(buf: &[u8]) -> io::Result<Option<(ReqHead, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; wire::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let head = ReqHead {
                method: req.method.unwrap_or("").to_string(),
                path: req.path.unwrap_or("").to_string(),
                version: req.version.unwrap_or(1),
                headers: wire::owned_headers(req.headers),
            };
            Ok(Some((head, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(wire::invalid(format!("malformed request: {e}"))),
    }
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
}

/// Serves the requests of one connection.
async fn serve_conn(
    shared: Arc<Shared>,
    pool: Arc<Workers>,
    (stream, conn_id): (TcpStream, u64),
    open: OpenConn,
) {
    let _ = stream.set_nodelay(true);
    let mut wire = Wire::new(stream);
    // Declared after the socket, so dropped before it: like a server's own count, the
    // connection stops counting before its close goes out, never after.
    let _open = open;
    for _ in 0..MAX_REQUESTS_PER_CONN {
        let idle_deadline = Instant::now() + shared.cfg.keepalive_timeout;
        let head = match wire.read_head(idle_deadline, parse_request_head).await {
            Ok(Some(head)) => head,
            // Peer closed, idle timeout, reset, or EOF in a head: just close.
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                bad_request(&shared, &mut wire, &e.to_string()).await;
                return;
            }
            Err(_) => return,
        };
        match handle_request(&shared, &pool, &mut wire, head, conn_id).await {
            Next::KeepAlive => {}
            Next::Close => return,
        }
    }
}

/// Counts a bad request and answers `400` with `Connection: close`.
async fn bad_request(shared: &Shared, wire: &mut Wire, why: &str) {
    shared.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
    shared.touch();
    let body = format!("bad request: {why}\n");
    let reply = Reply {
        status: 400,
        reason: "Bad Request",
        ..Reply::ok(1, None, false, body.as_bytes())
    };
    let _ = write(wire, &reply.encode()).await;
}

/// Writes all bytes, bounded by [`IO_TIMEOUT`].
async fn write(wire: &mut Wire, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(IO_TIMEOUT, wire.stream.write_all(bytes))
        .await
        .map_err(|_| wire::timed_out("writing response"))?
}

/// A response to serialise.
struct Reply<'a> {
    version: u8,
    status: u16,
    reason: &'a str,
    content_type: &'a str,
    txn: Option<&'a str>,
    keep_alive: bool,
    body: &'a [u8],
}

impl Reply<'_> {
    /// A `200 OK` `text/plain` reply.
    fn ok<'a>(version: u8, txn: Option<&'a str>, keep_alive: bool, body: &'a [u8]) -> Reply<'a> {
        Reply {
            version,
            status: 200,
            reason: "OK",
            content_type: "text/plain",
            txn,
            keep_alive,
            body,
        }
    }

    /// Serialises the reply, announcing `content_length` (normally the body
    /// length; larger for the `truncate` fault).
    fn encode_with_length(&self, content_length: usize) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.{} {} {}\r\nServer: legacy-emu\r\nContent-Type: {}\r\nContent-Length: {content_length}\r\n",
            self.version, self.status, self.reason, self.content_type
        );
        if let Some(id) = self.txn {
            head.push_str(&format!("X-Txn-Id: {id}\r\n"));
        }
        match (self.version, self.keep_alive) {
            (_, false) => head.push_str("Connection: close\r\n"),
            (0, true) => head.push_str("Connection: keep-alive\r\n"),
            _ => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body);
        bytes
    }

    /// Serialises the reply.
    fn encode(&self) -> Vec<u8> {
        self.encode_with_length(self.body.len())
    }
}

/// Why a request is refused as http.sys would (`400`, then close), if it is: an HTTP/1.1
/// request without `Host`.
fn strict_refusal(head: &ReqHead) -> Option<&'static str> {
    (head.version >= 1 && wire::find_header(&head.headers, "host").is_none())
        .then_some("HTTP/1.1 request without Host")
}

impl Reply<'_> {
    /// Serialises an ordinary answer framed as chosen. `body_len` is the length of the
    /// full body (a `HEAD` answer announces it and sends none): announced by
    /// `Content-Length`, or not at all for a chunked or close-delimited answer.
    fn encode_framed(&self, framing: Framed, body_len: usize) -> Vec<u8> {
        if framing == Framed::Length {
            return self.encode_with_length(body_len);
        }
        let mut head = format!(
            "HTTP/1.{} {} {}\r\nServer: legacy-emu\r\nContent-Type: {}\r\n",
            self.version, self.status, self.reason, self.content_type
        );
        if framing == Framed::Chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        }
        if let Some(id) = self.txn {
            head.push_str(&format!("X-Txn-Id: {id}\r\n"));
        }
        // A close-delimited answer says nothing about the connection: the close says it.
        match (framing, self.version, self.keep_alive) {
            (Framed::Close, _, _) => {}
            (_, _, false) => head.push_str("Connection: close\r\n"),
            (_, 0, true) => head.push_str("Connection: keep-alive\r\n"),
            _ => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if framing == Framed::Chunked {
            // Two chunks when there is enough body, so a reader meets a chunk boundary.
            let split = self.body.len() / 2;
            for part in [&self.body[..split], &self.body[split..]] {
                if !part.is_empty() {
                    bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    bytes.extend_from_slice(part);
                    bytes.extend_from_slice(b"\r\n");
                }
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        } else {
            bytes.extend_from_slice(self.body);
        }
        bytes
    }
}

/// The transaction id: header `X-Txn-Id`, else query parameter `txn`.
fn txn_id(head: &ReqHead) -> Option<String> {
    if let Some(id) = wire::find_header(&head.headers, "x-txn-id") {
        return Some(id.trim().to_string());
    }
    let (_, query) = head.path.split_once('?')?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("txn="))
        .map(str::to_string)
}

/// Reads a request body as framed; the content is discarded.
async fn read_body(wire: &mut Wire, framing: Framing) -> io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    match framing {
        Framing::None | Framing::UntilClose => {}
        Framing::Sized(n) => {
            wire.read_sized(n, deadline).await?;
        }
        Framing::Chunked => {
            wire.read_chunked(deadline).await?;
        }
    }
    Ok(())
}

/// Answers the special `/__emu/*` paths; `None` if `head` is not one.
async fn control_request(
    shared: &Shared,
    wire: &mut Wire,
    head: &ReqHead,
    framing: Framing,
    keep_alive: bool,
) -> Option<Next> {
    let path = head.path.split('?').next().unwrap_or("");
    if !path.starts_with("/__emu/") {
        return None;
    }
    if read_body(wire, framing).await.is_err() {
        return Some(Next::Close);
    }
    let (status, reason, ctype, body) = match (head.method.as_str(), path) {
        ("GET", "/__emu/stats") => match serde_json::to_vec(&shared.snapshot()) {
            Ok(json) => (200, "OK", "application/json", json),
            Err(e) => (
                500,
                "Internal Server Error",
                "text/plain",
                e.to_string().into_bytes(),
            ),
        },
        ("POST", "/__emu/reset") => {
            shared.reset();
            (200, "OK", "text/plain", b"reset\n".to_vec())
        }
        (_, "/__emu/stats" | "/__emu/reset") => (
            405,
            "Method Not Allowed",
            "text/plain",
            b"method not allowed\n".to_vec(),
        ),
        _ => (404, "Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let reply = Reply {
        status,
        reason,
        content_type: ctype,
        ..Reply::ok(head.version, None, keep_alive, &body)
    };
    Some(match write(wire, &reply.encode()).await {
        Ok(()) if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    })
}

/// Handles one request whose head has been read.
async fn handle_request(
    shared: &Arc<Shared>,
    pool: &Arc<Workers>,
    wire: &mut Wire,
    head: ReqHead,
    conn_id: u64,
) -> Next {
    let keep_alive = if head.version >= 1 {
        !wire::has_token(&head.headers, "connection", "close")
    } else {
        wire::has_token(&head.headers, "connection", "keep-alive")
    };
    let framing = match wire::framing(&head.headers, Framing::None) {
        Ok(f) => f,
        Err(e) => {
            bad_request(shared, wire, &e.to_string()).await;
            return Next::Close;
        }
    };
    if let Some(why) = strict_refusal(&head) {
        bad_request(shared, wire, why).await;
        return Next::Close;
    }
    if let Some(next) = control_request(shared, wire, &head, framing, keep_alive).await {
        return next;
    }
    let fault = match wire::find_header(&head.headers, "x-fault").map(Fault::from_str) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            bad_request(shared, wire, &e).await;
            return Next::Close;
        }
    };
    let service_time = match wire::find_header(&head.headers, "x-service-time") {
        None => shared.service_time(),
        Some(v) => match humantime::parse_duration(v.trim()) {
            Ok(d) => d,
            Err(e) => {
                bad_request(shared, wire, &format!("bad X-Service-Time {v:?}: {e}")).await;
                return Next::Close;
            }
        },
    };
    // `X-Pad-Bytes: N` pads the body with N bytes (at most 64 MiB): a large response.
    let pad =
        match wire::find_header(&head.headers, "x-pad-bytes").map(|v| v.trim().parse::<usize>()) {
            None => 0,
            Some(Ok(n)) if n <= MAX_PAD_BYTES => n,
            Some(_) => {
                bad_request(shared, wire, "bad X-Pad-Bytes: a byte count up to 67108864").await;
                return Next::Close;
            }
        };
    let answer_framing = match shared.framing(&head) {
        Ok(f) => f,
        Err(e) => {
            bad_request(shared, wire, &format!("bad X-Framing: {e}")).await;
            return Next::Close;
        }
    };
    let txn = txn_id(&head);
    shared.record_seen(Seen::of(&head, txn.as_deref(), conn_id));

    // Inside from here until the response is handed to the socket (guard dropped).
    let c = &shared.counters;
    let (inside, inside_now) = GaugeGuard::new(shared, &c.inside_now, &c.max_inside);
    let entered = std::time::Instant::now();
    if let Some(id) = &txn {
        shared.record_txn(id);
    }
    if fault.is_some() {
        c.faults.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(limit) = shared.lockup_threshold() {
        if inside_now > limit {
            shared.trigger_lockup();
        }
    }
    shared.touch();

    if head.version >= 1
        && framing != Framing::None
        && wire::has_token(&head.headers, "expect", "100-continue")
        && write(wire, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
    {
        return Next::Close;
    }
    if let Err(e) = read_body(wire, framing).await {
        if e.kind() == io::ErrorKind::InvalidData {
            bad_request(shared, wire, &e.to_string()).await;
        }
        return Next::Close;
    }

    // Wait for a worker (first come first served), then serve.
    let Some(_worker) = pool.acquire().await else {
        return Next::Close;
    };
    let waited = entered.elapsed();
    let (serving, _) = GaugeGuard::new(shared, &c.serving_now, &c.max_serving);
    shared.touch();
    tokio::time::sleep(service_time).await;

    if fault == Some(Fault::Hang) {
        hold_until_closed(wire).await;
        return Next::Close;
    }
    shared.gate_open().await;

    let id = txn.as_deref();
    let mut body = match id {
        Some(id) => format!("ok {id}\n"),
        None => "ok\n".to_string(),
    };
    body.extend(std::iter::repeat_n('.', pad));
    match fault {
        Some(Fault::Reset) => {
            // Abortive close: the connection is reset when the socket drops.
            let _ = wire.stream.set_zero_linger();
            Next::Close
        }
        Some(Fault::Truncate) => {
            let reply = Reply::ok(head.version, id, false, body.as_bytes());
            let _ = write(wire, &reply.encode_with_length(body.len() + 64)).await;
            Next::Close
        }
        Some(Fault::Malformed) => {
            // As for a good response: once the proxy can read the answer, the server is done
            // with the request, so it leaves "inside" before the write.
            drop(serving);
            drop(inside);
            let _ = write(wire, b"HTTP/1.1 OOPS\x01 legacy server garbage\r\n\r\n").await;
            Next::Close
        }
        Some(Fault::Hang) | Some(Fault::Close) | None => {
            let keep = keep_alive && fault.is_none();
            // A HEAD response announces the body's length but carries none.
            let sent_body: &[u8] = if head.method.eq_ignore_ascii_case("HEAD") {
                b""
            } else {
                body.as_bytes()
            };
            // A HEAD answer has no body to chunk or to end by a close: it announces a length.
            let answer_framing = if sent_body.is_empty() && !body.is_empty() {
                Framed::Length
            } else {
                answer_framing
            };
            let keep = keep && answer_framing != Framed::Close;
            let root = head.path.split('?').next() == Some("/") && shared.cfg.root_status != 200;
            let (root_status, root_reason) = root_reply(shared.cfg.root_status);
            let root_body = if root {
                c.root_requests.fetch_add(1, Ordering::Relaxed);
                root_page(root_status, root_reason)
            } else {
                String::new()
            };
            let reply = if root {
                Reply {
                    status: root_status,
                    reason: root_reason,
                    content_type: "text/html",
                    ..Reply::ok(head.version, id, keep, &sent_body[..0])
                }
            } else {
                Reply::ok(head.version, id, keep, sent_body)
            };
            let reply = if root && !head.method.eq_ignore_ascii_case("HEAD") {
                Reply {
                    body: root_body.as_bytes(),
                    ..reply
                }
            } else {
                reply
            };
            let length = if root { root_body.len() } else { body.len() };
            // Counted before the write, so a client that has its response
            // already sees it in the stats. For the same reason the request leaves
            // "inside" before the write: once a proxy can see the response, the
            // server is done with it, whatever this task's scheduling delay.
            c.requests.fetch_add(1, Ordering::Relaxed);
            shared.record_timing(Timing {
                entered,
                waited,
                inside: entered.elapsed(),
            });
            drop(serving);
            drop(inside);
            if write(wire, &reply.encode_framed(answer_framing, length))
                .await
                .is_err()
            {
                return Next::Close;
            }
            if keep {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
    }
}

/// The status and reason phrase of the answer at `/` (a status outside 100–599 becomes 403).
fn root_reply(status: u16) -> (u16, &'static str) {
    match status {
        403 => (403, "Forbidden"),
        404 => (404, "Not Found"),
        401 => (401, "Unauthorized"),
        500 => (500, "Internal Server Error"),
        503 => (503, "Service Unavailable"),
        s @ 100..=599 => (s, "Status"),
        _ => (403, "Forbidden"),
    }
}

/// The HTML page IIS 6 sends with an error status at the root of an ISAPI-only site.
fn root_page(status: u16, reason: &str) -> String {
    let title = match status {
        403 => "You are not authorized to view this page",
        404 => "The page cannot be found",
        _ => reason,
    };
    format!(
        "<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 4.01//EN\">\r\n<HTML><HEAD><TITLE>{title}</TITLE>\r\n\
         <META HTTP-EQUIV=\"Content-Type\" Content=\"text/html; charset=Windows-1252\"></HEAD>\r\n\
         <BODY><h1>{title}</h1>\r\n<p>HTTP Error {status} - {reason}<br>\
         Internet Information Services (IIS)</p></BODY></HTML>\r\n"
    )
}

/// Holds a hung request: reads and discards until the peer closes, the
/// connection fails, or [`HANG_MAX`] passes.
async fn hold_until_closed(wire: &mut Wire) {
    let deadline = Instant::now() + HANG_MAX;
    // Bounded by the deadline; each pass needs bytes from the peer.
    loop {
        match wire.fill(deadline).await {
            Ok(0) | Err(_) => return,
            Ok(_) => wire.buf.clear(),
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests {} | inside {} (max {}) | serving {} (max {}) | conns accepted {} open {} (max {}) | lockups {}{} | bad {} | faults {} | workers {}",
            self.requests,
            self.inside_now,
            self.max_inside,
            self.serving_now,
            self.max_serving,
            self.accepted_connections,
            self.open_connections,
            self.max_open_connections,
            self.lockups,
            if self.locked { " (locked now)" } else { "" },
            self.bad_requests,
            self.faults,
            self.workers_now,
        )?;
        if self.root_requests > 0 {
            write!(f, " | at / {}", self.root_requests)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{request, Conn, Request};

    /// Generous bound for anything that should happen "at once".
    const SOON: Duration = Duration::from_secs(5);

    fn cfg() -> EmulatorConfig {
        EmulatorConfig {
            service_time: Duration::from_millis(5),
            ..EmulatorConfig::default()
        }
    }

    /// Sends `n` concurrent one-shot requests with ids `<prefix><i>`.
    fn spawn_requests(
        addr: SocketAddr,
        n: usize,
        prefix: &str,
    ) -> Vec<tokio::task::JoinHandle<io::Result<crate::client::Response>>> {
        (0..n)
            .map(|i| {
                let req = Request::get("/pay").txn(format!("{prefix}{i}"));
                tokio::spawn(async move { request(addr, &req).await })
            })
            .collect()
    }

    async fn join_ok(handles: Vec<tokio::task::JoinHandle<io::Result<crate::client::Response>>>) {
        for h in handles {
            let resp = h.await.expect("task").expect("response");
            assert_eq!(resp.status, 200);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn max_inside_counts_concurrent_clients_below_workers() {
        let emu = Emulator::start(cfg()).await.expect("start");
        emu.hold();
        let handles = spawn_requests(emu.addr(), 10, "c");
        emu.wait_for(SOON, |s| s.inside_now == 10)
            .await
            .expect("10 inside");
        emu.release();
        join_ok(handles).await;
        let s = emu
            .wait_for(SOON, |s| s.inside_now == 0)
            .await
            .expect("all out");
        assert_eq!(s.max_inside, 10);
        assert_eq!(s.max_serving, 10);
        assert_eq!(s.requests, 10);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn workers_bound_serving_and_the_rest_wait_inside() {
        let emu = Emulator::start(EmulatorConfig {
            workers: 2,
            service_time: Duration::from_millis(50),
            ..EmulatorConfig::default()
        })
        .await
        .expect("start");
        emu.hold();
        let handles = spawn_requests(emu.addr(), 6, "w");
        emu.wait_for(SOON, |s| s.inside_now == 6 && s.serving_now == 2)
            .await
            .expect("6 inside, 2 served");
        emu.release();
        join_ok(handles).await;
        let s = emu.stats();
        assert_eq!(s.max_serving, 2);
        assert_eq!(s.max_inside, 6);
        assert_eq!(s.requests, 6);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn lockup_stalls_everyone_then_recovers() {
        let emu = Emulator::start(EmulatorConfig {
            lockup_above: Some(3),
            lockup_duration: Duration::from_millis(800),
            ..cfg()
        })
        .await
        .expect("start");
        emu.hold();
        let handles = spawn_requests(emu.addr(), 4, "l");
        let s = emu
            .wait_for(SOON, |s| s.inside_now == 4 && s.locked)
            .await
            .expect("4 inside, locked up");
        assert_eq!(s.lockups, 1);
        assert!(s.locked);
        emu.release();
        // Locked up: nobody gets an answer for a while.
        let mut handles = handles;
        let first = tokio::time::timeout(Duration::from_millis(200), &mut handles[0]).await;
        assert!(first.is_err(), "answered during a lock-up");
        assert_eq!(emu.stats().requests, 0);
        // Then it recovers and answers everyone.
        join_ok(handles).await;
        let s = emu.stats();
        assert_eq!(s.lockups, 1);
        assert!(!s.locked);
        assert_eq!(s.requests, 4);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn records_transaction_ids_including_faulted_and_query_ids() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let addr = emu.addr();
        let resp = request(addr, &Request::get("/pay").txn("a1"))
            .await
            .expect("a1");
        assert_eq!(resp.txn_id(), Some("a1"));
        assert_eq!(resp.text(), "ok a1\n");
        assert_eq!(resp.header("content-type"), Some("text/plain"));
        let resp = request(addr, &Request::get("/pay?x=1&txn=q2"))
            .await
            .expect("q2");
        assert_eq!(resp.txn_id(), Some("q2"));
        let err = request(
            addr,
            &Request::get("/pay").txn("f3").header("X-Fault", "reset"),
        )
        .await
        .expect_err("reset");
        assert!(matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ));
        request(addr, &Request::get("/pay").txn("a1"))
            .await
            .expect("a1 again");
        assert_eq!(emu.transactions(), ["a1", "q2", "f3", "a1"]);
        let s = emu.stats();
        assert_eq!(s.requests, 3);
        assert_eq!(s.faults, 1);
        emu.reset_stats();
        assert!(emu.transactions().is_empty());
        assert_eq!(emu.stats().requests, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn faults_truncate_malformed_close_and_service_time() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let addr = emu.addr();
        let err = request(
            addr,
            &Request::get("/pay").txn("t").header("X-Fault", "truncate"),
        )
        .await
        .expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = request(
            addr,
            &Request::get("/pay").txn("m").header("X-Fault", "malformed"),
        )
        .await
        .expect_err("malformed");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut conn = Conn::connect(addr).await.expect("connect");
        let resp = conn
            .send(&Request::get("/pay").txn("c").header("X-Fault", "close"))
            .await
            .expect("close fault answers");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(conn.is_closed_by_peer().await);

        let started = Instant::now();
        let resp = request(
            addr,
            &Request::get("/pay")
                .txn("s")
                .header("X-Service-Time", "150ms"),
        )
        .await
        .expect("slow");
        assert_eq!(resp.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(150));

        let resp = request(addr, &Request::get("/pay").header("X-Fault", "bogus"))
            .await
            .expect("400");
        assert_eq!(resp.status, 400);
        assert_eq!(emu.stats().bad_requests, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hang_holds_a_worker_until_the_client_goes_away() {
        let emu = Emulator::start(EmulatorConfig {
            workers: 1,
            ..cfg()
        })
        .await
        .expect("start");
        let mut hung = Conn::connect(emu.addr()).await.expect("connect");
        hung.send_raw(
            &Request::get("/pay")
                .txn("h")
                .header("X-Fault", "hang")
                .encode("x"),
        )
        .await
        .expect("send");
        emu.wait_for(SOON, |s| s.serving_now == 1)
            .await
            .expect("hang being served");
        assert!(
            !hung
                .is_closed_by_peer_within(Duration::from_millis(100))
                .await
        );
        drop(hung);
        emu.wait_for(SOON, |s| s.inside_now == 0 && s.serving_now == 0)
            .await
            .expect("hang released");
        let resp = request(emu.addr(), &Request::get("/pay").txn("after"))
            .await
            .expect("worker free again");
        assert_eq!(resp.status, 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn keep_alive_reuses_one_connection() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        for i in 0..5 {
            let id = format!("k{i}");
            let resp = conn
                .send(&Request::get("/pay").txn(&id))
                .await
                .expect("send");
            assert_eq!(resp.txn_id(), Some(id.as_str()));
            assert!(resp.keep_alive());
        }
        // A POST with a chunked body on the same connection.
        let resp = conn
            .send(
                &Request::new("POST", "/pay")
                    .txn("k5")
                    .header("Transfer-Encoding", "chunked")
                    .body("4\r\nab=1\r\n0\r\n\r\n"),
            )
            .await
            .expect("chunked post");
        assert_eq!(resp.txn_id(), Some("k5"));
        let resp = conn
            .send(&Request::new("HEAD", "/pay").txn("k6"))
            .await
            .expect("head");
        assert_eq!(resp.header("content-length"), Some("6"));
        assert!(resp.body.is_empty());
        let resp = conn
            .send(&Request::get("/pay").txn("k7"))
            .await
            .expect("after head");
        assert_eq!(resp.text(), "ok k7\n");
        let s = emu.stats();
        assert_eq!(s.accepted_connections, 1);
        assert_eq!(s.requests, 8);
        assert_eq!(s.open_connections, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn http10_closes_unless_keep_alive() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        let resp = conn
            .send(&Request::get("/pay").http10().txn("a"))
            .await
            .expect("send");
        assert_eq!(resp.version, 0);
        assert!(!resp.keep_alive());
        assert!(conn.is_closed_by_peer().await);

        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        for id in ["b", "c"] {
            let resp = conn
                .send(
                    &Request::get("/pay")
                        .http10()
                        .txn(id)
                        .header("Connection", "keep-alive"),
                )
                .await
                .expect("send");
            assert_eq!(resp.header("connection"), Some("keep-alive"));
        }
        assert!(
            !conn
                .is_closed_by_peer_within(Duration::from_millis(50))
                .await
        );
        assert_eq!(emu.stats().accepted_connections, 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn idle_keep_alive_connections_time_out() {
        let emu = Emulator::start(EmulatorConfig {
            keepalive_timeout: Duration::from_millis(100),
            ..cfg()
        })
        .await
        .expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        conn.send(&Request::get("/pay").txn("i"))
            .await
            .expect("send");
        assert!(conn.is_closed_by_peer_within(SOON).await);
        emu.wait_for(SOON, |s| s.open_connections == 0)
            .await
            .expect("closed");
    }

    /// `/` answers `root_status` (403 by default) with an HTML page, any query included;
    /// every other path answers 200; `root_status = 200` makes `/` like any other path.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_root_answers_403_by_default_and_other_paths_200() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let r = request(emu.addr(), &Request::get("/")).await.expect("root");
        assert_eq!(r.status, 403);
        assert_eq!(r.header("content-type"), Some("text/html"));
        assert!(r.text().contains("You are not authorized"), "{}", r.text());
        let r = request(emu.addr(), &Request::get("/?txn=q").http10())
            .await
            .expect("root");
        assert_eq!(r.status, 403);
        assert_eq!(r.txn_id(), Some("q"));
        let r = request(emu.addr(), &Request::get("/pay").txn("p"))
            .await
            .expect("pay");
        assert_eq!(r.status, 200);
        let r = request(emu.addr(), &Request::get("/index.html"))
            .await
            .expect("page");
        assert_eq!(r.status, 200);
        let s = emu.stats();
        assert_eq!((s.requests, s.root_requests), (4, 2));

        for (root_status, want) in [(404, 404), (200, 200)] {
            let emu = Emulator::start(EmulatorConfig {
                root_status,
                ..cfg()
            })
            .await
            .expect("start");
            let r = request(emu.addr(), &Request::get("/")).await.expect("root");
            assert_eq!(r.status, want);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_and_restart_on_the_same_port() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let addr = emu.addr();
        let mut kept = Conn::connect(addr).await.expect("connect");
        kept.send(&Request::get("/pay").txn("before"))
            .await
            .expect("send");
        emu.stop().await;
        assert!(!emu.is_running());
        assert!(kept.is_closed_by_peer().await);
        assert!(request(addr, &Request::get("/pay").txn("down"))
            .await
            .is_err());
        assert_eq!(emu.stats().open_connections, 0);

        emu.restart().await.expect("restart");
        assert_eq!(emu.addr(), addr);
        let resp = request(addr, &Request::get("/pay").txn("after"))
            .await
            .expect("after restart");
        assert_eq!(resp.status, 200);
        assert_eq!(emu.transactions(), ["before", "after"]);
        // Restarting while running is a stop + start.
        emu.restart().await.expect("restart again");
        request(addr, &Request::get("/pay").txn("again"))
            .await
            .expect("after second restart");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn cold_start_ramps_capacity() {
        let emu = Emulator::start(EmulatorConfig {
            workers: 10,
            cold_start: Some(ColdStart {
                initial_fraction: 0.2,
                duration: Duration::from_secs(30),
                lockup_scales: false,
            }),
            ..cfg()
        })
        .await
        .expect("start");
        // The first increment is 0.6 s away: capacity is 2 for now.
        assert_eq!(emu.stats().workers_now, 2);
        emu.hold();
        let handles = spawn_requests(emu.addr(), 5, "cs");
        emu.wait_for(SOON, |s| s.inside_now == 5)
            .await
            .expect("5 inside");
        assert_eq!(emu.stats().serving_now, 2);
        emu.release();
        join_ok(handles).await;
        assert_eq!(emu.stats().max_serving, 2);
        drop(emu);

        let emu = Emulator::start(EmulatorConfig {
            workers: 10,
            cold_start: Some(ColdStart {
                initial_fraction: 0.0,
                duration: Duration::from_millis(200),
                lockup_scales: false,
            }),
            ..cfg()
        })
        .await
        .expect("start");
        // Even with no worker at first, requests get served once it ramps.
        let resp = request(emu.addr(), &Request::get("/pay").txn("z"))
            .await
            .expect("served after ramp");
        assert_eq!(resp.status, 200);
        emu.wait_for(SOON, |s| s.workers_now == 10)
            .await
            .expect("fully ramped");
    }

    /// More workers take waiting requests at once; fewer never cut the requests being
    /// served, and hold back the next ones until fewer than the new count are busy.
    #[tokio::test(flavor = "multi_thread")]
    async fn workers_can_be_added_and_removed_while_serving() {
        let emu = Emulator::start(EmulatorConfig {
            workers: 4,
            ..cfg()
        })
        .await
        .expect("start");
        emu.record_timings(true);
        emu.hold();
        let handles = spawn_requests(emu.addr(), 8, "w");
        emu.wait_for(SOON, |s| s.inside_now == 8 && s.serving_now == 4)
            .await
            .expect("4 served, 4 waiting");
        emu.set_workers(6);
        let s = emu
            .wait_for(SOON, |s| s.serving_now == 6)
            .await
            .expect("two more served at once");
        assert_eq!((s.workers_now, emu.workers()), (6, 6));
        emu.set_workers(2);
        let s = emu.stats();
        assert_eq!(s.workers_now, 2);
        assert_eq!(
            (s.inside_now, s.serving_now),
            (8, 6),
            "shrinking cuts no request being served"
        );
        emu.release();
        join_ok(handles).await;
        // The last two got a worker only once fewer than 2 were busy: never 8 at once.
        assert_eq!(emu.stats().max_serving, 6);
        let mut timings = emu.timings();
        assert_eq!(timings.len(), 8);
        timings.sort_by_key(|t| t.waited);
        assert!(timings[6].waited > timings[5].waited);

        // Now 2 workers: of 5 requests, 2 are served at once.
        emu.reset_stats();
        emu.hold();
        let handles = spawn_requests(emu.addr(), 5, "v");
        emu.wait_for(SOON, |s| s.inside_now == 5 && s.serving_now == 2)
            .await
            .expect("2 served, 3 waiting");
        emu.release();
        join_ok(handles).await;
        assert_eq!(emu.stats().max_serving, 2);
        // Kept across a restart.
        emu.restart().await.expect("restart");
        assert_eq!(emu.stats().workers_now, 2);
    }

    /// A new service time applies to the next requests: each request's time inside follows
    /// it, and comes back with it.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_service_time_can_change_while_serving() {
        let emu = Emulator::start(EmulatorConfig {
            service_time: Duration::from_millis(10),
            ..cfg()
        })
        .await
        .expect("start");
        emu.record_timings(true);
        let slow = Duration::from_millis(300);
        let inside_of = |txn: &str| {
            let req = Request::get("/pay").txn(txn);
            let addr = emu.addr();
            async move {
                let r = request(addr, &req).await.expect("response");
                assert_eq!(r.status, 200);
            }
        };
        inside_of("before").await;
        emu.set_service_time(slow);
        assert_eq!(emu.service_time(), slow);
        inside_of("slow").await;
        emu.set_service_time(Duration::from_millis(10));
        inside_of("after").await;
        let t = emu.timings();
        assert_eq!(t.len(), 3);
        assert!(t[0].inside >= Duration::from_millis(10), "{t:?}");
        assert!(t[1].inside >= slow, "{t:?}");
        assert!(
            t[2].inside >= Duration::from_millis(10) && t[2].inside < slow,
            "{t:?}"
        );
        assert!(
            t.iter().all(|t| t.waited < Duration::from_millis(10)),
            "{t:?}"
        );
        emu.reset_stats();
        assert!(emu.timings().is_empty());
        emu.record_timings(false);
        inside_of("unrecorded").await;
        assert!(emu.timings().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn control_paths_are_not_counted() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        conn.send(&Request::get("/pay").txn("x"))
            .await
            .expect("send");
        let resp = conn
            .send(&Request::get("/__emu/stats"))
            .await
            .expect("stats");
        assert_eq!(resp.status, 200);
        let stats: Stats = serde_json::from_slice(&resp.body).expect("json");
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.inside_now, 0);
        let resp = conn
            .send(&Request::post("/__emu/reset", ""))
            .await
            .expect("reset");
        assert_eq!(resp.status, 200);
        let s = emu.stats();
        assert_eq!(s.requests, 0);
        assert_eq!(s.max_inside, 0);
        assert!(emu.transactions().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn garbage_is_a_bad_request() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        conn.send_raw(b"\x01\x02 nonsense\r\n\r\n")
            .await
            .expect("send");
        let resp = conn.read_response().await.expect("400");
        assert_eq!(resp.status, 400);
        assert!(conn.is_closed_by_peer().await);
        let s = emu.stats();
        assert_eq!(s.bad_requests, 1);
        assert_eq!(s.max_inside, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_alternate_length_and_chunked_or_as_asked() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        // Mixed (the default): Content-Length, chunked, Content-Length, ...
        for (i, chunked) in [false, true, false, true].into_iter().enumerate() {
            let r = conn.send(&Request::get("/pay").txn(format!("m{i}"))).await;
            let r = r.expect("response");
            assert_eq!(r.body, format!("ok m{i}\n").as_bytes());
            assert_eq!(
                r.header("transfer-encoding").is_some(),
                chunked,
                "answer {i}"
            );
            assert_eq!(r.header("content-length").is_none(), chunked, "answer {i}");
        }
        // Close-delimited on request: no length, no Connection header, then the close.
        let r = conn
            .send(&Request::get("/pay").txn("c").header("X-Framing", "close"))
            .await
            .expect("response");
        assert_eq!(r.body, b"ok c\n");
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.header("connection"), None);
        assert!(conn.is_closed_by_peer().await);
        assert_eq!(emu.stats().accepted_connections, 1);
        // An unknown framing is a bad request.
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        let r = conn
            .send(&Request::get("/pay").header("X-Framing", "gzip"))
            .await
            .expect("response");
        assert_eq!(r.status, 400);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn http11_without_host_is_refused_and_hosts_are_recorded() {
        let emu = Emulator::start(cfg()).await.expect("start");
        let mut conn = Conn::connect(emu.addr()).await.expect("connect");
        conn.send_raw(b"GET /pay?txn=nohost HTTP/1.1\r\n\r\n")
            .await
            .expect("send");
        let r = conn.read_response().await.expect("400");
        assert_eq!(r.status, 400);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(conn.is_closed_by_peer().await);
        assert_eq!(emu.stats().bad_requests, 1);
        assert!(emu.seen().is_empty() && emu.transactions().is_empty());
        // HTTP/1.0 without Host is served; both are recorded as they came.
        let r = request(emu.addr(), &Request::get("/pay").http10().txn("h10"))
            .await
            .expect("1.0");
        assert_eq!(r.status, 200);
        let r = request(emu.addr(), &Request::post("/pay", "abc").txn("h11"))
            .await
            .expect("1.1");
        assert_eq!(r.status, 200);
        let seen = emu.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].version, seen[0].host.as_deref()), (0, None));
        assert_eq!(seen[1].host, Some(emu.addr().to_string()));
        assert_eq!(seen[1].content_lengths, vec!["3".to_string()]);
        assert_ne!(seen[0].conn, seen[1].conn);
    }

    #[test]
    fn emulator_thread_works_from_sync_code() {
        let emu = EmulatorThread::start(cfg()).expect("start");
        let report = crate::terminals::run_blocking(crate::terminals::LoadConfig {
            terminals: 3,
            transactions_per_terminal: Some(4),
            ..crate::terminals::LoadConfig::new(emu.addr())
        });
        assert_eq!(report.ok, 12);
        let s = emu
            .wait_for_blocking(SOON, |s| s.requests == 12)
            .expect("12 requests");
        assert_eq!(s.accepted_connections, 3);
        emu.stop();
        assert!(!emu.is_running());
        emu.restart().expect("restart");
        let report = crate::terminals::run_blocking(crate::terminals::LoadConfig {
            terminals: 1,
            transactions_per_terminal: Some(1),
            ..crate::terminals::LoadConfig::new(emu.addr())
        });
        assert_eq!(report.ok, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn emulator_thread_can_be_used_and_dropped_inside_async_code() {
        let emu = EmulatorThread::start(cfg()).expect("start");
        let resp = request(emu.addr(), &Request::get("/pay").txn("in-async"))
            .await
            .expect("response");
        assert_eq!(resp.status, 200);
        emu.stop();
        emu.restart().expect("restart");
        drop(emu);
    }
}
