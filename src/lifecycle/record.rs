//! The drain record (`--drain-record`): one line in a file that says a drain has begun, so a
//! proxy restarted while its pod terminates resumes that drain instead of starting ready.
//!
//! A sidecar that dies in the middle of a drain is restarted by the kubelet when its pod is
//! not terminating (a drain asked on the admin port), or on a kubelet that restarts native
//! sidecars during termination (KEP-4438; v1.37.2 does not, docs/node-tier.md). The new
//! process knows
//! nothing of the drain the old one was in, unless it finds this record: written as the
//! drain starts, kept through a crash (an `emptyDir` lives as long as the pod), removed only
//! when a drain heals (exit 3: no termination followed).
//!
//! The line is `<unix seconds, millisecond precision> <trigger>`, e.g.
//! `1765007931.482 signal`. It is written atomically (a temporary file in the same
//! directory, then a rename), so a reader sees a whole record or none. Anything else at the
//! path, an unreadable or garbled file included, still reads as "a drain was in progress"
//! ([`Found::Unreadable`]): the safe reading for a pod that may be terminating.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lifecycle::state::Trigger;

/// What a drain record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// When the drain started (wall clock: it outlives the process).
    pub started_at: SystemTime,
    pub trigger: Trigger,
}

/// What was found at the record's path when the proxy started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// No record: no drain had begun.
    Nothing,
    Record(Record),
    /// Something is there but it is not a record (why): a drain was in progress, its start
    /// unknown.
    Unreadable(String),
}

/// The most of a record file read: a record is one short line.
const MAX_LEN: u64 = 256;

impl Record {
    /// The record's one line, newline included.
    pub fn line(&self) -> String {
        let t = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.{:03} {}\n",
            t.as_secs(),
            t.subsec_millis(),
            trigger_name(self.trigger)
        )
    }

    /// Parses a record's line (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Record, String> {
        const FORM: &str = "expected `<unix seconds> <signal|admin>`";
        let mut words = text.split_whitespace();
        let (Some(secs), Some(trigger), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("{text:?}: {FORM}"));
        };
        let started = parse_unix_time(secs)
            .map(|t| UNIX_EPOCH + t)
            .ok_or_else(|| format!("{secs:?} is not a time: {FORM}"))?;
        let trigger = match trigger {
            "signal" => Trigger::Signal,
            "admin" => Trigger::Admin,
            other => return Err(format!("{other:?} is not a trigger: {FORM}")),
        };
        Ok(Record {
            started_at: started,
            trigger,
        })
    }
}

/// `<seconds>[.<fraction>]`, decimal digits only, at most 11 digits of seconds (year 5138)
/// and 9 of fraction: exact, no floating point.
fn parse_unix_time(s: &str) -> Option<Duration> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
    let digits =
        |d: &str, max: usize| (1..=max).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(secs, 11) || !digits(frac, 9) {
        return None;
    }
    let nanos = frac.parse::<u32>().ok()? * 10u32.pow(9 - frac.len() as u32);
    Some(Duration::new(secs.parse().ok()?, nanos))
}

fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Signal => "signal",
        Trigger::Admin => "admin",
    }
}

/// Reads the record at `path`. Never fails: a missing file is [`Found::Nothing`], and every
/// other failure is [`Found::Unreadable`].
pub fn read(path: &Path) -> Found {
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(MAX_LEN).read_to_string(&mut text));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Nothing,
        Err(e) => Found::Unreadable(e.to_string()),
        Ok(_) => match Record::parse(&text) {
            Ok(r) => Found::Record(r),
            Err(e) => Found::Unreadable(e),
        },
    }
}

/// Writes the record atomically: a temporary file beside `path`, synced, then renamed over
/// it.
pub fn write(path: &Path, record: &Record) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(record.line().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes the record; one that is not there is removed already.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `.<name>.tmp` in the record's own directory (a rename across file systems is no rename).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lameduck-record-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_record_round_trips_to_the_millisecond() {
        let r = Record {
            started_at: UNIX_EPOCH + Duration::from_millis(1_765_007_931_482),
            trigger: Trigger::Admin,
        };
        assert_eq!(r.line(), "1765007931.482 admin\n");
        assert_eq!(Record::parse(&r.line()), Ok(r));
        let s = Record::parse("1765007931 signal").unwrap();
        assert_eq!(s.trigger, Trigger::Signal);
        assert_eq!(
            s.started_at,
            UNIX_EPOCH + Duration::from_secs(1_765_007_931)
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_form() {
        for bad in [
            "",
            "draining",
            "1765007931",
            "1765007931 sigterm",
            "soon signal",
            "-5 signal",
            "inf signal",
            "1e300 signal",
            "1 signal extra",
            "1. signal",
            ".5 signal",
            "1.2.3 signal",
            "1.0123456789 signal",
            "+1 signal",
        ] {
            let e = Record::parse(bad).unwrap_err();
            assert!(
                e.contains("expected `<unix seconds> <signal|admin>`"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn write_read_remove() {
        let d = dir("rw");
        let path = d.join("draining");
        assert_eq!(read(&path), Found::Nothing);
        let r = Record {
            started_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            trigger: Trigger::Signal,
        };
        write(&path, &r).unwrap();
        assert_eq!(read(&path), Found::Record(r));
        // Only the record is left behind: the temporary file was renamed.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["draining"]);
        remove(&path).unwrap();
        assert_eq!(read(&path), Found::Nothing);
        remove(&path).expect("removing a missing record is fine");

        std::fs::write(&path, "\u{0}\u{1}garbage").unwrap();
        assert!(matches!(read(&path), Found::Unreadable(_)));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read(&path), Found::Unreadable(_)), "not UTF-8");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(read(&path), Found::Unreadable(_)), "a directory");
        assert!(write(&path, &r).is_err(), "cannot rename over a directory");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_write_into_a_missing_directory_fails_cleanly() {
        let path = std::env::temp_dir().join("lameduck-record-no-such-dir/x/draining");
        let r = Record {
            started_at: SystemTime::now(),
            trigger: Trigger::Admin,
        };
        assert!(write(&path, &r).is_err());
    }
}
