//! The admin port: probes, drain control, status and metrics; and the `lameduck drain`
//! client for the same endpoint.
//!
//! | endpoint | method | answers |
//! |---|---|---|
//! | `/livez` | GET, HEAD | 200 while the process runs |
//! | `/readyz` | GET, HEAD | 200 `ready` while serving and the app is reachable; otherwise 503 `starting`, `draining`, `drained`, `upstream-unreachable` or `failed` (the traffic port died) |
//! | `/drain` | GET, POST | starts draining; blocks until released (drained and nothing in flight, or drain-max), then 200 JSON. `?wait=false`: 202 at once. With `--drain-token`, needs header `X-Lameduck-Token` (else 403) |
//! | `/lb-health` | GET, HEAD | the load balancer's health check, where it cannot be the traffic port (an NLB's HTTP check on the admin port): while serving, what `/readyz` answers; while draining and after, 503 in http mode and with `--fail-health-while-draining`, else 200 (an NLB resets an unhealthy target's connections unless told not to) |
//! | `/status` | GET | JSON: state, in-flight requests, open connections, seconds since the last request, drain start, requests during the drain and after it, whether released, whether this process resumed a drain (`--drain-record`), the quiet window and why, the health checks seen (and whether they are missing), the health-check sources learned |
//! | `/metrics` | GET | Prometheus text exposition |
//!
//! The kubelet calls `/drain` from the app container's `preStop` hook on the pod IP and
//! treats any transport error as "hook done" (SIGTERM follows at once). So this server
//! stays up through `Draining` and `Drained`, and at exit it shuts down gracefully: every
//! waiting `/drain` caller gets its answer before the process ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::lifecycle::drain::{Lifecycle, Phase, ReadinessWhileDraining, Snapshot, State, Trigger};
use crate::metrics::Metrics;
use crate::traffic::upstream::Upstream;

pub use crate::cli::TOKEN_HEADER;

/// How long the readiness check may take: below the kubelet's default 1 s probe timeout.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The admin endpoints' shared state.
pub struct Admin {
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    upstream: Arc<Upstream>,
    upstream_health: Option<String>,
    drain_token: Option<String>,
    /// `--readiness-while-draining`.
    readiness_while_draining: ReadinessWhileDraining,
    /// `/lb-health` fails once the drain starts (http mode, `--fail-health-while-draining`).
    lb_health_fails_while_draining: bool,
    /// The app has been reachable at least once: before that, not ready is `starting`.
    seen_up: AtomicBool,
    /// The last probe of the app and when it finished: `/readyz` calls within
    /// [`PROBE_REUSE`] share it, and concurrent calls wait for one probe instead of each
    /// opening an app connection.
    last_probe: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

/// How long one probe of the app answers every `/readyz`: far below any probe period.
const PROBE_REUSE: Duration = Duration::from_millis(500);

type Resp = Response<Full<Bytes>>;

impl Admin {
    pub fn new(
        lifecycle: Lifecycle,
        metrics: Arc<Metrics>,
        upstream: Arc<Upstream>,
        upstream_health: Option<String>,
        drain_token: Option<String>,
    ) -> Admin {
        Admin {
            lifecycle,
            metrics,
            upstream,
            upstream_health,
            drain_token,
            readiness_while_draining: ReadinessWhileDraining::Fail,
            lb_health_fails_while_draining: true,
            seen_up: AtomicBool::new(false),
            last_probe: tokio::sync::Mutex::new(None),
        }
    }

    /// What `/readyz` answers while draining (`--readiness-while-draining`; default: fail).
    pub fn with_readiness_while_draining(mut self, policy: ReadinessWhileDraining) -> Admin {
        self.readiness_while_draining = policy;
        self
    }

    /// Whether `/lb-health` fails while draining (default: it does, as in http mode).
    pub fn with_lb_health_fails_while_draining(mut self, fails: bool) -> Admin {
        self.lb_health_fails_while_draining = fails;
        self
    }

