//! The Helm chart (charts/lameduck) and what it shares with k8s/.
//!
//! Always: the chart's copies of k8s/observability's files are the same bytes.
//!
//! With helm (built by `.ci/install-helm.sh`) and kubectl, kubernetes-validate (installed by
//! `.ci/install-k8s-tools.sh`):
//! - `helm lint --strict` passes with the default values and with each values set below;
//! - one source of truth: `helm template` with the default values gives the objects
//!   `kubectl kustomize k8s/webhook` gives, compared parsed, after removing Helm's own labels
//!   (`helm.sh/chart`, `app.kubernetes.io/{managed-by,instance,version}`); the only object
//!   the chart does not render is the Namespace, which `helm install --create-namespace`
//!   makes. The same for `metrics.*.enabled` against `kubectl kustomize k8s/observability`;
//! - every values set renders objects that refer to each other correctly (the Service the
//!   webhook configuration calls, the Secret the certificate fills and the Deployment
//!   mounts, the release namespace excluded from injection), arguments `lameduck webhook`
//!   accepts, one image for the webhook and the sidecar, and validates against the
//!   Kubernetes schemas (`kubernetes-validate --strict`; CRD kinds excepted);
//! - invalid values (values.schema.json: a typo, a value out of its set; and a Secret without
//!   its CA) are refused by `helm template` with a message that says why.
//!
//! A missing tool skips its test with a plain message, unless `LAMEDUCK_REQUIRE_TOOLS=1`,
//! where it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/tools.rs"]
mod tools;

use clap::Parser as _;
use lameduck::cli::{Cli, Command as Sub};
use serde::Deserialize;
use serde_json::Value as Json;

const KUBERNETES_VERSION: &str = "1.33.0";
const CHART: &str = "charts/lameduck";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn documents(yaml: &str) -> Vec<Json> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Json::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// helm as `.ci/install-helm.sh` built it (never the first `helm` on `PATH`), or None after
/// a `SKIPPED` line naming the test (a failure instead with LAMEDUCK_REQUIRE_TOOLS=1).
fn helm() -> Option<PathBuf> {
    tools::helm()
}

