//! The traffic path: one hyper `Service` per connection that forwards each request to the app.
//!
//! ```text
//! service      in-flight guard, last-request instant, health-check recognition, metrics
//!              (held until the body ends)
//! drain-aware  health path answered 503 while draining; `connection: close` once drained
//! forward      hop-by-hop headers, URI and Host, upgrades, upstream errors → 502/504
//! ```
//!
//! The three steps run in one [`ProxyService::call`] and one [`ProxyFuture`], not as tower
//! layers behind hyper-util's adapter: each request then costs one future (plus the boxed
//! forward), not four nested ones moved into each other (issue 14: ~2,000 instructions per
//! request less, see docs/benchmark.md).
//!
//! Nothing here decides *when* the drain ends; every step reads the [`Lifecycle`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::lifecycle::drain::{Lifecycle, Phase, RequestGuard, RequestKind};
use crate::metrics::Metrics;
use crate::traffic::conn::{persistence, ConnRequest, ConnState, Persistence};
use crate::traffic::request::{
    is_upgrade, prepare_request, refuse, strip_hop_by_hop, Refusal, PROXIED,
};
use crate::traffic::upstream::{ClientBody, RequestBody, Upstream, UpstreamBody, UpstreamError};

/// Builds the per-connection services; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    service: Arc<ServiceShared>,
    forward: Arc<ForwardShared>,
}

/// The ALB's default health-check path for gRPC target groups (success code 12,
/// Unimplemented): a health check whatever `--health-path` says.
pub const ALB_GRPC_HEALTH_PATH: &str = "/AWS.ALB/healthcheck";

/// How the traffic path recognises and answers health checks, and treats connections while
/// draining.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--health-path` (any number); [`ALB_GRPC_HEALTH_PATH`] is always one too.
    pub health_paths: Vec<String>,
    /// `--health-check-agents`: User-Agent prefixes of load-balancer health checkers.
    pub health_check_agents: Vec<String>,
    /// `--keep-alive-while-draining`: today's behaviour before 0.2, persistent connections
    /// left alone until the drain ends.
    pub keep_alive_while_draining: bool,
}

impl Proxy {
    pub fn new(
        lifecycle: Lifecycle,
        metrics: Arc<Metrics>,
        upstream: Arc<Upstream>,
        options: Options,
    ) -> Proxy {
        let mut paths: Vec<String> = options.health_paths;
        if !paths.iter().any(|p| p == ALB_GRPC_HEALTH_PATH) {
            paths.push(ALB_GRPC_HEALTH_PATH.to_owned());
        }
        let health_paths: Arc<[Box<str>]> = paths.into_iter().map(String::into_boxed_str).collect();
        Proxy {
            service: Arc::new(ServiceShared {
                lifecycle: lifecycle.clone(),
                metrics: metrics.clone(),
                health_paths: health_paths.clone(),
                health_check_agents: options
                    .health_check_agents
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect(),
                keep_alive_while_draining: options.keep_alive_while_draining,
            }),
            forward: Arc::new(ForwardShared {
                upstream,
                metrics,
                lifecycle,
                hop: hop_mark(),
            }),
        }
    }

    /// `--keep-alive-while-draining`, for the connections' tasks.
    pub fn keep_alive_while_draining(&self) -> bool {
        self.service.keep_alive_while_draining
    }

    /// Counts an accepted downstream connection.
    pub fn accepted(&self) {
        self.service.metrics.connections_total.inc();
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.service.metrics
    }

    /// The service for one accepted connection from `peer`.
    pub fn service(&self, conn: Arc<ConnState>, peer: std::net::IpAddr) -> ProxyService {
        ProxyService {
            service: self.service.clone(),
            forward: self.forward.clone(),
            conn,
            peer,
        }
    }
}

// === Response body ===

