//! A tiny raw HTTP/1.x client for tests.
//!
//! Unlike a general-purpose client it hides nothing: a [`Conn`] is exactly one
//! TCP connection, requests go out byte for byte as built by [`Request`]
//! (plus a `Host` header when an HTTP/1.1 request has none; an HTTP/1.0 one
//! goes without, as WinInet terminals send it), and tests can write arbitrary bytes with
//! [`Conn::send_raw`] or check whether the peer closed the connection with
//! [`Conn::is_closed_by_peer`]. Every read is bounded by the connection's
//! timeout ([`DEFAULT_TIMEOUT`] unless changed), so a test never hangs forever.
//!
//! ```no_run
//! # async fn demo(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! use sluice_tests::client::{Conn, Request};
//! let mut conn = Conn::connect(addr).await?;
//! let resp = conn.send(&Request::get("/pay").txn("t0-0")).await?;
//! assert_eq!(resp.status, 200);
//! assert_eq!(resp.header("x-txn-id"), Some("t0-0"));
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::wire::{self, Framing, Wire};

/// Default bound on connecting and on reading one response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Conn::is_closed_by_peer`] waits for an EOF.
pub const CLOSE_CHECK_WAIT: Duration = Duration::from_secs(1);

/// Upper bound on interim (1xx) responses skipped before a final one.
const MAX_INTERIM: usize = 16;

/// An HTTP/1.x request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target, e.g. `/pay?txn=t1-0`.
    pub path: String,
    /// Minor HTTP version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version: u8,
    /// Header fields, sent in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes; a `Content-Length` is added when non-empty (or for
    /// POST/PUT) unless the headers already frame the body.
    pub body: Vec<u8>,
}

