//! `lameduck webhook`: the mutating admission webhook, a thin HTTPS shell around
//! [`crate::kube::inject`]. It owns the AdmissionReview wire format, the TLS listener and the
//! certificate reload; what a pod becomes is decided by [`crate::kube::inject::template_patch`] alone.
//!
//! | endpoint | method | answers |
//! |---|---|---|
//! | `/mutate` | POST | `admission.k8s.io/v1` AdmissionReview in and out: a JSONPatch (base64, `patchType: JSONPatch`) and warnings for an opted-in pod; allowed with no patch for anything else; `allowed: false` with the reason when the pod's annotations are invalid. 400 with a reason for a body that is not an AdmissionReview, 413 above [`MAX_BODY`] |
//! | `/healthz` | GET, HEAD | readiness: 200 `ok`; 503 `draining` once SIGTERM has arrived |
//! | `/livez` | GET, HEAD | liveness: 200 `ok` until the process exits |
//!
//! Every pod gets its own random drain token ([`crate::kube::inject::random_token`]) unless it
//! sets `lameduck.io/drain-token`. Each answer is logged with the pod's namespace and
//! owner (`ReplicaSet/web-7d4b9c5f6`, or its generateName or name), and the reason of a
//! denial or the warnings of an injection.
//!
//! **Drain.** On SIGTERM the webhook fails `/healthz` (so the endpoint leaves the Service)
//! and keeps accepting and answering reviews for `--drain-time`; then it stops accepting
//! and gives reviews in flight a few seconds. The API server keeps calling an endpoint
//! until its EndpointSlice update has reached it, so closing at once would fail pod
//! creation (`failurePolicy: Fail`) during every rollout of the webhook.
//!
//! The certificate and key files are re-read every `--tls-reload-interval` and swapped in
//! when their contents change and the pair is valid (cert-manager rotates them in the
//! mounted Secret); new handshakes use the new pair, a bad pair keeps the old one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;

use crate::cli::WebhookArgs;
use crate::kube::inject::{self, Settings};
use crate::tls::{self, CertStore, TlsError};

/// Largest AdmissionReview accepted: the API server's own request size limit (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// A TLS handshake or a request's headers must complete within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A review's body must arrive within this long (the API server's own webhook timeout is
/// at most 30 s).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight reviews get at shutdown, after `--drain-time`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Why the webhook cannot start (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("--listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A request body that is not an AdmissionReview this webhook can answer (HTTP 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

// === the review: pure ===

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: Gvk,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    object: Option<Json>,
}

#[derive(Deserialize)]
struct Gvk {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Which pod a review is about, for the log: its namespace and who creates it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    /// `Kind/name` of the first ownerReference (`ReplicaSet/web-7d4b9c5f6`), else the
    /// pod's generateName (`web-7d4b9c5f6-*`), else its name.
    pub owner: String,
}

impl Subject {
    fn of(namespace: Option<&str>, pod: &Json) -> Subject {
        let meta = &pod["metadata"];
        let owner = meta["ownerReferences"]
            .as_array()
            .and_then(|o| o.first())
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["name"].as_str().unwrap_or("?")
                )
            })
            .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
            .or_else(|| meta["name"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        Subject {
            namespace: namespace
                .or_else(|| meta["namespace"].as_str())
                .unwrap_or_default()
                .to_owned(),
            owner,
        }
    }
}

/// Answers one AdmissionReview body with the AdmissionReview to send back.
pub fn review(body: &[u8], settings: &Settings) -> Result<Json, BadReview> {
    review_of(body, settings).map(|(answer, _)| answer)
}

