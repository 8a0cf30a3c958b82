//! The pod's lifecycle: the one `State` every other part observes.
//!
//! `Serving → Draining → Drained`, never backwards. A signal or the admin `/drain` endpoint
//! starts a drain ([`Lifecycle::start_drain`]); from then on readiness fails, but the traffic
//! port keeps accepting and serving. The drain ends when [`check`] says so: the load balancer
//! has gone quiet (no request started for `quiet`, nothing in flight, at least `min` elapsed),
//! or the hard cap `max` is reached.
//!
//! This module also owns the counters that decision reads (requests in flight, open
//! connections, when the last request started) and the RAII guards that keep them right
//! whatever happens to a request: completion, error, or a client that disconnects; and the
//! record of the load balancer's health checks from which `--quiet auto` learns its window
//! (see [`crate::lifecycle::cadence`]). The window is fixed when the drain starts: from then on the
//! checks are expected to stop, and their silence is what the drain waits for.
//!
//! **Release.** `Drained` says traffic has stopped; it does not say the app may go: a request
//! whose head completed just as the drain clock decided, or a late one, may still be inside
//! the app. [`Lifecycle::released`] is the one future that says the app may be stopped:
//! `Drained` *and* nothing in flight (requests whose response has not been read from the app
//! in full, and upgraded tunnels), or drain-max reached. The admin `/drain` answer (which lets
//! the kubelet signal the app) and the process's exit both await exactly it.
//!
//! **Exit.** The same handle carries the two steps of the ordered shutdown that follows the
//! release, observed by the listener, every connection and the upstream pool:
//! [`Lifecycle::close`] (stop accepting, close every connection gracefully) and
//! [`Lifecycle::cut`] (drain-max is over: end whatever is still open, cleanly).

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::cadence::{self, HealthChecks, Quiet, QuietWindow, SourceInterval};
// tokio's clock, so tests can pause and advance it; the same as std's in a release build.
use tokio::time::Instant;

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

    fn from_u8(v: u8) -> Phase {
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
    /// The app may be stopped (see [`Lifecycle::released`]).
    pub released: bool,
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

/// Cheap, cloneable handle on the lifecycle.
#[derive(Clone)]
pub struct Lifecycle(Arc<Inner>);

struct Inner {
    state: watch::Sender<State>,
    /// Mirror of `state.phase()`, written only inside `state`'s modify closures, so the hot
    /// path reads the phase with one atomic load instead of the watch's lock.
    phase: AtomicU8,
    settings: DrainSettings,
    health_checks: HealthChecks,
    /// Requests (and TCP connections, and connections not yet told apart) in flight.
    in_flight: Count,
    /// Open downstream connections, lingering closes included.
    connections: Count,
    /// Open upgraded tunnels.
    tunnels: Count,
    /// `now_nanos() + 1` when the last request started; 0 = none yet.
    last_request: AtomicU64,
    requests_during_drain: AtomicU64,
    health_checks_during_drain: AtomicU64,
    requests_after_drained: AtomicU64,
    /// Set once, when the drain ends.
    open_at_end: OnceLock<OpenAtEnd>,
    /// Start times (`now_nanos()`) of the [`Lifecycle::stream`] guards alive, with counts.
    streams: std::sync::Mutex<std::collections::BTreeMap<u64, u32>>,
    /// Set once, when the app may be stopped.
    released: watch::Sender<bool>,
    /// Exit step 1: stop accepting, close every connection gracefully.
    closing: CancellationToken,
    /// Exit step 2: drain-max is over; end what is still open.
    cut: CancellationToken,
    failure: OnceLock<Failure>,
    /// Runs once between the drain decision and its effect: tests use it to start a
    /// request at exactly that instant.
    #[cfg(test)]
    decide_hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

// === impl Lifecycle ===

impl Lifecycle {
    pub fn new(settings: DrainSettings) -> Self {
        let (state, _) = watch::channel(State::Serving);
        Lifecycle(Arc::new(Inner {
            state,
            phase: AtomicU8::new(Phase::Serving as u8),
            settings,
            health_checks: HealthChecks::default(),
            in_flight: Count::default(),
            connections: Count::default(),
            tunnels: Count::default(),
            last_request: AtomicU64::new(0),
            requests_during_drain: AtomicU64::new(0),
            health_checks_during_drain: AtomicU64::new(0),
            requests_after_drained: AtomicU64::new(0),
            open_at_end: OnceLock::new(),
            streams: Default::default(),
            released: watch::channel(false).0,
            closing: CancellationToken::new(),
            cut: CancellationToken::new(),
            failure: OnceLock::new(),
            #[cfg(test)]
            decide_hook: Default::default(),
        }))
    }

    pub fn settings(&self) -> &DrainSettings {
        &self.0.settings
    }

    /// The quiet window a drain starting now would use, and what is known of each
    /// health-check source.
    pub fn quiet_window(&self) -> (QuietWindow, Vec<SourceInterval>) {
        let obs = self.0.health_checks.observe(now_nanos());
        match self.0.settings.quiet {
            Quiet::Fixed(d) => {
                let (_, sources) = cadence::quiet_window(&obs, d, self.0.settings.max);
                (QuietWindow::fixed(d), sources)
            }
            Quiet::Auto { fallback } => cadence::quiet_window(&obs, fallback, self.0.settings.max),
        }
    }

    fn policy_for(&self, window: &QuietWindow) -> DrainPolicy {
        DrainPolicy {
            min: self.0.settings.min,
            quiet: window.window,
            max: self.0.settings.max,
        }
    }

    pub fn state(&self) -> State {
        self.0.state.borrow().clone()
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Acquire))
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.0.state.subscribe()
    }

    pub fn in_flight(&self) -> usize {
        self.0.in_flight.get()
    }

    /// Starts draining. Idempotent: returns `true` only for the call that started it.
    /// Must be called inside the tokio runtime (it spawns the drain clock).
    pub fn start_drain(&self, trigger: Trigger) -> bool {
        if self.phase() != Phase::Serving {
            return false;
        }
        let (window, _) = self.quiet_window();
        let why = window.why();
        let started = self.0.state.send_if_modified(|s| {
            if *s != State::Serving {
                return false;
            }
            *s = State::Draining {
                since: Instant::now(),
                started_at: SystemTime::now(),
                trigger,
                window,
            };
            self.0.phase.store(Phase::Draining as u8, Ordering::Release);
            true
        });
        if started {
            tracing::info!(
                trigger = ?trigger,
                min = ?self.0.settings.min,
                max = ?self.0.settings.max,
                quiet_window = %why,
                in_flight = self.in_flight(),
                "draining: readiness now fails; still serving until traffic stops"
            );
            tokio::spawn(self.clone().run_drain_clock());
        }
        started
    }

    /// Ends a drain at once, as if `--drain-max` had been reached (a second signal), and
    /// releases the app at once.
    pub fn cut_short(&self) {
        if self.phase() == Phase::Serving {
            self.start_drain(Trigger::Signal);
        }
        self.finish(DrainReason::Max);
        self.set_released();
    }

    /// Resolves with the `Drained` state once the app may be stopped: the drain is over and
    /// nothing is in flight, or drain-max has been reached. Set once; never unset.
    ///
    /// Drain-max is enforced here too, by every awaiter, not only by the drain clock's task:
    /// if that task died (a panic) the release still comes at drain-max, so the kubelet's
    /// preStop and the exit never wait past it.
    pub async fn released(&self) -> State {
        let mut released = self.0.released.subscribe();
        let mut state = self.subscribe();
        loop {
            let deadline = match &*state.borrow_and_update() {
                State::Serving => None,
                State::Draining { since, .. } | State::Drained { since, .. } => {
                    Some(*since + self.0.settings.max)
                }
            };
            tokio::select! {
                r = async { released.wait_for(|r| *r).await.map(|_| ()) } => {
                    r.expect("the lifecycle owns the sender for as long as a handle exists");
                    return self.state();
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    // The clock's own deadline is the same instant: let it act first.
                    tokio::task::yield_now().await;
                    if !self.is_released() {
                        if self.phase() == Phase::Draining {
                            tracing::error!(
                                "the drain clock did not decide by drain-max; releasing the app \
                                 at drain-max"
                            );
                        }
                        self.finish(DrainReason::Max);
                        self.set_released();
                    }
                    return self.state();
                }
                changed = state.changed(), if deadline.is_none() => {
                    changed.expect("the lifecycle owns the sender for as long as a handle exists");
                }
            }
        }
    }

    pub fn is_released(&self) -> bool {
        *self.0.released.borrow()
    }

    #[cfg(test)]
    pub(crate) fn on_decide(&self, hook: impl FnOnce() + Send + 'static) {
        *self.0.decide_hook.lock().expect("not poisoned") = Some(Box::new(hook));
    }

    fn set_released(&self) {
        self.0
            .released
            .send_if_modified(|r| !std::mem::replace(r, true));
    }

    /// Exit step 1: the listener stops accepting and drops its socket; every connection is
    /// closed gracefully (HTTP/1 after its current response, HTTP/2 by GOAWAY).
    pub fn close(&self) {
        if !self.0.closing.is_cancelled() {
            self.0.closing.cancel();
            // Wakes every connection's watch of the state: each checks `is_closing`.
            self.0.state.send_modify(|_| {});
        }
    }

    pub fn is_closing(&self) -> bool {
        self.0.closing.is_cancelled()
    }

    pub fn closing_token(&self) -> CancellationToken {
        self.0.closing.clone()
    }

    /// Exit step 2: drain-max is over. Connections to the app and upgraded tunnels are
    /// ended, so every response still open ends now: a gRPC one with `grpc-status: 14`
    /// trailers, another HTTP/2 one with `RST_STREAM(CANCEL)`. Implies [`Lifecycle::close`].
    pub fn cut(&self) {
        self.close();
        self.0.cut.cancel();
    }

    pub fn is_cut(&self) -> bool {
        self.0.cut.is_cancelled()
    }

    pub fn cut_token(&self) -> CancellationToken {
        self.0.cut.clone()
    }

    /// Records that the proxy cannot serve (its listener died): readiness fails from now on.
    /// The first failure recorded is kept.
    pub fn fail(&self, why: impl Into<String>) {
        let _ = self.0.failure.set(Failure(why.into()));
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.0.failure.get()
    }

    pub fn connections(&self) -> usize {
        self.0.connections.get()
    }

    /// Resolves once no downstream connection is open (lingering closes included).
    pub async fn no_connections(&self) {
        self.0.connections.zero().await
    }

    /// Resolves with the `Drained` state once the drain is over.
    pub async fn drained(&self) -> State {
        let mut rx = self.subscribe();
        let state = rx
            .wait_for(State::is_drained)
            .await
            .expect("the lifecycle owns the sender for as long as a handle exists");
        state.clone()
    }

    /// Resolves once nothing is in flight.
    pub async fn idle(&self) {
        self.0.in_flight.zero().await
    }

    pub fn snapshot(&self) -> Snapshot {
        let last = self.0.last_request.load(Ordering::Acquire);
        let state = self.state();
        let (current, health_check_sources) = self.quiet_window();
        let window = match &state {
            State::Serving => current,
            State::Draining { window, .. } | State::Drained { window, .. } => window.clone(),
        };
        Snapshot {
            state,
            in_flight: self.in_flight(),
            connections: self.0.connections.get(),
            tunnels: self.tunnels(),
            since_last_request: (last != 0)
                .then(|| Duration::from_nanos(now_nanos().saturating_sub(last - 1))),
            requests_during_drain: self.0.requests_during_drain.load(Ordering::Acquire),
            health_checks_during_drain: self.0.health_checks_during_drain.load(Ordering::Acquire),
            requests_after_drained: self.0.requests_after_drained.load(Ordering::Acquire),
            released: self.is_released(),
            window,
            health_check_sources,
        }
    }

    /// Counts a request that has started on the traffic port; a health check is also
    /// recorded against its source address. Hold the guard until the response (body
    /// included) is finished or abandoned.
    pub fn request(&self, kind: RequestKind, source: std::net::IpAddr) -> RequestGuard {
        let now = now_nanos();
        self.0.in_flight.up();
        self.0.last_request.store(now + 1, Ordering::Release);
        let phase = self.phase();
        if kind == RequestKind::HealthCheck {
            self.0.health_checks.record(source, now);
        }
        if phase != Phase::Serving {
            // Counted by the phase the request started in: a drain's report stops counting
            // when the drain ends, and late requests have their own count.
            match (phase, kind) {
                (Phase::Draining, RequestKind::Traffic) => Some(&self.0.requests_during_drain),
                (Phase::Draining, RequestKind::HealthCheck) => {
                    Some(&self.0.health_checks_during_drain)
                }
                (_, RequestKind::Traffic) => Some(&self.0.requests_after_drained),
                (_, RequestKind::HealthCheck) => None,
            }
            .map(|c| c.fetch_add(1, Ordering::Relaxed));
        }
        RequestGuard {
            lifecycle: self.clone(),
            phase,
            kind,
            started: now,
            stream: false,
        }
    }

    /// An upgraded tunnel (WebSocket) that outlives its HTTP exchange. Counted apart from
    /// requests: it does not hold the quiet decision (a long-lived tunnel would make every
    /// drain run to drain-max); after the drain the release waits for tunnels only for
    /// `--tunnel-grace`.
    pub fn tunnel(&self) -> TunnelGuard {
        self.0.tunnels.up();
        TunnelGuard(self.clone())
    }

    pub fn tunnels(&self) -> usize {
        self.0.tunnels.get()
    }

    async fn no_tunnels(&self) {
        self.0.tunnels.zero().await
    }

    /// A request that is a whole connection (TCP mode): counted like [`Lifecycle::request`]
    /// (`Traffic`), and its start is remembered while it lasts, so a drain that ends with
    /// it still open reports how long the oldest has been open.
    pub fn stream(&self, source: std::net::IpAddr) -> RequestGuard {
        let mut guard = self.request(RequestKind::Traffic, source);
        *self
            .0
            .streams
            .lock()
            .expect("not poisoned")
            .entry(guard.started)
            .or_default() += 1;
        guard.stream = true;
        guard
    }

    fn end_stream(&self, started: u64) {
        let mut streams = self.0.streams.lock().expect("not poisoned");
        if let std::collections::btree_map::Entry::Occupied(mut e) = streams.entry(started) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// What was still open when the drain ended; `None` until it has.
    pub fn open_at_end(&self) -> Option<OpenAtEnd> {
        self.0.open_at_end.get().copied()
    }

    /// How long the oldest open [`Lifecycle::stream`] has been open.
    pub fn oldest_stream(&self) -> Option<Duration> {
        let first = *self.0.streams.lock().expect("not poisoned").keys().next()?;
        Some(Duration::from_nanos(now_nanos().saturating_sub(first)))
    }

    /// A connection not yet told apart (TCP mode: traffic or a health check?): holds off
    /// the end of the drain like a request in flight, without counting as one.
    pub fn pending(&self) -> PendingGuard {
        self.0.in_flight.up();
        PendingGuard(self.clone())
    }

    /// Counts an open downstream connection.
    pub fn connection(&self) -> ConnectionGuard {
        self.0.connections.up();
        ConnectionGuard(self.clone())
    }

    fn release(&self) {
        self.0.in_flight.down();
    }

    fn idle_for(&self, now: u64) -> Duration {
        let last = self.0.last_request.load(Ordering::Acquire);
        // No request ever: idle since the process started.
        Duration::from_nanos(now.saturating_sub(last.saturating_sub(1)))
    }

    /// The drain clock: sleeps until the next moment the verdict could change, or until the
    /// last in-flight request ends, and ends the drain when [`check`] says so.
    async fn run_drain_clock(self) {
        let (since, policy) = match &*self.0.state.borrow() {
            State::Draining { since, window, .. } => (*since, self.policy_for(window)),
            _ => return,
        };
        loop {
            // Registered before the count is read: a last request ending in between wakes it.
            let notified = self.0.in_flight.zeroed();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.phase() != Phase::Draining {
                return; // cut short
            }
            let in_flight = self.in_flight();
            let verdict = check(
                &policy,
                since.elapsed(),
                self.idle_for(now_nanos()),
                in_flight,
            );
            match verdict {
                Verdict::Drained(reason) => {
                    #[cfg(test)]
                    if let Some(hook) = self.0.decide_hook.lock().expect("not poisoned").take() {
                        hook();
                    }
                    self.finish(reason);
                    self.release_when_idle(since, reason).await;
                    return;
                }
                // Nothing in flight: a request that starts only pushes the deadline later,
                // and one that ends cannot bring it earlier, so sleeping until the deadline
                // and re-checking is enough (no wake-up per request while draining).
                Verdict::Wait(d) if in_flight == 0 => tokio::time::sleep(d).await,
                // Requests in flight: the last one ending may end the drain at once.
                Verdict::Wait(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = &mut notified => {}
                    }
                }
            }
        }
    }

    /// After a quiet drain, requests may still be in flight (one whose head completed as the
    /// clock decided, a late one): the release waits for them, until drain-max.
    async fn release_when_idle(&self, since: Instant, reason: DrainReason) {
        if reason == DrainReason::Quiet {
            let deadline = since + self.0.settings.max;
            if tokio::time::timeout_at(deadline, self.idle())
                .await
                .is_err()
            {
                let unit = self.0.settings.unit.plural();
                tracing::warn!(
                    in_flight = self.in_flight(),
                    "{unit} that started after traffic went quiet still in flight at \
                     drain-max; releasing the app anyway"
                );
            }
            if self.tunnels() > 0 {
                let grace = (Instant::now() + self.0.settings.tunnel_grace).min(deadline);
                if tokio::time::timeout_at(grace, self.no_tunnels())
                    .await
                    .is_err()
                {
                    let n = self.tunnels();
                    tracing::warn!(
                        tunnels = n,
                        tunnel_grace = ?self.0.settings.tunnel_grace,
                        "{n} WebSocket/upgraded tunnel(s) still open after --tunnel-grace; \
                         releasing the app, the tunnels close at exit"
                    );
                }
            }
        }
        self.set_released();
    }

    fn finish(&self, reason: DrainReason) {
        let requests_during_drain = self.0.requests_during_drain.load(Ordering::Acquire);
        let health_checks_during_drain = self.0.health_checks_during_drain.load(Ordering::Acquire);
        let at_end = OpenAtEnd {
            open: self.in_flight(),
            oldest: self.oldest_stream(),
        };
        let oldest_open = at_end.oldest;
        let mut done = None;
        self.0.state.send_if_modified(|s| {
            let State::Draining {
                since,
                started_at,
                trigger,
                window,
            } = s.clone()
            else {
                return false;
            };
            let took = since.elapsed();
            done = Some((took, window.clone()));
            *s = State::Drained {
                since,
                started_at,
                trigger,
                window,
                reason,
                took,
                requests_during_drain,
                health_checks_during_drain,
            };
            // Before the state is published: whoever sees `Drained` sees this too.
            let _ = self.0.open_at_end.set(at_end);
            self.0.phase.store(Phase::Drained as u8, Ordering::Release);
            true
        });
        let Some((took, window)) = done else { return };
        let why = window.why();
        let in_flight = self.in_flight();
        let connections = self.0.connections.get();
        let idle = self.idle_for(now_nanos());
        let unit = self.0.settings.unit.plural();
        match reason {
            DrainReason::Quiet => tracing::info!(
                reason = "quiet",
                drain_seconds = took.as_secs_f64(),
                requests_during_drain,
                health_checks_during_drain,
                quiet_window = %why,
                "drained: no request for {idle:?}; the app may now be stopped",
            ),
            DrainReason::Max => tracing::warn!(
                reason = "max",
                drain_seconds = took.as_secs_f64(),
                requests_during_drain,
                health_checks_during_drain,
                in_flight,
                connections,
                oldest_open_seconds = oldest_open.map(|d| d.as_secs_f64()),
                last_request_ago = ?idle,
                quiet_window = %why,
                "drain cut short before traffic stopped: {in_flight} {unit} still in flight, \
                 the last started {idle:?} ago",
            ),
        }
    }
}

