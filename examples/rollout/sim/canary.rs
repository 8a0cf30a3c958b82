//! The canary story: an Argo-like canary of a fleet behind one ALB listener rule with two
//! target groups, every pod a real [`Pod`] (the app alone, or the app with lameduck as a
//! native sidecar), on 127.0.0.1.
//!
//! This module owns the control plane and the outcome of one run:
//!
//! - the **Argo controller** ([`argo`](super::argo) for its arithmetic) walks the steps: it
//!   scales the canary ReplicaSet up and waits for its pods to be Ready, writes the new
//!   weight, and scales the stable ReplicaSet as `dynamicStableScale` says. After the last
//!   step the rollout is complete: the stable ReplicaSet is scaled to 0, after
//!   `scaleDownDelaySeconds` if it still has pods;
//! - the **AWS Load Balancer Controller** applies each change (register a Ready pod,
//!   deregister a terminating one, the rule's weights) to the [`Listener`] `lag` after it
//!   was asked for, in order;
//! - the **kubelet** terminates a deleted pod as in the single-pod story
//!   ([`Pod::terminate`]): preStop, SIGTERM, grace period, SIGKILL;
//! - the [`CanaryReport`]: requests and errors by class, pods over time per ReplicaSet,
//!   pod-seconds and the peak pod count.
//!
//! Times in a report are seconds since t0, the moment the rollout starts (after `warmup`
//! of steady load on the stable fleet).
//!
//! Not modelled: Argo switching the stable Service to the new pods at the end (traffic
//! stays on the canary group, which holds them), a new target's initial health checks,
//! the ALB's slow start, pod capacity (any pod takes any share of the load).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::app::AppConfig;
use super::argo::{self, Status, Step};
use super::listener::{Change, Group, Listener, ListenerConfig};
use super::pod::{self, Pod};
use super::{
    drain_args, parse_drain_answer, DrainAnswer, EventKind, Kind, Mode, Recorder, Sample, Tally,
};

/// One canary run. [`CanaryScenario::new`] gives the demo's defaults.
#[derive(Clone, Debug)]
pub struct CanaryScenario {
    pub label: String,
    /// Every pod has lameduck as a native sidecar; otherwise the app alone.
    pub lameduck: bool,
    pub dynamic_stable_scale: bool,
    pub scale_down_delay: Duration,
    /// `spec.replicas`.
    pub replicas: u32,
    pub steps: Vec<Step>,
    /// Every `pause` step's duration.
    pub pause: Duration,
    /// Requests per second over the whole rollout.
    pub rate: f64,
    /// The load balancer controller applies every change this long after it was asked.
    pub lag: Duration,
    /// Steady load on the stable fleet before the rollout starts (t0).
    pub warmup: Duration,
    pub health_check_interval: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub max_connections_per_target: usize,
    pub request_delay: Duration,
    pub app_idle_timeout: Duration,
    /// `terminationGracePeriodSeconds`.
    pub grace: Duration,
    pub request_timeout: Duration,
    pub drain_min: Duration,
    pub quiet: Duration,
    pub drain_max: Duration,
    /// More lameduck flags, after the drain settings.
    pub extra_proxy_args: Vec<String>,
}

impl CanaryScenario {
    /// The demo's canary, scaled down from production like the single-pod story: the
    /// controller lag 70 s → 5 s, health checks 15 s → 2 s, `scaleDownDelaySeconds` 60 s →
    /// 4 s; pauses (5–10 min in production) 9 s, still longer than the lag plus the quiet
    /// window, so that each step has settled before the next; 15,000 requests a minute.
    pub fn new(lameduck: bool, dynamic_stable_scale: bool) -> CanaryScenario {
        let mut s = CanaryScenario {
            label: String::new(),
            lameduck,
            dynamic_stable_scale,
            scale_down_delay: Duration::from_secs(4),
            replicas: 5,
            steps: argo::seed_steps(),
            pause: Duration::from_secs(9),
            rate: 250.0,
            lag: Duration::from_secs(5),
            warmup: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(2),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            max_connections_per_target: 128,
            request_delay: Duration::from_millis(2),
            app_idle_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(20),
            request_timeout: Duration::from_secs(10),
            drain_min: Duration::from_secs(1),
            quiet: Duration::from_secs(3),
            drain_max: Duration::from_secs(15),
            extra_proxy_args: Vec::new(),
        };
        s.label = s.default_label();
        s
    }

