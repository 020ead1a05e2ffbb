//! Zero-downtime upgrade of the real binary under load: a new process takes over the
//! listening sockets (`sluice run --upgrade`, then SIGQUIT to the old one). No request fails,
//! and the two processes together never put more than the cap on the backend.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::emulator::{Emulator, EmulatorConfig};
use sluice_tests::terminals::{self, ConnMode, HttpMix, LoadConfig, StartMode};

const CAP: usize = 8;

fn sluice(args: &[&str], config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sluice")
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("sluice did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start the new process with `--upgrade`, wait until it waits on the upgrade socket `sock`,
/// and send the old process (`old_pid`) SIGQUIT: the hand-over begins.
async fn start_upgrade(cleanup: &mut Cleanup, config: &Path, sock: &Path, old_pid: u32) {
    cleanup.0.push(sluice(&["run", "--upgrade"], config));
    let s = sock.to_path_buf();
    tokio::task::spawn_blocking(move || {
        wait_until(
            "the new process is waiting",
            Duration::from_secs(15),
            || s.exists(),
        );
        signal(old_pid, "-QUIT");
    })
    .await
    .expect("join");
}

struct Cleanup(Vec<Child>, PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_keeps_the_cap_and_fails_nothing() {
    sluice_tests::raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(20),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let dir = std::env::temp_dir().join(format!("sluice-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let listen = sluice::run::free_local_addr().expect("port");
    let sock = dir.join("upgrade.sock");
    let pid_file = dir.join("sluice.pid");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"{listen}\"\n\
             [admission]\nmax_inflight = {CAP}\nmax_queue = 5000\nqueue_timeout = \"20s\"\n\
             [slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n\
             [admin]\nlisten = \"\"\n[log]\naccess = \"off\"\n\
             [[backend]]\nname = \"iis\"\naddress = \"{}\"\n\
             [server]\nthreads = 2\ngrace_period = \"2s\"\ngraceful_shutdown_timeout = \"1s\"\n\
             pid_file = \"{}\"\nupgrade_sock = \"{}\"\n",
            emu.addr(),
            pid_file.display(),
            sock.display()
        ),
    )
    .expect("write config");
    let mut cleanup = Cleanup(Vec::new(), dir.clone());

    cleanup.0.push(sluice(&["run"], &config));
    wait_until("the old process listens", Duration::from_secs(15), || {
        TcpStream::connect(listen).is_ok()
    });
    let old_pid = cleanup.0[0].id();

    let load = tokio::spawn(terminals::run(LoadConfig {
        target: listen,
        terminals: 64,
        transactions_per_terminal: None,
        duration: Some(Duration::from_secs(10)),
        conn_mode: ConnMode::PerTransaction,
        http: HttpMix::Mixed,
        start: StartMode::AllAtOnce,
        request_timeout: Duration::from_secs(30),
        ..LoadConfig::default()
    }));
    emu.wait_for(Duration::from_secs(10), |s| s.requests > 200)
        .await
        .expect("traffic flows through the old process");

    // The new process binds the upgrade socket and waits for the listeners.
    start_upgrade(&mut cleanup, &config, &sock, old_pid).await;
    let mut old = cleanup.0.remove(0);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut old, Duration::from_secs(30)))
        .await
        .expect("join");
    assert!(status.success(), "old process exit: {status:?}");
    let served_after_old_left = emu.stats().requests;

    let report = load.await.expect("load");
    assert!(report.sent > 1000, "{report}");
    assert_eq!(
        report.ok, report.sent,
        "no request may fail across the upgrade: {report}"
    );
    assert_eq!(report.mismatched, 0);
    let stats = emu.stats();
    assert!(
        stats.max_inside <= CAP,
        "both processes together put {} on the backend; cap {CAP}",
        stats.max_inside
    );
    assert!(
        stats.requests > served_after_old_left,
        "the new process served"
    );

    let new_pid = cleanup.0[0].id();
    signal(new_pid, "-INT");
    let mut new = cleanup.0.remove(0);
    tokio::task::spawn_blocking(move || wait_exit(&mut new, Duration::from_secs(30)))
        .await
        .expect("join");
}

/// A config file for the binary in `dir`: one backend at `backend` capped at `cap`, the pid
/// file and upgrade socket inside `dir`.
fn write_config(
    dir: &Path,
    listen: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    cap: usize,
    grace: &str,
) -> PathBuf {
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"{listen}\"\nclient_keepalive_timeout = \"30s\"\n\
             [admission]\nmax_inflight = {cap}\nmax_queue = 5000\nqueue_timeout = \"20s\"\n\
             [slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n\
             [admin]\nlisten = \"\"\n[log]\naccess = \"off\"\n\
             [[backend]]\nname = \"iis\"\naddress = \"{backend}\"\n\
             [server]\nthreads = 2\ngrace_period = \"{grace}\"\ngraceful_shutdown_timeout = \"1s\"\n\
             pid_file = \"{}\"\nupgrade_sock = \"{}\"\n",
            dir.join("sluice.pid").display(),
            dir.join("upgrade.sock").display()
        ),
    )
    .expect("write config");
    config
}

