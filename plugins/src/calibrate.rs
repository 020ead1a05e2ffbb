//! Calibration: which concurrency steps to measure a backend at, when to stop, and what
//! `max_inflight` to propose from the measurements.
//!
//! `sluice calibrate` holds a backend at a fixed number of concurrent requests for a while,
//! records the throughput and latency of that *step* as a [`Step`], and asks a [`Calibration`]
//! for the next concurrency to try. This module only decides; it sends nothing and reads no
//! clock, so every decision can be driven from unit tests with synthetic steps.
//!
//! **The schedule.** Concurrency doubles from 1 up to [`DOUBLING_UNTIL`] (1, 2, 4, 8), then
//! grows by [`GROWTH`] (+25 %, at least +1) per step, never past the operator's `max`, whose
//! value is always the last step of the ramp. Doubling all the way would overshoot a knee at 32
//! by a factor of two (to 64, the lock-up point of the demo server); +25 % steps overshoot by at
//! most a quarter per step.
//!
//! **Stopping the ramp** after a step, at the first of:
//! - any error (a 5xx, a reset, a timeout), or no request completed: the server is in trouble;
//! - p99 above the bound (by default [`DEFAULT_P99_FACTOR`] × the p99 at concurrency 1, at
//!   least [`MIN_P99_BOUND`]);
//! - throughput fell below [`FALL`] × the best so far;
//! - throughput stayed below [`RISE`] × the best so far (less than 5 % gain) for
//!   [`FLAT_STEPS`] steps in a row: past the knee, more concurrency only queues inside the
//!   server;
//! - the step ran at `max`.
//!
//! **Refining.** The ramp's coarse steps only bracket the knee. Unless the ramp stopped on
//! errors (then the server is left alone), up to [`MAX_REFINE_STEPS`] more steps bisect the
//! gap between the highest clean step below the knee and the knee, until the gap is at most a
//! tenth of the knee (or 1). These steps are all below a concurrency already measured clean.
//!
//! **The proposal** ([`Proposal`]): the knee, the lowest clean concurrency whose throughput
//! reached [`KNEE_FRACTION`] (95 %) of the best clean throughput, capped at [`SAFETY`] (80 %)
//! of the highest concurrency the server was seen to take cleanly: the server has then been
//! seen to cope with at least 1.25 × the proposal.

use std::fmt;
use std::time::Duration;

/// Concurrency doubles while below this.
pub const DOUBLING_UNTIL: u32 = 8;
/// Growth factor per step from [`DOUBLING_UNTIL`] on.
pub const GROWTH: f64 = 1.25;
/// A step *rises* when its throughput is at least this × the best so far.
pub const RISE: f64 = 1.05;
/// The ramp stops at once when a step's throughput is below this × the best so far.
pub const FALL: f64 = 0.90;
/// The ramp stops after this many steps in a row that did not rise.
pub const FLAT_STEPS: u32 = 2;
/// The knee: the lowest concurrency whose throughput reached this fraction of the best.
pub const KNEE_FRACTION: f64 = 0.95;
/// The proposal is at most this × the highest concurrency measured clean.
pub const SAFETY: f64 = 0.8;
/// Default p99 bound: this × the p99 measured at concurrency 1 ...
pub const DEFAULT_P99_FACTOR: u32 = 5;
/// ... but at least this, so that scheduler jitter on a fast backend is not taken for overload.
pub const MIN_P99_BOUND: Duration = Duration::from_millis(25);
/// Most bisection steps after the ramp.
pub const MAX_REFINE_STEPS: u32 = 6;

/// What one step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Concurrent requests held during the step.
    pub concurrency: u32,
    /// Requests completed (any status below 500) within the measured window.
    pub completed: u64,
    /// Completed requests per second within the measured window.
    pub throughput: f64,
    /// Latency percentiles of the completed requests.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Errors during the whole step (warm-up included): 5xx, resets, timeouts, refused
    /// connections, malformed answers.
    pub errors: u64,
}

impl Step {
    /// Clean: no errors, something completed, and p99 within `bound` (if known).
    pub fn is_clean(&self, bound: Option<Duration>) -> bool {
        self.errors == 0 && self.completed > 0 && bound.is_none_or(|b| self.p99 <= b)
    }
}

