//! The traffic port: accept loop and one task per downstream connection.
//!
//! Each connection speaks HTTP/1.1 or HTTP/2 (h2c prior knowledge, or over TLS with
//! `--tls*`), told per connection from its first bytes (`sniff`; TLS: ALPN `h2`) and then
//! served by hyper's own HTTP/1 or HTTP/2 connection, and has a small watchdog with two
//! timeouts that hyper cannot express separately:
//!
//! - **idle** (`--idle-timeout`, default 75 s): a keep-alive connection with nothing in
//!   flight is closed after this long. It must stay above the load balancer's idle timeout
//!   (ALB: 60 s), so it is the ALB that closes idle connections, never lameduck — a close
//!   racing the ALB's reuse of the connection is a 502. The rule keeps running after a
//!   graceful close has begun: an HTTP/2 peer that never acknowledges the GOAWAY's PING
//!   (so never gets the final GOAWAY) is dropped once idle this long.
//! - **header read** (`--header-read-timeout`, default 10 s): a new connection's first
//!   request head must be complete within this long of the accept (a connection that sends
//!   nothing is closed then too, so silent sockets cannot hold the connection limit); on a
//!   kept-alive connection, a head must be complete within this long of its first byte
//!   (slowloris). The HTTP/2
//!   preface counts as a head: a connection is HTTP/2 only once all 24 bytes of it arrived.
//!   With TLS the handshake comes first, in the connection's task (never in the accept
//!   loop), and must complete within the header read timeout too; the watchdog then sees
//!   the decrypted bytes. ALPN offers `h2` and `http/1.1`; which one is spoken is still
//!   read from the bytes, so a client that skips ALPN works as it would in cleartext.
//!
//! hyper's own `header_read_timeout` is disabled: since hyper 1.6 it also times the idle
//! gap between keep-alive requests, which would close idle connections at 30 s, before
//! the ALB's 60 s.
//!
//! Connections are *not* closed when draining starts: they keep being accepted and served.
//! When the lifecycle reaches `Drained`, each open one is shut down gracefully (HTTP/1:
//! closed once idle; h2: GOAWAY, two-phase). Connections accepted after that are still
//! served: HTTP/1 ones one request each (`connection: close`), h2 ones get GOAWAY with their
//! first request ([`ConnState::go_away`]). At exit ([`Lifecycle::close`]) the accept loop
//! returns, dropping the socket, and every connection is closed gracefully; the socket of a
//! closed connection lingers briefly (FIN sent, reads drained) so the peer sees a FIN, not
//! an RST for data it sent after our last frame.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::lifecycle::drain::{now_nanos, ConnectionGuard, Lifecycle, Phase, State};
use crate::traffic::accept::{accept, AcceptError};
use crate::traffic::conn::{
    h2_leave_after, persistence, ConnState, ConnVerdict, Persistence, Timeouts, LEAVE_IDLE, PREFACE,
};
use crate::traffic::proxy::Proxy;

/// Largest request head (request line and headers) accepted; larger gets 431. Matches the
/// ALB's own 64 KiB limit on request headers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a closed connection's socket keeps reading (and discarding) after our FIN, so
/// that late frames from the peer do not turn the close into an RST.
const LINGER: Duration = Duration::from_secs(2);

