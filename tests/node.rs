//! The node tier: lameduck under a real kubelet (tests/support/node.rs). A pod's termination
//! is run by the kubelet itself (preStop `httpGet` to the pod IP, the grace period, the
//! sidecar ordering), a Deployment's rolling update by the real Deployment, ReplicaSet and
//! EndpointSlice controllers and scheduler, and the load balancer is HAProxy fed by a
//! controller that lags behind the EndpointSlices, as the AWS Load Balancer Controller does.
//! Pods are injected by `lameduck inject` (this build's binary) on the manifests.
//!
//! Needs root and the tools of `.ci/install-node.sh` (and the control plane of
//! `.ci/install-cluster.sh`, kubectl); without them every test prints `SKIPPED:` and passes,
//! unless `LAMEDUCK_REQUIRE_TOOLS=1`. The tests share one node and run one at a time.
//! Figures are printed on stderr (`--nocapture`) as `node-tier:` lines; docs/node-tier.md
//! has a run's.

#[path = "support/node.rs"]
mod node;
#[path = "support/tools.rs"]
mod tools;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use node::{
    now, poll, summary, KlogLine, Lag, Lb, Load, Node, Rec, APP_IMAGE, APP_PORT, GATE,
    LAMEDUCK_IMAGE, PATIENCE,
};
use serde_json::{json, Value as Json};

const BIN: &str = env!("CARGO_BIN_EXE_lameduck");

/// The ALB stand-in's lag: registration 1 s after an endpoint is registrable, deregistration
/// 5 s after it turns terminating (70 s has been seen in production; 5 s is enough to fail
/// requests and keeps the tier short).
const LAG: Lag = Lag {
    register: Duration::from_secs(1),
    deregister: Some(Duration::from_secs(5)),
};
/// New connections per second through the load balancer, and the keep-alive client's rate.
const RATE: u32 = 40;
const KEEPALIVE_RATE: u32 = 20;
/// Upper bound of one run's load.
const LOAD_MAX: Duration = Duration::from_secs(300);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "node-tier: {line}");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// No lameduck: the naive app alone.
    Alone,
    /// Injected as a native sidecar (the default).
    Native,
    /// Injected as a regular container (`lameduck.io/native-sidecar: "false"`).
    Regular,
}

/// The app's pod template: the naive app on its port named `http`, the readiness gate of
/// the load balancer stand-in, no service-account token.
fn template(annotations: Json, inject: bool) -> Json {
    let mut labels = json!({"app": "web"});
    if inject {
        labels["lameduck.io/inject"] = json!("true");
    }
    json!({
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "readinessGates": [{"conditionType": GATE}],
            "containers": [{
                "name": "app",
                "image": APP_IMAGE,
                "imagePullPolicy": "Never",
                "args": [APP_PORT.to_string()],
                "ports": [{"name": "http", "containerPort": APP_PORT}],
            }],
        },
    })
}

fn variant_annotations(variant: Variant, extra: &[(&str, &str)]) -> Json {
    let mut a = serde_json::Map::new();
    if variant == Variant::Regular {
        a.insert("lameduck.io/native-sidecar".into(), json!("false"));
    }
    for (k, v) in extra {
        a.insert((*k).into(), json!(v));
    }
    Json::Object(a)
}

fn service() -> Json {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            // By name: injection moves the name to lameduck's port.
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    })
}

fn pod(name: &str, variant: Variant, extra: &[(&str, &str)]) -> Json {
    let t = template(
        variant_annotations(variant, extra),
        variant != Variant::Alone,
    );
    let mut meta = t["metadata"].clone();
    meta["name"] = json!(name);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": t["spec"]})
}

/// `lameduck inject` (this build) on the manifests, with the image imported into the node.
fn inject(manifests: &[Json]) -> String {
    let input = json!({"apiVersion": "v1", "kind": "List", "items": manifests}).to_string();
    let mut child = Command::new(BIN)
        .args(["inject", "--sidecar-image", LAMEDUCK_IMAGE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lameduck inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write inject's stdin");
    let out = child.wait_with_output().expect("wait for inject");
    assert!(
        out.status.success(),
        "lameduck inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn manifests(variant: Variant, objects: &[Json]) -> String {
    if variant == Variant::Alone {
        json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string()
    } else {
        inject(objects)
    }
}

fn condition(pod: &Json, kind: &str) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == kind && c["status"] == "True"))
}

fn wait_ready(node: &Node, ns: &str, count: usize) {
    let ok = poll(PATIENCE, || {
        let pods = node.pods(ns);
        pods.len() == count
            && pods
                .iter()
                .all(|p| condition(p, "Ready") && p["metadata"]["deletionTimestamp"].is_null())
    });
    assert!(
        ok,
        "{count} pods not Ready in {PATIENCE:?}: {}",
        node.kubectl(&["get", "pods", "-n", ns, "-o", "wide"], None)
    );
}

/// Waits (bounded) until `load` has sent `more` more requests.
fn run_for(load: &Load, more: usize) {
    let target = load.count() + more;
    assert!(
        poll(Duration::from_secs(60), || load.count() >= target),
        "the load generator stalled"
    );
}

/// The kubelet lines of one pod's termination, by message and container.
struct Termination {
    lines: Vec<KlogLine>,
}

impl Termination {
    /// Once the kubelet has logged the app's SIGTERM (bounded wait: klog flushes on a
    /// timer).
    fn of(node: &Node, ns: &str, pod: &str) -> Termination {
        let mut lines = Vec::new();
        poll(Duration::from_secs(10), || {
            lines = node.kubelet_lines(ns, pod);
            lines.iter().any(|l| l.is(KILL, "app"))
        });
        Termination { lines }
    }

    fn at(&self, msg: &str, container: &str) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| l.is(msg, container))
            .map(|l| l.at)
    }

    fn must(&self, msg: &str, container: &str) -> f64 {
        self.at(msg, container).unwrap_or_else(|| {
            panic!(
                "no kubelet line {msg:?} for {container}; the pod's lines:\n{}",
                self.text()
            )
        })
    }

    fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The lines a reader wants to see, from the first preStop on.
    fn story(&self) -> Vec<String> {
        let keys = [
            "SyncLoop DELETE",
            "Running preStop hook",
            "PreStop hook completed",
            "PreStop hook not completed in grace period",
            "HTTP lifecycle hook for Container in Pod failed",
            "PreStop hook failed",
            "Killing container with a grace period",
            "Container exited normally",
        ];
        self.lines
            .iter()
            .filter(|l| keys.iter().any(|k| l.text.contains(k)))
            .map(|l| l.text.clone())
            .collect()
    }
}

const KILL: &str = "Killing container with a grace period";
const PRESTOP: &str = "Running preStop hook";
const PRESTOP_DONE: &str = "PreStop hook completed";
const EXITED: &str = "Container exited normally";

/// lameduck's own log line ending its drain (the CRI log of its container).
/// Its time is lameduck's own (the line's leading RFC 3339 timestamp), not the runtime's,
/// which is when containerd read the pipe.
fn drained_line(node: &Node, ns: &str, pod: &str) -> Option<node::PodLogLine> {
    node.logs
        .of(ns, pod, "lameduck")
        .into_iter()
        .find(|l| l.text.contains("drained:") || l.text.contains("drain cut short"))
        .map(|mut l| {
            if let Some(own) = l
                .text
                .split_whitespace()
                .next()
                .and_then(node::parse_rfc3339)
            {
                l.at = own;
            }
            l
        })
}

