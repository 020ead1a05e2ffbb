//! Fuzz target `token_bucket`: the token bucket never lets more through than its rate allows.
//!
//! The input decodes into a rate (0.001 to 1,000,000 per second), a burst (1 to 1000) and up to
//! 1000 steps: waits (nanoseconds to seconds, or exactly until the next token), single takes
//! and greedy takes (as many as it grants), each with a rate scale in (0, 1] as the slow-start
//! ramp applies it. The clock only moves forward. Checked:
//! - a fresh bucket grants exactly `burst` tokens at once;
//! - in any window `[a, b]` between two takes, the tokens taken number at most
//!   `burst + rate × (b − a)`, whatever the scale;
//! - `try_take` succeeds exactly when `ready` says so, `available` is within `0..=burst` and
//!   non-zero exactly when ready, and at `next_available` a token is ready.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluice_plugins::token_bucket::{RateLimit, TokenBucket};

#[derive(Debug, Arbitrary)]
enum Step {
    WaitNanos(u32),
    WaitMillis(u16),
    WaitUntilNext,
    Take { scale_pct: u8 },
    TakeAll { scale_pct: u8 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    rate_milli: u32,
    burst: u16,
    steps: Vec<Step>,
}

/// At most this many tokens are taken per input.
const MAX_TAKES: usize = 20_000;

/// Windows starting at one of this many latest takes are checked one by one; all windows are
/// checked at once through a running maximum (below).
const EXACT_WINDOWS: usize = 64;

fn scale(pct: u8) -> f64 {
    f64::from(pct % 100 + 1) / 100.0
}

struct Checker {
    start: Instant,
    rate: f64,
    burst: u32,
    takes: Vec<Instant>,
    /// max over takes j of `rate × (t_j − start) − j`: the window from take j to take n − 1
    /// holds n − j tokens, at most `burst + rate × (t_n−1 − t_j)` exactly when this maximum is
    /// at most `burst + rate × (t_n−1 − start) − n`.
    max_lead: f64,
}

impl Checker {
    /// Record a take at `now` and check every window that ends with it.
    fn took(&mut self, now: Instant) {
        let j = self.takes.len();
        self.takes.push(now);
        let n = self.takes.len();
        let since = now.duration_since(self.start).as_secs_f64();
        self.max_lead = self.max_lead.max(self.rate * since - j as f64);
        let room = f64::from(self.burst) + self.rate * since - n as f64;
        // Slack for the f64 arithmetic only; the bucket itself is exact.
        assert!(
            self.max_lead <= room + 1e-9 * (1.0 + self.rate * since),
            "some window holds more than burst {} + {}/s x its length",
            self.burst,
            self.rate
        );
        for (k, &a) in self
            .takes
            .iter()
            .enumerate()
            .skip(n.saturating_sub(EXACT_WINDOWS))
        {
            let count = (n - k) as f64;
            let window = now.duration_since(a).as_secs_f64();
            let bound = f64::from(self.burst) + self.rate * window;
            assert!(
                count <= bound * (1.0 + 1e-12) + 1e-9,
                "{count} tokens in {window}s at {}/s, burst {}: bound {bound}",
                self.rate,
                self.burst
            );
        }
    }
}

fn consistent(b: &TokenBucket, now: Instant, s: f64, burst: u32) {
    let ready = b.ready(now, s);
    let available = b.available(now, s);
    assert!(
        available <= burst,
        "{available} tokens available, burst {burst}"
    );
    assert_eq!(
        available > 0,
        ready,
        "available {available} but ready {ready}"
    );
    assert_eq!(b.next_available(s) <= now, ready);
}

fuzz_target!(|input: Input| {
    if input.steps.len() > 1000 {
        return;
    }
    let rate = f64::from(input.rate_milli % 1_000_000_000 + 1) / 1000.0;
    let burst = u32::from(input.burst % 1000) + 1;
    let limit = RateLimit {
        per_second: rate,
        burst,
    };
    let start = Instant::now();
    let mut now = start;
    let mut bucket = TokenBucket::new(limit, now);
    assert_eq!(bucket.limit(), limit);
    let mut c = Checker {
        start,
        rate,
        burst,
        takes: Vec::new(),
        max_lead: f64::NEG_INFINITY,
    };

    // A fresh bucket is full: exactly `burst` tokens at once.
    consistent(&bucket, now, 1.0, burst);
    assert_eq!(bucket.available(now, 1.0), burst);
    for _ in 0..burst {
        assert!(
            bucket.try_take(now, 1.0),
            "a fresh bucket holds {burst} tokens"
        );
        c.took(now);
    }
    assert!(!bucket.try_take(now, 1.0), "more than burst at once");

    for step in &input.steps {
        match *step {
            Step::WaitNanos(ns) => now += Duration::from_nanos(u64::from(ns)),
            Step::WaitMillis(ms) => now += Duration::from_millis(u64::from(ms)),
            Step::WaitUntilNext => {
                let next = bucket.next_available(1.0);
                now = now.max(next);
                assert!(bucket.ready(now, 1.0), "no token at next_available");
            }
            Step::Take { scale_pct } | Step::TakeAll { scale_pct } => {
                let s = scale(scale_pct);
                let all = matches!(step, Step::TakeAll { .. });
                loop {
                    if c.takes.len() >= MAX_TAKES {
                        return;
                    }
                    consistent(&bucket, now, s, burst);
                    let ready = bucket.ready(now, s);
                    let took = bucket.try_take(now, s);
                    assert_eq!(took, ready, "try_take disagrees with ready");
                    if !took {
                        break;
                    }
                    c.took(now);
                    if !all {
                        break;
                    }
                }
            }
        }
        consistent(&bucket, now, 1.0, burst);
    }
});
