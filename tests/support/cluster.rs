//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager as built by `tests/cluster/build.sh`, started once per test
//! binary on 127.0.0.1 (ephemeral ports), with a throwaway data directory and certificates
//! made here. No kubelet: pods are created, admitted and validated, never run.
//!
//! [`cluster()`] finds the binaries (`LAMEDUCK_CLUSTER_BIN`, else the build script's cache
//! directory) and starts everything on first use; without binaries every test that asks for
//! it prints its own `SKIPPED` line and gets `None`, or panics under `LAMEDUCK_REQUIRE_TOOLS=1`. The processes get
//! `PR_SET_PDEATHSIG` from a thread that lives as long as the test binary, and an `atexit`
//! hook kills them and removes the data directory, so nothing outlives the tests.
//!
//! The API is reached through `kubectl` with the generated kubeconfig (admin: a static token
//! in `system:masters`). [`Cluster::namespace`] gives a test its own namespace.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value as Json;

/// The pinned versions, as `tests/cluster/build.sh` names its cache directory.
pub const KEY: &str = "k8s-v1.37.2-etcd-v3.7.0-argo-rollouts-v1.10.1-cert-manager-v1.21.2";

/// Upper bound for the control plane to come up (etcd, apiserver `/readyz`, the first
/// namespace's ServiceAccount from the controller-manager).
const STARTUP: Duration = Duration::from_secs(120);
/// Upper bound for any single wait on the API (a controller creating pods, a namespace's
/// default ServiceAccount, a webhook configuration taking effect).
pub const API_PATIENCE: Duration = Duration::from_secs(60);

const ADMIN_TOKEN: &str = "lameduck-test-admin-token";

/// CRDs build.sh copies next to the binaries, installed at startup.
const ROLLOUT_CRD: &str = "rollout-crd.yaml";
const CERT_MANAGER_CRDS: [&str; 2] = [
    "cert-manager-issuers-crd.yaml",
    "cert-manager-certificates-crd.yaml",
];

// === certificates ===

/// The test's certificate authority: signs the apiserver's serving certificate and the
/// webhook's; its PEM is the webhook configuration's caBundle.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).expect("empty SAN list is valid");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("generate a CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A serving certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid SANs");
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign a leaf");
        (cert.pem(), key.serialize_pem())
    }
}

// === the processes ===

struct Children {
    pids: Vec<i32>,
    dir: Option<PathBuf>,
}

/// Everything started so far, for the `atexit` hook.
static CHILDREN: Mutex<Children> = Mutex::new(Children {
    pids: Vec::new(),
    dir: None,
});

extern "C" fn stop_all() {
    let Ok(mut children) = CHILDREN.lock() else {
        return;
    };
    // Last started first: the controller-manager, then the apiserver, then etcd.
    for pid in children.pids.drain(..).rev() {
        // SAFETY: kill(2) on a pid this process spawned.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: reaps that child; WNOHANG is not used so the directory is free after.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    if let Some(dir) = children.dir.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Makes the child die with this process: the signal fires when the *thread* that forked
/// it exits, so control-plane processes are forked from [`spawner`]'s thread, which never does.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

type SpawnJob = (Command, std::sync::mpsc::Sender<std::io::Result<u32>>);

/// A thread that outlives every test and forks the control plane's processes.
fn spawner() -> &'static Mutex<std::sync::mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("cluster-spawner".into())
            .spawn(move || {
                // Children are reaped by `stop_all`; `Child` is dropped without waiting.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn().map(|c| c.id()));
                }
                // The senders live in a static: never reached while the binary runs.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the cluster-spawner thread");
        Mutex::new(tx)
    })
}

