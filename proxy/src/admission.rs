//! The async side of admission: waiting in the queue, holding a [`Permit`], and backend health.
//!
//! [`sluice_plugins::AdmissionPool`] decides; this module waits. The pool sits behind a mutex
//! (every critical section is a few counter updates). A queued request parks on a one-shot
//! channel that the pool's grants complete, and gives up at its deadline. A timer task
//! ([`Admission::run_timer`]) admits waiters whose turn comes from time alone: a token of the
//! rate limit, or a step of the slow-start ramp.
//!
//! Two RAII guards make slot accounting exact on every path:
//! - [`Permit`] holds one backend slot and releases it on drop, exactly once, whether the
//!   request succeeded, failed, was aborted, or its task was dropped by a panic or shutdown.
//! - `Waiting` (private) holds a place in the queue. If the waiting future is dropped (the
//!   client went away), it leaves the queue; if it had been granted a slot in the same instant,
//!   that slot is released rather than leaked.
//!
//! Backend state combines two inputs: the operator's drain/ready, and health (active checks
//! plus passive observations of real requests). A drained backend stays drained whatever its
//! health; a backend that turns healthy, or is made ready, restarts its slow-start ramp.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_plugins::adaptive::{LatencyLimitConfig, Sample};
use sluice_plugins::health::{DownCause, Expect, Health, Transition};
use sluice_plugins::pool::BackendPolicy;
use sluice_plugins::slow_start::SlowStartConfig;
use sluice_plugins::token_bucket::RateLimit;
use sluice_plugins::{
    Acquire, AdmissionPool, BackendId, BackendState, Grant, PoolSnapshot, Ticket,
};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::config::{Backend, Config};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `max_queue` requests were already waiting.
    QueueFull,
    /// The request waited `queue_timeout` without getting a slot.
    QueueTimeout,
    /// The request waited `queue_timeout` while no backend was up.
    BackendDown,
}

impl Shed {
    /// Short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
            Shed::BackendDown => "backend_down",
        }
    }
}

type Pool = AdmissionPool<oneshot::Sender<BackendId>>;

/// The pool policy for a configured backend.
pub fn policy(b: &Backend) -> BackendPolicy {
    BackendPolicy {
        max_inflight: b.max_inflight,
        rate: b
            .rate
            .map(|(per_second, burst)| RateLimit { per_second, burst }),
        slow_start: b.slow_start.map(|s| SlowStartConfig {
            initial: s.initial,
            duration: s.duration,
            max_error_rate: s.max_error_rate,
            max_latency: s.max_latency,
        }),
        learn: learn(b),
    }
}

/// The learned limit of a backend: with a latency ramp, or when the limit adapts in steady
/// service; `None` for a clock ramp (or no ramp) with a fixed cap.
fn learn(b: &Backend) -> Option<LatencyLimitConfig> {
    let ramp = b.slow_start.filter(|s| s.latency);
    if ramp.is_none() && !b.learning.adaptive {
        return None;
    }
    let defaults = LatencyLimitConfig::new(b.max_inflight);
    Some(LatencyLimitConfig {
        floor: b.learning.min_inflight,
        // Without a ramp the limit starts at the cap.
        initial: ramp.map_or(b.max_inflight, |s| s.initial),
        tolerance: ramp.map_or(crate::config::defaults::LATENCY_TOLERANCE, |s| s.tolerance),
        min_rise: ramp.map_or(crate::config::defaults::MIN_LATENCY_RISE, |s| {
            s.min_latency_rise
        }),
        max_error_rate: ramp
            .and_then(|s| s.max_error_rate)
            .unwrap_or(crate::config::defaults::LATENCY_MAX_ERROR_RATE),
        adaptive: b.learning.adaptive,
        duration: ramp.map_or(Duration::ZERO, |s| s.duration),
        ..defaults
    })
}

/// Health bookkeeping of one backend.
#[derive(Debug)]
struct BackendHealth {
    name: String,
    health: Health,
    drained: bool,
    passive_failures: u32,
    /// Times it went down, and came back up, by health (not by the operator).
    downs: u64,
    ups: u64,
    /// The last transition by health, as logged (e.g. `down: 3 passive failures in a row,
    /// last: connection refused`).
    last_transition: Option<String>,
}

impl BackendHealth {
    /// A backend that starts up and in service, with no history.
    fn new(name: String, rise: u32, fall: u32) -> Self {
        BackendHealth {
            name,
            health: Health::new(rise, fall),
            drained: false,
            passive_failures: 0,
            downs: 0,
            ups: 0,
            last_transition: None,
        }
    }
}

