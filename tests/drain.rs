//! The drain, end to end: the real binary, a real upstream, real signals.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn readyz_flips_at_once_and_requests_are_served_throughout_draining() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "30s", "--drain-max", "60s"],
    );
    assert!(
        eventually(PATIENCE, || async {
            get(p.admin, "/readyz").await.status == 200
        })
        .await,
        "never ready"
    );
    let mut c = H1::connect(p.traffic).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);

    let r = get(p.admin, "/drain?wait=false").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["state"], "draining");
    // No waiting: readiness failed the instant the drain started.
    let r = get(p.admin, "/readyz").await;
    assert_eq!((r.status.as_u16(), r.text().trim()), (503, "draining"));

    // Requests keep being served. The keep-alive connection is asked to go, by its next
    // response (so a client that holds one connection moves to other pods), and new
    // connections are accepted and served.
    let r = c.get("/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["connection"], "close");
    assert!(c.wait_closed(PATIENCE).await, "closed after that response");
    for _ in 0..39 {
        assert_eq!(get(p.traffic, "/").await.status, 200);
    }
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["state"], "draining");
    assert_eq!(s["requests_during_drain"], 40);
    assert!(s["drain_started_at"].is_string());
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"200\",phase=\"draining\"}")
            .await,
        40.0
    );
    assert_eq!(p.metric("lameduck_state").await, 1.0);
}

/// `--keep-alive-while-draining`: the behaviour before 0.2, a keep-alive connection keeps
/// being served while draining, with no `Connection: close`.
#[tokio::test]
async fn keep_alive_while_draining_leaves_persistent_connections_alone() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--drain-min",
            "0s",
            "--quiet",
            "30s",
            "--drain-max",
            "60s",
            "--keep-alive-while-draining",
        ],
    );
    let mut c = H1::connect(p.traffic).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    assert_eq!(get(p.admin, "/drain?wait=false").await.status, 202);
    for _ in 0..20 {
        let r = c.get("/").await.unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.headers.contains_key("connection"), "{:?}", r.headers);
    }
}

#[tokio::test]
async fn drain_blocks_until_quiet_and_reports() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "1s", "--drain-max", "30s"],
    );
    let admin = p.admin;
    let started = Instant::now();
    let waiter = tokio::spawn(async move { post(admin, "/drain").await });

    // Traffic keeps arriving for 1.5 s: the drain must not end while it does.
    let traffic_until = started + Duration::from_millis(1500);
    let mut sent = 0;
    while Instant::now() < traffic_until {
        assert_eq!(get(p.traffic, "/").await.status, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "drain ended while traffic was still arriving"
        );
    }
    let last_request = Instant::now();
    let r = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap();
    let waited_after_last = last_request.elapsed();
    assert_eq!(r.status, 200);
    let v = r.json();
    println!("drain answered {v} ({waited_after_last:?} after the last request)");
    assert_eq!(v["state"], "drained");
    assert_eq!(v["reason"], "quiet");
    assert!(v["requests_during_drain"].as_u64().unwrap() >= sent.min(10));
    assert!(v["drain_seconds"].as_f64().unwrap() >= 1.5);
    // Quiet means a full second with no request (generous upper bound for a busy machine).
    assert!(
        waited_after_last >= Duration::from_millis(900),
        "{waited_after_last:?}"
    );
    assert!(
        waited_after_last < Duration::from_secs(10),
        "{waited_after_last:?}"
    );
    let r = get(p.admin, "/readyz").await;
    assert_eq!((r.status.as_u16(), r.text().trim()), (503, "drained"));
}

#[tokio::test]
async fn drain_max_caps_a_drain_held_open_by_a_long_request() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "1s", "--drain-max", "1s"],
    );
    let traffic = p.traffic;
    let long = tokio::spawn(async move { get(traffic, "/sleep/8000").await });
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_in_flight_requests").await == 1.0
        })
        .await
    );
    let started = Instant::now();
    let r = post(p.admin, "/drain").await;
    let took = started.elapsed();
    assert_eq!(r.json()["reason"], "max", "{}", r.text());
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // The answer goes out as the state flips; the log line is read from stderr a moment later.
    let logged = eventually(PATIENCE, || async {
        p.logs()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("drain cut short"))
    })
    .await;
    assert!(logged, "the cut must be logged as a warning");
    // The line names the setting that cut it, as users search their logs for it.
    assert!(
        p.logs()
            .iter()
            .any(|l| l.contains("drain cut short") && l.contains("--drain-max (1s) reached")),
        "the cut's line must name --drain-max: {:?}",
        p.logs()
    );
    long.abort();
}

