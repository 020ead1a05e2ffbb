//! Several sluice instances in front of one backend, sharing its cap through Redis leases.
//!
//! With `[cluster]`, each backend's cap N is split into *shares*, one per instance. The split
//! lives in Redis, one hash per backend (`<cluster.key>:<backend name>`), and only the Lua
//! script `cluster.lua` changes it: it runs atomically on the Redis server and reads Redis's
//! own clock, so the instances' clocks never matter. Admission stays local: the pool admits
//! against the instance's share ([`crate::admission::Admission::set_share`]) and no request
//! ever waits for Redis. Two loops run in the background:
//!
//! - the **applier**, every [`APPLY_EVERY`]: samples the peak of in-flight plus queued
//!   requests (the demand) and sets the pool's share to what the lease allows now
//!   ([`sluice_plugins::lease::Lease::cap`]): the grant while it is provably valid, the safe
//!   share once it is not. It runs apart from the renewals, so a Redis that hangs (SIGSTOP)
//!   can never keep an expired share in force;
//! - the **renewer**, every `lease_ttl / 3`: sends each backend's report (demand, and `used`,
//!   the most this instance may have in flight) and applies the grant. A call has
//!   `lease_ttl / 3` to answer; a late reply proves nothing and the connection is dropped.
//!
//! Upgrades: both processes use the same instance id, so Redis sees one instance, renewed by one
//! process at a time. The old process (SIGQUIT) keeps its share while its lease is valid and
//! keeps renewing until it exits, past pingora's shutdown notice ([`Cluster::freeze`]). It sends
//! that share with its claims over the hand-over socket; the new process, started with
//! `--upgrade`, admits that share less the claims ([`Cluster::inherit`]; its safe share less the
//! claims before the first report) and starts renewing when the hand-over is over
//! ([`Cluster::resume`]). Old + new stay within the share the old process keeps renewing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_plugins::lease::{Basis, Granted, Lease, LeaseConfig};
use sluice_plugins::BackendId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::admission::Admission;
use crate::config::ClusterSettings;
use crate::ops::resp::{Connection, RedisError, Value};

/// The lease script, run on the Redis server by `EVAL`.
pub const SCRIPT: &str = include_str!("cluster.lua");

/// How often the applier samples demand and applies the lease's cap.
pub const APPLY_EVERY: Duration = Duration::from_millis(20);

/// One instance as the last renewal saw it in Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    /// Its `cluster.id`.
    pub id: String,
    /// The share Redis records for it.
    pub share: u32,
    /// Whether its lease (plus the grace for its last requests) still runs.
    pub live: bool,
    /// Its demand at its last renewal.
    pub demand: u32,
    /// Its safe share.
    pub safe_share: u32,
}

/// This instance's lease on one backend, for `/status` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendLeaseView {
    /// Backend name.
    pub name: String,
    /// The backend's cap, shared by all instances.
    pub cap: u32,
    /// What this instance may use now.
    pub share: u32,
    /// Why: `lease` (a valid lease), `safe` (none: the safe share), `starting` (a fresh start
    /// waiting for its first grant).
    pub basis: String,
    /// The share Redis records for this instance (the last grant).
    pub granted: Option<u32>,
    /// Where the script wants this instance's share to go.
    pub target: Option<u32>,
    /// How long the lease stays provably valid (0 when it is not).
    pub valid_for_ms: u64,
    /// Redis lost its state and the script grants at most safe shares for now.
    pub learning: bool,
    /// The last grant made the holds exceed the cap (the instances' settings disagree).
    pub overcommitted: bool,
    /// Successful renewals.
    pub renewals: u64,
    /// Failed renewals.
    pub renewal_failures: u64,
    /// Grants that raised this instance's share.
    pub grows: u64,
    /// Grants that lowered it.
    pub shrinks: u64,
    /// Why the last renewal failed, if it did.
    pub last_error: Option<String>,
    /// Every instance, as the last renewal saw them.
    pub peers: Vec<Peer>,
}

/// The cluster section of `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    /// This instance's id.
    pub id: String,
    /// Redis (without its password).
    pub redis: String,
    /// Lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// This instance's safe share.
    pub safe_share: u32,
    /// Instances sharing the backends.
    pub instances: u32,
    /// One entry per backend.
    pub backends: Vec<BackendLeaseView>,
}

