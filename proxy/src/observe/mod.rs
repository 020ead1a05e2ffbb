//! What sluice shows of itself: Prometheus metrics, the access log, and its own log lines.

pub mod access_log;
pub mod logging;
pub mod metrics;
