//! The traffic port's accept loop dying is not silent (issue 9): readiness fails at once and
//! the proxy exits non-zero once the connections still open have finished. Reproduced in
//! process, exactly: the listening socket is shut down under the running proxy (accept(2)
//! then fails with EINVAL for ever). Before, the loop retried every 100 ms and the pod stayed
//! Ready with a dead port.

mod support;

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use clap::Parser;
use lameduck::cli::{Cli, Command};
use lameduck::sidecar::Bound;
use support::*;

/// The fd of this process's listening TCP socket bound to `addr`.
fn listening_fd(addr: SocketAddr) -> RawFd {
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let fd: RawFd = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: getsockname on an fd number with a buffer of the stated size.
        let rc = unsafe { libc::getsockname(fd, (&raw mut sa).cast(), &mut len) };
        if rc == 0
            && sa.sin_family == libc::AF_INET as libc::sa_family_t
            && u16::from_be(sa.sin_port) == addr.port()
        {
            return fd;
        }
    }
    panic!("no socket bound to {addr}");
}

#[tokio::test]
async fn a_dead_accept_loop_fails_readiness_and_exits_1() {
    let up = upstream(UpOpts::default()).await;
    let upstream_addr = up.addr.to_string();
    let cli = Cli::try_parse_from([
        "lameduck",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--upstream",
        &upstream_addr,
    ])
    .unwrap();
    let Command::Proxy(args) = cli.command else {
        unreachable!()
    };
    let bound = Bound::bind(args).await.unwrap();
    let (traffic, admin) = (bound.traffic_addr(), bound.admin_addr());
    let fd = listening_fd(traffic);
    let (_term_tx, term_rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(bound.run(term_rx));
    assert!(
        eventually(PATIENCE, || async {
            get(admin, "/readyz").await.status == 200
        })
        .await,
        "never ready"
    );
    // A request in flight when the port dies: it is still answered.
    let slow = tokio::spawn(async move { get(traffic, "/sleep/1500").await });
    assert!(
        eventually(PATIENCE, || async {
            get(admin, "/status").await.json()["in_flight"] == 1
        })
        .await
    );
    // SAFETY: shutdown(2) on the proxy's own listening socket, which stays open.
    assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RD) }, 0);
    assert!(
        eventually(Duration::from_secs(2), || async {
            let r = get(admin, "/readyz").await;
            r.status == 503 && r.text().trim() == "failed"
        })
        .await,
        "readiness still passes with a dead traffic port"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    let code = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the proxy exits by itself")
        .unwrap();
    assert_eq!(code, 1);
}