#[derive(Debug)]
struct BackendLease {
    lease: Lease,
    peak: u32,
    applied: Option<u32>,
    basis: Basis,
    learning: bool,
    overcommitted: bool,
    renewals: u64,
    failures: u64,
    grows: u64,
    shrinks: u64,
    last_error: Option<String>,
    peers: Vec<Peer>,
    /// New process of an upgrade, before it renews: the old process's share, which the old
    /// process keeps renewing (its claims come out of it).
    inherited: Option<u32>,
}

impl BackendLease {
    fn new(cfg: LeaseConfig, now: std::time::Instant, fresh: bool) -> Self {
        let lease = Lease::new(cfg, now, fresh);
        BackendLease {
            basis: lease.basis(now),
            lease,
            peak: 0,
            applied: None,
            learning: false,
            overcommitted: false,
            renewals: 0,
            failures: 0,
            grows: 0,
            shrinks: 0,
            last_error: None,
            peers: Vec::new(),
            inherited: None,
        }
    }
}

fn lease_config(s: &ClusterSettings, cap: u32) -> LeaseConfig {
    LeaseConfig {
        safe_share: s.safe_share.min(cap),
        ttl: s.lease_ttl,
        margin: s.margin,
        step: s.step_for(cap),
        startup_wait: s.lease_ttl.saturating_add(s.grace),
    }
}

/// The shared-budget state of one process.
#[derive(Debug)]
pub struct Cluster {
    settings: ClusterSettings,
    admission: Arc<Admission>,
    leases: Mutex<Vec<BackendLease>>,
    frozen: AtomicBool,
    renewing: AtomicBool,
    wake: Notify,
}

impl Cluster {
    /// The cluster state for a process started now; `fresh` unless it is an upgrade's new
    /// process. Applies the starting caps at once (a fresh start admits nothing until its
    /// first grant; an upgrade's new process starts at its safe share).
    pub fn new(settings: ClusterSettings, admission: Arc<Admission>, fresh: bool) -> Arc<Self> {
        let now = Instant::now().into_std();
        let leases = admission
            .snapshot()
            .backends
            .iter()
            .map(|b| BackendLease::new(lease_config(&settings, b.limit), now, fresh))
            .collect();
        let c = Arc::new(Cluster {
            settings,
            admission,
            leases: Mutex::new(leases),
            frozen: AtomicBool::new(false),
            renewing: AtomicBool::new(fresh),
            wake: Notify::new(),
        });
        c.apply();
        c
    }

    /// The settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    fn leases(&self) -> MutexGuard<'_, Vec<BackendLease>> {
        // Every update completes under the lock; a poisoned lock is still consistent.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Old process of an upgrade (SIGQUIT): from now on the share stays where it is while the
    /// lease is valid and only goes down without one, so the claims it hands to the new
    /// process stay upper bounds. It keeps renewing until the process exits.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// New process of an upgrade: the old process is done; renew the lease from now on.
    pub fn resume(&self) {
        for l in self.leases().iter_mut() {
            l.inherited = None;
        }
        if !self.renewing.swap(true, Ordering::SeqCst) {
            log::warn!("cluster: the upgrade hand-over is over; renewing the lease");
        }
        self.wake.notify_one();
    }

    /// Old process of an upgrade: the share in force now, for the new process.
    pub fn share(&self, backend: BackendId) -> Option<u32> {
        self.leases().get(backend.0).and_then(|l| l.applied)
    }

    /// New process of an upgrade, before it renews: use the old process's share (which the old
    /// process keeps renewing; its claims are reserved out of it), as it reports it.
    pub fn inherit(&self, backend: BackendId, share: u32) {
        if self.renewing.load(Ordering::SeqCst) {
            return;
        }
        if let Some(l) = self.leases().get_mut(backend.0) {
            l.inherited = Some(share);
        }
        self.apply();
    }

