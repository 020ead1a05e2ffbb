//! End-to-end: surge shaping and rolling restarts. Slow start at sluice's own start and after
//! a backend recovers, riding out an outage, a rolling restart of a farm, and the token bucket.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config_with, eventually, farm_config, raise_fd_limit, start};
use sluice::Admission;
use sluice_tests::client::{Conn, Request};
use sluice_tests::emulator::{ColdStart, Emulator, EmulatorConfig, EmulatorHandle};
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, Method, StartMode};

/// Sample the backend's concurrency against sluice's effective limit for `backend` until
/// `stop`; returns (samples, violations). The backend is read first: the limit only grows
/// during a ramp, so inside(t1) ≤ limit(t1) ≤ limit(t2) must hold.
fn sample_against_limit(
    emu: EmulatorHandle,
    admission: Arc<Admission>,
    backend: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let mut samples = 0u64;
        let mut violations = Vec::new();
        // Bounded: at most 60 s of 1 ms samples.
        for _ in 0..60_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let inside = emu.inside_now();
            let limit = admission.snapshot().backends[backend].effective_limit as usize;
            samples += 1;
            if inside > limit {
                violations.push(format!("{inside} inside > limit {limit}"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (samples, violations)
    })
}

/// Cold start with the clock ramp: 2,000 clients arrive within 100 ms of sluice starting. Throughout, the backend's
/// concurrency never exceeds the ramp's limit at that moment, it never locks up, and every
/// client gets its 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_ramps_under_a_surge() {
    raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(10),
        // Far below the 2,000 arriving at once: hitting it directly would lock it up.
        lockup_above: Some(40),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let cfg = config_with(
        emu.addr(),
        32,
        4000,
        Duration::from_secs(30),
        "[slow_start]\nmode = \"clock\"\nduration = \"2s\"\ninitial = 4\n[health]\ncheck = \"none\"\n",
    );
    let proxy = start(&cfg);
    let admission = proxy.admission().clone();
    // The ramp starts at 4 and moves with the clock: on a busy machine some of its 2 s may
    // already have passed by now, but it is still far below the cap.
    let first = admission.snapshot().backends[0].effective_limit;
    assert!(
        (4..16).contains(&first),
        "the ramp starts low, not at {first}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_against_limit(emu.handle(), admission.clone(), 0, stop.clone());

    let report = terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 2000,
        transactions_per_terminal: Some(1),
        conn_mode: ConnMode::PerTransaction,
        http: HttpMix::Mixed,
        start: StartMode::Ramp(Duration::from_millis(100)),
        request_timeout: Duration::from_secs(40),
        ..LoadConfig::default()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (samples, violations) = sampler.await.expect("sampler");

    assert_eq!(report.ok, 2000, "{report}");
    assert!(samples > 100, "too few samples: {samples}");
    assert!(
        violations.is_empty(),
        "concurrency above the ramp: {violations:?}"
    );
    let stats = emu.stats();
    assert_eq!(stats.lockups, 0, "{stats:?}");
    assert!(stats.max_inside <= 32, "{stats:?}");
    assert!(stats.accepted_connections <= 32, "{stats:?}");
}

/// The only backend dies for 3 s and comes back cold. Requests that arrive meanwhile wait and
/// succeed once it returns; after recovery the limit ramps up again; no transaction is
/// processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_ridden_out_and_recovery_ramps() {
    raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(20),
        cold_start: Some(ColdStart {
            initial_fraction: 0.1,
            duration: Duration::from_secs(2),
            lockup_scales: false,
        }),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let cfg = config_with(
        emu.addr(),
        16,
        1000,
        Duration::from_secs(10),
        "[slow_start]\nduration = \"2s\"\ninitial = 2\n\
         [health]\ncheck = \"http\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\npassive_failures = 1\n",
    );
    let proxy = start(&cfg);
    let addr = proxy.addr();
    let admission = proxy.admission().clone();

    // Before the outage: served normally, the start-up ramp long over.
    eventually("start-up ramp done", Duration::from_secs(10), || {
        admission.snapshot().backends[0].effective_limit == 16
    })
    .await;
    let mut c = Conn::connect(addr).await.expect("connect");
    let r = c
        .send(&Request::post("/pay", "before").txn("before"))
        .await
        .expect("before");
    assert_eq!(r.status, 200);

    emu.stop().await;
    // Terminals keep paying during the outage: 100 POSTs, each on its own connection.
    let during: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("during-{i}");
                let mut c = Conn::connect(addr).await.expect("connect");
                c.set_timeout(Duration::from_secs(20));
                let r = c.send(&Request::post("/pay", "x").txn(&id)).await;
                (id, r)
            })
        })
        .collect();
    eventually(
        "sluice knows the backend is down",
        Duration::from_secs(5),
        || admission.status()[0].state == sluice_plugins::BackendState::Down,
    )
    .await;
    // The outage lasts 3 s in all (wall-clock scenario time, not synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        admission.snapshot().queued,
        100,
        "every payment waits, none fails"
    );
    emu.restart().await.expect("restart");

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_against_limit(emu.handle(), admission.clone(), 0, stop.clone());
    eventually("the backend is up again", Duration::from_secs(5), || {
        admission.status()[0].state == sluice_plugins::BackendState::Up
    })
    .await;
    let after_recovery = admission.snapshot().backends[0].effective_limit;
    assert!(
        after_recovery < 16,
        "recovery must restart the ramp, limit {after_recovery}"
    );

    let mut sent = HashSet::new();
    for d in during {
        let (id, r) = d.await.expect("join");
        let r = r.expect("response");
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.txn_id(), Some(id.as_str()));
        sent.insert(id);
    }
    stop.store(true, Ordering::Relaxed);
    let (_, violations) = sampler.await.expect("sampler");
    assert!(
        violations.is_empty(),
        "above the ramp after recovery: {violations:?}"
    );

    let seen = emu.transactions();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a payment was processed twice: {seen:?}"
    );
    for id in &sent {
        assert!(unique.contains(id), "{id} never reached the backend");
    }
}

