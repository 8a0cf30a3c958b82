//! Crash-safe draining (issue 23, item 4): a sidecar that dies in the middle of a drain and
//! is restarted (outside termination; during it only on a kubelet that restarts native
//! sidecars then, KEP-4438, which v1.37.2 does not). With `--drain-record`, the restarted proxy finds the record of the drain its
//! predecessor began and resumes it: never ready, still serving, `/drain` answering once
//! traffic stops. Each test runs the real binary on 127.0.0.1 and kills it with SIGKILL,
//! as a crash would.

mod support;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::net::TcpStream;

/// The drain flags every test uses: a short quiet window, drain-max far away.
const DRAIN: [&str; 6] = ["--drain-min", "0s", "--quiet", "1s", "--drain-max", "30s"];

async fn status(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = get(admin, path).await;
    (r.status.as_u16(), r.text().trim().to_owned())
}

async fn ready(admin: SocketAddr) {
    assert!(
        eventually(PATIENCE, || async {
            status(admin, "/readyz").await.0 == 200
        })
        .await,
        "never ready"
    );
}

/// Starts `lameduck proxy` on the given ports (a restart keeps its ports, as in a pod), with
/// its stderr collected; returns at once, without waiting for it to serve.
fn spawn_at(traffic: SocketAddr, admin: SocketAddr, upstream: SocketAddr, extra: &[&str]) -> Proxy {
    let mut child = Command::new(proxy_bin())
        .args(["proxy", "--listen", &traffic.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--upstream", &upstream.to_string(), "--log-format", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lameduck");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Proxy {
        child,
        traffic,
        admin,
        logs,
    }
}

/// The first answer of a freshly started proxy's admin port to `path`: polls (bounded)
/// until the port accepts a connection, then asks once.
async fn first_answer(admin: SocketAddr, path: &str) -> (u16, String) {
    assert!(
        eventually(PATIENCE, || async {
            TcpStream::connect(admin).await.is_ok()
        })
        .await,
        "the admin port never listened"
    );
    status(admin, path).await
}

/// A GET on a fresh connection that may fail (the proxy is being killed and restarted).
async fn try_get(addr: SocketAddr) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let resp = tx.send_request(req("GET", "/")).await.ok()?;
        Some(resp.status().as_u16())
    })
    .await
    .ok()
    .flatten()
}

/// Traffic that keeps arriving (the load balancer has not deregistered the pod yet): one
/// request every 50 ms until stopped; counts the 200s.
struct Load {
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(traffic: SocketAddr) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ok2, stop2) = (ok.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // Bounded: far more rounds than any test lasts.
            for _ in 0..2_000 {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                if try_get(traffic).await == Some(200) {
                    ok2.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Load { ok, stop, task }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the load; returns when its last request has finished.
    async fn stop(self) -> Instant {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
        Instant::now()
    }
}

/// The crash: a proxy draining under load is killed with SIGKILL and restarted with the
/// same flags. Before: the restarted proxy answered `/readyz` 200 at once and a new
/// `/drain` started a fresh drain (with a binary without `--drain-record`: it exits 2 at
/// start). Now it starts draining (503 from its very first answer), keeps serving, and its
/// `/drain` answers only once the traffic has stopped for the quiet window; the record
/// stays put throughout.
#[tokio::test]
async fn a_proxy_killed_mid_drain_resumes_the_drain_when_restarted() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("crash-safe");
    let record = dir.path("draining");
    let record_arg = record.to_str().unwrap();
    let mut flags = vec!["--drain-record", record_arg];
    flags.extend(DRAIN);

    let mut first = Proxy::start(up.addr, &flags);
    let (traffic, admin) = (first.traffic, first.admin);
    ready(admin).await;
    let load = Load::start(traffic);
    assert!(
        eventually(PATIENCE, || async { load.ok() > 0 }).await,
        "no traffic got through"
    );
    assert!(!record.exists(), "no record while serving");

    assert_eq!(post(admin, "/drain?wait=false").await.status, 202);
    assert!(
        eventually(PATIENCE, || async { record.exists() }).await,
        "the drain was never recorded"
    );
    let line = std::fs::read_to_string(&record).unwrap();
    assert!(line.ends_with(" admin\n"), "{line:?}");
    assert_eq!(status(admin, "/readyz").await, (503, "draining".to_owned()));
    let doc = get(admin, "/status").await.json();
    assert_eq!(doc["state"], "draining", "{doc}");
    let started_at = doc["drain_started_at"].clone();

    // The crash.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        line,
        "the record outlives the process"
    );

    let second = spawn_at(traffic, admin, up.addr, &flags);
    assert_eq!(
        first_answer(admin, "/readyz").await,
        (503, "draining".to_owned()),
        "a restarted proxy must never say ready: logs {:?}",
        second.logs()
    );
    let status_doc = get(admin, "/status").await.json();
    assert_eq!(status_doc["state"], "draining", "{status_doc}");
    assert_eq!(status_doc["drain_resumed"], true, "{status_doc}");
    assert_eq!(second.metric("lameduck_drain_resumed_total").await, 1.0);

    // Still serving: the load balancer keeps sending.
    let before = load.ok();
    assert!(
        eventually(PATIENCE, || async { load.ok() >= before + 5 }).await,
        "the restarted proxy serves no traffic"
    );

    // The app's preStop, retried against the restarted proxy: it waits for quiet.
    let drain = tokio::spawn(async move {
        let r = post(admin, "/drain").await;
        (Instant::now(), r.status.as_u16(), r.json())
    });
    // 40 more requests, one every 50 ms or more: over two quiet windows of steady traffic,
    // and no answer yet.
    let before = load.ok();
    assert!(
        eventually(PATIENCE, || async { load.ok() >= before + 40 }).await,
        "the load stalled"
    );
    assert!(
        !drain.is_finished(),
        "/drain answered while traffic arrived"
    );
    assert!(record.exists(), "the record stays while the drain lasts");
    assert_eq!(status(admin, "/readyz").await.0, 503);

    let stopped = load.stop().await;
    let (answered, code, body) = tokio::time::timeout(PATIENCE, drain)
        .await
        .expect("/drain never answered once traffic stopped")
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "drained", "{body}");
    assert_eq!(body["reason"], "quiet", "{body}");
    let after_stop = answered.duration_since(stopped);
    assert!(
        after_stop >= Duration::from_millis(900),
        "answered {after_stop:?} after the traffic stopped, before a quiet window"
    );
    // The drain's start is the original one, from the record.
    assert_eq!(body["drain_started_at"], started_at, "{body}");
}

