//! The load balancer, as an ALB behaves towards one target.
//!
//! - **Traffic**: open-loop, paced at a steady rate (request *n* leaves at `start + n/rate`
//!   whatever happened to the others), over a pool of persistent keep-alive connections
//!   opened up front and reused in turn. When none is free, a new one is opened, as an ALB
//!   does; a connection the target closed is not reused. A request that was never written
//!   (its connection was found closed first) goes to another connection; once written, any
//!   failure is the client's error.
//! - **Health checks**: every interval, from each source address, on a new connection,
//!   `GET /healthz` with `User-Agent: ELB-HealthChecker/2.0`.
//! - **Deregistration**: from that moment no new request and no health check; requests in
//!   flight complete. Idle connections stay open (the ALB closes them only at its own idle
//!   timeout, 60 s).
//!
//! Every exchange ends in one [`Outcome`]. Everything is bounded: the number of requests
//! (rate × time), open connections ([`AlbConfig::max_connections`]) and each exchange's
//! duration ([`AlbConfig::request_timeout`]).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Kind, Outcome, Recorder};

/// The load balancer's settings.
#[derive(Clone, Debug)]
pub struct AlbConfig {
    pub target: SocketAddr,
    /// Requests per second.
    pub rate: f64,
    /// Keep-alive connections opened up front.
    pub connections: usize,
    /// Never more connections open than this; a request waits for one instead.
    pub max_connections: usize,
    /// This share of the requests (0 to 1) asks the app to take `slow_delay` to answer.
    pub slow_fraction: f64,
    pub slow_delay: Duration,
    /// Health checks every this long; `None`: none.
    pub health_check_interval: Option<Duration>,
    /// One health checker per source address (an ALB checks from each of its nodes).
    pub health_check_sources: Vec<IpAddr>,
    /// A request (connection included) not answered in full within this long is a timeout.
    pub request_timeout: Duration,
}

type Conn = http1::SendRequest<Empty<Bytes>>;

/// A connection and the permit that counts it against `max_connections`.
struct Pooled {
    tx: Conn,
    _permit: OwnedSemaphorePermit,
}

pub struct Alb {
    cfg: AlbConfig,
    idle: Mutex<VecDeque<Pooled>>,
    returned: Notify,
    permits: Arc<Semaphore>,
    open: Arc<AtomicUsize>,
    peak_open: AtomicUsize,
    opened: AtomicU64,
    rec: Arc<Recorder>,
}

// === impl Alb ===

impl Alb {
    pub fn new(cfg: AlbConfig, rec: Arc<Recorder>) -> Arc<Alb> {
        Arc::new(Alb {
            permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            cfg,
            idle: Mutex::new(VecDeque::new()),
            returned: Notify::new(),
            open: Arc::new(AtomicUsize::new(0)),
            peak_open: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            rec,
        })
    }

    /// Opens the keep-alive pool.
    pub async fn warm_up(&self) -> Result<(), String> {
        for _ in 0..self.cfg.connections.min(self.cfg.max_connections) {
            let permit = self
                .permits
                .clone()
                .try_acquire_owned()
                .expect("fewer connections than the maximum");
            let tx = self
                .connect(permit)
                .await
                .map_err(|o| format!("the load balancer cannot reach its target: {o:?}"))?;
            self.checkin(tx);
        }
        Ok(())
    }

    /// Connections open at the busiest moment, and opened in all.
    pub fn connection_counts(&self) -> (usize, u64) {
        (
            self.peak_open.load(Ordering::Relaxed),
            self.opened.load(Ordering::Relaxed),
        )
    }