fn field(text: &str, key: &str) -> Option<f64> {
    let i = text.find(&format!("{key}="))? + key.len() + 1;
    text[i..]
        .split(|c: char| c != '.' && !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn failed(recs: &[Rec]) -> usize {
    recs.iter().filter(|r| !r.ok()).count()
}

// === a. one pod deleted under load ===

struct Deleted {
    recs: Vec<Rec>,
    term: Termination,
    deleted_at: f64,
    target: node::Target,
    drained: Option<node::PodLogLine>,
}

/// Two pods behind the load balancer; `web-0` is deleted through the API under load.
/// `grace_period`: `kubectl delete --grace-period`, else the pod's own.
fn delete_one(
    node: &'static Node,
    variant: Variant,
    lag: Lag,
    extra: &[(&str, &str)],
    grace_period: Option<u32>,
) -> Deleted {
    let label = match variant {
        Variant::Alone => "alone",
        Variant::Native => "native",
        Variant::Regular => "regular",
    };
    let ns = node.namespace(&format!("delete-{label}"));
    let lb = Lb::start(node, &ns.name, lag);
    let objects = vec![
        service(),
        pod("web-0", variant, extra),
        pod("web-1", variant, extra),
    ];
    node.apply(&ns.name, &manifests(variant, &objects));
    wait_ready(node, &ns.name, 2);
    let load = Load::start(lb.addr, RATE, KEEPALIVE_RATE, LOAD_MAX);
    // A few seconds of steady traffic (and of health checks) before the deletion.
    run_for(&load, (RATE * 3) as usize);
    let deleted_at = now();
    let grace = grace_period.map(|g| format!("--grace-period={g}"));
    let mut args = vec!["delete", "pod", "web-0", "-n", &ns.name, "--wait=false"];
    args.extend(grace.as_deref());
    node.kubectl(&args, None);
    // Until the pod is gone and the load balancer has let go of it (or never will).
    let gone = poll(Duration::from_secs(180), || {
        lb.targets().get("web-0").is_some_and(|t| {
            t.deleted_at.is_some() && (lag.deregister.is_none() || t.deregistered_at.is_some())
        })
    });
    assert!(gone, "web-0 was not gone and deregistered within 180 s");
    run_for(&load, RATE as usize);
    let recs = load.stop();
    let target = lb.targets().get("web-0").cloned().unwrap_or_default();
    let term = Termination::of(node, &ns.name, "web-0");
    let drained = drained_line(node, &ns.name, "web-0");
    report(&format!(
        "delete one pod, {label}: {}; web-0 terminating {:+.2}s, deregistered {:+.2}s, \
         app SIGTERM {:+.2}s, pod gone {:+.2}s after the DELETE",
        summary(&recs),
        target.terminating_at.unwrap_or(f64::NAN) - deleted_at,
        target.deregistered_at.unwrap_or(f64::NAN) - deleted_at,
        term.at(KILL, "app").unwrap_or(f64::NAN) - deleted_at,
        target.deleted_at.unwrap_or(f64::NAN) - deleted_at,
    ));
    drop(lb);
    drop(ns);
    Deleted {
        recs,
        term,
        deleted_at,
        target,
        drained,
    }
}

#[test]
fn delete_one_pod_app_alone_fails_requests() {
    let Some(node) = node::node("delete_one_pod_app_alone_fails_requests") else {
        return;
    };
    let _serial = serial();
    let run = delete_one(node, Variant::Alone, LAG, &[], None);
    // The naive app exits at SIGTERM while the load balancer still sends to it.
    assert!(
        failed(&run.recs) > 0,
        "the app alone failed no request: the test would not see the problem; {}",
        summary(&run.recs)
    );
    let kill = run.term.must(KILL, "app");
    let dereg = run.target.deregistered_at.expect("web-0 was deregistered");
    assert!(
        kill < dereg,
        "app alone: SIGTERM came before deregistration"
    );
}

/// Checks what every lameduck termination must show, and returns (preStop start, preStop
/// completed, app SIGTERM, sidecar SIGTERM).
fn lameduck_termination(run: &Deleted, label: &str) -> (f64, f64, f64, f64) {
    assert_eq!(
        failed(&run.recs),
        0,
        "{label}: requests failed through lameduck: {}",
        summary(&run.recs)
    );
    assert!(
        run.recs.len() > 200,
        "{label}: too little load: {}",
        run.recs.len()
    );
    let t = &run.term;
    let pre = t.must(PRESTOP, "app");
    let done = t.must(PRESTOP_DONE, "app");
    let kill_app = t.must(KILL, "app");
    let kill_ld = t.must(KILL, "lameduck");
    let drained = run
        .drained
        .as_ref()
        .unwrap_or_else(|| panic!("{label}: no drain line in lameduck's log"));
    assert!(
        drained.text.contains("drained: no request for"),
        "{label}: the drain did not end quiet: {}",
        drained.text
    );
    let dereg = run.target.deregistered_at.expect("web-0 was deregistered");
    // preStop → /drain answered (lameduck's line, then the kubelet's) → app SIGTERM.
    assert!(pre < drained.at, "{label}: drained before the preStop ran");
    assert!(
        drained.at <= done + 0.25,
        "{label}: the kubelet's preStop completed {:.3}s before lameduck drained",
        drained.at - done
    );
    assert!(
        done <= kill_app,
        "{label}: app SIGTERM before the preStop completed"
    );
    // The app is signalled only after the load balancer let go.
    assert!(
        kill_app > dereg,
        "{label}: app SIGTERM {:.2}s before deregistration",
        dereg - kill_app
    );
    (pre, done, kill_app, kill_ld)
}

#[test]
fn delete_one_pod_native_sidecar_loses_nothing() {
    let Some(node) = node::node("delete_one_pod_native_sidecar_loses_nothing") else {
        return;
    };
    let _serial = serial();
    let run = delete_one(node, Variant::Native, LAG, &[], None);
    let (_, done, kill_app, kill_ld) = lameduck_termination(&run, "native");
    // A native sidecar is signalled only after the app's container exited.
    let app_exited = run.term.must(EXITED, "app");
    assert!(
        kill_app < app_exited && app_exited <= kill_ld,
        "native: the sidecar was signalled before the app exited"
    );
    report(&format!(
        "native: preStop completed → app SIGTERM {:.3}s → sidecar SIGTERM {:.3}s later; \
         app SIGTERM {:.2}s after deregistration; lameduck: {}; kubelet lines:\n{}",
        kill_app - done,
        kill_ld - kill_app,
        kill_app - run.target.deregistered_at.unwrap_or(f64::NAN),
        run.drained
            .as_ref()
            .map(|l| l.text.as_str())
            .unwrap_or_default(),
        run.term.story().join("\n")
    ));
}

#[test]
fn delete_one_pod_regular_sidecar_loses_nothing() {
    let Some(node) = node::node("delete_one_pod_regular_sidecar_loses_nothing") else {
        return;
    };
    let _serial = serial();
    let run = delete_one(node, Variant::Regular, LAG, &[], None);
    let (pre, done, kill_app, kill_ld) = lameduck_termination(&run, "regular");
    // A regular sidecar gets SIGTERM at once, while the app's preStop still runs; it keeps
    // serving until the drain ends.
    assert!(
        kill_ld < done,
        "regular: lameduck was signalled only after the preStop completed"
    );
    report(&format!(
        "regular: lameduck SIGTERM {:.3}s after the preStop started, preStop completed \
         {:.2}s later, app SIGTERM {:.3}s after that",
        kill_ld - pre,
        done - kill_ld,
        kill_app - done
    ));
}

// === b. a Deployment's rolling update under load ===

fn deployment(variant: Variant) -> Json {
    let t = template(variant_annotations(variant, &[]), variant != Variant::Alone);
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": t,
        },
    })
}

struct Rolled {
    recs: Vec<Rec>,
    /// Per old pod: deregistration → app SIGTERM, deregistration → pod gone.
    old: BTreeMap<String, (f64, f64)>,
    pods_seen: usize,
    /// Pods of the new ReplicaSet marked `lameduck.io/status: injected`.
    injected: usize,
    took: f64,
}

/// How the Deployment's pods get lameduck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Injection {
    /// `lameduck inject` on the manifests.
    Static,
    /// The real webhook, called by the apiserver for every pod the ReplicaSets create.
    Webhook,
}

