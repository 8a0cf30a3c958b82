//! `rollout -- nlb`: the Network Load Balancer story, TCP all the way.
//!
//! One pod behind a simulated NLB on loopback: the app is a TCP echo service that exits on
//! SIGTERM (its connections die with it). The NLB has three nodes (127.0.0.2–.4, client IP
//! preservation off): each TCP-health-checks the target every [`CHECK_EVERY`] (open, close
//! without a byte) and relays client connections, [`RATE`] per second in all. Each client
//! connection sends a message, reads the echo, stays open up to [`HOLD_MAX`], sends a second
//! message, reads it and closes: a connection cut while open fails. The pod is deleted at t0;
//! the NLB keeps opening connections until t0 + [`LAG`] (the controller's lag and the NLB's own
//! two minutes, scaled down), then opens none and lets the open ones finish.
//!
//! Two runs: the app alone (SIGTERM at t0), and lameduck `--mode tcp` as a native sidecar
//! (the app's preStop is `httpGet /drain`). The table says how many connections failed and
//! when the app was signalled, against the deregistration and the last connection's close.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::sim::pod::{self, Container, Pod};
use crate::sim::{Mode, Recorder};

/// New client connections per second, over all NLB nodes.
const RATE: u64 = 40;
/// A client connection stays open up to this long between its two messages.
const HOLD_MAX: Duration = Duration::from_millis(1500);
/// Each node's TCP health-check interval (NLB: 10 s or 30 s; scaled down).
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// Steady state before the pod is deleted: every node's cadence is learned by then.
const WARMUP: Duration = Duration::from_millis(2500);
/// New connections keep coming this long after t0.
const LAG: Duration = Duration::from_secs(4);
/// The pod's terminationGracePeriodSeconds (lameduck's drain-max + margin).
const GRACE: Duration = Duration::from_secs(20);
const NODES: [u8; 3] = [2, 3, 4];

/// What one run measured.
struct Report {
    label: &'static str,
    opened: u64,
    ok: u64,
    refused: u64,
    broken: u64,
    /// When the app got SIGTERM, in seconds from t0.
    app_sigterm: f64,
    /// When the last client connection closed cleanly, in seconds from t0 (negative: before).
    last_close: Option<f64>,
    drain: Option<String>,
}

#[derive(Default)]
struct Tally {
    opened: AtomicU64,
    ok: AtomicU64,
    refused: AtomicU64,
    broken: AtomicU64,
    last_close: Mutex<Option<Instant>>,
}

/// Tells the story: both runs, the table and the verdict. `Ok(false)` if lameduck lost a
/// connection or let the app go before its last connection.
pub fn story(runtime: &tokio::runtime::Runtime) -> Result<bool, String> {
    println!(
        "NLB story: 1 pod, a TCP echo app that exits on SIGTERM; 3 NLB nodes (127.0.0.2-4) \
         health-checking every {CHECK_EVERY:?} and opening {RATE} connections/s, each held up \
         to {HOLD_MAX:?}; the pod is deleted at t0, new connections stop at t0 + {LAG:?}.\n"
    );
    let mut reports = Vec::new();
    for mode in [Mode::AppAlone, Mode::Native] {
        reports.push(runtime.block_on(run(mode))?);
    }
    println!(
        "{:<28} {:>7} {:>6} {:>8} {:>11}  {:>12}  {:>11}  drain",
        "run", "opened", "ok", "refused", "reset/EOF", "app SIGTERM", "last close"
    );
    let at = |d: Option<f64>| d.map_or("-".to_owned(), |d| format!("t0{d:+.2}s"));
    for r in &reports {
        println!(
            "{:<28} {:>7} {:>6} {:>8} {:>11}  {:>12}  {:>11}  {}",
            r.label,
            r.opened,
            r.ok,
            r.refused,
            r.broken,
            at(Some(r.app_sigterm)),
            at(r.last_close),
            r.drain.as_deref().unwrap_or("-")
        );
    }
    let lameduck = &reports[1];
    let fine = lameduck.refused == 0
        && lameduck.broken == 0
        && lameduck
            .last_close
            .is_some_and(|l| lameduck.app_sigterm >= l)
        && lameduck.app_sigterm >= LAG.as_secs_f64();
    println!();
    if fine {
        println!(
            "verdict: alone, {} of {} connections failed; with lameduck --mode tcp none did, and \
             the app was signalled only after the NLB had stopped and the last connection had closed.",
            reports[0].refused + reports[0].broken,
            reports[0].opened
        );
    } else {
        println!("verdict: lameduck --mode tcp did NOT keep every connection; see the table.");
    }
    Ok(fine)
}

