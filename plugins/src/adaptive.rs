//! A concurrency limit learned from the backend's own answers, never above the operator's
//! ceiling.
//!
//! The legacy backend is a cliff, not a slope: its latency rises as soon as requests queue for
//! its threads, and it locks up a little further on. So the search is one-sided. The
//! operator's `max_inflight` is a hard ceiling; below it the limit moves on evidence from
//! completed requests, in **rounds**: a round is as many completions as the limit allows at
//! once (at least [`LatencyLimitConfig::min_round`]), about one "round trip" of the backend.
//!
//! - **Ramp** (TCP slow start): from `initial`, the limit doubles after each round that is
//!   clean with room to spare: its mean latency within half the tolerance's margin over the
//!   baseline (1.15 × for a tolerance of 1.3), and its error share at most `max_error_rate`. A
//!   warm backend reaches the ceiling in log2(ceiling / initial) rounds. A round that is clean
//!   but near the edge ends the doubling (growth goes on one at a time, as TCP past its
//!   threshold); an unclean round ends the ramp and steps back to the last clean limit.
//! - **Steady** (adaptive, opt-in): each round's mean latency against the baseline gives a
//!   gradient, `tolerance × baseline / mean`, clamped to [0.5, 1]; below 1 the limit is
//!   multiplied by it (Envoy's and Gradient2's rule). A clean round whose demand reached the
//!   limit adds one (additive recovery), up to the ceiling. Without the adaptive mode the
//!   limit stays where the ramp left it (normally the ceiling) until the backend fails again.
//! - **Slower, not queued** (adaptive): a cut that does not relieve the latency shows that the
//!   backend got slower rather than that requests queue inside it. When a round at a limit at
//!   least a quarter below the round that started the cuts still has 90 % of that round's mean
//!   latency, the backend's latency no longer depends on how many requests it is given (a
//!   longer service time, not a queue for its threads): lowering the limit further would only
//!   cut throughput. The baseline is then re-measured from this round (its 10th percentile)
//!   and the limit recovers additively against it. Without this, a backend whose service
//!   time doubles while its threads stay free would be cut round after round to the floor,
//!   its latency never falling under the old baseline's tolerance.
//! - **Collapse**: a backend that stops completing requests while every slot is taken
//!   ([`LatencyLimit::tick`]), or whose answers are lost (timeouts, resets after the request
//!   was sent) [`LatencyLimitConfig::lost_in_a_row`] times in a row, drops to the floor and is
//!   ramped again once it answers. Answers to requests sent before the collapse (they started
//!   earlier than the collapse, by their latency) end the collapse but teach the new ramp
//!   nothing: their latency is the stall's (a lock-up's seconds), not the backend's, and had
//!   they seeded the baseline the ramp would take the whole cap back into the lock-up.
//! - **Faster** (steady service): a round whose fastest answers fall below the baseline's
//!   tolerance shows the backend got faster (a slowdown ended). The baseline follows at once;
//!   the round, whose mean mixes the two speeds, cuts nothing, and answers to requests sent
//!   before it ended (the old speed's stragglers) are not learned from.
//!
//! The **baseline** is the backend's latency without queueing: the lowest 10th percentile of a
//! round seen at a limit of at most [`LatencyLimitConfig::baseline_below`] (adaptive, in
//! steady service, any round may lower it: a round's fastest answers are never faster than
//! the backend unqueued), raised at the end of each [`LatencyLimitConfig::baseline_window`] to the lowest
//! seen in it at such a limit (so a backend that becomes permanently slower is followed,
//! slowly), seeded by the first round, and re-measured at once when a cut shows the backend
//! slower rather than queued (above). A low percentile,
//! not the mean, because even the first round may already queue at a cold backend: its
//! fastest answers are the ones served without waiting (Envoy's and Vegas' minRTT, made robust
//! to a single outlier).
//!
//! `duration` bounds the ramp: while no round has shown inflation, the limit is at least where
//! a linear clock ramp from `initial` to the ceiling over `duration` would be, so little
//! traffic (too few completions to finish rounds) never keeps the limit low for longer than the
//! clock ramp would. Once a round shows inflation, the clock no longer lifts the limit: a cold
//! backend is held where its latency says.
//!
//! **Latency noise floor.** A rise smaller than [`LatencyLimitConfig::min_rise`] over the
//! baseline never counts as inflation, whatever the ratio: for a backend answering in a tenth of
//! a millisecond, 1.3 × its baseline is scheduling jitter, not a queue for its threads, and
//! without this floor such a backend was held at a limit of 1 (measured against an nginx
//! "hello" backend: 12,700 requests/s instead of 31,000 with the ramp off). A backend whose
//! baseline is above `min_rise / (tolerance − 1)` (6.7 ms with the defaults) is judged by the
//! ratio alone.
//!
//! Nothing here reads a clock: time comes in as an argument.

use std::time::{Duration, Instant};

