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
//! first request ([`ConnTrack::go_away`]). At exit ([`Lifecycle::close`]) the accept loop
//! returns, dropping the socket, and every connection is closed gracefully; the socket of a
//! closed connection lingers briefly (FIN sent, reads drained) so the peer sees a FIN, not
//! an RST for data it sent after our last frame.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
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
use crate::traffic::proxy::Proxy;

/// Largest request head (request line and headers) accepted; larger gets 431. Matches the
/// ALB's own 64 KiB limit on request headers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a closed connection's socket keeps reading (and discarding) after our FIN, so
/// that late frames from the peer do not turn the close into an RST.
const LINGER: Duration = Duration::from_secs(2);

/// Downstream connection timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub header_read: Duration,
}

/// File descriptors kept for the admin port, the app's health probes and the process.
pub const RESERVED_FDS: u64 = 64;

/// The downstream connection limit for a file descriptor limit: what is left after
/// [`RESERVED_FDS`], halved, since every downstream connection may hold an app connection.
pub fn max_connections_for(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(RESERVED_FDS) / 2).clamp(1, usize::MAX as u64) as usize
}

/// Raises the soft file descriptor limit to the hard one; returns (before, after).
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct owned by this frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Why the accept loop stopped serving, other than [`Lifecycle::close`].
#[derive(Debug, thiserror::Error)]
#[error("the traffic port stopped accepting: {0}")]
pub struct AcceptError(#[source] pub io::Error);

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
    discourage: bool,
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
        discourage,
        tls,
    });
    let refused = &proxy.metrics().connections_refused;
    while let Some((stream, peer)) = accept(&listener, &lifecycle, max_connections, refused).await?
    {
        proxy.accepted();
        // Counted from the accept, so the limit in `accept` sees every connection at once.
        let open = lifecycle.connection();
        let track = Arc::new(ConnTrack::new());
        let svc = proxy.service(track.clone(), peer.ip().to_canonical());
        tokio::spawn(connection(shared.clone(), stream, peer, svc, track, open));
    }
    Ok(())
}

/// The next connection to serve on `listener`; `Ok(None)` once the exit's close has begun.
/// Errors that are the failed connection's own are skipped, a shortage of descriptors or
/// memory is retried after 100 ms, and only a dead listening socket is an error. At
/// `max_connections` open, a new connection is accepted and closed at once (counted in
/// `refused`). Shared by the HTTP and TCP modes.
pub(crate) async fn accept(
    listener: &TcpListener,
    lifecycle: &Lifecycle,
    max_connections: usize,
    refused: &prometheus::IntCounter,
) -> Result<Option<(TcpStream, SocketAddr)>, AcceptError> {
    let closing = lifecycle.closing_token();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = closing.cancelled() => return Ok(None),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => match AcceptClass::of(&e) {
                AcceptClass::PerConnection => continue,
                AcceptClass::Resources => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                AcceptClass::Fatal => return Err(AcceptError(e)),
            },
        };
        if lifecycle.connections() >= max_connections {
            refused.inc();
            tracing::debug!(%peer, max_connections, "connection limit reached; refusing");
            drop(stream);
            continue;
        }
        return Ok(Some((stream, peer)));
    }
}

/// What an `accept(2)` error means for the loop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptClass {
    /// The failed connection's own problem (accept(2): treat like EAGAIN and retry).
    PerConnection,
    /// The process or system is short of something: retry after a pause.
    Resources,
    /// The listening socket is unusable: retrying would spin on a dead port.
    Fatal,
}

impl AcceptClass {
    pub(crate) fn of(e: &io::Error) -> AcceptClass {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptClass::Resources
            }
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptClass::Fatal,
            _ => AcceptClass::PerConnection,
        }
    }
}

/// What every connection task of one listener shares.
struct Shared {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    lifecycle: Lifecycle,
    timeouts: Timeouts,
    metrics: Arc<crate::metrics::Metrics>,
    /// HTTP/2 connections get GOAWAY when draining starts (not `--keep-alive-while-draining`).
    discourage: bool,
    /// The traffic port terminates TLS.
    tls: Option<TlsAcceptor>,
}

/// One accepted connection: the TLS handshake if the port has TLS, then HTTP.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: Arc<ConnTrack>,
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
    track: Arc<ConnTrack>,
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

/// How long an HTTP/2 connection may stay while the pod drains before it gets its one graceful
/// GOAWAY (counted from its accept): half the drain's quiet window.
///
/// A GOAWAY costs clients built on nghttp2 (Node's `http2`, curl, h2load) every stream they
/// had queued but not yet sent when it arrives, even the graceful first one; so each
/// connection gets at most one per drain, and never right after its first streams: a
/// connection opened during the drain is one the load balancer (or client) just chose, and a
/// GOAWAY per new connection turned one drain into hundreds of GOAWAYs (and dozens of lost
/// requests). Connections already this old when the drain starts get it at once. Persistent
/// clients still move before the drain can end: the drain cannot be quiet while one keeps
/// sending, and it is asked to leave half a window after it arrived, so it adds at most half
/// a window to a drain.
pub fn h2_leave_after(window: Duration) -> Duration {
    window / 2
}