fn rolling_update(node: &'static Node, variant: Variant, injection: Injection) -> Rolled {
    let label = match (variant, injection) {
        (Variant::Alone, _) => "alone",
        (_, Injection::Static) => "lameduck",
        (_, Injection::Webhook) => "webhook",
    };
    let ns = node.namespace(&format!("rollout-{label}"));
    let lb = Lb::start(node, &ns.name, LAG);
    let objects = [service(), deployment(variant)];
    let _webhook = (injection == Injection::Webhook).then(|| node.webhook());
    let manifest = if injection == Injection::Webhook {
        json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string()
    } else {
        manifests(variant, &objects)
    };
    node.apply(&ns.name, &manifest);
    wait_ready(node, &ns.name, 3);
    let old: Vec<String> = node
        .pods(&ns.name)
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let load = Load::start(lb.addr, RATE, KEEPALIVE_RATE, LOAD_MAX);
    run_for(&load, (RATE * 3) as usize);
    let began = now();
    node.kubectl(
        &[
            "patch",
            "deployment",
            "web",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"metadata":{"annotations":{"lameduck.test/rollout":"2"}}}}}"#,
        ],
        None,
    );
    let done = poll(Duration::from_secs(300), || {
        let d = node.get_json(&["deployment", "web", "-n", &ns.name]);
        let s = &d["status"];
        let targets = lb.targets();
        s["observedGeneration"] == d["metadata"]["generation"]
            && s["updatedReplicas"] == 3
            && s["availableReplicas"] == 3
            && s["replicas"] == 3
            && old.iter().all(|p| {
                targets
                    .get(p)
                    .is_some_and(|t| t.deleted_at.is_some() && t.deregistered_at.is_some())
            })
    });
    assert!(
        done,
        "the rolling update did not finish in 300 s: {}",
        node.kubectl(&["get", "pods", "-n", &ns.name, "-o", "wide"], None)
    );
    let took = now() - began;
    run_for(&load, RATE as usize);
    let recs = load.stop();
    let targets = lb.targets();
    let mut per_pod = BTreeMap::new();
    for p in &old {
        let t = &targets[p];
        let dereg = t.deregistered_at.unwrap_or(f64::NAN);
        let kill = Termination::of(node, &ns.name, p)
            .at(KILL, "app")
            .unwrap_or(f64::NAN);
        per_pod.insert(
            p.clone(),
            (kill - dereg, t.deleted_at.unwrap_or(f64::NAN) - dereg),
        );
    }
    let pods_seen = targets.len();
    let injected = node
        .pods(&ns.name)
        .iter()
        .filter(|p| p["metadata"]["annotations"]["lameduck.io/status"] == "injected")
        .count();
    report(&format!(
        "rolling update (3 replicas, maxSurge 1), {label}: {}; {pods_seen} pods, {took:.1}s; \
         per old pod (deregistration → app SIGTERM, → pod gone): {}",
        summary(&recs),
        per_pod
            .iter()
            .map(|(p, (k, g))| format!("{p}: {k:+.2}s, {g:+.2}s"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    drop(lb);
    drop(ns);
    Rolled {
        recs,
        old: per_pod,
        pods_seen,
        injected,
        took,
    }
}

#[test]
fn rolling_update_app_alone_fails_requests() {
    let Some(node) = node::node("rolling_update_app_alone_fails_requests") else {
        return;
    };
    let _serial = serial();
    let run = rolling_update(node, Variant::Alone, Injection::Static);
    assert!(
        failed(&run.recs) > 0,
        "the app alone lost nothing in a rolling update: {}",
        summary(&run.recs)
    );
    assert_eq!(run.pods_seen, 6, "3 old and 3 new pods");
}

fn assert_rollout_loses_nothing(run: &Rolled, label: &str) {
    assert_eq!(
        failed(&run.recs),
        0,
        "{label}: requests failed in a rolling update through lameduck: {}",
        summary(&run.recs)
    );
    assert_eq!(run.pods_seen, 6, "{label}: 3 old and 3 new pods");
    assert_eq!(run.injected, 3, "{label}: every new pod injected");
    report(&format!(
        "{label}: the rolling update took {:.1}s",
        run.took
    ));
    for (pod, (sigterm, gone)) in &run.old {
        // Signalled only once the load balancer had let go, and not much later: one
        // learned quiet window (health checks every 1 s) and drain-min.
        assert!(
            *sigterm > 0.0 && *sigterm < 15.0,
            "{label}: {pod}: app SIGTERM {sigterm:+.2}s from its deregistration"
        );
        assert!(
            *gone >= *sigterm,
            "{label}: {pod}: gone before its app's SIGTERM"
        );
    }
}

#[test]
fn rolling_update_with_lameduck_loses_nothing() {
    let Some(node) = node::node("rolling_update_with_lameduck_loses_nothing") else {
        return;
    };
    let _serial = serial();
    let run = rolling_update(node, Variant::Native, Injection::Static);
    assert_rollout_loses_nothing(&run, "lameduck inject");
}

#[test]
fn rolling_update_through_the_webhook_loses_nothing() {
    let Some(node) = node::node("rolling_update_through_the_webhook_loses_nothing") else {
        return;
    };
    let _serial = serial();
    let run = rolling_update(node, Variant::Native, Injection::Webhook);
    assert_rollout_loses_nothing(&run, "webhook");
}

// === c. a drain cut at drain-max ===

#[test]
fn drain_cut_at_drain_max_within_the_grace_period() {
    let Some(node) = node::node("drain_cut_at_drain_max_within_the_grace_period") else {
        return;
    };
    let _serial = serial();
    // A load balancer that never deregisters: traffic never stops.
    let never = Lag {
        register: LAG.register,
        deregister: None,
    };
    let drain_max = 10.0;
    let run = delete_one(
        node,
        Variant::Native,
        never,
        &[
            ("lameduck.io/drain-max", "10s"),
            ("lameduck.io/quiet-fallback", "8s"),
        ],
        None,
    );
    let t = &run.term;
    let pre = t.must(PRESTOP, "app");
    let done = t.must(PRESTOP_DONE, "app");
    let kill_app = t.must(KILL, "app");
    assert!(
        t.at("PreStop hook not completed in grace period", "app")
            .is_none(),
        "the grace period ran out before drain-max:\n{}",
        t.text()
    );
    let line = run
        .drained
        .as_ref()
        .expect("lameduck logged its drain's end");
    assert!(
        line.text.contains("drain cut short before traffic stopped")
            && line.text.contains("--drain-max (10s) reached")
            && (line.text.contains("reason=\"max\"") || line.text.contains("reason=max")),
        "not a drain-max line: {}",
        line.text
    );
    let took = field(&line.text, "drain_seconds").expect("drain_seconds in the line");
    assert!(
        (drain_max..drain_max + 1.5).contains(&took),
        "the drain took {took}s, drain-max is {drain_max}s"
    );
    // The kubelet waited for /drain, no longer: drain-max, then SIGTERM.
    assert!(
        (drain_max - 0.5..drain_max + 2.0).contains(&(done - pre)),
        "preStop ran {:.2}s",
        done - pre
    );
    // terminationGracePeriodSeconds is drain-max + 30 s: the whole termination fits in it.
    let gone = run.target.deleted_at.expect("web-0 is gone") - run.deleted_at;
    assert!(
        gone < drain_max + 30.0,
        "the pod took {gone:.1}s to go, beyond its grace period"
    );
    // Until the cut, lameduck served everything.
    let before_cut: Vec<Rec> = run
        .recs
        .iter()
        .filter(|r| r.at < kill_app - 0.2)
        .cloned()
        .collect();
    assert_eq!(
        failed(&before_cut),
        0,
        "requests failed before drain-max: {}",
        summary(&before_cut)
    );
    report(&format!(
        "drain-max 10s, never deregistered: preStop {:.2}s, drain {took:.2}s, pod gone \
         {gone:.1}s after the DELETE (grace period 40s); {} ({} before the cut); \
         lameduck: {}",
        done - pre,
        summary(&run.recs),
        summary(&before_cut),
        line.text
    ));
}

/// The other bound: a grace period shorter than the drain (`kubectl delete --grace-period`
/// overrides the pod's). The kubelet abandons the preStop when it runs out and signals the
/// app and the sidecar together; the pod goes within the grace period plus the kubelet's
/// 2 s minimum.
#[test]
fn grace_period_bounds_a_drain_that_never_ends() {
    let Some(node) = node::node("grace_period_bounds_a_drain_that_never_ends") else {
        return;
    };
    let _serial = serial();
    let never = Lag {
        register: LAG.register,
        deregister: None,
    };
    let grace = 8.0;
    let run = delete_one(node, Variant::Native, never, &[], Some(8));
    let t = &run.term;
    let pre = t.must(PRESTOP, "app");
    let cut = t.must("PreStop hook not completed in grace period", "app");
    let kill_app = t.must(KILL, "app");
    let kill_ld = t.must(KILL, "lameduck");
    assert!(
        t.at(PRESTOP_DONE, "app").is_none(),
        "the preStop completed within the grace period:\n{}",
        t.text()
    );
    assert!(
        (grace - 0.5..grace + 1.5).contains(&(cut - pre)),
        "the kubelet gave up on the preStop after {:.2}s, the grace period is {grace}s",
        cut - pre
    );
    // Out of time, the kubelet no longer waits for the app to exit before signalling the
    // native sidecar: both go at the cut.
    assert!(
        cut <= kill_app && kill_app - cut < 1.0 && (kill_ld - cut).abs() < 1.0,
        "app and sidecar not signalled at the cut:\n{}",
        t.story().join("\n")
    );
    let gone = run.target.deleted_at.expect("web-0 is gone") - run.deleted_at;
    assert!(
        gone < grace + 2.0 + 2.0 + 3.0,
        "the pod took {gone:.1}s to go with a {grace}s grace period"
    );
    // lameduck was still draining (drain-max 120 s) and serving until the app's SIGTERM.
    let before: Vec<Rec> = run
        .recs
        .iter()
        .filter(|r| r.at < kill_app - 0.2)
        .cloned()
        .collect();
    assert_eq!(failed(&before), 0, "failed before the grace period ran out");
    report(&format!(
        "grace period 8s (kubectl delete --grace-period=8), never deregistered: preStop \
         abandoned after {:.2}s, app SIGTERM {:.3}s later, sidecar SIGTERM {:+.3}s from the \
         app's, pod gone {gone:.1}s after the DELETE; {} ({} before the cut); kubelet \
         lines:\n{}",
        cut - pre,
        kill_app - cut,
        kill_ld - kill_app,
        summary(&run.recs),
        summary(&before),
        t.story().join("\n")
    ));
}

// === d'. the native sidecar killed mid-drain ===

/// What `web-0`'s sidecar said through its admin port on the pod IP: (status, body).
fn admin_get(ip: &str, path: &str) -> Result<(u16, String), String> {
    let addr = format!("{ip}:9901").parse().expect("admin address");
    node::http_get(addr, path, Duration::from_secs(2))
}

/// The lameduck container of a pod as the API shows it: (containerID, restartCount).
fn sidecar_status(pod: &Json) -> Option<(String, u64)> {
    pod["status"]["initContainerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "lameduck")
        .map(|c| {
            (
                c["containerID"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("containerd://")
                    .to_string(),
                c["restartCount"].as_u64().unwrap_or(0),
            )
        })
}

/// The PID of a running container's init process, as containerd knows it.
fn task_pid(node: &Node, id: &str) -> Option<i32> {
    let out = Command::new("ctr")
        .arg(format!(
            "--address={}",
            node.dir.join("containerd/containerd.sock").display()
        ))
        .args(["-n", "k8s.io", "tasks", "ls"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(id) && l.contains("RUNNING"))
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

/// One pod injected as a native sidecar behind a load balancer that deregisters 12 s late,
/// deleted under load; once its lameduck drains, the lameduck process is SIGKILLed (as an
/// OOM kill would be). The kubelet v1.37.2 does not restart it: the pod is terminating, so
/// its worker runs `SyncTerminatingPod` (kill only), never `SyncPod`, which is where a
/// restartable init container is restarted. The app's running preStop (`GET /drain`) fails
/// with the connection, the kubelet signals the app at once, and requests fail until the
/// load balancer's health checks take the target down.
#[test]
fn native_sidecar_killed_mid_drain_is_not_restarted() {
    let Some(node) = node::node("native_sidecar_killed_mid_drain_is_not_restarted") else {
        return;
    };
    let _serial = serial();
    let lag = Lag {
        register: LAG.register,
        deregister: Some(Duration::from_secs(12)),
    };
    let ns = node.namespace("killed");
    let lb = Lb::start(node, &ns.name, lag);
    let objects = vec![
        service(),
        pod("web-0", Variant::Native, &[]),
        pod("web-1", Variant::Native, &[]),
    ];
    node.apply(&ns.name, &manifests(Variant::Native, &objects));
    wait_ready(node, &ns.name, 2);
    let web0 = node.get_json(&["pod", "web-0", "-n", &ns.name]);
    let ip = web0["status"]["podIP"].as_str().expect("podIP").to_string();
    let (first_id, _) = sidecar_status(&web0).expect("web-0's lameduck status");
    let load = Load::start(lb.addr, RATE, KEEPALIVE_RATE, LOAD_MAX);
    run_for(&load, (RATE * 3) as usize);
    let deleted_at = now();
    node.kubectl(
        &["delete", "pod", "web-0", "-n", &ns.name, "--wait=false"],
        None,
    );
    // Until lameduck says it drains (its admin port on the pod IP, as the preStop reaches it).
    let draining = poll(Duration::from_secs(30), || {
        admin_get(&ip, "/status").is_ok_and(|(_, b)| b.contains("\"state\":\"draining\""))
    });
    assert!(draining, "web-0's lameduck never said it was draining");
    let draining_at = now();
    // A second of traffic through the draining sidecar, then the kill.
    run_for(&load, RATE as usize);
    let pid = task_pid(node, &first_id).expect("lameduck's PID from containerd");
    let killed_at = now();
    let out = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .expect("run kill");
    assert!(out.status.success(), "kill -KILL {pid} failed");

    // Until the pod is gone, watching for a second lameduck (a new container ID or a
    // restart count) and asking its admin port, as a restarted one would answer.
    let mut restarted: Option<(String, u64)> = None;
    let mut answers = Vec::new();
    let gone = poll(Duration::from_secs(60), || {
        let pods = node.pods(&ns.name);
        let Some(p) = pods.iter().find(|p| p["metadata"]["name"] == "web-0") else {
            return true;
        };
        if let Some((id, n)) = sidecar_status(p) {
            if n > 0 || (!id.is_empty() && id != first_id) {
                restarted = Some((id, n));
            }
        }
        if let Ok(a) = admin_get(&ip, "/status") {
            answers.push(a);
        }
        false
    });
    assert!(gone, "web-0 was not gone within 60 s");
    let events = node.kubectl(&["get", "events", "-n", &ns.name], None);
    let dereg = poll(Duration::from_secs(60), || {
        lb.targets()
            .get("web-0")
            .is_some_and(|t| t.deregistered_at.is_some())
    });
    assert!(dereg, "web-0 was not deregistered");
    run_for(&load, RATE as usize);
    let recs = load.stop();
    let target = lb.targets().get("web-0").cloned().unwrap_or_default();
    let mut term = Termination { lines: Vec::new() };
    poll(Duration::from_secs(10), || {
        term.lines = node.kubelet_lines(&ns.name, "web-0");
        term.lines.iter().any(|l| l.is(KILL, "lameduck"))
    });
    let ld_logs = node.logs.of(&ns.name, "web-0", "lameduck");
    drop(lb);
    drop(ns);

    let t = &term;
    let rel = |at: f64| format!("{:+.2}s", at - deleted_at);
    let failures: Vec<&Rec> = recs.iter().filter(|r| !r.ok()).collect();
    let pre = t.must(PRESTOP, "app");
    let pre_failed = t.must("PreStop hook failed", "app");
    let done = t.must(PRESTOP_DONE, "app");
    let kill_app = t.must(KILL, "app");
    let app_exited = t.must(EXITED, "app");
    let kill_ld = t
        .lines
        .iter()
        .filter(|l| l.is(KILL, "lameduck"))
        .map(|l| l.at)
        .next_back()
        .unwrap_or(f64::NAN);
    report(&format!(
        "native sidecar SIGKILLed mid-drain: {}; lameduck draining {}, SIGKILL {}, preStop \
         started {}, \"PreStop hook failed\" {}, app SIGTERM {}, app exited {}, lameduck \
         \"Killing container\" {}, pod gone {}, deregistered {}; failed from {} to {}; \
         restarted: {restarted:?}; admin answers after the kill: {}",
        summary(&recs),
        rel(draining_at),
        rel(killed_at),
        rel(pre),
        rel(pre_failed),
        rel(kill_app),
        rel(app_exited),
        rel(kill_ld),
        target.deleted_at.map_or("never".into(), rel),
        target.deregistered_at.map_or("never".into(), rel),
        failures.first().map_or("-".into(), |r| rel(r.at)),
        failures.last().map_or("-".into(), |r| rel(r.at)),
        answers.len(),
    ));
    report(&format!("killed: kubelet lines:\n{}", t.story().join("\n")));
    report(&format!(
        "killed: lameduck's log:\n{}",
        ld_logs
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    ));

    // Not restarted: no second container, no second process's log, nothing on its port.
    assert!(
        restarted.is_none(),
        "the kubelet restarted the killed sidecar: {restarted:?}"
    );
    assert!(
        answers.is_empty(),
        "something answered on the admin port after the kill: {answers:?}"
    );
    let starts = ld_logs
        .iter()
        .filter(|l| l.text.contains("lameduck proxy serving"))
        .count();
    assert_eq!(starts, 1, "lameduck started {starts} times");
    assert!(
        !ld_logs.iter().any(|l| l
            .text
            .contains("resuming the drain an earlier process began")),
        "a lameduck resumed the drain"
    );
    assert!(
        !t.lines
            .iter()
            .any(|l| l.at > deleted_at && l.text.contains("\"Type\":\"ContainerStarted\"")),
        "the kubelet started a container after the DELETE:\n{}",
        t.text()
    );
    // The app's preStop failed with the connection, right after the kill; the kubelet
    // counts it as done and signals the app at once, long before deregistration.
    assert!(
        pre < killed_at && killed_at <= pre_failed + 0.05 && pre_failed - killed_at < 3.0,
        "\"PreStop hook failed\" not just after the kill:\n{}",
        t.story().join("\n")
    );
    assert!(
        pre_failed <= done && done <= kill_app && kill_app - pre_failed < 0.5,
        "the app not signalled at the failed preStop:\n{}",
        t.story().join("\n")
    );
    assert!(
        app_exited <= kill_ld,
        "the sidecar's kill came before the app exited:\n{}",
        t.story().join("\n")
    );
    assert!(
        kill_app < target.deregistered_at.unwrap_or(f64::NAN) - 5.0,
        "the app's SIGTERM was not well before deregistration"
    );
    assert!(
        events.contains("FailedPreStopHook"),
        "no FailedPreStopHook event:\n{events}"
    );
    // Requests fail, only from the kill on (the draining sidecar served everything before).
    assert!(
        !failures.is_empty(),
        "no request failed: the test would not see the problem; {}",
        summary(&recs)
    );
    assert!(
        failures.iter().all(|r| r.at >= killed_at - 0.2),
        "requests failed before the kill: {}",
        summary(&recs)
    );
}

// === e. the seed's canary with the real Argo Rollouts controller ===

/// The seed's Rollout (k8s/examples/checkout-rollout.yaml): 5 replicas, ALB traffic
/// routing through the Ingress `web` (root Service `web-stable`), the seed's steps with the
/// pauses shortened to 5 s; `dynamicStableScale: true`, or the workaround
/// (`dynamicStableScale: false`, `scaleDownDelaySeconds`).
fn rollout(variant: Variant, dynamic: bool) -> Json {
    let t = template(variant_annotations(variant, &[]), variant != Variant::Alone);
    let pause = json!({"pause": {"duration": "5s"}});
    let mut canary = json!({
        "canaryService": "web-canary",
        "stableService": "web-stable",
        "trafficRouting": {"alb": {"ingress": "web", "servicePort": 80}},
        "steps": [
            {"setCanaryScale": {"matchTrafficWeight": true}},
            {"setWeight": 10}, pause,
            {"setWeight": 60}, pause,
            {"setWeight": 80}, pause,
            {"setWeight": 90}, pause,
            {"setWeight": 100}, pause,
        ],
    });
    if dynamic {
        canary["dynamicStableScale"] = json!(true);
    } else {
        canary["scaleDownDelaySeconds"] = json!(10);
    }
    json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 5,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": t,
            "strategy": {"canary": canary},
        },
    })
}

fn named_service(name: &str) -> Json {
    let mut s = service();
    s["metadata"]["name"] = json!(name);
    s
}

fn ingress() -> Json {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web"},
        "spec": {
            "ingressClassName": "alb",
            "rules": [{"http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web-stable", "port": {"name": "use-annotation"}}},
            }]}}],
        },
    })
}

