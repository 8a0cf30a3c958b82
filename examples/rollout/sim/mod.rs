//! The rollout simulation, on 127.0.0.1: pods terminated the way the kubelet does it while
//! the load balancer is still sending. Two stories: one pod behind a load balancer
//! ([`run`]), and an Argo-like canary of a fleet behind two weighted target groups
//! ([`canary::run`]).
//!
//! The one implementation behind both `examples/rollout` (the demo) and
//! `tests/rollout.rs` (which includes this module by path): a [`Scenario`] in, a [`Report`]
//! out (a [`canary::CanaryScenario`] and a [`canary::CanaryReport`] for the canary). Times
//! in a report are seconds relative to t0, the moment the pod is deleted (the rollout
//! starts).
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | the naive app: keep-alive server, idle timeout, no SIGTERM handler |
//! | [`pod`] | containers as threads with their own runtime; lameduck in-process; the kubelet |
//! | [`alb`] | the load balancer towards one target: paced traffic over a keep-alive pool, health checks, deregistration |
//! | [`listener`] | the canary's ALB: a weighted rule over two target groups, target health |
//! | [`argo`] | Argo Rollouts' canary steps and replica counts |
//! | [`canary`] | the canary story: Argo and load balancer controllers, the fleet, its report |
//!
//! This module owns the single-pod scenario, the timeline of one run ([`Recorder`]) and
//! the outcome classes.

pub mod alb;
pub mod app;
pub mod argo;
pub mod canary;
pub mod listener;
pub mod pod;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use alb::{Alb, AlbConfig};
use app::AppConfig;

/// How the pod is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The app alone: SIGTERM at t0, no hook.
    AppAlone,
    /// The app and lameduck as a regular container: both signalled at t0; the app's preStop
    /// is `httpGet /drain` on lameduck's admin port.
    Regular,
    /// lameduck as a native sidecar (init container, `restartPolicy: Always`): SIGTERM only
    /// after the app has exited; the app's preStop as above.
    Native,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::AppAlone => "app alone",
            Mode::Regular => "lameduck, regular sidecar",
            Mode::Native => "lameduck, native sidecar",
        }
    }
}

/// One run: the pod, the load, the moments. [`Scenario::new`] gives the demo's defaults.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Shown in the table; the mode's label by default.
    pub label: String,
    pub mode: Mode,
    /// Requests per second, open-loop.
    pub rate: f64,
    /// Keep-alive connections the load balancer opens up front.
    pub connections: usize,
    /// The load balancer never holds more connections than this.
    pub max_connections: usize,
    /// Steady load before the pod is deleted (t0).
    pub warmup: Duration,
    /// Deregistration happens at t0 + lag.
    pub lag: Duration,
    /// The app's time to answer.
    pub request_delay: Duration,
    /// This share of requests (0 to 1) takes `slow_delay` instead.
    pub slow_fraction: f64,
    pub slow_delay: Duration,
    /// The app closes keep-alive connections idle this long.
    pub app_idle_timeout: Duration,
    /// `terminationGracePeriodSeconds`.
    pub grace: Duration,
    /// `None`: no health checks.
    pub health_check_interval: Option<Duration>,
    /// Addresses the health checks come from, one checker each (all loopback).
    pub health_check_sources: Vec<IpAddr>,
    /// The load balancer gives up on a request after this long.
    pub request_timeout: Duration,
    /// lameduck's flags after `--listen`, `--admin` and `--upstream` (which the simulation
    /// sets): the drain settings, and whatever a run wants to try. See
    /// [`Scenario::set_proxy_arg`].
    pub proxy_args: Vec<String>,
}

impl Scenario {
    /// The demo's scenario, scaled down from production (health checks every 15 s,
    /// deregistration after 70 s, `--quiet 20s --drain-max 120s`) by about ten.
    pub fn new(mode: Mode) -> Scenario {
        Scenario {
            label: mode.label().to_owned(),
            mode,
            rate: 200.0,
            connections: 16,
            max_connections: 512,
            warmup: Duration::from_secs(2),
            lag: Duration::from_secs(5),
            request_delay: Duration::from_millis(2),
            slow_fraction: 0.0,
            slow_delay: Duration::from_secs(2),
            app_idle_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(20),
            health_check_interval: Some(Duration::from_secs(2)),
            health_check_sources: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            request_timeout: Duration::from_secs(10),
            proxy_args: drain_args(
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(15),
            ),
        }
    }