    /// The four runs, in order: the app alone with `dynamicStableScale` (the seed's
    /// failure), the app alone with the seed's workaround (`dynamicStableScale: false` and
    /// the scale-down delay), then both with lameduck.
    pub fn four(base: &CanaryScenario) -> Vec<CanaryScenario> {
        [(false, true), (false, false), (true, true), (true, false)]
            .into_iter()
            .map(|(lameduck, dynamic)| {
                let mut s = base.clone();
                s.lameduck = lameduck;
                s.dynamic_stable_scale = dynamic;
                s.label = s.default_label();
                s
            })
            .collect()
    }

    pub fn default_label(&self) -> String {
        format!(
            "{}, {}",
            if self.lameduck {
                "lameduck"
            } else {
                "app alone"
            },
            if self.dynamic_stable_scale {
                "dynamicStableScale"
            } else {
                "workaround"
            }
        )
    }

    /// lameduck's flags after `--listen`, `--admin` and `--upstream`.
    pub fn proxy_args(&self) -> Vec<String> {
        let mut args = drain_args(self.drain_min, self.quiet, self.drain_max);
        args.extend(self.extra_proxy_args.iter().cloned());
        args
    }

    /// The end of the window pod-seconds are counted over, after t0: every pause, the
    /// scale-down delay, the lag and a whole drain. The same for every run of a scenario
    /// whatever its settings, and every pod removed has exited by then.
    pub fn horizon(&self) -> Duration {
        let pauses = self.steps.iter().filter(|s| **s == Step::Pause).count() as u32;
        self.pause * pauses + self.scale_down_delay + self.lag + self.drain_max
    }

    fn mode(&self) -> Mode {
        if self.lameduck {
            Mode::Native
        } else {
            Mode::AppAlone
        }
    }
}

// === the fleet ===

/// A pod as the fleet knows it.
struct Member {
    group: Group,
    pod: Arc<Pod>,
    target: SocketAddr,
    created: Instant,
    ready: Instant,
    deleted: Option<Instant>,
    deregistered: Option<Instant>,
    exited: Option<Instant>,
    /// The kubelet's events for this pod (preStop, signals, exits).
    events: Arc<Recorder>,
}

/// The pods of both ReplicaSets, the kubelet's work on them, and the control plane's log.
struct Fleet {
    scn: CanaryScenario,
    members: Mutex<Vec<Member>>,
    kubelet: Mutex<JoinSet<()>>,
    log: Mutex<Vec<(Instant, String)>>,
    weights: Mutex<Vec<(Instant, u32)>>,
}

impl Fleet {
    fn log(&self, line: String) {
        self.log
            .lock()
            .expect("never poisoned")
            .push((Instant::now(), line));
    }

    /// Pods of `group` not deleted, oldest first.
    fn alive(&self, group: Group) -> Vec<usize> {
        let members = self.members.lock().expect("never poisoned");
        (0..members.len())
            .filter(|&i| members[i].group == group && members[i].deleted.is_none())
            .collect()
    }

    /// Starts a pod of `group` and waits until it is Ready.
    async fn create(&self, group: Group) -> Result<(usize, SocketAddr), String> {
        let created = Instant::now();
        let app = AppConfig {
            delay: self.scn.request_delay,
            idle_timeout: self.scn.app_idle_timeout,
        };
        let (pod, target) = pod::start(self.scn.mode(), app, &self.scn.proxy_args()).await?;
        let mut members = self.members.lock().expect("never poisoned");
        members.push(Member {
            group,
            pod,
            target,
            created,
            ready: Instant::now(),
            deleted: None,
            deregistered: None,
            exited: None,
            events: Recorder::new(),
        });
        Ok((members.len() - 1, target))
    }

    /// Deletes a pod: the kubelet starts terminating it now.
    fn delete(self: &Arc<Self>, id: usize) {
        let (pod, events) = {
            let mut members = self.members.lock().expect("never poisoned");
            let m = &mut members[id];
            m.deleted = Some(Instant::now());
            (m.pod.clone(), m.events.clone())
        };
        let me = self.clone();
        self.kubelet
            .lock()
            .expect("never poisoned")
            .spawn(async move {
                pod.terminate(me.scn.grace, &events).await;
                me.members.lock().expect("never poisoned")[id].exited = Some(Instant::now());
            });
    }

