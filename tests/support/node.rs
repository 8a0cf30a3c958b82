//! A real Kubernetes node for the tests (tests/node.rs): etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on the host side, and one node (containerd, runc,
//! the CNI bridge, a kubelet) in a network and mount namespace of its own, plus a load balancer
//! stand-in (HAProxy and a lagging controller of our own, [`Lb`]) and an open-loop load
//! generator ([`Load`]).
//!
//! What keeps the machine untouched (details in docs/node-tier.md and NODE-NOTES):
//! - a *holder* process (`unshare --net --mount`) owns the node's namespaces; inside its
//!   private mount namespace tmpfs covers `/var/lib`, `/var/log` and `/run`, and the kernel
//!   tunables the kubelet insists on are files bind-mounted over `/proc/sys/...`
//!   (`protectKernelDefaults: true`: the kubelet only reads them);
//! - a veth pair in `10.213.<k>.0/30` and the pod CIDR `10.214.<k>.0/24` routed to the node
//!   side: nothing is sent to any address outside these ranges and loopback; no iptables rule
//!   is added on the host (the CNI bridge has `ipMasq: false`);
//! - every daemon runs in the `pids` cgroup `lameduck-node-<pid>/daemons` and the kubelet's
//!   `cgroupRoot` is `lameduck-node-<pid>/pods`: tear-down kills that whole tree (shims and
//!   containers included), then the holder (its namespaces and mounts go with it), deletes the
//!   veth and the cgroups and removes the throwaway directory. It runs from an `atexit` hook,
//!   so it runs whether the tests passed or failed.
//!
//! Images come from the build, without a registry: the lameduck image is the binary this
//! `cargo test` built, at `/usr/local/bin/lameduck` as the Dockerfile's final stage lays it
//! out, user 65532, no shell, with the glibc files it links (distroless `cc` carries glibc
//! too); the app and the pause are static C programs (tests/node/*.c) compiled here. They are
//! imported with `ctr -n k8s.io images import` as docker archives; pods use
//! `imagePullPolicy: Never`.
#![allow(dead_code)]

#[path = "cluster.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::io::{BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use cluster::poll;
use cluster::{die_with_parent, free_port, Ca};
use serde_json::{json, Value as Json};

/// The pinned Kubernetes version: `tests/node/build.sh` caches the kubelet, scheduler and
/// kube-proxy under `~/.cache/lameduck/node/<this>`; the control plane is tests/cluster's.
pub const NODE_KEY: &str = "k8s-v1.37.2";
pub const NODE_NAME: &str = "lameduck-node";
pub const APP_IMAGE: &str = "lameduck.test/app:1";
pub const LAMEDUCK_IMAGE: &str = "lameduck.test/lameduck:1";
pub const PAUSE_IMAGE: &str = "lameduck.test/pause:1";
/// The pod readiness gate the stand-in controller sets, as the AWS Load Balancer
/// Controller's `target-health.elbv2.k8s.aws/<target group binding>`.
pub const GATE: &str = "target-health.lameduck.test/web";
/// The app's port in its container (the naive app's argv).
pub const APP_PORT: u16 = 8080;

const ADMIN_TOKEN: &str = "lameduck-node-admin-token";
/// Upper bound for the whole node to come up.
const STARTUP: Duration = Duration::from_secs(120);
/// Upper bound for one wait on the API (pods Ready, pods gone, a rollout step).
pub const PATIENCE: Duration = Duration::from_secs(90);

const LAMEDUCK_BIN: &str = env!("CARGO_BIN_EXE_lameduck");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Seconds since the epoch, as every timestamp of this module (the kubelet's klog lines, the
/// CRI log lines and the load generator's records share it).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

// === skipping ===

/// Under `LAMEDUCK_REQUIRE_TOOLS=1` a missing tool (or not being root) fails the test;
/// else one `SKIPPED <test>: <reason>` line on stderr, counted for the run's summary
/// (`tests/support/tools.rs`).
pub fn skip(test: &str, msg: &str) {
    crate::tools::skip(&format!("{test}: {msg}"));
}

/// A tool from Debian's packages (`.ci/install-node.sh`), where Debian puts it: never
/// whatever comes first on `PATH`.
fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn cache_dir(var: &str, sub: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/lameduck")
            .join(sub)
    })
}

/// Where tests/node/build.sh put the kubelet, kube-scheduler and kube-proxy.
fn node_bin() -> PathBuf {
    std::env::var_os("LAMEDUCK_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir("LAMEDUCK_NODE_CACHE", "node").join(NODE_KEY))
}

const CNI_DIR: &str = "/usr/lib/cni";

/// Everything the tier needs, or the first thing missing.
struct Tools {
    cluster_bin: PathBuf,
    node_bin: PathBuf,
    kubectl: PathBuf,
}

fn tools() -> Result<Tools, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (the node tier needs namespaces, mounts, cgroups, veths)".into());
    }
    let cluster_bin = std::env::var_os("LAMEDUCK_CLUSTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir("LAMEDUCK_CLUSTER_CACHE", "cluster").join(cluster::KEY));
    for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !cluster_bin.join(b).is_file() {
            return Err(format!(
                "{b} not in {} (run .ci/install-cluster.sh)",
                cluster_bin.display()
            ));
        }
    }
    let node_bin = node_bin();
    for b in ["kubelet", "kube-scheduler"] {
        if !node_bin.join(b).is_file() {
            return Err(format!(
                "{b} not in {} (run .ci/install-node.sh)",
                node_bin.display()
            ));
        }
    }
    let kubectl = Some(PathBuf::from("/usr/local/bin/kubectl"))
        .filter(|p| p.is_file())
        .or_else(|| which("kubectl"))
        .ok_or("kubectl not found (run .ci/install-k8s-tools.sh)")?;
    for t in [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "haproxy",
        "nsenter",
        "unshare",
        "ip",
        "gcc",
        "tar",
    ] {
        if which(t).is_none() {
            return Err(format!("{t} not found (run .ci/install-node.sh)"));
        }
    }
    for p in ["bridge", "host-local"] {
        if !Path::new(CNI_DIR).join(p).is_file() {
            return Err(format!(
                "CNI plugin {CNI_DIR}/{p} not found (run .ci/install-node.sh)"
            ));
        }
    }
    Ok(Tools {
        cluster_bin,
        node_bin,
        kubectl,
    })
}

// === processes and tear-down ===

#[derive(Default)]
struct Teardown {
    /// Processes this binary started, in order (holder first).
    pids: Vec<i32>,
    holder: Option<i32>,
    /// `lameduck-node-<pid>`, in every cgroup v1 hierarchy.
    cgroup: Option<String>,
    veth: Option<String>,
    dir: Option<PathBuf>,
}

static TEARDOWN: Mutex<Teardown> = Mutex::new(Teardown {
    pids: Vec::new(),
    holder: None,
    cgroup: None,
    veth: None,
    dir: None,
});

fn teardown_state() -> std::sync::MutexGuard<'static, Teardown> {
    TEARDOWN.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill_and_reap(pid: i32) {
    // SAFETY: kill and waitpid on a child of this process that was not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// The cgroup v1 hierarchies mounted under /sys/fs/cgroup.
fn hierarchies() -> Vec<PathBuf> {
    mounted_cgroups(&["cgroup"])
}

/// Every cgroup mount: the v1 hierarchies and, in hybrid mode, the v2 one (runc makes the
/// containers' cgroups there too).
fn all_hierarchies() -> Vec<PathBuf> {
    mounted_cgroups(&["cgroup", "cgroup2"])
}

fn mounted_cgroups(kinds: &[&str]) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && kinds.contains(&f[2])).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Every cgroup directory under `top`, deepest first.
fn cgroup_tree(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_path_buf());
    }
    if top.is_dir() {
        walk(top, &mut out);
    }
    out
}

