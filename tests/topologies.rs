//! Where users run it besides ALB IP targets (issue 23): readiness while draining as a
//! policy, for consumers that keep routing to a terminating endpoint only while it is
//! serving (kube-proxy with `externalTrafficPolicy: Local`, Cilium, Envoy Gateway).

mod support;

use std::time::{Duration, Instant};

use support::*;

async fn status(p: &Proxy, path: &str) -> (u16, String) {
    let r = get(p.admin, path).await;
    (r.status.as_u16(), r.text().trim().to_owned())
}

async fn ready(p: &Proxy) {
    assert!(
        eventually(PATIENCE, || async { status(p, "/readyz").await.0 == 200 }).await,
        "never ready"
    );
}

/// `keep`: `/readyz` stays 200 through the drain and turns 503 once it is over, while the
/// load balancer's health path fails at once. Before: no such flag (readiness failed at the
/// drain's first moment, and kube-proxy dropped the new connections that still arrived).
#[tokio::test]
async fn keep_holds_readiness_through_the_drain_and_fails_it_after() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--readiness-while-draining",
            "keep",
            "--health-path",
            "/healthz",
            "--drain-min",
            "0s",
            "--quiet",
            "2s",
            "--drain-max",
            "30s",
        ],
    );
    ready(&p).await;
    assert_eq!(get(p.traffic, "/healthz").await.status, 200);
    let drain = post(p.admin, "/drain?wait=false").await;
    assert_eq!(drain.status, 202);
    assert_eq!(status(&p, "/readyz").await, (200, "draining".to_owned()));
    // The load balancer's own health check fails at once, whatever readiness says.
    assert_eq!(get(p.traffic, "/healthz").await.status, 503);
    assert_eq!(status(&p, "/readyz").await.0, 200);
    assert!(
        eventually(PATIENCE, || async {
            status(&p, "/readyz").await == (503, "drained".to_owned())
        })
        .await,
        "readiness never failed after the drain"
    );
}

/// A duration: `/readyz` stays 200 that long after the drain starts, then 503 while still
/// draining (Envoy Gateway's `healthCheckFailureDelay`).
#[tokio::test]
async fn a_duration_holds_readiness_that_long() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &[
            "--readiness-while-draining",
            "1500ms",
            "--drain-min",
            "10s",
            "--quiet",
            "1s",
            "--drain-max",
            "30s",
        ],
    );
    ready(&p).await;
    let t = Instant::now();
    assert_eq!(post(p.admin, "/drain?wait=false").await.status, 202);
    assert_eq!(status(&p, "/readyz").await.0, 200);
    assert!(
        eventually(PATIENCE, || async {
            status(&p, "/readyz").await == (503, "draining".to_owned())
        })
        .await
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

/// The default stays `fail`: 503 from the drain's first moment.
#[tokio::test]
async fn fail_is_the_default() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--drain-min", "5s", "--quiet", "1s"]);
    ready(&p).await;
    assert_eq!(post(p.admin, "/drain?wait=false").await.status, 202);
    assert_eq!(status(&p, "/readyz").await, (503, "draining".to_owned()));
}

/// One HTTP health check from `source` on a new connection, with `user_agent` and nothing a
/// load balancer adds to the requests it proxies.
async fn check_from(
    source: std::net::IpAddr,
    target: std::net::SocketAddr,
    user_agent: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(source, 0)).unwrap();
    let mut s = sock.connect(target).await.unwrap();
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: {user_agent}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&out)[9..12].parse().unwrap()
}

/// GKE container-native load balancing: Google Cloud's health checks (`GoogleHC/1.0`, from
/// the load balancer's own probers, a new connection each) are recognised by default, so
/// `--quiet auto` learns their cadence. Before: taken for application traffic, and the drain
/// used its 30 s fallback.
#[tokio::test]
async fn google_health_checks_are_learned() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--quiet", "auto"]);
    ready(&p).await;
    let mut probers = Vec::new();
    for octet in [2u8, 3] {
        let target = p.traffic;
        probers.push(tokio::spawn(async move {
            let source = std::net::IpAddr::from([127, 0, 0, octet]);
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            for _ in 0..8 {
                tick.tick().await;
                assert_eq!(check_from(source, target, "GoogleHC/1.0").await, 200);
            }
        }));
    }
    for t in probers {
        t.await.unwrap();
    }
    assert_eq!(
        p.metric("lameduck_health_checks_total{phase=\"serving\"}")
            .await,
        16.0
    );
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["quiet_window"], "learned", "{s}");
    let window = s["quiet_window_seconds"].as_f64().unwrap();
    assert!(window < 5.0, "learned from 300 ms checks: {s}");
}
