//! End to end against a real control plane (tests/support/cluster.rs): the webhook as
//! `k8s/webhook` installs it, the real pod validation, controllers that create pods from
//! Deployments, StatefulSets and Jobs, failurePolicy, denials, certificate rotation, the
//! `inject` goldens, Argo Rollouts with the real CRD, and the drain Event (`events`).
//!
//! Needs the binaries from `tests/cluster/build.sh` and kubectl; without them every test
//! prints its own `SKIPPED` line and passes, unless `LAMEDUCK_REQUIRE_TOOLS=1`.
//!
//! The tests share one apiserver and the webhook configuration is cluster-scoped (one name,
//! as kustomize renders it), so they run one at a time ([`serial`]); each installs the
//! configuration for its own webhook process and removes it when done.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/tools.rs"]
mod tools;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use cluster::{cluster, poll, Cluster, API_PATIENCE};
use lameduck::kube::inject::{CONTAINER_NAME, INJECT_LABEL, STATUS_ANNOTATION, STATUS_INJECTED};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use serde_json::{json, Value as Json};

const BIN: &str = env!("CARGO_BIN_EXE_lameduck");
/// The webhook's name in k8s/webhook/mutatingwebhookconfiguration.yaml.
const WEBHOOK_NAME: &str = "inject.lameduck.io";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn documents(yaml: &str) -> Vec<Json> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Json::deserialize(d).expect("YAML document"))
        .filter(|d| !d.is_null())
        .collect()
}

fn list(items: Vec<Json>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

// === the webhook process ===

/// `lameduck webhook` (the real binary) on 127.0.0.1:0 with a certificate from the test CA.
struct Webhook {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    logs: Arc<Mutex<Vec<Json>>>,
}

impl Webhook {
    fn start(cluster: &Cluster) -> Webhook {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = cluster
            .dir
            .join(format!("webhook-{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = cluster.ca.leaf(&["127.0.0.1", "localhost"]);
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        Webhook::spawn("127.0.0.1:0", dir)
    }

    /// Stops this process and starts another on the same address with the same files, as
    /// a replica restarted after a renewal: the apiserver's kept-alive connections die
    /// with the old process, so its next review handshakes anew.
    fn restart(mut self) -> Webhook {
        self.stop();
        Webhook::spawn(&self.addr.to_string(), self.dir.clone())
    }

    fn spawn(listen: &str, dir: PathBuf) -> Webhook {
        let mut cmd = Command::new(BIN);
        cmd.args(["webhook", "--listen", listen, "--tls-cert"])
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .args([
                "--tls-reload-interval",
                "100ms",
                "--log-format",
                "json",
                // Every review is logged (unchanged pods at debug): the request counter.
                "--log-level",
                "debug",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cluster::die_with_parent(&mut cmd)
            .spawn()
            .expect("spawn lameduck webhook");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: Json = serde_json::from_str(&line).unwrap_or(json!({ "raw": line }));
                if let Some(addr) = v["addr"].as_str() {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_owned());
                    }
                }
                sink.lock().unwrap().push(v);
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            panic!("the webhook did not start: {:?}", logs.lock().unwrap());
        };
        Webhook {
            child,
            addr: addr.parse().expect("the webhook logs its address"),
            dir,
            logs,
        }
    }

    fn url(&self) -> String {
        format!("https://{}/mutate", self.addr)
    }

    /// AdmissionReviews answered so far: the webhook logs one line with the review's uid
    /// for each (injected, denied, or allowed unchanged at debug level).
    fn reviews(&self) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.get("uid").is_some())
            .count()
    }

    /// Writes a new pair from `ca` the way the kubelet updates a mounted Secret (write
    /// aside, rename over); returns the new certificate.
    fn rotate(&self, ca: &cluster::Ca) -> Vec<u8> {
        let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
        // Key first: the webhook refuses a pair that does not match and keeps the old one.
        for (name, contents) in [("tls.key", &key), ("tls.crt", &cert)] {
            let tmp = self.dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, contents).unwrap();
            std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        }
        CertificateDer::from_pem_slice(cert.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// The certificate a fresh TLS handshake gets, verified against `ca_pem` (None if it
    /// does not verify).
    fn served_cert(&self, ca_pem: &str) -> Option<Vec<u8>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            let name = rustls_pki_types::ServerName::IpAddress(self.addr.ip().into());
            let tls = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
            )
            .await
            .expect("TLS handshake in time")
            .ok()?;
            Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
        })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop();
    }
}