    /// Sample demand and apply what each lease allows now.
    pub fn apply(&self) {
        let now = Instant::now();
        let snap = self.admission.snapshot();
        let queued = u32::try_from(snap.queued).unwrap_or(u32::MAX);
        let frozen = self.frozen.load(Ordering::SeqCst);
        let mut leases = self.leases();
        let names = self.admission.backend_names();
        while leases.len() < snap.backends.len() {
            // A backend added by a reload starts like a fresh process: nothing until granted.
            let cap = snap.backends[leases.len()].limit;
            leases.push(BackendLease::new(
                lease_config(&self.settings, cap),
                now.into_std(),
                true,
            ));
        }
        for (i, (b, l)) in snap.backends.iter().zip(leases.iter_mut()).enumerate() {
            l.peak = l.peak.max(b.inflight.saturating_add(queued));
            let allowed = l
                .inherited
                .unwrap_or_else(|| l.lease.cap(now.into_std()))
                .min(b.limit);
            let valid = l.lease.basis(now.into_std()) == Basis::Lease;
            let next = match (frozen, l.applied) {
                // The old process of an upgrade keeps its share while its renewals keep it
                // held in Redis (they report at least this much): its claims to the new
                // process were computed against it. Without a valid lease it may only go
                // down, to the safe share.
                (true, Some(a)) if valid => a,
                (true, Some(a)) => a.min(allowed),
                _ => allowed,
            };
            if l.applied != Some(next) {
                self.admission.set_share(BackendId(i), Some(next));
                l.applied = Some(next);
            }
            let basis = l.lease.basis(now.into_std());
            if basis != l.basis {
                let name = names.get(i).map_or("?", String::as_str);
                match basis {
                    Basis::Lease => log::warn!(
                        "cluster: backend {name}: lease held, share {next} of {}",
                        b.limit
                    ),
                    Basis::Safe => log::warn!(
                        "cluster: backend {name}: no valid lease{}; using the safe share {next}",
                        l.last_error
                            .as_deref()
                            .map(|e| format!(" (last renewal: {e})"))
                            .unwrap_or_default()
                    ),
                    Basis::Starting => {}
                }
                l.basis = basis;
            }
        }
    }

    /// Renew every backend's lease once; `conn` is reconnected as needed.
    async fn renew_all(&self, conn: &mut Option<Connection>) {
        let names = self.admission.backend_names();
        for (i, name) in names.iter().enumerate() {
            if let Err(e) = self.renew(conn, i, name).await {
                *conn = None;
                let mut leases = self.leases();
                if let Some(l) = leases.get_mut(i) {
                    l.failures += 1;
                    if l.last_error.is_none() {
                        log::warn!("cluster: backend {name}: lease renewal failed: {e}");
                    }
                    l.last_error = Some(e.to_string());
                }
            }
        }
    }

    async fn renew(
        &self,
        conn: &mut Option<Connection>,
        i: usize,
        name: &str,
    ) -> Result<(), RedisError> {
        let s = &self.settings;
        let timeout = s.lease_ttl / 3;
        // Taken before anything is sent: the lease is counted from here.
        let sent_at = Instant::now();
        let snap = self.admission.snapshot();
        let Some(b) = snap.backends.get(i) else {
            return Ok(());
        };
        let queued = u32::try_from(snap.queued).unwrap_or(u32::MAX);
        let frozen = self.frozen.load(Ordering::SeqCst);
        let (report, step) = {
            let mut leases = self.leases();
            let Some(l) = leases.get_mut(i) else {
                return Ok(());
            };
            let mut r = l.lease.report(sent_at.into_std(), b.inflight, l.peak);
            if frozen {
                r.used = l.applied.unwrap_or(0).max(b.inflight);
            }
            (r, l.lease.config().step)
        };
        if conn.is_none() {
            *conn = Some(Connection::connect(&s.redis, timeout).await?);
        }
        let Some(c) = conn.as_mut() else {
            return Ok(());
        };
        let key = format!("{}:{name}", s.key);
        let args: Vec<String> = vec![
            s.id.clone(),
            u8::from(report.fresh).to_string(),
            report.demand.to_string(),
            report.used.to_string(),
            s.safe_share.min(b.limit).to_string(),
            s.lease_ttl.as_millis().to_string(),
            s.grace.as_millis().to_string(),
            b.limit.to_string(),
            s.instances.to_string(),
            step.to_string(),
        ];
        let mut cmd: Vec<&[u8]> = vec![b"EVAL", SCRIPT.as_bytes(), b"1", key.as_bytes()];
        cmd.extend(args.iter().map(|a| a.as_bytes()));
        let remaining = timeout.saturating_sub(sent_at.elapsed());
        if remaining.is_zero() {
            return Err(RedisError::Timeout(timeout));
        }
        let reply = c.call(&cmd, remaining).await?;
        let reply = parse_reply(&reply).ok_or_else(|| {
            RedisError::Protocol(format!("unexpected lease script reply {reply:?}"))
        })?;
        let mut leases = self.leases();
        let Some(l) = leases.get_mut(i) else {
            return Ok(());
        };
        let before = l.lease.granted().map(|g| g.share);
        l.lease.on_grant(sent_at.into_std(), reply.granted);
        match before {
            Some(b) if reply.granted.share > b => l.grows += 1,
            Some(b) if reply.granted.share < b => l.shrinks += 1,
            _ => {}
        }
        if reply.overcommitted && !l.overcommitted {
            log::error!(
                "cluster: backend {name}: the instances' holds exceed the cap; check that every \
                 instance has the same cluster.instances and a safe_share with instances × \
                 safe_share ≤ the cap"
            );
        }
        if l.last_error.take().is_some() {
            log::warn!("cluster: backend {name}: lease renewed again");
        }
        l.learning = reply.learning;
        l.overcommitted = reply.overcommitted;
        l.peers = reply.peers;
        l.renewals += 1;
        l.peak = b.inflight.saturating_add(queued);
        drop(leases);
        // Apply a grown share at once rather than at the next tick.
        self.apply();
        Ok(())
    }