    /// Sets a lameduck flag: replaces its value if the flag is already there (as `--flag
    /// value` or `--flag=value`), appends it otherwise. `set_proxy_arg("--quiet", "auto")`.
    pub fn set_proxy_arg(&mut self, flag: &str, value: &str) {
        let args = &mut self.proxy_args;
        let eq = format!("{flag}=");
        if let Some(i) = args.iter().position(|a| a == flag) {
            if i + 1 < args.len() {
                args[i + 1] = value.to_owned();
            } else {
                args.push(value.to_owned());
            }
        } else if let Some(a) = args.iter_mut().find(|a| a.starts_with(&eq)) {
            *a = format!("{eq}{value}");
        } else {
            args.push(flag.to_owned());
            args.push(value.to_owned());
        }
    }

    /// A lameduck flag's value, if set.
    pub fn proxy_arg(&self, flag: &str) -> Option<&str> {
        let eq = format!("{flag}=");
        let mut it = self.proxy_args.iter();
        while let Some(a) = it.next() {
            if a == flag {
                return it.next().map(String::as_str);
            }
            if let Some(v) = a.strip_prefix(&eq) {
                return Some(v);
            }
        }
        None
    }
}

/// `--drain-min MIN --quiet QUIET --drain-max MAX`.
pub fn drain_args(min: Duration, quiet: Duration, max: Duration) -> Vec<String> {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    vec![
        "--drain-min".into(),
        d(min),
        "--quiet".into(),
        d(quiet),
        "--drain-max".into(),
        d(max),
    ]
}

// === outcomes ===

/// How one exchange ended, as the load balancer saw it. Every class but `Ok` reaches the
/// user as an error: the ALB answers a reset, an EOF or a refused connection with 502, a
/// timeout with 504.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx response, read in full.
    Ok,
    /// Any other status (lameduck's 502/504 when the app failed it).
    Status(u16),
    /// The connection was reset or closed before a full response.
    Reset,
    /// Connection refused: nothing listens any more.
    Refused,
    /// No full response within the request timeout.
    Timeout,
}

/// Traffic or a health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Traffic,
    HealthCheck,
}

/// One exchange. Times in seconds since t0.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub kind: Kind,
    pub start: f64,
    pub end: f64,
    pub outcome: Outcome,
}

/// Outcomes counted by class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub total: u64,
    pub ok: u64,
    /// Non-2xx responses, by status code.
    pub status: BTreeMap<u16, u64>,
    pub reset: u64,
    pub refused: u64,
    pub timeout: u64,
}

impl Tally {
    pub fn add(&mut self, o: Outcome) {
        self.total += 1;
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Status(s) => *self.status.entry(s).or_default() += 1,
            Outcome::Reset => self.reset += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Timeout => self.timeout += 1,
        }
    }

    /// Everything that was not a full 2xx answer.
    pub fn errors(&self) -> u64 {
        self.total - self.ok
    }

    pub fn error_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.errors() as f64 / self.total as f64
        }
    }
}

// === the timeline ===