fn output(program: &Path, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn run(program: &Path, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{}{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The chart refuses its placeholder image (no image is published); these tests render it
/// anyway, to compare the defaults with k8s/webhook, which names the same placeholder.
const ALLOW_PLACEHOLDER: [&str; 2] = ["--set", "image.allowPlaceholder=true"];

/// `helm template <release> charts/lameduck --namespace <ns> <args>`, parsed.
fn template(helm: &Path, release: &str, namespace: &str, args: &[&str]) -> Vec<Json> {
    let mut all = vec!["template", release, CHART, "--namespace", namespace];
    all.extend_from_slice(&ALLOW_PLACEHOLDER);
    all.extend_from_slice(args);
    documents(&run(helm, &all))
}

/// Helm's own labels, which k8s/ does not set.
const HELM_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

fn by_kind_and_name(docs: Vec<Json>, strip_helm_labels: bool) -> BTreeMap<(String, String), Json> {
    docs.into_iter()
        .map(|mut d| {
            if strip_helm_labels {
                if let Some(labels) = d["metadata"]["labels"].as_object_mut() {
                    for l in HELM_LABELS {
                        labels.remove(*l);
                    }
                }
            }
            let key = (
                d["kind"].as_str().unwrap().to_owned(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            );
            (key, d)
        })
        .collect()
}

fn find<'a>(docs: &'a [Json], kind: &str) -> &'a Json {
    let mut it = docs.iter().filter(|d| d["kind"] == kind);
    let found = it.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(it.next().is_none(), "more than one {kind}");
    found
}

fn find_named<'a>(docs: &'a [Json], kind: &str, name: &str) -> &'a Json {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Compares two renderings object by object, naming the first difference.
fn assert_same_objects(
    label: &str,
    kustomized: &BTreeMap<(String, String), Json>,
    helm: &BTreeMap<(String, String), Json>,
) {
    let only_k: Vec<_> = kustomized
        .keys()
        .filter(|k| !helm.contains_key(*k))
        .collect();
    let only_h: Vec<_> = helm
        .keys()
        .filter(|k| !kustomized.contains_key(*k))
        .collect();
    assert!(
        only_k.is_empty() && only_h.is_empty(),
        "{label}: only in kustomize: {only_k:?}; only in helm: {only_h:?}"
    );
    for (key, k) in kustomized {
        let h = &helm[key];
        assert!(
            k == h,
            "{label}: {key:?} differs.\nkustomize:\n{}\nhelm:\n{}",
            serde_json::to_string_pretty(k).unwrap(),
            serde_json::to_string_pretty(h).unwrap()
        );
    }
}

// === always ===

#[test]
fn chart_files_are_k8s_observability_copies() {
    for f in ["dashboard.json", "podmonitor.yaml", "prometheusrule.yaml"] {
        let original = std::fs::read(root().join("k8s/observability").join(f)).unwrap();
        let copy = std::fs::read(root().join(CHART).join("files").join(f)).unwrap();
        assert!(
            original == copy,
            "charts/lameduck/files/{f} differs from k8s/observability/{f}: \
             cp k8s/observability/{f} charts/lameduck/files/{f}"
        );
    }
}

// === with helm ===

#[test]
fn default_values_render_k8s_webhook() {
    let (Some(helm), Some(kubectl)) = (helm(), tools::kubectl()) else {
        return;
    };
    let mut kustomized = by_kind_and_name(
        documents(&run(&kubectl, &["kustomize", "k8s/webhook"])),
        false,
    );
    let namespace = kustomized
        .remove(&("Namespace".into(), "lameduck-system".into()))
        .expect("k8s/webhook has its Namespace");
    assert_eq!(namespace["metadata"]["name"], "lameduck-system");
    let rendered = by_kind_and_name(template(&helm, "lameduck", "lameduck-system", &[]), true);
    assert!(kustomized.len() >= 9, "{:?}", kustomized.keys());
    assert_same_objects("k8s/webhook", &kustomized, &rendered);
}

#[test]
fn metrics_values_render_k8s_observability() {
    let (Some(helm), Some(kubectl)) = (helm(), tools::kubectl()) else {
        return;
    };
    let kustomized = by_kind_and_name(
        documents(&run(&kubectl, &["kustomize", "k8s/observability"])),
        false,
    );
    let mut rendered = by_kind_and_name(
        template(
            &helm,
            "lameduck",
            "lameduck-system",
            &[
                "--set",
                "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,\
                 metrics.dashboard.enabled=true",
            ],
        ),
        true,
    );
    rendered.retain(|k, _| kustomized.contains_key(k));
    assert_eq!(kustomized.len(), 3, "{:?}", kustomized.keys());
    assert_same_objects("k8s/observability", &kustomized, &rendered);
    // The dashboard is the JSON file, byte for byte.
    let cm = &rendered[&("ConfigMap".into(), "lameduck-dashboard".into())];
    assert_eq!(
        cm["data"]["lameduck.json"].as_str().unwrap(),
        std::fs::read_to_string(root().join("k8s/observability/dashboard.json")).unwrap()
    );
}

/// Values sets beyond the defaults, each with what it must change.
fn values_sets() -> Vec<(&'static str, &'static str, &'static str, Vec<&'static str>)> {
    vec![
        ("defaults", "lameduck", "lameduck-system", vec![]),
        (
            "own-release-secret-tls",
            "edge",
            "platform",
            vec![
                "--set",
                "tls.source=secret,tls.secret.name=my-webhook-tls,tls.secret.caBundle=LS0tLS1CRUdJTg==",
                "--set",
                "image.repository=123456789012.dkr.ecr.eu-west-1.amazonaws.com/lameduck,image.tag=v0.1.0-rc1",
                "--set",
                "webhook.failurePolicy=Ignore,replicas=3,priorityClassName=system-cluster-critical",
                "--set",
                "sidecar.native=false,webhook.drainTime=20s,webhook.terminationGracePeriodSeconds=40",
                "--set-json",
                r#"webhook.namespaceSelector={"matchLabels":{"lameduck.io/enabled":"true"}}"#,
                "--set-json",
                r#"webhook.objectSelector={"matchExpressions":[{"key":"lameduck.io/inject","operator":"In","values":["true"]}]}"#,
                "--set",
                "podDisruptionBudget.enabled=false",
            ],
        ),
        (
            "digest-sidecar-image-metrics",
            "lameduck",
            "lameduck",
            vec![
                "--set",
                "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "--set",
                "sidecar.image=registry.example.com/lameduck:pinned",
                "--set",
                "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,\
                 metrics.dashboard.enabled=true,metrics.dashboard.namespace=monitoring",
                "--set",
                "podDisruptionBudget.maxUnavailable=1",
                "--set-json",
                r#"sidecar.defaults={"lameduck.io/cpu-request":"50m","lameduck.io/memory-limit":"64Mi"}"#,
            ],
        ),
    ]
}

#[test]
fn helm_lint_passes_for_every_values_set() {
    let Some(helm) = helm() else {
        return;
    };
    for (label, _, namespace, args) in values_sets() {
        let mut all = vec!["lint", "--strict", CHART, "--namespace", namespace];
        all.extend_from_slice(&ALLOW_PLACEHOLDER);
        all.extend_from_slice(&args);
        let out = run(&helm, &all);
        assert!(out.contains("0 chart(s) failed"), "{label}: {out}");
    }
}

#[test]
fn every_values_set_renders_a_wired_webhook_that_validates() {
    let Some(helm) = helm() else {
        return;
    };
    let validator = tools::kubernetes_validate();
    for (label, release, namespace, args) in values_sets() {
        let docs = template(&helm, release, namespace, &args);
        check_wiring(label, release, namespace, &docs);
        if let Some(v) = &validator {
            validate(v, label, &docs);
        }
    }
}

fn string_list(v: &Json) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

fn check_wiring(label: &str, release: &str, namespace: &str, docs: &[Json]) {
    for d in docs {
        if d["kind"] != "MutatingWebhookConfiguration" {
            assert_eq!(
                d["metadata"]["namespace"],
                {
                    match (d["kind"].as_str(), label) {
                        (Some("ConfigMap"), "digest-sidecar-image-metrics") => "monitoring",
                        _ => namespace,
                    }
                },
                "{label}: {d}"
            );
        }
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/instance"], release,
            "{label}: {d}"
        );
    }
    let mwc = find(docs, "MutatingWebhookConfiguration");
    let hook = &mwc["webhooks"][0];
    let svc_ref = &hook["clientConfig"]["service"];
    let service = find_named(docs, "Service", svc_ref["name"].as_str().unwrap());
    assert_eq!(
        service["metadata"]["namespace"], svc_ref["namespace"],
        "{label}"
    );
    assert_eq!(
        service["spec"]["ports"][0]["port"], svc_ref["port"],
        "{label}"
    );
    assert_eq!(svc_ref["path"], "/mutate");
    // The release namespace is always excluded, whatever namespaceSelector says.
    let exprs = hook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap();
    let not_in = exprs
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
        .unwrap_or_else(|| panic!("{label}: no NotIn in {exprs:?}"));
    assert!(
        string_list(&not_in["values"]).contains(&namespace),
        "{label}: the webhook must not gate its own namespace: {not_in}"
    );

    let deploy = find(docs, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let selector = deploy["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(
            &deploy["spec"]["template"]["metadata"]["labels"][k], v,
            "{label}"
        );
        assert_eq!(&service["spec"]["selector"][k], v, "{label}");
    }
    let secret = pod["volumes"][0]["secret"]["secretName"].as_str().unwrap();
    let c = &pod["containers"][0];
    let args = string_list(&c["args"]);
    let cli = Cli::try_parse_from(std::iter::once("lameduck").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{label}: webhook args {args:?}: {e}"));
    let Sub::Webhook(w) = cli.command else {
        panic!("{label}: not a webhook command: {args:?}")
    };
    // Cluster-wide sidecar defaults reach the webhook as settings it accepts.
    let settings = lameduck::kube::inject::Settings::from(&w.sidecar);
    settings.check().unwrap_or_else(|e| panic!("{label}: {e}"));
    if label == "digest-sidecar-image-metrics" {
        assert_eq!(
            settings.defaults["lameduck.io/cpu-request"], "50m",
            "{label}"
        );
        assert_eq!(
            settings.defaults["lameduck.io/memory-limit"], "64Mi",
            "{label}"
        );
    }
    assert_eq!(
        i64::from(w.listen.port()),
        c["ports"][0]["containerPort"].as_i64().unwrap()
    );
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(w.tls_cert.starts_with(mount) && w.tls_key.starts_with(mount));
    let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_f64()
        .unwrap();
    assert!(
        grace
            > pre_stop
                + w.drain_time.as_secs_f64()
                + lameduck::kube::webhook::SHUTDOWN_GRACE.as_secs_f64(),
        "{label}: terminationGracePeriodSeconds {grace} too short for the drain"
    );
    let sidecar_image = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LAMEDUCK_SIDECAR_IMAGE")
        .expect("the webhook sets LAMEDUCK_SIDECAR_IMAGE")["value"]
        .as_str()
        .unwrap();
    assert!(!args.iter().any(|a| a.starts_with("--sidecar-image")));

    let pdb = docs.iter().find(|d| d["kind"] == "PodDisruptionBudget");
    if let Some(pdb) = pdb {
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            deploy["spec"]["selector"]["matchLabels"]
        );
    }

    match label {
        "defaults" => {
            assert_eq!(c["image"], "ghcr.io/lameduck/lameduck:0.1.0");
            assert_eq!(sidecar_image, c["image"].as_str().unwrap());
            assert!(w.sidecar.native_sidecar);
            assert_eq!(hook["failurePolicy"], "Fail");
        }
        "own-release-secret-tls" => {
            let image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/lameduck:v0.1.0-rc1";
            assert_eq!(c["image"], image);
            assert_eq!(sidecar_image, image, "one image for both");
            assert!(!w.sidecar.native_sidecar, "--native-sidecar=false");
            assert_eq!(w.drain_time, std::time::Duration::from_secs(20));
            assert_eq!(hook["failurePolicy"], "Ignore");
            assert_eq!(deploy["spec"]["replicas"], 3);
            assert_eq!(pod["priorityClassName"], "system-cluster-critical");
            assert_eq!(svc_ref["name"], "edge-lameduck-webhook");
            assert_eq!(mwc["metadata"]["name"], "edge-lameduck");
            // A provided Secret: no cert-manager objects, the caBundle as given.
            assert!(docs.iter().all(|d| d["apiVersion"] != "cert-manager.io/v1"));
            assert!(mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_null());
            assert_eq!(hook["clientConfig"]["caBundle"], "LS0tLS1CRUdJTg==");
            assert_eq!(secret, "my-webhook-tls");
            assert_eq!(
                hook["namespaceSelector"]["matchLabels"]["lameduck.io/enabled"],
                "true"
            );
            assert_eq!(
                hook["objectSelector"]["matchExpressions"][0]["key"],
                "lameduck.io/inject"
            );
            assert!(pdb.is_none());
        }
        "digest-sidecar-image-metrics" => {
            assert!(c["image"]
                .as_str()
                .unwrap()
                .starts_with("ghcr.io/lameduck/lameduck@sha256:"));
            assert_eq!(sidecar_image, "registry.example.com/lameduck:pinned");
            assert_eq!(pdb.unwrap()["spec"]["maxUnavailable"], 1);
            assert!(pdb.unwrap()["spec"]["minAvailable"].is_null());
            find(docs, "PodMonitor");
            find(docs, "PrometheusRule");
            find(docs, "ConfigMap");
        }
        other => panic!("no expectations for {other}"),
    }

    // cert-manager: the leaf covers the Service, fills the mounted Secret, and is signed by
    // the CA whose Certificate fills the caBundle.
    if let Some(leaf) = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["isCA"] != true)
    {
        let dns = format!("{}.{}.svc", svc_ref["name"].as_str().unwrap(), namespace);
        assert!(string_list(&leaf["spec"]["dnsNames"]).contains(&dns.as_str()));
        assert_eq!(leaf["spec"]["secretName"], secret);
        let ca_ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            .as_str()
            .unwrap();
        let (ca_ns, ca_name) = ca_ref.split_once('/').unwrap();
        assert_eq!(ca_ns, namespace);
        let ca = find_named(docs, "Certificate", ca_name);
        assert_eq!(ca["spec"]["isCA"], true);
        let leaf_issuer = find_named(
            docs,
            "Issuer",
            leaf["spec"]["issuerRef"]["name"].as_str().unwrap(),
        );
        assert_eq!(
            leaf_issuer["spec"]["ca"]["secretName"],
            ca["spec"]["secretName"]
        );
        let root_issuer = find_named(
            docs,
            "Issuer",
            ca["spec"]["issuerRef"]["name"].as_str().unwrap(),
        );
        assert!(root_issuer["spec"]["selfSigned"].is_object());
    }
}

