//! Request bodies are received whole before a request may take a backend slot.
//!
//! A slow or stalled sender must never hold the backend's capacity, so a request waits for a
//! slot only once its body is in sluice's memory. The body must arrive under the pacing rules
//! of [`BodyPace`] (first byte within `proxy.client_body_start_timeout`, then at least
//! `proxy.client_body_min_rate` bytes per second on average, all of it within
//! `proxy.client_body_timeout`); a slower sender gets `408` and nothing of its request reaches
//! the backend.
//!
//! Every buffered body counts against one process-wide budget,
//! `proxy.max_buffered_body_bytes`, so a flood of uploads cannot exhaust memory. A body that
//! does not fit is refused at once with `503` and `Retry-After` (its connection is closed, since
//! the unread body cannot be skipped safely). Waiting for room instead would let a flood of
//! large uploads hold every other terminal's payment behind it, with no bound but the body
//! deadline; a refusal is immediate, and nothing reached the backend, so the terminal's retry
//! is safe.
//!
//! How the body reaches the backend: pingora re-sends a request body from its 64 KiB retry
//! buffer once the downstream body is complete. A body of up to 64 KiB is read with that buffer
//! on. For a larger body with a Content-Length, sluice keeps the body itself and turns the
//! retry buffer on only for the last 64 KiB, so that pingora's buffer is complete (not
//! truncated) and its upstream write runs through `request_body_filter`, which substitutes the
//! whole body. A chunked body has no known length, so its last 64 KiB cannot be found in
//! advance: a chunked body over 64 KiB gets `413` (send a Content-Length).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use prometheus::IntGauge;
use sluice_plugins::body_pace::BodyPace;
use tokio::time::Instant;

use crate::config::defaults;

/// The process-wide budget of buffered request body bytes.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    gauge: IntGauge,
}

/// Bytes reserved from the [`BodyBudget`]; given back when dropped (with the request).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    /// An empty budget reporting its use on `gauge`.
    pub fn new(gauge: IntGauge) -> Arc<Self> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            gauge,
        })
    }

    /// An empty reservation.
    pub fn empty(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Reservation {
    /// Reserve `more` bytes, unless the budget's total `max` would be exceeded.
    pub fn grow(&mut self, more: usize, max: usize) -> bool {
        let budget = &self.budget;
        let mut used = budget.used.load(Ordering::Acquire);
        loop {
            let Some(next) = used.checked_add(more).filter(|&n| n <= max) else {
                return false;
            };
            match budget
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        self.bytes += more;
        budget.gauge.add(more as i64);
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.gauge.sub(self.bytes as i64);
        }
    }
}

/// Why a body was not received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `proxy.max_body_bytes`: 413.
    TooLarge,
    /// A chunked body over pingora's 64 KiB retry buffer: 413.
    ChunkedTooLarge,
    /// Too slow (start, rate or total deadline): 408.
    TooSlow,
    /// The budget of buffered body bytes is spent: 503.
    Budget,
}

/// A body received whole.
#[derive(Debug)]
pub struct Received {
    /// Its size, bytes.
    pub len: usize,
    /// The whole body when pingora's retry buffer holds only its tail; `request_body_filter`
    /// sends it instead of that tail.
    pub whole: Option<Bytes>,
    /// Its bytes in the budget, held until the request ends.
    pub reservation: Reservation,
}

/// Limits for one body.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pacing rules.
    pub pace: BodyPace,
    /// Largest body.
    pub max_body_bytes: usize,
    /// The process-wide budget's size.
    pub max_buffered: usize,
}

/// Receive the request body whole. `declared` is its Content-Length (`None`: chunked). The
/// caller has checked that the body is not already complete.
pub async fn receive(
    downstream: &mut pingora::protocols::http::ServerSession,
    declared: Option<u64>,
    limits: Limits,
    budget: &Arc<BodyBudget>,
) -> Result<std::result::Result<Received, Refusal>> {
    let tail = defaults::BODY_BUFFER_BYTES;
    let mut reservation = budget.empty();
    // A declared body is reserved whole up front: refused before a byte of it is read.
    if let Some(n) = declared {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limits.max_body_bytes {
            return Ok(Err(Refusal::TooLarge));
        }
        if !reservation.grow(n, limits.max_buffered) {
            return Ok(Err(Refusal::Budget));
        }
    }
    let large = declared.is_some_and(|n| n > tail as u64);
    let mut whole = large.then(|| BytesMut::with_capacity(declared.unwrap_or(0) as usize));
    let started = Instant::now();
    let mut received = 0usize;
    loop {
        // The retry buffer must end up holding the body's complete tail: turn it on once what
        // is left fits in it (at once for a small body).
        let left = declared.map(|n| (n as usize).saturating_sub(received));
        if left.is_none_or(|left| left <= tail) {
            downstream.enable_retry_buffering();
        }
        let due = started + limits.pace.next_byte_due(received as u64);
        let chunk = match tokio::time::timeout_at(due, downstream.read_request_body()).await {
            Err(_elapsed) => return Ok(Err(Refusal::TooSlow)),
            Ok(read) => read?,
        };
        let Some(chunk) = chunk else { break };
        received += chunk.len();
        if received > limits.max_body_bytes {
            return Ok(Err(Refusal::TooLarge));
        }
        match &mut whole {
            Some(buf) => buf.extend_from_slice(&chunk),
            None if declared.is_none() => {
                if received > tail {
                    return Ok(Err(Refusal::ChunkedTooLarge));
                }
                if !reservation.grow(chunk.len(), limits.max_buffered) {
                    return Ok(Err(Refusal::Budget));
                }
            }
            None => {}
        }
    }
    if large && downstream.get_retry_buffer().is_none() {
        // Cannot happen with pingora's bounded reads (each at most 64 KiB, so the tail is
        // always read with the buffer on); refuse rather than forward a body pingora would
        // not send.
        return Ok(Err(Refusal::ChunkedTooLarge));
    }
    Ok(Ok(Received {
        len: received,
        whole: whole.map(BytesMut::freeze),
        reservation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_budget_and_are_given_back() {
        let gauge = IntGauge::new("t_buffered", "test").expect("gauge");
        let budget = BodyBudget::new(gauge.clone());
        let mut a = budget.empty();
        assert!(a.grow(60, 100));
        let mut b = budget.empty();
        assert!(!b.grow(41, 100), "over the budget");
        assert!(b.grow(40, 100));
        assert_eq!(budget.used(), 100);
        assert_eq!(gauge.get(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(60, 100));
        drop(b);
        assert_eq!(budget.used(), 0);
        assert_eq!(gauge.get(), 0);
    }
}
