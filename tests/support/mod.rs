//! Test support: the real `lameduck` binary as a child process, a real upstream app on
//! 127.0.0.1:0, and small HTTP clients. Everything on loopback, every wait bounded.
#![allow(dead_code)]

pub mod h2raw;
pub mod tools;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_lameduck");

/// The binary [`Proxy::start`] runs: this build's, or `LAMEDUCK_TEST_BIN` (to run the same
/// tests against another build, e.g. to show a test failing before a fix).
pub fn proxy_bin() -> String {
    std::env::var("LAMEDUCK_TEST_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// A fresh temporary directory (`lameduck-<name>-<pid>-<n>`), removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lameduck-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test that needs a tool from outside cargo says plainly that it skipped, in one line that
/// names the test (`SKIPPED <binary>::<test>: ...`), and is counted in the run's summary;
/// under `LAMEDUCK_REQUIRE_TOOLS=1` (CI) a missing tool is a failure instead. [`skip_tool`]
/// names the tool apart from the reason. See [`tools`].
#[allow(unused_imports)]
pub use tools::{skip, skip_tool};

/// Upper bound for any single wait in the tests.
pub const PATIENCE: Duration = Duration::from_secs(20);

// === the proxy under test ===

pub struct Proxy {
    pub child: Child,
    pub traffic: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts `lameduck proxy` on ephemeral loopback ports in front of `upstream`.
    pub fn start(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        Proxy::start_with_fd_limit(upstream, extra, None)
    }

    /// As [`Proxy::start`], with the child's file descriptor limit (soft and hard) set.
    pub fn start_with_fd_limit(upstream: SocketAddr, extra: &[&str], nofile: Option<u64>) -> Proxy {
        let up = upstream.to_string();
        let mut args = vec![
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--log-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(proxy_bin());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lameduck");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("lameduck proxy serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("proxy did not start; logs: {:?}", logs.lock().unwrap());
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
        Proxy {
            traffic: addr("listen"),
            admin: addr("admin"),
            child,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `TERM` or `INT` to the proxy.
    pub fn signal(&self, sig: &str) {
        let sig = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            other => panic!("unknown signal {other}"),
        };
        // SAFETY: kill(2) with a pid this test spawned and still owns.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
    }

    /// Waits (polling, bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = get(self.admin, "/metrics").await.text();
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === clients ===

pub struct Resp {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct H1 {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub addr: SocketAddr,
    pub closed: Arc<tokio::sync::Notify>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let closed = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, d) = (closed.clone(), done.clone());
        tokio::spawn(async move {
            let _ = conn.await;
            d.store(true, Ordering::SeqCst);
            c.notify_waiters();
        });
        H1 {
            tx,
            addr,
            closed,
            done,
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error> {
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, hyper::Error> {
        self.send(req("GET", path)).await
    }

    /// Resolves when the server closed the connection (bounded by `within`).
    pub async fn wait_closed(&self, within: Duration) -> bool {
        let notified = self.closed.notified();
        if self.is_closed() {
            return true;
        }
        tokio::time::timeout(within, notified).await.is_ok() || self.is_closed()
    }

    pub fn is_closed(&self) -> bool {
        self.done.load(Ordering::SeqCst) || self.tx.is_closed()
    }
}

pub fn req(method: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    tokio::time::timeout(PATIENCE, async {
        H1::connect(addr).await.get(path).await.expect("request")
    })
    .await
    .expect("request timed out")
}

pub async fn post(addr: SocketAddr, path: &str) -> Resp {
    tokio::time::timeout(PATIENCE, async {
        H1::connect(addr)
            .await
            .send(req("POST", path))
            .await
            .expect("request")
    })
    .await
    .expect("request timed out")
}

/// Sends raw bytes and reads until the server closes or `within` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `f` every 10 ms until it is true, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === the upstream app ===

#[derive(Clone, Default)]
pub struct UpOpts {
    /// Close idle keep-alive connections after this long (like Node's keepAliveTimeout).
    pub idle_close: Option<Duration>,
    /// Serve h2c (prior knowledge) instead of HTTP/1.1.
    pub h2: bool,
    /// The ServingStatus `/grpc.health.v1.Health/Check` answers (1 SERVING, 2 NOT_SERVING);
    /// shared, so a test can change it while the app runs.
    pub grpc_health: Arc<std::sync::atomic::AtomicU8>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A test app. Routes:
/// - `/headers`: the request's method, path and headers, one `name: value` per line
/// - `/sleep/MS`: answers after MS milliseconds
/// - `/bytes/N`: streams N bytes in 64 KiB chunks
/// - `POST /grpc.health.v1.Health/Check` (gRPC): the standard health service, answering
///   [`UpOpts::grpc_health`]
/// - `/stream/N/MS`: N 16-byte chunks, one every MS milliseconds, then trailers (`grpc-status:
///   0`, so it reads as a gRPC server-streaming call; over h2 only)
/// - `POST /sink`: reads the body and answers its length
/// - `/hop`: answers with hop-by-hop headers that must not reach the client
/// - any request with `Upgrade: echo`: 101, then echoes bytes on the upgraded connection
/// - anything else: 200 `ok`
pub async fn upstream(opts: UpOpts) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (conns, reqs, open2) = (connections.clone(), requests.clone(), open.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            open2.fetch_add(1, Ordering::SeqCst);
            let reqs = reqs.clone();
            let opts = opts.clone();
            let open = open2.clone();
            tokio::spawn(async move {
                struct Closed(Arc<AtomicUsize>);
                impl Drop for Closed {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _closed = Closed(open);
                let health = opts.grpc_health.clone();
                let svc = service_fn(move |req| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    app(req, health.load(Ordering::SeqCst))
                });
                let io = TokioIo::new(stream);
                if opts.h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new());
                    // hyper's header read timeout also runs while a keep-alive connection
                    // is idle: exactly an app's idle keep-alive timeout.
                    b.header_read_timeout(opts.idle_close.or(Some(Duration::from_secs(600))));
                    let _ = b.serve_connection(io, svc).with_upgrades().await;
                }
            });
        }
    });
    Upstream {
        addr,
        connections,
        open,
        requests,
        task,
    }
}

fn full(s: impl Into<Bytes>) -> UpBody {
    Full::new(s.into()).boxed()
}

async fn app(mut req: Request<Incoming>, grpc_health: u8) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/grpc.health.v1.Health/Check" {
        // The standard health service, by hand: one HealthCheckResponse{status}, then
        // trailers with grpc-status 0. A non-gRPC request gets 415, as gRPC servers answer.
        let grpc = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return Ok(Response::builder().status(415).body(full("")).unwrap());
        }
        let msg = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, grpc_health]);
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = futures_util::stream::iter([
            Ok::<_, Infallible>(Frame::data(msg)),
            Ok(Frame::trailers(t)),
        ]);
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(frames).boxed())
            .unwrap());
    }
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(full(""))
            .unwrap());
    }
    if path == "/headers" {
        let mut out = format!("{} {}\n", req.method(), req.uri());
        for (k, v) in req.headers() {
            out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        return Ok(Response::new(full(out)));
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        // Read the body first (a POST), then take the time.
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            n += f.data_ref().map_or(0, |d| d.len());
        }
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(full(if n > 0 {
            format!("slept after {n} bytes")
        } else {
            "slept".to_owned()
        })));
    }
    if let Some(ms) = path.strip_prefix("/stall/") {
        // One chunk, then nothing for MS milliseconds, then the end.
        let ms: u64 = ms.parse().unwrap_or(0);
        let stream = futures_util::stream::unfold(0u8, move |i| async move {
            match i {
                0 => Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first "))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"last"))), 2))
                }
                _ => None,
            }
        });
        return Ok(Response::new(StreamBody::new(stream).boxed()));
    }
    if let Some(rest) = path.strip_prefix("/stream/") {
        let (n, ms) = rest.split_once('/').unwrap_or((rest, "10"));
        let (n, ms): (usize, u64) = (n.parse().unwrap_or(1), ms.parse().unwrap_or(10));
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i > n {
                return None;
            }
            if i == n {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                return Some((Ok::<_, Infallible>(Frame::trailers(t)), i + 1));
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Some((
                Ok(Frame::data(Bytes::from_static(b"0123456789abcdef"))),
                i + 1,
            ))
        });
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(stream).boxed())
            .unwrap());
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(total, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(chunk.len());
                Some((Ok::<_, Infallible>(Frame::data(chunk.slice(..n))), left - n))
            }
        });
        return Ok(Response::builder()
            .header("content-length", total)
            .body(StreamBody::new(stream).boxed())
            .unwrap());
    }
    if path == "/sink" {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(n.to_string())));
    }
    if path == "/hop" {
        return Ok(Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-end", "kept")
            .body(full("hop"))
            .unwrap());
    }
    Ok(Response::new(full("ok")))
}
