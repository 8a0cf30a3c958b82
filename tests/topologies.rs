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