/// Something that happened to the pod or the load balancer.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// t0: the pod is deleted, the kubelet starts terminating it.
    Deleted,
    /// The load balancer stops sending new requests and health checks.
    Deregistered,
    /// Every request sent has been answered (or has failed).
    AllAnswered,
    /// A container's preStop hook starts.
    PreStop(&'static str),
    /// The hook ended: `Ok("200 {…}")` with its answer, or why it failed.
    PreStopDone(&'static str, Result<String, String>),
    Sigterm(&'static str),
    Sigkill(&'static str),
    /// A container's process exited, with this code.
    Exited(&'static str, i32),
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Deleted => f.write_str("pod deleted: the kubelet starts terminating it"),
            EventKind::Deregistered => {
                f.write_str("load balancer deregisters the pod: no new requests")
            }
            EventKind::AllAnswered => f.write_str("every request sent has completed"),
            EventKind::PreStop(c) => write!(f, "{c}: preStop httpGet /drain"),
            EventKind::PreStopDone(c, Ok(answer)) => match parse_drain_answer(answer) {
                Some(d) => {
                    write!(
                        f,
                        "{c}: preStop answered: drained ({}) after {:.1}s, {} requests served while draining",
                        d.reason, d.seconds, d.requests_during_drain
                    )?;
                    match &d.window_why {
                        Some(why) => write!(f, "; quiet window {why}"),
                        None => Ok(()),
                    }
                }
                None => write!(f, "{c}: preStop answered {answer}"),
            },
            EventKind::PreStopDone(c, Err(e)) => write!(f, "{c}: preStop failed: {e}"),
            EventKind::Sigterm(c) => write!(f, "{c}: SIGTERM"),
            EventKind::Sigkill(c) => write!(f, "{c}: SIGKILL"),
            EventKind::Exited(c, code) => write!(f, "{c}: exited ({code})"),
        }
    }
}

/// An event, at seconds since t0.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub at: f64,
    pub kind: EventKind,
}

/// Counters to watch a run live; read with [`Recorder::live`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Live {
    /// Seconds since t0, once the load has started.
    pub at: Option<f64>,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub health_checks: u64,
    pub health_check_errors: u64,
}

/// Records one run: events, every exchange, live counters. Shared by every part.
#[derive(Default)]
pub struct Recorder {
    t0: OnceLock<Instant>,
    events: Mutex<Vec<(Instant, EventKind)>>,
    samples: Mutex<Vec<(Kind, Instant, Instant, Outcome)>>,
    sent: AtomicU64,
    answered: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    health_checks: AtomicU64,
    health_check_errors: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    fn set_t0(&self, t0: Instant) {
        let _ = self.t0.set(t0);
    }

    /// Seconds from t0 to `t` (negative before t0).
    fn rel(&self, t: Instant) -> f64 {
        let t0 = *self
            .t0
            .get()
            .expect("t0 is set before anything is recorded");
        if t >= t0 {
            (t - t0).as_secs_f64()
        } else {
            -(t0 - t).as_secs_f64()
        }
    }

    pub fn event(&self, kind: EventKind) {
        self.event_at(Instant::now(), kind);
    }

    pub fn event_at(&self, at: Instant, kind: EventKind) {
        self.events.lock().expect("never poisoned").push((at, kind));
    }

    /// Events so far, from the `from`-th on.
    pub fn events_from(&self, from: usize) -> Vec<Event> {
        let events = self.events.lock().expect("never poisoned");
        events
            .iter()
            .skip(from)
            .map(|(at, kind)| Event {
                at: self.rel(*at),
                kind: kind.clone(),
            })
            .collect()
    }

