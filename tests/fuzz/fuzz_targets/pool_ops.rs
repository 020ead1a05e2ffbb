//! Fuzz target: the admission policy under any sequence of events keeps its promises.
//!
//! The input decodes into 1 to 3 backends (limit, optional rate and slow-start ramp), a queue
//! bound, and up to 512 events: arrivals, completions, requeues (a refused connection gives
//! its slot back and waits again ahead of the queue), waiters leaving, time passing (with
//! deadlines expiring and timer wake-ups), limit changes, state changes (up, down, draining),
//! health probes, and outcomes recorded for the ramp's gate. After every event:
//! - the pool's in-flight count per backend equals the model's (no slot leaked or freed twice);
//! - a backend takes new work only while within its limit;
//! - the queue holds exactly the model's waiters, never more than its bound (requeued ones
//!   aside), and each grant goes to the head of the model's queue: requeued waiters first, in
//!   the order they were requeued, then the others in arrival order; each exactly once, never
//!   after leaving or expiring;
//! - a backend with a rate never admits more than `burst + rate × elapsed`.
//!
//! At the end every request completes and every waiter leaves: the pool is empty.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluice_plugins::adaptive::{LatencyLimitConfig, Sample};
use sluice_plugins::pool::BackendPolicy;
use sluice_plugins::slow_start::SlowStartConfig;
use sluice_plugins::token_bucket::RateLimit;
use sluice_plugins::{Acquire, AdmissionPool, BackendId, BackendState, Grant, Ticket};

#[derive(Debug, Arbitrary)]
struct Shape {
    limit: u8,
    rate: Option<(u8, u8)>,
    ramp: Option<(u8, u8)>,
    /// A learned limit instead of the clock ramp: (adaptive, initial).
    learn: Option<(bool, u8)>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Arrive,
    Complete(u16),
    Requeue(u16),
    Leave(u16),
    Tick(u16),
    SetLimit(u8, u8),
    SetState(u8, u8),
    Probe(u8),
    Record(u8, u8, u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    shapes: Vec<Shape>,
    max_queue: u8,
    ops: Vec<Op>,
}

fn policy(s: &Shape) -> BackendPolicy {
    BackendPolicy {
        max_inflight: u32::from(s.limit % 8),
        rate: s.rate.map(|(r, b)| RateLimit {
            per_second: f64::from(r % 50 + 1),
            burst: u32::from(b % 4 + 1),
        }),
        slow_start: s.ramp.map(|(i, secs)| SlowStartConfig {
            initial: u32::from(i % 4 + 1),
            duration: Duration::from_secs(u64::from(secs % 3 + 1)),
            max_error_rate: Some(0.5),
            max_latency: Some(Duration::from_millis(100)),
        }),
        learn: s.learn.map(|(adaptive, initial)| LatencyLimitConfig {
            adaptive,
            initial: u32::from(initial % 8),
            stall: Duration::from_millis(500),
            duration: Duration::from_secs(2),
            ..LatencyLimitConfig::new(u32::from(s.limit % 8))
        }),
    }
}

/// The model's view: who holds a slot, and who waits in which order (requeued first).
#[derive(Default)]
struct Model {
    running: Vec<(u64, BackendId)>,
    /// Waiters in the order they must be served: (id, ticket, requeued).
    waiting: Vec<(u64, Ticket, bool)>,
    admitted_to: Vec<u64>,
}

impl Model {
    fn grants(&mut self, grants: Vec<Grant<u64>>) {
        for g in grants {
            let head = self.waiting.first().map(|w| w.0);
            assert_eq!(
                Some(g.waiter),
                head,
                "grant to {} but the head of the queue is {head:?}",
                g.waiter
            );
            let _served = self.waiting.remove(0);
            self.running.push((g.waiter, g.backend));
            self.admitted_to[g.backend.0] += 1;
        }
    }

