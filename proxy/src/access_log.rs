//! The access log: one JSON line per request, written off the request path.
//!
//! Request tasks hand a formatted line to a bounded channel; one writer thread owns the file
//! (or stdout) and flushes whenever the channel runs dry. If the writer cannot keep up, lines
//! are dropped and counted rather than slowing down the proxy; the count is reported on the
//! error log when the writer next catches up.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

/// Lines buffered between request tasks and the writer thread.
const CHANNEL_LINES: usize = 16 * 1024;

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

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339 time the request finished, milliseconds.
    pub time: String,
    /// Client address.
    pub client: String,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A handle to the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> Self {
        AccessLog {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
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
        let (tx, rx) = sync_channel(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || writer(rx, out, d))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped,
        })
    }

    /// Whether lines are written anywhere.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Log one request.
    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = serde_json::to_string(entry) else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Current time for [`Entry::time`].
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn writer(rx: Receiver<String>, out: Box<dyn Write + Send>, dropped: Arc<AtomicU64>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    // Ends when every sender is gone.
    while let Ok(line) = rx.recv() {
        let mut batch = Some(line);
        while let Some(l) = batch {
            let _ = out.write_all(l.as_bytes());
            let _ = out.write_all(b"\n");
            batch = rx.try_recv().ok();
        }
        let _ = out.flush();
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            log::warn!("access log fell behind: {lost} lines dropped");
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
        log.log(&Entry {
            time: now_rfc3339(),
            client: "127.0.0.1:5".into(),
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
        // The writer thread flushes when the channel closes; wait for the line, bounded.
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
