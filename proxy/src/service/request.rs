//! Request checks before admission: framing, sizes, the request line as sent, `Host`, and the
//! HTTP/1.0 rules for the answer. Pure functions over the parsed header (and the raw bytes
//! where pingora's parser hides what the client sent).

use pingora::http::{RequestHeader, ResponseHeader};

use crate::shared::{Settings, Upstream};

/// Request header carrying the health checker's secret: marks a request as a health probe.
pub const PROBE_HEADER: &str = "x-sluice-probe";
/// Request header naming the backend (by index) a health probe is for.
pub const PROBE_BACKEND_HEADER: &str = "x-sluice-probe-backend";

/// Why a request is refused before admission, with the status it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Ambiguous or unsupported framing (both Content-Length and Transfer-Encoding, several
    /// Content-Length values, a transfer coding other than `chunked`): 400. Such requests are
    /// how request smuggling starts; the connection is closed after the answer.
    Framing(&'static str),
    /// Request header over `max_header_bytes`: 431.
    HeaderTooLarge,
    /// Declared body over `max_body_bytes`: 413.
    BodyTooLarge,
    /// A chunked body longer than the pre-admission buffer (and so of unknown size): 413.
    ChunkedTooLarge,
    /// The body did not arrive in time (start, rate or whole-body deadline): 408.
    BodyTimeout,
    /// The body did not fit in `proxy.max_buffered_body_bytes`: 503.
    BodyBudget,
    /// A malformed request (an HTTP/1.1 request without `Host`, a request target with a
    /// control character or a space): 400, never forwarded, connection closed.
    Malformed(&'static str),
}

impl Invalid {
    /// The status the refusal is answered with.
    pub fn status(self) -> u16 {
        match self {
            Invalid::Framing(_) | Invalid::Malformed(_) => 400,
            Invalid::HeaderTooLarge => 431,
            Invalid::BodyTooLarge | Invalid::ChunkedTooLarge => 413,
            Invalid::BodyTimeout => 408,
            Invalid::BodyBudget => 503,
        }
    }

    /// The reason, for the answer's body.
    pub fn message(self) -> &'static str {
        match self {
            Invalid::Framing(why) | Invalid::Malformed(why) => why,
            Invalid::HeaderTooLarge => "request header too large",
            Invalid::BodyTooLarge => "request body too large",
            Invalid::ChunkedTooLarge => {
                "chunked request body over 64 KiB: send a Content-Length for larger bodies"
            }
            Invalid::BodyTimeout => "request body not received in time",
            Invalid::BodyBudget => "too many request bodies in transit, retry later",
        }
    }
}

/// Whether a raw HTTP/1 header block has a field named `name` (lowercase ASCII).
fn raw_has_header(raw: &[u8], name: &[u8]) -> bool {
    raw.split(|&c| c == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()..].trim_ascii_start().first() == Some(&b':')
    })
}

/// The length of `uri` as written (its `Display` form), without writing it.
fn uri_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| "?".len() + q.len())
}

/// Check a request's framing and size before it may wait for, or reach, a backend; returns its
/// declared Content-Length, if any.
///
/// `raw` is the header block as the client sent it: pingora drops Content-Length when
/// Transfer-Encoding is also present (RFC 9112 lets a server do that), while a payment proxy
/// refuses such a request, so the raw header is consulted when Transfer-Encoding is present.
pub fn validate(
    req: &RequestHeader,
    raw: Option<&[u8]>,
    settings: &Settings,
) -> std::result::Result<Option<u64>, Invalid> {
    let header_bytes: usize = uri_len(&req.uri)
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > settings.max_header_bytes {
        return Err(Invalid::HeaderTooLarge);
    }
    let te: Vec<&[u8]> = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let cl: Vec<&[u8]> = req
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if !te.is_empty() {
        if !cl.is_empty() || raw.is_some_and(|r| raw_has_header(r, b"content-length")) {
            return Err(Invalid::Framing(
                "both Content-Length and Transfer-Encoding: ambiguous framing",
            ));
        }
        let only_chunked = te.len() == 1 && te[0].trim_ascii().eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(Invalid::Framing(
                "unsupported Transfer-Encoding: only a single `chunked` is accepted",
            ));
        }
    }
    let mut value: Option<u64> = None;
    if !cl.is_empty() {
        for v in &cl {
            for part in v.split(|&c| c == b',') {
                let part = part.trim_ascii();
                let n = std::str::from_utf8(part)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Invalid::Framing("invalid Content-Length"))?;
                if value.is_some_and(|v| v != n) {
                    return Err(Invalid::Framing("conflicting Content-Length values"));
                }
                value = Some(n);
            }
        }
        if value.is_some_and(|n| n > settings.max_body_bytes as u64) {
            return Err(Invalid::BodyTooLarge);
        }
    }
    Ok(value)
}

