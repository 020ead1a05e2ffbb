//! The access log: one JSON line per request, written off the request path, in batches.
//!
//! A request formats its line straight onto the end of its thread's batch buffer: one lock no
//! other worker thread takes (each worker thread appends to its own of [`SHARDS`] buffers, the
//! writer takes it once per batch), no allocation per line, no copy, and no thread woken. One
//! writer thread owns the file (or stdout) and writes what accumulated every [`FLUSH_EVERY`],
//! one buffer after the other: within a batch, lines from different worker threads are not in
//! time order (each line carries its time). If a buffer reaches [`MAX_PENDING_BYTES`] (the
//! writer cannot keep up), lines are dropped and counted rather than slowing down the proxy; the
//! count is reported on the error log when the writer next catches up. Dropping the last handle
//! (a reload opening another log) writes what is left.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

/// How often the writer thread writes the lines that accumulated.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Bytes of lines waiting for the writer at most, per batch buffer; lines beyond are dropped
/// and counted.
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
    /// Time waiting for a backend slot (written in milliseconds, to the microsecond).
    #[serde(rename = "queue_ms", serialize_with = "as_millis")]
    pub queue: Duration,
    /// Time at the backend (written in milliseconds; absent if never sent).
    #[serde(rename = "upstream_ms", serialize_with = "as_millis")]
    pub upstream: Option<Duration>,
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

impl Entry<'_> {
    /// The entry as one JSON object (no newline), appended to `out`: the text `serde_json`
    /// writes for it (a test holds them equal), without its per-field machinery. Strings are
    /// copied as they are unless they need escaping, numbers go through `itoa`, and the time's
    /// date and seconds are formatted once per second per thread.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_time(self.time, out);
        out.extend_from_slice(b"\",\"client\":");
        write_or_null(self.client, out, write_client);
        out.extend_from_slice(b",\"method\":");
        write_str(self.method, out);
        out.extend_from_slice(b",\"path\":");
        write_str(self.path, out);
        out.extend_from_slice(b",\"status\":");
        write_int(self.status, out);
        out.extend_from_slice(b",\"queue_ms\":");
        write_millis(self.queue, out);
        out.extend_from_slice(b",\"upstream_ms\":");
        write_or_null(self.upstream, out, write_millis);
        out.extend_from_slice(b",\"bytes\":");
        write_int(self.bytes, out);
        out.extend_from_slice(b",\"backend\":");
        write_or_null(self.backend, out, write_str);
        out.extend_from_slice(b",\"outcome\":");
        write_str(self.outcome, out);
        if let Some(limit) = self.limit {
            out.extend_from_slice(b",\"limit\":");
            write_int(limit, out);
        }
        if let Some(why) = self.limit_why {
            out.extend_from_slice(b",\"limit_why\":");
            write_str(why, out);
        }
        if let Some(e) = self.error {
            out.extend_from_slice(b",\"error\":");
            write_display(e, out);
        }
        out.push(b'}');
    }
}

/// A duration in milliseconds, to the microsecond (`0.748`, not `0.7481869999999999`).
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A duration (or none) as the JSON number [`millis`] gives, through `serde`: the reference
/// [`write_millis`] is held to.
fn as_millis<S: serde::Serializer, D: Into<Option<Duration>> + Copy>(
    d: &D,
    s: S,
) -> Result<S::Ok, S::Error> {
    match (*d).into() {
        Some(d) => s.serialize_f64(millis(d)),
        None => s.serialize_none(),
    }
}

/// Above this many microseconds (31 years) a duration is written through `f64` formatting;
/// below it, digit by digit, the same text.
const MILLIS_BY_DIGITS: u128 = 1_000_000_000_000_000;

