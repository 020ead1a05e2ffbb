//! Every place where sluice reads pingora state that pingora does not expose through an API.
//! pingora is pinned to an exact version (`Cargo.toml`); the tests here fail when an upgrade
//! changes what these reads rely on.
//!
//! - **A pipelined next request.** pingora keeps the bytes a client sent past its request
//!   (`HttpPersistentSettings::pipelined_prefix`) without a getter. sluice must know whether
//!   they are there, because a connection with a request already waiting must not wait for a
//!   readable socket. Only the `Debug` form shows it; it is read into a fixed stack buffer (no
//!   allocation, and the prefix bytes themselves are never formatted past the buffer). Both
//!   ways of being wrong are safe: a missed prefix waits for the keep-alive timeout and then
//!   closes (the client retries, RFC 9112 §9.3.2); a false one waits inside pingora's header
//!   read instead of sluice's. The test below and the pipelining end-to-end test catch a change.

use std::fmt::Write;

use pingora::apps::HttpPersistentSettings;

/// Longest `Debug` prefix of `HttpPersistentSettings` read: the field comes after three short
/// ones (two numbers and a user context printed as `None` or `Some(Any { .. })`).
const SETTINGS_DEBUG_PREFIX: usize = 256;

/// A `fmt::Write` into a fixed buffer that stops (with an error) once full.
struct Prefix {
    buf: [u8; SETTINGS_DEBUG_PREFIX],
    len: usize,
}

impl Write for Prefix {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// Whether pingora kept a pipelined next request for the connection these settings carry.
pub fn has_pipelined_request(persistent: Option<&HttpPersistentSettings>) -> bool {
    let Some(p) = persistent else {
        return false;
    };
    let mut out = Prefix {
        buf: [0; SETTINGS_DEBUG_PREFIX],
        len: 0,
    };
    // Stops with an error when the buffer is full: what was read so far is what counts.
    let _ = write!(out, "{p:?}");
    out.buf[..out.len]
        .windows(b"pipelined_prefix: Some".len())
        .any(|w| w == b"pipelined_prefix: Some")
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
}
