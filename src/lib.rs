//! lameduck: a sidecar reverse proxy that keeps a terminating pod serving until its load
//! balancer has really stopped sending, and only then lets the app be stopped.
//!
//! Data flows one way through these modules:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | flags and their environment variables, validation |
//! | [`drain`] | the lifecycle `State`, the pure drain decision, in-flight/connection guards |
//! | [`cadence`] | the load balancer's health-check cadence and the learned quiet window |
//! | [`signal`] | SIGTERM/SIGINT as a stream of triggers |
//! | [`listener`] | the traffic port: accept loop, per-connection idle/header watchdog, close at Drained |
//! | [`proxy`] | the per-connection hyper service: tracking, drain awareness, forwarding, hop-by-hop headers |
//! | [`tcp`] | `--mode tcp`: the layer-4 forwarder, health checks recognised at layer 4 |
//! | [`proxy_protocol`] | the pure PROXY protocol v2 header parser |
//! | [`upstream`] | the pooled connection to the app, timeouts, safe retry, error classes |
//! | [`admin`] | `/livez` `/readyz` `/drain` `/status` `/metrics`, and the `lameduck drain` client |
//! | [`metrics`] | the Prometheus registry |
//! | [`logging`] | log lines to stderr through a bounded queue: a failed or blocked write is dropped and counted, never a panic or a stall |
//! | [`sidecar`] | the `lameduck proxy` process: binding, wiring, the path to exit |
//! | [`tls`] | serving certificates (files reloaded on change, or self-signed) and the rustls config |
//! | [`kube`] | the Kubernetes integration: `inject`, the `webhook`, the drain's `events`, YAML out |

pub mod admin;
pub mod cadence;
pub mod cli;
pub mod drain;
pub mod kube;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod sidecar;
pub mod signal;
pub mod tcp;
pub mod tls;
pub mod upstream;

/// The drain's Event, where `sidecar` and `cli` name it (now [`kube::events`]).
pub use kube::events;
