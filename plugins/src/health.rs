//! Backend health from check results: `rise` successes in a row to turn up, `fall` failures in
//! a row to turn down.
//!
//! Fed by active checks (one result per check) and by passive observations of real traffic
//! (connect failures and timeouts count as failures). Pure counting; the proxy owns the timers
//! and sockets.

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
        }
    }

    /// Whether the backend is considered up.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Record one result; returns the transition it caused, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= self.rise {
                self.healthy = true;
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= self.fall {
                self.healthy = false;
                return Some(Transition::Down);
            }
        }
        None
    }

    /// Mark the backend down at once (a definite failure, such as a refused connection when
    /// `fall` is reached by passive checks elsewhere).
    pub fn force_down(&mut self) -> Option<Transition> {
        self.successes = 0;
        if self.healthy {
            self.healthy = false;
            self.failures = self.fall;
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
}
