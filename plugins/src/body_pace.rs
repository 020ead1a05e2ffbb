//! How long a client may take to send a request body that sluice receives whole before the
//! request may take a backend slot.
//!
//! Three rules, as Kestrel's `MinRequestBodyDataRate` and IIS's `MinFileBytesPerSec` do it:
//! - **Start:** the first body byte must arrive within `start` of the body's start (a WinInet
//!   terminal that re-sent a POST's headers without its body, KB 833301, is refused quickly).
//! - **Rate:** after that, the bytes received by time `t` must be at least `min_rate × t`, so a
//!   sender trickling one byte now and then is cut off however long its body is.
//! - **Total:** the whole body must arrive within `total`.
//!
//! A body under these rules is a function of bytes received and time elapsed only, so the
//! proxy asks one question before each read: by when must the next byte have arrived?

use std::time::Duration;

/// The pacing rules for one request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    /// The first byte must arrive within this long.
    pub start: Duration,
    /// Bytes per second the body must keep up on average once started; 0 disables the rule.
    pub min_rate: u64,
    /// The whole body must arrive within this long.
    pub total: Duration,
}

impl BodyPace {
    /// The time, from the body's start, by which more than `received` bytes must have
    /// arrived; past it the sender is too slow.
    ///
    /// With `received` bytes in, the rate rule still holds until `received / min_rate`; the
    /// start rule holds until `start`; neither may extend past `total`.
    pub fn next_byte_due(&self, received: u64) -> Duration {
        let by_rate = match (received, self.min_rate) {
            // Nothing in yet: only the start rule.
            (0, _) => Duration::ZERO,
            // No rate rule: only the total.
            (_, 0) => self.total,
            // received / rate seconds, in nanoseconds without overflow.
            (n, rate) => {
                let nanos = u128::from(n) * 1_000_000_000 / u128::from(rate);
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
        };
        by_rate.max(self.start).min(self.total)
    }

    /// Whether a sender that has sent `received` bytes after `elapsed` is too slow.
    pub fn too_slow(&self, received: u64, elapsed: Duration) -> bool {
        elapsed >= self.next_byte_due(received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pace() -> BodyPace {
        BodyPace {
            start: Duration::from_secs(2),
            min_rate: 240,
            total: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_body_that_never_starts_is_due_at_the_start_deadline() {
        assert_eq!(pace().next_byte_due(0), Duration::from_secs(2));
        assert!(!pace().too_slow(0, Duration::from_millis(1999)));
        assert!(pace().too_slow(0, Duration::from_secs(2)));
    }

    #[test]
    fn a_started_body_keeps_the_rate() {
        let p = pace();
        // 240 bytes buy one second, but the start grace still applies.
        assert_eq!(p.next_byte_due(240), Duration::from_secs(2));
        // 2,400 bytes buy ten seconds.
        assert_eq!(p.next_byte_due(2_400), Duration::from_secs(10));
        assert!(p.too_slow(2_400, Duration::from_secs(10)));
        assert!(!p.too_slow(2_400, Duration::from_millis(9_999)));
    }

    #[test]
    fn the_total_deadline_caps_a_fast_sender() {
        // 100 kB at 240 B/s would buy 416 s; the whole body still has 30 s.
        assert_eq!(pace().next_byte_due(100_000), Duration::from_secs(30));
    }

    #[test]
    fn rate_zero_leaves_start_and_total() {
        let p = BodyPace {
            min_rate: 0,
            ..pace()
        };
        assert_eq!(p.next_byte_due(0), Duration::from_secs(2));
        assert_eq!(p.next_byte_due(1), Duration::from_secs(30));
    }

    proptest! {
        /// More bytes never make the deadline earlier, and it always lies in [start ∧ total, total].
        #[test]
        fn deadline_is_monotone_and_bounded(
            start_ms in 0u64..10_000,
            rate in 0u64..1_000_000,
            total_ms in 1u64..100_000,
            a in 0u64..10_000_000,
            b in 0u64..10_000_000,
        ) {
            let p = BodyPace {
                start: Duration::from_millis(start_ms),
                min_rate: rate,
                total: Duration::from_millis(total_ms),
            };
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(p.next_byte_due(lo) <= p.next_byte_due(hi));
            prop_assert!(p.next_byte_due(hi) <= p.total);
            prop_assert!(p.next_byte_due(lo) >= p.start.min(p.total));
        }

        /// A sender exactly at the rate is never refused before the total deadline ends.
        #[test]
        fn a_sender_at_the_rate_is_never_too_slow(rate in 1u64..100_000, secs in 0u64..29) {
            let p = BodyPace { min_rate: rate, ..pace() };
            let elapsed = Duration::from_secs(secs);
            // It has sent rate × (elapsed + 1 s) bytes: a second ahead.
            prop_assert!(!p.too_slow(rate * (secs + 1), elapsed));
        }
    }
}
