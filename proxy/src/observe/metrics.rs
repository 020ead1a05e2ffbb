//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! Counters and histograms are updated on the request path; gauges that mirror admission state
//! (in-flight, limits, queue, health, tokens, ramp) are refreshed from a consistent snapshot at
//! scrape time, so they can never drift from the truth. Everything lives in this struct's own
//! [`Registry`] (no global state), so tests can run several proxies in one process.
//!
//! The crate is `prometheus` 0.14, the version `pingora-prometheus` 0.9 uses.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::admission::Admission;
use sluice_plugins::BackendState;

/// How a request ended, for `sluice_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The backend answered with a status below 500.
    Ok,
    /// The backend answered 5xx.
    BackendError,
    /// Connect failure, reset, malformed response or timeout: sluice answered 502/504.
    UpstreamError,
    /// Refused: the queue was full.
    QueueFull,
    /// Refused: waited `queue_timeout` with a backend up.
    QueueTimeout,
    /// Refused: waited `queue_timeout` with no backend up.
    BackendDown,
    /// The client left while queued, or before its response was delivered.
    ClientAbort,
    /// The request was malformed.
    BadRequest,
    /// Refused: its body did not fit in `proxy.max_buffered_body_bytes`.
    BodyBudget,
}

impl Disposition {
    /// How many there are (they index [`BackendHandles`]).
    const COUNT: usize = Disposition::BodyBudget as usize + 1;

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Ok => "ok",
            Disposition::BackendError => "backend_error",
            Disposition::UpstreamError => "upstream_error",
            Disposition::QueueFull => "queue_full",
            Disposition::QueueTimeout => "queue_timeout",
            Disposition::BackendDown => "backend_down",
            Disposition::ClientAbort => "client_abort",
            Disposition::BadRequest => "bad_request",
            Disposition::BodyBudget => "body_budget",
        }
    }
}

/// One backend's request-path series, each resolved by label once (when first used, so that
/// no series appears before it counts something) instead of on every request. Kept with the
/// backend in the settings snapshot: a reload that renames a backend starts afresh.
#[derive(Debug, Default, Clone)]
pub struct BackendHandles {
    requests: [OnceLock<IntCounter>; Disposition::COUNT],
    upstream_duration: OnceLock<Histogram>,
    /// Indexed by `reused`.
    upstream_connections: [OnceLock<IntCounter>; 2],
}

/// Label used for requests that never reached a backend.
pub const NO_BACKEND: &str = "none";

/// Queue-wait buckets, seconds: from "admitted at once" to the longest sane deadline.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Backend-time buckets, seconds.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// All of sluice's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    queue_wait: Histogram,
    upstream_duration: HistogramVec,
    upstream_connections: IntCounterVec,
    reloads: IntCounterVec,
    inflight: IntGaugeVec,
    effective_limit: IntGaugeVec,
    max_inflight: IntGaugeVec,
    backend_up: IntGaugeVec,
    backend_draining: IntGaugeVec,
    tokens: IntGaugeVec,
    slow_start: prometheus::GaugeVec,
    limit_phase: IntGaugeVec,
    baseline: prometheus::GaugeVec,
    queue_depth: IntGauge,
    queue_max: IntGauge,
    client_connections: IntGauge,
    parked_connections: IntGauge,
    buffered_body_bytes: IntGauge,
    connections_refused: IntCounterVec,
    client_timeouts: IntCounterVec,
    timeout_holds: IntCounterVec,
    transitions: IntCounterVec,
    ghosts: IntCounterVec,
    ghost_duration: HistogramVec,
    pool_races: prometheus::IntCounter,
    rescued: prometheus::IntCounter,
    dial_waits_expired: IntCounterVec,
    cluster: ClusterMetrics,
}

/// The `[cluster]` series (present once a cluster status was recorded).
#[derive(Debug, Clone)]
struct ClusterMetrics {
    share: IntGaugeVec,
    granted: IntGaugeVec,
    lease_valid: IntGaugeVec,
    learning: IntGaugeVec,
    renewals: IntCounterVec,
    failures: IntCounterVec,
    rebalances: IntCounterVec,
    peer_share: IntGaugeVec,
}

/// Why a client connection was refused at accept, for
/// `sluice_client_connections_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `proxy.max_connections` open connections already.
    Total,
    /// `proxy.max_connections_per_ip` open connections from this client IP already.
    PerIp,
}

impl Refused {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerIp => "max_connections_per_ip",
        }
    }
}

/// Which client deadline cut a connection, for `sluice_client_timeouts_total{phase}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `proxy.client_header_timeout`: the request header did not arrive in time.
    Header,
    /// `proxy.client_body_timeout`: the request body did not arrive in time.
    Body,
    /// `proxy.request_timeout`: the whole exchange took too long.
    Request,
}

