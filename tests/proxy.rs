//! The traffic path, end to end: keep-alive shield, upgrades, h2c, hop-by-hop headers,
//! streaming, upstream failures, connection timeouts.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn keep_alive_shield_hides_the_apps_idle_timeout() {
    // The app closes idle keep-alive connections after 300 ms (Node does after 5 s).
    let up = upstream(UpOpts {
        idle_close: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    // Two configurations: a correct idle timeout (below the app's), and a wrong one that
    // makes lameduck reuse connections the app is closing: the retry must still hide it.
    for idle in ["200ms", "5s"] {
        let p = Proxy::start(up.addr, &["--upstream-idle-timeout", idle]);
        let mut c = H1::connect(p.traffic).await;
        let mut errors = Vec::new();
        // Requests spaced across the app's 300 ms idle close, to hit the race.
        for i in 0..24u64 {
            tokio::time::sleep(Duration::from_millis(276 + 2 * i)).await;
            match c.get("/").await {
                Ok(r) if r.status == 200 => {}
                Ok(r) => errors.push(format!("{} {}", r.status, r.text())),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let retries = p.metric("lameduck_upstream_retries_total").await;
        println!(
            "--upstream-idle-timeout {idle}: {} errors, {retries} retries",
            errors.len()
        );
        assert!(
            errors.is_empty(),
            "client saw errors with {idle}: {errors:?}"
        );
    }
}

#[tokio::test]
async fn websocket_style_upgrade_works_end_to_end() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &[]);
    let mut s = tokio::net::TcpStream::connect(p.traffic).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "EOF in response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"hello"[..], b"through the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg);
    }
    // The open tunnel is counted as a tunnel, not a request in flight (it does not hold
    // the quiet decision: tests/shutdown.rs).
    assert_eq!(p.metric("lameduck_tunnels_active").await, 1.0);
    assert_eq!(p.metric("lameduck_in_flight_requests").await, 0.0);
}

#[tokio::test]
async fn h2c_downstream_and_h2c_upstream() {
    // Downstream h2c (prior knowledge) to an HTTP/1.1 app.
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &[]);
    let r = h2_get(p.traffic, "/headers").await;
    assert_eq!(r.0, 200);
    assert!(r.1.contains("host: app.test"), "{}", r.1);

    // HTTP/1.1 downstream to an h2c app (gRPC style).
    let up2 = upstream(UpOpts {
        h2: true,
        ..Default::default()
    })
    .await;
    let p2 = Proxy::start(up2.addr, &["--upstream-protocol", "h2c"]);
    for _ in 0..5 {
        let r = get(p2.traffic, "/headers").await;
        assert_eq!(r.status, 200);
        assert!(
            r.text().starts_with("GET http://app.test/headers"),
            "{}",
            r.text()
        );
    }
    // One multiplexed connection serves them all.
    assert_eq!(up2.connections.load(Ordering::SeqCst), 1);
}

async fn h2_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://app.test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &[]);
    let mut c = H1::connect(p.traffic).await;
    let req = http::Request::get("/headers")
        .header("host", "app.test")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=30")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let seen = c.send(req).await.unwrap().text();
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "te:",
        "connection",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the app:\n{seen}");
    }
    assert!(seen.contains("host: app.test"), "{seen}");
    assert!(seen.contains("x-end-to-end: kept"), "{seen}");

    let r = c.get("/hop").await.unwrap();
    assert!(r.headers.get("x-hop").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("keep-alive").is_none(), "{:?}", r.headers);
    assert_eq!(r.headers["x-end"], "kept");
}

#[tokio::test]
async fn a_100_mb_body_streams_both_ways_in_bounded_memory() {
    const SIZE: usize = 100 * 1024 * 1024;
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &[]);
    let before = p.peak_rss_kib();

    // Upload: 100 MB streamed in 64 KiB chunks.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let stream = futures_util::stream::iter(
        (0..SIZE / chunk.len())
            .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/sink")
        .header("host", "app.test")
        .body(StreamBody::new(stream))
        .unwrap();
    let s = tokio::net::TcpStream::connect(p.traffic).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(120), tx.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), SIZE.to_string());
    let up_took = t.elapsed();

    // Download: 100 MB, read as it streams.
    let mut c = H1::connect(p.traffic).await;
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(120), c.get(&format!("/bytes/{SIZE}")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.body.len(), SIZE);
    let down_took = t.elapsed();

    let peak = p.peak_rss_kib();
    println!("upload {up_took:?}, download {down_took:?}, peak RSS {before} KiB -> {peak} KiB");
    assert!(
        peak < 48 * 1024,
        "proxy peak RSS {peak} KiB: bodies are being buffered"
    );
}

#[tokio::test]
async fn upstream_down_is_a_502_naming_the_cause() {
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = spare.local_addr().unwrap();
    drop(spare);
    let p = Proxy::start(addr, &[]);
    let r = get(p.traffic, "/").await;
    assert_eq!(r.status, 502);
    assert!(
        r.text().contains("could not connect to the app"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("refused"), "{}", r.text());
    assert_eq!(
        p.metric("lameduck_upstream_errors_total{kind=\"connect\"}")
            .await,
        1.0
    );
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"502\",phase=\"serving\"}")
            .await,
        1.0
    );
}

