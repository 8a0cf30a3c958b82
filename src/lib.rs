//! lameduck: a sidecar reverse proxy that keeps a terminating pod serving until its load
//! balancer has really stopped sending, and only then lets the app be stopped.
//!
//! Three parts, and what ties them together. Imports run one way, from the top of this
//! table down; a part never imports one above it.
//!
//! | module | owns |
//! |---|---|
//! | [`main`](../lameduck/index.html) (the binary) | parse the command line, logging, the runtime, exit codes |
//! | [`cli`] | flags and their environment variables, validation |
//! | [`sidecar`] | the `lameduck proxy` process: binding, wiring the parts, the path to exit |
//! | [`admin`] | `/livez` `/readyz` `/drain` `/status` `/metrics`, and the `lameduck drain` client |
//! | [`metrics`] | the Prometheus registry |
//! | [`logging`] | log lines to stderr through a bounded queue: a failed or blocked write is dropped and counted, never a panic or a stall |
//! | [`traffic`] | the traffic path: accept loop, connections, the HTTP proxy, the TCP forwarder, the app's connection pool, TLS |
//! | [`lifecycle`] | the pod's lifecycle: the one `State`, the drain decision and the release, the health-check cadence, signals |
//! | [`kube`] | the Kubernetes integration: `inject`, the webhook, the drain's Event, YAML out |
//!
//! `lifecycle` is a leaf; `traffic` reads `lifecycle` and records into `metrics`; `kube`
//! imports nothing from `traffic`.

pub mod admin;
pub mod cli;
pub mod events;
pub mod inject;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod sidecar;
pub mod traffic;
pub mod webhook;
pub mod yaml;
