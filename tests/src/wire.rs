//! Minimal HTTP/1.x framing shared by the emulator and the test client.
//!
//! [`Wire`] wraps a [`TcpStream`] with a read buffer and offers the few
//! primitives both sides need: read a message head (parsed by the caller with
//! `httparse`), read a `Content-Length` body, a chunked body or a
//! close-delimited body. Every read is bounded by a deadline and every buffer
//! by a size cap, so malformed or hostile input can only produce an error,
//! never a hang or an unbounded allocation.

use std::io;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest message head (start line + headers) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Largest number of header fields accepted in one message.
pub(crate) const MAX_HEADERS: usize = 64;
/// Largest body accepted, whatever its framing.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4 * 1024;
/// Bytes requested from the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Builds an `InvalidData` error.
pub(crate) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Builds a `TimedOut` error.
pub(crate) fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("timed out {what}"))
}

/// A TCP stream plus the bytes read from it but not consumed yet.
#[derive(Debug)]
pub(crate) struct Wire {
    /// The underlying socket.
    pub(crate) stream: TcpStream,
    /// Bytes read but not consumed yet (may hold a pipelined next message).
    pub(crate) buf: Vec<u8>,
}

impl Wire {
    /// Wraps a connected stream.
    pub(crate) fn new(stream: TcpStream) -> Self {
        Wire {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
        }
    }

    /// Reads more bytes into the buffer; returns how many (0 means EOF).
    pub(crate) async fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(timed_out("reading from socket")),
        }
    }

    /// Drops the first `n` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }

    /// Ensures at least `n` bytes are buffered, or fails with `UnexpectedEof`.
    async fn fill_to(&mut self, n: usize, deadline: Instant) -> io::Result<()> {
        // Each successful iteration adds at least one byte, so this loop runs
        // at most `n` times; the deadline bounds it in time.
        while self.buf.len() < n {
            if self.fill(deadline).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a body",
                ));
            }
        }
        Ok(())
    }

    /// Reads a message head. `parse` is called on the buffer each time more
    /// bytes arrive and returns `Ok(Some((head, len)))` once complete.
    ///
    /// Returns `Ok(None)` on a clean EOF before the first byte of a message.
    pub(crate) async fn read_head<T>(
        &mut self,
        deadline: Instant,
        mut parse: impl FnMut(&[u8]) -> io::Result<Option<(T, usize)>>,
    ) -> io::Result<Option<T>> {
        // Bounded: each iteration either returns or buffers at least one more
        // byte, and the buffer is capped at MAX_HEAD.
        loop {
            if !self.buf.is_empty() {
                if let Some((head, len)) = parse(&self.buf)? {
                    self.consume(len);
                    return Ok(Some(head));
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(invalid("message head too large"));
                }
            }
            if self.fill(deadline).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a message head",
                    ))
                };
            }
        }
    }

    /// Reads a body of exactly `len` bytes.
    pub(crate) async fn read_sized(
        &mut self,
        len: usize,
        deadline: Instant,
    ) -> io::Result<Vec<u8>> {
        if len > MAX_BODY {
            return Err(invalid(format!("body of {len} bytes is too large")));
        }
        self.fill_to(len, deadline).await?;
        Ok(self.buf.drain(..len).collect())
    }

    /// Reads one CRLF- (or LF-) terminated line, without its terminator.
    async fn read_line(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(invalid("line too long in chunked body"));
            }
            if self.fill(deadline).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a chunked body",
                ));
            }
        }
    }

    /// Reads a chunked body (trailers are read and discarded).
    pub(crate) async fn read_chunked(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        // Each non-final chunk adds at least one byte to `body`, which is
        // capped at MAX_BODY, so the loop is bounded.
        loop {
            let line = self.read_line(deadline).await?;
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(invalid("chunked body too large"));
            }
            self.fill_to(size + 2, deadline).await?;
            body.extend(self.buf.drain(..size));
            if self.buf.starts_with(b"\r\n") {
                self.consume(2);
            } else {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
        // Trailer section: lines until an empty one, bounded in count.
        for _ in 0..MAX_HEADERS {
            if self.read_line(deadline).await?.is_empty() {
                return Ok(body);
            }
        }
        Err(invalid("too many trailer fields"))
    }

    /// Reads until the peer closes the connection (close-delimited body).
    pub(crate) async fn read_to_eof(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        // Bounded by MAX_BODY (each iteration adds at least one byte) and by
        // the deadline.
        while self.fill(deadline).await? != 0 {
            if self.buf.len() > MAX_BODY {
                return Err(invalid("close-delimited body too large"));
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }
}

/// How a message body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Sized(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the peer closes the connection (responses only).
    UntilClose,
}

/// Looks up a header value, case-insensitively.
pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// True if a comma-separated header (such as `Connection`) holds `token`.
pub(crate) fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Determines the body framing from the headers. `default` applies when
/// neither `Transfer-Encoding` nor `Content-Length` is present.
pub(crate) fn framing(headers: &[(String, String)], default: Framing) -> io::Result<Framing> {
    let te: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(last) = te.last() {
        return if last.eq_ignore_ascii_case("chunked") {
            Ok(Framing::Chunked)
        } else {
            Err(invalid(format!("unsupported transfer-encoding {last:?}")))
        };
    }
    let mut length: Option<usize> = None;
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| invalid(format!("bad content-length {v:?}")))?;
        if length.is_some_and(|l| l != n) {
            return Err(invalid("conflicting content-length headers"));
        }
        length = Some(n);
    }
    Ok(match length {
        Some(0) => Framing::None,
        Some(n) => Framing::Sized(n),
        None => default,
    })
}

/// Converts `httparse` headers into owned `(name, value)` pairs.
pub(crate) fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            framing(&h(&[]), Framing::None).expect("valid"),
            Framing::None
        );
        assert_eq!(
            framing(&h(&[("Content-Length", "12")]), Framing::None).expect("valid"),
            Framing::Sized(12)
        );
        assert_eq!(
            framing(
                &h(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]),
                Framing::None
            )
            .expect("valid"),
            Framing::Chunked
        );
        assert!(framing(&h(&[("Content-Length", "x")]), Framing::None).is_err());
        assert!(framing(
            &h(&[("Content-Length", "1"), ("Content-Length", "2")]),
            Framing::None
        )
        .is_err());
        assert_eq!(
            framing(&h(&[]), Framing::UntilClose).expect("valid"),
            Framing::UntilClose
        );
    }

    #[test]
    fn tokens() {
        let hs = h(&[("Connection", "Upgrade, Keep-Alive")]);
        assert!(has_token(&hs, "connection", "keep-alive"));
        assert!(!has_token(&hs, "connection", "close"));
        assert_eq!(find_header(&hs, "CONNECTION"), Some("Upgrade, Keep-Alive"));
    }
}