struct Canaried {
    recs: Vec<Rec>,
    fleet: node::Fleet,
    took: f64,
    old_pods: usize,
    /// Per old pod: its stable target's deregistration → pod gone.
    gone_after_dereg: Vec<f64>,
    /// The highest canary weight the load balancer applied from Argo's annotation.
    max_canary_weight: u32,
}

fn canary(node: &'static Node, variant: Variant, dynamic: bool) -> Canaried {
    let label = match (variant, dynamic) {
        (Variant::Alone, true) => "canary-alone",
        (Variant::Alone, false) => "canary-workaround",
        (_, _) => "canary-lameduck",
    };
    node.argo();
    let ns = node.namespace(label);
    let lb = Lb::start_weighted(node, &ns.name, LAG, "web-stable");
    let objects = [
        named_service("web-stable"),
        named_service("web-canary"),
        ingress(),
        rollout(variant, dynamic),
    ];
    node.apply(&ns.name, &manifests(variant, &objects));
    let phase = |want: &str| {
        let r = node.get_json(&["rollout", "web", "-n", &ns.name]);
        r["status"]["phase"] == want
            && r["status"]["currentPodHash"] == r["status"]["stableRS"]
            && r["status"]["observedGeneration"]
                .as_str()
                .and_then(|g| g.parse::<i64>().ok())
                .or_else(|| r["status"]["observedGeneration"].as_i64())
                == r["metadata"]["generation"].as_i64()
    };
    wait_ready(node, &ns.name, 5);
    assert!(
        poll(PATIENCE, || phase("Healthy")),
        "the Rollout did not become Healthy: {}",
        node.get_json(&["rollout", "web", "-n", &ns.name])["status"]
    );
    let old: Vec<String> = node
        .pods(&ns.name)
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let load = Load::start(lb.addr, RATE, KEEPALIVE_RATE, LOAD_MAX);
    run_for(&load, (RATE * 3) as usize);
    lb.fleet_mark();
    let began = now();
    node.kubectl(
        &[
            "patch",
            "rollout",
            "web",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"metadata":{"annotations":{"lameduck.test/rollout":"2"}}}}}"#,
        ],
        None,
    );
    let done = poll(Duration::from_secs(400), || {
        let deleted = lb.deleted();
        let targets = lb.targets();
        phase("Healthy")
            && old.iter().all(|p| deleted.contains_key(p))
            && targets
                .values()
                .filter(|t| old.contains(&t.pod) && t.registered_at.is_some())
                .all(|t| t.deregistered_at.is_some())
    });
    assert!(
        done,
        "the canary did not finish in 400 s: {}\n{}",
        node.get_json(&["rollout", "web", "-n", &ns.name])["status"],
        node.kubectl(&["get", "pods", "-n", &ns.name, "-o", "wide"], None)
    );
    let took = now() - began;
    let fleet = lb.fleet();
    run_for(&load, RATE as usize);
    let recs = load.stop();
    let deleted = lb.deleted();
    let targets = lb.targets();
    let gone_after_dereg: Vec<f64> = old
        .iter()
        .filter_map(|p| {
            let dereg = targets.get(&format!("web-stable/{p}"))?.deregistered_at?;
            Some(deleted.get(p)? - dereg)
        })
        .collect();
    let weights = lb.weights();
    report(&format!(
        "{label}: {}; peak {} pods, {:.0} pod-seconds over {took:.1}s ({:.2}× 5 pods); \
         old pod gone after its deregistration: {}; weights applied: {}",
        summary(&recs),
        fleet.peak,
        fleet.pod_seconds,
        fleet.pod_seconds / (5.0 * took),
        gone_after_dereg
            .iter()
            .map(|g| format!("{g:+.1}s"))
            .collect::<Vec<_>>()
            .join(" "),
        weights
            .iter()
            .map(|(_, w)| format!("{w:?}"))
            .collect::<Vec<_>>()
            .join(" → ")
    ));
    // Without the garbage collector's help, the Rollout goes before its pods.
    let _ = node.kubectl_raw(
        &["delete", "rollout", "web", "-n", &ns.name, "--wait=false"],
        None,
    );
    drop(lb);
    drop(ns);
    Canaried {
        recs,
        fleet,
        took,
        old_pods: old.len(),
        gone_after_dereg,
        max_canary_weight: weights
            .iter()
            .filter_map(|(_, w)| w.get("web-canary").copied())
            .max()
            .unwrap_or(0),
    }
}

