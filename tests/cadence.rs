//! `--quiet auto` end to end: several load-balancer nodes health-check the proxy from their
//! own addresses (127.0.0.2, .3, .4: all loopback) at different intervals, with light
//! application traffic; the target is then "deregistered" (everything stops).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;

/// One health check from `source`, on a new connection, like an ALB node.
async fn check_from(source: IpAddr, target: SocketAddr) -> Result<u16, String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source, 0))
        .map_err(|e| e.to_string())?;
    let stream = sock.connect(target).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "10.0.0.1:8080")
        .header("user-agent", "ELB-HealthChecker/2.0")
        .header("connection", "close")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    errors: std::sync::Mutex<Vec<String>>,
    /// Nanoseconds since the test's epoch when the last request of any kind started.
    last_start: AtomicU64,
    traffic_during_drain: AtomicUsize,
}

#[tokio::test]
async fn auto_quiet_learns_the_health_check_cadence_and_drains_one_window_after_it_stops() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--quiet",
            "auto",
            "--quiet-fallback",
            "20s",
            "--drain-min",
            "0s",
            "--drain-max",
            "30s",
        ],
    );
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();

    // Three "ALB nodes" with different intervals.
    for (octet, every_ms) in [(2u8, 300u64), (3, 400), (4, 500)] {
        let (stop, tally, target) = (stop.clone(), tally.clone(), p.traffic);
        tasks.push(tokio::spawn(async move {
            let source = IpAddr::from([127, 0, 0, octet]);
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            for _ in 0..400 {
                tick.tick().await;
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                tally
                    .last_start
                    .fetch_max(epoch.elapsed().as_nanos() as u64, Ordering::SeqCst);
                match check_from(source, target).await {
                    Ok(200) => tally.ok.fetch_add(1, Ordering::SeqCst),
                    // While draining there is no --health-path: checks reach the app.
                    other => {
                        tally
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("check: {other:?}"));
                        0
                    }
                };
            }
        }));
    }
    // Light application traffic from 127.0.0.1.
    let pause = Arc::new(tokio::sync::Mutex::new(()));
    {
        let (stop, tally, draining, pause, target) = (
            stop.clone(),
            tally.clone(),
            draining.clone(),
            pause.clone(),
            p.traffic,
        );
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(700));
            for _ in 0..200 {
                tick.tick().await;
                let _held = pause.lock().await;
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                tally
                    .last_start
                    .fetch_max(epoch.elapsed().as_nanos() as u64, Ordering::SeqCst);
                if draining.load(Ordering::SeqCst) {
                    tally.traffic_during_drain.fetch_add(1, Ordering::SeqCst);
                }
                let r = get(target, "/").await;
                if r.status == 200 {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    tally
                        .errors
                        .lock()
                        .unwrap()
                        .push(format!("traffic: {}", r.status));
                }
            }
        }));
    }

    // Learning: every source gets an interval.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (learned, status) = loop {
        let status = get(p.admin, "/status").await.json();
        let all_learned = (0..3).all(|i| status["health_checks"][i]["interval_seconds"].is_f64());
        if status["quiet_window"] == "learned" && status["health_check_sources"] == 3 && all_learned
        {
            break (true, status);
        }
        if Instant::now() > deadline {
            break (false, status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(learned, "never learned the cadence: {status:#}");
    for (i, want) in [0.3, 0.4, 0.5].into_iter().enumerate() {
        let got = status["health_checks"][i]["interval_seconds"]
            .as_f64()
            .unwrap();
        assert_eq!(
            status["health_checks"][i]["address"],
            format!("127.0.0.{}", i + 2)
        );
        assert!(
            got >= want * 0.8 && got <= want * 1.6,
            "source {i}: {got}s, configured {want}s"
        );
    }
    let window = status["quiet_window_seconds"].as_f64().unwrap();
    println!("learned: {}", status["quiet_window_why"]);
    assert!((0.9..=2.8).contains(&window), "window {window}s");
    assert_eq!(p.metric("lameduck_health_check_sources").await, 3.0);

    // Termination: the drain starts (traffic paused so the count below is exact)...
    let held = pause.lock().await;
    let r = get(p.admin, "/drain?wait=false").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["quiet_window"], "learned");
    draining.store(true, Ordering::SeqCst);
    drop(held);
    let admin = p.admin;
    let waiter = tokio::spawn(async move { post(admin, "/drain").await });
    // ...the load balancer keeps checking and sending until it deregisters the target...
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !waiter.is_finished(),
        "drained while health checks were still arriving"
    );
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
    }
    let last = Duration::from_nanos(tally.last_start.load(Ordering::SeqCst));

    // ...and the drain ends one learned window after the last request of any kind.
    let r = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap();
    let after_last = epoch.elapsed() - last;
    let v = r.json();
    println!("drained {after_last:?} after the last request; window {window}s; answer {v}",);
    assert_eq!(v["reason"], "quiet", "{v}");
    assert_eq!(v["quiet_window"], "learned");
    assert_eq!(v["quiet_window_seconds"].as_f64().unwrap(), window);
    assert!(
        after_last >= Duration::from_secs_f64(window * 0.9),
        "drained {after_last:?} after the last check, window {window}s"
    );
    assert!(
        after_last <= Duration::from_secs_f64(window + 3.0),
        "drained {after_last:?} after the last check, window {window}s"
    );
    // Health checks are not requests saved.
    assert_eq!(
        v["requests_during_drain"].as_u64().unwrap() as usize,
        tally.traffic_during_drain.load(Ordering::SeqCst)
    );
    assert!(
        v["health_checks_during_drain"].as_u64().unwrap() >= 6,
        "{v}"
    );
    let errors = tally.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors: {errors:?}");
    println!(
        "{} requests and checks, 0 errors",
        tally.ok.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn auto_quiet_falls_back_without_health_checks() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--quiet",
            "auto",
            "--quiet-fallback",
            "1200ms",
            "--drain-min",
            "0s",
        ],
    );
    assert_eq!(get(p.traffic, "/").await.status, 200);
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["quiet_window"], "fallback");
    assert_eq!(s["quiet_window_seconds"], 1.2);
    let t = Instant::now();
    let v = post(p.admin, "/drain").await.json();
    assert_eq!(
        (v["reason"].as_str(), v["quiet_window"].as_str()),
        (Some("quiet"), Some("fallback"))
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        v["quiet_window_why"]
            .as_str()
            .unwrap()
            .starts_with("fallback 1.20s"),
        "{v}"
    );
}

