//! The `lameduck proxy` process: binds both ports eagerly, wires lifecycle, proxy, admin
//! and metrics together, and runs the signal-driven path to exit.
//!
//! Exit: the first SIGTERM/SIGINT starts the drain. Once it is released (drained and nothing
//! in flight, or drain-max: [`Lifecycle::released`], the same future `/drain` answers on),
//! the shutdown runs in order, in [`shut_down`]: the traffic socket is closed, every
//! connection is closed gracefully and awaited until drain-max (then what is left is cut
//! cleanly), the admin port shuts down gracefully so every `/drain` waiter is answered, and
//! the process exits 0. A second signal cuts the drain short and exits 1 at once (waiters
//! are still answered).
//!
//! `--mode tcp` changes only the traffic port: [`crate::traffic::tcp::serve`] instead of
//! [`listener::serve`]. The same lifecycle, admin port and shutdown apply; a TCP connection
//! has no graceful close, so the close step leaves open ones alone and drain-max's cut ends
//! them.
//!
//! Exit codes other than 0: 1 after a second signal or when the traffic port's accept loop
//! died (readiness fails first); 3 ([`EXIT_NEVER_TERMINATED`]) when a drain requested on the
//! admin port was released and no termination followed within drain-max.
//!
//! With `--drain-record`, a drain is recorded as it starts ([`record_drain`]) and a proxy
//! that starts and finds the record resumes it before either port serves
//! ([`resume_recorded_drain`]): a sidecar restarted in the middle of a drain never answers
//! ready. Only the exit-3 path, a drain that healed, removes the record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::{self, Admin};
use crate::cli::{Mode, ProxyArgs};
use crate::lifecycle::drain::{Lifecycle, Phase, State, Trigger};
use crate::lifecycle::record::{self, Found, Record};
use crate::lifecycle::signal::Terminations;
use crate::metrics::Metrics;
use crate::tls::{self, CertStore};
use crate::traffic::accept;
use crate::traffic::conn::Timeouts;
use crate::traffic::listener;
use crate::traffic::proxy::Proxy;
use crate::traffic::tcp;
use crate::traffic::upstream::{self, Upstream};

/// How long the admin port may take to answer its last requests at exit.
const ADMIN_FLUSH: Duration = Duration::from_secs(2);

