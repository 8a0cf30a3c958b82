//! Tests of `drain.rs` (the lifecycle handle, the clock, the release, the guards).

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn policy() -> DrainPolicy {
    DrainPolicy {
        min: S(5),
        quiet: S(10),
        max: S(60),
    }
}

#[test]
fn check_table() {
    use DrainReason::*;
    use Verdict::*;
    let p = policy();
    // (elapsed, idle, in_flight) -> verdict
    let cases = [
        // Just started, traffic still arriving: wait for the quiet window.
        ((0, 0, 0), Wait(S(10))),
        // Quiet long ago, but drain-min not reached yet.
        ((1, 100, 0), Wait(S(4))),
        // drain-min reached and quiet: drained.
        ((5, 10, 0), Drained(Quiet)),
        ((30, 12, 0), Drained(Quiet)),
        // Quiet but a request still in flight: wait (woken when it ends).
        ((30, 20, 1), Wait(S(30))),
        // Requests keep arriving: never quiet, capped by max.
        ((59, 0, 0), Wait(S(1))),
        ((60, 0, 0), Drained(Max)),
        ((61, 0, 3), Drained(Max)),
        // Quiet remaining beyond the cap: wake at the cap.
        ((55, 0, 0), Wait(S(5))),
    ];
    for ((e, i, f), want) in cases {
        assert_eq!(
            check(&p, S(e), S(i), f),
            want,
            "elapsed={e} idle={i} in_flight={f}"
        );
    }
}

#[test]
fn zero_policy_drains_at_once() {
    let p = DrainPolicy {
        min: Duration::ZERO,
        quiet: Duration::ZERO,
        max: S(1),
    };
    assert_eq!(
        check(&p, Duration::ZERO, Duration::ZERO, 0),
        Verdict::Drained(DrainReason::Quiet)
    );
}

#[tokio::test(start_paused = true)]
async fn drain_ends_quiet_and_is_idempotent() {
    let lc = Lifecycle::new(DrainSettings::fixed(
        Duration::from_millis(100),
        Duration::from_millis(500),
        S(10),
    ));
    assert!(lc.start_drain(Trigger::Admin));
    assert!(!lc.start_drain(Trigger::Signal));
    assert_eq!(lc.phase(), Phase::Draining);
    let State::Drained { reason, .. } = lc.drained().await else {
        unreachable!()
    };
    assert_eq!(reason, DrainReason::Quiet);
    assert_eq!(lc.phase(), Phase::Drained);
}

#[tokio::test(start_paused = true)]
async fn in_flight_request_holds_until_max() {
    let lc = Lifecycle::new(DrainSettings::fixed(
        Duration::ZERO,
        Duration::from_millis(100),
        S(2),
    ));
    let guard = lc.request(RequestKind::Traffic, LOCAL);
    lc.start_drain(Trigger::Signal);
    let State::Drained { reason, took, .. } = lc.drained().await else {
        unreachable!()
    };
    assert_eq!(reason, DrainReason::Max);
    assert!(took >= S(2));
    assert_eq!(lc.in_flight(), 1);
    drop(guard);
    lc.idle().await;
}

#[tokio::test(start_paused = true)]
async fn request_end_wakes_the_clock() {
    let lc = Lifecycle::new(DrainSettings::fixed(
        Duration::ZERO,
        Duration::ZERO,
        S(3600),
    ));
    let guard = lc.request(RequestKind::Traffic, LOCAL);
    lc.start_drain(Trigger::Admin);
    tokio::time::sleep(S(1)).await;
    assert_eq!(lc.phase(), Phase::Draining);
    let during = lc.request(RequestKind::Traffic, LOCAL);
    assert_eq!(during.phase(), Phase::Draining);
    drop(during);
    drop(lc.request(RequestKind::HealthCheck, LOCAL));
    drop(guard);
    let State::Drained {
        reason,
        requests_during_drain,
        health_checks_during_drain,
        ..
    } = lc.drained().await
    else {
        unreachable!()
    };
    assert_eq!(reason, DrainReason::Quiet);
    // Health checks are not requests saved: they have their own count.
    assert_eq!((requests_during_drain, health_checks_during_drain), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn release_waits_for_a_request_that_started_as_the_drain_decided() {
    let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(30)));
    let slot = Arc::new(std::sync::Mutex::new(None));
    let (lc2, slot2) = (lc.clone(), slot.clone());
    lc.on_decide(move || {
        *slot2.lock().unwrap() = Some(lc2.request(RequestKind::Traffic, LOCAL));
    });
    lc.start_drain(Trigger::Admin);
    let State::Drained { reason, .. } = lc.drained().await else {
        unreachable!()
    };
    assert_eq!(reason, DrainReason::Quiet);
    tokio::time::sleep(S(5)).await;
    assert!(!lc.is_released(), "released with a request in flight");
    let released = tokio::spawn({
        let lc = lc.clone();
        async move { lc.released().await }
    });
    tokio::time::sleep(S(1)).await;
    assert!(!released.is_finished());
    drop(slot.lock().unwrap().take());
    assert!(released.await.unwrap().is_drained());
    assert!(lc.is_released());
}

