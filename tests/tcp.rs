//! `--mode tcp` end to end: the real binary in front of a real TCP app, clients and
//! simulated NLB nodes on loopback addresses (127.0.0.2–.5), every wait bounded.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use lameduck::traffic::proxy_protocol;
use support::*;

// === the app ===

#[derive(Clone, Copy)]
enum Behaviour {
    /// Echo every chunk; pass the client's FIN back once echoed.
    Echo,
    /// Read to EOF, then answer `got N` and close: only works if the FIN is passed on and
    /// the other direction still flows.
    CountThenReply,
    /// Speak first (`220 ready`, like SMTP or a database), then echo.
    GreetThenEcho,
    /// Answer a first chunk that starts with `GET ` with `200 ok` and close (an app serving
    /// HTTP health checks on its port); echo anything else.
    EchoOrHttpOk,
}

/// A TCP app on 127.0.0.1:0 that "dies on SIGTERM": [`App::kill`] closes its listener and
/// every connection at once, as a process exiting would.
struct App {
    addr: SocketAddr,
    stop: CancellationToken,
    connections: Arc<AtomicUsize>,
    /// Connections still being served when the app died.
    interrupted: Arc<AtomicUsize>,
    /// What each connection received, in order of their end.
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    killed_at: Mutex<Option<Instant>>,
}

impl App {
    async fn start(behaviour: Behaviour) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let connections = Arc::new(AtomicUsize::new(0));
        let interrupted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, c, r, i) = (
            stop.clone(),
            connections.clone(),
            received.clone(),
            interrupted.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (s, r, i) = (s.clone(), r.clone(), i.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let serve = async {
                        if let Behaviour::GreetThenEcho = behaviour {
                            stream.write_all(b"220 ready\r\n").await?;
                        }
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = stream.read(&mut buf).await?;
                            if n == 0 {
                                break;
                            }
                            match behaviour {
                                Behaviour::EchoOrHttpOk
                                    if got.is_empty() && buf.starts_with(b"GET ") =>
                                {
                                    stream.write_all(HTTP_OK).await?;
                                    break;
                                }
                                Behaviour::Echo
                                | Behaviour::GreetThenEcho
                                | Behaviour::EchoOrHttpOk => stream.write_all(&buf[..n]).await?,
                                Behaviour::CountThenReply => {}
                            }
                            if got.len() < 1 << 20 {
                                got.extend_from_slice(&buf[..n]);
                            }
                        }
                        if let Behaviour::CountThenReply = behaviour {
                            stream
                                .write_all(format!("got {}", got.len()).as_bytes())
                                .await?;
                        }
                        stream.shutdown().await
                    };
                    tokio::select! {
                        _ = s.cancelled() => {
                            i.fetch_add(1, Ordering::SeqCst);
                        }
                        _ = serve => {}
                    }
                    r.lock().unwrap().push(got);
                });
            }
        });
        App {
            addr,
            stop,
            connections,
            interrupted,
            received,
            killed_at: Mutex::new(None),
        }
    }

    fn kill(&self) {
        *self.killed_at.lock().unwrap() = Some(Instant::now());
        self.stop.cancel();
    }
}

const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n";

// === clients ===

async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    tokio::time::timeout(PATIENCE, sock.connect(target))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// An NLB TCP health check: open, close without a byte. `reset` closes with an RST.
async fn tcp_check(source: IpAddr, target: SocketAddr, reset: bool) -> std::io::Result<()> {
    let s = connect_from(source, target).await?;
    if reset {
        s.set_zero_linger()?;
    }
    drop(s);
    Ok(())
}

/// One client exchange: sends `msg`, reads the echo, keeps the connection `hold` longer,
/// then closes and reads to EOF. Errors on any mismatch, reset or early close.
async fn exchange(
    source: IpAddr,
    target: SocketAddr,
    msg: &[u8],
    hold: Duration,
) -> Result<(), String> {
    let mut s = connect_from(source, target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let io = async {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        if back != msg {
            return Err(std::io::Error::other("echo differs"));
        }
        tokio::time::sleep(hold).await;
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        if !rest.is_empty() {
            return Err(std::io::Error::other("bytes after the echo"));
        }
        Ok(())
    };
    tokio::time::timeout(PATIENCE, io)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())
}