/// The exit-3 self-heal: a drain requested on the admin port that no termination follows
/// ends with exit 3 (the kubelet restarts the sidecar), and that path removes the record,
/// so the restart starts ready. Before: no record at all (`--drain-record` unknown, exit 2).
#[tokio::test]
async fn a_drain_that_heals_removes_the_record() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("crash-safe-heal");
    let record = dir.path("draining");
    let record_arg = record.to_str().unwrap();
    let flags = [
        "--drain-record",
        record_arg,
        "--drain-min",
        "0s",
        "--quiet",
        "1s",
        "--drain-max",
        "1s",
    ];
    let mut p = Proxy::start(up.addr, &flags);
    ready(p.admin).await;
    assert_eq!(post(p.admin, "/drain").await.status, 200);
    assert!(record.exists(), "written as the drain started");
    let status = p.wait_exit(PATIENCE).expect("exits by itself");
    assert_eq!(status.code(), Some(3));
    assert!(!record.exists(), "exit 3 removes the record");
    assert!(
        p.logs().iter().any(|l| l.contains("drain record removed")),
        "{:?}",
        p.logs()
    );

    // The kubelet's restart: ready again, nothing resumed.
    let again = Proxy::start(up.addr, &flags);
    ready(again.admin).await;
    assert_eq!(
        get(again.admin, "/status").await.json()["drain_resumed"],
        false
    );
}

/// A record that cannot be read (garbage, a half-written file from some other tool) still
/// means "a drain was in progress": the proxy starts draining, says why in its log and in
/// `lameduck_drain_record_errors_total{op="read"}`, serves, rewrites a whole record (so a
/// second crash counts from this start), and its `/drain` answers once quiet. Before: the
/// proxy started ready (or, without the flag, exited 2).
#[tokio::test]
async fn a_garbage_record_still_means_draining() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("crash-safe-garbage");
    let record = dir.path("draining");
    std::fs::write(&record, b"\x00\xffnot a record").unwrap();
    let record_arg = record.to_str().unwrap();
    let mut flags = vec!["--drain-record", record_arg];
    flags.extend(DRAIN);
    let p = Proxy::start(up.addr, &flags);
    assert_eq!(
        status(p.admin, "/readyz").await,
        (503, "draining".to_owned())
    );
    assert!(
        p.logs()
            .iter()
            .any(|l| l.contains("the drain record cannot be read")),
        "{:?}",
        p.logs()
    );
    assert_eq!(
        p.metric(r#"lameduck_drain_record_errors_total{op="read"}"#)
            .await,
        1.0
    );
    assert_eq!(get(p.traffic, "/").await.status, 200, "still serving");
    assert!(
        eventually(PATIENCE, || async {
            std::fs::read_to_string(&record).is_ok_and(|l| l.ends_with(" signal\n"))
        })
        .await,
        "the record was not rewritten whole"
    );
    let t = Instant::now();
    let r = post(p.admin, "/drain").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reason"], "quiet", "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A record that cannot be written (its directory is missing) is logged and counted, and
/// the drain goes on as it would without the flag.
#[tokio::test]
async fn a_record_that_cannot_be_written_never_stops_the_drain() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("crash-safe-unwritable");
    let record = dir.path("missing/draining");
    let record_arg = record.to_str().unwrap();
    let mut flags = vec!["--drain-record", record_arg];
    flags.extend(DRAIN);
    let p = Proxy::start(up.addr, &flags);
    ready(p.admin).await;
    assert!(
        p.logs()
            .iter()
            .any(|l| l.contains("directory does not exist")),
        "{:?}",
        p.logs()
    );
    let r = post(p.admin, "/drain").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reason"], "quiet", "{}", r.text());
    assert_eq!(
        p.metric(r#"lameduck_drain_record_errors_total{op="write"}"#)
            .await,
        1.0
    );
    assert!(
        p.logs()
            .iter()
            .any(|l| l.contains("cannot write the drain record")),
        "{:?}",
        p.logs()
    );
    assert!(!Path::new(&record).exists());
}
