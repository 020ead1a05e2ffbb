//! The admission pool: per-backend concurrency limits behind one bounded FIFO queue.
//!
//! An [`AdmissionPool`] knows, for every backend, its concurrency limit (a value that can change
//! at runtime), how many requests it has in flight, and whether it may take new work
//! ([`BackendState`]). In front of the backends sits one wait queue, bounded by `max_queue`,
//! served strictly first-in first-out: a newcomer is admitted directly only when nobody is
//! waiting, so no request ever overtakes one that arrived earlier.
//!
//! The pool never blocks and never reads a clock. The caller (the proxy) does the waiting:
//!
//! 1. [`AdmissionPool::acquire`] either admits at once (returns the chosen backend), queues the
//!    caller's waiter value `W` (returns a [`Ticket`]), or refuses because the queue is full.
//! 2. Every later call that frees capacity ([`release`](AdmissionPool::release),
//!    [`set_limit`](AdmissionPool::set_limit), [`set_state`](AdmissionPool::set_state)) returns
//!    the [`Grant`]s it made: waiters taken off the head of the queue together with the backend
//!    each was admitted to. The slot is already counted as in flight when the grant is returned;
//!    the caller hands it over to the waiter, or releases it if the waiter has gone.
//! 3. A waiter that gives up calls [`cancel`](AdmissionPool::cancel). `None` means the waiter was
//!    granted a slot in the meantime, and the caller must use or release that slot.
//! 4. [`expire`](AdmissionPool::expire) removes every waiter whose deadline has passed.
//!
//! Each backend may also carry a token bucket ([`crate::token_bucket`]) and a slow-start ramp
//! ([`crate::slow_start`]). A backend can take a request when it is up, has a slot free under
//! its *effective* limit (the ramp's value at `now`), and has a token at `now`. Tokens are taken
//! only at the moment a request is admitted. When the queue is not empty but no backend can take
//! its head for lack of a token or of ramp progress, [`next_wakeup`](AdmissionPool::next_wakeup)
//! says when that changes, and [`poll`](AdmissionPool::poll) then admits.
//!
//! Invariant (checked by the shared model in [`model`], run by the property tests at the bottom
//! of this file and by the `pool_ops` fuzz target): after every operation, each backend's
//! in-flight count is at most its limit, unless the limit was lowered below the work already in
//! flight, in which case nothing more is admitted until it drains below the new limit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::adaptive::{LatencyLimit, LatencyLimitConfig, Phase, Sample};
use crate::slow_start::{SlowStart, SlowStartConfig};
use crate::token_bucket::{RateLimit, TokenBucket};

#[cfg(any(test, feature = "model"))]
pub mod model;

/// Admission policy of one backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendPolicy {
    /// Full concurrency limit.
    pub max_inflight: u32,
    /// Optional request rate limit (scaled by the ramp while it runs).
    pub rate: Option<RateLimit>,
    /// Optional slow-start ramp (runs from construction, on recovery and on command).
    pub slow_start: Option<SlowStartConfig>,
    /// Optional learned limit (a latency-driven ramp, and optionally a gradient, under
    /// `max_inflight`); when set it replaces `slow_start`.
    pub learn: Option<LatencyLimitConfig>,
}

impl BackendPolicy {
    /// The learned limit's configuration, its ceiling being `max_inflight`.
    fn learner(&self) -> Option<LatencyLimitConfig> {
        self.learn.map(|c| LatencyLimitConfig {
            ceiling: self.max_inflight,
            ..c
        })
    }

    /// A plain concurrency limit with no rate limit and no ramp.
    pub fn limit(max_inflight: u32) -> Self {
        BackendPolicy {
            max_inflight,
            rate: None,
            slow_start: None,
            learn: None,
        }
    }
}

/// Tickets queued normally count up from the middle of the range; requeued requests (which
/// keep their priority) count up from zero, so they sort ahead of every normal ticket and in
/// the order they were requeued among themselves.
const TICKET_BASE: u64 = 1 << 63;

/// Index of a backend inside an [`AdmissionPool`], in configuration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub usize);

/// Identifies one queued waiter; returned by [`AdmissionPool::acquire`].
///
/// Tickets increase with arrival order, which is also the order in which waiters are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[must_use = "a queued waiter must eventually be granted, cancelled or expired"]
pub struct Ticket(u64);

/// Whether a backend may receive new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Takes new requests up to its limit.
    Up,
    /// Known to be down: takes no new requests; queued requests wait for a backend to come back.
    Down,
    /// Taken out of service by the operator: takes no new requests, in-flight ones finish.
    Draining,
}

/// The request could not be queued: `max_queue` requests are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Outcome of [`AdmissionPool::acquire`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an admitted request holds a slot that must be released"]
pub enum Acquire {
    /// Admitted at once to this backend; the slot is counted as in flight.
    Admitted(BackendId),
    /// Waiting in the queue; the waiter value was stored under this ticket.
    Queued(Ticket),
    /// The queue is full: reject the request.
    Rejected(QueueFull),
}

/// A queued waiter that has just been admitted to a backend.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a granted slot must be handed to its waiter or released"]
pub struct Grant<W> {
    /// The ticket the waiter was queued under.
    pub ticket: Ticket,
    /// The backend it was admitted to; the slot is already counted as in flight.
    pub backend: BackendId,
    /// The waiter value given to [`AdmissionPool::acquire`].
    pub waiter: W,
}

#[derive(Debug, Clone)]
struct Slot {
    limit: u32,
    /// Slots held back for another process during a zero-downtime upgrade.
    reserved: u32,
    /// This instance's share of the cap when several instances share the backend through
    /// leases (`[cluster]`); `None` when it runs alone. Reserved slots come out of it.
    share: Option<u32>,
    inflight: u32,
    state: BackendState,
    bucket: Option<TokenBucket>,
    ramp: Option<SlowStart>,
    ramp_cfg: Option<SlowStartConfig>,
    /// The learned limit, if the backend learns one; `learned` is its value at the last tick.
    learner: Option<LatencyLimit>,
    learned: u32,
}