fn spawn_forever(mut cmd: Command, log: &Path) -> i32 {
    let out = std::fs::File::create(log).expect("create a log file");
    let err = out.try_clone().expect("clone a log file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(&mut cmd);
    let (reply, answer) = std::sync::mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .expect("the spawner thread is alive");
    let pid = answer
        .recv()
        .expect("the spawner answers")
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", log.display())) as i32;
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .push(pid);
    pid
}

fn exited(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on our own child, non-blocking.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    rc == pid
}

/// A free port on 127.0.0.1: bound to :0 and released. Another process may take it before
/// the child binds it; startup is retried on that (see [`start`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// === the cluster ===

pub struct Cluster {
    /// The throwaway data directory (etcd data, certificates, kubeconfig, logs).
    pub dir: PathBuf,
    /// Where the binaries and the CRDs are.
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    pub ca: Ca,
    next_namespace: AtomicUsize,
}

/// The control plane, started on first use; `None` (after a `SKIPPED` line naming the
/// calling test: every test that needs it says so) when the binaries or kubectl are missing
/// and `LAMEDUCK_REQUIRE_TOOLS` is not `1`.
pub fn cluster() -> Option<&'static Cluster> {
    /// Started, or why not: a skip (something is missing) or a failed start (a panic).
    enum State {
        Up(Box<Cluster>),
        Missing(&'static str, String),
    }
    static CLUSTER: OnceLock<Result<State, String>> = OnceLock::new();
    let started = CLUSTER.get_or_init(|| {
        // A failed start fails every test with the same reason, without trying again.
        std::panic::catch_unwind(|| {
            let bin = match binaries() {
                Ok(bin) => bin,
                Err(why) => return State::Missing("control plane", why),
            };
            let kubectl = match crate::tools::kubectl_spec().find() {
                Ok(kubectl) => kubectl,
                Err(why) => return State::Missing("kubectl", why),
            };
            State::Up(Box::new(start(bin, kubectl)))
        })
        .map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match started {
        Ok(State::Up(cluster)) => Some(cluster),
        Ok(State::Missing(tool, why)) => {
            crate::tools::skip_tool(tool, why);
            None
        }
        Err(reason) => panic!("the control plane did not start: {reason}"),
    }
}

/// The directory of the control plane's binaries and CRDs (`LAMEDUCK_CLUSTER_BIN`, else
/// `tests/cluster/build.sh`'s cache), or what is missing.
fn binaries() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("LAMEDUCK_CLUSTER_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("LAMEDUCK_CLUSTER_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/lameduck/cluster"))
                })
                .unwrap_or_default();
            cache.join(KEY)
        }
    };
    let missing: Vec<&str> = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        ROLLOUT_CRD,
        CERT_MANAGER_CRDS[0],
        CERT_MANAGER_CRDS[1],
    ]
    .into_iter()
    .filter(|f| !dir.join(f).is_file())
    .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    Err(format!(
        "not built in {} (missing {}); build it with `bash .ci/install-cluster.sh`",
        dir.display(),
        missing.join(", ")
    ))
}