/// One request in flight. Dropping it ends the request.
pub struct RequestGuard {
    lifecycle: Lifecycle,
    phase: Phase,
    kind: RequestKind,
    started: u64,
    /// Made by [`Lifecycle::stream`]: its start is in `streams`.
    stream: bool,
}

impl RequestGuard {
    /// The phase the request started in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn kind(&self) -> RequestKind {
        self.kind
    }

    /// Time since the request started.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(now_nanos().saturating_sub(self.started))
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.stream {
            self.lifecycle.end_stream(self.started);
        }
        self.lifecycle.release();
    }
}

// === impl Count ===

/// A count of things open (requests in flight, connections, tunnels) that can be awaited
/// down to zero: the one "wait until a counter is 0" of the lifecycle.
#[derive(Default)]
struct Count {
    n: AtomicUsize,
    /// Woken each time `n` drops to zero.
    zero: Notify,
}

impl Count {
    fn get(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    fn up(&self) {
        self.n.fetch_add(1, Ordering::AcqRel);
    }

    fn down(&self) {
        if self.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.zero.notify_waiters();
        }
    }

    /// Woken the next time the count drops to zero (enable it before reading the count).
    fn zeroed(&self) -> tokio::sync::futures::Notified<'_> {
        self.zero.notified()
    }

    /// Resolves once the count is zero.
    async fn zero(&self) {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open upgraded tunnel.
pub struct TunnelGuard(Lifecycle);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0 .0.tunnels.down();
    }
}

