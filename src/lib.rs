//! lameduck: a sidecar reverse proxy that keeps a terminating pod serving until its load
//! balancer has really stopped sending, and only then lets the app be stopped.
//!
//! Three parts, and what ties them together. Imports run one way, from the top of this
//! table down; a module never imports one above it.
//!
//! | module | owns |
//! |---|---|
//! | `main` (the binary) | parse the command line, logging, the runtime, exit codes |
//! | [`sidecar`] | the `lameduck proxy` process: binding, wiring the parts, what the exit waits for |
//! | [`admin`] | `/livez` `/readyz` `/drain` `/status` `/metrics`, and the `lameduck drain` client |
//! | [`kube`] | the Kubernetes integration: `inject` (annotations, the pod transformation, manifest rewriting), the webhook, the drain's Event, YAML out |
//! | [`cli`] | flags and their environment variables, validation (typed [`cli::ConfigError`]) |
//! | [`traffic`] | the traffic path: accept loop, connections, the HTTP proxy, the TCP forwarder, the app's connection pool |
//! | [`metrics`] | the Prometheus registry |
//! | [`lifecycle`] | the pod's lifecycle: the one `State`, the drain decision and the release, the health-check cadence, signals |
//! | [`tls`] | serving certificates (files reloaded on change, or self-signed) and the rustls config, for the traffic port and the webhook |
//! | [`logging`] | log lines to stderr through a bounded queue: a failed or blocked write is dropped and counted, never a panic or a stall |
//!
//! `lifecycle`, `tls` and `logging` are leaves; `traffic` reads `lifecycle` and records into
//! `metrics`; `kube` imports nothing from `traffic`.

pub mod admin;
pub mod cli;
pub mod kube;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod sidecar;
pub mod tls;
pub mod traffic;
