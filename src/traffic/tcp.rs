//! `--mode tcp`: the traffic port as a layer-4 forwarder, for Network Load Balancers.
//!
//! Each accepted connection is connected to the app at once (a server that speaks first, such
//! as SSH or a database, sends its greeting before the client has said anything) and copied
//! both ways until both sides have closed. A FIN in one direction is passed on as a
//! `shutdown(Write)` and the other direction keeps flowing (half-close). Each direction holds
//! at most one [`BUF`]-sized buffer, and only while bytes are in transit: an idle connection
//! holds none.
//!
//! **What the drain sees.** A new connection is the "request" of the quiet decision and an
//! open connection is "in flight": a traffic connection holds a [`Lifecycle::stream`] guard
//! for its whole life, so a drain ends once no connection has been opened for the quiet window
//! *and* every one has closed, or at drain-max (then the drain's report says how many were
//! open and for how long, and the exit ends them).
//!
//! **Health checks at layer 4.** An NLB TCP health check opens a connection and closes it
//! without sending a byte, from the NLB node's own address. So a connection is *pending* from
//! accept until one of these happens:
//! - it sends a byte (after any PROXY header): **traffic**;
//! - it stays open and silent for `--tcp-health-check-within` (default 1 s; NLB checks close at
//!   once): **traffic** (a client waiting for the server to speak first);
//! - it closes, or resets, without a byte within that time: a **health check**, recorded with
//!   [`RequestKind::HealthCheck`] against its source address (the PROXY header's, when there
//!   is one), which is what `--quiet auto` learns the cadence from; the connection is ended.
//! - its first bytes are an HTTP `GET`/`HEAD` whose `User-Agent` starts with one of
//!   `--health-check-agents` (an NLB target group with HTTP health checks): a **health
//!   check** too, recorded the same way, and forwarded so that the app answers it; except
//!   while draining with `--fail-health-while-draining`, when lameduck answers it `503`
//!   itself (the target group drains unhealthy targets: the NLB stops opening connections
//!   sooner, and keeps the open ones).
//!
//! While pending, the connection holds the drain off ([`Lifecycle::pending`]) without counting as
//! a request. The classification needs no address: with client IP preservation on, clients
//! come from their own addresses and checks from the nodes'; with it off, both come from the
//! nodes' addresses and only the behaviour tells them apart. Either way a health check still
//! counts as "traffic still arriving" for the quiet window, as in HTTP mode: while the target
//! is registered the checks keep coming, and their silence is what the drain waits for.
//!
//! **Closing.** Nothing here closes a connection when draining starts, when the drain ends, or
//! at the exit's [`Lifecycle::close`] (a byte stream has no graceful close lameduck could
//! send): only the client, the app, `--idle-timeout` (default 360 s in tcp mode, above the
//! NLB's 350 s), or the exit's cut at drain-max ([`Lifecycle::cut`]) end one.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::lifecycle::drain::{
    now_nanos, ConnectionGuard, DrainReason, Lifecycle, OpenAtEnd, PendingGuard, Phase,
    RequestGuard, RequestKind, State,
};
use crate::metrics::{Metrics, TcpEnd};
use crate::traffic::accept::{self, AcceptError};
use crate::traffic::proxy_protocol::{self, Parsed, ProxyProtocol};

/// Bytes one direction of one connection may hold at a time.
pub const BUF: usize = 16 * 1024;

/// The forwarder's settings, from the CLI.
#[derive(Clone, Debug)]
pub struct Config {
    pub upstream: SocketAddr,
    pub connect_timeout: Duration,
    /// Close a connection with no byte either way for this long.
    pub idle_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
    /// A PROXY header must be complete within this long of the accept.
    pub header_timeout: Duration,
    /// Closed without a byte within this long of the accept: a health check.
    pub health_check_within: Duration,
    /// User-Agent prefixes of HTTP health checks (`--health-check-agents`).
    pub health_check_agents: Vec<String>,
    /// While draining, answer HTTP health checks 503 instead of forwarding them
    /// (`--fail-health-while-draining`).
    pub fail_health_while_draining: bool,
    /// Connections served at once (`--max-connections`); beyond it new ones are closed on
    /// arrival, as in HTTP mode. Each uses two file descriptors: the client's and the app's.
    pub max_connections: usize,
}

