//! One downstream connection's state, shared by its task ([`super::listener`]) and its
//! service ([`super::proxy`]): the requests on it, the watchdog's verdict (idle, slow
//! head), and how it is asked to go while the pod drains ([`persistence`],
//! [`h2_leave_after`], [`ConnState::safe_to_leave`]). Atomics only; nothing here is on a lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::drain::{now_nanos, Phase};

/// Downstream connection timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub header_read: Duration,
}

/// How a persistent connection is treated once a request on it starts: the one place that
/// decides "keep alive, close after this response, or GOAWAY".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing to ask.
    Keep,
    /// HTTP/1: this response carries `Connection: close`, so the client reconnects
    /// (elsewhere) after it; an idle connection is never closed for it, so no request can
    /// race the close.
    CloseAfterResponse,
    /// HTTP/2: GOAWAY now, this and the other open streams finishing.
    GoAway,
    /// HTTP/2 while draining: one GOAWAY once the connection is old enough
    /// ([`h2_leave_after`]) and its client has nothing queued ([`ConnState::safe_to_leave`]);
    /// the connection's task times it, never a request.
    LeaveWhenOld,
}

/// [`Persistence`] for a request starting in `phase` on an HTTP/2 (`h2`) or HTTP/1
/// connection, with `--keep-alive-while-draining` and once the exit's close has begun
/// (`closing`; HTTP/1 connections are then closed gracefully by their task).
pub fn persistence(
    phase: Phase,
    h2: bool,
    keep_alive_while_draining: bool,
    closing: bool,
) -> Persistence {
    use Persistence::*;
    match (phase, h2) {
        (Phase::Drained, false) => CloseAfterResponse,
        (Phase::Drained, true) => GoAway,
        (_, true) if closing => GoAway,
        (Phase::Draining, _) if keep_alive_while_draining => Keep,
        (Phase::Draining, false) => CloseAfterResponse,
        (Phase::Draining, true) => LeaveWhenOld,
        (Phase::Serving, _) => Keep,
    }
}

/// How long an HTTP/2 connection may stay while the pod drains before it gets its one graceful
/// GOAWAY (counted from its accept): half the drain's quiet window.
///
/// A GOAWAY costs clients built on nghttp2 (Node's `http2`, curl, h2load) every stream they
/// had queued but not yet sent when it arrives, even the graceful first one; so each
/// connection gets at most one per drain, and never right after its first streams: a
/// connection opened during the drain is one the load balancer (or client) just chose, and a
/// GOAWAY per new connection turned one drain into hundreds of GOAWAYs (and dozens of lost
/// requests). Connections already this old when the drain starts get it at once. Persistent
/// clients still move before the drain can end: the drain cannot be quiet while one keeps
/// sending, and it is asked to leave half a window after it arrived, so it adds at most half
/// a window to a drain.
pub fn h2_leave_after(window: Duration) -> Duration {
    window / 2
}

/// An h2 connection with nothing in flight for this long is idle enough for its GOAWAY: its
/// client is not sending back to back, so nothing is queued on it.
pub(crate) const LEAVE_IDLE: Duration = Duration::from_millis(200);

/// Per-connection activity, written by the IO wrapper and the request guards, read by the
/// watchdog. Atomics only; nothing here is on a lock.
pub struct ConnState {
    /// `now_nanos()` at the accept.
    pub(crate) accepted: u64,
    pub(crate) in_flight: AtomicU32,
    /// The most requests ever in flight at once on this connection: a client's concurrency.
    pub(crate) max_in_flight: AtomicU32,
    /// Requests started on this connection so far.
    pub(crate) requests: AtomicU32,
    /// Asks the connection task to close gracefully (an h2 request after `Drained`).
    pub(crate) go_away: AtomicBool,
    /// When the connection last became idle (accepted, or its last request ended).
    pub(crate) idle_since: AtomicU64,
    /// `now_nanos() + 1` when bytes of a new request head began arriving on an idle
    /// connection; 0 when no head is pending.
    pub(crate) head_since: AtomicU64,
    /// An h2 connection (the whole preface arrived): it always has frames to read, so no
    /// head timeout applies.
    pub(crate) h2: AtomicBool,
    /// Bytes of the h2 preface matched so far; [`PREFACE_NO`] once it cannot be h2.
    pub(crate) preface: AtomicU8,
}

/// What the watchdog should do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnVerdict {
    /// Look again after this long.
    Keep(Duration),
    /// Idle too long: close gracefully.
    CloseIdle,
    /// A request head has been arriving for too long: drop the connection.
    SlowHeaders,
}

impl ConnState {
    pub fn new() -> ConnState {
        let now = now_nanos();
        ConnState {
            accepted: now,
            in_flight: AtomicU32::new(0),
            max_in_flight: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            go_away: AtomicBool::new(false),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            preface: AtomicU8::new(0),
        }
    }

