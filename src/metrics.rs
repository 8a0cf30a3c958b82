//! Prometheus metrics: one registry per proxy (no globals, so parallel tests don't share
//! counters).
//!
//! Request metrics are recorded by the proxy as each response finishes. The lifecycle
//! figures (`lameduck_state`, `lameduck_in_flight_requests`, `lameduck_connections_active`,
//! `lameduck_drain_duration_seconds`, `lameduck_drains_total`) are read from the [`Lifecycle`]
//! at scrape time, so they cannot disagree with it.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `lameduck_requests_total` | counter | `code`, `phase` |
//! | `lameduck_request_duration_seconds` | histogram | `phase` |
//! | `lameduck_in_flight_requests` | gauge | |
//! | `lameduck_connections_active` | gauge | |
//! | `lameduck_tunnels_active` | gauge | |
//! | `lameduck_connections_total` | counter | |
//! | `lameduck_upstream_errors_total` | counter | `kind` |
//! | `lameduck_client_errors_total` | counter | `kind` |
//! | `lameduck_connections_refused_total` | counter | |
//! | `lameduck_upstream_retries_total` | counter | |
//! | `lameduck_state` | gauge: 0 serving, 1 draining, 2 drained | |
//! | `lameduck_drain_duration_seconds` | gauge | |
//! | `lameduck_drains_total` | counter | `reason` |
//! | `lameduck_health_checks_total` | counter | `phase` |
//! | `lameduck_health_check_sources` | gauge | |
//! | `lameduck_health_check_interval_seconds` | gauge | `source` |
//! | `lameduck_quiet_window_seconds` | gauge | |
//! | `lameduck_health_checks_missing` | gauge: 1 when `--quiet auto` served traffic and never saw a health check | |
//! | `lameduck_build_info` | gauge, always 1 | `version` |
//! | `lameduck_mode_info` | gauge, always 1 | `mode` |
//! | `lameduck_log_lines_dropped_total` | counter | |
//! | `lameduck_drain_resumed_total` | counter | |
//! | `lameduck_drain_record_errors_total` | counter | `op` |
//! | `lameduck_tcp_connections_total` | counter | `kind`, `phase` |
//! | `lameduck_tcp_connection_duration_seconds` | histogram | `phase` |
//! | `lameduck_tcp_bytes_total` | counter | `direction` |
//! | `lameduck_tcp_connection_ends_total` | counter | `reason` |
//! | `lameduck_proxy_protocol_errors_total` | counter | `kind` |
//!
//! In `--mode tcp` the shared families mean: `lameduck_connections_total` every accepted
//! connection, `lameduck_health_checks_total` the TCP health checks recognised,
//! `lameduck_in_flight_requests` the open traffic connections, `lameduck_upstream_errors_total`
//! the failed connects to the app (`connect`, `timeout`). The `lameduck_tcp_*` families
//! appear only in tcp mode.
//!
//! Health checks are counted apart from requests: `lameduck_requests_total{phase="draining"}`
//! is the number of application requests the drain saved.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::lifecycle::drain::{DrainReason, Lifecycle, Phase, RequestKind, State};

/// Request latency buckets, in seconds: from sub-millisecond proxy hops to the ALB's 60 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Handles for everything the proxy records.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// `requests` for the common status codes ([`common_code`]), by `Phase as usize`,
    /// resolved on first use: no label hashing and lock per request, and a code appears in
    /// the exposition only once it has been answered, as with `with_label_values`.
    common: [[OnceLock<IntCounter>; COMMON_CODES.len()]; 3],
    /// Indexed by `Phase as usize`.
    durations: [Histogram; 3],
    upstream_errors: IntCounterVec,
    /// Indexed by `Phase as usize`.
    health_checks: [IntCounter; 3],
    client_errors: IntCounterVec,
    pub upstream_retries: IntCounter,
    pub connections_total: IntCounter,
    pub connections_refused: IntCounter,
    /// 1 once this process resumed a drain from `--drain-record`.
    pub drain_resumed: IntCounter,
    drain_record_errors: IntCounterVec,
    mode: IntGaugeVec,
    /// The `--mode tcp` families.
    pub tcp: TcpMetrics,
}

