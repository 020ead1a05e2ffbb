//! End-to-end: HTTP/1.0 terminals and strict request parsing.
//!
//! - An HTTP/1.0 client never gets a chunked answer: a chunked or close-delimited backend answer
//!   reaches it de-chunked and close-delimited, with `Connection: close`, and the connection
//!   closes after it; a `Content-Length` answer keeps a connection the client asked to keep.
//!   An HTTP/1.1 client still gets chunked answers on a kept connection. Backend connections
//!   stay pooled after answers with a length, never after a close-delimited one.
//! - An HTTP/1.0 request without `Host` reaches the backend with one.
//! - An HTTP/1.1 request without `Host`, a target with a space or a control character: `400`,
//!   connection closed, nothing at the backend. A repeated identical `Content-Length` reaches
//!   the backend once.

mod common;

use std::time::Duration;

use common::{emulator_and_proxy, start, NO_RAMP_NO_CHECKS};
use sluice_tests::client::{Conn, Response};
use sluice_tests::emulator::{Emulator, EmulatorConfig};

/// A 1 ms emulator behind sluice with a cap of 4 and a queue of 100 (10 s), nothing else set.
async fn fast_backend_and_proxy() -> (Emulator, sluice::run::RunningProxy) {
    emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(10),
        "",
    )
    .await
}

