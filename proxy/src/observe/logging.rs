//! Process logging: `env_logger` (filtered by `RUST_LOG`, `warn` by default), with one
//! known-harmless pingora error demoted to a debug line and counted instead.
//!
//! pingora 0.9 logs `ERROR failed to acquire reusable stream` when it loses a pooled upstream
//! connection to a race with the connection's own idle poller
//! ([pingora#998](https://github.com/cloudflare/pingora/issues/998)): the request's dial takes
//! the lost connection back (see [`crate::ghost`]), so the backend sees no new connection. An operator reading an ERROR line from `sluice demo`
//! would look for a fault that is not there. So the line becomes a debug one, and
//! `sluice_upstream_pool_races_total` counts the event.

use std::sync::atomic::{AtomicU64, Ordering};

/// Pooled upstream connections lost to pingora#998 since the process started.
static POOL_RACES: AtomicU64 = AtomicU64::new(0);

/// Pooled upstream connections lost to pingora's pool race since the process started.
pub fn pool_races() -> u64 {
    POOL_RACES.load(Ordering::Relaxed)
}

/// Install the process logger. Call once, first thing.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Logger { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// `env_logger` with pingora's pool-race error demoted.
struct Logger {
    inner: env_logger::Logger,
}

/// pingora's error line for a pooled connection lost to the pool race.
fn is_pool_race(r: &log::Record<'_>) -> bool {
    r.level() == log::Level::Error
        && r.target().starts_with("pingora_core::connectors")
        && r.args().as_str() == Some("failed to acquire reusable stream")
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !is_pool_race(record) {
            self.inner.log(record);
            return;
        }
        POOL_RACES.fetch_add(1, Ordering::Relaxed);
        let demoted = log::Record::builder()
            .level(log::Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .args(format_args!(
                "a pooled upstream connection was lost to pingora's pool race \
                 (pingora#998); a new one is dialed"
            ))
            .build();
        if self.inner.enabled(demoted.metadata()) {
            self.inner.log(&demoted);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(level: log::Level, target: &str, args: std::fmt::Arguments<'_>) -> bool {
        is_pool_race(
            &log::Record::builder()
                .level(level)
                .target(target)
                .args(args)
                .build(),
        )
    }

    #[test]
    fn only_pingoras_pool_race_line_is_demoted() {
        let c = "pingora_core::connectors";
        assert!(record(
            log::Level::Error,
            c,
            format_args!("failed to acquire reusable stream")
        ));
        assert!(!record(
            log::Level::Error,
            c,
            format_args!("failed to acquire reusable stream: {}", 1)
        ));
        assert!(!record(
            log::Level::Error,
            "sluice::service",
            format_args!("failed to acquire reusable stream")
        ));
        assert!(!record(
            log::Level::Error,
            c,
            format_args!("Fail to connect to 127.0.0.1:1")
        ));
        assert!(!record(
            log::Level::Warn,
            c,
            format_args!("failed to acquire reusable stream")
        ));
    }
}