/// Rolling restart of three backends under steady load: drain, stop, start, ready, one by
/// one: no failed request, and no backend ever above its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_a_farm_fails_nothing() {
    raise_fd_limit();
    let caps = [4usize, 6, 8];
    let mut emus = Vec::new();
    for _ in caps {
        emus.push(
            Emulator::start(EmulatorConfig {
                workers: 64,
                service_time: Duration::from_millis(10),
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator"),
        );
    }
    let mut toml = String::from(
        "[admission]\nmax_queue = 2000\nqueue_timeout = \"10s\"\n\
         [slow_start]\nduration = \"1s\"\ninitial = 1\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 1\n",
    );
    for (i, (emu, cap)) in emus.iter().zip(caps).enumerate() {
        toml.push_str(&format!(
            "[[backend]]\nname = \"iis{i}\"\naddress = \"{}\"\nmax_inflight = {cap}\n",
            emu.addr()
        ));
    }
    let cfg = farm_config(&toml);
    let proxy = start(&cfg);
    let admin = cfg.admin_listen.expect("admin listener");
    let admission = proxy.admission().clone();
    // A rolling restart happens on a running farm: let the start-up ramp finish first.
    eventually("start-up ramps done", Duration::from_secs(10), || {
        admission
            .status()
            .iter()
            .all(|b| b.effective_limit == b.limit && b.state == sluice_plugins::BackendState::Up)
    })
    .await;

    let load = tokio::spawn(terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 40,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(12)),
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Http11,
        start: StartMode::AllAtOnce,
        method: Method::Post,
        request_timeout: Duration::from_secs(20),
        ..LoadConfig::default()
    }));

    for (i, emu) in emus.iter().enumerate() {
        let name = format!("iis{i}");
        eventually("every backend serving", Duration::from_secs(10), || {
            admission
                .status()
                .iter()
                .all(|b| b.state == sluice_plugins::BackendState::Up)
        })
        .await;
        let call = |action: &'static str, name: String| {
            tokio::task::spawn_blocking(move || {
                sluice::ops::admin::client::call(
                    admin,
                    "POST",
                    &format!("/backends/{name}/{action}"),
                )
            })
        };
        let (code, body) = call("drain", name.clone())
            .await
            .expect("join")
            .expect("admin");
        assert_eq!(code, 200, "{body}");
        eventually("drained backend idle", Duration::from_secs(10), || {
            admission.status()[i].inflight == 0
        })
        .await;
        emu.stop().await;
        emu.restart().await.expect("restart");
        let (code, body) = call("ready", name.clone())
            .await
            .expect("join")
            .expect("admin");
        assert_eq!(code, 200, "{body}");
    }
    let report = load.await.expect("load");
    assert!(report.sent > 500, "{report}");
    assert_eq!(report.ok, report.sent, "{report}");
    assert_eq!(report.mismatched, 0);
    for (emu, cap) in emus.iter().zip(caps) {
        let s = emu.stats();
        assert!(s.max_inside <= cap, "backend above its cap {cap}: {s:?}");
        assert!(s.requests > 0, "every backend served: {s:?}");
        let seen = emu.transactions();
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a payment processed twice");
    }
    // The unknown-backend case answers 404 with a clear message.
    let (code, body) = tokio::task::spawn_blocking(move || {
        sluice::ops::admin::client::call(admin, "POST", "/backends/nope/drain")
    })
    .await
    .expect("join")
    .expect("admin");
    assert_eq!(code, 404);
    assert!(body.contains("nope"), "{body}");
}

