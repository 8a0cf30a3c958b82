//! The k8s/ manifests and the Dockerfile.
//!
//! Always: the manifests say what they must (opt-in objectSelector, failurePolicy, names
//! that refer to each other agree, the webhook's arguments parse as `lameduck webhook`,
//! the examples' Services target named ports, the canary steps).
//!
//! With outside tools (installed by `.ci/install-k8s-tools.sh`): `kubectl kustomize`
//! renders k8s/webhook and k8s/examples offline; `kubernetes-validate --strict` checks the
//! rendered manifests and the `lameduck inject` output of the examples against the
//! Kubernetes schemas (CRD kinds excepted: cert-manager's Issuer/Certificate and the Argo
//! Rollout, whose pod template is still checked as a PodTemplate); hadolint lints the
//! Dockerfile. A missing tool skips that test with a plain message, unless
//! `LAMEDUCK_REQUIRE_TOOLS=1`, where it fails.

#[path = "support/tools.rs"]
mod tools;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser as _;
use lameduck::cli::{Cli, Command as Sub};
use lameduck::kube::inject::{self, Settings};
use serde::Deserialize;
use serde_json::{json, Value as Json};

/// The Kubernetes version the manifests are validated against: the one whose API types
/// this crate is built with (k8s-openapi feature v1_33).
const KUBERNETES_VERSION: &str = "1.33.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn documents(yaml: &str) -> Vec<Json> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Json::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// Every document of every YAML file in a k8s/ directory except kustomization.yaml.
fn sources(dir: &str) -> Vec<Json> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml") && !p.ends_with("kustomizeconfig.yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

fn find<'a>(docs: &'a [Json], kind: &str, name: &str) -> &'a Json {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

// === what the manifests say ===

#[test]
fn webhook_configuration_is_opt_in_and_wired() {
    let docs = sources("k8s/webhook");
    let mwc = find(&docs, "MutatingWebhookConfiguration", "lameduck");
    let hook = &mwc["webhooks"][0];
    assert_eq!(
        hook["objectSelector"]["matchLabels"][inject::INJECT_LABEL],
        "true",
        "pods that did not opt in never wait on the webhook"
    );
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    let excluded = &hook["namespaceSelector"]["matchExpressions"][0]["values"];
    assert!(
        excluded
            .as_array()
            .unwrap()
            .contains(&json!("lameduck-system")),
        "the webhook must not gate its own pods"
    );

    // Names that refer to each other agree.
    let svc_ref = &hook["clientConfig"]["service"];
    let service = find(&docs, "Service", svc_ref["name"].as_str().unwrap());
    assert_eq!(service["metadata"]["namespace"], svc_ref["namespace"]);
    assert_eq!(service["spec"]["ports"][0]["port"], svc_ref["port"]);
    let cert = find(&docs, "Certificate", "lameduck-webhook");
    // The caBundle is a long-lived CA's, not the rotated leaf's: self-signed Issuer -> CA
    // Certificate -> CA Issuer -> leaf, and the CA injector reads the CA Certificate.
    let ca_ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .unwrap();
    let (ca_namespace, ca_name) = ca_ref.split_once('/').unwrap();
    let ca_cert = find(&docs, "Certificate", ca_name);
    assert_eq!(ca_cert["metadata"]["namespace"], ca_namespace);
    assert_eq!(ca_cert["spec"]["isCA"], true, "{ca_ref} is a CA");
    let ca_hours: u64 = ca_cert["spec"]["duration"]
        .as_str()
        .and_then(|d| d.strip_suffix('h')?.parse().ok())
        .unwrap();
    assert!(
        ca_hours >= 5 * 365 * 24,
        "the CA is long-lived: {ca_hours}h"
    );
    let self_signed = find(
        &docs,
        "Issuer",
        ca_cert["spec"]["issuerRef"]["name"].as_str().unwrap(),
    );
    assert!(self_signed["spec"]["selfSigned"].is_object());
    let leaf_issuer = find(
        &docs,
        "Issuer",
        cert["spec"]["issuerRef"]["name"].as_str().unwrap(),
    );
    assert_eq!(
        leaf_issuer["spec"]["ca"]["secretName"], ca_cert["spec"]["secretName"],
        "the serving certificate is signed by the CA the caBundle holds"
    );
    assert_ne!(cert["spec"]["secretName"], ca_cert["spec"]["secretName"]);
    let dns = format!(
        "{}.{}.svc",
        svc_ref["name"].as_str().unwrap(),
        svc_ref["namespace"].as_str().unwrap()
    );
    assert!(
        cert["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .contains(&json!(dns)),
        "the certificate covers {dns}"
    );

    let deploy = find(&docs, "Deployment", "lameduck-webhook");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        cert["spec"]["secretName"]
    );
    let selector = &deploy["spec"]["selector"]["matchLabels"];
    let pdb = find(&docs, "PodDisruptionBudget", "lameduck-webhook");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(&service["spec"]["selector"], selector);

    // Hardened like the sidecar.
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));

    // The arguments are ones `lameduck webhook` accepts, and point into the mounted Secret.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("lameduck").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("webhook args {args:?}: {e}"));
    let Sub::Webhook(w) = cli.command else {
        panic!("not a webhook command: {args:?}")
    };
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(w.tls_cert.starts_with(mount) && w.tls_key.starts_with(mount));
    assert_eq!(
        i64::from(w.listen.port()),
        c["ports"][0]["containerPort"].as_i64().unwrap()
    );
    // The image is set once: the sidecar's comes from the same value as the webhook's
    // (LAMEDUCK_SIDECAR_IMAGE, which kustomizeconfig.yaml lets `images:` rewrite), never
    // from an argument that `images:` would leave behind.
    assert!(
        !args.iter().any(|a| a.starts_with("--sidecar-image")),
        "{args:?}"
    );
    let sidecar_image = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LAMEDUCK_SIDECAR_IMAGE")
        .expect("the webhook sets LAMEDUCK_SIDECAR_IMAGE");
    assert_eq!(
        sidecar_image["value"], c["image"],
        "the sidecar image and the webhook image move together"
    );

    // The webhook drains. The preStop sleep covers the API server's endpoint
    // update lag, then SIGTERM starts --drain-time (with /healthz failing), then reviews
    // in flight get their last seconds: the grace period covers all three.
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("the webhook has a preStop sleep");
    assert!(pre_stop >= 5, "{pre_stop}");
    assert!(
        w.drain_time >= Duration::from_secs(5),
        "--drain-time {:?}",
        w.drain_time
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("the webhook sets terminationGracePeriodSeconds");
    let needed = pre_stop as f64
        + w.drain_time.as_secs_f64()
        + lameduck::kube::webhook::SHUTDOWN_GRACE.as_secs_f64();
    assert!(
        grace as f64 > needed,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + drain-time \
         + shutdown grace ({needed}s)"
    );
    // Readiness fails while draining; liveness must not, or the kubelet would restart it.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
}