// === issue 23: saying when no health check was ever seen ===

/// The JSON log lines of `p` whose message contains `needle`.
fn log_lines(p: &Proxy, needle: &str) -> Vec<serde_json::Value> {
    p.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().unwrap_or("").contains(needle))
        .collect()
}

/// Traffic but not one health check (instance targets, `healthcheck-port` elsewhere, an
/// unknown User-Agent): the drain still falls back, and now says so and why, in its log
/// line, in `/status` and in a metric. Before: the fallback, silently.
#[tokio::test]
async fn a_drain_with_traffic_and_no_health_check_says_why_it_fell_back() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--quiet",
            "auto",
            "--quiet-fallback",
            "1s",
            "--drain-min",
            "0s",
        ],
    );
    assert_eq!(get(p.traffic, "/").await.status, 200);
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["quiet_window"], "fallback", "{s}");
    assert_eq!(s["health_checks_seen"], 0, "{s}");
    assert_eq!(s["health_checks_missing"], true, "{s}");
    let why = s["quiet_window_why"].as_str().unwrap();
    for cause in [
        "instance targets",
        "healthcheck-port",
        "--health-check-agents",
    ] {
        assert!(why.contains(cause), "{why}");
    }
    assert_eq!(p.metric("lameduck_health_checks_missing").await, 1.0);

    let v = post(p.admin, "/drain").await.json();
    assert_eq!(v["reason"], "quiet", "{v}");
    assert!(
        v["quiet_window_why"]
            .as_str()
            .unwrap()
            .starts_with("fallback 1.00s: no load-balancer health check"),
        "{v}"
    );
    assert!(
        eventually(PATIENCE, || async { !log_lines(&p, "drained:").is_empty() }).await,
        "{:?}",
        p.logs()
    );
    let line = &log_lines(&p, "drained:")[0];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["health_checks_seen"], 0, "{line}");
    let text = line.to_string();
    for said in ["fallback 1.00s", "instance targets", "healthcheck-port"] {
        assert!(text.contains(said), "{said:?} not in {line}");
    }
    assert_eq!(p.metric("lameduck_health_checks_missing").await, 1.0);
}