/// Why the ramp stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// Errors appeared at this concurrency.
    Errors {
        /// The step's concurrency.
        concurrency: u32,
        /// How many.
        errors: u64,
    },
    /// No request completed within the measured window.
    NoCompletions {
        /// The step's concurrency.
        concurrency: u32,
    },
    /// p99 went over the bound.
    P99Bound {
        /// The step's concurrency.
        concurrency: u32,
        /// The step's p99.
        p99: Duration,
        /// The bound.
        bound: Duration,
    },
    /// Throughput fell below [`FALL`] × the best.
    Fell {
        /// The step's concurrency.
        concurrency: u32,
    },
    /// Throughput stopped rising for [`FLAT_STEPS`] steps.
    Plateau {
        /// The last step's concurrency.
        concurrency: u32,
    },
    /// The ramp reached the operator's maximum.
    MaxReached {
        /// The maximum.
        max: u32,
    },
    /// The operator interrupted the calibration.
    Interrupted,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Errors {
                concurrency,
                errors,
            } => write!(f, "{errors} error(s) at concurrency {concurrency}"),
            StopReason::NoCompletions { concurrency } => {
                write!(f, "no request completed at concurrency {concurrency}")
            }
            StopReason::P99Bound {
                concurrency,
                p99,
                bound,
            } => write!(
                f,
                "p99 {} ms over the bound of {} ms at concurrency {concurrency}",
                ms(*p99),
                ms(*bound)
            ),
            StopReason::Fell { concurrency } => write!(
                f,
                "throughput fell by more than {:.0} % at concurrency {concurrency}",
                (1.0 - FALL) * 100.0
            ),
            StopReason::Plateau { concurrency } => write!(
                f,
                "throughput gained less than {:.0} % for {FLAT_STEPS} steps (up to concurrency {concurrency})",
                (RISE - 1.0) * 100.0
            ),
            StopReason::MaxReached { max } => write!(f, "reached --max {max}"),
            StopReason::Interrupted => write!(f, "interrupted"),
        }
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Ramp { next: u32 },
    Refine,
    Done,
}

/// The state of one calibration: the steps measured so far and what to do next.
#[derive(Debug, Clone)]
pub struct Calibration {
    max: u32,
    p99_bound: Option<Duration>,
    steps: Vec<Step>,
    phase: Phase,
    best: f64,
    flat: u32,
    refined: u32,
    stop: Option<StopReason>,
    /// The ramp's last step, at `max`, still rose by at least [`RISE`].
    rising_at_max: bool,
}

/// The next ramp step after `c`, capped at `max`.
pub fn next_ramp_step(c: u32, max: u32) -> u32 {
    let next = if c < DOUBLING_UNTIL {
        c.saturating_mul(2)
    } else {
        let grown = (f64::from(c) * GROWTH).ceil();
        let grown = if grown >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            grown as u32
        };
        grown.max(c.saturating_add(1))
    };
    next.min(max)
}

impl Calibration {
    /// A calibration that never tries more than `max` (at least 1) concurrent requests. With
    /// no `p99_bound`, the bound is [`DEFAULT_P99_FACTOR`] × the p99 of the first step (at
    /// least [`MIN_P99_BOUND`]).
    pub fn new(max: u32, p99_bound: Option<Duration>) -> Self {
        Calibration {
            max: max.max(1),
            p99_bound,
            steps: Vec::new(),
            phase: Phase::Ramp { next: 1 },
            best: 0.0,
            flat: 0,
            refined: 0,
            stop: None,
            rising_at_max: false,
        }
    }

    /// The highest concurrency this calibration may try.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The p99 bound: as given, or derived from the first step; `None` before it.
    pub fn p99_bound(&self) -> Option<Duration> {
        self.p99_bound
    }