impl Request {
    /// A request with the given method and path, HTTP/1.1, no headers, no body.
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            path: path.into(),
            version: 1,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` request.
    pub fn get(path: impl Into<String>) -> Self {
        Request::new("GET", path)
    }

    /// A `POST` request with a body.
    pub fn post(path: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Request::new("POST", path).body(body)
    }

    /// Sets the minor HTTP version (`0` or `1`).
    pub fn version(mut self, minor: u8) -> Self {
        self.version = minor;
        self
    }

    /// Shorthand for `.version(0)`.
    pub fn http10(self) -> Self {
        self.version(0)
    }

    /// Appends a header field.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the `X-Txn-Id` header.
    pub fn txn(self, id: impl Into<String>) -> Self {
        self.header("X-Txn-Id", id)
    }

    /// Looks up a header of this request, case-insensitively.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        wire::find_header(&self.headers, name)
    }

    /// Serialises the request. `host` is used for a `Host` header when an
    /// HTTP/1.1 request has none; an HTTP/1.0 request gets none unless set
    /// (WinInet terminals send HTTP/1.0 without `Host`).
    pub fn encode(&self, host: &str) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.{}\r\n", self.method, self.path, self.version);
        if self.version >= 1 && self.header_value("host").is_none() {
            out.push_str(&format!("Host: {host}\r\n"));
        }
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        let framed = self.header_value("content-length").is_some()
            || self.header_value("transfer-encoding").is_some();
        let wants_length = !self.body.is_empty()
            || self.method.eq_ignore_ascii_case("POST")
            || self.method.eq_ignore_ascii_case("PUT");
        if !framed && wants_length {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Minor HTTP version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version: u8,
    /// Header fields in the order received.
    pub headers: Vec<(String, String)>,
    /// Decoded body (chunked framing removed).
    pub body: Vec<u8>,
}

impl Response {
    /// Looks up a header value, case-insensitively (first occurrence).
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::find_header(&self.headers, name)
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echoed `X-Txn-Id`, if any.
    pub fn txn_id(&self) -> Option<&str> {
        self.header("x-txn-id")
    }

    /// Whether the server intends to keep the connection open after this
    /// response (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
    /// `Connection: keep-alive`, and the body not delimited by close).
    pub fn keep_alive(&self) -> bool {
        if self.version >= 1 {
            !wire::has_token(&self.headers, "connection", "close")
        } else {
            wire::has_token(&self.headers, "connection", "keep-alive")
        }
    }
}

/// One client TCP connection speaking HTTP/1.x.
#[derive(Debug)]
pub struct Conn {
    wire: Wire,
    peer: SocketAddr,
    timeout: Duration,
    /// Set once a response said the server will close, or after EOF.
    peer_closing: bool,
}

impl Conn {
    /// Connects with [`DEFAULT_TIMEOUT`].
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        Conn::connect_timeout(addr, DEFAULT_TIMEOUT).await
    }

    /// Connects; `timeout` bounds the connect and, afterwards, each response read.
    pub async fn connect_timeout(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| wire::timed_out("connecting"))??;
        // Small request/response exchanges: don't let Nagle delay them.
        stream.set_nodelay(true)?;
        Ok(Conn {
            wire: Wire::new(stream),
            peer: addr,
            timeout,
            peer_closing: false,
        })
    }

    /// Connects from the local address `from` (port chosen by the system), e.g. another
    /// loopback address such as 127.0.0.2, to look like a second client host.
    pub async fn connect_from(
        from: std::net::IpAddr,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let socket = match from {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(from, 0))?;
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| wire::timed_out("connecting"))??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            wire: Wire::new(stream),
            peer: addr,
            timeout,
            peer_closing: false,
        })
    }

    /// Changes the bound on each response read.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The current bound on each response read.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The address connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.wire.stream.local_addr()
    }

    /// True once a response announced that the server closes the connection
    /// (or an EOF was seen). Such a connection should not be reused.
    pub fn peer_closing(&self) -> bool {
        self.peer_closing
    }

    /// Sends a request and reads its response.
    pub async fn send(&mut self, req: &Request) -> io::Result<Response> {
        let bytes = req.encode(&self.peer.to_string());
        self.send_raw(&bytes).await?;
        let head_only = req.method.eq_ignore_ascii_case("HEAD");
        self.read_response_inner(head_only).await
    }

    /// Writes raw bytes to the connection (bounded by the timeout).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::time::timeout(self.timeout, self.wire.stream.write_all(bytes))
            .await
            .map_err(|_| wire::timed_out("writing request"))?
    }

    /// Reads the next final response (1xx interim responses are skipped).
    pub async fn read_response(&mut self) -> io::Result<Response> {
        self.read_response_inner(false).await
    }

    /// Reads the next final response to a `HEAD` request (no body).
    pub async fn read_head_response(&mut self) -> io::Result<Response> {
        self.read_response_inner(true).await
    }

    async fn read_response_inner(&mut self, head_only: bool) -> io::Result<Response> {
        let deadline = Instant::now() + self.timeout;
        for _ in 0..MAX_INTERIM {
            let head = self
                .wire
                .read_head(deadline, parse_response_head)
                .await?
                .ok_or_else(|| {
                    self.peer_closing = true;
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before a response",
                    )
                })?;
            let (status, version, headers) = head;
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let no_body =
                head_only || (100..200).contains(&status) || status == 204 || status == 304;
            let framing = if no_body {
                Framing::None
            } else {
                wire::framing(&headers, Framing::UntilClose)?
            };
            let body = match framing {
                Framing::None => Vec::new(),
                Framing::Sized(n) => self.wire.read_sized(n, deadline).await?,
                Framing::Chunked => self.wire.read_chunked(deadline).await?,
                Framing::UntilClose => {
                    self.peer_closing = true;
                    self.wire.read_to_eof(deadline).await?
                }
            };
            let resp = Response {
                status,
                version,
                headers,
                body,
            };
            if !resp.keep_alive() {
                self.peer_closing = true;
            }
            return Ok(resp);
        }
        Err(wire::invalid("too many interim responses"))
    }

    /// Waits up to [`CLOSE_CHECK_WAIT`] for the peer to close the connection.
    ///
    /// Returns `true` on EOF or a reset, `false` if data arrived (it stays
    /// buffered for the next read) or nothing happened within the wait.
    pub async fn is_closed_by_peer(&mut self) -> bool {
        self.is_closed_by_peer_within(CLOSE_CHECK_WAIT).await
    }

    /// Like [`Conn::is_closed_by_peer`] with an explicit wait.
    pub async fn is_closed_by_peer_within(&mut self, wait: Duration) -> bool {
        if !self.wire.buf.is_empty() {
            return false;
        }
        match self.wire.fill(Instant::now() + wait).await {
            Ok(0) => {
                self.peer_closing = true;
                true
            }
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
            Err(_) => {
                self.peer_closing = true;
                true
            }
        }
    }

    /// Whether bytes from the peer have arrived and not been read yet.
    pub fn has_unread_data(&self) -> bool {
        !self.wire.buf.is_empty()
    }

    /// Non-blocking check: `true` if the peer has already closed (EOF or
    /// reset is pending). Use it before reusing an idle keep-alive connection.
    pub fn is_closed_now(&mut self) -> bool {
        if self.peer_closing {
            return true;
        }
        if !self.wire.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 4096];
        match self.wire.stream.try_read(&mut chunk) {
            Ok(0) => {
                self.peer_closing = true;
                true
            }
            Ok(n) => {
                self.wire.buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => {
                self.peer_closing = true;
                true
            }
        }
    }

    /// Half-closes the write side (sends FIN); reads still work.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.wire.stream.shutdown().await
    }
}

/// A parsed response head: status, minor version, headers.
type Head = (u16, u8, Vec<(String, String)>);

/// Parses a response head from `buf`, if complete.
fn parse_response_head(buf: &[u8]) -> io::Result<Option<(Head, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; wire::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let status = resp.code.ok_or_else(|| wire::invalid("no status code"))?;
            let version = resp.version.ok_or_else(|| wire::invalid("no version"))?;
            Ok(Some((
                (status, version, wire::owned_headers(resp.headers)),
                len,
            )))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(wire::invalid(format!("malformed response: {e}"))),
    }
}

/// Sends one request on a new connection with `Connection: close` (unless the
/// request sets `Connection` itself) and returns the response.
pub async fn request(addr: SocketAddr, req: &Request) -> io::Result<Response> {
    request_timeout(addr, req, DEFAULT_TIMEOUT).await
}

/// Like [`request`] with an explicit bound on connect and on the response read.
pub async fn request_timeout(
    addr: SocketAddr,
    req: &Request,
    timeout: Duration,
) -> io::Result<Response> {
    let mut conn = Conn::connect_timeout(addr, timeout).await?;
    if req.header_value("connection").is_some() {
        conn.send(req).await
    } else {
        let req = req.clone().header("Connection", "close");
        conn.send(&req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Serves one connection: reads a request head, writes `reply`, then
    /// closes if `close` is set.
    async fn one_shot_server(reply: &'static [u8], close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            for _ in 0..100 {
                let n = s.read(&mut chunk).await.expect("read");
                buf.extend_from_slice(&chunk[..n]);
                if n == 0 || buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            s.write_all(reply).await.expect("write");
            if close {
                drop(s);
            } else {
                // Keep the socket open until the client goes away.
                let _ = s.read(&mut chunk).await;
            }
        });
        addr
    }

    #[test]
    fn encode_adds_host_and_length() {
        let req = Request::post("/pay", "a=1").txn("x1");
        let text = String::from_utf8(req.encode("h:1")).expect("utf8");
        assert_eq!(
            text,
            "POST /pay HTTP/1.1\r\nHost: h:1\r\nX-Txn-Id: x1\r\nContent-Length: 3\r\n\r\na=1"
        );
        let text = String::from_utf8(Request::get("/").http10().encode("h")).expect("utf8");
        assert_eq!(text, "GET / HTTP/1.0\r\n\r\n", "HTTP/1.0 goes without Host");
        let req = Request::get("/").http10().header("Host", "x");
        let text = String::from_utf8(req.encode("h")).expect("utf8");
        assert_eq!(text, "GET / HTTP/1.0\r\nHost: x\r\n\r\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_chunked_response_with_interim() {
        let addr = one_shot_server(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: 1\r\n\r\n",
            false,
        )
        .await;
        let mut conn = Conn::connect(addr).await.expect("connect");
        let resp = conn.send(&Request::get("/")).await.expect("response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"abcde");
        assert!(resp.keep_alive());
        assert!(!conn.peer_closing());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_close_delimited_http10_response() {
        let addr = one_shot_server(b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nhello", true).await;
        let resp = request(addr, &Request::get("/").http10())
            .await
            .expect("response");
        assert_eq!(resp.version, 0);
        assert_eq!(resp.header("x-a"), Some("b"));
        assert_eq!(resp.text(), "hello");
        assert!(!resp.keep_alive());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn truncated_sized_body_is_an_error() {
        let addr = one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true).await;
        let err = request(addr, &Request::get("/"))
            .await
            .expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn garbage_is_invalid_data_and_silence_times_out() {
        let addr = one_shot_server(b"NOT HTTP AT ALL\r\n\r\n", true).await;
        let err = request(addr, &Request::get("/"))
            .await
            .expect_err("garbage");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // A server that accepts but never answers: the read is bounded.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let err = request_timeout(addr, &Request::get("/"), Duration::from_millis(100))
            .await
            .expect_err("silence");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(listener);
    }
}