/// The count of requests sluice counted as `bad_request`.
fn bad_requests(proxy: &sluice::run::RunningProxy) -> u64 {
    let text = proxy.shared().metrics.render(proxy.admission());
    text.lines()
        .filter(|l| {
            l.starts_with("sluice_requests_total{") && l.contains("outcome=\"bad_request\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Send raw bytes on a new connection and read one response.
async fn exchange(conn: &mut Conn, raw: &str) -> Response {
    conn.send_raw(raw.as_bytes()).await.expect("send");
    conn.read_response().await.expect("response")
}

/// An HTTP/1.0 GET of transaction `id`, answered with the given backend framing.
fn get10(id: &str, framing: &str, keep_alive: bool) -> String {
    let conn = if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        ""
    };
    format!("GET /pay?txn={id} HTTP/1.0\r\nX-Framing: {framing}\r\n{conn}\r\n")
}

fn assert_not_chunked(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}");
    assert_eq!(
        r.header("transfer-encoding"),
        None,
        "{what}: chunked to 1.0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_never_get_chunked_and_close_as_rfc9112_says() {
    let (emu, proxy) = fast_backend_and_proxy().await;
    let addr = proxy.addr();
    for framing in ["chunked", "close"] {
        // Without keep-alive: the whole body, then the connection closes.
        let id = format!("a-{framing}");
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = exchange(&mut c, &get10(&id, framing, false)).await;
        assert_not_chunked(&r, &id);
        assert_eq!(r.body, format!("ok {id}\n").as_bytes(), "{id}: exact body");
        assert_eq!(r.header("connection"), Some("close"), "{id}");
        assert!(c.is_closed_by_peer().await, "{id}: connection closed");

        // With keep-alive: no length to keep it by, so close after the whole body.
        let id = format!("k-{framing}");
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = exchange(&mut c, &get10(&id, framing, true)).await;
        assert_not_chunked(&r, &id);
        assert_eq!(r.body, format!("ok {id}\n").as_bytes(), "{id}: exact body");
        assert_eq!(r.header("connection"), Some("close"), "{id}");
        assert!(c.is_closed_by_peer().await, "{id}: connection closed");
    }

    // A Content-Length answer: relayed as is; kept only when the client asked.
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = exchange(&mut c, &get10("l-1", "length", true)).await;
    assert_not_chunked(&r, "l-1");
    assert_eq!(r.header("content-length"), Some("7"));
    assert_eq!(r.body, b"ok l-1\n");
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let r = exchange(&mut c, &get10("l-2", "length", true)).await;
    assert_eq!(
        r.body, b"ok l-2\n",
        "a second request on the kept connection"
    );
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = exchange(&mut c, &get10("l-3", "length", false)).await;
    assert_eq!(r.body, b"ok l-3\n");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        c.is_closed_by_peer().await,
        "1.0 without keep-alive is closed"
    );

    // HTTP/1.1 still gets chunked, on a kept connection.
    let mut c = Conn::connect(addr).await.expect("connect");
    for id in ["h11-1", "h11-2"] {
        let r = exchange(
            &mut c,
            &format!("GET /pay?txn={id} HTTP/1.1\r\nHost: pos\r\nX-Framing: chunked\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{id}");
        assert_eq!(r.body, format!("ok {id}\n").as_bytes());
    }
    assert_eq!(emu.stats().bad_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_reused_after_answers_with_a_length_only() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        1,
        100,
        Duration::from_secs(10),
        "",
    )
    .await;
    let addr = proxy.addr();
    // One at a time (cap 1), each from a new HTTP/1.0 client without keep-alive.
    let mut framings = ["chunked", "length"].repeat(8);
    framings[5] = "close";
    framings[11] = "close";
    for (i, framing) in framings.iter().enumerate() {
        let id = format!("p-{i}");
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = exchange(&mut c, &get10(&id, framing, false)).await;
        assert_eq!(r.body, format!("ok {id}\n").as_bytes(), "{id}");
        assert!(c.is_closed_by_peer().await, "{id}");
    }
    let seen = emu.seen();
    assert_eq!(seen.len(), framings.len());
    let mut reused = 0;
    for (i, pair) in seen.windows(2).enumerate() {
        let same = pair[0].conn == pair[1].conn;
        if framings[i] == "close" {
            assert!(
                !same,
                "request {} sent on a close-delimited answer's connection",
                i + 1
            );
        } else if same {
            reused += 1;
        }
    }
    // Closing the client's connection must not close the backend's: after an answer with a
    // length (chunked or Content-Length) the next request may reuse it. Not every time:
    // pingora 0.9 loses pooled connections to a race with its idle poller (pingora#998, see
    // Known limits); measured on a loaded 2-core machine, 0 to 6 of 7 reuses, the same for
    // HTTP/1.1 clients sending `Connection: close` before this change. A 1.0 answer that
    // closed the backend connection would make it 0 of 13.
    assert!(
        reused >= 1,
        "backend connections reused after answers with a length: {reused} of 13"
    );
}

/// An HTTP/1.1 client that says `Connection: close` is answered with it, and its connection
/// closes after the answer (sluice sets its own keep-alive timeout on every kept-alive
/// connection; that must not keep this one open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_connection_close_is_answered_with_close() {
    let (emu, proxy) = fast_backend_and_proxy().await;
    let mut c = Conn::connect(proxy.addr()).await.expect("connect");
    let r = exchange(
        &mut c,
        "GET /pay?txn=c-1 HTTP/1.1\r\nHost: pos\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.keep_alive(), "answered with Connection: close");
    assert!(
        c.is_closed_by_peer_within(Duration::from_secs(2)).await,
        "closed after the answer"
    );
    // Without it, the same request keeps the connection.
    let mut k = Conn::connect(proxy.addr()).await.expect("connect");
    let r = exchange(&mut k, "GET /pay?txn=k-1 HTTP/1.1\r\nHost: pos\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert!(r.keep_alive(), "kept alive by default");
    assert_eq!(emu.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_without_host_reaches_the_backend_with_one() {
    // No `host` setting: the backend's address.
    let (emu, proxy) = fast_backend_and_proxy().await;
    let mut c = Conn::connect(proxy.addr()).await.expect("connect");
    let r = exchange(&mut c, &get10("h-1", "length", false)).await;
    assert_eq!(r.status, 200);
    let seen = emu.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, 1, "forwarded as HTTP/1.1");
    assert_eq!(
        seen[0].host.as_deref(),
        Some(emu.addr().to_string().as_str())
    );

    // A `host` setting: that.
    let emu = Emulator::start(EmulatorConfig::default())
        .await
        .expect("emulator");
    let cfg = common::farm_config(&format!(
        "{NO_RAMP_NO_CHECKS}[admission]\nmax_inflight = 4\n[[backend]]\nname = \"iis\"\naddress = \"{}\"\nhost = \"pos.example.com\"\n",
        emu.addr()
    ));
    let proxy2 = start(&cfg);
    let mut c = Conn::connect(proxy2.addr()).await.expect("connect");
    let r = exchange(&mut c, &get10("h-2", "chunked", false)).await;
    assert_eq!(r.body, b"ok h-2\n");
    let seen = emu.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].host.as_deref(), Some("pos.example.com"));
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_the_backend() {
    let (emu, proxy) = fast_backend_and_proxy().await;
    let addr = proxy.addr();
    let cases: &[(&str, &[u8])] = &[
        (
            "HTTP/1.1 without Host",
            b"GET /pay?txn=m1 HTTP/1.1\r\nX-Txn-Id: m1\r\n\r\n",
        ),
        (
            "space in the target",
            b"GET /pay?txn=m2 x HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
        (
            "NUL in the target",
            b"GET /pay?txn=m3\0x HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
        (
            "bare CR in the target",
            b"GET /pay?txn=m4\rx HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
        (
            "control character in the target",
            b"GET /pay?txn=m5\x01x HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
        (
            "DEL in the target",
            b"GET /pay?txn=m6\x7fx HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
        (
            "escaped control character in the target",
            b"GET /pay?txn=m7%00x HTTP/1.1\r\nHost: pos\r\n\r\n",
        ),
    ];
    let before = bad_requests(&proxy);
    for (what, raw) in cases {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(raw).await.expect("send");
        let r = c.read_response().await.expect("response");
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(c.is_closed_by_peer().await, "{what}: connection closed");
    }
    assert_eq!(
        bad_requests(&proxy) - before,
        cases.len() as u64,
        "each counted as bad_request"
    );
    // Nothing reached the backend, in any form.
    assert_eq!(emu.seen(), Vec::new());
    assert_eq!(emu.transactions(), Vec::<String>::new());
    assert_eq!(emu.stats().requests, 0);

    // A client's own escape that is not a control character still passes.
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = exchange(&mut c, "GET /pay?txn=ok%20x HTTP/1.1\r\nHost: pos\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(emu.seen()[0].path, "/pay?txn=ok%20x");
    // The same check on the kept-alive connection's next request, whose request line sluice
    // takes from the bytes it read while waiting for it.
    c.send_raw(b"GET /pay?txn=m8 x HTTP/1.1\r\nHost: pos\r\n\r\n")
        .await
        .expect("send");
    let r = c.read_response().await.expect("response");
    assert_eq!(r.status, 400, "space in a kept-alive request: {}", r.text());
    assert_eq!(
        emu.seen().len(),
        1,
        "only the good request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_identical_content_length_reaches_the_backend_once() {
    let (emu, proxy) = fast_backend_and_proxy().await;
    let addr = proxy.addr();
    for (id, cl) in [
        ("cl-two", "Content-Length: 3\r\nContent-Length: 3\r\n"),
        ("cl-list", "Content-Length: 3, 3\r\n"),
    ] {
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = exchange(
            &mut c,
            &format!("POST /pay HTTP/1.1\r\nHost: pos\r\nX-Txn-Id: {id}\r\n{cl}\r\nabc"),
        )
        .await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.txn_id(), Some(id));
    }
    let seen = emu.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.content_lengths, vec!["3".to_string()], "{:?}", s.txn);
    }
    // Conflicting values stay refused.
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = exchange(
        &mut c,
        "POST /pay HTTP/1.1\r\nHost: pos\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(emu.seen().len(), 2);
}