/// A temporary directory unique to this test run.
fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("sluice-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// The scenario: 400 terminals on kept-alive connections, each sending every 0.3 s,
/// and an upgrade in the middle. The old process keeps its client connections through its
/// grace period, serves the requests that arrive on them (answered with `Connection: close`),
/// and hands over its share of the cap only as its connections, client and backend, close.
/// Not one request fails, each reaches the backend exactly once, and the backend never sees
/// more than the cap in requests nor in open connections, in its own count. The old process
/// hands a slot over only once the backend has closed that slot's connection too, and keeps a
/// slot for each of its idle connections: a request within its capacity may find pingora's
/// pool empty and dial beside them (before, that put the backend at 33 to 36 connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_kept_alive_terminals_fails_nothing_and_keeps_connections_in_cap() {
    const CAP: usize = 32;
    const TERMINALS: usize = 400;
    sluice_tests::raise_fd_limit();
    let emu = Emulator::start(EmulatorConfig {
        workers: 2 * CAP,
        service_time: Duration::from_millis(10),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let dir = temp_dir("upgrade-ka");
    let listen = sluice::run::free_local_addr().expect("port");
    let config = write_config(&dir, listen, emu.addr(), CAP, "2s");
    let sock = dir.join("upgrade.sock");
    let mut cleanup = Cleanup(Vec::new(), dir.clone());

    cleanup.0.push(sluice(&["run"], &config));
    wait_until("the old process listens", Duration::from_secs(15), || {
        TcpStream::connect(listen).is_ok()
    });
    let old_pid = cleanup.0[0].id();

    let think = Duration::from_millis(300);
    let load = tokio::spawn(terminals::run(LoadConfig {
        target: listen,
        terminals: TERMINALS,
        transactions_per_terminal: None,
        // Upgrade after ~2 s; the old process accepts 5 s more (pingora's CLOSE_TIMEOUT),
        // then drains for its 2 s grace period: the load runs past its exit.
        duration: Some(Duration::from_secs(12)),
        conn_mode: ConnMode::KeepAlive,
        http: HttpMix::Mixed,
        start: StartMode::Ramp(think),
        offered_rate: Some(TERMINALS as f64 / think.as_secs_f64()),
        method: terminals::Method::Post,
        request_timeout: Duration::from_secs(30),
        record_ids: true,
        ..LoadConfig::default()
    }));
    emu.wait_for(Duration::from_secs(10), |s| {
        s.requests > 2 * TERMINALS as u64
    })
    .await
    .expect("traffic flows through the old process");

    start_upgrade(&mut cleanup, &config, &sock, old_pid).await;
    let quit = Instant::now();
    let mut old = cleanup.0.remove(0);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut old, Duration::from_secs(30)))
        .await
        .expect("join");
    assert!(status.success(), "old process exit: {status:?}");
    eprintln!("old process exited {:?} after SIGQUIT", quit.elapsed());
    let served_after_old_left = emu.stats().requests;

    let report = load.await.expect("load");
    let stats = emu.stats();
    eprintln!(
        "{report}\nbackend: max inside {}, max open connections {}, accepted connections {}",
        stats.max_inside, stats.max_open_connections, stats.accepted_connections
    );
    assert!(report.sent > 10 * TERMINALS as u64, "{report}");
    assert_eq!(report.errors(), 0, "no request may fail: {report}");
    assert_eq!(
        report.ok, report.sent,
        "every request gets its 200 across the upgrade: {report}"
    );
    assert_eq!(report.mismatched, 0, "{report}");
    let seen = emu.transactions();
    assert_eq!(
        seen.len() as u64,
        report.sent,
        "every transaction reaches the backend exactly once"
    );
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "no transaction reached the backend twice"
    );
    assert!(
        report.ok_ids.iter().all(|id| unique.contains(id)),
        "every answered transaction reached the backend"
    );
    assert!(
        stats.max_inside <= CAP,
        "both processes together put {} requests on the backend; cap {CAP}",
        stats.max_inside
    );
    assert!(
        stats.max_open_connections <= CAP,
        "both processes together held {} backend connections; cap {CAP}",
        stats.max_open_connections
    );
    assert!(
        stats.requests > served_after_old_left,
        "the new process served"
    );

    let new_pid = cleanup.0[0].id();
    signal(new_pid, "-INT");
    let mut new = cleanup.0.remove(0);
    tokio::task::spawn_blocking(move || wait_exit(&mut new, Duration::from_secs(30)))
        .await
        .expect("join");
}

