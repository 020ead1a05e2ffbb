//! One instance's side of a shared backend budget: what it may use of its leased share, and
//! what it reports when it renews.
//!
//! Several sluice instances in front of one backend split its cap N into *shares*. The
//! authoritative split lives in Redis and is changed only by a Lua script that runs there and
//! reads Redis's own clock (see `proxy/src/ops/cluster.lua`). This module is the instance's half,
//! pure arithmetic with time passed in, so it can be tested without Redis:
//!
//! - **Local cap.** While the last grant is *provably* valid the instance may admit up to its
//!   granted share. Provably: the renewal that brought it was *sent* at `t`, Redis stamped the
//!   lease `now_redis + ttl` with `now_redis` after `t`, so the lease is still held in Redis at
//!   least until `t + ttl` by the instance's own monotonic clock, less `margin` for clock-rate
//!   differences. Past that the instance falls back to its `safe_share`, which every instance
//!   may use whatever the others do (the script keeps every instance's safe share reserved,
//!   see the script's header). A process that starts afresh (not an upgrade) may have a
//!   crashed predecessor whose requests still run at the backend: it admits nothing until its
//!   first grant (the script then holds the predecessor's share apart until it expires), or,
//!   with Redis unreachable, until `startup_wait` (the lease TTL plus the longest request
//!   deadline) has passed.
//! - **Shrinking** happens here first: when the script's target is below the grant, the local
//!   cap steps down (by at most `step`) at once, and the smaller share is reported only at the
//!   next renewal, as `used` = the most this instance may have in flight. Redis never records
//!   less than that, so the sum of what instances use never exceeds the sum Redis holds.
//! - **Demand** is the peak of in-flight plus queued requests since the last renewal: an
//!   instance with a queue asks for more than it has, one with idle slots for less.

use std::time::{Duration, Instant};

/// An instance's lease settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// What the instance may use without a valid lease.
    pub safe_share: u32,
    /// The lease's time to live, as Redis counts it.
    pub ttl: Duration,
    /// Subtracted from `ttl` on the instance's clock, for clock-rate differences.
    pub margin: Duration,
    /// Largest change of the local cap per renewal.
    pub step: u32,
    /// A fresh process with no grant yet falls back to `safe_share` only after this long
    /// (the TTL plus the longest request deadline): by then a crashed predecessor's lease has
    /// expired and its last requests have ended.
    pub startup_wait: Duration,
}

impl LeaseConfig {
    /// How often to renew: three times per TTL, so two renewals in a row may fail before the
    /// lease runs out.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// What the script granted at one renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The share Redis now records for this instance.
    pub share: u32,
    /// Where the script wants this instance's share to go (its fair part of the demand).
    pub target: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    granted: Granted,
    valid_until: Instant,
}

/// Why the local cap is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// A valid lease.
    Lease,
    /// No valid lease: the safe share.
    Safe,
    /// A fresh start with no grant yet, within `startup_wait`: nothing.
    Starting,
}

impl Basis {
    /// The label used in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Lease => "lease",
            Basis::Safe => "safe",
            Basis::Starting => "starting",
        }
    }
}

/// The instance's lease on one backend.
#[derive(Debug, Clone)]
pub struct Lease {
    cfg: LeaseConfig,
    started: Instant,
    /// Still waiting for the first grant of a fresh start.
    fresh: bool,
    held: Option<Held>,
    /// The local cap in force, stepped down toward a lower target between renewals.
    cap: u32,
}

/// What an instance tells the script at a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Peak of in-flight plus queued requests since the last renewal.
    pub demand: u32,
    /// The most this instance may have in flight until it applies the reply: Redis records
    /// at least this much for it.
    pub used: u32,
    /// First renewal of a fresh process: the script sets the previous incarnation's share
    /// apart until it expires.
    pub fresh: bool,
}

