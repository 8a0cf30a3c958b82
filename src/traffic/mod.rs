//! The traffic path: everything between the load balancer's connection and the app's.
//!
//! | module | owns |
//! |---|---|
//! | [`accept`] | the accept loop's step shared by the HTTP and TCP modes: connection limit, `accept(2)` error classes |
//! | [`conn`] | one downstream connection's state: its requests, header/idle watchdog verdict, and whether to keep it, close it after a response, or GOAWAY ([`conn::persistence`]) |
//! | [`listener`] | HTTP mode's traffic port: per-connection task (protocol sniff, hyper HTTP/1 or HTTP/2, TLS), close at `Drained` and at exit |
//! | [`probe`] | readiness: can the app be reached (TCP connect, an HTTP path, the gRPC health service) |
//! | [`proxy`] | HTTP mode's per-connection hyper service: request tracking, health checks while draining, forwarding, hop-by-hop headers |
//! | [`request`] | the request the app gets: refusals (400/405/501), hop-by-hop headers, URI and Host |
//! | [`tcp`] | `--mode tcp`: the layer-4 forwarder, health checks recognised at layer 4 |
//! | [`proxy_protocol`] | the pure PROXY protocol v2 header parser |
//! | [`upstream`] | the pooled connection to the app, timeouts, safe retry, error classes |
//!
//! Imports run one way: `listener` → `proxy` → `conn`, `upstream`; `listener` and `tcp` →
//! `accept`. The traffic path observes the lifecycle ([`crate::lifecycle`]), records into
//! [`crate::metrics`] and terminates TLS with [`crate::tls`]; it imports nothing from the
//! Kubernetes side ([`crate::kube`]), the admin port or the process's wiring
//! ([`crate::sidecar`]).

pub mod accept;
pub mod conn;
pub mod listener;
pub mod probe;
pub mod proxy;
pub mod proxy_protocol;
pub mod request;
pub mod tcp;

pub mod upstream;