/// With health checks learned, the drain's line, `/status` and the metric say nothing of it.
#[tokio::test]
async fn a_drain_after_health_checks_were_learned_does_not_say_they_were_missing() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--quiet",
            "auto",
            "--quiet-fallback",
            "5s",
            "--drain-min",
            "0s",
        ],
    );
    let node: IpAddr = [127, 0, 0, 2].into();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut learned = false;
    for _ in 0..100 {
        tick.tick().await;
        assert_eq!(check_from(node, p.traffic).await, Ok(200));
        assert_eq!(get(p.traffic, "/").await.status, 200);
        if get(p.admin, "/status").await.json()["quiet_window"] == "learned" {
            learned = true;
            break;
        }
    }
    assert!(learned, "{}", get(p.admin, "/status").await.text());
    let s = get(p.admin, "/status").await.json();
    assert!(s["health_checks_seen"].as_u64().unwrap() >= 4, "{s}");
    assert_eq!(s["health_checks_missing"], false, "{s}");
    assert_eq!(p.metric("lameduck_health_checks_missing").await, 0.0);
    let v = post(p.admin, "/drain").await.json();
    assert_eq!(
        (v["reason"].as_str(), v["quiet_window"].as_str()),
        (Some("quiet"), Some("learned"))
    );
    assert!(
        eventually(PATIENCE, || async { !log_lines(&p, "drained:").is_empty() }).await,
        "{:?}",
        p.logs()
    );
    let line = &log_lines(&p, "drained:")[0];
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(!line.to_string().contains("healthcheck-port"), "{line}");
    assert_eq!(
        get(p.admin, "/status").await.json()["health_checks_missing"],
        false
    );
}

/// Serving traffic for ten `--quiet-fallback` windows (5 min at the default 30 s) without a
/// single health check is said once, long before a drain; a pod that saw one check says
/// nothing. Before: nothing until (and not even at) the drain.
#[tokio::test]
async fn traffic_without_any_health_check_is_warned_about_once() {
    const WARNING: &str = "without a single load-balancer health check";
    let up = upstream(UpOpts::default()).await;
    let args = ["--quiet", "auto", "--quiet-fallback", "1s"];
    // Checked, and its traffic starts first: its 10 s run out before the other's.
    let checked = Proxy::start(up.addr, &args);
    assert_eq!(
        check_from([127, 0, 0, 2].into(), checked.traffic).await,
        Ok(200)
    );
    assert_eq!(get(checked.traffic, "/").await.status, 200);
    let unchecked = Proxy::start(up.addr, &args);
    let first = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut warned_at = None;
    for _ in 0..((PATIENCE.as_millis() / 250) as usize) {
        tick.tick().await;
        assert_eq!(get(unchecked.traffic, "/").await.status, 200);
        assert_eq!(get(checked.traffic, "/").await.status, 200);
        if !log_lines(&unchecked, WARNING).is_empty() {
            warned_at = Some(first.elapsed());
            break;
        }
    }
    let warned_at = warned_at.unwrap_or_else(|| panic!("no warning: {:?}", unchecked.logs()));
    assert!(warned_at >= Duration::from_secs(10), "{warned_at:?}");
    // Traffic goes on, and the warning is not repeated.
    for _ in 0..6 {
        tick.tick().await;
        assert_eq!(get(unchecked.traffic, "/").await.status, 200);
        assert_eq!(get(checked.traffic, "/").await.status, 200);
    }
    let lines = log_lines(&unchecked, WARNING);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["level"], "WARN");
    assert!(
        lines[0].to_string().contains("healthcheck-port"),
        "{}",
        lines[0]
    );
    assert!(
        log_lines(&checked, WARNING).is_empty(),
        "{:?}",
        checked.logs()
    );
}
