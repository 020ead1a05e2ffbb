//! The backend connections this process holds open, so that an old process handing its share
//! of the cap to a new one (see [`crate::ops::handoff`]) never gives away a slot while it still
//! holds a connection for it.
//!
//! pingora keeps idle upstream connections in a pool the proxy cannot reach: there is no way
//! to list or close them. So sluice records every new upstream connection (from
//! `connected_to_upstream`) by its file descriptor and socket inode, and counts the ones still
//! open by looking each descriptor up in `/proc/self/fd`: a descriptor that was closed, or
//! closed and reused for another socket, no longer names the same inode and is forgotten.
//!
//! Once the process drains ([`UpstreamConns::start_draining`]), connections go back to the
//! pool with a short idle timeout ([`DRAIN_IDLE_TIMEOUT`]): reused at once if the process still
//! has work, otherwise closed soon after. Connections pooled before that keep their configured
//! idle timeout; the old process keeps their slots until they are reused (and then closed) or
//! time out.
//!
//! Without `/proc` (not Linux) nothing is recorded, and the count is always zero.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Idle timeout of an upstream connection released while the process drains.
pub const DRAIN_IDLE_TIMEOUT: Duration = Duration::from_millis(250);

/// The list is pruned of closed connections when it grows past this (or twice its size
/// after the last prune).
const PRUNE_AT_LEAST: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    backend: usize,
    fd: RawFd,
    inode: u64,
}

#[derive(Debug)]
struct List {
    conns: Vec<Conn>,
    prune_at: usize,
}

/// The upstream connections this process opened and that are still open.
#[derive(Debug)]
pub struct UpstreamConns {
    list: Mutex<List>,
    draining: AtomicBool,
    /// The connections sluice dials itself, and those parked after a late answer.
    dialed: std::sync::Arc<crate::ghost::Conns>,
}

impl Default for UpstreamConns {
    fn default() -> Self {
        UpstreamConns {
            list: Mutex::new(List {
                conns: Vec::new(),
                prune_at: PRUNE_AT_LEAST,
            }),
            draining: AtomicBool::new(false),
            dialed: crate::ghost::Conns::new(),
        }
    }
}

/// The inode of the socket open as `fd` in this process, if it is one.
fn socket_inode(fd: RawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn still_open(c: &Conn) -> bool {
    socket_inode(c.fd) == Some(c.inode)
}

impl UpstreamConns {
    fn list(&self) -> MutexGuard<'_, List> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a new connection to backend `backend` on descriptor `fd`.
    pub fn opened(&self, backend: usize, fd: RawFd) {
        let Some(inode) = socket_inode(fd) else {
            return;
        };
        let mut list = self.list();
        if list.conns.len() >= list.prune_at {
            list.conns.retain(still_open);
            list.prune_at = (list.conns.len() * 2).max(PRUNE_AT_LEAST);
        }
        list.conns.push(Conn { backend, fd, inode });
    }

    /// Connections to `backend` still open (in use or idle in the pool).
    pub fn open(&self, backend: usize) -> u32 {
        let mut list = self.list();
        list.conns.retain(still_open);
        let n = list.conns.iter().filter(|c| c.backend == backend).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// From now on, connections go back to the pool with [`DRAIN_IDLE_TIMEOUT`].
    /// Connections parked after a late answer are closed.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.dialed.start_draining();
    }

    /// The registry of connections sluice dials itself (see [`crate::ghost`]).
    pub fn dialed(&self) -> &std::sync::Arc<crate::ghost::Conns> {
        &self.dialed
    }

    /// The idle timeout for a connection released now: `configured`, or
    /// [`DRAIN_IDLE_TIMEOUT`] while draining.
    pub fn idle_timeout(&self, configured: Option<Duration>) -> Option<Duration> {
        if self.draining.load(Ordering::Acquire) {
            Some(configured.map_or(DRAIN_IDLE_TIMEOUT, |c| c.min(DRAIN_IDLE_TIMEOUT)))
        } else {
            configured
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn counts_open_sockets_and_forgets_closed_ones() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let a = std::net::TcpStream::connect(addr).expect("connect");
        let b = std::net::TcpStream::connect(addr).expect("connect");
        let u = UpstreamConns::default();
        u.opened(0, a.as_raw_fd());
        u.opened(1, b.as_raw_fd());
        u.opened(0, 1_000_000); // not open: ignored
        assert_eq!((u.open(0), u.open(1)), (1, 1));
        let fd = a.as_raw_fd();
        drop(a);
        assert_eq!(u.open(0), 0, "a closed connection is not counted");
        // The descriptor is most likely reused for this socket: still not the recorded one.
        let c = std::net::TcpStream::connect(addr).expect("connect");
        let _reused = c.as_raw_fd() == fd;
        assert_eq!(u.open(0), 0);
        assert_eq!(u.open(1), 1);
    }

    #[test]
    fn draining_shortens_the_idle_timeout() {
        let u = UpstreamConns::default();
        let long = Some(Duration::from_secs(60));
        assert_eq!(u.idle_timeout(long), long);
        u.start_draining();
        assert_eq!(u.idle_timeout(long), Some(DRAIN_IDLE_TIMEOUT));
        assert_eq!(u.idle_timeout(None), Some(DRAIN_IDLE_TIMEOUT));
    }
}
