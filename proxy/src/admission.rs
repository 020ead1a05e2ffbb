//! The async side of admission: waiting in the queue and holding a [`Permit`].
//!
//! [`sluice_plugins::AdmissionPool`] decides; this module waits. The pool sits behind a mutex
//! (every critical section is a few counter updates). A queued request parks on a one-shot
//! channel that the pool's grants complete, and gives up at its deadline.
//!
//! Two RAII guards make slot accounting exact on every path:
//! - [`Permit`] holds one backend slot and releases it on drop, exactly once, whether the
//!   request succeeded, failed, was aborted, or its task was dropped by a panic or shutdown.
//! - `Waiting` (private) holds a place in the queue. If the waiting future is dropped (the
//!   client went away), it leaves the queue; if it had been granted a slot in the same instant,
//!   that slot is released rather than leaked.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_plugins::{Acquire, AdmissionPool, BackendId, Grant, PoolSnapshot, Ticket};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `max_queue` requests were already waiting.
    QueueFull,
    /// The request waited `queue_timeout` without getting a slot.
    QueueTimeout,
}

impl Shed {
    /// Short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
        }
    }
}

type Pool = AdmissionPool<oneshot::Sender<BackendId>>;

/// Shared admission state of one proxy: the pool plus the queue deadline.
#[derive(Debug)]
pub struct Admission {
    pool: Mutex<Pool>,
    queue_timeout: Mutex<Duration>,
}

impl Admission {
    /// Admission for backends with these limits, in backend order.
    pub fn new(limits: &[u32], max_queue: usize, queue_timeout: Duration) -> Arc<Self> {
        Arc::new(Admission {
            pool: Mutex::new(AdmissionPool::new(limits, max_queue)),
            queue_timeout: Mutex::new(queue_timeout),
        })
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding this lock cannot leave the counters half-updated (each pool
        // operation completes before returning), so a poisoned lock is still consistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a slot on some backend, in FIFO order, for at most `queue_timeout`.
    ///
    /// Cancel-safe: dropping the returned future leaves the queue and leaks nothing.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        let timeout = *self.queue_timeout.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let deadline = now + timeout;
        let (tx, rx) = oneshot::channel();
        let ticket = match self.pool().acquire(now.into_std(), deadline.into_std(), tx) {
            Acquire::Admitted(backend) => return Ok(self.permit(backend, false)),
            Acquire::Rejected(_) => return Err(Shed::QueueFull),
            Acquire::Queued(ticket) => ticket,
        };
        let mut waiting = Waiting {
            admission: self.clone(),
            ticket,
            rx: Some(rx),
        };
        let granted = match waiting.rx.as_mut() {
            Some(rx) => tokio::time::timeout_at(deadline, rx).await,
            None => return Err(Shed::QueueTimeout),
        };
        match granted {
            Ok(Ok(backend)) => {
                waiting.rx = None;
                Ok(self.permit(backend, true))
            }
            // The deadline passed, or the sender vanished (cannot happen while we are queued,
            // but treat it the same): leave the queue, unless a grant raced the deadline.
            Ok(Err(_)) | Err(_) => match waiting.leave() {
                Some(backend) => Ok(self.permit(backend, true)),
                None => Err(Shed::QueueTimeout),
            },
        }
    }

    fn permit(self: &Arc<Self>, backend: BackendId, queued: bool) -> Permit {
        Permit {
            admission: self.clone(),
            backend,
            queued,
        }
    }

    /// Release one slot of `backend` and hand freed capacity to waiters.
    fn release(&self, backend: BackendId) {
        let mut pool = self.pool();
        let grants = pool.release(backend, Instant::now().into_std());
        hand_over(&mut pool, grants);
    }

    /// Change a backend's concurrency limit at runtime.
    pub fn set_limit(&self, backend: BackendId, limit: u32) {
        let mut pool = self.pool();
        let grants = pool.set_limit(backend, limit, Instant::now().into_std());
        hand_over(&mut pool, grants);
    }

    /// Change the queue bound and the queue deadline for new arrivals.
    pub fn set_queue(&self, max_queue: usize, queue_timeout: Duration) {
        self.pool().set_max_queue(max_queue);
        *self.queue_timeout.lock().unwrap_or_else(|p| p.into_inner()) = queue_timeout;
    }

    /// A consistent view of limits, in-flight counts and the queue.
    pub fn snapshot(&self) -> PoolSnapshot {
        self.pool().snapshot()
    }
}

/// Complete grants: wake each waiter with its backend. A waiter that has gone away gives its
/// slot straight back, which may in turn admit the next waiter.
fn hand_over(pool: &mut Pool, grants: Vec<Grant<oneshot::Sender<BackendId>>>) {
    let mut pending = grants;
    // Each round either wakes a waiter or removes one from the queue, so this ends.
    while let Some(grant) = pending.pop() {
        if grant.waiter.send(grant.backend).is_err() {
            let more = pool.release(grant.backend, Instant::now().into_std());
            pending.extend(more);
        }
    }
}

/// A place in the queue. Dropping it leaves the queue.
struct Waiting {
    admission: Arc<Admission>,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<BackendId>>,
}

impl Waiting {
    /// Leave the queue. Returns the backend if a slot was granted before we could leave; the
    /// caller then owns that slot.
    fn leave(&mut self) -> Option<BackendId> {
        let mut rx = self.rx.take()?;
        let mut pool = self.admission.pool();
        if pool.cancel(self.ticket).is_some() {
            return None;
        }
        // Not queued any more: a grant was sent under this same lock, so it is in the channel.
        rx.try_recv().ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(backend) = self.leave() {
            self.admission.release(backend);
        }
    }
}

/// One admitted request's slot at a backend. Dropping it releases the slot.
#[derive(Debug)]
#[must_use = "dropping a permit releases the backend slot at once"]
pub struct Permit {
    admission: Arc<Admission>,
    backend: BackendId,
    queued: bool,
}

impl Permit {
    /// The backend this request was admitted to.
    pub fn backend(&self) -> BackendId {
        self.backend
    }