/// Serves the traffic port until [`Lifecycle::close`]; then drops the listening socket and
/// returns `Ok`. Returns an error only if the socket itself fails (accept errors that say
/// the listening socket is unusable); per-connection and resource errors are retried.
/// At most `max_connections` are served at once: beyond it a new connection is accepted and
/// closed at once (the file descriptors stay for the admin port and the app). Refusing the
/// newest rather than closing the oldest idle one: an idle connection is one the load
/// balancer may be about to reuse (a close racing that reuse is the 502 this proxy exists to
/// prevent), while a refused new connection fails before any request was sent on it. Below
/// the limit no connection is ever closed for it.
pub async fn serve(
    listener: TcpListener,
    lifecycle: Lifecycle,
    proxy: Proxy,
    timeouts: Timeouts,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
) -> Result<(), AcceptError> {
    let mut http1 = http1::Builder::new();
    // max_header_size is the limit on the head (431 beyond it); max_buf_size alone is only
    // checked while a head is incomplete, so a head read in large reads could pass it.
    http1
        .keep_alive(true)
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let shared = Arc::new(Shared {
        http1,
        http2: http2::Builder::new(TokioExecutor::new()),
        lifecycle: lifecycle.clone(),
        timeouts,
        metrics: proxy.metrics().clone(),
        keep_alive_while_draining: proxy.keep_alive_while_draining(),
        tls,
    });
    let refused = &proxy.metrics().connections_refused;
    while let Some((stream, peer)) = accept(&listener, &lifecycle, max_connections, refused).await?
    {
        proxy.accepted();
        // Counted from the accept, so the limit in `accept` sees every connection at once.
        let open = lifecycle.connection();
        let track = Arc::new(ConnState::new());
        let svc = proxy.service(track.clone(), peer.ip().to_canonical());
        tokio::spawn(connection(shared.clone(), stream, peer, svc, track, open));
    }
    Ok(())
}

/// What every connection task of one listener shares.
struct Shared {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    lifecycle: Lifecycle,
    timeouts: Timeouts,
    metrics: Arc<crate::metrics::Metrics>,
    /// `--keep-alive-while-draining`, from the proxy's options.
    keep_alive_while_draining: bool,
    /// The traffic port terminates TLS.
    tls: Option<TlsAcceptor>,
}

/// One accepted connection: the TLS handshake if the port has TLS, then HTTP.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: Arc<ConnState>,
    open: ConnectionGuard,
) {
    let _ = stream.set_nodelay(true);
    match shared.tls.clone() {
        None => serve_connection(shared, stream, peer, svc, track, open).await,
        // Boxed: a task's size is its future's largest state, and TLS state (rustls'
        // connection, the handshake) would otherwise enlarge every cleartext connection too.
        Some(acceptor) => {
            Box::pin(tls_connection(
                acceptor, shared, stream, peer, svc, track, open,
            ))
            .await
        }
    }
}

async fn tls_connection(
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: Arc<ConnState>,
    open: ConnectionGuard,
) {
    let closing = shared.lifecycle.closing_token();
    let handshake = tokio::time::timeout(shared.timeouts.header_read, acceptor.accept(stream));
    let tls = tokio::select! {
        // Nothing has been sent on a connection still in its handshake: at exit it goes.
        _ = closing.cancelled() => return,
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                shared.metrics.client_error("tls_handshake");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake not completed in time; closing");
                shared.metrics.client_error("tls_handshake_timeout");
                return;
            }
        },
    };
    // The idle clock starts once the connection can carry a request.
    track.idle_since.store(now_nanos(), Ordering::Release);
    serve_connection(shared, tls, peer, svc, track, open).await
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    H1,
    H2,
}

/// Why a connection ended before its protocol was known.
enum Unsniffed {
    /// Closed by the peer, the lifecycle, or an error: nothing to say.
    Gone,
    /// No head (or not enough of one to decide the protocol) within the header timeout of
    /// the accept.
    SlowHeaders,
}

