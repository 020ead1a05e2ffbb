//! The resolution layer: the I/O that turns a [`Validated`] configuration into the [`Config`]
//! the proxy runs on.
//!
//! Backend addresses are looked up (DNS for host names), the TLS listener's certificate and
//! key are loaded and matched, the backend CA bundle is checked, and the admin token is read.
//! All of it goes through [`Io`]: [`System`] does the real thing; tests and the fuzzer pass
//! their own, so everything above this layer runs without a network or files.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::validate::{AdminSettings, BackendPlan, ProxySettings, QueueSettings};
use super::{Backend, Config, ConfigError, Secret, Validated};

/// The I/O the resolution layer needs.
pub trait Io {
    /// Look up a backend's `host:port`; the error says why (it becomes the message's fix).
    fn lookup(&self, address: &str) -> Result<SocketAddr, String>;
    /// Check that the TLS listener's certificate chain and key load and go together.
    fn check_certified_key(&self, cert: &Path, key: &Path) -> Result<(), ConfigError>;
    /// Check that a CA bundle holds at least one certificate.
    fn check_ca_file(&self, key: &str, path: &str) -> Result<(), ConfigError>;
    /// Read an admin token file.
    fn read_token(&self, key: &str, path: &str) -> Result<Secret, ConfigError>;
}

/// The real I/O: DNS, and the files themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Io for System {
    fn lookup(&self, address: &str) -> Result<SocketAddr, String> {
        match address.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| "resolves to no address; use an IP:port".to_string()),
            Err(e) => Err(format!(
                "not a usable host:port ({e}); write it like \"10.0.0.5:80\""
            )),
        }
    }

    fn check_certified_key(&self, cert: &Path, key: &Path) -> Result<(), ConfigError> {
        crate::tls::load_certified_key(cert, key)
            .map(drop)
            .map_err(ConfigError::from)
    }

    fn check_ca_file(&self, key: &str, path: &str) -> Result<(), ConfigError> {
        crate::tls::check_ca_file(key, path)
            .map(drop)
            .map_err(ConfigError::from)
    }

    fn read_token(&self, key: &str, path: &str) -> Result<Secret, ConfigError> {
        read_token(key, path)
    }
}

impl From<crate::tls::FileError> for ConfigError {
    fn from(e: crate::tls::FileError) -> Self {
        ConfigError {
            key: e.key,
            value: e.value,
            fix: e.fix,
        }
    }
}

/// Resolve a validated configuration: every lookup and file read, in the order of the file.
pub fn resolve(v: Validated, io: &dyn Io) -> Result<Config, ConfigError> {
    let Validated {
        proxy,
        queue,
        upstream,
        backends,
        server,
        health,
        admin,
        cluster,
        tls,
        access_log,
    } = v;
    if let Some(path) = &upstream.ca_file {
        io.check_ca_file("upstream.ca_file", path)?;
    }
    let backends = backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| backend(i, b, io))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(t) = &tls {
        io.check_certified_key(&t.cert, &t.key)?;
    }
    let AdminSettings {
        listen: admin_listen,
        token_file,
        metrics_open,
    } = admin;
    let admin_token = match token_file.as_deref() {
        Some(path) => Some(io.read_token("admin.token_file", path)?),
        None => None,
    };
    let ProxySettings {
        listen,
        client_read_buffer_bytes,
        client_write_buffer_bytes,
        client_write_timeout,
        client_keepalive_timeout,
        max_header_bytes,
        max_body_bytes,
        max_connections,
        max_connections_per_ip,
        client_header_timeout,
        client_body_timeout,
        client_body_start_timeout,
        client_body_min_rate,
        max_buffered_body_bytes,
        request_timeout,
    } = proxy;
    let QueueSettings {
        max_queue,
        queue_timeout,
        retry_after,
    } = queue;
    Ok(Config {
        listen,
        client_read_buffer_bytes,
        client_write_buffer_bytes,
        client_write_timeout,
        client_keepalive_timeout,
        max_header_bytes,
        max_body_bytes,
        max_connections,
        max_connections_per_ip,
        client_header_timeout,
        client_body_timeout,
        client_body_start_timeout,
        client_body_min_rate,
        max_buffered_body_bytes,
        request_timeout,
        max_queue,
        queue_timeout,
        retry_after,
        upstream,
        backends,
        server,
        health,
        admin_listen,
        admin_token,
        metrics_open,
        cluster,
        tls,
        access_log,
    })
}

/// One backend, its address looked up.
fn backend(i: usize, b: BackendPlan, io: &dyn Io) -> Result<Backend, ConfigError> {
    let BackendPlan {
        name,
        address,
        host,
        max_inflight,
        rate,
        slow_start,
        learning,
        tls,
    } = b;
    let addr = io.lookup(&address).map_err(|why| {
        ConfigError::new(format!("backend[{i}].address"), format!("{address:?}"), why)
    })?;
    Ok(Backend {
        name,
        address,
        addr,
        host,
        max_inflight,
        rate,
        slow_start,
        learning,
        tls,
    })
}

/// Read an admin token file: the first line, trimmed; at least 16 characters. At most 4 KiB
/// is read (a path such as `/dev/zero` must not hang the start).
pub fn read_token(key: &str, path: &str) -> Result<Secret, ConfigError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| {
        ConfigError::new(
            key,
            format!("{path:?}"),
            format!("cannot read it ({e}); write a random token into it, e.g. `openssl rand -hex 32 > {path}`"),
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            key,
            format!("{path:?}"),
            "the token must be printable ASCII without spaces (it is sent in an HTTP header); write a random one, e.g. `openssl rand -hex 32`",
        ));
    }
    if token.len() < 16 {
        return Err(ConfigError::new(
            key,
            format!("{path:?}"),
            "the token in it is shorter than 16 characters; write a random one, e.g. `openssl rand -hex 32`",
        ));
    }
    Ok(Secret(token))
}

/// I/O without a network or files, for tests: addresses must be IP:port (a host name is
/// refused, no DNS query is made), every file is fine, a token is its path.
#[cfg(test)]
pub(crate) struct NoIo;

#[cfg(test)]
impl Io for NoIo {
    fn lookup(&self, address: &str) -> Result<SocketAddr, String> {
        address.parse().map_err(|e| format!("{e}"))
    }
    fn check_certified_key(&self, _: &Path, _: &Path) -> Result<(), ConfigError> {
        Ok(())
    }
    fn check_ca_file(&self, _: &str, _: &str) -> Result<(), ConfigError> {
        Ok(())
    }
    fn read_token(&self, _: &str, path: &str) -> Result<Secret, ConfigError> {
        Ok(Secret::new(format!("token-of-{path}")))
    }
}