#[test]
fn canary_app_alone_fails_requests() {
    let Some(node) = node::node("canary_app_alone_fails_requests") else {
        return;
    };
    if !node::argo_available("canary_app_alone_fails_requests") {
        return;
    }
    let _serial = serial();
    let run = canary(node, Variant::Alone, true);
    assert!(
        failed(&run.recs) > 0,
        "the app alone lost nothing in the canary: {}",
        summary(&run.recs)
    );
    assert_eq!(run.old_pods, 5);
    assert!(
        run.max_canary_weight >= 60,
        "Argo's weights did not reach the load balancer: canary at most {}",
        run.max_canary_weight
    );
}

#[test]
fn canary_with_lameduck_loses_nothing() {
    let Some(node) = node::node("canary_with_lameduck_loses_nothing") else {
        return;
    };
    if !node::argo_available("canary_with_lameduck_loses_nothing") {
        return;
    }
    let _serial = serial();
    let run = canary(node, Variant::Native, true);
    assert_eq!(
        failed(&run.recs),
        0,
        "requests failed in the canary through lameduck: {}",
        summary(&run.recs)
    );
    assert_eq!(run.old_pods, 5);
    assert!(
        run.max_canary_weight >= 60,
        "Argo's weights did not reach the load balancer: canary at most {}",
        run.max_canary_weight
    );
    assert!(
        run.gone_after_dereg.iter().all(|g| *g > 0.0),
        "an old pod went before its deregistration: {:?}",
        run.gone_after_dereg
    );
    assert!(run.fleet.peak <= 10, "peak {} pods", run.fleet.peak);
    report(&format!("canary-lameduck took {:.1}s", run.took));
}