/// Shared admission state of one proxy: the pool and its queue, backend health.
#[derive(Debug)]
pub struct Admission {
    pool: Mutex<Pool>,
    backends: Mutex<Vec<BackendHealth>>,
    passive_threshold: u32,
    /// Whether some backend may have passive failures counted (set under the backends lock
    /// when one is counted, cleared once none is): an answer then need not take the lock to
    /// reset a count that is already zero.
    passive_counted: std::sync::atomic::AtomicBool,
    timer: Notify,
    /// When the admission timer next wakes by itself, as nanoseconds after `epoch`; written
    /// under the pool lock. A waiter queued with an earlier turn wakes it; others need not
    /// (one cross-thread wake-up per queued request was a tenth of the CPU under load).
    timer_until: std::sync::atomic::AtomicU64,
    /// The time base of `timer_until`.
    epoch: std::time::Instant,
    /// Times a queued waiter woke the timer.
    timer_wakes: std::sync::atomic::AtomicU64,
    /// Each backend's connection generation (see [`Admission::generation`]), bumped whenever
    /// the backend comes back into service; read by every request without the backends lock,
    /// replaced under that lock. A backend never bumped (or added since) has generation 0.
    generations: crate::snapshot::Snapshot<Vec<u64>>,
}

/// A backend's state as shown by status output.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    /// Configured name.
    pub name: String,
    /// Up, down or draining.
    pub state: BackendState,
    /// Health from checks (a drained backend may still be healthy).
    pub healthy: bool,
    /// Full limit.
    pub limit: u32,
    /// Limit in force now.
    pub effective_limit: u32,
    /// Requests in flight.
    pub inflight: u32,
    /// Ramp progress, 0.0 to 1.0.
    pub ramp: f64,
    /// Whether the ramp is held by its gate.
    pub ramp_gated: bool,
    /// Why the learned limit is where it is (`ramp`, `steady`, `collapsed`), if it learns.
    pub limit_phase: Option<&'static str>,
    /// The backend's baseline latency, once the learned limit has measured it.
    pub baseline: Option<Duration>,
    /// Tokens available, if rate-limited.
    pub tokens: Option<u32>,
    /// Times health took the backend down since start.
    pub downs: u64,
    /// Times health brought it back up since start.
    pub ups: u64,
    /// The last transition by health and why, as logged; `None` before the first.
    pub last_transition: Option<String>,
}

/// What one active health check (or recovery probe) saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The backend answered an HTTP check with this status.
    Answered(u16),
    /// A TCP check connected.
    Connected,
    /// No answer; why (connection refused, timed out...).
    Failed(String),
}

/// Why an operator command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No backend has that name.
    #[error("no backend named {0:?}")]
    UnknownBackend(String),
}

impl Admission {
    /// Admission for backends with these limits (no rate limit, no ramp, passive checks off).
    pub fn new(limits: &[u32], max_queue: usize) -> Arc<Self> {
        let policies: Vec<BackendPolicy> =
            limits.iter().map(|&l| BackendPolicy::limit(l)).collect();
        let names = (0..limits.len()).map(|i| format!("b{i}")).collect();
        Self::with_policies(&policies, names, max_queue, 0, 1, 1)
    }

    /// Admission for a validated config; slow-start ramps start now.
    pub fn from_config(cfg: &Config) -> Arc<Self> {
        let policies: Vec<BackendPolicy> = cfg.backends.iter().map(policy).collect();
        let names = cfg.backends.iter().map(|b| b.name.clone()).collect();
        Self::with_policies(
            &policies,
            names,
            cfg.max_queue,
            // Even with `check = "none"`: the health checker probes a backend that passive
            // failures took down until it answers again (see `crate::ops::health`).
            cfg.health.passive_failures,
            cfg.health.rise,
            cfg.health.fall,
        )
    }

