//! Every answer sluice writes itself, instead of the backend's: the status, the reason in a
//! one-line text body, `Retry-After` when a retry is worth it, and whether the connection
//! stays open.
//!
//! | answer | when | connection |
//! |---|---|---|
//! | 503 + `Retry-After` ([`shed`]) | not admitted: queue full, waited too long, no backend up | kept open |
//! | 400 / 408 / 413 / 431, 503 + `Retry-After` ([`invalid`]) | refused before admission | closed |
//! | 502 / 504 / 500, with `Retry-After` for 5xx ([`failed`]) | admitted, and no answer from the backend | closed |
//! | 204 `X-Sluice-Probe: busy` ([`probe_busy`]) | a health probe finds the backend's cap full | kept open |
//! | `code` + `x-sluice-probe-error` ([`probe_failed`]) | a health probe got no answer | closed |
//! | 503 + `Retry-After` ([`over_connection_cap`]) | a connection over a connection cap | closed |
//! | 408 ([`HEADER_TIMEOUT`]) | the request header did not arrive in time | closed |
//!
//! A kept-open connection is what makes a rejection cheap: closing it would turn every 503
//! into a reconnect (pingora's `respond_error` closes).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::request::Invalid;
use crate::admission::Shed;

/// Header on sluice's own answer to a health probe that could not reach the backend: why.
pub const PROBE_ERROR_HEADER: &str = "x-sluice-probe-error";

/// Write a 503 with `Retry-After` for a request that was not admitted, and keep the client
/// connection open.
pub async fn shed(session: &mut Session, shed: Shed, retry_after_secs: u64) -> Result<()> {
    let body = match shed {
        Shed::QueueFull => "503 service busy: queue full, retry later\n",
        Shed::QueueTimeout => "503 service busy: waited too long in the queue, retry later\n",
        Shed::BackendDown => "503 service unavailable: the backend is down, retry later\n",
    };
    let header = text(503, body.len(), Some(retry_after_secs), &[])?;
    session.write_response_header(header, false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}

/// Answer a request refused before admission (400 / 408 / 413 / 431, or 503 when its body
/// found no room) and close the connection: the rest of it cannot be trusted to be framed as
/// the client meant.
pub async fn invalid(session: &mut Session, invalid: Invalid, retry_after_secs: u64) -> Result<()> {
    // A 503 (no room to buffer the body) is worth retrying: say when.
    let retry_after = (invalid.status() == 503).then_some(retry_after_secs);
    closing(
        session,
        invalid.status(),
        invalid.message(),
        retry_after,
        &[],
    )
    .await
}

/// Answer an admitted request the backend gave no answer to (`code` from
/// [`super::exchange::Outcome::status`]) and close the connection: its state toward the backend
/// is unknown.
pub async fn failed(session: &mut Session, code: u16, retry_after_secs: u64) -> Result<()> {
    let reason = match code {
        502 => "bad gateway: the backend failed to answer",
        503 => "service unavailable",
        504 => "gateway timeout: the backend did not answer in time",
        400 => "bad request",
        413 => "request body too large",
        431 => "request header too large",
        _ => "error",
    };
    let retry_after = (code >= 500).then_some(retry_after_secs);
    closing(session, code, reason, retry_after, &[]).await
}

/// Answer a health probe that found the backend's cap full: the backend is busy serving, which
/// is healthy enough.
pub async fn probe_busy(session: &mut Session) -> Result<()> {
    let mut h = ResponseHeader::build(204, Some(2))?;
    h.insert_header("X-Sluice-Probe", "busy")?;
    session.write_response_header(Box::new(h), true).await
}

/// sluice's answer to its own health probe when the backend gave none: `code`, with the reason
/// in [`PROBE_ERROR_HEADER`], so the checker logs the backend's failure rather than a 502.
pub async fn probe_failed(session: &mut Session, code: u16, why: &str) -> Result<()> {
    closing(session, code, why, None, &[(PROBE_ERROR_HEADER, why)]).await
}

/// The raw answer to a connection over a connection cap (written before pingora sees it).
pub fn over_connection_cap(per_ip: bool, retry_after_secs: u64) -> String {
    let body = if per_ip {
        "503 too many connections from this address: retry later\n"
    } else {
        "503 too many client connections: retry later\n"
    };
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after_secs}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The raw answer to a client whose request header did not arrive within
/// `proxy.client_header_timeout`.
pub const HEADER_TIMEOUT: &str = "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\n\
     Content-Length: 40\r\nConnection: close\r\n\r\n408 request header not received in time\n";

/// A text answer `"{code} {message}\n"`, with `Connection: close`.
async fn closing(
    session: &mut Session,
    code: u16,
    message: &str,
    retry_after_secs: Option<u64>,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    let body = Bytes::from(format!("{code} {message}\n"));
    let header = text(code, body.len(), retry_after_secs, extra)?;
    session.as_downstream_mut().set_keepalive(None);
    session.write_response_header(header, false).await?;
    session.write_response_body(Some(body), true).await
}

/// The header of a short `text/plain` answer that is never cached.
fn text(
    code: u16,
    len: usize,
    retry_after_secs: Option<u64>,
    extra: &[(&'static str, &str)],
) -> Result<Box<ResponseHeader>> {
    let mut h = ResponseHeader::build(code, Some(4 + extra.len()))?;
    if let Some(secs) = retry_after_secs {
        h.insert_header("Retry-After", secs.to_string())?;
    }
    for (name, value) in extra {
        h.insert_header(*name, *value)?;
    }
    h.insert_header("Content-Type", "text/plain")?;
    h.insert_header("Content-Length", len.to_string())?;
    if extra.is_empty() {
        h.insert_header("Cache-Control", "no-store")?;
    }
    Ok(Box::new(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_answers_are_framed() {
        for answer in [
            over_connection_cap(true, 2),
            over_connection_cap(false, 2),
            HEADER_TIMEOUT.to_string(),
        ] {
            let (head, body) = answer.split_once("\r\n\r\n").expect("a header block");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.parse().ok())
                .expect("a Content-Length");
            assert_eq!(len, body.len(), "{answer}");
            assert!(head.contains("Connection: close"));
        }
        assert!(over_connection_cap(true, 7).contains("Retry-After: 7\r\n"));
    }

    #[test]
    fn retry_after_only_where_a_retry_helps() {
        let h = text(503, 10, Some(3), &[]).expect("header");
        assert_eq!(
            h.headers.get("Retry-After").map(|v| v.as_bytes()),
            Some(&b"3"[..])
        );
        let h = text(400, 10, None, &[]).expect("header");
        assert!(h.headers.get("Retry-After").is_none());
        assert!(h.headers.get("Cache-Control").is_some());
    }
}