impl Slot {
    fn new(policy: &BackendPolicy, now: Instant) -> Self {
        Slot {
            limit: policy.max_inflight,
            reserved: 0,
            share: None,
            inflight: 0,
            state: BackendState::Up,
            bucket: policy.rate.map(|r| TokenBucket::new(r, now)),
            ramp: policy
                .slow_start
                .filter(|_| policy.learn.is_none())
                .map(|c| SlowStart::new(c, now)),
            ramp_cfg: policy.slow_start.filter(|_| policy.learn.is_none()),
            learner: policy.learner().map(|c| LatencyLimit::new(c, now)),
            learned: policy.max_inflight,
        }
        .ticked(now)
    }

    /// Bring the ramp and the learned limit to `now`.
    fn ticked(mut self, now: Instant) -> Self {
        self.tick(now);
        self
    }

    fn tick(&mut self, now: Instant) {
        if let Some(r) = self.ramp.as_mut() {
            r.advance(now);
        }
        if let Some(l) = self.learner.as_mut() {
            l.tick(self.inflight, now);
            self.learned = l.limit(now);
        }
    }

    /// The limit in force: the ramp's value while it runs, else the full limit, bounded by
    /// the capacity (the cluster share, less any slots reserved for another process).
    fn effective_limit(&self) -> u32 {
        let limit = match (&self.ramp, &self.learner) {
            (_, Some(_)) => self.learned.min(self.limit),
            (Some(r), None) => r.limit(self.limit).min(self.limit),
            (None, None) => self.limit,
        };
        limit.min(self.capacity())
    }

    /// What this process may use of the backend at most: its share of the cap (the whole cap
    /// when it runs alone), less the slots reserved for another process.
    fn capacity(&self) -> u32 {
        self.limit
            .min(self.share.unwrap_or(u32::MAX))
            .saturating_sub(self.reserved)
    }

    /// Rate scale: the ramp's share of the full limit.
    fn rate_scale(&self) -> f64 {
        match (&self.ramp, &self.learner) {
            (_, Some(_)) if self.limit > 0 => f64::from(self.learned) / f64::from(self.limit),
            (Some(r), None) if r.active() && self.limit > 0 => {
                f64::from(r.limit(self.limit)) / f64::from(self.limit)
            }
            _ => 1.0,
        }
    }

    /// Slots free under the effective limit, if the backend takes new work.
    fn free(&self) -> u32 {
        match self.state {
            BackendState::Up => self.effective_limit().saturating_sub(self.inflight),
            BackendState::Down | BackendState::Draining => 0,
        }
    }

    fn has_token(&self, now: Instant) -> bool {
        self.bucket
            .as_ref()
            .is_none_or(|b| b.ready(now, self.rate_scale()))
    }

    fn restart_ramp(&mut self, now: Instant) {
        if let Some(l) = self.learner.as_mut() {
            l.restart(now);
            self.learned = l.limit(now);
        }
        if let Some(cfg) = self.ramp_cfg {
            match &mut self.ramp {
                Some(r) => r.restart(now),
                None => self.ramp = Some(SlowStart::new(cfg, now)),
            }
        }
    }
}

#[derive(Debug)]
struct Waiter<W> {
    deadline: Instant,
    value: W,
}

/// Read-only view of one backend, for status output and metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackendSnapshot {
    /// The full concurrency limit.
    pub limit: u32,
    /// The limit in force now (below `limit` while the slow-start ramp runs).
    pub effective_limit: u32,
    /// Ramp progress, 0.0 to 1.0 (1.0 when no ramp runs).
    pub ramp: f64,
    /// Whether the ramp is held by its error-rate or latency gate.
    pub ramp_gated: bool,
    /// Why the learned limit is where it is, if the backend learns one.
    pub phase: Option<Phase>,
    /// The backend's baseline latency, once the learned limit has measured it.
    pub baseline: Option<Duration>,
    /// Tokens available now, if the backend has a rate limit.
    pub tokens: Option<u32>,
    /// Requests admitted to this backend and not yet released.
    pub inflight: u32,
    /// Slots held back for another process (zero-downtime upgrade).
    pub reserved: u32,
    /// This instance's share of the cap (`[cluster]`); `None` when it runs alone.
    pub share: Option<u32>,
    /// Whether it takes new requests.
    pub state: BackendState,
}

/// Read-only view of the whole pool.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PoolSnapshot {
    /// One entry per backend, in [`BackendId`] order.
    pub backends: Vec<BackendSnapshot>,
    /// Requests waiting in the queue.
    pub queued: usize,
    /// The queue's bound.
    pub max_queue: usize,
}

/// Concurrency limits for a set of backends plus one bounded FIFO wait queue.
///
/// `W` is whatever the caller needs to wake a waiter (the proxy stores a one-shot sender).
#[derive(Debug)]
pub struct AdmissionPool<W> {
    slots: Vec<Slot>,
    queue: BTreeMap<Ticket, Waiter<W>>,
    max_queue: usize,
    next_ticket: u64,
    next_front_ticket: u64,
}

impl<W> AdmissionPool<W> {
    /// A pool with one backend per entry of `limits` (all [`BackendState::Up`], no rate limit,
    /// no ramp) and a queue holding at most `max_queue` waiters (0: reject when full).
    pub fn new(limits: &[u32], max_queue: usize) -> Self {
        let policies: Vec<BackendPolicy> =
            limits.iter().map(|&l| BackendPolicy::limit(l)).collect();
        // No ramp and no bucket: the instant is never used.
        Self::with_policies(&policies, max_queue, Instant::now())
    }

    /// A pool with one backend per policy, all up; ramps start at `now`.
    pub fn with_policies(policies: &[BackendPolicy], max_queue: usize, now: Instant) -> Self {
        AdmissionPool {
            slots: policies.iter().map(|p| Slot::new(p, now)).collect(),
            queue: BTreeMap::new(),
            max_queue,
            next_ticket: TICKET_BASE,
            next_front_ticket: 0,
        }
    }