/// What the proxy answers with: the app's streamed body, or a short local one.
pub enum ResBody {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

impl ResBody {
    fn text(s: impl Into<Bytes>) -> ResBody {
        ResBody::Local(Some(s.into()))
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ResBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResBody::Upstream(b) => b.is_end_stream(),
            ResBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResBody::Upstream(b) => b.size_hint(),
            ResBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A request lameduck answers itself ([`request::refuse`], [`request::prepare_request`]).
fn refused(r: Refusal) -> Response<ResBody> {
    let mut resp = local(r.status, r.text);
    if let Some(allow) = r.allow {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

fn local(status: StatusCode, text: impl Into<Bytes>) -> Response<ResBody> {
    let mut resp = Response::new(ResBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

// === impl Track ===

struct ServiceShared {
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    health_paths: Arc<[Box<str>]>,
    health_check_agents: Vec<String>,
    /// `--keep-alive-while-draining` ([`Options`]).
    keep_alive_while_draining: bool,
}

fn is_health_path(paths: &[Box<str>], path: &str) -> bool {
    paths.iter().any(|p| &**p == path)
}

impl ServiceShared {
    /// A load-balancer health check: the health path or a known checker's User-Agent, on
    /// what only a health check looks like. The ALB's checks come on a new connection each
    /// time (so as the connection's first request) and carry none of the [`PROXIED`]
    /// headers; a request through the load balancer that happens to hit the health path
    /// (an uptime monitor, a user) always carries them, so it is traffic, and it must not
    /// teach `--quiet auto` a shorter interval.
    fn kind<B>(&self, req: &Request<B>, first_on_connection: bool) -> RequestKind {
        if !first_on_connection || PROXIED.iter().any(|h| req.headers().contains_key(h)) {
            return RequestKind::Traffic;
        }
        let by_path = is_health_path(&self.health_paths, req.uri().path());
        let by_agent = || {
            req.headers().get(header::USER_AGENT).is_some_and(|ua| {
                self.health_check_agents
                    .iter()
                    .any(|a| ua.as_bytes().starts_with(a.as_bytes()))
            })
        };
        if by_path || (!self.health_check_agents.is_empty() && by_agent()) {
            RequestKind::HealthCheck
        } else {
            RequestKind::Traffic
        }
    }
}

/// The service of one downstream connection: counts each request from its start until its
/// response body ends or is abandoned, answers health checks while draining, and forwards
/// the rest.
pub struct ProxyService {
    service: Arc<ServiceShared>,
    forward: Arc<ForwardShared>,
    conn: Arc<ConnState>,
    peer: std::net::IpAddr,
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<CountedBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn call(&self, req: Request<Incoming>) -> ProxyFuture {
        let shared = &self.service;
        let (conn, first) = ConnState::request(&self.conn);
        let kind = shared.kind(&req, first);
        let request = shared.lifecycle.request(kind, self.peer);
        let phase = request.phase();
        let h2 = req.version() == Version::HTTP_2;
        let persistence = persistence(
            phase,
            h2,
            shared.keep_alive_while_draining,
            shared.lifecycle.is_closing(),
        );
        if persistence == Persistence::GoAway {
            self.conn.go_away();
        }
        let done = Some(RequestRecord {
            request,
            _conn: conn,
            shared: shared.clone(),
            status: 0,
            grpc: is_grpc(req.headers()),
        });
        if phase != Phase::Serving && is_health_path(&shared.health_paths, req.uri().path()) {
            // While draining, the load balancer's health check is answered here: 503, or
            // for gRPC a trailers-only `grpc-status: 14`, so the target is marked unhealthy
            // quickly.
            let resp = if is_grpc(req.headers()) {
                grpc_trailers_only(grpc_unavailable(
                    "lameduck: the pod is draining; use another target",
                ))
            } else {
                let mut resp = local(StatusCode::SERVICE_UNAVAILABLE, phase.as_str());
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                resp
            };
            return ProxyFuture {
                answer: Answer::Local(Some(Box::new(resp))),
                done,
                close: false,
            };
        }
        let close = persistence == Persistence::CloseAfterResponse;
        let forward = self.forward.clone();
        ProxyFuture {
            answer: Answer::Forward(Box::pin(async move { forward.forward(req).await })),
            done,
            close,
        }
    }
}

/// Records a request when dropped: by the body at its end, or by the future if the client
/// went away before the response (recorded as 499, as nginx does).
struct RequestRecord {
    request: RequestGuard,
    _conn: ConnRequest,
    shared: Arc<ServiceShared>,
    status: u16,
    /// A gRPC call: cut with `grpc-status` trailers rather than a stream reset.
    grpc: bool,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let status = if self.status == 0 { 499 } else { self.status };
        self.shared.metrics.record_request(
            status,
            self.request.phase(),
            self.request.kind(),
            self.request.elapsed(),
        );
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a request is answered with: a local response (boxed: rare, and the future stays
/// small), or the app's (one boxed future: `Upstream::send`'s future has no name).
enum Answer {
    Local(Option<Box<Response<ResBody>>>),
    Forward(BoxFuture<Response<ResBody>>),
}

/// The response future of [`ProxyService`]: the answer, with the request's tracking moved
/// into the response body.
pub struct ProxyFuture {
    answer: Answer,
    done: Option<RequestRecord>,
    /// HTTP/1: `connection: close` on a forwarded response (decided at the request's start).
    close: bool,
}

impl Future for ProxyFuture {
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let resp = match &mut this.answer {
            Answer::Local(resp) => *resp.take().expect("polled after completion"),
            Answer::Forward(fut) => {
                let mut resp = ready!(fut.as_mut().poll(cx));
                let done = this.done.as_ref().expect("polled after completion");
                // Decided when the request started, or the exit began since (its close is
                // graceful: this response still goes out whole).
                let close = this.close || done.shared.lifecycle.is_closing();
                if close && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        let mut done = this.done.take().expect("polled after completion");
        // A gRPC error of lameduck's own is HTTP 200 on the wire; it counts as what it is.
        done.status = match resp.extensions().get::<GrpcError>() {
            Some(e) => e.0.as_u16(),
            None => resp.status().as_u16(),
        };
        Poll::Ready(Ok(resp.map(|inner| CountedBody {
            inner,
            done: Some(done),
            ended: false,
        })))
    }
}

/// The response body as sent downstream; ends the request's tracking when it ends.
pub struct CountedBody {
    inner: ResBody,
    done: Option<RequestRecord>,
    /// Cut at drain-max: gRPC trailers sent, nothing more.
    ended: bool,
}

/// The error a response body ends with when drain-max cuts it: hyper turns an `h2::Error`
/// in the chain into `RST_STREAM` with its reason, so an h2 client sees `CANCEL` (a stream
/// end it can retry), not `INTERNAL_ERROR`. An HTTP/1 client sees the connection close.
#[derive(Debug, thiserror::Error)]
#[error("response cut at drain-max")]
pub struct CutAtDrainMax(#[source] h2::Error);

pub type BodyError = crate::traffic::upstream::BoxError;

impl Body for CountedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let res = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match res {
            None => {
                drop(self.done.take());
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                let done = self.done.take();
                let cut = done.as_ref().is_some_and(|d| d.shared.lifecycle.is_cut());
                if cut {
                    tracing::debug!(error = %e, "response cut at drain-max");
                    if done.as_ref().is_some_and(|d| d.grpc) {
                        self.ended = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(grpc_unavailable(
                            "lameduck: the pod is shutting down (drain-max reached)",
                        )))));
                    }
                    let cancel = h2::Error::from(h2::Reason::CANCEL);
                    return Poll::Ready(Some(Err(CutAtDrainMax(cancel).into())));
                }
                tracing::debug!(error = %e, "upstream response body failed midway");
                if let Some(d) = &done {
                    let stalled = e.is::<crate::traffic::upstream::BodyStalled>();
                    d.shared
                        .metrics
                        .upstream_error(if stalled { "body_timeout" } else { "body" });
                }
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `content-type: application/grpc` (and `application/grpc+proto` etc.).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC trailers-only response (HTTP 200, the status in the headers, no body).
fn grpc_trailers_only(status: HeaderMap) -> Response<ResBody> {
    let mut resp = Response::new(ResBody::Local(None));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.extend(status);
    resp
}

/// The HTTP status a gRPC error of lameduck's own stands for (`lameduck_requests_total`'s
/// `code`), kept on the response, which is HTTP 200 on the wire.
#[derive(Clone, Copy)]
struct GrpcError(StatusCode);

const GRPC_UNAVAILABLE: u8 = 14;

/// `grpc-status: code` with `message` as `grpc-message`, percent-encoded as the gRPC
/// HTTP/2 protocol asks (bytes outside printable ASCII, and `%`).
fn grpc_status(code: u8, message: &str) -> HeaderMap {
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        t.insert("grpc-message", v);
    }
    t
}

/// `grpc-status: 14` (UNAVAILABLE): the status gRPC clients retry elsewhere.
fn grpc_unavailable(message: &str) -> HeaderMap {
    grpc_status(GRPC_UNAVAILABLE, message)
}

// === impl Forward ===

/// Sends the request to the app and turns failures into 502/504 answers naming the cause.
struct ForwardShared {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    /// This process's mark in [`HOP_HEADER`].
    hop: HeaderValue,
}

/// Request header in which each lameduck a request passes through appends its own random
/// mark (per process). A request that arrives carrying this process's mark has come back
/// through its own `--upstream` (a name resolving to the pod itself, a Service pointing
/// back): it is answered 508 instead of looping until memory runs out.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("x-lameduck-hop");

/// A random mark for [`HOP_HEADER`]; without a random number generator, the process id and
/// start time (unique enough on one node).
fn hop_mark() -> HeaderValue {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u32;
        bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
        bytes[4..].copy_from_slice(&t.to_be_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&hex).expect("hex is a valid header value")
}

impl ForwardShared {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<ResBody> {
        if let Err(r) = refuse(&req) {
            return refused(r);
        }
        if req
            .headers()
            .get_all(&HOP_HEADER)
            .iter()
            .any(|m| m == self.hop)
        {
            tracing::error!(
                upstream = %self.upstream.config().addr,
                "a request came back through --upstream to this proxy: answered 508"
            );
            return local(
                StatusCode::LOOP_DETECTED,
                "lameduck: loop detected: this request came back to the proxy through its \
                 own --upstream\n",
            );
        }
        req.headers_mut().append(HOP_HEADER, self.hop.clone());
        let grpc = is_grpc(req.headers());
        let upgrade = is_upgrade(&req);
        let version = req.version();
        let protocol = self.upstream.config().protocol;
        if let Err(r) = prepare_request(&mut req, upgrade, protocol) {
            return refused(r);
        }
        if upgrade {
            // Boxed, like the other cold paths: the per-request future stays small (it is
            // moved into its box whole, and its size is that of its largest state).
            return Box::pin(self.forward_upgrade(req)).await;
        }
        let req = self.client_body(req);
        let metrics = &self.metrics;
        match self
            .upstream
            .send(req, || metrics.upstream_retries.inc())
            .await
        {
            Ok(mut resp) => {
                if resp.headers().contains_key(header::TRANSFER_ENCODING) {
                    // Both framings from the app: the transfer coding won (RFC 9112 §6.3), so
                    // its Content-Length is wrong and must not reach the client.
                    resp.headers_mut().remove(header::CONTENT_LENGTH);
                }
                strip_hop_by_hop(resp.headers_mut(), false);
                // The client's version, not the app's: an HTTP/1.0 app must not turn off
                // keep-alive towards the load balancer.
                *resp.version_mut() = version;
                resp.map(ResBody::Upstream)
            }
            Err(e) => self.fail(e, grpc),
        }
    }

    fn client_body(&self, req: Request<Incoming>) -> Request<RequestBody> {
        let timeout = self.upstream.config().request_body_timeout;
        req.map(|b| http_body_util::Either::Left(ClientBody::new(b, timeout)))
    }

    /// lameduck's answer when the app could not give one: 502/503/504 naming the cause, or
    /// for a gRPC request the same as a trailers-only gRPC status with that message (a gRPC
    /// client reads an HTTP 502 as UNAVAILABLE without the message).
    fn fail(&self, e: UpstreamError, grpc: bool) -> Response<ResBody> {
        let (status, text, code) = if self.lifecycle.is_cut() {
            // Not the app's fault: drain-max is over and its connection was ended.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "lameduck: the pod is shutting down (drain-max reached before the app answered)"
                    .to_owned(),
                GRPC_UNAVAILABLE,
            )
        } else if e.kind.is_client() {
            // The client's doing (a broken or trickled body): not an app failure, and not
            // worth a warning per request.
            self.metrics.client_error(e.kind.label());
            tracing::debug!(kind = e.kind.label(), error = %e, "client request failed");
            (
                e.kind.status(),
                format!("lameduck: {e}"),
                e.kind.grpc_status(),
            )
        } else {
            self.metrics.upstream_error(e.kind.label());
            tracing::warn!(kind = e.kind.label(), error = %e, "upstream request failed");
            (
                e.kind.status(),
                format!("lameduck: {e}"),
                e.kind.grpc_status(),
            )
        };
        let mut resp = if grpc {
            let mut resp = grpc_trailers_only(grpc_status(code, &text));
            resp.extensions_mut().insert(GrpcError(status));
            resp
        } else {
            local(status, format!("{text}\n"))
        };
        if e.kind.is_client() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// HTTP/1 upgrade (WebSocket): forward on a dedicated connection; after a 101, splice
    /// the two upgraded connections together. The tunnel holds off the end of the drain.
    async fn forward_upgrade(&self, mut req: Request<Incoming>) -> Response<ResBody> {
        let downstream = hyper::upgrade::on(&mut req);
        let req = self.client_body(req);
        let mut resp = match self.upstream.send_upgrade(req).await {
            Ok(resp) => resp,
            Err(e) => return self.fail(e, false),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(resp.headers_mut(), false);
            return resp.map(|b| ResBody::Upstream(UpstreamBody::unpooled(b)));
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let open = self.lifecycle.tunnel();
        let lifecycle = self.lifecycle.clone();
        tokio::spawn(async move {
            let _open = open;
            let tunnel = async {
                match tokio::try_join!(downstream, upstream) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            tracing::debug!(error = %e, "upgraded tunnel ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            };
            // At exit, after the release (and its --tunnel-grace), the tunnel ends: both
            // sides see a FIN (a WebSocket client: 1006, and reconnects). Injecting close
            // frames would mean parsing and re-framing the stream (fragmented, compressed
            // messages), which a proxy cannot do safely mid-message.
            let mut state = lifecycle.subscribe();
            tokio::select! {
                _ = tunnel => {}
                _ = state.wait_for(|_| lifecycle.is_closing()) => {
                    tracing::debug!("upgraded tunnel closed at exit")
                }
            }
        });
        strip_hop_by_hop(resp.headers_mut(), true);
        resp.map(|_| ResBody::Local(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::upstream::Protocol;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn shared(path: Option<&str>) -> ServiceShared {
        let lc = Lifecycle::new(crate::lifecycle::drain::DrainSettings::fixed(
            std::time::Duration::ZERO,
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(1),
        ));
        ServiceShared {
            metrics: Arc::new(Metrics::new(lc.clone())),
            lifecycle: lc,
            health_paths: path.map(|p| p.into()).into_iter().collect(),
            health_check_agents: vec!["ELB-HealthChecker/".into()],
            keep_alive_while_draining: false,
        }
    }

    #[test]
    fn health_checks_are_recognised_by_what_only_they_have() {
        let t = shared(Some("/healthz"));
        let check = |path: &str, extra: &[(&str, &str)], first: bool| {
            let mut b = Request::builder()
                .uri(path)
                .header("user-agent", "ELB-HealthChecker/2.0");
            for (k, v) in extra {
                b = b.header(*k, *v);
            }
            t.kind(&b.body(()).unwrap(), first)
        };
        use RequestKind::*;
        assert_eq!(check("/healthz", &[], true), HealthCheck);
        assert_eq!(check("/other", &[], true), HealthCheck); // by User-Agent
                                                             // Came through the load balancer: traffic, whatever it looks like.
        for h in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-amzn-trace-id",
        ] {
            assert_eq!(check("/healthz", &[(h, "1")], true), Traffic, "{h}");
        }
        // ALB checks open a new connection each time.
        assert_eq!(check("/healthz", &[], false), Traffic);
    }

    #[test]
    fn grpc_health_checks_fail_in_grpc_while_draining() {
        let r = grpc_trailers_only(grpc_unavailable("draining"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert!(r.body().is_end_stream());
        let paths: Vec<Box<str>> = vec!["/healthz".into(), ALB_GRPC_HEALTH_PATH.into()];
        assert!(is_health_path(&paths, "/AWS.ALB/healthcheck"));
        assert!(!is_health_path(&paths, "/AWS.ALB/healthcheck/x"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("host", "example.com"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-end-to-end"]);
    }

    #[test]
    fn connection_cannot_remove_host_or_forwarding_headers() {
        let mut h = headers(&[
            (
                "connection",
                "host, x-forwarded-for, content-length, x-drop",
            ),
            ("host", "a"),
            ("x-forwarded-for", "1.2.3.4"),
            ("content-length", "0"),
            ("x-drop", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "host", "x-forwarded-for"]);
    }

    #[test]
    fn requests_refused_with_the_status_the_rfcs_give() {
        let req = |m: &str, hdrs: &[(&str, &str)]| {
            let mut b = Request::builder().method(m).uri("/");
            for (k, v) in hdrs {
                b = b.header(*k, *v);
            }
            refuse(&b.body(()).unwrap())
                .err()
                .map(|r| r.status.as_u16())
        };
        assert_eq!(req("CONNECT", &[("host", "a:443")]), Some(405));
        assert_eq!(req("GET", &[("host", "a"), ("host", "b")]), Some(400));
        // HTTP/1.1 without Host (RFC 9112 §3.2). Before: forwarded with an empty Host.
        assert_eq!(req("GET", &[]), Some(400));
        let http10 = Request::builder()
            .version(Version::HTTP_10)
            .uri("/")
            .body(())
            .unwrap();
        assert!(refuse(&http10).is_ok(), "HTTP/1.0 may omit Host");
        assert_eq!(
            req(
                "POST",
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")]
            ),
            Some(501)
        );
        assert_eq!(
            req("POST", &[("host", "a"), ("transfer-encoding", "chunked")]),
            None
        );
        assert_eq!(req("GET", &[("host", "a")]), None);
    }

    #[test]
    fn absolute_form_authority_wins_and_http10_gets_a_host() {
        let mut req = Request::builder()
            .uri("http://real.example/x")
            .header("host", "other.example")
            .body(())
            .unwrap();
        assert!(prepare_request(&mut req, false, Protocol::Http1).is_ok());
        assert_eq!(req.headers()["host"], "real.example");
        assert_eq!(req.uri(), "/x");
        let mut req = Request::builder()
            .version(Version::HTTP_10)
            .uri("/x")
            .body(())
            .unwrap();
        assert!(prepare_request(&mut req, false, Protocol::Http1).is_ok());
        assert_eq!(req.headers()["host"], "");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn te_trailers_and_upgrade_survive_when_wanted() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn h2_request_gets_host_and_origin_form_for_h1_upstream() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://app.example:8080/a?b=1")
            .body(())
            .unwrap();
        assert!(prepare_request(&mut req, false, Protocol::Http1).is_ok());
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "app.example:8080");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn h1_request_gets_absolute_uri_for_h2_upstream() {
        let mut req = Request::builder()
            .uri("/svc.Greeter/Hello")
            .header("host", "grpc.local")
            .body(())
            .unwrap();
        assert!(prepare_request(&mut req, false, Protocol::H2c).is_ok());
        assert_eq!(req.uri(), "http://grpc.local/svc.Greeter/Hello");
        assert_eq!(req.version(), Version::HTTP_2);
    }
}