/// The processes in the node's cgroups (daemons, shims, containers).
pub fn cgroup_pids(cgroup: &str) -> Vec<i32> {
    let top = Path::new("/sys/fs/cgroup/pids").join(cgroup);
    cgroup_tree(&top)
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

extern "C" fn stop_all() {
    teardown();
}

/// Kills everything of the node's and removes what it made. Idempotent.
pub fn teardown() {
    let mut t = teardown_state();
    let holder = t.holder.take();
    // Everything but the holder, last started first.
    let pids: Vec<i32> = t.pids.drain(..).rev().collect();
    for &pid in pids.iter().filter(|&&p| Some(p) != holder) {
        kill_and_reap(pid);
    }
    if let Some(cg) = t.cgroup.as_deref() {
        // Shims re-parent themselves away from containerd, containers live in the kubelet's
        // pod cgroups: the cgroup tree finds them all.
        for _ in 0..200 {
            let left = cgroup_pids(cg);
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill(2) on a process in this test's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    if let Some(pid) = holder {
        kill_and_reap(pid);
    }
    if let Some(veth) = t.veth.take() {
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
    }
    if let Some(cg) = t.cgroup.take() {
        for h in all_hierarchies() {
            for d in cgroup_tree(&h.join(&cg)) {
                for _ in 0..40 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
    }
    if let Some(dir) = t.dir.take() {
        if std::env::var_os("LAMEDUCK_NODE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

type SpawnJob = (Command, std::sync::mpsc::Sender<std::io::Result<u32>>);

/// A thread that outlives every test and forks the node's processes: `PR_SET_PDEATHSIG`
/// fires when the forking *thread* exits.
fn spawner() -> &'static Mutex<std::sync::mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("node-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn().map(|c| c.id()));
                }
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the node-spawner thread");
        Mutex::new(tx)
    })
}

/// Starts `cmd` with stdout and stderr into `log`, killed with this process, recorded for
/// tear-down.
fn spawn(mut cmd: Command, log: &Path) -> i32 {
    let out = std::fs::File::create(log).expect("create a log file");
    let err = out.try_clone().expect("clone a log file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    spawn_with(cmd, log)
}

fn spawn_with(mut cmd: Command, what: &Path) -> i32 {
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
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", what.display())) as i32;
    teardown_state().pids.push(pid);
    pid
}

/// Kills one process started by [`spawn`] and forgets it.
fn stop(pid: i32) {
    let mut t = teardown_state();
    if let Some(i) = t.pids.iter().position(|&p| p == pid) {
        t.pids.remove(i);
        kill_and_reap(pid);
    }
}

fn exited(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on our own child, non-blocking.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion; panics with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === the node ===

pub struct Node {
    pub dir: PathBuf,
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    /// Host side of the veth (the apiserver and HAProxy's health checks come from here).
    pub host_ip: Ipv4Addr,
    /// The node's address (`--node-ip`).
    pub node_ip: Ipv4Addr,
    /// `10.214.<k>.0/24`.
    pub pod_cidr: String,
    pub veth: String,
    pub holder: i32,
    pub cgroup: String,
    pub kubelet_log: PathBuf,
    pub pod_logs: PathBuf,
    /// Every container log line the node wrote (followed while pods run: the kubelet deletes
    /// a pod's log directory with the pod).
    pub logs: PodLogs,
    /// The test CA (the apiserver's serving certificate, the webhook's).
    pub ca: Ca,
    next_namespace: AtomicUsize,
}

/// The node, started on first use; `None` after a `SKIPPED:` line when something is missing
/// and `LAMEDUCK_REQUIRE_TOOLS` is not `1`.
pub fn node(test: &str) -> Option<&'static Node> {
    let tools = match tools() {
        Ok(tools) => tools,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
    let started = NODE.get_or_init(|| {
        // A failed start fails every test with the same reason, without trying again.
        std::panic::catch_unwind(|| start(tools)).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match started {
        Ok(node) => Some(node),
        Err(reason) => panic!("the node did not start: {reason}"),
    }
}

/// Whether the tier can run, without starting anything (a `SKIPPED:` line if not).
pub fn available(test: &str) -> bool {
    match tools() {
        Ok(_) => true,
        Err(why) => {
            skip(test, &why);
            false
        }
    }
}

/// A `/24` pair no address or route of this machine uses yet.
fn pick_ranges() -> u32 {
    let addrs = run(Command::new("ip").args(["-o", "addr"]));
    let routes = run(Command::new("ip").args(["route"]));
    let links = run(Command::new("ip").args(["-o", "link"]));
    let start = std::process::id() % 240;
    (0..240)
        .map(|i| (start + i) % 240 + 10)
        .find(|k| {
            let a = format!("10.213.{k}.");
            let b = format!("10.214.{k}.");
            let v = format!("ldh{k}");
            ![&addrs, &routes]
                .iter()
                .any(|t| t.contains(&a) || t.contains(&b))
                && !links.contains(&v)
        })
        .expect("a free 10.213.k/10.214.k pair")
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> PathBuf {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create a directory");
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// `sh -c` that joins the daemons' cgroup, then execs the rest.
fn in_cgroup(cgroup: &str, program: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"echo $$ > "$0" && exec "$@""#,
        &format!("/sys/fs/cgroup/pids/{cgroup}/daemons/cgroup.procs"),
        program,
    ]);
    cmd
}

/// The kernel tunables the kubelet checks with `protectKernelDefaults: true`, and the
/// values it wants (pkg/kubelet/cm/container_manager_linux.go `setupKernelTunables`).
const TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

fn start(tools: Tools) -> Node {
    let began = Instant::now();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("lameduck-node-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the node directory");
    let cgroup = format!("lameduck-node-{pid}");
    {
        let mut t = teardown_state();
        t.dir = Some(dir.clone());
        t.cgroup = Some(cgroup.clone());
    }
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(stop_all) };

    // --- cgroups: the kubelet's root (in every hierarchy) and the daemons' (pids) ---
    for h in hierarchies() {
        for sub in ["", "/pods"] {
            let d = h.join(format!("{cgroup}{sub}"));
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            if h.ends_with("cpuset") {
                let parent = d.parent().expect("a parent").to_path_buf();
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                    write(&d.join(f), v.trim());
                }
            }
        }
    }
    std::fs::create_dir_all(format!("/sys/fs/cgroup/pids/{cgroup}/daemons"))
        .expect("create the daemons' cgroup");

    // --- the holder: network + private mount namespace ---
    let mut binds = String::new();
    for (key, want) in TUNABLES {
        let proc_path = format!("/proc/sys/{key}");
        let have = std::fs::read_to_string(&proc_path).unwrap_or_default();
        if have.trim() != want {
            let fake = write(&dir.join("sysctl").join(key.replace('/', ".")), want);
            binds.push_str(&format!("mount --bind {} {proc_path} && ", fake.display()));
        }
    }
    let ready = dir.join("holder.ready");
    let script = format!(
        "mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /var/log && \
         mount -t tmpfs tmpfs /run && {binds} ip link set lo up && \
         touch {} && exec sleep infinity",
        ready.display()
    );
    let mut holder_cmd = in_cgroup(&cgroup, "unshare");
    holder_cmd.args([
        "--net",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let holder = spawn(holder_cmd, &dir.join("holder.log"));
    teardown_state().holder = Some(holder);
    assert!(
        poll(Duration::from_secs(10), || ready.exists() || exited(holder)) && ready.exists(),
        "the namespace holder did not come up: {}",
        tail(&dir.join("holder.log"), 20)
    );
    let ns = |args: &[&str]| -> String {
        run(Command::new("nsenter")
            .args(["-t", &holder.to_string(), "-m", "-n", "--"])
            .args(args))
    };

    // --- the veth and the routes ---
    let k = pick_ranges();
    let host_ip = Ipv4Addr::new(10, 213, k as u8, 1);
    let node_ip = Ipv4Addr::new(10, 213, k as u8, 2);
    let pod_cidr = format!("10.214.{k}.0/24");
    let veth = format!("ldh{k}");
    let peer = format!("ldn{k}");
    teardown_state().veth = Some(veth.clone());
    run(Command::new("ip").args([
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        &holder.to_string(),
    ]));
    run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &veth]));
    run(Command::new("ip").args(["link", "set", &veth, "up"]));
    ns(&["ip", "addr", "add", &format!("{node_ip}/30"), "dev", &peer]);
    ns(&["ip", "link", "set", &peer, "up"]);
    run(Command::new("ip").args(["route", "add", &pod_cidr, "via", &node_ip.to_string()]));
    // Forwarding between the veth and the pods' bridge, in the node's namespace only.
    ns(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);

    // --- images ---
    let images = build_images(&dir);

    // --- containerd, in the node's namespaces ---
    let cdir = dir.join("containerd");
    let sock = cdir.join("containerd.sock");
    let cni_conf = dir.join("cni/net.d");
    write(
        &cni_conf.join("10-lameduck.conflist"),
        json!({
            "cniVersion": "0.4.0", "name": "lameduck-node",
            "plugins": [{
                "type": "bridge", "bridge": "ldbr0", "isGateway": true, "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr, "gateway": format!("10.214.{k}.1")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("cni/ipam"),
                },
            }],
        })
        .to_string(),
    );
    let config = write(
        &cdir.join("config.toml"),
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM's processes lack CAP_SYS_RESOURCE: no oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{cni_conf}"
"#,
            root = cdir.join("root").display(),
            state = cdir.join("state").display(),
            sock = sock.display(),
            opt = cdir.join("opt").display(),
            cni_conf = cni_conf.display(),
        ),
    );
    let mut containerd = in_cgroup(&cgroup, "nsenter");
    containerd.args(["-t", &holder.to_string(), "-m", "-n", "--", "containerd"]);
    containerd.arg(format!("--config={}", config.display()));
    let containerd_log = dir.join("containerd.log");
    let containerd_pid = spawn(containerd, &containerd_log);
    let ctr = |args: &[&str]| -> Output {
        Command::new("ctr")
            .arg(format!("--address={}", sock.display()))
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("run ctr")
    };
    assert!(
        poll(Duration::from_secs(30), || {
            !exited(containerd_pid) && ctr(&["version"]).status.success()
        }),
        "containerd did not come up:\n{}",
        tail(&containerd_log, 30)
    );
    for image in &images {
        let out = ctr(&["images", "import", image.to_str().expect("UTF-8 path")]);
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // --- the control plane, on the host side of the veth ---
    let ca = Ca::new("lameduck-node-ca");
    let ca_file = write(&dir.join("pki/ca.crt"), &ca.pem);
    let (cert, key) = ca.leaf(&[&host_ip.to_string(), "kubernetes", "localhost"]);
    let serving_cert = write(&dir.join("pki/apiserver.crt"), cert);
    let serving_key = write(&dir.join("pki/apiserver.key"), key);
    let sa = rcgen::KeyPair::generate().expect("generate the service-account key");
    let sa_key = write(&dir.join("pki/sa.key"), sa.serialize_pem());
    let sa_pub = write(&dir.join("pki/sa.pub"), sa.public_key_pem());
    let tokens = write(
        &dir.join("pki/tokens.csv"),
        format!("{ADMIN_TOKEN},lameduck-admin,lameduck-admin,\"system:masters\"\n"),
    );
    let etcd_client = free_port();
    let etcd_peer = free_port();
    let api_port = free_port();
    let server = format!("https://{host_ip}:{api_port}");
    let kubeconfig = write(
        &dir.join("kubeconfig"),
        serde_json::to_string_pretty(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "node", "cluster": {
                "server": server, "certificate-authority": ca_file}}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "node", "context": {"cluster": "node", "user": "admin"}}],
            "current-context": "node",
        }))
        .expect("a kubeconfig serializes"),
    );
    let cb = &tools.cluster_bin;
    let mut etcd = Command::new(cb.join("etcd"));
    etcd.args([
        "--name=node",
        &format!("--data-dir={}", dir.join("etcd").display()),
        &format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
        &format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
        &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
        &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
        &format!("--initial-cluster=node=http://127.0.0.1:{etcd_peer}"),
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]);
    spawn(etcd, &dir.join("etcd.log"));
    let mut apiserver = Command::new(cb.join("kube-apiserver"));
    apiserver.args([
        &format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        &format!("--bind-address={host_ip}"),
        &format!("--advertise-address={host_ip}"),
        &format!("--secure-port={api_port}"),
        &format!("--cert-dir={}", dir.join("apiserver-certs").display()),
        &format!("--tls-cert-file={}", serving_cert.display()),
        &format!("--tls-private-key-file={}", serving_key.display()),
        &format!("--client-ca-file={}", ca_file.display()),
        &format!("--token-auth-file={}", tokens.display()),
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=ServiceAccount",
        &format!("--service-account-key-file={}", sa_pub.display()),
        &format!("--service-account-signing-key-file={}", sa_key.display()),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]);
    let apiserver_log = dir.join("kube-apiserver.log");
    let apiserver_pid = spawn(apiserver, &apiserver_log);
    let kube = |args: &[&str]| run_kubectl(&tools.kubectl, &kubeconfig, args, None);
    assert!(
        poll(STARTUP, || {
            !exited(apiserver_pid) && kube(&["get", "--raw", "/readyz"]).status.success()
        }),
        "the apiserver did not become ready:\n{}",
        tail(&apiserver_log, 30)
    );
    let mut kcm = Command::new(cb.join("kube-controller-manager"));
    kcm.args([
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--secure-port=0",
        "--leader-elect=false",
        // What a Deployment's rolling update and a Service's EndpointSlices need.
        "--controllers=deployment-controller,replicaset-controller,endpointslice-controller,serviceaccount-controller,namespace-controller,garbage-collector-controller",
        "--use-service-account-credentials=false",
        "--v=1",
    ]);
    let kcm_log = dir.join("kube-controller-manager.log");
    let kcm_pid = spawn(kcm, &kcm_log);
    let mut scheduler = Command::new(tools.node_bin.join("kube-scheduler"));
    scheduler.args([
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--secure-port=0",
        "--leader-elect=false",
        "--v=1",
    ]);
    spawn(scheduler, &dir.join("kube-scheduler.log"));

    // The controller-manager works once `default` has its ServiceAccount.
    assert!(
        poll(STARTUP, || {
            !exited(kcm_pid)
                && kube(&["get", "serviceaccount", "default", "-n", "default"])
                    .status
                    .success()
        }),
        "the controller-manager created no ServiceAccount:\n{}",
        tail(&kcm_log, 30)
    );

    // --- the kubelet ---
    let kdir = dir.join("kubelet");
    let pod_logs = dir.join("pod-logs");
    std::fs::create_dir_all(kdir.join("manifests")).expect("mkdir");
    std::fs::create_dir_all(&pod_logs).expect("mkdir");
    let resolv = write(&dir.join("resolv.conf"), "");
    let kubelet_config = write(
        &kdir.join("config.json"),
        json!({
            "kind": "KubeletConfiguration",
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "address": node_ip.to_string(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{cgroup}/pods"),
            "failCgroupV1": false,
            "failSwapOn": false,
            "protectKernelDefaults": true,
            "evictionHard": {
                "memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%",
                "imagefs.available": "0%", "imagefs.inodesFree": "0%", "pid.available": "0%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": false,
            "shutdownGracePeriod": "0s",
            "shutdownGracePeriodCriticalPods": "0s",
            "maxPods": 24,
            "staticPodPath": kdir.join("manifests"),
            "podLogsDir": pod_logs,
            "volumePluginDir": kdir.join("volume-plugins"),
            "resolvConf": resolv,
            "containerRuntimeEndpoint": format!("unix://{}", sock.display()),
            "makeIPTablesUtilChains": false,
            "serializeImagePulls": false,
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        })
        .to_string(),
    );
    let mut kubelet = in_cgroup(&cgroup, "nsenter");
    kubelet.args(["-t", &holder.to_string(), "-m", "-n", "--"]);
    kubelet.arg(tools.node_bin.join("kubelet"));
    kubelet.args([
        &format!("--config={}", kubelet_config.display()),
        &format!("--kubeconfig={}", kubeconfig.display()),
        &format!("--root-dir={}", kdir.join("root").display()),
        &format!("--cert-dir={}", kdir.join("pki").display()),
        &format!("--hostname-override={NODE_NAME}"),
        &format!("--node-ip={node_ip}"),
        // "Running preStop hook" and "PreStop hook completed" are V(3).
        "--v=3",
        // klog flushes every 5 s by default: the tests read the log right after the fact.
        "--log-flush-frequency=100ms",
    ]);
    let kubelet_log = dir.join("kubelet.log");
    let kubelet_pid = spawn(kubelet, &kubelet_log);

    let node_json = || -> Json {
        let out = kube(&["get", "node", NODE_NAME, "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let ready = poll(STARTUP, || {
        assert!(
            !exited(kubelet_pid),
            "the kubelet exited:\n{}",
            tail(&kubelet_log, 40)
        );
        node_json()["status"]["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    assert!(
        ready,
        "the node did not become Ready in {STARTUP:?}:\n{}",
        tail(&kubelet_log, 40)
    );
    // Without the node-lifecycle controller nothing lifts the registration taint.
    if node_json()["spec"]["taints"]
        .as_array()
        .is_some_and(|t| !t.is_empty())
    {
        let _ = kube(&[
            "taint",
            "node",
            NODE_NAME,
            "node.kubernetes.io/not-ready:NoSchedule-",
        ]);
    }
    assert!(
        poll(API_WAIT, || {
            node_json()["spec"]["taints"]
                .as_array()
                .is_none_or(|t| t.is_empty())
        }),
        "the node kept its taints: {}",
        node_json()["spec"]["taints"]
    );
    let logs = PodLogs::follow(pod_logs.clone());
    let _ = writeln!(
        std::io::stderr(),
        "node {NODE_NAME} Ready in {:.1}s: apiserver {server}, node {node_ip}, pods {pod_cidr}, \
         holder {holder}, veth {veth}, cgroup {cgroup}, dir {}",
        began.elapsed().as_secs_f64(),
        dir.display()
    );
    Node {
        dir,
        kubectl: tools.kubectl,
        kubeconfig,
        server,
        host_ip,
        node_ip,
        pod_cidr,
        veth,
        holder,
        cgroup,
        kubelet_log,
        pod_logs,
        logs,
        ca,
        next_namespace: AtomicUsize::new(0),
    }
}

const API_WAIT: Duration = Duration::from_secs(30);

// === images ===

/// A docker-archive tarball of one layer made from `rootfs`.
fn image_archive(dir: &Path, name: &str, tag: &str, rootfs: &Path, config: Json) -> PathBuf {
    let work = dir.join(format!("image-{name}"));
    std::fs::create_dir_all(&work).expect("mkdir");
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let bytes = std::fs::read(&layer).expect("read the layer");
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{hex}")]},
    });
    write(&work.join("config.json"), config.to_string());
    write(
        &work.join("manifest.json"),
        json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]).to_string(),
    );
    let archive = dir.join(format!("{name}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&work)
        .arg("-cf")
        .arg(&archive)
        .args(["manifest.json", "config.json", "layer.tar"]));
    let _ = std::fs::remove_dir_all(&work);
    archive
}

fn gcc_static(src: &Path, out: &Path) {
    run(Command::new("gcc")
        .args(["-Os", "-static", "-o"])
        .arg(out)
        .arg(src));
}

/// The pause, app and lameduck images.
fn build_images(dir: &Path) -> Vec<PathBuf> {
    let rootfs = |name: &str| {
        let d = dir.join(format!("rootfs-{name}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };
    let pause = rootfs("pause");
    gcc_static(&root().join("tests/node/pause.c"), &pause.join("pause"));
    let app = rootfs("app");
    gcc_static(&root().join("tests/node/app.c"), &app.join("app"));

    // lameduck as the Dockerfile's final stage has it: /usr/local/bin/lameduck, user 65532,
    // no shell. This is the binary `cargo test` built (dynamic): its glibc files go in too,
    // at the paths its loader looks them up (distroless "cc" carries the same glibc).
    let ld = rootfs("lameduck");
    let bin = ld.join("usr/local/bin/lameduck");
    std::fs::create_dir_all(bin.parent().expect("a parent")).expect("mkdir");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&bin)
        .arg(LAMEDUCK_BIN)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(LAMEDUCK_BIN, &bin).expect("copy the lameduck binary");
    }
    let ldd = run(Command::new("ldd").arg(LAMEDUCK_BIN));
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let dest = ld.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().expect("a parent")).expect("mkdir");
            std::fs::copy(p, &dest).unwrap_or_else(|e| panic!("copy {p}: {e}"));
        }
    }
    std::fs::create_dir_all(ld.join("tmp")).expect("mkdir");
    write(
        &ld.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    );
    let path_env = json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    vec![
        image_archive(
            dir,
            "pause",
            PAUSE_IMAGE,
            &pause,
            json!({"Entrypoint": ["/pause"], "User": "65535:65535"}),
        ),
        image_archive(
            dir,
            "app",
            APP_IMAGE,
            &app,
            json!({"Entrypoint": ["/app"], "Env": path_env, "User": "65532:65532"}),
        ),
        image_archive(
            dir,
            "lameduck",
            LAMEDUCK_IMAGE,
            &ld,
            json!({"Entrypoint": ["lameduck"], "Env": path_env, "User": "65532:65532",
                   "ExposedPorts": {"9900/tcp": {}, "9901/tcp": {}, "8443/tcp": {}}}),
        ),
    ]
}