#[tokio::test(start_paused = true)]
async fn release_is_bounded_by_drain_max() {
    let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
    let (lc2, slot) = (lc.clone(), Arc::new(std::sync::Mutex::new(None)));
    let slot2 = slot.clone();
    lc.on_decide(move || {
        *slot2.lock().unwrap() = Some(lc2.request(RequestKind::Traffic, LOCAL));
    });
    let t = Instant::now();
    lc.start_drain(Trigger::Signal);
    lc.released().await;
    assert!(t.elapsed() >= S(10), "{:?}", t.elapsed());
    assert_eq!(lc.in_flight(), 1);
}

#[test]
fn readiness_while_draining() {
    use ReadinessWhileDraining::*;
    let s = Duration::from_secs;
    for (policy, elapsed, want) in [
        (Fail, s(0), false),
        (Keep, s(0), true),
        (Keep, s(3600), true),
        (For(s(6)), s(0), true),
        (For(s(6)), s(5), true),
        (For(s(6)), s(6), false),
        (For(Duration::ZERO), s(0), false),
    ] {
        assert_eq!(policy.ready(elapsed), want, "{policy:?} at {elapsed:?}");
    }
}

/// Whatever happens to the drain clock's task, the release comes at drain-max. Before: a
/// panic in that task (a log write failing) left `released()` pending for ever.
#[tokio::test(start_paused = true)]
async fn drain_max_holds_when_the_drain_clock_dies() {
    let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
    lc.on_decide(|| panic!("the drain clock dies"));
    let t = Instant::now();
    lc.start_drain(Trigger::Admin);
    let state = tokio::time::timeout(S(60), lc.released())
        .await
        .expect("released by drain-max although the clock died");
    assert_eq!(t.elapsed(), S(10));
    assert!(lc.is_released());
    let State::Drained { reason, .. } = state else {
        panic!("not drained: {state:?}")
    };
    assert_eq!(reason, DrainReason::Max);
}

#[tokio::test(start_paused = true)]
async fn a_drain_ended_at_max_reports_the_streams_still_open() {
    let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
    let old = lc.stream(LOCAL);
    tokio::time::sleep(S(3)).await;
    let young = lc.stream(LOCAL);
    drop(lc.stream(LOCAL));
    lc.start_drain(Trigger::Signal);
    let State::Drained { reason, .. } = lc.drained().await else {
        unreachable!()
    };
    assert_eq!(reason, DrainReason::Max);
    assert_eq!(
        lc.open_at_end(),
        Some(OpenAtEnd {
            open: 2,
            oldest: Some(S(13))
        })
    );
    drop(old);
    assert_eq!(lc.oldest_stream(), Some(S(10)));
    drop(young);
    assert_eq!(lc.oldest_stream(), None);
    lc.idle().await;
}

#[tokio::test(start_paused = true)]
async fn cut_short_ends_a_drain() {
    let p = policy();
    let lc = Lifecycle::new(DrainSettings::fixed(p.min, p.quiet, p.max));
    lc.start_drain(Trigger::Signal);
    lc.cut_short();
    assert!(lc.state().is_drained());
}

#[tokio::test(start_paused = true)]
async fn auto_quiet_window_is_fixed_when_the_drain_starts() {
    let lc = Lifecycle::new(DrainSettings {
        min: Duration::ZERO,
        quiet: Quiet::Auto { fallback: S(30) },
        max: S(120),
        tunnel_grace: Duration::ZERO,
        unit: Unit::Request,
    });
    // No checks yet: the fallback.
    assert_eq!(lc.quiet_window().0.kind(), "fallback");
    // Checks every second from two sources.
    let base = now_nanos();
    for (i, src) in [[10, 0, 0, 1], [10, 0, 0, 2]].into_iter().enumerate() {
        for n in 0..6u64 {
            lc.0.health_checks
                .record(src.into(), base + n * 1_000_000_000 + i as u64);
        }
    }
    let (w, sources) = lc.quiet_window();
    assert_eq!(w.kind(), "learned", "{}", w.why());
    assert_eq!(w.window, Duration::from_millis(1750));
    assert_eq!(sources.len(), 2);
    lc.start_drain(Trigger::Admin);
    let State::Draining { window, .. } = lc.state() else {
        unreachable!()
    };
    assert_eq!(window, w);
}

fn auto(fallback: Duration) -> Lifecycle {
    Lifecycle::new(DrainSettings {
        min: Duration::ZERO,
        quiet: Quiet::Auto { fallback },
        max: S(120),
        tunnel_grace: Duration::ZERO,
        unit: Unit::Request,
    })
}

