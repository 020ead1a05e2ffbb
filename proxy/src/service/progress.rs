//! The progress of the request being served, shared between sluice's connection loop
//! ([`crate::conn`]), which enforces the client deadlines, and the service's hooks, which see
//! the request parsed. It travels in a task-local, set by the connection loop around each
//! request's future; outside that loop (a TLS connection served by pingora's own loop) the
//! hooks find none and do nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::time::Instant;

/// A byte count not recorded yet.
const UNSET: u64 = u64::MAX;

/// Progress of one request. Written and read by one task (the connection's), so its counts
/// need no ordering; they are atomics only because the task-local must be `Sync`.
#[derive(Debug)]
pub struct Progress {
    /// When the request header was complete. Nobody is woken when it is: the connection loop
    /// reads it when its timer fires (see `conn::one`).
    header_read: OnceLock<Instant>,
    /// The request line exactly as the client sent it, when it could be read before pingora's
    /// parser (which percent-encodes illegal bytes in the target instead of refusing them).
    request_line: Option<Vec<u8>>,
    /// The bytes of the request's header, and of its body that pingora read (by the end of
    /// the request): what the request took from the stream, if nothing else was read.
    /// [`UNSET`] until recorded.
    header_bytes: AtomicU64,
    body_bytes: AtomicU64,
}

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

impl Progress {
    /// A request's progress, with its request line as the client sent it (up to and including
    /// its LF) if it was read before pingora's parser.
    pub fn new(request_line: Option<Vec<u8>>) -> Self {
        Progress {
            header_read: OnceLock::new(),
            request_line,
            header_bytes: AtomicU64::new(UNSET),
            body_bytes: AtomicU64::new(UNSET),
        }
    }

    /// When the request header was complete, if it is.
    pub fn header_read_at(&self) -> Option<Instant> {
        self.header_read.get().copied()
    }

    /// The bytes the request took from the client stream as the service saw them (header and
    /// body), once the request is over; `None` if the service did not see both.
    pub fn consumed(&self) -> Option<u64> {
        let recorded = |n: &AtomicU64| Some(n.load(Ordering::Relaxed)).filter(|&n| n != UNSET);
        Some(recorded(&self.header_bytes)? + recorded(&self.body_bytes)?)
    }
}

/// Run a request's future with its progress visible to the service's hooks.
pub fn scope<F: Future>(progress: Arc<Progress>, f: F) -> impl Future<Output = F::Output> {
    PROGRESS.scope(progress, f)
}

/// Mark the current request's header as complete: its header deadline no longer applies, its
/// request deadline starts. Called by the service once the header has been parsed; a no-op
/// outside sluice's connection loop.
pub fn header_read() {
    let _ = PROGRESS.try_with(|p| p.header_read.set(Instant::now()));
}

/// The current request's line as the client sent it (up to and including its LF), if sluice's
/// connection loop read it before pingora: a plain TCP connection's request that was not
/// pipelined behind the previous one. `None` otherwise, and outside the connection loop.
/// Lent to `f`, not copied.
pub fn with_request_line<T>(mut f: impl FnMut(Option<&[u8]>) -> T) -> T {
    match PROGRESS.try_with(|p| f(p.request_line.as_deref())) {
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

/// Record a count the first time only.
fn record(count: &AtomicU64, n: usize) {
    let n = u64::try_from(n).unwrap_or(UNSET - 1).min(UNSET - 1);
    if count.load(Ordering::Relaxed) == UNSET {
        count.store(n, Ordering::Relaxed);
    }
}
