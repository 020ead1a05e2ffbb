//! End-to-end: protections against clients. A client trickling its request header is cut off
//! at the header deadline while others are served; a slow request body is received before
//! admission, so it never holds a backend slot, and is refused with 408 when it stalls; the
//! client connection caps (total and per client IP) answer 503 and close; an exchange past
//! the request deadline is cut and its slot is released.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{
    assert_full_capacity, config_with, emulator_and_proxy, eventually, metric, start,
    NO_RAMP_NO_CHECKS,
};
use sluice_tests::client::{Conn, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Trickle a request header, one short line every 100 ms (at most 100 lines), until the proxy
/// answers or closes the connection; returns how long the connection lived after `since`, and
/// the status of the answer, if one came.
async fn trickle(mut c: Conn, first: &str, since: Instant) -> (Duration, Option<u16>) {
    if c.send_raw(first.as_bytes()).await.is_err() {
        return (since.elapsed(), None);
    }
    for k in 0..100 {
        if c.send_raw(format!("X-Pad-{k}: a\r\n").as_bytes())
            .await
            .is_err()
            || c.is_closed_by_peer_within(Duration::from_millis(100)).await
        {
            return (since.elapsed(), None);
        }
        if c.has_unread_data() {
            let lived = since.elapsed();
            let status = c.read_response().await.ok().map(|r| r.status);
            assert!(c.is_closed_by_peer().await, "closed after the answer");
            return (lived, status);
        }
    }
    panic!("a trickling client was never cut off");
}

/// Slowloris: 20 clients trickle their headers (one on a connection that already served a
/// request); each is cut off at the 1 s header deadline with a `408` and a close, none reaches
/// the backend, and a normal client keeps getting its own answers the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_deadline_while_others_are_served() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(5),
        "[proxy]\nclient_header_timeout = \"1s\"\n",
    )
    .await;
    let addr = proxy.addr();
    let mut lorises = Vec::new();
    for i in 0..19 {
        lorises.push(tokio::spawn(async move {
            let c = Conn::connect(addr).await.expect("connect");
            let started = Instant::now();
            let first = format!("GET /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: loris-{i}\r\n");
            trickle(c, &first, started).await
        }));
    }
    // On a kept-alive connection, the deadline counts from the next request's first byte.
    lorises.push(tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c.send(&Request::get("/pay").txn("before-loris")).await;
        assert_eq!(r.expect("first request").status, 200);
        let started = Instant::now();
        trickle(
            c,
            "GET /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: loris-ka\r\n",
            started,
        )
        .await
    }));

    // A normal client, served throughout.
    let normal = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        let mut served = 0;
        for i in 0..40 {
            let id = format!("normal-{i}");
            let r = c
                .send(&Request::get("/pay").txn(&id))
                .await
                .expect("answer");
            assert_eq!(r.status, 200, "{id}");
            assert_eq!(r.txn_id(), Some(id.as_str()));
            served += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        served
    });

    for l in lorises {
        let (lived, status) = l.await.expect("loris task");
        assert!(
            lived >= Duration::from_millis(900) && lived < Duration::from_secs(4),
            "a trickling client must be cut off at the 1 s header deadline, lived {lived:?}"
        );
        assert_eq!(status, Some(408), "a client cut off mid-header is told why");
    }
    assert_eq!(normal.await.expect("normal client"), 40);
    let seen = emu.transactions();
    assert!(
        !seen.iter().any(|t| t.starts_with("loris")),
        "a trickled request reached the backend: {seen:?}"
    );
    assert_eq!(
        metric(&proxy, "sluice_client_timeouts_total{phase=\"header\"}"),
        Some(20)
    );
}

