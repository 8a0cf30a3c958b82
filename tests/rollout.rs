//! The rollout demo's simulation, shortened, as the test that guards the whole drain path:
//! a pod deleted while the load balancer still sends loses requests on its own, and loses
//! none with lameduck in front, as a regular or a native sidecar, at a low request rate
//! carried only by health checks, and with slow requests in flight at deregistration. And
//! the canary story: with `dynamicStableScale` the app alone loses requests, lameduck none,
//! at fewer pods than the workaround.
//!
//! The simulation is the demo's own (`examples/rollout/sim`), included by path. Each test
//! runs its scenarios concurrently; everything listens on 127.0.0.1 with ephemeral ports.
//! Assertions are on outcomes, with timing margins of a second or more: the machine may be
//! busy with other builds.

// Shared with the demo, which uses parts of it these tests do not.
#[allow(dead_code)]
#[path = "../examples/rollout/sim/mod.rs"]
mod sim;

use std::fmt::Write;
use std::time::Duration;

use sim::{Mode, Recorder, Report, Scenario};

const MS: fn(u64) -> Duration = Duration::from_millis;

/// The demo's scenario at about a third of its length: health checks every 500 ms,
/// deregistration 1.5 s after the pod is deleted, `--quiet 1.5s` (a full second more than
/// the health-check interval, for a busy machine), `--drain-max 8s`.
fn short(mode: Mode) -> Scenario {
    let mut s = Scenario::new(mode);
    s.rate = 100.0;
    s.connections = 8;
    s.warmup = MS(1000);
    s.lag = MS(1500);
    s.health_check_interval = Some(MS(500));
    s.grace = Duration::from_secs(12);
    s.proxy_args = sim::drain_args(MS(500), MS(1500), Duration::from_secs(8));
    s
}

async fn run(s: Scenario) -> Report {
    let label = s.label.clone();
    sim::run(&s, Recorder::new())
        .await
        .unwrap_or_else(|e| panic!("{label}: the simulation failed to run: {e}"))
}

/// Everything a failed assertion needs to be understood.
fn explain(r: &Report) -> String {
    let mut out = format!(
        "{} ({:?}, lameduck {}):\n  traffic {:?}\n  health checks {:?}\n  drain {:?}\n",
        r.scenario.label,
        r.scenario.mode,
        r.scenario.proxy_args.join(" "),
        r.traffic,
        r.health_checks,
        r.drain.as_ref().map(|d| &d.json)
    );
    for e in &r.events {
        let _ = writeln!(out, "  t0{:+.3}s  {}", e.at, e.kind);
    }
    for s in r
        .samples
        .iter()
        .filter(|s| s.outcome != sim::Outcome::Ok)
        .take(10)
    {
        let _ = writeln!(out, "  failed: {s:?}");
    }
    out
}

