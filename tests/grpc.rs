//! gRPC end to end with a real gRPC stack (issue 12): Python grpcio as the app
//! (tests/support/grpc/app.py: a unary and a server-streaming method, and
//! grpcio-health-checking's standard `grpc.health.v1.Health`) and as the client
//! (tests/support/grpc/client.py: one kept channel, health checks on channels of their
//! own), with the real `lameduck` binary between them speaking h2c to the app, and h2c or
//! TLS (ALPN h2) to the client. Readiness follows the app's gRPC health service; health
//! checks are forwarded while serving and answered UNAVAILABLE by lameduck while draining;
//! calls and a stream in flight across a drain all succeed, the kept channel moved to a new
//! connection by lameduck's GOAWAY; the process exits 0.
//!
//! Needs `grpcio` and `grpcio-health-checking` for Python (`.ci/install-grpc.sh`); without
//! them every test prints a `SKIPPED` line and passes, unless `LAMEDUCK_REQUIRE_TOOLS=1`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value as Json;
use support::*;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc");
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const ALB: &str = "/AWS.ALB/healthcheck";
const UNARY: &str = "/test.Echo/Unary";
const STREAM: &str = "/test.Echo/Stream";
/// The server-streaming call: this many messages, this many milliseconds apart (3.2 s, far
/// longer than the calls made while it runs).
const STREAM_N: u64 = 80;
const STREAM_MS: u64 = 40;
/// How long one command of a Python helper may take: above the client's own bounds (15 s a
/// call, 20 s to wait for a stream).
const PY_PATIENCE: Duration = Duration::from_secs(30);

// === the tools ===

/// The Python with grpcio: `LAMEDUCK_GRPC_PYTHON`, else the venv `.ci/install-grpc.sh`
/// makes (never a `python3` from `PATH`). `None` (after a `SKIPPED` line naming the test)
/// when it is missing or cannot import grpc.
fn python() -> Option<String> {
    support::tools::grpc_python().map(|p| p.to_string_lossy().into_owned())
}

