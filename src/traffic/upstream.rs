//! The connection to the app: a keep-alive pool, timeouts, and the one safe retry.
//!
//! The pool exists to shield the app's keep-alive timeout, the classic cause of 502s: an app
//! (Node.js: 5 s, gunicorn: 2 s) closes an idle connection at the moment the proxy reuses it.
//! So the pool never hands out a connection idle longer than `--upstream-idle-timeout`
//! (default 1 s, below every common app default), and when a *reused* connection still
//! fails before any response byte, the request is retried once on a fresh connection if
//! that is safe: the request was never written (hyper hands it back), or it is idempotent
//! and has no body, so it can be rebuilt (kept only when the connection sat idle long
//! enough for an app to be closing it, [`REPLAY_AFTER_IDLE`]).
//!
//! HTTP/1 connections are pooled LIFO (the most recently used is the least likely to be
//! closing). With `--upstream-protocol h2c` one multiplexed connection is shared and
//! re-established when it closes.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle HTTP/1 connections kept at most; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Largest read buffer per app connection.
const UPSTREAM_READ_BUF: usize = 32 * 1024;

/// A reused connection idle at least this long may be one the app is closing for
/// idleness, so a request sent on it keeps what it needs to be rebuilt. Below every real
/// app keep-alive timeout (gunicorn's 2 s is the lowest common one); a connection reused
/// sooner (under load: microseconds) skips the copy, and a request never written is
/// retried whatever the idle time.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Wire protocol spoken to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 with a keep-alive pool.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC apps).
    H2c,
}

/// Upstream settings from the CLI.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// The app must start its response within this long (`--upstream-response-timeout`).
    pub response_timeout: Duration,
    /// A response body silent this long is ended (`--upstream-body-timeout`).
    pub body_timeout: Duration,
    /// A request body must bring [`BODY_MIN_BYTES`] per this long (`--request-body-timeout`).
    pub request_body_timeout: Duration,
    /// Cancelled when drain-max is over at exit ([`crate::lifecycle::drain::Lifecycle::cut`]): every
    /// app connection is ended, so responses still streaming from it end too.
    pub cut: tokio_util::sync::CancellationToken,
}

/// What went wrong talking to the app. Classified once, here: it decides the status code
/// the client gets and the `kind` label of `lameduck_upstream_errors_total`.
/// Spawns hyper's h2 client tasks (hyper runs the h2 connection itself on its executor, not
/// in the future it hands back) so that [`Config::cut`] ends them: the connection and every
/// stream on it end, and so do the responses still streaming from it.
#[derive(Clone)]
struct CutExecutor(tokio_util::sync::CancellationToken);

impl<F> hyper::rt::Executor<F> for CutExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let cut = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = cut.cancelled() => {}
            }
        });
    }
}

#[derive(Debug)]
pub struct UpstreamError {
    pub kind: ErrorKind,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection could not be made (refused, unreachable).
    Connect,
    /// The connection did not complete within `--upstream-connect-timeout`.
    Timeout,
    /// The app closed or reset the connection before a complete response head.
    Reset,
    /// The app sent something that is not HTTP.
    Protocol,
    /// The client's request body failed while it was being forwarded (the client's fault).
    RequestBody,
    /// The client's request body was too slow (`--request-body-timeout`; the client's fault).
    RequestBodyTimeout,
    /// The app did not start its response in time (`--upstream-response-timeout`).
    ResponseTimeout,
}

