//! `parse_duration`, `parse_quiet` and `parse_path` (src/cli.rs), the parsers behind every
//! duration and path flag and every `lameduck.io/*` duration annotation.
//!
//! Never panics; an accepted duration is at most `MAX_DURATION` and safe to add to an
//! `Instant` (the drain clock's arithmetic); `parse_quiet` is `auto` or exactly what
//! `parse_duration` says; `parse_path` accepts exactly absolute paths without whitespace
//! and returns its input.
#![no_main]

use lameduck::cli::{parse_duration, parse_path, parse_quiet, QuietArg, MAX_DURATION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let d = parse_duration(s);
    if let Ok(d) = d {
        assert!(d <= MAX_DURATION, "{s:?} parsed to {d:?}, above the cap");
        assert!(std::time::Instant::now().checked_add(d).is_some());
        // What the error messages print reads back as the same duration.
        let shown = humantime_like(d);
        assert_eq!(parse_duration(&shown), Ok(d), "{s:?} -> {d:?} -> {shown:?}");
    }
    match parse_quiet(s) {
        Ok(QuietArg::Auto) => assert_eq!(s.trim(), "auto"),
        Ok(QuietArg::Fixed(q)) => assert_eq!(d, Ok(q)),
        Err(_) => assert!(d.is_err(), "{s:?}: a duration but not a quiet window"),
    }
    let want = s.starts_with('/') && !s.contains(char::is_whitespace);
    match parse_path(s) {
        Ok(p) => {
            assert!(want, "{s:?} accepted as a path");
            assert_eq!(p, s);
        }
        Err(_) => assert!(!want, "{s:?} refused as a path"),
    }
});

/// Seconds and nanoseconds, a form `parse_duration` must read back exactly.
fn humantime_like(d: std::time::Duration) -> String {
    match (d.as_secs(), d.subsec_nanos()) {
        (0, 0) => "0".to_owned(),
        (s, 0) => format!("{s}s"),
        (0, n) => format!("{n}ns"),
        (s, n) => format!("{s}s {n}ns"),
    }
}
