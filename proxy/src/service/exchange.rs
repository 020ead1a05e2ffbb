//! One request's exchange with its backend: the single owner of its backend slot.
//!
//! An [`Exchange`] is created when a request (or a health probe) is admitted and owns its
//! [`Permit`]. The few events that matter to the slot are methods on it, called from pingora's
//! hooks in the order pingora runs them:
//! - [`Exchange::connect_refused`]: the backend took no connection. Nothing reached it, so the
//!   slot goes back at once and the request waits again, ahead of the queue
//!   ([`Exchange::readmit`]), while its deadline allows.
//! - [`Exchange::connected`], [`Exchange::sent`], [`Exchange::answered`]: what the backend has
//!   seen so far. Once the request is sent, a dropped exchange (a panic in a hook, the request
//!   deadline) keeps the slot taken for `upstream.timeout_hold`: the backend may still be
//!   working on it.
//! - [`Exchange::finish`] takes the request's one [`Outcome`] and is the only place that
//!   decides between releasing the slot and holding it. It also feeds the backend's health and
//!   learned limit, once per request.
//!
//! [`classify`] turns pingora's error into an [`Outcome`]; the status sluice answers with, the
//! health sample and the metrics label all derive from it.
//!
//! Models: Netflix concurrency-limits' `Limiter.Listener` (`onSuccess` / `onDropped` /
//! `onIgnore`), and tower's `ConcurrencyLimit`, whose permit lives in the response future.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pingora::{Error, ErrorSource, ErrorType};
use sluice_plugins::adaptive::Sample;
use sluice_plugins::BackendId;
use tokio::time::Instant;

use crate::admission::{Admission, LimitNow, Permit, Shed};
use crate::ghost::Claim;

/// How a request ended, as far as its backend slot, the backend's health and the answer are
/// concerned. One value per request, from [`classify`] (or [`Outcome::Answered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend's answer was delivered.
    Answered,
    /// sluice refused the request itself, with this status.
    Refused(u16),
    /// The backend took no connection (refused, unreachable, TLS failed, or timed out).
    ConnectFailed {
        /// The connect timed out (504) rather than failed (502).
        timed_out: bool,
    },
    /// Sent, and the backend did not answer (or read the request) within its timeout.
    UpstreamTimeout {
        /// The answer did not come (504); otherwise the request could not be written (502).
        reading: bool,
    },
    /// The backend connection closed or failed after the request was sent.
    Cut,
    /// The backend answered something that is not a usable HTTP answer.
    BadAnswer,
    /// The client left, or could not be written to.
    ClientGone,
    /// The client's request was malformed.
    BadRequest,
    /// sluice's own failure.
    Internal,
}

impl Outcome {
    /// The status sluice answers with when no answer has been sent yet; 0 when nothing can be
    /// sent (the client is gone).
    pub fn status(self) -> u16 {
        match self {
            Outcome::Answered => 0,
            Outcome::Refused(code) => code,
            Outcome::ConnectFailed { timed_out: true }
            | Outcome::UpstreamTimeout { reading: true } => 504,
            Outcome::ConnectFailed { .. }
            | Outcome::UpstreamTimeout { .. }
            | Outcome::Cut
            | Outcome::BadAnswer => 502,
            Outcome::ClientGone => 0,
            Outcome::BadRequest => 400,
            Outcome::Internal => 500,
        }
    }

    /// The backend may still be working on a request that ended this way.
    fn leaves_work_behind(self) -> bool {
        matches!(self, Outcome::UpstreamTimeout { .. })
    }
}

/// The one classification of pingora's errors.
pub fn classify(e: &Error) -> Outcome {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => Outcome::Refused(*code),
        (t, ErrorSource::Upstream) => match t {
            ConnectTimedout => Outcome::ConnectFailed { timed_out: true },
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError
            | SocketError | BindError => Outcome::ConnectFailed { timed_out: false },
            ReadTimedout => Outcome::UpstreamTimeout { reading: true },
            WriteTimedout => Outcome::UpstreamTimeout { reading: false },
            ConnectionClosed | ReadError | WriteError => Outcome::Cut,
            _ => Outcome::BadAnswer,
        },
        (t, ErrorSource::Downstream) => match t {
            WriteError | ReadError | ConnectionClosed | WriteTimedout | ReadTimedout => {
                Outcome::ClientGone
            }
            _ => Outcome::BadRequest,
        },
        _ => Outcome::Internal,
    }
}

