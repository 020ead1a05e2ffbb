//! The `sluice` binary's command line: exit status and messages for good and bad configs.
//!
//! Every file in `conf/` must pass `sluice check`; every kind of invalid config must exit with
//! status 2 and a message that names the key.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf")
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn check(text: &str, name: &str) -> Output {
    let path = write_config(name, text);
    sluice()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run sluice check")
}

fn assert_config_error(out: &Output, must_mention: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {stderr}");
    for m in must_mention {
        assert!(stderr.contains(m), "stderr must mention {m:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "must not panic: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one clear message: {stderr}"
    );
}

const VALID: &str = "[admission]\nmax_inflight = 16\n[[backend]]\naddress = \"127.0.0.1:9\"\n";

#[test]
fn every_shipped_config_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(conf_dir()).expect("conf/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = sluice()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run sluice check");
        assert!(
            out.status.success(),
            "{} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 1, "conf/ must hold at least one config");
}

#[test]
fn check_prints_limits_and_what_request_n_plus_one_gets() {
    let out = check(VALID, "valid.toml");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("max_inflight 16"), "{stdout}");
    assert!(stdout.contains("request 17 waits"), "{stdout}");
    assert!(stdout.contains("request 1017 gets 503"), "{stdout}");
}

/// `sluice check` says what the health check accepts: with the defaults, any answer below
/// 500 (a legacy site's 403 or 404 at `/` is alive); a strict list, the flags, and a
/// passively-downed backend's way back.
#[test]
fn check_prints_what_the_health_check_accepts() {
    let stdout = |out: &Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = stdout(&check(VALID, "health-default.toml"));
    assert!(
        text.contains(
            "health            http GET / every 2s, alive on any answer below 500 within 1s; \
             rise 2, fall 3; passive: 3 failures (connect failures or timeouts in a row) take a \
             backend down; back after 2 answers in a row\n"
        ),
        "{text}"
    );
    let text = stdout(&check(
        &format!("{VALID}[health]\npath = \"/health\"\nexpect_status = [200]\n"),
        "health-strict.toml",
    ));
    assert!(
        text.contains("http GET /health every 2s, alive on only 200 within 1s")
            && text.contains("back after 2 answers below 500 in a row to GET /health every 2s"),
        "{text}"
    );
    let out = sluice()
        .args([
            "check",
            "--backend",
            "127.0.0.1:9",
            "--max-inflight",
            "32",
            "--health-check",
            "none",
            "--health-path",
            "/ping",
        ])
        .output()
        .expect("run");
    let text = stdout(&out);
    assert!(
        text.contains("health            no active check; passive: 3 failures")
            && text.contains("back after 2 answers below 500 in a row to GET /ping every 2s"),
        "{text}"
    );
}

#[test]
fn bad_health_flags_exit_2_naming_the_key_the_value_and_the_fix() {
    let run = |flag: &str, value: &str| {
        sluice()
            .args([
                "check",
                "--backend",
                "127.0.0.1:9",
                "--max-inflight",
                "8",
                flag,
                value,
            ])
            .output()
            .expect("run")
    };
    assert_config_error(
        &run("--health-check", "https"),
        &[
            "health.check = \"https\"",
            "\"http\"",
            "\"tcp\"",
            "\"none\"",
        ],
    );
    assert_config_error(
        &run("--health-path", "health"),
        &["health.path = \"health\"", "absolute path"],
    );
}

#[test]
fn unknown_key_exits_2_naming_it() {
    let out = check(&format!("{VALID}[server]\nthreadz = 4\n"), "unknown.toml");
    assert_config_error(&out, &["threadz"]);
}

#[test]
fn zero_limit_exits_2_naming_it() {
    let out = check(
        "[admission]\nmax_inflight = 0\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
        "zero.toml",
    );
    assert_config_error(&out, &["admission.max_inflight", "= 0"]);
}

