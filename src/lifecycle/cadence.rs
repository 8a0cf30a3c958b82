//! The load balancer's health-check cadence, learned from the checks themselves, and the
//! quiet window that follows from it (`--quiet auto`).
//!
//! While a target is registered, every load-balancer node checks it every
//! `HealthCheckIntervalSeconds`, from its own address. Once lameduck knows each node's
//! interval, a silence longer than the longest of them (with a margin) means no node is
//! checking any more: the target has been deregistered. A fixed `--quiet` guesses that
//! figure; this module measures it.
//!
//! [`HealthChecks`] records the checks per source address, in bounded memory.
//! [`quiet_window`] is the decision: pure and clock-free (observations in, window out).
//!
//! The rule, per source: its interval is the 75th percentile of its last [`MAX_GAPS`] gaps
//! (robust to jitter and to an occasional missed check, whose gap is double; conservative
//! for a source that interleaves several checkers), trusted once it has [`MIN_GAPS`] gaps.
//! A source silent for [`GONE_AFTER`] of its intervals is gone (a node removed). Over the
//! active sources, the window is `longest interval × 1.5 + 250 ms` with two or more sources
//! (another source covers one node's missed check) or `× 2 + 250 ms` with a single source
//! (covers its own missed check), never more than drain-max. Until some source is trusted,
//! the window is `--quiet-fallback`.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Gaps a source needs before its interval is trusted (so at least four checks).
pub const MIN_GAPS: usize = 3;
/// Gaps remembered per source.
pub const MAX_GAPS: usize = 16;
/// Sources remembered; beyond this the longest-silent one is forgotten.
pub const MAX_SOURCES: usize = 64;
/// A source that has been silent for this many of its own intervals is gone.
pub const GONE_AFTER: u32 = 3;
/// Window factor on the longest interval when two or more sources are active.
pub const FACTOR_MANY: f64 = 1.5;
/// Window factor when a single source is active.
pub const FACTOR_ONE: f64 = 2.0;
/// Added to every learned window: scheduling and network slack.
pub const SLACK: Duration = Duration::from_millis(250);

/// How the quiet window is chosen (`--quiet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiet {
    /// A fixed window.
    Fixed(Duration),
    /// Learned from the health-check cadence; `fallback` until enough checks were seen.
    Auto { fallback: Duration },
}

/// What one source looked like at a moment: the input of [`quiet_window`].
#[derive(Clone, Debug, PartialEq)]
pub struct SourceObs {
    pub addr: IpAddr,
    /// Gaps between its consecutive checks, oldest first.
    pub gaps: Vec<Duration>,
    /// Time since its last check.
    pub since_last: Duration,
}

/// What was learned about one source.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceInterval {
    pub address: IpAddr,
    /// `None` until the source has [`MIN_GAPS`] gaps.
    #[serde(serialize_with = "opt_secs")]
    pub interval_seconds: Option<Duration>,
    pub checks: usize,
    #[serde(serialize_with = "secs")]
    pub seconds_since_last: Duration,
    /// Still checking (not silent for [`GONE_AFTER`] intervals).
    pub active: bool,
}

/// Where a quiet window came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Basis {
    /// `--quiet DUR`.
    Fixed,
    /// Learned from `sources` active sources whose longest interval is `longest`.
    Learned {
        sources: usize,
        longest: Duration,
        factor: f64,
        capped: bool,
    },
    /// Not enough checks seen yet: `--quiet-fallback`.
    Fallback {
        checks: usize,
        sources: usize,
        /// Traffic was served and no health check was ever seen: the checks do not reach
        /// the traffic port at all ([`UNSEEN_CAUSES`]), so no interval will ever be learned.
        /// Set by the caller, which knows the traffic ([`quiet_window`] sees only checks).
        checks_missing: bool,
    },
}

/// Why a pod that serves traffic sees no load-balancer health check on its traffic port: what
/// the log, `/status` and `/drain` say when `--quiet auto` had to fall back for that reason.
pub const UNSEEN_CAUSES: &str = "likely instance targets (the checks go to the node, not \
     the pod), the target group's healthcheck-port set to another port, or checks whose \
     User-Agent is not in --health-check-agents (tcp mode: HTTPS checks, which cannot be read)";

/// The quiet window and why.
#[derive(Clone, Debug, PartialEq)]
pub struct QuietWindow {
    pub window: Duration,
    pub basis: Basis,
}