/// Reads a connection's first bytes and decides its protocol: HTTP/2 once the whole preface
/// (24 bytes) has arrived, HTTP/1 at the first byte that differs from it. What was read is
/// kept for hyper (`TrackedIo::prefix`), in one buffer of up to [`SNIFF_BYTES`]: hyper gets
/// the whole first read at once, so a normal request head is parsed from it without growing
/// hyper's 8 KiB read buffer (hyper-util's own detection reads 24 bytes, which makes every
/// HTTP/1 connection's buffer 16 KiB). The header read timeout runs from the accept: a
/// connection that sends nothing, or too little, is closed at it; one that has sent nothing
/// also closes at `Drained` (it has carried nothing) or at exit.
async fn sniff<S: Downstream>(
    io: &mut TrackedIo<S>,
    shared: &Shared,
    accepted_drained: bool,
) -> Result<Version, Unsniffed> {
    let lifecycle = &shared.lifecycle;
    let closing = lifecycle.closing_token();
    let mut state = lifecycle.subscribe();
    // A connection's clock starts at the accept: one that never sends a byte is closed at
    // the header read timeout, like one that sends too little, so silent sockets cannot hold
    // the connection limit.
    let deadline = tokio::time::Instant::now() + shared.timeouts.header_read;
    let mut buf = BytesMut::new();
    loop {
        let waiting = buf.is_empty();
        tokio::select! {
            biased;
            _ = closing.cancelled() => return Err(Unsniffed::Gone),
            _ = state.wait_for(|s| s.phase() == Phase::Drained), if waiting && !accepted_drained => {
                return Err(Unsniffed::Gone);
            }
            // Silent or too slow: either way the head was not complete in time.
            _ = tokio::time::sleep_until(deadline) => return Err(Unsniffed::SlowHeaders),
            ready = io.readable() => {
                if ready.is_err() {
                    return Err(Unsniffed::Gone);
                }
            }
        }
        if buf.capacity() == 0 {
            buf.reserve(SNIFF_BYTES);
        }
        // Readiness can be spurious (and TLS reports it at once): the read itself is timed.
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Err(Unsniffed::SlowHeaders),
            Ok(Ok(0) | Err(_)) => return Err(Unsniffed::Gone),
            Ok(Ok(_)) => {}
        }
        let n = buf.len().min(PREFACE.len());
        if buf[..n] != PREFACE[..n] {
            io.prefix = buf.freeze();
            return Ok(Version::H1);
        }
        if n == PREFACE.len() {
            io.prefix = buf.freeze();
            return Ok(Version::H2);
        }
    }
}

/// An h2 connection's way to its GOAWAY while the pod drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leave {
    No,
    /// Waiting until it is old enough; then it looks for a safe moment for `give_up` longer.
    Old {
        give_up: Duration,
    },
    /// Old enough: the GOAWAY goes at the first safe moment ([`ConnState::safe_to_leave`]),
    /// or at `by` whatever.
    Due {
        by: tokio::time::Instant,
    },
}

/// The size of the buffer [`sniff`] reads a connection's first bytes into.
const SNIFF_BYTES: usize = 8 * 1024;

pin_project_lite::pin_project! {
    /// A connection being served, HTTP/1 (with upgrades) or HTTP/2.
    #[project = ConnProj]
    enum Conn<S: Downstream> {
        H1 { #[pin] c: http1::UpgradeableConnection<TokioIo<TrackedIo<S>>, crate::traffic::proxy::ProxyService> },
        H2 { #[pin] c: http2::Connection<TokioIo<TrackedIo<S>>, crate::traffic::proxy::ProxyService, TokioExecutor> },
    }
}

impl<S: Downstream> Conn<S> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project() {
            ConnProj::H1 { c } => c.graceful_shutdown(),
            ConnProj::H2 { c } => c.graceful_shutdown(),
        }
    }
}

impl<S: Downstream> std::future::Future for Conn<S> {
    type Output = hyper::Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        match self.project() {
            ConnProj::H1 { c } => c.poll(cx),
            ConnProj::H2 { c } => c.poll(cx),
        }
    }
}

