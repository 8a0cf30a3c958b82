//! The ALB of the canary story: one listener rule forwarding to two target groups, stable
//! and canary, by weight; several targets per group.
//!
//! - **Traffic**: open-loop and paced at a steady rate, as in [`alb`](super::alb). Each
//!   request goes to the canary group if it falls in the canary's weight (spread evenly,
//!   request by request), else to the stable group; within a group, round robin over the
//!   targets in rotation. Each target has its own keep-alive pool (an [`Alb`] per target).
//! - **Target health**: every target registered is health-checked on a new connection every
//!   interval; after `unhealthy_threshold` consecutive failures it leaves rotation, after
//!   `healthy_threshold` successes it comes back. If every target of a group is unhealthy
//!   the group fails open: all of its registered targets are used.
//! - **Registration and weights** change only through [`Listener::apply`], which the AWS
//!   Load Balancer Controller model in [`canary`](super::canary) calls a lag after each
//!   change was asked for. A deregistered target gets no new request nor health check;
//!   requests in flight complete; its idle connections stay open.
//! - A request for a group with no registered target is the ALB's own 503.
//!
//! Bounded: requests by rate × time, connections per target, each exchange by the request
//! timeout; every task ends when [`Listener::stop`] is called.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::alb::{is_slow, Alb, AlbConfig};
use super::{Kind, Outcome, Recorder};

/// A target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Stable,
    Canary,
}

/// The load balancer's settings.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Requests per second, over both groups.
    pub rate: f64,
    /// A target's keep-alive pool never holds more connections than this.
    pub max_connections_per_target: usize,
    pub health_check_interval: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// A request not answered in full within this long is a timeout.
    pub request_timeout: Duration,
}

/// A change the load balancer controller makes.
#[derive(Clone, Debug)]
pub enum Change {
    Register(Group, usize, SocketAddr),
    Deregister(Group, usize),
    /// The canary group's weight, 0 to 100 (the stable group has the rest).
    Weight(u32),
}

struct Target {
    alb: Arc<Alb>,
    healthy: bool,
    fails: u32,
    oks: u32,
}

#[derive(Default)]
struct State {
    canary_weight: u32,
    groups: BTreeMap<Group, BTreeMap<usize, Target>>,
    next: BTreeMap<Group, usize>,
}

pub struct Listener {
    cfg: ListenerConfig,
    state: Mutex<State>,
    rec: Arc<Recorder>,
    stop: watch::Sender<bool>,
    checks: Mutex<JoinSet<()>>,
}

impl Listener {
    pub fn new(cfg: ListenerConfig, rec: Arc<Recorder>) -> Arc<Listener> {
        Arc::new(Listener {
            cfg,
            state: Mutex::new(State::default()),
            rec,
            stop: watch::channel(false).0,
            checks: Mutex::new(JoinSet::new()),
        })
    }

    /// Applies a change now.
    pub fn apply(self: &Arc<Self>, change: Change) {
        let mut st = self.state.lock().expect("never poisoned");
        match change {
            Change::Weight(w) => st.canary_weight = w.min(100),
            Change::Deregister(g, id) => {
                st.groups.entry(g).or_default().remove(&id);
            }
            Change::Register(g, id, addr) => {
                let alb = Alb::new(
                    AlbConfig {
                        target: addr,
                        rate: 0.0,
                        connections: 0,
                        max_connections: self.cfg.max_connections_per_target,
                        slow_fraction: 0.0,
                        slow_delay: Duration::ZERO,
                        health_check_interval: Some(self.cfg.health_check_interval),
                        health_check_sources: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                        request_timeout: self.cfg.request_timeout,
                    },
                    self.rec.clone(),
                );
                st.groups.entry(g).or_default().insert(
                    id,
                    Target {
                        alb,
                        healthy: true,
                        fails: 0,
                        oks: 0,
                    },
                );
                let me = self.clone();
                self.checks
                    .lock()
                    .expect("never poisoned")
                    .spawn(async move { me.health_checks(g, id).await });
            }
        }
    }

    /// The canary group's weight in force.
    pub fn canary_weight(&self) -> u32 {
        self.state.lock().expect("never poisoned").canary_weight
    }

    /// Stops the traffic and the health checks (requests in flight complete).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits until every health checker has ended (after [`Listener::stop`]).
    pub async fn checks_done(&self) {
        let mut set = std::mem::take(&mut *self.checks.lock().expect("never poisoned"));
        while set.join_next().await.is_some() {}
    }

    /// Sends traffic from `start` until [`Listener::stop`], then waits for the requests in
    /// flight.
    pub async fn send_traffic(self: &Arc<Self>, start: Instant) {
        let mut stop = self.stop.subscribe();
        let mut tasks = JoinSet::new();
        let mut n: u64 = 0;
        while self.cfg.rate > 0.0 && !*stop.borrow() {
            let at = start + Duration::from_secs_f64(n as f64 / self.cfg.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let pick = self.pick(n);
            n += 1;
            match pick {
                Some(alb) => {
                    tasks.spawn(async move {
                        alb.traffic_request("/work").await;
                    });
                }
                None => {
                    // No registered target in the group the rule chose.
                    self.rec.started(Kind::Traffic);
                    self.rec
                        .finished(Kind::Traffic, Instant::now(), Outcome::Status(503));
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The target for request `n`, or `None` if its group has no registered target.
    fn pick(&self, n: u64) -> Option<Arc<Alb>> {
        let mut st = self.state.lock().expect("never poisoned");
        let group = if is_slow(n, f64::from(st.canary_weight) / 100.0) {
            Group::Canary
        } else {
            Group::Stable
        };
        let targets = st.groups.entry(group).or_default();
        let healthy: Vec<Arc<Alb>> = targets
            .values()
            .filter(|t| t.healthy)
            .map(|t| t.alb.clone())
            .collect();
        // Fail open: if no target is healthy, the ALB routes to all of them.
        let rotation = if healthy.is_empty() {
            targets.values().map(|t| t.alb.clone()).collect()
        } else {
            healthy
        };
        if rotation.is_empty() {
            return None;
        }
        let next = st.next.entry(group).or_default();
        *next = next.wrapping_add(1);
        Some(rotation[*next % rotation.len()].clone())
    }

    /// Health checks of one target, every interval from its registration until it is
    /// deregistered or the listener stops.
    async fn health_checks(self: Arc<Self>, group: Group, id: usize) {
        let mut stop = self.stop.subscribe();
        let interval = self.cfg.health_check_interval;
        let mut at = Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            at += interval;
            let alb = {
                let st = self.state.lock().expect("never poisoned");
                match st.groups.get(&group).and_then(|g| g.get(&id)) {
                    Some(t) => t.alb.clone(),
                    None => return,
                }
            };
            let ok = alb.health_check(IpAddr::V4(Ipv4Addr::LOCALHOST)).await == Outcome::Ok;
            let mut st = self.state.lock().expect("never poisoned");
            let Some(t) = st.groups.get_mut(&group).and_then(|g| g.get_mut(&id)) else {
                return;
            };
            if ok {
                t.fails = 0;
                t.oks += 1;
                if t.oks >= self.cfg.healthy_threshold {
                    t.healthy = true;
                }
            } else {
                t.oks = 0;
                t.fails += 1;
                if t.fails >= self.cfg.unhealthy_threshold {
                    t.healthy = false;
                }
            }
        }
    }
}
