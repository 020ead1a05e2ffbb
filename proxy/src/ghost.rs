//! Ghost work: what the backend still does after sluice gave up waiting for it, tracked from
//! the wire instead of guessed.
//!
//! After an upstream timeout the client gets its `504`, but the backend (an ISAPI request on
//! one of its threads) is most likely still working. pingora drops the upstream connection on
//! that error, and with it any way to see the backend finish; a fixed hold
//! (`upstream.timeout_hold`) was the only guess left. So sluice dials plain-TCP backend
//! connections itself, through pingora's custom L4 connector ([`Dialer`]), and keeps a spare
//! descriptor of each socket (`TcpStream::try_clone`, a `dup`). When pingora drops a connection
//! whose request timed out, the socket stays open through the spare, and [`watch`] reads the
//! late answer:
//! - the slot is released when the backend answers or closes the connection, and at
//!   `upstream.timeout_hold` at the latest;
//! - a complete answer on a keep-alive connection parks it for the next connection sluice
//!   needs to that backend ([`Conns::unpark`]), so the backend sees no extra connection.
//!
//! Every other spare is closed the moment pingora is done with its connection: a tracer on
//! pingora's stream reports the drop, and a connection the request path does not claim as a
//! ghost closes with it. So no connection outlives pingora's use of it by more than the end of
//! its request.
//!
//! A backend counts a connection as open until it has read the close and closed its own side,
//! which is later than sluice's close. So sluice closes a connection by sending its FIN
//! (`shutdown(Write)`) and keeps counting it as *closing* until the backend's own FIN arrives,
//! [`CLOSING_WAIT`] at most. A dial to that backend waits for its closing connections like
//! for an unheld one (below), and an old process handing its slots over during an upgrade
//! keeps a slot while its connection is closing ([`Conns::closing`]). So a connection that
//! replaces a closed one never reaches the backend while the backend still counts the old one.
//!
//! The registry also keeps pingora's pool within the cap, and the backend's connections
//! long-lived. pingora 0.9 can lose a pooled connection to a race with the connection's own
//! idle poller ([pingora#998](https://github.com/cloudflare/pingora/issues/998)): the request
//! that took it out of the pool fails to unwrap it, drops it, and dials. Left alone, that
//! costs the backend a new connection (one more TIME_WAIT, one more accept) each time, and for
//! a moment one connection more than requests in flight. So a connection pingora drops while
//! it sits idle in its pool (no request holds it, and one has used it: pingora put it there
//! as reusable, after a complete answer) is *rescued*: its spare is parked for
//! [`RESCUE_WAIT`], and the dial that follows takes it ([`Conns::take_or_wait`]) instead of
//! connecting. A dial also waits (briefly, at most [`RELEASE_WAIT`]) while a connection to
//! the same backend is open that no request holds: the lost connection is about to be
//! dropped and rescued, or a request picks it out of the pool. Either way the new connection
//! does not come on top of it.
//!
//! A rescued connection is as clean as one pingora takes out of its pool: pingora pooled it
//! only after reading a complete answer with nothing after it, and it is taken only if the
//! socket has nothing to read (no stray bytes, no close), the check pingora makes too. A
//! connection pingora drops while a request holds it (an error, a close-delimited answer, a
//! `Connection: close`) is never rescued: the request's claim ends after pingora has decided.
//!
//! Backends reached over TLS are dialed by pingora: their late answer cannot be read without
//! the TLS session, and their slots keep the fixed hold.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::upstreams::peer::{Tracer, Tracing};
use pingora::{Error, ErrorType, OrErr, Result};
use tokio::io::AsyncReadExt;

/// Largest response header a ghost answer may have before sluice stops parsing it (and waits
/// for the backend to close instead).
const MAX_HEAD: usize = 64 * 1024;

/// A connection parked after a ghost answer is dropped after this long unused, at most.
const MAX_PARKED_IDLE: Duration = Duration::from_secs(60);

/// How long a dial waits, at most, for an open connection no request holds to close or be
/// picked up (see the module docs). pingora drops a connection lost to its pool race within
/// microseconds; the bound only matters if an idle connection is somehow never handed out.
pub const RELEASE_WAIT: Duration = Duration::from_millis(50);

/// How long a connection rescued from pingora's pool race waits for the dial that lost it
/// (see the module docs) before it is closed. That dial follows within microseconds; a
/// connection pingora dropped for another reason (its idle timeout, the backend closing it)
/// has no dial waiting and closes after this.
pub const RESCUE_WAIT: Duration = Duration::from_millis(50);

/// How long a connection sluice closed counts as open, at most, while the backend has not
/// closed its side (see the module docs). A backend closes on reading the close, within
/// moments; the bound only matters for one that keeps a half-closed connection open.
pub const CLOSING_WAIT: Duration = Duration::from_secs(1);