// === the API ===

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

impl Node {
    pub fn kubectl_raw(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_kubectl(&self.kubectl, &self.kubeconfig, args, stdin)
    }

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

    pub fn get_json(&self, args: &[&str]) -> Json {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all, None)).expect("kubectl prints JSON")
    }

    pub fn apply(&self, namespace: &str, manifest: &str) -> String {
        self.kubectl(
            &["apply", "-n", namespace, "-f", "-"],
            Some(manifest.as_bytes()),
        )
    }

    /// A fresh namespace with its default ServiceAccount; on drop every pod in it is
    /// deleted (the kubelet runs their termination) and the namespace goes.
    pub fn namespace(&'static self, label: &str) -> Namespace {
        let n = self.next_namespace.fetch_add(1, Ordering::Relaxed);
        let name = format!("n{n}-{label}");
        self.kubectl(&["create", "namespace", &name], None);
        assert!(
            poll(PATIENCE, || self
                .kubectl_raw(&["get", "serviceaccount", "default", "-n", &name], None)
                .status
                .success()),
            "namespace {name} got no default ServiceAccount"
        );
        Namespace { node: self, name }
    }

    /// The pods of a namespace, by name.
    pub fn pods(&self, namespace: &str) -> Vec<Json> {
        self.get_json(&["pods", "-n", namespace])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The kubelet's log lines about one pod (`pod="<ns>/<name>"`), parsed.
    pub fn kubelet_lines(&self, namespace: &str, pod: &str) -> Vec<KlogLine> {
        let needle = format!("pod=\"{namespace}/{pod}\"");
        let text = std::fs::read_to_string(&self.kubelet_log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(&needle))
            .filter_map(KlogLine::parse)
            .collect()
    }
}

pub struct Namespace {
    node: &'static Node,
    pub name: String,
}