impl ErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::RequestBody => "request_body",
            ErrorKind::RequestBodyTimeout => "request_body_timeout",
            ErrorKind::ResponseTimeout => "response_timeout",
        }
    }

    /// The client's fault rather than the app's: counted apart, logged quietly.
    pub fn is_client(self) -> bool {
        matches!(self, ErrorKind::RequestBody | ErrorKind::RequestBodyTimeout)
    }

    /// The gRPC status a gRPC client gets instead (the gRPC spec's HTTP mapping, except a
    /// response timeout: the app has the call, so DEADLINE_EXCEEDED, which clients do not
    /// retry blindly, rather than UNAVAILABLE).
    pub fn grpc_status(self) -> u8 {
        match self {
            ErrorKind::ResponseTimeout | ErrorKind::RequestBodyTimeout => 4,
            ErrorKind::RequestBody => 13,
            _ => 14,
        }
    }

    /// The status code the client gets.
    pub fn status(self) -> http::StatusCode {
        match self {
            ErrorKind::Timeout | ErrorKind::ResponseTimeout => http::StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RequestBody => http::StatusCode::BAD_REQUEST,
            ErrorKind::RequestBodyTimeout => http::StatusCode::REQUEST_TIMEOUT,
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

impl UpstreamError {
    fn new(kind: ErrorKind, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        UpstreamError {
            kind,
            source: Some(source.into()),
        }
    }

    fn from_hyper(e: hyper::Error) -> Self {
        let kind = if e.is_parse() || e.is_parse_status() {
            ErrorKind::Protocol
        } else if caused_by::<RequestBodyTooSlow>(&e) {
            return UpstreamError {
                kind: ErrorKind::RequestBodyTimeout,
                source: None,
            };
        } else if e.is_body_write_aborted() || is_user_body(&e) {
            ErrorKind::RequestBody
        } else {
            ErrorKind::Reset
        };
        UpstreamError::new(kind, e)
    }
}

/// Somewhere in `e`'s chain of sources.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The least a request body must bring per `--request-body-timeout` until it ends.
pub const BODY_MIN_BYTES: usize = 1024;

/// A request body that brought less than [`BODY_MIN_BYTES`] in a whole window.
#[derive(Debug, thiserror::Error)]
#[error("the request body brought less than 1 KiB in {0:?} (--request-body-timeout)")]
pub struct RequestBodyTooSlow(pub Duration);

/// A response body from the app that sent nothing for a whole window.
#[derive(Debug, thiserror::Error)]
#[error("the app sent nothing for {0:?} in the middle of its response (--upstream-body-timeout)")]
pub struct BodyStalled(pub Duration);

fn is_user_body(e: &hyper::Error) -> bool {
    // hyper reports a failing request body as a user error whose source is the body's error.
    e.is_user() && std::error::Error::source(e).is_some()
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::Connect => "could not connect to the app",
            ErrorKind::Timeout => "timed out connecting to the app",
            ErrorKind::Reset => "the app closed the connection before responding",
            ErrorKind::Protocol => "the app sent an invalid HTTP response",
            ErrorKind::RequestBody => "the client's request body failed",
            ErrorKind::RequestBodyTimeout => {
                "the client's request body brought less than 1 KiB per --request-body-timeout"
            }
            ErrorKind::ResponseTimeout => "the app did not start its response in time",
        };
        match &self.source {
            Some(s) => write!(f, "{what}: {s}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// The pooled client. Cheap to share behind an `Arc`.
pub struct Upstream {
    cfg: Config,
    pool: Arc<Pool>,
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    h2_connecting: tokio::sync::Mutex<()>,
    /// The tasks running the HTTP/1 app connections, see [`ConnTasks`].
    tasks: Arc<ConnTasks>,
}

/// The tasks that run the HTTP/1 app connections, aborted together at the cut
/// ([`Config::cut`]): aborting drops a connection as a `select!` on the token inside each
/// task would, without polling the token at every wake-up of a busy connection (three per
/// request: ~480 instructions, 1.5 % of a request's user-space work; issue 14).
#[derive(Default)]
struct ConnTasks {
    /// `None` once the cut has aborted them: a connection made after it is not run.
    set: Mutex<Option<tokio::task::JoinSet<()>>>,
    watching: std::sync::OnceLock<()>,
}

impl ConnTasks {
    fn spawn(
        self: &Arc<Self>,
        cut: &tokio_util::sync::CancellationToken,
        conn: impl Future<Output = ()> + Send + 'static,
    ) {
        self.watching.get_or_init(|| {
            let (tasks, cut) = (Arc::downgrade(self), cut.clone());
            tokio::spawn(async move {
                cut.cancelled().await;
                if let Some(tasks) = tasks.upgrade() {
                    // Dropping a JoinSet aborts its tasks.
                    drop(tasks.set.lock().expect("not poisoned").take());
                }
            });
        });
        let mut set = self.set.lock().expect("not poisoned");
        // Checked under the lock the watcher takes after the token is cancelled: either
        // the watcher sees this task, or this sees the cut and does not run it.
        if cut.is_cancelled() {
            return;
        }
        let set = set.get_or_insert_with(tokio::task::JoinSet::new);
        // Forget the tasks already finished (one connection made per retire of another).
        while set.try_join_next().is_some() {}
        set.spawn(conn);
    }
}

/// Bodies sent upstream: the client's streaming body, or nothing (a rebuilt retry).
pub type RequestBody = http_body_util::Either<ClientBody, http_body_util::Empty<Bytes>>;

struct Pool {
    idle: Mutex<Vec<Idle>>,
    idle_timeout: Duration,
}

struct Idle {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// A request that can be rebuilt for a retry after it was (perhaps partly) written.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// Only idempotent requests without a body can be sent again.
    fn capture(req: &Request<RequestBody>) -> Option<Replay> {
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        if !idempotent || !req.body().is_end_stream() {
            return None;
        }
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn rebuild(self) -> Request<RequestBody> {
        let mut req = Request::new(http_body_util::Either::Right(http_body_util::Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

// === impl Upstream ===

impl Upstream {
    pub fn new(cfg: Config) -> Upstream {
        Upstream {
            pool: Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                idle_timeout: cfg.idle_timeout,
            }),
            cfg,
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            tasks: Arc::default(),
        }
    }

    /// Closes pooled app connections once idle past `--upstream-idle-timeout`, so a burst
    /// does not leave up to [`MAX_IDLE`] sockets open. Runs until the upstream is dropped.
    pub fn spawn_reaper(&self) {
        let pool = Arc::downgrade(&self.pool);
        let every = self.cfg.idle_timeout.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.reap();
            }
        });
    }

    /// Idle pooled connections (for tests and `/status`).
    pub fn idle_connections(&self) -> usize {
        self.pool
            .idle
            .lock()
            .expect("pool lock is never poisoned")
            .len()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Sends a request (origin-form URI, hop-by-hop headers already removed) to the app,
    /// retrying once on a fresh connection when a reused one fails and that is safe.
    /// `on_retry` is called when that happens.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        on_retry: impl FnOnce(),
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let sent = match req.body() {
            http_body_util::Either::Left(b) => b.sent.clone(),
            http_body_util::Either::Right(_) => None,
        };
        let send = async {
            match self.cfg.protocol {
                Protocol::Http1 => self.send_h1(req, on_retry).await,
                Protocol::H2c => self.send_h2(req, on_retry).await,
            }
        };
        // The clock starts once the request body has been sent whole: a slow upload is the
        // request body's timeout's business, not the app's. Dropping the request on timeout
        // closes its app connection: it never returns to the pool with a response coming.
        let timeout = self.cfg.response_timeout;
        let expired = async {
            if let Some(sent) = &sent {
                sent.wait().await;
            }
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            res = send => res.map(|r| r.map(|b| b.with_timeout(self.cfg.body_timeout))),
            _ = expired => Err(UpstreamError::new(
                ErrorKind::ResponseTimeout,
                format!("nothing within {timeout:?} of the request (--upstream-response-timeout)"),
            )),
        }
    }

    async fn send_h1(
        &self,
        req: Request<RequestBody>,
        on_retry: impl FnOnce(),
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut tx, reused) = loop {
            match self.pool.checkout() {
                // A connection whose last response was just read may not be ready yet
                // (its task has not seen the end of the message): wait for it, rather than
                // fail on it, drop it and count a retry.
                Some((mut tx, idle)) => match tx.ready().await {
                    Ok(()) => break (tx, Some(idle)),
                    Err(_) => continue,
                },
                // Boxed, as every cold path here: the future of `send` is moved whole (its
                // size is its largest state's), and a handshake's state is large.
                None => break (Box::pin(self.connect_h1()).await?, None),
            }
        };
        let replay = match reused {
            Some(idle) if idle >= REPLAY_AFTER_IDLE => Replay::capture(&req),
            _ => None,
        };
        let reused = reused.is_some();
        let again = match tx.try_send_request(req).await {
            Ok(resp) => return Ok(self.pooled(resp, tx)),
            Err(mut e) => match (e.take_message(), replay) {
                // Never written: always safe to send again.
                (Some(req), _) if reused => req,
                // Written, but idempotent and bodiless: rebuild it.
                (None, Some(replay)) => replay.rebuild(),
                _ => return Err(UpstreamError::from_hyper(e.into_error())),
            },
        };
        tracing::debug!("reused upstream connection failed before a response; retrying once");
        on_retry();
        let mut tx = Box::pin(self.connect_h1()).await?;
        match tx.send_request(again).await {
            Ok(resp) => Ok(self.pooled(resp, tx)),
            Err(e) => Err(UpstreamError::from_hyper(e)),
        }
    }

    /// Wraps the response body so the connection returns to the pool once it is read whole.
    fn pooled(
        &self,
        resp: Response<Incoming>,
        tx: http1::SendRequest<RequestBody>,
    ) -> Response<UpstreamBody> {
        resp.map(|body| {
            let mut body = UpstreamBody::unpooled(body);
            body.ret = Some((self.pool.clone(), tx));
            body
        })
    }

    /// Sends an HTTP/1 upgrade request (WebSocket) on a dedicated connection that is never
    /// pooled: after a 101 it belongs to the tunnel.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut tx = self.connect_h1().await?;
        tx.send_request(req)
            .await
            .map_err(UpstreamError::from_hyper)
    }

    pub(super) async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.cfg.addr;
        let stream = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "no connection to {addr} after {:?}",
                        self.cfg.connect_timeout
                    ),
                )
            })?
            .map_err(|e| UpstreamError::new(ErrorKind::Connect, ConnectError { addr, e }))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let stream = self.connect_tcp().await?;
        let (tx, conn) = http1::Builder::new()
            // hyper's read buffer grows with each full read (up to ~400 KB by default) and a
            // body chunk still on its way downstream pins the old one: cap it, so memory per
            // connection stays small with large bodies (bench, 64 conns x 64 KiB responses: peak RSS
            // 21 -> 13 MiB).
            .max_buf_size(UPSTREAM_READ_BUF)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::new(ErrorKind::Connect, e))?;
        // Upgrades only ever happen after a 101, on the dedicated connections of
        // `send_upgrade`; allowing them on pooled ones costs nothing.
        self.tasks.spawn(&self.cfg.cut, async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    async fn send_h2(
        &self,
        req: Request<RequestBody>,
        on_retry: impl FnOnce(),
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let shared = {
            let guard = self.h2.lock().expect("h2 slot lock is never poisoned");
            guard.as_ref().filter(|tx| !tx.is_closed()).cloned()
        };
        let (mut tx, reused) = match shared {
            Some(tx) => (tx, true),
            None => (Box::pin(self.shared_h2()).await?, false),
        };
        let again = match tx.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(UpstreamBody::unpooled)),
            Err(mut e) => match e.take_message() {
                Some(req) if reused => req,
                _ => return Err(UpstreamError::from_hyper(e.into_error())),
            },
        };
        on_retry();
        let mut tx = Box::pin(self.connect_h2()).await?;
        tx.send_request(again)
            .await
            .map(|r| r.map(UpstreamBody::unpooled))
            .map_err(UpstreamError::from_hyper)
    }

    /// The shared h2 connection, made by one caller at a time: requests arriving while it
    /// is being re-established wait for it instead of each opening their own.
    async fn shared_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let _one = self.h2_connecting.lock().await;
        let current = {
            let guard = self.h2.lock().expect("h2 slot lock is never poisoned");
            guard.as_ref().filter(|tx| !tx.is_closed()).cloned()
        };
        match current {
            Some(tx) => Ok(tx),
            None => self.connect_h2().await,
        }
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let stream = self.connect_tcp().await?;
        let (tx, conn) = http2::Builder::new(CutExecutor(self.cfg.cut.clone()))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::new(ErrorKind::Connect, e))?;
        let cut = self.cfg.cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                res = conn => if let Err(e) = res {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                },
                _ = cut.cancelled() => {}
            }
        });
        *self.h2.lock().expect("h2 slot lock is never poisoned") = Some(tx.clone());
        Ok(tx)
    }
}

