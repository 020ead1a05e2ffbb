//! Slow start: the effective concurrency limit (and rate) ramps up after a (re)start.
//!
//! A freshly started legacy server takes only part of its normal load for a while. A
//! [`SlowStart`] ramps the limit linearly from `initial` to the backend's `max_inflight` over
//! `duration`. The ramp is restarted when sluice starts, when a backend turns healthy after
//! being down, and on an operator's command.
//!
//! The ramp can be *gated*: while the backend's recent error rate or latency (exponentially
//! weighted over completed requests) is above a threshold, the ramp's clock stops, so the limit
//! holds where it is until the backend copes again. Time comes in as an argument; nothing here
//! reads a clock.

use std::time::{Duration, Instant};

/// Weight of the newest sample in the moving averages of error rate and latency.
pub const EWMA_WEIGHT: f64 = 0.1;

/// How a backend's limit ramps up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStartConfig {
    /// Limit at the start of the ramp (at least 1).
    pub initial: u32,
    /// Time to reach the full limit, not counting time the gate held the ramp.
    pub duration: Duration,
    /// Hold the ramp while the recent error rate (0..1) is above this.
    pub max_error_rate: Option<f64>,
    /// Hold the ramp while the recent latency is above this.
    pub max_latency: Option<Duration>,
}

/// A backend's ramp state.
#[derive(Debug, Clone)]
pub struct SlowStart {
    cfg: SlowStartConfig,
    active: bool,
    progress: Duration,
    last: Instant,
    error_rate: f64,
    latency_secs: Option<f64>,
}

impl SlowStart {
    /// A ramp that starts at `now`.
    pub fn new(cfg: SlowStartConfig, now: Instant) -> Self {
        let mut s = SlowStart {
            cfg,
            active: false,
            progress: Duration::ZERO,
            last: now,
            error_rate: 0.0,
            latency_secs: None,
        };
        s.restart(now);
        s
    }

    /// The configuration.
    pub fn config(&self) -> SlowStartConfig {
        self.cfg
    }

    /// Start the ramp again from `initial`.
    pub fn restart(&mut self, now: Instant) {
        self.active = !self.cfg.duration.is_zero();
        self.progress = Duration::ZERO;
        self.last = now;
        self.error_rate = 0.0;
        self.latency_secs = None;
    }

    /// Whether the gate currently holds the ramp.
    pub fn gated(&self) -> bool {
        let errors = self.cfg.max_error_rate.is_some_and(|m| self.error_rate > m);
        let slow = match (self.cfg.max_latency, self.latency_secs) {
            (Some(max), Some(l)) => l > max.as_secs_f64(),
            _ => false,
        };
        errors || slow
    }

    /// Move the ramp's clock to `now` (it does not move while gated).
    pub fn advance(&mut self, now: Instant) {
        if !self.active {
            return;
        }
        let dt = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        if !self.gated() {
            self.progress += dt;
        }
        if self.progress >= self.cfg.duration {
            self.active = false;
            self.progress = self.cfg.duration;
        }
    }

    /// Feed a completed request: whether it failed, and how long the backend took.
    pub fn record(&mut self, failed: bool, latency: Duration) {
        let x = if failed { 1.0 } else { 0.0 };
        self.error_rate += EWMA_WEIGHT * (x - self.error_rate);
        let l = latency.as_secs_f64();
        self.latency_secs = Some(match self.latency_secs {
            None => l,
            Some(avg) => avg + EWMA_WEIGHT * (l - avg),
        });
    }

    /// Whether the ramp is still under way.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Progress of the ramp, 0.0 to 1.0.
    pub fn fraction(&self) -> f64 {
        if !self.active || self.cfg.duration.is_zero() {
            return 1.0;
        }
        self.progress.as_secs_f64() / self.cfg.duration.as_secs_f64()
    }

    fn start_limit(&self, max: u32) -> u32 {
        self.cfg.initial.clamp(1, max.max(1))
    }

