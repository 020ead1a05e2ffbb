//! Fuzz target: configuration parsing and validation never panic, and what they accept is
//! valid.
//!
//! Any UTF-8 input goes through the pure layers of `Config::parse`, the path `sluice check`,
//! `sluice run` and every reload take: the file layer, then validation (`Validated::parse`),
//! host names included: validation does no DNS. Rejected input must come back as an error whose
//! message is not empty (and, for a value error, names the key and the fix). Accepted input is
//! resolved with I/O that touches no network and no file (host names map to a documentation
//! address, every file is fine), and the result must satisfy the invariants the proxy relies
//! on; `sluice check`'s description of it must not panic either.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::config::{resolve, ConfigError, Io, Secret, Validated};
use sluice::{LoadError, Overrides};

/// No DNS, no files.
struct Offline;

impl Io for Offline {
    fn lookup(&self, address: &str) -> Result<SocketAddr, String> {
        if let Ok(a) = address.parse() {
            return Ok(a);
        }
        // Validation has checked the port: a host name maps to 192.0.2.1 (TEST-NET-1).
        let port = address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| format!("validation let {address:?} through without a port"))?;
        Ok(SocketAddr::from(([192, 0, 2, 1], port)))
    }

    fn check_certified_key(&self, _: &Path, _: &Path) -> Result<(), ConfigError> {
        Ok(())
    }

    fn check_ca_file(&self, _: &str, _: &str) -> Result<(), ConfigError> {
        Ok(())
    }

    fn read_token(&self, _: &str, _: &str) -> Result<Secret, ConfigError> {
        Ok(Secret::new("0123456789abcdef".into()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let validated = match Validated::parse(text, None, &Overrides::default()) {
        Ok(v) => v,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let LoadError::Invalid { error, .. } = &e {
                assert!(!error.key.is_empty(), "a value error names its key: {e}");
                assert!(!error.fix.is_empty(), "and says how to fix it: {e}");
            }
            return;
        }
    };
    let cfg = match resolve::resolve(validated, &Offline) {
        Ok(cfg) => cfg,
        Err(e) => panic!("validation accepted what offline resolution refuses: {e}"),
    };
    assert!(!cfg.backends.is_empty());
    for b in &cfg.backends {
        assert!(b.max_inflight >= 1);
        assert!(!b.name.is_empty());
        if let Some(t) = &b.tls {
            assert!(!t.sni.is_empty(), "an empty SNI would skip verification");
        }
    }
    assert!(cfg.max_queue <= 1_000_000);
    assert!(!cfg.queue_timeout.is_zero());
    assert!(cfg.request_timeout > cfg.queue_timeout);
    assert!(cfg.max_connections >= 1);
    assert!(!cfg.client_header_timeout.is_zero());
    assert!(!cfg.client_body_timeout.is_zero());
    assert!(cfg.server.threads >= 1);
    if let Some(c) = &cfg.cluster {
        // With Redis down every instance runs on its safe share at once.
        for b in &cfg.backends {
            assert!(c.worst_case() <= u64::from(b.max_inflight));
        }
        assert!(c.instances >= 1 && !c.id.is_empty());
        assert!(c.margin < c.lease_ttl);
    }
    if cfg.admin_listen.is_some_and(|a| !a.ip().is_loopback()) {
        assert!(cfg.admin_token.is_some(), "an admin listener off loopback needs a token");
    }
    let _ = sluice::cli::describe(&cfg);
});