fn tcp_proxy(app: &App, extra: &[&str]) -> Proxy {
    let mut args = vec!["--mode", "tcp"];
    args.extend_from_slice(extra);
    Proxy::start(app.addr, &args)
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

// === forwarding ===

#[tokio::test]
async fn half_close_is_passed_on_and_the_other_direction_keeps_flowing() {
    let app = App::start(Behaviour::CountThenReply).await;
    let p = tcp_proxy(&app, &[]);
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    s.write_all(&[7u8; 100_000]).await.unwrap();
    // Our FIN must reach the app (it answers only at EOF), and its answer must still reach us.
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut out))
        .await
        .expect("no answer after half-close")
        .unwrap();
    assert_eq!(out, "got 100000");
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_tcp_connection_ends_total{reason=\"closed\"}")
                .await
                == 1.0
        })
        .await
    );
    assert_eq!(
        p.metric("lameduck_tcp_bytes_total{direction=\"to_app\"}")
            .await,
        100_000.0
    );
    assert_eq!(
        p.metric("lameduck_tcp_bytes_total{direction=\"to_client\"}")
            .await,
        10.0
    );
    assert_eq!(
        p.metric("lameduck_tcp_connections_total{kind=\"traffic\",phase=\"serving\"}")
            .await,
        1.0
    );
    assert_eq!(p.metric("lameduck_mode_info{mode=\"tcp\"}").await, 1.0);
}

#[tokio::test]
async fn a_server_that_speaks_first_is_reached_before_the_client_says_anything() {
    let app = App::start(Behaviour::GreetThenEcho).await;
    let p = tcp_proxy(&app, &[]);
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut greeting))
        .await
        .expect("no greeting: the app was not connected at accept")
        .unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    s.write_all(b"EHLO\r\n").await.unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"EHLO\r\n");
}

#[tokio::test]
async fn a_large_transfer_both_ways_keeps_memory_bounded() {
    const TOTAL: usize = 128 << 20;
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(&app, &[]);
    let s = TcpStream::connect(p.traffic).await.unwrap();
    // A warm-up exchange, then the baseline.
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"hello").await.unwrap();
    let mut five = [0u8; 5];
    rd.read_exact(&mut five).await.unwrap();
    let before = p.peak_rss_kib();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xA5u8; 256 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            wr.write_all(&chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    // A slow start on the reading side: everything in between must wait, not pile up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|&b| b == 0xA5));
            got += n;
        }
    })
    .await;
    assert!(read.is_ok(), "transfer did not finish; got {got} bytes");
    writer.await.unwrap();
    assert_eq!(got, TOTAL);
    let grew = p.peak_rss_kib().saturating_sub(before);
    assert!(
        grew < 8 * 1024,
        "peak RSS grew by {grew} KiB for a {} MiB transfer",
        TOTAL >> 20
    );
}

#[tokio::test]
async fn a_connection_idle_both_ways_is_closed_after_the_idle_timeout() {
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(&app, &["--idle-timeout", "400ms"]);
    let mut busy = TcpStream::connect(p.traffic).await.unwrap();
    let mut idle = TcpStream::connect(p.traffic).await.unwrap();
    idle.write_all(b"x").await.unwrap();
    let started = Instant::now();
    // The busy one sends every 100 ms for a second: never idle, never closed.
    let mut one = [0u8; 1];
    for _ in 0..10 {
        busy.write_all(b"y").await.unwrap();
        busy.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, idle.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "idle connection not closed");
    assert_eq!(out, b"x");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        p.metric("lameduck_tcp_connection_ends_total{reason=\"idle\"}")
            .await,
        1.0
    );
    busy.write_all(b"z").await.unwrap();
    busy.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"z");
}

