//! The access log: one JSON line per request, written off the request path, in batches.
//!
//! A request formats its line straight into a per-thread scratch buffer and appends it to the
//! log's shared buffer: one short lock, no allocation per line, and no thread woken. One writer
//! thread owns the file (or stdout) and writes what accumulated every [`FLUSH_EVERY`]. If the
//! buffer reaches [`MAX_PENDING_BYTES`] (the writer cannot keep up), lines are dropped and
//! counted rather than slowing down the proxy; the count is reported on the error log when the
//! writer next catches up. Dropping the last handle (a reload opening another log) writes what
//! is left.

use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

/// How often the writer thread writes the lines that accumulated.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Bytes of lines waiting for the writer at most; lines beyond are dropped and counted.
const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Nowhere.
    Off,
    /// Standard output.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl Target {
    /// Parse a config value: `"off"`, `"stdout"` or a file path.
    pub fn parse(s: &str) -> Self {
        match s {
            "off" | "" => Target::Off,
            "stdout" | "-" => Target::Stdout,
            path => Target::File(path.into()),
        }
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn display<T: std::fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Time the request finished (written as RFC 3339, milliseconds).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// Client address.
    #[serde(serialize_with = "display")]
    pub client: Option<&'a pingora::protocols::l4::socket::SocketAddr>,
    /// Request method.
    pub method: &'a str,
    /// Request path and query.
    pub path: &'a str,
    /// Status sent to the client (0: none, the client was gone).
    pub status: u16,
    /// Time waiting for a backend slot, milliseconds.
    pub queue_ms: f64,
    /// Time at the backend, milliseconds (absent if never sent).
    pub upstream_ms: Option<f64>,
    /// Response body bytes sent to the client.
    pub bytes: usize,
    /// Backend name (absent if never admitted).
    pub backend: Option<&'a str>,
    /// How it ended (see the metrics' outcome label).
    pub outcome: &'a str,
    /// The backend's limit in force when the request's slot was released (absent if the
    /// slot is still held, or the request was never admitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Why the learned limit is there: `ramp`, `steady` or `collapsed` (absent when the
    /// backend does not learn its limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_why: Option<&'a str>,
    /// The error, when the request failed.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub error: Option<&'a pingora::Error>,
}

/// A handle to the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

/// The shared buffer and the output it goes to.
struct Inner {
    pending: Mutex<Vec<u8>>,
    out: Mutex<Box<dyn Write + Send>>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// Where a line is formatted before it is appended.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Inner {
    /// Write what accumulated.
    fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        if !batch.is_empty() {
            let mut out = lock(&self.out);
            let _ = out.write_all(&batch);
            let _ = out.flush();
            // Keep the buffer's capacity for the next batch, unless it grew large.
            if batch.capacity() <= 1024 * 1024 {
                let mut pending = lock(&self.pending);
                if pending.is_empty() {
                    let mut batch = batch;
                    batch.clear();
                    *pending = batch;
                }
            }
        }
        let lost = self.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            log::warn!("access log fell behind: {lost} lines dropped");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.flush();
    }
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> Self {
        AccessLog { inner: None }
    }

    /// Open the target and start its writer thread.
    pub fn open(target: &Target) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self::off()),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let inner = Arc::new(Inner {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            out: Mutex::new(out),
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || writer(weak))?;
        Ok(AccessLog { inner: Some(inner) })
    }

    /// Whether lines are written anywhere.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Log one request.
    pub fn log(&self, entry: &Entry<'_>) {
        let Some(inner) = &self.inner else { return };
        SCRATCH.with(|scratch| {
            let Ok(mut line) = scratch.try_borrow_mut() else {
                return;
            };
            line.clear();
            if serde_json::to_writer(&mut *line, entry).is_err() {
                return;
            }
            line.push(b'\n');
            let mut pending = lock(&inner.pending);
            if pending.len() + line.len() > MAX_PENDING_BYTES {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                pending.extend_from_slice(&line);
            }
        });
    }

    /// Write every line logged so far (tests, shutdown).
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            inner.flush();
        }
    }
}

/// Writes the accumulated lines every [`FLUSH_EVERY`]; ends when the log is dropped (whose
/// drop writes what is left).
fn writer(log: Weak<Inner>) {
    loop {
        std::thread::sleep(FLUSH_EVERY);
        match log.upgrade() {
            Some(inner) => inner.flush(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_to_a_file() {
        let path = std::env::temp_dir().join(format!("sluice-access-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&Target::File(path.clone())).expect("open");
        let client: pingora::protocols::l4::socket::SocketAddr =
            pingora::protocols::l4::socket::SocketAddr::Inet("127.0.0.1:5".parse().expect("addr"));
        log.log(&Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: Some(&client),
            method: "POST",
            path: "/pay?txn=1",
            status: 200,
            queue_ms: 1.5,
            upstream_ms: Some(20.0),
            bytes: 6,
            backend: Some("iis-1"),
            outcome: "ok",
            limit: Some(32),
            limit_why: Some("steady"),
            error: None,
        });
        drop(log);
        // Dropping the last handle writes what is left; wait for the line, bounded.
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(v["status"], 200);
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["client"], "127.0.0.1:5");
        assert_eq!(v["backend"], "iis-1");
        assert_eq!(v["outcome"], "ok");
        assert_eq!(
            (&v["limit"], &v["limit_why"]),
            (&32.into(), &"steady".into())
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn parse_targets() {
        assert_eq!(Target::parse("off"), Target::Off);
        assert_eq!(Target::parse("stdout"), Target::Stdout);
        assert_eq!(Target::parse("/x"), Target::File("/x".into()));
    }
}