impl QuietWindow {
    pub fn fixed(window: Duration) -> QuietWindow {
        QuietWindow {
            window,
            basis: Basis::Fixed,
        }
    }

    /// The fallback, because traffic was served and no health check was ever seen.
    pub fn checks_missing(&self) -> bool {
        matches!(
            self.basis,
            Basis::Fallback {
                checks_missing: true,
                ..
            }
        )
    }

    /// `fixed`, `learned` or `fallback`.
    pub fn kind(&self) -> &'static str {
        match self.basis {
            Basis::Fixed => "fixed",
            Basis::Learned { .. } => "learned",
            Basis::Fallback { .. } => "fallback",
        }
    }

    /// One sentence saying why this window, for logs and JSON.
    pub fn why(&self) -> String {
        let w = fmt_secs(self.window);
        match &self.basis {
            Basis::Fixed => format!("fixed --quiet {w}"),
            Basis::Learned {
                sources,
                longest,
                factor,
                capped,
            } => {
                let s = if *sources == 1 { "source" } else { "sources" };
                let cap = if *capped {
                    ", capped at --drain-max"
                } else {
                    ""
                };
                format!(
                    "learned from {sources} health-check {s}: longest interval {} x {factor} + {} = {w}{cap}",
                    fmt_secs(*longest),
                    fmt_secs(SLACK),
                )
            }
            Basis::Fallback {
                checks_missing: true,
                ..
            } => format!(
                "fallback {w}: no load-balancer health check ever reached the traffic port, \
                 though traffic did: {UNSEEN_CAUSES}"
            ),
            Basis::Fallback {
                checks, sources, ..
            } => format!(
                "fallback {w}: {checks} health check(s) seen from {sources} source(s); \
                 an interval is learned after {} checks from one source",
                MIN_GAPS + 1
            ),
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// A source's interval: the 75th percentile (nearest rank, rounded down) of its gaps, once
/// it has [`MIN_GAPS`] of them.
pub fn estimate_interval(gaps: &[Duration]) -> Option<Duration> {
    if gaps.len() < MIN_GAPS {
        return None;
    }
    let mut sorted = gaps.to_vec();
    sorted.sort_unstable();
    Some(sorted[(sorted.len() - 1) * 3 / 4])
}

/// The quiet window for these observations. Pure: the caller supplies the time since each
/// source's last check. `max` is drain-max.
pub fn quiet_window(
    sources: &[SourceObs],
    fallback: Duration,
    max: Duration,
) -> (QuietWindow, Vec<SourceInterval>) {
    let mut learned = Vec::new();
    let intervals: Vec<SourceInterval> = sources
        .iter()
        .map(|s| {
            let interval = estimate_interval(&s.gaps);
            let active = match (interval, s.gaps.iter().max()) {
                (Some(t), _) => s.since_last <= t * GONE_AFTER + SLACK,
                // Too few gaps to tell; the longest one seen bounds how long it may stay
                // silent while still being there.
                (None, Some(g)) => s.since_last <= *g * GONE_AFTER,
                // Seen once: nothing says it checks at all (a stray request that looked like
                // a check). Active only for as long as the fallback window.
                (None, None) => s.since_last <= fallback,
            };
            if active {
                if let Some(t) = interval {
                    learned.push(t);
                }
            }
            SourceInterval {
                address: s.addr,
                interval_seconds: interval,
                checks: s.gaps.len() + 1,
                seconds_since_last: s.since_last,
                active,
            }
        })
        .collect();
    let Some(longest) = learned.iter().copied().max() else {
        let window = QuietWindow {
            window: fallback.min(max),
            basis: Basis::Fallback {
                checks: intervals.iter().map(|s| s.checks).sum(),
                sources: intervals.len(),
                checks_missing: false,
            },
        };
        return (window, intervals);
    };
    // A source still learning counts with the longest gap it has shown, if that is longer.
    let provisional = sources
        .iter()
        .zip(&intervals)
        .filter(|(_, i)| i.active && i.interval_seconds.is_none())
        .filter_map(|(s, _)| s.gaps.iter().max().copied())
        .max()
        .unwrap_or_default();
    let longest = longest.max(provisional);
    // A source seen only once does not make the window's factor: the lower factor relies on
    // another node's check covering a missed one, and one check says no cadence.
    let active = intervals
        .iter()
        .filter(|i| i.active && i.checks > 1)
        .count();
    let factor = if active >= 2 { FACTOR_MANY } else { FACTOR_ONE };
    let raw = longest.mul_f64(factor) + SLACK;
    let window = QuietWindow {
        window: raw.min(max),
        basis: Basis::Learned {
            sources: active,
            longest,
            factor,
            capped: raw > max,
        },
    };
    (window, intervals)
}

// === impl HealthChecks ===

/// Health checks seen on the traffic port, per source address.
#[derive(Default)]
pub struct HealthChecks {
    sources: Mutex<Vec<Source>>,
}

struct Source {
    addr: IpAddr,
    /// `now_nanos()` of the last check.
    last: u64,
    gaps: std::collections::VecDeque<Duration>,
}

impl HealthChecks {
    /// Records a check from `addr` at `now` (`drain::now_nanos()`).
    pub fn record(&self, addr: IpAddr, now: u64) {
        let mut sources = self.sources.lock().expect("never poisoned");
        if let Some(s) = sources.iter_mut().find(|s| s.addr == addr) {
            let gap = Duration::from_nanos(now.saturating_sub(s.last));
            if s.gaps.len() == MAX_GAPS {
                s.gaps.pop_front();
            }
            s.gaps.push_back(gap);
            s.last = now;
            return;
        }
        if sources.len() == MAX_SOURCES {
            let stalest = (0..sources.len())
                .min_by_key(|&i| sources[i].last)
                .expect("MAX_SOURCES > 0");
            sources.swap_remove(stalest);
        }
        sources.push(Source {
            addr,
            last: now,
            gaps: Default::default(),
        });
    }

    /// The observations as of `now`.
    pub fn observe(&self, now: u64) -> Vec<SourceObs> {
        let sources = self.sources.lock().expect("never poisoned");
        let mut obs: Vec<SourceObs> = sources
            .iter()
            .map(|s| SourceObs {
                addr: s.addr,
                gaps: s.gaps.iter().copied().collect(),
                since_last: Duration::from_nanos(now.saturating_sub(s.last)),
            })
            .collect();
        obs.sort_by_key(|o| o.addr);
        obs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALLBACK: Duration = Duration::from_secs(30);
    const MAX: Duration = Duration::from_secs(120);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn src(last_octet: u8, gaps_ms: &[u64], since_last_ms: u64) -> SourceObs {
        SourceObs {
            addr: IpAddr::from([10, 0, 0, last_octet]),
            gaps: gaps_ms.iter().map(|&g| ms(g)).collect(),
            since_last: ms(since_last_ms),
        }
    }

    /// (name, sources) -> (window, kind, active sources)
    #[test]
    fn quiet_window_table() {
        let steady = [10_000; 8];
        let cases: Vec<(&str, Vec<SourceObs>, Duration, &str, usize)> = vec![
            (
                "steady checks from three sources",
                vec![
                    src(1, &steady, 2_000),
                    src(2, &steady, 5_000),
                    src(3, &steady, 9_000),
                ],
                ms(15_250),
                "learned",
                3,
            ),
            (
                "jitter",
                vec![
                    src(1, &[9_700, 10_300, 10_100, 9_800, 10_400, 9_900], 1_000),
                    src(2, &[10_200, 9_900, 10_000, 10_300, 9_600, 10_100], 4_000),
                ],
                // 75th percentile: 10.1 s for both; x 1.5 + 0.25 s.
                ms(10_100 * 3 / 2 + 250),
                "learned",
                2,
            ),
            (
                "one missed check",
                vec![
                    src(1, &[10_000, 10_000, 20_000, 10_000, 10_000], 3_000),
                    src(2, &[10_000, 10_000, 10_000, 10_000, 10_000], 6_000),
                ],
                ms(15_250),
                "learned",
                2,
            ),
            (
                "a source that stops early (an ALB node removed)",
                vec![
                    src(1, &steady, 2_000),
                    src(2, &steady, 3_000),
                    // Longer interval, but silent for 5 of them: gone, ignored.
                    src(3, &[30_000; 6], 150_000),
                ],
                ms(15_250),
                "learned",
                2,
            ),
            ("no checks at all", vec![], FALLBACK, "fallback", 0),
            (
                "checks only from one source",
                vec![src(1, &[5_000; 6], 1_000)],
                ms(10_250),
                "learned",
                1,
            ),
            (
                "a pod that has just started: too few checks",
                vec![src(1, &[5_000, 5_000], 1_000), src(2, &[5_000], 3_000)],
                FALLBACK,
                "fallback",
                0,
            ),
            (
                "a new source still learning, with a longer gap than the trusted ones",
                vec![src(1, &[5_000; 6], 1_000), src(2, &[20_000], 3_000)],
                ms(20_000 * 3 / 2 + 250),
                "learned",
                2,
            ),
            (
                "a source seen once (a monitor through the LB) does not change the factor",
                vec![src(1, &[5_000; 6], 1_000), src(2, &[], 3_000)],
                ms(10_250),
                "learned",
                1,
            ),
            (
                "a learned window above drain-max is capped",
                vec![src(1, &[100_000; 4], 1_000)],
                MAX,
                "learned",
                1,
            ),
        ];
        for (name, sources, want, kind, active) in cases {
            let (w, intervals) = quiet_window(&sources, FALLBACK, MAX);
            assert_eq!((w.window, w.kind()), (want, kind), "{name}: {}", w.why());
            let n = match w.basis {
                Basis::Learned { sources, .. } => sources,
                _ => 0,
            };
            assert_eq!(n, active, "{name}");
            assert_eq!(intervals.len(), sources.len(), "{name}");
        }
    }

    #[test]
    fn a_source_seen_once_is_not_active_forever() {
        let once = |since| quiet_window(&[src(9, &[], since)], FALLBACK, MAX).1[0].active;
        assert!(once(1_000));
        assert!(!once(FALLBACK.as_millis() as u64 + 1));
        assert!(!once(10 * 3600 * 1000));
    }

    #[test]
    fn interval_needs_enough_gaps_and_ignores_one_outlier() {
        assert_eq!(estimate_interval(&[ms(10), ms(10)]), None);
        assert_eq!(estimate_interval(&[ms(10), ms(10), ms(20)]), Some(ms(10)));
        assert_eq!(
            estimate_interval(&[ms(10), ms(20), ms(10), ms(10), ms(10)]),
            Some(ms(10))
        );
        // Two checkers interleaved from one address: the longer gap, not the mean.
        assert_eq!(
            estimate_interval(&[ms(3), ms(7), ms(3), ms(7), ms(3), ms(7)]),
            Some(ms(7))
        );
    }

    #[test]
    fn recorder_keeps_gaps_per_source_in_bounded_memory() {
        let hc = HealthChecks::default();
        let a = IpAddr::from([10, 0, 0, 1]);
        for i in 0..40u64 {
            hc.record(a, i * 1_000_000_000);
        }
        for i in 0..(MAX_SOURCES as u64 + 10) {
            hc.record(
                IpAddr::from([10, 1, (i / 256) as u8, i as u8]),
                50_000_000_000 + i,
            );
        }
        let obs = hc.observe(60_000_000_000);
        assert_eq!(obs.len(), MAX_SOURCES);
        // The busiest but stalest source was evicted first.
        assert!(obs.iter().all(|o| o.addr != a));
        let hc = HealthChecks::default();
        for i in 0..40u64 {
            hc.record(a, i * 1_000_000_000);
        }
        let obs = hc.observe(41_000_000_000);
        assert_eq!(obs[0].gaps.len(), MAX_GAPS);
        assert_eq!(obs[0].since_last, Duration::from_secs(2));
        assert!(obs[0].gaps.iter().all(|g| *g == Duration::from_secs(1)));
    }

    #[test]
    fn why_says_where_the_window_came_from() {
        let (w, _) = quiet_window(&[src(1, &[5_000; 6], 1_000)], FALLBACK, MAX);
        assert_eq!(
            w.why(),
            "learned from 1 health-check source: longest interval 5.00s x 2 + 0.25s = 10.25s"
        );
        let (w, _) = quiet_window(&[], FALLBACK, MAX);
        assert!(
            w.why().starts_with("fallback 30.00s: 0 health check(s)"),
            "{}",
            w.why()
        );
        assert_eq!(QuietWindow::fixed(ms(1500)).why(), "fixed --quiet 1.50s");
    }

    #[test]
    fn why_names_the_likely_causes_when_no_check_ever_came() {
        let (mut w, _) = quiet_window(&[], FALLBACK, MAX);
        assert!(!w.checks_missing());
        if let Basis::Fallback { checks_missing, .. } = &mut w.basis {
            *checks_missing = true;
        }
        assert!(w.checks_missing());
        assert_eq!(w.kind(), "fallback");
        let why = w.why();
        assert!(
            why.starts_with("fallback 30.00s: no load-balancer health check"),
            "{why}"
        );
        for cause in [
            "instance targets",
            "healthcheck-port",
            "--health-check-agents",
        ] {
            assert!(why.contains(cause), "{why}");
        }
    }
}