    /// Sends traffic from `start` until `stop` (deregistration), then waits for the
    /// requests still in flight.
    pub async fn send_traffic(self: &Arc<Self>, start: Instant, stop: Instant) {
        let mut tasks = JoinSet::new();
        if self.cfg.rate > 0.0 {
            let mut n: u64 = 0;
            loop {
                let at = start + Duration::from_secs_f64(n as f64 / self.cfg.rate);
                if at >= stop {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let path = if is_slow(n, self.cfg.slow_fraction) {
                    format!("/work?delay_ms={}", self.cfg.slow_delay.as_millis())
                } else {
                    "/work".to_owned()
                };
                n += 1;
                let alb = self.clone();
                tasks.spawn(async move {
                    alb.traffic_request(&path).await;
                });
                while tasks.try_join_next().is_some() {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Health checks from every source, from `start` until `stop`.
    pub async fn health_checks(self: &Arc<Self>, start: Instant, stop: Instant) {
        let Some(interval) = self.cfg.health_check_interval else {
            return;
        };
        let mut checkers = JoinSet::new();
        let sources = self.cfg.health_check_sources.len().max(1);
        for (i, source) in self.cfg.health_check_sources.iter().copied().enumerate() {
            let alb = self.clone();
            // Each node keeps its own schedule: spread their phases over the interval.
            let first = start + interval.mul_f64(i as f64 / sources as f64);
            checkers.spawn(async move {
                let mut at = first;
                let mut checks = JoinSet::new();
                while at < stop {
                    tokio::time::sleep_until(at).await;
                    let alb = alb.clone();
                    checks.spawn(async move {
                        alb.health_check(source).await;
                    });
                    at += interval;
                }
                while checks.join_next().await.is_some() {}
            });
        }
        while checkers.join_next().await.is_some() {}
    }

    /// One traffic request over the pool, recorded; returns how it ended.
    pub async fn traffic_request(&self, path: &str) -> Outcome {
        let started = Instant::now();
        self.rec.started(Kind::Traffic);
        let outcome = tokio::time::timeout(self.cfg.request_timeout, self.exchange(path))
            .await
            .unwrap_or(Outcome::Timeout);
        self.rec.finished(Kind::Traffic, started, outcome);
        outcome
    }

    /// One request over the pool.
    async fn exchange(&self, path: &str) -> Outcome {
        loop {
            let (mut conn, fresh) = match self.checkout() {
                Some(c) => (c, false),
                None => match self.new_connection().await {
                    Ok(c) => (c, true),
                    Err(o) => return o,
                },
            };
            match conn.tx.try_send_request(request(path, "ALB-sim")).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let close = resp
                        .headers()
                        .get(header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    if resp.into_body().collect().await.is_err() {
                        return Outcome::Reset;
                    }
                    if !close {
                        self.checkin(conn);
                    }
                    return Outcome::from_status(status);
                }
                // Never written: the connection was closed before it could be used. An
                // ALB would not have picked it; try another one.
                Err(mut e) => {
                    if fresh || e.take_message().is_none() {
                        return Outcome::Reset;
                    }
                }
            }
        }
    }

    /// The connection that has been idle longest (reuse in turn), if any is still open.
    fn checkout(&self) -> Option<Pooled> {
        let mut idle = self.idle.lock().expect("never poisoned");
        while let Some(c) = idle.pop_front() {
            if c.tx.is_ready() {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, c: Pooled) {
        if c.tx.is_closed() {
            return;
        }
        self.idle.lock().expect("never poisoned").push_back(c);
        self.returned.notify_one();
    }

    /// A new connection, once one may be opened (at most `max_connections`); or a
    /// connection returned to the pool meanwhile.
    async fn new_connection(&self) -> Result<Pooled, Outcome> {
        loop {
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    let permit = permit.expect("the semaphore is never closed");
                    return self.connect(permit).await;
                }
                _ = self.returned.notified() => {
                    if let Some(c) = self.checkout() {
                        return Ok(c);
                    }
                }
            }
        }
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Pooled, Outcome> {
        let stream = TcpStream::connect(self.cfg.target)
            .await
            .map_err(|e| Outcome::from_io(&e))?;
        let tx = self.handshake(stream).await?;
        Ok(Pooled {
            tx,
            _permit: permit,
        })
    }

    async fn handshake(&self, stream: TcpStream) -> Result<Conn, Outcome> {
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Outcome::Reset)?;
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let count = self.open.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            count.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(tx)
    }

    /// One health check, on a new connection from `source`, recorded; returns how it ended.
    pub async fn health_check(&self, source: IpAddr) -> Outcome {
        let started = Instant::now();
        self.rec.started(Kind::HealthCheck);
        let check = async {
            let socket = match source {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(|e| Outcome::from_io(&e))?;
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| Outcome::from_io(&e))?;
            let stream = socket
                .connect(self.cfg.target)
                .await
                .map_err(|e| Outcome::from_io(&e))?;
            let (mut tx, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| Outcome::Reset)?;
            tokio::spawn(conn);
            let resp = tx
                .send_request(request("/healthz", "ELB-HealthChecker/2.0"))
                .await
                .map_err(|_| Outcome::Reset)?;
            let status = resp.status().as_u16();
            resp.into_body()
                .collect()
                .await
                .map_err(|_| Outcome::Reset)?;
            Ok::<_, Outcome>(Outcome::from_status(status))
        };
        // The ALB's health-check timeout; never longer than the interval.
        let limit = self
            .cfg
            .health_check_interval
            .unwrap_or(self.cfg.request_timeout)
            .min(self.cfg.request_timeout);
        let outcome = match tokio::time::timeout(limit, check).await {
            Ok(Ok(o) | Err(o)) => o,
            Err(_) => Outcome::Timeout,
        };
        self.rec.finished(Kind::HealthCheck, started, outcome);
        outcome
    }
}

/// Spreads a share of the requests evenly: request `n` is in the share `fraction` (0 to 1)
/// when `(n+1)·fraction` reaches a new integer. Slow requests; the canary's weight.
pub fn is_slow(n: u64, fraction: f64) -> bool {
    fraction > 0.0 && ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
}

fn request(path: &str, user_agent: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(header::HOST, "demo.example")
        .header(header::USER_AGENT, user_agent)
        .body(Empty::new())
        .expect("a static request is valid")
}

// === impl Outcome ===

impl Outcome {
    fn from_status(status: u16) -> Outcome {
        if (200..300).contains(&status) {
            Outcome::Ok
        } else {
            Outcome::Status(status)
        }
    }

    fn from_io(e: &io::Error) -> Outcome {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::TimedOut => Outcome::Timeout,
            _ => Outcome::Reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_slow;

    #[test]
    fn slow_requests_are_spread_evenly() {
        let slow: Vec<u64> = (0..10).filter(|&n| is_slow(n, 0.2)).collect();
        assert_eq!(slow, [4, 9]);
        assert!(!(0..100).any(|n| is_slow(n, 0.0)));
        assert!((0..100).all(|n| is_slow(n, 1.0)));
    }
}
