//! Every place where sluice reads pingora state that pingora does not expose through an API.
//! pingora is pinned to an exact version (`Cargo.toml`); the tests here fail when an upgrade
//! changes what these reads rely on.
//!
//! - **A pipelined next request.** pingora keeps the bytes a client sent past its request
//!   (`HttpPersistentSettings::pipelined_prefix`) without a getter. sluice must know whether
//!   they are there, because a connection with a request already waiting must not wait for a
//!   readable socket. Only the `Debug` form shows it; it is watched as it is formatted, up to the
//!   field's first word (no buffer, no allocation; the prefix bytes are never formatted). Both
//!   ways of being wrong are safe: a missed prefix waits for the keep-alive timeout and then
//!   closes (the client retries, RFC 9112 §9.3.2); a false one waits inside pingora's header
//!   read instead of sluice's. The test below and the pipelining end-to-end test catch a change.
//! - **The socket under a client stream.** pingora's l4 `Stream` owns its socket and shows only
//!   its number (`AsRawFd`), and the workspace forbids `unsafe`, so the socket cannot be taken
//!   out of it. [`take_socket`] asks the kernel for a duplicate of this process's own
//!   descriptor by number (`pidfd_getfd`, Linux 5.6+, through rustix's safe wrapper), while the
//!   stream that owns the number is borrowed, so the number cannot have been closed or reused
//!   meanwhile: the pattern rustix documents as sound. Dropping pingora's stream then leaves the
//!   socket open through the duplicate, and [`stream_from_socket`] builds a new pingora stream
//!   on it later. Where the call is refused (an older kernel, a seccomp profile), nothing is
//!   taken and the stream stays with pingora.

use std::fmt::Write;
use std::os::unix::io::AsRawFd;
use std::sync::OnceLock;

use pingora::apps::HttpPersistentSettings;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use rustix::fd::OwnedFd;

/// The field of `HttpPersistentSettings` that holds a pipelined next request.
const PIPELINED_FIELD: &str = "pipelined_prefix";

/// A `fmt::Write` that watches a `Debug` form go by for [`PIPELINED_FIELD`], reads the first
/// piece of its value (`None` or `Some`), and then stops the formatting with an error: nothing
/// is buffered, and the fields after it (the prefix bytes themselves) are never formatted.
/// `Debug` for a struct writes each field name as a piece of its own, then `": "`, then the
/// value.
#[derive(Default)]
struct FieldWatch {
    in_field: bool,
    found: Option<bool>,
}

impl Write for FieldWatch {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.in_field {
            let value = s.trim_start_matches([':', ' ']);
            if value.is_empty() {
                return Ok(());
            }
            self.found = Some(value.starts_with("Some"));
            return Err(std::fmt::Error);
        }
        self.in_field = s == PIPELINED_FIELD;
        Ok(())
    }
}

/// Whether pingora kept a pipelined next request for the connection these settings carry.
pub fn has_pipelined_request(persistent: Option<&HttpPersistentSettings>) -> bool {
    let Some(p) = persistent else {
        return false;
    };
    let mut watch = FieldWatch::default();
    // Stops with an error once the field's value is seen.
    let _ = write!(watch, "{p:?}");
    watch.found == Some(true)
}

/// A pidfd of this process, for [`take_socket`]; `None` where the kernel refuses one.
fn own_pidfd() -> Option<&'static OwnedFd> {
    static PIDFD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PIDFD
        .get_or_init(|| {
            rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty(),
            )
            .map_err(|e| {
                log::debug!("pidfd_open refused ({e}): idle connections keep pingora's stream")
            })
            .ok()
        })
        .as_ref()
}

/// An owned duplicate of the socket under a plain-TCP client stream, or `None` (a TLS stream,
/// or the kernel refused). The stream keeps working; dropping it no longer closes the socket.
pub fn take_socket(stream: &Stream) -> Option<std::net::TcpStream> {
    let l4 = stream.as_any().downcast_ref::<L4Stream>()?;
    let pidfd = own_pidfd()?;
    // `l4` is borrowed for the whole call: the number names its socket, and no other.
    let fd = rustix::process::pidfd_getfd(
        pidfd,
        l4.as_raw_fd(),
        rustix::process::PidfdGetfdFlags::empty(),
    )
    .map_err(|e| log::debug!("pidfd_getfd refused ({e}): the connection keeps pingora's stream"))
    .ok()?;
    let sock = std::net::TcpStream::from(fd);
    // A TCP socket only (pingora's l4 stream also carries Unix sockets).
    sock.peer_addr().ok()?;
    // The duplicate shares the open file description, already non-blocking for tokio.
    sock.set_nonblocking(true).ok()?;
    Some(sock)
}

/// A pingora client stream on a socket taken with [`take_socket`]: what pingora's listener
/// builds on accept (TCP_NODELAY lives on the socket and carries over), except its write
/// buffer, which pingora does not let anyone else size: the answer's header and body leave in
/// separate writes.
pub fn stream_from_socket(sock: tokio::net::TcpStream) -> Stream {
    let mut l4 = L4Stream::from(sock);
    l4.set_socket_digest(SocketDigest::from_raw_fd(l4.as_raw_fd()));
    Box::new(l4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::protocols::http::ServerSession;

    /// Settings as pingora builds them for a kept-alive connection, with and without bytes of
    /// a next request. Fails if pingora renames the field or changes its `Debug` form.
    #[tokio::test]
    async fn a_pipelined_prefix_is_seen_and_only_then() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let stream: pingora::protocols::l4::stream::Stream = client.into();
        let session = ServerSession::new_http1(Box::new(stream));
        let mut settings = HttpPersistentSettings::for_session(&session);
        assert!(!has_pipelined_request(Some(&settings)));
        assert!(!has_pipelined_request(None));
        settings.set_user_context(Box::new(7u32));
        assert!(!has_pipelined_request(Some(&settings)));
        // A long prefix: only the start of the Debug form is read.
        settings.set_pipelined_prefix(bytes::BytesMut::from(&[b'G'; 10_000][..]));
        assert!(has_pipelined_request(Some(&settings)));
    }

    /// A socket taken from pingora's stream outlives the stream, and a new stream on it reads
    /// and writes the same connection, with the client's address known.
    #[tokio::test]
    async fn a_taken_socket_outlives_pingoras_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, peer) = l.accept().await.expect("accept");
        let stream: Stream = Box::new(L4Stream::from(server));
        let Some(sock) = take_socket(&stream) else {
            // The kernel refused (no pidfd_getfd here): nothing to check but the refusal.
            assert!(own_pidfd().is_none() || cfg!(not(target_os = "linux")));
            return;
        };
        drop(stream);
        client.write_all(b"ping").await.expect("write");
        let mut again =
            stream_from_socket(tokio::net::TcpStream::from_std(sock).expect("register"));
        let mut buf = [0u8; 4];
        again.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        again.write_all(b"pong").await.expect("write");
        again.flush().await.expect("flush");
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");
        let digest = again.get_socket_digest().expect("digest");
        assert_eq!(
            digest.peer_addr().and_then(|a| a.as_inet()).copied(),
            Some(peer)
        );
        // A stream on anything but a TCP socket is not taken.
        let (unix, _other) = tokio::net::UnixStream::pair().expect("pair");
        let unix: Stream = Box::new(L4Stream::from(unix));
        assert!(take_socket(&unix).is_none());
    }
}