/// The sockets sluice dialed and still holds a spare descriptor of, and the connections parked
/// after a ghost answer. One per process.
#[derive(Debug, Default)]
pub struct Conns {
    /// By pingora's descriptor: looked up when a request gets its connection.
    by_fd: Mutex<HashMap<RawFd, Arc<Conn>, BuildHasherDefault<FdHasher>>>,
    /// Keep-alive connections whose late answer was read whole.
    parked: Mutex<Vec<Parked>>,
    /// The process is draining: nothing is parked any more.
    draining: std::sync::atomic::AtomicBool,
    /// Ids for parked connections.
    next_id: std::sync::atomic::AtomicU64,
    /// Signalled when a request claims a connection or pingora drops one, if a dial waits
    /// (see [`Conns::changed`]).
    changed: tokio::sync::Notify,
    /// Dials waiting on `changed`.
    waiting: std::sync::atomic::AtomicUsize,
    /// Dials that waited [`RELEASE_WAIT`] in vain for a connection no request held.
    waits_expired: std::sync::atomic::AtomicU64,
    /// Connections closed by sluice that the backend has not closed yet, by backend address.
    closing: Mutex<HashMap<SocketAddr, u32>>,
    /// Dials that waited [`CLOSING_WAIT`] in vain for the backend to close a connection.
    closing_expired: std::sync::atomic::AtomicU64,
    /// Connections rescued after pingora dropped them idle, and taken by a dial.
    rescued: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Parked {
    id: u64,
    addr: SocketAddr,
    sock: std::net::TcpStream,
    /// Rescued from pingora's pool, rather than parked after a ghost answer.
    rescued: bool,
}

/// Hashes a file descriptor by one multiplication (Fibonacci hashing, which spreads small
/// integers over the high bits the map's probing uses). Descriptors are not chosen by
/// clients, so SipHash's protection against chosen keys buys nothing here, and the map is
/// looked up on every request.
#[derive(Debug, Default, Clone, Copy)]
struct FdHasher(u64);

impl Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i32(&mut self, n: i32) {
        // The descriptor's bits, not its sign-extended value.
        self.0 = u64::from(n as u32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One dialed connection.
#[derive(Debug)]
struct Conn {
    /// The process's connections, to close this one's spare when its last claim ends after
    /// pingora dropped it (rare; a weak reference, so a claim writes no count shared with
    /// every other request).
    conns: std::sync::Weak<Conns>,
    fd: RawFd,
    addr: SocketAddr,
    /// Taken out of the park rather than dialed: for the request path it is a reused
    /// connection (the backend may have closed it since).
    recycled: bool,
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    /// The spare descriptor: `None` once closed or handed to a ghost watch.
    spare: Option<std::net::TcpStream>,
    /// Requests holding the connection now. Usually one; two for a moment when the request
    /// that released it to pingora's pool has not ended yet and the next one took it.
    claims: u32,
    /// A request has used the connection (a new one is not idle before its first request).
    used: bool,
    /// pingora dropped its stream.
    dropped: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conns {
    /// A new registry, shared by every backend's [`Dialer`].
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The connection pingora hands a request (by its descriptor, from
    /// `connected_to_upstream`), if sluice dialed it.
    pub fn claim(self: &Arc<Self>, fd: RawFd) -> Option<Claim> {
        let conn = lock(&self.by_fd).get(&fd)?.clone();
        {
            let mut st = lock(&conn.state);
            st.claims += 1;
            st.used = true;
        }
        self.changed();
        Some(Claim { conn })
    }

    /// Tell the waiting dials that connections changed. Nothing to do, and no shared memory
    /// written, when none waits (every request claims a connection): a dial counts itself
    /// waiting before it looks at the connections, and a change is made before this looks at
    /// the count, so either the dial sees the change or this sees the dial.
    fn changed(&self) {
        if self.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Connections to `addr` that sluice closed and the backend has not closed yet.
    pub fn closing(&self, addr: SocketAddr) -> u32 {
        lock(&self.closing).get(&addr).copied().unwrap_or(0)
    }

    /// Connections to `addr` the backend counts as open that pingora does not hold: parked
    /// (rescued, or after a ghost answer) or closing. A process handing its slots over counts
    /// them with pingora's.
    pub fn aside(&self, addr: SocketAddr) -> u32 {
        let parked = lock(&self.parked).iter().filter(|p| p.addr == addr).count();
        u32::try_from(parked)
            .unwrap_or(u32::MAX)
            .saturating_add(self.closing(addr))
    }

    /// A request's claim on `conn` ended; once pingora has dropped the connection too, and no
    /// other request holds it, its spare is closed ([`Conns::close`]).
    fn unclaim(conn: &Conn) {
        let spare = {
            let mut st = lock(&conn.state);
            st.claims = st.claims.saturating_sub(1);
            if st.dropped && st.claims == 0 {
                st.spare.take()
            } else {
                None
            }
        };
        if let Some(sock) = spare {
            match conn.conns.upgrade() {
                Some(conns) => conns.close(conn.addr, sock),
                None => drop(sock), // the process is ending: just close
            }
        }
    }

    /// Close a connection the way the backend can count: send the close, and count the
    /// connection as closing until the backend closes its side too (or [`CLOSING_WAIT`]).
    fn close(self: &Arc<Self>, addr: SocketAddr, sock: std::net::TcpStream) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (the process is ending): just close
        };
        if sock.shutdown(std::net::Shutdown::Write).is_err() {
            return; // already broken: closing it now is all there is to do
        }
        *lock(&self.closing).entry(addr).or_insert(0) += 1;
        let closed = Closed {
            conns: self.clone(),
            addr,
        };
        runtime.spawn(async move {
            let _closed = closed;
            let Ok(mut tcp) = tokio::net::TcpStream::from_std(sock) else {
                return;
            };
            let mut sink = [0u8; 256];
            let drain = async {
                // Whatever the backend still sends is dropped; its FIN (or a reset) ends it.
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout(CLOSING_WAIT, drain).await;
        });
    }

    /// Open connections to `addr` that no request holds: idle in pingora's pool, or lost to
    /// its pool race and about to be dropped. A request may not get one of them from
    /// pingora's pool (its race) and dial beside them, so a dial waits for them, and a process
    /// handing its slots over keeps a slot for each.
    pub fn idle(&self, addr: SocketAddr) -> u32 {
        let n = lock(&self.by_fd)
            .values()
            .filter(|c| {
                c.addr == addr && {
                    let st = lock(&c.state);
                    st.used && st.claims == 0 && !st.dropped
                }
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// A connection to `addr` for a dial: a parked one if there is one (rescued from pingora's
    /// pool race, or parked after a ghost answer), else `None` once the dial may connect. It
    /// may connect once the backend has closed every connection sluice closed
    /// ([`CLOSING_WAIT`] at most), and no open connection is left unheld ([`RELEASE_WAIT`] at
    /// most; under load some connection is always between two requests, so that bound is
    /// often reached, and the dial is then for a request pingora had no idle connection for).
    pub async fn take_or_wait(&self, addr: SocketAddr) -> Option<std::net::TcpStream> {
        let start = tokio::time::Instant::now();
        // Counted before anything is looked at, so a change made after it is signalled.
        let _waiting = Waiting::count(&self.waiting);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(sock) = self.unpark(addr) {
                return Some(sock);
            }
            let closing = self.closing(addr) > 0;
            if !closing && self.idle(addr) == 0 {
                return None;
            }
            let deadline = start + if closing { CLOSING_WAIT } else { RELEASE_WAIT };
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let (counter, what, bound) = if closing {
                    (
                        &self.closing_expired,
                        "a connection it closed is still open at the backend",
                        CLOSING_WAIT,
                    )
                } else {
                    (
                        &self.waits_expired,
                        "a connection no request holds is still open",
                        RELEASE_WAIT,
                    )
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::debug!("dialing {addr} although {what} after {bound:?}");
                return self.unpark(addr);
            }
        }
    }

    /// Dials that waited [`RELEASE_WAIT`] in vain for an unheld connection to close.
    pub fn waits_expired(&self) -> u64 {
        self.waits_expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Dials that waited [`CLOSING_WAIT`] in vain for the backend to close a connection sluice
    /// closed.
    pub fn closing_expired(&self) -> u64 {
        self.closing_expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections rescued from pingora's pool race (or its idle drops) and taken by a dial
    /// instead of a new connection.
    pub fn rescued(&self) -> u64 {
        self.rescued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Close every parked connection and park no more (the process is draining).
    pub fn start_draining(self: &Arc<Self>) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        let parked = std::mem::take(&mut *lock(&self.parked));
        for p in parked {
            self.close(p.addr, p.sock);
        }
    }

    /// Connections sluice dialed that pingora still holds.
    pub fn dialed(&self) -> usize {
        lock(&self.by_fd).len()
    }

    /// Connections parked after a ghost answer or rescued from pingora's pool.
    pub fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    /// A parked connection to `addr` the backend has not closed, newest first.
    fn unpark(&self, addr: SocketAddr) -> Option<std::net::TcpStream> {
        let mut parked = lock(&self.parked);
        while let Some(i) = parked.iter().rposition(|p| p.addr == addr) {
            let p = parked.swap_remove(i);
            // Alive and quiet: nothing to read yet. Anything else (closed, or bytes nobody
            // asked for) and it is dropped.
            let mut probe = [0u8; 1];
            if matches!(p.sock.peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                if p.rescued {
                    self.rescued
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Some(p.sock);
            }
        }
        None
    }

    /// Park a connection for `idle` at most (then close it), after its ghost answer or
    /// rescued from pingora's pool. When nothing may be parked (the process is draining, or
    /// it is ending: no runtime), it is closed now.
    fn park(
        self: &Arc<Self>,
        addr: SocketAddr,
        sock: std::net::TcpStream,
        idle: Duration,
        rescued: bool,
    ) {
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(r) if !self.draining.load(std::sync::atomic::Ordering::Acquire) => r,
            _ => return self.close(addr, sock),
        };
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.parked).push(Parked {
            id,
            addr,
            sock,
            rescued,
        });
        self.changed();
        let conns = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(idle.min(MAX_PARKED_IDLE)).await;
            let expired = {
                let mut parked = lock(&conns.parked);
                let i = parked.iter().position(|p| p.id == id);
                i.map(|i| parked.swap_remove(i))
            };
            if let Some(p) = expired {
                conns.close(p.addr, p.sock);
            }
        });
    }

    /// pingora dropped its stream of `conn`. Idle in its pool (used, and no request holds it):
    /// the spare is rescued for the next dial. Otherwise the spare closes now if no request
    /// holds it, or when the last claim ends.
    fn dropped(self: &Arc<Self>, conn: &Conn) {
        let (spare, idle) = {
            let mut st = lock(&conn.state);
            st.dropped = true;
            if st.claims == 0 {
                (st.spare.take(), st.used)
            } else {
                (None, false)
            }
        };
        match spare {
            Some(sock) if idle => self.park(conn.addr, sock, RESCUE_WAIT, true),
            Some(sock) => self.close(conn.addr, sock),
            None => {}
        }
    }

    fn forget(&self, conn: &Arc<Conn>) {
        let mut by_fd = lock(&self.by_fd);
        if by_fd.get(&conn.fd).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            by_fd.remove(&conn.fd);
        }
    }
}

/// A request's hold on the connection it was given: while it lasts, the spare descriptor
/// survives pingora dropping the connection, so that a timed-out request can become a ghost
/// ([`Claim::orphan`]). Dropping the claim closes the spare if pingora is done.
#[derive(Debug)]
pub struct Claim {
    conn: Arc<Conn>,
}

impl Claim {
    /// The connection came out of the park: treat it as reused.
    pub fn recycled(&self) -> bool {
        self.conn.recycled
    }

    /// The socket, if pingora dropped its side of the connection (it does on an upstream
    /// timeout): the backend's late answer can still be read from it.
    pub fn orphan(self) -> Option<(SocketAddr, std::net::TcpStream)> {
        let mut st = lock(&self.conn.state);
        if !st.dropped {
            return None;
        }
        st.spare.take().map(|s| (self.conn.addr, s))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        Conns::unclaim(&self.conn);
    }
}

/// Counts a dial waiting for connections to change while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a std::sync::atomic::AtomicUsize) -> Self {
        waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Ends the count of one closing connection (see [`Conns::close`]).
struct Closed {
    conns: Arc<Conns>,
    addr: SocketAddr,
}

impl Drop for Closed {
    fn drop(&mut self) {
        {
            let mut closing = lock(&self.conns.closing);
            if let Some(n) = closing.get_mut(&self.addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    closing.remove(&self.addr);
                }
            }
        }
        self.conns.changed();
    }
}

/// Tells the registry when pingora drops a connection sluice dialed.
#[derive(Debug, Clone)]
struct OnDrop {
    conns: Arc<Conns>,
    conn: Arc<Conn>,
}

impl Tracing for OnDrop {
    fn on_connected(&self) {}

    fn on_disconnected(&self) {
        // Called from the stream's drop, before its descriptor closes: the number cannot have
        // been reused yet.
        self.conns.forget(&self.conn);
        self.conns.dropped(&self.conn);
        self.conns.changed();
    }

    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(self.clone())
    }
}

/// pingora's L4 connector for a plain-TCP backend: connects (or takes a parked connection)
/// and keeps a spare descriptor of the socket in [`Conns`].
#[derive(Debug)]
pub struct Dialer {
    conns: Arc<Conns>,
    connect_timeout: Duration,
}

impl Dialer {
    /// A connector registering its connections in `conns`.
    pub fn new(conns: Arc<Conns>, connect_timeout: Duration) -> Self {
        Dialer {
            conns,
            connect_timeout,
        }
    }

    async fn dial(&self, addr: SocketAddr) -> Result<std::net::TcpStream> {
        let connect = pingora::protocols::l4::ext::connect(&addr, None);
        let tcp = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("timeout {:?} connecting to {addr}", self.connect_timeout),
                )
            }
        };
        tcp.into_std()
            .or_err(ErrorType::SocketError, "cannot take the connected socket")
    }
}