/// Why the proxy could not start (exit 2); each names the flag behind it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--tls-cert/--tls-key: {0}")]
    CertFiles(#[source] tls::TlsError),
    #[error("--tls self-signed: {0}")]
    SelfSigned(#[source] tls::TlsError),
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Listen {
        addr: SocketAddr,
        flag: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A proxy whose ports are bound; [`Bound::run`] serves them.
pub struct Bound {
    args: ProxyArgs,
    traffic: TcpListener,
    admin: TcpListener,
    /// The traffic port's certificate, with `--tls*`.
    tls: Option<Arc<CertStore>>,
}

impl Bound {
    /// Loads (or generates) the traffic port's certificate and binds the traffic and admin
    /// ports.
    pub async fn bind(args: ProxyArgs) -> Result<Bound, StartError> {
        let tls = certificate(&args)?.map(Arc::new);
        let traffic = bind(args.listen, "--listen").await?;
        let admin = bind(args.admin, "--admin").await?;
        Ok(Bound {
            args,
            traffic,
            admin,
            tls,
        })
    }

    /// The traffic port's certificate chain (PEM), with `--tls*`.
    pub fn tls_cert_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|c| c.cert_pem())
    }

    pub fn traffic_addr(&self) -> SocketAddr {
        self.traffic
            .local_addr()
            .expect("a bound socket has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Serves until a termination request (from [`crate::lifecycle::signal::listen`] in the
    /// binary) has been followed by the release of the drain, then shuts down in order.
    /// Returns the exit code. If the sender side of `terminations` is dropped, that counts as
    /// a termination request.
    pub async fn run(self, terminations: Terminations) -> u8 {
        let running = self.start();
        running.until_exit(terminations).await
    }

    /// Wiring: the lifecycle, metrics and the app's pool, the traffic port in its mode, the
    /// admin port and the drain's Event, each spawned; nothing here waits.
    fn start(self) -> Running {
        let Bound {
            args,
            traffic,
            admin,
            tls,
        } = self;
        let (listen, admin_addr) = (
            traffic.local_addr().expect("bound"),
            admin.local_addr().expect("bound"),
        );
        let lifecycle = Lifecycle::new(args.settings());
        let metrics = Arc::new(Metrics::new(lifecycle.clone()));
        metrics.set_mode(args.mode.as_str());
        // Before anything serves: a restarted proxy's first /readyz already says draining.
        let record = args.drain_record.clone().map(|path| {
            resume_recorded_drain(&path, &lifecycle, &metrics);
            DrainRecord {
                writer: tokio::spawn(record_drain(
                    lifecycle.clone(),
                    path.clone(),
                    metrics.clone(),
                )),
                path,
                metrics: metrics.clone(),
            }
        });
        let upstream = Arc::new(Upstream::new(upstream_config(&args, &lifecycle)));
        upstream.spawn_reaper();
        tokio::spawn(trim_after_bursts(lifecycle.clone()));
        // `--quiet auto` with traffic but no health check: said once, long before a drain.
        tokio::spawn(lifecycle.clone().warn_if_no_health_checks());
        let max_connections = max_connections(&args);
        let serving = match args.mode {
            Mode::Http => {
                let proxy = Proxy::new(
                    lifecycle.clone(),
                    metrics.clone(),
                    upstream.clone(),
                    proxy_options(&args),
                );
                let acceptor = tls.map(|certs| {
                    tokio::spawn(tls::reload_loop(certs.clone(), args.tls_reload_interval));
                    tls::acceptor(certs, &[tls::ALPN_H2, tls::ALPN_HTTP1])
                });
                tokio::spawn(listener::serve(
                    traffic,
                    lifecycle.clone(),
                    proxy,
                    timeouts(&args),
                    max_connections,
                    acceptor,
                ))
            }
            // The same lifecycle, admin port and ordered shutdown; only the traffic port
            // differs (see `crate::traffic::tcp`).
            Mode::Tcp => tokio::spawn(tcp::serve(
                traffic,
                lifecycle.clone(),
                metrics.clone(),
                tcp_config(&args, max_connections),
            )),
        };
        let admin_state = Arc::new(
            Admin::new(
                lifecycle.clone(),
                metrics,
                upstream,
                args.upstream_health.clone(),
                args.drain_token.clone(),
            )
            .with_readiness_while_draining(args.readiness_while_draining)
            // http mode fails the load balancer's checks while draining (`--health-path`); tcp
            // mode keeps them passing unless the target group drains unhealthy targets.
            .with_lb_health_fails_while_draining(
                args.mode == Mode::Http || args.fail_health_while_draining,
            ),
        );
        let events = args.events.then(|| spawn_events(&args, &lifecycle));
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, admin_state, async {
            let _ = admin_stopped.await;
        }));
        tracing::info!(
            mode = args.mode.as_str(),
            listen = %listen,
            tls = tls_source(&args),
            admin = %admin_addr,
            upstream = %args.upstream,
            drain_min = ?args.drain_min,
            quiet = ?args.quiet,
            quiet_fallback = ?args.quiet_fallback,
            drain_max = ?args.drain_max,
            max_connections,
            version = env!("CARGO_PKG_VERSION"),
            "lameduck proxy serving"
        );
        Running {
            lifecycle,
            serving,
            events,
            record,
            stop_admin,
            admin_task,
        }
    }
}

/// A proxy whose parts are running: what the exit waits for.
struct Running {
    lifecycle: Lifecycle,
    /// The traffic port's accept loop.
    serving: tokio::task::JoinHandle<Result<(), accept::AcceptError>>,
    /// `--events`: the drain's Event being posted.
    events: Option<tokio::task::JoinHandle<()>>,
    /// `--drain-record`.
    record: Option<DrainRecord>,
    stop_admin: tokio::sync::oneshot::Sender<()>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// What the exit waits for, in order: a termination request and then the release (or a
    /// second signal, or the traffic port dying, or a drain on the admin port that no
    /// termination followed), then the ordered shutdown of the traffic port, the drain's
    /// Event, and last the admin port, so every `/drain` caller is answered.
    async fn until_exit(self, mut terminations: Terminations) -> u8 {
        let Running {
            lifecycle,
            mut serving,
            events,
            record,
            stop_admin,
            admin_task,
        } = self;
        let max = lifecycle.settings().max;
        let now = tokio::time::Instant::now;
        let (code, deadline) = tokio::select! {
            signal = terminations.recv() => {
                let signal = signal.unwrap_or("shutdown");
                tracing::info!(signal, "signal received: draining, then exiting");
                lifecycle.start_drain(Trigger::Signal);
                tokio::select! {
                    state = lifecycle.released() => (0, drain_deadline(&lifecycle, &state)),
                    Some(signal) = terminations.recv() => {
                        tracing::warn!(signal, in_flight = lifecycle.in_flight(), "second signal: exiting now");
                        lifecycle.cut_short();
                        (1, now())
                    }
                    res = &mut serving => (listener_died(&lifecycle, res), now() + FAILED_FLUSH),
                }
            }
            res = &mut serving => (listener_died(&lifecycle, res), now() + FAILED_FLUSH),
            _ = never_terminated(&lifecycle) => {
                tracing::error!(
                    after = ?max,
                    "drained on the admin port, but no termination followed within drain-max \
                     of the release: exiting 3 so the container is restarted and the pod can \
                     become ready again"
                );
                // The restart must start ready, not resume this drain.
                if let Some(record) = record {
                    record.forget().await;
                }
                (EXIT_NEVER_TERMINATED, now())
            }
        };
        shut_down(&lifecycle, serving, deadline).await;
        if let Some(events) = events {
            // Posted as the drain ended, normally long done; never hold the exit for it.
            let _ = tokio::time::timeout(EVENT_FLUSH, events).await;
        }
        let _ = stop_admin.send(());
        if tokio::time::timeout(ADMIN_FLUSH, admin_task).await.is_err() {
            tracing::warn!("admin connections still open after {ADMIN_FLUSH:?}; exiting anyway");
        }
        tracing::info!(code, "lameduck exiting");
        code
    }
}

// === the drain record (`--drain-record`) ===

/// A drain recorded in a file that outlives the process.
struct DrainRecord {
    path: std::path::PathBuf,
    /// [`record_drain`], waiting for the drain to start.
    writer: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

/// How long removing the record waits for its write still under way (a write to a hung
/// disk cannot be cancelled).
const RECORD_WRITE_WAIT: Duration = Duration::from_secs(1);

impl DrainRecord {
    /// The drain healed (exit 3): removes the record, so the restarted proxy starts ready.
    async fn forget(self) {
        let DrainRecord {
            path,
            writer,
            metrics,
        } = self;
        // Written long ago (drain-max after the release), unless the disk hangs.
        let _ = tokio::time::timeout(RECORD_WRITE_WAIT, writer).await;
        let p = path.clone();
        let removed = tokio::task::spawn_blocking(move || record::remove(&p)).await;
        match removed.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                "drain record removed: the restarted proxy starts ready"
            ),
            Err(e) => {
                metrics.drain_record_error("remove");
                tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "cannot remove the drain record: the restarted proxy will drain again"
                );
            }
        }
    }
}

