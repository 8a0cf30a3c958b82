//! The traffic path tried as an attacker would (issue 10): requests that must not reach the
//! app as sent, framing that must not desync, and connections that must not be held open.
//! Each case failed before its fix. The slow cases (floods, fd exhaustion, soak) live in
//! `benches/battery.sh`.

mod support;

use std::time::{Duration, Instant};

use support::h2raw::{End, Frame, H2};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);

async fn start(extra: &[&str]) -> (Upstream, Proxy) {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, extra);
    (up, p)
}

#[tokio::test]
async fn headers_are_forwarded_safely() {
    let (up, p) = start(&[]).await;
    // Two Host headers: 400, never forwarded.
    let r = raw(
        p.traffic,
        b"GET /headers HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        T,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // HTTP/1.0 without Host goes upstream as HTTP/1.1 with an (empty) Host.
    let r = raw(p.traffic, b"GET /headers HTTP/1.0\r\n\r\n", T).await;
    assert!(r.starts_with("HTTP/1.0 200"), "{r}");
    assert!(r.contains("\nhost: \n"), "{r}");
    // `Connection` cannot remove Host or the forwarding headers.
    let r = raw(
        p.traffic,
        b"GET /headers HTTP/1.1\r\nHost: app.local\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: host, x-forwarded-for, close\r\n\r\n",
        T,
    )
    .await;
    assert!(r.contains("host: app.local\n"), "{r}");
    assert!(r.contains("x-forwarded-for: 1.2.3.4\n"), "{r}");
    // Absolute-form: the target's authority wins over a different Host.
    let r = raw(
        p.traffic,
        b"GET http://real.example/headers HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        T,
    )
    .await;
    assert!(r.contains("host: real.example\n"), "{r}");
    assert!(r.contains("GET /headers\n"), "{r}");
    // CONNECT is refused, not rewritten to `CONNECT /`.
    let r = raw(
        p.traffic,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        T,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    // A transfer coding other than chunked: 501, not forwarded with the coding lost.
    let r = raw(
        p.traffic,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        T,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 501"), "{r}");
    // The /headers requests above that reached the app, and nothing else.
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// Content-Length and Transfer-Encoding together, pipelined behind a normal request: hyper
/// frames it by the transfer coding (RFC 9112 §6.3), drops the Content-Length and closes
/// the connection after answering, and lameduck frames the request to the app itself, so
/// what follows in the same bytes can never become a request of its own.
#[tokio::test]
async fn conflicting_framing_cannot_smuggle_a_request() {
    let (up, p) = start(&[]).await;
    let r = raw(
        p.traffic,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        T,
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
    assert!(r.ends_with("\r\n\r\n0"), "the POST's body was empty: {r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// An app answering with both Content-Length and chunked: the transfer coding wins, and its
/// Content-Length is removed. Before: the client got `Content-Length: 3` and a cut body.
#[tokio::test]
async fn app_response_with_both_framings_reaches_the_client_whole() {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                    .await;
            });
        }
    });
    let p = Proxy::start(addr, &[]);
    let r = raw(
        p.traffic,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        T,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("content-length: 3"), "{r}");
    let body: String = r
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .filter(|l| !l.is_empty() && u64::from_str_radix(l, 16).is_err())
        .collect();
    assert_eq!(body, "hello world", "{r}");
}

/// Sends `bytes` one at a time, about 10 a second (bounded: 10 s), until the proxy closes
/// the connection; whether it did.
async fn trickle_until_closed(c: &mut TcpStream, bytes: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    for b in bytes {
        if Instant::now() > deadline {
            return false;
        }
        if c.write_all(&[*b]).await.is_err() {
            return true;
        }
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await {
            if matches!(r, Ok(0) | Err(_)) {
                return true;
            }
        }
    }
    false
}

/// A slowloris whose first byte is `P` (a prefix of the HTTP/2 preface) gets the header
/// timeout like any other. Before: exempt, open after 170 s.
#[tokio::test]
async fn a_slowloris_starting_with_p_is_closed_at_the_header_timeout() {
    let (_up, p) = start(&["--header-read-timeout", "500ms"]).await;
    let mut c = TcpStream::connect(p.traffic).await.unwrap();
    c.write_all(b"P").await.unwrap();
    let t = Instant::now();
    // The trickle's pace: `P` arrives alone, as the proxy's whole first read.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = trickle_until_closed(&mut c, b"OST / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await;
    let took = t.elapsed();
    assert!(closed, "still open after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// The protocol is told from the first bytes however they arrive: an HTTP/1 head and the
/// HTTP/2 preface, each split across writes with a pause, are served as what they are.
#[tokio::test]
async fn heads_and_prefaces_arriving_in_pieces_are_served() {
    let (_up, p) = start(&["--header-read-timeout", "2s"]).await;
    for at in [1, 3, 16, 23] {
        let mut h = H2::connect_split(p.traffic, Some(at)).await;
        h.request(1, "GET", "/", &[]).await;
        let got = h
            .until(Duration::from_secs(5), |f| {
                matches!(f, Frame::Headers { stream: 1, .. })
            })
            .await;
        assert!(got.is_ok(), "preface split at {at}: {:?}", h.seen);
    }
    for at in [1, 2, 5] {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut c = TcpStream::connect(p.traffic).await.unwrap();
        c.write_all(&head[..at]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(&head[at..]).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200", "head split at {at}");
    }
}

/// At the idle timeout an h2 connection gets GOAWAY and a PING; a client that never acks
/// the PING is closed after another idle period. Before: kept for ever.
#[tokio::test]
async fn h2_idle_timeout_closes_a_peer_that_never_acks() {
    let (_up, p) = start(&["--idle-timeout", "500ms"]).await;
    let mut h = H2::connect(p.traffic).await;
    h.ack_pings = false;
    h.request(1, "GET", "/", &[]).await;
    let end = h.until_end(Duration::from_secs(8)).await;
    assert_eq!(end, Ok(End::Fin), "{:?}", h.seen);
    assert!(h.seen.contains(&Frame::GoAway {
        last_stream: (1 << 31) - 1,
        code: 0
    }));
}

/// An app that never answers: 504 naming the timeout, counted. Before: nothing after 130 s.
#[tokio::test]
async fn a_stalled_app_gets_a_504_naming_the_timeout() {
    let (_up, p) = start(&["--upstream-response-timeout", "400ms"]).await;
    let t = Instant::now();
    let r = get(p.traffic, "/sleep/5000").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.text().contains("--upstream-response-timeout"),
        "{}",
        r.text()
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        p.metric("lameduck_upstream_errors_total{kind=\"response_timeout\"}")
            .await,
        1.0
    );
}

/// An app that stops sending in the middle of its body: the response is ended, counted.
#[tokio::test]
async fn a_response_body_that_stalls_is_ended() {
    let (_up, p) = start(&["--upstream-body-timeout", "400ms"]).await;
    let t = Instant::now();
    let r = raw(
        p.traffic,
        b"GET /stall/10000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(8),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("first"), "{r}");
    assert!(!r.contains("last"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_upstream_errors_total{kind=\"body_timeout\"}")
                .await
                == 1.0
        })
        .await
    );
}

/// A request body trickled a byte at a time gets 408 and both connections are freed.
/// Before: held for as long as the client liked. A broken chunked body is the client's
/// fault: 400, counted as a client error, not an upstream one, and no warning per request.
#[tokio::test]
async fn slow_and_broken_request_bodies_are_the_clients_fault() {
    let (_up, p) = start(&["--request-body-timeout", "500ms"]).await;
    let mut c = TcpStream::connect(p.traffic).await.unwrap();
    c.write_all(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    for _ in 0..40 {
        if c.write_all(b"x").await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(150), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // The rest of the answer, to the close.
                let _ = tokio::time::timeout(T, c.read_to_end(&mut out)).await;
                break;
            }
            Err(_) => {}
        }
    }
    let r = String::from_utf8_lossy(&out);
    assert!(
        r.starts_with("HTTP/1.1 408"),
        "{r:?} after {:?}",
        t.elapsed()
    );
    assert!(r.contains("--request-body-timeout"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    let r = raw(
        p.traffic,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n",
        T,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(
        p.metric("lameduck_client_errors_total{kind=\"request_body_timeout\"}")
            .await,
        1.0
    );
    assert_eq!(
        p.metric("lameduck_client_errors_total{kind=\"request_body\"}")
            .await,
        1.0
    );
    assert_eq!(
        p.metric("lameduck_upstream_errors_total{kind=\"request_body\"}")
            .await,
        0.0
    );
    assert!(
        !p.logs()
            .iter()
            .any(|l| l.contains("WARN") || l.contains("\"level\":\"WARN\"")),
        "{:?}",
        p.logs()
    );
}

/// With the file descriptor limit at 256, a flood of idle connections cannot starve the
/// admin port or an existing client. Before: `502 … Too many open files`, and `/livez`
/// stopped answering (a liveness failure caused from outside).
#[tokio::test]
async fn a_connection_flood_cannot_exhaust_file_descriptors() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start_with_fd_limit(up.addr, &[], Some(256));
    let mut existing = H1::connect(p.traffic).await;
    assert_eq!(existing.get("/").await.unwrap().status, 200);
    let mut flood = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(p.traffic).await {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    // Let the proxy accept (and refuse) them all.
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_connections_refused_total").await >= 150.0
        })
        .await,
        "refused: {}",
        p.metric("lameduck_connections_refused_total").await
    );
    assert_eq!(get(p.admin, "/livez").await.status, 200);
    assert_eq!(get(p.admin, "/readyz").await.status, 200);
    assert_eq!(existing.get("/").await.unwrap().status, 200);
    let s = get(p.admin, "/status").await.json();
    assert!(s["connections"].as_u64().unwrap() <= 96, "{s}");
    drop(flood);
}

/// 300 concurrent `/readyz` share one probe of the app. Before: about one app connection
/// each (500 calls opened ~494).
#[tokio::test]
async fn readiness_probes_share_one_app_probe() {
    let (up, p) = start(&[]).await;
    let admin = p.admin;
    let calls: Vec<_> = (0..300)
        .map(|_| tokio::spawn(async move { get(admin, "/readyz").await.status }))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let opened = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 5, "{opened} app connections for 300 probes");
}

/// Keep-alive app connections are reused without false retries under concurrency, and the
/// ones a burst left idle are closed once past `--upstream-idle-timeout`. Before: checkout
/// handed out connections hyper had not made ready (dropped, reconnected, counted as
/// retries), and nothing closed idle ones (up to 1,024 after a spike).
#[tokio::test]
async fn the_app_pool_reuses_without_false_retries_and_reaps_idle_connections() {
    let (up, p) = start(&["--upstream-idle-timeout", "500ms"]).await;
    let traffic = p.traffic;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = H1::connect(traffic).await;
                for _ in 0..50 {
                    assert_eq!(c.get("/").await.unwrap().status, 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(p.metric("lameduck_upstream_retries_total").await, 0.0);
    let opened = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 24, "{opened} app connections for 16 clients");
    // A burst of slow requests opens one app connection each; idle afterwards, they close.
    let burst: Vec<_> = (0..40)
        .map(|_| tokio::spawn(async move { get(traffic, "/sleep/200").await.status }))
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    assert!(up.open.load(std::sync::atomic::Ordering::SeqCst) >= 20);
    assert!(
        eventually(Duration::from_secs(5), || async {
            up.open.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await,
        "{} app connections still open",
        up.open.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// `--upstream-health /grpc.health.v1.Health/Check` speaks the standard gRPC health
/// service over h2c: ready while the app answers SERVING, not ready once it answers
/// NOT_SERVING. Before: readiness sent a plain GET, which a gRPC server refuses, and the pod
/// never became ready.
#[tokio::test]
async fn readiness_speaks_the_grpc_health_service() {
    // SERVING.
    let health = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(1));
    let up = upstream(UpOpts {
        h2: true,
        grpc_health: health.clone(),
        ..Default::default()
    })
    .await;
    let p = Proxy::start(
        up.addr,
        &[
            "--upstream-protocol",
            "h2c",
            "--upstream-health",
            "/grpc.health.v1.Health/Check",
        ],
    );
    assert!(
        eventually(PATIENCE, || async {
            get(p.admin, "/readyz").await.status == 200
        })
        .await,
        "never ready: {:?}",
        p.logs()
    );
    health.store(2, std::sync::atomic::Ordering::SeqCst); // NOT_SERVING
    assert!(
        eventually(PATIENCE, || async {
            let r = get(p.admin, "/readyz").await;
            r.status == 503 && r.text().trim() == "upstream-unreachable"
        })
        .await
    );
    // Without h2c, the gRPC health path is a bad flag, not a pod that never gets ready.
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--upstream-health", "/grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream-protocol h2c"));
}

/// A slowloris that first sits idle (as a keep-alive connection may) and only then trickles
/// a head: closed at the header timeout from its first byte. Before (found by
/// benches/battery.sh): the watchdog slept until the idle deadline, so only
/// `--idle-timeout` bounded it.
#[tokio::test]
async fn a_slowloris_after_an_idle_spell_is_closed_at_the_header_timeout() {
    let (_up, p) = start(&["--header-read-timeout", "500ms", "--idle-timeout", "60s"]).await;
    let mut c = TcpStream::connect(p.traffic).await.unwrap();
    // Idle first, well past the header timeout.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let t = Instant::now();
    let closed = trickle_until_closed(
        &mut c,
        b"Host: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )
    .await;
    let took = t.elapsed();
    assert!(closed, "still open {took:?} after its first byte");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A steady slow upload (above the request body's minimum rate) that takes longer than
/// `--upstream-response-timeout`: answered by the app, not 504. The response clock starts
/// when the body has been sent whole. Before (found by benches/battery.sh): 504 mid-upload.
#[tokio::test]
async fn a_slow_upload_is_not_a_slow_app() {
    let (_up, p) = start(&[
        "--upstream-response-timeout",
        "500ms",
        "--request-body-timeout",
        "2s",
    ])
    .await;
    let mut c = TcpStream::connect(p.traffic).await.unwrap();
    c.write_all(
        b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 8192\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..8 {
        c.write_all(&[b'x'; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, c.read_to_end(&mut out)).await;
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("8192"), "{r}");
}