/// Whether `b` may not appear in a request line: a control character (NUL, CR, LF, TAB, ...)
/// or DEL. A space is allowed only as the two separators.
fn is_control(b: u8) -> bool {
    b < b' ' || b == 0x7f
}

/// Whether a request target carries a percent-escape of a control character (`%00`–`%1F`,
/// `%7F`). pingora escapes a raw control character or space in the target this way before
/// sluice sees the request, so this is how a raw NUL or bare CR shows in the parsed request;
/// the legacy server refuses such escapes anyway.
fn has_escaped_control(target: &[u8]) -> bool {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    target.windows(3).any(|w| {
        w[0] == b'%'
            && matches!((hex(w[1]), hex(w[2])), (Some(h), Some(l)) if h * 16 + l < 0x20 || h * 16 + l == 0x7f)
    })
}

/// Whether a request target has a control character, a space, or a percent-escape of a control
/// character ([`has_escaped_control`]): one pass over it, the escape looked at only where a `%`
/// is.
fn bad_target(target: &[u8]) -> bool {
    target.iter().enumerate().any(|(i, &b)| {
        is_control(b)
            || b == b' '
            || (b == b'%' && has_escaped_control(target.get(i..i + 3).unwrap_or_default()))
    })
}

/// Check a request line as the client sent it (up to and including its LF): `METHOD SP TARGET
/// SP VERSION CRLF`, no control character anywhere (a bare CR, a NUL), no space in the target.
fn check_request_line(line: &[u8]) -> std::result::Result<(), Invalid> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // One pass: a control character anywhere is refused as such, whatever the spaces.
    let mut spaces = 0;
    for &b in line {
        if b == b' ' {
            spaces += 1;
        } else if is_control(b) {
            return Err(Invalid::Malformed(
                "control character (NUL, bare CR, ...) in the request line",
            ));
        }
    }
    if spaces != 2 {
        return Err(Invalid::Malformed("space in the request target"));
    }
    Ok(())
}

/// Refuse what a strict HTTP/1.1 server refuses and the legacy server may misread: an HTTP/1.1
/// request without exactly one `Host`, a request target with a control character or a space.
///
/// `line` is the request line exactly as the client sent it, when sluice's connection loop
/// could read it before pingora (plain TCP, not a pipelined request): pingora percent-encodes a
/// target with illegal bytes (a space becomes `%20`) instead of refusing it, so only the
/// original shows a space. `raw` is pingora's copy of the header block (after that escaping):
/// a control character shows there as `%00`–`%1F`.
pub fn check_request(
    req: &RequestHeader,
    raw: Option<&[u8]>,
    line: Option<&[u8]>,
) -> std::result::Result<(), Invalid> {
    if let Some(line) = line {
        check_request_line(line)?;
    }
    let parsed_line = raw.and_then(|r| r.split(|&c| c == b'\n').next());
    let target: &[u8] = match parsed_line {
        Some(l) => {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let start = l.iter().position(|&c| c == b' ').map_or(0, |i| i + 1);
            let end = l.iter().rposition(|&c| c == b' ').unwrap_or(l.len());
            l.get(start..end.max(start)).unwrap_or_default()
        }
        None => req.raw_path(),
    };
    if bad_target(target) {
        return Err(Invalid::Malformed(
            "control character in the request target",
        ));
    }
    let hosts = req.headers.get_all(http::header::HOST).iter().count();
    if hosts > 1 {
        return Err(Invalid::Malformed("more than one Host header"));
    }
    if hosts == 0 && req.version >= http::Version::HTTP_11 {
        return Err(Invalid::Malformed("HTTP/1.1 request without Host"));
    }
    Ok(())
}

/// Whether the client asked to keep its connection: HTTP/1.1 unless it sent
/// `Connection: close` (pingora applies that one), HTTP/1.0 only with `Connection: keep-alive`.
pub fn client_wants_keepalive(req: &RequestHeader) -> bool {
    if req.version >= http::Version::HTTP_11 {
        return true;
    }
    req.headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
}