/// How a [`LatencyLimit`] learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyLimitConfig {
    /// The operator's ceiling (`max_inflight`): never exceeded.
    pub ceiling: u32,
    /// The floor (`min_inflight`), at least 1.
    pub floor: u32,
    /// Where a ramp starts (clamped to `[floor, ceiling]`).
    pub initial: u32,
    /// A round is clean while its mean latency is at most this × the baseline. The mean, not
    /// the median: with W workers and N > W requests inside, the median stays at the service
    /// time until N reaches about 2 W (where a legacy server may already lock up), while the
    /// mean grows with every request that has to wait.
    pub tolerance: f64,
    /// A rise of the mean latency over the baseline smaller than this is never inflation (nor
    /// too close to the tolerance for doubling: half of it), whatever the ratio.
    pub min_rise: Duration,
    /// A round is clean while at most this share of its requests failed.
    pub max_error_rate: f64,
    /// Adapt in steady service (the gradient); off: the ramp only.
    pub adaptive: bool,
    /// Fewest completions in a round.
    pub min_round: u32,
    /// Lost answers in a row that collapse the limit.
    pub lost_in_a_row: u32,
    /// No completion for this long while every slot is taken collapses the limit (at least
    /// this; a backend whose baseline is slower gets 20 × its baseline).
    pub stall: Duration,
    /// Rounds at a limit up to this count toward the baseline.
    pub baseline_below: u32,
    /// The baseline is refreshed from the rounds of this long ago at most.
    pub baseline_window: Duration,
    /// The clock ramp's length, bounding the latency ramp (zero: no bound).
    pub duration: Duration,
}

impl LatencyLimitConfig {
    /// Defaults for a backend with cap `ceiling`: start at 10 % (at least 1), tolerance 1.3 ×
    /// (and at least 2 ms over the baseline), 10 % errors, rounds of at least 8, collapse after 3 lost answers or a 2 s stall.
    pub fn new(ceiling: u32) -> Self {
        let ceiling = ceiling.max(1);
        LatencyLimitConfig {
            ceiling,
            floor: 1,
            initial: (ceiling / 10).max(1),
            tolerance: 1.3,
            min_rise: Duration::from_millis(2),
            max_error_rate: 0.1,
            adaptive: false,
            min_round: 8,
            lost_in_a_row: 3,
            stall: Duration::from_secs(2),
            baseline_below: (ceiling / 4).max(1),
            baseline_window: Duration::from_secs(60),
            duration: Duration::from_secs(10),
        }
    }
}

/// What became of a request sent to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Answered (below 500) after this long.
    Ok(Duration),
    /// Answered with a server error (5xx) after this long: backend pressure.
    Failed(Duration),
    /// No answer: an upstream timeout, or the connection reset after the request was sent.
    Lost,
}

/// Why the limit is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Growing: doubling per clean round.
    Ramp,
    /// At the ceiling, or where the backend's latency holds it.
    Steady,
    /// The backend stopped answering: at the floor until it answers again.
    Collapsed,
}

impl Phase {
    /// A word for status output, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Ramp => "ramp",
            Phase::Steady => "steady",
            Phase::Collapsed => "collapsed",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Round {
    latencies: Vec<Duration>,
    failed: u32,
    /// The most requests in flight seen during the round.
    peak_inflight: u32,
}

/// A backend's learned limit.
#[derive(Debug, Clone)]
pub struct LatencyLimit {
    cfg: LatencyLimitConfig,
    limit: f64,
    phase: Phase,
    /// The last limit whose round was clean during the ramp.
    last_clean: u32,
    round: Round,
    baseline: Option<Duration>,
    /// The lowest low-concurrency round 10th percentile since `window_start`.
    window_min: Option<Duration>,
    window_start: Instant,
    lost: u32,
    last_completion: Instant,
    ramp_start: Instant,
    /// A round of this ramp showed inflation: the clock no longer lifts the limit.
    inflated: bool,
    /// The round (its limit and mean latency) that started the gradient's current run of
    /// cuts, moved down each time a cut of at least a quarter relieved the latency; cleared
    /// by a round within the tolerance.
    cut_from: Option<(u32, Duration)>,
    /// Answers to requests sent before this are not learned from: they were served by the
    /// backend as it was before the last collapse, or before it got faster.
    learn_after: Option<Instant>,
    /// Since when [`tick`](Self::tick) has seen every slot taken (`None`: a slot was free).
    full_since: Option<Instant>,
}

impl LatencyLimit {
    /// A limit that starts ramping at `now`.
    pub fn new(cfg: LatencyLimitConfig, now: Instant) -> Self {
        let cfg = Self::bounded(cfg);
        let mut l = LatencyLimit {
            cfg,
            limit: f64::from(cfg.initial),
            phase: Phase::Ramp,
            last_clean: cfg.initial,
            round: Round::default(),
            baseline: None,
            window_min: None,
            window_start: now,
            lost: 0,
            last_completion: now,
            ramp_start: now,
            inflated: false,
            cut_from: None,
            learn_after: None,
            full_since: None,
        };
        l.restart(now);
        l
    }