#[test]
fn examples_target_named_ports_and_keep_the_canary() {
    let docs = sources("k8s/examples");
    // No warnings from injecting the examples: in particular no Service that targets the
    // app's port by number.
    let yaml = docs
        .iter()
        // lameduck's own emitter: yaml_serde writes `'no'` as `no`, which the validator (a
        // YAML 1.1 reader) takes for a boolean.
        .map(|d| lameduck::kube::yaml::emit_document(&yaml_serde::to_value(d).unwrap()).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let out = inject::inject_manifests(&yaml, &Settings::default(), false).unwrap();
    assert_eq!(out.warnings, Vec::<String>::new());
    assert_eq!(out.injected, 4, "the Deployments and the Rollout");
    for svc in docs.iter().filter(|d| d["kind"] == "Service") {
        for port in svc["spec"]["ports"].as_array().unwrap() {
            assert!(port["targetPort"].is_string(), "{svc}");
        }
    }

    let ingress = find(&docs, "Ingress", "web");
    let ann = &ingress["metadata"]["annotations"];
    assert_eq!(ann["alb.ingress.kubernetes.io/target-type"], "ip");
    assert!(ann["alb.ingress.kubernetes.io/healthcheck-path"].is_string());
    assert!(ann["alb.ingress.kubernetes.io/target-group-attributes"]
        .as_str()
        .unwrap()
        .contains("deregistration_delay.timeout_seconds="));
    // Health checks reach lameduck's port, not the app's.
    assert_eq!(
        ann["alb.ingress.kubernetes.io/healthcheck-port"],
        "traffic-port"
    );
    // The examples leave quiet at auto, as the README says; auto's fallback, used until
    // an interval is learned, must outlast the health-check interval, or silence means
    // nothing.
    let interval: u64 = ann["alb.ingress.kubernetes.io/healthcheck-interval-seconds"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let defaults = lameduck::cli::ProxyArgs::parse_and_validate(std::iter::empty::<&str>())
        .expect("the proxy's defaults are valid");
    assert!(defaults.quiet_fallback.as_secs() > interval);
    for d in docs.iter().filter(|d| d["spec"]["template"].is_object()) {
        let quiet = &d["spec"]["template"]["metadata"]["annotations"][inject::ANN_QUIET];
        assert!(
            quiet.is_null() || quiet == "auto",
            "{}: lameduck.io/quiet {quiet}: leave it at auto",
            d["metadata"]["name"]
        );
    }

    // The NetworkPolicy admits the ports the injected sidecar serves on, by the names
    // injection gives them, and not the app's own port.
    let policy = find(&docs, "NetworkPolicy", "web");
    let web = find(&docs, "Deployment", "web");
    for (k, v) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&web["spec"]["template"]["metadata"]["labels"][k], v);
    }
    let web_yaml =
        lameduck::kube::yaml::emit_document(&yaml_serde::to_value(web).unwrap()).unwrap();
    let injected = inject::inject_manifests(&web_yaml, &Settings::default(), false).unwrap();
    let injected = &documents(&injected.yaml)[0]["spec"]["template"]["spec"];
    let port_owner = |name: &str| -> String {
        injected["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(injected["initContainers"].as_array().into_iter().flatten())
            .find(|c| {
                c["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == name))
            })
            .unwrap_or_else(|| panic!("no container has a port named {name}"))["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut admitted = Vec::new();
    for rule in policy["spec"]["ingress"].as_array().unwrap() {
        for p in rule["ports"].as_array().unwrap() {
            admitted.push(p["port"].as_str().expect("named ports").to_owned());
        }
    }
    admitted.sort();
    admitted.dedup();
    assert_eq!(admitted, ["http", "lameduck-admin"]);
    for name in &admitted {
        assert_eq!(port_owner(name), "lameduck", "port {name}");
    }

    // The HTTPS + gRPC example: TLS to the target is lameduck's, and the health checks
    // are HTTPS on the traffic port, to the gRPC path lameduck fails while draining.
    let alb = &find(&docs, "Ingress", "payments")["metadata"]["annotations"];
    assert_eq!(alb["alb.ingress.kubernetes.io/backend-protocol"], "HTTPS");
    assert_eq!(
        alb["alb.ingress.kubernetes.io/backend-protocol-version"],
        "GRPC"
    );
    assert_eq!(
        alb["alb.ingress.kubernetes.io/healthcheck-protocol"],
        "HTTPS"
    );
    assert_eq!(
        alb["alb.ingress.kubernetes.io/healthcheck-path"],
        lameduck::traffic::proxy::ALB_GRPC_HEALTH_PATH
    );
    let payments = &find(&docs, "Deployment", "payments")["spec"]["template"]["metadata"];
    assert_eq!(payments["annotations"][inject::ANN_TLS], "self-signed");

    // The NLB example: ip targets, TCP health checks, lameduck in tcp mode, and a
    // deregistration delay that does not end flows before drain-max.
    let nlb = &find(&docs, "Service", "ledger")["metadata"]["annotations"];
    assert_eq!(
        nlb["service.beta.kubernetes.io/aws-load-balancer-type"],
        "external"
    );
    assert_eq!(
        nlb["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"],
        "ip"
    );
    assert_eq!(
        nlb["service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol"],
        "tcp"
    );
    let ledger = &find(&docs, "Deployment", "ledger")["spec"]["template"]["metadata"];
    assert_eq!(ledger["annotations"][inject::ANN_MODE], "tcp");
    let drain_max = lameduck::cli::parse_duration(
        ledger["annotations"][inject::ANN_DRAIN_MAX]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let delay: u64 = nlb["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
        .as_str()
        .unwrap()
        .strip_prefix("deregistration_delay.timeout_seconds=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(delay >= drain_max.as_secs());

    let rollout = find(&docs, "Rollout", "checkout");
    assert_eq!(rollout["apiVersion"], "argoproj.io/v1alpha1");
    let canary = &rollout["spec"]["strategy"]["canary"];
    assert_eq!(canary["dynamicStableScale"], true);
    let steps = canary["steps"].as_array().unwrap();
    assert!(steps[0].get("setCanaryScale").is_some());
    let weights: Vec<i64> = steps
        .iter()
        .filter_map(|s| s["setWeight"].as_i64())
        .collect();
    assert_eq!(weights, [10, 60, 80, 90, 100]);
    for (i, step) in steps.iter().enumerate() {
        if step.get("setWeight").is_some() {
            assert!(
                steps.get(i + 1).is_some_and(|s| s.get("pause").is_some()),
                "every setWeight is followed by a pause"
            );
        }
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].ends_with(" AS build"));
    assert!(froms[1].contains("distroless"));
    assert!(text.contains("\nUSER 65532:65532\n"));
    assert!(text.contains("\nENTRYPOINT [\"lameduck\"]\n"));
    assert!(text.contains("--locked"));
}

// === with outside tools ===

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
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

fn kustomize(kubectl: &Path, dir: &str) -> String {
    let dir = root().join(dir);
    run(kubectl, &["kustomize", dir.to_str().unwrap()])
}

/// Validates the documents against the Kubernetes schemas. CRD kinds have none; a
/// Rollout's pod template is checked as a v1 PodTemplate instead.
fn validate(validator: &Path, label: &str, docs: &[Json]) {
    let mut checked = Vec::new();
    for doc in docs {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        match api.split_once('/').map_or("", |(group, _)| group) {
            "cert-manager.io" => {}
            "argoproj.io" => checked.push(json!({
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": format!("{}-template", doc["metadata"]["name"].as_str().unwrap())},
                "template": doc["spec"]["template"],
            })),
            _ => checked.push(doc.clone()),
        }
    }
    assert!(!checked.is_empty());
    let file = std::env::temp_dir().join(format!(
        "lameduck-validate-{}-{label}.yaml",
        std::process::id()
    ));
    let yaml = checked
        .iter()
        // lameduck's own emitter: yaml_serde writes `'no'` as `no`, which the validator (a
        // YAML 1.1 reader) takes for a boolean.
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

#[test]
fn kustomize_renders_and_manifests_validate() {
    let Some(kubectl) = tools::kubectl() else {
        return;
    };
    let webhook = documents(&kustomize(&kubectl, "k8s/webhook"));
    let examples = documents(&kustomize(&kubectl, "k8s/examples"));
    assert_eq!(webhook.len(), sources("k8s/webhook").len());
    assert_eq!(examples.len(), sources("k8s/examples").len());
    assert!(examples
        .iter()
        .filter(|d| d["kind"] != "Namespace")
        .all(|d| d["metadata"]["namespace"] == "shop"));

    let Some(validator) = tools::kubernetes_validate() else {
        return;
    };
    validate(&validator, "k8s-webhook", &webhook);
    validate(&validator, "k8s-examples", &examples);

    // And what `lameduck inject` makes of the examples, through the binary.
    let rendered = kustomize(&kubectl, "k8s/examples");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lameduck"))
        .arg("inject")
        .env_remove("LAMEDUCK_SIDECAR_IMAGE")
        .env_remove("LAMEDUCK_NATIVE_SIDECAR")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no warnings");
    let injected = documents(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        injected
            .iter()
            .filter(
                |d| d["spec"]["template"]["metadata"]["annotations"][inject::STATUS_ANNOTATION]
                    == "injected"
            )
            .count(),
        4
    );
    validate(&validator, "k8s-examples-injected", &injected);

    // The regular-sidecar variant validates too.
    let regular = inject::inject_manifests(
        &rendered,
        &Settings {
            native_sidecar: false,
            ..Settings::default()
        },
        false,
    )
    .unwrap();
    validate(
        &validator,
        "k8s-examples-regular",
        &documents(&regular.yaml),
    );
}

/// A user's overlay that sets `images:` once moves the webhook's image and the sidecar image
/// it injects together.
#[test]
fn an_overlay_sets_the_image_once() {
    let Some(kubectl) = tools::kubectl() else {
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lameduck-overlay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(root().join("k8s/webhook")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/lameduck:v9.9.9";
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources: [../base]\n\
         images:\n\
         - name: ghcr.io/lameduck/lameduck\n  \
           newName: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/lameduck\n  \
           newTag: v9.9.9\n",
    )
    .unwrap();
    let docs = documents(&run(&kubectl, &["kustomize", overlay.to_str().unwrap()]));
    let _ = std::fs::remove_dir_all(&dir);
    let c =
        &find(&docs, "Deployment", "lameduck-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], image);
    let env = c["env"].as_array().unwrap();
    let sidecar = env
        .iter()
        .find(|e| e["name"] == "LAMEDUCK_SIDECAR_IMAGE")
        .unwrap();
    assert_eq!(sidecar["value"], image, "{env:?}");
}

/// Every golden output validates, so the goldens cannot drift into invalid pods.
#[test]
fn inject_goldens_validate() {
    let Some(validator) = tools::kubernetes_validate() else {
        return;
    };
    let dir = root().join("tests/golden/inject");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // Fields no 1.33 schema has, on purpose: it shows that injection keeps them.
        if path.ends_with("future-fields.out.yaml") {
            continue;
        }
        if path.to_str().unwrap().ends_with(".out.yaml") {
            for doc in documents(&std::fs::read_to_string(&path).unwrap()) {
                // Custom kinds other than the Rollout have no schema to check.
                if doc["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("example.com/"))
                {
                    continue;
                }
                // A workloadRef Rollout has no template to check.
                if doc["kind"] == "Rollout" && doc["spec"]["template"].is_null() {
                    continue;
                }
                docs.push(doc);
            }
        }
    }
    assert!(docs.len() > 20);
    validate(&validator, "goldens", &docs);
}

#[test]
fn hadolint_dockerfile() {
    let Some(hadolint) = tools::hadolint() else {
        return;
    };
    let dockerfile = root().join("Dockerfile");
    run(&hadolint, &[dockerfile.to_str().unwrap()]);
}