/// A proxy that starts and finds a drain record resumes that drain (see
/// [`Lifecycle::resume_drain`]): its pod is terminating, or was drained by hand and will
/// heal by exit 3. An unreadable record counts as a drain in progress, started now.
fn resume_recorded_drain(path: &std::path::Path, lifecycle: &Lifecycle, metrics: &Metrics) {
    let (started_at, trigger) = match record::read(path) {
        Found::Nothing => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                tracing::warn!(
                    path = %path.display(),
                    "the drain record's directory does not exist: a drain cannot be recorded, \
                     and a restart in the middle of one would start ready"
                );
            }
            return;
        }
        Found::Record(Record {
            started_at,
            trigger,
        }) => (Some(started_at), trigger),
        Found::Unreadable(why) => {
            metrics.drain_record_error("read");
            tracing::warn!(
                path = %path.display(),
                error = %why,
                "the drain record cannot be read: taking it as a drain in progress, started now"
            );
            // Unknown; only reported. A pod that is terminating is what a signal means.
            (None, Trigger::Signal)
        }
    };
    if lifecycle.resume_drain(started_at, trigger).is_some() {
        metrics.drain_resumed.inc();
    }
}

/// Writes the drain record once the drain starts (a resumed one too: that pins an
/// unreadable record's start). A failure is logged and counted; the drain goes on.
async fn record_drain(lifecycle: Lifecycle, path: std::path::PathBuf, metrics: Arc<Metrics>) {
    let entry = {
        let mut states = lifecycle.subscribe();
        let Ok(state) = states.wait_for(|s| s.phase() != Phase::Serving).await else {
            return;
        };
        match &*state {
            State::Draining {
                started_at,
                trigger,
                ..
            }
            | State::Drained {
                started_at,
                trigger,
                ..
            } => Record {
                started_at: *started_at,
                trigger: *trigger,
            },
            State::Serving => return,
        }
    };
    let p = path.clone();
    let written = tokio::task::spawn_blocking(move || record::write(&p, &entry)).await;
    match written.map_err(std::io::Error::other).and_then(|r| r) {
        Ok(()) => tracing::debug!(path = %path.display(), "drain recorded"),
        Err(e) => {
            metrics.drain_record_error("write");
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot write the drain record: draining anyway, but a restart in the middle \
                 of this drain would start ready"
            );
        }
    }
}