/// Starts the control plane, retrying when a port picked by [`free_port`] was taken by
/// someone else in between.
fn start(bin: PathBuf, kubectl: PathBuf) -> Cluster {
    static DIRS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lameduck-cluster-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create the data directory");
    {
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        children.dir = Some(dir.clone());
    }
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(stop_all) };

    let began = Instant::now();
    let ca = Ca::new("lameduck-test-ca");
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write into the data directory");
        path
    };
    let ca_file = write("ca.crt", &ca.pem);
    let (cert, key) = ca.leaf(&[
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default.svc",
    ]);
    let serving_cert = write("apiserver.crt", &cert);
    let serving_key = write("apiserver.key", &key);
    let sa = KeyPair::generate().expect("generate the service-account key");
    let sa_key = write("service-account.key", &sa.serialize_pem());
    let sa_pub = write("service-account.pub", &sa.public_key_pem());
    let tokens = write(
        "tokens.csv",
        &format!("{ADMIN_TOKEN},lameduck-admin,lameduck-admin,\"system:masters\"\n"),
    );

    let mut last_failure = String::new();
    for attempt in 1..=3 {
        let etcd_client = free_port();
        let etcd_peer = free_port();
        let apiserver_port = free_port();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig = write(
            "kubeconfig",
            &serde_json::to_string_pretty(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "lameduck-test", "cluster": {
                    "server": server, "certificate-authority": ca_file,
                }}],
                "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
                "contexts": [{"name": "lameduck-test", "context": {
                    "cluster": "lameduck-test", "user": "admin",
                }}],
                "current-context": "lameduck-test",
            }))
            .expect("a kubeconfig serializes"),
        );

        let etcd_data = dir.join(format!("etcd-{attempt}"));
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args([
            "--name=lameduck-test",
            &format!("--data-dir={}", etcd_data.display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-cluster=lameduck-test=http://127.0.0.1:{etcd_peer}"),
            // Throwaway data: no fsync, much less disk traffic on a shared machine.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        let etcd_log = dir.join(format!("etcd-{attempt}.log"));
        let etcd_pid = spawn_forever(etcd, &etcd_log);

        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={apiserver_port}"),
            &format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            &format!("--tls-cert-file={}", serving_cert.display()),
            &format!("--tls-private-key-file={}", serving_key.display()),
            &format!("--client-ca-file={}", ca_file.display()),
            &format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=Node,RBAC",
            // On top of the default set, named so it is plain what the tests rely on.
            "--enable-admission-plugins=ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            &format!("--service-account-key-file={}", sa_pub.display()),
            &format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            // The advertise address is loopback, which the `kubernetes` Service's endpoints
            // may not hold: do not try.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]);
        let apiserver_log = dir.join(format!("kube-apiserver-{attempt}.log"));
        let apiserver_pid = spawn_forever(apiserver, &apiserver_log);

        let deadline = Instant::now() + STARTUP;
        let ready = loop {
            if exited(etcd_pid) || exited(apiserver_pid) {
                break false;
            }
            let out = run_kubectl(&kubectl, &kubeconfig, &["get", "--raw", "/readyz"], None);
            if out.status.success() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        if !ready {
            let etcd_tail = tail(&etcd_log, 20);
            let apiserver_tail = tail(&apiserver_log, 30);
            last_failure = format!(
                "attempt {attempt}: the apiserver did not become ready\n--- etcd\n{etcd_tail}\n--- kube-apiserver\n{apiserver_tail}"
            );
            // SAFETY: kill(2) on processes this binary spawned.
            unsafe {
                libc::kill(apiserver_pid, libc::SIGKILL);
                libc::kill(etcd_pid, libc::SIGKILL);
            }
            let in_use = |p: &Path| tail(p, 50).contains("address already in use");
            if in_use(&etcd_log) || in_use(&apiserver_log) {
                continue; // same certificates, new ports
            }
            panic!("{last_failure}");
        }
        let cluster = Cluster {
            dir: dir.clone(),
            bin: bin.clone(),
            kubeconfig: kubeconfig.clone(),
            kubectl: kubectl.clone(),
            server,
            ca,
            next_namespace: AtomicUsize::new(0),
        };

        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--secure-port=0",
            "--leader-elect=false",
            // Only what the tests use: workloads creating pods, namespaces getting their
            // default ServiceAccount (which pod admission requires), deletion.
            "--controllers=deployment-controller,replicaset-controller,statefulset-controller,job-controller,serviceaccount-controller,namespace-controller,garbage-collector-controller",
            "--use-service-account-credentials=false",
            "--v=1",
        ]);
        spawn_forever(kcm, &dir.join("kube-controller-manager.log"));

        // The controller-manager is working once `default` has its ServiceAccount.
        let deadline = Instant::now() + STARTUP;
        while !cluster
            .kubectl_raw(&["get", "serviceaccount", "default", "-n", "default"], None)
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "the controller-manager created no ServiceAccount in {STARTUP:?}\n{}",
                tail(&dir.join("kube-controller-manager.log"), 30)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        cluster.install_crds();
        let _ = writeln!(
            std::io::stderr(),
            "control plane up at {} in {:.1}s (data in {})",
            cluster.server,
            began.elapsed().as_secs_f64(),
            dir.display()
        );
        return cluster;
    }
    panic!("the control plane did not start in 3 attempts; last: {last_failure}");
}