// === the webhook configuration ===

/// `kubectl kustomize k8s/webhook` as rendered, applied with one change: each webhook's
/// clientConfig is a `url` to the test's webhook on 127.0.0.1 with the test CA as its
/// caBundle (no cluster networking here, and no cert-manager controller: its Issuers and
/// Certificates are stored, checked against cert-manager's own CRDs, and do nothing).
/// Removes the configuration on drop.
struct Installed {
    cluster: &'static Cluster,
}

fn install(cluster: &'static Cluster, webhook: &Webhook) -> Installed {
    let rendered = cluster.kubectl(
        &["kustomize", root().join("k8s/webhook").to_str().unwrap()],
        None,
    );
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&cluster.ca.pem);
    let mut items = Vec::new();
    let mut configurations = 0;
    for mut doc in documents(&rendered) {
        if doc["kind"] == "MutatingWebhookConfiguration" {
            configurations += 1;
            for hook in doc["webhooks"].as_array_mut().unwrap() {
                hook["clientConfig"] = json!({ "url": webhook.url(), "caBundle": ca_bundle });
            }
        }
        items.push(doc);
    }
    assert_eq!(configurations, 1, "k8s/webhook renders one configuration");
    cluster.apply(None, &list(items));
    let installed = Installed { cluster };
    // The apiserver picks the configuration up from a watch: wait until a probe pod is
    // injected through it (the previous test's configuration pointed at another port).
    let took_effect = poll(API_PATIENCE, || {
        probe(cluster).is_some_and(|p| injected(&p))
    });
    assert!(
        took_effect,
        "the webhook configuration did not take effect in {API_PATIENCE:?}"
    );
    installed
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_raw(
            &[
                "delete",
                "mutatingwebhookconfiguration",
                "lameduck",
                "--ignore-not-found",
            ],
            None,
        );
        // Until the apiserver has seen the deletion, an opted-in pod still goes to the
        // webhook; the next test must not meet it.
        let gone = poll(API_PATIENCE, || {
            probe(self.cluster).is_some_and(|p| !injected(&p))
        });
        if !gone && !std::thread::panicking() {
            panic!("the webhook configuration was still in effect after {API_PATIENCE:?}");
        }
    }
}

/// A pod template, opted in or not: a single app container with a named port and no
/// preStop, so nothing is ambiguous for injection.
fn app_pod_template(app: &str, opted_in: bool) -> Json {
    let mut labels = json!({ "app": app });
    if opted_in {
        labels[INJECT_LABEL] = json!("true");
    }
    json!({
        "metadata": { "labels": labels },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "example.com/app:1.0",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http" } },
            }],
        },
    })
}

fn pod(name: &str, app: &str, opted_in: bool) -> Json {
    let mut pod = app_pod_template(app, opted_in);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!(name);
    pod
}