/// A Python helper: one command a line on its stdin, one JSON line each on its stdout.
/// Killed on drop.
struct Py {
    name: &'static str,
    child: Child,
    io: tokio::sync::Mutex<(ChildStdin, tokio::sync::mpsc::UnboundedReceiver<String>)>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Py {
    fn spawn(python: &str, script: &'static str, args: &[&str]) -> Py {
        let mut child = Command::new(python)
            .arg(Path::new(SCRIPTS).join(script))
            .args(args)
            // No __pycache__ in the source tree; every line out at once.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {python} {script}: {e}"));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (sink, err) = (stderr.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take().unwrap();
        Py {
            name: script,
            child,
            io: tokio::sync::Mutex::new((stdin, rx)),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The next line it prints, within [`PY_PATIENCE`].
    async fn line(&self) -> String {
        let mut io = self.io.lock().await;
        self.next(&mut io.1).await
    }

    async fn next(&self, rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
        match tokio::time::timeout(PY_PATIENCE, rx.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{} exited; stderr:\n{}", self.name, self.stderr()),
            Err(_) => panic!(
                "{} said nothing for {PY_PATIENCE:?}; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    /// Sends one command and returns its JSON answer; an `{"error": ...}` answer fails the
    /// test.
    async fn cmd(&self, cmd: &str) -> Json {
        let mut io = self.io.lock().await;
        writeln!(io.0, "{cmd}").unwrap_or_else(|e| panic!("{} stdin: {e}", self.name));
        io.0.flush().unwrap();
        let line = self.next(&mut io.1).await;
        let v: Json = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{} answered {line:?} to {cmd:?}: {e}", self.name));
        assert!(v.get("error").is_none(), "{}: {cmd:?}: {v}", self.name);
        v
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === the app and the client ===

/// app.py on 127.0.0.1, an ephemeral port.
struct App {
    py: Py,
    addr: SocketAddr,
}

impl App {
    async fn start(python: &str, serving: bool) -> App {
        let args: &[&str] = if serving { &[] } else { &["--not-serving"] };
        let py = Py::spawn(python, "app.py", args);
        let line = py.line().await;
        let port: u16 = line
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("app.py printed {line:?}; stderr:\n{}", py.stderr()));
        App {
            py,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// Calls of `path` the app has received.
    async fn count(&self, path: &str) -> u64 {
        self.py.cmd("counts").await[path].as_u64().unwrap_or(0)
    }
}

/// client.py, its channel to `target` (TLS trusting `root_cert` when given).
async fn client(python: &str, target: SocketAddr, root_cert: Option<&Path>) -> Py {
    let target = target.to_string();
    let mut args = vec![target.as_str()];
    let cert;
    if let Some(path) = root_cert {
        cert = path.to_str().unwrap().to_owned();
        args.extend(["--root-cert", &cert]);
    }
    let c = Py::spawn(python, "client.py", &args);
    let line = c.line().await;
    assert_eq!(line, r#"{"ready": true}"#, "stderr:\n{}", c.stderr());
    c
}

// === certificates ===

/// A CA and a serving certificate it signed for IP 127.0.0.1 and DNS localhost, as PEM
/// files: `ca.pem` (what the client trusts), `cert.pem` and `key.pem` (what lameduck serves).
struct Tls {
    dir: TempDir,
}

impl Tls {
    fn new() -> Tls {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lameduck grpc test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        assert!(
            leaf_params
                .subject_alt_names
                .contains(&rcgen::SanType::IpAddress([127, 0, 0, 1].into())),
            "an IP SAN, not a DNS name"
        );
        let key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&key, &issuer).unwrap();
        let dir = TempDir::new("grpc");
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.0.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.0.join("key.pem"), key.serialize_pem()).unwrap();
        Tls { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}

/// TLS on the traffic port is another change; until it is in this build, say so plainly.
fn assert_proxy_has_tls() {
    let out = Command::new(proxy_bin())
        .args(["proxy", "--help"])
        .output()
        .expect("lameduck proxy --help");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--tls-cert"),
        "this lameduck has no --tls-cert (TLS on the traffic port): the TLS tests need it"
    );
}

// === the proxy ===

/// lameduck in front of `app`: h2c to it, its readiness the app's gRPC health service, the
/// standard health path answered by lameduck while draining (as /AWS.ALB/healthcheck always
/// is), drain-min 0 and a short fixed quiet window; TLS on the traffic port with `tls`.
fn grpc_proxy(app: &App, tls: Option<&Tls>) -> Proxy {
    let (cert, key) = tls.map_or((String::new(), String::new()), |t| {
        (
            t.path("cert.pem").to_str().unwrap().to_owned(),
            t.path("key.pem").to_str().unwrap().to_owned(),
        )
    });
    let mut args = vec![
        "--upstream-protocol",
        "h2c",
        "--upstream-health",
        HEALTH,
        "--health-path",
        HEALTH,
        "--drain-min",
        "0s",
        "--quiet",
        "1s",
        "--drain-max",
        "20s",
    ];
    if tls.is_some() {
        assert_proxy_has_tls();
        args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    }
    Proxy::start(app.addr, &args)
}

async fn readyz(p: &Proxy) -> (u16, String) {
    let r = get(p.admin, "/readyz").await;
    (r.status.as_u16(), r.text().trim().to_owned())
}

async fn ready(p: &Proxy) {
    assert!(
        eventually(PATIENCE, || async { readyz(p).await.0 == 200 }).await,
        "never ready: {:?}",
        p.logs()
    );
}

// === the tests ===

/// `/readyz` follows the app's standard gRPC health service, not the port being open: 503
/// `starting` while the app answers NOT_SERVING (lameduck has asked it), 200 once it answers
/// SERVING, 503 `upstream-unreachable` when it goes back to NOT_SERVING.
#[tokio::test]
async fn readiness_follows_the_apps_grpc_health_service() {
    let Some(py) = python() else { return };
    let app = App::start(&py, false).await;
    let p = grpc_proxy(&app, None);
    // Every answer is 503 until the app has been asked, and said NOT_SERVING, at least once.
    let asked = eventually(PATIENCE, || async {
        let r = readyz(&p).await;
        assert_eq!(r, (503, "starting".to_owned()), "while NOT_SERVING");
        app.count(HEALTH).await >= 1
    })
    .await;
    assert!(asked, "lameduck never asked the app's health service");
    let r = readyz(&p).await;
    assert_eq!(
        r,
        (503, "starting".to_owned()),
        "after the app said NOT_SERVING"
    );
    assert_eq!(app.py.cmd("serving").await["status"], "SERVING");
    ready(&p).await;
    assert_eq!(app.py.cmd("not_serving").await["status"], "NOT_SERVING");
    assert!(
        eventually(PATIENCE, || async {
            readyz(&p).await == (503, "upstream-unreachable".to_owned())
        })
        .await,
        "still ready with the app NOT_SERVING"
    );
    // The probes were gRPC calls the app's grpcio served, and nothing else reached it.
    let counts = app.py.cmd("counts").await;
    assert_eq!(counts.as_object().unwrap().len(), 1, "{counts}");
}

#[derive(Clone, Copy, PartialEq)]
enum Trigger {
    /// SIGTERM to the proxy (lameduck as the only hook: the process drains, then exits).
    Sigterm,
    /// The admin `/drain` (the injected preStop hook), then SIGTERM once it has answered.
    AdminDrain,
}

/// The whole life of a gRPC target, with a real grpcio client on one kept channel:
/// health checks (each on a new connection, as a load balancer sends them) forwarded to the
/// app while serving; a server-streaming call started while serving and unary calls made
/// while draining all succeed, every call reaching the app once; lameduck's GOAWAY moves the
/// channel to a new connection; both health paths answered UNAVAILABLE by lameduck while
/// draining; the process exits 0.
async fn health_checks_and_calls_across_a_drain(tls: Option<Tls>, trigger: Trigger) {
    let Some(py) = python() else { return };
    let app = App::start(&py, true).await;
    let mut p = grpc_proxy(&app, tls.as_ref());
    ready(&p).await;
    let ca = tls.as_ref().map(|t| t.path("ca.pem"));
    let c = client(&py, p.traffic, ca.as_deref()).await;

    // Serving: the health checks reach the app and come back with its answers. (The app's
    // health service has also answered lameduck's readiness probes: count from here.)
    let probes = app.count(HEALTH).await;
    assert!(probes >= 1, "ready without asking the app");
    let h = c.cmd(&format!("health {HEALTH}")).await;
    assert_eq!(
        (&h["name"], &h["status"]),
        (&"OK".into(), &"SERVING".into()),
        "{h}"
    );
    let h = c.cmd(&format!("health {ALB}")).await;
    // grpcio's answer to a method it does not have: UNIMPLEMENTED, the ALB's default success
    // code for gRPC health checks.
    assert_eq!(h["code"], 12, "{h}");
    assert_eq!(h["name"], "UNIMPLEMENTED", "{h}");
    assert_eq!(app.count(HEALTH).await, probes + 1, "forwarded to the app");
    assert_eq!(app.count(ALB).await, 1, "forwarded to the app");
    let serving_checks = r#"lameduck_health_checks_total{phase="serving"}"#;
    assert_eq!(p.metric(serving_checks).await, 2.0);

    let u = c.cmd("unary 20 0").await;
    assert_eq!((&u["ok"], &u["wrong"]), (&20.into(), &0.into()), "{u}");
    let s = c
        .cmd(&format!("stream_start s {STREAM_N} {STREAM_MS}"))
        .await;
    assert!(s.get("ended_early").is_none(), "{s}");
    let connections = p.metric("lameduck_connections_total").await;

    let drain = match trigger {
        Trigger::Sigterm => {
            p.signal("TERM");
            None
        }
        Trigger::AdminDrain => {
            let admin = p.admin;
            Some(tokio::spawn(async move { post(admin, "/drain").await }))
        }
    };
    assert!(
        eventually(PATIENCE, || async { readyz(&p).await.1 == "draining" }).await,
        "never draining"
    );
    // A /readyz polled above before the signal was handled probed the app (each answer
    // waits for its probe, so all have landed): count from here.
    let probes = app.count(HEALTH).await;

    // Calls on the kept channel while draining: none fails, and lameduck's GOAWAY has moved
    // the channel to a new connection (the health checks below open their own afterwards).
    let u = c.cmd("unary 30 20").await;
    assert_eq!(u["failed"], Json::Array(vec![]), "{u}");
    assert_eq!((&u["ok"], &u["wrong"]), (&30.into(), &0.into()), "{u}");
    let now = p.metric("lameduck_connections_total").await;
    assert!(
        now > connections,
        "no new connection: {now} <= {connections}"
    );
    let states = c.cmd("states").await;
    let ready_count = states["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| *s == "READY")
        .count();
    assert!(ready_count >= 2, "the channel never reconnected: {states}");

    // Draining: both health paths answered by lameduck itself, UNAVAILABLE.
    for path in [HEALTH, ALB] {
        let h = c.cmd(&format!("health {path}")).await;
        assert_eq!(
            (&h["code"], &h["name"]),
            (&14.into(), &"UNAVAILABLE".into()),
            "{path}: {h}"
        );
        let details = h["details"].as_str().unwrap_or("");
        assert!(
            details.contains("lameduck: the pod is draining"),
            "{path}: {h}"
        );
    }
    // (A readiness probe does not run while draining: /readyz answers `draining` at once.)
    assert_eq!(
        app.count(HEALTH).await,
        probes,
        "not forwarded while draining"
    );
    assert_eq!(app.count(ALB).await, 1, "not forwarded while draining");
    let draining_checks = r#"lameduck_health_checks_total{phase="draining"}"#;
    assert_eq!(p.metric(draining_checks).await, 2.0);

    // The stream started before the drain: every message, in order, status OK.
    let s = c.cmd("stream_wait s").await;
    assert_eq!((&s["code"], &s["name"]), (&0.into(), &"OK".into()), "{s}");
    assert_eq!(s["messages"], STREAM_N, "{s}");
    assert_eq!(s["in_order"], true, "{s}");
    // Each call reached the app exactly once (no call retried after reaching it).
    assert_eq!(app.count(UNARY).await, 50);
    assert_eq!(app.count(STREAM).await, 1);

    if let Some(drain) = drain {
        let r = tokio::time::timeout(PATIENCE, drain)
            .await
            .expect("/drain answered")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["reason"], "quiet", "{v}");
        // The 30 unary calls (the stream started before), the 2 health checks counted apart.
        assert_eq!(v["requests_during_drain"], 30, "{v}");
        assert_eq!(v["health_checks_during_drain"], 2, "{v}");
        p.signal("TERM");
    }
    let status = p.wait_exit(PATIENCE).expect("exits");
    assert_eq!(status.code(), Some(0), "{:?}", p.logs());
    let bad: Vec<_> = p
        .logs()
        .into_iter()
        .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[tokio::test]
async fn h2c_health_checks_and_calls_across_a_sigterm_drain() {
    health_checks_and_calls_across_a_drain(None, Trigger::Sigterm).await;
}

#[tokio::test]
async fn h2c_health_checks_and_calls_across_an_admin_drain() {
    health_checks_and_calls_across_a_drain(None, Trigger::AdminDrain).await;
}

/// TLS on the traffic port (`--tls-cert`/`--tls-key`), ALPN h2: grpcio refuses a TLS server
/// that does not select h2, and checks the certificate's IP SAN against 127.0.0.1.
#[tokio::test]
async fn tls_health_checks_and_calls_across_a_sigterm_drain() {
    health_checks_and_calls_across_a_drain(Some(Tls::new()), Trigger::Sigterm).await;
}

#[tokio::test]
async fn tls_health_checks_and_calls_across_an_admin_drain() {
    health_checks_and_calls_across_a_drain(Some(Tls::new()), Trigger::AdminDrain).await;
}
