//! The listener's watchdog inputs (src/traffic/conn.rs): the pure `connection_verdict`, and
//! `ConnState::on_read`, which turns the bytes a connection's reads bring into "a request
//! head is pending" or "this is HTTP/2" (the preface detection behind issue 10's
//! `P`-prefix slowloris).
//!
//! - `connection_verdict` never panics; a busy connection is never closed; a `Keep` is
//!   never zero (a zero wait would spin the watchdog) and never longer than the longer
//!   timeout; `SlowHeaders` only for a pending HTTP/1 head.
//! - After any sequence of reads, the connection is HTTP/2 exactly when the bytes so far
//!   begin with the whole 24-byte preface; otherwise any byte read starts the header clock,
//!   so once the header timeout has passed the verdict is `SlowHeaders`.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use lameduck::lifecycle::drain::now_nanos;
use lameduck::traffic::conn::{connection_verdict, ConnState, ConnVerdict, Timeouts};
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Arbitrary, Debug)]
struct Input {
    now: u64,
    in_flight: u32,
    idle_since: u64,
    head_since: u64,
    h2: bool,
    /// Timeouts in milliseconds, as flags give them (validated > 0, at most 24 h).
    idle_ms: u32,
    header_ms: u32,
    /// The reads of one connection, in order (a real read is never empty).
    reads: Vec<Vec<u8>>,
    /// Bias reads towards the preface, or the fuzzer would almost never complete it.
    preface_first: u8,
}

const DAY_MS: u32 = 24 * 3600 * 1000;

fuzz_target!(|input: Input| {
    let t = Timeouts {
        idle: Duration::from_millis(u64::from(input.idle_ms % DAY_MS + 1)),
        header_read: Duration::from_millis(u64::from(input.header_ms % DAY_MS + 1)),
    };
    let longest = t.idle.max(t.header_read);

    let v = connection_verdict(
        input.now,
        input.in_flight,
        input.idle_since,
        input.head_since,
        input.h2,
        t,
    );
    match v {
        ConnVerdict::Keep(d) => {
            assert!(!d.is_zero(), "{input:?}: Keep(0)");
            assert!(d <= longest, "{input:?}: Keep({d:?}) beyond both timeouts");
        }
        ConnVerdict::CloseIdle => assert_eq!(input.in_flight, 0, "{input:?}: busy closed"),
        ConnVerdict::SlowHeaders => {
            assert_eq!(input.in_flight, 0, "{input:?}: busy closed");
            assert!(
                !input.h2 && input.head_since != 0,
                "{input:?}: no head pending"
            );
        }
    }

    // The reads: what the connection is after them.
    let track = ConnState::new();
    let mut seen = Vec::new();
    let mut reads = input.reads;
    if input.preface_first.is_multiple_of(4) {
        let cut = usize::from(input.preface_first / 4) % (PREFACE.len() + 1);
        reads.insert(0, PREFACE[..cut].to_vec());
    }
    for r in reads.iter().filter(|r| !r.is_empty()) {
        track.on_read(r);
        seen.extend_from_slice(r);
    }
    let t = Timeouts {
        idle: Duration::from_secs(1000),
        header_read: Duration::from_secs(10),
    };
    let later = now_nanos() + Duration::from_secs(11).as_nanos() as u64;
    let v = track.verdict(later, t);
    if seen.starts_with(PREFACE) {
        assert!(matches!(v, ConnVerdict::Keep(_)), "h2 preface: {v:?}");
    } else if !seen.is_empty() {
        assert_eq!(v, ConnVerdict::SlowHeaders, "a pending head {seen:?}");
    } else {
        assert!(matches!(v, ConnVerdict::Keep(_)), "no bytes: {v:?}");
    }
});
