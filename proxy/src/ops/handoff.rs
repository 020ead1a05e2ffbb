//! Keeping the backend cap across a zero-downtime upgrade.
//!
//! pingora's upgrade runs two processes side by side: the new one (`sluice run --upgrade`)
//! takes over the listening sockets, the old one (sent SIGQUIT) keeps accepting for about 5 s,
//! then drains its in-flight requests for the grace period. Each has its own admission state,
//! so without coordination the backend could see twice its cap during the overlap.
//!
//! sluice splits each backend's cap between the two processes over a Unix socket next to the
//! upgrade socket (`<upgrade_sock>.cap`):
//! - The new process binds the socket before it takes the listeners, and starts with *every*
//!   slot reserved for the old process (it admits nothing yet; its requests queue).
//! - On SIGQUIT the old process connects and, every few milliseconds, lowers its own claim to
//!   what it still needs, *first* lowering its own limit and *then* reporting the claim. Claims
//!   only ever go down, so at every instant old claim + new share ≤ cap. What it needs:
//!   - its requests in flight and queued;
//!   - headroom: half the cap while it still accepts connections; afterwards (its grace
//!     period) one slot per client connection it still holds, up to half the cap and at least
//!     one. A kept-alive connection stays open during the grace period (see [`crate::conn`]),
//!     and a request arriving on it must be served, not refused: a `503` + close there is what
//!     makes WinInet re-send a POST's header without its body. Each such connection closes
//!     after its `Connection: close` answer, so the headroom shrinks as they do. The trade-off:
//!     while terminals stay connected to the old process without sending, the new one runs
//!     with up to half the cap less, at most until the old process's grace period ends;
//!   - its open backend connections ([`crate::ops::upstream_conns`]), idle ones included, and
//!     the ones it closed that the backend has not closed yet ([`crate::ghost::Conns::closing`]):
//!     a slot is handed over only once the backend no longer counts its connection, so old +
//!     new connections stay within the cap. Each idle connection keeps a slot on top of the
//!     capacity: a request may find pingora's pool empty (its race) and dial beside it. From
//!     SIGQUIT on, the old process pools connections with a short idle timeout, so they close
//!     soon after its last request.
//! - The new process sets its reservation to the old's claim; when the old process exits (or the
//!   claim reaches zero), the new one has the whole cap.
//! - With `[cluster]`, "the cap" is the instance's leased share: the old process reports it with
//!   each claim (`name=claim:share`) and keeps renewing it until it exits; the new process
//!   admits that share less the claim, and renews the lease once the old process is done (see
//!   [`crate::ops::cluster`]).
//!
//! If no old process connects within [`HANDOFF_TIMEOUT`], the new process releases the
//! reservation and runs alone (for example, when upgrading from a version without hand-over).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use sluice_plugins::BackendId;

use crate::shared::Shared;

/// How long a new process waits for the old one to connect before running alone.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(15);
/// pingora keeps the old process accepting this long after it handed the sockets over
/// (`CLOSE_TIMEOUT`); meanwhile the old process keeps headroom for the connections it accepts.
pub const OLD_ACCEPTING: Duration = Duration::from_secs(6);
/// How often the old process reports its claim.
const TICK: Duration = Duration::from_millis(5);

/// The hand-over socket path for an upgrade socket path.
pub fn socket_path(upgrade_sock: &str) -> PathBuf {
    PathBuf::from(format!("{upgrade_sock}.cap"))
}

/// New process, at build time (before any listener accepts): reserve every slot for the old
/// process. [`Receiver`] then releases them as the old process's claims come down.
pub fn reserve_all(shared: &Shared) {
    for (i, b) in shared.admission.snapshot().backends.iter().enumerate() {
        shared.admission.set_reserved(BackendId(i), b.limit);
    }
}