    /// Replace backend `backend`'s policy (hot reload). In-flight work and state are kept; a
    /// running ramp keeps its progress; a changed rate starts from a full bucket.
    pub fn set_policy(
        &mut self,
        backend: BackendId,
        policy: BackendPolicy,
        now: Instant,
    ) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.limit = policy.max_inflight;
            if slot.bucket.as_ref().map(TokenBucket::limit) != policy.rate {
                slot.bucket = policy.rate.map(|r| TokenBucket::new(r, now));
            }
            slot.ramp_cfg = policy.slow_start.filter(|_| policy.learn.is_none());
            if slot.ramp_cfg.is_none() {
                slot.ramp = None;
            }
            match (policy.learner(), slot.learner.as_mut()) {
                (None, _) => slot.learner = None,
                (Some(c), Some(l)) => l.reconfigure(c),
                (Some(c), None) => slot.learner = Some(LatencyLimit::new(c, now)),
            }
            slot.tick(now);
        }
        self.dispatch(now)
    }

    /// Add a backend (hot reload); it starts up, with its ramp.
    pub fn add_backend(&mut self, policy: BackendPolicy, now: Instant) -> BackendId {
        self.slots.push(Slot::new(&policy, now));
        BackendId(self.slots.len() - 1)
    }

    /// Admit a request now, queue it until `deadline`, or refuse it.
    ///
    /// A request is admitted at once only if nobody is queued (FIFO: no overtaking) and some
    /// backend that is up has a free slot; it goes to the backend with the most free slots.
    pub fn acquire(&mut self, now: Instant, deadline: Instant, waiter: W) -> Acquire {
        self.acquire_at(now, deadline, || waiter, false)
    }

    /// [`acquire`](Self::acquire), with the waiter made only if the request is queued: a
    /// request admitted at once (the common case) pays for no waiter (a channel, say).
    pub fn acquire_with(
        &mut self,
        now: Instant,
        deadline: Instant,
        waiter: impl FnOnce() -> W,
    ) -> Acquire {
        self.acquire_at(now, deadline, waiter, false)
    }

    /// Queue a request again *ahead of* every normal waiter, keeping its deadline: for a
    /// request whose admission was undone before anything reached the backend (a refused
    /// connection). Never rejected for a full queue, since it already held its place.
    pub fn requeue(&mut self, now: Instant, deadline: Instant, waiter: W) -> Acquire {
        self.acquire_at(now, deadline, || waiter, true)
    }

    /// Admit at once if nobody waits and a backend can take it; else queue at the back (or,
    /// with `front`, ahead of every normal waiter and regardless of `max_queue`).
    fn acquire_at(
        &mut self,
        now: Instant,
        deadline: Instant,
        waiter: impl FnOnce() -> W,
        front: bool,
    ) -> Acquire {
        self.tick(now);
        if self.queue.is_empty() {
            if let Some(backend) = self.pick(now) {
                self.admit(backend, now);
                return Acquire::Admitted(backend);
            }
        }
        let ticket = if front {
            // 2^63 requeues would be needed to reach the normal tickets.
            let t = Ticket(self.next_front_ticket);
            self.next_front_ticket += 1;
            t
        } else {
            if self.queue.len() >= self.max_queue {
                return Acquire::Rejected(QueueFull);
            }
            let t = Ticket(self.next_ticket);
            self.next_ticket += 1;
            t
        };
        self.queue.insert(
            ticket,
            Waiter {
                deadline,
                value: waiter(),
            },
        );
        Acquire::Queued(ticket)
    }

    /// Take a slot on `backend` for a health probe, whatever its state, if a slot is free: under
    /// its effective limit while it is up (a busy backend is evidently serving), under its full
    /// limit (less reserved slots) while it is down or drained, when no real request is
    /// admitted and a ramp or a collapsed learned limit must not keep the probe that would
    /// bring it back from running. No token is taken. Release it with
    /// [`release`](Self::release).
    pub fn acquire_probe(&mut self, backend: BackendId, now: Instant) -> bool {
        self.tick(now);
        match self.slots.get_mut(backend.0) {
            Some(slot) => {
                let bound = match slot.state {
                    BackendState::Up => slot.effective_limit(),
                    BackendState::Down | BackendState::Draining => slot.capacity(),
                };
                if slot.inflight < bound {
                    slot.inflight += 1;
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    }

    /// Feed what became of a request sent to `backend` to its ramp gate and learned limit;
    /// returns the grants a grown limit made. Like every call that admits, it first brings
    /// every backend to `now`, so time's raise of another backend's limit is used too.
    pub fn record(&mut self, backend: BackendId, sample: Sample, now: Instant) -> Vec<Grant<W>> {
        if backend.0 >= self.slots.len() {
            return Vec::new();
        }
        // The first answer after a stall reveals it, should the answer come before the timer's
        // next look: the tick collapses the limit before this answer (and the slots it frees)
        // can be given back to the backend at the old limit.
        self.tick(now);
        let Some(slot) = self.slots.get_mut(backend.0) else {
            return Vec::new();
        };
        if let Some(ramp) = slot.ramp.as_mut() {
            match sample {
                Sample::Ok(l) => ramp.record(false, l),
                Sample::Failed(l) => ramp.record(true, l),
                Sample::Lost => ramp.record(true, Duration::ZERO),
            }
        }
        if let Some(l) = slot.learner.as_mut() {
            l.record(sample, now);
            slot.learned = l.limit(now);
        }
        self.dispatch(now)
    }

    /// Restart a backend's slow-start ramp (operator command). Lowers its effective limit.
    pub fn restart_ramp(&mut self, backend: BackendId, now: Instant) {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.restart_ramp(now);
        }
    }

    /// Admit whatever time alone has made possible (tokens refilled, ramp grown).
    pub fn poll(&mut self, now: Instant) -> Vec<Grant<W>> {
        self.tick(now);
        self.dispatch(now)
    }

    /// When [`poll`](Self::poll) may next admit a waiter because of time alone: the next token,
    /// or the next step of a ramp, on a backend that is up; `now` when time already freed a slot
    /// that no dispatch has used yet. `None` when nobody waits or only a release or a state
    /// change can help.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.slots
            .iter()
            .filter(|s| s.state == BackendState::Up)
            .filter_map(|s| {
                if s.free() > 0 {
                    // Free capacity with waiters queued: time raised the limit since the last
                    // dispatch (a ramp step, the clock bound of a learned limit), or a token
                    // is due. Without a rate limit, now.
                    Some(
                        s.bucket
                            .as_ref()
                            .map_or(now, |b| b.next_available(s.rate_scale())),
                    )
                } else if let Some(l) = &s.learner {
                    l.next_step(now)
                } else {
                    s.ramp.as_ref().and_then(|r| r.next_step(s.limit, now))
                }
            })
            .min()
    }

    /// Give back a slot of `backend` and admit queued waiters into the capacity now free.
    ///
    /// Releasing a backend with nothing in flight is a caller bug; it is ignored rather than
    /// allowed to corrupt the count.
    pub fn release(&mut self, backend: BackendId, now: Instant) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            debug_assert!(slot.inflight > 0, "release without a matching admit");
            slot.inflight = slot.inflight.saturating_sub(1);
        }
        self.dispatch(now)
    }

    /// A backend's limit in force and, when it learns its limit, why it is there; as of the
    /// last change (no clock read: call after an operation that ticked).
    pub fn limit_now(&self, backend: BackendId) -> Option<(u32, Option<Phase>)> {
        let slot = self.slots.get(backend.0)?;
        Some((
            slot.effective_limit(),
            slot.learner.as_ref().map(LatencyLimit::phase),
        ))
    }

    /// Remove a queued waiter. Returns its value, or `None` if it is no longer queued (it was
    /// granted a slot, or expired, in the meantime).
    pub fn cancel(&mut self, ticket: Ticket) -> Option<W> {
        self.queue.remove(&ticket).map(|w| w.value)
    }

    /// Remove every waiter whose deadline is at or before `now`, oldest first.
    pub fn expire(&mut self, now: Instant) -> Vec<(Ticket, W)> {
        let expired: Vec<Ticket> = self
            .queue
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        expired
            .into_iter()
            .filter_map(|t| self.queue.remove(&t).map(|w| (t, w.value)))
            .collect()
    }

    /// The earliest deadline among queued waiters.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.values().map(|w| w.deadline).min()
    }

    /// Change a backend's concurrency limit. Raising it admits waiters at once; lowering it
    /// below the work in flight admits nothing more until that work drains below the new limit.
    pub fn set_limit(&mut self, backend: BackendId, limit: u32, now: Instant) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.limit = limit;
            if let Some(l) = slot.learner.as_mut() {
                l.reconfigure(LatencyLimitConfig {
                    ceiling: limit,
                    ..l.config()
                });
            }
            slot.tick(now);
        }
        self.dispatch(now)
    }

    /// Change whether a backend takes new requests. In-flight requests are not affected.
    /// A backend that comes back up (from down or draining) restarts its slow-start ramp.
    pub fn set_state(
        &mut self,
        backend: BackendId,
        state: BackendState,
        now: Instant,
    ) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            if state == BackendState::Up && slot.state != BackendState::Up {
                slot.restart_ramp(now);
            }
            slot.state = state;
        }
        self.dispatch(now)
    }

    /// Hold back `reserved` of a backend's slots (for another process sharing the backend
    /// during an upgrade). Raising it admits nothing more until in-flight work drains below
    /// the remainder; lowering it admits waiters at once.
    pub fn set_reserved(
        &mut self,
        backend: BackendId,
        reserved: u32,
        now: Instant,
    ) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.reserved = reserved;
        }
        self.dispatch(now)
    }

    /// Lower a backend's capacity (its limit less reserved slots) to its work in flight plus
    /// `extra`, and never raise it. Returns the capacity now in force. Atomic with
    /// respect to admissions, so a process handing its share of the cap to another can report
    /// the returned value as an upper bound of what it will ever admit again.
    pub fn shrink_capacity(&mut self, backend: BackendId, extra: u32, now: Instant) -> u32 {
        self.tick(now);
        let Some(slot) = self.slots.get_mut(backend.0) else {
            return 0;
        };
        let capacity = slot.capacity();
        let next = capacity.min(slot.inflight.saturating_add(extra));
        let whole = slot.limit.min(slot.share.unwrap_or(u32::MAX));
        slot.reserved = whole - next;
        next
    }

    /// Set this instance's share of a backend's cap (`[cluster]` leases; `None`: it runs alone
    /// and may use the whole cap). Lowering it below the work in flight admits nothing more
    /// until that work drains below it; raising it admits waiters at once. Slots reserved for
    /// another process (upgrade hand-over) come out of the share.
    pub fn set_share(
        &mut self,
        backend: BackendId,
        share: Option<u32>,
        now: Instant,
    ) -> Vec<Grant<W>> {
        self.tick(now);
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.share = share;
        }
        self.dispatch(now)
    }

    /// A backend's state (`None` for an unknown backend).
    pub fn state(&self, backend: BackendId) -> Option<BackendState> {
        self.slots.get(backend.0).map(|s| s.state)
    }

    /// Number of backends.
    pub fn backends(&self) -> usize {
        self.slots.len()
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Requests in flight at `backend` (0 for an unknown backend).
    pub fn inflight(&self, backend: BackendId) -> u32 {
        self.slots.get(backend.0).map_or(0, |s| s.inflight)
    }

    /// A read-only view for status output and metrics.
    pub fn snapshot(&self, now: Instant) -> PoolSnapshot {
        PoolSnapshot {
            backends: self
                .slots
                .iter()
                .map(|s| {
                    let s = s.clone().ticked(now);
                    let ramp = s.ramp.as_ref();
                    let learned = s.learner.as_ref();
                    BackendSnapshot {
                        limit: s.limit,
                        effective_limit: s.effective_limit(),
                        reserved: s.reserved,
                        share: s.share,
                        ramp: match (learned, ramp) {
                            (Some(_), _) if s.limit > 0 => {
                                f64::from(s.learned.min(s.limit)) / f64::from(s.limit)
                            }
                            (_, Some(r)) => r.fraction(),
                            _ => 1.0,
                        },
                        ramp_gated: ramp.is_some_and(|r| r.active() && r.gated()),
                        phase: learned.map(LatencyLimit::phase),
                        baseline: learned.and_then(LatencyLimit::baseline),
                        tokens: s.bucket.as_ref().map(|b| b.available(now, s.rate_scale())),
                        inflight: s.inflight,
                        state: s.state,
                    }
                })
                .collect(),
            queued: self.queue.len(),
            max_queue: self.max_queue,
        }
    }

    /// Change the queue bound. Waiters already queued beyond a lowered bound keep their place.
    pub fn set_max_queue(&mut self, max_queue: usize) {
        self.max_queue = max_queue;
    }

    /// Move every ramp's clock and learned limit to `now`.
    fn tick(&mut self, now: Instant) {
        for slot in &mut self.slots {
            slot.tick(now);
        }
    }

    /// The backend that is up, has a token, and has the most free slots (lowest index on a tie).
    fn pick(&self, now: Instant) -> Option<BackendId> {
        let mut best: Option<(usize, u32)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let free = slot.free();
            if free > 0 && best.is_none_or(|(_, f)| free > f) && slot.has_token(now) {
                best = Some((i, free));
            }
        }
        best.map(|(i, _)| BackendId(i))
    }

    /// Count a request in flight at `backend` and take its token.
    fn admit(&mut self, backend: BackendId, now: Instant) {
        let slot = &mut self.slots[backend.0];
        slot.inflight += 1;
        if let Some(l) = slot.learner.as_mut() {
            l.on_admit(slot.inflight);
        }
        let scale = slot.rate_scale();
        if let Some(b) = slot.bucket.as_mut() {
            let took = b.try_take(now, scale);
            debug_assert!(took, "picked a backend without a token");
        }
    }

    /// Admit waiters from the head of the queue while some backend can take one.
    fn dispatch(&mut self, now: Instant) -> Vec<Grant<W>> {
        let mut grants = Vec::new();
        while !self.queue.is_empty() {
            let Some(backend) = self.pick(now) else { break };
            let Some((ticket, waiter)) = self.queue.pop_first() else {
                break;
            };
            self.admit(backend, now);
            grants.push(Grant {
                ticket,
                backend,
                waiter: waiter.value,
            });
        }
        grants
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slow_start::SlowStartConfig;
    use crate::token_bucket::RateLimit;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_then_rejects() {
        let now = t0();
        let deadline = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[2], 1);
        assert_eq!(
            pool.acquire(now, deadline, 'a'),
            Acquire::Admitted(BackendId(0))
        );
        assert_eq!(
            pool.acquire(now, deadline, 'b'),
            Acquire::Admitted(BackendId(0))
        );
        let Acquire::Queued(t) = pool.acquire(now, deadline, 'c') else {
            panic!("third request must queue")
        };
        assert_eq!(
            pool.acquire(now, deadline, 'd'),
            Acquire::Rejected(QueueFull)
        );
        let grants = pool.release(BackendId(0), now);
        assert_eq!(
            grants,
            vec![Grant {
                ticket: t,
                backend: BackendId(0),
                waiter: 'c'
            }]
        );
        assert_eq!(pool.inflight(BackendId(0)), 2);
        assert_eq!(pool.queued(), 0);
    }

    #[test]
    fn a_waiter_is_made_only_for_a_queued_request() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[1], 1);
        let mut made = 0;
        let mut make = |v: char| {
            made += 1;
            v
        };
        assert_eq!(
            pool.acquire_with(now, d, || make('a')),
            Acquire::Admitted(BackendId(0))
        );
        let Acquire::Queued(t) = pool.acquire_with(now, d, || make('b')) else {
            panic!("second request must queue")
        };
        assert_eq!(
            pool.acquire_with(now, d, || make('c')),
            Acquire::Rejected(QueueFull)
        );
        assert_eq!(made, 1, "admitted at once or refused: no waiter made");
        let grants = pool.release(BackendId(0), now);
        assert_eq!(
            grants,
            vec![Grant {
                ticket: t,
                backend: BackendId(0),
                waiter: 'b'
            }]
        );
    }

    #[test]
    fn zero_queue_rejects_when_full() {
        let now = t0();
        let mut pool = AdmissionPool::new(&[1], 0);
        assert_eq!(pool.acquire(now, now, ()), Acquire::Admitted(BackendId(0)));
        assert_eq!(pool.acquire(now, now, ()), Acquire::Rejected(QueueFull));
    }

    #[test]
    fn newcomer_never_overtakes_a_waiter() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[1], 10);
        let _ = pool.acquire(now, d, 0);
        let Acquire::Queued(first) = pool.acquire(now, d, 1) else {
            panic!("must queue")
        };
        // Capacity appears through a limit raise; the waiter gets it, then the newcomer queues.
        let grants = pool.set_limit(BackendId(0), 2, now);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].ticket, first);
        assert!(matches!(pool.acquire(now, d, 2), Acquire::Queued(_)));
    }

    #[test]
    fn cancel_after_grant_returns_none() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[1], 10);
        let _ = pool.acquire(now, d, 'a');
        let Acquire::Queued(t) = pool.acquire(now, d, 'b') else {
            panic!("must queue")
        };
        let grants = pool.release(BackendId(0), now);
        assert_eq!(grants.len(), 1);
        assert_eq!(pool.cancel(t), None);
    }

    #[test]
    fn expire_removes_only_due_waiters_in_order() {
        let now = t0();
        let mut pool = AdmissionPool::new(&[0], 10);
        let _ = pool.acquire(now, now + Duration::from_millis(30), 'a');
        let _ = pool.acquire(now, now + Duration::from_millis(10), 'b');
        let _ = pool.acquire(now, now + Duration::from_millis(50), 'c');
        assert_eq!(pool.next_deadline(), Some(now + Duration::from_millis(10)));
        let gone: Vec<char> = pool
            .expire(now + Duration::from_millis(30))
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        assert_eq!(gone, vec!['a', 'b']);
        assert_eq!(pool.queued(), 1);
    }

    #[test]
    fn lowering_the_limit_admits_nothing_until_drained() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[3], 10);
        for _ in 0..3 {
            let _ = pool.acquire(now, d, ());
        }
        assert!(pool.set_limit(BackendId(0), 1, now).is_empty());
        let _ = pool.acquire(now, d, ());
        assert!(pool.release(BackendId(0), now).is_empty());
        assert!(pool.release(BackendId(0), now).is_empty());
        // In flight is now 1 = limit: still nothing; one more release admits the waiter.
        assert_eq!(pool.release(BackendId(0), now).len(), 1);
    }

    #[test]
    fn picks_backend_with_most_free_slots_and_skips_unavailable_ones() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[2, 4, 4], 10);
        assert!(pool
            .set_state(BackendId(2), BackendState::Draining, now)
            .is_empty());
        let picks: Vec<BackendId> = (0..6)
            .map(|_| match pool.acquire(now, d, ()) {
                Acquire::Admitted(b) => b,
                other => panic!("expected admission, got {other:?}"),
            })
            .collect();
        let on = |b: usize| picks.iter().filter(|p| p.0 == b).count();
        assert_eq!((on(0), on(1), on(2)), (2, 4, 0));
        assert!(matches!(pool.acquire(now, d, ()), Acquire::Queued(_)));
        // The drained backend comes back: the waiter is admitted there.
        let grants = pool.set_state(BackendId(2), BackendState::Up, now);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].backend, BackendId(2));
    }

    #[test]
    fn down_backend_keeps_waiters_queued() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[2], 10);
        assert!(pool
            .set_state(BackendId(0), BackendState::Down, now)
            .is_empty());
        assert!(matches!(pool.acquire(now, d, ()), Acquire::Queued(_)));
        assert_eq!(pool.set_state(BackendId(0), BackendState::Up, now).len(), 1);
    }

    fn policy(max: u32, rate: Option<(f64, u32)>, ramp: Option<(u32, u64)>) -> BackendPolicy {
        BackendPolicy {
            max_inflight: max,
            rate: rate.map(|(per_second, burst)| RateLimit { per_second, burst }),
            slow_start: ramp.map(|(initial, secs)| SlowStartConfig {
                initial,
                duration: Duration::from_secs(secs),
                max_error_rate: None,
                max_latency: None,
            }),
            learn: None,
        }
    }

    #[test]
    fn waiter_without_token_is_admitted_at_next_wakeup() {
        let now = t0();
        let d = now + Duration::from_secs(10);
        let mut pool = AdmissionPool::with_policies(&[policy(10, Some((10.0, 2)), None)], 10, now);
        assert!(matches!(pool.acquire(now, d, 0), Acquire::Admitted(_)));
        assert!(matches!(pool.acquire(now, d, 1), Acquire::Admitted(_)));
        // Burst spent: the third waits although slots are free, and is never rejected for it.
        assert!(matches!(pool.acquire(now, d, 2), Acquire::Queued(_)));
        let wake = pool.next_wakeup(now).expect("a token is coming");
        assert_eq!(wake, now + Duration::from_millis(100));
        assert!(pool.poll(wake - Duration::from_nanos(1)).is_empty());
        let grants = pool.poll(wake);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].waiter, 2);
        assert_eq!(pool.next_wakeup(wake), None, "nobody waits");
    }

    #[test]
    fn ramp_limits_admission_and_grows_with_time() {
        let now = t0();
        let d = now + Duration::from_secs(100);
        let mut pool = AdmissionPool::with_policies(&[policy(10, None, Some((2, 8)))], 100, now);
        let admitted = (0..10)
            .filter(|&i| matches!(pool.acquire(now, d, i), Acquire::Admitted(_)))
            .count();
        assert_eq!(admitted, 2, "the ramp starts at its initial limit");
        // Limit grows by one every second (8 more slots over 8 s).
        let wake = pool.next_wakeup(now).expect("ramp step");
        assert_eq!(wake, now + Duration::from_secs(1));
        assert_eq!(pool.poll(wake).len(), 1);
        let later = now + Duration::from_secs(8);
        assert_eq!(pool.poll(later).len(), 7);
        assert_eq!(pool.snapshot(later).backends[0].effective_limit, 10);
        assert_eq!(pool.next_wakeup(later), None, "ramp over, backend full");
    }

    /// A waiter that arrives when time has raised the limit but nothing has dispatched since
    /// (the queue was not empty, so it queues behind the others): the capacity time freed is
    /// reported as due now, so whoever drives the pool polls at once.
    #[test]
    fn capacity_freed_by_time_is_due_at_once() {
        let now = t0();
        let d = now + Duration::from_secs(100);
        let mut pool = AdmissionPool::with_policies(&[policy(10, None, Some((2, 8)))], 100, now);
        for i in 0..3 {
            let _ = pool.acquire(now, d, i);
        }
        assert_eq!(pool.next_wakeup(now), Some(now + Duration::from_secs(1)));
        let later = now + Duration::from_secs(3);
        assert!(matches!(pool.acquire(later, d, 3), Acquire::Queued(_)));
        assert_eq!(
            pool.next_wakeup(later),
            Some(later),
            "slots free, waiters queued"
        );
        assert_eq!(pool.poll(later).len(), 2);
        assert_eq!(pool.next_wakeup(later), None, "nobody waits");
    }

    #[test]
    fn recovery_restarts_the_ramp() {
        let now = t0();
        let mut pool: AdmissionPool<()> =
            AdmissionPool::with_policies(&[policy(10, None, Some((1, 10)))], 10, now);
        let later = now + Duration::from_secs(20);
        assert_eq!(pool.snapshot(later).backends[0].effective_limit, 10);
        let _ = pool.set_state(BackendId(0), BackendState::Down, later);
        let _ = pool.set_state(BackendId(0), BackendState::Up, later);
        assert_eq!(pool.snapshot(later).backends[0].effective_limit, 1);
        let _ = pool.set_state(BackendId(0), BackendState::Draining, later);
        let back = later + Duration::from_secs(20);
        let _ = pool.set_state(BackendId(0), BackendState::Up, back);
        assert_eq!(pool.snapshot(back).backends[0].effective_limit, 1);
    }

    #[test]
    fn requeued_request_goes_ahead_of_the_queue() {
        let now = t0();
        let d = now + Duration::from_secs(10);
        let mut pool = AdmissionPool::new(&[1], 1);
        let _ = pool.acquire(now, d, 'a');
        assert!(matches!(pool.acquire(now, d, 'b'), Acquire::Queued(_)));
        // 'a' could not connect: its slot is released and it is requeued ahead of 'b',
        // even though the queue is full.
        let grants = pool.release(BackendId(0), now);
        assert_eq!(grants[0].waiter, 'b');
        assert!(matches!(pool.requeue(now, d, 'a'), Acquire::Queued(_)));
        let grants = pool.release(BackendId(0), now);
        assert_eq!(grants[0].waiter, 'a');
    }

    #[test]
    fn reserved_slots_are_not_admitted() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[4], 10);
        assert!(pool.set_reserved(BackendId(0), 3, now).is_empty());
        assert!(matches!(pool.acquire(now, d, 0), Acquire::Admitted(_)));
        assert!(matches!(pool.acquire(now, d, 1), Acquire::Queued(_)));
        assert_eq!(pool.set_reserved(BackendId(0), 0, now).len(), 1);
        assert_eq!(pool.snapshot(now).backends[0].effective_limit, 4);
    }

    #[test]
    fn a_cluster_share_bounds_admission_and_reserved_slots_come_out_of_it() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[8], 10);
        assert!(pool.set_share(BackendId(0), Some(5), now).is_empty());
        assert!(pool.set_reserved(BackendId(0), 2, now).is_empty());
        for i in 0..3 {
            assert!(matches!(pool.acquire(now, d, i), Acquire::Admitted(_)));
        }
        assert!(matches!(pool.acquire(now, d, 3), Acquire::Queued(_)));
        assert_eq!(pool.snapshot(now).backends[0].effective_limit, 3);
        // A lowered share admits nothing until in-flight work drains below it.
        assert!(pool.set_share(BackendId(0), Some(2), now).is_empty());
        assert!(pool.release(BackendId(0), now).is_empty());
        assert!(pool.release(BackendId(0), now).is_empty());
        assert_eq!(pool.inflight(BackendId(0)), 1);
        // Raising it admits the waiter at once; without a share the whole cap is back.
        assert_eq!(pool.set_share(BackendId(0), Some(6), now).len(), 1);
        assert!(pool.set_share(BackendId(0), None, now).is_empty());
        assert_eq!(pool.snapshot(now).backends[0].effective_limit, 6);
        // The hand-over's shrink works inside the share.
        assert!(pool.set_share(BackendId(0), Some(4), now).is_empty());
        assert_eq!(pool.shrink_capacity(BackendId(0), 1, now), 2);
        assert_eq!(pool.snapshot(now).backends[0].effective_limit, 2);
    }

    #[test]
    fn shrink_capacity_never_drops_below_inflight_nor_grows() {
        let now = t0();
        let d = now + Duration::from_secs(1);
        let mut pool = AdmissionPool::new(&[8], 10);
        for i in 0..3 {
            assert!(matches!(pool.acquire(now, d, i), Acquire::Admitted(_)));
        }
        assert_eq!(pool.shrink_capacity(BackendId(0), 0, now), 3);
        assert_eq!(pool.shrink_capacity(BackendId(0), 6, now), 3, "never grows");
        assert!(matches!(pool.acquire(now, d, 9), Acquire::Queued(_)));
        let _ = pool.release(BackendId(0), now);
        assert_eq!(
            pool.shrink_capacity(BackendId(0), 0, now),
            3,
            "the waiter took the slot"
        );
    }

    #[test]
    fn requeued_requests_go_first_in_the_order_they_were_requeued() {
        // Found by fuzzing: requeue tickets counted down, so the last requeued went first.
        let now = t0();
        let d = now + Duration::from_secs(10);
        let mut pool: AdmissionPool<u32> = AdmissionPool::new(&[1], 10);
        assert!(matches!(pool.acquire(now, d, 0), Acquire::Admitted(_)));
        assert!(matches!(pool.acquire(now, d, 1), Acquire::Queued(_)));
        assert!(matches!(pool.requeue(now, d, 2), Acquire::Queued(_)));
        assert!(matches!(pool.requeue(now, d, 3), Acquire::Queued(_)));
        let mut order = Vec::new();
        for _ in 0..3 {
            let grants = pool.release(BackendId(0), now);
            order.extend(grants.into_iter().map(|g| g.waiter));
        }
        assert_eq!(order, vec![2, 3, 1]);
    }

    #[test]
    fn probe_never_takes_a_slot_beyond_the_cap() {
        // Found by fuzzing: with every slot reserved (a new process during an upgrade hand-over)
        // a probe used to take one anyway, one above the cap across both processes.
        let now = t0();
        let mut pool: AdmissionPool<()> = AdmissionPool::new(&[2], 1);
        let _ = pool.set_reserved(BackendId(0), 2, now);
        assert!(
            !pool.acquire_probe(BackendId(0), now),
            "no free slot under the cap"
        );
        let _ = pool.set_reserved(BackendId(0), 1, now);
        assert!(pool.acquire_probe(BackendId(0), now));
        assert!(!pool.acquire_probe(BackendId(0), now));
    }

    #[test]
    fn probe_takes_a_slot_on_a_down_backend() {
        let now = t0();
        let mut pool: AdmissionPool<()> = AdmissionPool::new(&[1], 1);
        let _ = pool.set_state(BackendId(0), BackendState::Down, now);
        assert!(pool.acquire_probe(BackendId(0), now));
        assert!(
            !pool.acquire_probe(BackendId(0), now),
            "probes respect the cap too"
        );
        let _ = pool.release(BackendId(0), now);
        assert_eq!(pool.inflight(BackendId(0)), 0);
    }

    #[test]
    fn an_answer_after_a_stall_collapses_the_limit_before_it_frees_a_slot() {
        // Every slot taken, no answer for longer than the stall time, and no timer tick in
        // between: the first answer to come (at the end of a lock-up) must not hand its slot
        // to a waiter at the old limit.
        let now = t0();
        let mut policy = BackendPolicy::limit(4);
        policy.learn = Some(LatencyLimitConfig {
            adaptive: true,
            initial: 4,
            ..LatencyLimitConfig::new(4)
        });
        let mut pool: AdmissionPool<u32> = AdmissionPool::with_policies(&[policy], 10, now);
        for _ in 0..4 {
            assert!(matches!(
                pool.acquire(now, now + Duration::from_secs(60), 0),
                Acquire::Admitted(_)
            ));
        }
        let waiting = pool.acquire(now, now + Duration::from_secs(60), 1);
        assert!(matches!(waiting, Acquire::Queued(_)));
        // The admission timer looks (every slot taken from now on), and not again before the
        // answer.
        assert!(pool.poll(now).is_empty());
        let later = now + Duration::from_millis(2500);
        let grants = pool.record(BackendId(0), Sample::Ok(Duration::from_millis(2500)), later);
        assert!(grants.is_empty());
        assert_eq!(pool.snapshot(later).backends[0].effective_limit, 1);
        let grants = pool.release(BackendId(0), later);
        assert!(
            grants.is_empty(),
            "3 still in flight, above the collapsed limit"
        );
    }

    #[test]
    fn a_collapsed_learned_limit_never_blocks_the_probe_of_a_down_backend() {
        // A backend that stopped answering: its learned limit collapsed to 1, and one slot is
        // still taken (a request on its way out). Down, it must still be probed up to the cap,
        // or nothing would ever bring it back.
        let now = t0();
        let mut policy = BackendPolicy::limit(4);
        policy.learn = Some(LatencyLimitConfig::new(4));
        let mut pool: AdmissionPool<()> = AdmissionPool::with_policies(&[policy], 1, now);
        for _ in 0..3 {
            let _ = pool.record(BackendId(0), Sample::Lost, now);
        }
        assert_eq!(pool.snapshot(now).backends[0].effective_limit, 1);
        assert!(matches!(
            pool.acquire(now, now + Duration::from_secs(1), ()),
            Acquire::Admitted(_)
        ));
        assert!(
            !pool.acquire_probe(BackendId(0), now),
            "up: the busy slot means the backend is serving"
        );
        let _ = pool.set_state(BackendId(0), BackendState::Down, now);
        assert!(
            pool.acquire_probe(BackendId(0), now),
            "down: probed within the cap"
        );
        assert!(pool.acquire_probe(BackendId(0), now));
        assert!(pool.acquire_probe(BackendId(0), now));
        assert!(
            !pool.acquire_probe(BackendId(0), now),
            "never beyond the cap"
        );
    }

    #[test]
    fn an_outcome_brings_every_backend_to_now_before_admitting() {
        // Found by the shared model: `record` brought only the backend it was about to `now`,
        // so a waiter stayed queued although time had raised another backend's learned limit.
        let now = t0();
        let mut learning = BackendPolicy::limit(4);
        learning.learn = Some(LatencyLimitConfig {
            initial: 1,
            duration: Duration::from_secs(2),
            stall: Duration::from_secs(10),
            ..LatencyLimitConfig::new(4)
        });
        let policies = [BackendPolicy::limit(0), learning];
        let mut pool: AdmissionPool<u32> = AdmissionPool::with_policies(&policies, 10, now);
        let d = now + Duration::from_secs(60);
        assert_eq!(pool.acquire(now, d, 0), Acquire::Admitted(BackendId(1)));
        assert!(matches!(pool.acquire(now, d, 1), Acquire::Queued(_)));
        let later = now + Duration::from_secs(2);
        let grants = pool.record(BackendId(0), Sample::Ok(Duration::from_millis(1)), later);
        assert_eq!(
            grants
                .iter()
                .map(|g| (g.waiter, g.backend))
                .collect::<Vec<_>>(),
            vec![(1, BackendId(1))],
            "the clock ramp reached the full limit"
        );
    }

    mod properties {
        //! Property tests: random scenarios run through the shared model ([`crate::pool::model`]),
        //! the same one the fuzz target runs.
        use crate::pool::model::{self, strategy, Scenario};
        use proptest::prelude::*;

        proptest! {
            /// Random sequences of every operation on random backends: the pool agrees with the
            /// reference model after every step (counts, cap, order, queue bound, tickets,
            /// deadlines, rate, snapshot; see the model's documentation).
            #[test]
            fn pool_agrees_with_the_model(scenario in strategy::scenario(300)) {
                model::run(&scenario, std::time::Instant::now());
            }

            /// Any bytes, decoded as the fuzz target decodes its input, run clean.
            #[test]
            fn decoded_bytes_agree_with_the_model(
                bytes in proptest::collection::vec(any::<u8>(), 0..1500),
            ) {
                model::run(&Scenario::decode(&bytes), std::time::Instant::now());
            }
        }
    }
}