/// Connection durations, in seconds: from a health check's milliseconds to hour-long
/// streams (the NLB keeps an active flow forever; its idle timeout is 350 s).
const TCP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Why a TCP connection ended: the `reason` label of `lameduck_tcp_connection_ends_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEnd {
    /// Both sides closed (half-closes passed on).
    Closed,
    /// Recognised as a health check: closed without a byte.
    HealthCheck,
    /// A read or write failed (a reset).
    Error,
    /// No byte either way for `--idle-timeout`.
    Idle,
    /// Still open at drain-max: ended by the exit.
    Cut,
    /// The app could not be reached (see `lameduck_upstream_errors_total`).
    Upstream,
    /// A missing or malformed PROXY protocol header.
    ProxyProtocol,
}

impl TcpEnd {
    pub const ALL: [TcpEnd; 7] = [
        TcpEnd::Closed,
        TcpEnd::HealthCheck,
        TcpEnd::Error,
        TcpEnd::Idle,
        TcpEnd::Cut,
        TcpEnd::Upstream,
        TcpEnd::ProxyProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpEnd::Closed => "closed",
            TcpEnd::HealthCheck => "health_check",
            TcpEnd::Error => "error",
            TcpEnd::Idle => "idle",
            TcpEnd::Cut => "cut",
            TcpEnd::Upstream => "upstream",
            TcpEnd::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// Handles for `--mode tcp`.
pub struct TcpMetrics {
    connections: IntCounterVec,
    durations: HistogramVec,
    bytes: IntCounterVec,
    ends: IntCounterVec,
    proxy_protocol_errors: IntCounterVec,
}

impl TcpMetrics {
    fn new() -> TcpMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        TcpMetrics {
            connections: counter(
                "lameduck_tcp_connections_total",
                "TCP connections by what they were (traffic, or a health check: no byte, closed at once) and the lifecycle phase they started in.",
                &["kind", "phase"],
            ),
            durations: HistogramVec::new(
                HistogramOpts::new(
                    "lameduck_tcp_connection_duration_seconds",
                    "How long each TCP traffic connection stayed open, by the phase it started in.",
                )
                .buckets(TCP_DURATION_BUCKETS.to_vec()),
                &["phase"],
            )
            .expect("valid metric"),
            bytes: counter(
                "lameduck_tcp_bytes_total",
                "Bytes forwarded in TCP mode, by direction (to_app, to_client).",
                &["direction"],
            ),
            ends: counter(
                "lameduck_tcp_connection_ends_total",
                "TCP connections ended, by reason (closed, health_check, error, idle, cut, upstream, proxy_protocol).",
                &["reason"],
            ),
            proxy_protocol_errors: counter(
                "lameduck_proxy_protocol_errors_total",
                "Connections closed because their PROXY protocol v2 header was missing or malformed, by kind.",
                &["kind"],
            ),
        }
    }

    fn collectors(&self) -> [Box<dyn Collector>; 5] {
        [
            Box::new(self.connections.clone()),
            Box::new(self.durations.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.ends.clone()),
            Box::new(self.proxy_protocol_errors.clone()),
        ]
    }

    /// Creates every label value, so the families appear (at 0) before the first sample.
    fn init(&self) {
        for p in Phase::ALL {
            for k in ["traffic", "health_check"] {
                self.connections.with_label_values(&[k, p.as_str()]);
            }
            self.durations.with_label_values(&[p.as_str()]);
        }
        for d in ["to_app", "to_client"] {
            self.bytes.with_label_values(&[d]);
        }
        for e in TcpEnd::ALL {
            self.ends.with_label_values(&[e.as_str()]);
        }
        for k in PROXY_PROTOCOL_ERROR_KINDS
            .iter()
            .chain(&["timeout", "truncated"])
        {
            self.proxy_protocol_errors.with_label_values(&[k]);
        }
    }

    /// A connection classified (`kind`: `traffic` or `health_check`) in `phase`.
    pub fn connection(&self, kind: RequestKind, phase: Phase) {
        let k = match kind {
            RequestKind::Traffic => "traffic",
            RequestKind::HealthCheck => "health_check",
        };
        self.connections
            .with_label_values(&[k, phase.as_str()])
            .inc();
    }

    pub fn duration(&self, phase: Phase, took: Duration) {
        self.durations
            .with_label_values(&[phase.as_str()])
            .observe(took.as_secs_f64());
    }

    /// A counter handle for one direction (`to_app`, `to_client`), to add to per chunk.
    pub fn bytes(&self, direction: &str) -> IntCounter {
        self.bytes.with_label_values(&[direction])
    }

    pub fn end(&self, end: TcpEnd) {
        self.ends.with_label_values(&[end.as_str()]).inc();
    }

    pub fn proxy_protocol_error(&self, kind: &str) {
        self.proxy_protocol_errors.with_label_values(&[kind]).inc();
    }
}

impl Metrics {
    pub fn new(lifecycle: Lifecycle) -> Metrics {
        let registry = Registry::new();
        let requests = counter_vec("lameduck_requests_total", "Requests answered on the traffic port, by status code and lifecycle phase at the request's start.", &["code", "phase"]);
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "lameduck_request_duration_seconds",
                "Time from request start to the end of the response body, by lifecycle phase.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid metric");
        let upstream_errors = counter_vec(
            "lameduck_upstream_errors_total",
            "Failures talking to the app, by kind (connect, timeout, reset, protocol, body).",
            &["kind"],
        );
        let client_errors = counter_vec("lameduck_client_errors_total", "Requests and connections ended for the client's own fault, by kind (request_body, request_body_timeout, header_read_timeout, tls_handshake, tls_handshake_timeout).", &["kind"]);
        let connections_refused = counter(
            "lameduck_connections_refused_total",
            "Downstream connections closed on arrival because --max-connections were open.",
        );
        let upstream_retries = counter(
            "lameduck_upstream_retries_total",
            "Requests retried once on a fresh upstream connection after a reused one failed.",
        );
        let connections_total = counter(
            "lameduck_connections_total",
            "Downstream connections accepted on the traffic port.",
        );
        let drain_resumed = counter(
            "lameduck_drain_resumed_total",
            "1 when this process started in the middle of a drain an earlier one began (found in --drain-record: a restart while the pod terminates).",
        );
        let drain_record_errors = counter_vec(
            "lameduck_drain_record_errors_total",
            "Failures of the drain record (--drain-record), by op: write (the drain went on unrecorded), remove (a restart will drain again), read (a record found unreadable, taken as a drain in progress).",
            &["op"],
        );
        for op in DRAIN_RECORD_OPS {
            drain_record_errors.with_label_values(&[op]);
        }
        let health_checks = counter_vec("lameduck_health_checks_total", "Load-balancer health checks seen on the traffic port (--health-path or --health-check-agents), by lifecycle phase.", &["phase"]);
        let build_info = IntGaugeVec::new(
            Opts::new(
                "lameduck_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let mode = IntGaugeVec::new(
            Opts::new(
                "lameduck_mode_info",
                "Always 1; the mode label says what the traffic port speaks (--mode).",
            ),
            &["mode"],
        )
        .expect("valid metric");
        mode.with_label_values(&["http"]).set(1);
        let tcp = TcpMetrics::new();

        for c in [
            Box::new(requests.clone()) as Box<dyn Collector>,
            Box::new(duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(client_errors.clone()),
            Box::new(connections_refused.clone()),
            Box::new(health_checks.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(connections_total.clone()),
            Box::new(drain_resumed.clone()),
            Box::new(drain_record_errors.clone()),
            Box::new(build_info),
            Box::new(mode.clone()),
            Box::new(LifecycleCollector::new(lifecycle)),
        ]
        .into_iter()
        .chain(tcp.collectors())
        {
            registry.register(c).expect("metric names are unique");
        }
        let durations = Phase::ALL.map(|p| duration.with_label_values(&[p.as_str()]));
        let health_checks = Phase::ALL.map(|p| health_checks.with_label_values(&[p.as_str()]));
        Metrics {
            registry,
            requests,
            common: Default::default(),
            durations,
            upstream_errors,
            health_checks,
            client_errors,
            upstream_retries,
            connections_total,
            connections_refused,
            drain_resumed,
            drain_record_errors,
            mode,
            tcp,
        }
    }

    /// Says which `--mode` runs (`http` or `tcp`); in tcp mode the `lameduck_tcp_*`
    /// families appear at once, at 0.
    pub fn set_mode(&self, mode: &str) {
        self.mode.reset();
        self.mode.with_label_values(&[mode]).set(1);
        if mode == "tcp" {
            self.tcp.init();
        }
    }

    /// A load-balancer health check recognised at layer 4 (`--mode tcp`).
    pub fn record_health_check(&self, phase: Phase) {
        self.health_checks[phase as usize].inc();
        self.tcp.connection(RequestKind::HealthCheck, phase);
    }

    /// Records a finished (or abandoned) request.
    pub fn record_request(&self, status: u16, phase: Phase, kind: RequestKind, took: Duration) {
        if kind == RequestKind::HealthCheck {
            self.health_checks[phase as usize].inc();
            return;
        }
        let counter = |status| {
            let mut buf = itoa_buf();
            let code = fmt_code(status, &mut buf);
            self.requests.with_label_values(&[code, phase.as_str()])
        };
        match common_code(status) {
            Some(i) => self.common[phase as usize][i]
                .get_or_init(|| counter(status))
                .inc(),
            None => counter(status).inc(),
        }
        self.durations[phase as usize].observe(took.as_secs_f64());
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    pub fn client_error(&self, kind: &str) {
        self.client_errors.with_label_values(&[kind]).inc();
    }

    /// A drain record operation failed (`op`: one of [`DRAIN_RECORD_OPS`]).
    pub fn drain_record_error(&self, op: &str) {
        self.drain_record_errors.with_label_values(&[op]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

/// The `op` labels of `lameduck_drain_record_errors_total`.
pub const DRAIN_RECORD_OPS: [&str; 3] = ["write", "remove", "read"];

/// The `kind` labels of `lameduck_proxy_protocol_errors_total` for a malformed header (what
/// `traffic::proxy_protocol::Error::kind` returns; its tests check the two agree), besides
/// `timeout` and `truncated`.
pub const PROXY_PROTOCOL_ERROR_KINDS: [&str; 7] = [
    "v1",
    "signature",
    "version",
    "command",
    "family",
    "length",
    "tlv",
];

/// A counter; the name and help are literals of this file, so they are valid.
fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

/// A counter family with `labels`.
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// Status codes whose request counters are resolved once ([`Metrics::common`]).
const COMMON_CODES: [u16; 15] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 499, 500, 502, 503, 504,
];

fn common_code(status: u16) -> Option<usize> {
    COMMON_CODES.iter().position(|&c| c == status)
}

fn itoa_buf() -> [u8; 3] {
    [b'0'; 3]
}

/// Formats a status code (always three digits) without allocating.
fn fmt_code(status: u16, buf: &mut [u8; 3]) -> &str {
    let s = status.min(999);
    buf[0] = b'0' + (s / 100) as u8;
    buf[1] = b'0' + (s / 10 % 10) as u8;
    buf[2] = b'0' + (s % 10) as u8;
    std::str::from_utf8(buf).expect("ASCII digits")
}

// === impl LifecycleCollector ===

/// Reads the lifecycle's own counters at scrape time.
struct LifecycleCollector {
    lifecycle: Lifecycle,
    state: prometheus::IntGauge,
    in_flight: prometheus::IntGauge,
    connections: prometheus::IntGauge,
    tunnels: prometheus::IntGauge,
    drain_duration: prometheus::Gauge,
    /// Indexed by `DrainReason as usize`: 1 for the reason this process's drain ended with.
    drains_vec: IntCounterVec,
    drains: [IntCounter; 2],
    sources: prometheus::IntGauge,
    intervals: prometheus::GaugeVec,
    window: prometheus::Gauge,
    /// 1 when the quiet window is the fallback because no health check ever came.
    checks_missing: prometheus::IntGauge,
    /// Mirrors [`crate::logging::dropped`], process-wide.
    log_dropped: IntCounter,
    descs: Vec<Desc>,
}

impl LifecycleCollector {
    fn new(lifecycle: Lifecycle) -> Self {
        let state = prometheus::IntGauge::new(
            "lameduck_state",
            "Lifecycle state: 0 serving, 1 draining, 2 drained.",
        )
        .expect("valid metric");
        let in_flight = prometheus::IntGauge::new(
            "lameduck_in_flight_requests",
            "Requests on the traffic port not yet finished (tunnels: lameduck_tunnels_active).",
        )
        .expect("valid metric");
        let connections = prometheus::IntGauge::new(
            "lameduck_connections_active",
            "Open downstream connections on the traffic port.",
        )
        .expect("valid metric");
        let tunnels = prometheus::IntGauge::new(
            "lameduck_tunnels_active",
            "Upgraded tunnels (WebSockets) open on the traffic port.",
        )
        .expect("valid metric");
        let drain_duration = prometheus::Gauge::new(
            "lameduck_drain_duration_seconds",
            "How long the drain has lasted so far (draining) or took (drained); 0 while serving.",
        )
        .expect("valid metric");
        // A process drains at most once, so each series goes 0 -> 1; both reasons are
        // exported from the start, so `increase()` sees the step.
        let drains_vec = IntCounterVec::new(
            Opts::new(
                "lameduck_drains_total",
                "Drains that ended, by reason: quiet (traffic stopped) or max (cut at --drain-max, or by a second signal).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let drains = [DrainReason::Quiet, DrainReason::Max]
            .map(|r| drains_vec.with_label_values(&[r.as_str()]));
        let sources = prometheus::IntGauge::new(
            "lameduck_health_check_sources",
            "Load-balancer nodes (source addresses) currently health-checking this target.",
        )
        .expect("valid metric");
        let intervals = prometheus::GaugeVec::new(
            Opts::new(
                "lameduck_health_check_interval_seconds",
                "Learned health-check interval of each source address still checking.",
            ),
            &["source"],
        )
        .expect("valid metric");
        let window = prometheus::Gauge::new(
            "lameduck_quiet_window_seconds",
            "The quiet window: of the current drain, or what a drain starting now would use.",
        )
        .expect("valid metric");
        let checks_missing = prometheus::IntGauge::new(
            "lameduck_health_checks_missing",
            "1 when --quiet auto has served traffic without ever seeing a load-balancer health check on the traffic port: the quiet window is --quiet-fallback, a guess (instance targets, healthcheck-port elsewhere, an unknown User-Agent).",
        )
        .expect("valid metric");
        let log_dropped = IntCounter::new(
            "lameduck_log_lines_dropped_total",
            "Log lines lost because stderr was blocked (queue full) or failed; the proxy never waits on its log.",
        )
        .expect("valid metric");
        let descs = [
            log_dropped.desc(),
            state.desc(),
            in_flight.desc(),
            connections.desc(),
            tunnels.desc(),
            drain_duration.desc(),
            drains_vec.desc(),
            sources.desc(),
            intervals.desc(),
            window.desc(),
            checks_missing.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        LifecycleCollector {
            lifecycle,
            state,
            in_flight,
            connections,
            tunnels,
            drain_duration,
            drains_vec,
            drains,
            sources,
            intervals,
            window,
            checks_missing,
            log_dropped,
            descs,
        }
    }
}

impl Collector for LifecycleCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.lifecycle.snapshot();
        self.state.set(snap.state.phase() as i64);
        self.in_flight.set(snap.in_flight as i64);
        self.connections.set(snap.connections as i64);
        self.tunnels.set(snap.tunnels as i64);
        self.drain_duration.set(match snap.state {
            State::Serving => 0.0,
            State::Draining { since, .. } => since.elapsed().as_secs_f64(),
            State::Drained { took, .. } => took.as_secs_f64(),
        });
        for (i, c) in self.drains.iter().enumerate() {
            c.reset();
            if matches!(snap.state, State::Drained { reason, .. } if reason as usize == i) {
                c.inc();
            }
        }
        self.window.set(snap.window.window.as_secs_f64());
        self.checks_missing
            .set(i64::from(snap.window.checks_missing()));
        self.intervals.reset();
        let mut active = 0;
        for s in snap.health_check_sources.iter().filter(|s| s.active) {
            active += 1;
            if let Some(t) = s.interval_seconds {
                self.intervals
                    .with_label_values(&[&s.address.to_string()])
                    .set(t.as_secs_f64());
            }
        }
        self.sources.set(active);
        let dropped = crate::logging::dropped();
        if let Some(more) = dropped.checked_sub(self.log_dropped.get()) {
            self.log_dropped.inc_by(more);
        }
        [
            self.log_dropped.collect(),
            self.state.collect(),
            self.in_flight.collect(),
            self.connections.collect(),
            self.tunnels.collect(),
            self.drain_duration.collect(),
            self.drains_vec.collect(),
            self.sources.collect(),
            self.intervals.collect(),
            self.window.collect(),
            self.checks_missing.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::drain::DrainSettings;

    #[test]
    fn codes_format_without_allocating() {
        let mut b = itoa_buf();
        assert_eq!(fmt_code(200, &mut b), "200");
        assert_eq!(fmt_code(503, &mut b), "503");
        assert_eq!(fmt_code(101, &mut b), "101");
    }

    #[tokio::test]
    async fn drains_total_says_how_the_drain_ended() {
        let count = |m: &Metrics, reason: &str| {
            let text = String::from_utf8(m.render()).unwrap();
            let line = format!("lameduck_drains_total{{reason=\"{reason}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line:?} in\n{text}"))
                .to_owned()
        };
        for (reason, other) in [("quiet", "max"), ("max", "quiet")] {
            let lc = Lifecycle::new(DrainSettings::fixed(
                Duration::ZERO,
                Duration::ZERO,
                Duration::from_secs(30),
            ));
            let m = Metrics::new(lc.clone());
            assert_eq!(
                (count(&m, "quiet"), count(&m, "max")),
                ("0".into(), "0".into())
            );
            if reason == "max" {
                lc.cut_short();
            } else {
                lc.start_drain(crate::lifecycle::drain::Trigger::Signal);
            }
            lc.drained().await;
            assert_eq!(count(&m, reason), "1", "{reason}");
            assert_eq!(count(&m, other), "0", "{reason}");
            // Scraped again: still one drain, not two.
            assert_eq!(count(&m, reason), "1", "{reason}");
        }
    }

    #[test]
    fn exposition_has_every_metric() {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(1),
        ));
        let m = Metrics::new(lc.clone());
        m.record_request(
            200,
            Phase::Serving,
            RequestKind::Traffic,
            Duration::from_millis(3),
        );
        m.record_request(
            200,
            Phase::Serving,
            RequestKind::HealthCheck,
            Duration::from_millis(3),
        );
        m.upstream_error("connect");
        let _g = lc.request(RequestKind::Traffic, [127, 0, 0, 1].into());
        let text = String::from_utf8(m.render()).unwrap();
        for needle in [
            "lameduck_requests_total{code=\"200\",phase=\"serving\"} 1",
            "lameduck_request_duration_seconds_bucket{phase=\"serving\"",
            "lameduck_in_flight_requests 1",
            "lameduck_connections_active 0",
            "lameduck_connections_total 0",
            "lameduck_connections_refused_total 0",
            "lameduck_upstream_errors_total{kind=\"connect\"} 1",
            "lameduck_upstream_retries_total 0",
            "lameduck_state 0",
            "lameduck_drain_duration_seconds 0",
            "lameduck_drains_total{reason=\"quiet\"} 0",
            "lameduck_drains_total{reason=\"max\"} 0",
            "lameduck_health_checks_total{phase=\"serving\"} 1",
            "lameduck_health_check_sources 0",
            "lameduck_quiet_window_seconds 0",
            "lameduck_health_checks_missing 0",
            "lameduck_build_info{version=",
            "lameduck_mode_info{mode=\"http\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(
            !text.contains("lameduck_tcp_"),
            "tcp families only in tcp mode"
        );
    }

    #[test]
    fn tcp_mode_families_appear_at_zero() {
        let lc = Lifecycle::new(DrainSettings::fixed(
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(1),
        ));
        let m = Metrics::new(lc);
        m.set_mode("tcp");
        m.record_health_check(Phase::Draining);
        m.tcp.bytes("to_app").inc_by(5);
        m.tcp.end(TcpEnd::Cut);
        m.tcp.proxy_protocol_error("signature");
        let text = String::from_utf8(m.render()).unwrap();
        for needle in [
            "lameduck_mode_info{mode=\"tcp\"} 1",
            "lameduck_health_checks_total{phase=\"draining\"} 1",
            "lameduck_tcp_connections_total{kind=\"health_check\",phase=\"draining\"} 1",
            "lameduck_tcp_connections_total{kind=\"traffic\",phase=\"serving\"} 0",
            "lameduck_tcp_connection_duration_seconds_count{phase=\"serving\"} 0",
            "lameduck_tcp_bytes_total{direction=\"to_app\"} 5",
            "lameduck_tcp_connection_ends_total{reason=\"cut\"} 1",
            "lameduck_proxy_protocol_errors_total{kind=\"signature\"} 1",
            "lameduck_proxy_protocol_errors_total{kind=\"timeout\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("mode=\"http\""));
    }
}
