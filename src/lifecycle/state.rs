//! The lifecycle's values and the drain decision, with no behaviour of their own: the
//! `State` every part observes (and its `Phase`), what started and ended a drain, the
//! settings, and the pure, clock-free [`check`]. [`super::drain::Lifecycle`] is what moves
//! the state; these are what it moves.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;
// tokio's clock, so tests can pause and advance it; the same as std's in a release build.
use tokio::time::Instant;

use crate::lifecycle::cadence::{Quiet, QuietWindow, SourceInterval};

/// Nanoseconds on the process's monotonic clock. Stored in atomics so the hot path never locks.
pub fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Where in its life the proxy is; the `phase` label of the request metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Serving = 0,
    Draining = 1,
    Drained = 2,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Serving, Phase::Draining, Phase::Drained];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Drained,
        }
    }
}

/// What started the drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// SIGTERM or SIGINT.
    Signal,
    /// `GET|POST /drain` on the admin port (the app container's preStop hook).
    Admin,
}

/// Why the drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainReason {
    /// Traffic stopped: nothing started for the quiet window and nothing in flight.
    Quiet,
    /// The hard cap (`--drain-max`) was reached, or a second signal cut the drain short.
    Max,
}

impl DrainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::Quiet => "quiet",
            DrainReason::Max => "max",
        }
    }
}

/// The lifecycle value. Only [`Lifecycle`] changes it; everything else observes it.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Serving,
    Draining {
        since: Instant,
        started_at: SystemTime,
        trigger: Trigger,
        /// The quiet window this drain uses, fixed when it started.
        window: QuietWindow,
    },
    Drained {
        since: Instant,
        started_at: SystemTime,
        trigger: Trigger,
        window: QuietWindow,
        reason: DrainReason,
        took: Duration,
        /// Application requests (not health checks) that started during the drain.
        requests_during_drain: u64,
        health_checks_during_drain: u64,
    },
}

/// What was still open when the drain ended ([`Lifecycle::open_at_end`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenAtEnd {
    /// Requests (TCP mode: connections) still in flight.
    pub open: usize,
    /// How long the oldest of them had been open, for those whose start is tracked
    /// ([`Lifecycle::stream`]: TCP connections).
    pub oldest: Option<Duration>,
}

/// Why the proxy cannot serve any more, whatever the lifecycle says (readiness fails).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure(pub String);

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Serving => Phase::Serving,
            State::Draining { .. } => Phase::Draining,
            State::Drained { .. } => Phase::Drained,
        }
    }

    pub fn is_drained(&self) -> bool {
        matches!(self, State::Drained { .. })
    }
}

/// `--readiness-while-draining`: what `/readyz` answers while the pod drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadinessWhileDraining {
    /// 503 from the drain's first moment (the default).
    Fail,
    /// 200 until the drain is over.
    Keep,
    /// 200 for this long after the drain starts (or until it is over), then 503.
    For(Duration),
}

impl ReadinessWhileDraining {
    /// Whether `/readyz` still answers 200 `elapsed` into a drain that is not over yet.
    pub fn ready(self, elapsed: Duration) -> bool {
        match self {
            ReadinessWhileDraining::Fail => false,
            ReadinessWhileDraining::Keep => true,
            ReadinessWhileDraining::For(d) => elapsed < d,
        }
    }
}

/// The drain settings from the command line. Validated by the CLI: `min <= max`, a fixed
/// quiet or the fallback `<= max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainSettings {
    pub min: Duration,
    pub quiet: Quiet,
    pub max: Duration,
    /// How long upgraded tunnels (WebSockets) may stay open after the drain before the
    /// release goes ahead without them (`--tunnel-grace`), within drain-max.
    pub tunnel_grace: Duration,
    /// What one unit in flight is, for the log lines: a request, or (`--mode tcp`) a
    /// connection.
    pub unit: Unit,
}

/// What the in-flight count counts: HTTP requests, or whole TCP connections (`--mode tcp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unit {
    #[default]
    Request,
    Connection,
}

impl Unit {
    /// `"request(s)"` or `"connection(s)"`.
    pub fn plural(self) -> &'static str {
        match self {
            Unit::Request => "request(s)",
            Unit::Connection => "connection(s)",
        }
    }
}

impl DrainSettings {
    /// Settings with a fixed quiet window.
    pub fn fixed(min: Duration, quiet: Duration, max: Duration) -> DrainSettings {
        DrainSettings {
            min,
            quiet: Quiet::Fixed(quiet),
            max,
            tunnel_grace: Duration::ZERO,
            unit: Unit::Request,
        }
    }
}

/// How long one drain lasts: the settings with the quiet window resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Keep serving at least this long once draining starts.
    pub min: Duration,
    /// Drained once no request has started for this long (and nothing is in flight).
    pub quiet: Duration,
    /// Hard cap on draining.
    pub max: Duration,
}

/// The drain decision for one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drained(DrainReason),
    /// Nothing can change the verdict for this long unless a request starts or ends.
    Wait(Duration),
}

/// The drain decision, pure and clock-free.
///
/// `elapsed` is the time since draining started, `idle` the time since the last request
/// started on the traffic port, `in_flight` the requests (and tunnels) not yet finished.
pub fn check(policy: &DrainPolicy, elapsed: Duration, idle: Duration, in_flight: usize) -> Verdict {
    if elapsed >= policy.max {
        return Verdict::Drained(DrainReason::Max);
    }
    if elapsed >= policy.min && idle >= policy.quiet && in_flight == 0 {
        return Verdict::Drained(DrainReason::Quiet);
    }
    let until_max = policy.max - elapsed;
    if in_flight > 0 {
        // Woken early when the last request finishes.
        return Verdict::Wait(until_max);
    }
    let until_quiet = policy
        .min
        .saturating_sub(elapsed)
        .max(policy.quiet.saturating_sub(idle));
    Verdict::Wait(until_quiet.min(until_max))
}

/// A point-in-time view for `/status` and the metrics.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub in_flight: usize,
    pub connections: usize,
    /// Upgraded tunnels (WebSockets) open.
    pub tunnels: usize,
    pub since_last_request: Option<Duration>,
    pub requests_during_drain: u64,
    pub health_checks_during_drain: u64,
    /// Application requests that started after the drain had ended.
    pub requests_after_drained: u64,
    /// Load-balancer health checks recognised on the traffic port since the start.
    pub health_checks_seen: u64,
    /// The app may be stopped (see [`Lifecycle::released`]).
    pub released: bool,
    /// This process resumed a drain an earlier one began (`--drain-record`).
    pub resumed: bool,
    /// The quiet window in force: the drain's own once draining, else what a drain
    /// starting now would use.
    pub window: QuietWindow,
    pub health_check_sources: Vec<SourceInterval>,
}

/// What kind of request started: application traffic or a load-balancer health check.
/// Both count as "traffic still arriving"; only traffic counts as a request saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Traffic,
    HealthCheck,
}