#[tokio::test]
async fn beyond_max_connections_new_ones_are_closed_on_arrival() {
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(&app, &["--max-connections", "2"]);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.traffic).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        open.push(s);
    }
    let mut third = TcpStream::connect(p.traffic).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(PATIENCE, third.read_to_end(&mut out))
        .await
        .expect("the third connection was not closed");
    assert!(out.is_empty(), "{r:?}");
    assert_eq!(p.metric("lameduck_connections_refused_total").await, 1.0);
    // The two served ones still work.
    for s in &mut open {
        s.write_all(b"b").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"b");
    }
}

#[tokio::test]
async fn an_unreachable_app_closes_the_client_and_is_counted() {
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let p = Proxy::start(addr, &["--mode", "tcp"]);
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut out = Vec::new();
    let r = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("client not closed");
    assert!(out.is_empty(), "{r:?}");
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_upstream_errors_total{kind=\"connect\"}")
                .await
                == 1.0
        })
        .await
    );
    assert_eq!(
        p.metric("lameduck_tcp_connection_ends_total{reason=\"upstream\"}")
            .await,
        1.0
    );
}

// === health checks ===

#[tokio::test]
async fn tcp_health_checks_are_told_from_traffic_and_learned_per_source() {
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(&app, &["--tcp-health-check-within", "300ms"]);
    // Two sources checking, one with FIN, one with RST; five checks each.
    for _ in 0..5 {
        tcp_check([127, 0, 0, 2].into(), p.traffic, false)
            .await
            .unwrap();
        tcp_check([127, 0, 0, 3].into(), p.traffic, true)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Traffic from a check source (client IP preservation off) and from a client address.
    exchange([127, 0, 0, 2].into(), p.traffic, b"hi", Duration::ZERO)
        .await
        .unwrap();
    exchange([127, 0, 0, 5].into(), p.traffic, b"hi", Duration::ZERO)
        .await
        .unwrap();
    // A silent connection that stays open past --tcp-health-check-within is a client
    // waiting for the server to speak: traffic. (The wait is the condition under test.)
    let silent = connect_from([127, 0, 0, 4].into(), p.traffic)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.metric("lameduck_in_flight_requests").await, 1.0);
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_health_checks_total{phase=\"serving\"}")
                .await
                == 10.0
        })
        .await
    );
    assert_eq!(
        p.metric("lameduck_tcp_connections_total{kind=\"health_check\",phase=\"serving\"}")
            .await,
        10.0
    );
    let s = get(p.admin, "/status").await.json();
    let mut sources: Vec<String> = s["health_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{} {}", h["address"].as_str().unwrap(), h["checks"]))
        .collect();
    sources.sort();
    assert_eq!(sources, ["127.0.0.2 5", "127.0.0.3 5"], "{s}");
    assert!(
        s["health_checks"][0]["interval_seconds"].is_number(),
        "an interval is learned after four checks: {s}"
    );
    drop(silent);
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_tcp_connections_total{kind=\"traffic\",phase=\"serving\"}")
                .await
                == 3.0
        })
        .await,
        "{}",
        get(p.admin, "/metrics").await.text()
    );
    assert_eq!(
        p.metric("lameduck_health_checks_total{phase=\"serving\"}")
            .await,
        10.0
    );
}

#[tokio::test]
async fn an_http_health_check_on_a_tcp_target_group_is_forwarded_and_learned() {
    let app = App::start(Behaviour::CountThenReply).await;
    let p = tcp_proxy(&app, &[]);
    let check: &[u8] =
        b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: ELB-HealthChecker/2.0\r\n\r\n";
    for _ in 0..2 {
        let mut s = connect_from([127, 0, 0, 2].into(), p.traffic)
            .await
            .unwrap();
        s.write_all(check).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(PATIENCE, s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        // The app answered it.
        assert_eq!(out, format!("got {}", check.len()));
    }
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_health_checks_total{phase=\"serving\"}")
                .await
                == 2.0
        })
        .await
    );
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["health_checks"][0]["address"], "127.0.0.2", "{s}");
    assert_eq!(s["health_checks"][0]["checks"], 2, "{s}");
    assert_eq!(
        p.metric("lameduck_tcp_connections_total{kind=\"traffic\",phase=\"serving\"}")
            .await,
        0.0
    );
}