/// Creates an opted-in pod in `default` with `--dry-run=server` and returns what the API
/// would store, or None if it was refused.
fn probe(cluster: &Cluster) -> Option<Json> {
    let mut p = pod("unused", "probe", true);
    p["metadata"] = json!({ "generateName": "probe-", "labels": p["metadata"]["labels"] });
    let out = cluster.kubectl_raw(
        &[
            "create",
            "--dry-run=server",
            "-n",
            "default",
            "-o",
            "json",
            "-f",
            "-",
        ],
        Some(p.to_string().as_bytes()),
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"))
}

/// The sidecar, as a native sidecar (init container) or a plain container.
fn sidecar(pod: &Json) -> Option<&Json> {
    ["initContainers", "containers"].iter().find_map(|list| {
        pod["spec"][list]
            .as_array()?
            .iter()
            .find(|c| c["name"] == CONTAINER_NAME)
    })
}

fn injected(pod: &Json) -> bool {
    sidecar(pod).is_some() && pod["metadata"]["annotations"][STATUS_ANNOTATION] == STATUS_INJECTED
}

/// What injection must leave in an admitted pod: the sidecar, the status annotation and the
/// app container's preStop wired to the sidecar's `/drain`.
fn assert_injected(pod: &Json) {
    let name = pod["metadata"]["name"].as_str().unwrap_or("?");
    assert!(injected(pod), "pod {name} not injected: {pod:#}");
    let app = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .expect("the app container");
    assert_eq!(
        app["lifecycle"]["preStop"]["httpGet"]["path"], "/drain",
        "pod {name}: the app's preStop goes to the sidecar's /drain"
    );
}

/// Pods with `app=<app>` in the namespace once there are `n` (bounded wait).
fn wait_pods(cluster: &Cluster, ns: &str, app: &str, n: usize) -> Vec<Json> {
    wait_selected(cluster, ns, &format!("app={app}"), n)
}

fn wait_selected(cluster: &Cluster, ns: &str, selector: &str, n: usize) -> Vec<Json> {
    let mut pods = Vec::new();
    let found = poll(API_PATIENCE, || {
        pods = cluster.get_json(&["pods", "-n", ns, "-l", selector])["items"]
            .as_array()
            .unwrap()
            .clone();
        pods.len() >= n
    });
    if !found {
        // Why a controller could not create them, as `kubectl get events` would say.
        let events = cluster.get_json(&["events", "-n", ns, "--field-selector", "type=Warning"]);
        let why: Vec<&str> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["message"].as_str())
            .collect();
        panic!(
            "{n} pods {selector} in {ns} expected within {API_PATIENCE:?}, found {}; \
             warnings: {why:#?}",
            pods.len()
        );
    }
    pods
}

// === the tests ===

#[test]
fn workload_pods_come_back_injected_and_unlabelled_pods_skip_the_webhook() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("workloads");
    let webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);

    // Not opted in: the objectSelector keeps these pods away from the webhook.
    let before = webhook.reviews();
    let plain = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "plain"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "plain"}},
                 "template": app_pod_template("plain", false)},
    });
    cluster.apply(Some(&ns.name), &plain.to_string());
    for pod in wait_pods(cluster, &ns.name, "plain", 2) {
        assert!(sidecar(&pod).is_none(), "an unlabelled pod got the sidecar");
    }

    // Opted in: created by the ReplicaSet (generateName only), StatefulSet and Job
    // controllers, mutated by the webhook, accepted by the real validation.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": app_pod_template("web", true)},
    });
    let statefulset = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        // Parallel: OrderedReady would wait for db-0 to be Ready, and nothing runs here.
        "spec": {"replicas": 2, "serviceName": "db", "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": "db"}},
                 "template": app_pod_template("db", true)},
    });
    let mut job_template = app_pod_template("batch", true);
    job_template["spec"]["restartPolicy"] = json!("Never");
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "batch"},
        "spec": {"backoffLimit": 0, "template": job_template},
    });
    cluster.apply(Some(&ns.name), &list(vec![deployment, statefulset, job]));
    let web = wait_pods(cluster, &ns.name, "web", 2);
    let db = wait_pods(cluster, &ns.name, "db", 2);
    let batch = wait_pods(cluster, &ns.name, "batch", 1);
    for pod in web.iter().chain(&db).chain(&batch) {
        assert_injected(pod);
    }
    for pod in &web {
        assert!(
            pod["metadata"]["generateName"].is_string(),
            "ReplicaSet pods are created with generateName: {pod:#}"
        );
    }
    let mut db_names: Vec<&str> = db
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    db_names.sort();
    assert_eq!(db_names, ["db-0", "db-1"]);

    // Exactly one review per opted-in pod: none for the two plain ones. (The count is
    // read from the webhook's log, which may trail the API by a moment: wait for the five.)
    let opted_in = web.len() + db.len() + batch.len();
    poll(API_PATIENCE, || webhook.reviews() >= before + opted_in);
    assert_eq!(
        webhook.reviews() - before,
        opted_in,
        "reviews seen by the webhook: one per opted-in pod, none for unlabelled pods"
    );
}