#[derive(Debug)]
struct ConnectError {
    addr: SocketAddr,
    e: io::Error,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.addr, self.e)
    }
}

impl std::error::Error for ConnectError {}

// === impl Pool ===

impl Pool {
    /// The most recently returned connection and how long it was idle, if it has not been
    /// idle too long.
    fn checkout(&self) -> Option<(http1::SendRequest<RequestBody>, Duration)> {
        let mut idle = self.idle.lock().expect("pool lock is never poisoned");
        while let Some(c) = idle.pop() {
            let idle_for = c.since.elapsed();
            if idle_for >= self.idle_timeout {
                // LIFO: everything older is stale too. The app may be closing them.
                idle.clear();
                return None;
            }
            if !c.tx.is_closed() {
                return Some((c.tx, idle_for));
            }
        }
        None
    }

    /// Drops connections idle past the idle timeout (their sockets close).
    fn reap(&self) {
        let mut idle = self.idle.lock().expect("pool lock is never poisoned");
        let t = self.idle_timeout;
        idle.retain(|c| c.since.elapsed() < t && !c.tx.is_closed());
    }

    fn checkin(&self, tx: http1::SendRequest<RequestBody>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock is never poisoned");
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }
}

// === impl UpstreamBody ===

/// The app's response body, streamed. When it has been read to the end, its connection goes
/// back to the pool. A body silent for its timeout (`--upstream-body-timeout`) ends with
/// [`BodyStalled`]; the timer exists only once the body has had to wait.
pub struct UpstreamBody {
    inner: Incoming,
    ret: Option<(Arc<Pool>, http1::SendRequest<RequestBody>)>,
    done: bool,
    stall: Stall,
}