/// The workaround users reach for without lameduck: `dynamicStableScale: false` with
/// `scaleDownDelaySeconds` (10 s here, twice the load balancer's lag). The old pods are
/// removed only after the traffic has left them, so nothing fails; the price is the whole
/// old fleet kept up beside the whole canary: the fleet-cost side of the comparison with
/// `canary_with_lameduck_loses_nothing` (docs/node-tier.md has both runs' figures).
#[test]
fn canary_workaround_keeps_the_old_fleet_up() {
    let Some(node) = node::node("canary_workaround_keeps_the_old_fleet_up") else {
        return;
    };
    if !node::argo_available("canary_workaround_keeps_the_old_fleet_up") {
        return;
    }
    let _serial = serial();
    let run = canary(node, Variant::Alone, false);
    assert_eq!(run.old_pods, 5);
    assert!(
        run.max_canary_weight >= 60,
        "Argo's weights did not reach the load balancer: canary at most {}",
        run.max_canary_weight
    );
    // Five canary pods come up while the five stable pods stay: the fleet doubles.
    assert!(
        run.fleet.peak >= 10,
        "the workaround did not keep the old fleet up: peak {} pods",
        run.fleet.peak
    );
    assert!(
        run.gone_after_dereg.iter().all(|g| *g > 0.0),
        "an old pod went before its deregistration: {:?}",
        run.gone_after_dereg
    );
    assert_eq!(
        failed(&run.recs),
        0,
        "requests failed with the workaround: {}",
        summary(&run.recs)
    );
    report(&format!("canary-workaround took {:.1}s", run.took));
}

// === f. kube-proxy: an NLB's NodePort with externalTrafficPolicy: Local ===

/// The NLB's health check of the node, on kube-proxy's health check node port: every 10 s,
/// unhealthy after 3 failed checks (an NLB's checks are seconds apart and need several
/// failures; 20-30 s from the first 503 to the node's removal, longer than the 5-10 s
/// lameduck's injected readiness probe takes to fail: period 5 s, failureThreshold 2).
const NLB_CHECK: node::NlbCheck = node::NlbCheck {
    interval: Duration::from_secs(10),
    timeout: Duration::from_secs(2),
    fall: 3,
    rise: 3,
};

/// The Service an NLB with instance targets sends to: `type: LoadBalancer` (the AWS Load
/// Balancer Controller's class and target type; no controller runs here, so its status stays
/// empty), `externalTrafficPolicy: Local`. The apiserver allocates its NodePort and, for this
/// type and policy only, its `healthCheckNodePort` (a `type: NodePort` Service gets none:
/// `needsHCNodePort`, pkg/registry/core/service/storage/storage.go).
fn local_service() -> Json {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "annotations": {
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance",
        }},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "service.k8s.aws/nlb",
            "externalTrafficPolicy": "Local",
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    })
}

/// The Service and `web-0` through `lameduck inject`, without the ALB stand-in's readiness
/// gate (no ALB here); `readiness` appended to the lameduck container's args when given.
/// `quiet-fallback: 5s`: the NLB checks kube-proxy, never lameduck, so `--quiet auto` has no
/// interval to learn and the fallback is the quiet window (30 s by default; 5 s keeps the
/// tier short and is still 100 times the gap between two connections of the load).
fn local_manifest(readiness: Option<&str>) -> String {
    let mut p = pod(
        "web-0",
        Variant::Native,
        &[("lameduck.io/quiet-fallback", "5s")],
    );
    p["spec"]
        .as_object_mut()
        .expect("a pod spec")
        .remove("readinessGates");
    let injected = inject(&[local_service(), p]);
    let mut list = node::documents(&injected)
        .into_iter()
        .next()
        .expect("inject printed a List");
    if let Some(flag) = readiness {
        let mut patched = 0;
        for item in list["items"].as_array_mut().expect("items") {
            for key in ["initContainers", "containers"] {
                for c in item["spec"][key].as_array_mut().into_iter().flatten() {
                    if c["name"] == "lameduck" {
                        c["args"]
                            .as_array_mut()
                            .expect("lameduck's args")
                            .push(json!(flag));
                        patched += 1;
                    }
                }
            }
        }
        assert_eq!(patched, 1, "one lameduck container to patch: {injected}");
    }
    list.to_string()
}

struct LocalRun {
    run: node::NlbRun,
    deleted_at: f64,
    /// When kube-proxy's health check node port first answered 503 after the DELETE
    /// (polled every 100 ms).
    hc_503_at: Option<f64>,
    /// The NLB's first check of the node that did not answer 200, after the DELETE.
    hc_failed_at: Option<f64>,
    /// When the NLB marked the node unhealthy.
    down_at: Option<f64>,
    terminating_at: Option<f64>,
    /// When web-0's endpoint turned `serving: false` (`None`: not before the pod went).
    not_serving_at: Option<f64>,
    gone_at: f64,
    term: Termination,
    drained: Option<node::PodLogLine>,
}

/// The NLB's targets: 0 the node, 1 the other backend.
const NODE: usize = 0;
const OTHER: usize = 1;

