//! Hot reload: re-read the configuration file and apply it to the running proxy.
//!
//! Triggered by SIGHUP, `POST /reload` on the admin listener, or `sluice reload`. What changes
//! in place, without dropping a connection or an in-flight request:
//! - limits, rate, burst and slow start of every backend (a lowered limit admits nothing more
//!   until the work in flight drains below it; a raised one admits waiters at once);
//! - the queue bound and deadline, `Retry-After`, client timeouts and connection caps (for new
//!   connections and requests), body limits, upstream timeouts and Host overrides;
//! - the backend list: a new name is added (up, ramping with slow start); a removed name is
//!   drained (its in-flight requests finish; it takes no new work); a changed address sends new
//!   requests to the new address;
//! - the access log target;
//! - the TLS listener's certificate and key, re-read from their files on every reload (new
//!   handshakes get the new certificate), and TLS toward backends (`tls`, `sni`, `tls_verify`).
//!
//! What needs new sockets or threads (listen, TLS listen and admin addresses, `[server]`, the
//! client read and write buffers, health-check settings, the backend CA file) is reported as needing an upgrade (`sluice run --upgrade`).
//! An invalid file is refused with its error and the running configuration stays.
//!
//! Which is which is decided in one place, the typed diff of [`crate::config::diff()`]: every
//! field of the configuration is classified there, and the report is built from it.

use std::sync::Arc;

use serde::Serialize;

use crate::admission::policy;
use crate::config::{diff, Config, Effect, LoadError};
use crate::observe::access_log::AccessLog;
use crate::shared::{upstream, Settings, Shared};

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changes applied in place.
    pub applied: Vec<String>,
    /// Changes that need an upgrade to take effect.
    pub needs_upgrade: Vec<String>,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The process was started without a config file.
    #[error("sluice was started without --config; there is no file to reload")]
    NoFile,
    /// The new file is invalid; the running config stays.
    #[error("{0}; the running configuration stays in force")]
    Invalid(#[from] LoadError),
}

/// Re-read the file and apply it. Serialised: one reload at a time.
pub fn reload(shared: &Arc<Shared>) -> Result<ReloadReport, ReloadError> {
    let source = &shared.source;
    let path = source.path.as_ref().ok_or(ReloadError::NoFile)?;
    let _one_at_a_time = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    // The configuration in force: the one the current settings snapshot was built from.
    let current = shared.settings().config.clone();
    let new = match Config::load(path, &source.overrides) {
        Ok(c) => c,
        Err(e) => {
            shared.metrics.reload(false);
            log::error!("reload refused: {e}; the running configuration stays in force");
            return Err(e.into());
        }
    };
    let report = apply(shared, &current, &new);
    shared.metrics.reload(true);
    for a in &report.applied {
        log::warn!("reload: {a}");
    }
    for u in &report.needs_upgrade {
        log::warn!(
            "reload: {u} changed but needs an upgrade (sluice run --upgrade) to take effect"
        );
    }
    Ok(report)
}

