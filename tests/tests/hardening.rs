//! End-to-end: bad input at both ends. Backend faults (reset, hang, truncated body, malformed
//! response, early close) fail only the request that met them, never process a payment twice,
//! and never leak a slot; ambiguous or oversized requests are refused before they reach the
//! backend; thousands of random aborts leave the full capacity available.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{emulator_and_proxy, eventually, metric, raise_fd_limit};
use sluice_tests::client::{Conn, Request};

/// Each kind of backend fault: the client gets a 5xx (never another client's answer), the
/// backend saw the POST exactly once, and the proxy serves the next request normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_faults_fail_one_request_and_never_repeat_a_payment() {
    // A hung request's slot is held briefly after its 504 (the backend may still work).
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(5),
        4,
        100,
        Duration::from_secs(10),
        "[upstream]\nread_timeout = \"500ms\"\ntimeout_hold = \"500ms\"\n",
    )
    .await;
    let admission = proxy.admission().clone();
    for fault in ["reset", "hang", "truncate", "malformed", "close"] {
        let id = format!("pay-{fault}");
        let mut c = Conn::connect(proxy.addr()).await.expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let r = c
            .send(
                &Request::post("/pay", "amount=1")
                    .txn(&id)
                    .header("X-Fault", fault),
            )
            .await;
        match fault {
            // `close` answers normally, then closes: a success.
            "close" => assert_eq!(r.expect("response").status, 200),
            _ => match r {
                Ok(resp) => {
                    assert!(
                        resp.status == 502 || resp.status == 504,
                        "{fault}: got {} {}",
                        resp.status,
                        resp.text()
                    );
                    assert_ne!(
                        resp.txn_id(),
                        Some(id.as_str()),
                        "{fault}: a broken answer passed"
                    );
                }
                // A truncated body can only be cut short: the client sees the connection end.
                Err(e) => assert_eq!(fault, "truncate", "{fault}: {e}"),
            },
        }
        let seen = emu.transactions();
        assert_eq!(
            seen.iter().filter(|t| **t == id).count(),
            1,
            "{fault}: the backend must see the payment exactly once"
        );
        eventually("the slot is released", Duration::from_secs(5), || {
            admission.snapshot().backends[0].inflight == 0
        })
        .await;
        let mut c = Conn::connect(proxy.addr()).await.expect("connect");
        let ok = c
            .send(&Request::get("/pay").txn(format!("after-{fault}")))
            .await
            .expect("next request");
        assert_eq!(ok.status, 200, "after {fault}");
        assert_eq!(ok.txn_id(), Some(format!("after-{fault}").as_str()));
    }
}

/// 200 concurrent clients while 10 % of backend responses are malformed: every other client
/// gets its own correct response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_responses_hurt_only_their_own_clients() {
    raise_fd_limit();
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(10),
        8,
        1000,
        Duration::from_secs(30),
        "",
    )
    .await;
    let addr = proxy.addr();
    let clients: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("m{i}");
                let mut req = Request::post("/pay", "amount=1").txn(&id);
                if i % 10 == 0 {
                    req = req.header("X-Fault", "malformed");
                }
                let mut c = Conn::connect(addr).await.expect("connect");
                (i, id, c.send(&req).await)
            })
        })
        .collect();
    let mut good = 0;
    for c in clients {
        let (i, id, r) = c.await.expect("join");
        let r = r.expect("every client gets an answer");
        if i % 10 == 0 {
            assert_eq!(r.status, 502, "{id}");
        } else {
            assert_eq!(r.status, 200, "{id}");
            assert_eq!(r.txn_id(), Some(id.as_str()), "{id} got another's response");
            assert_eq!(r.text(), format!("ok {id}\n"));
            good += 1;
        }
    }
    assert_eq!(good, 180);
    let seen = emu.transactions();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 200);
    assert_eq!(seen.len(), 200, "no payment processed twice");
    assert!(emu.stats().max_inside <= 8);
}