/// Tells the connection's protocol (TLS: ALPN `h2`; otherwise its first bytes, as in
/// cleartext) and hands it to hyper's HTTP/1 or HTTP/2 connection; `None` if it went, or
/// sent no complete head in time, before that.
async fn open_connection<S: Downstream>(
    shared: &Shared,
    stream: S,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: &Arc<ConnState>,
    open: ConnectionGuard,
    accepted_drained: bool,
) -> Option<(Conn<S>, Version)> {
    let mut io = TrackedIo {
        inner: Some(stream),
        track: track.clone(),
        open: Some(open),
        shut_down: false,
        prefix: Bytes::new(),
    };
    let version = match io.stream().alpn_h2() {
        true => Version::H2,
        false => match sniff(&mut io, shared, accepted_drained).await {
            Ok(v) => v,
            Err(Unsniffed::Gone) => return None,
            Err(Unsniffed::SlowHeaders) => {
                tracing::debug!(%peer, "request head not completed in time; closing");
                shared.metrics.client_error("header_read_timeout");
                return None;
            }
        },
    };
    let io = TokioIo::new(io);
    let conn = match version {
        Version::H1 => Conn::H1 {
            c: shared.http1.serve_connection(io, svc).with_upgrades(),
        },
        Version::H2 => Conn::H2 {
            c: shared.http2.serve_connection(io, svc),
        },
    };
    Some((conn, version))
}