// === the drain ===

/// The simulated NLB: three nodes (127.0.0.2–.4) health-check every 150–250 ms and relay
/// client connections (some from a preserved client address, 127.0.0.5) every ~40 ms. The
/// drain starts (the app's preStop calls /drain); the target is deregistered after a lag,
/// and from then on nothing new arrives, while the last connections are still open. Once
/// `/drain` answers, the app dies (the kubelet's SIGTERM), then lameduck is signalled.
#[tokio::test]
async fn nlb_drain_ends_after_the_last_connection_and_loses_nothing() {
    let app = Arc::new(App::start(Behaviour::Echo).await);
    let mut p = tcp_proxy(
        &app,
        &[
            "--quiet",
            "auto",
            "--quiet-fallback",
            "10s",
            "--drain-min",
            "0s",
            "--drain-max",
            "30s",
        ],
    );
    let target = p.traffic;
    let registered = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let last_close = Arc::new(Mutex::new(Instant::now()));
    let exchanges = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (octet, every) in [(2u8, 150u64), (3, 200), (4, 250)] {
        let (registered, failures) = (registered.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            for _ in 0..400 {
                tick.tick().await;
                if !registered.load(Ordering::SeqCst) {
                    return;
                }
                if let Err(e) = tcp_check([127, 0, 0, octet].into(), target, octet == 3).await {
                    failures.lock().unwrap().push(format!("check: {e}"));
                }
            }
        }));
    }
    let clients = {
        let (registered, failures, last_close, exchanges) = (
            registered.clone(),
            failures.clone(),
            last_close.clone(),
            exchanges.clone(),
        );
        tokio::spawn(async move {
            let mut running = Vec::new();
            for i in 0..1000u64 {
                if !registered.load(Ordering::SeqCst) {
                    break;
                }
                let source: IpAddr = [127, 0, 0, 2 + (i % 4) as u8].into();
                let (failures, last_close, exchanges) =
                    (failures.clone(), last_close.clone(), exchanges.clone());
                running.push(tokio::spawn(async move {
                    let msg = format!("message {i}");
                    // Some connections outlive the deregistration by up to 600 ms.
                    let hold = Duration::from_millis((i * 37) % 600);
                    match exchange(source, target, msg.as_bytes(), hold).await {
                        Ok(()) => {
                            exchanges.fetch_add(1, Ordering::SeqCst);
                            *last_close.lock().unwrap() = Instant::now();
                        }
                        Err(e) => failures.lock().unwrap().push(format!("{msg}: {e}")),
                    }
                }));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            for t in running {
                t.await.unwrap();
            }
        })
    };
    // Warm up: every node's interval learned (four checks each).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = get(p.admin, "/status").await.json();
    assert_eq!(s["quiet_window"], "learned", "{s}");
    let admin = p.admin;
    let drain_started = Instant::now();
    let pre_stop = {
        let app = app.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(40), post(admin, "/drain"))
                .await
                .expect("/drain never answered");
            // The kubelet: SIGTERM to the app once the hook returned.
            app.kill();
            r
        })
    };
    assert!(
        eventually(PATIENCE, || async {
            get(p.admin, "/readyz").await.status == 503
        })
        .await
    );
    // The deregistration lag: everything keeps arriving for a while, then stops.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = get(p.admin, "/status").await.json();
    assert_eq!(
        s["state"], "draining",
        "drained while traffic still arrived: {s}"
    );
    registered.store(false, Ordering::SeqCst);
    let deregistered = Instant::now();
    clients.await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let drain = pre_stop.await.unwrap();
    let answered = *app.killed_at.lock().unwrap();
    let answered = answered.expect("the app was killed");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    let n = exchanges.load(Ordering::SeqCst);
    assert!(n > 50, "only {n} exchanges");
    // The app was signalled only after its last connection had ended: none was cut by it.
    assert_eq!(app.interrupted.load(Ordering::SeqCst), 0);
    let last = *last_close.lock().unwrap();
    assert!(answered > deregistered);
    assert!(
        last > deregistered,
        "no connection outlived the deregistration: the test shows nothing"
    );
    let j = drain.json();
    assert_eq!(j["reason"], "quiet", "{j}");
    assert_eq!(j["open_at_end"], 0, "{j}");
    assert!(j["requests_during_drain"].as_u64().unwrap() > 5, "{j}");
    assert!(j["health_checks_during_drain"].as_u64().unwrap() > 5, "{j}");
    assert_eq!(j["quiet_window"], "learned", "{j}");
    assert!(drain_started.elapsed() < Duration::from_secs(15), "{j}");
    let during = p
        .metric("lameduck_tcp_connections_total{kind=\"traffic\",phase=\"draining\"}")
        .await;
    assert_eq!(during, j["requests_during_drain"].as_f64().unwrap());
    assert!(app.connections.load(Ordering::SeqCst) >= n);
    // The kubelet signals lameduck once the app has exited: it exits 0 at once.
    p.signal("TERM");
    let status = p.wait_exit(PATIENCE).expect("proxy did not exit");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_long_lived_connection_holds_the_drain_to_drain_max_and_is_reported() {
    let app = App::start(Behaviour::Echo).await;
    let mut p = tcp_proxy(
        &app,
        &["--quiet", "1s", "--drain-min", "0s", "--drain-max", "2s"],
    );
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).await.unwrap();
    let started = Instant::now();
    let admin = p.admin;
    let pre_stop = tokio::spawn(async move { post(admin, "/drain").await });
    // It keeps flowing while draining.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(b"pong").await.unwrap();
    s.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"pong");
    let j = tokio::time::timeout(PATIENCE, pre_stop)
        .await
        .expect("/drain did not answer at drain-max")
        .unwrap()
        .json();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert_eq!(j["reason"], "max", "{j}");
    assert_eq!(j["open_at_end"], 1, "{j}");
    let oldest = j["oldest_open_seconds"].as_f64().unwrap();
    assert!((2.0..5.0).contains(&oldest), "{j}");
    assert!(
        eventually(PATIENCE, || async {
            p.logs()
                .iter()
                .any(|l| l.contains("1 connection(s) still open"))
        })
        .await,
        "{:?}",
        p.logs()
    );
    // Still open after the drain, until the exit cuts it.
    s.write_all(b"late").await.unwrap();
    s.read_exact(&mut four).await.unwrap();
    p.signal("TERM");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "not cut at exit");
    let status = p.wait_exit(PATIENCE).expect("proxy did not exit");
    assert_eq!(status.code(), Some(0));
}