impl Lease {
    /// A lease for a process started at `now`; `fresh` unless it took over from an old
    /// process by an upgrade hand-over (which keeps the cap across the two by itself).
    pub fn new(cfg: LeaseConfig, now: Instant, fresh: bool) -> Self {
        Lease {
            cfg,
            started: now,
            fresh,
            held: None,
            cap: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> LeaseConfig {
        self.cfg
    }

    /// Why the cap is what it is at `now`.
    pub fn basis(&self, now: Instant) -> Basis {
        match self.held {
            Some(h) if now < h.valid_until => Basis::Lease,
            _ if self.fresh && now < self.started + self.cfg.startup_wait => Basis::Starting,
            _ => Basis::Safe,
        }
    }

    /// The local cap at `now`: the (stepped-down) grant while the lease is provably valid,
    /// else the safe share (nothing during a fresh start's wait).
    pub fn cap(&self, now: Instant) -> u32 {
        match self.basis(now) {
            Basis::Lease => self.cap,
            Basis::Safe => self.cfg.safe_share,
            Basis::Starting => 0,
        }
    }

    /// The last grant, whether or not it is still valid.
    pub fn granted(&self) -> Option<Granted> {
        self.held.map(|h| h.granted)
    }

    /// When the lease stops being provably valid (`None` before the first grant).
    pub fn valid_until(&self) -> Option<Instant> {
        self.held.map(|h| h.valid_until)
    }

    /// The report for a renewal sent at `now`, with `inflight` requests at the backend and
    /// `peak` the peak of in-flight plus queued since the last renewal.
    pub fn report(&self, now: Instant, inflight: u32, peak: u32) -> Report {
        Report {
            demand: peak,
            used: self.cap(now).max(inflight),
            fresh: self.fresh,
        }
    }

    /// Apply the script's reply to a renewal that was sent at `sent_at`. Growth is already
    /// recorded in Redis, so it applies at once; a target below the grant lowers the local cap
    /// by at most `step` now, and the next report tells Redis.
    pub fn on_grant(&mut self, sent_at: Instant, granted: Granted) {
        let valid_until = (sent_at + self.cfg.ttl)
            .checked_sub(self.cfg.margin)
            .unwrap_or(sent_at);
        self.fresh = false;
        self.held = Some(Held {
            granted,
            valid_until,
        });
        self.cap = step_down(granted, self.cfg.step);
    }
}

/// The local cap for a grant: the share, or, when the target is lower, one step toward it.
pub fn step_down(g: Granted, step: u32) -> u32 {
    if g.target < g.share {
        g.share.saturating_sub(step.max(1)).max(g.target)
    } else {
        g.share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            safe_share: 4,
            ttl: Duration::from_secs(3),
            margin: Duration::from_millis(300),
            step: 4,
            startup_wait: Duration::from_secs(13),
        }
    }

    #[test]
    fn a_fresh_start_admits_nothing_until_granted_or_the_wait_is_over() {
        let t = Instant::now();
        let l = Lease::new(cfg(), t, true);
        assert_eq!(l.cap(t), 0);
        assert_eq!(l.basis(t + Duration::from_secs(12)), Basis::Starting);
        assert_eq!(l.cap(t + Duration::from_secs(13)), 4, "then the safe share");
        let up = Lease::new(cfg(), t, false);
        assert_eq!(
            up.cap(t),
            4,
            "an upgrade's new process starts at the safe share"
        );
    }

    #[test]
    fn the_grant_holds_until_sent_at_plus_ttl_less_the_margin_then_the_safe_share() {
        let t = Instant::now();
        let mut l = Lease::new(cfg(), t, true);
        let sent = t + Duration::from_millis(10);
        l.on_grant(
            sent,
            Granted {
                share: 20,
                target: 20,
            },
        );
        assert_eq!(l.cap(sent + Duration::from_millis(2_699)), 20);
        assert_eq!(l.cap(sent + Duration::from_millis(2_700)), 4);
        assert_eq!(l.basis(sent + Duration::from_secs(5)), Basis::Safe);
        // A fresh process that got a grant once falls back to safe, not to nothing.
        assert_eq!(l.cap(sent + Duration::from_secs(1)), 20);
    }

    #[test]
    fn shrinking_lowers_the_cap_first_by_at_most_a_step_and_reports_it_after() {
        let t = Instant::now();
        let mut l = Lease::new(cfg(), t, false);
        l.on_grant(
            t,
            Granted {
                share: 20,
                target: 9,
            },
        );
        assert_eq!(l.cap(t), 16, "one step down at once");
        // In-flight above the new cap is reported: Redis keeps holding it.
        assert_eq!(l.report(t, 18, 18).used, 18);
        assert_eq!(l.report(t, 3, 3).used, 16);
        l.on_grant(
            t,
            Granted {
                share: 16,
                target: 9,
            },
        );
        assert_eq!(l.cap(t), 12);
        l.on_grant(
            t,
            Granted {
                share: 10,
                target: 9,
            },
        );
        assert_eq!(l.cap(t), 9, "never below the target");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the grants and timings: the cap is never above the grant while the
            /// lease is valid, is the safe share after it, a report never claims less than the
            /// cap or the work in flight, and one renewal lowers the cap by at most `step`.
            #[test]
            fn the_cap_never_exceeds_what_can_be_proven(
                grants in proptest::collection::vec((0u32..64, 0u32..64, 0u64..5_000, 0u32..64), 1..50),
                step in 1u32..8,
                safe in 0u32..16,
            ) {
                let c = LeaseConfig { safe_share: safe, step, ..cfg() };
                let t0 = Instant::now();
                let mut now = t0;
                let mut l = Lease::new(c, t0, true);
                for (share, target, wait_ms, inflight) in grants {
                    let before = l.cap(now);
                    let r = l.report(now, inflight, inflight);
                    prop_assert!(r.used >= before && r.used >= inflight);
                    let g = Granted { share: share.max(r.used), target };
                    l.on_grant(now, g);
                    let cap = l.cap(now);
                    prop_assert!(cap <= g.share);
                    prop_assert!(cap >= g.share.saturating_sub(step).min(g.share));
                    prop_assert!(cap >= target.min(g.share));
                    now += Duration::from_millis(wait_ms);
                    let valid = now < l.valid_until().unwrap_or(now);
                    prop_assert_eq!(l.cap(now), if valid { cap } else { safe });
                }
            }
        }
    }
}
