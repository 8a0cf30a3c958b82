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
    node.apply(
        &ns.name,
        &manifests(Variant::Native, &[pod("web-0", Variant::Native, &[])]),
    );
    let running = poll(PATIENCE, || {
        node.pods(&ns.name)
            .iter()
            .any(|p| condition(p, "ContainersReady"))
    });
    assert!(running, "the child's pod did not run");
    let holder = node.holder;
    let netns = std::fs::read_link(format!("/proc/{holder}/ns/net")).expect("the netns");
    let mntns = std::fs::read_link(format!("/proc/{holder}/ns/mnt")).expect("the mount ns");
    let _ = writeln!(
        std::io::stderr(),
        "child-node: dir={} cgroup={} veth={} pods={} netns={} mntns={} containers={}",
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
