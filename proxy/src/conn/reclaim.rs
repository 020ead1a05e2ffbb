//! A client stream that can be taken back from a request that was dropped half-way.
//!
//! sluice hands each request's client stream to pingora, which owns it inside the request's
//! future. When the header deadline passes, that future is dropped, and with it the stream:
//! the client would see a bare close. [`Reclaimable`] wraps the stream for the duration of one
//! request; if the wrapper is dropped while it still holds the stream, the stream is handed back
//! to the connection loop through the request's [`Progress`] record (which the loop keeps for
//! the whole spell, so this costs no allocation per request), and the loop can then answer
//! `408` before closing.
//! When the request ends normally, the loop unwraps the stream with [`Reclaimable::unwrap`], so
//! wrappers never nest.
//!
//! Every I/O call is passed straight through to the wrapped stream.

use std::fmt::Debug;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::service::progress::Progress;

/// A stream lent to one request; handed back to the request's [`Progress`] if dropped while
/// holding it ([`Progress::take_back`] gets it).
#[derive(Debug)]
pub struct Reclaimable {
    inner: Option<Stream>,
    back: Option<Arc<Progress>>,
    /// Bytes read through the wrapper.
    read: u64,
}

impl Reclaimable {
    /// Wrap `stream` for one request, whose progress record takes it back if the request is
    /// dropped holding it.
    pub fn wrap(stream: Stream, back: Arc<Progress>) -> Stream {
        Box::new(Reclaimable {
            inner: Some(stream),
            back: Some(back),
            read: 0,
        })
    }

    /// The stream inside a wrapped stream (or the stream itself if it is not wrapped), and
    /// the bytes read through the wrapper (`None` if it was not wrapped).
    pub fn unwrap(stream: Stream) -> (Stream, Option<u64>) {
        if !stream.as_any().is::<Reclaimable>() {
            return (stream, None);
        }
        match stream.into_any().downcast::<Reclaimable>() {
            Ok(mut wrapped) => (
                wrapped.inner.take().unwrap_or_else(closed),
                Some(wrapped.read),
            ),
            Err(_) => (closed(), None),
        }
    }

    fn io(&mut self) -> std::io::Result<&mut Stream> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

/// A stream that fails every read and write: what is left of a wrapper whose stream was
/// already taken (never the case for a wrapper returned by pingora).
fn closed() -> Stream {
    Box::new(Reclaimable {
        inner: None,
        back: None,
        read: 0,
    })
}

impl Drop for Reclaimable {
    fn drop(&mut self) {
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            // The connection loop takes it, or drops it (closing it) with the record.
            back.give_back(inner);
        }
    }
}

impl AsyncRead for Reclaimable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = match self.io() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        self.read += buf.filled().len().saturating_sub(before) as u64;
        polled
    }
}

impl AsyncWrite for Reclaimable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

#[async_trait]
impl Shutdown for Reclaimable {
    async fn shutdown(&mut self) {
        if let Some(s) = self.inner.as_mut() {
            s.shutdown().await;
        }
    }
}

impl UniqueID for Reclaimable {
    fn id(&self) -> UniqueIDType {
        self.inner.as_ref().map(|s| s.id()).unwrap_or_default()
    }
}

impl Ssl for Reclaimable {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.as_ref().and_then(|s| s.get_ssl())
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.as_ref().and_then(|s| s.get_ssl_digest())
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.as_ref().and_then(|s| s.selected_alpn_proto())
    }
}

impl GetTimingDigest for Reclaimable {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner
            .as_ref()
            .map(|s| s.get_timing_digest())
            .unwrap_or_default()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner
            .as_ref()
            .map(|s| s.get_read_pending_time())
            .unwrap_or_default()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner
            .as_ref()
            .map(|s| s.get_write_pending_time())
            .unwrap_or_default()
    }
}

impl GetProxyDigest for Reclaimable {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.as_ref().and_then(|s| s.get_proxy_digest())
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        if let Some(s) = self.inner.as_mut() {
            s.set_proxy_digest(digest);
        }
    }
}

impl GetSocketDigest for Reclaimable {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.as_ref().and_then(|s| s.get_socket_digest())
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        if let Some(s) = self.inner.as_mut() {
            s.set_socket_digest(digest);
        }
    }
}

#[async_trait]
impl Peek for Reclaimable {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.io()?.try_peek(buf).await
    }
}