    /// Waits until every deleted pod has exited.
    async fn terminated(&self) {
        loop {
            let mut set = std::mem::take(&mut *self.kubelet.lock().expect("never poisoned"));
            if set.is_empty() {
                return;
            }
            while set.join_next().await.is_some() {}
        }
    }
}

// === the AWS Load Balancer Controller ===

/// Applies changes to the listener `lag` after each was asked for, in order.
struct LbController {
    tx: mpsc::UnboundedSender<(Instant, Change)>,
    task: JoinHandle<()>,
}

impl LbController {
    fn start(lag: Duration, listener: Arc<Listener>, fleet: Arc<Fleet>) -> LbController {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Change)>();
        let task = tokio::spawn(async move {
            while let Some((asked, change)) = rx.recv().await {
                tokio::time::sleep_until(asked + lag).await;
                match &change {
                    Change::Weight(w) => {
                        fleet.log(format!(
                            "load balancer controller: listener rule now stable {} / canary {w}",
                            100 - w
                        ));
                        fleet
                            .weights
                            .lock()
                            .expect("never poisoned")
                            .push((Instant::now(), *w));
                    }
                    Change::Register(g, id, _) => fleet.log(format!(
                        "load balancer controller: {} registered",
                        name(*g, *id)
                    )),
                    Change::Deregister(g, id) => {
                        fleet.members.lock().expect("never poisoned")[*id].deregistered =
                            Some(Instant::now());
                        fleet.log(format!(
                            "load balancer controller: {} deregistered",
                            name(*g, *id)
                        ));
                    }
                }
                listener.apply(change);
            }
        });
        LbController { tx, task }
    }

    fn ask(&self, change: Change) {
        let _ = self.tx.send((Instant::now(), change));
    }

    /// Waits until every change asked for has been applied.
    async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

fn name(group: Group, id: usize) -> String {
    match group {
        Group::Stable => format!("stable pod {id}"),
        Group::Canary => format!("canary pod {id}"),
    }
}

// === the Argo controller ===

/// Scales `group` to `n` pods: new pods are started and waited for (Ready), then
/// registered; surplus pods, newest first, are deleted and deregistered.
async fn scale(fleet: &Arc<Fleet>, lb: &LbController, group: Group, n: u32) -> Result<(), String> {
    let alive = fleet.alive(group);
    let n = n as usize;
    if alive.len() < n {
        for _ in alive.len()..n {
            let (id, addr) = fleet.create(group).await?;
            lb.ask(Change::Register(group, id, addr));
        }
        fleet.log(format!(
            "Argo: {group:?} ReplicaSet {} → {n}, Ready",
            alive.len()
        ));
    } else if alive.len() > n {
        for &id in alive[n..].iter().rev() {
            fleet.delete(id);
            lb.ask(Change::Deregister(group, id));
        }
        fleet.log(format!(
            "Argo: {group:?} ReplicaSet {} → {n}: pods deleted",
            alive.len()
        ));
    }
    Ok(())
}

async fn reconcile(
    scn: &CanaryScenario,
    status: &Status,
    fleet: &Arc<Fleet>,
    lb: &LbController,
) -> Result<(), String> {
    let (canary, stable) = argo::desired_counts(scn.replicas, scn.dynamic_stable_scale, status);
    // The canary first: Argo writes a weight only once the canary is available.
    scale(fleet, lb, Group::Canary, canary).await?;
    scale(fleet, lb, Group::Stable, stable).await
}