/// Frame an answer for an HTTP/1.0 client, which cannot read a chunked body (RFC 9112 §6.1).
/// A `Content-Length` answer goes as it is. Otherwise (the backend answered chunked, or
/// close-delimited, which pingora turns into chunked before this point) `Transfer-Encoding` is
/// removed: pingora then writes the de-chunked body as it arrives, close-delimited. Returns
/// whether the connection must close after the answer (the body has no length).
pub fn frame_for_http10(resp: &mut ResponseHeader, head_request: bool) -> bool {
    if resp.status.is_informational() {
        return false;
    }
    resp.remove_header(&http::header::TRANSFER_ENCODING);
    let no_body = head_request || matches!(resp.status.as_u16(), 204 | 304);
    !no_body && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
}

/// What the request brings beyond its header, as checked before admission.
#[derive(Debug, Default)]
pub struct Upload {
    /// The client speaks HTTP/1.0: its answer is never chunked.
    pub http10: bool,
    /// The request's Content-Length (one value, however many times the client repeated it).
    pub content_length: Option<u64>,
    /// The whole body, received before admission (and a `100 Continue` sent if asked for):
    /// its length, the whole body when pingora's retry buffer holds only its tail, and its
    /// bytes in the buffered-body budget.
    pub body: Option<crate::service::body::Received>,
    /// The request is known to carry neither of sluice's probe headers, so nothing is
    /// removed on the way to the backend (they are looked for and removed otherwise).
    pub no_probe_headers: bool,
}

/// Whether `req` carries neither of sluice's probe headers: one pass over its header names,
/// cheaper than looking either up (a name sluice's parser does not know is hashed for a lookup).
pub fn without_probe_headers(req: &RequestHeader) -> bool {
    // Both names start with the probe header's.
    !req.headers
        .keys()
        .any(|k| k.as_str().starts_with(PROBE_HEADER))
}