    /// Whether the request waited in the queue before it was admitted.
    pub fn was_queued(&self) -> bool {
        self.queued
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflight(a: &Admission) -> u32 {
        a.snapshot().backends[0].inflight
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_and_timeout() {
        let a = Admission::new(&[1], 1, Duration::from_secs(1));
        let p = a.acquire().await.expect("first admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 1);
        assert_eq!(
            a.acquire().await.expect_err("must be rejected"),
            Shed::QueueFull
        );
        // Paused time: the waiter's deadline passes without any real sleep.
        assert_eq!(waiter.await.expect("join"), Err(Shed::QueueTimeout));
        assert_eq!(a.snapshot().queued, 0);
        drop(p);
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn release_hands_the_slot_to_the_waiter() {
        let a = Admission::new(&[1], 10, Duration::from_secs(10));
        let p = a.acquire().await.expect("admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|p| p.backend()) });
        tokio::task::yield_now().await;
        drop(p);
        assert_eq!(waiter.await.expect("join"), Ok(BackendId(0)));
        assert_eq!(
            inflight(&a),
            0,
            "the waiter's permit was dropped in its task"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiter_leaves_the_queue() {
        let a = Admission::new(&[1], 10, Duration::from_secs(10));
        let p = a.acquire().await.expect("admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.snapshot().queued, 0);
        drop(p);
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_admits_waiters() {
        let a = Admission::new(&[1], 10, Duration::from_secs(10));
        let _p = a.acquire().await.expect("admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|p| p.backend()) });
        tokio::task::yield_now().await;
        a.set_limit(BackendId(0), 2);
        assert_eq!(waiter.await.expect("join"), Ok(BackendId(0)));
    }
}