/// A slow request body is received before admission: while one client stalls in its body,
/// the single backend slot keeps serving others (their queue timeout is shorter than the
/// stall), the staller gets 408 at the body deadline, and its payment never reaches the
/// backend. `Expect: 100-continue` is answered by sluice itself, and chunked bodies are
/// buffered up to 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_never_holds_a_backend_slot() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        1,
        100,
        Duration::from_millis(300),
        "[proxy]\nclient_body_timeout = \"1s\"\n",
    )
    .await;
    let addr = proxy.addr();

    let slow = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(
            b"POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: slow-body\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await
        .expect("send");
        let r = c.read_response().await.expect("an answer");
        (r.status, r.keep_alive(), c.is_closed_by_peer().await)
    });
    // Payments keep flowing through the one slot while the slow body stalls (a held slot
    // would make them wait past their 300 ms queue timeout and get 503).
    let mut served = 0;
    for i in 0..200 {
        let id = format!("pay-{i}");
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c
            .send(&Request::post("/pay", "amount=1").txn(&id))
            .await
            .expect("answer");
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.txn_id(), Some(id.as_str()));
        served += 1;
        if slow.is_finished() && served >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(slow.is_finished(), "the slow body was never refused");
    let (status, keep_alive, closed) = slow.await.expect("slow client");
    assert_eq!(status, 408);
    assert!(!keep_alive && closed, "a 408 closes the connection");
    assert!(!emu.transactions().iter().any(|t| t == "slow-body"));
    assert_eq!(emu.stats().max_inside, 1);
    assert_eq!(
        metric(&proxy, "sluice_client_timeouts_total{phase=\"body\"}"),
        Some(1)
    );

    // Expect: 100-continue: sluice answers 100 before the body is sent.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: expect\r\nContent-Length: 8\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("send");
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue before the body")
        .expect("read");
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"amount=1").await.expect("body");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&rest).contains("expect") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    });
    read.await.expect("final response");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("100 Continue"), "one 100 only: {text}");

    // Chunked: up to 64 KiB is buffered and forwarded; beyond it, 413 and nothing forwarded.
    for (id, size, want) in [("chunked-ok", 60_000, 200), ("chunked-big", 70_000, 413)] {
        let mut raw = format!(
            "POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: {id}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for part in [size / 2, size - size / 2] {
            raw.extend_from_slice(format!("{part:x}\r\n").as_bytes());
            raw.extend(std::iter::repeat_n(b'a', part));
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(&raw).await.expect("send");
        let r = c.read_response().await.expect("answer");
        assert_eq!(r.status, want, "{id}: {}", r.text());
        assert_eq!(emu.transactions().iter().any(|t| t == id), want == 200);
    }
}

/// `max_connections`: one connection over the cap gets 503 + Retry-After + Connection: close
/// and is closed; closing one frees its place. `max_connections_per_ip`: a third connection
/// from one address is refused while another address is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_with_503_and_free_on_close() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(5),
        "[proxy]\nmax_connections = 4\n",
    )
    .await;
    let addr = proxy.addr();
    let mut open = Vec::new();
    for i in 0..4 {
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c.send(&Request::get("/pay").txn(format!("c{i}"))).await;
        assert_eq!(r.expect("served").status, 200);
        open.push(c);
    }
    assert_eq!(metric(&proxy, "sluice_client_connections"), Some(4));
    let mut over = Conn::connect(addr).await.expect("connect");
    let r = over
        .send(&Request::get("/pay").txn("over"))
        .await
        .expect("a 503, not a reset");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(!r.keep_alive());
    assert!(over.is_closed_by_peer().await);
    assert!(!emu.transactions().iter().any(|t| t == "over"));
    assert_eq!(
        metric(
            &proxy,
            "sluice_client_connections_refused_total{reason=\"max_connections\"}"
        ),
        Some(1)
    );
    // The kept-alive connections are still served.
    for c in &mut open {
        assert_eq!(
            c.send(&Request::get("/pay")).await.expect("served").status,
            200
        );
    }
    drop(open.pop());
    eventually(
        "a closed connection is uncounted",
        Duration::from_secs(5),
        || metric(&proxy, "sluice_client_connections") == Some(3),
    )
    .await;
    let mut again = Conn::connect(addr).await.expect("connect");
    assert_eq!(
        again
            .send(&Request::get("/pay"))
            .await
            .expect("served")
            .status,
        200
    );
    drop((open, again));

    let proxy = start(&config_with(
        emu.addr(),
        4,
        100,
        Duration::from_secs(5),
        &format!("{NO_RAMP_NO_CHECKS}[proxy]\nmax_connections_per_ip = 2\n"),
    ));
    let addr = proxy.addr();
    let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let b = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let t = Duration::from_secs(5);
    let mut from_a = Vec::new();
    for _ in 0..2 {
        let mut c = Conn::connect_from(a, addr, t).await.expect("connect");
        assert_eq!(
            c.send(&Request::get("/pay")).await.expect("served").status,
            200
        );
        from_a.push(c);
    }
    let mut third = Conn::connect_from(a, addr, t).await.expect("connect");
    let r = third.send(&Request::get("/pay")).await.expect("a 503");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("this address"), "{}", r.text());
    let mut other = Conn::connect_from(b, addr, t).await.expect("connect");
    assert_eq!(
        other
            .send(&Request::get("/pay"))
            .await
            .expect("served")
            .status,
        200
    );
    assert_eq!(
        metric(
            &proxy,
            "sluice_client_connections_refused_total{reason=\"max_connections_per_ip\"}"
        ),
        Some(1)
    );
}