/// Turn the client's request into the one the backend gets: its `Host`, an origin-form target,
/// the body framed by a Content-Length, and none of sluice's own probe headers.
pub fn rewrite_upstream(
    req: &mut RequestHeader,
    up: Option<&Upstream>,
    upload: &Upload,
) -> pingora::Result<()> {
    if let Some(up) = up {
        match &up.host {
            Some(host) => req.insert_header("Host", host)?,
            // Only an HTTP/1.0 request gets here without one (an HTTP/1.1 one was refused),
            // and it goes upstream as HTTP/1.1, which must carry a Host: the backend's address.
            None if !req.headers.contains_key(http::header::HOST) => {
                req.insert_header("Host", &up.address)?
            }
            None => {}
        }
    }
    // A legacy server expects origin-form: turn an absolute-form target
    // (`GET http://host/path`) into `/path`, keeping the Host header.
    if req.uri.authority().is_some() {
        let origin = req
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        if let Ok(uri) = origin.parse::<http::Uri>() {
            req.set_uri(uri);
        }
    }
    match (&upload.body, upload.content_length) {
        (Some(body), _) => {
            // sluice already answered `100 Continue` and holds the whole body: it goes to the
            // backend with a Content-Length (a legacy server may not take a chunked upload).
            req.remove_header(&http::header::EXPECT);
            req.remove_header(&http::header::TRANSFER_ENCODING);
            req.insert_header(http::header::CONTENT_LENGTH, body.len.to_string())?;
        }
        // An empty body's Content-Length the client repeated (`0, 0`, or two identical
        // headers) goes as one.
        (None, Some(n)) if req.headers.contains_key(http::header::CONTENT_LENGTH) => {
            req.insert_header(http::header::CONTENT_LENGTH, n.to_string())?;
        }
        (None, _) => {}
    }
    if !upload.no_probe_headers {
        req.remove_header(PROBE_HEADER);
        req.remove_header(PROBE_BACKEND_HEADER);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_len_is_the_length_written() {
        for u in [
            "/",
            "/pay?txn=1",
            "/a%20b?x=%01&y",
            "*",
            "http://iis.example:8080/pay?txn=1",
            "https://iis.example",
            "iis.example:443",
            "/?",
        ] {
            let uri: http::Uri = u.parse().expect("uri");
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{u}");
        }
    }

    /// The settings of a minimal config, with a 2,048-byte header and a 100-byte body limit.
    fn settings() -> Settings {
        let text = "[admission]\nmax_inflight = 1\n[[backend]]\naddress = \"127.0.0.1:9\"\n";
        let cfg = crate::config::Config::parse(text, None, &Default::default()).expect("valid");
        let mut s = Settings::new(&cfg, &crate::ghost::Conns::new());
        s.max_header_bytes = 2048;
        s.max_body_bytes = 100;
        s
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/pay", None).expect("request");
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    /// A client's own probe headers (forged: a real probe never goes upstream with them) never
    /// reach the backend; a request without them is sent as it came.
    #[test]
    fn probe_headers_are_removed_on_the_way_to_the_backend() {
        for forged in [
            vec![("X-Sluice-Probe", "guess")],
            vec![("x-sluice-probe-backend", "0")],
            vec![
                ("Accept", "*/*"),
                ("X-SLUICE-PROBE", "a"),
                ("X-Sluice-Probe-Backend", "1"),
            ],
        ] {
            let mut r = req(&forged);
            assert!(!without_probe_headers(&r), "{forged:?}");
            let upload = Upload {
                no_probe_headers: without_probe_headers(&r),
                ..Upload::default()
            };
            rewrite_upstream(&mut r, None, &upload).expect("rewrite");
            assert!(
                !r.headers.contains_key(PROBE_HEADER)
                    && !r.headers.contains_key(PROBE_BACKEND_HEADER),
                "{forged:?} left {:?}",
                r.headers
            );
        }
        let mut plain = req(&[("Accept", "*/*"), ("X-Sluice-Probably", "no")]);
        assert!(without_probe_headers(&plain));
        let upload = Upload {
            no_probe_headers: true,
            ..Upload::default()
        };
        rewrite_upstream(&mut plain, None, &upload).expect("rewrite");
        assert_eq!(plain.headers.len(), 2, "{:?}", plain.headers);
    }

    fn validate_parsed(
        req: &RequestHeader,
        s: &Settings,
    ) -> std::result::Result<Option<u64>, Invalid> {
        validate(req, None, s)
    }

    #[test]
    fn framing_and_size_rules() {
        let s = settings();
        assert_eq!(
            validate_parsed(&req(&[("content-length", "10")]), &s),
            Ok(Some(10))
        );
        assert_eq!(
            validate_parsed(&req(&[("content-length", "10, 10")]), &s),
            Ok(Some(10))
        );
        assert_eq!(
            validate_parsed(&req(&[("transfer-encoding", "chunked")]), &s),
            Ok(None)
        );
        assert!(matches!(
            validate_parsed(
                &req(&[("content-length", "10"), ("content-length", "11")]),
                &s
            ),
            Err(Invalid::Framing(_))
        ));
        assert!(matches!(
            validate_parsed(&req(&[("transfer-encoding", "gzip, chunked")]), &s),
            Err(Invalid::Framing(_))
        ));
        assert!(matches!(
            validate_parsed(&req(&[("content-length", "+5")]), &s),
            Err(Invalid::Framing(_))
        ));
        assert_eq!(
            validate_parsed(&req(&[("content-length", "101")]), &s),
            Err(Invalid::BodyTooLarge)
        );
        let pad = "a".repeat(3000);
        assert_eq!(
            validate_parsed(&req(&[("x-pad", &pad)]), &s),
            Err(Invalid::HeaderTooLarge)
        );
    }

    #[test]
    fn content_length_hidden_by_the_parser_is_still_refused() {
        let s = settings();
        let te = req(&[("transfer-encoding", "chunked")]);
        let raw = b"POST /pay HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            validate(&te, Some(raw), &s),
            Err(Invalid::Framing(_))
        ));
        let raw = b"POST /pay HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(validate(&te, Some(raw), &s), Ok(None));
    }

    fn get(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/pay?txn=1", None).expect("request");
        r.set_version(version);
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    #[test]
    fn host_rules() {
        use http::Version;
        let host = [("host", "pos")];
        assert_eq!(
            check_request(&get(Version::HTTP_11, &host), None, None),
            Ok(())
        );
        assert!(matches!(
            check_request(&get(Version::HTTP_11, &[]), None, None),
            Err(Invalid::Malformed(_))
        ));
        assert_eq!(
            check_request(&get(Version::HTTP_10, &[]), None, None),
            Ok(())
        );
        assert!(matches!(
            check_request(
                &get(Version::HTTP_10, &[("host", "a"), ("host", "b")]),
                None,
                None
            ),
            Err(Invalid::Malformed(_))
        ));
    }

    /// The one-pass target check says what the two checks it replaced say: every target of up
    /// to four bytes over an alphabet of escapes, hex digits and control characters.
    #[test]
    fn bad_target_is_a_control_a_space_or_an_escaped_control() {
        let alphabet = b"%017fFad/ \0\x7f\r";
        let mut targets: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = targets
                .iter()
                .filter(|t| t.len() == targets.last().map_or(0, Vec::len))
                .flat_map(|t| {
                    alphabet.iter().map(move |&b| {
                        let mut t = t.clone();
                        t.push(b);
                        t
                    })
                })
                .collect();
            targets.extend(longer);
        }
        assert!(targets.len() > 10_000);
        for t in &targets {
            let two_pass = t.iter().any(|&b| is_control(b) || b == b' ') || has_escaped_control(t);
            assert_eq!(bad_target(t), two_pass, "{t:?}");
        }
    }

    #[test]
    fn request_line_rules() {
        let r = get(http::Version::HTTP_11, &[("host", "pos")]);
        let ok: &[&[u8]] = &[
            b"GET /pay?txn=1 HTTP/1.1\r\n",
            b"GET /pay?txn=1 HTTP/1.1\n",
            b"GET /a%20b%41 HTTP/1.1\r\n",
        ];
        for line in ok {
            assert_eq!(check_request(&r, None, Some(line)), Ok(()), "{line:?}");
        }
        let bad: &[&[u8]] = &[
            b"GET /a b HTTP/1.1\r\n",
            b"GET /a\0b HTTP/1.1\r\n",
            b"GET /a\rb HTTP/1.1\r\n",
            b"GET /a\x01b HTTP/1.1\r\n",
            b"GET /a\x7fb HTTP/1.1\r\n",
            b"GET /a\tb HTTP/1.1\r\n",
            b"GET  /a HTTP/1.1\r\n",
        ];
        for line in bad {
            assert!(
                matches!(
                    check_request(&r, None, Some(line)),
                    Err(Invalid::Malformed(_))
                ),
                "{line:?}"
            );
        }
        // What pingora's parser leaves of a raw control character: its escape.
        for raw in [
            &b"GET /a%00b HTTP/1.1\r\nHost: pos\r\n\r\n"[..],
            b"GET /a%0db HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /a%1F HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /a%7f HTTP/1.1\r\nHost: pos\r\n\r\n",
        ] {
            assert!(
                matches!(
                    check_request(&r, Some(raw), None),
                    Err(Invalid::Malformed(_))
                ),
                "{raw:?}"
            );
        }
        for raw in [
            &b"GET /a%20b HTTP/1.1\r\nHost: pos\r\n\r\n"[..],
            b"GET /a%2 HTTP/1.1\r\nHost: pos\r\n\r\n",
            b"GET /%e2%82%ac HTTP/1.1\r\nHost: pos\r\n\r\n",
        ] {
            assert_eq!(check_request(&r, Some(raw), None), Ok(()), "{raw:?}");
        }
    }

    #[test]
    fn keepalive_and_http10_framing() {
        use http::Version;
        assert!(client_wants_keepalive(&get(Version::HTTP_11, &[])));
        assert!(!client_wants_keepalive(&get(Version::HTTP_10, &[])));
        assert!(client_wants_keepalive(&get(
            Version::HTTP_10,
            &[("connection", "Keep-Alive")]
        )));
        let mut chunked = ResponseHeader::build(200, None).expect("response");
        chunked
            .insert_header("transfer-encoding", "chunked")
            .expect("te");
        assert!(frame_for_http10(&mut chunked, false), "no length: close");
        assert!(!chunked.headers.contains_key("transfer-encoding"));
        let mut sized = ResponseHeader::build(200, None).expect("response");
        sized.insert_header("content-length", "3").expect("cl");
        assert!(!frame_for_http10(&mut sized, false), "a length: may keep");
        let mut head = ResponseHeader::build(200, None).expect("response");
        head.insert_header("transfer-encoding", "chunked")
            .expect("te");
        assert!(!frame_for_http10(&mut head, true), "HEAD has no body");
        assert!(!head.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn raw_header_scan() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n";
        assert!(raw_has_header(raw, b"content-length"));
        assert!(!raw_has_header(raw, b"transfer-encoding"));
        assert!(!raw_has_header(
            b"GET /content-length: HTTP/1.1\r\n\r\n",
            b"content-length"
        ));
    }
}