// === component configs from the command line: the one place flags become settings ===

fn upstream_config(args: &ProxyArgs, lifecycle: &Lifecycle) -> upstream::Config {
    upstream::Config {
        addr: args.upstream,
        protocol: args.upstream_protocol,
        connect_timeout: args.upstream_connect_timeout,
        idle_timeout: args.upstream_idle_timeout,
        response_timeout: args.upstream_response_timeout,
        body_timeout: args.upstream_body_timeout,
        request_body_timeout: args.request_body_timeout,
        cut: lifecycle.cut_token(),
    }
}

fn proxy_options(args: &ProxyArgs) -> crate::traffic::proxy::Options {
    crate::traffic::proxy::Options {
        health_paths: args.health_path.clone(),
        health_check_agents: args.health_check_agents.clone(),
        keep_alive_while_draining: args.keep_alive_while_draining,
    }
}

fn timeouts(args: &ProxyArgs) -> Timeouts {
    Timeouts {
        idle: args.idle_timeout,
        header_read: args.header_read_timeout,
    }
}

fn tcp_config(args: &ProxyArgs, max_connections: usize) -> tcp::Config {
    tcp::Config {
        upstream: args.upstream,
        connect_timeout: args.upstream_connect_timeout,
        idle_timeout: args.idle_timeout,
        proxy_protocol: args.proxy_protocol,
        header_timeout: args.header_read_timeout,
        health_check_within: args.tcp_health_check_within,
        health_check_agents: args.health_check_agents.clone(),
        fail_health_while_draining: args.fail_health_while_draining,
        max_connections,
    }
}