/// Serves the traffic port in tcp mode until [`Lifecycle::close`]; then drops the listening
/// socket and returns `Ok` (connections still open go on until they close or are cut).
/// Accept errors are classified as in [`crate::traffic::listener::serve`].
pub async fn serve(
    listener: TcpListener,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    cfg: Config,
) -> Result<(), AcceptError> {
    let cfg = Arc::new(cfg);
    tokio::spawn(report_drain(lifecycle.clone()));
    while let Some((stream, peer)) = accept::accept(
        &listener,
        &lifecycle,
        cfg.max_connections,
        &metrics.connections_refused,
    )
    .await?
    {
        metrics.connections_total.inc();
        // Counted from the accept, so the limit in `accept` sees every connection at once.
        let open = lifecycle.connection();
        tokio::spawn(connection(
            stream,
            peer,
            open,
            lifecycle.clone(),
            metrics.clone(),
            cfg.clone(),
        ));
    }
    Ok(())
}

/// Says, in TCP words, what a drain that ended with connections open left behind.
async fn report_drain(lifecycle: Lifecycle) {
    let State::Drained { reason, .. } = lifecycle.drained().await else {
        return;
    };
    let Some(OpenAtEnd { open, oldest }) = lifecycle.open_at_end() else {
        return;
    };
    if open > 0 {
        let then = match reason {
            DrainReason::Max => "the exit ends them",
            // One opened as the clock decided: the release waits for it, to drain-max.
            DrainReason::Quiet => "the app is released once they close",
        };
        tracing::warn!(
            mode = "tcp",
            reason = reason.as_str(),
            open_connections = open,
            oldest_open_seconds = oldest.map(|d| d.as_secs_f64()),
            "drain over with {open} connection(s) still open (the oldest for {:.1}s); {then}",
            oldest.unwrap_or_default().as_secs_f64()
        );
    }
}

/// What a connection has turned out to be so far; owns the guard that says so to the drain.
enum Class {
    Pending(#[allow(dead_code)] PendingGuard, Phase),
    Traffic(RequestGuard),
    HealthCheck,
    /// An HTTP health check, forwarded to the app: holds the drain off while it is answered.
    HttpCheck(#[allow(dead_code)] PendingGuard),
}

/// One connection's classification, owned by its task.
struct Classifier {
    class: Class,
    lifecycle: Lifecycle,
    /// The client's address: the PROXY header's source when there is one, else the peer's.
    source: IpAddr,
    /// When the connection was accepted.
    opened: Instant,
    /// Pending until this instant at most.
    deadline: Instant,
}

impl Classifier {
    fn is_pending(&self) -> bool {
        matches!(self.class, Class::Pending(..))
    }

    /// A byte arrived, or the connection stayed open and silent: traffic.
    fn traffic(&mut self) {
        if self.is_pending() {
            self.class = Class::Traffic(self.lifecycle.stream(self.source));
        }
    }

    /// The first bytes are an HTTP health check.
    fn http_check(&mut self, metrics: &Metrics) {
        if let Class::Pending(hold, _) = std::mem::replace(&mut self.class, Class::HealthCheck) {
            let check = self
                .lifecycle
                .request(RequestKind::HealthCheck, self.source);
            metrics.record_health_check(check.phase());
            self.class = Class::HttpCheck(hold);
        }
    }

    /// Closed without a byte: a health check if within the window, else traffic that ended.
    fn closed(&mut self, metrics: &Metrics) -> bool {
        if !self.is_pending() {
            return false;
        }
        if Instant::now() > self.deadline {
            self.traffic();
            return false;
        }
        let check = self
            .lifecycle
            .request(RequestKind::HealthCheck, self.source);
        metrics.record_health_check(check.phase());
        self.class = Class::HealthCheck;
        true
    }
}

/// When either direction last read a byte (`now_nanos()`).
struct Activity(AtomicU64);

impl Activity {
    fn touch(&self) {
        self.0.store(now_nanos(), Ordering::Relaxed);
    }

    /// Resolves once nothing has been read either way for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let since =
                Duration::from_nanos(now_nanos().saturating_sub(self.0.load(Ordering::Relaxed)));
            match idle.checked_sub(since) {
                Some(left) if !left.is_zero() => tokio::time::sleep(left).await,
                _ => return,
            }
        }
    }
}