    /// `cfg` with its bounds made consistent: a ceiling of at least 1, the floor and the
    /// initial limit within it.
    fn bounded(mut cfg: LatencyLimitConfig) -> LatencyLimitConfig {
        cfg.ceiling = cfg.ceiling.max(1);
        cfg.floor = cfg.floor.clamp(1, cfg.ceiling);
        cfg.initial = cfg.initial.clamp(cfg.floor, cfg.ceiling);
        cfg.min_round = cfg.min_round.max(1);
        cfg.lost_in_a_row = cfg.lost_in_a_row.max(1);
        cfg
    }

    /// The configuration in force.
    pub fn config(&self) -> LatencyLimitConfig {
        self.cfg
    }

    /// Change the configuration (a reload, a new ceiling): everything learned is kept (phase,
    /// baseline, the round under way, the ramp's clock), and the limit is kept within the new
    /// bounds.
    pub fn reconfigure(&mut self, cfg: LatencyLimitConfig) {
        self.cfg = Self::bounded(cfg);
        let (floor, ceiling) = (self.cfg.floor, self.cfg.ceiling);
        self.limit = self.limit.clamp(f64::from(floor), f64::from(ceiling));
        self.last_clean = self.last_clean.clamp(floor, ceiling);
    }

    /// Start a ramp from `initial` (sluice started, the backend came back, an operator asked).
    pub fn restart(&mut self, now: Instant) {
        self.limit = f64::from(self.cfg.initial);
        self.last_clean = self.cfg.initial;
        self.phase = if self.cfg.initial >= self.cfg.ceiling {
            Phase::Steady
        } else {
            Phase::Ramp
        };
        self.round = Round::default();
        self.lost = 0;
        self.last_completion = now;
        self.ramp_start = now;
        self.inflated = false;
        self.cut_from = None;
    }

    /// The limit in force at `now`.
    pub fn limit(&self, now: Instant) -> u32 {
        let learned = self.limit.floor() as u32;
        let clocked = if self.phase == Phase::Ramp && !self.inflated {
            self.clock_limit(now)
        } else {
            0
        };
        learned.max(clocked).clamp(self.cfg.floor, self.cfg.ceiling)
    }

    /// Why the limit is where it is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The backend's baseline latency, once measured.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// The linear clock ramp's value at `now`.
    fn clock_limit(&self, now: Instant) -> u32 {
        let d = self.cfg.duration;
        if d.is_zero() {
            return 0;
        }
        let t = now.saturating_duration_since(self.ramp_start);
        if t >= d {
            return self.cfg.ceiling;
        }
        let span = u128::from(self.cfg.ceiling - self.cfg.initial);
        let done = span * t.as_nanos() / d.as_nanos();
        self.cfg.initial + done as u32
    }

    /// When the clock part of the ramp next raises the limit, if it may.
    pub fn next_step(&self, now: Instant) -> Option<Instant> {
        if self.phase != Phase::Ramp || self.inflated || self.cfg.duration.is_zero() {
            return None;
        }
        let current = self.limit(now);
        if current >= self.cfg.ceiling {
            return None;
        }
        let span = u128::from(self.cfg.ceiling - self.cfg.initial);
        if span == 0 {
            return None;
        }
        // Smallest t with initial + span·t/d ≥ current + 1.
        let next = u128::from(current + 1 - self.cfg.initial);
        let needed = (next * self.cfg.duration.as_nanos()).div_ceil(span);
        let nanos = u64::try_from(needed).unwrap_or(u64::MAX);
        Some(self.ramp_start + Duration::from_nanos(nanos))
    }

    /// A request was admitted and `inflight` requests are now at the backend.
    pub fn on_admit(&mut self, inflight: u32) {
        self.round.peak_inflight = self.round.peak_inflight.max(inflight);
    }

    /// A request sent to the backend ended as `sample`, at `now`.
    pub fn record(&mut self, sample: Sample, now: Instant) {
        let (latency, failed) = match sample {
            Sample::Lost => {
                self.lost += 1;
                if self.lost >= self.cfg.lost_in_a_row {
                    self.collapse(now);
                }
                return;
            }
            Sample::Ok(l) => (l, false),
            Sample::Failed(l) => (l, true),
        };
        self.lost = 0;
        self.last_completion = now;
        if self.phase == Phase::Collapsed {
            // It answers again: ramp from the floor.
            self.phase = Phase::Ramp;
            self.ramp_start = now;
            self.last_clean = self.cfg.floor;
            self.inflated = true;
            self.round = Round::default();
        }
        // Sent before the last collapse (it started `latency` ago): its latency is the stall's;
        // or before the backend got faster: its latency is the old speed's.
        let stale = self
            .learn_after
            .is_some_and(|c| now.checked_sub(latency).is_none_or(|sent| sent < c));
        if stale {
            return;
        }
        if failed {
            self.round.failed += 1;
        }
        self.round.latencies.push(latency);
        let size = (self.limit.floor() as u32).max(self.cfg.min_round);
        if self.round.latencies.len() as u32 >= size {
            self.end_round(now);
        }
    }