/// `request_timeout`: an exchange still running past it is cut (the client's connection
/// closes without an answer); its slot stays taken for `upstream.timeout_hold`, since the
/// backend is still working on it, and is then released: the whole cap is available after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_past_the_request_deadline_is_cut_and_its_slot_held_then_released() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        2,
        100,
        Duration::from_millis(500),
        "[proxy]\nrequest_timeout = \"1s\"\n[upstream]\ntimeout_hold = \"1s\"\n",
    )
    .await;
    let addr = proxy.addr();
    let mut c = Conn::connect(addr).await.expect("connect");
    let started = Instant::now();
    let r = c
        .send(
            &Request::get("/slow")
                .txn("too-slow")
                .header("X-Service-Time", "4s"),
        )
        .await;
    assert!(r.is_err(), "no answer past the request deadline: {r:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut at the 1 s request deadline, took {took:?}"
    );
    assert_eq!(
        metric(&proxy, "sluice_client_timeouts_total{phase=\"request\"}"),
        Some(1)
    );
    assert_eq!(
        proxy.admission().snapshot().backends[0].inflight,
        1,
        "the cut exchange's slot is held while the backend works"
    );
    assert_full_capacity(
        addr,
        proxy.admission(),
        &emu.handle(),
        2,
        Duration::from_secs(5),
    )
    .await;
}

/// HTTP/1.1 pipelining: a client that sends its next request before reading the answer gets
/// both answers, in order, each with its own id, on the same connection, whether the second
/// request arrives with the first, while the first waits in the queue, or while the first is
/// at the backend. The second never overtakes the first, so the cap (1 here) holds; and bytes
/// arriving during an exchange never cut it short (which would free its slot while the backend
/// still works on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_within_the_cap() {
    let (emu, proxy) =
        emulator_and_proxy(Duration::from_millis(1), 1, 100, Duration::from_secs(5), "").await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();
    for case in ["together", "queued", "in-flight"] {
        let mut blocker = None;
        if case == "queued" {
            // Hold the one slot, so the pipelining client waits in the queue.
            let mut b = Conn::connect(addr).await.expect("connect");
            b.send_raw(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Txn-Id: blocker\r\nX-Service-Time: 500ms\r\n\r\n")
                .await
                .expect("send");
            eventually("the blocker holds the slot", Duration::from_secs(5), || {
                admission.snapshot().backends[0].inflight == 1
            })
            .await;
            blocker = Some(b);
        }
        let mut c = Conn::connect(addr).await.expect("connect");
        let first = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Txn-Id: {case}-1\r\nX-Service-Time: 300ms\r\n\r\n"
        );
        let second = format!("GET /b HTTP/1.1\r\nHost: x\r\nX-Txn-Id: {case}-2\r\n\r\n");
        if case == "together" {
            c.send_raw(format!("{first}{second}").as_bytes())
                .await
                .expect("send");
        } else {
            c.send_raw(first.as_bytes()).await.expect("send");
            match case {
                "queued" => {
                    eventually("the first request waits", Duration::from_secs(5), || {
                        admission.snapshot().queued == 1
                    })
                    .await
                }
                _ => {
                    eventually(
                        "the first request is at the backend",
                        Duration::from_secs(5),
                        || emu.inside_now() == 1,
                    )
                    .await
                }
            }
            c.send_raw(second.as_bytes()).await.expect("send");
        }
        for n in 1..=2 {
            let r = c.read_response().await.expect("an answer");
            let id = format!("{case}-{n}");
            assert_eq!(r.status, 200, "{id}: {}", r.text());
            assert_eq!(r.txn_id(), Some(id.as_str()), "{case}: answers in order");
            assert!(r.keep_alive(), "{id}");
        }
        assert_eq!(
            c.send(&Request::get("/c").txn(format!("{case}-3")))
                .await
                .expect("reused")
                .status,
            200
        );
        if let Some(mut b) = blocker {
            assert_eq!(b.read_response().await.expect("blocker").status, 200);
        }
    }
    assert_eq!(emu.stats().max_inside, 1, "the cap holds");
}

