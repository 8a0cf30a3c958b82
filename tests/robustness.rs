//! What real clients and an attacker found (issue 21), each against the real binary: a log
//! that cannot be written never stops the proxy or its drain, a connection that sends
//! nothing is closed at the header read timeout, a request that loops back through the
//! upstream is answered 508, HTTP/1.1 without Host is a 400, and Node's `http2` client
//! loses no request across a drain.

mod support;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn ready(admin: SocketAddr) {
    assert!(
        eventually(PATIENCE, || async {
            match TcpStream::connect(admin).await {
                Ok(_) => get(admin, "/readyz").await.status == 200,
                Err(_) => false,
            }
        })
        .await,
        "never ready"
    );
}

/// A loopback port that was free a moment ago (for a proxy whose log cannot be read, so
/// its ports cannot be learned from the start line).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on a pid this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

/// stderr on a full device: every log write fails. Before: exit 101 at start (the fmt
/// layer's error report panics). Now the proxy serves, drains and exits 0, and counts the
/// lines it lost.
#[tokio::test]
async fn stderr_that_fails_every_write_stops_nothing() {
    let up = upstream(UpOpts::default()).await;
    let (listen, admin) = (free_port(), free_port());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut p = Killed(
        Command::new(proxy_bin())
            .args(["proxy", "--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--upstream", &up.addr.to_string()])
            .args(["--drain-min", "0s", "--quiet", "1s", "--drain-max", "20s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(full)
            .spawn()
            .unwrap(),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let traffic: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    ready(admin).await;
    assert_eq!(get(traffic, "/").await.status, 200);
    let metrics = get(admin, "/metrics").await.text();
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lameduck_log_lines_dropped_total "))
        .expect("lameduck_log_lines_dropped_total")
        .parse()
        .unwrap();
    assert!(dropped >= 1.0, "the start line was lost and counted");
    sigterm(&p.0);
    let status = wait_exit(&mut p.0, PATIENCE).expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
}

/// The log pipe's reader goes away just after the drain started. Before: the drain clock's
/// task panicked on its next log line; `/status` said drained but never released, and every
/// `/drain` caller (the kubelet's preStop) waited until the grace period ran out. Now the
/// release comes when traffic is quiet, and SIGTERM still ends the process with 0.
#[tokio::test]
async fn a_log_reader_that_goes_away_mid_drain_stops_nothing() {
    let up = upstream(UpOpts::default()).await;
    let mut child = Command::new(proxy_bin())
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--upstream", &up.addr.to_string(), "--log-format", "json"])
        .args(["--drain-min", "0s", "--quiet", "1s", "--drain-max", "60s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut p = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.contains("lameduck proxy serving") {
                tx.send(line).unwrap();
            } else if line.contains("draining") {
                // The reader goes away: the pipe closes under the proxy.
                return;
            }
        }
    });
    let start = rx.recv_timeout(PATIENCE).expect("start line");
    let v: serde_json::Value = serde_json::from_str(&start).unwrap();
    let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
    let (traffic, admin) = (addr("listen"), addr("admin"));
    ready(admin).await;
    let t = Instant::now();
    let drain = tokio::spawn(async move { get(admin, "/drain").await });
    tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || reader.join()))
        .await
        .expect("the drain started and the reader went away")
        .unwrap()
        .unwrap();
    // Lines keep being logged with nobody reading: a request during the drain.
    assert_eq!(get(traffic, "/").await.status, 200);
    let answer = tokio::time::timeout(PATIENCE, drain)
        .await
        .expect("/drain answered at quiet, not at the grace period")
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["reason"], "quiet", "{}", answer.text());
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let status = get(admin, "/status").await.json();
    assert_eq!(status["released"], true, "{status}");
    sigterm(&p.0);
    let status = wait_exit(&mut p.0, PATIENCE).expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// Sockets that never send a byte are closed at the header read timeout, so they cannot
/// hold the connection limit. Before: nothing timed a connection before its first byte but
/// the idle timeout (75 s), and 20 silent sockets refused every client, health checks too.
#[tokio::test]
async fn silent_sockets_cannot_hold_the_connection_limit() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--max-connections", "4", "--header-read-timeout", "1s"],
    );
    ready(p.admin).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(p.traffic).await.unwrap());
    }
    // Counted from the accept: the limit is reached once all four are accepted.
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_connections_active").await >= 4.0
        })
        .await
    );
    let t = Instant::now();
    for s in &mut silent {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed by the header read timeout, not left open");
        assert!(matches!(n, Ok(0) | Err(_)), "closed without an answer");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(get(p.traffic, "/").await.status, 200);
    assert!(
        p.metric("lameduck_client_errors_total{kind=\"header_read_timeout\"}")
            .await
            >= 4.0
    );
}