/// Ambiguous framing (the start of request smuggling) and oversized requests are refused with
/// 400 / 413 / 431 and never reach the backend; CR/LF/NUL in headers are refused; an
/// absolute-form target reaches the backend in origin-form; `Expect: 100-continue` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_oversized_requests_never_reach_the_backend() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(10),
        "[proxy]\nmax_header_bytes = 4096\nmax_body_bytes = 1000\n",
    )
    .await;
    let addr = proxy.addr();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Txn-Id: smuggled\r\n\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "CL.TE",
            format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: clte\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "TE.CL",
            format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: tecl\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "double CL",
            format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: dcl\r\nContent-Length: 5\r\nContent-Length: 60\r\n\r\nhello{smuggled}"),
            400,
        ),
        (
            "obfuscated TE",
            format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: xte\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "bad chunk size",
            format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: badchunk\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{smuggled}"),
            0,
        ),
        (
            "NUL in header",
            format!("GET /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: nul\r\nX-Evil: a\0b\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "bare LF in header value",
            "GET /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: lf\r\nX-Evil: a\nGET /smuggled HTTP/1.1\r\n\r\n".to_string(),
            400,
        ),
        (
            "body too large",
            "POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: big\r\nContent-Length: 5000\r\n\r\n".to_string(),
            413,
        ),
        (
            "header too large",
            format!("GET /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: bighead\r\nX-Pad: {}\r\n\r\n", "a".repeat(6000)),
            431,
        ),
    ];
    for (name, raw, want) in &cases {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.set_timeout(Duration::from_secs(5));
        c.send_raw(raw.as_bytes()).await.expect("send");
        match c.read_response().await {
            Ok(r) => {
                assert!(
                    r.status == *want || (*want == 0 && r.status >= 400),
                    "{name}: got {} {}",
                    r.status,
                    r.text()
                );
                assert!(!r.keep_alive(), "{name}: the connection must close");
            }
            // Refused by closing the connection (a body that cannot be parsed).
            Err(_) => assert_eq!(*want, 0, "{name}: no response"),
        }
        // Nothing more comes on this connection: the smuggled request was not answered.
        assert!(
            c.is_closed_by_peer().await,
            "{name}: the connection must be closed"
        );
    }
    let seen = emu.transactions();
    for id in [
        "smuggled", "clte", "tecl", "dcl", "xte", "nul", "lf", "big", "bighead",
    ] {
        assert!(
            !seen.iter().any(|t| t == id),
            "{id} reached the backend: {seen:?}"
        );
    }

    // Absolute-form target: forwarded in origin-form.
    let mut c = Conn::connect(addr).await.expect("connect");
    c.send_raw(b"GET http://pos.example/pay?txn=abs HTTP/1.1\r\nHost: pos.example\r\nX-Txn-Id: abs\r\n\r\n")
        .await
        .expect("send");
    let r = c.read_response().await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.txn_id(), Some("abs"));
    // Expect: 100-continue with a body.
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = c
        .send(
            &Request::post("/pay", "amount=1")
                .txn("expect")
                .header("Expect", "100-continue"),
        )
        .await
        .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.txn_id(), Some("expect"));
}

/// 10,000 clients that abort at random moments (before, while queued, while at the backend):
/// afterwards every slot is free and `max_inflight` slow requests reach the backend together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_aborts_leave_full_capacity() {
    raise_fd_limit();
    let cap = 8u32;
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(3),
        cap,
        5000,
        Duration::from_secs(30),
        "",
    )
    .await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();
    // A small deterministic generator: reproducible "random" abort moments.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for batch in 0..20 {
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let r = next();
                tokio::spawn(async move {
                    let Ok(mut c) = Conn::connect(addr).await else {
                        return;
                    };
                    let id = format!("abort-{batch}-{i}");
                    match r % 4 {
                        // Connect and leave.
                        0 => {}
                        // Half a request.
                        1 => {
                            let _ = c.send_raw(b"GET /pay HTTP/1.1\r\nHost: x\r\n").await;
                        }
                        // A whole request, then leave after a random moment.
                        _ => {
                            let _ = c.send_raw(&Request::get("/pay").txn(&id).encode("x")).await;
                            tokio::time::sleep(Duration::from_micros(r % 20_000)).await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
    common::assert_full_capacity(
        addr,
        &admission,
        &emu.handle(),
        cap,
        Duration::from_secs(60),
    )
    .await;
}

/// An idle kept-alive client connection is closed after `proxy.client_keepalive_timeout`; one
/// that sends its next request in time is served on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_close_after_the_keepalive_timeout() {
    let (_emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(10),
        "[proxy]\nclient_keepalive_timeout = \"1s\"\n",
    )
    .await;
    let mut c = Conn::connect(proxy.addr()).await.expect("connect");
    for i in 0..3 {
        let r = c
            .send(&Request::get("/pay").txn(format!("k{i}")))
            .await
            .expect("kept alive");
        assert_eq!(r.txn_id(), Some(format!("k{i}").as_str()));
    }
    let started = std::time::Instant::now();
    assert!(
        c.is_closed_by_peer_within(Duration::from_secs(5)).await,
        "an idle connection must be closed"
    );
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(900),
        "closed too early: {idle:?}"
    );
}

/// After an upstream timeout the backend is still working on the request: its slot stays taken
/// for `upstream.timeout_hold`, so new requests never join that leftover work above the cap.
/// (Releasing at the 504 would put 3 requests inside a backend capped at 2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_keeps_the_slot_while_the_backend_still_works() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(5),
        2,
        100,
        Duration::from_secs(10),
        "[upstream]\nread_timeout = \"300ms\"\ntimeout_hold = \"2s\"\n",
    )
    .await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = c
        .send(
            &Request::post("/pay", "amount=1")
                .txn("slow-payment")
                .header("X-Service-Time", "1500ms"),
        )
        .await
        .expect("an answer");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(emu.inside_now(), 1, "the backend is still working on it");
    assert_eq!(
        admission.snapshot().backends[0].inflight,
        1,
        "its slot is still taken"
    );
    // Two more requests at once: only one fits beside the leftover work.
    emu.reset_stats();
    let more: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Conn::connect(addr).await.expect("connect");
                c.set_timeout(Duration::from_secs(10));
                let r = c
                    .send(
                        &Request::get("/pay")
                            .txn(format!("after-{i}"))
                            .header("X-Service-Time", "200ms"),
                    )
                    .await
                    .expect("an answer");
                r.status
            })
        })
        .collect();
    for m in more {
        assert_eq!(m.await.expect("client"), 200);
    }
    assert!(
        emu.stats().max_inside <= 2,
        "cap 2 with the leftover work counted: {:?}",
        emu.stats()
    );
    // The hold ends: the whole cap is free again.
    eventually("the held slot is released", Duration::from_secs(5), || {
        admission.snapshot().backends[0].inflight == 0
    })
    .await;
}