#[tokio::test]
async fn concurrent_drain_callers_all_return() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--drain-min",
            "300ms",
            "--quiet",
            "1s",
            "--drain-max",
            "10s",
        ],
    );
    let waiters: Vec<_> = (0..32)
        .map(|i| {
            let admin = p.admin;
            tokio::spawn(async move {
                if i % 2 == 0 {
                    get(admin, "/drain").await
                } else {
                    post(admin, "/drain").await
                }
            })
        })
        .collect();
    for w in waiters {
        let r = tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["state"], "drained");
    }
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero_and_answers_drain_waiters_first() {
    let up = upstream(UpOpts::default()).await;
    let mut p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "1s", "--drain-max", "10s"],
    );
    let traffic = p.traffic;
    let admin = p.admin;
    // The app's preStop hook, waiting.
    let waiter = tokio::spawn(async move { get(admin, "/drain").await });
    assert!(
        eventually(PATIENCE, || async {
            get(admin, "/readyz").await.status == 503
        })
        .await
    );
    p.signal("TERM");
    // Still serving right after SIGTERM.
    assert_eq!(get(traffic, "/").await.status, 200);
    let r = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.json()["reason"], "quiet");
    let status = p.wait_exit(PATIENCE).expect("exits after draining");
    assert_eq!(status.code(), Some(0), "logs: {:#?}", p.logs());
}

#[tokio::test]
async fn second_signal_exits_promptly() {
    let up = upstream(UpOpts::default()).await;
    let mut p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "1s", "--drain-max", "60s"],
    );
    let traffic = p.traffic;
    let _long = tokio::spawn(async move { get(traffic, "/sleep/30000").await });
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_in_flight_requests").await == 1.0
        })
        .await
    );
    p.signal("TERM");
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_state").await == 1.0
        })
        .await
    );
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "a long request holds the drain"
    );
    let t = Instant::now();
    p.signal("INT");
    let status = p
        .wait_exit(Duration::from_secs(5))
        .expect("second signal exits promptly");
    println!(
        "exited {status:?} {:?} after the second signal",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(1));
}

#[tokio::test]
async fn after_drained_idle_connections_close_and_late_requests_are_still_served() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--drain-min", "0s", "--quiet", "1s", "--drain-max", "10s"],
    );
    let mut idle = H1::connect(p.traffic).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    let drained = post(p.admin, "/drain").await.json();
    assert_eq!(drained["state"], "drained");
    // The idle keep-alive connection is closed gracefully once drained...
    assert!(
        idle.wait_closed(Duration::from_secs(5)).await,
        "idle connection not closed"
    );
    // ...and a late request on a new connection is forwarded, asked to close, and counted.
    let r = get(p.traffic, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"200\",phase=\"drained\"}")
            .await,
        1.0
    );
    assert_eq!(p.metric("lameduck_state").await, 2.0);
    let took = drained["drain_seconds"].as_f64().unwrap();
    assert_eq!(p.metric("lameduck_drain_duration_seconds").await, took);
}

#[tokio::test]
async fn health_path_answers_503_while_draining_and_goes_to_the_app_while_serving() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--health-path",
            "/healthz",
            "--quiet",
            "30s",
            "--drain-max",
            "60s",
        ],
    );
    let before = up.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(p.traffic, "/healthz").await.text(), "ok");
    assert_eq!(
        up.requests.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    get(p.admin, "/drain?wait=false").await;
    let r = get(p.traffic, "/healthz").await;
    assert_eq!((r.status.as_u16(), r.text().trim()), (503, "draining"));
    assert_eq!(
        up.requests.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    // Other paths still reach the app.
    assert_eq!(get(p.traffic, "/other").await.text(), "ok");
}

#[tokio::test]
async fn readiness_needs_the_app() {
    // Nothing listens yet on the upstream port: starting.
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = spare.local_addr().unwrap();
    drop(spare);
    let p = Proxy::start(addr, &["--upstream-health", "/healthz"]);
    let r = get(p.admin, "/readyz").await;
    assert_eq!((r.status.as_u16(), r.text().trim()), (503, "starting"));
    assert_eq!(get(p.admin, "/livez").await.status, 200);
}

#[tokio::test]
async fn drain_token_guards_drain() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--drain-token",
            "s3cret-s3cret-s3cret",
            "--quiet",
            "1s",
            "--drain-min",
            "0s",
        ],
    );
    let r = post(p.admin, "/drain").await;
    assert_eq!(r.status, 403);
    assert_eq!(get(p.admin, "/status").await.json()["state"], "serving");
    // The CLI client with the wrong token: a clear line and a non-zero exit.
    let admin = p.admin.to_string();
    let out = std::process::Command::new(BIN)
        .args(["drain", "--admin", &admin, "--token", "wrong"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    // The right token drains; the client prints the JSON and exits 0.
    let out = std::process::Command::new(BIN)
        .args([
            "drain",
            "--admin",
            &admin,
            "--token",
            "s3cret-s3cret-s3cret",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "drained");
}

#[test]
fn drain_client_reports_an_unreachable_admin_port() {
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = spare.local_addr().unwrap().to_string();
    drop(spare);
    let out = std::process::Command::new(BIN)
        .args(["drain", "--admin", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the admin port"), "{err}");
}