/// During an upgrade's grace period the old process keeps one slot of the cap for each client
/// connection it still holds: a terminal that stayed idle past the old process's last request,
/// then sends on its kept-alive connection, is served (with `Connection: close`) instead of
/// waiting for a slot that was handed to the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_serves_a_late_request_on_an_idle_kept_alive_connection() {
    use sluice_tests::client::{Conn, Request};
    const CAP: usize = 4;
    // The backend closes idle connections after 200 ms (as IIS does after its keep-alive
    // timeout): the old process holds no idle backend connection, for which it would keep a
    // slot of its own (see `hand_over`).
    let emu = Emulator::start(EmulatorConfig {
        keepalive_timeout: Duration::from_millis(200),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let dir = temp_dir("upgrade-late");
    let listen = sluice::run::free_local_addr().expect("port");
    let admin = sluice::run::free_local_addr().expect("port");
    let config = write_config(&dir, listen, emu.addr(), CAP, "10s");
    let text = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(
        &config,
        text.replace(
            "[admin]\nlisten = \"\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        ),
    )
    .expect("write config");
    let sock = dir.join("upgrade.sock");
    let mut cleanup = Cleanup(vec![sluice(&["run"], &config)], dir.clone());
    wait_until("the old process listens", Duration::from_secs(15), || {
        TcpStream::connect(listen).is_ok()
    });
    let mut late = Conn::connect(listen).await.expect("connect");
    let r = late
        .send(&Request::post("/pay", "x").txn("before"))
        .await
        .expect("send");
    assert!(r.status == 200 && r.keep_alive());

    let old_pid = cleanup.0[0].id();
    start_upgrade(&mut cleanup, &config, &sock, old_pid).await;
    tokio::task::spawn_blocking(move || {
        // Once the old process stopped accepting, it keeps one slot (for this connection)
        // and the new process has the rest.
        wait_until(
            "the new process has all but one slot",
            Duration::from_secs(20),
            || {
                let Ok((200, body)) = sluice::ops::admin::client::call(admin, "GET", "/status")
                else {
                    return false;
                };
                serde_json::from_str::<sluice::ops::admin::Status>(&body)
                    .ok()
                    .and_then(|st| st.backends.first().map(|b| b.effective_limit))
                    == Some(CAP as u32 - 1)
            },
        );
    })
    .await
    .expect("join");

    let r = late
        .send(&Request::post("/pay", "late payment").txn("late"))
        .await
        .expect("the late request is answered");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.txn_id(), Some("late"));
    assert!(!r.keep_alive(), "answered with Connection: close");
    assert!(
        late.is_closed_by_peer_within(Duration::from_secs(2)).await,
        "closed after the answer"
    );
    assert_eq!(
        emu.transactions().iter().filter(|t| *t == "late").count(),
        1,
        "the late request reached the backend once"
    );
}

/// SIGTERM (graceful stop) keeps kept-alive connections through the grace period: one that
/// sends its next request after the listener closed gets a `200` with `Connection: close`;
/// one that stays idle is closed only when the grace period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_kept_alive_connections_and_closes_idle_ones_at_the_end_of_grace() {
    use sluice_tests::client::{Conn, Request};
    const GRACE: Duration = Duration::from_secs(3);
    let emu = Emulator::start(EmulatorConfig::default())
        .await
        .expect("emulator");
    let dir = temp_dir("sigterm");
    let listen = sluice::run::free_local_addr().expect("port");
    let config = write_config(&dir, listen, emu.addr(), 4, "3s");
    let mut cleanup = Cleanup(vec![sluice(&["run"], &config)], dir.clone());
    wait_until("sluice listens", Duration::from_secs(15), || {
        TcpStream::connect(listen).is_ok()
    });

    let mut busy = Conn::connect(listen).await.expect("connect");
    let mut idle = Conn::connect(listen).await.expect("connect");
    for (c, id) in [(&mut busy, "before-1"), (&mut idle, "before-2")] {
        let r = c
            .send(&Request::post("/pay", "x").txn(id))
            .await
            .expect("send");
        assert_eq!(r.status, 200);
        assert!(r.keep_alive(), "kept alive before the stop");
    }

    signal(cleanup.0[0].id(), "-TERM");
    let term = Instant::now();
    // The listener closes as shutdown starts.
    tokio::task::spawn_blocking(move || {
        wait_until("the listener closes", Duration::from_secs(10), || {
            TcpStream::connect(listen).is_err()
        })
    })
    .await
    .expect("join");
    assert!(
        term.elapsed() < GRACE,
        "shutdown started within the grace period"
    );

    let r = busy
        .send(&Request::post("/pay", "late payment").txn("during-grace"))
        .await
        .expect("a request during the grace period is answered");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.txn_id(), Some("during-grace"));
    assert!(!r.keep_alive(), "answered with Connection: close");
    assert!(
        busy.is_closed_by_peer_within(Duration::from_secs(2)).await,
        "closed after the answer"
    );
    assert!(
        emu.transactions().iter().any(|t| t == "during-grace"),
        "the late request reached the backend"
    );

    assert!(
        idle.is_closed_by_peer_within(GRACE + Duration::from_secs(5))
            .await,
        "the idle connection is closed at the end of the grace period"
    );
    let closed_after = term.elapsed();
    assert!(
        closed_after >= GRACE - Duration::from_millis(200),
        "the idle connection was closed {closed_after:?} after SIGTERM, before the grace period ({GRACE:?}) ended"
    );
    let mut child = cleanup.0.remove(0);
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(30)))
            .await
            .expect("join");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// SIGHUP re-reads the config file in the running binary: the new limit is in force without a