/// Why a request never got an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// Refused (queue full, waited too long, no backend up): answered 503.
    Shed(Shed),
    /// The client hung up while it waited; nothing reached the backend.
    ClientGone,
}

/// Where the exchange's slot is.
#[derive(Debug)]
enum Slot {
    /// Held: the request may go (or has gone) to the backend.
    Held(Permit),
    /// Given back after a refused connect; the request waits for another.
    GivenBack,
    /// Given back, and no other came before the request's deadline.
    Shed(Shed),
    /// [`Exchange::finish`] ran.
    Finished,
}

/// The backend's answer header.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: u16,
    latency: Duration,
}

/// What [`Exchange::finish`] decided.
#[derive(Debug)]
pub enum Finished {
    /// The slot is free; the backend's limit after the release, when it learns one.
    Released(Option<LimitNow>),
    /// The backend is most likely still working on the request: its slot stays taken. Dropping
    /// this releases the slot after `hold`; [`crate::ghost`] can release it earlier, when the
    /// backend answers or closes the connection.
    Held(Held),
    /// There was no slot to release (it was given back and never taken again).
    Nothing,
}

/// A slot kept after its request ended without an answer.
#[derive(Debug)]
pub struct Held {
    /// The slot, armed to be released `hold` after it is dropped.
    pub permit: Permit,
    /// The backend connection, when sluice dialed it: the late answer can be read from it.
    pub conn: Option<Claim>,
    /// When the request was sent.
    pub sent: Instant,
    /// The answer header had arrived.
    pub answer_started: bool,
    /// Longest the slot is held.
    pub hold: Duration,
}

/// One admitted request (or health probe) and its backend slot.
#[derive(Debug)]
pub struct Exchange {
    slot: Slot,
    backend: BackendId,
    probe: bool,
    /// The queue deadline, kept for a wait after a refused connect.
    deadline: Instant,
    /// How long the slot stays taken when the exchange ends without the backend's answer.
    hold: Duration,
    /// How long the request waited for its slot.
    queue_wait: Duration,
    /// When the request was sent to the backend.
    sent: Option<Instant>,
    /// The connection the request went on was pooled.
    reused: bool,
    answer: Option<Answer>,
    /// The backend connection, when sluice dialed it.
    conn: Option<Claim>,
}

impl Exchange {
    /// Wait for a slot until `deadline`, giving up as soon as `gone` completes (the client hung
    /// up). `arrived` is when the request arrived; its wait is measured from there. `hold` is
    /// `upstream.timeout_hold`.
    ///
    /// A slot granted in the very instant the client hung up is given back: `gone` is looked
    /// at once more before the request may be forwarded, so a leaver's payment never reaches
    /// the backend.
    pub async fn admit<G: Future>(
        admission: &Arc<Admission>,
        (arrived, now): (Instant, Instant),
        deadline: Instant,
        hold: Duration,
        gone: G,
    ) -> (Result<Exchange, NotAdmitted>, Duration) {
        tokio::pin!(gone);
        let acquired = {
            let acquire = admission.acquire_from(now, deadline, false);
            tokio::pin!(acquire);
            tokio::select! {
                biased;
                r = &mut acquire => r,
                _ = &mut gone => return (Err(NotAdmitted::ClientGone), arrived.elapsed()),
            }
        };
        // Admitted at once, the request waited from its arrival until `now`, the clock read
        // the admission used.
        let queue_wait = match &acquired {
            Ok(permit) if !permit.was_queued() => now.saturating_duration_since(arrived),
            _ => arrived.elapsed(),
        };
        let permit = match acquired {
            Ok(permit) => permit,
            Err(shed) => return (Err(NotAdmitted::Shed(shed)), queue_wait),
        };
        if permit.was_queued() {
            let left = tokio::select! {
                biased;
                _ = &mut gone => true,
                _ = std::future::ready(()) => false,
            };
            if left {
                return (Err(NotAdmitted::ClientGone), queue_wait);
            }
        }
        let mut exchange = Exchange::new(permit, false, deadline, hold);
        exchange.queue_wait = queue_wait;
        (Ok(exchange), queue_wait)
    }