    /// The cluster part of `/status`.
    pub fn status(&self) -> ClusterStatus {
        let now = Instant::now().into_std();
        let snap = self.admission.snapshot();
        let names = self.admission.backend_names();
        let leases = self.leases();
        let s = &self.settings;
        ClusterStatus {
            id: s.id.clone(),
            redis: s.redis.redacted(),
            lease_ttl_ms: u64::try_from(s.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            safe_share: s.safe_share,
            instances: s.instances,
            backends: leases
                .iter()
                .zip(snap.backends.iter())
                .zip(names.iter())
                .map(|((l, b), name)| BackendLeaseView {
                    name: name.clone(),
                    cap: b.limit,
                    share: l.applied.unwrap_or(0),
                    basis: l.lease.basis(now).as_str().into(),
                    granted: l.lease.granted().map(|g| g.share),
                    target: l.lease.granted().map(|g| g.target),
                    valid_for_ms: l.lease.valid_until().map_or(0, |v| {
                        u64::try_from(v.saturating_duration_since(now).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                    learning: l.learning,
                    overcommitted: l.overcommitted,
                    renewals: l.renewals,
                    renewal_failures: l.failures,
                    grows: l.grows,
                    shrinks: l.shrinks,
                    last_error: l.last_error.clone(),
                    peers: l.peers.clone(),
                })
                .collect(),
        }
    }

    /// Run the applier and the renewer until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let applier = {
            let c = self.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(APPLY_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => c.apply(),
                        _ = shutdown.changed(), if !c.frozen.load(Ordering::SeqCst) => {
                            if *shutdown.borrow() && !c.frozen.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }
                }
            })
        };
        let every = self.settings.lease_ttl / 3;
        let mut conn: Option<Connection> = None;
        loop {
            let started = Instant::now();
            if self.renewing.load(Ordering::SeqCst) {
                self.renew_all(&mut conn).await;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(started + every) => {}
                _ = self.wake.notified() => {}
                // The old process of an upgrade serves its last requests after the shutdown
                // notice: its share must stay held in Redis until it exits, when its runtime
                // (and this loop) is dropped.
                _ = shutdown.changed(), if !self.frozen.load(Ordering::SeqCst) => {
                    if *shutdown.borrow() && !self.frozen.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        applier.abort();
    }
}

struct Reply {
    granted: Granted,
    learning: bool,
    overcommitted: bool,
    peers: Vec<Peer>,
}

fn parse_reply(v: &Value) -> Option<Reply> {
    let Value::Array(Some(items)) = v else {
        return None;
    };
    let num = |i: usize| -> Option<u32> {
        items
            .get(i)?
            .as_int()
            .map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
    };
    let granted = Granted {
        share: num(0)?,
        target: num(1)?,
    };
    let peers = items
        .get(4..)?
        .chunks(5)
        .filter_map(|p| {
            let n = |i: usize| {
                p.get(i)
                    .and_then(Value::as_int)
                    .map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
            };
            Some(Peer {
                id: p.first()?.as_text()?,
                share: n(1)?,
                live: n(2)? == 1,
                demand: n(3)?,
                safe_share: n(4)?,
            })
        })
        .collect();
    Some(Reply {
        granted,
        learning: num(2)? == 1,
        overcommitted: num(3)? == 1,
        peers,
    })
}

/// The cluster loops as a pingora background service.
pub struct ClusterService(pub Arc<Cluster>);

#[async_trait]
impl pingora::services::background::BackgroundService for ClusterService {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.0.clone().run(shutdown).await;
    }
}