/// `--max-connections`, or with 0 the limit the file descriptor limit allows (raised to the
/// hard limit first).
fn max_connections(args: &ProxyArgs) -> usize {
    if args.max_connections != 0 {
        return args.max_connections;
    }
    let limit = match accept::raise_fd_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(
                    before,
                    after,
                    "file descriptor limit raised to the hard limit"
                );
            }
            after
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file descriptor limit; assuming 1024");
            1024
        }
    };
    accept::max_connections_for(limit)
}

/// `--events`: the drain's Event on this pod, posted once the drain is over.
fn spawn_events(args: &ProxyArgs, lifecycle: &Lifecycle) -> tokio::task::JoinHandle<()> {
    let pod = crate::kube::events::PodRef {
        namespace: args.pod_namespace.clone().unwrap_or_default(),
        name: args.pod_name.clone().unwrap_or_default(),
        uid: args.pod_uid.clone(),
    };
    let lifecycle = lifecycle.clone();
    let dir = args.service_account_dir.clone();
    tokio::spawn(async move {
        let client = crate::kube::events::ApiClient::in_cluster(&dir);
        let events = crate::kube::events::Events::start(client, pod).await;
        let state = lifecycle.drained().await;
        events.drained(&state).await;
    })
}

/// Drain-max after the drain started: what is left of it bounds the ordered shutdown.
fn drain_deadline(lifecycle: &Lifecycle, state: &State) -> tokio::time::Instant {
    match state {
        State::Draining { since, .. } | State::Drained { since, .. } => {
            *since + lifecycle.settings().max
        }
        State::Serving => tokio::time::Instant::now(),
    }
}

/// Gives memory back to the system after a burst of connections has gone. Each connection
/// that carried a request leaves its buffers (~20 KiB) in the allocator's free lists when it
/// closes, and glibc returns little of that on its own: 3,000 closed connections kept
/// ~60 MiB resident. `malloc_trim` once the count has fallen well below its peak returns it
/// (`benches/burst_rss.py`, 3,000 connections: 65 MiB → 6.9 MiB, idle is 5.6). It runs at
/// most every 2 s, and only after such a fall.
async fn trim_after_bursts(lifecycle: Lifecycle) {
    const EVERY: Duration = Duration::from_secs(2);
    const BURST: usize = 256;
    let mut peak = 0usize;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = lifecycle.connections();
        peak = peak.max(now);
        if peak >= now + BURST && now < peak / 2 {
            release_free_memory();
            peak = now;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own state.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// Exit code of a proxy that was drained (on the admin port) but never terminated.
pub const EXIT_NEVER_TERMINATED: u8 = 3;

/// How long the exit waits for the drain's Event still being posted (`--events`).
const EVENT_FLUSH: Duration = Duration::from_secs(2);

/// How long the ordered shutdown waits for connections after drain-max has cut them.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// How long connections get to finish when the listener died.
const FAILED_FLUSH: Duration = Duration::from_secs(5);

/// Resolves when a drain that did not come with a signal (the admin port's `/drain`) was
/// released and no termination followed within drain-max: in a pod, the app's preStop
/// answered and the kubelet never went on (a stray `/drain`, a scanner), so the pod would
/// stay unready forever. A native sidecar that exits is restarted.
async fn never_terminated(lifecycle: &Lifecycle) {
    lifecycle.released().await;
    tokio::time::sleep(lifecycle.settings().max).await;
}

/// The accept loop ended on its own: readiness fails at once, and the process exits 1 once
/// the connections still open have had a moment to finish.
fn listener_died(
    lifecycle: &Lifecycle,
    res: Result<Result<(), accept::AcceptError>, tokio::task::JoinError>,
) -> u8 {
    let why = match res {
        Ok(Ok(())) => "the accept loop returned".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("the accept loop failed: {e}"),
    };
    lifecycle.fail(why.clone());
    tracing::error!(error = %why, "traffic port is dead: readiness fails; exiting 1");
    1
}

/// The ordered shutdown: stop accepting, close every connection gracefully (HTTP/1 after its
/// current response, HTTP/2 by two-phase GOAWAY, open streams finishing), wait for them
/// until drain-max; past it, cut what is left (see [`Lifecycle::cut`]) and give the cut
/// responses [`CUT_FLUSH`] to reach their clients.
async fn shut_down(
    lifecycle: &Lifecycle,
    serving: tokio::task::JoinHandle<Result<(), accept::AcceptError>>,
    deadline: tokio::time::Instant,
) {
    lifecycle.close();
    // Returns at once on close (or has already ended); the socket is dropped with it.
    if !serving.is_finished() {
        let _ = serving.await;
    }
    let waited = tokio::time::timeout_at(deadline, lifecycle.no_connections()).await;
    if waited.is_err() {
        let what = match lifecycle.settings().unit {
            crate::lifecycle::drain::Unit::Request => {
                "connections still open at drain-max: ending their responses"
            }
            crate::lifecycle::drain::Unit::Connection => {
                "connections still open at drain-max: closing them"
            }
        };
        tracing::warn!(
            connections = lifecycle.connections(),
            in_flight = lifecycle.in_flight(),
            "{what}"
        );
        lifecycle.cut();
        if tokio::time::timeout(CUT_FLUSH, lifecycle.no_connections())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = lifecycle.connections(),
                "connections still open after the cut; closing them"
            );
        }
    }
}