    /// Routes one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Resp {
        let path = req.uri().path();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        match path {
            "/livez" if get => text(StatusCode::OK, "ok"),
            "/readyz" if get => self.readyz().await,
            "/lb-health" if get => self.lb_health().await,
            "/drain" if get || req.method() == Method::POST => self.drain(&req).await,
            "/status" if get => {
                json_response(StatusCode::OK, status_json(&self.lifecycle.snapshot()))
            }
            "/metrics" if get => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            "/livez" | "/readyz" | "/lb-health" | "/status" | "/metrics" => {
                method_not_allowed("GET, HEAD")
            }
            "/drain" => method_not_allowed("GET, POST"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /livez /readyz /lb-health /drain /status /metrics",
            ),
        }
    }

    async fn readyz(&self) -> Resp {
        if self.lifecycle.failure().is_some() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "failed");
        }
        match self.lifecycle.state() {
            // Kept ready for consumers that route to a terminating endpoint only while it is
            // serving (`--readiness-while-draining`); the app is not probed: it is up.
            State::Draining { since, .. }
                if self.readiness_while_draining.ready(since.elapsed()) =>
            {
                return text(StatusCode::OK, "draining");
            }
            State::Draining { .. } => return text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
            State::Drained { .. } => return text(StatusCode::SERVICE_UNAVAILABLE, "drained"),
            State::Serving => {}
        }
        self.app_readiness(true).await
    }

    /// `/lb-health`: the load balancer's own check, on the admin port. While serving it says
    /// what readiness says (the app must be reachable); once the drain starts it fails only
    /// when told to: an NLB resets every established connection of a target that turns
    /// unhealthy, unless its target group drains unhealthy targets instead.
    async fn lb_health(&self) -> Resp {
        if self.lifecycle.failure().is_some() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "failed");
        }
        match self.lifecycle.phase() {
            Phase::Serving => {
                self.app_readiness(self.lb_health_fails_while_draining)
                    .await
            }
            phase => self.draining_answer(self.lb_health_fails_while_draining, phase),
        }
    }

    fn draining_answer(&self, fails: bool, phase: Phase) -> Resp {
        match fails {
            true => text(StatusCode::SERVICE_UNAVAILABLE, phase.as_str()),
            false => text(StatusCode::OK, phase.as_str()),
        }
    }

    /// While serving: ready once the app is reachable. `draining_fails`: the answer if the
    /// drain started while the app was probed.
    async fn app_readiness(&self, draining_fails: bool) -> Resp {
        let probe = self.probe().await;
        // Draining may have started while the probe ran: that answer wins.
        let phase = self.lifecycle.phase();
        if phase != Phase::Serving {
            return self.draining_answer(draining_fails, phase);
        }
        match probe {
            Ok(()) => {
                if !self.seen_up.swap(true, Ordering::AcqRel) {
                    tracing::info!("app is reachable; ready");
                }
                text(StatusCode::OK, "ready")
            }
            Err(e) if !self.seen_up.load(Ordering::Acquire) => {
                tracing::debug!(error = %e, "app not reachable yet");
                text(StatusCode::SERVICE_UNAVAILABLE, "starting")
            }
            Err(e) => {
                tracing::warn!(error = %e, "app unreachable; not ready");
                text(StatusCode::SERVICE_UNAVAILABLE, "upstream-unreachable")
            }
        }
    }

    /// The app's reachability, probed at most once per [`PROBE_REUSE`].
    async fn probe(&self) -> Result<(), String> {
        let mut last = self.last_probe.lock().await;
        if let Some((at, res)) = &*last {
            if at.elapsed() < PROBE_REUSE {
                return res.clone();
            }
        }
        let res = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.upstream.probe(self.upstream_health.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")));
        *last = Some((tokio::time::Instant::now(), res.clone()));
        res
    }

    async fn drain<B>(&self, req: &Request<B>) -> Resp {
        if let Some(token) = &self.drain_token {
            let given = req.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
            if !given.is_some_and(|g| constant_time_eq(g, token.as_bytes())) {
                return text(
                    StatusCode::FORBIDDEN,
                    "forbidden: /drain needs the X-Lameduck-Token header set to --drain-token",
                );
            }
        }
        let wait = match query_param(req.uri().query(), "wait") {
            None | Some("" | "true" | "1") => true,
            Some("false") | Some("0") => false,
            Some(other) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("bad request: wait={other:?}; use wait=true or wait=false"),
                )
            }
        };
        if self.lifecycle.start_drain(Trigger::Admin) {
            tracing::info!("drain requested on the admin port");
        }
        if !wait {
            return json_response(StatusCode::ACCEPTED, state_json(&self.lifecycle.state()));
        }
        // The release, not just `Drained`: a request still inside the app (one that started
        // as the drain ended) must be answered before the kubelet may signal the app.
        let state = self.lifecycle.released().await;
        let mut v = state_json(&state);
        let snap = self.lifecycle.snapshot();
        v["requests_after_drained"] = snap.requests_after_drained.into();
        v["tunnels_open"] = snap.tunnels.into();
        // What was still open when the drain ended (TCP mode: connections, and for how long).
        if let Some(end) = self.lifecycle.open_at_end() {
            v["open_at_end"] = end.open.into();
            v["oldest_open_seconds"] = end.oldest.map(|d| d.as_secs_f64()).into();
        }
        json_response(StatusCode::OK, v)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The drain outcome as `/drain` reports it.