    /// The steps measured so far, in the order they ran.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Why the ramp stopped, once it has.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref()
    }

    /// Whether there is nothing more to measure.
    pub fn is_done(&self) -> bool {
        self.next_concurrency().is_none()
    }

    /// The concurrency to measure next, or `None` when the calibration is over. Never more
    /// than `max`.
    pub fn next_concurrency(&self) -> Option<u32> {
        match self.phase {
            Phase::Ramp { next } => Some(next.min(self.max)),
            Phase::Refine => self.refine_target(),
            Phase::Done => None,
        }
    }

    /// Stops now (e.g. on Ctrl-C): no further steps.
    pub fn interrupt(&mut self) {
        if matches!(self.phase, Phase::Ramp { .. }) {
            self.stop = Some(StopReason::Interrupted);
        }
        self.phase = Phase::Done;
    }

    /// Records the step just measured (its concurrency should be [`Self::next_concurrency`]).
    pub fn record(&mut self, step: Step) {
        if self.steps.is_empty() && self.p99_bound.is_none() {
            self.p99_bound = Some((step.p99 * DEFAULT_P99_FACTOR).max(MIN_P99_BOUND));
        }
        let bound = self.p99_bound;
        let c = step.concurrency;
        let clean = step.is_clean(bound);
        let (errors, completed, p99, tput) =
            (step.errors, step.completed, step.p99, step.throughput);
        self.steps.push(step);
        match self.phase {
            Phase::Done => {}
            Phase::Refine => {
                self.refined += 1;
                if !clean {
                    self.phase = Phase::Done;
                }
            }
            Phase::Ramp { .. } => {
                let stop = if errors > 0 {
                    Some(StopReason::Errors {
                        concurrency: c,
                        errors,
                    })
                } else if completed == 0 {
                    Some(StopReason::NoCompletions { concurrency: c })
                } else if let Some(b) = bound.filter(|b| p99 > *b) {
                    Some(StopReason::P99Bound {
                        concurrency: c,
                        p99,
                        bound: b,
                    })
                } else if self.best > 0.0 && tput < self.best * FALL {
                    Some(StopReason::Fell { concurrency: c })
                } else {
                    if tput >= self.best * RISE {
                        self.flat = 0;
                    } else {
                        self.flat += 1;
                    }
                    self.best = self.best.max(tput);
                    if self.flat >= FLAT_STEPS {
                        Some(StopReason::Plateau { concurrency: c })
                    } else if c >= self.max {
                        self.rising_at_max = self.flat == 0;
                        Some(StopReason::MaxReached { max: self.max })
                    } else {
                        None
                    }
                };
                match stop {
                    None => {
                        self.phase = Phase::Ramp {
                            next: next_ramp_step(c, self.max),
                        }
                    }
                    Some(reason) => {
                        // After errors the server is left alone: no more steps at all.
                        self.phase = if matches!(
                            reason,
                            StopReason::Errors { .. } | StopReason::NoCompletions { .. }
                        ) {
                            Phase::Done
                        } else {
                            Phase::Refine
                        };
                        self.stop = Some(reason);
                    }
                }
            }
        }
    }

    /// Clean steps below the lowest unclean concurrency and below a fall in throughput (a
    /// clean step above a failure does not count: the failure is the better guide).
    fn trusted(&self) -> impl Iterator<Item = &Step> {
        let bound = self.p99_bound;
        let fell = match self.stop {
            Some(StopReason::Fell { concurrency }) => concurrency,
            _ => u32::MAX,
        };
        let lowest_unclean = self
            .steps
            .iter()
            .filter(|s| !s.is_clean(bound))
            .map(|s| s.concurrency)
            .min()
            .unwrap_or(u32::MAX)
            .min(fell);
        self.steps
            .iter()
            .filter(move |s| s.is_clean(bound) && s.concurrency < lowest_unclean)
    }

    /// (knee, best throughput) over the trusted steps.
    fn knee(&self) -> Option<(u32, f64)> {
        let best = self.trusted().map(|s| s.throughput).fold(0.0_f64, f64::max);
        if best <= 0.0 {
            return None;
        }
        let knee = self
            .trusted()
            .filter(|s| s.throughput >= best * KNEE_FRACTION)
            .map(|s| s.concurrency)
            .min()?;
        Some((knee, best))
    }

    fn refine_target(&self) -> Option<u32> {
        if self.refined >= MAX_REFINE_STEPS {
            return None;
        }
        let (knee, _) = self.knee()?;
        let lo = self
            .trusted()
            .map(|s| s.concurrency)
            .filter(|c| *c < knee)
            .max()?;
        let gap = knee - lo;
        if gap <= (knee / 10).max(1) {
            return None;
        }
        Some(lo + gap / 2)
    }

    /// The proposed `max_inflight`, or `None` when no step was clean.
    pub fn proposal(&self) -> Option<Proposal> {
        let (knee, best) = self.knee()?;
        let highest_clean = self.trusted().map(|s| s.concurrency).max()?;
        let cap = ((f64::from(highest_clean) * SAFETY).floor() as u32).max(1);
        Some(Proposal {
            max_inflight: knee.min(cap),
            knee,
            best_throughput: best,
            highest_clean,
            still_rising: self.rising_at_max,
            max: self.max,
        })
    }
}