/// [`review`], and which pod it was about.
pub fn review_of(body: &[u8], settings: &Settings) -> Result<(Json, Subject), BadReview> {
    let review: ReviewIn = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("not an AdmissionReview: {e}")))?;
    if review.kind.as_deref() != Some("AdmissionReview")
        || review.api_version.as_deref() != Some(REVIEW_API_VERSION)
    {
        return Err(BadReview(format!(
            "expected kind AdmissionReview, apiVersion {REVIEW_API_VERSION}; got kind {:?}, \
             apiVersion {:?}",
            review.kind.unwrap_or_default(),
            review.api_version.unwrap_or_default()
        )));
    }
    let request = review
        .request
        .ok_or_else(|| BadReview("the AdmissionReview has no request".into()))?;
    let uid = request.uid;
    let answer = |response: Json| {
        let mut response = response;
        response["uid"] = Json::String(uid.clone());
        json!({ "apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response })
    };
    let allow = || answer(json!({ "allowed": true }));

    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let creating = request.operation.as_deref().unwrap_or("CREATE") == "CREATE";
    let subject = Subject::of(
        request.namespace.as_deref(),
        request.object.as_ref().unwrap_or(&Json::Null),
    );
    let Some(pod) = request.object.filter(|_| is_pod && creating) else {
        return Ok((allow(), subject));
    };
    let metadata = pod.get("metadata").cloned().unwrap_or(Json::Null);
    if !inject::wants_injection(&labels_of(&metadata), false) {
        return Ok((allow(), subject));
    }
    let template =
        json!({ "metadata": metadata, "spec": pod.get("spec").cloned().unwrap_or(Json::Null) });
    match inject::template_patch(&template, settings) {
        Ok((patch, warnings)) => {
            let mut response = json!({ "allowed": true });
            if !patch.0.is_empty() {
                let patch = serde_json::to_vec(&patch).expect("a patch serializes");
                response["patchType"] = "JSONPatch".into();
                response["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(patch)
                    .into();
            }
            if !warnings.is_empty() {
                response["warnings"] = warnings
                    .into_iter()
                    .map(|w| Json::String(format!("lameduck: {w}")))
                    .collect();
            }
            Ok((answer(response), subject))
        }
        Err(e) => Ok((
            answer(json!({
                "allowed": false,
                "status": { "code": 403, "message": format!("lameduck: {e}") },
            })),
            subject,
        )),
    }
}

/// The pod's labels whose values are strings, as metadata for [`inject::wants_injection`]:
/// the opt-in rule is read from the raw object before anything else in it is checked.
fn labels_of(metadata: &Json) -> ObjectMeta {
    let labels = metadata
        .get("labels")
        .and_then(Json::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        });
    ObjectMeta {
        labels,
        ..Default::default()
    }
}

// === the server ===

/// A webhook whose port is bound and whose certificate is loaded; [`Bound::run`] serves.
pub struct Bound {
    listener: TcpListener,
    certs: Arc<CertStore>,
    settings: Arc<Settings>,
    reload_interval: Duration,
    drain_time: Duration,
}

impl Bound {
    /// Loads the certificate and binds the port: both fail here, before serving.
    pub async fn bind(args: &WebhookArgs) -> Result<Bound, WebhookError> {
        let certs = Arc::new(CertStore::load(&args.tls_cert, &args.tls_key)?);
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| WebhookError::Bind {
                    addr: args.listen,
                    source,
                })?;
        Ok(Bound {
            listener,
            certs,
            settings: Arc::new(Settings::from(&args.sidecar)),
            reload_interval: args.tls_reload_interval.max(Duration::from_millis(10)),
            drain_time: args.drain_time,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Serves until `shutdown` completes; then fails `/healthz` and keeps serving for
    /// `--drain-time`; then stops accepting and gives in-flight reviews a few seconds.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Bound {
            listener,
            certs,
            settings,
            reload_interval,
            drain_time,
        } = self;
        let draining = Arc::new(AtomicBool::new(false));
        let drain_time_text = humantime::format_duration(drain_time).to_string();
        let draining_flag = draining.clone();
        let shutdown = async move {
            shutdown.await;
            draining_flag.store(true, Ordering::SeqCst);
            tracing::info!(
                drain_time = %drain_time_text,
                "draining: /healthz fails, reviews are answered until the drain time is over"
            );
            tokio::time::sleep(drain_time).await;
        };
        let acceptor = tls::acceptor(certs.clone(), &[tls::ALPN_HTTP1]);

        let reloader = tokio::spawn(tls::reload_loop(certs, reload_interval));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let settings = settings.clone();
            let draining = draining.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let service = service_fn(move |req| {
                    let settings = settings.clone();
                    let draining = draining.load(Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(route(req, &settings, draining).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        reloader.abort();
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("reviews still in flight at shutdown were cut off");
        }
    }
}

type Resp = Response<Full<Bytes>>;

/// Routes one request (see the endpoint table above), as a webhook that is not draining.
/// Public so tests can drive it without a socket.
pub async fn handle<B>(req: Request<B>, settings: &Settings) -> Resp
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    route(req, settings, false).await
}

async fn route<B>(req: Request<B>, settings: &Settings, draining: bool) -> Resp
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") if draining => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET | &Method::HEAD, "/healthz" | "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_BODY as u64) {
                return too_large();
            }
            let body = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
                Ok(Ok(body)) => body.to_bytes(),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
                Ok(Err(e)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("cannot read the request body: {e}\n"),
                    )
                }
                Err(_) => {
                    return text(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time\n",
                    )
                }
            };
            // A fresh random drain token for this pod (unless it sets its own).
            let mut settings = settings.clone();
            match inject::random_token() {
                Ok(token) => settings.drain_token = Some(token),
                Err(e) => tracing::warn!(error = %e, "drain token derived from the pod instead"),
            }
            match review_of(&body, &settings) {
                Ok((answer, subject)) => {
                    log_answer(&answer, &subject);
                    let mut resp = Response::new(Full::new(Bytes::from(
                        serde_json::to_vec(&answer).expect("a JSON value serializes"),
                    )));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad AdmissionReview");
                    text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
                }
            }
        }
        (_, "/mutate" | "/healthz" | "/livez") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn log_answer(answer: &Json, subject: &Subject) {
    let r = &answer["response"];
    let uid = r["uid"].as_str().unwrap_or_default();
    let (namespace, owner) = (subject.namespace.as_str(), subject.owner.as_str());
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    if r["allowed"] == Json::Bool(false) {
        tracing::warn!(
            uid,
            namespace,
            owner,
            reason = r["status"]["message"].as_str().unwrap_or_default(),
            "pod denied"
        );
    } else if r.get("patch").is_some() && !warnings.is_empty() {
        let warnings = warnings.join(" | ");
        tracing::warn!(
            uid,
            namespace,
            owner,
            warnings,
            "pod injected, with warnings"
        );
    } else if r.get("patch").is_some() {
        tracing::info!(uid, namespace, owner, "pod injected");
    } else if !warnings.is_empty() {
        let warnings = warnings.join(" | ");
        tracing::warn!(
            uid,
            namespace,
            owner,
            warnings,
            "pod allowed unchanged, with warnings"
        );
    } else {
        tracing::debug!(uid, namespace, owner, "pod allowed unchanged");
    }
}