impl Namespace {
    /// Deletes every workload and pod and waits (bounded) until the node has run their
    /// termination, so the next test starts on an empty node.
    pub fn clean(&self) {
        // A Rollout first, or it recreates its pods (where its CRD is installed).
        let _ = self.node.kubectl_raw(
            &[
                "delete",
                "rollouts.argoproj.io",
                "--all",
                "-n",
                &self.name,
                "--wait=false",
            ],
            None,
        );
        let _ = self.node.kubectl_raw(
            &[
                "delete",
                "deployments,replicasets,pods,services",
                "--all",
                "-n",
                &self.name,
                // Only cleaning up: a short grace period for pods that still drain.
                "--grace-period=5",
                "--wait=false",
            ],
            None,
        );
        let gone = poll(Duration::from_secs(200), || {
            self.node
                .kubectl_raw(&["get", "pods", "-n", &self.name, "-o", "name"], None)
                .stdout
                .is_empty()
        });
        if !gone {
            let _ = self.node.kubectl_raw(
                &[
                    "delete",
                    "pods",
                    "--all",
                    "-n",
                    &self.name,
                    "--grace-period=0",
                    "--force",
                ],
                None,
            );
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.clean();
        let _ = self
            .node
            .kubectl_raw(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

// === the Argo Rollouts controller ===

pub const ARGO_ROLLOUTS_KEY: &str = "argo-rollouts-v1.10.1";

/// Where tests/node/build-argo.sh put the controller and its CRDs, if it did.
fn argo_dir() -> Result<PathBuf, String> {
    let dir = cache_dir("LAMEDUCK_NODE_CACHE", "node").join(ARGO_ROLLOUTS_KEY);
    if dir.join("rollouts-controller").is_file() && dir.join("rollout-crd.yaml").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "the Argo Rollouts controller is not in {} (run .ci/install-node.sh)",
            dir.display()
        ))
    }
}

/// Whether the Argo Rollouts controller is built (a `SKIPPED:` line if not).
pub fn argo_available(test: &str) -> bool {
    match argo_dir() {
        Ok(_) => true,
        Err(why) => {
            skip(test, &why);
            false
        }
    }
}

impl Node {
    /// The real Argo Rollouts controller (v1.10.1), started once: its CRDs installed, the
    /// admin kubeconfig, no leader election, AWS target-group verification off (the
    /// default) so no AWS API is called, and the AWS SDK kept from every endpoint (no
    /// instance metadata, no config files).
    pub fn argo(&'static self) {
        static STARTED: OnceLock<()> = OnceLock::new();
        STARTED.get_or_init(|| {
            let dir = argo_dir().unwrap_or_else(|e| panic!("{e}"));
            for crd in std::fs::read_dir(&dir)
                .expect("the Argo directory")
                .flatten()
            {
                let path = crd.path();
                if path.to_string_lossy().ends_with("-crd.yaml") {
                    self.kubectl(
                        &[
                            "apply",
                            "--server-side",
                            "--field-manager=lameduck-tests",
                            "-f",
                            path.to_str().expect("UTF-8"),
                        ],
                        None,
                    );
                }
            }
            for crd in [
                "rollouts",
                "analysisruns",
                "analysistemplates",
                "experiments",
            ] {
                let name = format!("{crd}.argoproj.io");
                assert!(
                    poll(API_WAIT, || {
                        let out = self.kubectl_raw(&["get", "crd", &name, "-o", "json"], None);
                        serde_json::from_slice::<Json>(&out.stdout).is_ok_and(|c| {
                            c["status"]["conditions"].as_array().is_some_and(|c| {
                                c.iter()
                                    .any(|c| c["type"] == "Established" && c["status"] == "True")
                            })
                        })
                    }),
                    "CRD {name} not Established"
                );
            }
            let mut cmd = Command::new(dir.join("rollouts-controller"));
            cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args([
                    "--leader-elect=false",
                    "--aws-verify-target-group=false",
                    &format!("--metricsPort={}", free_port()),
                    &format!("--healthzPort={}", free_port()),
                    "--loglevel=info",
                ])
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_CONFIG_FILE", "/dev/null")
                .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
            let log = self.dir.join("rollouts-controller.log");
            let pid = spawn(cmd, &log);
            // A bad flag or a missing CRD ends it at once.
            assert!(
                !poll(Duration::from_secs(2), || exited(pid)),
                "the Argo Rollouts controller exited:\n{}",
                tail(&log, 30)
            );
        });
    }
}

// === kube-proxy ===

/// kube-proxy's health and metrics ports, inside the node's network namespace (its own port
/// space: only the kubelet listens there, on 10250).
const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;
const KUBE_PROXY_METRICS_PORT: u16 = 10249;

/// Why kube-proxy cannot run, if it cannot.
fn kube_proxy_missing() -> Option<String> {
    if !node_bin().join("kube-proxy").is_file() {
        Some(format!(
            "kube-proxy not in {} (run .ci/install-node.sh)",
            node_bin().display()
        ))
    } else if which("iptables").is_none() || which("iptables-save").is_none() {
        Some("iptables not found (run .ci/install-node.sh)".to_string())
    } else {
        None
    }
}

/// Whether kube-proxy is built and iptables is installed (a `SKIPPED:` line if not).
pub fn kube_proxy_available(test: &str) -> bool {
    match kube_proxy_missing() {
        None => true,
        Some(why) => {
            skip(test, &why);
            false
        }
    }
}

/// Whether kube-proxy can run, without a `SKIPPED:` line.
pub fn kube_proxy_built() -> bool {
    kube_proxy_missing().is_none()
}

/// The node's kube-proxy, as [`Node::kube_proxy`] started it.
#[derive(Clone, Debug)]
pub struct KubeProxy {
    pub pid: i32,
    pub log: PathBuf,
    /// Its `/healthz` (on the node's address; the service health check node ports answer 503
    /// while it is unhealthy).
    pub healthz: SocketAddr,
}

impl Node {
    /// The real kube-proxy (v1.37.2, the kubelet's build), started once, in the node's
    /// network and mount namespaces and its daemons' cgroup as the kubelet is: iptables mode
    /// (the `iptables` of the node's file system, nf_tables backend here), its rules in the
    /// node's network namespace, which goes with the holder at tear-down. Its configuration
    /// keeps it off every machine-wide tunable: conntrack `maxPerCore: 0`/`min: 0` (it leaves
    /// `nf_conntrack_max` and the `hashsize` module parameter alone), the TCP conntrack
    /// timeouts `0s` (not set), `localhostNodePorts: false` (no `route_localnet`),
    /// `oomScoreAdj: 0`. As a guard, files holding the current values are bind-mounted over
    /// `nf_conntrack_max` and `hashsize` in the node's private mount namespace first. NodePorts
    /// and health check node ports on the node's address only.
    pub fn kube_proxy(&'static self) -> KubeProxy {
        static STARTED: OnceLock<KubeProxy> = OnceLock::new();
        STARTED
            .get_or_init(|| {
                let dir = self.dir.join("kube-proxy");
                std::fs::create_dir_all(&dir).expect("mkdir");
                let ns = |script: &str| {
                    run(Command::new("nsenter")
                        .args(["-t", &self.holder.to_string(), "-m", "-n", "--"])
                        .args(["sh", "-c", script]))
                };
                for path in [
                    "/proc/sys/net/netfilter/nf_conntrack_max",
                    "/sys/module/nf_conntrack/parameters/hashsize",
                ] {
                    if !Path::new(path).exists() {
                        continue;
                    }
                    let have = std::fs::read_to_string(path).unwrap_or_default();
                    let fake = write(
                        &dir.join("guard")
                            .join(path.trim_start_matches('/').replace('/', ".")),
                        have.trim(),
                    );
                    ns(&format!("mount --bind {} {path}", fake.display()));
                }
                let healthz = SocketAddr::from((self.node_ip, KUBE_PROXY_HEALTHZ_PORT));
                let config = write(
                    &dir.join("config.json"),
                    json!({
                        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                        "kind": "KubeProxyConfiguration",
                        "clientConnection": {"kubeconfig": self.kubeconfig},
                        "hostnameOverride": NODE_NAME,
                        "mode": "iptables",
                        "clusterCIDR": self.pod_cidr,
                        "detectLocalMode": "ClusterCIDR",
                        "nodePortAddresses": [format!("{}/32", self.node_ip)],
                        "healthzBindAddress": healthz.to_string(),
                        "metricsBindAddress": format!("127.0.0.1:{KUBE_PROXY_METRICS_PORT}"),
                        "bindAddressHardFail": true,
                        "oomScoreAdj": 0,
                        "conntrack": {
                            "maxPerCore": 0, "min": 0,
                            "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                        },
                        "iptables": {"localhostNodePorts": false, "masqueradeAll": false},
                        // "Reporting endpoints for healthcheck" is V(3).
                        "logging": {"verbosity": 3, "flushFrequency": "100ms"},
                        "enableProfiling": false,
                    })
                    .to_string(),
                );
                let mut cmd = in_cgroup(&self.cgroup, "nsenter");
                cmd.args(["-t", &self.holder.to_string(), "-m", "-n", "--"]);
                cmd.arg(node_bin().join("kube-proxy"));
                cmd.arg(format!("--config={}", config.display()));
                let log = dir.join("kube-proxy.log");
                let pid = spawn(cmd, &log);
                let up = poll(STARTUP, || {
                    exited(pid)
                        || http_get(healthz, "/healthz", Duration::from_secs(2))
                            .is_ok_and(|(code, _)| code == 200)
                });
                assert!(
                    up && !exited(pid),
                    "kube-proxy did not become healthy:\n{}",
                    tail(&log, 40)
                );
                KubeProxy { pid, log, healthz }
            })
            .clone()
    }
}

impl Node {
    /// `iptables-save` inside the node's network namespace (kube-proxy's rules live there).
    pub fn iptables_rules(&self) -> String {
        run(Command::new("nsenter")
            .args(["-t", &self.holder.to_string(), "-m", "-n", "--"])
            .arg("iptables-save"))
    }
}

/// A blocking `GET path` on a new connection with `Connection: close`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let code = status_of(&buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((code, body.to_string()))
}

// === the real webhook ===

/// `lameduck webhook` (this build) on 127.0.0.1 with a certificate from the test CA,
/// and the MutatingWebhookConfiguration exactly as `kubectl kustomize k8s/webhook` renders
/// it but for its clientConfig: a `url` to that process with the test CA as caBundle (the
/// webhook runs on the host, not as the rendered Deployment; no cert-manager here).
/// Removed, and the process stopped, on drop.
pub struct Webhook {
    node: &'static Node,
    pid: i32,
}

pub fn documents(yaml: &str) -> Vec<Json> {
    use serde::Deserialize as _;
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Json::deserialize(d).expect("YAML document"))
        .filter(|d| !d.is_null())
        .collect()
}

