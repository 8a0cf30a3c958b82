//! The accept step every traffic port shares (HTTP mode's [`super::listener`] and
//! [`super::tcp`]): the connection limit, what an `accept(2)` error means, and the limit's
//! default from the file descriptor limit.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::lifecycle::drain::Lifecycle;

/// File descriptors kept for the admin port, the app's health probes and the process.
pub const RESERVED_FDS: u64 = 64;

/// The downstream connection limit for a file descriptor limit: what is left after
/// [`RESERVED_FDS`], halved, since every downstream connection may hold an app connection.
pub fn max_connections_for(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(RESERVED_FDS) / 2).clamp(1, usize::MAX as u64) as usize
}

/// Raises the soft file descriptor limit to the hard one; returns (before, after).
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct owned by this frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Why the accept loop stopped serving, other than [`Lifecycle::close`].
#[derive(Debug, thiserror::Error)]
#[error("the traffic port stopped accepting: {0}")]
pub struct AcceptError(#[source] pub io::Error);

/// The next connection to serve on `listener`; `Ok(None)` once the exit's close has begun.
/// Errors that are the failed connection's own are skipped, a shortage of descriptors or
/// memory is retried after 100 ms, and only a dead listening socket is an error. At
/// `max_connections` open, a new connection is accepted and closed at once (counted in
/// `refused`). Shared by the HTTP and TCP modes.
pub async fn accept(
    listener: &TcpListener,
    lifecycle: &Lifecycle,
    max_connections: usize,
    refused: &prometheus::IntCounter,
) -> Result<Option<(TcpStream, SocketAddr)>, AcceptError> {
    let closing = lifecycle.closing_token();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = closing.cancelled() => return Ok(None),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => match AcceptClass::of(&e) {
                AcceptClass::PerConnection => continue,
                AcceptClass::Resources => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                AcceptClass::Fatal => return Err(AcceptError(e)),
            },
        };
        if lifecycle.connections() >= max_connections {
            refused.inc();
            tracing::debug!(%peer, max_connections, "connection limit reached; refusing");
            drop(stream);
            continue;
        }
        return Ok(Some((stream, peer)));
    }
}

/// What an `accept(2)` error means for the loop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptClass {
    /// The failed connection's own problem (accept(2): treat like EAGAIN and retry).
    PerConnection,
    /// The process or system is short of something: retry after a pause.
    Resources,
    /// The listening socket is unusable: retrying would spin on a dead port.
    Fatal,
}

impl AcceptClass {
    pub(crate) fn of(e: &io::Error) -> AcceptClass {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptClass::Resources
            }
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptClass::Fatal,
            _ => AcceptClass::PerConnection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_follows_the_fd_limit() {
        assert_eq!(max_connections_for(256), 96);
        assert_eq!(max_connections_for(1_048_576), 524_256);
        assert_eq!(max_connections_for(10), 1);
    }

    #[test]
    fn accept_errors_are_classified() {
        let class = |code| AcceptClass::of(&io::Error::from_raw_os_error(code));
        assert_eq!(class(libc::EMFILE), AcceptClass::Resources);
        assert_eq!(class(libc::ENFILE), AcceptClass::Resources);
        assert_eq!(class(libc::ECONNABORTED), AcceptClass::PerConnection);
        assert_eq!(class(libc::EPERM), AcceptClass::PerConnection);
        // A listening socket that was shut down or closed: the port is dead.
        assert_eq!(class(libc::EINVAL), AcceptClass::Fatal);
        assert_eq!(class(libc::EBADF), AcceptClass::Fatal);
    }
}