#[test]
fn the_webhooks_own_deployment_meets_the_restricted_pod_security_level() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);
    // k8s/webhook's namespace enforces `restricted`: the ReplicaSet controller's pods for
    // the webhook Deployment are admitted (their Secret volume need not exist: nothing runs).
    let pods = wait_selected(
        cluster,
        "lameduck-system",
        "app.kubernetes.io/name=lameduck-webhook",
        2,
    );
    assert_eq!(pods.len(), 2, "two replicas");
    // And the level is enforced there: a pod that is not restricted is refused.
    let loose = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose"},
        "spec": {"containers": [{"name": "c", "image": "example.com/c:1"}]},
    });
    let out = cluster.kubectl_raw(
        &[
            "create",
            "--dry-run=server",
            "-n",
            "lameduck-system",
            "-f",
            "-",
        ],
        Some(loose.to_string().as_bytes()),
    );
    assert!(
        !out.status.success(),
        "lameduck-system admits unrestricted pods"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PodSecurity \"restricted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn injected_pods_meet_the_restricted_pod_security_level() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("restricted");
    cluster.kubectl(
        &[
            "label",
            "namespace",
            &ns.name,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    );
    let webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);
    // An app that meets `restricted` itself; what the webhook adds must too (PodSecurity
    // validates after the mutating webhooks).
    let mut p = pod("hardened", "hardened", true);
    p["spec"]["securityContext"] = json!({
        "runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"},
    });
    p["spec"]["containers"][0]["securityContext"] = json!({
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
    });
    let out = cluster.kubectl_raw(
        &["create", "-n", &ns.name, "-f", "-"],
        Some(p.to_string().as_bytes()),
    );
    assert!(
        out.status.success(),
        "the injected pod is refused under restricted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_injected(&cluster.get_json(&["pod", "hardened", "-n", &ns.name]));
}