impl Node {
    pub fn webhook(&'static self) -> Webhook {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = self
            .dir
            .join(format!("webhook-{}", N.fetch_add(1, Ordering::Relaxed)));
        let (cert, key) = self.ca.leaf(&["127.0.0.1"]);
        let cert = write(&dir.join("tls.crt"), cert);
        let key = write(&dir.join("tls.key"), key);
        let log = dir.join("webhook.log");
        let mut cmd = Command::new(LAMEDUCK_BIN);
        cmd.args(["webhook", "--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--log-format", "json"])
            .env("LAMEDUCK_SIDECAR_IMAGE", LAMEDUCK_IMAGE);
        let pid = spawn(cmd, &log);
        let mut addr = None;
        assert!(
            poll(Duration::from_secs(20), || {
                addr = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Json>(l).ok())
                    .find_map(|v| v["addr"].as_str().map(str::to_string));
                addr.is_some() || exited(pid)
            }) && addr.is_some(),
            "the webhook did not start: {}",
            tail(&log, 20)
        );
        let url = format!("https://{}/mutate", addr.expect("an address"));
        let rendered = self.kubectl(
            &[
                "kustomize",
                root().join("k8s/webhook").to_str().expect("UTF-8"),
            ],
            None,
        );
        use base64::Engine as _;
        let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&self.ca.pem);
        let mut configurations: Vec<Json> = documents(&rendered)
            .into_iter()
            .filter(|d| d["kind"] == "MutatingWebhookConfiguration")
            .collect();
        assert_eq!(
            configurations.len(),
            1,
            "k8s/webhook renders one configuration"
        );
        for hook in configurations[0]["webhooks"]
            .as_array_mut()
            .expect("webhooks")
        {
            hook["clientConfig"] = json!({"url": url, "caBundle": ca_bundle});
        }
        self.kubectl(
            &["apply", "-f", "-"],
            Some(configurations[0].to_string().as_bytes()),
        );
        let webhook = Webhook { node: self, pid };
        // The apiserver picks the configuration up from a watch: wait until an opted-in pod
        // is injected through it (a server-side dry run: nothing is created).
        let probe = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "probe", "namespace": "default",
                         "labels": {"lameduck.io/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": APP_IMAGE,
                                     "ports": [{"name": "http", "containerPort": APP_PORT}]}]},
        })
        .to_string();
        assert!(
            poll(PATIENCE, || {
                let out = self.kubectl_raw(
                    &["create", "--dry-run=server", "-o", "json", "-f", "-"],
                    Some(probe.as_bytes()),
                );
                serde_json::from_slice::<Json>(&out.stdout)
                    .is_ok_and(|p| p["metadata"]["annotations"]["lameduck.io/status"] == "injected")
            }),
            "the webhook configuration did not take effect"
        );
        webhook
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.node.kubectl_raw(
            &[
                "delete",
                "mutatingwebhookconfiguration",
                "lameduck",
                "--ignore-not-found",
            ],
            None,
        );
        stop(self.pid);
    }
}

// === log lines ===

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn this_year() -> i64 {
    // 1970 + whole years, corrected below by the caller's month if needed.
    let days = (now() / 86400.0) as i64;
    let mut y = 1970 + days / 366;
    while days_from_civil(y + 1, 1, 1) <= days {
        y += 1;
    }
    y
}

/// `2026-12-06T05:40:01.123456789Z` (or with a `+hh:mm` offset) as epoch seconds.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0.0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1.0 } else { 1.0 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<f64>().ok()? * 3600.0 + om.parse::<f64>().ok()? * 60.0),
        )
    };
    let mut c = clock.split(':');
    let (h, mi, sec) = (
        c.next()?.parse::<f64>().ok()?,
        c.next()?.parse::<f64>().ok()?,
        c.next()?.parse::<f64>().ok()?,
    );
    Some(days_from_civil(y, mo, da) as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + sec - offset)
}

/// One line of the kubelet's klog output.
#[derive(Clone, Debug)]
pub struct KlogLine {
    pub at: f64,
    pub text: String,
}

impl KlogLine {
    /// `I1206 05:40:01.123456    1234 file.go:123] "msg" k=v` (the machine's time zone is
    /// UTC, as klog prints local time).
    pub fn parse(line: &str) -> Option<KlogLine> {
        let b = line.as_bytes();
        if b.len() < 21 || !matches!(b[0], b'I' | b'W' | b'E' | b'F') {
            return None;
        }
        let month: i64 = line.get(1..3)?.parse().ok()?;
        let day: i64 = line.get(3..5)?.parse().ok()?;
        let clock = line.get(6..21)?;
        let mut c = clock.split(':');
        let (h, mi, s) = (
            c.next()?.parse::<f64>().ok()?,
            c.next()?.parse::<f64>().ok()?,
            c.next()?.parse::<f64>().ok()?,
        );
        let at =
            days_from_civil(this_year(), month, day) as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + s;
        Some(KlogLine {
            at,
            text: line.to_string(),
        })
    }

    pub fn is(&self, msg: &str, container: &str) -> bool {
        self.text.contains(&format!("\"{msg}\""))
            && self
                .text
                .contains(&format!("containerName=\"{container}\""))
    }
}

/// A container's log line as the CRI wrote it.
#[derive(Clone, Debug)]
pub struct PodLogLine {
    /// `<namespace>_<pod>_<uid>`.
    pub pod_dir: String,
    pub container: String,
    pub at: f64,
    pub text: String,
}

/// Follows every container log file under the kubelet's `podLogsDir`.
#[derive(Clone)]
pub struct PodLogs {
    lines: Arc<Mutex<Vec<PodLogLine>>>,
}