/// The traffic port's certificate: `--tls-cert/--tls-key` loaded now (a bad pair is a
/// start error), or `--tls self-signed` generated for this host's names.
fn certificate(args: &ProxyArgs) -> Result<Option<CertStore>, StartError> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return CertStore::load(cert, key)
            .map(Some)
            .map_err(StartError::CertFiles);
    }
    if args.tls.is_none() {
        return Ok(None);
    }
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    // The pod's name is its hostname.
    if let Some(host) = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty() && h.is_ascii())
    {
        names.insert(0, host);
    }
    CertStore::self_signed(names)
        .map(Some)
        .map_err(StartError::SelfSigned)
}

/// What the start log says of TLS.
fn tls_source(args: &ProxyArgs) -> &'static str {
    match (args.mode, &args.tls_cert, args.tls) {
        (Mode::Tcp, ..) => "passthrough",
        (_, Some(_), _) => "files",
        (_, None, Some(_)) => "self-signed",
        (_, None, None) => "off",
    }
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, StartError> {
    let err = |addr: SocketAddr, source: std::io::Error| StartError::Listen { addr, flag, source };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) => match ipv4_fallback(addr, &e) {
            Some(v4) => {
                tracing::warn!(%addr, error = %e, fallback = %v4, "no IPv6 here; listening on IPv4 only");
                TcpListener::bind(v4).await.map_err(|e| err(v4, e))
            }
            None => Err(err(addr, e)),
        },
    }
}

/// `[::]` (the injected default, dual-stack) on a node whose kernel has IPv6 turned off:
/// the same port on `0.0.0.0` instead of failing to start.
fn ipv4_fallback(addr: SocketAddr, e: &std::io::Error) -> Option<SocketAddr> {
    let no_ipv6 = matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    );
    (no_ipv6 && addr.ip() == std::net::Ipv6Addr::UNSPECIFIED)
        .then(|| SocketAddr::from(([0, 0, 0, 0], addr.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_ipv6_falls_back_to_ipv4_only_without_ipv6() {
        let any6: SocketAddr = "[::]:8080".parse().unwrap();
        let no = std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert_eq!(
            ipv4_fallback(any6, &no),
            Some("0.0.0.0:8080".parse().unwrap())
        );
        let in_use = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(ipv4_fallback(any6, &in_use), None);
        assert_eq!(ipv4_fallback("[::1]:8080".parse().unwrap(), &no), None);
    }
}