// === failing the health checks while draining (issue 23.3) ===

/// An NLB HTTP health check on the traffic port, from an NLB node's address: the response's
/// status line.
async fn http_check(target: SocketAddr) -> String {
    let mut s = connect_from([127, 0, 0, 2].into(), target).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: ELB-HealthChecker/2.0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer to the check");
    let out = String::from_utf8_lossy(&out).into_owned();
    out.lines().next().unwrap_or_default().to_owned()
}

/// One round trip on an echo connection.
async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(back, msg);
}

/// Closes our side and expects a clean end (FIN, no byte, no reset).
async fn close_cleanly(mut s: TcpStream) {
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("not closed")
        .expect("reset instead of a FIN");
    assert_eq!(n, 0);
}

async fn ready(p: &Proxy) {
    assert!(
        eventually(PATIENCE, || async {
            get(p.admin, "/readyz").await.status == 200
        })
        .await,
        "never ready"
    );
}

/// With `--fail-health-while-draining` (for an NLB target group that drains unhealthy
/// targets), the load balancer's HTTP health checks fail while the pod drains, on the admin
/// port's `/lb-health` and on the traffic port, while a connection opened before the drain
/// keeps flowing both ways through it and a new connection is still accepted and relayed.
/// Before: no such flag (exit 2), and the checks always passed.
#[tokio::test]
async fn fail_health_while_draining_fails_the_checks_and_keeps_every_connection() {
    let app = App::start(Behaviour::EchoOrHttpOk).await;
    let p = tcp_proxy(
        &app,
        &[
            "--fail-health-while-draining",
            "--quiet",
            "1s",
            "--drain-min",
            "0s",
            "--drain-max",
            "30s",
        ],
    );
    ready(&p).await;
    // Serving: the app answers the checks on the traffic port; /lb-health says ready.
    assert_eq!(http_check(p.traffic).await, "HTTP/1.1 200 OK");
    assert_eq!(get(p.admin, "/lb-health").await.status, 200);
    let mut long = connect_from([127, 0, 0, 5].into(), p.traffic)
        .await
        .unwrap();
    echo(&mut long, b"opened before the drain").await;

    let admin = p.admin;
    let pre_stop = tokio::spawn(async move { post(admin, "/drain").await });
    assert!(
        eventually(PATIENCE, || async {
            get(p.admin, "/readyz").await.status == 503
        })
        .await
    );
    // Draining: both checks fail, answered by lameduck.
    assert_eq!(
        http_check(p.traffic).await,
        "HTTP/1.1 503 Service Unavailable"
    );
    let r = get(p.admin, "/lb-health").await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (503, "draining\n".to_owned())
    );
    // The old connection flows both ways; a new one is accepted and relayed.
    echo(&mut long, b"during the drain").await;
    let mut late = connect_from([127, 0, 0, 6].into(), p.traffic)
        .await
        .unwrap();
    echo(&mut late, b"a new connection during the drain").await;
    echo(&mut long, &[0x5A; 100_000]).await;
    assert_eq!(
        p.metric("lameduck_health_checks_total{phase=\"draining\"}")
            .await,
        1.0
    );
    assert_eq!(get(p.admin, "/status").await.json()["state"], "draining");
    close_cleanly(late).await;
    close_cleanly(long).await;

    let j = tokio::time::timeout(PATIENCE, pre_stop)
        .await
        .expect("/drain did not answer")
        .unwrap()
        .json();
    assert_eq!(j["reason"], "quiet", "{j}");
    assert_eq!(j["open_at_end"], 0, "{j}");
    assert_eq!(j["requests_during_drain"], 1, "{j}");
    // Still failing once drained; nothing was cut or reset.
    let r = get(p.admin, "/lb-health").await;
    assert_eq!((r.status.as_u16(), r.text()), (503, "drained\n".to_owned()));
    assert_eq!(app.interrupted.load(Ordering::SeqCst), 0);
    assert_eq!(
        p.metric("lameduck_tcp_connection_ends_total{reason=\"error\"}")
            .await,
        0.0
    );
}