/// One connection's task once it speaks HTTP. Its `select!` loop is long on purpose: each
/// branch is one thing a connection waits for (hyper's progress, the lifecycle's changes,
/// the drain's GOAWAY timing, a request asking for GOAWAY, a head arriving, the idle/header
/// watchdog) and they share the connection's pinned state, which a split would have to pass
/// around as a handful of `&mut`s.
async fn serve_connection<S: Downstream>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: Arc<ConnState>,
    open: ConnectionGuard,
) {
    let Shared {
        http1: _,
        http2: _,
        lifecycle,
        timeouts,
        metrics,
        keep_alive_while_draining,
        tls: _,
    } = &*shared;
    let timeouts = *timeouts;
    // Subscribed before the protocol is known, so the loop below sees every change since.
    let mut state = lifecycle.subscribe();
    // A connection that arrives after the drain is served, not shut down on arrival: it may
    // carry a late request (HTTP/1 gets `connection: close`; h2 gets GOAWAY with its first
    // request, through `ConnState::go_away`). One that arrives as the exit begins is closed
    // at once (HTTP/1: after its first request, if it had one).
    let accepted_drained = lifecycle.phase() == Phase::Drained;
    let Some((conn, version)) =
        open_connection(&shared, stream, peer, svc, &track, open, accepted_drained).await
    else {
        return;
    };
    tokio::pin!(conn);

    // Watching the state for `Drained` and the exit's close.
    let mut watching = true;
    // `graceful_shutdown` issued.
    let mut closed = false;
    if lifecycle.is_closing() {
        (watching, closed) = (false, true);
        conn.as_mut().graceful_shutdown();
    }
    let watchdog = tokio::time::sleep(timeouts.header_read.min(timeouts.idle));
    tokio::pin!(watchdog);
    // While draining, this h2 connection's one GOAWAY (see `h2_leave_after`): first a wait
    // until it is old enough, then for a moment when it is safe to send.
    let mut leave = Leave::No;
    let leave_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(leave_timer);
    let leave_at = |state: &State| match state {
        State::Draining { window, .. }
            if persistence(
                Phase::Draining,
                version == Version::H2,
                *keep_alive_while_draining,
                false,
            ) == Persistence::LeaveWhenOld =>
        {
            let age = Duration::from_nanos(now_nanos().saturating_sub(track.accepted));
            let after = h2_leave_after(window.window);
            Some((
                tokio::time::Instant::now() + after.saturating_sub(age),
                after,
            ))
        }
        _ => None,
    };
    if let Some((at, give_up)) = leave_at(&state.borrow()) {
        leave = Leave::Old { give_up };
        leave_timer.as_mut().reset(at);
    }
    // The watchdog has been brought forward for the head now arriving.
    let mut head_armed = false;
    loop {
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            // Draining (h2 only), Drained, or the exit's close (see `Lifecycle::close`).
            changed = state.changed(), if watching => {
                let (phase, at) = {
                    let s = state.borrow_and_update();
                    (s.phase(), leave_at(&s))
                };
                if let Some((at, give_up)) = at.filter(|_| leave == Leave::No) {
                    leave = Leave::Old { give_up };
                    leave_timer.as_mut().reset(at);
                }
                let drained = phase == Phase::Drained && !accepted_drained;
                if changed.is_err() || drained || lifecycle.is_closing() {
                    watching = false;
                    // hyper's HTTP/1 graceful shutdown closes a connection whose request
                    // head is still arriving as if it were idle: that request would be
                    // lost. Let it complete instead; its response carries `connection:
                    // close` (h2: GOAWAY comes with the request). The header timeout
                    // bounds a head that never completes.
                    if !track.head_pending() {
                        closed = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            // Draining: this h2 connection is old enough (then: look for a safe moment,
            // until `give_up`). HTTP/1 is asked per response, with `connection: close`.
            _ = &mut leave_timer, if leave != Leave::No && !closed => {
                let now = tokio::time::Instant::now();
                let by = match leave {
                    Leave::Old { give_up } => now + give_up,
                    Leave::Due { by } => by,
                    Leave::No => unreachable!("guarded"),
                };
                if now >= by || track.safe_to_leave(now_nanos()) {
                    leave = Leave::No;
                    closed = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    leave = Leave::Due { by };
                    leave_timer.as_mut().reset((now + LEAVE_IDLE).min(by));
                }
            }
            // A safe moment for the GOAWAY due, checked after each poll of `conn` (the
            // counts it reads change only inside that poll), without a waker.
            _ = std::future::poll_fn(|_| match matches!(leave, Leave::Due { .. })
                && track.safe_to_leave(now_nanos())
            {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }), if !closed => {
                leave = Leave::No;
                closed = true;
                conn.as_mut().graceful_shutdown();
            }
            // Set only while `conn` is polled (by the service or the IO wrapper, both run
            // inside that poll), so checking after each poll of `conn` needs no waker.
            _ = std::future::poll_fn(|_| match track.go_away.load(Ordering::Acquire) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }), if !closed => {
                closed = true;
                conn.as_mut().graceful_shutdown();
            }
            // A head still incomplete after `conn` was polled (a normal one is parsed in the
            // same poll, so this never fires for it): bring the watchdog forward from the idle
            // deadline to the header deadline. Checked without a waker, like `go_away`.
            _ = std::future::poll_fn(|_| match !head_armed && track.head_pending() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }) => {
                head_armed = true;
                // From the head's first byte, which may have arrived while `sniff` waited to
                // tell the protocol (a head starting with `P`).
                let since = track.head_since.load(Ordering::Acquire);
                let waited = Duration::from_nanos(now_nanos().saturating_sub(since.saturating_sub(1)));
                let by = tokio::time::Instant::now() + timeouts.header_read.saturating_sub(waited);
                if watchdog.deadline() > by {
                    watchdog.as_mut().reset(by);
                }
            }
            _ = &mut watchdog => {
                head_armed = false;
                match track.verdict(now_nanos(), timeouts) {
                    ConnVerdict::Keep(d) => {
                        watchdog.as_mut().reset(tokio::time::Instant::now() + d);
                    }
                    ConnVerdict::CloseIdle if closed => {
                        tracing::debug!(%peer, "graceful close not completed by the peer; dropping");
                        return;
                    }
                    ConnVerdict::CloseIdle => {
                        tracing::debug!(%peer, "closing idle connection");
                        closed = true;
                        conn.as_mut().graceful_shutdown();
                        // The idle rule keeps running: a peer may never finish the close.
                        track.idle_since.store(now_nanos(), Ordering::Release);
                        watchdog.as_mut().reset(tokio::time::Instant::now() + timeouts.idle);
                    }
                    ConnVerdict::SlowHeaders => {
                        tracing::debug!(%peer, "request head not completed in time; closing");
                        metrics.client_error("header_read_timeout");
                        return;
                    }
                }
            }
        }
    }
}

// === impl TrackedIo ===