/// restart, and `sluice status` shows it.
#[test]
fn sighup_reloads_the_config_file() {
    let dir = std::env::temp_dir().join(format!("sluice-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let listen = sluice::run::free_local_addr().expect("port");
    let admin = sluice::run::free_local_addr().expect("port");
    let config = dir.join("sluice.toml");
    let file = |cap: u32| {
        format!(
            "[proxy]\nlisten = \"{listen}\"\n[admission]\nmax_inflight = {cap}\n\
             [slow_start]\nduration = \"0s\"\n[health]\ncheck = \"none\"\n\
             [admin]\nlisten = \"{admin}\"\n[log]\naccess = \"off\"\n\
             [[backend]]\nname = \"iis\"\naddress = \"127.0.0.1:9\"\n\
             [server]\npid_file = \"{}\"\nupgrade_sock = \"{}\"\n",
            dir.join("pid").display(),
            dir.join("sock").display()
        )
    };
    std::fs::write(&config, file(4)).expect("write");
    let mut cleanup = Cleanup(vec![sluice(&["run"], &config)], dir.clone());
    let limit = || -> Option<u32> {
        let (code, body) = sluice::ops::admin::client::call(admin, "GET", "/status").ok()?;
        (code == 200).then_some(())?;
        let st: sluice::ops::admin::Status = serde_json::from_str(&body).ok()?;
        st.backends.first().map(|b| b.max_inflight)
    };
    wait_until(
        "the admin listener answers",
        Duration::from_secs(15),
        || limit() == Some(4),
    );
    std::fs::write(&config, file(9)).expect("rewrite");
    // The reload service listens once its runtime has started, which may be after the admin
    // listener answers: a SIGHUP before that is ignored (not fatal), so it is sent again, as
    // an operator would, every half second until the new limit shows.
    let pid = cleanup.0[0].id();
    let mut next_hup = Instant::now();
    wait_until("the new limit is in force", Duration::from_secs(10), || {
        if Instant::now() >= next_hup {
            signal(pid, "-HUP");
            next_hup = Instant::now() + Duration::from_millis(500);
        }
        limit() == Some(9)
    });
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .expect("sluice status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("iis") && table.contains("/9"), "{table}");
    // Still running after the reload (SIGHUP's default action would have killed it).
    assert!(cleanup.0[0].try_wait().expect("wait").is_none());
    signal(cleanup.0[0].id(), "-INT");
    let mut child = cleanup.0.remove(0);
    wait_exit(&mut child, Duration::from_secs(30));
}
