//! One model of the admission pool, shared by the property test (`pool::tests::properties`)
//! and the fuzz target (`tests/fuzz/fuzz_targets/pool_ops.rs`).
//!
//! A [`Scenario`] is a few backends ([`Shape`]s), a queue bound and a sequence of [`Op`]s: every
//! call the proxy makes on an [`AdmissionPool`] (arrivals, completions, requeues, waiters leaving
//! or cancelling too late, time passing, expiry, timer polls, limit, state, share and reserved
//! changes, capacity hand-over, queue bound changes, health probes, outcomes, ramp restarts;
//! not yet the hot-reload calls `set_policy` and `add_backend`).
//! [`run`] applies them one by one to a real pool and to a simple reference model of it (who
//! holds a slot, who waits in which order, each backend's limit, share, reserved slots and
//! state), and checks after every step:
//!
//! - **counts**: each backend's in-flight count equals the model's requests plus probes (no slot
//!   leaked or freed twice), and the queue holds exactly the model's waiters;
//! - **cap**: a backend's in-flight count grows only while within its limit, its cluster share
//!   and its capacity (limit and share less reserved slots); probes included;
//! - **order**: every grant goes to the head of the model's queue (requeued waiters first, in
//!   the order they were requeued, then the others in arrival order), under the ticket it was
//!   queued with, each exactly once, never after leaving or expiring; an arrival is admitted at
//!   once only when nobody waits;
//! - **choice**: an arrival or a requeue is admitted exactly when nobody waits and some backend
//!   can take it (up, a slot free under its effective limit, a token), and then to the one with
//!   the most free slots, the lowest index on a tie (the model reads effective limits and tokens
//!   from the pool's snapshot, taken at the same instant just before the call);
//! - **state**: no request (as opposed to a probe) is admitted to a backend that is not up; a
//!   probe is taken exactly when a slot is free under the backend's effective limit while it is
//!   up, under its capacity while it is down or draining;
//! - **work conservation**: right after the pool admitted what it could, no backend could take
//!   the head of a non-empty queue, and the next wake-up is not in the past;
//! - **queue bound**: an arrival is queued only while fewer than `max_queue` wait and rejected
//!   only when at least that many do; requeues are never rejected; normal waiters never
//!   outnumber the bound (waiters beyond a lowered bound only drain);
//! - **tickets**: never issued twice; cancelling one no longer queued returns nothing;
//! - **deadlines**: expiry removes exactly the waiters due, in serving order;
//!   `next_deadline` is the earliest one left; `next_wakeup` is `None` when nobody waits;
//! - **rate**: a backend with a rate never admits more than `burst + rate × elapsed`;
//! - **hand-over**: `shrink_capacity` returns the smaller of the capacity and the work in flight
//!   plus the extra, and leaves exactly that capacity;
//! - **snapshot**: the pool's snapshot agrees with the model (limits, shares, reserved slots,
//!   states, counts), and no effective limit exceeds the capacity;
//! - **plain backends** (no rate, ramp or learned limit), whose admission the model predicts
//!   from its own counts: nobody waits while a plain backend that is up has a free slot, their
//!   effective limit is their capacity, and in a pool of plain backends only, every grant from the
//!   queue goes to the backend with the most free slots and no wake-up is ever due.
//!
//! At the end every waiter leaves and every request and probe completes: the pool is empty.
//!
//! A violation panics with a message naming the step. The module reads no clock: the caller
//! passes the starting instant. It is compiled for the crate's tests and, behind the `model`
//! feature, for the fuzz target; production builds leave it out.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::adaptive::{LatencyLimitConfig, Sample};
use crate::pool::{
    Acquire, AdmissionPool, BackendId, BackendPolicy, BackendState, Grant, QueueFull, Ticket,
};
use crate::slow_start::SlowStartConfig;
use crate::token_bucket::RateLimit;

/// How long a request may wait in the queue (its deadline is its arrival plus this).
pub const QUEUE_TIMEOUT: Duration = Duration::from_millis(100);
/// Most backends [`Scenario::decode`] makes.
pub const MAX_BACKENDS: usize = 3;
/// Most operations [`Scenario::decode`] makes.
pub const MAX_OPS: usize = 512;

/// A backend's slow-start ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    /// The limit the ramp starts at (at least 1).
    pub initial: u32,
    /// Seconds to reach the full limit (at least 1).
    pub secs: u64,
    /// Whether the ramp is held by an error-rate and a latency gate (50 %, 100 ms).
    pub gated: bool,
}

/// A backend's learned limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learn {
    /// Adapt in steady service (the gradient), not only ramp.
    pub adaptive: bool,
    /// Where the latency ramp starts.
    pub initial: u32,
}

