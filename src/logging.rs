//! The process's log output: tracing's fmt layer writing to stderr through a bounded queue
//! and one writer thread, so a log write can never take the proxy down or stop the drain.
//!
//! tracing-subscriber's fmt layer writes each event with `write_all` on the caller's thread,
//! and reports a failed write with `eprintln!`, which panics when stderr itself fails (a log
//! pipe whose reader has gone, stderr on a full disk): the task that logged dies, and with it
//! whatever it was doing — the drain clock, the signal handler. A log pipe that is full
//! (reader alive, not reading) would block the runtime's worker thread instead.
//!
//! Here every event line is handed to a queue of [`QUEUE_LINES`] with `try_send` and never
//! waits; one thread writes the queue to stderr. A line that finds the queue full, or whose
//! write fails, is dropped and counted ([`dropped`], exported as
//! `lameduck_log_lines_dropped_total`). The fmt layer's own error report is off, so nothing
//! on the logging path can panic. [`flush`] gives the writer a bounded moment at exit.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds before new ones are dropped (~1 MiB of typical lines).
pub const QUEUE_LINES: usize = 4096;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static QUEUE: OnceLock<SyncSender<Msg>> = OnceLock::new();

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or dropped).
    Flush(SyncSender<()>),
}

/// Log lines lost so far: the queue was full (stderr blocked) or the write failed.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The writer the fmt layer gets: hands each line to the queue, never blocks, never fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl Stderr {
    /// Starts the writer thread on first use. If the thread cannot be started, lines are
    /// written directly (errors ignored), which is still panic-free.
    fn queue() -> Option<&'static SyncSender<Msg>> {
        if let Some(q) = QUEUE.get() {
            return Some(q);
        }
        let (tx, rx) = sync_channel(QUEUE_LINES);
        let started = std::thread::Builder::new()
            .name("lameduck-log".into())
            .spawn(move || write_loop(rx))
            .is_ok();
        if !started {
            return None;
        }
        // A racing first call may have set it: its thread serves; ours ends with its queue.
        Some(QUEUE.get_or_init(|| tx))
    }
}

fn write_loop(rx: Receiver<Msg>) {
    let stderr = std::io::stderr();
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Line(line) => {
                let mut out = stderr.lock();
                if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
            Msg::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match Stderr::queue() {
            Some(q) => match q.try_send(Msg::Line(buf.to_vec())) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            },
            None => {
                if std::io::stderr().write_all(buf).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Always "written": a lost line is counted, never an error the caller reports.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

/// Waits up to `within` for the lines queued so far to reach stderr. Returns `false` if they
/// did not (stderr blocked): the exit goes ahead anyway.
pub fn flush(within: Duration) -> bool {
    let Some(q) = QUEUE.get() else {
        return true;
    };
    let (tx, rx) = sync_channel(1);
    match q.try_send(Msg::Flush(tx)) {
        Ok(()) => rx.recv_timeout(within).is_ok(),
        Err(_) => false,
    }
}

/// A line for stderr outside tracing (start errors, warnings of `inject`): written directly,
/// a failed write ignored rather than a panic as `eprintln!` would.
pub fn eprint_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writing_never_fails_and_flush_returns() {
        let mut w = Stderr;
        let line = b"logging::tests: one line through the queue\n";
        assert_eq!(w.write(line).unwrap(), line.len());
        assert!(flush(Duration::from_secs(5)));
    }
}