async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    _open: ConnectionGuard,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    cfg: Arc<Config>,
) {
    let opened = Instant::now();
    let mut classifier = Classifier {
        class: Class::Pending(lifecycle.pending(), lifecycle.phase()),
        lifecycle: lifecycle.clone(),
        source: peer.ip().to_canonical(),
        opened,
        deadline: opened + cfg.health_check_within,
    };
    let activity = Activity(AtomicU64::new(now_nanos()));
    let cut = lifecycle.cut_token();
    let end = tokio::select! {
        biased;
        _ = cut.cancelled() => TcpEnd::Cut,
        end = forward(client, &mut classifier, &activity, &metrics, &cfg) => end,
    };
    let tcp = &metrics.tcp;
    tcp.end(end);
    match &classifier.class {
        Class::Traffic(guard) => {
            tcp.connection(RequestKind::Traffic, guard.phase());
            tcp.duration(guard.phase(), opened.elapsed());
        }
        Class::Pending(_, phase) => {
            // Ended before it could be told apart (cut, a bad PROXY header, no app).
            tcp.connection(RequestKind::Traffic, *phase);
            tcp.duration(*phase, opened.elapsed());
        }
        Class::HealthCheck | Class::HttpCheck(_) => {}
    }
    if end == TcpEnd::Cut {
        tracing::debug!(%peer, open_seconds = opened.elapsed().as_secs_f64(), "connection cut at drain-max");
    }
}

/// Reads the PROXY header (if configured), connects to the app and copies both ways.
async fn forward(
    mut client: TcpStream,
    classifier: &mut Classifier,
    activity: &Activity,
    metrics: &Metrics,
    cfg: &Config,
) -> TcpEnd {
    let peer = client.peer_addr().ok();
    let _ = client.set_nodelay(true);
    // Bytes the app gets before anything else: the PROXY header (pass) and any payload read
    // with it.
    let mut first = Vec::new();
    if cfg.proxy_protocol != ProxyProtocol::Off {
        let deadline = classifier.opened + cfg.header_timeout;
        match tokio::time::timeout_at(deadline, read_header(&mut client)).await {
            Ok(Ok(HeaderRead::Closed)) => {
                return match classifier.closed(metrics) {
                    true => TcpEnd::HealthCheck,
                    false => TcpEnd::Closed,
                }
            }
            Ok(Ok(HeaderRead::Header { header, bytes })) => {
                if let Some(src) = header.source {
                    classifier.source = src.ip().to_canonical();
                }
                activity.touch();
                first = match cfg.proxy_protocol {
                    ProxyProtocol::Pass => bytes,
                    _ => Vec::new(),
                };
            }
            // Not from the load balancer (an NLB's headers are well formed): neither traffic
            // nor a check for the drain; counted and closed.
            Ok(Err(kind)) => {
                metrics.tcp.proxy_protocol_error(kind);
                tracing::debug!(?peer, kind, "bad PROXY protocol header; closing");
                return TcpEnd::ProxyProtocol;
            }
            Err(_) => {
                metrics.tcp.proxy_protocol_error("timeout");
                tracing::debug!(?peer, "PROXY protocol header not complete in time; closing");
                return TcpEnd::ProxyProtocol;
            }
        }
    }
    let mut app =
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.upstream)).await {
            Ok(Ok(app)) => app,
            // A client the app could not take is still traffic arriving.
            Ok(Err(e)) => {
                metrics.upstream_error("connect");
                tracing::debug!(?peer, error = %e, "app unreachable; closing the client");
                classifier.traffic();
                return TcpEnd::Upstream;
            }
            Err(_) => {
                metrics.upstream_error("timeout");
                tracing::debug!(?peer, "app connect timed out; closing the client");
                classifier.traffic();
                return TcpEnd::Upstream;
            }
        };
    let _ = app.set_nodelay(true);
    let (to_app, to_client) = (metrics.tcp.bytes("to_app"), metrics.tcp.bytes("to_client"));
    let (client_rd, mut client_wr) = client.split();
    let (app_rd, mut app_wr) = app.split();
    if !first.is_empty() {
        if app_wr.write_all(&first).await.is_err() {
            return TcpEnd::Error;
        }
        to_app.inc_by(first.len() as u64);
        drop(first);
    }
    let up = client_to_app(
        &client_rd,
        &mut app_wr,
        classifier,
        activity,
        metrics,
        &to_app,
        cfg,
    );
    let down = copy(&app_rd, &mut client_wr, activity, &to_client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = activity.idle_for(cfg.idle_timeout);
    tokio::pin!(idle);
    while !(up_done && down_done) {
        tokio::select! {
            res = &mut up, if !up_done => match res {
                Ok(Flow::Eof) => up_done = true,
                Ok(Flow::HealthCheck) => return TcpEnd::HealthCheck,
                Err(_) => return TcpEnd::Error,
            },
            res = &mut down, if !down_done => match res {
                Ok(()) => down_done = true,
                Err(_) => return TcpEnd::Error,
            },
            _ = &mut idle => {
                tracing::debug!(?peer, idle = ?cfg.idle_timeout, "idle connection; closing");
                return TcpEnd::Idle;
            }
        }
    }
    TcpEnd::Closed
}

