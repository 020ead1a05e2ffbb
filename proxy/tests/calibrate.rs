//! The `sluice calibrate` binary against the emulated demo server: the table, the proposal and
//! the files it writes; Ctrl-C ends it with the steps measured so far; a URL answered with a
//! 4xx is a usage error; an unreachable backend a run-time one.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::emulator::{EmulatorConfig, EmulatorThread};

fn demo_server() -> EmulatorThread {
    EmulatorThread::start(EmulatorConfig {
        workers: 32,
        service_time: Duration::from_millis(20),
        lockup_above: Some(64),
        lockup_duration: Duration::from_secs(3),
        ..EmulatorConfig::default()
    })
    .expect("emulator")
}

fn calibrate(backend: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.args(["calibrate", "--backend", backend, "--path", "/pay"])
        .args([
            // 600 ms a step: with 300 ms, one saturated step measured 6 % below the next on a
            // slow shared machine, and the curve looked still rising at --max.
            "--step-time",
            "600ms",
            "--warmup",
            "100ms",
            "--p99-bound",
            "300ms",
        ])
        .args(extra);
    c
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-calibrate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn prints_the_table_and_proposal_and_writes_csv_and_svg() {
    let emu = demo_server();
    let dir = out_dir("files");
    let out = calibrate(&emu.addr().to_string(), &["--max", "40", "--out"])
        .arg(&dir)
        .output()
        .expect("run sluice calibrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("concurrency     req/s   p50 ms   p90 ms   p99 ms  errors"),
        "{stdout}"
    );
    let proposed: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("proposal:  admission.max_inflight = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no proposal line: {stdout}"));
    assert!((28..=36).contains(&proposed), "{stdout}");
    assert!(stdout.contains("<- knee"), "{stdout}");
    assert!(
        !stdout.contains("still rising"),
        "the curve is flat past 32: {stdout}"
    );
    assert!(emu.stats().max_inside <= 40, "{:?}", emu.stats());

    let csv = std::fs::read_to_string(dir.join("calibrate.csv")).expect("calibrate.csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("concurrency,requests_per_s,p50_ms,p90_ms,p99_ms,errors,completed")
    );
    let concurrencies: Vec<u32> = lines
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|c| c.parse().ok())
                .expect("row")
        })
        .collect();
    assert!(concurrencies.windows(2).all(|w| w[0] < w[1]), "{csv}");
    assert_eq!(concurrencies.first(), Some(&1));
    assert_eq!(concurrencies.last(), Some(&40), "{csv}");
    let svg = std::fs::read_to_string(dir.join("calibrate.svg")).expect("calibrate.svg");
    assert!(
        svg.contains(&format!("proposed max_inflight = {proposed}")),
        "{svg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_with_a_partial_table() {
    let emu = demo_server();
    let mut child = calibrate(&emu.addr().to_string(), &["--max", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice calibrate");
    // Wait (bounded) for the step at concurrency 4 on the progress output, then interrupt.
    let mut progress = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    for _ in 0..100 {
        let mut line = String::new();
        if progress.read_line(&mut line).expect("read stderr") == 0 {
            break;
        }
        seen.push_str(&line);
        if line.trim_start().starts_with("4 ") {
            break;
        }
    }
    assert!(
        seen.lines().any(|l| l.trim_start().starts_with("4 ")),
        "{seen}"
    );
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("calibrate kept running after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    assert_eq!(status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("stopped:   interrupted"), "{stdout}");
    let rows = stdout.lines().skip(1).take_while(|l| !l.is_empty()).count();
    assert!((3..=6).contains(&rows), "a partial table: {stdout}");
    assert!(stdout.contains("interrupted calibration"), "{stdout}");
    // It stopped sending: nothing is left inside the server.
    assert_eq!(emu.inside_now(), 0);
}

#[test]
fn a_url_answered_with_an_error_page_is_a_usage_error() {
    let emu = demo_server();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["calibrate", "--backend", &emu.addr().to_string()])
        .args(["--path", "/__emu/reset"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`--path = \"/__emu/reset\"`: the backend answered 405"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_backend_is_a_runtime_error() {
    // A port nobody listens on: bind, note it, close.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let out = calibrate(&addr.to_string(), &[]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to"), "{stderr}");
}