impl PodLogs {
    fn follow(dir: PathBuf) -> PodLogs {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = lines.clone();
        std::thread::Builder::new()
            .name("pod-logs".into())
            .spawn(move || {
                let mut offsets: BTreeMap<PathBuf, (u64, String)> = BTreeMap::new();
                // Bounded by the test binary's life: the thread ends with the process.
                while dir.is_dir() {
                    for pod in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        let pod_dir = pod.file_name().to_string_lossy().into_owned();
                        for c in std::fs::read_dir(pod.path())
                            .into_iter()
                            .flatten()
                            .flatten()
                        {
                            let container = c.file_name().to_string_lossy().into_owned();
                            for f in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
                                let path = f.path();
                                let (off, partial) = offsets.entry(path.clone()).or_default();
                                let Ok(mut file) = std::fs::File::open(&path) else {
                                    continue;
                                };
                                use std::io::Seek as _;
                                if file.seek(std::io::SeekFrom::Start(*off)).is_err() {
                                    continue;
                                }
                                let mut buf = String::new();
                                let Ok(n) = file.read_to_string(&mut buf) else {
                                    continue;
                                };
                                *off += n as u64;
                                partial.push_str(&buf);
                                while let Some(i) = partial.find('\n') {
                                    let line: String = partial.drain(..=i).collect();
                                    let mut f = line.trim_end().splitn(4, ' ');
                                    let at = f.next().and_then(parse_rfc3339).unwrap_or(0.0);
                                    let text = f.nth(2).unwrap_or_default().to_string();
                                    out.lock().unwrap_or_else(|e| e.into_inner()).push(
                                        PodLogLine {
                                            pod_dir: pod_dir.clone(),
                                            container: container.clone(),
                                            at,
                                            text,
                                        },
                                    );
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .expect("spawn the pod-logs thread");
        PodLogs { lines }
    }

    /// The lines of one container of one pod.
    pub fn of(&self, namespace: &str, pod: &str, container: &str) -> Vec<PodLogLine> {
        let prefix = format!("{namespace}_{pod}_");
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.pod_dir.starts_with(&prefix) && l.container == container)
            .cloned()
            .collect()
    }
}

// === the load balancer stand-in ===

/// How the stand-in controller lags behind the API, as the AWS Load Balancer Controller does.
#[derive(Clone, Copy, Debug)]
pub struct Lag {
    /// From a pod's endpoint becoming registrable to its target's registration.
    pub register: Duration,
    /// From its endpoint turning `terminating` (or going) to deregistration; `None`: never
    /// (a load balancer that keeps sending, for the drain-max test).
    pub deregister: Option<Duration>,
}

/// What the controller saw and did for one pod.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// The pod (targets are keyed by pod, or by `<service>/<pod>` with weighted groups).
    pub pod: String,
    pub addr: Option<SocketAddr>,
    pub slot: Option<usize>,
    /// Whether it should be registered (as of `since`), and whether it is.
    desired: bool,
    since: f64,
    applied: bool,
    pub registered_at: Option<f64>,
    pub healthy_at: Option<f64>,
    pub gate_at: Option<f64>,
    /// When its endpoint turned terminating (seen in an EndpointSlice).
    pub terminating_at: Option<f64>,
    pub deregistered_at: Option<f64>,
    /// When the pod object was deleted from the API (the kubelet finished with it).
    pub deleted_at: Option<f64>,
}

#[derive(Clone, Debug, Default)]
struct Endpoint {
    pod: String,
    addr: Option<SocketAddr>,
    ready: bool,
    terminating: bool,
}

/// Two target groups weighted by the Ingress annotation Argo Rollouts writes
/// (`alb.ingress.kubernetes.io/actions.<root service>`), applied after the lag.
#[derive(Default)]
struct Weighted {
    /// The annotation's key.
    annotation: String,
    /// Service → weight as last seen on the Ingress, and since when.
    desired: BTreeMap<String, u32>,
    since: f64,
    applied: BTreeMap<String, u32>,
    /// Slot → the HAProxy weight last set.
    set: BTreeMap<usize, u32>,
    /// (time applied, weights) for the report.
    log: Vec<(f64, BTreeMap<String, u32>)>,
}

/// Pods alive (created, not yet gone from the API): the peak and the pod-seconds since the
/// last [`Lb::fleet_mark`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Fleet {
    pub peak: usize,
    pub pod_seconds: f64,
    live: usize,
    last: f64,
}

#[derive(Default)]
struct LbState {
    slices: BTreeMap<String, BTreeMap<String, Endpoint>>,
    /// Pod name → ContainersReady, and whether the pod has a deletionTimestamp.
    pods: BTreeMap<String, (bool, bool)>,
    targets: BTreeMap<String, Target>,
    next_slot: usize,
    /// Pods whose readiness gate is set.
    gated: std::collections::BTreeSet<String>,
    /// Pod → when it was deleted from the API.
    deleted: BTreeMap<String, f64>,
    weighted: Option<Weighted>,
    fleet: Fleet,
}

const SLOTS: usize = 64;

/// HAProxy (Debian) on 127.0.0.1 as the ALB, `retries 0`, targets starting DOWN with `rise 2`,
/// health checks as the ALB sends them; and a controller that watches EndpointSlices and
/// pods through the API (two `kubectl get -w` streams) and registers/deregisters targets
/// through HAProxy's runtime API after a lag, then sets the pod's readiness gate.
pub struct Lb {
    pub addr: SocketAddr,
    sock: PathBuf,
    haproxy: i32,
    watchers: Vec<i32>,
    state: Arc<Mutex<LbState>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

fn haproxy_cmd(sock: &Path, cmd: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(format!("{cmd}\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

impl Lb {
    pub fn start(node: &'static Node, namespace: &str, lag: Lag) -> Lb {
        Lb::start_inner(node, namespace, lag, None)
    }

    /// The ALB with Argo Rollouts' traffic routing: a target group per Service (its
    /// EndpointSlices), weighted as the Ingress's `actions.<root>` annotation says, the
    /// weights applied after `lag.deregister` (the AWS controller's lag). Before Argo writes
    /// it, the root Service takes everything.
    pub fn start_weighted(node: &'static Node, namespace: &str, lag: Lag, root: &str) -> Lb {
        Lb::start_inner(node, namespace, lag, Some(root))
    }

    fn start_inner(node: &'static Node, namespace: &str, lag: Lag, root: Option<&str>) -> Lb {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = node
            .dir
            .join(format!("lb-{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sock = dir.join("haproxy.sock");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        // Placeholder address of the empty slots: inside the pod range, never contacted
        // (the slots are in maintenance until registered).
        let placeholder = node.pod_cidr.replace(".0/24", ".254");
        let cfg = write(
            &dir.join("haproxy.cfg"),
            format!(
                "global
  stats socket {sock} mode 600 level admin
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  # The ALB never retries a failed request on another target.
  retries 0
  no option redispatch
frontend fe
  bind {addr}
  default_backend be
backend be
  balance roundrobin
  option httpchk
  http-check send meth GET uri / ver HTTP/1.1 hdr Host lb.test hdr User-Agent ELB-HealthChecker/2.0 hdr Connection close
  default-server inter 1s fastinter 1s downinter 1s rise 2 fall 2
  server-template t 1-{SLOTS} {placeholder}:9 check disabled
",
                sock = sock.display()
            ),
        );
        let haproxy = spawn(
            {
                let mut c = Command::new("haproxy");
                c.arg("-f").arg(&cfg).arg("-db");
                c
            },
            &dir.join("haproxy.log"),
        );
        assert!(
            poll(Duration::from_secs(10), || haproxy_cmd(&sock, "show info")
                .contains("Name: HAProxy")),
            "HAProxy did not start:\n{}",
            tail(&dir.join("haproxy.log"), 20)
        );
        let state = Arc::new(Mutex::new(LbState {
            next_slot: 1,
            weighted: root.map(|root| Weighted {
                annotation: format!("alb.ingress.kubernetes.io/actions.{root}"),
                desired: [(root.to_string(), 100)].into(),
                ..Default::default()
            }),
            fleet: Fleet {
                last: now(),
                ..Default::default()
            },
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let mut watchers = Vec::new();
        let mut threads = Vec::new();
        let kinds: &[&str] = if root.is_some() {
            &["endpointslices", "pods", "ingresses"]
        } else {
            &["endpointslices", "pods"]
        };
        for &kind in kinds {
            let (pid, stdout) = kubectl_watch(node, kind, namespace);
            watchers.push(pid);
            let st = state.clone();
            let kind = kind.to_string();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lb-watch-{kind}"))
                    .spawn(move || {
                        let events = serde_json::Deserializer::from_reader(BufReader::new(stdout))
                            .into_iter::<Json>();
                        for ev in events.map_while(Result::ok) {
                            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                            s.observe(&kind, &ev);
                        }
                    })
                    .expect("spawn a watch thread"),
            );
        }
        // The controller's loop: applies due changes, sets readiness gates.
        {
            let st = state.clone();
            let stop = stop.clone();
            let sock = sock.clone();
            let kubectl = node.kubectl.clone();
            let kubeconfig = node.kubeconfig.clone();
            let ns = namespace.to_string();
            threads.push(
                std::thread::Builder::new()
                    .name("lb-controller".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let gates = {
                                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                                s.reconcile(&sock, lag)
                            };
                            for pod in gates {
                                let patch = json!({"status": {"conditions": [{
                                    "type": GATE, "status": "True",
                                    "reason": "TargetHealthy",
                                }]}})
                                .to_string();
                                let out = run_kubectl(
                                    &kubectl,
                                    &kubeconfig,
                                    &[
                                        "patch",
                                        "pod",
                                        &pod,
                                        "-n",
                                        &ns,
                                        "--subresource=status",
                                        "--type=strategic",
                                        "-p",
                                        &patch,
                                    ],
                                    None,
                                );
                                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                                if out.status.success() {
                                    let at = now();
                                    s.gated.insert(pod.clone());
                                    for t in s.targets.values_mut().filter(|t| t.pod == pod) {
                                        t.gate_at = Some(at);
                                    }
                                }
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    })
                    .expect("spawn the controller thread"),
            );
        }
        Lb {
            addr,
            sock,
            haproxy,
            watchers,
            state,
            stop,
            threads,
            dir,
        }
    }

    /// What the controller saw and did, per pod.
    pub fn targets(&self) -> BTreeMap<String, Target> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .targets
            .clone()
    }

    /// Starts counting peak pods and pod-seconds afresh.
    pub fn fleet_mark(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let t = now();
        s.fleet.tick(t);
        s.fleet.peak = s.fleet.live;
        s.fleet.pod_seconds = 0.0;
    }

    /// Peak pods and pod-seconds since [`Lb::fleet_mark`].
    pub fn fleet(&self) -> Fleet {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.fleet.tick(now());
        s.fleet
    }

    /// Pod → when it went from the API.
    pub fn deleted(&self) -> BTreeMap<String, f64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.deleted.clone()
    }

    /// The weights applied, in order: (time, service → weight).
    pub fn weights(&self) -> Vec<(f64, BTreeMap<String, u32>)> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.weighted
            .as_ref()
            .map(|w| w.log.clone())
            .unwrap_or_default()
    }

    /// HAProxy's view: server slot → status (`UP`, `DOWN 1/2`, `MAINT`).
    pub fn servers(&self) -> BTreeMap<usize, String> {
        parse_stat(&haproxy_cmd(&self.sock, "show stat be 4 -1"))
    }
}

fn parse_stat(csv: &str) -> BTreeMap<usize, String> {
    csv.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let slot = f.get(1)?.strip_prefix('t')?.parse().ok()?;
            Some((slot, f.get(17)?.to_string()))
        })
        .collect()
}

impl Fleet {
    fn tick(&mut self, t: f64) {
        self.pod_seconds += self.live as f64 * (t - self.last).max(0.0);
        self.last = t;
    }

    fn set(&mut self, t: f64, live: usize) {
        self.tick(t);
        self.live = live;
        self.peak = self.peak.max(live);
    }
}

impl LbState {
    fn observe(&mut self, kind: &str, ev: &Json) {
        let deleted = ev["type"] == "DELETED";
        let obj = &ev["object"];
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match kind {
            "endpointslices" => {
                let mut eps = BTreeMap::new();
                let service = obj["metadata"]["labels"]["kubernetes.io/service-name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if !deleted {
                    let port = obj["ports"][0]["port"].as_u64().unwrap_or(0) as u16;
                    for e in obj["endpoints"].as_array().into_iter().flatten() {
                        let Some(pod) = e["targetRef"]["name"].as_str() else {
                            continue;
                        };
                        let addr = e["addresses"][0]
                            .as_str()
                            .and_then(|a| format!("{a}:{port}").parse().ok());
                        // One target group per Service when weighted, else one in all.
                        let key = if self.weighted.is_some() {
                            format!("{service}/{pod}")
                        } else {
                            pod.to_string()
                        };
                        eps.insert(
                            key,
                            Endpoint {
                                pod: pod.to_string(),
                                addr,
                                ready: e["conditions"]["ready"] == true,
                                terminating: e["conditions"]["terminating"] == true,
                            },
                        );
                    }
                }
                self.slices.insert(name, eps);
            }
            "ingresses" => {
                let Some(w) = self.weighted.as_mut() else {
                    return;
                };
                let Some(action) = obj["metadata"]["annotations"][&w.annotation]
                    .as_str()
                    .and_then(|a| serde_json::from_str::<Json>(a).ok())
                else {
                    return;
                };
                let weights: BTreeMap<String, u32> = action["ForwardConfig"]["TargetGroups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| {
                        Some((
                            g["ServiceName"].as_str()?.to_string(),
                            g["Weight"].as_u64()? as u32,
                        ))
                    })
                    .collect();
                if !weights.is_empty() && weights != w.desired {
                    w.desired = weights;
                    w.since = now();
                }
            }
            _ => {
                if deleted {
                    let t = now();
                    self.pods.remove(&name);
                    self.deleted.insert(name.clone(), t);
                    if self.weighted.is_none() {
                        self.targets.entry(name).or_default().deleted_at = Some(t);
                    } else {
                        for target in self.targets.values_mut().filter(|x| x.pod == name) {
                            target.deleted_at = Some(t);
                        }
                    }
                    self.fleet.set(t, self.pods.len());
                } else {
                    let containers_ready =
                        obj["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "ContainersReady" && c["status"] == "True")
                        });
                    let deleting = !obj["metadata"]["deletionTimestamp"].is_null();
                    self.pods.insert(name, (containers_ready, deleting));
                    self.fleet.set(now(), self.pods.len());
                }
            }
        }
    }

    /// Moves every target toward what the API says, each change applied once it is older
    /// than the lag. Returns the pods whose readiness gate should now be set.
    fn reconcile(&mut self, sock: &Path, lag: Lag) -> Vec<String> {
        let t = now();
        let mut endpoints: BTreeMap<String, Endpoint> = BTreeMap::new();
        for eps in self.slices.values() {
            for (key, e) in eps {
                endpoints.insert(key.clone(), e.clone());
            }
        }
        let keys: std::collections::BTreeSet<String> = endpoints
            .keys()
            .chain(self.targets.keys())
            .cloned()
            .collect();
        let mut gates = std::collections::BTreeSet::new();
        let mut stat: Option<BTreeMap<usize, String>> = None;
        for key in keys {
            let ep = endpoints.get(&key);
            let pod = ep.map(|e| e.pod.clone());
            let (containers_ready, _) = pod
                .as_ref()
                .and_then(|p| self.pods.get(p).copied())
                .unwrap_or_default();
            // As the AWS Load Balancer Controller: ready endpoints, and not-ready ones whose
            // pod waits on our readiness gate with its containers ready; never terminating
            // ones (`serving` is ignored).
            let want = ep.is_some_and(|e| !e.terminating && (e.ready || containers_ready));
            let next_slot = &mut self.next_slot;
            let target = self.targets.entry(key.clone()).or_default();
            if let Some(p) = pod {
                target.pod = p;
            } else if target.pod.is_empty() {
                target.pod = key.clone();
            }
            if let Some(e) = ep {
                if e.addr.is_some() {
                    target.addr = e.addr;
                }
                if e.terminating && target.terminating_at.is_none() {
                    target.terminating_at = Some(t);
                }
            }
            if want != target.desired {
                target.desired = want;
                target.since = t;
            }
            if target.applied != target.desired {
                let due = if target.desired {
                    Some(lag.register)
                } else {
                    lag.deregister
                };
                if due.is_some_and(|d| t - target.since >= d.as_secs_f64()) {
                    if target.desired {
                        let (Some(addr), true) = (target.addr, *next_slot <= SLOTS) else {
                            continue;
                        };
                        let slot = *next_slot;
                        *next_slot += 1;
                        // Weight 0 while leaving maintenance, then health forced down: the
                        // target starts unhealthy and needs `rise` checks, as an ALB
                        // target starts `initial`.
                        haproxy_cmd(
                            sock,
                            &format!(
                                "set server be/t{slot} addr {} port {}; \
                                 set weight be/t{slot} 0; set server be/t{slot} state ready; \
                                 set server be/t{slot} health down; set weight be/t{slot} 1",
                                addr.ip(),
                                addr.port()
                            ),
                        );
                        target.slot = Some(slot);
                        target.registered_at = Some(now());
                    } else if let Some(slot) = target.slot {
                        haproxy_cmd(sock, &format!("set server be/t{slot} state maint"));
                        target.deregistered_at = Some(now());
                    }
                    target.applied = target.desired;
                }
            }
            if target.applied
                && target.desired
                && !self.gated.contains(&target.pod)
                && !gates.contains(&target.pod)
            {
                let Some(slot) = target.slot else { continue };
                let stat =
                    stat.get_or_insert_with(|| parse_stat(&haproxy_cmd(sock, "show stat be 4 -1")));
                // `DRAIN` is an UP server at weight 0 (a target group at weight 0).
                if stat
                    .get(&slot)
                    .is_some_and(|s| s == "UP" || s == "DRAIN" || s.starts_with("UP "))
                {
                    if target.healthy_at.is_none() {
                        target.healthy_at = Some(now());
                    }
                    gates.insert(target.pod.clone());
                }
            }
        }
        if self.weighted.is_some() {
            // The AWS controller's webhook injects its readiness gate only into pods that a
            // target group's Service selects when they are created: Argo's canary pods at
            // first match neither Service (the canary Service still selects the stable
            // hash until the canary ReplicaSet is available). Such a pod has no gate to
            // wait for: it is marked ready as soon as its containers are, in no
            // EndpointSlice.
            for (pod, (containers_ready, deleting)) in &self.pods {
                if *containers_ready
                    && !deleting
                    && !self.gated.contains(pod)
                    && !endpoints.values().any(|e| &e.pod == pod)
                {
                    gates.insert(pod.clone());
                }
            }
        }
        if let Some(w) = self.weighted.as_mut() {
            // The Ingress's weights, applied a lag late; each group's weight shared among its
            // registered targets (HAProxy weights 0-256).
            if w.desired != w.applied
                && lag
                    .deregister
                    .is_some_and(|d| t - w.since >= d.as_secs_f64())
            {
                w.applied = w.desired.clone();
                w.log.push((t, w.applied.clone()));
            }
            let mut members: BTreeMap<String, usize> = BTreeMap::new();
            for (key, target) in &self.targets {
                if target.applied && target.slot.is_some() {
                    let group = key.split('/').next().unwrap_or_default().to_string();
                    *members.entry(group).or_default() += 1;
                }
            }
            for (key, target) in &self.targets {
                let (Some(slot), true) = (target.slot, target.applied) else {
                    continue;
                };
                let group = key.split('/').next().unwrap_or_default();
                let weight = w.applied.get(group).copied().unwrap_or(0);
                let n = members.get(group).copied().unwrap_or(1).max(1) as u32;
                let hw = if weight == 0 {
                    0
                } else {
                    (weight * 250 / (100 * n)).clamp(1, 256)
                };
                if w.set.get(&slot) != Some(&hw) {
                    haproxy_cmd(sock, &format!("set weight be/t{slot} {hw}"));
                    w.set.insert(slot, hw);
                }
            }
        }
        gates.into_iter().collect()
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for &pid in &self.watchers {
            stop(pid);
        }
        stop(self.haproxy);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// === the load ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// A new connection per request (`Connection: close`), sent at a fixed rate whatever
    /// the answers (open loop).
    New,
    /// One keep-alive connection, reopened when closed.
    KeepAlive,
}

#[derive(Clone, Debug)]
pub struct Rec {
    pub at: f64,
    pub client: Client,
    /// The status, or what went wrong (`connect: ...`, `reset`, `timeout`).
    pub outcome: Result<u16, String>,
}

impl Rec {
    pub fn ok(&self) -> bool {
        self.outcome == Ok(200)
    }
}

/// Load through the load balancer: `rate` new connections per second, and a keep-alive
/// client at `keepalive_rate` requests per second. Every request is recorded. Bounded: it
/// stops after `max` even if never stopped.
pub struct Load {
    records: Arc<Mutex<Vec<Rec>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn one_new(addr: SocketAddr) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect: timeout".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    status_of(&buf)
}

fn status_of(buf: &[u8]) -> Result<u16, String> {
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]);
    head.strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            if buf.is_empty() {
                "empty answer".to_string()
            } else {
                format!("bad answer {head:?}")
            }
        })
}