/// How the client-to-app direction ended.
enum Flow {
    /// The client closed its side (FIN passed on); the other direction goes on.
    Eof,
    /// Closed without a byte: a health check. The whole connection ends.
    HealthCheck,
}

/// Client to app, classifying the connection on the way.
async fn client_to_app(
    from: &ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    classifier: &mut Classifier,
    activity: &Activity,
    metrics: &Metrics,
    bytes: &IntCounter,
    cfg: &Config,
) -> io::Result<Flow> {
    loop {
        let read = if classifier.is_pending() {
            match tokio::time::timeout_at(classifier.deadline, read_chunk(from)).await {
                Ok(read) => read,
                Err(_) => {
                    // Open and silent: a client waiting for the server to speak.
                    classifier.traffic();
                    continue;
                }
            }
        } else {
            read_chunk(from).await
        };
        match read {
            Ok(chunk) if chunk.is_empty() => {
                if classifier.closed(metrics) {
                    return Ok(Flow::HealthCheck);
                }
                to.shutdown().await?;
                return Ok(Flow::Eof);
            }
            Ok(chunk) => {
                if classifier.is_pending() && is_http_check(&chunk, &cfg.health_check_agents) {
                    classifier.http_check(metrics);
                    let phase = classifier.lifecycle.phase();
                    if cfg.fail_health_while_draining && phase != Phase::Serving {
                        // Not forwarded: the app would say it is healthy. The client's write
                        // half belongs to the other direction, which has nothing to copy (an
                        // HTTP app says nothing before a request), so the answer goes out on
                        // the shared socket; the whole connection then ends. (A check whose
                        // request came in two segments gets an RST after the 503: a failure
                        // either way, which is the point.)
                        write_all_shared(from.as_ref(), &unhealthy(&chunk, phase)).await?;
                        return Ok(Flow::HealthCheck);
                    }
                }
                classifier.traffic();
                activity.touch();
                to.write_all(&chunk).await?;
                bytes.inc_by(chunk.len() as u64);
            }
            Err(e) => {
                // A reset before any byte is how some checkers close.
                if classifier.closed(metrics) {
                    return Ok(Flow::HealthCheck);
                }
                return Err(e);
            }
        }
    }
}

/// One direction: copies until EOF, then passes the FIN on.
async fn copy(
    from: &ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    activity: &Activity,
    bytes: &IntCounter,
) -> io::Result<()> {
    loop {
        let chunk = read_chunk(from).await?;
        if chunk.is_empty() {
            return to.shutdown().await;
        }
        activity.touch();
        to.write_all(&chunk).await?;
        bytes.inc_by(chunk.len() as u64);
    }
}

