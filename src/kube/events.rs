//! `--events`: one Kubernetes Event on the pod per drain, so `kubectl describe pod` and the
//! cluster's event pipeline say how the drain went.
//!
//! The Event is reason `Drained` (traffic stopped: the quiet window passed) or
//! `DrainCutShort` (drain-max reached or a second signal), on the pod itself, with a message
//! giving the seconds, the requests served while draining and why the quiet window was what
//! it was. [`drain_event`] builds it and is pure; [`ApiClient`] posts it with the pod's
//! ServiceAccount token. It needs `create` on `events` in the pod's namespace:
//!
//! ```yaml
//! apiVersion: rbac.authorization.k8s.io/v1
//! kind: Role
//! metadata: {name: lameduck-events}
//! rules:
//! - apiGroups: [""]
//!   resources: [events]
//!   verbs: [create]
//! ```
//!
//! (and a RoleBinding to the pod's ServiceAccount). Without that access, [`Events::start`]
//! says so once and every later call does nothing: the drain never waits on the API.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value as Json};

use crate::lifecycle::drain::{DrainReason, State};

/// Where a pod's ServiceAccount credentials are mounted (`--service-account-dir`'s default).
pub use crate::cli::SERVICE_ACCOUNT_DIR;

/// One call to the API may take this long, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The reporting component on every Event.
const COMPONENT: &str = "lameduck";

/// Why events cannot be posted.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("not in a pod with API access: {0}")]
    NoConfig(String),
    #[error("cannot reach the API server: {0}")]
    Connect(String),
    #[error("the API server answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the API call timed out after {CALL_TIMEOUT:?}")]
    Timeout,
}

/// The pod the Events are about (from the downward API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

// === the Event: pure ===

/// The Event for a finished drain; None unless `state` is Drained.
pub fn drain_event(state: &State, pod: &PodRef, now: SystemTime) -> Option<Json> {
    let State::Drained {
        reason,
        took,
        requests_during_drain,
        window,
        started_at,
        ..
    } = state
    else {
        return None;
    };
    let (event_reason, kind, how) = match reason {
        DrainReason::Quiet => ("Drained", "Normal", "traffic stopped"),
        DrainReason::Max => ("DrainCutShort", "Warning", "cut short"),
    };
    let requests = match requests_during_drain {
        1 => "1 request".to_owned(),
        n => format!("{n} requests"),
    };
    let message = format!(
        "drain {how} after {:.1}s; {requests} served while draining; quiet window: {}",
        took.as_secs_f64(),
        window.why()
    );
    let mut involved = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": pod.namespace,
        "name": pod.name,
    });
    if let Some(uid) = &pod.uid {
        involved["uid"] = json!(uid);
    }
    let first = humantime::format_rfc3339_seconds(*started_at).to_string();
    let last = humantime::format_rfc3339_seconds(now).to_string();
    Some(json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": format!("{}.lameduck-", pod.name),
            "namespace": pod.namespace,
        },
        "involvedObject": involved,
        "reason": event_reason,
        "message": message,
        "type": kind,
        "count": 1,
        "firstTimestamp": first,
        "lastTimestamp": last,
        "source": { "component": COMPONENT },
        "reportingComponent": COMPONENT,
        "reportingInstance": pod.name,
    }))
}

// === the API ===

/// A minimal client for the two calls this module makes, authenticated with a bearer token
/// over TLS verified against the cluster's CA.
#[derive(Clone)]
pub struct ApiClient {
    host: String,
    port: u16,
    token: String,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `host` is a DNS name or an IP address (IPv6 without brackets); `ca_pem` the CA
    /// bundle that signed the API server's certificate.
    pub fn new(
        host: &str,
        port: u16,
        token: &str,
        ca_pem: &[u8],
    ) -> Result<ApiClient, EventsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| EventsError::NoConfig(format!("the CA bundle: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| EventsError::NoConfig(format!("the CA bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(EventsError::NoConfig(
                "the CA bundle has no certificate".into(),
            ));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(ApiClient {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            token: token.trim().to_owned(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The pod's own credentials: `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted
    /// ServiceAccount token and CA in `dir` (normally [`SERVICE_ACCOUNT_DIR`]).
    pub fn in_cluster(dir: &Path) -> Result<ApiClient, EventsError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| EventsError::NoConfig(format!("{name} is not set")))
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?
            .parse()
            .map_err(|e| EventsError::NoConfig(format!("KUBERNETES_SERVICE_PORT: {e}")))?;
        let read = |file: &str| {
            std::fs::read(dir.join(file))
                .map_err(|e| EventsError::NoConfig(format!("{}: {e}", dir.join(file).display())))
        };
        let token = String::from_utf8_lossy(&read("token")?).into_owned();
        ApiClient::new(&host, port, &token, &read("ca.crt")?)
    }

    /// Whether this identity may create Events in `namespace` (a SelfSubjectAccessReview,
    /// which every authenticated identity may make).
    pub async fn can_create_events(&self, namespace: &str) -> Result<bool, EventsError> {
        let review = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "namespace": namespace, "verb": "create", "group": "", "resource": "events",
            }},
        });
        let answer = self
            .post(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                &review,
            )
            .await?;
        Ok(answer["status"]["allowed"] == Json::Bool(true))
    }

    /// Creates `event` in its namespace; returns the stored Event.
    pub async fn create_event(&self, event: &Json) -> Result<Json, EventsError> {
        let namespace = event["metadata"]["namespace"].as_str().unwrap_or_default();
        self.post(&format!("/api/v1/namespaces/{namespace}/events"), event)
            .await
    }

    async fn post(&self, path: &str, body: &Json) -> Result<Json, EventsError> {
        tokio::time::timeout(CALL_TIMEOUT, self.post_now(path, body))
            .await
            .map_err(|_| EventsError::Timeout)?
    }

    async fn post_now(&self, path: &str, body: &Json) -> Result<Json, EventsError> {
        let connect = |e: &dyn std::fmt::Display| EventsError::Connect(e.to_string());
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| connect(&e))?;
        let name = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.host.clone()).map_err(|e| connect(&e))?,
        };
        let tls = self.tls.connect(name, tcp).await.map_err(|e| connect(&e))?;
        let (mut tx, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect(&e))?;
        tokio::spawn(conn);
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("lameduck/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).expect("a JSON value serializes"),
            )))
            .expect("a valid request");
        let response = tx.send_request(request).await.map_err(|e| connect(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect(&e))?
            .to_bytes();
        if !status.is_success() {
            return Err(EventsError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| EventsError::Connect(format!("bad JSON: {e}")))
    }
}