impl Load {
    pub fn start(addr: SocketAddr, rate: u32, keepalive_rate: u32, max: Duration) -> Load {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, st) = (records.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let end = tokio::time::Instant::now() + max;
                    let ka = {
                        let (rec, st) = (rec.clone(), st.clone());
                        tokio::spawn(async move {
                            keepalive(addr, keepalive_rate, end, rec, st).await;
                        })
                    };
                    let mut tick =
                        tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    let mut tasks = tokio::task::JoinSet::new();
                    while !st.load(Ordering::Relaxed) && tokio::time::Instant::now() < end {
                        tick.tick().await;
                        let rec = rec.clone();
                        tasks.spawn(async move {
                            let at = now();
                            let outcome = one_new(addr).await;
                            rec.lock().unwrap_or_else(|e| e.into_inner()).push(Rec {
                                at,
                                client: Client::New,
                                outcome,
                            });
                        });
                        while tasks.try_join_next().is_some() {}
                    }
                    // Every request in flight finishes (each is bounded by its timeouts).
                    while tasks.join_next().await.is_some() {}
                    let _ = ka.await;
                });
            })
            .expect("spawn the load thread");
        Load {
            records,
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut recs = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        recs.sort_by(|a, b| a.at.total_cmp(&b.at));
        recs
    }

    pub fn count(&self) -> usize {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn keepalive(
    addr: SocketAddr,
    rate: u32,
    end: tokio::time::Instant,
    rec: Arc<Mutex<Vec<Rec>>>,
    st: Arc<AtomicBool>,
) {
    use http_body_util::{BodyExt as _, Empty};
    type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;
    let mut conn: Option<Sender> = None;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !st.load(Ordering::Relaxed) && tokio::time::Instant::now() < end {
        tick.tick().await;
        let at = now();
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = match tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                        .await
                    {
                        Ok((tx, c)) => {
                            tokio::spawn(c);
                            Some(tx)
                        }
                        Err(e) => {
                            push(&rec, at, Err(format!("handshake: {e}")));
                            continue;
                        }
                    }
                }
                Ok(Err(e)) => {
                    push(&rec, at, Err(format!("connect: {e}")));
                    continue;
                }
                Err(_) => {
                    push(&rec, at, Err("connect: timeout".into()));
                    continue;
                }
            };
        }
        let Some(tx) = conn.as_mut() else { continue };
        let req = http::Request::builder()
            .uri("/")
            .header("host", "app.test")
            .body(Empty::new())
            .expect("a request");
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            tx.ready().await?;
            let resp = tx.send_request(req).await?;
            let status = resp.status().as_u16();
            let close = resp
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            resp.into_body().collect().await?;
            Ok::<_, hyper::Error>((status, close))
        })
        .await;
        match answer {
            Ok(Ok((status, close))) => {
                push(&rec, at, Ok(status));
                if close {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                push(&rec, at, Err(format!("keep-alive: {e}")));
                conn = None;
            }
            Err(_) => {
                push(&rec, at, Err("timeout".into()));
                conn = None;
            }
        }
    }
}

fn push(rec: &Arc<Mutex<Vec<Rec>>>, at: f64, outcome: Result<u16, String>) {
    rec.lock().unwrap_or_else(|e| e.into_inner()).push(Rec {
        at,
        client: Client::KeepAlive,
        outcome,
    });
}

/// Requests, failures, and the failures' kinds, for a report line.
pub fn summary(recs: &[Rec]) -> String {
    let failed: Vec<&Rec> = recs.iter().filter(|r| !r.ok()).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in &failed {
        let k = match &r.outcome {
            Ok(code) => code.to_string(),
            Err(e) => e.split(':').next().unwrap_or_default().to_string(),
        };
        *kinds.entry(k).or_default() += 1;
    }
    format!(
        "{} requests ({} new-connection, {} keep-alive), {} failed {:?}",
        recs.len(),
        recs.iter().filter(|r| r.client == Client::New).count(),
        recs.iter()
            .filter(|r| r.client == Client::KeepAlive)
            .count(),
        failed.len(),
        kinds
    )
}

// === a Network Load Balancer with instance targets ===

/// One target of [`Nlb`]: where its connections go, and the HTTP health check (`GET /`)
/// that decides whether it gets any; `None`: always healthy.
#[derive(Clone, Debug)]
pub struct NlbTarget {
    pub name: String,
    pub addr: SocketAddr,
    pub check: Option<SocketAddr>,
}