/// An h2 connection's way to its GOAWAY while the pod drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leave {
    No,
    /// Waiting until it is old enough; then it looks for a safe moment for `give_up` longer.
    Old {
        give_up: Duration,
    },
    /// Old enough: the GOAWAY goes at the first safe moment ([`ConnTrack::safe_to_leave`]),
    /// or at `by` whatever.
    Due {
        by: tokio::time::Instant,
    },
}

/// An h2 connection with nothing in flight for this long is idle enough for its GOAWAY: its
/// client is not sending back to back, so nothing is queued on it.
const LEAVE_IDLE: Duration = Duration::from_millis(200);

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

async fn serve_connection<S: Downstream>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    svc: crate::traffic::proxy::ProxyService,
    track: Arc<ConnTrack>,
    open: ConnectionGuard,
) {
    let Shared {
        http1,
        http2,
        lifecycle,
        timeouts,
        metrics,
        discourage,
        tls: _,
    } = &*shared;
    let timeouts = *timeouts;
    // Subscribed before the protocol is known, so the loop below sees every change since.
    let mut state = lifecycle.subscribe();
    // A connection that arrives after the drain is served, not shut down on arrival: it may
    // carry a late request (HTTP/1 gets `connection: close`; h2 gets GOAWAY with its first
    // request, through `ConnTrack::go_away`). One that arrives as the exit begins is closed
    // at once (HTTP/1: after its first request, if it had one).
    let accepted_drained = lifecycle.phase() == Phase::Drained;
    let mut io = TrackedIo {
        inner: Some(stream),
        track: track.clone(),
        open: Some(open),
        shut_down: false,
        prefix: Bytes::new(),
    };
    // TLS: ALPN says h2; otherwise (http/1.1, or no ALPN) the bytes decide, as in cleartext.
    let version = match io.stream().alpn_h2() {
        true => Version::H2,
        false => match sniff(&mut io, &shared, accepted_drained).await {
            Ok(v) => v,
            Err(Unsniffed::Gone) => return,
            Err(Unsniffed::SlowHeaders) => {
                tracing::debug!(%peer, "request head not completed in time; closing");
                metrics.client_error("header_read_timeout");
                return;
            }
        },
    };
    let io = TokioIo::new(io);
    let conn = match version {
        Version::H1 => Conn::H1 {
            c: http1.serve_connection(io, svc).with_upgrades(),
        },
        Version::H2 => Conn::H2 {
            c: http2.serve_connection(io, svc),
        },
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
        State::Draining { window, .. } if *discourage && version == Version::H2 => {
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

// === impl ConnTrack ===

/// Per-connection activity, written by the IO wrapper and the request guards, read by the
/// watchdog. Atomics only; nothing here is on a lock.
pub struct ConnTrack {
    /// `now_nanos()` at the accept.
    accepted: u64,
    in_flight: AtomicU32,
    /// The most requests ever in flight at once on this connection: a client's concurrency.
    max_in_flight: AtomicU32,
    /// Requests started on this connection so far.
    requests: AtomicU32,
    /// Asks the connection task to close gracefully (an h2 request after `Drained`).
    go_away: AtomicBool,
    /// When the connection last became idle (accepted, or its last request ended).
    idle_since: AtomicU64,
    /// `now_nanos() + 1` when bytes of a new request head began arriving on an idle
    /// connection; 0 when no head is pending.
    head_since: AtomicU64,
    /// An h2 connection (the whole preface arrived): it always has frames to read, so no
    /// head timeout applies.
    h2: AtomicBool,
    /// Bytes of the h2 preface matched so far; [`PREFACE_NO`] once it cannot be h2.
    preface: AtomicU8,
}

/// What the watchdog should do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnVerdict {
    /// Look again after this long.
    Keep(Duration),
    /// Idle too long: close gracefully.
    CloseIdle,
    /// A request head has been arriving for too long: drop the connection.
    SlowHeaders,
}

impl ConnTrack {
    pub fn new() -> ConnTrack {
        let now = now_nanos();
        ConnTrack {
            accepted: now,
            in_flight: AtomicU32::new(0),
            max_in_flight: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            go_away: AtomicBool::new(false),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            preface: AtomicU8::new(0),
        }
    }

    /// A request's head has been parsed; hold the guard until the request ends. Also says
    /// whether it is the first request on the connection.
    pub fn request(this: &Arc<ConnTrack>) -> (ConnRequest, bool) {
        let now = this.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        this.max_in_flight.fetch_max(now, Ordering::AcqRel);
        let first = this.requests.fetch_add(1, Ordering::Relaxed) == 0;
        this.head_since.store(0, Ordering::Release);
        (ConnRequest(this.clone()), first)
    }

    /// Asks the connection's task to close it gracefully (h2: GOAWAY); its open streams
    /// finish first.
    /// Bytes of a request head (or of the h2 preface) have arrived and its request has not
    /// started yet.
    fn head_pending(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) != 0
    }

    /// Whether a GOAWAY now is unlikely to cost the client a request. Clients built on
    /// nghttp2 refuse every stream they have queued but not yet sent when a GOAWAY arrives;
    /// a client has nothing queued when all its requests are here (as many in flight as it
    /// ever had at once: each of its workers is waiting for an answer), or when it has sent
    /// nothing for [`LEAVE_IDLE`].
    fn safe_to_leave(&self, now: u64) -> bool {
        leave_is_safe(
            self.in_flight.load(Ordering::Acquire),
            self.max_in_flight.load(Ordering::Acquire),
            Duration::from_nanos(now.saturating_sub(self.idle_since.load(Ordering::Acquire))),
        )
    }

    /// Call only from the connection's own service (it runs inside the connection's poll).
    pub fn go_away(&self) {
        self.go_away.store(true, Ordering::Release);
    }

    #[doc(hidden)] // pub for fuzz/fuzz_targets/connection_verdict.rs
    pub fn on_read(&self, data: &[u8]) {
        let matched = self.preface.load(Ordering::Acquire);
        if matched != PREFACE_NO && (matched as usize) < PREFACE.len() {
            let m = matched as usize;
            let n = data.len().min(PREFACE.len() - m);
            if data[..n] == PREFACE[m..m + n] {
                self.preface.store((m + n) as u8, Ordering::Release);
                if m + n == PREFACE.len() {
                    self.h2.store(true, Ordering::Release);
                    self.head_since.store(0, Ordering::Release);
                    return;
                }
            } else {
                self.preface.store(PREFACE_NO, Ordering::Release);
            }
        }
        if self.in_flight.load(Ordering::Acquire) != 0 || self.h2.load(Ordering::Acquire) {
            return;
        }
        if self.head_since.load(Ordering::Acquire) == 0 {
            // The read that starts a request head.
            self.head_since.store(now_nanos() + 1, Ordering::Release);
        }
    }

    /// The watchdog's decision, from the connection's state and the current time.
    pub fn verdict(&self, now: u64, t: Timeouts) -> ConnVerdict {
        connection_verdict(
            now,
            self.in_flight.load(Ordering::Acquire),
            self.idle_since.load(Ordering::Acquire),
            self.head_since.load(Ordering::Acquire),
            self.h2.load(Ordering::Acquire),
            t,
        )
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// [`ConnTrack::preface`] once the bytes seen are not the preface.
const PREFACE_NO: u8 = u8::MAX;

impl Default for ConnTrack {
    fn default() -> Self {
        Self::new()
    }
}

/// [`ConnTrack::safe_to_leave`], pure: `idle` is how long nothing has been in flight.
fn leave_is_safe(in_flight: u32, max_in_flight: u32, idle: Duration) -> bool {
    match in_flight {
        0 => idle >= LEAVE_IDLE,
        n => n >= max_in_flight,
    }
}

/// Pure watchdog decision. Times are `now_nanos()` values; `head_since` is 0 or `t + 1`.
#[doc(hidden)] // pub for fuzz/fuzz_targets/connection_verdict.rs
pub fn connection_verdict(
    now: u64,
    in_flight: u32,
    idle_since: u64,
    head_since: u64,
    h2: bool,
    t: Timeouts,
) -> ConnVerdict {
    if in_flight > 0 {
        // Busy connections are never idle; look again later.
        return ConnVerdict::Keep(t.idle.min(t.header_read));
    }
    if !h2 && head_since != 0 {
        let waited = Duration::from_nanos(now.saturating_sub(head_since - 1));
        return match t.header_read.checked_sub(waited) {
            Some(left) if !left.is_zero() => ConnVerdict::Keep(left),
            _ => ConnVerdict::SlowHeaders,
        };
    }
    let idle = Duration::from_nanos(now.saturating_sub(idle_since));
    match t.idle.checked_sub(idle) {
        Some(left) if !left.is_zero() => ConnVerdict::Keep(left),
        _ => ConnVerdict::CloseIdle,
    }
}

/// A request in flight on one connection.
pub struct ConnRequest(Arc<ConnTrack>);

impl Drop for ConnRequest {
    fn drop(&mut self) {
        let t = &self.0;
        if t.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            t.idle_since.store(now_nanos(), Ordering::Release);
            t.head_since.store(0, Ordering::Release);
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
        self.get_ref().1.alpn_protocol() == Some(crate::traffic::tls::ALPN_H2)
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
    track: Arc<ConnTrack>,
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

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(75),
        header_read: Duration::from_secs(10),
    };
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn watchdog_table() {
        use ConnVerdict::*;
        let d = Duration::from_secs;
        // (now, in_flight, idle_since, head_since, h2) -> verdict
        let cases = [
            // Fresh idle connection: wait out the idle timeout.
            ((0, 0, 0, 0, false), Keep(d(75))),
            // Idle 60 s (the ALB's own idle timeout): still open.
            ((60 * SEC, 0, 0, 0, false), Keep(d(15))),
            ((75 * SEC, 0, 0, 0, false), CloseIdle),
            // Busy for longer than both timeouts: never closed.
            ((500 * SEC, 1, 0, 0, false), Keep(d(10))),
            // A head started arriving 3 s ago.
            ((50 * SEC, 0, 0, 47 * SEC + 1, false), Keep(d(7))),
            // ... and is still incomplete after 10 s: slowloris.
            ((57 * SEC, 0, 0, 47 * SEC + 1, false), SlowHeaders),
            // h2 reads frames all the time: only the idle rule applies.
            ((57 * SEC, 0, 0, 47 * SEC + 1, true), Keep(d(18))),
        ];
        for ((now, f, idle, head, h2), want) in cases {
            assert_eq!(
                connection_verdict(now, f, idle, head, h2, T),
                want,
                "now={now} in_flight={f} idle_since={idle} head_since={head} h2={h2}"
            );
        }
    }

    #[test]
    fn idle_gap_between_requests_does_not_count_as_header_time() {
        let t = Arc::new(ConnTrack::new());
        t.on_read(b"GET / HTTP/1.1\r\n");
        assert_ne!(t.head_since.load(Ordering::Acquire), 0);
        let (req, first) = ConnTrack::request(&t);
        assert!(first);
        t.on_read(b"body bytes");
        assert_eq!(t.head_since.load(Ordering::Acquire), 0);
        drop(req);
        assert_eq!(t.head_since.load(Ordering::Acquire), 0);
        assert!(!t.h2.load(Ordering::Acquire));
    }

    #[test]
    fn h2_preface_is_detected() {
        let t = ConnTrack::new();
        t.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(t.h2.load(Ordering::Acquire));
        assert!(!t.head_pending());
        // Across reads, one byte at a time: h2 only once the whole preface is in.
        let t = ConnTrack::new();
        for (i, b) in PREFACE.iter().enumerate() {
            assert!(!t.h2.load(Ordering::Acquire), "h2 after {i} bytes");
            t.on_read(&[*b]);
        }
        assert!(t.h2.load(Ordering::Acquire));
    }

    /// A slowloris whose first byte is `P` (a prefix of the preface) is an HTTP/1 head in
    /// progress: the header timeout applies. Before: marked h2 and exempt.
    #[test]
    fn a_head_starting_with_p_is_not_h2() {
        let t = ConnTrack::new();
        t.on_read(b"P");
        t.on_read(b"OST / HTTP/1.1\r\n");
        assert!(!t.h2.load(Ordering::Acquire));
        assert!(t.head_pending());
        let since = t.head_since.load(Ordering::Acquire);
        assert_eq!(t.verdict(since - 1 + 11 * SEC, T), ConnVerdict::SlowHeaders);
        // A partial preface is a head in progress too.
        let t = ConnTrack::new();
        t.on_read(b"PRI * HTTP/2");
        assert!(!t.h2.load(Ordering::Acquire));
        let since = t.head_since.load(Ordering::Acquire);
        assert_eq!(t.verdict(since - 1 + 11 * SEC, T), ConnVerdict::SlowHeaders);
    }

    #[test]
    fn connection_limit_follows_the_fd_limit() {
        assert_eq!(max_connections_for(256), 96);
        assert_eq!(max_connections_for(1_048_576), 524_256);
        assert_eq!(max_connections_for(10), 1);
    }

    #[test]
    fn accept_errors_are_classified() {
        let class = |code| AcceptClass::of(&io::Error::from_raw_os_error(code));
        assert_eq!(class(libc::EMFILE), AcceptClass::Resources);
        assert_eq!(class(libc::ENFILE), AcceptClass::Resources);
        assert_eq!(class(libc::ECONNABORTED), AcceptClass::PerConnection);
        assert_eq!(class(libc::EPERM), AcceptClass::PerConnection);
        // A listening socket that was shut down or closed: the port is dead.
        assert_eq!(class(libc::EINVAL), AcceptClass::Fatal);
        assert_eq!(class(libc::EBADF), AcceptClass::Fatal);
    }
}