// === the handle the sidecar keeps ===

/// Posts the drain's Event, or does nothing when events are off or not allowed.
#[derive(Debug)]
pub struct Events {
    target: Option<(ApiClient, PodRef)>,
}

impl Events {
    /// Events that are never posted (`--events` off).
    pub fn off() -> Events {
        Events { target: None }
    }

    /// Checks once whether `client` may create Events for `pod`; if not (or the check
    /// fails), logs one warning saying why and turns itself off.
    pub async fn start(client: Result<ApiClient, EventsError>, pod: PodRef) -> Events {
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "--events: no API access; no drain Event will be posted");
                return Events::off();
            }
        };
        match client.can_create_events(&pod.namespace).await {
            Ok(true) => Events {
                target: Some((client, pod)),
            },
            Ok(false) => {
                tracing::warn!(
                    namespace = %pod.namespace,
                    "--events: this ServiceAccount may not create events in its namespace \
                     (see the Role in the README); no drain Event will be posted"
                );
                Events::off()
            }
            Err(e) => {
                tracing::warn!(error = %e, "--events: cannot check API access; no drain Event will be posted");
                Events::off()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Posts the Event for `state` (a Drained state; anything else is ignored). Bounded by
    /// the call timeout; a failure is logged, never returned: the drain does not wait on it.
    pub async fn drained(&self, state: &State) {
        let Some((client, pod)) = &self.target else {
            return;
        };
        let Some(event) = drain_event(state, pod, SystemTime::now()) else {
            return;
        };
        match client.create_event(&event).await {
            Ok(_) => {
                tracing::info!(reason = %event["reason"].as_str().unwrap_or_default(), "drain Event posted")
            }
            Err(e) => tracing::warn!(error = %e, "drain Event not posted"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::cadence::QuietWindow;
    use crate::lifecycle::drain::Trigger;
    use tokio::time::Instant;

    fn drained(reason: DrainReason, requests: u64) -> State {
        State::Drained {
            since: Instant::now(),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            trigger: Trigger::Admin,
            window: QuietWindow::fixed(Duration::from_secs(10)),
            reason,
            took: Duration::from_millis(12_340),
            requests_during_drain: requests,
            health_checks_during_drain: 3,
        }
    }

    fn pod() -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: "web-7d9f-abcde".into(),
            uid: Some("0b7a2c7e-0000-4000-8000-000000000001".into()),
        }
    }

    #[test]
    fn quiet_drain_is_a_normal_drained_event_on_the_pod() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_013);
        let e = drain_event(&drained(DrainReason::Quiet, 42), &pod(), now).unwrap();
        assert_eq!(e["reason"], "Drained");
        assert_eq!(e["type"], "Normal");
        assert_eq!(e["involvedObject"]["kind"], "Pod");
        assert_eq!(e["involvedObject"]["name"], "web-7d9f-abcde");
        assert_eq!(e["involvedObject"]["namespace"], "shop");
        assert_eq!(e["metadata"]["namespace"], "shop");
        let why = QuietWindow::fixed(Duration::from_secs(10)).why();
        assert_eq!(
            e["message"],
            format!(
                "drain traffic stopped after 12.3s; 42 requests served while draining; \
                 quiet window: {why}"
            )
        );
        assert_eq!(e["firstTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(e["lastTimestamp"], "2023-11-14T22:13:33Z");
    }

    #[test]
    fn cut_short_is_a_warning() {
        let e = drain_event(&drained(DrainReason::Max, 1), &pod(), SystemTime::now()).unwrap();
        assert_eq!(e["reason"], "DrainCutShort");
        assert_eq!(e["type"], "Warning");
        assert!(e["message"].as_str().unwrap().contains("1 request served"));
    }

    #[test]
    fn only_a_drained_state_makes_an_event() {
        assert!(drain_event(&State::Serving, &pod(), SystemTime::now()).is_none());
    }

    #[test]
    fn no_ca_no_client() {
        assert!(ApiClient::new("10.0.0.1", 443, "t", b"").is_err());
    }
}
