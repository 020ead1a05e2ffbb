//! Fuzz target: configuration parsing and validation never panic, and what they accept is
//! valid.
//!
//! Any UTF-8 input goes through `Config::parse`, the path `sluice check`, `sluice run` and every
//! reload take. Rejected input must come back as an error whose message is not empty (and, for
//! a value error, names the key); accepted input must satisfy the invariants the proxy relies
//! on, and `sluice check`'s description of it must not panic either. Inputs whose backend
//! addresses are host names are skipped: validating them resolves the name (a DNS query).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::file::FileConfig;
use sluice::{Config, LoadError, Overrides};

fn resolves_names(text: &str) -> bool {
    match toml::from_str::<FileConfig>(text) {
        // Parsing stops before any address is resolved.
        Err(_) => false,
        Ok(f) => f.backends.iter().any(|b| {
            b.address
                .as_deref()
                .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_err())
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if resolves_names(text) {
        return;
    }
    match Config::parse(text, None, &Overrides::default()) {
        Ok(cfg) => {
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
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let LoadError::Invalid { error, .. } = &e {
                assert!(!error.key.is_empty(), "a value error names its key: {e}");
                assert!(!error.fix.is_empty(), "and says how to fix it: {e}");
            }
        }
    }
});
