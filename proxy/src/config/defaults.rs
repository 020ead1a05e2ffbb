//! Every default value, with its unit and the reason for it.

use std::time::Duration;

/// Address the proxy listens on when none is configured.
pub const LISTEN: &str = "0.0.0.0:8080";
/// Requests waiting for a backend slot, across all backends (requests).
pub const MAX_QUEUE: usize = 1000;
/// How long a request may wait in the queue before it is answered 503 (10 s).
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` sent with every 503 sluice generates (2 s).
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Timeout for opening a TCP connection to a backend (2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A pooled backend connection idle this long is closed (60 s). It must stay below the
/// backend's own keep-alive timeout (IIS: 120 s), so sluice never sends a request on a
/// socket the backend is about to close.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for each read from a backend, including the response header (60 s).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for each write to a backend (30 s).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After an upstream timeout the backend is most likely still working on the request:
/// its slot stays taken this much longer.
pub const TIMEOUT_HOLD: Duration = Duration::from_secs(30);
/// Longest wait for each write to a client (30 s). A client that reads slower than this
/// would otherwise keep a backend slot busy.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time allowed between requests on a kept-alive client connection (120 s, as IIS).
/// It must outlast the terminals' own: WinInet keeps an idle connection for 60 s, and when
/// a connection it reuses turns out to be closed it may re-send a POST's headers without
/// the body (KB 833301). Also the per-read timeout while a request header arrives.
pub const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest request header (request line and fields) accepted, bytes; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest request body accepted, bytes; larger gets 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Open client connections, all clients together. Above it a new connection gets a 503
/// and is closed. Thousands of terminals fit; a flood cannot exhaust file descriptors.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Open client connections per client IP; 0 = no per-IP cap (the default: many terminals
/// share one store NAT address).
pub const MAX_CONNECTIONS_PER_IP: usize = 0;
/// Time a client has to send a whole request header, from its first byte (from the
/// connection's accept for its first request). pingora alone only times each read.
pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a whole request body, received before the request may take a
/// backend slot.
pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time within which a request body's first byte must arrive (a terminal that re-sent a
/// POST's headers without its body is refused quickly).
pub const CLIENT_BODY_START_TIMEOUT: Duration = Duration::from_secs(2);
/// Slowest average rate a request body may arrive at once started, bytes per second
/// (Kestrel's `MinRequestBodyDataRate` and IIS's `MinFileBytesPerSec` both use 240).
pub const CLIENT_BODY_MIN_RATE: u64 = 240;
/// Request body bytes held at once by all requests together while they are received and
/// wait for a slot; a body that does not fit gets 503.
pub const MAX_BUFFERED_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Longest a request may take, from its complete header to its delivered response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// pingora's retry buffer: a chunked request body (of unknown size) is received whole
/// before admission up to this size; a larger one gets 413 (send a Content-Length).
pub const BODY_BUFFER_BYTES: usize = 64 * 1024;
/// Read buffer per client connection (bytes). 0: reads go straight from the socket into
/// pingora's request buffers. pingora's default is 64 KiB; POS requests are small, and
/// thousands of idle terminals would each hold one buffer (measured: 8 KiB of a 32 KiB idle
/// connection).
pub const CLIENT_READ_BUFFER_BYTES: usize = 0;
/// Write buffer per client connection, bytes: one TCP segment, so a small response's
/// header and body leave in one write. 0 saves ≈ 1.4 KiB per idle connection and costs
/// ≈ 10 % throughput (measured).
pub const CLIENT_WRITE_BUFFER_BYTES: usize = 1460;
/// Worker threads of the proxy service.
pub const THREADS: usize = 2;
/// After a stop or upgrade signal, in-flight requests get this long to finish (10 s;
/// pingora's own default of 300 s is longer than any POS terminal waits).
pub const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// After the grace period, the runtime gets this long to wind down (5 s).
pub const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// PID file, used by upgrades and the systemd unit.
pub const PID_FILE: &str = "/tmp/sluice.pid";
/// Unix socket over which listening sockets are handed to a new process on upgrade.
pub const UPGRADE_SOCK: &str = "/tmp/sluice_upgrade.sock";
/// Upper bound for `max_inflight`, far above what any legacy server takes; a larger value is
/// almost certainly a typo.
pub const MAX_INFLIGHT_CEILING: u32 = 100_000;
/// Slow-start ramp length (10 s): after sluice starts, and after a backend recovers, its
/// limit grows from `slow_start.initial` to `max_inflight` over this long. "0s" disables.
pub const SLOW_START_DURATION: Duration = Duration::from_secs(10);
/// Slow-start initial limit, as a share of `max_inflight` (10 %, at least 1 request).
pub const SLOW_START_INITIAL_SHARE: f64 = 0.10;
/// How the ramp grows: "latency" (doubling per round of completions whose latency stays
/// near the backend's measured baseline; `duration` bounds it) or "clock" (linear over
/// `duration`).
pub const SLOW_START_MODE: &str = "latency";
/// A round of completions is clean while its median latency is at most this × the
/// backend's baseline (latency at low concurrency).
pub const LATENCY_TOLERANCE: f64 = 1.3;
/// Latency mode: the smallest rise over the baseline that counts as inflation.
pub const MIN_LATENCY_RISE: Duration = Duration::from_millis(2);
/// Share of failed requests in a round above which the latency ramp stops growing.
pub const LATENCY_MAX_ERROR_RATE: f64 = 0.1;
/// Adapt the limit below `max_inflight` in steady service (opt-in).
pub const ADAPTIVE: bool = false;
/// The learned limit never goes below this.
pub const MIN_INFLIGHT: u32 = 1;
/// Active health check: what to do ("http" GET, "tcp" connect, or "none").
pub const HEALTH_CHECK: &str = "http";
/// Path requested by the HTTP health check.
pub const HEALTH_PATH: &str = "/";
/// Time between health checks of a backend (2 s).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// A health check that takes longer than this fails (1 s).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive passing checks that bring a down backend back.
pub const HEALTH_RISE: u32 = 2;
/// Consecutive failing checks that take a backend down.
pub const HEALTH_FALL: u32 = 3;
/// Consecutive connect failures or timeouts of real requests that take a backend down.
pub const PASSIVE_FAILURES: u32 = 3;
/// Admin listener (status, drain, ready, metrics). Loopback only by default.
pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Access log target: one JSON line per request.
pub const ACCESS_LOG: &str = "stdout";
/// Redis key prefix of the shared budget: one hash per backend, `<key>:<backend name>`.
pub const CLUSTER_KEY: &str = "sluice";
/// Lease time to live (3 s), as Redis counts it; renewed every third of it.
pub const CLUSTER_LEASE_TTL: Duration = Duration::from_secs(3);
/// Shortest lease TTL accepted: renewals (a third of it) must outlast a Redis round trip
/// on a busy network by far.
pub const CLUSTER_MIN_LEASE_TTL: Duration = Duration::from_millis(300);
/// A lease counts as valid on the instance's clock for TTL less this share of it, so that
/// clock rates differing by up to 10 % never let an instance use a lease Redis has let go.
pub const CLUSTER_MARGIN_SHARE: f64 = 0.10;
/// Most instances a cluster may declare.
pub const CLUSTER_MAX_INSTANCES: u32 = 1000;