    fn with_policies(
        policies: &[BackendPolicy],
        names: Vec<String>,
        max_queue: usize,
        passive_threshold: u32,
        rise: u32,
        fall: u32,
    ) -> Arc<Self> {
        Arc::new(Admission {
            pool: Mutex::new(AdmissionPool::with_policies(
                policies,
                max_queue,
                Instant::now().into_std(),
            )),
            backends: Mutex::new(
                names
                    .into_iter()
                    .map(|name| BackendHealth::new(name, rise, fall))
                    .collect(),
            ),
            passive_threshold,
            passive_counted: std::sync::atomic::AtomicBool::new(false),
            timer: Notify::new(),
            timer_until: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            timer_wakes: std::sync::atomic::AtomicU64::new(0),
            generations: crate::snapshot::Snapshot::new(Vec::new()),
        })
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding this lock cannot leave the counters half-updated (each pool
        // operation completes before returning), so a poisoned lock is still consistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backends(&self) -> MutexGuard<'_, Vec<BackendHealth>> {
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a slot on some backend, in FIFO order, for at most `timeout` (the request
    /// path's `admission.queue_timeout` is in [`crate::shared::Settings`]).
    ///
    /// Cancel-safe: dropping the returned future leaves the queue and leaks nothing.
    pub async fn acquire_within(self: &Arc<Self>, timeout: Duration) -> Result<Permit, Shed> {
        self.acquire_until(Instant::now() + timeout, false).await
    }

    /// Wait for a slot until `deadline`. With `requeue`, the request goes ahead of every
    /// normal waiter and is never refused for a full queue: it held its place once already and
    /// lost its slot before anything reached the backend (a refused connection).
    pub async fn acquire_until(
        self: &Arc<Self>,
        deadline: Instant,
        requeue: bool,
    ) -> Result<Permit, Shed> {
        self.acquire_from(Instant::now(), deadline, requeue).await
    }

    /// [`Admission::acquire_until`], for a caller that has just read the clock (`now`).
    pub async fn acquire_from(
        self: &Arc<Self>,
        now: Instant,
        deadline: Instant,
        requeue: bool,
    ) -> Result<Permit, Shed> {
        // The channel a grant comes through, made only if the request is queued.
        let mut rx = None;
        let (acquired, wake_timer) = {
            let mut pool = self.pool();
            let acquired = if requeue {
                let (tx, r) = oneshot::channel();
                rx = Some(r);
                pool.requeue(now.into_std(), deadline.into_std(), tx)
            } else {
                pool.acquire_with(now.into_std(), deadline.into_std(), || {
                    let (tx, r) = oneshot::channel();
                    rx = Some(r);
                    tx
                })
            };
            // Under the same lock as the timer's own `timer_until`.
            let wake = matches!(acquired, Acquire::Queued(_))
                && pool
                    .next_wakeup(now.into_std())
                    .is_some_and(|at| self.nanos(at) < self.timer_until.load(Ordering::Acquire));
            (acquired, wake)
        };
        let ticket = match acquired {
            Acquire::Admitted(backend) => return Ok(self.permit(backend, false)),
            Acquire::Rejected(_) => return Err(Shed::QueueFull),
            Acquire::Queued(ticket) => ticket,
        };
        // The waiter may be admitted by time alone (a token, a ramp step) before the timer
        // would wake by itself: wake it.
        if wake_timer {
            self.timer_wakes.fetch_add(1, Ordering::Relaxed);
            self.timer.notify_one();
        }
        let mut waiting = Waiting {
            admission: self,
            ticket,
            rx,
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
                None if self.any_up() => Err(Shed::QueueTimeout),
                None => Err(Shed::BackendDown),
            },
        }
    }

    /// Take a slot on `backend` for a health check, whatever its state, without queueing.
    /// `None` when the backend has no free slot (it is busy serving: the check can wait).
    pub fn acquire_probe(self: &Arc<Self>, backend: BackendId) -> Option<Permit> {
        let now = Instant::now().into_std();
        self.pool()
            .acquire_probe(backend, now)
            .then(|| self.permit(backend, false))
    }

    fn permit(self: &Arc<Self>, backend: BackendId, queued: bool) -> Permit {
        Permit {
            admission: self.clone(),
            backend,
            queued,
            hold: None,
            released: false,
        }
    }

    /// `at` as nanoseconds after `self.epoch` (0 before it).
    fn nanos(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Release one slot of `backend` and hand freed capacity to waiters, after recording the
    /// request's last `sample` (as [`Admission::record_outcome`] would), under the same lock.
    /// Returns the backend's limit in force after the release (read under that lock too).
    fn release(&self, backend: BackendId, sample: Option<Sample>) -> Option<LimitNow> {
        self.release_at(backend, sample, Instant::now())
    }

    /// [`Admission::release`] at `now`, read by the caller.
    fn release_at(
        &self,
        backend: BackendId,
        sample: Option<Sample>,
        now: Instant,
    ) -> Option<LimitNow> {
        let now = now.into_std();
        let mut pool = self.pool();
        if let Some(sample) = sample {
            let grants = pool.record(backend, sample, now);
            hand_over(&mut pool, grants);
        }
        let grants = pool.release(backend, now);
        hand_over(&mut pool, grants);
        pool.limit_now(backend).map(|(limit, phase)| LimitNow {
            limit,
            why: phase.map(|p| p.as_str()),
        })
    }

    /// Change a backend's concurrency limit at runtime.
    pub fn set_limit(&self, backend: BackendId, limit: u32) {
        self.change(|pool, now| pool.set_limit(backend, limit, now));
    }

    /// Apply a pool change that may free capacity: hand the grants it made to their waiters,
    /// and wake the timer, whose next wake-up may have moved.
    fn change(
        &self,
        op: impl FnOnce(&mut Pool, std::time::Instant) -> Vec<Grant<oneshot::Sender<BackendId>>>,
    ) {
        let mut pool = self.pool();
        let grants = op(&mut pool, Instant::now().into_std());
        hand_over(&mut pool, grants);
        drop(pool);
        self.timer.notify_one();
    }

    /// Hold back `reserved` slots of a backend for another process (upgrade hand-over).
    pub fn set_reserved(&self, backend: BackendId, reserved: u32) {
        self.change(|pool, now| pool.set_reserved(backend, reserved, now));
    }

    /// Set this instance's share of a backend's cap (`[cluster]`; `None`: the whole cap).
    pub fn set_share(&self, backend: BackendId, share: Option<u32>) {
        self.change(|pool, now| pool.set_share(backend, share, now));
    }

    /// Lower a backend's capacity to its in-flight work plus `extra` (never up); returns the
    /// capacity now in force. See [`AdmissionPool::shrink_capacity`].
    pub fn shrink_capacity(&self, backend: BackendId, extra: u32) -> u32 {
        self.pool()
            .shrink_capacity(backend, extra, Instant::now().into_std())
    }

    /// Replace a backend's policy (hot reload).
    pub fn set_policy(&self, backend: BackendId, policy: BackendPolicy) {
        self.change(|pool, now| pool.set_policy(backend, policy, now));
    }

    /// Add a backend (hot reload); it starts up, ramping with its slow start.
    pub fn add_backend(
        &self,
        name: &str,
        policy: BackendPolicy,
        rise: u32,
        fall: u32,
    ) -> BackendId {
        let mut backends = self.backends();
        let id = self.pool().add_backend(policy, Instant::now().into_std());
        backends.push(BackendHealth::new(name.to_string(), rise, fall));
        drop(backends);
        self.timer.notify_one();
        id
    }

    /// Change the queue bound.
    pub fn set_max_queue(&self, max_queue: usize) {
        self.pool().set_max_queue(max_queue);
    }

    /// A consistent view of limits, in-flight counts and the queue.
    pub fn snapshot(&self) -> PoolSnapshot {
        self.pool().snapshot(Instant::now().into_std())
    }

    /// Per-backend status: names, states, health, limits.
    pub fn status(&self) -> Vec<BackendStatus> {
        let snap = self.snapshot();
        let backends = self.backends();
        snap.backends
            .iter()
            .zip(backends.iter())
            .map(|(s, b)| BackendStatus {
                name: b.name.clone(),
                state: s.state,
                healthy: b.health.healthy(),
                limit: s.limit,
                effective_limit: s.effective_limit,
                inflight: s.inflight,
                ramp: s.ramp,
                ramp_gated: s.ramp_gated,
                limit_phase: s.phase.map(|p| p.as_str()),
                baseline: s.baseline,
                tokens: s.tokens,
                downs: b.downs,
                ups: b.ups,
                last_transition: b.last_transition.clone(),
            })
            .collect()
    }

    /// The backend with this name.
    pub fn backend_id(&self, name: &str) -> Result<BackendId, CommandError> {
        self.backends()
            .iter()
            .position(|b| b.name == name)
            .map(BackendId)
            .ok_or_else(|| CommandError::UnknownBackend(name.into()))
    }

    /// Names of all backends, in order.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends().iter().map(|b| b.name.clone()).collect()
    }

    fn any_up(&self) -> bool {
        self.snapshot()
            .backends
            .iter()
            .any(|b| b.state == BackendState::Up)
    }

    /// The backend's connection generation. It changes each time the backend comes back into
    /// service (after being down or drained), and the proxy puts it in the upstream peer's pool
    /// key: connections pooled before a backend restart are never reused after it, so no
    /// request is sent on a socket the restarted server has already closed.
    pub fn generation(&self, backend: BackendId) -> u64 {
        self.generations.get().get(backend.0).copied().unwrap_or(0)
    }

    /// Bring the pool's state of `backend` in line with drain flag and health.
    fn apply_state(&self, backend: BackendId, b: &mut BackendHealth) {
        let state = if b.drained {
            BackendState::Draining
        } else if b.health.healthy() {
            BackendState::Up
        } else {
            BackendState::Down
        };
        if self.pool().state(backend) == Some(state) {
            return;
        }
        if state == BackendState::Up {
            // Under the backends lock (`b` is borrowed from it): changes do not interleave.
            let mut generations = self.generations.with(Vec::clone);
            if generations.len() <= backend.0 {
                generations.resize(backend.0 + 1, 0);
            }
            generations[backend.0] += 1;
            self.generations.replace(generations);
        }
        self.change(|pool, now| pool.set_state(backend, state, now));
    }

    /// Operator: stop sending new requests to `name`; in-flight ones finish.
    pub fn drain(&self, name: &str) -> Result<(), CommandError> {
        self.set_drained(name, true)
    }

    /// Operator: take `name` back into service; it ramps up with slow start.
    pub fn ready(&self, name: &str) -> Result<(), CommandError> {
        self.set_drained(name, false)
    }

    fn set_drained(&self, name: &str, drained: bool) -> Result<(), CommandError> {
        let id = self.backend_id(name)?;
        let mut backends = self.backends();
        let b = &mut backends[id.0];
        b.drained = drained;
        self.apply_state(id, b);
        let what = if drained { "draining" } else { "ready" };
        log::warn!("backend {name}: {what} (operator)");
        Ok(())
    }

    /// Operator: restart `name`'s slow-start ramp.
    pub fn restart_ramp(&self, name: &str) -> Result<(), CommandError> {
        let id = self.backend_id(name)?;
        self.pool().restart_ramp(id, Instant::now().into_std());
        self.timer.notify_one();
        Ok(())
    }

    /// Whether `backend` is down because passive failures took it down (then the health
    /// checker probes it even with `check = "none"`, and any answer below 500 brings it back).
    pub fn passive_down(&self, backend: BackendId) -> bool {
        self.backends()
            .get(backend.0)
            .is_some_and(|b| b.health.down_cause() == Some(DownCause::Passive))
    }

    /// Result of an active health check `check` (e.g. `health check GET /`) that counts
    /// answers `expect` accepts as alive; while passive failures hold the backend down, any
    /// answer below 500 does. Logs each transition once, with what the check saw.
    pub fn observe_check(&self, backend: BackendId, check: &str, expect: &Expect, seen: &Seen) {
        let mut backends = self.backends();
        let Some(b) = backends.get_mut(backend.0) else {
            return;
        };
        let passive = b.health.down_cause() == Some(DownCause::Passive);
        let ok = match seen {
            Seen::Answered(status) => b.health.alive_on(expect, *status),
            Seen::Connected => true,
            Seen::Failed(_) => false,
        };
        let saw = match seen {
            Seen::Answered(status) => format!("{check} answered {status}"),
            Seen::Connected => format!("{check} connected"),
            Seen::Failed(why) => format!("{check} failed: {why}"),
        };
        match b.health.observe(ok) {
            Some(Transition::Up) => {
                b.passive_failures = 0;
                b.ups += 1;
                let rule = match (seen, passive) {
                    (Seen::Answered(_), true) if *expect != Expect::Below500 => {
                        " (down for passive failures: any answer below 500 counts)".to_string()
                    }
                    (Seen::Answered(_), _) if *expect == Expect::Below500 => {
                        " (any answer below 500 counts)".to_string()
                    }
                    (Seen::Answered(_), _) => format!(" (expecting {expect})"),
                    _ => String::new(),
                };
                let what = format!("up: {saw}{rule}");
                log::warn!("backend {} {what}", b.name);
                b.last_transition = Some(what);
            }
            Some(Transition::Down) => {
                b.downs += 1;
                let rule = match seen {
                    Seen::Answered(_) => format!(" (expecting {expect})"),
                    _ => String::new(),
                };
                let what = format!(
                    "down: {} health checks failed in a row, last: {saw}{rule}",
                    b.health.fall()
                );
                log::warn!("backend {} {what}", b.name);
                b.last_transition = Some(what);
            }
            None => return,
        }
        self.apply_state(backend, b);
    }

    /// What became of a real request sent to `backend` (answered and how fast, failed, or
    /// lost). Feeds the slow-start gate and the learned limit; a limit that grew admits
    /// waiters at once. (The timer is not woken: a sample never brings its next wake-up
    /// forward.)
    pub fn record_outcome(&self, backend: BackendId, sample: Sample) {
        let mut pool = self.pool();
        let grants = pool.record(backend, sample, Instant::now().into_std());
        hand_over(&mut pool, grants);
    }

    /// Passive health: a real request got an answer from `backend` (`failure` is `None`) or
    /// could not get one (`Some(why)`: a connect failure or a timeout). `passive_failures` in a
    /// row take it down; the health checker brings it back once it answers again, whatever
    /// the active check's setting (see [`Admission::observe_check`]).
    pub fn observe_passive(&self, backend: BackendId, failure: Option<&str>) {
        if self.passive_threshold == 0 {
            return;
        }
        if failure.is_none() && !self.passive_counted.load(Ordering::SeqCst) {
            return;
        }
        let mut backends = self.backends();
        let Some(b) = backends.get_mut(backend.0) else {
            return;
        };
        let Some(why) = failure else {
            b.passive_failures = 0;
            let counted = backends.iter().any(|b| b.passive_failures > 0);
            self.passive_counted.store(counted, Ordering::SeqCst);
            return;
        };
        self.passive_counted.store(true, Ordering::SeqCst);
        b.passive_failures = b.passive_failures.saturating_add(1);
        if b.passive_failures >= self.passive_threshold && b.health.force_down().is_some() {
            b.downs += 1;
            let what = format!(
                "down: {} passive failures in a row, last: {why}",
                b.passive_failures
            );
            log::warn!("backend {} {what}", b.name);
            b.last_transition = Some(what);
            self.apply_state(backend, b);
        }
    }

    /// Admit waiters whose turn comes from time alone (tokens, ramp steps). Runs until
    /// `shutdown` turns true.
    pub async fn run_timer(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        /// Re-check at least this often, so no wake-up can be missed for long.
        const MAX_SLEEP: Duration = Duration::from_millis(250);
        /// Sleep at least this long between looks.
        const MIN_SLEEP: Duration = Duration::from_millis(1);
        loop {
            let now = Instant::now();
            let until = {
                let mut pool = self.pool();
                let grants = pool.poll(now.into_std());
                hand_over(&mut pool, grants);
                // At least a millisecond: a turn due now was just polled for, and a pool
                // that keeps one due (it should not) must not spin this thread.
                let until = pool
                    .next_wakeup(now.into_std())
                    .map(Instant::from_std)
                    .unwrap_or(now + MAX_SLEEP)
                    .clamp(now + MIN_SLEEP, now + MAX_SLEEP);
                // Under the pool lock: a waiter queued from now on compares against it.
                self.timer_until
                    .store(self.nanos(until.into_std()), Ordering::Release);
                until
            };
            tokio::select! {
                _ = self.timer.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
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

/// A place in the queue. Dropping it leaves the queue. The admission is borrowed: a waiter
/// lives inside its own call of [`Admission::acquire_from`].
struct Waiting<'a> {
    admission: &'a Admission,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<BackendId>>,
}

impl Waiting<'_> {
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

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(backend) = self.leave() {
            let _ = self.admission.release(backend, None);
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
    /// Keep the slot this much longer when dropped (the backend may still be working).
    hold: Option<std::time::Duration>,
    /// Released by [`Permit::release`]: nothing left to do on drop.
    released: bool,
}

/// A backend's limit in force, as a request's access-log entry shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitNow {
    /// The effective limit.
    pub limit: u32,
    /// Why the learned limit is there (`ramp`, `steady`, `collapsed`); `None` when the
    /// backend does not learn its limit.
    pub why: Option<&'static str>,
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

    /// From now on, if this permit is dropped, keep its slot taken for `hold` more (`None`:
    /// release at once). Set while a request may be at the backend without its answer having
    /// been seen, so that work the backend still does after an upstream timeout or a cut
    /// exchange keeps counting against the cap.
    pub fn hold_on_drop(&mut self, hold: Option<std::time::Duration>) {
        self.hold = hold.filter(|d| !d.is_zero());
    }

    /// Release the slot now (whatever hold was set), and say the backend's limit after it.
    pub fn release(self) -> Option<LimitNow> {
        self.release_recording(None)
    }

    /// Record the request's last `sample` (see [`Admission::record_outcome`]) and release the
    /// slot, under one lock; say the backend's limit after it.
    pub fn release_recording(self, sample: Option<Sample>) -> Option<LimitNow> {
        self.release_recording_at(sample, Instant::now())
    }

    /// [`Permit::release_recording`] at `now`, read by the caller.
    pub fn release_recording_at(
        mut self,
        sample: Option<Sample>,
        now: Instant,
    ) -> Option<LimitNow> {
        self.released = true;
        self.admission.release_at(self.backend, sample, now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let (Some(hold), Ok(rt)) = (self.hold, tokio::runtime::Handle::try_current()) {
            let admission = self.admission.clone();
            let backend = self.backend;
            rt.spawn(async move {
                tokio::time::sleep(hold).await;
                let _ = admission.release(backend, None);
            });
            return;
        }
        let _ = self.admission.release(self.backend, None);
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
        let a = Admission::new(&[1], 1);
        let p = a
            .acquire_within(Duration::from_secs(1))
            .await
            .expect("first admitted");
        let a2 = a.clone();
        let waiter =
            tokio::spawn(
                async move { a2.acquire_within(Duration::from_secs(1)).await.map(|_| ()) },
            );
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 1);
        assert_eq!(
            a.acquire_within(Duration::from_secs(1))
                .await
                .expect_err("must be rejected"),
            Shed::QueueFull
        );
        // Paused time: the waiter's deadline passes without any real sleep.
        assert_eq!(waiter.await.expect("join"), Err(Shed::QueueTimeout));
        assert_eq!(a.snapshot().queued, 0);
        drop(p);
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_permit_keeps_its_slot_for_the_hold_then_hands_it_over() {
        let a = Admission::new(&[1], 10);
        let mut p = a
            .acquire_within(Duration::from_secs(60))
            .await
            .expect("admitted");
        p.hold_on_drop(Some(Duration::from_secs(5)));
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            a2.acquire_within(Duration::from_secs(60))
                .await
                .map(|p| p.backend())
        });
        tokio::task::yield_now().await;
        drop(p);
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert_eq!(inflight(&a), 1, "held for the whole hold");
        assert!(!waiter.is_finished(), "the waiter still waits");
        assert_eq!(waiter.await.expect("join"), Ok(BackendId(0)));
        // A hold withdrawn (the answer was seen) releases at once.
        let mut p = a
            .acquire_within(Duration::from_secs(60))
            .await
            .expect("admitted");
        p.hold_on_drop(Some(Duration::from_secs(5)));
        p.hold_on_drop(None);
        drop(p);
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn release_hands_the_slot_to_the_waiter() {
        let a = Admission::new(&[1], 10);
        let p = a
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            a2.acquire_within(Duration::from_secs(10))
                .await
                .map(|p| p.backend())
        });
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
        let a = Admission::new(&[1], 10);
        let p = a
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("admitted");
        let a2 = a.clone();
        let waiter =
            tokio::spawn(
                async move { a2.acquire_within(Duration::from_secs(10)).await.map(|_| ()) },
            );
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
        let a = Admission::new(&[1], 10);
        let _p = a
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("admitted");
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            a2.acquire_within(Duration::from_secs(10))
                .await
                .map(|p| p.backend())
        });
        tokio::task::yield_now().await;
        a.set_limit(BackendId(0), 2);
        assert_eq!(waiter.await.expect("join"), Ok(BackendId(0)));
    }