/// One backend of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Its concurrency limit.
    pub limit: u32,
    /// Optional rate: (requests per second, burst), each at least 1.
    pub rate: Option<(u32, u32)>,
    /// Optional slow-start ramp (ignored when `learn` is set, as in the pool).
    pub ramp: Option<Ramp>,
    /// Optional learned limit.
    pub learn: Option<Learn>,
}

impl Shape {
    /// A backend with a plain concurrency limit.
    pub fn plain(limit: u32) -> Self {
        Shape {
            limit,
            rate: None,
            ramp: None,
            learn: None,
        }
    }

    /// Whether admission to it depends on its counts alone (no rate, ramp or learned limit), so
    /// that the model can predict it exactly.
    pub fn is_plain(&self) -> bool {
        self.rate.is_none() && self.ramp.is_none() && self.learn.is_none()
    }

    /// The pool policy of this backend (out-of-range values raised to their minimum).
    pub fn policy(&self) -> BackendPolicy {
        BackendPolicy {
            max_inflight: self.limit,
            rate: self.rate.map(|(per_second, burst)| RateLimit {
                per_second: f64::from(per_second.max(1)),
                burst: burst.max(1),
            }),
            slow_start: self.ramp.map(|r| SlowStartConfig {
                initial: r.initial.max(1),
                duration: Duration::from_secs(r.secs.max(1)),
                max_error_rate: r.gated.then_some(0.5),
                max_latency: r.gated.then_some(Duration::from_millis(100)),
            }),
            learn: self.learn.map(|l| LatencyLimitConfig {
                adaptive: l.adaptive,
                initial: l.initial,
                stall: Duration::from_millis(500),
                duration: Duration::from_secs(2),
                ..LatencyLimitConfig::new(self.limit)
            }),
        }
    }
}

/// One call on the pool. Backend numbers are taken modulo the number of backends, and
/// positions modulo the length of the list they pick from; an operation whose list is empty
/// does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A request arrives (`acquire`, deadline `now + QUEUE_TIMEOUT`).
    Arrive,
    /// A running request completes (`release`).
    Complete(u16),
    /// A running request's connection was refused: its slot goes back (`release`) and it waits
    /// again ahead of the queue, keeping its deadline (`requeue`).
    Requeue(u16),
    /// A waiter gives up (`cancel` of a queued ticket).
    Leave(u16),
    /// A waiter gives up too late (`cancel` of a ticket no longer queued: granted, left or
    /// expired).
    LeaveLate(u16),
    /// Time passes (milliseconds) and no timer fires.
    Advance(u16),
    /// The queue timer fires (`expire`).
    Expire,
    /// The admission timer fires (`poll`).
    Poll,
    /// Time passes (milliseconds), then both timers fire (`expire`, `poll`).
    Tick(u16),
    /// A backend's limit changes (`set_limit`).
    SetLimit(u8, u32),
    /// A backend goes up, down or draining (`set_state`).
    SetState(u8, BackendState),
    /// A backend's cluster share changes (`set_share`).
    SetShare(u8, Option<u32>),
    /// A backend's reserved slots change (`set_reserved`).
    SetReserved(u8, u32),
    /// A backend's capacity is handed over down to its work in flight plus this
    /// (`shrink_capacity`).
    Shrink(u8, u32),
    /// The queue bound changes (`set_max_queue`).
    SetMaxQueue(u8),
    /// A health probe asks for a slot on a backend (`acquire_probe`).
    Probe(u8),
    /// A probe that got a slot finishes (`release`).
    ProbeDone(u16),
    /// What became of a request on a backend (`record`).
    Record(u8, Sample),
    /// The operator restarts a backend's ramp (`restart_ramp`).
    RestartRamp(u8),
}

/// How many kinds of [`Op`] there are (the decoder's tag range).
const OP_KINDS: u8 = 19;

/// Backends, a queue bound and what happens to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The backends, in [`BackendId`] order.
    pub shapes: Vec<Shape>,
    /// The queue bound at the start.
    pub max_queue: usize,
    /// The calls, in order.
    pub ops: Vec<Op>,
}

/// Reads a fuzzer's bytes; zeros once they run out.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn bit(byte: u8, n: u8) -> bool {
        byte & (1 << n) != 0
    }
}