    /// A request's head has been parsed; hold the guard until the request ends. Also says
    /// whether it is the first request on the connection.
    pub fn request(this: &Arc<ConnState>) -> (ConnRequest, bool) {
        let now = this.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        this.max_in_flight.fetch_max(now, Ordering::AcqRel);
        let first = this.requests.fetch_add(1, Ordering::Relaxed) == 0;
        this.head_since.store(0, Ordering::Release);
        (ConnRequest(this.clone()), first)
    }

    /// Bytes of a request head (or of the h2 preface) have arrived and its request has not
    /// started yet.
    pub(crate) fn head_pending(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) != 0
    }

    /// Whether a GOAWAY now is unlikely to cost the client a request. Clients built on
    /// nghttp2 refuse every stream they have queued but not yet sent when a GOAWAY arrives;
    /// a client has nothing queued when all its requests are here (as many in flight as it
    /// ever had at once: each of its workers is waiting for an answer), or when it has sent
    /// nothing for [`LEAVE_IDLE`].
    pub(crate) fn safe_to_leave(&self, now: u64) -> bool {
        leave_is_safe(
            self.in_flight.load(Ordering::Acquire),
            self.max_in_flight.load(Ordering::Acquire),
            Duration::from_nanos(now.saturating_sub(self.idle_since.load(Ordering::Acquire))),
        )
    }

    /// Asks the connection's task to close it gracefully (h2: GOAWAY); its open streams
    /// finish first. Call only from the connection's own service (it runs inside the
    /// connection's poll).
    pub fn go_away(&self) {
        self.go_away.store(true, Ordering::Release);
    }

    #[doc(hidden)] // pub for fuzz/fuzz_targets/connection_verdict.rs
    pub fn on_read(&self, data: &[u8]) {
        let matched = self.preface.load(Ordering::Acquire);
        if matched != PREFACE_NO && (matched as usize) < PREFACE.len() {
            let m = matched as usize;
            let n = data.len().min(PREFACE.len() - m);
            if data[..n] == PREFACE[m..m + n] {
                self.preface.store((m + n) as u8, Ordering::Release);
                if m + n == PREFACE.len() {
                    self.h2.store(true, Ordering::Release);
                    self.head_since.store(0, Ordering::Release);
                    return;
                }
            } else {
                self.preface.store(PREFACE_NO, Ordering::Release);
            }
        }
        if self.in_flight.load(Ordering::Acquire) != 0 || self.h2.load(Ordering::Acquire) {
            return;
        }
        if self.head_since.load(Ordering::Acquire) == 0 {
            // The read that starts a request head.
            self.head_since.store(now_nanos() + 1, Ordering::Release);
        }
    }

    /// The watchdog's decision, from the connection's state and the current time.
    pub fn verdict(&self, now: u64, t: Timeouts) -> ConnVerdict {
        connection_verdict(
            now,
            self.in_flight.load(Ordering::Acquire),
            self.idle_since.load(Ordering::Acquire),
            self.head_since.load(Ordering::Acquire),
            self.h2.load(Ordering::Acquire),
            t,
        )
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// [`ConnState::preface`] once the bytes seen are not the preface.
const PREFACE_NO: u8 = u8::MAX;

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

/// [`ConnState::safe_to_leave`], pure: `idle` is how long nothing has been in flight.
fn leave_is_safe(in_flight: u32, max_in_flight: u32, idle: Duration) -> bool {
    match in_flight {
        0 => idle >= LEAVE_IDLE,
        n => n >= max_in_flight,
    }
}

/// Pure watchdog decision. Times are `now_nanos()` values; `head_since` is 0 or `t + 1`.
#[doc(hidden)] // pub for fuzz/fuzz_targets/connection_verdict.rs
pub fn connection_verdict(
    now: u64,
    in_flight: u32,
    idle_since: u64,
    head_since: u64,
    h2: bool,
    t: Timeouts,
) -> ConnVerdict {
    if in_flight > 0 {
        // Busy connections are never idle; look again later.
        return ConnVerdict::Keep(t.idle.min(t.header_read));
    }
    if !h2 && head_since != 0 {
        let waited = Duration::from_nanos(now.saturating_sub(head_since - 1));
        return match t.header_read.checked_sub(waited) {
            Some(left) if !left.is_zero() => ConnVerdict::Keep(left),
            _ => ConnVerdict::SlowHeaders,
        };
    }
    let idle = Duration::from_nanos(now.saturating_sub(idle_since));
    match t.idle.checked_sub(idle) {
        Some(left) if !left.is_zero() => ConnVerdict::Keep(left),
        _ => ConnVerdict::CloseIdle,
    }
}

/// A request in flight on one connection.
pub struct ConnRequest(Arc<ConnState>);

impl Drop for ConnRequest {
    fn drop(&mut self) {
        let t = &self.0;
        if t.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            t.idle_since.store(now_nanos(), Ordering::Release);
            t.head_since.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(75),
        header_read: Duration::from_secs(10),
    };
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn persistence_table() {
        use Persistence::*;
        use Phase::*;
        // (phase, h2, keep-alive-while-draining, closing) -> what the connection is asked
        let cases = [
            ((Serving, false, false, false), Keep),
            ((Serving, true, false, false), Keep),
            // The exit's close: h2 by GOAWAY; HTTP/1 by its task's graceful close.
            ((Serving, true, false, true), GoAway),
            ((Serving, false, false, true), Keep),
            ((Draining, false, false, false), CloseAfterResponse),
            ((Draining, true, false, false), LeaveWhenOld),
            ((Draining, false, true, false), Keep),
            ((Draining, true, true, false), Keep),
            ((Draining, true, true, true), GoAway),
            ((Draining, false, false, true), CloseAfterResponse),
            ((Drained, false, false, false), CloseAfterResponse),
            ((Drained, true, false, false), GoAway),
            ((Drained, false, true, false), CloseAfterResponse),
            ((Drained, true, true, false), GoAway),
        ];
        for ((phase, h2, keep, closing), want) in cases {
            assert_eq!(
                persistence(phase, h2, keep, closing),
                want,
                "{phase:?} h2={h2} keep-alive-while-draining={keep} closing={closing}"
            );
        }
    }

    #[test]
    fn watchdog_table() {
        use ConnVerdict::*;
        let d = Duration::from_secs;
        // (now, in_flight, idle_since, head_since, h2) -> verdict
        let cases = [
            // Fresh idle connection: wait out the idle timeout.
            ((0, 0, 0, 0, false), Keep(d(75))),
            // Idle 60 s (the ALB's own idle timeout): still open.
            ((60 * SEC, 0, 0, 0, false), Keep(d(15))),
            ((75 * SEC, 0, 0, 0, false), CloseIdle),
            // Busy for longer than both timeouts: never closed.
            ((500 * SEC, 1, 0, 0, false), Keep(d(10))),
            // A head started arriving 3 s ago.
            ((50 * SEC, 0, 0, 47 * SEC + 1, false), Keep(d(7))),
            // ... and is still incomplete after 10 s: slowloris.
            ((57 * SEC, 0, 0, 47 * SEC + 1, false), SlowHeaders),
            // h2 reads frames all the time: only the idle rule applies.
            ((57 * SEC, 0, 0, 47 * SEC + 1, true), Keep(d(18))),
        ];
        for ((now, f, idle, head, h2), want) in cases {
            assert_eq!(
                connection_verdict(now, f, idle, head, h2, T),
                want,
                "now={now} in_flight={f} idle_since={idle} head_since={head} h2={h2}"
            );
        }
    }

    #[test]
    fn idle_gap_between_requests_does_not_count_as_header_time() {
        let t = Arc::new(ConnState::new());
        t.on_read(b"GET / HTTP/1.1\r\n");
        assert_ne!(t.head_since.load(Ordering::Acquire), 0);
        let (req, first) = ConnState::request(&t);
        assert!(first);
        t.on_read(b"body bytes");
        assert_eq!(t.head_since.load(Ordering::Acquire), 0);
        drop(req);
        assert_eq!(t.head_since.load(Ordering::Acquire), 0);
        assert!(!t.h2.load(Ordering::Acquire));
    }

    #[test]
    fn h2_preface_is_detected() {
        let t = ConnState::new();
        t.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(t.h2.load(Ordering::Acquire));
        assert!(!t.head_pending());
        // Across reads, one byte at a time: h2 only once the whole preface is in.
        let t = ConnState::new();
        for (i, b) in PREFACE.iter().enumerate() {
            assert!(!t.h2.load(Ordering::Acquire), "h2 after {i} bytes");
            t.on_read(&[*b]);
        }
        assert!(t.h2.load(Ordering::Acquire));
    }

    /// A slowloris whose first byte is `P` (a prefix of the preface) is an HTTP/1 head in
    /// progress: the header timeout applies. Before: marked h2 and exempt.
    #[test]
    fn a_head_starting_with_p_is_not_h2() {
        let t = ConnState::new();
        t.on_read(b"P");
        t.on_read(b"OST / HTTP/1.1\r\n");
        assert!(!t.h2.load(Ordering::Acquire));
        assert!(t.head_pending());
        let since = t.head_since.load(Ordering::Acquire);
        assert_eq!(t.verdict(since - 1 + 11 * SEC, T), ConnVerdict::SlowHeaders);
        // A partial preface is a head in progress too.
        let t = ConnState::new();
        t.on_read(b"PRI * HTTP/2");
        assert!(!t.h2.load(Ordering::Acquire));
        let since = t.head_since.load(Ordering::Acquire);
        assert_eq!(t.verdict(since - 1 + 11 * SEC, T), ConnVerdict::SlowHeaders);
    }
}