/// One injected pod behind a `LoadBalancer` Service with `externalTrafficPolicy: Local` on the
/// node, kube-proxy routing its NodePort, an NLB of the test's own sending to the node's
/// NodePort and to a second, always healthy backend, and checking the node on the Service's
/// `healthCheckNodePort`. `web-0` is deleted under load; the run lasts until the NLB has
/// marked the node down and the pod is gone.
fn nodeport_local(node: &'static Node, label: &str, readiness: Option<&str>) -> LocalRun {
    let proxy = node.kube_proxy();
    let ns = node.namespace(&format!("local-{label}"));
    let slices = node::SliceWatch::start(node, &ns.name);
    node.apply(&ns.name, &local_manifest(readiness));
    wait_ready(node, &ns.name, 1);
    let svc = node.get_json(&["service", "web", "-n", &ns.name]);
    let port = |v: &Json| v.as_u64().and_then(|p| u16::try_from(p).ok());
    let node_port = port(&svc["spec"]["ports"][0]["nodePort"]).expect("a nodePort");
    let hc_port = port(&svc["spec"]["healthCheckNodePort"]).expect("a healthCheckNodePort");
    let traffic = std::net::SocketAddr::from((node.node_ip, node_port));
    let hc = std::net::SocketAddr::from((node.node_ip, hc_port));
    let get = |addr, path| node::http_get(addr, path, Duration::from_secs(2));
    // kube-proxy has seen the Service and the ready endpoint.
    assert!(
        poll(Duration::from_secs(60), || {
            get(hc, "/").is_ok_and(|(c, _)| c == 200)
                && get(traffic, "/").is_ok_and(|(c, _)| c == 200)
        }),
        "kube-proxy did not route {traffic} or report {hc} healthy: {:?} {:?}\n{}",
        get(hc, "/"),
        get(traffic, "/"),
        node::tail(&proxy.log, 30)
    );
    // kube-proxy's answer on the health check node port, every 100 ms (apart from the NLB's
    // checks, 10 s apart): when it turns 503.
    let prober = node::Prober::start(hc, "/", LOAD_MAX);
    let backend = node::Backend::start();
    let nlb = node::Nlb::start(
        vec![
            node::NlbTarget {
                name: "node".into(),
                addr: traffic,
                check: Some(hc),
            },
            node::NlbTarget {
                name: "other".into(),
                addr: backend.addr,
                check: None,
            },
        ],
        NLB_CHECK,
        RATE,
        LOAD_MAX,
    );
    assert!(
        poll(Duration::from_secs(30), || nlb.healthy(NODE)),
        "the NLB never saw the node healthy"
    );
    nlb.send();
    let steady = (RATE * 3) as usize;
    assert!(
        poll(Duration::from_secs(60), || nlb.count() >= steady),
        "the NLB's client stalled"
    );
    let deleted_at = now();
    node.kubectl(
        &["delete", "pod", "web-0", "-n", &ns.name, "--wait=false"],
        None,
    );
    let mut gone_at = None;
    let done = poll(Duration::from_secs(180), || {
        if gone_at.is_none() && node.pods(&ns.name).is_empty() {
            gone_at = Some(now());
        }
        gone_at.is_some() && nlb.down_at(NODE).is_some()
    });
    assert!(
        done,
        "within 180 s: node marked down {:?}, pod gone {gone_at:?}",
        nlb.down_at(NODE)
    );
    let more = nlb.count() + RATE as usize;
    assert!(
        poll(Duration::from_secs(60), || nlb.count() >= more),
        "the NLB's client stalled"
    );
    let down_at = nlb.down_at(NODE);
    let run = nlb.finish();
    drop(backend);
    let changes = slices.changes();
    drop(slices);
    let after = |f: &dyn Fn(&node::SliceChange) -> bool| {
        changes
            .iter()
            .find(|c| c.at >= deleted_at - 0.5 && c.pod == "web-0" && f(c))
            .map(|c| c.at)
    };
    let terminating_at = after(&|c| c.terminating);
    let not_serving_at = after(&|c| !c.serving);
    let hc_503_at = prober
        .changes()
        .iter()
        .find(|(at, answer)| *at >= deleted_at && *answer == Ok(503))
        .map(|(at, _)| *at);
    drop(prober);
    let hc_failed_at = run
        .checks
        .iter()
        .find(|c| c.target == NODE && c.at >= deleted_at && c.outcome != Ok(200))
        .map(|c| c.at);
    let term = Termination::of(node, &ns.name, "web-0");
    let drained = drained_line(node, &ns.name, "web-0");
    let out = LocalRun {
        run,
        deleted_at,
        hc_503_at,
        hc_failed_at,
        down_at,
        terminating_at,
        not_serving_at,
        gone_at: gone_at.unwrap_or(f64::NAN),
        term,
        drained,
    };
    report(&out.story(label));
    drop(ns);
    out
}

impl LocalRun {
    fn to(&self, target: usize) -> Vec<Rec> {
        self.run
            .recs
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The failures by what went wrong, verbatim ("connect: Connection refused (os error
    /// 111)", "timeout", a status).
    fn kinds(recs: &[Rec]) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for r in recs.iter().filter(|r| !r.ok()) {
            let k = match &r.outcome {
                Ok(code) => code.to_string(),
                Err(e) => e.clone(),
            };
            *kinds.entry(k).or_default() += 1;
        }
        kinds
    }

    fn rel(&self, t: Option<f64>) -> String {
        t.map(|t| format!("{:+.2}s", t - self.deleted_at))
            .unwrap_or_else(|| "never".into())
    }

    fn story(&self, label: &str) -> String {
        let all: Vec<Rec> = self.run.recs.iter().map(|(_, r)| r.clone()).collect();
        let to_node = self.to(NODE);
        let failed_node: Vec<&Rec> = to_node.iter().filter(|r| !r.ok()).collect();
        let window = |r: &&Rec| r.at >= self.deleted_at && self.down_at.is_none_or(|d| r.at < d);
        format!(
            "NLB → NodePort, externalTrafficPolicy Local, readiness {label}: {}; to the node {} \
             ({} between the DELETE and its removal), failed {:?}; to the other target {}, \
             failed {}; after the DELETE: endpoint terminating {}, health check node port \
             503 {} (the NLB's first failed check {}), endpoint serving=false {}, NLB marked \
             the node down {} ({} failed checks {:?} apart), node failures from {} to {}, \
             lameduck drained {}, app SIGTERM {}, pod gone {}; lameduck: {}",
            summary(&all),
            to_node.len(),
            to_node.iter().filter(window).count(),
            Self::kinds(&to_node),
            self.to(OTHER).len(),
            failed(&self.to(OTHER)),
            self.rel(self.terminating_at),
            self.rel(self.hc_503_at),
            self.rel(self.hc_failed_at),
            self.rel(self.not_serving_at),
            self.rel(self.down_at),
            NLB_CHECK.fall,
            NLB_CHECK.interval,
            self.rel(failed_node.first().map(|r| r.at)),
            self.rel(failed_node.last().map(|r| r.at)),
            self.rel(self.drained.as_ref().map(|l| l.at)),
            self.rel(self.term.at(KILL, "app")),
            self.rel(Some(self.gone_at)),
            self.drained
                .as_ref()
                .map(|l| l.text.as_str())
                .unwrap_or("no drain line"),
        )
    }

    /// What both settings must show: the NLB's other target lost nothing, the health check
    /// node port failed soon after the DELETE (kube-proxy counts only ready endpoints), and
    /// the NLB removed the node only after its checks failed; traffic reached the node in
    /// between.
    fn common(&self, label: &str) -> f64 {
        assert_eq!(
            failed(&self.to(OTHER)),
            0,
            "{label}: the other target failed: {}",
            summary(&self.to(OTHER))
        );
        // kube-proxy counts only ready endpoints for it: 503 as soon as it sees the
        // endpoint terminating, whatever lameduck's readiness says.
        let hc_503 = self
            .hc_503_at
            .unwrap_or_else(|| panic!("{label}: the health check node port never said 503"));
        assert!(
            hc_503 - self.deleted_at < 3.0,
            "{label}: the health check node port said 503 only {:.2}s after the DELETE",
            hc_503 - self.deleted_at
        );
        let hc_failed = self
            .hc_failed_at
            .unwrap_or_else(|| panic!("{label}: no check of the NLB failed"));
        let down = self
            .down_at
            .unwrap_or_else(|| panic!("{label}: the NLB never marked the node down"));
        assert!(
            down > hc_failed,
            "{label}: marked down before a failed check"
        );
        assert!(
            self.terminating_at.is_some(),
            "{label}: web-0's endpoint never turned terminating"
        );
        let window = self
            .to(NODE)
            .iter()
            .filter(|r| r.at >= self.deleted_at && r.at < down)
            .count();
        assert!(
            window > 100,
            "{label}: only {window} connections reached the node between the DELETE and \
             its removal"
        );
        down
    }
}

/// `fail` (the default): lameduck's readiness fails at the drain's start, the kubelet's
/// probe turns the pod unready, the endpoint is no longer `serving`, and kube-proxy has no
/// endpoint left for the node's NodePort: the new connections the NLB still sends during its
/// detection window are refused (the Service has no endpoint at all here: REJECT; with ready
/// endpoints on other nodes it would be DROP, timeouts).
#[test]
fn nodeport_local_readiness_fail_refuses_connections() {
    let Some(node) = node::node("nodeport_local_readiness_fail_refuses_connections") else {
        return;
    };
    if !node::kube_proxy_available("nodeport_local_readiness_fail_refuses_connections") {
        return;
    }
    let _serial = serial();
    let run = nodeport_local(node, "fail", None);
    let down = run.common("fail");
    let to_node = run.to(NODE);
    let failures: Vec<&Rec> = to_node.iter().filter(|r| !r.ok()).collect();
    assert!(
        !failures.is_empty(),
        "fail: no connection to the node failed: the test would not see the problem; {}",
        summary(&to_node)
    );
    let not_serving = run
        .not_serving_at
        .expect("fail: web-0's endpoint turned serving=false");
    for r in &failures {
        // After kube-proxy lost the endpoint (the test's watch may see the change a little
        // after kube-proxy's), before the NLB stopped sending.
        assert!(
            r.at > not_serving - 1.0 && r.at < down,
            "fail: a failure at {} outside [serving=false {}, marked down {}]: {:?}",
            run.rel(Some(r.at)),
            run.rel(Some(not_serving)),
            run.rel(Some(down)),
            r.outcome
        );
    }
}

/// `keep`: lameduck stays ready while it drains, the terminating endpoint stays `serving`,
/// kube-proxy keeps it as the NodePort's fallback (KEP-1669) while its health check node port
/// already says 503: the NLB stops sending after its checks, and every connection it sent
/// meanwhile is served. lameduck's drain ends quiet after that.
#[test]
fn nodeport_local_readiness_keep_loses_nothing() {
    let Some(node) = node::node("nodeport_local_readiness_keep_loses_nothing") else {
        return;
    };
    if !node::kube_proxy_available("nodeport_local_readiness_keep_loses_nothing") {
        return;
    }
    let _serial = serial();
    let run = nodeport_local(node, "keep", Some("--readiness-while-draining=keep"));
    let down = run.common("keep");
    let all: Vec<Rec> = run.run.recs.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(
        failed(&all),
        0,
        "keep: connections failed: {} {:?}",
        summary(&all),
        LocalRun::kinds(&all)
    );
    // The endpoint stayed serving until after the NLB had let go of the node.
    if let Some(ns) = run.not_serving_at {
        assert!(
            ns > down,
            "keep: the endpoint turned serving=false {} before the node was marked down",
            down - ns
        );
    }
    let drained = run
        .drained
        .as_ref()
        .expect("keep: lameduck logged its drain's end");
    assert!(
        drained.text.contains("drained: no request for"),
        "keep: the drain did not end quiet: {}",
        drained.text
    );
    assert!(
        drained.at > down,
        "keep: lameduck drained {:.2}s before the node was marked down",
        down - drained.at
    );
    let kill = run.term.must(KILL, "app");
    assert!(
        kill > down,
        "keep: the app's SIGTERM came before the node was marked down"
    );
}

// === d. nothing left behind ===

/// Run by [`leaves_nothing_behind`] in a child process: brings a node up, runs a pod with
/// lameduck, then fails on purpose.
#[test]
#[ignore = "run by leaves_nothing_behind in a child process"]
fn node_child_then_fail() {
    if std::env::var_os("LAMEDUCK_NODE_CHILD").is_none() {
        return;
    }
    let Some(node) = node::node("node_child_then_fail") else {
        return;
    };
    let ns = node.namespace("child");
    // With kube-proxy (where it is built) and a Service it programs: its rules, in the
    // node's network namespace, must go with it.
    let proxy = node::kube_proxy_built();
    if proxy {
        node.kube_proxy();
    }
    let mut objects = vec![pod("web-0", Variant::Native, &[])];
    if proxy {
        objects.push(local_service());
    }
    node.apply(&ns.name, &manifests(Variant::Native, &objects));
    let running = poll(PATIENCE, || {
        node.pods(&ns.name)
            .iter()
            .any(|p| condition(p, "ContainersReady"))
    });
    assert!(running, "the child's pod did not run");
    let mut proxy_rules = 0;
    if proxy {
        poll(PATIENCE, || {
            proxy_rules = node
                .iptables_rules()
                .lines()
                .filter(|l| l.starts_with("-A KUBE-") && l.contains("/web:http"))
                .count();
            proxy_rules > 0
        });
    }
    let holder = node.holder;
    let netns = std::fs::read_link(format!("/proc/{holder}/ns/net")).expect("the netns");
    let mntns = std::fs::read_link(format!("/proc/{holder}/ns/mnt")).expect("the mount ns");
    let _ = writeln!(
        std::io::stderr(),
        "child-node: dir={} cgroup={} veth={} pods={} netns={} mntns={} containers={} \
         kube_proxy={proxy} proxy_rules={proxy_rules}",
        node.dir.display(),
        node.cgroup,
        node.veth,
        node.pod_cidr,
        netns.display(),
        mntns.display(),
        node::cgroup_pids(&node.cgroup).len(),
    );
    std::mem::forget(ns);
    panic!("failing on purpose with the node up and a pod running");
}

fn iptables_rules() -> String {
    let mut all = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        if let Ok(out) = Command::new(tool).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            for l in text.lines() {
                if !l.starts_with('#') {
                    // Counters change; rules do not.
                    all.push_str(l.split(" [").next().unwrap_or(l));
                    all.push('\n');
                }
            }
        }
    }
    all
}