impl UpstreamBody {
    pub fn unpooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            ret: None,
            done: false,
            stall: Stall::new(None),
        }
    }

    fn with_timeout(mut self, timeout: Duration) -> Self {
        self.stall = Stall::new(Some(timeout));
        self
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(res)) => {
                this.stall.progress();
                Poll::Ready(Some(res.map_err(Into::into)))
            }
            Poll::Pending => match this.stall.poll_expired(cx) {
                Some(t) => Poll::Ready(Some(Err(BodyStalled(t).into()))),
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A window timer for a body that waits: armed on the first wait, pushed back by progress.
/// No timer (and no clock read) for a body that never waits.
struct Stall {
    timeout: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Progress since the timer was last armed: push it back before the next wait.
    moved: bool,
}

impl Stall {
    fn new(timeout: Option<Duration>) -> Stall {
        Stall {
            timeout,
            timer: None,
            moved: false,
        }
    }

    fn progress(&mut self) {
        self.moved = true;
    }

    /// While waiting: `Some(timeout)` once a whole window passed without progress.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let t = self.timeout?;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        if std::mem::take(&mut self.moved) {
            timer.as_mut().reset(Instant::now() + t);
        }
        timer.as_mut().poll(cx).is_ready().then_some(t)
    }
}

// === impl ClientBody ===