/// An NLB target group's health check: every `interval`, unhealthy after `fall` failed
/// checks in a row (anything but 200-399, or no answer within `timeout`), healthy again
/// after `rise` passing ones.
#[derive(Clone, Copy, Debug)]
pub struct NlbCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

/// One health check: when it was sent, to which target, what came back.
#[derive(Clone, Debug)]
pub struct CheckRec {
    pub at: f64,
    pub target: usize,
    pub outcome: Result<u16, String>,
}

/// What [`Nlb::finish`] returns: every connection (with its target), every health check, and
/// every change of a target's health (time, target, healthy).
pub struct NlbRun {
    pub recs: Vec<(usize, Rec)>,
    pub checks: Vec<CheckRec>,
    pub changes: Vec<(f64, usize, bool)>,
}

#[derive(Default)]
struct NlbState {
    healthy: Vec<bool>,
    recs: Vec<(usize, Rec)>,
    checks: Vec<CheckRec>,
    changes: Vec<(f64, usize, bool)>,
}

/// A Network Load Balancer in front of instance targets (layer 4: each client connection goes
/// to one healthy target as it is, nothing retried), modelled as the test's own: a health
/// checker per target and an open-loop client that sends `rate` new connections per second
/// (one `GET /` each, `Connection: close`), round-robin over the targets healthy at that
/// moment. A target with a check is healthy from its first passing check (registered long
/// before the test). Everything is recorded; bounded by `max`.
pub struct Nlb {
    state: Arc<Mutex<NlbState>>,
    sending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Nlb {
    pub fn start(targets: Vec<NlbTarget>, check: NlbCheck, rate: u32, max: Duration) -> Nlb {
        let state = Arc::new(Mutex::new(NlbState {
            healthy: targets.iter().map(|t| t.check.is_none()).collect(),
            ..Default::default()
        }));
        let sending = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, go, halt) = (state.clone(), sending.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("nlb".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(nlb_run(targets, check, rate, max, st, go, halt));
            })
            .expect("spawn the NLB thread");
        Nlb {
            state,
            sending,
            stop,
            thread: Some(thread),
        }
    }

    pub fn healthy(&self, target: usize) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.healthy.get(target).copied().unwrap_or(false)
    }

    /// Starts the client's connections.
    pub fn send(&self) {
        self.sending.store(true, Ordering::Relaxed);
    }

    /// Connections sent so far.
    pub fn count(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recs
            .len()
    }

    /// When `target` last turned unhealthy, if it did.
    pub fn down_at(&self, target: usize) -> Option<f64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.changes
            .iter()
            .rev()
            .find(|(_, t, up)| *t == target && !up)
            .map(|(at, _, _)| *at)
    }

    /// Stops everything (connections in flight finish, each bounded by its timeouts).
    pub fn finish(mut self) -> NlbRun {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut recs = std::mem::take(&mut s.recs);
        recs.sort_by(|a, b| a.1.at.total_cmp(&b.1.at));
        NlbRun {
            recs,
            checks: std::mem::take(&mut s.checks),
            changes: std::mem::take(&mut s.changes),
        }
    }
}

impl Drop for Nlb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn nlb_check(addr: SocketAddr, timeout: Duration) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ELB-HealthChecker/2.0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        status_of(&buf)
    })
    .await
    .map_err(|_| "timeout".to_string())?
}

async fn nlb_run(
    targets: Vec<NlbTarget>,
    check: NlbCheck,
    rate: u32,
    max: Duration,
    state: Arc<Mutex<NlbState>>,
    sending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let end = tokio::time::Instant::now() + max;
    // The health checker: one round every interval, each target's check in parallel.
    let checker = {
        let (targets, state, stop) = (targets.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut passes = vec![0u32; targets.len()];
            let mut fails = vec![0u32; targets.len()];
            let mut seen = vec![false; targets.len()];
            let mut tick = tokio::time::interval(check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < end {
                tick.tick().await;
                let mut round = tokio::task::JoinSet::new();
                for (i, t) in targets.iter().enumerate() {
                    if let Some(addr) = t.check {
                        round.spawn(async move {
                            let at = now();
                            (i, at, nlb_check(addr, check.timeout).await)
                        });
                    }
                }
                while let Some(Ok((i, at, outcome))) = round.join_next().await {
                    let pass = matches!(outcome, Ok(200..=399));
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.checks.push(CheckRec {
                        at,
                        target: i,
                        outcome,
                    });
                    if pass {
                        passes[i] += 1;
                        fails[i] = 0;
                    } else {
                        fails[i] += 1;
                        passes[i] = 0;
                    }
                    let healthy = s.healthy[i];
                    let turn = if !seen[i] {
                        pass
                    } else if healthy {
                        fails[i] >= check.fall
                    } else {
                        passes[i] >= check.rise
                    };
                    seen[i] = true;
                    if turn {
                        let t = now();
                        s.healthy[i] = !healthy;
                        s.changes.push((t, i, !healthy));
                    }
                }
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < end {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        if !sending.load(Ordering::Relaxed) {
            continue;
        }
        let healthy: Vec<usize> = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            (0..targets.len()).filter(|&i| s.healthy[i]).collect()
        };
        // No healthy target: an NLB fails open, to all of them.
        let pool: Vec<usize> = if healthy.is_empty() {
            (0..targets.len()).collect()
        } else {
            healthy
        };
        let i = pool[next % pool.len()];
        next += 1;
        let (addr, state) = (targets[i].addr, state.clone());
        tasks.spawn(async move {
            let at = now();
            let outcome = one_new(addr).await;
            state.lock().unwrap_or_else(|e| e.into_inner()).recs.push((
                i,
                Rec {
                    at,
                    client: Client::New,
                    outcome,
                },
            ));
        });
    }
    while tasks.join_next().await.is_some() {}
    let _ = checker.await;
}

/// A plain HTTP server of the test's own on 127.0.0.1 (the load balancer's other target):
/// `200 ok` to every request, `Connection: close`. Stops on drop.
pub struct Backend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start() -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("an address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    while !halt.load(Ordering::Relaxed) {
                        let Ok(Ok((mut s, _))) =
                            tokio::time::timeout(Duration::from_millis(100), listener.accept())
                                .await
                        else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 1024];
                            // Until the end of the request head, bounded in time and size.
                            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                                    match s.read(&mut chunk).await {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                    }
                                }
                            })
                            .await;
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                                )
                                .await;
                            let _ = s.shutdown().await;
                        });
                    }
                });
            })
            .expect("spawn the backend thread");
        Backend {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod's endpoint conditions as an EndpointSlice changed them, when the watch saw it.
#[derive(Clone, Debug)]
pub struct SliceChange {
    pub at: f64,
    pub pod: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// `kubectl get KIND -n NAMESPACE -w --output-watch-events -o json`, dying with this
/// process and registered for the tier's teardown; its pid (for `stop`) and its stdout, a
/// stream of watch events for a thread to read.
fn kubectl_watch(node: &Node, kind: &str, namespace: &str) -> (i32, std::process::ChildStdout) {
    let mut cmd = Command::new(&node.kubectl);
    cmd.arg(format!("--kubeconfig={}", node.kubeconfig.display()))
        .args(["get", kind, "-n", namespace, "-w", "--output-watch-events"])
        .args(["-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    // Reaped by `stop` (the caller's `Drop`, or the teardown): its pipe is read by the
    // caller's watch thread.
    #[allow(clippy::zombie_processes, reason = "reaped by `stop` in `Drop`")]
    let mut child = cmd.spawn().expect("start kubectl get -w");
    let pid = child.id() as i32;
    teardown_state().pids.push(pid);
    (pid, child.stdout.take().expect("piped stdout"))
}

/// Watches a namespace's EndpointSlices (`kubectl get -w`) and records every change of a
/// pod's endpoint conditions. Stops on drop.
pub struct SliceWatch {
    pid: i32,
    seen: Arc<Mutex<Vec<SliceChange>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SliceWatch {
    pub fn start(node: &Node, namespace: &str) -> SliceWatch {
        let (pid, stdout) = kubectl_watch(node, "endpointslices", namespace);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        let thread = std::thread::Builder::new()
            .name("slice-watch".into())
            .spawn(move || {
                let mut last: BTreeMap<String, (bool, bool, bool)> = BTreeMap::new();
                let events = serde_json::Deserializer::from_reader(BufReader::new(stdout))
                    .into_iter::<Json>();
                for ev in events.map_while(Result::ok) {
                    let t = now();
                    for e in ev["object"]["endpoints"].as_array().into_iter().flatten() {
                        let Some(pod) = e["targetRef"]["name"].as_str() else {
                            continue;
                        };
                        let c = &e["conditions"];
                        let state = (
                            c["ready"] == true,
                            c["serving"] == true,
                            c["terminating"] == true,
                        );
                        if last.get(pod) != Some(&state) {
                            last.insert(pod.to_string(), state);
                            out.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(SliceChange {
                                    at: t,
                                    pod: pod.to_string(),
                                    ready: state.0,
                                    serving: state.1,
                                    terminating: state.2,
                                });
                        }
                    }
                }
            })
            .expect("spawn the slice-watch thread");
        SliceWatch {
            pid,
            seen,
            thread: Some(thread),
        }
    }

    /// Every change, in order.
    pub fn changes(&self) -> Vec<SliceChange> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for SliceWatch {
    fn drop(&mut self) {
        stop(self.pid);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An answer (a status, or what went wrong) and when it was first seen.
type Answer = (f64, Result<u16, String>);

/// Polls `GET path` on `addr` every 100 ms (apart from any load balancer: to time when an
/// answer changes) and records each change of the answer. Bounded by `max`; stops on drop.
pub struct Prober {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Answer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    pub fn start(addr: SocketAddr, path: &str, max: Duration) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (halt, out, path) = (stop.clone(), changes.clone(), path.to_string());
        let thread = std::thread::Builder::new()
            .name("prober".into())
            .spawn(move || {
                let end = Instant::now() + max;
                let mut last: Option<Result<u16, String>> = None;
                while !halt.load(Ordering::Relaxed) && Instant::now() < end {
                    let at = now();
                    let answer =
                        http_get(addr, &path, Duration::from_secs(1)).map(|(code, _)| code);
                    if last.as_ref() != Some(&answer) {
                        last = Some(answer.clone());
                        out.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((at, answer));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .expect("spawn the prober thread");
        Prober {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    /// The answers, each with the time it was first seen.
    pub fn changes(&self) -> Vec<Answer> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