/// `sluice_ghost_requests_total` for the backend at `emu` and this end (0 before the first).
fn ghosts(proxy: &sluice::RunningProxy, emu: &sluice_tests::emulator::Emulator, end: &str) -> u64 {
    let sample = format!(
        "sluice_ghost_requests_total{{backend=\"{}\",end=\"{end}\"}}",
        emu.addr()
    );
    metric(proxy, &sample).unwrap_or(0)
}

/// After a `504` the slot is freed when the backend finishes the timed-out request (sluice
/// keeps the backend connection and reads the late answer), not after the fixed
/// `upstream.timeout_hold`. Cap 1, hold 30 s, a 1.5 s request timed out at 300 ms, for each
/// framing of the late answer: the next request reaches the backend only once that work is
/// done (the backend never sees 2 at once), is answered long before the hold would end (its
/// client gives up after 10 s), and goes over the same backend connection when the late answer
/// left it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_504_the_slot_is_freed_when_the_backend_finishes_the_request() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(5),
        1,
        100,
        Duration::from_secs(20),
        "[upstream]\nread_timeout = \"300ms\"\ntimeout_hold = \"30s\"\n",
    )
    .await;
    let addr = proxy.addr();
    for (i, framing) in ["length", "chunked", "close"].into_iter().enumerate() {
        emu.reset_stats();
        let late = format!("late-{framing}");
        let mut c = Conn::connect(addr).await.expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let r = c
            .send(
                &Request::post("/pay", "amount=1")
                    .txn(&late)
                    .header("X-Service-Time", "1500ms")
                    .header("X-Framing", framing),
            )
            .await
            .expect("an answer");
        assert_eq!(r.status, 504, "{framing}: {}", r.text());
        assert_eq!(
            proxy.admission().snapshot().backends[0].inflight,
            1,
            "{framing}: the slot stays taken while the backend works"
        );
        let next = format!("next-{framing}");
        let mut c = Conn::connect(addr).await.expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let r = c
            .send(&Request::get("/pay").txn(&next))
            .await
            .expect("answered before the 30 s hold would end");
        assert_eq!(r.status, 200, "{framing}: {}", r.text());
        assert_eq!(r.txn_id(), Some(next.as_str()));
        let stats = emu.stats();
        assert_eq!(stats.max_inside, 1, "{framing}: cap 1 held: {stats:?}");
        assert_eq!(ghosts(&proxy, &emu, "answered"), i as u64 + 1, "{framing}");
        let seen = emu.seen();
        let conn_of = |txn: &str| {
            seen.iter()
                .find(|s| s.txn.as_deref() == Some(txn))
                .map(|s| s.conn)
                .expect("seen")
        };
        if framing == "close" {
            assert_ne!(conn_of(&late), conn_of(&next), "closed after its answer");
        } else {
            assert_eq!(
                conn_of(&late),
                conn_of(&next),
                "{framing}: the connection went back into use"
            );
        }
    }
    assert_eq!(ghosts(&proxy, &emu, "expired"), 0);
    assert_eq!(ghosts(&proxy, &emu, "closed"), 0);
}

/// A backend that never answers a timed-out request: its slot is held for
/// `upstream.timeout_hold`, then released and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_backend_never_answers_keeps_its_slot_for_the_hold() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(5),
        1,
        100,
        Duration::from_secs(20),
        "[upstream]\nread_timeout = \"300ms\"\ntimeout_hold = \"1s\"\n",
    )
    .await;
    let mut c = Conn::connect(proxy.addr()).await.expect("connect");
    c.set_timeout(Duration::from_secs(10));
    let r = c
        .send(&Request::get("/pay").txn("hung").header("X-Fault", "hang"))
        .await
        .expect("an answer");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(proxy.admission().snapshot().backends[0].inflight, 1);
    eventually("the hold ends", Duration::from_secs(5), || {
        proxy.admission().snapshot().backends[0].inflight == 0
    })
    .await;
    eventually("counted as expired", Duration::from_secs(5), || {
        ghosts(&proxy, &emu, "expired") == 1
    })
    .await;
    eventually("the connection is closed", Duration::from_secs(5), || {
        emu.stats().open_connections == 0
    })
    .await;
}
