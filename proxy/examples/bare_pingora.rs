//! The floor under sluice's cost per request: a bare pingora proxy (one `upstream_peer`,
//! nothing else) built with the same pingora, features and profile as sluice. The throughput
//! bench (`tests/bench/throughput.sh`) runs it beside sluice, HAProxy and nginx, so that
//! sluice's own overhead above pingora is a measured number.
//!
//! Usage: `bare_pingora LISTEN BACKEND [THREADS]`, e.g.
//! `cargo run --release --example bare_pingora -- 127.0.0.1:8080 127.0.0.1:8081 2`.

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;

// The same allocator as the sluice binary (the `mimalloc` feature, on by default), so that the
// floor is measured with it too.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// Proxies every request to one backend, over pingora's keep-alive pool.
struct Bare {
    backend: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(backend)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bare_pingora LISTEN BACKEND [THREADS]");
        return ExitCode::from(2);
    };
    let Ok(backend) = backend.parse::<SocketAddr>() else {
        eprintln!("bare_pingora: BACKEND must be an IP:port, got {backend:?}");
        return ExitCode::from(2);
    };
    let threads = match args.get(2).map(|t| t.parse::<usize>()) {
        None => 2,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("bare_pingora: THREADS must be a positive integer");
            return ExitCode::from(2);
        }
    };
    let conf = ServerConf {
        threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { backend });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    println!("listening on {listen}");
    server.run_forever()
}