/// New process: bind the hand-over socket and apply the old process's claims on a thread.
fn receive(shared: Arc<Shared>, path: &Path) -> std::io::Result<()> {
    let limits = shared.admission.snapshot().backends.len();
    let release = move |shared: &Shared| {
        for i in 0..limits {
            shared.admission.set_reserved(BackendId(i), 0);
        }
        // The old process no longer renews the cluster lease: this one takes over.
        if let Some(c) = &shared.cluster {
            c.resume();
        }
    };
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path).and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            release(&shared);
            return Err(e);
        }
    };
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("sluice-handoff".into())
        .spawn(move || {
            let started = Instant::now();
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break Some(s),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if started.elapsed() > HANDOFF_TIMEOUT {
                            log::warn!("upgrade: no old process handed over its share of the cap within {HANDOFF_TIMEOUT:?}; running alone");
                            break None;
                        }
                        std::thread::sleep(TICK);
                    }
                    Err(e) => {
                        log::error!("upgrade: hand-over socket failed: {e}; running alone");
                        break None;
                    }
                }
            };
            if let Some(stream) = stream {
                follow_claims(&shared, stream);
            }
            release(&shared);
            let _ = std::fs::remove_file(&path);
            log::warn!("upgrade: the old process is done; this process has the whole cap");
        })?;
    Ok(())
}

/// The new process's side of the hand-over, as a background service: it starts after pingora
/// has daemonized (threads do not survive the fork).
pub struct Receiver {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Receiver {
    /// A receiver for the hand-over socket at `path`.
    pub fn new(shared: Arc<Shared>, path: PathBuf) -> Self {
        Receiver { shared, path }
    }
}

#[async_trait]
impl pingora::services::background::BackgroundService for Receiver {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        if let Err(e) = receive(self.shared.clone(), &self.path) {
            log::error!(
                "upgrade: cannot bind the hand-over socket {} ({e}); running alone",
                self.path.display()
            );
        }
    }
}

/// Apply the old process's claims until it closes the connection.
fn follow_claims(shared: &Shared, stream: UnixStream) {
    // A stuck old process must not hold the cap forever: its grace period bounds it anyway.
    let _ = stream.set_read_timeout(Some(HANDOFF_TIMEOUT));
    let names = shared.admission.backend_names();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        // "name=claim name=claim ...", or with [cluster] "name=claim:share ...": the old
        // process's share of the cluster lease, which it keeps renewing until it exits.
        for part in line.split_whitespace() {
            let Some((name, value)) = part.split_once('=') else {
                continue;
            };
            let (claim, share) = match value.split_once(':') {
                Some((c, s)) => (c, s.parse::<u32>().ok()),
                None => (value, None),
            };
            let (Some(i), Ok(claim)) = (names.iter().position(|n| n == name), claim.parse::<u32>())
            else {
                continue;
            };
            if let (Some(c), Some(share)) = (&shared.cluster, share) {
                c.inherit(BackendId(i), share);
            }
            shared.admission.set_reserved(BackendId(i), claim);
        }
    }
}

/// Slots the old process keeps beyond its work in flight and queued, for a backend with cap
/// `limit`: half the cap while it still accepts connections; afterwards, one per client
/// connection it still holds, up to half the cap (at least one), so that a request arriving
/// on a kept-alive connection during the grace period is served rather than refused. As those
/// connections close (each after its `Connection: close` answer), the share goes to the new
/// process.
fn headroom(limit: u32, accepting: bool, clients: u32) -> u32 {
    if accepting {
        limit / 2
    } else {
        clients.min((limit / 2).max(1))
    }
}

