//! End-to-end: request bodies are received whole before a request may take a backend slot.
//! A large body reaches the backend only once it has fully arrived, with a Content-Length and
//! byte for byte; a body trickled below the minimum rate, or one that never starts, gets 408
//! and never reaches the backend; the buffered-body budget refuses what does not fit with 503;
//! and slowhttptest's slow-body and slow-header attacks leave a normal terminal served.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config_with, emulator_and_proxy, metric, start, NO_RAMP_NO_CHECKS};
use sluice_tests::client::{Conn, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the capturing backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// The request head, as sent.
    head: String,
    /// The body, read by its Content-Length.
    body: Vec<u8>,
    /// When the head's first byte arrived.
    at: Instant,
}

/// A backend that records each request (head, Content-Length body, arrival time) and answers
/// `200` with a length, keeping the connection. Refuses (answers 400 and closes) a request
/// without a Content-Length but with a body framing it does not take.
async fn capture_backend() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    // One request: its head, then its body by Content-Length.
                    let mut at = None;
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                at.get_or_insert_with(Instant::now);
                                buf.extend_from_slice(&chunk[..n]);
                            }
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    buf.drain(..head_end + len);
                    let reply = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                    log.lock().expect("log").push(Seen {
                        head,
                        body,
                        at: at.unwrap_or_else(Instant::now),
                    });
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Bodies larger than pingora's 64 KiB buffer are received whole, then forwarded whole with a
/// Content-Length; the backend sees the request only after its last byte reached sluice. A
/// chunked body goes to the backend de-chunked, with a Content-Length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_received_whole_then_forwarded_with_a_length() {
    let (backend, seen) = capture_backend().await;
    let proxy = start(&config_with(
        backend,
        1,
        100,
        Duration::from_secs(5),
        NO_RAMP_NO_CHECKS,
    ));
    let addr = proxy.addr();

    // 300 kB with a Content-Length, sent in 5 parts 150 ms apart (well above the minimum rate).
    let size = 300_000usize;
    let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut c = Conn::connect(addr).await.expect("connect");
    c.send_raw(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("head");
    let mut last_sent = Instant::now();
    for part in body.chunks(size / 5) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            seen.lock().expect("log").is_empty(),
            "forwarded before the body was in"
        );
        // Taken before the write: the proxy may forward the moment the last byte is in.
        last_sent = Instant::now();
        c.send_raw(part).await.expect("part");
    }
    let r = c.read_response().await.expect("answer");
    assert_eq!(r.status, 200, "{}", r.text());
    {
        let seen = seen.lock().expect("log");
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].at >= last_sent,
            "the backend saw the request before its last byte"
        );
        assert_eq!(seen[0].body.len(), size);
        assert!(seen[0].body == body, "the body reached the backend altered");
        let head = seen[0].head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-length: {size}\r\n")),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
    }

    // A chunked body (under 64 KiB) is forwarded de-chunked, with a Content-Length.
    let mut raw =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in [b"hello ".as_slice(), b"chunked world".as_slice()] {
        raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        raw.extend_from_slice(part);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = c.send_raw(&raw).await.map(|_| ());
    r.expect("send");
    let r = c.read_response().await.expect("answer");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = seen.lock().expect("log");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, b"hello chunked world");
    let head = seen[1].head.to_ascii_lowercase();
    assert!(head.contains("content-length: 19\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
}

/// A 100 kB body trickled below the minimum rate is cut off with 408 within a few seconds,
/// while a normal terminal keeps being served through the one backend slot; the trickled
/// body never reaches the backend. A POST whose declared body never starts (WinInet re-sending
/// only the headers, KB 833301) gets 408 at the start deadline, not the whole-body one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_missing_bodies_get_408_and_never_reach_the_backend() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        1,
        100,
        Duration::from_millis(300),
        "",
    )
    .await;
    let addr = proxy.addr();

    let trickler = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(
            b"POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: trickle\r\nContent-Length: 100000\r\n\r\n",
        )
        .await
        .expect("head");
        let started = Instant::now();
        // 50 bytes every 500 ms: 100 B/s, under the default 240 B/s; at most 60 s.
        for _ in 0..120 {
            if c.send_raw(&[b'x'; 50]).await.is_err() {
                break;
            }
            if c.is_closed_by_peer_within(Duration::from_millis(500)).await {
                break;
            }
        }
        (
            started.elapsed(),
            c.read_response().await.ok().map(|r| r.status),
        )
    });
    let missing = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(
            b"POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: no-body\r\nContent-Length: 120\r\n\r\n",
        )
        .await
        .expect("head");
        let started = Instant::now();
        let r = c.read_response().await.expect("an answer");
        (started.elapsed(), r.status, c.is_closed_by_peer().await)
    });

    let mut served = 0;
    for i in 0..500 {
        let id = format!("pay-{i}");
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c
            .send(&Request::post("/pay", "amount=1").txn(&id))
            .await
            .expect("answer");
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        served += 1;
        if trickler.is_finished() && missing.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served >= 10,
        "normal payments were served meanwhile: {served}"
    );

    let (lived, status) = trickler.await.expect("trickler");
    assert!(
        lived < Duration::from_secs(8),
        "a body under the minimum rate must be cut off early, lived {lived:?}"
    );
    // The 408 may race with the trickler's next write (then the connection resets).
    assert!(matches!(status, Some(408) | None), "{status:?}");
    let (waited, status, closed) = missing.await.expect("missing body");
    assert_eq!(status, 408);
    assert!(closed, "a 408 closes the connection");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "a body that never starts is refused at the 2 s start deadline, waited {waited:?}"
    );
    let txns = emu.transactions();
    assert!(
        !txns.iter().any(|t| t == "trickle" || t == "no-body"),
        "{txns:?}"
    );
    assert_eq!(emu.stats().max_inside, 1);
    assert_eq!(
        metric(&proxy, "sluice_client_timeouts_total{phase=\"body\"}"),
        Some(2)
    );
}