pub fn state_json(state: &State) -> serde_json::Value {
    match state {
        State::Serving => json!({ "state": "serving" }),
        State::Draining {
            since,
            started_at,
            trigger,
            window,
        } => json!({
            "state": "draining",
            "trigger": trigger,
            "drain_started_at": rfc3339(*started_at),
            "drain_seconds": since.elapsed().as_secs_f64(),
            "quiet_window_seconds": window.window.as_secs_f64(),
            "quiet_window": window.kind(),
            "quiet_window_why": window.why(),
        }),
        State::Drained {
            started_at,
            trigger,
            window,
            reason,
            took,
            requests_during_drain,
            health_checks_during_drain,
            ..
        } => json!({
            "state": "drained",
            "reason": reason,
            "drain_seconds": took.as_secs_f64(),
            "requests_during_drain": requests_during_drain,
            "health_checks_during_drain": health_checks_during_drain,
            "quiet_window_seconds": window.window.as_secs_f64(),
            "quiet_window": window.kind(),
            "quiet_window_why": window.why(),
            "trigger": trigger,
            "drain_started_at": rfc3339(*started_at),
        }),
    }
}

/// The `/status` document.
pub fn status_json(s: &Snapshot) -> serde_json::Value {
    let (started, reason, took) = match &s.state {
        State::Serving => (None, None, None),
        State::Draining {
            since, started_at, ..
        } => (Some(rfc3339(*started_at)), None, Some(since.elapsed())),
        State::Drained {
            started_at,
            reason,
            took,
            ..
        } => (Some(rfc3339(*started_at)), Some(*reason), Some(*took)),
    };
    json!({
        "state": s.state.phase(),
        "in_flight": s.in_flight,
        "connections": s.connections,
        "tunnels": s.tunnels,
        "seconds_since_last_request": s.since_last_request.map(|d| d.as_secs_f64()),
        "drain_started_at": started,
        "drain_seconds": took.map(|d| d.as_secs_f64()),
        "drain_reason": reason,
        "requests_during_drain": s.requests_during_drain,
        "health_checks_during_drain": s.health_checks_during_drain,
        "requests_after_drained": s.requests_after_drained,
        "released": s.released,
        "drain_resumed": s.resumed,
        "quiet_window_seconds": s.window.window.as_secs_f64(),
        "quiet_window": s.window.kind(),
        "quiet_window_why": s.window.why(),
        "health_checks_seen": s.health_checks_seen,
        // Traffic served and not one health check seen: the window is a guess (`--quiet auto`).
        "health_checks_missing": s.window.checks_missing(),
        "health_check_sources": s.health_check_sources.iter().filter(|h| h.active).count(),
        "health_checks": s.health_check_sources,
    })
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Resp {
    let mut body = serde_json::to_vec(&v).expect("a JSON value serializes");
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Serves the admin port until `shutdown` resolves, then closes every connection gracefully:
/// requests being answered (a `/drain` waiter) finish first. Returns when all are closed.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl std::future::Future) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    // A small, hardened server: probes and the preStop hook send tiny requests.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors or similar: back off instead of spinning
                        // (the kubelet's preStop call is waiting on this port).
                        tracing::error!(error = %e, "admin accept failed; retrying in 100ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let admin = admin.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

// === the `lameduck drain` client ===

/// Why `lameduck drain` failed.
#[derive(Debug)]
pub enum ClientError {
    Connect(SocketAddr, std::io::Error),
    Http(hyper::Error),
    Status(StatusCode, String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(a, e) => write!(f, "cannot reach the admin port at {a}: {e}"),
            ClientError::Http(e) => write!(f, "the admin port failed mid-request: {e}"),
            ClientError::Status(StatusCode::FORBIDDEN, _) => {
                f.write_str("the admin port rejected the drain token (403): set --token to the proxy's --drain-token")
            }
            ClientError::Status(s, body) => write!(f, "the admin port answered {s}: {}", body.trim()),
        }
    }
}

impl std::error::Error for ClientError {}

/// `POST /drain` on a running proxy; returns the JSON it answered.
pub async fn request_drain(
    admin: SocketAddr,
    wait: bool,
    token: Option<&str>,
) -> Result<String, ClientError> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| ClientError::Connect(admin, e))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    tokio::spawn(conn);
    let path = if wait { "/drain" } else { "/drain?wait=false" };
    let mut req = Request::post(path)
        .header(header::HOST, admin.to_string())
        .header(
            header::USER_AGENT,
            concat!("lameduck/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(t) = token {
        req = req.header(TOKEN_HEADER, t);
    }
    let req = req
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a static request is valid");
    let resp = tx.send_request(req).await.map_err(ClientError::Http)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status == StatusCode::OK || status == StatusCode::ACCEPTED {
        Ok(body)
    } else {
        Err(ClientError::Status(status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::drain::DrainSettings;
    use crate::traffic::upstream::{Config, Protocol};

    fn admin(token: Option<&str>) -> Admin {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(5),
        ));
        let upstream = Arc::new(Upstream::new(Config {
            // Nothing listens on port 1 of loopback: the app is "down".
            addr: "127.0.0.1:1".parse().unwrap(),
            protocol: Protocol::Http1,
            connect_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            request_body_timeout: Duration::from_secs(1),
            cut: Default::default(),
        }));
        let metrics = Arc::new(Metrics::new(lc.clone()));
        Admin::new(lc, metrics, upstream, None, token.map(String::from))
    }

    fn req(method: &str, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    async fn body(r: Resp) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn routes() {
        let a = admin(None);
        assert_eq!(a.handle(req("GET", "/livez")).await.status(), 200);
        assert_eq!(a.handle(req("GET", "/nope")).await.status(), 404);
        let r = a.handle(req("DELETE", "/drain")).await;
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET, POST");
        let r = a.handle(req("GET", "/readyz")).await;
        assert_eq!(r.status(), 503);
        assert_eq!(body(r).await, "starting\n");
        let r = a.handle(req("GET", "/drain?wait=maybe")).await;
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn drain_token_is_required_when_set() {
        let a = admin(Some("s3cret"));
        assert_eq!(a.handle(req("POST", "/drain")).await.status(), 403);
        let r = Request::post("/drain?wait=false")
            .header(TOKEN_HEADER, "wrong")
            .body(())
            .unwrap();
        assert_eq!(a.handle(r).await.status(), 403);
        assert_eq!(a.lifecycle.phase(), Phase::Serving);
        let r = Request::post("/drain?wait=false")
            .header(TOKEN_HEADER, "s3cret")
            .body(())
            .unwrap();
        assert_eq!(a.handle(r).await.status(), 202);
        let r = a.handle(req("GET", "/readyz")).await;
        assert_eq!(body(r).await.trim(), a.lifecycle.phase().as_str());
    }

    #[tokio::test]
    async fn drain_waits_and_reports() {
        let a = admin(None);
        let r = a.handle(req("POST", "/drain")).await;
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(v["state"], "drained");
        assert_eq!(v["reason"], "quiet");
        assert!(v["drain_seconds"].as_f64().is_some());
        assert_eq!(v["requests_during_drain"], 0);
        assert_eq!(v["quiet_window"], "fixed");
        assert_eq!(v["quiet_window_why"], "fixed --quiet 0.00s");
        let s: serde_json::Value =
            serde_json::from_str(&body(a.handle(req("GET", "/status")).await).await).unwrap();
        assert_eq!(s["state"], "drained");
        assert_eq!(s["in_flight"], 0);
    }

    /// A request that starts at the instant the drain decides is answered before `/drain`
    /// returns (before: `/drain` answered at `Drained`, and the kubelet then signalled the
    /// app with that request inside it).
    #[tokio::test(start_paused = true)]
    async fn drain_answers_only_once_released() {
        let a = Arc::new(admin(None));
        let lc = a.lifecycle.clone();
        let slot = Arc::new(std::sync::Mutex::new(None));
        let (lc2, slot2) = (lc.clone(), slot.clone());
        lc.on_decide(move || {
            *slot2.lock().unwrap() = Some(lc2.request(
                crate::lifecycle::drain::RequestKind::Traffic,
                std::net::Ipv4Addr::LOCALHOST.into(),
            ));
        });
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.handle(req("POST", "/drain")).await }
        });
        lc.drained().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !waiter.is_finished(),
            "/drain answered with a request in flight"
        );
        drop(slot.lock().unwrap().take());
        let r = waiter.await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(v["state"], "drained");
        assert_eq!(v["requests_after_drained"], 0);
    }

    /// `/lb-health`: the app's readiness while serving; while draining 503 only when told to
    /// (tcp mode's `--fail-health-while-draining`, always in http mode). Before: no such
    /// endpoint (404), so an NLB checking the admin port had only `/readyz`, which fails the
    /// instant the drain starts whatever the target group does with unhealthy targets.
    #[tokio::test]
    async fn lb_health_fails_while_draining_only_when_told_to() {
        for fails in [false, true] {
            let a = admin(None).with_lb_health_fails_while_draining(fails);
            // The app (port 1) is down: not healthy, as not ready.
            let r = a.handle(req("GET", "/lb-health")).await;
            assert_eq!(
                (r.status(), body(r).await),
                (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
            );
            assert_eq!(a.handle(req("POST", "/lb-health")).await.status(), 405);
            a.lifecycle.start_drain(Trigger::Admin);
            let want = if fails { 503 } else { 200 };
            let r = a.handle(req("GET", "/lb-health")).await;
            assert_eq!(r.status(), want, "fails={fails}");
            assert_eq!(body(r).await, format!("{}\n", a.lifecycle.phase().as_str()));
            // Readiness fails either way.
            assert_eq!(a.handle(req("GET", "/readyz")).await.status(), 503);
            a.lifecycle.drained().await;
            assert_eq!(a.handle(req("GET", "/lb-health")).await.status(), want);
        }
    }

    #[tokio::test]
    async fn readiness_fails_once_the_listener_failed() {
        let a = admin(None);
        a.lifecycle.fail("the traffic port stopped accepting: test");
        let r = a.handle(req("GET", "/readyz")).await;
        assert_eq!(r.status(), 503);
        assert_eq!(body(r).await.trim(), "failed");
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("wait=false"), "wait"), Some("false"));
        assert_eq!(query_param(Some("a=1&wait=0"), "wait"), Some("0"));
        assert_eq!(query_param(Some("wait"), "wait"), Some(""));
        assert_eq!(query_param(None, "wait"), None);
    }
}
