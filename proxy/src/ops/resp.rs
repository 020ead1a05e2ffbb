//! A minimal Redis client: one TCP connection, RESP2 requests and replies, a deadline per call.
//!
//! sluice needs two commands, `EVAL` (the lease script, see [`crate::ops::cluster`]) and `AUTH` /
//! `SELECT` when the URL asks for them, a few times per second. The maintained crates were
//! checked first: `redis` 1.x needs Rust 1.88 (this workspace promises 1.85) and `fred` 10
//! brings a large dependency tree with its own reconnect and retry policy, which would have
//! to be turned off: a lease renewal must fail fast and never be retried after its deadline
//! (a late reply proves nothing). Speaking RESP2 directly is ~150 lines with no dependency.
//!
//! The URL form is `redis://[[user]:password@]host[:port][/db]` (default port 6379, db 0).
//! TLS (`rediss://`) is not supported.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Where and how to connect, parsed from a `redis://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `host:port`.
    pub addr: String,
    /// `AUTH` user, if any.
    pub user: Option<String>,
    /// `AUTH` password, if any.
    pub password: Option<String>,
    /// Database number for `SELECT`.
    pub db: u32,
}

impl RedisUrl {
    /// Parse `redis://[[user]:password@]host[:port][/db]`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or("must start with redis:// (rediss:// is not supported)")?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (host, db) = match hostpart.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| format!("database {d:?} is not a number"))?,
            ),
            None => (hostpart, 0),
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let addr = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:6379")
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some(("", p)) => (None, Some(p.to_string())),
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        Ok(RedisUrl {
            addr,
            user,
            password,
            db,
        })
    }

    /// The URL without its password, for logs and status output.
    pub fn redacted(&self) -> String {
        let auth = match (&self.user, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".into(),
            _ => String::new(),
        };
        format!("redis://{auth}{}/{}", self.addr, self.db)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Status(String),
    /// `:42`
    Int(i64),
    /// `$n` bulk string; `None` for a nil.
    Bulk(Option<Vec<u8>>),
    /// `*n` array; `None` for a nil array.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The value as an integer (an `Int`, or a bulk string holding one).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The value as text (a status or a bulk string).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Status(s) => Some(s.clone()),
            Value::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connecting, reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No reply within the call's deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error (`-ERR ...`).
    #[error("redis: {0}")]
    Server(String),
    /// The reply could not be parsed.
    #[error("bad reply: {0}")]
    Protocol(String),
}

/// One connection. Any error leaves it unusable: drop it and connect again.
#[derive(Debug)]
pub struct Connection {
    stream: BufReader<TcpStream>,
}

/// Longest line or bulk string accepted in a reply (the lease script's replies are small).
const MAX_REPLY_BYTES: usize = 1 << 20;

impl Connection {
    /// Connect, authenticate and select the database, all within `timeout`.
    pub async fn connect(url: &RedisUrl, timeout: Duration) -> Result<Connection, RedisError> {
        tokio::time::timeout(timeout, async {
            let tcp = TcpStream::connect(&url.addr).await?;
            let _ = tcp.set_nodelay(true);
            let mut c = Connection {
                stream: BufReader::new(tcp),
            };
            if let Some(p) = &url.password {
                match &url.user {
                    Some(u) => c.call_inner(&[b"AUTH", u.as_bytes(), p.as_bytes()]).await?,
                    None => c.call_inner(&[b"AUTH", p.as_bytes()]).await?,
                };
            }
            if url.db != 0 {
                c.call_inner(&[b"SELECT", url.db.to_string().as_bytes()])
                    .await?;
            }
            Ok(c)
        })
        .await
        .map_err(|_| RedisError::Timeout(timeout))?
    }

    /// Send one command and read its reply within `timeout`.
    pub async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Value, RedisError> {
        tokio::time::timeout(timeout, self.call_inner(args))
            .await
            .map_err(|_| RedisError::Timeout(timeout))?
    }

    async fn call_inner(&mut self, args: &[&[u8]]) -> Result<Value, RedisError> {
        let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&out).await?;
        self.read_value().await
    }

    async fn line(&mut self) -> Result<String, RedisError> {
        let mut buf = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_REPLY_BYTES as u64)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(RedisError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !buf.ends_with(b"\r\n") {
            return Err(RedisError::Protocol("line not ended by CRLF".into()));
        }
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).map_err(|_| RedisError::Protocol("line not UTF-8".into()))
    }

    fn read_value(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, RedisError>> + Send + '_>>
    {
        Box::pin(async move {
            let line = self.line().await?;
            let (kind, rest) = line.split_at(line.len().min(1));
            let number = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| RedisError::Protocol(format!("bad length {s:?}")))
            };
            match kind {
                "+" => Ok(Value::Status(rest.to_string())),
                "-" => Err(RedisError::Server(rest.to_string())),
                ":" => Ok(Value::Int(number(rest)?)),
                "$" => {
                    let n = number(rest)?;
                    if n < 0 {
                        return Ok(Value::Bulk(None));
                    }
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|&n| n <= MAX_REPLY_BYTES)
                        .ok_or_else(|| RedisError::Protocol("bulk string too long".into()))?;
                    let mut buf = vec![0; n + 2];
                    self.stream.read_exact(&mut buf).await?;
                    buf.truncate(n);
                    Ok(Value::Bulk(Some(buf)))
                }
                "*" => {
                    let n = number(rest)?;
                    if n < 0 {
                        return Ok(Value::Array(None));
                    }
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|&n| n <= 1 << 16)
                        .ok_or_else(|| RedisError::Protocol("array too long".into()))?;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.read_value().await?);
                    }
                    Ok(Value::Array(Some(items)))
                }
                _ => Err(RedisError::Protocol(format!("unknown reply type {line:?}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RedisUrl;

    #[test]
    fn urls_parse_with_defaults_and_say_what_is_wrong() {
        let u = RedisUrl::parse("redis://10.0.0.5").expect("url");
        assert_eq!(
            (u.addr.as_str(), u.db, u.password),
            ("10.0.0.5:6379", 0, None)
        );
        let u = RedisUrl::parse("redis://app:s3cret@redis.local:6380/2").expect("url");
        assert_eq!(u.addr, "redis.local:6380");
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.db, 2);
        assert_eq!(u.redacted(), "redis://app:***@redis.local:6380/2");
        let u = RedisUrl::parse("redis://:pw@127.0.0.1:7000/").expect("url");
        assert_eq!((u.user, u.password.as_deref()), (None, Some("pw")));
        assert!(RedisUrl::parse("http://x").is_err());
        assert!(RedisUrl::parse("rediss://x").is_err());
        assert!(RedisUrl::parse("redis://").is_err());
        assert!(RedisUrl::parse("redis://h/x").is_err());
    }
}