    /// Look for a stall at `now`, with `inflight` requests at the backend: no completion for
    /// the stall time while every slot is taken collapses the limit. The time counts from the
    /// last completion or from the first tick that saw every slot taken, whichever is later:
    /// a backend that sat idle (nothing to complete) and has just been given its whole limit
    /// has not stalled.
    pub fn tick(&mut self, inflight: u32, now: Instant) {
        if self.phase == Phase::Collapsed || inflight < self.limit(now) {
            self.full_since = None;
            return;
        }
        let full_since = *self.full_since.get_or_insert(now);
        let stall = self
            .baseline
            .map_or(self.cfg.stall, |b| self.cfg.stall.max(b * 20));
        if now.saturating_duration_since(self.last_completion.max(full_since)) >= stall {
            self.collapse(now);
        }
    }

    /// When [`tick`](Self::tick) could next find a stall, if the backend stays busy (from the
    /// last completion, or from when every slot was seen taken).
    pub fn stall_due(&self) -> Option<Instant> {
        if self.phase == Phase::Collapsed {
            return None;
        }
        let stall = self
            .baseline
            .map_or(self.cfg.stall, |b| self.cfg.stall.max(b * 20));
        let since = self
            .full_since
            .map_or(self.last_completion, |f| f.max(self.last_completion));
        Some(since + stall)
    }

    fn collapse(&mut self, now: Instant) {
        self.phase = Phase::Collapsed;
        self.cut_from = None;
        self.learn_after = Some(now);
        self.limit = f64::from(self.cfg.floor);
        self.last_clean = self.cfg.floor;
        self.round = Round::default();
        self.lost = 0;
        self.last_completion = now;
        self.full_since = None;
    }

    fn end_round(&mut self, now: Instant) {
        let mut round = std::mem::take(&mut self.round);
        round.latencies.sort_unstable();
        let n = round.latencies.len() as u32;
        let mean = round.latencies.iter().sum::<Duration>() / n.max(1);
        let fastest = round.latencies[round.latencies.len() / 10];
        let errors = f64::from(round.failed) / round.latencies.len() as f64;
        let at = self.limit.floor() as u32;
        let before = self.baseline;
        self.update_baseline(fastest, at, now);
        let Some(baseline) = self.baseline else {
            return;
        };
        let faster = before.is_some_and(|b| self.allowed(baseline) < b.as_secs_f64());
        if self.phase == Phase::Steady && faster {
            // Its fastest answers fell below the old baseline's tolerance: the backend got
            // faster during this round (a slowdown ended), whose mean mixes the two. It says
            // nothing about queueing now; the next round is judged against the new baseline.
            // Answers to requests sent until now may still be the old speed's: they are not
            // learned from either. (In steady service only: during a ramp the baseline is
            // still being found, and its rounds are judged as they come.)
            self.cut_from = None;
            self.learn_after = Some(now);
            return;
        }
        let allowed = self.allowed(baseline);
        let inflated = mean.as_secs_f64() > allowed;
        let clean = !inflated && errors <= self.cfg.max_error_rate;
        // Doubling is safe only well within the tolerance: half its margin.
        let b = baseline.as_secs_f64();
        let well_within = b + (allowed - b) / 2.0;
        let ceiling = f64::from(self.cfg.ceiling);
        let floor = f64::from(self.cfg.floor);
        match self.phase {
            Phase::Ramp if clean && mean.as_secs_f64() <= well_within => {
                self.last_clean = at;
                self.limit = (self.limit * 2.0).min(ceiling);
                if self.limit >= ceiling {
                    self.phase = Phase::Steady;
                }
            }
            Phase::Ramp if clean => {
                // Clean, but near the edge: doubling could jump past a cliff. Grow one at a
                // time from here (as TCP does past its slow-start threshold).
                self.last_clean = at;
                self.inflated = true;
                self.limit = (self.limit + 1.0).min(ceiling);
                self.phase = Phase::Steady;
            }
            Phase::Ramp => {
                // The last doubling went too far: step back to the last clean limit.
                self.inflated = true;
                self.limit = f64::from(self.last_clean.min(at / 2).max(self.cfg.floor));
                self.phase = Phase::Steady;
            }
            Phase::Steady if !self.cfg.adaptive => {
                if errors > self.cfg.max_error_rate {
                    // The backend fails under this load: halve it.
                    self.limit = (self.limit * 0.5).max(floor);
                } else if self.limit < ceiling {
                    // Below the ceiling (a ramp that met inflation): probe one step at a time,
                    // up while the backend copes and demand reaches the limit, down when not.
                    if clean && round.peak_inflight >= at {
                        self.limit = (self.limit + 1.0).min(ceiling);
                    } else if inflated {
                        self.limit = (self.limit - 1.0).max(floor);
                    }
                }
                // At the ceiling the operator's cap is trusted until the backend fails.
            }
            Phase::Steady => {
                let gradient = (allowed / mean.as_secs_f64().max(1e-9)).clamp(0.5, 1.0);
                // A cut of at least a quarter since the round that started the cuts.
                let cut_deep = |from: u32| u64::from(at) * 4 <= u64::from(from) * 3;
                if errors > self.cfg.max_error_rate {
                    self.limit = (self.limit * 0.5).max(floor);
                } else if gradient < 1.0 {
                    match self.cut_from {
                        Some((from, from_mean))
                            if cut_deep(from)
                                && mean.as_secs_f64() >= 0.9 * from_mean.as_secs_f64() =>
                        {
                            // The cuts did not relieve the latency: the backend is slower, not
                            // queued. Judge it against what it does now.
                            self.baseline = Some(fastest);
                            self.window_min = None;
                            self.window_start = now;
                            self.cut_from = None;
                            if round.peak_inflight >= at {
                                self.limit = (self.limit + 1.0).min(ceiling);
                            }
                            return;
                        }
                        Some((from, _)) if !cut_deep(from) => {}
                        _ => self.cut_from = Some((at, mean)),
                    }
                    self.limit = (self.limit * gradient).max(floor);
                } else if round.peak_inflight >= at {
                    self.limit = (self.limit + 1.0).min(ceiling);
                }
                if !inflated {
                    self.cut_from = None;
                }
            }
            Phase::Collapsed => {}
        }
    }

