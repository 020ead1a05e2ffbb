//! A token bucket in exact integer arithmetic (the generic cell rate algorithm).
//!
//! A bucket of `burst` tokens refilled at `rate` tokens per second is the same thing as GCRA
//! with emission interval `T = 1 s / rate` and tolerance `τ = (burst − 1) · T`: the bucket keeps
//! one instant, the theoretical arrival time (TAT) of the next conforming request. A request
//! conforms at `now` when `TAT − τ ≤ now`; taking a token moves TAT to `max(TAT, now) + T`.
//! Everything is whole nanoseconds, so there is no rounding drift however long it runs.
//!
//! The rate may change at any moment (the slow-start ramp scales it): the new interval applies
//! from the next token on. Tokens are only ever *taken* for a request that is being admitted,
//! never reserved ahead, so a request rejected later never burns one.

use std::time::{Duration, Instant};

/// Rate and burst of a [`TokenBucket`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens per second; must be positive and finite.
    pub per_second: f64,
    /// Tokens available at once after a quiet period; at least 1.
    pub burst: u32,
}

impl RateLimit {
    /// The emission interval for `per_second × scale`, in whole nanoseconds (at least 1 ns).
    fn interval(&self, scale: f64) -> u64 {
        let rate = self.per_second * scale;
        if !(rate.is_finite() && rate > 0.0) {
            return u64::MAX / 4;
        }
        // Rounded up: the bucket may run a hair under its rate, never over it.
        let ns = (1e9 / rate).ceil();
        if ns >= (u64::MAX / 4) as f64 {
            u64::MAX / 4
        } else {
            (ns as u64).max(1)
        }
    }
}

/// A token bucket driven by caller-supplied instants.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Theoretical arrival time of the next conforming request.
    tat: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket { limit, tat: now }
    }

    /// The configured rate and burst.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Change rate and burst; tokens already accrued are kept up to the new burst.
    pub fn set_limit(&mut self, limit: RateLimit) {
        self.limit = limit;
    }

    fn tolerance(&self, interval: u64) -> Duration {
        Duration::from_nanos(interval.saturating_mul(u64::from(self.limit.burst.max(1) - 1)))
    }

    /// When the next token is (or was) available, with the rate scaled by `scale` (0..=1).
    ///
    /// The tolerance (the burst) is always measured at the full rate: a scaled-down rate
    /// spaces tokens further apart but never grants extra burst, so whatever the scale does,
    /// at most `burst + rate · t` tokens are taken in any `t`.
    pub fn next_available(&self, _scale: f64) -> Instant {
        let tau = self.tolerance(self.limit.interval(1.0));
        self.tat.checked_sub(tau).unwrap_or(self.tat)
    }

    /// Whether a token is available at `now`.
    pub fn ready(&self, now: Instant, scale: f64) -> bool {
        self.next_available(scale) <= now
    }

    /// Take a token at `now` if one is available.
    pub fn try_take(&mut self, now: Instant, scale: f64) -> bool {
        if !self.ready(now, scale) {
            return false;
        }
        let interval = Duration::from_nanos(self.limit.interval(scale));
        self.tat = self.tat.max(now) + interval;
        true
    }

    /// Whole tokens available at `now` (for status output).
    pub fn available(&self, now: Instant, scale: f64) -> u32 {
        let interval = self.limit.interval(1.0);
        let _ = scale;
        let burst = self.limit.burst.max(1);
        // Tokens are available for every interval by which now exceeds TAT − τ, plus one.
        let start = self.next_available(scale);
        if now < start {
            return 0;
        }
        let ahead = now.duration_since(start).as_nanos() / u128::from(interval.max(1));
        (ahead + 1).min(u128::from(burst)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bucket(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket::new(
            RateLimit {
                per_second: rate,
                burst,
            },
            now,
        )
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = bucket(100.0, 20, t0);
        assert_eq!(b.available(t0, 1.0), 20);
        let taken = (0..50).filter(|_| b.try_take(t0, 1.0)).count();
        assert_eq!(taken, 20);
        // 10 ms later exactly one more token.
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.try_take(t1, 1.0));
        assert!(!b.try_take(t1, 1.0));
        assert_eq!(b.next_available(1.0), t0 + Duration::from_millis(20));
    }

    #[test]
    fn refill_caps_at_burst() {
        let t0 = Instant::now();
        let mut b = bucket(10.0, 3, t0);
        for _ in 0..3 {
            assert!(b.try_take(t0, 1.0));
        }
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.available(later, 1.0), 3);
        let taken = (0..10).filter(|_| b.try_take(later, 1.0)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn scaled_rate_is_slower() {
        let t0 = Instant::now();
        let mut b = bucket(100.0, 1, t0);
        assert!(b.try_take(t0, 0.5));
        assert!(!b.ready(t0 + Duration::from_millis(19), 0.5));
        assert!(b.ready(t0 + Duration::from_millis(20), 0.5));
    }

    /// Taking every token as soon as it is available for 10 s at 100/s, burst 20, yields
    /// exactly 20 + 100·10 tokens: the bucket is exact, with no drift.
    #[test]
    fn exact_over_ten_seconds() {
        let t0 = Instant::now();
        let mut b = bucket(100.0, 20, t0);
        let end = t0 + Duration::from_secs(10);
        let mut taken = 0;
        let mut now = t0;
        while now <= end {
            while b.try_take(now, 1.0) {
                taken += 1;
            }
            now = b.next_available(1.0);
        }
        assert_eq!(taken, 1020);
    }

    proptest! {
        /// Over any window of length W starting from a full bucket, at most burst + rate·W
        /// tokens are taken, however the takes are spaced.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(
            rate in 1u32..2000,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..20_000_000, 1..500),
        ) {
            let t0 = Instant::now();
            let mut b = bucket(f64::from(rate), burst, t0);
            let mut now = t0;
            let mut taken = 0u64;
            // Drain the initial burst, so every later token is one the rate refilled.
            while b.try_take(now, 1.0) {
                taken += 1;
            }
            prop_assert_eq!(taken, u64::from(burst));
            for gap in gaps {
                now += Duration::from_nanos(gap);
                while b.try_take(now, 1.0) {
                    taken += 1;
                }
                let elapsed = now.duration_since(t0).as_secs_f64();
                let bound = f64::from(burst) + f64::from(rate) * elapsed + 1e-6;
                prop_assert!(taken as f64 <= bound, "took {} > {}", taken, bound);
            }
        }
    }
}