#[test]
fn webhook_down_refuses_opted_in_pods_and_only_those() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("failure-policy");
    let mut webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);
    webhook.stop();

    let out = cluster.kubectl_raw(
        &["create", "-n", &ns.name, "-f", "-"],
        Some(pod("opted-in", "opted-in", true).to_string().as_bytes()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an opted-in pod was created with the webhook down"
    );
    assert!(
        stderr.contains(&format!("failed calling webhook \"{WEBHOOK_NAME}\"")),
        "the refusal names the webhook: {stderr}"
    );

    // Pods that did not opt in never wait on the webhook.
    cluster.kubectl(
        &["create", "-n", &ns.name, "-f", "-"],
        Some(pod("plain", "plain", false).to_string().as_bytes()),
    );
    let stored = cluster.get_json(&["pod", "plain", "-n", &ns.name]);
    assert!(sidecar(&stored).is_none());

    // A controller's pods are refused the same way, and it says so on its object.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": app_pod_template("web", true)},
    });
    cluster.apply(Some(&ns.name), &deployment.to_string());
    let mut message = String::new();
    let reported = poll(API_PATIENCE, || {
        let sets = cluster.get_json(&["replicasets", "-n", &ns.name, "-l", "app=web"]);
        message = sets["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rs| {
                rs["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|c| c["type"] == "ReplicaFailure")
            .filter_map(|c| c["message"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
            .join("; ");
        !message.is_empty()
    });
    assert!(reported, "the ReplicaSet reports no ReplicaFailure");
    assert!(
        message.contains(WEBHOOK_NAME),
        "the ReplicaSet's condition names the webhook: {message}"
    );
    let pods = cluster.get_json(&["pods", "-n", &ns.name, "-l", "app=web"]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 0);
}

#[test]
fn certificate_rotation_keeps_admitting() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("rotation");
    let webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);
    let create = |name: &str| {
        cluster.kubectl(
            &["create", "-n", &ns.name, "-f", "-"],
            Some(pod(name, "rotated", true).to_string().as_bytes()),
        );
        assert_injected(&cluster.get_json(&["pod", name, "-n", &ns.name]));
    };
    create("before");
    let old = webhook
        .served_cert(&cluster.ca.pem)
        .expect("the webhook's certificate verifies against the test CA");

    // A renewal from the same CA (k8s/webhook/certificate.yaml: a CA Issuer and a leaf):
    // the caBundle does not change, the webhook swaps the pair in.
    let new = webhook.rotate(&cluster.ca);
    assert_ne!(old, new);
    let swapped = poll(Duration::from_secs(20), || {
        webhook.served_cert(&cluster.ca.pem) == Some(new.clone())
    });
    assert!(swapped, "the webhook still serves the old certificate");
    create("after-reload");

    // The apiserver may well have reused a connection it opened before the swap: make it
    // handshake with the new pair, under the unchanged caBundle.
    let webhook = webhook.restart();
    create("after-new-connection");
    assert!(
        webhook.reviews() >= 1,
        "the review reached the restarted webhook"
    );
}

#[test]
fn invalid_annotations_are_refused_with_the_webhooks_reason() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("denied");
    let webhook = Webhook::start(cluster);
    let _installed = install(cluster, &webhook);
    let mut bad = pod("bad", "bad", true);
    bad["metadata"]["annotations"] = json!({ "lameduck.io/drain-max": "soon" });
    let out = cluster.kubectl_raw(
        &["create", "-n", &ns.name, "-f", "-"],
        Some(bad.to_string().as_bytes()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a pod with an invalid annotation was created"
    );
    assert!(
        stderr.contains(&format!(
            "admission webhook \"{WEBHOOK_NAME}\" denied the request"
        )) && stderr.contains("lameduck.io/drain-max")
            && stderr.contains("soon"),
        "the user sees the webhook's reason: {stderr}"
    );
}

#[test]
fn inject_goldens_pass_server_side_dry_run() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let dir = root().join("tests/golden/inject");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".out.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());

    // What the goldens refer to: their namespaces and the passthrough test's custom kind.
    for file in &files {
        for doc in documents(&std::fs::read_to_string(file).unwrap()) {
            if let Some(namespace) = doc["metadata"]["namespace"].as_str() {
                cluster.ensure_namespace(namespace);
            }
        }
    }
    let widget_crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                   "x-kubernetes-preserve-unknown-fields": true}}}]},
    });
    cluster.apply(None, &widget_crd.to_string());
    cluster.wait_established("widgets.example.com");

    // Documents without a namespace go to `default`: a dry run stores nothing there.
    let mut failures = Vec::new();
    for file in &files {
        // future-fields carries an unknown `fooBar` at every level on purpose (injection
        // keeps it); a strict apiserver refuses those. Everything else in it, the fields
        // newer than the code's types (stopSignal, restartPolicyRules), goes through.
        let text = std::fs::read_to_string(file).unwrap();
        let known: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("fooBar:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let out = cluster.kubectl_raw(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(known.as_bytes()),
        );
        if !out.status.success() {
            failures.push(format!(
                "{}: {}",
                file.file_name().unwrap().to_string_lossy(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "goldens refused by the apiserver:\n{}",
        failures.join("\n")
    );
}

/// `want` is contained in `got`: every field of `want` is in `got` with the same value
/// (the server may add defaults, it must not drop anything).
fn contained(want: &Json, got: &Json, path: &str) -> Result<(), String> {
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => w.iter().try_for_each(|(k, v)| {
            let at = format!("{path}.{k}");
            contained(v, g.get(k).ok_or(format!("{at} dropped"))?, &at)
        }),
        (Json::Array(w), Json::Array(g)) if w.len() == g.len() => w
            .iter()
            .zip(g)
            .enumerate()
            .try_for_each(|(i, (w, g))| contained(w, g, &format!("{path}[{i}]"))),
        _ if want == got => Ok(()),
        _ => Err(format!("{path}: {want} became {got}")),
    }
}

#[test]
fn injected_rollouts_are_stored_whole_and_their_template_validates() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("rollouts");
    let out = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(root().join("k8s/examples/checkout-rollout.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lameduck inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected_yaml = String::from_utf8(out.stdout).unwrap();
    let docs = documents(&injected_yaml);
    let rollout = docs
        .iter()
        .find(|d| d["kind"] == "Rollout")
        .expect("the example has a Rollout");
    let template = &rollout["spec"]["template"];
    assert!(
        injected(&json!({"metadata": template["metadata"], "spec": template["spec"]})),
        "inject injected the Rollout's template"
    );

    // Created for real. A Rollout CRD without `restartPolicy` on init containers (v1.6.x)
    // makes kubectl's strict field validation refuse it, and with validation off its
    // pruning would quietly turn the native sidecar into an init container that never ends.
    cluster.apply(Some(&ns.name), &injected_yaml);
    let stored = cluster.get_json(&["rollout", "checkout", "-n", &ns.name]);
    let stored_template = &stored["spec"]["template"];
    if let Err(e) = contained(template, stored_template, "spec.template") {
        panic!("the Rollout CRD changed the injected template: {e}");
    }

    // Argo Rollouts makes ReplicaSets from this template: the real pod validation must
    // accept it as one.
    let replicaset = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "checkout-check"},
        "spec": {"replicas": 1, "selector": stored["spec"]["selector"],
                 "template": stored_template},
    });
    cluster.kubectl(
        &["create", "--dry-run=server", "-n", &ns.name, "-f", "-"],
        Some(replicaset.to_string().as_bytes()),
    );
}

