//! The progress of the request being served, shared between sluice's connection loop
//! ([`crate::conn`]), which enforces the client deadlines, and the service's hooks, which see
//! the request parsed. It travels in a task-local, set by the connection loop around each
//! request's future; outside that loop (a TLS connection served by pingora's own loop) the
//! hooks find none and do nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pingora::protocols::Stream;
use tokio::time::Instant;

/// A byte count or instant not recorded yet.
const UNSET: u64 = u64::MAX;

/// Progress of one request. Written and read by one task (the connection's), so its counts
/// need no ordering; they are atomics only because the task-local must be `Sync`.
///
/// A connection's busy spell keeps one record and renews it for each request
/// ([`Progress::renew`]): a request costs no allocation here.
#[derive(Debug)]
pub struct Progress {
    /// The instant `header_read` counts from.
    epoch: Instant,
    /// When the request header was complete, in nanoseconds after `epoch` ([`UNSET`] until
    /// then). Nobody is woken when it is: the connection loop reads it when its timer fires
    /// (see `conn::one`).
    header_read: AtomicU64,
    /// The request line exactly as the client sent it (up to and including its LF), when it
    /// could be read before pingora's parser (which percent-encodes illegal bytes in the target
    /// instead of refusing them); empty when it could not.
    request_line: Vec<u8>,
    /// The bytes of the request's header, and of its body that pingora read (by the end of
    /// the request): what the request took from the stream, if nothing else was read.
    /// [`UNSET`] until recorded.
    header_bytes: AtomicU64,
    body_bytes: AtomicU64,
    /// The client stream, handed back by the request's wrapper of it when the request's
    /// future was dropped holding it (see `conn::reclaim`).
    returned: Mutex<Option<Stream>>,
}

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            epoch: Instant::now(),
            header_read: AtomicU64::new(UNSET),
            request_line: Vec::new(),
            header_bytes: AtomicU64::new(UNSET),
            body_bytes: AtomicU64::new(UNSET),
            returned: Mutex::new(None),
        }
    }
}

impl Progress {
    /// A request's progress, with its request line as the client sent it (up to and including
    /// its LF) if it was read before pingora's parser.
    pub fn new(request_line: Option<&[u8]>) -> Self {
        let mut progress = Progress::default();
        progress.renew(request_line);
        progress
    }

    /// Start over for the connection's next request (see [`Progress::new`]), keeping the
    /// memory of the last request line.
    pub fn renew(&mut self, request_line: Option<&[u8]>) {
        *self.header_read.get_mut() = UNSET;
        *self.header_bytes.get_mut() = UNSET;
        *self.body_bytes.get_mut() = UNSET;
        self.request_line.clear();
        self.request_line
            .extend_from_slice(request_line.unwrap_or_default());
        *self.returned.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// When the request header was complete, if it is.
    pub fn header_read_at(&self) -> Option<Instant> {
        let nanos = self.header_read.load(Ordering::Relaxed);
        (nanos != UNSET).then(|| self.epoch + std::time::Duration::from_nanos(nanos))
    }

    /// The bytes the request took from the client stream as the service saw them (header and
    /// body), once the request is over; `None` if the service did not see both.
    pub fn consumed(&self) -> Option<u64> {
        let recorded = |n: &AtomicU64| Some(n.load(Ordering::Relaxed)).filter(|&n| n != UNSET);
        Some(recorded(&self.header_bytes)? + recorded(&self.body_bytes)?)
    }

    /// Keep the client stream of a request whose future was dropped holding it.
    pub fn give_back(&self, stream: Stream) {
        *self.returned.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
    }

    /// The client stream handed back by [`Progress::give_back`], if it was.
    pub fn take_back(&self) -> Option<Stream> {
        self.returned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Run a request's future with its progress visible to the service's hooks.
pub fn scope<F: Future>(progress: Arc<Progress>, f: F) -> impl Future<Output = F::Output> {
    PROGRESS.scope(progress, f)
}

/// Mark the current request's header as complete at `at`: its header deadline no longer
/// applies, its request deadline starts. Called by the service once the header has been parsed
/// (the first mark counts); a no-op outside sluice's connection loop.
pub fn header_read(at: Instant) {
    let _ = PROGRESS.try_with(|p| {
        record(
            &p.header_read,
            at.saturating_duration_since(p.epoch).as_nanos(),
        )
    });
}

/// The current request's line as the client sent it (up to and including its LF), if sluice's
/// connection loop read it before pingora: a plain TCP connection's request that was not
/// pipelined behind the previous one. `None` otherwise, and outside the connection loop.
/// Lent to `f`, not copied.
pub fn with_request_line<T>(mut f: impl FnMut(Option<&[u8]>) -> T) -> T {
    match PROGRESS.try_with(|p| f(Some(&p.request_line[..]).filter(|l| !l.is_empty()))) {
        Ok(t) => t,
        Err(_) => f(None),
    }
}

/// Record the size of the current request's header as parsed (see [`Progress::consumed`]).
pub fn header_bytes(n: usize) {
    let _ = PROGRESS.try_with(|p| record(&p.header_bytes, n));
}

/// Record the bytes of the current request's body read by its end (see
/// [`Progress::consumed`]).
pub fn body_bytes(n: usize) {
    let _ = PROGRESS.try_with(|p| record(&p.body_bytes, n));
}

/// Record a count (or an instant, in nanoseconds) the first time only; one too large to tell
/// from [`UNSET`] is recorded as the largest that can be.
fn record(slot: &AtomicU64, n: impl TryInto<u64>) {
    let n = n.try_into().unwrap_or(UNSET - 1).min(UNSET - 1);
    if slot.load(Ordering::Relaxed) == UNSET {
        slot.store(n, Ordering::Relaxed);
    }
}