    /// A waiter behind busy slots, whose turn only a release can bring, does not wake the
    /// admission timer; one whose turn comes with a rate token does, once per earlier turn.
    #[tokio::test(start_paused = true)]
    async fn only_a_waiter_admitted_by_time_wakes_the_timer() {
        let a = Admission::new(&[1], 100);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let timer = tokio::spawn(a.clone().run_timer(shutdown));
        tokio::task::yield_now().await;
        let p = a
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("admitted");
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.acquire_within(Duration::from_secs(10))
                        .await
                        .map(|p| p.backend())
                })
            })
            .collect();
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.snapshot().queued, 20);
        assert_eq!(
            a.timer_wakes.load(Ordering::Relaxed),
            0,
            "no wake-up per waiter"
        );
        drop(p);
        for w in waiters {
            assert_eq!(w.await.expect("join"), Ok(BackendId(0)));
        }

        // Rate-limited, slots free: the next waiter's turn comes with the next token.
        let rated = Admission::with_policies(
            &[BackendPolicy {
                rate: Some(RateLimit {
                    per_second: 10.0,
                    burst: 1,
                }),
                ..BackendPolicy::limit(5)
            }],
            vec!["b0".into()],
            100,
            0,
            1,
            1,
        );
        let (_stop2, shutdown2) = tokio::sync::watch::channel(false);
        let timer2 = tokio::spawn(rated.clone().run_timer(shutdown2));
        tokio::task::yield_now().await;
        let first = rated
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("the burst token");
        let r2 = rated.clone();
        let second = tokio::spawn(async move {
            r2.acquire_within(Duration::from_secs(10))
                .await
                .map(|p| p.backend())
        });
        tokio::task::yield_now().await;
        assert_eq!(rated.timer_wakes.load(Ordering::Relaxed), 1);
        assert_eq!(
            second.await.expect("join"),
            Ok(BackendId(0)),
            "admitted by the timer"
        );
        drop(first);
        let _ = stop.send(true);
        let _ = timer.await;
        timer2.abort();
    }

    fn admission_for(health: &str) -> Arc<Admission> {
        let cfg = crate::config::Config::parse(
            &format!(
                "[[backend]]\naddress = \"127.0.0.1:9\"\nmax_inflight = 4\n[health]\n{health}"
            ),
            None,
            &crate::config::Overrides::default(),
        )
        .expect("config");
        Admission::from_config(&cfg)
    }

    fn state(a: &Admission) -> BackendState {
        a.status()[0].state
    }

    /// Passive failures take the backend down; while it is down for that reason, a 404 to the
    /// check brings it back even though `expect_status = [200]`.
    #[tokio::test]
    async fn a_passively_downed_backend_comes_back_on_a_404_despite_a_strict_list() {
        let a = admission_for("expect_status = [200]\nrise = 2\npassive_failures = 3\n");
        let b = BackendId(0);
        let expect = Expect::Statuses(vec![200]);
        let check = "health check GET /";
        // Up: the strict list applies, a 404 is a failed check (not yet `fall` of them).
        a.observe_check(b, check, &expect, &Seen::Answered(404));
        assert_eq!(state(&a), BackendState::Up);
        for _ in 0..2 {
            a.observe_passive(b, Some("connection refused"));
        }
        assert_eq!(state(&a), BackendState::Up, "below passive_failures");
        a.observe_passive(b, Some("connection refused"));
        assert_eq!(state(&a), BackendState::Down);
        assert!(a.passive_down(b));
        a.observe_check(
            b,
            check,
            &expect,
            &Seen::Failed("connection refused".into()),
        );
        a.observe_check(b, check, &expect, &Seen::Answered(503));
        a.observe_check(b, check, &expect, &Seen::Answered(404));
        assert_eq!(state(&a), BackendState::Down, "rise is 2");
        a.observe_check(b, check, &expect, &Seen::Answered(404));
        assert_eq!(state(&a), BackendState::Up);
        assert!(!a.passive_down(b));
        let s = &a.status()[0];
        assert_eq!((s.downs, s.ups), (1, 1));
        assert_eq!(
            s.last_transition.as_deref(),
            Some(
                "up: health check GET / answered 404 (down for passive failures: any answer \
                 below 500 counts)"
            )
        );
    }

    /// With `check = "none"`, passive failures still take a backend down and the recovery
    /// probe's answers bring it back (before, passive checks were off without active ones).
    #[tokio::test]
    async fn with_no_active_check_passive_down_still_recovers() {
        let a = admission_for("check = \"none\"\nrise = 1\npassive_failures = 2\n");
        let b = BackendId(0);
        a.observe_passive(b, Some("no answer within upstream.read_timeout"));
        a.observe_passive(b, None);
        a.observe_passive(b, Some("no answer within upstream.read_timeout"));
        assert_eq!(state(&a), BackendState::Up, "an answer resets the run");
        a.observe_passive(b, Some("no answer within upstream.read_timeout"));
        assert_eq!(state(&a), BackendState::Down);
        assert!(a.passive_down(b));
        a.observe_check(
            b,
            "recovery probe GET /",
            &Expect::Below500,
            &Seen::Answered(403),
        );
        assert_eq!(state(&a), BackendState::Up);
    }

    /// The active check (default: any answer below 500) never takes down a backend that
    /// answers 403 or 404; a 5xx or no answer does.
    #[tokio::test]
    async fn the_default_check_counts_403_and_404_as_alive() {
        let a = admission_for("fall = 2\n");
        let b = BackendId(0);
        let check = "health check GET /";
        for _ in 0..10 {
            a.observe_check(b, check, &Expect::Below500, &Seen::Answered(403));
            a.observe_check(b, check, &Expect::Below500, &Seen::Answered(404));
        }
        assert_eq!(state(&a), BackendState::Up);
        a.observe_check(b, check, &Expect::Below500, &Seen::Answered(500));
        a.observe_check(
            b,
            check,
            &Expect::Below500,
            &Seen::Failed("timed out".into()),
        );
        assert_eq!(state(&a), BackendState::Down);
        assert!(!a.passive_down(b));
        assert_eq!(a.status()[0].downs, 1);
        assert_eq!(
            a.status()[0].last_transition.as_deref(),
            Some(
                "down: 2 health checks failed in a row, last: health check GET / failed: timed out"
            )
        );
    }

    #[test]
    fn a_backend_back_in_service_gets_a_new_connection_generation() {
        let a = Admission::new(&[1, 1], 1);
        assert_eq!(
            (a.generation(BackendId(0)), a.generation(BackendId(1))),
            (0, 0)
        );
        a.drain("b1").expect("drain");
        assert_eq!(
            a.generation(BackendId(1)),
            0,
            "draining keeps the connections' generation"
        );
        a.ready("b1").expect("ready");
        assert_eq!(
            (a.generation(BackendId(0)), a.generation(BackendId(1))),
            (0, 1)
        );
        // Read on another thread (its own copy): the same generation.
        let other = a.clone();
        let there = std::thread::spawn(move || other.generation(BackendId(1)))
            .join()
            .expect("thread");
        assert_eq!(there, 1);
        a.drain("b1").expect("drain");
        a.ready("b1").expect("ready");
        assert_eq!(a.generation(BackendId(1)), 2);
        assert_eq!(a.generation(BackendId(7)), 0, "an unknown backend has none");
    }
}
