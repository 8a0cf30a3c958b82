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

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::cadence::{self, Basis, HealthChecks, Quiet, QuietWindow, SourceInterval};
pub use crate::lifecycle::state::{
    check, now_nanos, DrainPolicy, DrainReason, DrainSettings, Failure, OpenAtEnd, Phase,
    ReadinessWhileDraining, RequestKind, Snapshot, State, Trigger, Unit, Verdict,
};
// tokio's clock, so tests can pause and advance it; the same as std's in a release build.
use tokio::time::Instant;

/// How many `--quiet-fallback` windows of traffic without a single health check before
/// [`Lifecycle::warn_if_no_health_checks`] says so: 5 min at the default 30 s (tcp mode: 65 s,
/// 11 min), some twenty health-check intervals at the defaults the fallback is sized for.
pub const UNSEEN_WARN_AFTER: u32 = 10;

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
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
    /// Load-balancer health checks recognised on the traffic port since the start.
    health_checks_seen: AtomicU64,
    /// `now_nanos() + 1` when the first application request started; 0 = none yet.
    first_traffic: AtomicU64,
    /// Woken when the first application request starts.
    first_traffic_seen: Notify,
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
    /// This process resumed a drain an earlier one began ([`Lifecycle::resume_drain`]).
    resumed: std::sync::atomic::AtomicBool,
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
            health_checks_seen: AtomicU64::new(0),
            first_traffic: AtomicU64::new(0),
            first_traffic_seen: Notify::new(),
            open_at_end: OnceLock::new(),
            streams: Default::default(),
            released: watch::channel(false).0,
            closing: CancellationToken::new(),
            cut: CancellationToken::new(),
            failure: OnceLock::new(),
            resumed: Default::default(),
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
            Quiet::Auto { fallback } => {
                let (mut window, sources) =
                    cadence::quiet_window(&obs, fallback, self.0.settings.max);
                if let Basis::Fallback { checks_missing, .. } = &mut window.basis {
                    *checks_missing = self.health_checks_missing();
                }
                (window, sources)
            }
        }
    }

    /// Load-balancer health checks recognised on the traffic port since the start.
    pub fn health_checks_seen(&self) -> u64 {
        self.0.health_checks_seen.load(Ordering::Acquire)
    }

    /// Traffic has been served and not one health check seen: whatever the cause
    /// ([`cadence::UNSEEN_CAUSES`]), `--quiet auto` has nothing to learn from.
    fn health_checks_missing(&self) -> bool {
        self.health_checks_seen() == 0 && self.0.first_traffic.load(Ordering::Acquire) != 0
    }

    /// With `--quiet auto`: once traffic has been served for [`UNSEEN_WARN_AFTER`] fallback
    /// windows without a single health check, says so once (a warning naming the likely
    /// causes), well before a drain has to use the fallback. Runs until then; spawn it.
    pub async fn warn_if_no_health_checks(self) {
        let Quiet::Auto { fallback } = self.0.settings.quiet else {
            return;
        };
        let after = fallback * UNSEEN_WARN_AFTER;
        let first = loop {
            let notified = self.0.first_traffic_seen.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.0.first_traffic.load(Ordering::Acquire) {
                0 => notified.await,
                t => break t - 1,
            }
        };
        let served = Duration::from_nanos(now_nanos().saturating_sub(first));
        tokio::time::sleep(after.saturating_sub(served)).await;
        if self.health_checks_seen() == 0 && self.phase() == Phase::Serving {
            tracing::warn!(
                served_for = ?after,
                quiet_fallback = ?fallback,
                "traffic served for {after:?} without a single load-balancer health check on \
                 the traffic port: --quiet auto cannot learn the check interval, and a drain \
                 will wait --quiet-fallback ({fallback:?}), a guess. {}; or set a fixed \
                 --quiet above the load balancer's health-check interval",
                capitalised(cadence::UNSEEN_CAUSES),
            );
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

    /// Resumes the drain an earlier process of this pod began (`--drain-record`; a sidecar
    /// restarted while its pod terminates): draining from this process's first moment, the
    /// drain's clock (drain-min, drain-max, a `--readiness-while-draining` duration) counted
    /// from `started_at`, the original start, but with at least [`resumed_floor`] of
    /// drain-max still ahead, so the restarted proxy still waits for the quiet window it
    /// has seen itself. `started_at` unknown (an unreadable record) or in the future: from
    /// now. Returns how much of the drain was counted as already spent, or `None` if a
    /// drain had started already. Must be called inside the tokio runtime.
    pub fn resume_drain(
        &self,
        started_at: Option<SystemTime>,
        trigger: Trigger,
    ) -> Option<Duration> {
        if self.phase() != Phase::Serving {
            return None;
        }
        let (window, _) = self.quiet_window();
        let why = window.why();
        let max = self.0.settings.max;
        let ago = started_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let spent = ago.min(max.saturating_sub(resumed_floor(window.window, max)));
        let now = Instant::now();
        let since = now.checked_sub(spent).unwrap_or(now);
        let spent = now - since;
        let started = self.0.state.send_if_modified(|s| {
            if *s != State::Serving {
                return false;
            }
            *s = State::Draining {
                since,
                started_at: started_at.unwrap_or_else(SystemTime::now),
                trigger,
                window,
            };
            self.0.resumed.store(true, Ordering::Release);
            self.0.phase.store(Phase::Draining as u8, Ordering::Release);
            true
        });
        if !started {
            return None;
        }
        tracing::warn!(
            trigger = ?trigger,
            started_ago = ?ago,
            counted = ?spent,
            max = ?max,
            quiet_window = %why,
            "resuming the drain an earlier process began: readiness fails; still serving \
             until traffic stops"
        );
        tokio::spawn(self.clone().run_drain_clock());
        Some(spent)
    }

    /// Whether this process resumed a drain ([`Lifecycle::resume_drain`]).
    pub fn is_resumed(&self) -> bool {
        self.0.resumed.load(Ordering::Acquire)
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
            health_checks_seen: self.health_checks_seen(),
            released: self.is_released(),
            resumed: self.is_resumed(),
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
        match kind {
            RequestKind::HealthCheck => {
                self.0.health_checks.record(source, now);
                self.0.health_checks_seen.fetch_add(1, Ordering::AcqRel);
            }
            // One load per request once traffic has been seen.
            RequestKind::Traffic if self.0.first_traffic.load(Ordering::Relaxed) == 0 => {
                if self
                    .0
                    .first_traffic
                    .compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.0.first_traffic_seen.notify_waiters();
                }
            }
            RequestKind::Traffic => {}
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
        let health_checks_seen = self.health_checks_seen();
        match reason {
            // The window was a guess: say so, in the line that is the drain's record.
            DrainReason::Quiet if window.checks_missing() => tracing::warn!(
                reason = "quiet",
                drain_seconds = took.as_secs_f64(),
                requests_during_drain,
                health_checks_during_drain,
                health_checks_seen,
                quiet_window = %why,
                "drained: no request for {idle:?}; the app may now be stopped. The quiet window \
                 was a guess, --quiet-fallback, not learned: no load-balancer health check ever \
                 reached the traffic port (quiet_window says why)",
            ),
            DrainReason::Quiet => tracing::info!(
                reason = "quiet",
                drain_seconds = took.as_secs_f64(),
                requests_during_drain,
                health_checks_during_drain,
                health_checks_seen,
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
                health_checks_seen,
                quiet_window = %why,
                "drain cut short before traffic stopped: --drain-max ({max}) reached with \
                 {in_flight} {unit} still in flight, the last started {idle:?} ago",
                max = humantime::format_duration(self.0.settings.max),
            ),
        }
    }
}

/// The least of drain-max a resumed drain keeps ahead of it: two quiet windows (one to
/// see the silence itself, having seen nothing before its start, and one for a request or
/// health check that arrives during the first), never more than drain-max.
pub fn resumed_floor(quiet: Duration, max: Duration) -> Duration {
    quiet.saturating_mul(2).min(max)
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
#[path = "drain_tests.rs"]
mod tests;