    /// A health probe's exchange: a slot on `backend` whatever its state, inside its cap.
    /// `None` when the backend has no free slot.
    pub fn probe(admission: &Arc<Admission>, backend: BackendId) -> Option<Exchange> {
        let permit = admission.acquire_probe(backend)?;
        let now = Instant::now();
        Some(Exchange::new(permit, true, now, Duration::ZERO))
    }

    fn new(permit: Permit, probe: bool, deadline: Instant, hold: Duration) -> Exchange {
        Exchange {
            backend: permit.backend(),
            slot: Slot::Held(permit),
            probe,
            deadline,
            hold,
            queue_wait: Duration::ZERO,
            sent: None,
            reused: false,
            answer: None,
            conn: None,
        }
    }

    /// The backend the request went (or last went) to.
    pub fn backend(&self) -> BackendId {
        self.backend
    }

    /// A health probe from sluice's own checker.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// How long the request waited for its slot.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// How long from the request's sending to `now`, if it was sent.
    pub fn upstream_elapsed_at(&self, now: Instant) -> Option<Duration> {
        self.sent.map(|t| now.saturating_duration_since(t))
    }

    /// Why the request was refused after a refused connect, if it was.
    pub fn shed(&self) -> Option<Shed> {
        match self.slot {
            Slot::Shed(shed) => Some(shed),
            _ => None,
        }
    }

    /// The backend to send the request to: the slot's, after waiting for a new one (ahead of
    /// the queue, within the original deadline) if the last connect was refused.
    pub async fn readmit(&mut self, admission: &Arc<Admission>) -> Result<BackendId, Shed> {
        match self.slot {
            Slot::Held(_) => return Ok(self.backend),
            Slot::Shed(shed) => return Err(shed),
            Slot::GivenBack | Slot::Finished => {}
        }
        match admission.acquire_until(self.deadline, true).await {
            Ok(permit) => {
                self.backend = permit.backend();
                self.slot = Slot::Held(permit);
                Ok(self.backend)
            }
            Err(shed) => {
                self.slot = Slot::Shed(shed);
                Err(shed)
            }
        }
    }

    /// The backend did not take the connection (`why`, for the health log). Nothing reached
    /// it: the slot goes back at once. Returns whether to try again: the request then waits
    /// for a slot again ([`Exchange::readmit`]) while its deadline allows.
    pub fn connect_refused(&mut self, admission: &Admission, why: &'static str) -> bool {
        if self.probe {
            return false;
        }
        admission.record_outcome(self.backend, Sample::Lost);
        admission.observe_passive(self.backend, Some(why));
        if self.deadline <= Instant::now() {
            return false;
        }
        // Not held after release: this connection was refused, and a backend that refuses
        // connections is not working on anything this request sent before (a retry after a
        // reused connection closed under it).
        if let Slot::Held(mut permit) = std::mem::replace(&mut self.slot, Slot::GivenBack) {
            permit.hold_on_drop(None);
        }
        true
    }

    /// The request got a backend connection: pooled (`reused`) or new, and dialed by sluice
    /// (`conn`) or not.
    pub fn connected(&mut self, reused: bool, conn: Option<Claim>) {
        self.reused = reused;
        self.conn = conn;
    }

    /// The request is going to the backend. From here the backend may be working on it: should
    /// the exchange be dropped without [`Exchange::finish`] (a panic, the request deadline), the
    /// slot stays taken for the hold.
    pub fn sent(&mut self) {
        self.sent = Some(Instant::now());
        if let (Slot::Held(permit), false) = (&mut self.slot, self.probe) {
            permit.hold_on_drop(Some(self.hold));
        }
    }

    /// The backend's answer header arrived, with `status`.
    pub fn answered(&mut self, status: u16) {
        let latency = self.sent.map(|t| t.elapsed()).unwrap_or_default();
        self.answer = Some(Answer { status, latency });
    }

    /// A connection parked after a late answer counts as a pooled one, whatever pingora saw.
    pub fn reused(&self) -> bool {
        self.reused || self.conn.as_ref().is_some_and(Claim::recycled)
    }