/// What calibrate proposes for `admission.max_inflight`.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The proposed value.
    pub max_inflight: u32,
    /// The lowest clean concurrency reaching [`KNEE_FRACTION`] of the best throughput.
    pub knee: u32,
    /// The best clean throughput, requests per second.
    pub best_throughput: f64,
    /// The highest concurrency the backend was seen to take cleanly.
    pub highest_clean: u32,
    /// Throughput still rose (by at least [`RISE`]) at the ramp's last step, at `--max`: the
    /// capacity lies above what was tried.
    pub still_rising: bool,
    /// The calibration's maximum.
    pub max: u32,
}

impl Proposal {
    /// One line: why this value.
    pub fn rationale(&self) -> String {
        let best = self.best_throughput.round();
        if self.still_rising {
            format!(
                "throughput was still rising at --max {} ({best} req/s): the capacity is above what \
                 was tried; {} is {:.0} % of the highest clean step. Run again with a higher --max \
                 only if the server is known to take it.",
                self.max,
                self.max_inflight,
                SAFETY * 100.0
            )
        } else if self.max_inflight < self.knee {
            format!(
                "throughput reached {:.0} % of its best ({best} req/s) at {} concurrent requests, \
                 but the server was seen clean only up to {}: {} keeps {:.0} % of that.",
                KNEE_FRACTION * 100.0,
                self.knee,
                self.highest_clean,
                self.max_inflight,
                SAFETY * 100.0
            )
        } else {
            format!(
                "throughput reached {:.0} % of its best ({best} req/s) at {} concurrent requests; \
                 more only queued inside the server. It took {} cleanly, {:.2} × the proposal.",
                KNEE_FRACTION * 100.0,
                self.knee,
                self.highest_clean,
                f64::from(self.highest_clean) / f64::from(self.max_inflight.max(1))
            )
        }
    }
}