    fn queued(&self) -> usize {
        self.waiting.iter().filter(|w| !w.2).count()
    }
}

fuzz_target!(|input: Input| {
    let shapes: Vec<&Shape> = input.shapes.iter().take(3).collect();
    if shapes.is_empty() || input.ops.len() > 512 {
        return;
    }
    let start = Instant::now();
    let mut now = start;
    let policies: Vec<BackendPolicy> = shapes.iter().map(|s| policy(s)).collect();
    let max_queue = usize::from(input.max_queue % 16);
    let mut pool: AdmissionPool<u64> = AdmissionPool::with_policies(&policies, max_queue, now);
    let mut limits: Vec<u32> = policies.iter().map(|p| p.max_inflight).collect();
    let mut m = Model {
        admitted_to: vec![0; limits.len()],
        ..Model::default()
    };
    let mut probes: Vec<BackendId> = Vec::new();
    let mut next_id = 0u64;
    let timeout = Duration::from_millis(100);

    for op in &input.ops {
        let before: Vec<u32> = (0..limits.len())
            .map(|b| pool.inflight(BackendId(b)))
            .collect();
        match *op {
            Op::Arrive => {
                let id = next_id;
                next_id += 1;
                match pool.acquire(now, now + timeout, id) {
                    Acquire::Admitted(b) => {
                        assert!(m.waiting.is_empty(), "an arrival overtook a waiter");
                        m.running.push((id, b));
                        m.admitted_to[b.0] += 1;
                    }
                    Acquire::Queued(t) => {
                        assert!(m.waiting.len() < max_queue, "queued past the bound");
                        m.waiting.push((id, t, false));
                    }
                    // The bound counts every waiter, requeued ones included.
                    Acquire::Rejected(_) => assert!(m.waiting.len() >= max_queue),
                }
            }
            Op::Complete(i) if !m.running.is_empty() => {
                let (_, b) = m.running.remove(usize::from(i) % m.running.len());
                let g = pool.release(b, now);
                m.grants(g);
            }
            Op::Requeue(i) if !m.running.is_empty() => {
                // The connection was refused: the slot goes back, the request waits again.
                let (id, b) = m.running.remove(usize::from(i) % m.running.len());
                let g = pool.release(b, now);
                m.grants(g);
                match pool.requeue(now, now + timeout, id) {
                    Acquire::Admitted(b) => {
                        assert!(m.waiting.is_empty(), "a requeue overtook a waiter");
                        m.running.push((id, b));
                        m.admitted_to[b.0] += 1;
                    }
                    Acquire::Queued(t) => {
                        let at = m.waiting.iter().take_while(|w| w.2).count();
                        m.waiting.insert(at, (id, t, true));
                    }
                    Acquire::Rejected(_) => panic!("a requeue is never rejected"),
                }
            }
            Op::Leave(i) if !m.waiting.is_empty() => {
                let (id, t, _) = m.waiting.remove(usize::from(i) % m.waiting.len());
                assert_eq!(pool.cancel(t), Some(id));
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(u64::from(ms % 500));
                for (_, id) in pool.expire(now) {
                    let pos = m.waiting.iter().position(|w| w.0 == id);
                    assert!(pos.is_some(), "expired a waiter that was not waiting");
                    m.waiting.retain(|w| w.0 != id);
                }
                let g = pool.poll(now);
                m.grants(g);
                if let Some(w) = pool.next_wakeup(now) {
                    assert!(w >= now, "a wake-up in the past");
                }
            }
            Op::SetLimit(b, l) => {
                let b = usize::from(b) % limits.len();
                limits[b] = u32::from(l % 8);
                let g = pool.set_limit(BackendId(b), limits[b], now);
                m.grants(g);
            }
            Op::SetState(b, s) => {
                let b = usize::from(b) % limits.len();
                let state = [BackendState::Up, BackendState::Down, BackendState::Draining]
                    [usize::from(s % 3)];
                let g = pool.set_state(BackendId(b), state, now);
                m.grants(g);
            }
            Op::Probe(b) => {
                let b = BackendId(usize::from(b) % limits.len());
                if pool.acquire_probe(b, now) {
                    probes.push(b);
                }
            }
            Op::Record(b, kind, ms) => {
                let b = BackendId(usize::from(b) % limits.len());
                let latency = Duration::from_millis(u64::from(ms));
                let sample = match kind % 3 {
                    0 => Sample::Ok(latency),
                    1 => Sample::Failed(latency),
                    _ => Sample::Lost,
                };
                let g = pool.record(b, sample, now);
                m.grants(g);
            }
            _ => {}
        }
        for (b, &limit) in limits.iter().enumerate() {
            let model = m.running.iter().filter(|(_, rb)| rb.0 == b).count() as u32
                + probes.iter().filter(|p| p.0 == b).count() as u32;
            let inflight = pool.inflight(BackendId(b));
            assert_eq!(inflight, model, "backend {b}: pool and model disagree");
            if inflight > before[b] {
                assert!(
                    inflight <= limit,
                    "backend {b}: {inflight} in flight, limit {limit}"
                );
            }
            if let Some(r) = policies[b].rate {
                let elapsed = now.duration_since(start).as_secs_f64();
                let bound = f64::from(r.burst) + r.per_second * elapsed;
                assert!(
                    m.admitted_to[b] as f64 <= bound + 1e-9,
                    "backend {b}: {} admitted, rate bound {bound}",
                    m.admitted_to[b]
                );
            }
        }
        assert_eq!(pool.queued(), m.waiting.len());
        assert!(
            m.queued() <= max_queue,
            "the queue's bound holds for normal waiters"
        );
    }

    // Everything ends: requests complete, probes finish, waiters leave. Nothing is left.
    for (id, t, _) in std::mem::take(&mut m.waiting) {
        assert_eq!(pool.cancel(t), Some(id));
    }
    for (_, b) in std::mem::take(&mut m.running) {
        let g = pool.release(b, now);
        assert!(g.is_empty(), "nobody waits any more");
    }
    for b in probes {
        let _ = pool.release(b, now);
    }
    for b in 0..limits.len() {
        assert_eq!(pool.inflight(BackendId(b)), 0, "backend {b}: a slot leaked");
    }
    assert_eq!(pool.queued(), 0);
});