/// Reads what is there, up to [`BUF`] bytes; empty at EOF. The buffer exists only from the
/// moment the socket is readable until the chunk is written on.
async fn read_chunk(from: &ReadHalf<'_>) -> io::Result<Vec<u8>> {
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(BUF);
        match from.try_read_buf(&mut buf) {
            Ok(_) => return Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The answer to an HTTP health check while draining (`--fail-health-while-draining`): 503,
/// as HTTP mode answers `--health-path`; no body to a `HEAD`.
fn unhealthy(request: &[u8], phase: Phase) -> Vec<u8> {
    let body = format!("{}\n", phase.as_str());
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if !request.starts_with(b"HEAD ") {
        out.push_str(&body);
    }
    out.into_bytes()
}

/// Writes all of `buf` through a shared reference to the socket.
async fn write_all_shared(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the start of a connection held, with `--proxy-protocol` on.
enum HeaderRead {
    /// Closed (or reset) before its first byte.
    Closed,
    /// A complete header; `bytes` is exactly it.
    Header {
        header: proxy_protocol::Header,
        bytes: Vec<u8>,
    },
}

/// Reads exactly one PROXY v2 header, never past it. The error is the metric's `kind`.
async fn read_header(client: &mut TcpStream) -> Result<HeaderRead, &'static str> {
    let mut bytes = Vec::with_capacity(proxy_protocol::FIXED_LEN);
    let mut need = proxy_protocol::FIXED_LEN;
    loop {
        let have = bytes.len();
        bytes.resize(need, 0);
        let n = match client.read(&mut bytes[have..need]).await {
            Ok(n) => n,
            Err(_) if have == 0 => 0,
            Err(_) => return Err("truncated"),
        };
        bytes.truncate(have + n);
        if n == 0 {
            return match have {
                0 => Ok(HeaderRead::Closed),
                _ => Err("truncated"),
            };
        }
        match proxy_protocol::parse(&bytes) {
            Ok(Parsed::Complete(header)) => return Ok(HeaderRead::Header { header, bytes }),
            Ok(Parsed::Incomplete { need: more }) => need = more.min(proxy_protocol::MAX_LEN),
            Err(e) => return Err(e.kind()),
        }
    }
}

/// An HTTP health check on a TCP target group: `chunk` (the first bytes of a connection)
/// starts a `GET` or `HEAD` whose `User-Agent` starts with one of `agents`.
fn is_http_check(chunk: &[u8], agents: &[String]) -> bool {
    if !(chunk.starts_with(b"GET ") || chunk.starts_with(b"HEAD ")) {
        return false;
    }
    let head = &chunk[..chunk.len().min(4096)];
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"user-agent") {
            let value = line[colon + 1..].trim_ascii_start();
            return agents
                .iter()
                .any(|a| !a.is_empty() && value.starts_with(a.as_bytes()));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_health_checks_are_recognised_from_their_first_bytes() {
        let agents = ["ELB-HealthChecker".to_owned()];
        let cases: [(&[u8], bool); 7] = [
            (
                b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1\r\nUser-Agent: ELB-HealthChecker/2.0\r\n\r\n",
                true,
            ),
            (
                b"HEAD / HTTP/1.1\r\nuser-agent:ELB-HealthChecker/2.0\r\n\r\n",
                true,
            ),
            (b"GET / HTTP/1.1\r\nUser-Agent: curl/8\r\n\r\n", false),
            (
                b"POST / HTTP/1.1\r\nUser-Agent: ELB-HealthChecker/2.0\r\n\r\n",
                false,
            ),
            // After the end of the head it is a body, not a header.
            (
                b"GET / HTTP/1.1\r\n\r\nUser-Agent: ELB-HealthChecker/2.0\r\n",
                false,
            ),
            (b"\x16\x03\x01\x02\x00", false),
            (b"GET", false),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                is_http_check(bytes, &agents),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(!is_http_check(
            b"GET / HTTP/1.1\r\nUser-Agent: anything\r\n\r\n",
            &[String::new()]
        ));
    }

    #[test]
    fn a_failed_health_check_is_a_complete_503() {
        let get = unhealthy(b"GET /healthz HTTP/1.1\r\n\r\n", Phase::Draining);
        assert_eq!(
            String::from_utf8(get).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 9\r\nconnection: close\r\n\r\ndraining\n"
        );
        let head =
            String::from_utf8(unhealthy(b"HEAD / HTTP/1.1\r\n\r\n", Phase::Drained)).unwrap();
        assert!(
            head.ends_with("content-length: 8\r\nconnection: close\r\n\r\n"),
            "{head}"
        );
    }
}
