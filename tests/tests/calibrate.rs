//! End-to-end: `sluice calibrate`'s measurement, in-process, against the legacy-server emulator.
//!
//! The demo server (32 workers × 20 ms, locks up above 64 requests inside) must get a proposal
//! near its worker count, without calibrate ever pushing it past `--max` (or, with a generous
//! `--max`, past its lock-up point); a server that locks up early must stop the calibration at
//! the first error and get a proposal below the trouble.

use std::time::Duration;

use sluice::calibrate::{calibrate, Plan};
use sluice_plugins::calibrate::StopReason;
use sluice_tests::emulator::{Emulator, EmulatorConfig};
use tokio::sync::watch;

fn demo_server() -> EmulatorConfig {
    sluice::demo::demo_backend_config()
}

/// Short steps for a test. The p99 bound is explicit: on a loaded 2-core machine a short step's
/// p99 picks up scheduler stalls that the default (5 × the p99 at concurrency 1) may take for
/// overload; the p99 rule itself is unit-tested in `sluice_plugins::calibrate`.
fn quick_plan(emu: &Emulator, max: u32) -> Plan {
    Plan {
        max,
        step_time: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        p99_bound: Some(Duration::from_millis(300)),
        timeout: Duration::from_secs(5),
        ..Plan::new(emu.addr(), "/pay")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposes_about_the_worker_count_and_never_passes_max() {
    let emu = Emulator::start(demo_server()).await.expect("emulator");
    let (_tx, rx) = watch::channel(false);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        calibrate(quick_plan(&emu, 40), rx, |_| {}),
    )
    .await
    .expect("calibration ends in time")
    .expect("calibration runs");
    let stats = emu.stats();
    let steps = out.calibration.steps();
    let table: Vec<_> = steps
        .iter()
        .map(|s| (s.concurrency, s.throughput.round(), s.p99, s.errors))
        .collect();
    assert!(
        stats.max_inside <= 40,
        "the server saw {} inside: {table:?}",
        stats.max_inside
    );
    assert!(stats.max_open_connections <= 40, "{stats:?}");
    assert_eq!(stats.lockups, 0, "{stats:?}");
    assert!(steps.iter().all(|s| s.concurrency <= 40), "{table:?}");
    assert!(steps.iter().all(|s| s.errors == 0), "{table:?}");
    assert!(!out.interrupted);
    let p = out.calibration.proposal().expect("a proposal");
    assert!(
        (28..=36).contains(&p.max_inflight),
        "proposed {p:?} from {table:?}"
    );
    // The server did the work: throughput at the knee is near 32 / 20 ms = 1,600 req/s.
    assert!(p.best_throughput > 1000.0, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stopping_rule_keeps_the_server_below_its_lockup_with_a_generous_max() {
    let emu = Emulator::start(demo_server()).await.expect("emulator");
    let (_tx, rx) = watch::channel(false);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        calibrate(quick_plan(&emu, 256), rx, |_| {}),
    )
    .await
    .expect("calibration ends in time")
    .expect("calibration runs");
    let stats = emu.stats();
    let table: Vec<_> = out
        .calibration
        .steps()
        .iter()
        .map(|s| (s.concurrency, s.throughput.round(), s.p99, s.errors))
        .collect();
    // Throughput is flat past 32: the ramp stops two steps later (at 44 or 55), far below 256
    // and below the lock-up point.
    assert!(
        matches!(
            out.calibration.stop_reason(),
            Some(StopReason::Plateau { .. })
        ),
        "{:?} {table:?}",
        out.calibration.stop_reason()
    );
    assert!(stats.max_inside <= 55, "{} {table:?}", stats.max_inside);
    assert_eq!(stats.lockups, 0, "{stats:?}");
    let p = out.calibration.proposal().expect("a proposal");
    assert!(
        (28..=44).contains(&p.max_inflight),
        "proposed {p:?} from {table:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_stop_it_at_once_and_the_proposal_stays_below_them() {
    // A server that locks up above 16 inside: its requests time out.
    let emu = Emulator::start(EmulatorConfig {
        workers: 32,
        lockup_above: Some(16),
        ..demo_server()
    })
    .await
    .expect("emulator");
    let (_tx, rx) = watch::channel(false);
    let plan = Plan {
        timeout: Duration::from_millis(1500),
        ..quick_plan(&emu, 64)
    };
    let out = tokio::time::timeout(Duration::from_secs(60), calibrate(plan, rx, |_| {}))
        .await
        .expect("calibration ends in time")
        .expect("calibration runs");
    let steps = out.calibration.steps();
    let table: Vec<_> = steps
        .iter()
        .map(|s| (s.concurrency, s.throughput.round(), s.errors))
        .collect();
    let last = steps.last().expect("steps");
    assert_eq!(last.concurrency, 17, "the first step above 16: {table:?}");
    assert!(last.errors > 0, "{table:?}");
    assert!(
        matches!(
            out.calibration.stop_reason(),
            Some(StopReason::Errors {
                concurrency: 17,
                ..
            })
        ),
        "{table:?}"
    );
    assert!(out.first_error.is_some());
    assert_eq!(emu.stats().lockups, 1, "one lock-up, no second try");
    let p = out.calibration.proposal().expect("a proposal");
    assert!(
        p.max_inflight <= 13 * 8 / 10,
        "at most 80 % of the last clean step: {p:?}"
    );
}
