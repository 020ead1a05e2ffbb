//! Backend health from check results: `rise` successes in a row to turn up, `fall` failures in
//! a row to turn down.
//!
//! Fed by active checks (one result per check) and by passive observations of real traffic
//! (connect failures and timeouts count as failures). Pure counting; the proxy owns the timers
//! and sockets.
//!
//! **The recovery rule.** A backend that *passive* failures took down (real requests could not
//! reach it) is judged only on whether it answers again: while it is down for that reason, any
//! HTTP answer below 500 counts as alive, whatever [`Expect`] says, and with no active check
//! configured the proxy still probes it. A strict `expect_status` can keep a backend from being
//! declared up by the active check, never from coming back after an outage it no longer has.

/// Which HTTP answers an active check counts as alive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expect {
    /// Any answer below 500: the server answered (a legacy site often answers 403 or 404 at `/`).
    #[default]
    Below500,
    /// Only these statuses (`health.expect_status`).
    Statuses(Vec<u16>),
}

impl Expect {
    /// Whether `status` passes.
    pub fn accepts(&self, status: u16) -> bool {
        match self {
            Expect::Below500 => status < 500,
            Expect::Statuses(list) => list.contains(&status),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Below500 => f.write_str("any answer below 500"),
            Expect::Statuses(list) => {
                let list: Vec<String> = list.iter().map(u16::to_string).collect();
                write!(f, "only {}", list.join(", "))
            }
        }
    }
}

/// Why a backend is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownCause {
    /// `fall` active checks failed in a row.
    Check,
    /// Real requests failed to reach it (connect failures, timeouts).
    Passive,
}

/// A change of a backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It was down and is now up.
    Up,
    /// It was up and is now down.
    Down,
}

/// Consecutive-result health tracker.
#[derive(Debug, Clone)]
pub struct Health {
    rise: u32,
    fall: u32,
    healthy: bool,
    successes: u32,
    failures: u32,
    cause: Option<DownCause>,
}

impl Health {
    /// A tracker that starts healthy (sluice starts serving at once; the slow-start ramp
    /// protects the backend meanwhile). `rise` and `fall` are at least 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Health {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: true,
            successes: 0,
            failures: 0,
            cause: None,
        }
    }

    /// Whether the backend is considered up.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Failing checks in a row that take the backend down.
    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Why the backend is down; `None` while it is up.
    pub fn down_cause(&self) -> Option<DownCause> {
        self.cause
    }

    /// Whether an HTTP answer with `status` counts as alive now: by `expect`, except while
    /// passive failures hold the backend down, when any answer below 500 does (the recovery
    /// rule, see the module docs).
    pub fn alive_on(&self, expect: &Expect, status: u16) -> bool {
        match self.cause {
            Some(DownCause::Passive) => Expect::Below500.accepts(status),
            _ => expect.accepts(status),
        }
    }

    /// Record one result; returns the transition it caused, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= self.rise {
                self.healthy = true;
                self.cause = None;
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= self.fall {
                self.healthy = false;
                self.cause = Some(DownCause::Check);
                return Some(Transition::Down);
            }
        }
        None
    }

    /// Mark the backend down at once because real requests failed to reach it (`passive_failures`
    /// in a row). Until it is up again the recovery rule applies.
    pub fn force_down(&mut self) -> Option<Transition> {
        self.successes = 0;
        if self.healthy {
            self.healthy = false;
            self.failures = self.fall;
            self.cause = Some(DownCause::Passive);
            return Some(Transition::Down);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None); // resets the failure run
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Transition::Down));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Transition::Up));
        assert!(h.healthy());
    }

    #[test]
    fn force_down_once() {
        let mut h = Health::new(1, 5);
        assert_eq!(h.force_down(), Some(Transition::Down));
        assert_eq!(h.force_down(), None);
        assert_eq!(h.observe(true), Some(Transition::Up));
    }

    #[test]
    fn default_expect_is_any_answer_below_500() {
        let e = Expect::default();
        for ok in [200, 204, 301, 403, 404, 499] {
            assert!(e.accepts(ok), "{ok}");
        }
        for bad in [500, 502, 503, 504] {
            assert!(!e.accepts(bad), "{bad}");
        }
        let strict = Expect::Statuses(vec![200, 204]);
        assert!(strict.accepts(204));
        assert!(!strict.accepts(404));
        assert_eq!(e.to_string(), "any answer below 500");
        assert_eq!(strict.to_string(), "only 200, 204");
    }

    /// A backend that passive failures took down comes back on any answer below 500, even
    /// when the active check expects only 200; one that the active check took down does not.
    #[test]
    fn passive_down_recovers_on_any_answer_below_500_even_with_a_strict_list() {
        let strict = Expect::Statuses(vec![200]);
        let mut h = Health::new(2, 3);
        assert!(h.alive_on(&strict, 200));
        assert!(!h.alive_on(&strict, 404), "up: the strict list applies");
        assert_eq!(h.force_down(), Some(Transition::Down));
        assert_eq!(h.down_cause(), Some(DownCause::Passive));
        assert!(h.alive_on(&strict, 404), "passive-down: a 404 is an answer");
        assert!(!h.alive_on(&strict, 503), "a 5xx is not");
        assert_eq!(h.observe(h.alive_on(&strict, 404)), None);
        assert_eq!(h.observe(h.alive_on(&strict, 404)), Some(Transition::Up));
        assert_eq!(h.down_cause(), None);
        assert!(
            !h.alive_on(&strict, 404),
            "up again: the strict list applies again"
        );

        // Taken down by the strict check itself: only an expected status brings it back.
        let mut h = Health::new(1, 1);
        assert_eq!(h.observe(false), Some(Transition::Down));
        assert_eq!(h.down_cause(), Some(DownCause::Check));
        assert!(!h.alive_on(&strict, 404));
        // Passive failures while down do not change the cause.
        assert_eq!(h.force_down(), None);
        assert_eq!(h.down_cause(), Some(DownCause::Check));
    }
}