    /// The highest mean latency that is not inflation over `baseline`, in seconds: `tolerance`
    /// × the baseline, and at least the baseline + `min_rise`.
    fn allowed(&self, baseline: Duration) -> f64 {
        let b = baseline.as_secs_f64();
        (b * self.cfg.tolerance).max(b + self.cfg.min_rise.as_secs_f64())
    }

    fn update_baseline(&mut self, fastest: Duration, at: u32, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= self.cfg.baseline_window {
            // A new window: the last one's minimum becomes the baseline (following a backend
            // that became slower for good), if it saw any low-concurrency round.
            if let Some(m) = self.window_min.take() {
                self.baseline = Some(m);
            }
            self.window_start = now;
        }
        let low = at <= self.cfg.baseline_below || self.baseline.is_none();
        if low {
            self.window_min = Some(self.window_min.map_or(fastest, |m| m.min(fastest)));
        }
        // Low-concurrency rounds measure it; with the adaptive gradient, in steady service any
        // round may lower it too, so that it follows a backend that got faster again (after a
        // slowdown raised it) while the limit stays high. Not otherwise: a lower baseline from
        // a busier round makes the ramp's doubling test, and the one-step probing below the
        // ceiling, stricter than the low rounds measured.
        if low || (self.cfg.adaptive && self.phase == Phase::Steady) {
            self.baseline = Some(self.baseline.map_or(fastest, |b| b.min(fastest)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A backend with `workers` threads of `service` each: the latency of a request when
    /// `inflight` are inside.
    fn latency(workers: u32, service: Duration, inflight: u32) -> Duration {
        let queued = inflight.div_ceil(workers).max(1);
        service * queued
    }

    /// A backend with `workers` threads of `service` each, kept full (every answer replaced at
    /// once): the mean latency when `inflight` are inside, `service × inflight / workers` past
    /// its workers (Little's law: it completes `workers / service` per second).
    fn fluid(workers: u32, service: Duration, inflight: u32) -> Duration {
        service.mul_f64((f64::from(inflight) / f64::from(workers)).max(1.0))
    }

    /// Drive a limit with a backend that always has demand: each round completes `limit`
    /// requests with the latency the backend gives at that concurrency. Returns the limits
    /// seen after each round.
    fn drive(
        l: &mut LatencyLimit,
        t: &mut Instant,
        rounds: usize,
        backend: impl Fn(u32) -> Duration,
    ) -> Vec<u32> {
        let mut seen = Vec::new();
        for _ in 0..rounds {
            let at = l.limit(*t);
            let lat = backend(at);
            for _ in 0..at.max(8) {
                l.on_admit(at);
                *t += lat / at.max(1);
                l.record(Sample::Ok(lat), *t);
            }
            seen.push(l.limit(*t));
        }
        seen
    }

    fn cfg(ceiling: u32) -> LatencyLimitConfig {
        LatencyLimitConfig {
            initial: 3,
            duration: Duration::ZERO,
            ..LatencyLimitConfig::new(ceiling)
        }
    }

    #[test]
    fn a_warm_backend_is_ramped_to_the_ceiling_in_a_few_rounds() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        assert_eq!(l.limit(t), 3);
        // 64 workers: no queueing up to the ceiling.
        let seen = drive(&mut l, &mut t, 6, |n| latency(64, ms(20), n));
        assert_eq!(seen[..4], [6, 12, 24, 32]);
        assert_eq!(l.phase(), Phase::Steady);
        assert_eq!(l.baseline(), Some(ms(20)));
    }

    /// A backend answering in 100 µs with a single thread: its latency grows with every
    /// request inside, but by less than the 2 ms noise floor up to the ceiling. Judged by the
    /// ratio alone (the floor at zero) it would be held at its first limit.
    #[test]
    fn a_sub_millisecond_backend_is_not_held_by_jitter_below_the_noise_floor() {
        let us = Duration::from_micros;
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(16), t);
        let seen = drive(&mut l, &mut t, 8, |n| us(100) + us(50) * n);
        assert_eq!(seen.last(), Some(&16), "{seen:?}");
        let mut t = Instant::now();
        let mut held = LatencyLimit::new(
            LatencyLimitConfig {
                min_rise: Duration::ZERO,
                ..cfg(16)
            },
            t,
        );
        let seen = drive(&mut held, &mut t, 8, |n| us(100) + us(50) * n);
        assert!(seen.iter().all(|&s| s < 16), "{seen:?}");
        // A real queue (one thread of 1 ms: n ms with n inside) is inflation once it passes
        // the floor: measured from the first round at 3 inside (3 ms), held at 5–6.
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(16), t);
        let seen = drive(&mut l, &mut t, 12, |n| latency(1, ms(1), n));
        assert!(seen[2..].iter().all(|&s| s <= 6), "{seen:?}");
    }

    #[test]
    fn a_ramp_stops_where_latency_inflates_and_never_passes_the_knee() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(64), t);
        // 8 workers: at 24 inside, latency triples.
        let seen = drive(&mut l, &mut t, 20, |n| latency(8, ms(20), n));
        let top = *seen.iter().max().expect("rounds");
        assert!(top <= 24, "it went to {top}: {seen:?}");
        let last = *seen.last().expect("rounds");
        // Clean up to 8 inside (one service time), inflated from 9: it settles at the knee.
        assert!((8..=9).contains(&last), "settled at {last}: {seen:?}");
    }

