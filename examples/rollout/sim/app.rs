//! The naive app: an HTTP/1.1 keep-alive server with no graceful-shutdown code.
//!
//! It answers every request after a delay (the configured one, or `?delay_ms=N` chosen by
//! the load balancer for its slow requests), closes a keep-alive connection that has been
//! idle for `idle_timeout` (Node.js's `keepAliveTimeout`, 5 s for years), and installs no
//! SIGTERM handler: the signal's default action ends the process at once. In the
//! simulation the process is a [`Container`](super::pod::Container): its exit drops the
//! runtime, so the listener and every connection close as the kernel would close them —
//! connection refused for new ones, EOF for requests that were being answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::pod::Container;

/// How the app behaves.
#[derive(Clone, Copy, Debug)]
pub struct AppConfig {
    /// Time to answer a request that names no delay of its own.
    pub delay: Duration,
    /// A keep-alive connection idle this long is closed by the app.
    pub idle_timeout: Duration,
}

/// Starts the app in its own container on an ephemeral loopback port.
pub async fn start(cfg: AppConfig) -> Result<(Container, SocketAddr), String> {
    let (addr_tx, addr_rx) = oneshot::channel();
    let container = Container::spawn("app", false, move |_no_handler| async move {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                let _ = addr_tx.send(Err(format!("app cannot listen: {e}")));
                return 1;
            }
        };
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let _ = addr_tx.send(Ok(addr));
        serve(listener, cfg).await
    });
    let addr = addr_rx
        .await
        .map_err(|_| "the app container died while starting".to_string())??;
    Ok((container, addr))
}

/// Accepts and serves until the process is ended from outside (SIGTERM's default action).
async fn serve(listener: TcpListener, cfg: AppConfig) -> i32 {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, cfg));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One keep-alive connection, closed once idle for `cfg.idle_timeout`.
async fn connection(stream: TcpStream, cfg: AppConfig) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        busy: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let activity = activity.clone();
            activity.busy.fetch_add(1, Ordering::AcqRel);
            async move {
                tokio::time::sleep(requested_delay(&req).unwrap_or(cfg.delay)).await;
                *activity.idle_since.lock().expect("never poisoned") = Instant::now();
                activity.busy.fetch_sub(1, Ordering::AcqRel);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
            }
        })
    };
    let mut builder = http1::Builder::new();
    // The idle rule is enforced below, as Node.js does it, not by hyper's header timer.
    builder.keep_alive(true).header_read_timeout(None);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut closing = false;
    let mut check_at = Instant::now() + cfg.idle_timeout;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep_until(check_at), if !closing => {
                let idle_since = *activity.idle_since.lock().expect("never poisoned");
                if activity.busy.load(Ordering::Acquire) > 0 {
                    check_at = Instant::now() + cfg.idle_timeout;
                } else if idle_since.elapsed() < cfg.idle_timeout {
                    check_at = idle_since + cfg.idle_timeout;
                } else {
                    // The keep-alive timeout: close the idle connection, whatever the
                    // client may be about to send on it.
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

struct Activity {
    busy: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// `?delay_ms=N` in the request's query.
fn requested_delay<B>(req: &Request<B>) -> Option<Duration> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("delay_ms="))
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}