/// Old process: connect to the new process and hand the cap over as in-flight work drains.
/// Runs on its own thread until the process exits.
pub fn hand_over(shared: Arc<Shared>, path: PathBuf) {
    // Backend connections released from now on close soon after their last use.
    shared.upstream.start_draining();
    let spawned = std::thread::Builder::new()
        .name("sluice-handoff".into())
        .spawn(move || {
            let started = Instant::now();
            let mut stream = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(e) if started.elapsed() > Duration::from_secs(5) => {
                        log::warn!("upgrade: cannot reach the new process at {} ({e}); not handing over the cap", path.display());
                        return;
                    }
                    Err(_) => std::thread::sleep(TICK),
                }
            };
            let admission = &shared.admission;
            let names = admission.backend_names();
            // What was last reported for each backend: a claim never grows.
            let mut reported = vec![u32::MAX; names.len()];
            loop {
                let snap = admission.snapshot();
                let settings = shared.settings();
                let accepting = started.elapsed() < OLD_ACCEPTING;
                let clients = shared.metrics.client_connections().get();
                let clients = u32::try_from(clients.max(0)).unwrap_or(u32::MAX);
                let mut line = String::new();
                let mut total = 0;
                for (i, name) in names.iter().enumerate() {
                    let (Some(b), Some(last)) = (snap.backends.get(i), reported.get_mut(i)) else {
                        continue;
                    };
                    let headroom = headroom(b.limit, accepting, clients);
                    let extra = (snap.queued as u64 + u64::from(headroom))
                        .min(u64::from(u32::MAX)) as u32;
                    // Atomically: our capacity becomes in flight + extra, and only shrinks.
                    // Only then is it reported, so ours + the new process's ≤ the cap.
                    let capacity = admission.shrink_capacity(BackendId(i), extra);
                    // A slot is handed over only once its backend connection is closed too,
                    // on the backend's side as well, and not parked (see [`crate::ghost`]),
                    // so the backend never sees more connections than the cap. Each idle
                    // connection keeps a slot too: a request within `capacity` may find
                    // pingora's pool empty (its race) and dial beside it, so the process may
                    // hold `capacity` connections for its requests plus the idle ones.
                    let (aside, idle) = settings.upstreams.get(i).map_or((0, 0), |u| {
                        let dialed = shared.upstream.dialed();
                        (dialed.aside(u.addr), dialed.idle(u.addr))
                    });
                    let open = shared.upstream.open(i).saturating_add(aside);
                    let reach = capacity.saturating_add(idle).saturating_add(aside);
                    let claim = reach.max(open).min(*last);
                    *last = claim;
                    total += claim;
                    match shared.cluster.as_ref().and_then(|c| c.share(BackendId(i))) {
                        Some(share) => line.push_str(&format!("{name}={claim}:{share} ")),
                        None => line.push_str(&format!("{name}={claim} ")),
                    }
                }
                line.push('\n');
                if stream.write_all(line.as_bytes()).is_err() {
                    return;
                }
                if total == 0 && !accepting {
                    return;
                }
                std::thread::sleep(TICK);
            }
        });
    if let Err(e) = spawned {
        log::error!("upgrade: cannot start the hand-over thread: {e}");
    }
}

/// pingora's Unix signals (SIGQUIT upgrade, SIGTERM graceful stop, SIGINT fast stop), with the
/// cap hand-over started on SIGQUIT.
pub struct Signals {
    shared: Arc<Shared>,
    upgrade_sock: String,
}

impl Signals {
    /// Signals for the proxy with this shared state and upgrade socket.
    pub fn new(shared: Arc<Shared>, upgrade_sock: &str) -> Self {
        Signals {
            shared,
            upgrade_sock: upgrade_sock.into(),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => {
                // From now on the cluster share only goes down, so the claims handed over
                // stay upper bounds.
                if let Some(c) = &self.shared.cluster {
                    c.freeze();
                }
                hand_over(self.shared.clone(), socket_path(&self.upgrade_sock));
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::headroom;

    #[test]
    fn headroom_follows_open_client_connections_after_accepting() {
        assert_eq!(headroom(32, true, 0), 16, "half the cap while accepting");
        assert_eq!(headroom(32, false, 400), 16, "at most half the cap");
        assert_eq!(headroom(32, false, 3), 3, "one per connection still open");
        assert_eq!(
            headroom(32, false, 0),
            0,
            "none once every connection closed"
        );
        assert_eq!(
            headroom(1, false, 5),
            1,
            "at least one while a connection is open"
        );
    }
}