/// A duration in milliseconds to the microsecond, as `serde_json` writes [`millis`] of it
/// (`748.186`, `20.0`), without float formatting: the whole milliseconds, a point, and the
/// microseconds with trailing zeros dropped (one digit at least).
fn write_millis(d: Duration, out: &mut Vec<u8>) {
    // In 64 bits: a 128-bit division is a call, not an instruction.
    let micros = match u64::try_from(d.as_micros()) {
        Ok(m) if u128::from(m) < MILLIS_BY_DIGITS => m,
        _ => return write_f64(millis(d), out),
    };
    write_int(micros / 1000, out);
    let mut frac = (micros % 1000) as u16;
    let mut digits = [b'0'; 3];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    let keep = digits.iter().rposition(|&d| d != b'0').map_or(1, |i| i + 1);
    out.push(b'.');
    out.extend_from_slice(&digits[..keep]);
}

/// Whether JSON needs `s` escaped (what `serde_json` escapes: quotes, backslashes and control
/// characters).
fn needs_escape(s: &[u8]) -> bool {
    s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `v` written by `write`, or `null`.
fn write_or_null<T>(v: Option<T>, out: &mut Vec<u8>, write: impl FnOnce(T, &mut Vec<u8>)) {
    match v {
        Some(v) => write(v, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// An integer.
fn write_int(n: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `s` as a JSON string.
fn write_str(s: &str, out: &mut Vec<u8>) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// `v`'s `Display` form as a JSON string: written in place, escaped only if it must be.
fn write_display<T: std::fmt::Display + ?Sized>(v: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(b'"');
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{v}");
    if needs_escape(&out[start + 1..]) {
        let raw = out.split_off(start + 1);
        out.truncate(start);
        // `Display` wrote UTF-8.
        let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(&raw));
    } else {
        out.push(b'"');
    }
}

/// A client address as a JSON string: an IPv4 one (every terminal's) digit by digit, any
/// other through its `Display` form.
fn write_client(c: &pingora::protocols::l4::socket::SocketAddr, out: &mut Vec<u8>) {
    let Some(std::net::SocketAddr::V4(a)) = c.as_inet() else {
        return write_display(c, out);
    };
    out.push(b'"');
    for (i, octet) in a.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        write_int(octet, out);
    }
    out.push(b':');
    write_int(a.port(), out);
    out.push(b'"');
}

/// A number as `serde_json` writes it (`null` if not finite).
fn write_f64(v: f64, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, &v);
}

thread_local! {
    /// The last second formatted, and its text up to the seconds (`2026-12-03T02:05:23`).
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

thread_local! {
    /// A wall-clock reading and the monotonic instant it was taken at (see [`wall_clock`]).
    static ANCHOR: std::cell::Cell<Option<(std::time::Instant, SystemTime)>> =
        const { std::cell::Cell::new(None) };
}

/// The wall-clock time at the monotonic instant `now` (read by the caller for its own use):
/// the wall clock is read once a second per thread, not once per line. A wall-clock step
/// (NTP, an operator) shows in the log within a second.
pub fn wall_clock(now: tokio::time::Instant) -> SystemTime {
    let now = now.into_std();
    ANCHOR.with(|anchor| match anchor.get() {
        Some((at, wall)) if now >= at && now - at < Duration::from_secs(1) => wall + (now - at),
        _ => {
            let wall = SystemTime::now();
            anchor.set(Some((now, wall)));
            wall
        }
    })
}

/// `t` in RFC 3339 with milliseconds, as `humantime` writes it, without the quotes.
fn write_time(t: SystemTime, out: &mut Vec<u8>) {
    let written = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|since| {
            SECOND.with(|second| {
                let mut second = second.try_borrow_mut().ok()?;
                let secs = since.as_secs();
                if second.0 != secs {
                    let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                    let text = humantime::format_rfc3339_seconds(whole).to_string();
                    second.1.copy_from_slice(text.as_bytes().get(..19)?);
                    second.0 = secs;
                }
                out.extend_from_slice(&second.1);
                let ms = since.subsec_millis();
                out.extend_from_slice(&[
                    b'.',
                    b'0' + (ms / 100) as u8,
                    b'0' + (ms / 10 % 10) as u8,
                    b'0' + (ms % 10) as u8,
                    b'Z',
                ]);
                Some(())
            })
        });
    if written.is_none() {
        let _ = write!(out, "{}", humantime::format_rfc3339_millis(t));
    }
}

/// A handle to the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

/// The batch buffers and the output they go to.
struct Inner {
    /// One batch buffer per worker thread (threads past [`SHARDS`] share).
    pending: [Shard; SHARDS],
    out: Mutex<Out>,
    dropped: AtomicU64,
}

/// The output, and the buffer of lines it wrote last (empty), swapped in for the next batch.
struct Out {
    sink: Box<dyn Write + Send>,
    spare: Vec<u8>,
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

/// Batch buffers per log: worker threads append to their own, so the request path touches no
/// memory another worker thread writes.
const SHARDS: usize = 8;

/// One batch buffer, alone on its cache lines: unpadded, two buffers share a 64-byte line and
/// the two worker threads would write the same line after all. 128 bytes: a line and the one
/// prefetched with it.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Vec<u8>>);

// Neighbouring buffers never share a line.
const _: () = assert!(std::mem::size_of::<Shard>() % 128 == 0);

/// The next thread's batch buffer.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's batch buffer (its index; `usize::MAX` until the thread first logs).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's batch buffer.
fn shard() -> usize {
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        s.get()
    })
}

/// A batch buffer larger than this after a write is shrunk back to [`BATCH_CAPACITY`].
const KEEP_BATCH_CAPACITY: usize = 4 * 1024 * 1024;

/// The capacity each of the two batch buffers starts with.
const BATCH_CAPACITY: usize = 64 * 1024;

impl Inner {
    /// Write what accumulated. The lines' buffer is swapped with the one written last time
    /// (emptied, its capacity kept): requests append into memory already allocated, instead of
    /// growing a new buffer from nothing after each write.
    fn flush(&self) {
        let mut out = lock(&self.out);
        let Out { sink, spare } = &mut *out;
        let mut wrote = false;
        for Shard(pending) in &self.pending {
            std::mem::swap(&mut *lock(pending), spare);
            if !spare.is_empty() {
                let _ = sink.write_all(spare);
                wrote = true;
            }
            spare.clear();
            if spare.capacity() > KEEP_BATCH_CAPACITY {
                spare.shrink_to(BATCH_CAPACITY);
            }
        }
        if wrote {
            let _ = sink.flush();
        }
        drop(out);
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
            // Grown on first use: only the worker threads' buffers are ever filled.
            pending: Default::default(),
            out: Mutex::new(Out {
                sink: out,
                spare: Vec::with_capacity(BATCH_CAPACITY),
            }),
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
        let mut pending = lock(&inner.pending[shard()].0);
        let start = pending.len();
        entry.write_json(&mut pending);
        pending.push(b'\n');
        if pending.len() > MAX_PENDING_BYTES {
            pending.truncate(start);
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
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

    /// The wall clock derived from a monotonic reading stays within a few milliseconds of the
    /// wall clock read around it, across a re-reading of the wall clock.
    #[test]
    fn wall_clock_follows_the_wall_clock() {
        let start = std::time::Instant::now();
        let mut readings = 0;
        // Bounded: past one second (a re-reading) or 50 million readings, whichever is first.
        while start.elapsed() < Duration::from_millis(1100) && readings < 50_000_000 {
            let before = SystemTime::now();
            let derived = wall_clock(tokio::time::Instant::now());
            let after = SystemTime::now();
            let slack = Duration::from_millis(5);
            assert!(
                derived + slack >= before && derived <= after + slack,
                "{derived:?}"
            );
            readings += 1;
        }
    }

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
            queue: Duration::from_micros(1_500),
            upstream: Some(Duration::from_millis(20)),
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

    /// Lines logged from many threads at once (more than there are batch buffers) are all
    /// written, whole, once each.
    #[test]
    fn lines_from_many_threads_are_all_written_whole() {
        let path =
            std::env::temp_dir().join(format!("sluice-access-threads-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&Target::File(path.clone())).expect("open");
        let threads = SHARDS + 3;
        let per_thread = 200;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let log = log.clone();
                scope.spawn(move || {
                    for i in 0..per_thread {
                        let path = format!("/pay?t={t}&i={i}");
                        log.log(&Entry {
                            time: SystemTime::UNIX_EPOCH,
                            client: None,
                            method: "GET",
                            path: &path,
                            status: 200,
                            queue: Duration::ZERO,
                            upstream: None,
                            bytes: 0,
                            backend: None,
                            outcome: "ok",
                            limit: None,
                            limit_why: None,
                            error: None,
                        });
                    }
                });
            }
        });
        log.flush();
        let text = std::fs::read_to_string(&path).expect("read");
        let mut seen: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a whole JSON line");
                v["path"].as_str().expect("path").to_string()
            })
            .collect();
        seen.sort();
        let mut want: Vec<String> = (0..threads)
            .flat_map(|t| (0..per_thread).map(move |i| format!("/pay?t={t}&i={i}")))
            .collect();
        want.sort();
        assert_eq!(seen, want);
        drop(log);
        let _ = std::fs::remove_file(&path);
    }

    /// The hand-written line is the JSON `serde_json` writes for the same entry, escapes,
    /// absent fields and errors included.
    #[test]
    fn a_line_is_what_serde_json_writes() {
        let inet =
            pingora::protocols::l4::socket::SocketAddr::Inet("[::1]:80".parse().expect("addr"));
        let v4 = pingora::protocols::l4::socket::SocketAddr::Inet(
            "10.200.3.255:65535".parse().expect("addr"),
        );
        let unix = pingora::protocols::l4::socket::SocketAddr::Unix(
            std::os::unix::net::SocketAddr::from_pathname("/run/a\"b").expect("path"),
        );
        let error = pingora::Error::explain(pingora::ErrorType::ConnectTimedout, "tab\there \"q\"");
        let base = Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_007),
            client: Some(&inet),
            method: "POST",
            path: "/pay?txn=1",
            status: 200,
            queue: Duration::from_nanos(748_186_999),
            upstream: Some(Duration::from_millis(20)),
            bytes: 6,
            backend: Some("iis-1"),
            outcome: "ok",
            limit: Some(32),
            limit_why: Some("steady"),
            error: None,
        };
        let entries = [
            Entry { ..base },
            Entry {
                client: Some(&unix),
                path: "/a\\b\u{1}\"c\"/é",
                upstream: None,
                backend: None,
                limit: None,
                limit_why: None,
                error: Some(&error),
                queue: Duration::MAX,
                time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_001_999),
                ..base
            },
            Entry {
                client: Some(&v4),
                ..base
            },
            Entry {
                client: None,
                time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_001_000),
                ..base
            },
        ];
        for e in &entries {
            let mut line = Vec::new();
            e.write_json(&mut line);
            let want = serde_json::to_string(e).expect("serde_json");
            assert_eq!(String::from_utf8_lossy(&line), want);
        }
        assert_eq!(
            millis(Duration::from_nanos(748_186_999)).to_string(),
            "748.186"
        );
    }

    /// Durations written digit by digit read exactly as `serde_json` writes them as numbers:
    /// every microsecond of the first two seconds, then a spread up to far past the cut-over
    /// to float formatting.
    #[test]
    fn millis_by_digits_are_what_serde_json_writes() {
        let spread = (0..200u32).map(|i| Duration::from_micros(7u64.pow(i % 20) * u64::from(i)));
        let edges = [
            MILLIS_BY_DIGITS - 1,
            MILLIS_BY_DIGITS,
            MILLIS_BY_DIGITS + 1,
            u128::from(u64::MAX),
        ]
        .map(|m| Duration::from_micros(u64::try_from(m).unwrap_or(u64::MAX)));
        let all = (0..2_000_000u64)
            .map(Duration::from_micros)
            .chain(spread)
            .chain(edges)
            .chain([Duration::MAX, Duration::from_nanos(1_999)]);
        let mut line = Vec::new();
        for d in all {
            line.clear();
            write_millis(d, &mut line);
            let want = serde_json::to_string(&millis(d)).expect("serde_json");
            assert_eq!(String::from_utf8_lossy(&line), want, "{d:?}");
        }
    }

    #[test]
    fn parse_targets() {
        assert_eq!(Target::parse("off"), Target::Off);
        assert_eq!(Target::parse("stdout"), Target::Stdout);
        assert_eq!(Target::parse("/x"), Target::File("/x".into()));
    }
}