/// `client_write_timeout`: a client that stops reading a large response holds the backend
/// slot only until a write to it has waited that long; then its connection is dropped and the
/// slot serves the next payment (whose queue timeout is far shorter than the request deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_frees_its_slot_after_the_write_timeout() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        1,
        100,
        Duration::from_secs(3),
        "[proxy]\nclient_write_timeout = \"500ms\"\n",
    )
    .await;
    let addr = proxy.addr();
    // 32 MiB answered to a client that never reads: the socket buffers fill and stay full.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(
            b"GET /big HTTP/1.1\r\nHost: x\r\nX-Txn-Id: big\r\nX-Pad-Bytes: 33554432\r\n\r\n",
        )
        .await
        .expect("send");
    let admission = proxy.admission().clone();
    eventually(
        "the stalled client holds the slot",
        Duration::from_secs(5),
        || admission.snapshot().backends[0].inflight == 1,
    )
    .await;
    let mut c = Conn::connect(addr).await.expect("connect");
    c.set_timeout(Duration::from_secs(10));
    let r = c
        .send(&Request::post("/pay", "amount=1").txn("next"))
        .await
        .expect("an answer");
    assert_eq!(r.status, 200, "the slot was freed: {}", r.text());
    assert_eq!(r.txn_id(), Some("next"));
    assert_eq!(emu.stats().max_inside, 1);
    drop(stalled);
}

/// After a second idle, a kept-alive connection gives pingora's stream up and waits for its
/// next request as a bare socket (`sluice_client_connections_parked`). Each parked connection
/// is served on the same connection when its next request comes, with its own answer, and
/// parks again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connections_park_and_are_served_on_the_same_connection() {
    const N: usize = 40;
    let (emu, proxy) =
        emulator_and_proxy(Duration::from_millis(1), 8, 100, Duration::from_secs(5), "").await;
    let parked = |proxy: &sluice::run::RunningProxy| {
        metric(proxy, "sluice_client_connections_parked").unwrap_or(0)
    };
    let mut conns = Vec::new();
    for i in 0..N {
        let mut c = Conn::connect(proxy.addr()).await.expect("connect");
        let r = c
            .send(&Request::get("/pay").txn(format!("first-{i}")))
            .await
            .expect("first answer");
        assert_eq!(r.status, 200);
        assert!(r.keep_alive(), "kept alive");
        conns.push(c);
    }
    eventually(
        "every idle connection parks",
        Duration::from_secs(10),
        || parked(&proxy) == N as u64,
    )
    .await;
    for round in ["second", "third"] {
        for (i, c) in conns.iter_mut().enumerate() {
            let txn = format!("{round}-{i}");
            let r = c
                .send(&Request::post("/pay", "amount=1").txn(&txn))
                .await
                .expect("served on the same connection");
            assert_eq!(r.status, 200);
            assert_eq!(r.txn_id(), Some(txn.as_str()), "its own answer");
            assert!(r.keep_alive(), "still kept alive");
        }
        eventually(
            "the connections park again",
            Duration::from_secs(10),
            || parked(&proxy) == N as u64,
        )
        .await;
    }
    let seen = emu.transactions();
    assert_eq!(seen.len(), 3 * N, "each request reached the backend once");
    for i in 0..N {
        for round in ["first", "second", "third"] {
            assert!(
                seen.contains(&format!("{round}-{i}")),
                "{round}-{i} reached the backend"
            );
        }
    }
    assert_eq!(
        metric(&proxy, "sluice_client_connections"),
        Some(N as u64),
        "no connection was replaced"
    );
    drop(conns);
    eventually(
        "closed parked connections are forgotten",
        Duration::from_secs(10),
        || parked(&proxy) == 0,
    )
    .await;
}