/// A head whose first byte is `P` (POST, PUT, PATCH: a prefix of the h2 preface) is timed
/// from that byte. Before: from the second, so a trickle of one byte per 1.8 s was closed
/// at 3.8 s instead of 2 s.
#[tokio::test]
async fn a_p_head_is_timed_from_its_first_byte() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--header-read-timeout", "2s"]);
    ready(p.admin).await;
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    let t = Instant::now();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(b"O").await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, async { s.read(&mut buf).await.unwrap_or(0) })
        .await
        .expect("closed");
    assert_eq!(n, 0);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(3000),
        "closed {took:?} after the first byte"
    );
}

/// HTTP/1.1 without Host: 400, never forwarded (RFC 9112 §3.2). Before: forwarded with an
/// empty `host:`. HTTP/1.0 may omit it.
#[tokio::test]
async fn http11_without_host_is_a_400() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &[]);
    ready(p.admin).await;
    let before = up.requests.load(std::sync::atomic::Ordering::SeqCst);
    let out = raw(p.traffic, b"GET / HTTP/1.1\r\n\r\n", PATIENCE).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("without a Host header"), "{out}");
    assert_eq!(
        up.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    let out = raw(p.traffic, b"GET / HTTP/1.0\r\n\r\n", PATIENCE).await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
}

/// A request that comes back to the proxy through its own upstream (here a relay that
/// forwards the "app" port to the proxy's traffic port, as a name resolving to the pod
/// would) is answered 508 at once. Before: each loop opened a new connection until memory
/// ran out (~10,000 self-connections, 318 MB).
#[tokio::test]
async fn a_request_looping_back_through_the_upstream_is_a_508() {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let p = Proxy::start(relay_addr, &[]);
    let target = p.traffic;
    let relays = tokio::spawn(async move {
        // Bounded: a loop that is not caught ends here.
        for _ in 0..200 {
            let Ok((mut inbound, _)) = relay.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    let resp = get(p.traffic, "/").await;
    assert_eq!(resp.status, 508, "{}", resp.text());
    assert!(resp.text().contains("loop detected"), "{}", resp.text());
    assert!(p.metric("lameduck_connections_total").await < 10.0);
    relays.abort();
}

// === Node's http2 client across a drain ===

/// Runs `tests/support/node/h2client.js` (N workers sharing one session, back to back) for
/// `ms` against `addr`; its JSON summary.
fn node_h2_client(node: &Path, addr: SocketAddr, workers: u32, ms: u64) -> Child {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/node/h2client.js"
    );
    Command::new(node)
        .args([script, &format!("http://{addr}"), &workers.to_string()])
        .arg(ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn summary(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the node client failed");
    serde_json::from_slice(&out.stdout).expect("the client's JSON summary")
}

/// Node's `http2` with two workers sharing a session, across a drain started by SIGTERM
/// and by `/drain`: no request lost. Before: every connection opened during the drain got
/// a GOAWAY right after its first stream; Node refuses the streams it had queued when one
/// arrives, and 24-120 requests failed per drain over hundreds of sessions.
#[tokio::test]
async fn node_http2_loses_no_request_across_a_drain() {
    let Some(node) = support::tools::node() else {
        return;
    };
    for trigger in ["TERM", "drain"] {
        let up = upstream(UpOpts::default()).await;
        let mut p = Proxy::start(
            up.addr,
            &["--drain-min", "0s", "--quiet", "2s", "--drain-max", "30s"],
        );
        ready(p.admin).await;
        let client = node_h2_client(&node, p.traffic, 2, 5000);
        // The client's first session is open and busy before the drain starts.
        assert!(
            eventually(PATIENCE, || async {
                p.metric("lameduck_requests_total{code=\"200\",phase=\"serving\"}")
                    .await
                    >= 50.0
            })
            .await
        );
        let drain = match trigger {
            "TERM" => {
                p.signal("TERM");
                None
            }
            _ => {
                let admin = p.admin;
                Some(tokio::spawn(async move { get(admin, "/drain").await }))
            }
        };
        let s = tokio::task::spawn_blocking(move || summary(client))
            .await
            .unwrap();
        assert_eq!(s["failed"], 0, "{trigger}: {s}");
        assert!(s["ok"].as_u64().unwrap() > 100, "{trigger}: {s}");
        // At most one GOAWAY per session (two frames: graceful, then final), and sessions
        // live half the quiet window, not one stream.
        let sessions = s["sessions"].as_u64().unwrap();
        assert!(sessions <= 12, "{trigger}: {s}");
        if let Some(drain) = drain {
            assert_eq!(drain.await.unwrap().status, 200);
            p.signal("TERM");
        }
        let status = p.wait_exit(PATIENCE).expect("exits after the drain");
        assert_eq!(status.code(), Some(0), "{trigger}");
    }
}