/// Without the flag (the default) the checks keep passing through the drain: with the target
/// group's default connection termination, an NLB resets every connection of a target that
/// turns unhealthy.
#[tokio::test]
async fn without_fail_health_while_draining_the_checks_keep_passing() {
    let app = App::start(Behaviour::EchoOrHttpOk).await;
    let p = tcp_proxy(
        &app,
        &["--quiet", "1s", "--drain-min", "0s", "--drain-max", "30s"],
    );
    ready(&p).await;
    assert_eq!(post(p.admin, "/drain?wait=false").await.status, 202);
    assert_eq!(get(p.admin, "/readyz").await.status, 503);
    // Forwarded: the app answers.
    assert_eq!(http_check(p.traffic).await, "HTTP/1.1 200 OK");
    tcp_check([127, 0, 0, 3].into(), p.traffic, false)
        .await
        .unwrap();
    let r = get(p.admin, "/lb-health").await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, "draining\n".to_owned())
    );
    assert_eq!(get(p.admin, "/status").await.json()["state"], "draining");
}

#[test]
fn fail_health_while_draining_is_refused_in_http_mode() {
    let out = std::process::Command::new(proxy_bin())
        .args(["proxy", "--fail-health-while-draining"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--fail-health-while-draining needs --mode tcp"),
        "{err}"
    );
}

// === PROXY protocol v2 ===

fn v4(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

/// Sends `bytes`, half-closes, returns what came back (the echo app's view) or `None` if
/// the connection was closed without a byte.
async fn send_and_collect(target: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(target).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("not closed");
    out
}

#[tokio::test]
async fn proxy_protocol_strip_and_pass() {
    let header = proxy_protocol::encode(
        Some((v4("203.0.113.9:40000"), v4("10.0.0.1:8080"))),
        &[0xEA, 0x00, 0x02, 0x01, 0x02],
    );
    let mut stream = header.clone();
    stream.extend_from_slice(b"payload");

    let app = App::start(Behaviour::Echo).await;
    let strip = tcp_proxy(&app, &["--proxy-protocol", "strip"]);
    assert_eq!(send_and_collect(strip.traffic, &stream).await, b"payload");
    let pass = tcp_proxy(&app, &["--proxy-protocol", "pass"]);
    assert_eq!(send_and_collect(pass.traffic, &stream).await, stream);
    // What the app itself read on each connection.
    let received = app.received.lock().unwrap().clone();
    assert_eq!(received, [b"payload".to_vec(), stream]);
}

#[tokio::test]
async fn proxy_protocol_malformed_headers_are_closed_and_counted() {
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(
        &app,
        &[
            "--proxy-protocol",
            "strip",
            "--header-read-timeout",
            "300ms",
        ],
    );
    let good = proxy_protocol::encode(Some((v4("198.51.100.1:1"), v4("10.0.0.1:2"))), &[]);
    let mut bad_version = good.clone();
    bad_version[12] = 0x11;
    let cases: [(&str, Vec<u8>); 4] = [
        ("signature", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
        ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec()),
        ("version", bad_version),
        ("truncated", good[..20].to_vec()),
    ];
    for (kind, bytes) in &cases {
        let out = send_and_collect(p.traffic, bytes).await;
        assert!(out.is_empty(), "{kind}: the app answered {out:?}");
        let name = format!("lameduck_proxy_protocol_errors_total{{kind=\"{kind}\"}}");
        assert!(
            eventually(PATIENCE, || async { p.metric(&name).await == 1.0 }).await,
            "{kind} not counted"
        );
    }
    // A header that never completes.
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    s.write_all(&good[..10]).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("incomplete header not closed")
        .ok();
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_proxy_protocol_errors_total{kind=\"timeout\"}")
                .await
                == 1.0
        })
        .await
    );
    // None reached the app.
    assert_eq!(app.connections.load(Ordering::SeqCst), 0);
    assert!(p.logs().iter().all(|l| !l.contains("\"level\":\"ERROR\"")));
    assert_eq!(
        p.metric("lameduck_tcp_connection_ends_total{reason=\"proxy_protocol\"}")
            .await,
        5.0
    );
}