impl Scenario {
    /// Decode any bytes into a scenario: 1 to [`MAX_BACKENDS`] backends (limits up to 7, rates
    /// of 1 to 50 per second with a burst of 1 to 4, ramps of 1 to 3 s, learned limits), a queue
    /// bound up to 15, then operations until the bytes run out or [`MAX_OPS`] are read (limits,
    /// shares and reserved slots up to 7, time steps up to 499 ms, latencies up to 65 s).
    pub fn decode(data: &[u8]) -> Self {
        let mut b = Bytes { data };
        let backends = usize::from(b.u8()) % MAX_BACKENDS + 1;
        let shapes = (0..backends)
            .map(|_| {
                let limit = u32::from(b.u8() % 8);
                let flags = b.u8();
                let rate = Bytes::bit(flags, 0)
                    .then(|| (u32::from(b.u8() % 50 + 1), u32::from(b.u8() % 4 + 1)));
                let ramp = Bytes::bit(flags, 1).then(|| Ramp {
                    initial: u32::from(b.u8() % 4 + 1),
                    secs: u64::from(b.u8() % 3 + 1),
                    gated: Bytes::bit(flags, 2),
                });
                let learn = Bytes::bit(flags, 3).then(|| Learn {
                    adaptive: Bytes::bit(flags, 4),
                    initial: u32::from(b.u8() % 8),
                });
                Shape {
                    limit,
                    rate,
                    ramp,
                    learn,
                }
            })
            .collect();
        let max_queue = usize::from(b.u8() % 16);
        let mut ops = Vec::new();
        while !b.is_empty() && ops.len() < MAX_OPS {
            let op = match b.u8() % OP_KINDS {
                0 => Op::Arrive,
                1 => Op::Complete(b.u16()),
                2 => Op::Requeue(b.u16()),
                3 => Op::Leave(b.u16()),
                4 => Op::LeaveLate(b.u16()),
                5 => Op::Advance(b.u16() % 500),
                6 => Op::Expire,
                7 => Op::Poll,
                8 => Op::Tick(b.u16() % 500),
                9 => Op::SetLimit(b.u8(), u32::from(b.u8() % 8)),
                10 => Op::SetState(b.u8(), state(b.u8())),
                11 => {
                    let backend = b.u8();
                    let share = b.u8();
                    Op::SetShare(
                        backend,
                        Bytes::bit(share, 7).then_some(u32::from(share % 8)),
                    )
                }
                12 => Op::SetReserved(b.u8(), u32::from(b.u8() % 8)),
                13 => Op::Shrink(b.u8(), u32::from(b.u8() % 8)),
                14 => Op::SetMaxQueue(b.u8() % 16),
                15 => Op::Probe(b.u8()),
                16 => Op::ProbeDone(b.u16()),
                17 => {
                    let backend = b.u8();
                    let kind = b.u8();
                    let latency = Duration::from_millis(u64::from(b.u16()));
                    let sample = match kind % 3 {
                        0 => Sample::Ok(latency),
                        1 => Sample::Failed(latency),
                        _ => Sample::Lost,
                    };
                    Op::Record(backend, sample)
                }
                _ => Op::RestartRamp(b.u8()),
            };
            ops.push(op);
        }
        Scenario {
            shapes,
            max_queue,
            ops,
        }
    }
}

/// Up, down or draining, from any byte.
fn state(byte: u8) -> BackendState {
    match byte % 3 {
        0 => BackendState::Up,
        1 => BackendState::Down,
        _ => BackendState::Draining,
    }
}

/// A request holding a slot.
#[derive(Debug)]
struct Running {
    id: u64,
    backend: BackendId,
    deadline: Instant,
}

/// A request in the queue.
#[derive(Debug)]
struct Waiting {
    id: u64,
    ticket: Ticket,
    deadline: Instant,
    requeued: bool,
}

/// The pool under test and the reference model it is checked against.
struct Driver {
    pool: AdmissionPool<u64>,
    shapes: Vec<Shape>,
    start: Instant,
    now: Instant,
    /// Step number and operation, for messages.
    step: usize,
    op: Op,
    /// Whether the step called the pool with something that admits what it can at `now`.
    dispatched: bool,
    limits: Vec<u32>,
    shares: Vec<Option<u32>>,
    reserved: Vec<u32>,
    states: Vec<BackendState>,
    max_queue: usize,
    /// Normal waiters may exceed `max_queue` only after it was lowered, and then only drain.
    normal_bound: usize,
    running: Vec<Running>,
    /// In the order they must be served: requeued waiters first.
    waiting: Vec<Waiting>,
    probes: Vec<BackendId>,
    /// Requests admitted to each backend, directly or from the queue (probes aside).
    admitted: Vec<u64>,
    issued: BTreeSet<Ticket>,
    /// Tickets no longer queued.
    gone: Vec<Ticket>,
    next_id: u64,
}

