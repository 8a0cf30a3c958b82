//! The pod's lifecycle: the one state every other part observes, and what moves it.
//!
//! | module | owns |
//! |---|---|
//! | [`state`] | the lifecycle's values (`State`, `Phase`, settings) and the pure drain decision `check` |
//! | [`drain`] | the `Lifecycle` handle that moves the state: the drain clock, the release, the in-flight/connection guards and counts |
//! | [`cadence`] | the load balancer's health-check cadence and the learned quiet window |
//! | [`signal`] | SIGTERM/SIGINT as a stream of triggers |
//! | [`record`] | the drain record (`--drain-record`): the file that lets a restarted proxy resume a drain |
//!
//! A leaf: it imports nothing else of the crate (the traffic path, the admin port and the
//! metrics read it; it reads none of them).

pub mod cadence;
pub mod drain;
pub mod record;
pub mod signal;
pub mod state;