/// The buffered-body budget: with room for one 60 kB body, a second one declared while the
/// first is still arriving gets 503 with Retry-After at once (and its connection closed), and
/// once the first is done the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_beyond_the_buffer_budget_get_503_at_once() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        100,
        Duration::from_secs(5),
        "[proxy]\nmax_body_bytes = 60000\nmax_buffered_body_bytes = 100000\n",
    )
    .await;
    let addr = proxy.addr();
    let head = |id: &str| {
        format!("POST /pay HTTP/1.1\r\nHost: x\r\nX-Txn-Id: {id}\r\nContent-Length: 60000\r\n\r\n")
    };
    let mut first = Conn::connect(addr).await.expect("connect");
    first
        .send_raw(head("first").as_bytes())
        .await
        .expect("head");
    first.send_raw(&[b'a'; 30_000]).await.expect("half");
    common::eventually("the first body is buffered", Duration::from_secs(5), || {
        metric(&proxy, "sluice_buffered_body_bytes") == Some(60_000)
    })
    .await;

    let mut second = Conn::connect(addr).await.expect("connect");
    second
        .send_raw(head("second").as_bytes())
        .await
        .expect("head");
    let started = Instant::now();
    let r = second.read_response().await.expect("an answer");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert!(second.is_closed_by_peer().await);

    first.send_raw(&[b'a'; 30_000]).await.expect("rest");
    assert_eq!(first.read_response().await.expect("answer").status, 200);
    common::eventually("the budget is given back", Duration::from_secs(5), || {
        metric(&proxy, "sluice_buffered_body_bytes") == Some(0)
    })
    .await;
    let mut third = Conn::connect(addr).await.expect("connect");
    let r = third
        .send(&Request::post("/pay", vec![b'b'; 60_000]).txn("third"))
        .await
        .expect("answer");
    assert_eq!(r.status, 200);
    let txns = emu.transactions();
    assert!(txns.iter().any(|t| t == "first") && txns.iter().any(|t| t == "third"));
    assert!(!txns.iter().any(|t| t == "second"), "{txns:?}");
    assert_eq!(
        metric(
            &proxy,
            "sluice_requests_total{backend=\"none\",outcome=\"body_budget\"}"
        ),
        Some(1)
    );
}

/// Run slowhttptest (Debian package `slowhttptest`, installed by `.ci/run`) against `url`.
fn slowhttptest(args: &[&str]) -> std::process::Child {
    std::process::Command::new("slowhttptest")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("slowhttptest must be installed: apt-get install -y slowhttptest")
}

/// slowhttptest's slow-body attack (300 connections, 100 kB bodies sent 10 bytes a second) and
/// its slow-header attack (slowloris), 15 s each at once, against sluice with its default
/// client protections, while a normal terminal sends transactions through a cap of 4: at least
/// 95 % of the terminal's transactions succeed, and no slow upload reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowhttptest_attacks_leave_a_terminal_served() {
    common::raise_fd_limit();
    // The capturing backend tells a slow upload (a POST) from slowhttptest's probes (GETs).
    let (backend, seen) = capture_backend().await;
    let proxy = start(&config_with(
        backend,
        4,
        1000,
        Duration::from_secs(5),
        NO_RAMP_NO_CHECKS,
    ));
    let addr = proxy.addr();
    let body_url = format!("http://{addr}/pay?txn=slow-body");
    let header_url = format!("http://{addr}/pay?txn=slow-header");
    let mut attacks = vec![
        slowhttptest(&[
            "-B", "-c", "300", "-r", "300", "-s", "102400", "-i", "1", "-x", "10", "-l", "15",
            "-p", "3", "-u", &body_url,
        ]),
        slowhttptest(&[
            "-H",
            "-c",
            "300",
            "-r",
            "300",
            "-i",
            "1",
            "-x",
            "10",
            "-l",
            "15",
            "-p",
            "3",
            "-u",
            &header_url,
        ]),
    ];

    let started = Instant::now();
    let (mut sent, mut ok) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(15) && sent < 2_000 {
        let id = format!("terminal-{sent}");
        sent += 1;
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = Conn::connect(addr).await?;
            c.send(&Request::post("/pay", "amount=1").txn(&id).http10())
                .await
        })
        .await;
        if matches!(r, Ok(Ok(ref resp)) if resp.status == 200) {
            ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for a in &mut attacks {
        // slowhttptest ends by itself after -l seconds; bound the wait regardless.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if a.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = a.kill();
                let _ = a.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("under attack: {ok} of {sent} transactions succeeded");
    assert!(sent >= 50, "the terminal sent {sent}");
    assert!(
        f64::from(ok) >= 0.95 * f64::from(sent),
        "only {ok} of {sent} transactions succeeded under attack"
    );
    let seen = seen.lock().expect("log");
    let terminal = seen
        .iter()
        .filter(|s| s.head.contains("X-Txn-Id: terminal-"))
        .count();
    assert_eq!(
        terminal as u32, ok,
        "each successful transaction reached the backend once"
    );
    let uploads: Vec<&str> = seen
        .iter()
        .map(|s| s.head.lines().next().unwrap_or_default())
        .filter(|l| l.starts_with("POST") && l.contains("slow-"))
        .collect();
    assert!(
        uploads.is_empty(),
        "slow uploads reached the backend: {uploads:?}"
    );

    assert!(
        metric(&proxy, "sluice_client_timeouts_total{phase=\"body\"}").unwrap_or(0) > 0,
        "the slow bodies were cut off by the body deadline"
    );
}