    /// The request is over: feed the backend's health and learned limit, then release the slot
    /// or, when the backend is most likely still working on it, keep it taken.
    pub fn finish(&mut self, admission: &Admission, outcome: Outcome) -> Finished {
        self.finish_at(admission, outcome, Instant::now())
    }

    /// [`Exchange::finish`] at `now`, read by the caller.
    pub fn finish_at(&mut self, admission: &Admission, outcome: Outcome, now: Instant) -> Finished {
        // The last sample goes with the release, under the same lock; recorded alone when the
        // slot is not released now.
        let last = if self.probe {
            None
        } else {
            self.record(admission, outcome, now)
        };
        let record_alone = |x: &Self| {
            if let Some(sample) = last {
                admission.record_outcome(x.backend, sample);
            }
        };
        let permit = match std::mem::replace(&mut self.slot, Slot::Finished) {
            Slot::Held(permit) => permit,
            other => {
                record_alone(self);
                self.slot = other;
                self.conn = None;
                return Finished::Nothing;
            }
        };
        if outcome.leaves_work_behind() && !self.probe && !self.hold.is_zero() {
            record_alone(self);
            let mut permit = permit;
            permit.hold_on_drop(Some(self.hold));
            return Finished::Held(Held {
                permit,
                conn: self.conn.take(),
                sent: self.sent.unwrap_or_else(Instant::now),
                answer_started: self.answer.is_some(),
                hold: self.hold,
            });
        }
        // The connection is no longer this request's before its slot goes to the next one,
        // whose dial must see it as idle (see `ghost`).
        self.conn = None;
        Finished::Released(permit.release_recording_at(last, now))
    }

    /// The health and limit samples of a request that ended with `outcome`: all recorded but
    /// the last, which is returned (for the caller to record with the release).
    fn record(&self, admission: &Admission, outcome: Outcome, now: Instant) -> Option<Sample> {
        let backend = self.backend;
        let answered = self.answer.map(|answer| {
            admission.observe_passive(backend, None);
            if answer.status >= 500 {
                Sample::Failed(answer.latency)
            } else {
                Sample::Ok(answer.latency)
            }
        });
        let sample = match outcome {
            // The backend never answered what it was sent.
            Outcome::UpstreamTimeout { reading } => {
                let why = failure_text(if reading {
                    &ErrorType::ReadTimedout
                } else {
                    &ErrorType::WriteTimedout
                });
                admission.observe_passive(backend, Some(why));
                Some(Sample::Lost)
            }
            // A fresh connection cut after the request was sent; on a pooled one it is most
            // likely the backend's idle close racing the reuse: no evidence.
            Outcome::Cut => (!self.reused()).then_some(Sample::Lost),
            Outcome::BadAnswer => Some(Sample::Failed(
                self.upstream_elapsed_at(now).unwrap_or_default(),
            )),
            // Connect failures were counted as they happened; the rest says nothing about the
            // backend.
            _ => None,
        };
        match (answered, sample) {
            (Some(first), Some(last)) => {
                admission.record_outcome(backend, first);
                Some(last)
            }
            (first, last) => last.or(first),
        }
    }
}