/// Run `scenario` against a real pool and the reference model, starting at `start`; panics on
/// the first broken invariant.
pub fn run(scenario: &Scenario, start: Instant) {
    let mut d = Driver::new(scenario, start);
    for (step, op) in scenario.ops.iter().enumerate() {
        d.step = step;
        d.op = op.clone();
        d.apply(op);
    }
    d.finish();
}

impl Driver {
    fn new(s: &Scenario, start: Instant) -> Self {
        let policies: Vec<BackendPolicy> = s.shapes.iter().map(Shape::policy).collect();
        let n = s.shapes.len();
        Driver {
            pool: AdmissionPool::with_policies(&policies, s.max_queue, start),
            shapes: s.shapes.clone(),
            start,
            now: start,
            step: 0,
            op: Op::Arrive,
            dispatched: false,
            limits: s.shapes.iter().map(|s| s.limit).collect(),
            shares: vec![None; n],
            reserved: vec![0; n],
            states: vec![BackendState::Up; n],
            max_queue: s.max_queue,
            normal_bound: s.max_queue,
            running: Vec::new(),
            waiting: Vec::new(),
            probes: Vec::new(),
            admitted: vec![0; n],
            issued: BTreeSet::new(),
            gone: Vec::new(),
            next_id: 0,
        }
    }

    /// "step N (op)", to prefix messages.
    fn at(&self) -> String {
        format!("step {} ({:?})", self.step, self.op)
    }

    fn backends(&self) -> usize {
        self.shapes.len()
    }

    /// The backend an operation names, if there is any backend.
    fn backend(&self, b: u8) -> Option<BackendId> {
        let n = self.backends();
        (n > 0).then(|| BackendId(usize::from(b) % n))
    }

    fn all_plain(&self) -> bool {
        self.shapes.iter().all(Shape::is_plain)
    }

    /// The model's in-flight count: requests and probes.
    fn inflight(&self, b: usize) -> u32 {
        let requests = self.running.iter().filter(|r| r.backend.0 == b).count();
        let probes = self.probes.iter().filter(|p| p.0 == b).count();
        u32::try_from(requests + probes).unwrap_or(u32::MAX)
    }

    /// The limit and share, less reserved slots.
    fn capacity(&self, b: usize) -> u32 {
        self.limits[b]
            .min(self.shares[b].unwrap_or(u32::MAX))
            .saturating_sub(self.reserved[b])
    }

    /// Free slots of a plain backend that is up (0 for any other).
    fn plain_free(&self, b: usize) -> u32 {
        if self.shapes[b].is_plain() && self.states[b] == BackendState::Up {
            self.capacity(b).saturating_sub(self.inflight(b))
        } else {
            0
        }
    }

    /// Where a pool of plain backends admits the next request: the most free slots, the lowest
    /// index on a tie.
    fn plain_pick(&self) -> Option<BackendId> {
        let mut best: Option<(usize, u32)> = None;
        for b in 0..self.backends() {
            let free = self.plain_free(b);
            if free > 0 && best.is_none_or(|(_, f)| free > f) {
                best = Some((b, free));
            }
        }
        best.map(|(b, _)| BackendId(b))
    }

    /// Where the pool must admit one request at `now`, read from its snapshot (which brings
    /// ramps and learned limits to `now` as the call will): among the backends that are up, have
    /// a slot free under their effective limit and a token, the one with the most free slots
    /// (the lowest index on a tie).
    fn snapshot_pick(&self) -> Option<BackendId> {
        let mut best: Option<(usize, u32)> = None;
        for (b, s) in self.pool.snapshot(self.now).backends.iter().enumerate() {
            let free = s.effective_limit.saturating_sub(s.inflight);
            let ready = s.state == BackendState::Up && free > 0 && s.tokens.is_none_or(|t| t > 0);
            if ready && best.is_none_or(|(_, f)| free > f) {
                best = Some((b, free));
            }
        }
        best.map(|(b, _)| BackendId(b))
    }

    /// Checks on a request admitted to `b` (directly or from the queue), then counts it.
    fn admitted_to(&mut self, b: BackendId) {
        let at = self.at();
        assert!(
            b.0 < self.backends(),
            "{at}: admitted to unknown backend {}",
            b.0
        );
        assert_eq!(
            self.states[b.0],
            BackendState::Up,
            "{at}: a request admitted to backend {} that is not up",
            b.0
        );
        if self.all_plain() {
            assert_eq!(
                Some(b),
                self.plain_pick(),
                "{at}: admitted to a backend other than the one with the most free slots"
            );
        }
        self.admitted[b.0] += 1;
    }