/// The client's request body on its way to the app. It must bring [`BODY_MIN_BYTES`] per
/// `--request-body-timeout` until it ends, or it ends with [`RequestBodyTooSlow`] (a body
/// trickled a byte at a time would hold both connections for ever).
pub struct ClientBody {
    inner: Incoming,
    stall: Stall,
    /// Bytes since the window began.
    bytes: usize,
    /// Told when the body has ended (`None` for a body that is empty from the start).
    sent: Option<Arc<Sent>>,
}

/// "The request body has been sent whole": the app's response time counts from then.
#[derive(Default)]
pub struct Sent {
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Sent {
    fn set(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.done.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration) -> ClientBody {
        // Most requests (GET) have no body: no signal, the response clock starts at once.
        let sent = (!inner.is_end_stream()).then(Arc::default);
        ClientBody {
            inner,
            stall: Stall::new(Some(timeout)),
            bytes: 0,
            sent,
        }
    }

    fn ended(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.set();
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.ended();
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, Bytes::len);
                if this.bytes >= BODY_MIN_BYTES {
                    this.bytes = 0;
                    this.stall.progress();
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                this.ended();
                Poll::Ready(other.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.stall.poll_expired(cx) {
                Some(t) => Poll::Ready(Some(Err(RequestBodyTooSlow(t).into()))),
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some((pool, tx)) = self.ret.take() {
            // Only a fully read response leaves the connection reusable; one abandoned
            // midway (client went away) is dropped and closes.
            if self.done || self.inner.is_end_stream() {
                pool.checkin(tx);
            }
        }
    }
}

pub use crate::traffic::probe::{grpc_health_verdict, GRPC_HEALTH_SERVICE};