// === --events ===

fn drained_state(requests: u64) -> lameduck::lifecycle::drain::State {
    lameduck::lifecycle::drain::State::Drained {
        since: tokio::time::Instant::now(),
        started_at: std::time::SystemTime::now() - Duration::from_secs(12),
        trigger: lameduck::lifecycle::drain::Trigger::Admin,
        window: lameduck::lifecycle::cadence::QuietWindow::fixed(Duration::from_secs(10)),
        reason: lameduck::lifecycle::drain::DrainReason::Quiet,
        took: Duration::from_millis(12_300),
        requests_during_drain: requests,
        health_checks_during_drain: 4,
    }
}

#[test]
fn drain_event_is_posted_on_the_pod_with_the_documented_role_only() {
    use lameduck::kube::events::{ApiClient, Events, EventsError, PodRef};
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("events");
    // The Role the events module documents, bound to one ServiceAccount of two.
    events_role_and_pod(cluster, &ns.name, &["app", "other"]);
    let stored = cluster.get_json(&["pod", "web", "-n", &ns.name]);
    let pod_ref = PodRef {
        namespace: ns.name.clone(),
        name: "web".into(),
        uid: stored["metadata"]["uid"].as_str().map(str::to_owned),
    };
    let client = |sa: &str| {
        let token = cluster.kubectl(
            &["create", "token", sa, "-n", &ns.name, "--duration=10m"],
            None,
        );
        let addr = cluster.addr();
        ApiClient::new(
            &addr.ip().to_string(),
            addr.port(),
            &token,
            cluster.ca.pem.as_bytes(),
        )
        .unwrap()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        // Without the Role: the check says no, start turns events off, a post is refused.
        let other = client("other");
        assert!(!other.can_create_events(&ns.name).await.unwrap());
        assert!(!Events::start(Ok(other.clone()), pod_ref.clone())
            .await
            .enabled());
        let event = lameduck::kube::events::drain_event(
            &drained_state(1),
            &pod_ref,
            std::time::SystemTime::now(),
        )
        .unwrap();
        match other.create_event(&event).await {
            Err(EventsError::Status { status, .. }) => assert_eq!(status.as_u16(), 403),
            other => panic!("expected 403 without the Role, got {other:?}"),
        }
        // No API at all (not in a pod): off, no error.
        let nowhere = ApiClient::in_cluster(&cluster.dir.join("no-such-dir"));
        assert!(!Events::start(nowhere, pod_ref.clone()).await.enabled());

        // With the Role: one Event on the pod.
        let events = Events::start(Ok(client("app")), pod_ref.clone()).await;
        assert!(events.enabled());
        events.drained(&drained_state(42)).await;
    });

    let found = cluster.get_json(&[
        "events",
        "-n",
        &ns.name,
        "--field-selector",
        "involvedObject.kind=Pod,involvedObject.name=web,reason=Drained",
    ]);
    let items = found["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "one Drained event on the pod: {found:#}");
    let event = &items[0];
    assert_eq!(event["involvedObject"]["uid"], stored["metadata"]["uid"]);
    assert_eq!(event["type"], "Normal");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("12.3s") && message.contains("42 requests served while draining"),
        "{message}"
    );
    assert!(message.contains("quiet window"), "{message}");
}