#[tokio::test]
async fn a_health_check_behind_proxy_protocol_is_learned_against_the_header_source() {
    let app = App::start(Behaviour::Echo).await;
    let p = tcp_proxy(&app, &["--proxy-protocol", "pass"]);
    // A PROXY header naming the node, then a close: a check from 10.9.8.7.
    let header = proxy_protocol::encode(Some((v4("10.9.8.7:1234"), v4("10.0.0.1:8080"))), &[]);
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.traffic).await.unwrap();
        s.write_all(&header).await.unwrap();
        drop(s);
    }
    // A LOCAL header (no addresses) then a close: from the socket's peer.
    let mut s = TcpStream::connect(p.traffic).await.unwrap();
    s.write_all(&proxy_protocol::encode(None, &[]))
        .await
        .unwrap();
    drop(s);
    // And a check with no header at all.
    tcp_check(LOCAL, p.traffic, false).await.unwrap();
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_health_checks_total{phase=\"serving\"}")
                .await
                == 4.0
        })
        .await
    );
    let s = get(p.admin, "/status").await.json();
    let mut got: Vec<String> = s["health_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{} {}", h["address"].as_str().unwrap(), h["checks"]))
        .collect();
    got.sort();
    assert_eq!(got, ["10.9.8.7 2", "127.0.0.1 2"], "{s}");
}

// === flags ===

#[test]
fn tcp_only_flags_are_refused_in_http_mode() {
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--proxy-protocol", "strip"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--proxy-protocol needs --mode tcp"), "{err}");
}
