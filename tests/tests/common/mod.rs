//! Shared harness for the end-to-end tests: start sluice in-process in front of an emulator,
//! and wait for conditions with bounded polling (never a bare sleep).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice::run::{free_local_addr, RunningProxy};
use sluice::{Config, Overrides};

/// Config sections turning off the start-up ramp and the health checks.
pub const NO_RAMP_NO_CHECKS: &str = "[slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n";

/// A config for one backend at `backend`, listening on a free loopback port, with no admin
/// listener and no access log, and `toml` as the file (sections not given take their defaults).
pub fn config_with(
    backend: SocketAddr,
    max_inflight: u32,
    max_queue: usize,
    queue_timeout: Duration,
    toml: &str,
) -> Config {
    let listen = free_local_addr().expect("free port");
    let o = Overrides {
        listen: Some(listen.to_string()),
        backend: Some(backend.to_string()),
        max_inflight: Some(max_inflight),
        max_queue: Some(max_queue),
        queue_timeout: Some(queue_timeout),
        threads: Some(2),
        admin_listen: Some(String::new()),
        ..Overrides::default()
    };
    let toml = format!("{toml}\n[log]\naccess = \"off\"\n");
    Config::parse(&toml, None, &o).expect("test config is valid")
}

/// A farm config from a full TOML text; listen and admin on free loopback ports.
pub fn farm_config(toml: &str) -> Config {
    let o = Overrides {
        listen: Some(free_local_addr().expect("free port").to_string()),
        admin_listen: Some(free_local_addr().expect("free port").to_string()),
        threads: Some(2),
        ..Overrides::default()
    };
    let toml = format!("{toml}\n[log]\naccess = \"off\"\n");
    Config::parse(&toml, None, &o).expect("test config is valid")
}

/// An emulator (256 workers, `service_time` each) and sluice in front of it: a cap of `cap`, a
/// queue of `max_queue` waiting at most `queue_timeout`, no ramp, no health checks, and `toml`
/// (extra sections) on top.
pub async fn emulator_and_proxy(
    service_time: Duration,
    cap: u32,
    max_queue: usize,
    queue_timeout: Duration,
    toml: &str,
) -> (sluice_tests::emulator::Emulator, RunningProxy) {
    let emu = sluice_tests::emulator::Emulator::start(sluice_tests::emulator::EmulatorConfig {
        workers: 256,
        service_time,
        ..sluice_tests::emulator::EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let toml = format!("{NO_RAMP_NO_CHECKS}{toml}");
    let proxy = start(&config_with(
        emu.addr(),
        cap,
        max_queue,
        queue_timeout,
        &toml,
    ));
    (emu, proxy)
}

/// Start sluice; retried once on the rare race where another test took the free port.
pub fn start(cfg: &Config) -> RunningProxy {
    match RunningProxy::start(cfg) {
        Ok(p) => p,
        Err(_) => {
            let mut cfg = cfg.clone();
            cfg.listen = free_local_addr().expect("free port");
            if cfg.admin_listen.is_some() {
                cfg.admin_listen = Some(free_local_addr().expect("free port"));
            }
            RunningProxy::start(&cfg).expect("sluice starts")
        }
    }
}

/// The value of one sluice metric sample, e.g. `sluice_client_connections` or
/// `sluice_client_timeouts_total{phase="body"}`.
pub fn metric(proxy: &RunningProxy, sample: &str) -> Option<u64> {
    let text = proxy.shared().metrics.render(proxy.admission());
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// Poll `cond` until it holds, at most `within`; panics with `what` otherwise.
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    loop {
        if cond() {
            return;
        }
        assert!(started.elapsed() < within, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Raise the open-files soft limit: these tests hold thousands of sockets in one process.
pub fn raise_fd_limit() {
    sluice_tests::raise_fd_limit();
}

/// After clients went away: wait (bounded by `within`) until sluice has released every slot
/// and the backend is idle, then send `cap` slow requests at once through `addr` and assert
/// that all of them were at the backend together: no slot of the cap has leaked.
pub async fn assert_full_capacity(
    addr: SocketAddr,
    admission: &sluice::Admission,
    emu: &sluice_tests::emulator::EmulatorHandle,
    cap: u32,
    within: Duration,
) {
    use sluice_tests::client::{Conn, Request};
    eventually("every slot released", within, || {
        let s = admission.snapshot();
        s.queued == 0 && s.backends[0].inflight == 0
    })
    .await;
    eventually("the backend is idle", Duration::from_secs(10), || {
        emu.inside_now() == 0
    })
    .await;
    emu.reset_stats();
    let slow: Vec<_> = (0..cap)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Conn::connect(addr).await.expect("connect");
                c.send(
                    &Request::get("/pay")
                        .txn(format!("slow-{i}"))
                        .header("X-Service-Time", "500ms"),
                )
                .await
            })
        })
        .collect();
    for s in slow {
        assert_eq!(s.await.expect("join").expect("slow").status, 200);
    }
    assert_eq!(
        emu.stats().max_inside,
        cap as usize,
        "all {cap} slow requests must be at the backend together"
    );
}
