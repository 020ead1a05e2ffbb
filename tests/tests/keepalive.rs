//! End-to-end: a terminal's kept-alive connection outlives the terminal's own idle timeout.
//! WinInet keeps an idle connection for 60 s; when a connection it reuses turns out to be
//! closed, it may re-send a POST's headers without the body (KB 833301). So sluice's default
//! client keep-alive must be longer: a terminal that reuses its connection after 61 s idle is
//! served on it.

mod common;

use std::time::Duration;

use common::emulator_and_proxy;
use sluice_tests::client::{Conn, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reused_after_61_s_idle_is_served() {
    // Default client keep-alive (no [proxy] override).
    let (emu, proxy) =
        emulator_and_proxy(Duration::from_millis(1), 4, 100, Duration::from_secs(5), "").await;
    let mut c = Conn::connect(proxy.addr()).await.expect("connect");
    let r = c
        .send(
            &Request::post("/pay", "amount=1")
                .txn("before-idle")
                .http10()
                .header("Connection", "keep-alive"),
        )
        .await
        .expect("first answer");
    assert_eq!(r.status, 200);
    assert!(r.keep_alive(), "the first answer keeps the connection");
    // The idle period is the behaviour under test: one second longer than WinInet's own.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(
        !c.is_closed_now(),
        "sluice closed the idle connection before 61 s"
    );
    let r = c
        .send(
            &Request::post("/pay", "amount=2")
                .txn("after-idle")
                .http10()
                .header("Connection", "keep-alive"),
        )
        .await
        .expect("served on the same connection");
    assert_eq!(r.status, 200);
    assert_eq!(r.txn_id(), Some("after-idle"));
    assert_eq!(emu.transactions(), vec!["before-idle", "after-idle"]);
}