/// Why a request could not get an answer from its backend, in words, for logs.
pub fn failure_text(e: &ErrorType) -> &'static str {
    match e {
        ErrorType::ConnectRefused => "connection refused",
        ErrorType::ConnectTimedout => "connect timed out (upstream.connect_timeout)",
        ErrorType::ConnectNoRoute => "no route to host",
        ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => "TLS handshake failed",
        ErrorType::ReadTimedout => "no answer within upstream.read_timeout",
        ErrorType::WriteTimedout => "write timed out (upstream.write_timeout)",
        ErrorType::ConnectionClosed => "connection closed before the answer",
        ErrorType::ReadError => "read error",
        ErrorType::WriteError => "write error",
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error => "malformed answer",
        other => other.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflight(a: &Admission) -> u32 {
        a.snapshot().backends[0].inflight
    }

    const HOLD: Duration = Duration::from_secs(5);
    /// The queue deadline of every test request.
    const QUEUE: Duration = Duration::from_secs(10);

    async fn admitted(a: &Arc<Admission>) -> Exchange {
        let now = Instant::now();
        let (ex, _) = Exchange::admit(
            a,
            (now, now),
            now + QUEUE,
            HOLD,
            std::future::pending::<()>(),
        )
        .await;
        ex.expect("admitted")
    }

    /// A request waiting for admission on a task of its own; `gone` completes when its client
    /// hangs up.
    fn spawn_admit<G>(
        a: &Arc<Admission>,
        gone: G,
    ) -> tokio::task::JoinHandle<Result<Exchange, NotAdmitted>>
    where
        G: Future + Send + 'static,
    {
        let a = a.clone();
        tokio::spawn(async move {
            let now = Instant::now();
            Exchange::admit(&a, (now, now), now + QUEUE, HOLD, gone)
                .await
                .0
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_releases_the_slot_at_once() {
        let a = Admission::new(&[1], 4);
        let mut ex = admitted(&a).await;
        assert_eq!(inflight(&a), 1);
        ex.connected(false, None);
        ex.sent();
        ex.answered(200);
        assert!(matches!(
            ex.finish(&a, Outcome::Answered),
            Finished::Released(_)
        ));
        assert_eq!(inflight(&a), 0);
        // Finishing twice releases nothing more.
        assert!(matches!(
            ex.finish(&a, Outcome::Answered),
            Finished::Nothing
        ));
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_timeout_holds_the_slot_for_the_hold() {
        let a = Admission::new(&[1], 4);
        let mut ex = admitted(&a).await;
        ex.sent();
        let held = match ex.finish(&a, Outcome::UpstreamTimeout { reading: true }) {
            Finished::Held(held) => held,
            other => panic!("expected a hold, got {other:?}"),
        };
        assert_eq!(held.hold, HOLD);
        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(inflight(&a), 1, "the backend may still be working on it");
        tokio::time::sleep(HOLD - Duration::from_millis(1)).await;
        assert_eq!(inflight(&a), 1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(inflight(&a), 0, "released after the hold");
        // A cut exchange or a client gone is released at once.
        for outcome in [Outcome::Cut, Outcome::ClientGone, Outcome::BadAnswer] {
            let mut ex = admitted(&a).await;
            ex.sent();
            assert!(matches!(ex.finish(&a, outcome), Finished::Released(_)));
            assert_eq!(inflight(&a), 0, "{outcome:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connect_gives_the_slot_back_and_waits_ahead_of_the_queue() {
        let a = Admission::new(&[1], 4);
        let mut ex = admitted(&a).await;
        // Two requests queue behind it.
        let (a1, a2) = (a.clone(), a.clone());
        let first = tokio::spawn(async move { a1.acquire_within(Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        let second = tokio::spawn(async move {
            a2.acquire_within(Duration::from_secs(10))
                .await
                .map(|p| p.backend())
        });
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 2);
        // The connect is refused: the slot goes to the first waiter at once.
        assert!(ex.connect_refused(&a, "connection refused"));
        let first = first.await.expect("join").expect("first admitted");
        assert_eq!(inflight(&a), 1);
        // The refused request waits again, ahead of the second waiter.
        let mut readmit = Box::pin(ex.readmit(&a));
        assert!(futures_poll(&mut readmit).is_none());
        drop(first);
        let backend = readmit.await.expect("readmitted");
        assert_eq!(backend, BackendId(0));
        assert_eq!(a.snapshot().queued, 1, "the second waiter still waits");
        assert!(!second.is_finished());
        assert!(matches!(
            ex.finish(&a, Outcome::Answered),
            Finished::Released(_)
        ));
        assert_eq!(second.await.expect("join"), Ok(BackendId(0)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connect_past_the_deadline_is_not_retried() {
        let a = Admission::new(&[1], 4);
        let mut ex = admitted(&a).await;
        tokio::time::sleep(QUEUE + Duration::from_secs(1)).await;
        assert!(!ex.connect_refused(&a, "connection refused"));
        assert_eq!(
            inflight(&a),
            1,
            "the slot stays with the request until it ends"
        );
        assert!(matches!(
            ex.finish(&a, Outcome::ConnectFailed { timed_out: false }),
            Finished::Released(_)
        ));
        assert_eq!(inflight(&a), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_counts_inside_the_cap_and_is_never_held() {
        let a = Admission::new(&[1], 4);
        let mut probe = Exchange::probe(&a, BackendId(0)).expect("a free slot");
        assert!(probe.is_probe());
        assert_eq!(inflight(&a), 1);
        // The cap is full: a request waits, and a second probe is turned away.
        assert!(Exchange::probe(&a, BackendId(0)).is_none());
        let waiter = spawn_admit(&a, std::future::pending::<()>());
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 1);
        // A probe that timed out is not held: the checker's request is not a payment.
        probe.sent();
        assert!(matches!(
            probe.finish(&a, Outcome::UpstreamTimeout { reading: true }),
            Finished::Released(_)
        ));
        let admitted = waiter.await.expect("join").map(|ex| ex.backend());
        assert_eq!(admitted, Ok(BackendId(0)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gone_while_queued_leaves_nothing_behind() {
        let a = Admission::new(&[1], 4);
        let first = admitted(&a).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let queued = spawn_admit(&a, rx);
        tokio::task::yield_now().await;
        assert_eq!(a.snapshot().queued, 1);
        tx.send(()).expect("send");
        assert_eq!(
            queued.await.expect("join").err(),
            Some(NotAdmitted::ClientGone)
        );
        assert_eq!(a.snapshot().queued, 0);
        drop(first);
        assert_eq!(inflight(&a), 0);

        // Granted in the very instant the client hung up: the slot is given back, not used.
        let first = admitted(&a).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let queued = spawn_admit(&a, rx);
        tokio::task::yield_now().await;
        drop(first); // grants the slot to the waiter ...
        tx.send(()).expect("send"); // ... as its client hangs up
        assert_eq!(
            queued.await.expect("join").err(),
            Some(NotAdmitted::ClientGone)
        );
        assert_eq!(inflight(&a), 0);
        assert_eq!(a.snapshot().queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_a_hook_releases_or_holds_like_the_outcome_would() {
        let a = Admission::new(&[2], 4);
        // Before the request was sent: nothing is at the backend, the slot is free at once.
        let ex = admitted(&a).await;
        let hook = tokio::spawn(async move {
            let _ex = ex;
            panic!("a hook panicked");
        });
        assert!(hook.await.expect_err("panicked").is_panic());
        assert_eq!(inflight(&a), 0);
        // After it was sent: the backend may be working on it; the slot is held.
        let mut ex = admitted(&a).await;
        ex.sent();
        let hook = tokio::spawn(async move {
            let _ex = ex;
            panic!("a hook panicked");
        });
        assert!(hook.await.expect_err("panicked").is_panic());
        tokio::task::yield_now().await;
        assert_eq!(
            inflight(&a),
            1,
            "held: the backend may still be working on it"
        );
        tokio::time::sleep(HOLD + Duration::from_millis(1)).await;
        assert_eq!(inflight(&a), 0);
    }

    #[test]
    fn classify_names_each_error_once() {
        let up = |t: ErrorType| {
            let mut e = Error::new(t);
            e.esource = ErrorSource::Upstream;
            classify(&e)
        };
        let down = |t: ErrorType| {
            let mut e = Error::new(t);
            e.esource = ErrorSource::Downstream;
            classify(&e)
        };
        assert_eq!(up(ErrorType::ConnectRefused).status(), 502);
        assert_eq!(up(ErrorType::ConnectTimedout).status(), 504);
        assert_eq!(
            up(ErrorType::ReadTimedout),
            Outcome::UpstreamTimeout { reading: true }
        );
        assert_eq!(up(ErrorType::ReadTimedout).status(), 504);
        assert_eq!(up(ErrorType::WriteTimedout).status(), 502);
        assert_eq!(up(ErrorType::ConnectionClosed), Outcome::Cut);
        assert_eq!(up(ErrorType::InvalidHTTPHeader), Outcome::BadAnswer);
        assert_eq!(down(ErrorType::ConnectionClosed), Outcome::ClientGone);
        assert_eq!(down(ErrorType::ConnectionClosed).status(), 0);
        assert_eq!(down(ErrorType::InvalidHTTPHeader), Outcome::BadRequest);
        assert_eq!(up(ErrorType::HTTPStatus(503)), Outcome::Refused(503));
        assert_eq!(
            classify(&Error::new(ErrorType::InternalError)).status(),
            500
        );
    }

    /// Poll a future once.
    fn futures_poll<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
