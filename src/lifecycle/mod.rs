//! The pod's lifecycle: the one state every other part observes, and what moves it.
//!
//! | module | owns |
//! |---|---|
//! | [`drain`] | the lifecycle `State`, the pure drain decision, the release, the in-flight/connection guards and counts |
//! | [`cadence`] | the load balancer's health-check cadence and the learned quiet window |
//! | [`signal`] | SIGTERM/SIGINT as a stream of triggers |
//!
//! A leaf: it imports nothing else of the crate (the traffic path, the admin port and the
//! metrics read it; it reads none of them).

pub mod cadence;
pub mod drain;
pub mod signal;
