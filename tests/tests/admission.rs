//! End-to-end: the backend is held at exactly `max_inflight`, over at most that many TCP
//! connections; the queue is FIFO, bounded and deadlined; rejections keep the connection open;
//! clients that leave never reach the backend and leak no slot; no response is ever mixed up.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{emulator_and_proxy, eventually, raise_fd_limit};
use sluice_tests::client::{Conn, Request};
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, StartMode};

/// 500 concurrent clients, `max_inflight = 16`, a 50 ms backend: the backend sees exactly 16 at
/// once over at most 16 connections, and every client gets 200 with its own transaction id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_held_at_exact_cap_under_500_concurrent_clients() {
    raise_fd_limit();
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(50),
        16,
        1000,
        Duration::from_secs(60),
        "",
    )
    .await;
    let addr = proxy.addr();

    let clients: Vec<_> = (0..500)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("c{i}");
                let mut conn = Conn::connect(addr).await.expect("connect");
                let resp = conn
                    .send(&Request::get(format!("/pay?txn={id}")).txn(&id))
                    .await;
                (id, resp)
            })
        })
        .collect();
    let mut sent = HashSet::new();
    for c in clients {
        let (id, resp) = c.await.expect("client task");
        let resp = resp.expect("response");
        assert_eq!(resp.status, 200, "client {id}");
        assert_eq!(
            resp.txn_id(),
            Some(id.as_str()),
            "client {id} got another's response"
        );
        sent.insert(id);
    }

    let stats = emu.stats();
    assert_eq!(
        stats.max_inside, 16,
        "backend max concurrency must equal the cap"
    );
    assert!(
        stats.accepted_connections <= 16,
        "backend accepted {} connections, cap is 16",
        stats.accepted_connections
    );
    let seen = emu.transactions();
    assert_eq!(
        seen.len(),
        500,
        "each transaction reaches the backend exactly once"
    );
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), sent);
}

/// 2,000 transactions, each on a new client connection, HTTP/1.0 and 1.1 mixed: the backend
/// accepts at most `max_inflight` connections in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_per_transaction_reuses_a_capped_pool() {
    raise_fd_limit();
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(2),
        8,
        2000,
        Duration::from_secs(60),
        "",
    )
    .await;
    let report = terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 200,
        transactions_per_terminal: Some(10),
        duration: None,
        conn_mode: ConnMode::PerTransaction,
        http: HttpMix::Mixed,
        start: StartMode::AllAtOnce,
        offered_rate: None,
        request_timeout: Duration::from_secs(60),
        ..LoadConfig::default()
    })
    .await;
    assert_eq!(report.sent, 2000, "{report}");
    assert_eq!(report.ok, 2000, "{report}");
    assert_eq!(report.mismatched, 0, "{report}");
    let stats = emu.stats();
    assert!(
        stats.accepted_connections <= 8,
        "backend accepted {} connections for 2,000 transactions; cap is 8",
        stats.accepted_connections
    );
    assert!(stats.max_inside <= 8);
    assert_eq!(emu.transactions().len(), 2000);
}

/// Queue full: immediate 503 with Retry-After, and the same connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_rejects_at_once_and_keeps_the_connection() {
    let (emu, proxy) =
        emulator_and_proxy(Duration::from_millis(1), 1, 1, Duration::from_secs(30), "").await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();

    // One slow request holds the only slot, a second waits in the only queue place.
    let holder = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send(
            &Request::get("/hold")
                .txn("hold")
                .header("X-Service-Time", "800ms"),
        )
        .await
    });
    eventually(
        "the holder is at the backend",
        Duration::from_secs(10),
        || emu.inside_now() == 1,
    )
    .await;
    let waiter = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send(&Request::get("/wait").txn("wait")).await
    });
    eventually("the waiter is queued", Duration::from_secs(10), || {
        admission.snapshot().queued == 1
    })
    .await;

    let mut conn = Conn::connect(addr).await.expect("connect");
    let started = Instant::now();
    let resp = conn
        .send(&Request::get("/full").txn("full"))
        .await
        .expect("response");
    assert_eq!(resp.status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "must not wait"
    );
    let retry_after: u64 = resp
        .header("Retry-After")
        .expect("Retry-After header")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    assert!(resp.keep_alive(), "rejection must keep the connection open");

    assert_eq!(holder.await.expect("join").expect("holder").status, 200);
    assert_eq!(waiter.await.expect("join").expect("waiter").status, 200);
    let local = conn.local_addr().expect("local addr");
    let resp = conn
        .send(&Request::get("/next").txn("next"))
        .await
        .expect("same connection serves the next request");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.txn_id(), Some("next"));
    assert_eq!(conn.local_addr().expect("local addr"), local);
    let seen = emu.transactions();
    assert!(
        !seen.iter().any(|t| t == "full"),
        "a rejected request reached the backend"
    );
}