    /// The effective limit for a backend whose full limit is `max` (exact integer arithmetic).
    pub fn limit(&self, max: u32) -> u32 {
        if !self.active {
            return max;
        }
        let start = self.start_limit(max);
        let span = u128::from(max.saturating_sub(start));
        let done = span * self.progress.as_nanos() / self.cfg.duration.as_nanos().max(1);
        start + done as u32
    }

    /// When the limit next grows by one, if the ramp keeps running ungated from `now`.
    pub fn next_step(&self, max: u32, now: Instant) -> Option<Instant> {
        if !self.active || self.gated() {
            return None;
        }
        let start = self.start_limit(max);
        let span = u128::from(max.saturating_sub(start));
        if span == 0 {
            return None;
        }
        let next = u128::from(self.limit(max) - start + 1);
        let d = self.cfg.duration.as_nanos();
        // Smallest progress p with span·p/d ≥ next, i.e. p = ⌈next·d / span⌉.
        let needed = (next * d).div_ceil(span);
        let wait = needed.saturating_sub(self.progress.as_nanos());
        let wait = u64::try_from(wait).unwrap_or(u64::MAX);
        Some(now + Duration::from_nanos(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(initial: u32, secs: u64) -> SlowStartConfig {
        SlowStartConfig {
            initial,
            duration: Duration::from_secs(secs),
            max_error_rate: None,
            max_latency: None,
        }
    }

    #[test]
    fn ramps_linearly_then_stops() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(cfg(5, 10), t0);
        assert_eq!(s.limit(50), 5);
        s.advance(t0 + Duration::from_secs(5));
        assert_eq!(s.limit(50), 27); // 5 + 45·0.5 = 27.5, floor
        s.advance(t0 + Duration::from_secs(10));
        assert!(!s.active());
        assert_eq!(s.limit(50), 50);
    }

    #[test]
    fn gate_holds_the_ramp() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(
            SlowStartConfig {
                max_latency: Some(Duration::from_millis(100)),
                ..cfg(1, 10)
            },
            t0,
        );
        s.record(false, Duration::from_secs(1));
        assert!(s.gated());
        s.advance(t0 + Duration::from_secs(5));
        assert_eq!(s.limit(11), 1, "held while latency is high");
        assert_eq!(s.next_step(11, t0), None);
        for _ in 0..100 {
            s.record(false, Duration::from_millis(10));
        }
        assert!(!s.gated());
        s.advance(t0 + Duration::from_secs(10));
        assert_eq!(s.limit(11), 6);
    }

    #[test]
    fn error_rate_gate() {
        let t0 = Instant::now();
        let mut s = SlowStart::new(
            SlowStartConfig {
                max_error_rate: Some(0.2),
                ..cfg(1, 10)
            },
            t0,
        );
        for _ in 0..5 {
            s.record(true, Duration::ZERO);
        }
        assert!(s.gated());
    }

    proptest! {
        /// The limit never decreases as time passes, stays within [initial, max], and
        /// `next_step` names exactly the instant it grows.
        #[test]
        fn monotone_bounded_and_next_step_exact(
            initial in 1u32..20,
            max in 1u32..200,
            secs in 1u64..30,
            steps in proptest::collection::vec(1u64..500_000_000, 1..100),
        ) {
            let t0 = Instant::now();
            let mut s = SlowStart::new(cfg(initial, secs), t0);
            let mut now = t0;
            let mut last = s.limit(max);
            prop_assert_eq!(last, initial.min(max).max(1));
            for step in steps {
                if let Some(at) = s.next_step(max, now) {
                    let mut probe = s.clone();
                    let before = probe.limit(max);
                    if at > now {
                        probe.advance(at - Duration::from_nanos(1));
                        prop_assert_eq!(probe.limit(max), before, "grew before next_step");
                    }
                    probe.advance(at);
                    prop_assert!(probe.limit(max) > before, "did not grow at next_step");
                }
                now += Duration::from_nanos(step);
                s.advance(now);
                let l = s.limit(max);
                prop_assert!(l >= last);
                prop_assert!(l <= max.max(1));
                last = l;
            }
        }
    }
}
