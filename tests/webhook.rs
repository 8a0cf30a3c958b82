//! `lameduck webhook` over real TLS on 127.0.0.1 (ephemeral ports), with AdmissionReview
//! bodies shaped as the API server sends them: the returned JSON Patch, applied to the pod,
//! must give exactly what `lameduck inject` gives. Also: garbage and oversized bodies,
//! non-pods, unlabelled pods, denied pods, concurrent reviews, certificate rotation.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt, Full, StreamBody};
use lameduck::cli::{Cli, Command};
use lameduck::kube::inject::{self, Settings};
use lameduck::kube::webhook::{self, MAX_BODY};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use support::TempDir;

fn golden(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/inject")
            .join(name),
    )
    .unwrap()
}

fn yaml_to_json(yaml: &str) -> Json {
    Json::deserialize(yaml_serde::Deserializer::from_str(yaml)).unwrap()
}

// === certificates ===

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A serving certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
fn leaf(ca: &Ca) -> (String, String) {
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Replaces a file the way the kubelet updates a mounted Secret: write aside, rename over.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// === server and client ===

struct Server {
    addr: std::net::SocketAddr,
    dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(ca: &Ca) -> Server {
        let dir = TempDir::new("webhook");
        let (cert, key) = leaf(ca);
        std::fs::write(dir.0.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.0.join("tls.key"), key).unwrap();
        let cli = Cli::try_parse_from([
            "lameduck",
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            dir.0.join("tls.crt").to_str().unwrap(),
            "--tls-key",
            dir.0.join("tls.key").to_str().unwrap(),
            "--tls-reload-interval",
            "50ms",
            "--drain-time",
            "0s",
        ])
        .unwrap();
        let Command::Webhook(args) = cli.command else {
            unreachable!()
        };
        let bound = webhook::Bound::bind(&args).await.unwrap();
        let addr = bound.local_addr();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            dir,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the webhook stops")
            .unwrap();
    }
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector(ca_pem).connect(name, tcp).await
}

/// One HTTPS request: (status, body).
async fn request(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let stream = tls(addr, ca_pem).await.expect("TLS handshake");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "lameduck-webhook.lameduck-system.svc")
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("the webhook answers in time")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

async fn mutate(server: &Server, ca: &Ca, review: &Json) -> Json {
    let (status, body) = request(
        server.addr,
        &ca.pem,
        "POST",
        "/mutate",
        serde_json::to_vec(review).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// An AdmissionReview as the API server sends it for a pod CREATE by the ReplicaSet
/// controller (field set and shape from the Kubernetes admission webhook documentation).
fn review_for(pod: Json, uid: &str) -> Json {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "f8c3b2b5-1f0e-4c5f-9d0a-2f6c3a1e7b11",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// A pod as the API server has it at mutating admission: generated name, owner reference,
/// defaults filled in (restartPolicy, dnsPolicy, terminationGracePeriodSeconds 30, …).
fn defaulted_pod() -> Json {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "web-7d4b9c5f6-",
            "namespace": "shop",
            "creationTimestamp": null,
            "labels": {"app": "web", "pod-template-hash": "7d4b9c5f6", "lameduck.io/inject": "true"},
            "annotations": {"lameduck.io/drain-max": "90s"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c5f6",
                "uid": "0d9b2f1e-8d9a-4c6e-a7c4-3b5e1f2a9c80", "controller": true,
                "blockOwnerDeletion": true
            }],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-24T05:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}}}
            }]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x2k9p", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": [{
                "name": "web",
                "image": "example/web:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"}, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "kube-api-access-x2k9p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "someFieldFromANewerKubernetes": {"kept": true}
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

fn apply(pod: &Json, answer: &Json) -> Json {
    let response = &answer["response"];
    assert_eq!(response["patchType"], "JSONPatch", "{answer}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

/// Replaces the drain tokens in a pod (the sidecar's LAMEDUCK_DRAIN_TOKEN and the hook's
/// X-Lameduck-Token) with `TOKEN`, returning them: the webhook's are random per pod.
fn take_tokens(pod: &mut Json) -> Vec<String> {
    let mut found = Vec::new();
    let mut take = |v: &mut Json| {
        if let Some(t) = v.as_str() {
            found.push(t.to_owned());
            *v = json!("TOKEN");
        }
    };
    let spec = &mut pod["spec"];
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            for e in c["env"].as_array_mut().into_iter().flatten() {
                if e["name"] == inject::TOKEN_ENV {
                    take(&mut e["value"]);
                }
            }
            let headers = &mut c["lifecycle"]["preStop"]["httpGet"]["httpHeaders"];
            for h in headers.as_array_mut().into_iter().flatten() {
                if h["name"] == inject::TOKEN_HEADER {
                    take(&mut h["value"]);
                }
            }
        }
    }
    found
}

/// The webhook's result and the CLI's agree but for the drain token (random per pod in
/// the webhook, derived in the CLI); within the pod, the sidecar's and the hook's agree.
fn same_but_token(mut webhook: Json, mut cli: Json) {
    let w = take_tokens(&mut webhook);
    let c = take_tokens(&mut cli);
    assert_eq!(w.len(), 2, "token in the sidecar and in the hook: {w:?}");
    assert_eq!(w[0], w[1], "sidecar and hook carry the same token");
    assert_eq!(c.len(), 2, "{c:?}");
    assert_ne!(
        w[0], c[0],
        "the webhook's token is its own, not the derived one"
    );
    assert_eq!(webhook, cli);
}

/// What `lameduck inject` makes of the same pod.
fn cli_result(pod: &Json) -> Json {
    let yaml = yaml_serde::to_string(pod).unwrap();
    let out = inject::inject_manifests(&yaml, &Settings::default(), false).unwrap();
    yaml_to_json(&out.yaml)
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_gives_what_inject_gives() {
    let ca = new_ca("test-ca");
    let server = Server::start(&ca).await;

    // The golden Pod: the patch must turn the input golden into the output golden.
    let pod = yaml_to_json(&golden("pod.in.yaml"));
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-golden")).await;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "uid-golden");
    assert_eq!(answer["response"]["allowed"], true);
    same_but_token(apply(&pod, &answer), yaml_to_json(&golden("pod.out.yaml")));

    // A pod as the API server really has it, defaults and unknown fields included.
    let pod = defaulted_pod();
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-defaulted")).await;
    let patched = apply(&pod, &answer);
    same_but_token(patched.clone(), cli_result(&pod));
    // Two pods of the same ReplicaSet get different tokens.
    let again = apply(
        &pod,
        &mutate(&server, &ca, &review_for(pod.clone(), "uid-again")).await,
    );
    assert_ne!(
        take_tokens(&mut again.clone()),
        take_tokens(&mut patched.clone())
    );
    assert_eq!(
        patched["spec"]["containers"][0]["someFieldFromANewerKubernetes"],
        json!({"kept": true}),
        "fields unknown to the Kubernetes types survive"
    );
    assert_eq!(patched["spec"]["terminationGracePeriodSeconds"], 120);
    assert_eq!(
        patched["spec"]["initContainers"][0]["ports"][0]["name"], "http",
        "the port name moved to the proxy"
    );
    assert!(
        answer["response"].get("warnings").is_none(),
        "raising the defaulted 30s grace period is not news: {answer}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_and_denials() {
    let ca = new_ca("test-ca");
    let server = Server::start(&ca).await;

    // Issue 11: an app with its own preStop cannot be wired: denied, naming the fix (not
    // a pod that looks injected with only an AdmissionReview warning nobody reads).
    let mut pod = defaulted_pod();
    pod["spec"]["containers"][0]["lifecycle"] =
        json!({"preStop": {"exec": {"command": ["sleep", "5"]}}});
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-prestop")).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("preStop") && message.contains(inject::ANN_REPLACE_PRESTOP),
        "{message}"
    );

    // Accepted degraded on request: injected, warned, and marked on the pod.
    pod["metadata"]["annotations"][inject::ANN_ALLOW_DEGRADED] = json!("true");
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-warn")).await;
    assert_eq!(answer["response"]["allowed"], true);
    let warnings = answer["response"]["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{answer}");
    assert!(
        warnings[0].as_str().unwrap().contains("preStop"),
        "{answer}"
    );
    let patched = apply(&pod, &answer);
    assert_eq!(
        patched["spec"]["containers"][0]["lifecycle"]["preStop"],
        json!({"exec": {"command": ["sleep", "5"]}}),
        "the existing hook is kept"
    );
    assert!(
        patched["metadata"]["annotations"][inject::ANN_DEGRADED]
            .as_str()
            .is_some_and(|d| d.contains("preStop")),
        "{patched}"
    );

    // Issue 11: the log shipper first, the app second: denied, naming lameduck.io/container.
    let mut pod = defaulted_pod();
    let app = pod["spec"]["containers"][0].clone();
    pod["spec"]["containers"] = json!([
        {"name": "fluent-bit", "image": "fluent/fluent-bit:3.1",
         "ports": [{"name": "fb-metrics", "containerPort": 2020, "protocol": "TCP"}]},
        app,
    ]);
    pod["spec"]["containers"][1]["ports"][0]["name"] = json!("web");
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-ambiguous")).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains(inject::ANN_CONTAINER), "{message}");
    pod["metadata"]["annotations"][inject::ANN_CONTAINER] = json!("web");
    let answer = mutate(&server, &ca, &review_for(pod.clone(), "uid-container")).await;
    let patched = apply(&pod, &answer);
    let sidecar = &patched["spec"]["initContainers"][0];
    assert!(
        sidecar["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--upstream=127.0.0.1:8080")),
        "the app, not the log shipper: {sidecar}"
    );

    let mut pod = defaulted_pod();
    pod["metadata"]["annotations"]["lameduck.io/drain-max"] = json!("soon");
    let answer = mutate(&server, &ca, &review_for(pod, "uid-deny")).await;
    let response = &answer["response"];
    assert_eq!(response["uid"], "uid-deny");
    assert_eq!(response["allowed"], false);
    assert!(response.get("patch").is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("lameduck.io/drain-max")
            && message.contains("\"soon\"")
            && message.contains("expected a duration"),
        "{message}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_pass_untouched() {
    let ca = new_ca("test-ca");
    let server = Server::start(&ca).await;

    let mut unlabelled = defaulted_pod();
    unlabelled["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("lameduck.io/inject");
    let already = apply(
        &defaulted_pod(),
        &mutate(&server, &ca, &review_for(defaulted_pod(), "u0")).await,
    );
    let mut configmap = review_for(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}),
        "u3",
    );
    configmap["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    configmap["request"]["resource"] =
        json!({"group": "", "version": "v1", "resource": "configmaps"});
    let mut update = review_for(defaulted_pod(), "u4");
    update["request"]["operation"] = json!("UPDATE");

    for (review, uid) in [
        (review_for(unlabelled, "u1"), "u1"),
        (review_for(already, "u2"), "u2"),
        (configmap, "u3"),
        (update, "u4"),
    ] {
        let answer = mutate(&server, &ca, &review).await;
        assert_eq!(
            answer["response"],
            json!({"uid": uid, "allowed": true}),
            "{uid}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests() {
    let ca = new_ca("test-ca");
    let server = Server::start(&ca).await;
    let post = |body: &[u8]| request(server.addr, &ca.pem, "POST", "/mutate", body.to_vec());

    for garbage in [
        &b""[..],
        b"{",
        b"not json",
        b"\x00\xff",
        b"[1,2]",
        br#"{"kind":"Pod","apiVersion":"v1"}"#,
    ] {
        let (status, body) = post(garbage).await;
        assert_eq!(status, 400, "{garbage:?}");
        assert!(!body.is_empty(), "a 400 says why");
    }
    let (status, body) =
        post(br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("no request"));

    assert_eq!(
        request(server.addr, &ca.pem, "GET", "/healthz", vec![])
            .await
            .0,
        200
    );
    assert_eq!(
        request(server.addr, &ca.pem, "GET", "/mutate", vec![])
            .await
            .0,
        405
    );
    assert_eq!(
        request(server.addr, &ca.pem, "GET", "/nope", vec![])
            .await
            .0,
        404
    );

    // Oversized, declared: refused before the body is read.
    let mut stream = tls(server.addr, &ca.pem).await.unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // The server survives all of that.
    assert_eq!(
        request(server.addr, &ca.pem, "GET", "/healthz", vec![])
            .await
            .0,
        200
    );
    server.shutdown().await;
}

/// A streamed body with no declared length is cut off at the limit too.
#[tokio::test]
async fn oversized_stream_is_413() {
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let chunks = (MAX_BODY / chunk.len()) + 2;
    let stream =
        futures_util::stream::iter((0..chunks).map(move |_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
        }));
    let req = http::Request::post("/mutate")
        .body(StreamBody::new(stream))
        .unwrap();
    let resp = webhook::handle(req, &Settings::default()).await;
    assert_eq!(resp.status(), 413);

    // Just under the limit is read (and is garbage: 400).
    let req = http::Request::post("/mutate")
        .body(Full::new(Bytes::from(vec![b' '; MAX_BODY])))
        .unwrap();
    assert_eq!(
        webhook::handle(req, &Settings::default()).await.status(),
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reviews() {
    let ca = Arc::new(new_ca("test-ca"));
    let server = Server::start(&ca).await;
    let expected = cli_result(&defaulted_pod());
    let mut tasks = Vec::new();
    for i in 0..24 {
        let ca = ca.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let uid = format!("uid-{i}");
            let review = review_for(defaulted_pod(), &uid);
            let (status, body) = request(
                addr,
                &ca.pem,
                "POST",
                "/mutate",
                serde_json::to_vec(&review).unwrap(),
            )
            .await;
            assert_eq!(status, 200);
            let answer: Json = serde_json::from_slice(&body).unwrap();
            assert_eq!(answer["response"]["uid"], uid.as_str());
            apply(&defaulted_pod(), &answer)
        }));
    }
    for t in tasks {
        same_but_token(t.await.unwrap(), expected.clone());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served() {
    let old_ca = new_ca("old-ca");
    let new_ca = new_ca("new-ca");
    let server = Server::start(&old_ca).await;
    assert_eq!(
        request(server.addr, &old_ca.pem, "GET", "/healthz", vec![])
            .await
            .0,
        200
    );
    assert!(
        tls(server.addr, &new_ca.pem).await.is_err(),
        "not rotated yet"
    );

    // The kubelet swaps the whole Secret volume at once; write the key first so the
    // mismatched moment (new key, old certificate) is refused, then the certificate.
    let (cert, key) = leaf(&new_ca);
    write_atomically(&server.dir.0.join("tls.key"), &key);
    write_atomically(&server.dir.0.join("tls.crt"), &cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tls(server.addr, &new_ca.pem).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tls(server.addr, &old_ca.pem).await.is_err(),
        "old certificate still served"
    );
    assert_eq!(
        request(server.addr, &new_ca.pem, "GET", "/healthz", vec![])
            .await
            .0,
        200
    );
    server.shutdown().await;
}

#[test]
fn half_rotation_keeps_the_old_pair() {
    let ca = new_ca("ca");
    let dir = TempDir::new("webhook");
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    let (cert, key) = leaf(&ca);
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let store = lameduck::tls::CertStore::load(&cert_path, &key_path).unwrap();
    assert!(!store.reload().unwrap(), "unchanged files: nothing to do");

    let (new_cert, new_key) = leaf(&ca);
    write_atomically(&cert_path, &new_cert);
    let e = store.reload().unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    write_atomically(&key_path, &new_key);
    assert!(store.reload().unwrap(), "the complete new pair is taken");

    write_atomically(&cert_path, "garbage");
    assert!(store.reload().is_err());
    write_atomically(&cert_path, &new_cert);
    assert!(!store.reload().unwrap(), "back to the pair in use");
}

#[test]
fn bad_certificate_files_exit_2() {
    let dir = TempDir::new("webhook");
    std::fs::write(dir.0.join("tls.crt"), "not a certificate").unwrap();
    std::fs::write(dir.0.join("tls.key"), "not a key").unwrap();
    for (cert, key, expect) in [
        ("tls.crt", "tls.key", "tls.crt"),
        ("missing.crt", "tls.key", "cannot read"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lameduck"))
            .args(["webhook", "--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(dir.0.join(cert))
            .arg("--tls-key")
            .arg(dir.0.join(key))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{stderr}");
    }
}

/// The binary: starts, says where it listens, answers, logs each pod with its namespace
/// and owner, and on SIGTERM drains (issue 9): /healthz 503, reviews still answered for
/// --drain-time, then exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    let ca = new_ca("test-ca");
    let dir = TempDir::new("webhook");
    let (cert, key) = leaf(&ca);
    std::fs::write(dir.0.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.0.join("tls.key"), key).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lameduck"))
        .args(["webhook", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--drain-time", "2s"])
        .arg("--tls-cert")
        .arg(dir.0.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.0.join("tls.key"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut child = KillOnDrop(child);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let addr: std::net::SocketAddr = (0..100)
        .find_map(|_| {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .expect("the webhook logs where it listens");
            let log: Json = serde_json::from_str(&line).unwrap_or(Json::Null);
            log["addr"].as_str().map(|a| a.parse().unwrap())
        })
        .expect("an address within the first 100 log lines");
    let (status, body) = request(addr, &ca.pem, "GET", "/healthz", vec![]).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    let answer = {
        let review = review_for(defaulted_pod(), "uid-binary");
        let (status, body) = request(
            addr,
            &ca.pem,
            "POST",
            "/mutate",
            serde_json::to_vec(&review).unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        serde_json::from_slice::<Json>(&body).unwrap()
    };
    same_but_token(
        apply(&defaulted_pod(), &answer),
        cli_result(&defaulted_pod()),
    );
    let mut denied = defaulted_pod();
    denied["metadata"]["annotations"]["lameduck.io/drain_max"] = json!("60s");
    let review = serde_json::to_vec(&review_for(denied, "uid-denied")).unwrap();
    let (status, _) = request(addr, &ca.pem, "POST", "/mutate", review).await;
    assert_eq!(status, 200);
    // Issue 11: the log line names the namespace, the owner and the reason.
    let log_of = |message: &str| -> Json {
        (0..100)
            .find_map(|_| {
                let line = lines.recv_timeout(Duration::from_secs(10)).ok()?;
                let log: Json = serde_json::from_str(&line).unwrap_or(Json::Null);
                (log["message"] == message).then_some(log)
            })
            .unwrap_or_else(|| panic!("no log line {message:?}"))
    };
    let injected = log_of("pod injected");
    assert_eq!(injected["namespace"], "shop", "{injected}");
    assert_eq!(injected["owner"], "ReplicaSet/web-7d4b9c5f6", "{injected}");
    let denial = log_of("pod denied");
    assert_eq!(denial["namespace"], "shop", "{denial}");
    assert_eq!(denial["owner"], "ReplicaSet/web-7d4b9c5f6", "{denial}");
    assert!(
        denial["reason"]
            .as_str()
            .is_some_and(|r| r.contains("lameduck.io/drain_max")),
        "{denial}"
    );

    // Taken before the signal is sent: the webhook's drain time starts when it gets the
    // signal, which is before `kill` returns (under load, by a lot), so a clock started after
    // it would read less than the drain time at exit.
    let signalled = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Draining: not ready, still alive, still answering reviews on new connections.
    let mut answered = 0;
    while signalled.elapsed() < Duration::from_millis(1500) {
        let (status, _) = request(addr, &ca.pem, "GET", "/healthz", vec![]).await;
        assert_eq!(status, 503, "/healthz fails while draining");
        let (status, _) = request(addr, &ca.pem, "GET", "/livez", vec![]).await;
        assert_eq!(status, 200, "/livez stays up while draining");
        let review = serde_json::to_vec(&review_for(defaulted_pod(), "uid-draining")).unwrap();
        let (status, body) = request(addr, &ca.pem, "POST", "/mutate", review).await;
        assert_eq!(status, 200);
        let answer: Json = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        answered += 1;
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "exited while draining"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered >= 5,
        "only {answered} reviews answered while draining"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook did not exit after its drain time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "exited before --drain-time: {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0));
}

/// Ends the spawned webhook if a test fails before it stops it (this process only).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