/// A gRPC request that lameduck cannot get answered gets a gRPC status naming the cause
/// (trailers-only: `grpc-status`, `grpc-message`), counted by the HTTP status it stands for.
/// Before: an HTTP 502 with a text body, which a gRPC client reports as "Received http2
/// header with status: 502", the cause lost.
#[tokio::test]
async fn grpc_requests_get_lameduck_errors_as_grpc_statuses() {
    async fn grpc_call(addr: std::net::SocketAddr) -> http::Response<Bytes> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("http://app.test/shop.Cart/Add")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let resp = tokio::time::timeout(PATIENCE, tx.send_request(req))
            .await
            .expect("no answer")
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        http::Response::from_parts(parts, body)
    }

    // The app is down: UNAVAILABLE (14), which clients retry.
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = spare.local_addr().unwrap();
    drop(spare);
    let p = Proxy::start(down, &["--upstream-protocol", "h2c"]);
    let r = grpc_call(p.traffic).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/grpc");
    assert_eq!(r.headers()["grpc-status"], "14");
    let message = r.headers()["grpc-message"].to_str().unwrap();
    assert!(
        message.contains("could not connect to the app"),
        "{message}"
    );
    assert!(r.body().is_empty());
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"502\",phase=\"serving\"}")
            .await,
        1.0
    );

    // The app takes the call and never answers: DEADLINE_EXCEEDED (4), not retried blindly.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = l.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let p = Proxy::start(
        silent,
        &[
            "--upstream-protocol",
            "h2c",
            "--upstream-response-timeout",
            "300ms",
        ],
    );
    let r = grpc_call(p.traffic).await;
    assert_eq!(r.headers()["grpc-status"], "4");
    assert!(
        r.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("lameduck:"),
        "{:?}",
        r.headers()
    );
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"504\",phase=\"serving\"}")
            .await,
        1.0
    );
    held.abort();
}

#[tokio::test]
async fn upstream_connect_timeout_is_a_504() {
    // A loopback listener whose accept queue is full: further SYNs go unanswered.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let p = Proxy::start(addr, &["--upstream-connect-timeout", "300ms"]);
    let r = get(p.traffic, "/").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("timed out"), "{}", r.text());
    assert_eq!(
        p.metric("lameduck_upstream_errors_total{kind=\"timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn app_dying_mid_request_is_a_502() {
    // An app that accepts, reads the request and closes without answering.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
        }
    });
    let p = Proxy::start(addr, &[]);
    let r = post(p.traffic, "/").await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("closed the connection"), "{}", r.text());
    assert_eq!(
        p.metric("lameduck_upstream_errors_total{kind=\"reset\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn idle_keep_alive_outlives_the_header_timeout_but_not_the_idle_timeout() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--header-read-timeout", "200ms", "--idle-timeout", "1500ms"],
    );
    let mut c = H1::connect(p.traffic).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    // Idle for well beyond the header timeout: still open, still usable.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !c.is_closed(),
        "header-read timeout closed an idle keep-alive connection"
    );
    assert_eq!(c.get("/").await.unwrap().status, 200);
    // Idle past the idle timeout: closed by the proxy.
    let t = Instant::now();
    assert!(
        c.wait_closed(Duration::from_secs(10)).await,
        "idle connection never closed"
    );
    println!("closed after {:?} idle", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(1000));
}

/// An app that answers the first request on each connection and drops the connection on
/// reading the second: the race of an app closing an idle connection just as it is reused.
async fn app_closing_reused_connections() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // First request: read its head (and a small body if any), answer.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
                    .await;
                // Second request: read it, then vanish without a response.
                let _ = s.read(&mut chunk).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn reused_connection_failing_is_retried_once_when_safe() {
    let addr = app_closing_reused_connections().await;
    // A long upstream idle timeout so the second request reuses the pooled connection.
    let p = Proxy::start(addr, &["--upstream-idle-timeout", "30s"]);
    let mut c = H1::connect(p.traffic).await;
    assert_eq!(c.get("/").await.unwrap().text(), "first");
    // The app drops the connection as lameduck reuses it after it sat idle (past the
    // 100 ms after which lameduck keeps a copy of the request head for a retry).
    tokio::time::sleep(Duration::from_millis(150)).await;
    // GET: idempotent and bodiless, retried on a fresh connection.
    let r = c.get("/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "first".to_owned()));
    assert_eq!(p.metric("lameduck_upstream_retries_total").await, 1.0);

    // POST with a body: never replayed; the client gets a 502 naming the cause.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let post = http::Request::post("/")
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = c.send(post).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("closed the connection"), "{}", r.text());
    assert_eq!(p.metric("lameduck_upstream_retries_total").await, 1.0);
}