/// Walks the steps, then completes the rollout.
async fn argo(scn: &CanaryScenario, fleet: &Arc<Fleet>, lb: &LbController) -> Result<(), String> {
    let mut status = Status::default();
    for step in &scn.steps {
        if *step != Step::Pause {
            fleet.log(format!("Argo: {step}"));
        }
        match *step {
            // The canary follows setWeight already (the only scaling modelled).
            Step::MatchTrafficWeight => {}
            Step::SetWeight(w) => {
                status.set_weight = w.min(100);
                // Scale the canary for the new weight before writing it.
                reconcile(scn, &status, fleet, lb).await?;
                if status.written_stable_weight != 100 - status.set_weight {
                    status.written_stable_weight = 100 - status.set_weight;
                    lb.ask(Change::Weight(status.set_weight));
                    fleet.log(format!(
                        "Argo: writes stable {} / canary {} (the ALB applies it a lag later)",
                        100 - status.set_weight,
                        status.set_weight
                    ));
                }
            }
            Step::Pause => {
                tokio::time::sleep(scn.pause).await;
                continue;
            }
        }
        reconcile(scn, &status, fleet, lb).await?;
    }
    fleet.log("Argo: all steps done; the canary ReplicaSet becomes the stable one".into());
    if !fleet.alive(Group::Stable).is_empty() {
        tokio::time::sleep(scn.scale_down_delay).await;
        fleet.log(format!(
            "Argo: scaleDownDelaySeconds ({}) over",
            humantime::format_duration(scn.scale_down_delay)
        ));
        scale(fleet, lb, Group::Stable, 0).await?;
    }
    Ok(())
}

// === the run ===

/// Runs one canary: starts the stable fleet and registers it, sends steady load for
/// `warmup`, walks the steps (t0), and returns once every pod removed has exited, every
/// change has been applied and every request has been answered. Must be called inside a
/// tokio runtime.
pub async fn run(scn: &CanaryScenario, rec: Arc<Recorder>) -> Result<CanaryReport, String> {
    let fleet = Arc::new(Fleet {
        scn: scn.clone(),
        members: Mutex::new(Vec::new()),
        kubelet: Mutex::new(JoinSet::new()),
        log: Mutex::new(Vec::new()),
        weights: Mutex::new(Vec::new()),
    });
    let listener = Listener::new(
        ListenerConfig {
            rate: scn.rate,
            max_connections_per_target: scn.max_connections_per_target,
            health_check_interval: scn.health_check_interval,
            unhealthy_threshold: scn.unhealthy_threshold,
            healthy_threshold: scn.healthy_threshold,
            request_timeout: scn.request_timeout,
        },
        rec.clone(),
    );
    // The stable ReplicaSet before the rollout: Ready and registered.
    for _ in 0..scn.replicas {
        match fleet.create(Group::Stable).await {
            Ok((id, addr)) => listener.apply(Change::Register(Group::Stable, id, addr)),
            Err(e) => {
                listener.stop();
                listener.checks_done().await;
                return Err(e);
            }
        }
    }
    listener.apply(Change::Weight(0));
    let start = Instant::now();
    let t0 = start + scn.warmup;
    rec.set_t0(t0);
    fleet
        .weights
        .lock()
        .expect("never poisoned")
        .push((start, 0));
    let traffic = tokio::spawn({
        let listener = listener.clone();
        async move { listener.send_traffic(start).await }
    });
    tokio::time::sleep_until(t0).await;

    let lb = LbController::start(scn.lag, listener.clone(), fleet.clone());
    let walked = argo(scn, &fleet, &lb).await;
    lb.finish().await;
    fleet.terminated().await;
    listener.stop();
    let sent = traffic.await;
    listener.checks_done().await;
    walked?;
    sent.map_err(|e| format!("the load balancer failed: {e}"))?;
    Ok(CanaryReport::new(scn, &rec, &fleet, t0))
}

// === the report ===

/// One pod's life, in seconds since t0.
#[derive(Clone, Debug)]
pub struct PodSpan {
    pub group: Group,
    pub created: f64,
    pub ready: f64,
    pub deleted: Option<f64>,
    pub deregistered: Option<f64>,
    pub exited: Option<f64>,
    pub app_sigterm: Option<f64>,
    /// What lameduck's `/drain` answered the preStop hook.
    pub drain: Option<DrainAnswer>,
    pub hook_error: Option<String>,
}

/// The outcome of one canary run.
#[derive(Clone, Debug)]
pub struct CanaryReport {
    pub scenario: CanaryScenario,
    pub traffic: Tally,
    pub health_checks: Tally,
    /// Every exchange, in order of completion.
    pub samples: Vec<Sample>,
    pub pods: Vec<PodSpan>,
    /// The control plane's log.
    pub timeline: Vec<(f64, String)>,
    /// The canary weight in force on the ALB, from when.
    pub weights: Vec<(f64, u32)>,
    /// Pod-seconds are counted over `[0, horizon]`.
    pub horizon: f64,
}