fn too_large() -> Resp {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the AdmissionReview exceeds {MAX_BODY} bytes\n"),
    )
}

fn text(status: StatusCode, body: &str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::default()
    }

    fn body(object: Json, kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "object": object,
            }
        }))
        .unwrap()
    }

    #[test]
    fn garbage_is_a_bad_review() {
        for garbage in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"\xff\xfe",
            b"{\"kind\":\"Pod\"}",
        ] {
            assert!(review(garbage, &settings()).is_err(), "{garbage:?}");
        }
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert!(review(no_request, &settings()).is_err());
        let old = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x","kind":{"kind":"Pod"}}}"#;
        assert!(review(old, &settings()).is_err());
    }

    #[test]
    fn non_pods_and_unlabelled_pods_pass() {
        let a = review(&body(json!({"metadata": {}}), "ConfigMap"), &settings()).unwrap();
        assert_eq!(a["response"]["allowed"], true);
        assert!(a["response"].get("patch").is_none());
        let pod =
            json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "a"}]}});
        let a = review(&body(pod, "Pod"), &settings()).unwrap();
        assert_eq!(a["response"]["allowed"], true);
        assert_eq!(a["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(a["response"].get("patch").is_none());
    }

    #[test]
    fn subjects_name_namespace_and_owner() {
        let owned = json!({"metadata": {"generateName": "web-7d4b9c5f6-", "ownerReferences": [
            {"kind": "ReplicaSet", "name": "web-7d4b9c5f6"}]}});
        assert_eq!(
            Subject::of(Some("shop"), &owned),
            Subject {
                namespace: "shop".into(),
                owner: "ReplicaSet/web-7d4b9c5f6".into()
            }
        );
        let generated = json!({"metadata": {"generateName": "job-", "namespace": "batch"}});
        assert_eq!(
            Subject::of(None, &generated),
            Subject {
                namespace: "batch".into(),
                owner: "job-*".into()
            }
        );
        assert_eq!(Subject::of(None, &json!(null)).owner, "?");
    }

    /// The webhook's JSON Patch, applied to the pod as the API server sent it, keeps what
    /// the Kubernetes types here do not know (`restartPolicyRules`, 1.34; an unknown
    /// `fooBar`) and what they do (`lifecycle.stopSignal`, 1.33), and only appends: Istio's
    /// init containers are not touched, lameduck comes after istio-proxy.
    #[test]
    fn the_patch_keeps_unknown_fields_and_appends_after_istio() {
        let rules = json!([{"action": "Restart", "exitCodes": {"operator": "In", "values": [42]}}]);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "shop-", "namespace": "shop",
                         "labels": {"lameduck.io/inject": "true"}},
            "spec": {
                "fooBar": 1,
                "initContainers": [
                    {"name": "istio-init", "image": "proxyv2", "args": ["istio-iptables"]},
                    {"name": "istio-proxy", "image": "proxyv2", "restartPolicy": "Always",
                     "restartPolicyRules": rules, "fooBar": 1,
                     "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]},
                ],
                "containers": [{
                    "name": "app", "image": "shop", "fooBar": 1,
                    "lifecycle": {"stopSignal": "SIGUSR1"},
                    "restartPolicyRules": rules,
                    "ports": [{"name": "http", "containerPort": 8080, "fooBar": 1}],
                    "readinessProbe": {"httpGet": {"path": "/app-health/app/readyz", "port": 15020}},
                }],
            },
        });
        let a = review(&body(pod.clone(), "Pod"), &settings()).unwrap();
        assert_eq!(a["response"]["allowed"], true, "{a}");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(a["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        for op in &patch.0 {
            let path = op.path().to_string();
            assert!(
                !path.starts_with("/spec/initContainers/0")
                    && !path.starts_with("/spec/initContainers/1"),
                "{path}: Istio's containers are left alone"
            );
        }
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        for kept in [
            "/spec/fooBar",
            "/spec/initContainers/0",
            "/spec/initContainers/1",
            "/spec/containers/0/fooBar",
            "/spec/containers/0/restartPolicyRules",
            "/spec/containers/0/lifecycle/stopSignal",
            "/spec/containers/0/ports/0/fooBar",
            "/spec/containers/0/readinessProbe",
        ] {
            assert_eq!(patched.pointer(kept), pod.pointer(kept), "{kept}");
        }
        assert_eq!(patched["spec"]["initContainers"][2]["name"], "lameduck");
        assert_eq!(
            patched["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"]["path"],
            "/drain"
        );
    }

    #[test]
    fn odd_pods_never_panic() {
        for pod in [
            json!(null),
            json!({"metadata": {"labels": {"lameduck.io/inject": "true"}}}),
            json!({"metadata": {"labels": {"lameduck.io/inject": "true"}}, "spec": 3}),
            json!({"metadata": {"labels": {"lameduck.io/inject": "true"}}, "spec": {"containers": []}}),
            json!({"metadata": {"labels": {"lameduck.io/inject": "true"}}, "spec": {"containers": [{"name": "a", "ports": [{"containerPort": "x"}]}]}}),
            json!({"metadata": {"labels": {"lameduck.io/inject": true}}, "spec": {}}),
        ] {
            let a = review(&body(pod.clone(), "Pod"), &settings()).unwrap();
            assert!(a["response"]["allowed"].is_boolean(), "{pod}");
        }
    }
}
