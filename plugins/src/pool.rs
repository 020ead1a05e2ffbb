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
//! Invariant (checked by the property tests at the bottom of this file): after every operation,
//! each backend's in-flight count is at most its limit, unless the limit was lowered below the
//! work already in flight, in which case nothing more is admitted until it drains below the new
//! limit.

use std::collections::BTreeMap;
use std::time::Instant;

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
    inflight: u32,
    state: BackendState,
}

impl Slot {
    fn free(&self) -> u32 {
        match self.state {
            BackendState::Up => self.limit.saturating_sub(self.inflight),
            BackendState::Down | BackendState::Draining => 0,
        }
    }
}

#[derive(Debug)]
struct Waiter<W> {
    deadline: Instant,
    value: W,
}

/// Read-only view of one backend, for status output and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendSnapshot {
    /// The current concurrency limit.
    pub limit: u32,
    /// Requests admitted to this backend and not yet released.
    pub inflight: u32,
    /// Whether it takes new requests.
    pub state: BackendState,
}

/// Read-only view of the whole pool.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl<W> AdmissionPool<W> {
    /// A pool with one backend per entry of `limits` (all [`BackendState::Up`]) and a queue
    /// holding at most `max_queue` waiters (0 means: reject whenever no slot is free).
    pub fn new(limits: &[u32], max_queue: usize) -> Self {
        AdmissionPool {
            slots: limits
                .iter()
                .map(|&limit| Slot {
                    limit,
                    inflight: 0,
                    state: BackendState::Up,
                })
                .collect(),
            queue: BTreeMap::new(),
            max_queue,
            next_ticket: 0,
        }
    }

    /// Admit a request now, queue it until `deadline`, or refuse it.
    ///
    /// A request is admitted at once only if nobody is queued (FIFO: no overtaking) and some
    /// backend that is up has a free slot; it goes to the backend with the most free slots.
    pub fn acquire(&mut self, _now: Instant, deadline: Instant, waiter: W) -> Acquire {
        if self.queue.is_empty() {
            if let Some(backend) = self.pick() {
                self.slots[backend.0].inflight += 1;
                return Acquire::Admitted(backend);
            }
        }
        if self.queue.len() >= self.max_queue {
            return Acquire::Rejected(QueueFull);
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.queue.insert(
            ticket,
            Waiter {
                deadline,
                value: waiter,
            },
        );
        Acquire::Queued(ticket)
    }

    /// Give back a slot of `backend` and admit queued waiters into the capacity now free.
    ///
    /// Releasing a backend with nothing in flight is a caller bug; it is ignored rather than
    /// allowed to corrupt the count.
    pub fn release(&mut self, backend: BackendId, now: Instant) -> Vec<Grant<W>> {
        if let Some(slot) = self.slots.get_mut(backend.0) {
            debug_assert!(slot.inflight > 0, "release without a matching admit");
            slot.inflight = slot.inflight.saturating_sub(1);
        }
        self.dispatch(now)
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
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.limit = limit;
        }
        self.dispatch(now)
    }

    /// Change whether a backend takes new requests. In-flight requests are not affected.
    pub fn set_state(
        &mut self,
        backend: BackendId,
        state: BackendState,
        now: Instant,
    ) -> Vec<Grant<W>> {
        if let Some(slot) = self.slots.get_mut(backend.0) {
            slot.state = state;
        }
        self.dispatch(now)
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
    pub fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            backends: self
                .slots
                .iter()
                .map(|s| BackendSnapshot {
                    limit: s.limit,
                    inflight: s.inflight,
                    state: s.state,
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

    /// The backend that is up and has the most free slots (lowest index on a tie).
    fn pick(&self) -> Option<BackendId> {
        let mut best: Option<(usize, u32)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let free = slot.free();
            if free > 0 && best.is_none_or(|(_, f)| free > f) {
                best = Some((i, free));
            }
        }
        best.map(|(i, _)| BackendId(i))
    }

    /// Admit waiters from the head of the queue while some backend has a free slot.
    fn dispatch(&mut self, _now: Instant) -> Vec<Grant<W>> {
        let mut grants = Vec::new();
        while !self.queue.is_empty() {
            let Some(backend) = self.pick() else { break };
            let Some((ticket, waiter)) = self.queue.pop_first() else {
                break;
            };
            self.slots[backend.0].inflight += 1;
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
    use std::time::Duration;

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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Arrive,
            Complete(usize),
            Abort(usize),
            Tick(u64),
            SetLimit(usize, u32),
            SetState(usize, u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Arrive),
                3 => any::<usize>().prop_map(Op::Complete),
                2 => any::<usize>().prop_map(Op::Abort),
                1 => (0u64..200).prop_map(Op::Tick),
                1 => (any::<usize>(), 0u32..6).prop_map(|(b, l)| Op::SetLimit(b, l)),
                1 => (any::<usize>(), 0u8..3).prop_map(|(b, s)| Op::SetState(b, s)),
            ]
        }

        proptest! {
            /// Random arrive / complete / abort / timeout / limit / state sequences: no backend
            /// ever gets more new work than its limit, every slot is released exactly once, and
            /// waiters are admitted strictly in arrival order.
            #[test]
            fn cap_fifo_and_no_leaks(
                limits in proptest::collection::vec(0u32..5, 1..4),
                max_queue in 0usize..8,
                ops in proptest::collection::vec(op(), 1..300),
            ) {
                let start = Instant::now();
                let mut now = start;
                let mut pool: AdmissionPool<u64> = AdmissionPool::new(&limits, max_queue);
                let mut limits = limits;
                // Requests holding a slot: (id, backend).
                let mut running: Vec<(u64, BackendId)> = Vec::new();
                // Queued requests: (id, ticket).
                let mut waiting: Vec<(u64, Ticket)> = Vec::new();
                let mut last_admitted_waiter: Option<u64> = None;
                let mut next_id = 0u64;
                let timeout = std::time::Duration::from_millis(100);

                let admit_grants = |grants: Vec<Grant<u64>>,
                                        running: &mut Vec<(u64, BackendId)>,
                                        waiting: &mut Vec<(u64, Ticket)>,
                                        last: &mut Option<u64>|
                 -> Result<(), TestCaseError> {
                    for g in grants {
                        prop_assert!(last.is_none_or(|l| g.waiter > l), "FIFO violated");
                        *last = Some(g.waiter);
                        waiting.retain(|(id, _)| *id != g.waiter);
                        running.push((g.waiter, g.backend));
                    }
                    Ok(())
                };

                for op in ops {
                    let before: Vec<u32> =
                        (0..pool.backends()).map(|b| pool.inflight(BackendId(b))).collect();
                    match op {
                        Op::Arrive => {
                            let id = next_id;
                            next_id += 1;
                            match pool.acquire(now, now + timeout, id) {
                                Acquire::Admitted(b) => {
                                    prop_assert!(waiting.is_empty(), "overtook a waiter");
                                    running.push((id, b));
                                }
                                Acquire::Queued(t) => waiting.push((id, t)),
                                Acquire::Rejected(QueueFull) => {
                                    prop_assert_eq!(waiting.len(), max_queue);
                                }
                            }
                        }
                        Op::Complete(i) if !running.is_empty() => {
                            let (_, b) = running.remove(i % running.len());
                            let g = pool.release(b, now);
                            admit_grants(g, &mut running, &mut waiting, &mut last_admitted_waiter)?;
                        }
                        Op::Abort(i) if !waiting.is_empty() => {
                            let (id, t) = waiting.remove(i % waiting.len());
                            prop_assert_eq!(pool.cancel(t), Some(id));
                        }
                        Op::Tick(ms) => {
                            now += std::time::Duration::from_millis(ms);
                            for (_, id) in pool.expire(now) {
                                prop_assert!(waiting.iter().any(|(w, _)| *w == id));
                                waiting.retain(|(w, _)| *w != id);
                            }
                        }
                        Op::SetLimit(b, l) => {
                            let b = b % limits.len();
                            limits[b] = l;
                            let g = pool.set_limit(BackendId(b), l, now);
                            admit_grants(g, &mut running, &mut waiting, &mut last_admitted_waiter)?;
                        }
                        Op::SetState(b, s) => {
                            let b = b % limits.len();
                            let state = [BackendState::Up, BackendState::Down, BackendState::Draining][s as usize];
                            let g = pool.set_state(BackendId(b), state, now);
                            admit_grants(g, &mut running, &mut waiting, &mut last_admitted_waiter)?;
                        }
                        _ => {}
                    }
                    // The pool's counts match the model exactly (no leaked or double-freed slot).
                    for (b, &limit) in limits.iter().enumerate() {
                        let model = running.iter().filter(|(_, rb)| rb.0 == b).count() as u32;
                        let inflight = pool.inflight(BackendId(b));
                        prop_assert_eq!(inflight, model);
                        // A backend only grows while it is within its limit.
                        if inflight > before[b] {
                            prop_assert!(inflight <= limit, "backend {} above its limit", b);
                        }
                    }
                    prop_assert_eq!(pool.queued(), waiting.len());
                    prop_assert!(pool.queued() <= max_queue.max(waiting.len()));
                }
            }
        }
    }
}