#[async_trait]
impl L4Connect for Dialer {
    async fn connect(&self, addr: &PeerAddr) -> Result<Stream> {
        let PeerAddr::Inet(addr) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "sluice dials TCP backends only");
        };
        let (sock, recycled) = match self.conns.take_or_wait(*addr).await {
            Some(s) => (s, true),
            None => (self.dial(*addr).await?, false),
        };
        let spare = sock.try_clone().or_err(
            ErrorType::SocketError,
            "cannot duplicate the backend socket",
        )?;
        let tcp = tokio::net::TcpStream::from_std(sock)
            .or_err(ErrorType::SocketError, "cannot register the backend socket")?;
        let conn = Arc::new(Conn {
            conns: Arc::downgrade(&self.conns),
            fd: tcp.as_raw_fd(),
            addr: *addr,
            recycled,
            state: Mutex::new(ConnState {
                spare: Some(spare),
                claims: 0,
                used: false,
                dropped: false,
            }),
        });
        lock(&self.conns.by_fd).insert(conn.fd, conn.clone());
        let mut stream = Stream::from(tcp);
        stream.tracer = Some(Tracer(Box::new(OnDrop {
            conns: self.conns.clone(),
            conn,
        })));
        Ok(stream)
    }
}

/// How a ghost ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The backend finished its answer.
    Answered,
    /// The backend closed the connection (or it broke) before a complete answer.
    Closed,
    /// `upstream.timeout_hold` ran out first; the connection is closed.
    Expired,
}