/// In `ns`: ServiceAccounts `accounts`, the Role the events module documents bound to the
/// first of them only, and a pod `web`.
fn events_role_and_pod(cluster: &Cluster, ns: &str, accounts: &[&str]) {
    let mut objects: Vec<Json> = accounts
        .iter()
        .map(|a| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": a}}))
        .collect();
    objects.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "lameduck-events"},
        "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]}),
    );
    objects.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "lameduck-events"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "lameduck-events"},
        "subjects": [{"kind": "ServiceAccount", "name": accounts[0], "namespace": ns}]}),
    );
    cluster.apply(Some(ns), &list(objects));
    cluster.kubectl(
        &["create", "-n", ns, "-f", "-"],
        Some(pod("web", "web", false).to_string().as_bytes()),
    );
}

/// The real binary with `--events`, the pod's credentials as the kubelet mounts them
/// (a token and the CA in a directory, the API server in `KUBERNETES_SERVICE_*`): a drain
/// requested on the admin port puts one `Drained` Event on its pod.
#[test]
fn proxy_with_events_posts_the_drain_on_its_pod() {
    let Some(cluster) = cluster() else { return };
    let _serial = serial();
    let ns = cluster.namespace("proxy-events");
    events_role_and_pod(cluster, &ns.name, &["app"]);
    let token = cluster.kubectl(
        &["create", "token", "app", "-n", &ns.name, "--duration=10m"],
        None,
    );
    let sa = cluster.dir.join(format!("sa-{}", ns.name));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), token.trim()).unwrap();
    std::fs::write(sa.join("ca.crt"), cluster.ca.pem.as_bytes()).unwrap();
    let api = cluster.addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lameduck"))
        .args([
            "proxy",
            "--listen=127.0.0.1:0",
            "--admin=127.0.0.1:0",
            "--upstream=127.0.0.1:1",
            "--drain-min=0s",
            "--quiet=1s",
            "--drain-max=30s",
            "--log-format=json",
            "--events",
            "--pod-name=web",
        ])
        .arg(format!("--pod-namespace={}", ns.name))
        .arg(format!("--service-account-dir={}", sa.display()))
        .env("KUBERNETES_SERVICE_HOST", api.ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", api.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .take(50)
        .find(|l| l.contains("lameduck proxy serving"))
        .expect("the proxy starts");
    let v: Json = serde_json::from_str(&serving).unwrap();
    let admin: SocketAddr = v["admin"].as_str().unwrap().parse().unwrap();
    // A raw POST /drain; it answers once the drain is released.
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(API_PATIENCE)).unwrap();
    s.write_all(b"POST /drain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut found = Json::Null;
    let posted = poll(API_PATIENCE, || {
        found = cluster.get_json(&[
            "events",
            "-n",
            &ns.name,
            "--field-selector",
            "involvedObject.kind=Pod,involvedObject.name=web,reason=Drained",
        ]);
        found["items"].as_array().map_or(0, Vec::len) == 1
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(posted, "one Drained Event on the pod: {found:#}");
    let message = found["items"][0]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("0 requests served while draining"),
        "{message}"
    );
}