fn apply(shared: &Shared, old: &Config, new: &Config) -> ReloadReport {
    let mut report = ReloadReport::default();
    let changes = diff(old, new);
    let changed = |effect: Effect| changes.iter().any(|c| c.effect == effect);
    for c in &changes {
        if let Effect::Upgrade(label) = c.effect {
            if !report.needs_upgrade.iter().any(|u| u == label) {
                report.needs_upgrade.push(label.to_string());
            }
        }
    }

    let admission = &shared.admission;
    let settings = shared.settings();
    let mut upstreams = settings.upstreams.clone();
    let names = admission.backend_names();
    for b in &new.backends {
        match names.iter().position(|n| *n == b.name) {
            Some(i) => {
                let id = sluice_plugins::BackendId(i);
                let before = old.backends.iter().find(|o| o.name == b.name);
                if before.map(policy) != Some(policy(b)) {
                    admission.set_policy(id, policy(b));
                    report.applied.push(format!(
                        "backend {}: max_inflight {}, rate {:?}, slow start {:?}",
                        b.name,
                        b.max_inflight,
                        b.rate,
                        b.slow_start.map(|s| s.duration)
                    ));
                }
                if before.is_none() {
                    // It was removed by an earlier reload and comes back.
                    let _ = admission.ready(&b.name);
                    report
                        .applied
                        .push(format!("backend {}: back in service", b.name));
                }
                let up = upstream(new, b, shared.upstream.dialed());
                if let Some(slot) = upstreams.get_mut(i) {
                    let was_tls = before.map(|o| &o.tls);
                    if slot.addr != up.addr || slot.host != up.host || was_tls != Some(&b.tls) {
                        report.applied.push(format!(
                            "backend {}: address {} host {:?} tls {:?}",
                            b.name, b.address, b.host, b.tls
                        ));
                    }
                    *slot = up;
                }
            }
            None => {
                let id =
                    admission.add_backend(&b.name, policy(b), new.health.rise, new.health.fall);
                debug_assert_eq!(id.0, upstreams.len());
                upstreams.push(upstream(new, b, shared.upstream.dialed()));
                report.applied.push(format!(
                    "backend {} added at {} (max_inflight {})",
                    b.name, b.address, b.max_inflight
                ));
            }
        }
    }
    for name in &names {
        let still = new.backends.iter().any(|b| &b.name == name);
        let was = old.backends.iter().any(|b| &b.name == name);
        if !still && was {
            let _ = admission.drain(name);
            report.applied.push(format!(
                "backend {name} removed: drained (in-flight requests finish)"
            ));
        }
    }
    if changed(Effect::Queue) {
        admission.set_max_queue(new.max_queue);
        report.applied.push(format!(
            "queue: max {} waiting, timeout {}",
            new.max_queue,
            humantime::format_duration(new.queue_timeout)
        ));
    }
    if changed(Effect::Settings) {
        report.applied.push(
            "retry_after, client timeouts and connection caps, size limits and upstream timeouts"
                .into(),
        );
    }
    let fresh = Settings::new(new, shared.upstream.dialed());
    let next = Settings { upstreams, ..fresh };
    shared.settings.replace(next);

    // The certificate files are re-read on every reload: a renewed certificate keeps its path.
    if let (Some(store), Some(tls)) = (&shared.tls, &new.tls) {
        match crate::tls::load_certified_key(&tls.cert, &tls.key) {
            Ok(key) => {
                store.replace(key);
                report.applied.push(format!(
                    "TLS certificate {} (new handshakes)",
                    tls.cert.display()
                ));
            }
            Err(e) => report
                .needs_upgrade
                .push(format!("TLS certificate not replaced: {e}")),
        }
    }

    if changed(Effect::AccessLog) {
        match AccessLog::open(&new.access_log) {
            Ok(log) => {
                shared.access_log.replace(log);
                report
                    .applied
                    .push(format!("access log: {:?}", new.access_log));
            }
            Err(e) => report.needs_upgrade.push(format!(
                "log.access (cannot open {:?}: {e})",
                new.access_log
            )),
        }
    }
    report
}

/// Take SIGHUP over now, before any listener answers: the reload service installs its handler
/// only once its runtime has started, and until then SIGHUP's default action would end the
/// process. tokio never uninstalls a signal handler it installed, so a handler registered on a
/// throwaway runtime stays, and the service's listener receives what arrives after it starts (a
/// SIGHUP before that is ignored rather than fatal).
pub fn keep_sighup_from_killing() {
    use tokio::signal::unix::{signal, SignalKind};
    let hangup = || {
        signal(SignalKind::hangup())
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // Built inside a runtime (the in-process test harness), that runtime registers it; a
    // runtime may be neither started nor dropped there.
    let installed = match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let _entered = handle.enter();
            hangup()
        }
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                let _entered = rt.enter();
                hangup()
            }),
    };
    if let Err(e) = installed {
        log::error!("cannot take SIGHUP over ({e}): a SIGHUP before the reload service starts ends the process");
    }
}

/// Reload on SIGHUP, as a background service.
pub struct SighupReload(pub Arc<Shared>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for SighupReload {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP ({e}); reload with `sluice reload`");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let shared = self.0.clone();
                    // Reading the file is blocking work.
                    let _ = tokio::task::spawn_blocking(move || reload(&shared)).await;
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}