/// Issue 23: `--quiet auto` says when it falls back because no health check ever came,
/// though traffic did; not before any traffic, not once a check was seen, never with a
/// fixed `--quiet`.
#[test]
fn checks_are_missing_only_when_traffic_came_and_no_check_ever_did() {
    let lc = auto(S(30));
    assert!(!lc.quiet_window().0.checks_missing(), "no traffic yet");
    drop(lc.request(RequestKind::Traffic, LOCAL));
    let (w, _) = lc.quiet_window();
    assert!(w.checks_missing());
    assert!(w.why().contains("healthcheck-port"), "{}", w.why());
    assert_eq!(lc.snapshot().health_checks_seen, 0);
    drop(lc.request(RequestKind::HealthCheck, [10, 0, 0, 1].into()));
    let (w, _) = lc.quiet_window();
    assert_eq!(w.kind(), "fallback");
    assert!(!w.checks_missing(), "{}", w.why());
    assert_eq!(lc.snapshot().health_checks_seen, 1);

    let fixed = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(10), S(60)));
    drop(fixed.request(RequestKind::Traffic, LOCAL));
    assert!(!fixed.quiet_window().0.checks_missing());
}

#[tokio::test(start_paused = true)]
async fn the_warning_without_checks_waits_for_traffic_then_ten_fallback_windows() {
    let lc = auto(S(2));
    let warn = tokio::spawn(lc.clone().warn_if_no_health_checks());
    tokio::time::sleep(S(3600)).await;
    assert!(!warn.is_finished(), "no traffic: nothing to say");
    drop(lc.request(RequestKind::Traffic, LOCAL));
    tokio::time::sleep(S(2) * UNSEEN_WARN_AFTER - Duration::from_millis(10)).await;
    assert!(!warn.is_finished(), "before ten fallback windows");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(warn.is_finished(), "once, after ten fallback windows");
    // Fixed: never.
    let fixed = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(10), S(60)));
    fixed.clone().warn_if_no_health_checks().await;
}

/// A resumed drain (`--drain-record`) is draining from its first moment, counts drain-max
/// from the recorded start, and still waits for a quiet window of its own.
#[tokio::test(start_paused = true)]
async fn a_resumed_drain_counts_from_the_recorded_start() {
    let lc = Lifecycle::new(DrainSettings::fixed(S(5), S(10), S(60)));
    // A request now: the quiet window is counted from here, not from the process's epoch.
    drop(lc.request(RequestKind::Traffic, LOCAL));
    let t0 = Instant::now();
    // The wall clock is not paused: allow for the moment between these two lines.
    let spent = lc
        .resume_drain(Some(SystemTime::now() - S(30)), Trigger::Admin)
        .unwrap();
    assert!(spent >= S(30) && spent < S(31), "{spent:?}");
    assert_eq!(lc.phase(), Phase::Draining);
    assert!(lc.is_resumed() && lc.snapshot().resumed);
    assert_eq!(lc.resume_drain(None, Trigger::Signal), None, "once");
    assert!(!lc.start_drain(Trigger::Admin), "already draining");
    let State::Drained {
        reason,
        took,
        trigger,
        ..
    } = lc.drained().await
    else {
        unreachable!()
    };
    assert_eq!((reason, trigger), (DrainReason::Quiet, Trigger::Admin));
    assert_eq!(
        t0.elapsed(),
        S(10),
        "a whole quiet window after the restart"
    );
    assert_eq!(took, spent + S(10), "counted from the recorded start");
}

/// A record older than drain-max leaves two quiet windows, not nothing: the restarted
/// proxy still serves while traffic arrives, then drain-max ends it.
#[tokio::test(start_paused = true)]
async fn an_old_record_still_leaves_two_quiet_windows() {
    let lc = Lifecycle::new(DrainSettings::fixed(S(5), S(10), S(60)));
    let t0 = Instant::now();
    let spent = lc.resume_drain(Some(SystemTime::now() - S(600)), Trigger::Signal);
    assert_eq!(spent, Some(S(40)));
    let held = lc.request(RequestKind::Traffic, LOCAL);
    let state = lc.released().await;
    assert_eq!(t0.elapsed(), S(20));
    assert!(matches!(
        state,
        State::Drained {
            reason: DrainReason::Max,
            ..
        }
    ));
    drop(held);
}

/// No start known (an unreadable record), or one in the future (a clock that moved back):
/// counted from now.
#[tokio::test(start_paused = true)]
async fn an_unknown_or_future_start_counts_from_now() {
    for started_at in [None, Some(SystemTime::now() + S(3600))] {
        let lc = Lifecycle::new(DrainSettings::fixed(S(5), S(10), S(60)));
        assert_eq!(lc.resume_drain(started_at, Trigger::Signal), Some(S(0)));
        let State::Draining { since, .. } = lc.state() else {
            panic!("draining")
        };
        assert_eq!(since, Instant::now());
    }
    assert_eq!(resumed_floor(S(10), S(60)), S(20));
    assert_eq!(resumed_floor(S(40), S(60)), S(60), "never past drain-max");
}
