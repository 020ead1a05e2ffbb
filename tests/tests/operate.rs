//! End-to-end: metrics after a known traffic pattern, the access log, hot reload under load,
//! and an invalid reload that leaves the running configuration in force.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{eventually, farm_config, raise_fd_limit, start};
use sluice::ops::admin::client::call;
use sluice::run::{free_local_addr, RunningProxy};
use sluice::{Config, Overrides};
use sluice_tests::client::{Conn, Request};
use sluice_tests::emulator::{Emulator, EmulatorConfig};
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, StartMode};

fn emulator_config() -> EmulatorConfig {
    EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(1),
        ..EmulatorConfig::default()
    }
}

async fn admin(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &'static str,
) -> (u16, String) {
    tokio::task::spawn_blocking(move || call(addr, method, path))
        .await
        .expect("join")
        .expect("admin call")
}

/// The value of one sample line of the Prometheus text format.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// After a known pattern (admitted, queued, refused for a full queue, timed out, aborted while
/// queued), every counter and gauge has the value it must have; the access log has one line
/// per request with its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_match_a_known_traffic_pattern() {
    let emu = Emulator::start(emulator_config()).await.expect("emulator");
    let log_path = std::env::temp_dir().join(format!("sluice-access-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log_path);
    let mut cfg = farm_config(&format!(
        "[admission]\nmax_inflight = 1\nmax_queue = 1\nqueue_timeout = \"1500ms\"\n\
         [slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n\
         [[backend]]\nname = \"iis\"\naddress = \"{}\"\n",
        emu.addr()
    ));
    cfg.access_log = sluice::observe::access_log::Target::File(log_path.clone());
    let proxy = start(&cfg);
    let addr = proxy.addr();
    let admin_addr = cfg.admin_listen.expect("admin");
    let admission = proxy.admission().clone();

    let slow = |id: &str, t: &str| Request::get("/pay").txn(id).header("X-Service-Time", t);
    // 3 admitted at once.
    let mut c = Conn::connect(addr).await.expect("connect");
    for i in 0..3 {
        let r = c
            .send(&Request::get("/pay").txn(format!("a{i}")))
            .await
            .expect("ok");
        assert_eq!(r.status, 200);
    }
    // A holds the slot, B waits and is served, C finds the queue full.
    let holder = |req: Request| {
        tokio::spawn(async move {
            let mut c = Conn::connect(addr).await.expect("connect");
            c.send(&req).await.expect("response").status
        })
    };
    let a = holder(slow("A", "700ms"));
    eventually("A at the backend", Duration::from_secs(5), || {
        emu.inside_now() == 1
    })
    .await;
    let b = holder(Request::get("/pay").txn("B"));
    eventually("B queued", Duration::from_secs(5), || {
        admission.snapshot().queued == 1
    })
    .await;
    let r = Conn::connect(addr)
        .await
        .expect("connect")
        .send(&Request::get("/pay").txn("C"))
        .await;
    assert_eq!(r.expect("C").status, 503);
    assert_eq!((a.await.expect("A"), b.await.expect("B")), (200, 200));
    // A2 holds longer than the deadline: B2 times out.
    let a2 = holder(slow("A2", "2500ms"));
    eventually("A2 at the backend", Duration::from_secs(5), || {
        emu.inside_now() == 1
    })
    .await;
    let b2 = holder(Request::get("/pay").txn("B2"));
    assert_eq!(b2.await.expect("B2"), 503);
    // Still A2 at the backend: D queues, then hangs up.
    let mut d = Conn::connect(addr).await.expect("connect");
    d.send_raw(&Request::get("/pay").txn("D").encode("sluice"))
        .await
        .expect("send");
    eventually("D queued", Duration::from_secs(5), || {
        admission.snapshot().queued == 1
    })
    .await;
    drop(d);
    assert_eq!(a2.await.expect("A2"), 200);

    let expect = [
        ("sluice_requests_total{backend=\"iis\",outcome=\"ok\"}", 6.0),
        (
            "sluice_requests_total{backend=\"none\",outcome=\"queue_full\"}",
            1.0,
        ),
        (
            "sluice_requests_total{backend=\"none\",outcome=\"queue_timeout\"}",
            1.0,
        ),
        (
            "sluice_requests_total{backend=\"none\",outcome=\"client_abort\"}",
            1.0,
        ),
        ("sluice_queue_wait_seconds_count", 9.0),
        (
            "sluice_upstream_duration_seconds_count{backend=\"iis\"}",
            6.0,
        ),
        ("sluice_inflight{backend=\"iis\"}", 0.0),
        ("sluice_effective_limit{backend=\"iis\"}", 1.0),
        ("sluice_max_inflight{backend=\"iis\"}", 1.0),
        ("sluice_backend_up{backend=\"iis\"}", 1.0),
        ("sluice_queue_depth", 0.0),
        ("sluice_queue_max", 1.0),
    ];
    let mut text = String::new();
    // The last request is counted just after its response is delivered: poll, bounded.
    for _ in 0..200 {
        let (code, body) = admin(admin_addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        text = body;
        if expect.iter().all(|(k, v)| metric(&text, k) == Some(*v)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (series, value) in expect {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    let new = metric(
        &text,
        "sluice_upstream_connections_total{backend=\"iis\",reused=\"false\"}",
    );
    let reused = metric(
        &text,
        "sluice_upstream_connections_total{backend=\"iis\",reused=\"true\"}",
    );
    // Six requests went upstream, each on a new or a reused connection.
    let (new, reused) = (new.unwrap_or(0.0), reused.unwrap_or(0.0));
    assert_eq!(new + reused, 6.0, "{text}");
    assert!(
        new >= 1.0 && reused >= 1.0,
        "pooled connections are reused\n{text}"
    );
    // Every connection counted new is one the backend accepted, and requests never overlapped.
    // A connection pingora 0.9 loses to its idle poller's race (pingora#998) and sluice rescues
    // counts as reused: the backend accepted nothing for it. (Not "one connection open at a
    // time": a lost connection that could not be rescued is closing while the next is dialed.)
    let stats = emu.stats();
    assert_eq!(stats.accepted_connections as f64, new, "{stats:?}\n{text}");
    assert_eq!(stats.max_inside, 1, "cap 1: one request at a time");
    // Waits: B2 waited the whole deadline.
    let le_1s = metric(&text, "sluice_queue_wait_seconds_bucket{le=\"1\"}").expect("bucket");
    assert_eq!(le_1s, 8.0, "all but B2 waited under 1 s\n{text}");

    // Access log: one JSON line per request, with its outcome.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..200 {
        lines = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lines.len(), 9, "{lines:?}");
    let outcomes: Vec<&str> = lines.iter().filter_map(|l| l["outcome"].as_str()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "ok").count(), 6);
    assert!(outcomes.contains(&"queue_full") && outcomes.contains(&"queue_timeout"));
    assert!(outcomes.contains(&"client_abort"));
    let ok = lines
        .iter()
        .find(|l| l["outcome"] == "ok")
        .expect("an ok line");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["backend"], "iis");
    assert_eq!(ok["method"], "GET");
    assert!(ok["upstream_ms"].as_f64().is_some() && ok["time"].as_str().is_some());
    assert_eq!(ok["limit"], 1, "the limit in force: {ok}");
    let _ = std::fs::remove_file(&log_path);
}

fn write(path: &PathBuf, text: &str) {
    std::fs::write(path, text).expect("write config");
}

/// A reload under load lowers, then raises, the limit: 0 failed requests and the backend sees
/// each new limit. An invalid file is refused and the running configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_limit_under_load_and_refuses_a_bad_file() {
    raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(20),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let dir = std::env::temp_dir().join(format!("sluice-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.toml");
    let file = |cap: u32| {
        format!(
            "[admission]\nmax_inflight = {cap}\nmax_queue = 2000\nqueue_timeout = \"10s\"\n\
             [slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n[log]\naccess = \"off\"\n\
             [[backend]]\nname = \"iis\"\naddress = \"{}\"\n",
            emu.addr()
        )
    };
    write(&path, &file(8));
    let overrides = Overrides {
        listen: Some(free_local_addr().expect("port").to_string()),
        admin_listen: Some(free_local_addr().expect("port").to_string()),
        ..Overrides::default()
    };
    let cfg = Config::load(&path, &overrides).expect("valid");
    let admin_addr = cfg.admin_listen.expect("admin");
    let proxy = RunningProxy::start_from(&cfg, Some(path.clone()), overrides).expect("start");
    let admission = proxy.admission().clone();

    let load = tokio::spawn(terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 40,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(6)),
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Http11,
        start: StartMode::AllAtOnce,
        request_timeout: Duration::from_secs(20),
        ..LoadConfig::default()
    }));

    // Observe the backend over the next 100 completed requests; returns its max concurrency.
    let window = |emu: sluice_tests::emulator::EmulatorHandle| async move {
        let start = emu.stats().requests;
        emu.reset_stats();
        emu.wait_for(Duration::from_secs(10), |s| s.requests >= 100)
            .await
            .map(|s| s.max_inside)
            .unwrap_or_else(|s| panic!("backend stalled at {start}: {s:?}"))
    };
    assert_eq!(
        window(emu.handle()).await,
        8,
        "the backend runs at the first limit"
    );

    write(&path, &file(3));
    let (code, body) = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("max_inflight 3"), "{body}");
    eventually(
        "in flight drained to the new limit",
        Duration::from_secs(5),
        || admission.snapshot().backends[0].inflight <= 3,
    )
    .await;
    assert_eq!(
        window(emu.handle()).await,
        3,
        "the backend sees the lowered limit"
    );

    write(&path, &file(12));
    let (code, body) = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        window(emu.handle()).await,
        12,
        "the backend sees the raised limit"
    );

    write(&path, "[admission]\nmax_inflight = 0\n");
    let (code, body) = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("max_inflight") && body.contains("stays"),
        "{body}"
    );
    assert_eq!(
        admission.snapshot().backends[0].limit,
        12,
        "the old config still serves"
    );
    assert_eq!(window(emu.handle()).await, 12);

    let report = load.await.expect("load");
    assert!(report.sent > 300, "{report}");
    assert_eq!(
        report.ok, report.sent,
        "no failed request across reloads: {report}"
    );
    let (_, metrics) = admin(admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric(&metrics, "sluice_reloads_total{result=\"ok\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&metrics, "sluice_reloads_total{result=\"error\"}"),
        Some(1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `tcp` health check takes a stopped backend down and brings it back when it listens again
/// (with passive checks off, the active check alone decides), and the admin `slow-start`
/// command restarts the ramp from its initial limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_and_the_slow_start_command() {
    use sluice_plugins::BackendState;
    let emu = Emulator::start(emulator_config()).await.expect("emulator");
    let cfg = farm_config(&format!(
        "[admission]\nmax_inflight = 10\n\
         [slow_start]\nduration = \"2s\"\ninitial = 2\n\
         [health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n\
         passive_failures = 0\n\
         [[backend]]\nname = \"iis\"\naddress = \"{}\"\n",
        emu.addr()
    ));
    let admin_addr = cfg.admin_listen.expect("admin");
    let proxy = start(&cfg);
    let admission = proxy.admission().clone();
    let limit = || admission.snapshot().backends[0].effective_limit;
    eventually("the start-up ramp ends", Duration::from_secs(10), || {
        limit() == 10
    })
    .await;

    emu.stop().await;
    eventually(
        "the tcp check takes it down",
        Duration::from_secs(5),
        || admission.status()[0].state == BackendState::Down,
    )
    .await;
    emu.restart().await.expect("restart");
    eventually(
        "the tcp check brings it back",
        Duration::from_secs(5),
        || admission.status()[0].state == BackendState::Up,
    )
    .await;
    eventually("the recovery ramp ends", Duration::from_secs(10), || {
        limit() == 10
    })
    .await;

    let (code, body) = admin(admin_addr, "POST", "/backends/iis/slow-start").await;
    assert_eq!(code, 200, "{body}");
    assert!(limit() < 10, "the ramp restarted: limit {}", limit());
    eventually("the commanded ramp ends", Duration::from_secs(10), || {
        limit() == 10
    })
    .await;
    let (code, _) = admin(admin_addr, "POST", "/backends/nosuch/slow-start").await;
    assert_eq!(code, 404);
    let r = Conn::connect(proxy.addr())
        .await
        .expect("connect")
        .send(&Request::get("/pay").txn("after"))
        .await
        .expect("served");
    assert_eq!(r.status, 200);
}