/// A downstream byte stream: the accepted socket, or TLS over it. It can be turned back
/// into the socket for the lingering close.
trait Downstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_socket(self) -> TcpStream;
    /// TLS with ALPN `h2`.
    fn alpn_h2(&self) -> bool;
    /// The plain socket, to wait for readability without a buffer (TLS may hold decrypted
    /// bytes already, so it is read at once).
    fn socket(&self) -> Option<&TcpStream>;
}

impl Downstream for TcpStream {
    fn into_socket(self) -> TcpStream {
        self
    }
    fn alpn_h2(&self) -> bool {
        false
    }
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Downstream for TlsStream<TcpStream> {
    fn into_socket(self) -> TcpStream {
        self.into_inner().0
    }
    fn alpn_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2)
    }
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

/// The connection's plaintext stream, noting when request bytes arrive on an idle
/// connection. It holds the connection's [`ConnectionGuard`], so the connection counts as
/// open until its socket is closed, lingering included.
struct TrackedIo<S: Downstream> {
    inner: Option<S>,
    track: Arc<ConnState>,
    open: Option<ConnectionGuard>,
    /// hyper closed our side (FIN sent): the socket lingers when dropped.
    shut_down: bool,
    /// Bytes read to tell the protocol ([`sniff`]), given to hyper before any more is read.
    prefix: Bytes,
}

impl<S: Downstream> TrackedIo<S> {
    /// Resolves when the plain socket has bytes (or an error) to read; at once for TLS.
    async fn readable(&self) -> io::Result<()> {
        match self.inner.as_ref().and_then(|s| s.socket()) {
            Some(tcp) => tcp.readable().await,
            None => Ok(()),
        }
    }

    fn stream(&mut self) -> Pin<&mut S> {
        Pin::new(
            self.inner
                .as_mut()
                .expect("the stream is taken only on drop"),
        )
    }
}

impl<S: Downstream> Drop for TrackedIo<S> {
    fn drop(&mut self) {
        let (Some(stream), true) = (self.inner.take(), self.shut_down) else {
            return;
        };
        // TLS: our close_notify went out with the FIN; what follows is TCP's business.
        let mut stream = stream.into_socket();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let open = self.open.take();
        // Read and discard until the peer closes too (or LINGER passes): closing a socket
        // with unread data, or receiving data after close, makes the kernel send an RST,
        // which a client may see before our last response or GOAWAY.
        rt.spawn(async move {
            let _open = open;
            let mut buf = [0u8; 1024];
            let drain = async {
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

impl<S: Downstream> AsyncRead for TrackedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            // Already seen by `on_read` when sniffed.
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Frees the sniff buffer.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = self.stream().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let data = &buf.filled()[before..];
            if !data.is_empty() {
                self.track.on_read(data);
            }
        }
        res
    }
}

impl<S: Downstream> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = self.stream().poll_shutdown(cx);
        if res.is_ready() {
            self.shut_down = true;
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task is as large as its future's largest state: the TLS path,
    /// boxed, must not enlarge cleartext connections. Before: every cleartext connection's
    /// task carried the TLS connection's size.
    #[test]
    fn cleartext_connections_do_not_carry_tls_state() {
        // The size of the future an async fn returns, from its type alone.
        fn future_size<F, Fut, A, B, C, D, E, G>(_: &F) -> usize
        where
            F: Fn(A, B, C, D, E, G) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let task = future_size(&connection);
        let cleartext = future_size(&serve_connection::<TcpStream>);
        let tls = future_size(&serve_connection::<TlsStream<TcpStream>>);
        eprintln!("task {task}, cleartext {cleartext}, tls {tls} bytes");
        assert!(
            tls > cleartext + 256,
            "TLS state is large: {tls} vs {cleartext} bytes"
        );
        // The task holds its arguments beside the serving future, nothing of TLS.
        assert!(
            task < cleartext + (tls - cleartext) / 2,
            "a cleartext connection's task is {task} bytes, its serving {cleartext}, TLS {tls}"
        );
    }
}