impl End {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Answered => "answered",
            End::Closed => "closed",
            End::Expired => "expired",
        }
    }
}

/// What sluice knows of the request when it became a ghost.
#[derive(Debug, Clone, Copy)]
pub struct Ghost {
    /// A `HEAD` request: its answer has no body.
    pub head: bool,
    /// Part of the answer had already been read by pingora: its framing is lost, and only the
    /// backend closing the connection ends it.
    pub answer_started: bool,
    /// The slot is released at this instant at the latest.
    pub until: tokio::time::Instant,
    /// How long a connection parked after a complete answer may wait for reuse.
    pub park_idle: Duration,
}

/// Read the backend's late answer on `sock` until it is complete, the backend closes, or
/// `ghost.until`. A complete answer on a keep-alive connection is parked in `conns`.
pub async fn watch(
    conns: &Arc<Conns>,
    addr: SocketAddr,
    sock: std::net::TcpStream,
    ghost: Ghost,
) -> End {
    let Ok(mut tcp) = tokio::net::TcpStream::from_std(sock) else {
        return End::Closed;
    };
    let mut framing = Framing::new(ghost.head, ghost.answer_started);
    let mut buf = Vec::with_capacity(4096);
    loop {
        match framing.advance(&buf) {
            Progress::Done { reusable } => {
                if reusable {
                    if let Ok(sock) = tcp.into_std() {
                        conns.park(addr, sock, ghost.park_idle, false);
                    }
                }
                return End::Answered;
            }
            Progress::NeedMore { consumed } => {
                buf.drain(..consumed);
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(ghost.until, tcp.read(&mut chunk)).await {
            Err(_) => return End::Expired,
            Ok(Ok(0)) => {
                return match framing.at_close() {
                    true => End::Answered,
                    false => End::Closed,
                }
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => return End::Closed,
        }
    }
}

/// Where the reading of an HTTP/1 response stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a (final) response header.
    Head,
    /// `n` body bytes left.
    Length(u64),
    /// Waiting for a chunk-size line.
    ChunkSize,
    /// `n` bytes of chunk data, and its CRLF, left.
    ChunkData(u64),
    /// Trailer lines, up to an empty one.
    Trailers,
    /// The body ends when the connection does.
    UntilClose,
}

/// What [`Framing::advance`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The answer is complete; the connection can carry another request if `reusable`.
    Done {
        /// Keep-alive, and nothing after the answer.
        reusable: bool,
    },
    /// More bytes needed; the first `consumed` bytes of the buffer were used up.
    NeedMore {
        /// Bytes to drop from the front of the buffer.
        consumed: usize,
    },
}

/// An HTTP/1 response reader that only finds where the answer ends.
#[derive(Debug)]
pub struct Framing {
    head: bool,
    state: State,
    keepalive: bool,
}

impl Framing {
    /// A reader for the answer to a request (`head`: a `HEAD` request). `started`: the
    /// beginning was already read elsewhere, so only the end of the connection ends it.
    pub fn new(head: bool, started: bool) -> Self {
        Framing {
            head,
            state: if started {
                State::UntilClose
            } else {
                State::Head
            },
            keepalive: false,
        }
    }

    /// Whether the connection closing now ends the answer (a close-delimited body).
    pub fn at_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Read as far as `buf` allows. `buf` holds the bytes not consumed by earlier calls.
    pub fn advance(&mut self, buf: &[u8]) -> Progress {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Head => {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut resp = httparse::Response::new(&mut headers);
                    match resp.parse(rest) {
                        Ok(httparse::Status::Complete(n)) => {
                            pos += n;
                            let code = resp.code.unwrap_or(0);
                            if (100..200).contains(&code) && code != 101 {
                                continue; // interim answer: the final one follows
                            }
                            self.state = self.body_of(&resp, code);
                        }
                        Ok(httparse::Status::Partial) if rest.len() <= MAX_HEAD => {
                            return Progress::NeedMore { consumed: pos }
                        }
                        // Unparseable or too large: only the backend closing ends it.
                        _ => {
                            self.state = State::UntilClose;
                            self.keepalive = false;
                        }
                    }
                }
                State::Length(0) => {
                    return Progress::Done {
                        reusable: self.keepalive && pos == buf.len(),
                    }
                }
                State::Length(n) => {
                    let take = n.min(rest.len() as u64);
                    pos += take as usize;
                    self.state = State::Length(n - take);
                    if take == 0 {
                        return Progress::NeedMore { consumed: pos };
                    }
                }
                State::ChunkSize => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        pos += n;
                        self.state = State::Trailers;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        pos += n;
                        self.state = State::ChunkData(size.saturating_add(2));
                    }
                    Ok(httparse::Status::Partial) if rest.len() <= MAX_HEAD => {
                        return Progress::NeedMore { consumed: pos }
                    }
                    _ => {
                        self.state = State::UntilClose;
                        self.keepalive = false;
                    }
                },
                State::ChunkData(n) => {
                    let take = n.min(rest.len() as u64);
                    pos += take as usize;
                    self.state = if take == n {
                        State::ChunkSize
                    } else {
                        State::ChunkData(n - take)
                    };
                    if take < n {
                        return Progress::NeedMore { consumed: pos };
                    }
                }
                State::Trailers => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        pos += 2;
                        return Progress::Done {
                            reusable: self.keepalive && pos == buf.len(),
                        };
                    }
                    Some(line) => pos += line + 2,
                    None if rest.len() <= MAX_HEAD => return Progress::NeedMore { consumed: pos },
                    None => {
                        self.state = State::UntilClose;
                        self.keepalive = false;
                    }
                },
                State::UntilClose => {
                    return Progress::NeedMore {
                        consumed: buf.len(),
                    }
                }
            }
        }
    }

    /// The body framing of a final answer, and whether the connection stays open after it.
    fn body_of(&mut self, resp: &httparse::Response<'_, '_>, code: u16) -> State {
        let header = |name: &'static str| {
            resp.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let connection: Vec<String> = header("connection").collect();
        let says = |token: &str| {
            connection
                .iter()
                .any(|v| v.split(',').any(|t| t.trim() == token))
        };
        self.keepalive = match resp.version {
            Some(1) => !says("close"),
            _ => says("keep-alive"),
        };
        if self.head || code == 204 || code == 304 {
            return State::Length(0);
        }
        if code == 101 {
            self.keepalive = false;
            return State::UntilClose;
        }
        let chunked = header("transfer-encoding")
            .next_back()
            .is_some_and(|v| v.rsplit(',').next().is_some_and(|t| t.trim() == "chunked"));
        if chunked {
            return State::ChunkSize;
        }
        let lengths: Vec<Option<u64>> = header("content-length")
            .map(|v| v.trim().parse().ok())
            .collect();
        match lengths.as_slice() {
            [Some(n), rest @ ..] if rest.iter().all(|m| *m == Some(*n)) => State::Length(*n),
            [] => {
                self.keepalive = false;
                State::UntilClose
            }
            // Conflicting or invalid lengths: trust only the close.
            _ => {
                self.keepalive = false;
                State::UntilClose
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `bytes` in pieces of `step`, as a socket might deliver them.
    fn read(head: bool, bytes: &[u8], step: usize) -> Option<Progress> {
        let mut f = Framing::new(head, false);
        let mut buf = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            match f.advance(&buf) {
                done @ Progress::Done { .. } => return Some(done),
                Progress::NeedMore { consumed } => {
                    buf.drain(..consumed);
                }
            }
        }
        None
    }

    const DONE_REUSABLE: Option<Progress> = Some(Progress::Done { reusable: true });
    const DONE_CLOSE: Option<Progress> = Some(Progress::Done { reusable: false });

    #[test]
    fn finds_the_end_of_each_framing_whatever_the_pieces() {
        let cases: &[(&[u8], bool, Option<Progress>)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                false,
                DONE_REUSABLE,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                false,
                DONE_CLOSE,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                false,
                DONE_CLOSE,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\nok",
                false,
                DONE_REUSABLE,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
                false,
                DONE_REUSABLE,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                false,
                DONE_REUSABLE,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
                true,
                DONE_REUSABLE,
            ),
            // Not complete yet.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false, None),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                false,
                None,
            ),
            // Close-delimited, garbage, conflicting lengths: only the close ends them.
            (b"HTTP/1.1 200 OK\r\n\r\nsome body", false, None),
            (b"garbage\r\n\r\n", false, None),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                false,
                None,
            ),
        ];
        for (bytes, head, want) in cases {
            for step in [1, 2, 7, bytes.len()] {
                assert_eq!(
                    read(*head, bytes, step),
                    *want,
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn bytes_after_the_answer_keep_the_connection_from_reuse() {
        let mut f = Framing::new(false, false);
        assert_eq!(
            f.advance(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1"),
            Progress::Done { reusable: false }
        );
    }

    #[test]
    fn a_close_ends_only_a_close_delimited_answer() {
        let mut f = Framing::new(false, false);
        assert_eq!(
            f.advance(b"HTTP/1.1 200 OK\r\n\r\npartial"),
            Progress::NeedMore { consumed: 26 }
        );
        assert!(f.at_close());
        let mut f = Framing::new(false, false);
        let _ = f.advance(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab");
        assert!(!f.at_close(), "a cut Content-Length body is not an answer");
        assert!(
            Framing::new(false, true).at_close(),
            "an answer already started"
        );
    }

    #[test]
    fn an_oversized_head_stops_being_parsed() {
        let mut f = Framing::new(false, false);
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        let _ = f.advance(&big);
        assert!(f.at_close());
    }

    async fn backend() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    /// A backend, a fresh registry, and a dialer registering in it.
    async fn dialer() -> (tokio::net::TcpListener, SocketAddr, Arc<Conns>, Dialer) {
        let (l, addr) = backend().await;
        let conns = Conns::new();
        let dialer = Dialer::new(conns.clone(), Duration::from_secs(1));
        (l, addr, conns, dialer)
    }

    /// Wait (5 s at most) for the backend side `server` to read the close sluice sent.
    async fn read_close(server: &mut tokio::net::TcpStream) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut b))
            .await
            .expect("the close arrives")
            .expect("read");
        assert_eq!(n, 0, "closed by sluice");
    }

    fn ghost(until: Duration) -> Ghost {
        Ghost {
            head: false,
            answer_started: false,
            until: tokio::time::Instant::now() + until,
            park_idle: Duration::from_secs(5),
        }
    }

    /// A late answer ends the ghost and parks the connection; the next dial takes it instead
    /// of connecting, and the backend sees one connection only.
    #[tokio::test]
    async fn a_late_answer_parks_the_connection_for_the_next_dial() {
        use tokio::io::AsyncWriteExt;
        let (l, addr) = backend().await;
        let conns = Conns::new();
        let sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        let (mut server, _) = l.accept().await.expect("accept");
        let w = tokio::spawn(async move {
            server
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
            server
        });
        let end = watch(&conns, addr, sock, ghost(Duration::from_secs(10))).await;
        assert_eq!(end, End::Answered);
        assert_eq!(conns.parked(), 1);
        let _server = w.await.expect("server");
        let dialer = Dialer::new(conns.clone(), Duration::from_secs(1));
        let stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        assert_eq!(conns.parked(), 0, "taken out of the park");
        assert_eq!(conns.dialed(), 1);
        let claim = conns.claim(stream.as_raw_fd()).expect("registered");
        assert!(claim.recycled());
        drop(stream);
        assert_eq!(conns.dialed(), 0, "forgotten when pingora drops it");
        assert!(
            claim.orphan().is_some(),
            "a claimed connection's spare survives"
        );
        // Nothing else was accepted: the backend saw a single connection.
        let more = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
        assert!(more.is_err(), "no second connection");
    }

    #[tokio::test]
    async fn a_close_or_the_hold_ends_a_ghost() {
        let (l, addr) = backend().await;
        let conns = Conns::new();
        // The backend closes without answering.
        let sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        let (server, _) = l.accept().await.expect("accept");
        drop(server);
        let end = watch(&conns, addr, sock, ghost(Duration::from_secs(10))).await;
        assert_eq!(end, End::Closed);
        // The backend never answers: the hold ends it.
        let sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        let (_server, _) = l.accept().await.expect("accept");
        let end = watch(&conns, addr, sock, ghost(Duration::from_millis(100))).await;
        assert_eq!(end, End::Expired);
        assert_eq!(conns.parked(), 0);
    }

    /// An unclaimed connection's spare closes with pingora's stream: the backend sees the
    /// close at once.
    #[tokio::test]
    async fn an_unclaimed_connection_closes_with_pingoras_stream() {
        let (l, addr, conns, dialer) = dialer().await;
        let stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        let (mut server, _) = l.accept().await.expect("accept");
        assert_eq!(conns.dialed(), 1);
        drop(stream);
        read_close(&mut server).await;
        // The backend closes its side: the next dial need not wait.
        drop(server);
        // A claimed one closes when the claim ends.
        let stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        let (mut server, _) = l.accept().await.expect("accept");
        let claim = conns.claim(stream.as_raw_fd()).expect("registered");
        assert!(!claim.recycled());
        drop(stream);
        drop(claim);
        read_close(&mut server).await;
    }

    /// The request that released a connection to pingora's pool may end after the next one
    /// took it: the spare then survives for the second, whose request may still time out.
    #[tokio::test]
    async fn a_connection_taken_again_keeps_its_spare_for_the_later_request() {
        let (l, addr, conns, dialer) = dialer().await;
        let stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        let _server = l.accept().await.expect("accept");
        let first = conns.claim(stream.as_raw_fd()).expect("registered");
        let second = conns.claim(stream.as_raw_fd()).expect("registered");
        drop(first);
        drop(stream);
        assert!(
            second.orphan().is_some(),
            "the later request can still read its late answer"
        );
    }

    /// A connection a request used and released: idle in pingora's pool, held by no request.
    /// Returns pingora's stream and the backend's side.
    async fn idle_connection(
        l: &tokio::net::TcpListener,
        addr: SocketAddr,
        conns: &Arc<Conns>,
        dialer: &Dialer,
    ) -> (Stream, tokio::net::TcpStream) {
        let stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        let (server, _) = l.accept().await.expect("accept");
        drop(conns.claim(stream.as_raw_fd()).expect("registered"));
        (stream, server)
    }

    /// One poll of a pending dial: tokio's timeout polls the future before its (zero) delay.
    async fn still_waiting<F: std::future::Future + Unpin>(dial: &mut F) -> bool {
        tokio::time::timeout(Duration::ZERO, dial).await.is_err()
    }

    /// A dial waits while a connection to the same backend is open that no request holds (one
    /// pingora lost to its pool race). When pingora drops it, the dial takes it, and the
    /// backend sees no new connection.
    #[tokio::test]
    async fn a_connection_pingora_drops_idle_is_rescued_for_the_waiting_dial() {
        use tokio::io::AsyncWriteExt;
        let (l, addr, conns, dialer) = dialer().await;
        let (lost, mut server) = idle_connection(&l, addr, &conns, &dialer).await;
        let peer = PeerAddr::Inet(addr);
        let next = dialer.connect(&peer);
        tokio::pin!(next);
        assert!(
            still_waiting(&mut next).await,
            "dialed beside an idle connection"
        );
        assert_eq!(conns.dialed(), 1, "nothing dialed yet");
        // pingora loses it to its pool race: it drops the stream.
        drop(lost);
        let mut stream = next.await.expect("dial");
        assert_eq!(conns.rescued(), 1);
        assert_eq!(conns.waits_expired(), 0, "woken by the drop, not the bound");
        let claim = conns.claim(stream.as_raw_fd()).expect("registered");
        assert!(claim.recycled(), "a rescued connection counts as reused");
        // The same connection: what the backend writes on it arrives.
        server.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut b))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&b, b"x");
        let more = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
        assert!(more.is_err(), "no second connection");
    }

    /// A rescued connection no dial takes is closed after [`RESCUE_WAIT`]; one the backend
    /// closed, or sent bytes on, is never handed out.
    #[tokio::test]
    async fn a_rescued_connection_is_closed_unless_a_dial_takes_it_clean() {
        use tokio::io::AsyncWriteExt;
        let (l, addr, conns, dialer) = dialer().await;
        let (idle, mut server) = idle_connection(&l, addr, &conns, &dialer).await;
        drop(idle);
        assert_eq!(conns.parked(), 1, "rescued");
        read_close(&mut server).await;
        assert_eq!(conns.parked(), 0, "closed after the wait");
        assert_eq!(conns.rescued(), 0);
        drop(server);
        // Stray bytes from the backend: the dial connects instead.
        for stray in [true, false] {
            let (idle, mut server) = idle_connection(&l, addr, &conns, &dialer).await;
            drop(idle);
            assert_eq!(conns.parked(), 1, "rescued");
            if stray {
                server
                    .write_all(b"HTTP/1.1 408 Timeout\r\n\r\n")
                    .await
                    .expect("write");
            } else {
                drop(server);
            }
            let fresh = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
            let _next = l.accept().await.expect("a new connection");
            assert!(!conns
                .claim(fresh.as_raw_fd())
                .expect("registered")
                .recycled());
            assert_eq!(conns.rescued(), 0, "not handed out (stray: {stray})");
            assert_eq!(conns.parked(), 0);
            drop(fresh);
        }
    }

    /// A connection pingora drops while a request holds it (an error, a close) is never
    /// rescued: it closes when the request ends, and a dial waits until the backend has
    /// closed its side too.
    #[tokio::test]
    async fn a_dial_waits_for_the_backend_to_close_what_sluice_closed() {
        let (l, addr, conns, dialer) = dialer().await;
        let broken = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        let (mut first, _) = l.accept().await.expect("accept");
        let claim = conns.claim(broken.as_raw_fd()).expect("registered");
        drop(broken);
        assert_eq!(conns.parked(), 0, "dropped while held: not rescued");
        drop(claim);
        // sluice's close reaches the backend, which has not closed its side yet.
        read_close(&mut first).await;
        assert_eq!(conns.closing(addr), 1);
        let peer = PeerAddr::Inet(addr);
        let next = dialer.connect(&peer);
        tokio::pin!(next);
        assert!(
            still_waiting(&mut next).await,
            "dialed on top of a connection the backend still counts"
        );
        drop(first);
        let stream = next.await.expect("dial");
        let _second = l.accept().await.expect("accept");
        assert_eq!(conns.closing(addr), 0, "the backend closed its side");
        assert_eq!(
            conns.closing_expired(),
            0,
            "woken by the close, not the bound"
        );
        assert_eq!(conns.rescued(), 0);
        assert_eq!(conns.dialed(), 1);
        // A connection a request holds is no reason to wait.
        let _held = conns.claim(stream.as_raw_fd()).expect("registered");
        let _third = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        assert_eq!(conns.waits_expired(), 0);
        assert_eq!(conns.dialed(), 2);
    }

    /// An unheld connection that never closes delays a dial by [`RELEASE_WAIT`] at most.
    #[tokio::test]
    async fn an_unheld_connection_delays_a_dial_by_the_bound_at_most() {
        let (l, addr, conns, dialer) = dialer().await;
        let (_idle, _first) = idle_connection(&l, addr, &conns, &dialer).await;
        let _stream = dialer.connect(&PeerAddr::Inet(addr)).await.expect("dial");
        assert_eq!(conns.waits_expired(), 1);
        assert_eq!(conns.dialed(), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let (l, addr) = backend().await;
        drop(l);
        let dialer = Dialer::new(Conns::new(), Duration::from_secs(1));
        let e = dialer
            .connect(&PeerAddr::Inet(addr))
            .await
            .expect_err("refused");
        assert_eq!(e.etype(), &ErrorType::ConnectRefused);
    }
}