/// The `q`-quantile (0..=1) of `sorted` (ascending), nearest rank; zero when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let q = q.clamp(0.0, 1.0);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A step on a synthetic server.
    fn step(c: u32, tput: f64, p99: Duration, errors: u64) -> Step {
        Step {
            concurrency: c,
            completed: (tput * 2.0) as u64,
            throughput: tput,
            p50: p99 / 2,
            p90: p99 * 9 / 10,
            p99,
            errors,
        }
    }

    /// Drives a calibration against `server` (concurrency → step) to the end; returns it.
    fn drive(max: u32, bound: Option<Duration>, server: impl Fn(u32) -> Step) -> Calibration {
        let mut cal = Calibration::new(max, bound);
        for _ in 0..200 {
            let Some(c) = cal.next_concurrency() else {
                return cal;
            };
            assert!(c >= 1 && c <= max, "step {c} outside 1..={max}");
            cal.record(server(c));
        }
        panic!("calibration did not end in 200 steps");
    }

    /// The emulator's shape: `workers` in parallel, each `service` long; beyond, requests
    /// queue inside and latency grows.
    fn queueing(workers: u32, service_ms: f64) -> impl Fn(u32) -> Step {
        move |c| {
            let served = c.min(workers);
            let tput = f64::from(served) * 1000.0 / service_ms;
            let lat = service_ms * (f64::from(c) / f64::from(workers)).max(1.0);
            step(c, tput, Duration::from_secs_f64(lat * 1.1 / 1000.0), 0)
        }
    }

    fn tried(cal: &Calibration) -> Vec<u32> {
        cal.steps().iter().map(|s| s.concurrency).collect()
    }

    #[test]
    fn ramp_schedule_doubles_then_grows_by_a_quarter_and_ends_at_max() {
        let mut c = 1;
        let mut seen = vec![c];
        while c < 64 {
            c = next_ramp_step(c, 64);
            seen.push(c);
        }
        assert_eq!(seen, [1, 2, 4, 8, 10, 13, 17, 22, 28, 35, 44, 55, 64]);
        assert_eq!(next_ramp_step(u32::MAX - 1, u32::MAX), u32::MAX);
    }

    #[test]
    fn rising_curve_finds_the_knee_and_never_passes_max() {
        let cal = drive(40, None, queueing(32, 20.0));
        let all = tried(&cal);
        assert!(all.iter().all(|c| *c <= 40), "{all:?}");
        // The ramp: 1 2 4 8 10 13 17 22 28 35 40, then a refinement between 28 and 35.
        assert_eq!(&all[..11], &[1, 2, 4, 8, 10, 13, 17, 22, 28, 35, 40]);
        assert_eq!(cal.stop_reason(), Some(&StopReason::MaxReached { max: 40 }));
        let p = cal.proposal().expect("proposal");
        assert!((30..=32).contains(&p.knee), "{p:?} after {all:?}");
        assert_eq!(p.max_inflight, p.knee);
        assert!(!p.still_rising);
        assert_eq!(p.highest_clean, 40);
    }

    #[test]
    fn plateau_stops_after_two_flat_steps() {
        let cal = drive(256, None, queueing(32, 20.0));
        // 35 still rose (+14 % over 28); 44 and 55 did not: stop there.
        assert_eq!(
            cal.stop_reason(),
            Some(&StopReason::Plateau { concurrency: 55 })
        );
        assert!(tried(&cal).iter().all(|c| *c <= 55), "{:?}", tried(&cal));
        let p = cal.proposal().expect("proposal");
        assert!((30..=32).contains(&p.max_inflight), "{p:?}");
        assert!(
            p.rationale().contains("more only queued"),
            "{}",
            p.rationale()
        );
    }

    #[test]
    fn flat_curve_proposes_the_lowest_concurrency() {
        // A single-threaded server: no gain from concurrency at all.
        let cal = drive(64, None, |c| step(c, 50.0, ms(20 * u64::from(c)), 0));
        assert_eq!(tried(&cal), [1, 2, 4], "two flat steps after the first");
        assert_eq!(
            cal.stop_reason(),
            Some(&StopReason::Plateau { concurrency: 4 })
        );
        assert_eq!(cal.proposal().expect("proposal").max_inflight, 1);
    }

    #[test]
    fn still_rising_at_max_proposes_a_margin_below_max() {
        let cal = drive(40, None, queueing(256, 20.0));
        let p = cal.proposal().expect("proposal");
        assert!(p.still_rising, "{p:?}");
        assert_eq!(p.max_inflight, 32, "80 % of 40");
        assert!(p.rationale().contains("still rising"), "{}", p.rationale());
    }

    #[test]
    fn falling_curve_stops_at_once() {
        // Throughput collapses past 16 (thrashing).
        let cal = drive(64, None, |c| {
            let tput = if c <= 16 { f64::from(c) * 50.0 } else { 400.0 };
            step(c, tput, ms(22), 0)
        });
        assert_eq!(
            cal.stop_reason(),
            Some(&StopReason::Fell { concurrency: 17 })
        );
        assert!(tried(&cal).iter().all(|c| *c <= 17));
        let p = cal.proposal().expect("proposal");
        // The best was at 13; the fall at 17 is not trusted: 80 % of 13.
        assert_eq!(p.knee, 13);
        assert_eq!(p.highest_clean, 13);
        assert_eq!(p.max_inflight, 10);
        assert!(
            p.rationale().contains("seen clean only up to 13"),
            "{}",
            p.rationale()
        );
    }

    #[test]
    fn p99_blow_up_stops_and_the_bound_defaults_to_five_times_the_first_p99() {
        let cal = drive(64, None, |c| {
            let p99 = if c >= 13 { ms(400) } else { ms(30) };
            step(c, f64::from(c) * 40.0, p99, 0)
        });
        assert_eq!(cal.p99_bound(), Some(ms(150)));
        assert_eq!(
            cal.stop_reason(),
            Some(&StopReason::P99Bound {
                concurrency: 13,
                p99: ms(400),
                bound: ms(150)
            })
        );
        let p = cal.proposal().expect("proposal");
        assert_eq!(p.highest_clean, 10);
        assert_eq!(p.max_inflight, 8, "80 % of the last clean step");
        // An explicit bound wins, and the default has a floor.
        let cal = drive(64, Some(ms(1000)), |c| {
            step(c, f64::from(c) * 40.0, ms(400), 0)
        });
        assert_eq!(cal.stop_reason(), Some(&StopReason::MaxReached { max: 64 }));
        let cal = drive(4, None, |c| {
            step(c, f64::from(c), Duration::from_micros(100), 0)
        });
        assert_eq!(cal.p99_bound(), Some(MIN_P99_BOUND));
    }

    #[test]
    fn errors_stop_at_once_without_refinement() {
        let cal = drive(64, None, |c| {
            step(c, f64::from(c.min(20)) * 50.0, ms(22), u64::from(c >= 22))
        });
        assert_eq!(
            cal.stop_reason(),
            Some(&StopReason::Errors {
                concurrency: 22,
                errors: 1
            })
        );
        assert_eq!(
            *tried(&cal).last().expect("steps"),
            22,
            "nothing after the error"
        );
        let p = cal.proposal().expect("proposal");
        assert_eq!(p.highest_clean, 17);
        assert_eq!(p.max_inflight, 13);
    }

    #[test]
    fn errors_at_the_first_step_give_no_proposal() {
        let cal = drive(64, None, |c| step(c, 0.0, ms(0), 3));
        assert_eq!(tried(&cal), [1]);
        assert_eq!(cal.proposal(), None);
    }

    #[test]
    fn interrupt_ends_with_what_was_measured() {
        let mut cal = Calibration::new(64, None);
        let server = queueing(32, 20.0);
        for _ in 0..3 {
            let c = cal.next_concurrency().expect("more");
            cal.record(server(c));
        }
        cal.interrupt();
        assert_eq!(cal.next_concurrency(), None);
        assert_eq!(cal.stop_reason(), Some(&StopReason::Interrupted));
        let p = cal.proposal().expect("partial proposal");
        assert_eq!(p.knee, 4);
        assert_eq!(p.max_inflight, 3);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 0.5), ms(50));
        assert_eq!(percentile(&v, 0.99), ms(99));
        assert_eq!(percentile(&v, 1.0), ms(100));
        assert_eq!(percentile(&v, 0.0), ms(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(percentile(&[ms(7)], 0.99), ms(7));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the server does, the calibration ends, never tries more than max,
            /// and proposes at most the knee and at most 80 % of the highest clean step.
            #[test]
            fn bounded_and_conservative(
                max in 1u32..300,
                workers in 1u32..300,
                fail_above in 1u32..400,
                noise in proptest::collection::vec(0.8f64..1.2, 64),
            ) {
                let mut cal = Calibration::new(max, None);
                let mut n = 0;
                while let Some(c) = cal.next_concurrency() {
                    prop_assert!(c >= 1 && c <= max);
                    n += 1;
                    prop_assert!(n <= 60, "too many steps");
                    let tput = f64::from(c.min(workers)) * 50.0 * noise[n % noise.len()];
                    cal.record(step(c, tput, ms(20), u64::from(c > fail_above)));
                }
                if let Some(p) = cal.proposal() {
                    prop_assert!(p.max_inflight >= 1);
                    prop_assert!(p.max_inflight <= p.knee);
                    prop_assert!(p.max_inflight <= max);
                    prop_assert!(p.max_inflight <= fail_above);
                    let cap = ((f64::from(p.highest_clean) * SAFETY).floor() as u32).max(1);
                    prop_assert!(p.max_inflight <= cap);
                }
            }
        }
    }
}