impl CanaryReport {
    fn new(scn: &CanaryScenario, rec: &Recorder, fleet: &Fleet, t0: Instant) -> CanaryReport {
        let rel = |t: Instant| rec.rel(t);
        let samples: Vec<Sample> = rec
            .samples
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|&(kind, start, end, outcome)| Sample {
                kind,
                start: rel(start),
                end: rel(end),
                outcome,
            })
            .collect();
        let (mut traffic, mut health_checks) = (Tally::default(), Tally::default());
        for s in &samples {
            match s.kind {
                Kind::Traffic => traffic.add(s.outcome),
                Kind::HealthCheck => health_checks.add(s.outcome),
            }
        }
        let members = fleet.members.lock().expect("never poisoned");
        let pods = members
            .iter()
            .map(|m| {
                m.events.set_t0(t0);
                let events = m.events.events_from(0);
                let app_sigterm = events
                    .iter()
                    .find(|e| e.kind == EventKind::Sigterm("app"))
                    .map(|e| e.at);
                let (mut drain, mut hook_error) = (None, None);
                for e in &events {
                    if let EventKind::PreStopDone(_, answer) = &e.kind {
                        match answer {
                            Ok(a) => drain = parse_drain_answer(a),
                            Err(err) => hook_error = Some(err.clone()),
                        }
                    }
                }
                PodSpan {
                    group: m.group,
                    created: rel(m.created),
                    ready: rel(m.ready),
                    deleted: m.deleted.map(rel),
                    deregistered: m.deregistered.map(rel),
                    exited: m.exited.map(rel),
                    app_sigterm,
                    drain,
                    hook_error,
                }
            })
            .collect();
        let timeline = fleet
            .log
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|(at, line)| (rel(*at), line.clone()))
            .collect();
        let weights = fleet
            .weights
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|&(at, w)| (rel(at), w))
            .collect();
        CanaryReport {
            scenario: scn.clone(),
            traffic,
            health_checks,
            samples,
            pods,
            timeline,
            weights,
            horizon: scn.horizon().as_secs_f64(),
        }
    }

    /// Pods running (created, not yet exited) at `t`, per ReplicaSet: (stable, canary).
    pub fn pods_at(&self, t: f64) -> (usize, usize) {
        let mut counts = (0, 0);
        for p in &self.pods {
            if p.created <= t && p.exited.is_none_or(|e| e > t) {
                match p.group {
                    Group::Stable => counts.0 += 1,
                    Group::Canary => counts.1 += 1,
                }
            }
        }
        counts
    }

    /// The most pods running at once, terminating ones included.
    pub fn peak_pods(&self) -> usize {
        let mut edges: Vec<(f64, i32)> = Vec::new();
        for p in &self.pods {
            edges.push((p.created, 1));
            if let Some(e) = p.exited {
                edges.push((e, -1));
            }
        }
        // At the same moment, exits before starts.
        edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, d) in edges {
            now += d;
            peak = peak.max(now);
        }
        peak as usize
    }

    /// Pod-seconds over `[0, horizon]`: the fleet's cost of the rollout.
    pub fn pod_seconds(&self) -> f64 {
        self.pods
            .iter()
            .map(|p| {
                let from = p.created.max(0.0);
                let to = p.exited.unwrap_or(self.horizon).min(self.horizon);
                (to - from).max(0.0)
            })
            .sum()
    }

    /// The pod-seconds relative to the steady fleet (`replicas` pods) over the same window.
    pub fn fleet_ratio(&self) -> f64 {
        self.pod_seconds() / (f64::from(self.scenario.replicas) * self.horizon)
    }

    /// Of the pods removed, the earliest app SIGTERM relative to that pod's
    /// deregistration (negative: signalled while still registered).
    pub fn earliest_sigterm_after_deregistration(&self) -> Option<f64> {
        self.pods
            .iter()
            .filter_map(|p| Some(p.app_sigterm? - p.deregistered?))
            .reduce(f64::min)
    }

    /// Pods removed during the run.
    pub fn removed(&self) -> usize {
        self.pods.iter().filter(|p| p.deleted.is_some()).count()
    }

    /// Drains that ended at `--drain-max` instead of on quiet.
    pub fn drains_capped(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| p.drain.as_ref().is_some_and(|d| d.reason != "quiet"))
            .count()
    }
}