/// Token bucket: 10 s at 100/s, burst 20, while 1,000/s are offered. The backend receives at
/// most 1,020 requests; the rest wait or get 503 after their deadline, never 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_caps_the_rate_and_queues_the_rest() {
    raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(2),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let cfg = config_with(
        emu.addr(),
        32,
        200,
        Duration::from_secs(1),
        "[admission]\nrate = 100.0\nburst = 20\n[slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n",
    );
    let proxy = start(&cfg);
    let report = terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 200,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(10)),
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Http11,
        start: StartMode::AllAtOnce,
        offered_rate: Some(1000.0),
        request_timeout: Duration::from_secs(10),
        ..LoadConfig::default()
    })
    .await;
    let reached = emu.stats().requests;
    let bound = 20.0 + 100.0 * report.elapsed.as_secs_f64();
    assert!(
        reached as f64 <= bound,
        "backend got {reached} > {bound}: {report}"
    );
    assert!(
        reached >= 900,
        "the rate must still be used: {reached}, {report}"
    );
    assert_eq!(report.ok, reached, "{report}");
    assert_eq!(report.status(429), 0, "{report}");
    let rejected = report.status(503);
    assert_eq!(
        report.ok + rejected,
        report.sent,
        "only 200 or 503: {report}"
    );
    assert_eq!(
        report.retry_after_seen, rejected,
        "every 503 carries Retry-After"
    );
    assert!(
        rejected > 0,
        "1,000/s offered against 100/s must shed load: {report}"
    );
}

/// A cold backend whose capacity and lock-up threshold both ramp over 20 s (from 10 %: 3
/// workers, locking up above 6 inside, at first), under more terminals than it can serve,
/// with sluice's default config: the latency ramp holds the limit where the backend's latency
/// says, and the backend never locks up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_backend_is_not_locked_up_by_the_default_ramp() {
    raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 32,
        service_time: Duration::from_millis(20),
        lockup_above: Some(64),
        cold_start: Some(ColdStart {
            initial_fraction: 0.1,
            duration: Duration::from_secs(20),
            lockup_scales: true,
        }),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let cfg = config_with(emu.addr(), 32, 4000, Duration::from_secs(30), "");
    let proxy = start(&cfg);
    let admission = proxy.admission().clone();
    let report = terminals::run(LoadConfig {
        target: proxy.addr(),
        terminals: 400,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(20)),
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Mixed,
        request_timeout: Duration::from_secs(40),
        ..LoadConfig::default()
    })
    .await;
    let stats = emu.stats();
    let status = &admission.status()[0];
    eprintln!("{report}; {stats}; {status:?}");
    assert_eq!(stats.lockups, 0, "{stats}");
    assert!(report.ok > 1_000, "{report}");
    assert_eq!(report.mismatched, 0, "{report}");
}
