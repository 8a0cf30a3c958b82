//! The `lameduck proxy` process: binds both ports eagerly, wires lifecycle, proxy, admin
//! and metrics together, and runs the signal-driven path to exit.
//!
//! Exit: the first SIGTERM/SIGINT starts the drain; once drained and nothing is in flight
//! (late requests may still arrive after the drain; they get until drain-max), the admin
//! port shuts down gracefully so every `/drain` waiter is answered, and the process exits 0.
//! A second signal cuts the drain short and exits 1 at once (waiters are still answered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::{self, Admin};
use crate::cli::ProxyArgs;
use crate::drain::{DrainReason, Lifecycle, State, Trigger};
use crate::listener::{self, Timeouts};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::signal::Terminations;
use crate::upstream::{self, Upstream};

/// How long the admin port may take to answer its last requests at exit.
const ADMIN_FLUSH: Duration = Duration::from_secs(2);

/// Why the proxy could not start (exit 2).
#[derive(Debug)]
pub struct StartError(String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A proxy whose ports are bound; [`Bound::run`] serves them.
pub struct Bound {
    args: ProxyArgs,
    traffic: TcpListener,
    admin: TcpListener,
}

impl Bound {
    /// Binds the traffic and admin ports.
    pub async fn bind(args: ProxyArgs) -> Result<Bound, StartError> {
        let traffic = bind(args.listen, "--listen").await?;
        let admin = bind(args.admin, "--admin").await?;
        Ok(Bound {
            args,
            traffic,
            admin,
        })
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

    /// Serves until a termination request (from [`crate::signal::listen`] in the binary)
    /// has been followed by the end of the drain. Returns the exit code. If the sender side
    /// of `terminations` is dropped, that counts as a termination request.
    pub async fn run(self, mut terminations: Terminations) -> u8 {
        let Bound {
            args,
            traffic,
            admin,
        } = self;
        let (listen, admin_addr) = (
            traffic.local_addr().expect("bound"),
            admin.local_addr().expect("bound"),
        );
        let lifecycle = Lifecycle::new(args.settings());
        let metrics = Arc::new(Metrics::new(lifecycle.clone()));
        let upstream = Arc::new(Upstream::new(upstream::Config {
            addr: args.upstream,
            protocol: args.upstream_protocol,
            connect_timeout: args.upstream_connect_timeout,
            idle_timeout: args.upstream_idle_timeout,
        }));
        let proxy = Proxy::new(
            lifecycle.clone(),
            metrics.clone(),
            upstream.clone(),
            args.health_path.clone(),
            args.health_check_agents.clone(),
        );
        tokio::spawn(listener::serve(
            traffic,
            lifecycle.clone(),
            proxy,
            Timeouts {
                idle: args.idle_timeout,
                header_read: args.header_read_timeout,
            },
        ));
        let admin_state = Arc::new(Admin::new(
            lifecycle.clone(),
            metrics,
            upstream,
            args.upstream_health.clone(),
            args.drain_token.clone(),
        ));
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin::serve(admin, admin_state, async {
            let _ = admin_stopped.await;
        }));
        tracing::info!(
            listen = %listen,
            admin = %admin_addr,
            upstream = %args.upstream,
            drain_min = ?args.drain_min,
            quiet = ?args.quiet,
            quiet_fallback = ?args.quiet_fallback,
            drain_max = ?args.drain_max,
            version = env!("CARGO_PKG_VERSION"),
            "lameduck proxy serving"
        );

        let signal = terminations.recv().await.unwrap_or("shutdown");
        tracing::info!(signal, "signal received: draining, then exiting");
        lifecycle.start_drain(Trigger::Signal);
        let code = tokio::select! {
            _ = drained_and_idle(&lifecycle) => 0,
            Some(signal) = terminations.recv() => {
                tracing::warn!(signal, in_flight = lifecycle.in_flight(), "second signal: exiting now");
                lifecycle.cut_short();
                1
            }
        };
        let _ = stop_admin.send(());
        if tokio::time::timeout(ADMIN_FLUSH, admin_task).await.is_err() {
            tracing::warn!("admin connections still open after {ADMIN_FLUSH:?}; exiting anyway");
        }
        tracing::info!(code, "lameduck exiting");
        code
    }
}

/// Resolves once the drain is over and nothing is in flight. Requests that arrived after a
/// quiet drain may finish until drain-max; after a drain cut at drain-max, nothing waits.
async fn drained_and_idle(lifecycle: &Lifecycle) {
    let State::Drained { since, reason, .. } = lifecycle.drained().await else {
        unreachable!("drained() resolves with a Drained state")
    };
    if reason == DrainReason::Max {
        return;
    }
    let deadline = since + lifecycle.settings().max;
    if tokio::time::timeout_at(deadline, lifecycle.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = lifecycle.in_flight(),
            "requests that arrived after the drain still in flight at drain-max; exiting"
        );
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError(format!("cannot listen on {addr} ({flag}): {e}")))
}
