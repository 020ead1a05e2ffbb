//! Idle keep-alive client connections wait in a small task of sluice's own.
//!
//! pingora waits for a connection's next request *inside* its per-request machinery: while a
//! terminal's kept-alive connection sits idle, the connection still holds pingora's boxed
//! request futures (≈ 13 KiB), a 4 KiB header buffer allocated before the first byte arrives,
//! and its connection task. With thousands of idle terminals that is most of sluice's memory
//! (measured: ≈ 30 KiB per idle connection; HAProxy ≈ 1 KiB).
//!
//! So sluice takes the connection loop over through pingora's custom-session hook
//! (`HttpServerOptions::force_custom` + `ProxyServiceBuilder::custom`): each request runs in a
//! boxed future that is dropped as soon as the request is done, and between requests the
//! connection waits in a small task of its own for one readable byte (peeked, not consumed),
//! for at most the client keep-alive timeout, or until shutdown. The requests themselves go
//! through pingora's `process_new_http`, exactly as in pingora's own loop (persistent
//! keep-alive settings included). This serves HTTP/1 only; sluice offers neither TLS nor h2c.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, ProcessCustomSession};
use pingora::server::ShutdownWatch;

use crate::service::Sluice;

type Proxy = HttpProxy<Sluice, ()>;

/// Wait until the client sends a byte (true), or closes, idles out, or shutdown starts (false).
async fn wait_readable(stream: &mut Stream, idle: Duration, shutdown: &mut ShutdownWatch) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    let mut byte = [0u8; 1];
    tokio::select! {
        biased;
        r = tokio::time::timeout(idle, stream.try_peek(&mut byte)) => matches!(r, Ok(Ok(true))),
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// One request; boxed by the caller so its state is gone once it returns.
async fn one(
    proxy: Arc<Proxy>,
    stream: Stream,
    settings: Option<HttpPersistentSettings>,
    idle: Duration,
    shutdown: ShutdownWatch,
) -> Option<ReusedHttpStream> {
    let mut session = ServerSession::new_http1(stream);
    match settings {
        Some(settings) => settings.apply_to_session(&mut session),
        None => {
            let keepalive = (!*shutdown.borrow()).then_some(idle.as_secs().max(1));
            session.set_keepalive(keepalive);
        }
    }
    proxy.process_new_http(session, &shutdown).await
}

async fn serve(proxy: Arc<Proxy>, stream: Stream, idle: Duration, mut shutdown: ShutdownWatch) {
    let mut next = Box::pin(one(proxy.clone(), stream, None, idle, shutdown.clone())).await;
    while let Some((mut stream, settings)) = next.map(|r| r.consume()) {
        if !wait_readable(&mut stream, idle, &mut shutdown).await {
            return;
        }
        next = Box::pin(one(proxy.clone(), stream, settings, idle, shutdown.clone())).await;
    }
}

/// The connection handler: runs each connection in its own small task.
pub fn handler(idle: Duration) -> ProcessCustomSession<Sluice, ()> {
    Arc::new(
        move |proxy: Arc<Proxy>,
              stream: Stream,
              shutdown: &ShutdownWatch|
              -> Pin<Box<dyn Future<Output = Option<Stream>> + Send + 'static>> {
            // Returning at once frees pingora's own connection task and future; the spawned
            // task holds only what an idle connection needs.
            tokio::spawn(serve(proxy, stream, idle, shutdown.clone()));
            Box::pin(std::future::ready(None))
        },
    )
}