/// A queued request past `queue_timeout` gets 503 after about that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_503_after_the_deadline() {
    let queue_timeout = Duration::from_millis(400);
    let (emu, proxy) = emulator_and_proxy(Duration::from_millis(1), 1, 10, queue_timeout, "").await;
    let addr = proxy.addr();
    let holder = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send(
            &Request::get("/hold")
                .txn("hold")
                .header("X-Service-Time", "3s"),
        )
        .await
    });
    eventually(
        "the holder is at the backend",
        Duration::from_secs(10),
        || emu.inside_now() == 1,
    )
    .await;
    let mut conn = Conn::connect(addr).await.expect("connect");
    let started = Instant::now();
    let resp = conn
        .send(&Request::get("/late").txn("late"))
        .await
        .expect("response");
    let waited = started.elapsed();
    assert_eq!(resp.status, 503);
    assert!(resp.header("Retry-After").is_some());
    assert!(
        waited >= queue_timeout,
        "answered after {waited:?}, before the deadline"
    );
    assert!(
        waited < queue_timeout + Duration::from_secs(2),
        "answered after {waited:?}"
    );
    assert!(resp.keep_alive());
    assert_eq!(holder.await.expect("join").expect("holder").status, 200);
    assert!(!emu.transactions().iter().any(|t| t == "late"));
}

/// Clients that disconnect while queued leave the queue and never reach the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_leaves_the_queue_is_never_forwarded() {
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        1,
        100,
        Duration::from_secs(30),
        "",
    )
    .await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();
    let holder = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send(
            &Request::get("/hold")
                .txn("hold")
                .header("X-Service-Time", "1s"),
        )
        .await
    });
    eventually(
        "the holder is at the backend",
        Duration::from_secs(10),
        || emu.inside_now() == 1,
    )
    .await;

    let mut leavers = Vec::new();
    for i in 0..20 {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(
            &Request::get("/leave")
                .txn(format!("leave-{i}"))
                .encode("sluice"),
        )
        .await
        .expect("send");
        leavers.push(c);
    }
    eventually("20 requests queued", Duration::from_secs(10), || {
        admission.snapshot().queued == 20
    })
    .await;
    drop(leavers);
    eventually(
        "the leavers left the queue",
        Duration::from_secs(10),
        || admission.snapshot().queued == 0,
    )
    .await;

    assert_eq!(holder.await.expect("join").expect("holder").status, 200);
    let mut c = Conn::connect(addr).await.expect("connect");
    let resp = c
        .send(&Request::get("/after").txn("after"))
        .await
        .expect("after");
    assert_eq!(resp.status, 200);
    let seen = emu.transactions();
    assert_eq!(seen, vec!["hold".to_string(), "after".to_string()]);
}

/// After 200 clients abort mid-flight (some at the backend, some queued), no slot has leaked:
/// `max_inflight` slow requests still all reach the backend at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_clients_leak_no_slot() {
    raise_fd_limit();
    let cap = 8;
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(20),
        cap,
        1000,
        Duration::from_secs(30),
        "",
    )
    .await;
    let addr = proxy.addr();
    let admission = proxy.admission().clone();

    let mut aborters = Vec::new();
    for i in 0..200 {
        let mut c = Conn::connect(addr).await.expect("connect");
        c.send_raw(
            &Request::get("/abort")
                .txn(format!("abort-{i}"))
                .encode("sluice"),
        )
        .await
        .expect("send");
        aborters.push(c);
    }
    eventually(
        "some aborters reached the backend",
        Duration::from_secs(10),
        || emu.inside_now() > 0,
    )
    .await;
    drop(aborters);
    common::assert_full_capacity(
        addr,
        &admission,
        &emu.handle(),
        cap,
        Duration::from_secs(30),
    )
    .await;
}

/// Under concurrency and pool reuse, every response carries its own request's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mixups_under_concurrency_and_reuse() {
    raise_fd_limit();
    let (emu, proxy) = emulator_and_proxy(
        Duration::from_millis(1),
        4,
        1000,
        Duration::from_secs(60),
        "",
    )
    .await;
    let report = terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 100,
        transactions_per_terminal: Some(20),
        duration: None,
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Http11,
        start: StartMode::AllAtOnce,
        offered_rate: None,
        request_timeout: Duration::from_secs(60),
        record_ids: true,
        ..LoadConfig::default()
    })
    .await;
    assert_eq!(report.ok, 2000, "{report}");
    assert_eq!(report.mismatched, 0, "{report}");
    let seen = emu.transactions();
    assert_eq!(seen.len(), 2000);
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        2000,
        "a transaction reached the backend twice"
    );
    let ok: HashSet<_> = report.ok_ids.iter().collect();
    assert_eq!(ok, unique);
    assert!(emu.stats().accepted_connections <= 4);
}