    #[test]
    fn adaptive_mode_backs_off_when_the_backend_slows_and_recovers_after() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                adaptive: true,
                ..cfg(32)
            },
            t,
        );
        drive(&mut l, &mut t, 6, |n| fluid(32, ms(20), n));
        assert_eq!(l.limit(t), 32);
        // The backend halves its capacity: 16 workers, so requests queue for them.
        let slow = drive(&mut l, &mut t, 20, |n| fluid(16, ms(20), n));
        let last = *slow.last().expect("rounds");
        assert!(last < 32, "the limit must fall below the ceiling: {slow:?}");
        // Within the tolerance: 1.3 × 16 workers.
        assert!(
            (16..=21).contains(&last),
            "it settles near the backend's new capacity: {slow:?}"
        );
        assert!(
            slow.iter().all(|&s| s >= 16),
            "never far below it: {slow:?}"
        );
        assert_eq!(
            l.baseline(),
            Some(ms(20)),
            "a queue is not a slower backend"
        );
        // Recovery: back to the ceiling, additively.
        let back = drive(&mut l, &mut t, 40, |n| fluid(32, ms(20), n));
        assert_eq!(*back.last().expect("rounds"), 32, "{back:?}");
    }

    /// A backend whose service time doubles while its threads stay free (cap = workers):
    /// latency doubles whatever the limit. A cut that does not relieve it shows the backend is
    /// slower, not queued: the baseline is re-measured and the limit comes back to the
    /// ceiling instead of being cut round after round to the floor (where throughput would
    /// fall to a fraction for no gain in latency). After the recovery the baseline follows
    /// the backend back down at once.
    #[test]
    fn adaptive_mode_tells_a_slower_backend_from_a_queued_one() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                adaptive: true,
                ..cfg(32)
            },
            t,
        );
        drive(&mut l, &mut t, 6, |n| fluid(32, ms(20), n));
        assert_eq!(l.limit(t), 32);
        let slow = drive(&mut l, &mut t, 30, |n| fluid(32, ms(40), n));
        let low = *slow.iter().min().expect("rounds");
        assert!(low < 32, "the first rounds cut the limit: {slow:?}");
        assert!(low >= 16, "by at most a half per round, once: {slow:?}");
        assert_eq!(*slow.last().expect("rounds"), 32, "{slow:?}");
        assert_eq!(l.baseline(), Some(ms(40)));
        // The recovery comes in the middle of a round: half its answers still slow.
        for i in 0..32 {
            t += ms(1);
            let lat = if i < 16 { ms(40) } else { ms(20) };
            l.record(Sample::Ok(lat), t);
        }
        assert_eq!(l.baseline(), Some(ms(20)));
        assert_eq!(
            l.limit(t),
            32,
            "a round that mixes the two speeds cuts nothing"
        );
        // Stragglers of the old speed (sent before that round ended) teach nothing.
        for _ in 0..32 {
            t += ms(1);
            l.record(Sample::Ok(ms(40)), t);
        }
        assert_eq!(l.limit(t), 32, "the old speed's stragglers cut nothing");
        let back = drive(&mut l, &mut t, 3, |n| fluid(32, ms(20), n));
        assert!(back.iter().all(|&s| s == 32), "{back:?}");
    }

    /// Slower and queued at once (service time doubled, half the workers): the cuts go on
    /// while they relieve the latency, and stop where only the slower service is left, near
    /// the workers, not at the floor.
    #[test]
    fn adaptive_mode_cuts_a_slower_and_queued_backend_to_its_workers() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                adaptive: true,
                ..cfg(32)
            },
            t,
        );
        drive(&mut l, &mut t, 6, |n| fluid(32, ms(20), n));
        let slow = drive(&mut l, &mut t, 40, |n| fluid(16, ms(40), n));
        let last = *slow.last().expect("rounds");
        assert!((16..=21).contains(&last), "{slow:?}");
        assert!(slow.iter().all(|&s| s >= 4), "{slow:?}");
        assert_eq!(l.baseline(), Some(ms(40)));
    }

    #[test]
    fn without_adaptive_mode_a_slower_backend_keeps_the_ceiling() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        drive(&mut l, &mut t, 6, |n| latency(32, ms(20), n));
        let seen = drive(&mut l, &mut t, 5, |n| latency(16, ms(20), n));
        assert!(seen.iter().all(|&s| s == 32), "{seen:?}");
    }

    #[test]
    fn lost_answers_collapse_to_the_floor_and_an_answer_re_ramps() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        drive(&mut l, &mut t, 6, |n| latency(64, ms(20), n));
        assert_eq!(l.limit(t), 32);
        l.record(Sample::Lost, t);
        l.record(Sample::Lost, t);
        assert_eq!(l.limit(t), 32, "two lost answers are not yet a pattern");
        l.record(Sample::Lost, t);
        assert_eq!(l.limit(t), 1);
        assert_eq!(l.phase(), Phase::Collapsed);
        let seen = drive(&mut l, &mut t, 8, |n| latency(64, ms(20), n));
        assert_eq!(l.phase(), Phase::Steady);
        assert_eq!(*seen.last().expect("rounds"), 32, "{seen:?}");
    }

    /// A backend that locks up before it ever answered (no baseline yet), with the whole cap
    /// inside: the stall collapses the limit; the answers of the requests that were stuck,
    /// seconds late, end the collapse but are not learned from (they would seed a baseline of
    /// seconds, under which the ramp would give the whole cap back at once); the ramp learns
    /// from the requests sent after the collapse.
    #[test]
    fn answers_sent_before_a_collapse_do_not_teach_the_new_ramp() {
        let t0 = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                adaptive: true,
                initial: 50,
                ..cfg(50)
            },
            t0,
        );
        assert_eq!((l.limit(t0), l.phase()), (50, Phase::Steady));
        // Every slot taken at once (the admission timer sees it), then nothing completes.
        l.tick(50, t0);
        let mut t = t0 + Duration::from_millis(2100);
        l.tick(50, t);
        assert_eq!((l.limit(t), l.phase()), (1, Phase::Collapsed));
        // The lock-up ends a second later: the 50 stuck requests answer at once.
        t += Duration::from_secs(1);
        for _ in 0..50 {
            l.record(Sample::Ok(t - t0), t);
        }
        assert_eq!(l.phase(), Phase::Ramp, "it answers again");
        assert_eq!(
            l.limit(t),
            1,
            "but nothing was learned from the stuck answers"
        );
        assert_eq!(l.baseline(), None);
        // Requests sent from now on teach the ramp: 20 ms each.
        for _ in 0..8 {
            t += ms(20);
            l.record(Sample::Ok(ms(20)), t);
        }
        assert_eq!(l.baseline(), Some(ms(20)));
        assert_eq!(l.limit(t), 2, "a clean round doubles the limit");
    }

    #[test]
    fn a_stall_with_every_slot_taken_collapses_the_limit() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        drive(&mut l, &mut t, 6, |n| latency(64, ms(20), n));
        t += Duration::from_secs(1);
        l.tick(32, t);
        assert_eq!(l.limit(t), 32, "not yet a stall");
        t += Duration::from_secs(2);
        l.tick(31, t);
        assert_eq!(
            l.limit(t),
            32,
            "a free slot: not a stall, just little demand"
        );
        assert_eq!(
            l.stall_due(),
            Some(t - Duration::from_secs(3) + Duration::from_secs(2))
        );
        l.tick(32, t);
        assert_eq!(l.limit(t), 32, "every slot taken only from now on");
        assert_eq!(l.stall_due(), Some(t + Duration::from_secs(2)));
        t += Duration::from_secs(2);
        l.tick(32, t);
        assert_eq!(l.phase(), Phase::Collapsed);
        assert_eq!(l.limit(t), 1);
    }

    /// A backend that sat idle (no traffic, nothing to complete) and is then given its whole
    /// limit at once has not stalled: the stall time counts from when every slot was taken.
    #[test]
    fn a_full_backend_after_an_idle_spell_is_not_a_stall() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        drive(&mut l, &mut t, 6, |n| latency(64, ms(20), n));
        t += Duration::from_secs(30);
        l.tick(0, t);
        l.tick(32, t + ms(1));
        t += ms(20);
        l.tick(32, t);
        l.record(Sample::Ok(ms(20)), t);
        assert_eq!((l.limit(t), l.phase()), (32, Phase::Steady));
    }

    #[test]
    fn a_cold_backend_that_queues_from_the_first_round_is_held_near_its_capacity() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                initial: 4,
                ..cfg(32)
            },
            t,
        );
        // 3 workers: of 4 requests in flight, 3 are served at once and one waits a turn.
        for _ in 0..30 {
            let at = l.limit(t);
            for i in 0..at.max(8) {
                let turn = i % at.max(1) / 3 + 1;
                t += ms(7);
                l.record(Sample::Ok(ms(20) * turn), t);
            }
            // Locking up above 2 × its workers, it must never be given more than 6.
            assert!(
                l.limit(t) <= 6,
                "a 3-worker backend was given {}",
                l.limit(t)
            );
        }
        assert_eq!(
            l.baseline(),
            Some(ms(20)),
            "the baseline ignores the queueing"
        );
    }

    #[test]
    fn a_reload_keeps_what_was_learned() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                initial: 4,
                duration: Duration::from_secs(10),
                ..LatencyLimitConfig::new(32)
            },
            t,
        );
        // A round showing inflation: the clock no longer lifts the limit.
        for _ in 0..8 {
            t += ms(10);
            l.record(Sample::Ok(ms(20)), t);
        }
        for _ in 0..8 {
            t += ms(10);
            l.record(Sample::Ok(ms(200)), t);
        }
        let held = l.limit(t + Duration::from_secs(10));
        assert!(held < 32);
        // The same configuration again (a reload of another key): nothing changes.
        l.reconfigure(l.config());
        assert_eq!(l.limit(t + Duration::from_secs(10)), held);
        assert_eq!(l.baseline(), Some(ms(20)));
        // A lower ceiling bounds the limit at once.
        l.reconfigure(LatencyLimitConfig {
            ceiling: 2,
            ..l.config()
        });
        assert_eq!(l.limit(t), 2);
    }

    #[test]
    fn errors_hold_the_ramp() {
        let mut t = Instant::now();
        let mut l = LatencyLimit::new(cfg(32), t);
        for _ in 0..8 {
            t += ms(5);
            l.record(Sample::Failed(ms(20)), t);
        }
        assert!(
            l.limit(t) <= 3,
            "a round of errors must not double the limit"
        );
        assert_eq!(l.phase(), Phase::Steady);
    }

    #[test]
    fn the_clock_bounds_a_ramp_with_little_traffic_but_not_an_inflated_one() {
        let t0 = Instant::now();
        let mut l = LatencyLimit::new(
            LatencyLimitConfig {
                initial: 4,
                duration: Duration::from_secs(10),
                ..LatencyLimitConfig::new(32)
            },
            t0,
        );
        assert_eq!(l.limit(t0), 4);
        assert_eq!(l.limit(t0 + Duration::from_secs(5)), 18);
        assert_eq!(l.limit(t0 + Duration::from_secs(10)), 32);
        assert_eq!(
            l.next_step(t0),
            Some(t0 + Duration::from_nanos(357_142_858))
        );
        // A round that shows inflation stops the clock's lift.
        let mut t = t0;
        for _ in 0..8 {
            t += ms(10);
            l.record(Sample::Ok(ms(20)), t);
        }
        for _ in 0..8 {
            t += ms(10);
            l.record(Sample::Ok(ms(200)), t);
        }
        let held = l.limit(t0 + Duration::from_secs(10));
        assert!(
            held < 32,
            "a cold backend is held where its latency says: {held}"
        );
        assert_eq!(l.next_step(t), None);
    }

    proptest! {
        /// Whatever the backend does, the limit stays within [floor, ceiling].
        #[test]
        fn the_limit_stays_between_floor_and_ceiling(
            ceiling in 1u32..200,
            floor in 1u32..10,
            adaptive in any::<bool>(),
            events in proptest::collection::vec((0u8..4, 1u64..500, 0u32..250), 1..400),
        ) {
            let t0 = Instant::now();
            let mut t = t0;
            let mut l = LatencyLimit::new(
                LatencyLimitConfig { floor, adaptive, ..LatencyLimitConfig::new(ceiling) },
                t,
            );
            for (kind, lat, inflight) in events {
                t += ms(lat);
                match kind {
                    0 => l.record(Sample::Ok(ms(lat)), t),
                    1 => l.record(Sample::Failed(ms(lat)), t),
                    2 => l.record(Sample::Lost, t),
                    _ => l.tick(inflight, t),
                }
                l.on_admit(inflight);
                let limit = l.limit(t);
                prop_assert!(limit >= floor.min(ceiling) && limit <= ceiling, "{limit}");
                if let Some(next) = l.next_step(t) {
                    prop_assert!(next > t || l.limit(next) > limit);
                }
            }
        }
    }
}