async fn run(mode: Mode) -> Result<Report, String> {
    let label = match mode {
        Mode::AppAlone => "app alone",
        _ => "lameduck --mode tcp (native)",
    };
    let (app, app_addr) = echo_app().await?;
    let sidecar = match mode {
        Mode::AppAlone => None,
        _ => {
            let args: Vec<String> = [
                "--mode=tcp",
                "--drain-min=0s",
                "--quiet=auto",
                "--quiet-fallback=3s",
                "--drain-max=15s",
                "--log-level=warn",
            ]
            .map(String::from)
            .to_vec();
            Some(pod::start_sidecar(app_addr, &args).await?)
        }
    };
    let pod = Arc::new(Pod { mode, app, sidecar });
    pod.ready(app_addr, Duration::from_secs(10)).await?;
    let target = pod.target(app_addr);

    let sending = Arc::new(AtomicBool::new(true));
    let tally = Arc::new(Tally::default());
    let mut nodes = Vec::new();
    for node in NODES {
        let sending = sending.clone();
        nodes.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            // Bounded: the whole run is well under this many intervals.
            for _ in 0..200 {
                tick.tick().await;
                if !sending.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(s) = connect_from([127, 0, 0, node].into(), target).await {
                    drop(s);
                }
            }
        }));
    }
    let clients = {
        let (sending, tally) = (sending.clone(), tally.clone());
        tokio::spawn(async move {
            let mut open = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            for i in 0..10_000u64 {
                tick.tick().await;
                if !sending.load(Ordering::SeqCst) {
                    break;
                }
                let tally = tally.clone();
                let source = IpAddr::from([127, 0, 0, NODES[(i % 3) as usize]]);
                let hold = HOLD_MAX.mul_f64((i * 37 % 100) as f64 / 100.0);
                open.push(tokio::spawn(client(source, target, i, hold, tally)));
            }
            for c in open {
                let _ = c.await;
            }
        })
    };

    tokio::time::sleep(WARMUP).await;
    let t0 = Instant::now();
    let rec = Recorder::new();
    let terminating = {
        let pod = pod.clone();
        let rec = rec.clone();
        tokio::spawn(async move { pod.terminate(GRACE, &rec).await })
    };
    // The app's SIGTERM: when its preStop answered (or at t0, alone). Watched from here.
    let app_exit = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.app.exited().await })
    };
    // A second /drain caller next to the app's preStop: it gets the same answer.
    let drain = pod.sidecar.as_ref().map(|s| {
        let admin = s.admin;
        tokio::spawn(async move { pod::http_get(admin, "/drain", "rollout").await })
    });
    tokio::time::sleep(LAG).await;
    sending.store(false, Ordering::SeqCst);
    let _ = clients.await;
    for n in nodes {
        let _ = n.await;
    }
    let exit = app_exit.await.map_err(|e| e.to_string())?;
    let drain = match drain {
        Some(waiter) => waiter
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .map(|j| {
                format!(
                    "{} after {:.2}s, {} connections during the drain",
                    j["reason"].as_str().unwrap_or("?"),
                    j["drain_seconds"].as_f64().unwrap_or(0.0),
                    j["requests_during_drain"]
                )
            }),
        None => None,
    };
    let _ = terminating.await;
    let last_close = *tally.last_close.lock().expect("never poisoned");
    Ok(Report {
        label,
        opened: tally.opened.load(Ordering::SeqCst),
        ok: tally.ok.load(Ordering::SeqCst),
        refused: tally.refused.load(Ordering::SeqCst),
        broken: tally.broken.load(Ordering::SeqCst),
        // The app exits at once on SIGTERM: its exit is when it was signalled.
        app_sigterm: since(t0, exit.at),
        last_close: last_close.map(|l| since(t0, l)),
        drain,
    })
}

/// Signed seconds from `t0` to `t`.
fn since(t0: Instant, t: Instant) -> f64 {
    match t.checked_duration_since(t0) {
        Some(d) => d.as_secs_f64(),
        None => -t0.duration_since(t).as_secs_f64(),
    }
}

/// The app: echoes every connection; SIGTERM's default action ends it, and its
/// connections with it.
async fn echo_app() -> Result<(Container, SocketAddr), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let std_listener = listener.into_std().map_err(|e| e.to_string())?;
    let app = Container::spawn("app", false, move |_| async move {
        let Ok(listener) = TcpListener::from_std(std_listener) else {
            return 1;
        };
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((app, addr))
}

async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    tokio::time::timeout(Duration::from_secs(5), sock.connect(target))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// One client connection through the NLB; tallied as ok, refused or broken.
async fn client(source: IpAddr, target: SocketAddr, i: u64, hold: Duration, tally: Arc<Tally>) {
    tally.opened.fetch_add(1, Ordering::SeqCst);
    let mut s = match connect_from(source, target).await {
        Ok(s) => s,
        Err(_) => {
            tally.refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let io = async {
        for part in ["first", "second"] {
            let msg = format!("{i} {part}");
            s.write_all(msg.as_bytes()).await?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await?;
            if back != msg.as_bytes() {
                return Err(std::io::Error::other("echo differs"));
            }
            if part == "first" {
                tokio::time::sleep(hold).await;
            }
        }
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), io).await {
        Ok(Ok(())) => {
            tally.ok.fetch_add(1, Ordering::SeqCst);
            *tally.last_close.lock().expect("never poisoned") = Some(Instant::now());
        }
        _ => {
            tally.broken.fetch_add(1, Ordering::SeqCst);
        }
    }
}