/// lameduck kept the pod serving until the load balancer let go: not one error of any
/// class, traffic or health check; the app signalled only after deregistration, once the
/// drain ended on quiet; both containers exited cleanly.
fn assert_no_errors(r: &Report) {
    let why = explain(r);
    assert!(r.traffic.total > 0, "no traffic was sent\n{why}");
    assert_eq!(r.traffic.errors(), 0, "traffic errors with lameduck\n{why}");
    assert_eq!(
        r.health_checks.errors(),
        0,
        "health checks failed with lameduck\n{why}"
    );
    let after = r
        .app_sigterm_after_deregistration()
        .unwrap_or_else(|| panic!("the app never got SIGTERM\n{why}"));
    assert!(
        after > 0.0,
        "the app got SIGTERM {:.2}s before deregistration\n{why}",
        -after
    );
    let drain = r
        .drain
        .as_ref()
        .unwrap_or_else(|| panic!("the preStop hook got no drain answer\n{why}"));
    assert_eq!(drain.reason, "quiet", "the drain hit its cap\n{why}");
    assert!(r.app_exit.is_some(), "the app did not exit\n{why}");
    assert_eq!(
        r.sidecar_exit.map(|(_, code)| code),
        Some(0),
        "lameduck did not exit 0\n{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lameduck_the_rollout_loses_requests() {
    let r = run(short(Mode::AppAlone)).await;
    let why = explain(&r);
    assert!(
        r.traffic.errors() > 0,
        "the app alone lost nothing: the simulation does not reproduce the failure\n{why}"
    );
    // Killed at t0, while the load balancer kept sending until deregistration.
    assert!(r.traffic.refused > 0, "{why}");
    let before = r.app_sigterm_after_deregistration().expect("signalled");
    assert!(before < 0.0, "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lameduck_no_request_fails_regular_or_native() {
    let (regular, native) = tokio::join!(run(short(Mode::Regular)), run(short(Mode::Native)));
    assert_no_errors(&regular);
    assert_no_errors(&native);
    // The native sidecar is signalled only once the app has exited.
    let sidecar_sigterm = native
        .first(|k| *k == sim::EventKind::Sigterm("lameduck"))
        .expect("lameduck got SIGTERM");
    assert!(sidecar_sigterm >= native.app_exit.expect("the app exited"));
}

/// `--quiet auto`: lameduck learns the health-check interval while serving (four checks
/// before t0), drains on the learned window, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_auto_learns_the_window_and_loses_nothing() {
    let mut s = short(Mode::Native);
    s.label = "lameduck, native, --quiet auto".into();
    s.warmup = MS(2500);
    s.set_proxy_arg("--quiet", "auto");
    s.set_proxy_arg("--quiet-fallback", "1500ms");
    let r = run(s).await;
    assert_no_errors(&r);
    let (window, kind) = r
        .drain
        .as_ref()
        .and_then(|d| d.window.clone())
        .expect("/drain names its quiet window");
    assert_eq!(kind, "learned", "{}", explain(&r));
    assert!(
        window > 0.5,
        "a learned window of {window}s does not exceed the 0.5s health-check interval"
    );
}

/// Two requests a second over eight connections: between requests the port is silent for
/// longer than `--quiet`, so only the health checks keep the drain going until the load
/// balancer lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_rate_carried_by_health_checks_still_loses_nothing() {
    let low = |mode| {
        let mut s = short(mode);
        s.label = format!("{} at 0.5 req/s", mode.label());
        s.rate = 0.5;
        s.lag = MS(3000);
        s
    };
    let (regular, native) = tokio::join!(run(low(Mode::Regular)), run(low(Mode::Native)));
    for r in [&regular, &native] {
        assert_no_errors(r);
        assert!(
            r.health_checks.total >= 6,
            "health checks carried the drain\n{}",
            explain(r)
        );
    }
}

/// One request in five takes 2 s: about twenty are in flight at deregistration; each
/// completes, because the app is signalled only after the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_in_flight_still_complete() {
    let slow = |mode| {
        let mut s = short(mode);
        s.label = format!("{} with 20% of requests taking 2s", mode.label());
        s.rate = 50.0;
        s.slow_fraction = 0.2;
        s.slow_delay = MS(2000);
        s
    };
    let (regular, native) = tokio::join!(run(slow(Mode::Regular)), run(slow(Mode::Native)));
    for r in [&regular, &native] {
        assert_no_errors(r);
        // Not vacuous: slow requests were in flight well past deregistration, and all
        // completed (no error above), so the app was signalled only after them.
        let late = r
            .samples
            .iter()
            .filter(|s| s.start < r.deregistered && s.end > r.deregistered + 1.0)
            .count();
        assert!(
            late >= 3,
            "only {late} slow requests in flight at deregistration\n{}",
            explain(r)
        );
    }
}

// === the canary story ===