impl Deadline {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Deadline::Header => "header",
            Deadline::Body => "body",
            Deadline::Request => "request",
        }
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric names and labels below are constants: an error here is a programming error
    // caught by the unit test, never an input problem.
    #[allow(clippy::expect_used)]
    r.expect("static metric definition")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let requests = counter(
            "sluice_requests_total",
            "Requests by backend and outcome.",
            &["backend", "outcome"],
        );
        let upstream_connections = counter(
            "sluice_upstream_connections_total",
            "Upstream connections used, by backend and whether an open one was reused (from the pool, or rescued from it).",
            &["backend", "reused"],
        );
        let reloads = counter(
            "sluice_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        );
        let queue_wait = must(Histogram::with_opts(
            HistogramOpts::new(
                "sluice_queue_wait_seconds",
                "Time each request waited for a backend slot.",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(queue_wait.clone())));
        let upstream_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "sluice_upstream_duration_seconds",
                "Time each request spent at its backend, until the response was delivered.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["backend"],
        ));
        must(registry.register(Box::new(upstream_duration.clone())));
        let inflight = gauge(
            "sluice_inflight",
            "Requests at the backend now.",
            &["backend"],
        );
        let effective_limit = gauge(
            "sluice_effective_limit",
            "Concurrency limit in force now (lower while slow start ramps).",
            &["backend"],
        );
        let max_inflight = gauge(
            "sluice_max_inflight",
            "Configured concurrency cap of the backend.",
            &["backend"],
        );
        let backend_up = gauge(
            "sluice_backend_up",
            "1 when the backend takes new requests, 0 when down or draining.",
            &["backend"],
        );
        let backend_draining = gauge(
            "sluice_backend_draining",
            "1 while the operator drains the backend.",
            &["backend"],
        );
        let tokens = gauge(
            "sluice_tokens_available",
            "Rate-limit tokens available now (backends with a rate only).",
            &["backend"],
        );
        let slow_start = must(prometheus::GaugeVec::new(
            Opts::new(
                "sluice_slow_start_progress",
                "Slow-start ramp progress, 0 to 1 (1 when no ramp runs).",
            ),
            &["backend"],
        ));
        must(registry.register(Box::new(slow_start.clone())));
        let limit_phase = gauge(
            "sluice_limit_phase",
            "1 for why the learned limit is where it is now (phase: ramp, steady, collapsed); \
             backends with a learned limit only.",
            &["backend", "phase"],
        );
        let baseline = must(prometheus::GaugeVec::new(
            Opts::new(
                "sluice_backend_baseline_seconds",
                "The backend's latency at low concurrency, as the learned limit measured it.",
            ),
            &["backend"],
        ));
        must(registry.register(Box::new(baseline.clone())));
        let queue_depth = must(IntGauge::new(
            "sluice_queue_depth",
            "Requests waiting for a backend slot.",
        ));
        must(registry.register(Box::new(queue_depth.clone())));
        let queue_max = must(IntGauge::new("sluice_queue_max", "The queue's bound."));
        must(registry.register(Box::new(queue_max.clone())));
        let client_connections = must(IntGauge::new(
            "sluice_client_connections",
            "Open client connections.",
        ));
        must(registry.register(Box::new(client_connections.clone())));
        let parked_connections = must(IntGauge::new(
            "sluice_client_connections_parked",
            "Idle kept-alive client connections waiting for their next request as bare sockets.",
        ));
        must(registry.register(Box::new(parked_connections.clone())));
        let buffered_body_bytes = must(IntGauge::new(
            "sluice_buffered_body_bytes",
            "Request body bytes held by requests received before admission.",
        ));
        must(registry.register(Box::new(buffered_body_bytes.clone())));
        let connections_refused = counter(
            "sluice_client_connections_refused_total",
            "Client connections refused at accept (503, then closed), by the cap that refused them.",
            &["reason"],
        );
        let timeout_holds = counter(
            "sluice_timeout_holds_total",
            "Slots kept taken for upstream.timeout_hold after an upstream timeout, by backend.",
            &["backend"],
        );
        let ghosts = counter(
            "sluice_ghost_requests_total",
            "Requests the backend kept working on after an upstream timeout, by backend and how \
             their slot was freed: answered (the late answer was read), closed (the backend \
             closed the connection) or expired (upstream.timeout_hold ran out).",
            &["backend", "end"],
        );
        let ghost_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "sluice_ghost_duration_seconds",
                "Time from sending a timed-out request upstream to the end of its ghost work.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["backend"],
        ));
        must(registry.register(Box::new(ghost_duration.clone())));
        let pool_races = must(prometheus::IntCounter::new(
            "sluice_upstream_pool_races_total",
            "Pooled upstream connections pingora lost to its pool race (pingora#998); for a \
             plain-TCP backend the request affected takes the lost connection back (see \
             sluice_upstream_connections_rescued_total).",
        ));
        must(registry.register(Box::new(pool_races.clone())));
        let rescued = must(prometheus::IntCounter::new(
            "sluice_upstream_connections_rescued_total",
            "Idle upstream connections pingora dropped (its pool race, pingora#998) that the \
             next dial took instead of opening a new connection to the backend.",
        ));
        must(registry.register(Box::new(rescued.clone())));
        let dial_waits_expired = counter(
            "sluice_upstream_dial_waits_expired_total",
            &format!(
                "Dials that went ahead at the end of their wait, by what they waited for: release \
                 (a connection no request held, {:?} at most) or closing (the backend to close a \
                 connection sluice closed, {:?} at most).",
                crate::ghost::RELEASE_WAIT,
                crate::ghost::CLOSING_WAIT
            ),
            &["wait"],
        );
        let client_timeouts = counter(
            "sluice_client_timeouts_total",
            "Client connections cut off by a deadline, by phase (header, body, request).",
            &["phase"],
        );
        let transitions = counter(
            "sluice_backend_transitions_total",
            "Times health took a backend down (to=\"down\") or brought it back (to=\"up\").",
            &["backend", "to"],
        );
        let cluster = ClusterMetrics {
            share: gauge(
                "sluice_cluster_share",
                "Requests this instance may have in flight at a backend now ([cluster]): its leased share, or its safe share without a valid lease.",
                &["backend"],
            ),
            granted: gauge(
                "sluice_cluster_granted",
                "The share Redis records for this instance (the last grant).",
                &["backend"],
            ),
            lease_valid: gauge(
                "sluice_cluster_lease_valid",
                "1 while this instance's lease on a backend is provably valid, 0 on the safe share.",
                &["backend"],
            ),
            learning: gauge(
                "sluice_cluster_learning",
                "1 while Redis's lease state was lost and every grant is at most a safe share.",
                &["backend"],
            ),
            renewals: counter(
                "sluice_cluster_renewals_total",
                "Successful lease renewals.",
                &["backend"],
            ),
            failures: counter(
                "sluice_cluster_renewal_failures_total",
                "Failed lease renewals (Redis unreachable, slow or erroring).",
                &["backend"],
            ),
            rebalances: counter(
                "sluice_cluster_rebalances_total",
                "Grants that changed this instance's share, by direction (grow, shrink).",
                &["backend", "direction"],
            ),
            peer_share: gauge(
                "sluice_cluster_peer_share",
                "Every instance's share as this instance's last renewal saw it in Redis.",
                &["backend", "instance"],
            ),
        };
        Metrics {
            cluster,
            registry,
            requests,
            queue_wait,
            upstream_duration,
            upstream_connections,
            reloads,
            inflight,
            effective_limit,
            max_inflight,
            backend_up,
            backend_draining,
            tokens,
            slow_start,
            limit_phase,
            baseline,
            queue_depth,
            queue_max,
            client_connections,
            parked_connections,
            buffered_body_bytes,
            connections_refused,
            client_timeouts,
            timeout_holds,
            transitions,
            ghosts,
            ghost_duration,
            pool_races,
            rescued,
            dial_waits_expired,
        }
    }

    /// Bring the upstream dialer's counters to `conns` (called at scrape time).
    pub fn set_dials(&self, conns: &crate::ghost::Conns) {
        let catch_up = |c: &prometheus::IntCounter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        catch_up(&self.rescued, conns.rescued());
        for (wait, now) in [
            ("release", conns.waits_expired()),
            ("closing", conns.closing_expired()),
        ] {
            catch_up(&self.dial_waits_expired.with_label_values(&[wait]), now);
        }
    }

    /// Bring the `[cluster]` series to `status` (called at scrape time).
    pub fn set_cluster(&self, status: &crate::ops::cluster::ClusterStatus) {
        let m = &self.cluster;
        for b in &status.backends {
            let l = [b.name.as_str()];
            m.share.with_label_values(&l).set(i64::from(b.share));
            m.granted
                .with_label_values(&l)
                .set(i64::from(b.granted.unwrap_or(0)));
            m.lease_valid
                .with_label_values(&l)
                .set(i64::from(b.basis == "lease"));
            m.learning.with_label_values(&l).set(i64::from(b.learning));
            // The cluster counts; the counters catch up at each scrape.
            let catch_up = |c: prometheus::IntCounter, total: u64| {
                c.inc_by(total.saturating_sub(c.get()));
            };
            catch_up(m.renewals.with_label_values(&l), b.renewals);
            catch_up(m.failures.with_label_values(&l), b.renewal_failures);
            catch_up(
                m.rebalances.with_label_values(&[b.name.as_str(), "grow"]),
                b.grows,
            );
            catch_up(
                m.rebalances.with_label_values(&[b.name.as_str(), "shrink"]),
                b.shrinks,
            );
            for p in &b.peers {
                m.peer_share
                    .with_label_values(&[b.name.as_str(), p.id.as_str()])
                    .set(i64::from(p.share));
            }
        }
    }

    /// Count a slot held after an upstream timeout.
    pub fn timeout_hold(&self, backend: &str) {
        self.timeout_holds.with_label_values(&[backend]).inc();
    }

    /// Count a request whose late work at `backend` ended (see [`crate::ghost`]), `took` after
    /// it was sent upstream.
    pub fn ghost(&self, backend: &str, end: crate::ghost::End, took: std::time::Duration) {
        self.ghosts
            .with_label_values(&[backend, end.as_str()])
            .inc();
        self.ghost_duration
            .with_label_values(&[backend])
            .observe(took.as_secs_f64());
    }

    /// The open-client-connections gauge (a cheap handle to keep per connection).
    pub fn client_connections(&self) -> IntGauge {
        self.client_connections.clone()
    }

    /// The gauge of idle client connections waiting as bare sockets.
    pub fn parked_connections(&self) -> &IntGauge {
        &self.parked_connections
    }

    /// The buffered-request-body-bytes gauge.
    pub fn buffered_body_bytes(&self) -> IntGauge {
        self.buffered_body_bytes.clone()
    }

    /// Count a client connection refused at accept.
    pub fn connection_refused(&self, reason: Refused) {
        self.connections_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Count a client cut off by a deadline.
    pub fn client_timeout(&self, phase: Deadline) {
        self.client_timeouts
            .with_label_values(&[phase.as_str()])
            .inc();
    }

    /// Count a finished request at a backend, through its handles.
    pub fn backend_request(&self, h: &BackendHandles, backend: &str, outcome: Disposition) {
        h.requests[outcome as usize]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[backend, outcome.as_str()])
            })
            .inc();
    }

    /// Record a request's time at its backend, through the backend's handles.
    pub fn backend_upstream_duration(&self, h: &BackendHandles, backend: &str, seconds: f64) {
        h.upstream_duration
            .get_or_init(|| self.upstream_duration.with_label_values(&[backend]))
            .observe(seconds);
    }

    /// Count an upstream connection, new or reused, through the backend's handles.
    pub fn backend_upstream_connection(&self, h: &BackendHandles, backend: &str, reused: bool) {
        h.upstream_connections[usize::from(reused)]
            .get_or_init(|| {
                self.upstream_connections
                    .with_label_values(&[backend, if reused { "true" } else { "false" }])
            })
            .inc();
    }

    /// Count a finished request.
    pub fn request(&self, backend: &str, outcome: Disposition) {
        self.requests
            .with_label_values(&[backend, outcome.as_str()])
            .inc();
    }

    /// Record how long a request waited for its slot.
    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds);
    }

    /// Count a configuration reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Refresh the state gauges from admission and render the text exposition format.
    pub fn render(&self, admission: &Admission) -> String {
        let snap = admission.snapshot();
        let races = crate::observe::logging::pool_races();
        self.pool_races
            .inc_by(races.saturating_sub(self.pool_races.get()));
        self.queue_depth.set(snap.queued as i64);
        self.queue_max.set(snap.max_queue as i64);
        for b in admission.status() {
            let l = [b.name.as_str()];
            self.inflight
                .with_label_values(&l)
                .set(i64::from(b.inflight));
            self.effective_limit
                .with_label_values(&l)
                .set(i64::from(b.effective_limit));
            self.max_inflight
                .with_label_values(&l)
                .set(i64::from(b.limit));
            self.backend_up
                .with_label_values(&l)
                .set(i64::from(b.state == BackendState::Up));
            self.backend_draining
                .with_label_values(&l)
                .set(i64::from(b.state == BackendState::Draining));
            if let Some(t) = b.tokens {
                self.tokens.with_label_values(&l).set(i64::from(t));
            }
            self.slow_start.with_label_values(&l).set(b.ramp);
            if let Some(phase) = b.limit_phase {
                for p in ["ramp", "steady", "collapsed"] {
                    self.limit_phase
                        .with_label_values(&[b.name.as_str(), p])
                        .set(i64::from(p == phase));
                }
            }
            if let Some(d) = b.baseline {
                self.baseline.with_label_values(&l).set(d.as_secs_f64());
            }
            // Admission counts the transitions; the counters catch up at each scrape.
            for (to, total) in [("down", b.downs), ("up", b.ups)] {
                let c = self.transitions.with_label_values(&[b.name.as_str(), to]);
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_state_gauges() {
        let m = Metrics::new();
        let a = Admission::new(&[4], 10);
        let b0 = BackendHandles::default();
        m.backend_request(&b0, "b0", Disposition::Ok);
        m.request(NO_BACKEND, Disposition::QueueFull);
        m.queue_wait(0.002);
        m.backend_upstream_duration(&b0, "b0", 0.02);
        m.backend_upstream_connection(&b0, "b0", false);
        m.reload(true);
        m.client_connections().inc();
        m.connection_refused(Refused::PerIp);
        m.client_timeout(Deadline::Header);
        m.set_dials(&crate::ghost::Conns::new());
        let text = m.render(&a);
        for needle in [
            "sluice_upstream_connections_rescued_total 0",
            "sluice_upstream_dial_waits_expired_total{wait=\"release\"} 0",
            "sluice_upstream_dial_waits_expired_total{wait=\"closing\"} 0",
            "sluice_requests_total{backend=\"b0\",outcome=\"ok\"} 1",
            "sluice_requests_total{backend=\"none\",outcome=\"queue_full\"} 1",
            "sluice_queue_wait_seconds_count 1",
            "sluice_upstream_duration_seconds_count{backend=\"b0\"} 1",
            "sluice_upstream_connections_total{backend=\"b0\",reused=\"false\"} 1",
            "sluice_max_inflight{backend=\"b0\"} 4",
            "sluice_effective_limit{backend=\"b0\"} 4",
            "sluice_inflight{backend=\"b0\"} 0",
            "sluice_backend_up{backend=\"b0\"} 1",
            "sluice_backend_transitions_total{backend=\"b0\",to=\"down\"} 0",
            "sluice_backend_transitions_total{backend=\"b0\",to=\"up\"} 0",
            "sluice_queue_max 10",
            "sluice_reloads_total{result=\"ok\"} 1",
            "sluice_client_connections 1",
            "sluice_client_connections_refused_total{reason=\"max_connections_per_ip\"} 1",
            "sluice_client_timeouts_total{phase=\"header\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    /// A backend's handles count into its labelled series, each resolved on first use: a
    /// series nothing counted yet does not appear.
    #[test]
    fn backend_handles_count_into_the_labelled_series() {
        let m = Metrics::new();
        let a = Admission::new(&[4], 10);
        let b0 = BackendHandles::default();
        for _ in 0..3 {
            m.backend_request(&b0, "b0", Disposition::Ok);
        }
        m.backend_request(&b0, "b0", Disposition::BodyBudget);
        m.backend_upstream_connection(&b0, "b0", true);
        let text = m.render(&a);
        for needle in [
            "sluice_requests_total{backend=\"b0\",outcome=\"ok\"} 3",
            "sluice_requests_total{backend=\"b0\",outcome=\"body_budget\"} 1",
            "sluice_upstream_connections_total{backend=\"b0\",reused=\"true\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("outcome=\"backend_error\""), "{text}");
        assert!(!text.contains("reused=\"false\""), "{text}");
    }

    /// Every `sluice_*` metric the Grafana dashboard in `conf/` queries is one sluice serves.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let m = Metrics::new();
        // A backend with a rate, so the token gauge has a sample too.
        let cfg = crate::config::Config::parse(
            "[admission]\nmax_inflight = 4\nrate = 10.0\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
            None,
            &crate::config::Overrides::default(),
        )
        .expect("config");
        let a = Admission::from_config(&cfg);
        let b0 = BackendHandles::default();
        m.backend_request(&b0, "b0", Disposition::Ok);
        m.queue_wait(0.002);
        m.backend_upstream_duration(&b0, "b0", 0.02);
        m.backend_upstream_connection(&b0, "b0", false);
        m.reload(true);
        m.client_connections().inc();
        m.connection_refused(Refused::Total);
        m.client_timeout(Deadline::Body);
        m.timeout_hold("b0");
        let text = m.render(&a);
        let dashboard = include_str!("../../../conf/grafana-dashboard.json");
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("sluice_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {name}, which sluice does not serve"
            );
            checked += 1;
        }
        assert!(
            checked > 20,
            "the dashboard was read ({checked} references)"
        );
    }
}