#[test]
fn invalid_values_are_refused() {
    let Some(helm) = helm() else {
        return;
    };
    for (args, says) in [
        (vec!["--set", "tls.source=secret"], "tls.secret.caBundle"),
        // values.schema.json: a value out of its set, and a typo.
        (vec!["--set", "tls.source=vault"], "/tls/source"),
        (
            vec!["--set", "replica=3"],
            "additional properties 'replica' not allowed",
        ),
        (
            vec!["--set", "webhook.failurePolicy=fail"],
            "/webhook/failurePolicy",
        ),
    ] {
        let mut all = vec!["template", "lameduck", CHART];
        all.extend_from_slice(&ALLOW_PLACEHOLDER);
        all.extend_from_slice(&args);
        let out = output(&helm, &all);
        assert!(!out.status.success(), "{args:?} rendered");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Issue 24: no image is published, so the defaults' image is a placeholder the chart
/// refuses, saying what to do; any other repository renders.
#[test]
fn the_placeholder_image_is_refused_until_one_is_set() {
    let Some(helm) = helm() else {
        return;
    };
    let out = output(&helm, &["template", "lameduck", CHART]);
    assert!(!out.status.success(), "the placeholder image rendered");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("image.repository is ghcr.io/lameduck/lameduck, a placeholder")
            && stderr.contains("set image.repository"),
        "{stderr}"
    );
    let out = output(
        &helm,
        &[
            "template",
            "lameduck",
            CHART,
            "--set",
            "image.repository=registry.example.com/lameduck",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Validates the documents against the Kubernetes schemas; custom kinds have none.
fn validate(validator: &Path, label: &str, docs: &[Json]) {
    let checked: Vec<&Json> = docs
        .iter()
        .filter(|d| {
            let api = d["apiVersion"].as_str().unwrap_or_default();
            !api.starts_with("cert-manager.io/") && !api.starts_with("monitoring.coreos.com/")
        })
        .collect();
    assert!(checked.len() >= 4, "{label}");
    let file = std::env::temp_dir().join(format!(
        "lameduck-chart-{}-{label}.yaml",
        std::process::id()
    ));
    let yaml = checked
        .iter()
        .map(|d| lameduck::kube::yaml::emit_document(&yaml_serde::to_value(d).unwrap()).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(validator)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{label} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === which helm ===

/// Issue 24: another `helm` first on `PATH` (here a script that says it is v3.0.0-decoy, as
/// a helm built without Helm's version stamp says v3.x and assumes Kubernetes 1.20) is never
/// the one the chart tests run; a wrong helm named by `LAMEDUCK_HELM` is reported with both
/// versions. Runs this test binary again, as a child, with the decoy in place.
#[test]
fn a_decoy_helm_first_on_path_is_not_the_one_used() {
    use std::os::unix::fs::PermissionsExt as _;
    const TEST: &str = "helm_lint_passes_for_every_values_set";
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lameduck-decoy-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let decoy = dir.join("helm");
    std::fs::write(&decoy, "#!/bin/sh\necho v3.0.0-decoy\n").unwrap();
    std::fs::set_permissions(&decoy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = |helm_var: Option<&Path>, require: bool| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", TEST, "--nocapture"])
            .env("PATH", &path)
            // The child's skips are not this run's.
            .env("LAMEDUCK_SKIP_LOG", dir.join("skips.log"))
            .env_remove("LAMEDUCK_HELM")
            .env_remove("LAMEDUCK_REQUIRE_TOOLS");
        if let Some(helm) = helm_var {
            cmd.env("LAMEDUCK_HELM", helm);
        }
        if require {
            cmd.env("LAMEDUCK_REQUIRE_TOOLS", "1");
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // The decoy first on PATH: the real helm is used, or the test skips naming where it
    // looked; the decoy is never run.
    let spec = tools::helm_spec();
    let (ok, text) = child(None, false);
    assert!(ok, "{text}");
    assert!(!text.contains("decoy"), "{text}");
    let ran = text.contains("1 passed") && !text.contains("SKIPPED");
    let skipped = text.contains(&format!("SKIPPED chart::{TEST}: helm: not found at "));
    assert!(ran || skipped, "{text}");
    if std::env::var_os("LAMEDUCK_HELM").is_none() {
        // The child looked where this process looks: it ran iff helm is installed there.
        assert_eq!(ran, spec.find().is_ok(), "{text}");
        if skipped {
            assert!(text.contains(&spec.path.display().to_string()), "{text}");
        }
    }

    // The decoy named by LAMEDUCK_HELM: what is wrong, in so many words.
    let want = spec.version.unwrap();
    let wrong = format!(
        "reports version \"v3.0.0-decoy\", the tests need {want} (pinned in tests/helm/go.mod)"
    );
    let (ok, text) = child(Some(&decoy), false);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("SKIPPED chart::{TEST}: helm: {}", decoy.display()))
            && text.contains(&wrong),
        "{text}"
    );
    // And under LAMEDUCK_REQUIRE_TOOLS=1, a failure that says the same.
    let (ok, text) = child(Some(&decoy), true);
    assert!(!ok, "{text}");
    assert!(text.contains(&wrong), "{text}");

    let _ = std::fs::remove_dir_all(&dir);
}