/// Processes in the child's cgroups, holding its namespaces or naming its directory.
fn leftover_processes(dir: &str, cgroup: &str, netns: &str, mntns: &str) -> Vec<String> {
    let mut holders = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let link = |ns: &str| {
            std::fs::read_link(p.path().join("ns").join(ns))
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cgroups = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
        let in_cgroup = cgroups.lines().any(|l| {
            let path = l.splitn(3, ':').nth(2).unwrap_or_default();
            path == format!("/{cgroup}") || path.starts_with(&format!("/{cgroup}/"))
        });
        if link("net") == netns
            || link("mnt") == mntns
            || String::from_utf8_lossy(&cmdline).contains(&format!("{dir}/"))
            || in_cgroup
        {
            holders.push(format!("{pid} {}", String::from_utf8_lossy(&cmdline)));
        }
    }
    holders
}

#[test]
fn leaves_nothing_behind() {
    if !node::available("leaves_nothing_behind") {
        return;
    }
    let _serial = serial();
    let rules_before = iptables_rules();
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "node_child_then_fail",
            "--ignored",
            "--nocapture",
        ])
        .env("LAMEDUCK_NODE_CHILD", "1")
        .env_remove("LAMEDUCK_NODE_KEEP")
        .stdin(Stdio::null())
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failing on purpose"),
        "the child did not fail as planned:\n{stderr}"
    );
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("child-node: "))
        .unwrap_or_else(|| panic!("the child printed no node line:\n{stderr}"));
    let fields: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect();
    let (dir, cgroup, veth, pods) = (
        fields["dir"],
        fields["cgroup"],
        fields["veth"],
        fields["pods"],
    );
    assert!(
        fields["containers"].parse::<usize>().unwrap_or(0) >= 3,
        "the child ran fewer processes than a node with a pod: {line}"
    );
    let (netns, mntns) = (fields["netns"], fields["mntns"]);
    if fields["kube_proxy"] == "true" {
        assert!(
            fields["proxy_rules"].parse::<usize>().unwrap_or(0) > 0,
            "the child's kube-proxy programmed no rule for its Service: {line}"
        );
    }

    // Processes: none in its cgroups, none holding its namespaces, none naming its directory
    // (a few seconds for the last ones, re-parented, to be reaped).
    let mut holders = Vec::new();
    poll(Duration::from_secs(10), || {
        holders = leftover_processes(dir, cgroup, netns, mntns);
        holders.is_empty()
    });
    assert!(holders.is_empty(), "processes left behind: {holders:?}");
    // Mounts, directories, cgroups.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(dir),
        "mounts left behind: {}",
        mounts
            .lines()
            .filter(|l| l.contains(dir))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroupfs")
        .flatten()
    {
        let d = h.path().join(cgroup);
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    // Links, routes, addresses.
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link")
            .stdout,
    )
    .into_owned();
    assert!(!links.contains(veth), "veth {veth} left behind");
    let routes = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["route"])
            .output()
            .expect("ip route")
            .stdout,
    )
    .into_owned();
    let prefix = pods.trim_end_matches("0/24");
    assert!(
        !routes.contains(prefix),
        "route to {pods} left behind:\n{routes}"
    );
    // iptables: the node adds no rule on the host; none appeared.
    assert_eq!(
        iptables_rules(),
        rules_before,
        "the host's iptables rules changed"
    );
    report(&format!("after a failed run: nothing left of {line}"));
}