    fn new_ticket(&mut self, t: Ticket) {
        assert!(
            self.issued.insert(t),
            "{}: ticket {t:?} issued twice",
            self.at()
        );
    }

    /// Waiters admitted by the pool: each must be the head of the model's queue.
    fn grants(&mut self, grants: Vec<Grant<u64>>) {
        self.dispatched = true;
        for g in grants {
            let at = self.at();
            let Some(head) = self.waiting.first() else {
                panic!("{at}: grant to {} but nobody waits", g.waiter);
            };
            assert_eq!(
                (g.waiter, g.ticket),
                (head.id, head.ticket),
                "{at}: grant out of order (the head of the queue is {head:?})"
            );
            self.admitted_to(g.backend);
            let w = self.waiting.remove(0);
            self.gone.push(w.ticket);
            self.running.push(Running {
                id: w.id,
                backend: g.backend,
                deadline: w.deadline,
            });
        }
    }

    /// Checks on an arrival or requeue that was not admitted although nobody waited.
    fn not_admitted(&self) {
        if self.waiting.is_empty() {
            assert!(
                (0..self.backends()).all(|b| self.plain_free(b) == 0),
                "{}: not admitted while a plain backend had room",
                self.at()
            );
        }
    }

    fn apply(&mut self, op: &Op) {
        let before: Vec<u32> = (0..self.backends())
            .map(|b| self.pool.inflight(BackendId(b)))
            .collect();
        self.dispatched = false;
        match *op {
            Op::Arrive => self.arrive(),
            Op::Complete(i) => {
                if !self.running.is_empty() {
                    let r = self.running.remove(usize::from(i) % self.running.len());
                    let g = self.pool.release(r.backend, self.now);
                    self.grants(g);
                }
            }
            Op::Requeue(i) => self.requeue(i),
            Op::Leave(i) => {
                if !self.waiting.is_empty() {
                    let w = self.waiting.remove(usize::from(i) % self.waiting.len());
                    assert_eq!(
                        self.pool.cancel(w.ticket),
                        Some(w.id),
                        "{}: a waiter could not leave",
                        self.at()
                    );
                    self.gone.push(w.ticket);
                }
            }
            Op::LeaveLate(i) => {
                if !self.gone.is_empty() {
                    let t = self.gone[usize::from(i) % self.gone.len()];
                    assert_eq!(
                        self.pool.cancel(t),
                        None,
                        "{}: ticket {t:?} was still queued",
                        self.at()
                    );
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(u64::from(ms)),
            Op::Expire => self.expire(),
            Op::Poll => {
                let g = self.pool.poll(self.now);
                self.grants(g);
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.expire();
                let g = self.pool.poll(self.now);
                self.grants(g);
            }
            Op::SetLimit(b, limit) => {
                if let Some(b) = self.backend(b) {
                    self.limits[b.0] = limit;
                    let g = self.pool.set_limit(b, limit, self.now);
                    self.grants(g);
                }
            }
            Op::SetState(b, state) => {
                if let Some(b) = self.backend(b) {
                    self.states[b.0] = state;
                    let g = self.pool.set_state(b, state, self.now);
                    self.grants(g);
                }
            }
            Op::SetShare(b, share) => {
                if let Some(b) = self.backend(b) {
                    self.shares[b.0] = share;
                    let g = self.pool.set_share(b, share, self.now);
                    self.grants(g);
                }
            }
            Op::SetReserved(b, reserved) => {
                if let Some(b) = self.backend(b) {
                    self.reserved[b.0] = reserved;
                    let g = self.pool.set_reserved(b, reserved, self.now);
                    self.grants(g);
                }
            }
            Op::Shrink(b, extra) => self.shrink(b, extra),
            Op::SetMaxQueue(n) => {
                self.max_queue = usize::from(n);
                self.pool.set_max_queue(self.max_queue);
            }
            Op::Probe(b) => self.probe(b),
            Op::ProbeDone(i) => {
                if !self.probes.is_empty() {
                    let b = self.probes.remove(usize::from(i) % self.probes.len());
                    let g = self.pool.release(b, self.now);
                    self.grants(g);
                }
            }
            Op::Record(b, sample) => {
                if let Some(b) = self.backend(b) {
                    let g = self.pool.record(b, sample, self.now);
                    self.grants(g);
                }
            }
            Op::RestartRamp(b) => {
                if let Some(b) = self.backend(b) {
                    self.pool.restart_ramp(b, self.now);
                }
            }
        }
        self.check(&before);
    }

    /// An arrival or a requeue (`what`) was admitted exactly as `expected` (when nobody waits,
    /// to the backend with the most free slots), overtook no waiter, and is counted on its
    /// backend.
    fn check_choice(&mut self, got: &Acquire, expected: Option<BackendId>, what: &str) {
        let admitted = match got {
            Acquire::Admitted(b) => Some(*b),
            _ => None,
        };
        assert_eq!(
            admitted,
            expected,
            "{}: {what} admitted elsewhere than to the backend with the most free slots",
            self.at()
        );
        if let Some(b) = admitted {
            assert!(
                self.waiting.is_empty(),
                "{}: {what} overtook a waiter",
                self.at()
            );
            self.admitted_to(b);
        }
    }

    fn arrive(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = self.now + QUEUE_TIMEOUT;
        let expected = self.snapshot_pick().filter(|_| self.waiting.is_empty());
        let got = self.pool.acquire(self.now, deadline, id);
        self.check_choice(&got, expected, "an arrival");
        match got {
            Acquire::Admitted(b) => {
                self.running.push(Running {
                    id,
                    backend: b,
                    deadline,
                });
            }
            Acquire::Queued(ticket) => {
                assert!(
                    self.waiting.len() < self.max_queue,
                    "{}: queued past the bound",
                    self.at()
                );
                self.not_admitted();
                self.new_ticket(ticket);
                self.waiting.push(Waiting {
                    id,
                    ticket,
                    deadline,
                    requeued: false,
                });
            }
            Acquire::Rejected(QueueFull) => {
                // The bound counts every waiter, requeued ones included.
                assert!(
                    self.waiting.len() >= self.max_queue,
                    "{}: rejected below the bound",
                    self.at()
                );
                self.not_admitted();
            }
        }
    }

    fn requeue(&mut self, i: u16) {
        if self.running.is_empty() {
            return;
        }
        let r = self.running.remove(usize::from(i) % self.running.len());
        let g = self.pool.release(r.backend, self.now);
        self.grants(g);
        let expected = self.snapshot_pick().filter(|_| self.waiting.is_empty());
        let got = self.pool.requeue(self.now, r.deadline, r.id);
        self.check_choice(&got, expected, "a requeue");
        match got {
            Acquire::Admitted(b) => {
                self.running.push(Running { backend: b, ..r });
            }
            Acquire::Queued(ticket) => {
                self.not_admitted();
                self.new_ticket(ticket);
                let at = self.waiting.iter().take_while(|w| w.requeued).count();
                self.waiting.insert(
                    at,
                    Waiting {
                        id: r.id,
                        ticket,
                        deadline: r.deadline,
                        requeued: true,
                    },
                );
            }
            Acquire::Rejected(QueueFull) => panic!("{}: a requeue was rejected", self.at()),
        }
    }

    fn expire(&mut self) {
        let expired = self.pool.expire(self.now);
        let mut last: Option<usize> = None;
        let mut due = Vec::new();
        for (ticket, id) in expired {
            let at = self.at();
            let Some(pos) = self.waiting.iter().position(|w| w.ticket == ticket) else {
                panic!("{at}: expired {ticket:?}, which was not waiting");
            };
            let w = &self.waiting[pos];
            assert_eq!(w.id, id, "{at}: expired {ticket:?} with another waiter");
            assert!(
                w.deadline <= self.now,
                "{at}: expired {id} before its deadline"
            );
            assert!(
                last.is_none_or(|l| pos > l),
                "{at}: expired out of serving order"
            );
            last = Some(pos);
            due.push(ticket);
        }
        self.waiting.retain(|w| !due.contains(&w.ticket));
        self.gone.extend(due);
        assert!(
            self.waiting.iter().all(|w| w.deadline > self.now),
            "{}: a waiter past its deadline was not expired",
            self.at()
        );
    }

    fn shrink(&mut self, b: u8, extra: u32) {
        let Some(b) = self.backend(b) else { return };
        let expected = self
            .capacity(b.0)
            .min(self.inflight(b.0).saturating_add(extra));
        let got = self.pool.shrink_capacity(b, extra, self.now);
        assert_eq!(got, expected, "{}: shrink_capacity", self.at());
        let whole = self.limits[b.0].min(self.shares[b.0].unwrap_or(u32::MAX));
        self.reserved[b.0] = whole - got;
        assert_eq!(
            self.capacity(b.0),
            got,
            "{}: capacity after shrinking",
            self.at()
        );
    }

    fn probe(&mut self, b: u8) {
        let Some(b) = self.backend(b) else { return };
        let bound = match self.states[b.0] {
            BackendState::Up => self
                .pool
                .snapshot(self.now)
                .backends
                .get(b.0)
                .map_or(0, |s| s.effective_limit),
            BackendState::Down | BackendState::Draining => self.capacity(b.0),
        };
        let room = self.inflight(b.0) < bound;
        let taken = self.pool.acquire_probe(b, self.now);
        assert_eq!(
            taken,
            room,
            "{}: probe of backend {} ({:?}) with {} in flight, bound {bound}",
            self.at(),
            b.0,
            self.states[b.0],
            self.inflight(b.0),
        );
        if taken {
            self.probes.push(b);
        }
    }

    /// The invariants that hold after every step.
    fn check(&mut self, before: &[u32]) {
        let at = self.at();
        let elapsed = self.now.duration_since(self.start).as_secs_f64();
        let snapshot = self.pool.snapshot(self.now);
        assert_eq!(snapshot.backends.len(), self.backends(), "{at}: backends");
        for (b, snap) in snapshot.backends.iter().enumerate() {
            let model = self.inflight(b);
            let inflight = self.pool.inflight(BackendId(b));
            assert_eq!(
                inflight, model,
                "{at}: backend {b}: pool and model disagree"
            );
            let (limit, share, capacity) = (self.limits[b], self.shares[b], self.capacity(b));
            if inflight > before[b] {
                assert!(
                    inflight <= limit,
                    "{at}: backend {b}: {inflight} in flight, limit {limit}"
                );
                assert!(
                    share.is_none_or(|s| inflight <= s),
                    "{at}: backend {b}: {inflight} in flight, share {share:?}"
                );
                assert!(
                    inflight <= capacity,
                    "{at}: backend {b}: {inflight} in flight, capacity {capacity}"
                );
            }
            if let Some((per_second, burst)) = self.shapes[b].rate {
                let bound = f64::from(burst.max(1)) + f64::from(per_second.max(1)) * elapsed;
                assert!(
                    self.admitted[b] as f64 <= bound + 1e-9,
                    "{at}: backend {b}: {} admitted, rate bound {bound}",
                    self.admitted[b]
                );
            }
            assert_eq!(
                (
                    snap.inflight,
                    snap.limit,
                    snap.reserved,
                    snap.share,
                    snap.state
                ),
                (inflight, limit, self.reserved[b], share, self.states[b]),
                "{at}: backend {b}: snapshot and model disagree"
            );
            assert!(
                snap.effective_limit <= capacity,
                "{at}: backend {b}: effective limit {} above capacity {capacity}",
                snap.effective_limit
            );
            if self.shapes[b].is_plain() {
                assert_eq!(
                    snap.effective_limit, capacity,
                    "{at}: backend {b}: a plain backend's effective limit"
                );
            }
        }

        assert_eq!(self.pool.queued(), self.waiting.len(), "{at}: queue length");
        assert_eq!(
            (snapshot.queued, snapshot.max_queue),
            (self.waiting.len(), self.max_queue),
            "{at}: snapshot of the queue"
        );
        let normal = self.waiting.iter().filter(|w| !w.requeued).count();
        assert!(
            normal <= self.normal_bound,
            "{at}: {normal} normal waiters, bound {}",
            self.normal_bound
        );
        self.normal_bound = self.max_queue.max(normal);

        assert_eq!(
            self.pool.next_deadline(),
            self.waiting.iter().map(|w| w.deadline).min(),
            "{at}: next_deadline"
        );
        let wakeup = self.pool.next_wakeup(self.now);
        if let Some(w) = wakeup {
            assert!(
                !self.waiting.is_empty(),
                "{at}: a wake-up with nobody waiting"
            );
            // Right after admitting what it could at `now`, the pool is not already due again
            // (after time passed with no dispatch, a past wake-up just means "due now").
            if self.dispatched {
                assert!(w >= self.now, "{at}: a wake-up in the past");
            }
        }
        if !self.waiting.is_empty() {
            for b in 0..self.backends() {
                assert_eq!(
                    self.plain_free(b),
                    0,
                    "{at}: backend {b} has room while {} wait",
                    self.waiting.len()
                );
            }
            if self.all_plain() {
                assert_eq!(wakeup, None, "{at}: a wake-up for plain backends");
            }
            if self.dispatched {
                assert_eq!(
                    self.snapshot_pick(),
                    None,
                    "{at}: a backend can take a request while {} wait",
                    self.waiting.len()
                );
            }
        }
    }

    /// Everything ends: waiters leave, requests and probes complete; nothing is left.
    fn finish(mut self) {
        self.op = Op::Leave(0);
        for w in std::mem::take(&mut self.waiting) {
            assert_eq!(self.pool.cancel(w.ticket), Some(w.id), "end: a waiter left");
        }
        for r in std::mem::take(&mut self.running) {
            let g = self.pool.release(r.backend, self.now);
            assert!(g.is_empty(), "end: a grant with nobody waiting");
        }
        for b in std::mem::take(&mut self.probes) {
            let g = self.pool.release(b, self.now);
            assert!(g.is_empty(), "end: a grant with nobody waiting");
        }
        for b in 0..self.backends() {
            assert_eq!(
                self.pool.inflight(BackendId(b)),
                0,
                "end: backend {b}: a slot leaked"
            );
        }
        assert_eq!(self.pool.queued(), 0, "end: the queue is empty");
        assert_eq!(self.pool.next_deadline(), None, "end: no deadline");
        assert_eq!(self.pool.next_wakeup(self.now), None, "end: no wake-up");
    }
}

/// Proptest strategies for scenarios (the crate's tests only).
#[cfg(test)]
pub(crate) mod strategy {
    use proptest::prelude::*;

    use super::{Learn, Op, Ramp, Scenario, Shape, MAX_BACKENDS};
    use crate::adaptive::Sample;
    use crate::pool::BackendState;
    use std::time::Duration;

    fn backend_state() -> impl Strategy<Value = BackendState> {
        prop_oneof![
            Just(BackendState::Up),
            Just(BackendState::Down),
            Just(BackendState::Draining),
        ]
    }

    fn sample() -> impl Strategy<Value = Sample> {
        prop_oneof![
            (0u64..300).prop_map(|ms| Sample::Ok(Duration::from_millis(ms))),
            (0u64..300).prop_map(|ms| Sample::Failed(Duration::from_millis(ms))),
            Just(Sample::Lost),
        ]
    }

    /// Any operation, the common ones more often.
    pub(crate) fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Arrive),
            4 => any::<u16>().prop_map(Op::Complete),
            1 => any::<u16>().prop_map(Op::Requeue),
            2 => any::<u16>().prop_map(Op::Leave),
            1 => any::<u16>().prop_map(Op::LeaveLate),
            1 => (0u16..200).prop_map(Op::Advance),
            1 => Just(Op::Expire),
            1 => Just(Op::Poll),
            2 => (0u16..200).prop_map(Op::Tick),
            1 => (any::<u8>(), 0u32..8).prop_map(|(b, l)| Op::SetLimit(b, l)),
            1 => (any::<u8>(), backend_state()).prop_map(|(b, s)| Op::SetState(b, s)),
            1 => (any::<u8>(), proptest::option::of(0u32..8)).prop_map(|(b, s)| Op::SetShare(b, s)),
            1 => (any::<u8>(), 0u32..4).prop_map(|(b, r)| Op::SetReserved(b, r)),
            1 => (any::<u8>(), 0u32..4).prop_map(|(b, e)| Op::Shrink(b, e)),
            1 => (0u8..10).prop_map(Op::SetMaxQueue),
            1 => any::<u8>().prop_map(Op::Probe),
            1 => any::<u16>().prop_map(Op::ProbeDone),
            1 => (any::<u8>(), sample()).prop_map(|(b, s)| Op::Record(b, s)),
            1 => any::<u8>().prop_map(Op::RestartRamp),
        ]
    }

    /// A backend with any of a rate, a ramp and a learned limit.
    fn shape() -> impl Strategy<Value = Shape> {
        (
            0u32..6,
            proptest::option::of((1u32..50, 1u32..4)),
            proptest::option::of((1u32..4, 1u64..3, any::<bool>())),
            proptest::option::weighted(0.25, (any::<bool>(), 0u32..6)),
        )
            .prop_map(|(limit, rate, ramp, learn)| Shape {
                limit,
                rate,
                ramp: ramp.map(|(initial, secs, gated)| Ramp {
                    initial,
                    secs,
                    gated,
                }),
                learn: learn.map(|(adaptive, initial)| Learn { adaptive, initial }),
            })
    }

    /// 1 to 3 backends (a third of the time all plain, whose admission the model predicts
    /// exactly), a queue bound under 8, and up to `max_ops` operations.
    pub(crate) fn scenario(max_ops: usize) -> impl Strategy<Value = Scenario> {
        let shapes = prop_oneof![
            1 => proptest::collection::vec((0u32..6).prop_map(Shape::plain), 1..=MAX_BACKENDS),
            2 => proptest::collection::vec(shape(), 1..=MAX_BACKENDS),
        ];
        (
            shapes,
            0usize..8,
            proptest::collection::vec(op(), 1..max_ops),
        )
            .prop_map(|(shapes, max_queue, ops)| Scenario {
                shapes,
                max_queue,
                ops,
            })
    }
}