#[test]
fn bad_duration_exits_2_naming_it() {
    let out = check(
        "[admission]\nmax_inflight = 4\nqueue_timeout = \"ten\"\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
        "duration.toml",
    );
    assert_config_error(&out, &["queue_timeout", "\"ten\""]);
}

#[test]
fn unparsable_listen_address_exits_2_naming_it() {
    let out = check(
        &format!("[proxy]\nlisten = \"localhost-8080\"\n{VALID}"),
        "listen.toml",
    );
    assert_config_error(&out, &["proxy.listen", "localhost-8080"]);
}

#[test]
fn bad_flag_value_exits_2() {
    let out = sluice()
        .args(["check", "--backend", "127.0.0.1:9", "--max-inflight", "0"])
        .output()
        .expect("run");
    assert_config_error(&out, &["admission.max_inflight"]);
    let out = sluice()
        .args([
            "check",
            "--backend",
            "127.0.0.1:9",
            "--queue-timeout",
            "soon",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_file_exits_2() {
    let out = sluice()
        .args(["check", "--config", "/nonexistent/sluice.toml"])
        .output()
        .expect("run");
    assert_config_error(&out, &["/nonexistent/sluice.toml"]);
}

#[test]
fn listen_address_in_use_fails_at_once() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let started = Instant::now();
    let mut child = sluice()
        .args([
            "run",
            "--backend",
            "127.0.0.1:9",
            "--max-inflight",
            "4",
            "--listen",
        ])
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice run");
    // Bounded wait: pingora alone would retry for 30 s; we must fail well before that.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("sluice kept running with its listen address in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("proxy.listen") && stderr.contains("already in use"),
        "{stderr}"
    );
    drop(held);
}

/// `sluice demo` (the README's first command, shortened): hit directly, the emulated server
/// locks up; through sluice it is held at exactly 32 requests inside, never locks up, and every
/// terminal gets an answer.
#[test]
fn demo_shows_the_backend_held_at_its_cap() {
    let out = sluice()
        .args(["demo", "--terminals", "300", "--seconds", "2"])
        .output()
        .expect("run sluice demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |path: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(path) && w.next().is_some_and(|n| n.parse::<u64>().is_ok())
            })
            .unwrap_or_else(|| panic!("no {path} row in:\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // Columns: path, ok, goodput, errors, 503s, backend max conc, backend conns, lockups, p99.
    let direct = row("direct");
    let through = row("sluice");
    assert!(direct[7].parse::<u32>().expect("lockups") >= 1, "{stdout}");
    assert_eq!(through[3], "0", "errors through sluice: {stdout}");
    assert_eq!(
        through[5], "32",
        "backend max concurrency through sluice: {stdout}"
    );
    assert_eq!(through[7], "0", "lock-ups through sluice: {stdout}");
    assert!(through[6].parse::<u32>().expect("conns") <= 32, "{stdout}");
}

#[test]
fn calibrate_bad_options_exit_2_naming_option_value_and_fix() {
    let calibrate = |extra: &[&str]| {
        sluice()
            .args(["calibrate", "--path", "/pay"])
            .args(extra)
            .output()
            .expect("run sluice calibrate")
    };
    let out = calibrate(&["--backend", "nonsense"]);
    assert_config_error(&out, &["--backend", "\"nonsense\"", "write it like"]);
    let out = calibrate(&["--backend", "127.0.0.1:9", "--max", "0"]);
    assert_config_error(&out, &["--max = 0", "must be between 1 and", "e.g. 64"]);
    let out = calibrate(&["--backend", "127.0.0.1:9", "--step-time", "0s"]);
    assert_config_error(&out, &["--step-time", "longer than zero"]);
    let out = sluice()
        .args(["calibrate", "--backend", "127.0.0.1:9", "--path", "pay"])
        .output()
        .expect("run");
    assert_config_error(&out, &["--path = \"pay\"", "starting with /"]);
    // --path is required: a legacy IIS answers `/` with 403, which measures nothing.
    let out = sluice()
        .args(["calibrate", "--backend", "127.0.0.1:9"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--path"));
}