/// A connection not yet told apart ([`Lifecycle::pending`]).
pub struct PendingGuard(Lifecycle);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// One open downstream connection.
pub struct ConnectionGuard(Lifecycle);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0 .0.connections.down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn policy() -> DrainPolicy {
        DrainPolicy {
            min: S(5),
            quiet: S(10),
            max: S(60),
        }
    }

    #[test]
    fn check_table() {
        use DrainReason::*;
        use Verdict::*;
        let p = policy();
        // (elapsed, idle, in_flight) -> verdict
        let cases = [
            // Just started, traffic still arriving: wait for the quiet window.
            ((0, 0, 0), Wait(S(10))),
            // Quiet long ago, but drain-min not reached yet.
            ((1, 100, 0), Wait(S(4))),
            // drain-min reached and quiet: drained.
            ((5, 10, 0), Drained(Quiet)),
            ((30, 12, 0), Drained(Quiet)),
            // Quiet but a request still in flight: wait (woken when it ends).
            ((30, 20, 1), Wait(S(30))),
            // Requests keep arriving: never quiet, capped by max.
            ((59, 0, 0), Wait(S(1))),
            ((60, 0, 0), Drained(Max)),
            ((61, 0, 3), Drained(Max)),
            // Quiet remaining beyond the cap: wake at the cap.
            ((55, 0, 0), Wait(S(5))),
        ];
        for ((e, i, f), want) in cases {
            assert_eq!(
                check(&p, S(e), S(i), f),
                want,
                "elapsed={e} idle={i} in_flight={f}"
            );
        }
    }

    #[test]
    fn zero_policy_drains_at_once() {
        let p = DrainPolicy {
            min: Duration::ZERO,
            quiet: Duration::ZERO,
            max: S(1),
        };
        assert_eq!(
            check(&p, Duration::ZERO, Duration::ZERO, 0),
            Verdict::Drained(DrainReason::Quiet)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_quiet_and_is_idempotent() {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::from_millis(100),
            Duration::from_millis(500),
            S(10),
        ));
        assert!(lc.start_drain(Trigger::Admin));
        assert!(!lc.start_drain(Trigger::Signal));
        assert_eq!(lc.phase(), Phase::Draining);
        let State::Drained { reason, .. } = lc.drained().await else {
            unreachable!()
        };
        assert_eq!(reason, DrainReason::Quiet);
        assert_eq!(lc.phase(), Phase::Drained);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_request_holds_until_max() {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::ZERO,
            Duration::from_millis(100),
            S(2),
        ));
        let guard = lc.request(RequestKind::Traffic, LOCAL);
        lc.start_drain(Trigger::Signal);
        let State::Drained { reason, took, .. } = lc.drained().await else {
            unreachable!()
        };
        assert_eq!(reason, DrainReason::Max);
        assert!(took >= S(2));
        assert_eq!(lc.in_flight(), 1);
        drop(guard);
        lc.idle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn request_end_wakes_the_clock() {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::ZERO,
            Duration::ZERO,
            S(3600),
        ));
        let guard = lc.request(RequestKind::Traffic, LOCAL);
        lc.start_drain(Trigger::Admin);
        tokio::time::sleep(S(1)).await;
        assert_eq!(lc.phase(), Phase::Draining);
        let during = lc.request(RequestKind::Traffic, LOCAL);
        assert_eq!(during.phase(), Phase::Draining);
        drop(during);
        drop(lc.request(RequestKind::HealthCheck, LOCAL));
        drop(guard);
        let State::Drained {
            reason,
            requests_during_drain,
            health_checks_during_drain,
            ..
        } = lc.drained().await
        else {
            unreachable!()
        };
        assert_eq!(reason, DrainReason::Quiet);
        // Health checks are not requests saved: they have their own count.
        assert_eq!((requests_during_drain, health_checks_during_drain), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn release_waits_for_a_request_that_started_as_the_drain_decided() {
        let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(30)));
        let slot = Arc::new(std::sync::Mutex::new(None));
        let (lc2, slot2) = (lc.clone(), slot.clone());
        lc.on_decide(move || {
            *slot2.lock().unwrap() = Some(lc2.request(RequestKind::Traffic, LOCAL));
        });
        lc.start_drain(Trigger::Admin);
        let State::Drained { reason, .. } = lc.drained().await else {
            unreachable!()
        };
        assert_eq!(reason, DrainReason::Quiet);
        tokio::time::sleep(S(5)).await;
        assert!(!lc.is_released(), "released with a request in flight");
        let released = tokio::spawn({
            let lc = lc.clone();
            async move { lc.released().await }
        });
        tokio::time::sleep(S(1)).await;
        assert!(!released.is_finished());
        drop(slot.lock().unwrap().take());
        assert!(released.await.unwrap().is_drained());
        assert!(lc.is_released());
    }

    #[tokio::test(start_paused = true)]
    async fn release_is_bounded_by_drain_max() {
        let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
        let (lc2, slot) = (lc.clone(), Arc::new(std::sync::Mutex::new(None)));
        let slot2 = slot.clone();
        lc.on_decide(move || {
            *slot2.lock().unwrap() = Some(lc2.request(RequestKind::Traffic, LOCAL));
        });
        let t = Instant::now();
        lc.start_drain(Trigger::Signal);
        lc.released().await;
        assert!(t.elapsed() >= S(10), "{:?}", t.elapsed());
        assert_eq!(lc.in_flight(), 1);
    }

    #[test]
    fn readiness_while_draining() {
        use ReadinessWhileDraining::*;
        let s = Duration::from_secs;
        for (policy, elapsed, want) in [
            (Fail, s(0), false),
            (Keep, s(0), true),
            (Keep, s(3600), true),
            (For(s(6)), s(0), true),
            (For(s(6)), s(5), true),
            (For(s(6)), s(6), false),
            (For(Duration::ZERO), s(0), false),
        ] {
            assert_eq!(policy.ready(elapsed), want, "{policy:?} at {elapsed:?}");
        }
    }

    /// Whatever happens to the drain clock's task, the release comes at drain-max. Before: a
    /// panic in that task (a log write failing) left `released()` pending for ever.
    #[tokio::test(start_paused = true)]
    async fn drain_max_holds_when_the_drain_clock_dies() {
        let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
        lc.on_decide(|| panic!("the drain clock dies"));
        let t = Instant::now();
        lc.start_drain(Trigger::Admin);
        let state = tokio::time::timeout(S(60), lc.released())
            .await
            .expect("released by drain-max although the clock died");
        assert_eq!(t.elapsed(), S(10));
        assert!(lc.is_released());
        let State::Drained { reason, .. } = state else {
            panic!("not drained: {state:?}")
        };
        assert_eq!(reason, DrainReason::Max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ended_at_max_reports_the_streams_still_open() {
        let lc = Lifecycle::new(DrainSettings::fixed(Duration::ZERO, S(1), S(10)));
        let old = lc.stream(LOCAL);
        tokio::time::sleep(S(3)).await;
        let young = lc.stream(LOCAL);
        drop(lc.stream(LOCAL));
        lc.start_drain(Trigger::Signal);
        let State::Drained { reason, .. } = lc.drained().await else {
            unreachable!()
        };
        assert_eq!(reason, DrainReason::Max);
        assert_eq!(
            lc.open_at_end(),
            Some(OpenAtEnd {
                open: 2,
                oldest: Some(S(13))
            })
        );
        drop(old);
        assert_eq!(lc.oldest_stream(), Some(S(10)));
        drop(young);
        assert_eq!(lc.oldest_stream(), None);
        lc.idle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn cut_short_ends_a_drain() {
        let p = policy();
        let lc = Lifecycle::new(DrainSettings::fixed(p.min, p.quiet, p.max));
        lc.start_drain(Trigger::Signal);
        lc.cut_short();
        assert!(lc.state().is_drained());
    }

    #[tokio::test(start_paused = true)]
    async fn auto_quiet_window_is_fixed_when_the_drain_starts() {
        let lc = Lifecycle::new(DrainSettings {
            min: Duration::ZERO,
            quiet: Quiet::Auto { fallback: S(30) },
            max: S(120),
            tunnel_grace: Duration::ZERO,
            unit: Unit::Request,
        });
        // No checks yet: the fallback.
        assert_eq!(lc.quiet_window().0.kind(), "fallback");
        // Checks every second from two sources.
        let base = now_nanos();
        for (i, src) in [[10, 0, 0, 1], [10, 0, 0, 2]].into_iter().enumerate() {
            for n in 0..6u64 {
                lc.0.health_checks
                    .record(src.into(), base + n * 1_000_000_000 + i as u64);
            }
        }
        let (w, sources) = lc.quiet_window();
        assert_eq!(w.kind(), "learned", "{}", w.why());
        assert_eq!(w.window, Duration::from_millis(1750));
        assert_eq!(sources.len(), 2);
        lc.start_drain(Trigger::Admin);
        let State::Draining { window, .. } = lc.state() else {
            unreachable!()
        };
        assert_eq!(window, w);
    }
}