fn run_kubectl(kubectl: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(kubectl);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--request-timeout=30s")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("run kubectl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input).expect("write kubectl's stdin");
    }
    child.wait_with_output().expect("wait for kubectl")
}

impl Cluster {
    /// Runs kubectl with the cluster's kubeconfig; `stdin` is piped in if given.
    pub fn kubectl_raw(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_kubectl(&self.kubectl, &self.kubeconfig, args, stdin)
    }

    /// Runs kubectl and returns its stdout; panics with its stderr if it fails.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.kubectl_raw(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Json {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all, None)).expect("kubectl prints JSON")
    }

    /// Creates (or updates) objects given as JSON or YAML.
    pub fn apply(&self, namespace: Option<&str>, manifest: &str) -> String {
        let mut args = vec!["apply", "-f", "-"];
        if let Some(ns) = namespace {
            args.extend_from_slice(&["-n", ns]);
        }
        self.kubectl(&args, Some(manifest.as_bytes()))
    }

    /// A fresh namespace for one test, ready for pods (its default ServiceAccount exists).
    /// Deleted (without waiting) when the guard drops.
    pub fn namespace(&'static self, label: &str) -> Namespace {
        let n = self.next_namespace.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("t{n}-{}", label.trim_matches('-'));
        self.kubectl(&["create", "namespace", &name], None);
        self.wait_for_service_account(&name);
        Namespace {
            cluster: self,
            name,
        }
    }

    /// Creates a namespace shared by tests (idempotent) and waits for its ServiceAccount.
    pub fn ensure_namespace(&self, name: &str) {
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
        });
        self.apply(None, &manifest.to_string());
        self.wait_for_service_account(name);
    }

    fn wait_for_service_account(&self, namespace: &str) {
        let found = poll(API_PATIENCE, || {
            self.kubectl_raw(&["get", "serviceaccount", "default", "-n", namespace], None)
                .status
                .success()
        });
        assert!(
            found,
            "namespace {namespace} got no default ServiceAccount in {API_PATIENCE:?}"
        );
    }

    /// The CRDs build.sh copied from the Argo Rollouts and cert-manager Go modules (only the
    /// schemas: no controller of theirs runs). Server-side apply: the Rollout CRD is too
    /// large for the last-applied annotation of a client-side apply.
    fn install_crds(&self) {
        for file in [ROLLOUT_CRD, CERT_MANAGER_CRDS[0], CERT_MANAGER_CRDS[1]] {
            let path = self.bin.join(file);
            self.kubectl(
                &[
                    "apply",
                    "--server-side",
                    "--field-manager=lameduck-tests",
                    "-f",
                    path.to_str().expect("a UTF-8 path"),
                ],
                None,
            );
        }
        for crd in [
            "rollouts.argoproj.io",
            "issuers.cert-manager.io",
            "certificates.cert-manager.io",
        ] {
            self.wait_established(crd);
        }
    }

    /// Waits (bounded) until the CustomResourceDefinition is Established. (`kubectl wait`
    /// fails instead of waiting while a new CRD has no conditions yet.)
    pub fn wait_established(&self, crd: &str) {
        let established = poll(API_PATIENCE, || {
            let out = self.kubectl_raw(&["get", "crd", crd, "-o", "json"], None);
            let crd: Json = serde_json::from_slice(&out.stdout).unwrap_or_default();
            crd["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            })
        });
        assert!(established, "CRD {crd} not Established in {API_PATIENCE:?}");
    }

    /// The apiserver's address as a socket address.
    pub fn addr(&self) -> SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .expect("the server is https://127.0.0.1:port")
    }
}

/// A test's namespace; deleted (in the background) on drop.
pub struct Namespace {
    cluster: &'static Cluster,
    pub name: String,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl_raw(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// Polls `f` every 200 ms until it is true, for at most `within`.
pub fn poll(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