/// The canary at about a third of the demo's scale: the controller lag 1.5 s, health checks
/// every 500 ms, `--quiet 1.5s` (a full second more than the interval, for a busy machine),
/// pauses of 2.5 s (longer than the lag; a drain of about 3 s may overlap the next step,
/// which costs lameduck one pod of peak at most: 9 against the workaround's 10 unless a
/// drain took over 5 s), the scale-down delay 1 s; 100 req/s over 5 pods.
fn short_canary(lameduck: bool, dynamic: bool) -> sim::canary::CanaryScenario {
    let mut s = sim::canary::CanaryScenario::new(lameduck, dynamic);
    s.rate = 100.0;
    s.warmup = MS(1000);
    s.lag = MS(1500);
    s.pause = MS(2500);
    s.scale_down_delay = MS(1000);
    s.health_check_interval = MS(500);
    s.drain_min = MS(500);
    s.quiet = MS(1500);
    s.drain_max = Duration::from_secs(8);
    s.grace = Duration::from_secs(12);
    s
}

async fn run_canary(s: sim::canary::CanaryScenario) -> sim::canary::CanaryReport {
    let label = s.label.clone();
    sim::canary::run(&s, Recorder::new())
        .await
        .unwrap_or_else(|e| panic!("{label}: the canary failed to run: {e}"))
}

fn explain_canary(r: &sim::canary::CanaryReport) -> String {
    let mut out = format!(
        "{}: traffic {:?}\n  health checks {:?}\n  peak pods {}, pod-seconds {:.1}\n",
        r.scenario.label,
        r.traffic,
        r.health_checks,
        r.peak_pods(),
        r.pod_seconds()
    );
    for (at, line) in &r.timeline {
        let _ = writeln!(out, "  t0{at:+.3}s  {line}");
    }
    for p in &r.pods {
        let _ = writeln!(out, "  {p:?}");
    }
    for s in r
        .samples
        .iter()
        .filter(|s| s.outcome != sim::Outcome::Ok)
        .take(10)
    {
        let _ = writeln!(out, "  failed: {s:?}");
    }
    out
}

/// The seed's canary: with `dynamicStableScale` the app alone loses requests (stable pods
/// killed while the ALB still sends them their old share); the workaround keeps the whole
/// old fleet up; with lameduck, `dynamicStableScale` loses nothing and needs fewer pods
/// than the workaround.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_lameduck_needs_no_extra_pods_and_loses_nothing() {
    let (alone, workaround, lameduck) = tokio::join!(
        run_canary(short_canary(false, true)),
        run_canary(short_canary(false, false)),
        run_canary(short_canary(true, true)),
    );
    let why = explain_canary(&alone);
    assert!(
        alone.traffic.errors() > 0,
        "the app alone lost nothing with dynamicStableScale: the simulation does not \
         reproduce the seed's failure\n{why}"
    );
    let why = explain_canary(&lameduck);
    assert!(lameduck.traffic.total > 1000, "{why}");
    assert_eq!(lameduck.traffic.errors(), 0, "errors with lameduck\n{why}");
    assert_eq!(lameduck.removed(), 5, "every stable pod was removed\n{why}");
    assert_eq!(lameduck.drains_capped(), 0, "a drain hit its cap\n{why}");
    let margin = lameduck
        .earliest_sigterm_after_deregistration()
        .unwrap_or_else(|| panic!("no app was signalled\n{why}"));
    assert!(margin > 0.0, "an app was signalled while registered\n{why}");
    assert_eq!(
        workaround.peak_pods(),
        10,
        "{}",
        explain_canary(&workaround)
    );
    assert!(
        lameduck.peak_pods() < workaround.peak_pods(),
        "lameduck peaked at {} pods, the workaround at {}\n{why}",
        lameduck.peak_pods(),
        workaround.peak_pods()
    );
    assert!(
        lameduck.pod_seconds() < workaround.pod_seconds(),
        "{why}\n{}",
        explain_canary(&workaround)
    );
}