    fn started(&self, kind: Kind) {
        match kind {
            Kind::Traffic => self.sent.fetch_add(1, Ordering::Relaxed),
            Kind::HealthCheck => self.health_checks.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn finished(&self, kind: Kind, started: Instant, outcome: Outcome) {
        let ok = outcome == Outcome::Ok;
        match (kind, ok) {
            (Kind::Traffic, true) => self.ok.fetch_add(1, Ordering::Relaxed),
            (Kind::Traffic, false) => self.errors.fetch_add(1, Ordering::Relaxed),
            (Kind::HealthCheck, true) => 0,
            (Kind::HealthCheck, false) => self.health_check_errors.fetch_add(1, Ordering::Relaxed),
        };
        if kind == Kind::Traffic {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        self.samples
            .lock()
            .expect("never poisoned")
            .push((kind, started, Instant::now(), outcome));
    }

    /// The counters now.
    pub fn live(&self) -> Live {
        let sent = self.sent.load(Ordering::Relaxed);
        Live {
            at: self.t0.get().map(|_| self.rel(Instant::now())),
            sent,
            ok: self.ok.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: sent.saturating_sub(self.answered.load(Ordering::Relaxed)),
            health_checks: self.health_checks.load(Ordering::Relaxed),
            health_check_errors: self.health_check_errors.load(Ordering::Relaxed),
        }
    }
}

// === the report ===

/// What lameduck's `/drain` answered the preStop hook.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainAnswer {
    /// `quiet` or `max`.
    pub reason: String,
    pub seconds: f64,
    pub requests_during_drain: u64,
    /// The quiet window the drain used, in seconds, and how it was chosen (`fixed`,
    /// `learned` with `--quiet auto`, or `fallback`); lameduck's explanation of it.
    pub window: Option<(f64, String)>,
    pub window_why: Option<String>,
    /// The whole JSON, for fields a later lameduck adds.
    pub json: serde_json::Value,
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub scenario: Scenario,
    pub traffic: Tally,
    pub health_checks: Tally,
    /// Every exchange, in order of completion.
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    /// Seconds since t0 (the scenario's lag).
    pub deregistered: f64,
    pub app_sigterm: Option<f64>,
    pub app_exit: Option<f64>,
    pub sidecar_exit: Option<(f64, i32)>,
    /// The preStop hook's answer, when it got one.
    pub drain: Option<DrainAnswer>,
    /// The hook's failure, if it failed.
    pub hook_error: Option<String>,
    /// Load balancer connections open at the busiest moment, and opened in all.
    pub peak_connections: usize,
    pub connections_opened: u64,
}

impl Report {
    /// When the app got SIGTERM, in seconds after deregistration (negative: before).
    pub fn app_sigterm_after_deregistration(&self) -> Option<f64> {
        self.app_sigterm.map(|t| t - self.deregistered)
    }

    /// The first event matching `f`.
    pub fn first(&self, f: impl Fn(&EventKind) -> bool) -> Option<f64> {
        self.events.iter().find(|e| f(&e.kind)).map(|e| e.at)
    }

    fn new(scenario: &Scenario, rec: &Recorder, alb: &Alb) -> Report {
        let events = rec.events_from(0);
        let samples: Vec<Sample> = rec
            .samples
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|&(kind, start, end, outcome)| Sample {
                kind,
                start: rec.rel(start),
                end: rec.rel(end),
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
        let (mut drain, mut hook_error) = (None, None);
        for e in &events {
            if let EventKind::PreStopDone(_, answer) = &e.kind {
                match answer {
                    Ok(a) => drain = parse_drain_answer(a),
                    Err(err) => hook_error = Some(err.clone()),
                }
            }
        }
        let (peak_connections, connections_opened) = alb.connection_counts();
        let mut report = Report {
            scenario: scenario.clone(),
            traffic,
            health_checks,
            samples,
            events,
            deregistered: scenario.lag.as_secs_f64(),
            app_sigterm: None,
            app_exit: None,
            sidecar_exit: None,
            drain,
            hook_error,
            peak_connections,
            connections_opened,
        };
        report.app_sigterm = report.first(|k| *k == EventKind::Sigterm("app"));
        report.app_exit = report.first(|k| matches!(k, EventKind::Exited("app", _)));
        report.sidecar_exit = report.events.iter().find_map(|e| match e.kind {
            EventKind::Exited("lameduck", code) => Some((e.at, code)),
            _ => None,
        });
        if let Some(d) = report.first(|k| *k == EventKind::Deregistered) {
            report.deregistered = d;
        }
        report
    }
}

/// `"200 {json}"` → the drain answer.
fn parse_drain_answer(answer: &str) -> Option<DrainAnswer> {
    let json: serde_json::Value = serde_json::from_str(answer.split_once(' ')?.1).ok()?;
    Some(DrainAnswer {
        reason: json["reason"].as_str()?.to_owned(),
        seconds: json["drain_seconds"].as_f64()?,
        requests_during_drain: json["requests_during_drain"].as_u64().unwrap_or(0),
        window: json["quiet_window_seconds"]
            .as_f64()
            .zip(json["quiet_window"].as_str().map(str::to_owned)),
        window_why: json["quiet_window_why"].as_str().map(str::to_owned),
        json,
    })
}

// === the run ===

/// Runs one scenario: starts the pod and waits until it is Ready, opens the load
/// balancer's connections, sends steady load for `warmup`, deletes the pod (t0),
/// deregisters it at t0 + lag, and returns once every request has been answered and every
/// container has exited. Must be called inside a tokio runtime (multi-threaded or not: the
/// containers have their own).
pub async fn run(scn: &Scenario, rec: Arc<Recorder>) -> Result<Report, String> {
    let app = AppConfig {
        delay: scn.request_delay,
        idle_timeout: scn.app_idle_timeout,
    };
    let (pod, target) = pod::start(scn.mode, app, &scn.proxy_args).await?;
    let alb = Alb::new(
        AlbConfig {
            target,
            rate: scn.rate,
            connections: scn.connections,
            max_connections: scn.max_connections,
            slow_fraction: scn.slow_fraction,
            slow_delay: scn.slow_delay,
            health_check_interval: scn.health_check_interval,
            health_check_sources: scn.health_check_sources.clone(),
            request_timeout: scn.request_timeout,
        },
        rec.clone(),
    );
    alb.warm_up().await?;

    let start = Instant::now();
    let t0 = start + scn.warmup;
    let deregistration = t0 + scn.lag;
    rec.set_t0(t0);
    let traffic = tokio::spawn({
        let alb = alb.clone();
        async move { alb.send_traffic(start, deregistration).await }
    });
    let checks = tokio::spawn({
        let alb = alb.clone();
        async move { alb.health_checks(start, deregistration).await }
    });

    tokio::time::sleep_until(t0).await;
    rec.event(EventKind::Deleted);
    let kubelet = tokio::spawn({
        let (pod, rec, grace) = (pod.clone(), rec.clone(), scn.grace);
        async move { pod.terminate(grace, &rec).await }
    });
    tokio::time::sleep_until(deregistration).await;
    rec.event(EventKind::Deregistered);

    let (t, c) = tokio::join!(traffic, checks);
    t.map_err(|e| format!("the load balancer failed: {e}"))?;
    c.map_err(|e| format!("the health checker failed: {e}"))?;
    rec.event(EventKind::AllAnswered);
    kubelet
        .await
        .map_err(|e| format!("the kubelet failed: {e}"))?;
    Ok(Report::new(scn, &rec, &alb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_args_are_replaced_or_added() {
        let mut s = Scenario::new(Mode::Native);
        assert_eq!(s.proxy_arg("--quiet"), Some("3s"));
        s.set_proxy_arg("--quiet", "auto");
        assert_eq!(s.proxy_arg("--quiet"), Some("auto"));
        s.set_proxy_arg("--quiet-fallback", "3s");
        s.proxy_args.push("--health-path=/healthz".into());
        s.set_proxy_arg("--health-path", "/ping");
        assert_eq!(
            s.proxy_args,
            [
                "--drain-min",
                "1s",
                "--quiet",
                "auto",
                "--drain-max",
                "15s",
                "--quiet-fallback",
                "3s",
                "--health-path=/ping"
            ]
        );
    }

    #[test]
    fn drain_answer_is_parsed() {
        let a = parse_drain_answer(
            r#"200 {"state":"drained","reason":"quiet","drain_seconds":8.2,"requests_during_drain":912}"#,
        )
        .unwrap();
        assert_eq!(a.reason, "quiet");
        assert_eq!(a.seconds, 8.2);
        assert_eq!(a.requests_during_drain, 912);
        assert_eq!(a.window, None);
        let a = parse_drain_answer(
            r#"200 {"reason":"quiet","drain_seconds":8.2,"quiet_window_seconds":4.25,"quiet_window":"learned"}"#,
        )
        .unwrap();
        assert_eq!(a.window, Some((4.25, "learned".to_owned())));
        assert_eq!(parse_drain_answer("503 draining"), None);
    }
}
