//! Injection: the pure transformation that puts lameduck in front of an app in a pod, and
//! the manifest rewriting that applies it to every pod template in a YAML stream.
//!
//! Both front ends use this module and do no injection of their own: `lameduck inject`
//! (static, for GitOps) calls [`inject_manifests`]; `lameduck webhook` calls
//! [`template_patch`]. Nothing here does I/O.
//!
//! What [`inject`] does to a pod that opted in (label `lameduck.io/inject: "true"`):
//!
//! | what | how |
//! |---|---|
//! | app container and port | annotation `lameduck.io/port` (a port name or number) and/or `lameduck.io/container`; else the only container with a TCP port (or the one `kubectl.kubernetes.io/default-container` names, or the only one with a port named `http`); in it the port named `http`, else its first TCP port. Several candidates and no annotation: refused |
//! | proxy | container `lameduck`: a native sidecar (`initContainers`, `restartPolicy: Always`) unless `--native-sidecar=false` or annotation `lameduck.io/native-sidecar: "false"` |
//! | traffic | the app port's *name* moves to the proxy's traffic port and the app port is renamed, so a Service whose `targetPort` is that name now reaches the proxy |
//! | drain | the app container gets `preStop: httpGet /drain` on the proxy's admin port, with the header `X-Lameduck-Token`; the sidecar gets the same token in `LAMEDUCK_DRAIN_TOKEN` |
//! | grace | `terminationGracePeriodSeconds` raised to drain-max + 30 s, never lowered (drain-max is 300 s by default with `lameduck.io/mode: tcp`) |
//! | mode | annotation `lameduck.io/mode: tcp` runs the proxy as the layer-4 forwarder (NLB); its probes stay on the admin port |
//! | marker | annotation `lameduck.io/status: injected`; a pod carrying it is left alone |
//!
//! **Never half-wired.** When the drain cannot be wired (an ambiguous app container, an
//! existing preStop hook, an app port a Service can only reach by number, a regular sidecar
//! in a pod that must complete), injection is refused with a message naming the fix. With
//! `lameduck.io/allow-degraded: "true"` the pod is injected anyway where that still makes
//! sense, and carries `lameduck.io/degraded` saying what is not wired.
//!
//! The sidecar's arguments are checked by the proxy's own parser and validation
//! ([`ProxyArgs::parse_and_validate`]): what injection produces, `lameduck proxy` accepts.
//!
//! The webhook and the CLI both turn the typed result into a JSON Patch against the object
//! they were given (diffing the typed input against the typed output), so fields this
//! crate's Kubernetes types do not know are never dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use json_patch::{Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, HTTPHeader, Lifecycle,
    LifecycleHandler, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value as Json;
use yaml_serde::Value as Yaml;

use crate::cli::{parse_duration, parse_path, parse_quiet, Mode, ProxyArgs, SidecarArgs};
use crate::upstream::Protocol;

// === names ===

/// The opt-in label. Only the exact value `"true"` opts in.
pub const INJECT_LABEL: &str = "lameduck.io/inject";
/// Set on every injected pod; a pod that carries it is never injected again.
pub const STATUS_ANNOTATION: &str = "lameduck.io/status";
pub const STATUS_INJECTED: &str = "injected";

pub const ANN_PORT: &str = "lameduck.io/port";
pub const ANN_CONTAINER: &str = "lameduck.io/container";
pub const ANN_NATIVE_SIDECAR: &str = "lameduck.io/native-sidecar";
pub const ANN_DRAIN_MIN: &str = "lameduck.io/drain-min";
pub const ANN_QUIET: &str = "lameduck.io/quiet";
pub const ANN_QUIET_FALLBACK: &str = "lameduck.io/quiet-fallback";
pub const ANN_DRAIN_MAX: &str = "lameduck.io/drain-max";
pub const ANN_HEALTH_PATH: &str = "lameduck.io/health-path";
pub const ANN_UPSTREAM_HEALTH: &str = "lameduck.io/upstream-health";
pub const ANN_UPSTREAM_PROTOCOL: &str = "lameduck.io/upstream-protocol";
pub const ANN_IDLE_TIMEOUT: &str = "lameduck.io/idle-timeout";
pub const ANN_REPLACE_PRESTOP: &str = "lameduck.io/replace-prestop";
/// `"true"`: the sidecar posts one Event per drain on its pod (`--events`, the pod's name,
/// namespace and uid from the downward API). Needs the Role in the README.
pub const ANN_EVENTS: &str = "lameduck.io/events";
pub const ANN_PROXY_PORT: &str = "lameduck.io/proxy-port";
pub const ANN_ADMIN_PORT: &str = "lameduck.io/admin-port";
pub const ANN_BIND_ADDRESS: &str = "lameduck.io/bind-address";
pub const ANN_CPU_REQUEST: &str = "lameduck.io/cpu-request";
pub const ANN_CPU_LIMIT: &str = "lameduck.io/cpu-limit";
pub const ANN_MEMORY_REQUEST: &str = "lameduck.io/memory-request";
pub const ANN_MEMORY_LIMIT: &str = "lameduck.io/memory-limit";
pub const ANN_DRAIN_TOKEN: &str = "lameduck.io/drain-token";
pub const ANN_MODE: &str = "lameduck.io/mode";
pub const ANN_TLS: &str = "lameduck.io/tls";
pub const ANN_ALLOW_DEGRADED: &str = "lameduck.io/allow-degraded";
/// Set by lameduck on a pod injected with `lameduck.io/allow-degraded`: what is not wired.
pub const ANN_DEGRADED: &str = "lameduck.io/degraded";

/// Every `lameduck.io/*` annotation a pod may carry; any other is refused (a typo would
/// otherwise be silently ignored).
pub const KNOWN_ANNOTATIONS: &[&str] = &[
    ANN_PORT,
    ANN_CONTAINER,
    ANN_NATIVE_SIDECAR,
    ANN_DRAIN_MIN,
    ANN_QUIET,
    ANN_QUIET_FALLBACK,
    ANN_DRAIN_MAX,
    ANN_HEALTH_PATH,
    ANN_UPSTREAM_HEALTH,
    ANN_UPSTREAM_PROTOCOL,
    ANN_IDLE_TIMEOUT,
    ANN_REPLACE_PRESTOP,
    ANN_EVENTS,
    ANN_PROXY_PORT,
    ANN_ADMIN_PORT,
    ANN_BIND_ADDRESS,
    ANN_CPU_REQUEST,
    ANN_CPU_LIMIT,
    ANN_MEMORY_REQUEST,
    ANN_MEMORY_LIMIT,
    ANN_DRAIN_TOKEN,
    ANN_MODE,
    ANN_TLS,
    ANN_ALLOW_DEGRADED,
    ANN_DEGRADED,
    STATUS_ANNOTATION,
];

/// kubectl's own annotation for a pod's main container; a hint for the app container.
pub const KUBECTL_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The injected container's name.
pub const CONTAINER_NAME: &str = "lameduck";

/// The environment variable the sidecar reads its `--drain-token` from (the proxy's own
/// `env =` on that flag), and the header the preStop hook sends it in.
pub const TOKEN_ENV: &str = "LAMEDUCK_DRAIN_TOKEN";
pub const TOKEN_HEADER: &str = "X-Lameduck-Token";

pub use crate::cli::DEFAULT_SIDECAR_IMAGE;

/// `--quiet` passed to an injected proxy when the pod has no `lameduck.io/quiet`
/// annotation: learn the window from the load balancer's health checks (issue 6). Passed
/// explicitly so the injected pod does not depend on the image's own default.
pub const DEFAULT_QUIET: Option<&str> = Some("auto");

/// The address the sidecar's traffic and admin ports bind to by default: `::`, a
/// dual-stack socket on Linux (IPv4 arrives as v4-mapped), so the kubelet's probes and
/// preStop hook reach it on the pod IP in IPv4, IPv6 and dual-stack clusters alike.
/// `lameduck.io/bind-address: 0.0.0.0` for nodes whose kernel has IPv6 disabled.
pub const DEFAULT_BIND_ADDRESS: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// Sidecar resources. A Burstable pod's sidecar requests these and has no limits; in a
/// Guaranteed pod (every container requests == limits) the sidecar gets requests == limits
/// ([`GUARANTEED_CPU`], [`GUARANTEED_MEMORY`] unless annotated) so the pod stays Guaranteed.
pub const DEFAULT_CPU_REQUEST: &str = "10m";
pub const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
pub const GUARANTEED_CPU: &str = "100m";
pub const GUARANTEED_MEMORY: &str = "64Mi";

/// terminationGracePeriodSeconds ≥ drain-max + this: time for the app's own shutdown
/// after `/drain` answers.
pub const GRACE_MARGIN_SECS: i64 = 30;
const K8S_DEFAULT_GRACE_SECS: i64 = 30;

/// Preferred traffic and admin ports; the next free numbers are used when the pod already
/// declares them. The admin default is the proxy's own (`--admin`), so `lameduck drain`
/// works inside the pod without flags.
pub const DEFAULT_PROXY_PORT: u16 = 9900;
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

/// How far past the preferred port to look for a free one (bounded, and far more than any
/// pod declares).
const PORT_SEARCH: u16 = 1000;

const DURATION_FORM: &str = "a duration such as 500ms, 10s or 2m, at most 24h";
const QUIET_FORM: &str = "auto, or a duration such as 500ms, 10s or 2m, at most 24h";
const BOOL_FORM: &str = "\"true\" or \"false\"";
const PATH_FORM: &str = "an absolute path such as /healthz";
const PROTOCOL_FORM: &str = "http1 or h2c";
const MODE_FORM: &str = "http (ALB) or tcp (NLB)";
const TLS_FORM: &str = "self-signed, secret:<name of a kubernetes.io/tls Secret>, or off";

/// Where a `lameduck.io/tls: secret:<name>` Secret is mounted in the sidecar.
pub const TLS_MOUNT: &str = "/etc/lameduck/tls";
const ADDRESS_FORM: &str = "an IP address such as :: (dual-stack) or 0.0.0.0 (IPv4 only)";
const TOKEN_FORM: &str = "16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -";
const PORT_NUMBER_FORM: &str =
    "a port number 1-65535 that no container in the pod declares, different from the other lameduck port";

// === settings and results ===

/// What the operator chose, for every pod (per-pod annotations override `native_sidecar`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub sidecar_image: String,
    pub native_sidecar: bool,
    /// The drain token for a pod without `lameduck.io/drain-token`. `None`: derived from
    /// the pod template (deterministic, for `lameduck inject`); the webhook passes a fresh
    /// random one per pod.
    pub drain_token: Option<String>,
    /// Values for annotations a pod does not set (`--sidecar-default`).
    pub defaults: BTreeMap<String, String>,
}

/// Annotations that are lameduck's own record, never a setting with a default.
const NOT_DEFAULTABLE: &[&str] = &[STATUS_ANNOTATION, ANN_DEGRADED, ANN_DRAIN_TOKEN];

impl Settings {
    /// Every default names a settable annotation (checked at start: exit 2 otherwise).
    pub fn check(&self) -> Result<(), String> {
        for key in self.defaults.keys() {
            if !KNOWN_ANNOTATIONS.contains(&key.as_str()) || NOT_DEFAULTABLE.contains(&key.as_str())
            {
                return Err(format!(
                    "--sidecar-default {key}: not a per-pod setting; known: {}",
                    KNOWN_ANNOTATIONS
                        .iter()
                        .filter(|k| !NOT_DEFAULTABLE.contains(k))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.to_owned(),
            native_sidecar: true,
            drain_token: None,
            defaults: BTreeMap::new(),
        }
    }
}

impl From<&SidecarArgs> for Settings {
    fn from(args: &SidecarArgs) -> Self {
        Settings {
            sidecar_image: args.sidecar_image.clone(),
            native_sidecar: args.native_sidecar,
            drain_token: None,
            defaults: args.sidecar_defaults.iter().cloned().collect(),
        }
    }
}

/// An injected pod (or the untouched input, when it was injected already).
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    /// Things the user should know: the pod works, but not the way they may think.
    pub warnings: Vec<String>,
}

/// Why a pod cannot be injected. Annotation errors name the annotation, the value and the
/// accepted form; refusals name the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}: invalid value {value:?}: {problem}expected {expected}")]
    Annotation {
        annotation: &'static str,
        value: String,
        /// What is wrong beyond the form, ending in "; " (or empty).
        problem: String,
        expected: String,
    },
    #[error("unknown annotation {0}{1}: the known ones are {known}", known = KNOWN_ANNOTATIONS.join(", "))]
    UnknownAnnotation(String, String),
    #[error(
        "no container declares a TCP port: declare the app's containerPort (named, e.g. http, \
         so a Service can target it by name) or set annotation {ANN_PORT}"
    )]
    NoAppPort,
    /// The drain cannot be wired the way the pod is written: the message says how to fix it.
    #[error("not injected: {0}")]
    Refused(String),
    /// The sidecar's arguments, as the annotations make them, are refused by `lameduck proxy`.
    #[error("lameduck proxy would refuse these settings: {0}")]
    Flags(String),
    #[error("the pod spec cannot be read: {0}")]
    InvalidPod(String),
}

impl InjectError {
    fn annotation(annotation: &'static str, value: &str, expected: impl Into<String>) -> Self {
        InjectError::Annotation {
            annotation,
            value: value.to_owned(),
            problem: String::new(),
            expected: expected.into(),
        }
    }

    fn annotation_because(
        annotation: &'static str,
        value: &str,
        problem: impl fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        InjectError::Annotation {
            annotation,
            value: value.to_owned(),
            problem: format!("{problem}; "),
            expected: expected.into(),
        }
    }
}

// === the pure function ===

/// Whether a pod template opted in. With `all`, every template does except one labelled
/// `lameduck.io/inject: "false"`.
pub fn wants_injection(metadata: &ObjectMeta, all: bool) -> bool {
    match metadata.labels.as_ref().and_then(|l| l.get(INJECT_LABEL)) {
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        _ => all,
    }
}

/// What the pod gives up under `lameduck.io/allow-degraded`, or the refusal without it.
struct Degraded {
    allowed: bool,
    what: Vec<String>,
}

impl Degraded {
    /// `refusal` ends with the fix; `what` is the short form for the annotation.
    fn note(&mut self, refusal: String, what: &str) -> Result<(), InjectError> {
        if !self.allowed {
            return Err(InjectError::Refused(format!(
                "{refusal} (or set annotation {ANN_ALLOW_DEGRADED}: \"true\" to inject anyway, \
                 marked {ANN_DEGRADED})"
            )));
        }
        self.what.push(what.to_owned());
        Ok(())
    }
}

/// Puts lameduck in front of the app in one pod. Pure: no I/O, same input, same output.
/// A pod already marked `lameduck.io/status: injected` comes back unchanged.
pub fn inject(
    spec: &PodSpec,
    metadata: &ObjectMeta,
    settings: &Settings,
) -> Result<Injection, InjectError> {
    let mut out = Injection {
        metadata: metadata.clone(),
        spec: spec.clone(),
        warnings: Vec::new(),
    };
    if annotation(metadata, STATUS_ANNOTATION) == Some(STATUS_INJECTED) {
        return Ok(out);
    }
    if all_containers(spec).any(|c| c.name == CONTAINER_NAME) {
        out.warnings.push(format!(
            "the pod already has a container named {CONTAINER_NAME} and no {STATUS_ANNOTATION} \
             annotation: left as it is (wired by hand?)"
        ));
        return Ok(out);
    }
    if spec.containers.is_empty() {
        return Err(InjectError::InvalidPod("it has no containers".into()));
    }

    let opts = Options::from_annotations(metadata, settings)?;
    let mut degraded = Degraded {
        allowed: opts.allow_degraded,
        what: Vec::new(),
    };
    let app = find_app_port(
        spec,
        opts.container.as_deref(),
        opts.port.as_deref(),
        annotation(metadata, KUBECTL_DEFAULT_CONTAINER),
    )?;

    // A regular sidecar never exits on its own: a pod that must complete never would.
    if !opts.native_sidecar
        && matches!(
            out.spec.restart_policy.as_deref(),
            Some("Never" | "OnFailure")
        )
    {
        return Err(InjectError::Refused(format!(
            "the pod's restartPolicy is {}: lameduck as a regular container never exits on its \
             own, so the pod (and its Job) would never complete; use the native sidecar \
             (annotation {ANN_NATIVE_SIDECAR}: \"true\", Kubernetes >= 1.29)",
            out.spec.restart_policy.as_deref().unwrap_or_default()
        )));
    }

    // Every port number and name the pod declares, so the proxy's own clash with none.
    let mut taken_ports = BTreeSet::new();
    let mut taken_names = BTreeSet::new();
    for c in all_containers(spec) {
        for p in c.ports.iter().flatten() {
            taken_ports.insert(p.container_port);
            if let Some(n) = &p.name {
                taken_names.insert(n.clone());
            }
        }
    }
    let proxy_port = pick_port(
        ANN_PROXY_PORT,
        opts.proxy_port.as_deref(),
        DEFAULT_PROXY_PORT,
        &taken_ports,
        None,
    )?;
    let admin_port = pick_port(
        ANN_ADMIN_PORT,
        opts.admin_port.as_deref(),
        DEFAULT_ADMIN_PORT,
        &taken_ports,
        Some(proxy_port),
    )?;

    let token = match (&opts.drain_token, &settings.drain_token) {
        (Some(t), _) | (None, Some(t)) => t.clone(),
        (None, None) => derived_token(metadata, spec),
    };

    // Move the app port's name to the proxy: a Service targeting that name, and the load
    // balancer's ip targets behind it, now reach the proxy.
    let guaranteed = is_guaranteed(spec);
    let app_container = &mut out.spec.containers[app.container];
    let app_container_name = app_container.name.clone();
    let app_port = &mut app_container.ports.as_mut().expect("the app port exists")[app.port];
    let app_port_number = app_port.container_port;
    let original_name = app_port.name.clone();
    let traffic_name = match app_port.name.clone() {
        Some(name) => {
            taken_names.remove(&name);
            let renamed = pick_name(app_port_names(&name), &taken_names);
            taken_names.insert(renamed.clone());
            app_port.name = Some(renamed.clone());
            // The app's own probes and hooks resolve named ports within the container:
            // they follow the rename, or they would point at a port that is gone.
            rename_port_refs(app_container, &name, &renamed);
            name
        }
        None => {
            degraded.note(
                format!(
                    "container {app_container_name} port {app_port_number} has no name, so a \
                     Service can only target it by number, which reaches the app directly, \
                     bypassing lameduck: name the port (e.g. http) and use that name as the \
                     Service's targetPort"
                ),
                &format!(
                    "port {app_port_number} has no name: a Service reaches lameduck only at \
                     targetPort {proxy_port}"
                ),
            )?;
            pick_name(
                numbered(CONTAINER_NAME.to_owned(), "lameduck"),
                &taken_names,
            )
        }
    };
    taken_names.insert(traffic_name.clone());
    let admin_name = pick_name(
        std::iter::once("lameduck-admin".to_owned()).chain(numbered("ld-admin".into(), "ld-admin")),
        &taken_names,
    );
    let protocol = opts
        .upstream_protocol
        .unwrap_or_else(|| match original_name.as_deref() {
            // A byte stream in tcp mode: what it carries is the app's business.
            Some(n) if is_h2c_port_name(n) && opts.mode == Mode::Http => Protocol::H2c,
            _ => Protocol::Http1,
        });

    // The app is signalled only once /drain answers. The kubelet resolves a named port
    // against the hook's own container, so the admin port goes in by number.
    let pre_stop = LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some("/drain".into()),
            port: IntOrString::Int(admin_port.into()),
            http_headers: Some(vec![HTTPHeader {
                name: TOKEN_HEADER.into(),
                value: token.clone(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let lifecycle = app_container
        .lifecycle
        .get_or_insert_with(Lifecycle::default);
    match (&lifecycle.pre_stop, opts.replace_prestop) {
        (None, _) | (Some(_), true) => lifecycle.pre_stop = Some(pre_stop),
        (Some(_), false) => degraded.note(
            format!(
                "container {app_container_name} already has a preStop hook, so lameduck's \
                 /drain hook cannot be wired (the app would be signalled without waiting for \
                 traffic to stop): remove the hook (lameduck's /drain already waits until the \
                 load balancer has stopped sending, so a sleep is not needed), or set \
                 annotation {ANN_REPLACE_PRESTOP}: \"true\" to replace it"
            ),
            &format!(
                "container {app_container_name} keeps its own preStop hook: /drain is not \
                 called, the app is signalled without waiting for traffic to stop"
            ),
        )?,
    }

    let bind = opts.bind_address.unwrap_or(DEFAULT_BIND_ADDRESS);
    let mut args = vec![
        "proxy".to_owned(),
        format!("--listen={}", std::net::SocketAddr::new(bind, proxy_port)),
        format!("--upstream=127.0.0.1:{app_port_number}"),
        format!("--admin={}", std::net::SocketAddr::new(bind, admin_port)),
    ];
    if protocol == Protocol::H2c {
        args.push("--upstream-protocol=h2c".into());
    }
    for (flag, _, value) in &opts.flags {
        args.push(format!("{flag}={value}"));
    }
    if opts.events {
        // The kubelet expands $(VAR) in args from the container's env (set below from the
        // downward API), so the proxy's validation sees the flags --events needs.
        args.extend(
            [
                "--events",
                "--pod-name=$(LAMEDUCK_POD_NAME)",
                "--pod-namespace=$(LAMEDUCK_POD_NAMESPACE)",
                "--pod-uid=$(LAMEDUCK_POD_UID)",
            ]
            .map(String::from),
        );
    }
    // The proxy's own parser and validation decide whether these arguments make sense.
    let proxy = ProxyArgs::parse_and_validate(&args[1..]).map_err(|e| opts.flag_error(&e))?;

    let resources = sidecar_resources(&opts, guaranteed, &mut out.warnings)?;
    let mut sidecar = sidecar_container(
        settings,
        args,
        (proxy_port, traffic_name),
        (admin_port, admin_name),
        resources,
    );
    let mut env = vec![EnvVar {
        name: TOKEN_ENV.into(),
        value: Some(token),
        ..Default::default()
    }];
    if opts.events {
        for (name, path) in [
            ("LAMEDUCK_POD_NAME", "metadata.name"),
            ("LAMEDUCK_POD_NAMESPACE", "metadata.namespace"),
            ("LAMEDUCK_POD_UID", "metadata.uid"),
        ] {
            env.push(EnvVar {
                name: name.into(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: path.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    sidecar.env = Some(env);
    if let Some(secret) = &opts.tls_secret {
        // The kubelet updates a mounted Secret in place when cert-manager renews it; the
        // proxy re-reads the files (--tls-reload-interval).
        let taken: BTreeSet<String> = out
            .spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        let volume = pick_name(numbered("lameduck-tls".into(), "lameduck-tls"), &taken);
        sidecar.volume_mounts = Some(vec![VolumeMount {
            name: volume.clone(),
            mount_path: TLS_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        }]);
        out.spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: volume,
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if opts.native_sidecar {
        sidecar.restart_policy = Some("Always".into());
        out.spec
            .init_containers
            .get_or_insert_with(Vec::new)
            .push(sidecar);
    } else {
        out.spec.containers.push(sidecar);
    }

    let needed = i64::try_from(proxy.drain_max.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(proxy.drain_max.subsec_nanos() > 0))
        .saturating_add(GRACE_MARGIN_SECS);
    match out.spec.termination_grace_period_seconds {
        Some(current) if current >= needed => {}
        // 30 is Kubernetes' own default, which the API server fills in before admission:
        // raising it is the expected case, not news.
        Some(current) if current != K8S_DEFAULT_GRACE_SECS => {
            out.warnings.push(format!(
                "terminationGracePeriodSeconds raised from {current} to {needed} (drain-max \
                 {} + {GRACE_MARGIN_SECS}s for the app's own shutdown)",
                humantime::format_duration(proxy.drain_max)
            ));
            out.spec.termination_grace_period_seconds = Some(needed);
        }
        Some(_) | None => out.spec.termination_grace_period_seconds = Some(needed),
    }
    if out.spec.host_network == Some(true) {
        out.warnings.push(format!(
            "the pod uses hostNetwork: lameduck's ports {proxy_port} and {admin_port} are \
             bound on the node and must be free there"
        ));
    }

    let annotations = out
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(STATUS_ANNOTATION.into(), STATUS_INJECTED.into());
    if !degraded.what.is_empty() {
        out.warnings.extend(
            degraded
                .what
                .iter()
                .map(|w| format!("degraded ({ANN_ALLOW_DEGRADED}): {w}")),
        );
        annotations.insert(ANN_DEGRADED.into(), degraded.what.join("; "));
    }
    Ok(out)
}

/// A Kubernetes object name (RFC 1123 subdomain): what a Secret's name must be.
fn is_dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A port name that says the app speaks HTTP/2 without TLS (gRPC): `grpc`, `h2c`, or
/// prefixed with them (`grpc-web` is HTTP/1, so not that one).
fn is_h2c_port_name(name: &str) -> bool {
    name == "grpc"
        || name == "h2c"
        || (name.starts_with("grpc-") && name != "grpc-web")
        || name.starts_with("h2c-")
}

/// The drain token of a pod without one: a hash of the pod template as given, so
/// `lameduck inject` writes the same token for the same input (golden files, GitOps diffs
/// that do not churn) and a different one for every other template. It keeps stray
/// requests and scanners on the pod network from draining the pod; anyone who can read
/// the pod spec can read it, as they can read the token itself.
pub fn derived_token(metadata: &ObjectMeta, spec: &PodSpec) -> String {
    let template = typed_json(metadata.clone(), spec.clone());
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"lameduck drain token v1\n");
    ctx.update(&serde_json::to_vec(&template).expect("Kubernetes types serialize to JSON"));
    hex(&ctx.finish().as_ref()[..16])
}

/// A random drain token (the webhook's, one per pod).
pub fn random_token() -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random number generator failed".to_owned())?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_token(s: &str) -> bool {
    crate::cli::check_drain_token(s).is_ok()
}

/// The settings a pod's annotations give. Each value's form is checked here, with the
/// proxy's own parsers; how they fit together is checked by the proxy's validation.
#[derive(Debug)]
struct Options {
    port: Option<String>,
    container: Option<String>,
    native_sidecar: bool,
    replace_prestop: bool,
    events: bool,
    allow_degraded: bool,
    /// `(flag, annotation, value)` for every proxy flag injection sets beyond the ports,
    /// in flag order; no annotation: lameduck's own default ([`DEFAULT_QUIET`]).
    flags: Vec<(&'static str, Option<&'static str>, String)>,
    upstream_protocol: Option<Protocol>,
    mode: Mode,
    bind_address: Option<IpAddr>,
    proxy_port: Option<String>,
    admin_port: Option<String>,
    cpu_request: Option<(String, f64)>,
    cpu_limit: Option<(String, f64)>,
    memory_request: Option<(String, f64)>,
    memory_limit: Option<(String, f64)>,
    drain_token: Option<String>,
    /// `lameduck.io/tls: secret:<name>`: the Secret to mount (`--tls-cert/--tls-key`).
    tls_secret: Option<String>,
}

impl Options {
    fn from_annotations(meta: &ObjectMeta, settings: &Settings) -> Result<Options, InjectError> {
        for key in meta.annotations.iter().flat_map(|a| a.keys()) {
            if key.starts_with("lameduck.io/") && !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                let hint = if key == INJECT_LABEL {
                    " (lameduck.io/inject is a label on the pod template, not an annotation)"
                        .to_owned()
                } else {
                    let normalized = key.replace('_', "-").to_ascii_lowercase();
                    KNOWN_ANNOTATIONS
                        .iter()
                        .find(|k| **k == normalized)
                        .map(|k| format!(" (did you mean {k}?)"))
                        .unwrap_or_default()
                };
                return Err(InjectError::UnknownAnnotation(key.clone(), hint));
            }
        }
        // The pod's own annotation, else the cluster-wide default (`--sidecar-default`).
        let get = |name: &'static str| {
            annotation(meta, name)
                .or_else(|| settings.defaults.get(name).map(String::as_str))
                .map(str::trim)
        };
        let boolean = |name: &'static str, default: bool| match get(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(InjectError::annotation(name, v, BOOL_FORM)),
        };
        let quantity = |name: &'static str| match get(name) {
            None => Ok(None),
            Some(v) => match parse_quantity(v) {
                Some(q) if q > 0.0 => Ok(Some((v.to_owned(), q))),
                _ => Err(InjectError::annotation(
                    name,
                    v,
                    "a Kubernetes quantity above 0 such as 100m, 0.5 (CPU) or 64Mi (memory)",
                )),
            },
        };

        let mut flags = Vec::new();
        type Check = fn(&str) -> bool;
        let duration: Check = |v| parse_duration(v).is_ok();
        let quiet: Check = |v| parse_quiet(v).is_ok();
        let path: Check = |v| parse_path(v).is_ok();
        let table: [(&str, &'static str, Check, &str); 7] = [
            ("--drain-min", ANN_DRAIN_MIN, duration, DURATION_FORM),
            ("--quiet", ANN_QUIET, quiet, QUIET_FORM),
            (
                "--quiet-fallback",
                ANN_QUIET_FALLBACK,
                duration,
                DURATION_FORM,
            ),
            ("--drain-max", ANN_DRAIN_MAX, duration, DURATION_FORM),
            ("--health-path", ANN_HEALTH_PATH, path, PATH_FORM),
            ("--upstream-health", ANN_UPSTREAM_HEALTH, path, PATH_FORM),
            ("--idle-timeout", ANN_IDLE_TIMEOUT, duration, DURATION_FORM),
        ];
        for (flag, name, valid, form) in table {
            match (get(name), flag) {
                (Some(v), _) if !valid(v) => return Err(InjectError::annotation(name, v, form)),
                (Some(v), _) => flags.push((flag, Some(name), v.to_owned())),
                (None, "--quiet") => {
                    if let Some(q) = DEFAULT_QUIET {
                        flags.push((flag, None, q.to_owned()));
                    }
                }
                (None, _) => {}
            }
        }
        let upstream_protocol =
            match get(ANN_UPSTREAM_PROTOCOL) {
                None => None,
                Some(v) => Some(<Protocol as clap::ValueEnum>::from_str(v, false).map_err(
                    |_| InjectError::annotation(ANN_UPSTREAM_PROTOCOL, v, PROTOCOL_FORM),
                )?),
            };
        let mode = match get(ANN_MODE) {
            None => Mode::Http,
            Some(v) => <Mode as clap::ValueEnum>::from_str(v, false)
                .map_err(|_| InjectError::annotation(ANN_MODE, v, MODE_FORM))?,
        };
        let tls_secret = match get(ANN_TLS) {
            None | Some("off") => None,
            Some("self-signed") => {
                flags.push(("--tls", Some(ANN_TLS), "self-signed".to_owned()));
                None
            }
            Some(v) => match v.strip_prefix("secret:").map(str::trim) {
                Some(name) if is_dns_subdomain(name) => {
                    for (flag, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
                        flags.push((flag, Some(ANN_TLS), format!("{TLS_MOUNT}/{file}")));
                    }
                    Some(name.to_owned())
                }
                _ => return Err(InjectError::annotation(ANN_TLS, v, TLS_FORM)),
            },
        };
        if mode == Mode::Tcp {
            // Last: it is the last of the proxy's flags.
            flags.push(("--mode", Some(ANN_MODE), "tcp".to_owned()));
        }
        let bind_address = match get(ANN_BIND_ADDRESS) {
            None => None,
            Some(v) => Some(
                v.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map_err(|_| InjectError::annotation(ANN_BIND_ADDRESS, v, ADDRESS_FORM))?,
            ),
        };
        let drain_token = match get(ANN_DRAIN_TOKEN) {
            Some(v) if is_token(v) => Some(v.to_owned()),
            Some(v) => {
                return Err(InjectError::annotation(
                    ANN_DRAIN_TOKEN,
                    &"*".repeat(v.len().min(8)),
                    TOKEN_FORM,
                ))
            }
            None => None,
        };
        let container = get(ANN_CONTAINER).map(str::to_owned);

        Ok(Options {
            port: get(ANN_PORT).map(str::to_owned),
            container,
            native_sidecar: boolean(ANN_NATIVE_SIDECAR, settings.native_sidecar)?,
            replace_prestop: boolean(ANN_REPLACE_PRESTOP, false)?,
            events: boolean(ANN_EVENTS, false)?,
            allow_degraded: boolean(ANN_ALLOW_DEGRADED, false)?,
            flags,
            upstream_protocol,
            mode,
            bind_address,
            proxy_port: get(ANN_PROXY_PORT).map(str::to_owned),
            admin_port: get(ANN_ADMIN_PORT).map(str::to_owned),
            cpu_request: quantity(ANN_CPU_REQUEST)?,
            cpu_limit: quantity(ANN_CPU_LIMIT)?,
            memory_request: quantity(ANN_MEMORY_REQUEST)?,
            memory_limit: quantity(ANN_MEMORY_LIMIT)?,
            drain_token,
            tls_secret,
        })
    }

    /// The proxy's complaint about its arguments, with the annotations behind the flags
    /// it names (a flag no annotation set is the proxy's default).
    fn flag_error(&self, message: &str) -> InjectError {
        let mut notes = Vec::new();
        let mut seen = BTreeSet::new();
        for word in message.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            let flag = word.trim_end_matches([':', ',', ';', '.']);
            if !flag.starts_with("--") || !seen.insert(flag.to_owned()) {
                continue;
            }
            let note = match self.flags.iter().find(|(f, _, _)| *f == flag) {
                Some((_, Some(annotation), _)) => format!("{flag} from {annotation}"),
                Some((_, None, _)) => format!("{flag} is lameduck's default"),
                None => format!("{flag} is the proxy's default"),
            };
            notes.push(note);
        }
        if notes.is_empty() {
            InjectError::Flags(message.to_owned())
        } else {
            InjectError::Flags(format!("{message} ({})", notes.join(", ")))
        }
    }
}

/// Where the app listens: indexes into `spec.containers` and that container's ports.
struct AppPort {
    container: usize,
    port: usize,
}

fn is_tcp(p: &ContainerPort) -> bool {
    p.protocol.as_deref().is_none_or(|p| p == "TCP")
}

fn find_app_port(
    spec: &PodSpec,
    container: Option<&str>,
    wanted: Option<&str>,
    default_container: Option<&str>,
) -> Result<AppPort, InjectError> {
    let only = match container {
        Some(name) => Some(
            spec.containers
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| {
                    InjectError::annotation_because(
                        ANN_CONTAINER,
                        name,
                        "the pod has no such container",
                        format!(
                            "the name of one of the pod's containers ({})",
                            spec.containers
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let ports = || {
        spec.containers
            .iter()
            .enumerate()
            .filter(move |(ci, _)| only.is_none_or(|o| o == *ci))
            .flat_map(|(ci, c)| {
                c.ports
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(move |(pi, p)| (ci, pi, p))
            })
    };
    let found = match wanted {
        Some(v) => {
            let by_number = v.parse::<u16>().ok().filter(|n| *n > 0);
            let hit = if v.bytes().all(|b| b.is_ascii_digit()) {
                let Some(n) = by_number else {
                    return Err(InjectError::annotation(
                        ANN_PORT,
                        v,
                        "the name or number of a port declared by one of the pod's containers",
                    ));
                };
                ports().find(|(_, _, p)| p.container_port == i32::from(n))
            } else {
                ports().find(|(_, _, p)| p.name.as_deref() == Some(v))
            };
            let Some((ci, pi, p)) = hit else {
                return Err(InjectError::annotation_because(
                    ANN_PORT,
                    v,
                    match container {
                        Some(c) => format!("container {c} declares no such port"),
                        None => "no container declares that port".to_owned(),
                    },
                    "the name or number of a port declared by one of the pod's containers",
                ));
            };
            if !is_tcp(p) {
                return Err(InjectError::annotation_because(
                    ANN_PORT,
                    v,
                    format!("that port is {}", p.protocol.as_deref().unwrap_or_default()),
                    "a TCP port (lameduck proxies HTTP)",
                ));
            }
            (ci, pi)
        }
        None => {
            // Which container is the app: with several that declare TCP ports, guessing
            // would proxy a log shipper or a metrics exporter.
            let candidates: Vec<usize> = spec
                .containers
                .iter()
                .enumerate()
                .filter(|(ci, c)| {
                    only.is_none_or(|o| o == *ci) && c.ports.iter().flatten().any(is_tcp)
                })
                .map(|(ci, _)| ci)
                .collect();
            let has_http = |ci: &usize| {
                spec.containers[*ci]
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some("http") && is_tcp(p))
            };
            let app = match candidates.as_slice() {
                [] => {
                    return Err(match container {
                        Some(c) => InjectError::annotation_because(
                            ANN_CONTAINER,
                            c,
                            "that container declares no TCP port",
                            "the name of the app container, which declares the app's port",
                        ),
                        None => InjectError::NoAppPort,
                    })
                }
                [one] => *one,
                several => {
                    let by_default = default_container.and_then(|d| {
                        several
                            .iter()
                            .copied()
                            .find(|ci| spec.containers[*ci].name == d)
                    });
                    let with_http: Vec<usize> = several.iter().copied().filter(has_http).collect();
                    match (by_default, with_http.as_slice()) {
                        (Some(ci), _) => ci,
                        (None, [one]) => *one,
                        _ => {
                            let list = several
                                .iter()
                                .map(|ci| {
                                    let c = &spec.containers[*ci];
                                    let ports = c
                                        .ports
                                        .iter()
                                        .flatten()
                                        .filter(|p| is_tcp(p))
                                        .map(|p| match &p.name {
                                            Some(n) => format!("{n} {}", p.container_port),
                                            None => p.container_port.to_string(),
                                        })
                                        .collect::<Vec<_>>()
                                        .join(", ");
                                    format!("{} ({ports})", c.name)
                                })
                                .collect::<Vec<_>>()
                                .join(", ");
                            return Err(InjectError::Refused(format!(
                                "several containers declare TCP ports ({list}), so which one \
                                 is the app is ambiguous: set annotation {ANN_CONTAINER} to \
                                 the app container's name (or {ANN_PORT} to its port)"
                            )));
                        }
                    }
                }
            };
            let ports = spec.containers[app].ports.iter().flatten();
            let pi = ports
                .clone()
                .position(|p| p.name.as_deref() == Some("http") && is_tcp(p))
                .or_else(|| ports.clone().position(is_tcp))
                .expect("a candidate declares a TCP port");
            (app, pi)
        }
    };
    Ok(AppPort {
        container: found.0,
        port: found.1,
    })
}

/// Whether every container (init containers included) requests exactly its limits for
/// CPU and memory: the pod's QoS class is Guaranteed.
fn is_guaranteed(spec: &PodSpec) -> bool {
    all_containers(spec).all(|c| {
        let Some(r) = &c.resources else {
            return false;
        };
        ["cpu", "memory"].iter().all(|res| {
            let limit = r.limits.as_ref().and_then(|l| l.get(*res));
            let request = r.requests.as_ref().and_then(|l| l.get(*res));
            match (limit.and_then(|q| parse_quantity(&q.0)), request) {
                (Some(_), None) => true, // requests default to limits
                (Some(l), Some(q)) => parse_quantity(&q.0).is_some_and(|q| same_quantity(q, l)),
                (None, _) => false,
            }
        })
    })
}

fn sidecar_resources(
    opts: &Options,
    guaranteed: bool,
    warnings: &mut Vec<String>,
) -> Result<ResourceRequirements, InjectError> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    let pairs = [
        (
            "cpu",
            &opts.cpu_request,
            &opts.cpu_limit,
            DEFAULT_CPU_REQUEST,
            GUARANTEED_CPU,
            ANN_CPU_REQUEST,
            ANN_CPU_LIMIT,
        ),
        (
            "memory",
            &opts.memory_request,
            &opts.memory_limit,
            DEFAULT_MEMORY_REQUEST,
            GUARANTEED_MEMORY,
            ANN_MEMORY_REQUEST,
            ANN_MEMORY_LIMIT,
        ),
    ];
    for (res, request, limit, default, guaranteed_default, req_ann, lim_ann) in pairs {
        let (request, limit) = match (request, limit) {
            (Some((r, rq)), Some((l, lq))) => {
                if rq > lq && !same_quantity(*rq, *lq) {
                    return Err(InjectError::annotation_because(
                        req_ann,
                        r,
                        format!("more than {lim_ann} ({l})"),
                        "a quantity no larger than the limit",
                    ));
                }
                if guaranteed && !same_quantity(*rq, *lq) {
                    warnings.push(format!(
                        "every container requests its limits (QoS Guaranteed), but {req_ann} \
                         ({r}) differs from {lim_ann} ({l}): the pod becomes Burstable"
                    ));
                }
                (r.clone(), Some(l.clone()))
            }
            (None, Some((l, _))) if guaranteed => (l.clone(), Some(l.clone())),
            (None, Some((l, lq))) => {
                let d = parse_quantity(default).expect("the defaults parse");
                if d > *lq {
                    (l.clone(), Some(l.clone()))
                } else {
                    (default.to_owned(), Some(l.clone()))
                }
            }
            (Some((r, _)), None) if guaranteed => (r.clone(), Some(r.clone())),
            (Some((r, _)), None) => (r.clone(), None),
            (None, None) if guaranteed => (
                guaranteed_default.to_owned(),
                Some(guaranteed_default.to_owned()),
            ),
            (None, None) => (default.to_owned(), None),
        };
        requests.insert(res.to_owned(), Quantity(request));
        if let Some(l) = limit {
            limits.insert(res.to_owned(), Quantity(l));
        }
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// A Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`, `2G`) as a number of base units;
/// `None` when it is not one. Enough to compare requests with limits, not a full
/// implementation of Kubernetes' arbitrary precision.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty()
        || number.matches('.').count() > 1
        || number[1..].contains(['+', '-'])
        || !number.bytes().any(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(n * factor)
}

fn same_quantity(a: f64, b: f64) -> bool {
    (a - b).abs() <= f64::EPSILON * 16.0 * a.abs().max(b.abs()).max(1e-9)
}

fn pick_port(
    name: &'static str,
    requested: Option<&str>,
    preferred: u16,
    taken: &BTreeSet<i32>,
    other: Option<u16>,
) -> Result<u16, InjectError> {
    let free = |p: u16| !taken.contains(&i32::from(p)) && Some(p) != other;
    match requested {
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 && free(p) => Ok(p),
            Ok(p) if Some(p) == other => Err(InjectError::annotation_because(
                name,
                v,
                format!("the same as lameduck's traffic port ({p})"),
                PORT_NUMBER_FORM,
            )),
            Ok(p) if p > 0 => Err(InjectError::annotation_because(
                name,
                v,
                "a container in the pod already declares that port",
                PORT_NUMBER_FORM,
            )),
            _ => Err(InjectError::annotation(name, v, PORT_NUMBER_FORM)),
        },
        None => Ok((preferred..preferred.saturating_add(PORT_SEARCH))
            .find(|p| free(*p))
            .expect("a pod declares fewer than a thousand ports")),
    }
}

/// Names for the app's port once its own name has moved to the proxy: `<name>-app`, or
/// `app`, `app-2`, … when that does not fit in 15 characters or is taken.
fn app_port_names(original: &str) -> impl Iterator<Item = String> {
    std::iter::once(format!("{original}-app")).chain(numbered("app".into(), "app"))
}

/// `first`, then `<stem>-2` … `<stem>-99`.
fn numbered(first: String, stem: &'static str) -> impl Iterator<Item = String> {
    std::iter::once(first).chain((2..100).map(move |i| format!("{stem}-{i}")))
}

fn pick_name(candidates: impl Iterator<Item = String>, taken: &BTreeSet<String>) -> String {
    candidates
        .into_iter()
        .find(|n| is_port_name(n) && !taken.contains(n))
        .expect("fewer than a hundred ports share a name stem")
}

/// An IANA service name, as Kubernetes requires of port names: at most 15 characters of
/// `a-z0-9-`, at least one letter, no leading, trailing or doubled hyphen.
pub fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn sidecar_container(
    settings: &Settings,
    args: Vec<String>,
    (proxy_port, proxy_name): (u16, String),
    (admin_port, admin_name): (u16, String),
    resources: ResourceRequirements,
) -> Container {
    let admin_get = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::Int(admin_port.into()),
        ..Default::default()
    };
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(settings.sidecar_image.clone()),
        args: Some(args),
        ports: Some(vec![
            ContainerPort {
                name: Some(proxy_name),
                container_port: proxy_port.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(admin_name),
                container_port: admin_port.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // /livez does not depend on the app: with a native sidecar the app container
        // starts only once this probe has passed.
        startup_probe: Some(Probe {
            http_get: Some(admin_get("/livez")),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        // 503 while draining or while the app is unreachable; counts toward Pod Ready.
        readiness_probe: Some(Probe {
            http_get: Some(admin_get("/readyz")),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Points the container's probes and lifecycle hooks that name port `from` at `to`.
fn rename_port_refs(c: &mut Container, from: &str, to: &str) {
    let fix = |port: &mut IntOrString| {
        if matches!(port, IntOrString::String(p) if p == from) {
            *port = IntOrString::String(to.to_owned());
        }
    };
    let probes = [
        &mut c.liveness_probe,
        &mut c.readiness_probe,
        &mut c.startup_probe,
    ];
    for probe in probes.into_iter().flatten() {
        probe.http_get.iter_mut().for_each(|h| fix(&mut h.port));
        probe.tcp_socket.iter_mut().for_each(|t| fix(&mut t.port));
    }
    if let Some(lifecycle) = &mut c.lifecycle {
        for hook in [&mut lifecycle.post_start, &mut lifecycle.pre_stop]
            .into_iter()
            .flatten()
        {
            hook.http_get.iter_mut().for_each(|h| fix(&mut h.port));
            hook.tcp_socket.iter_mut().for_each(|t| fix(&mut t.port));
        }
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

// === as a patch ===

/// A pod template given as JSON (`{"metadata": …, "spec": …}`; other members are ignored),
/// injected, as a JSON Patch against that same value, with the warnings. An empty patch
/// means nothing changed. The patch comes from diffing the typed input with the typed
/// output, so it only touches what [`inject`] changed: members the Kubernetes types do not
/// know stay as they are.
pub fn template_patch(
    template: &Json,
    settings: &Settings,
) -> Result<(Patch, Vec<String>), InjectError> {
    #[derive(Deserialize)]
    struct Template {
        #[serde(default)]
        metadata: Option<ObjectMeta>,
        spec: Option<PodSpec>,
    }
    let Template { metadata, spec } =
        Template::deserialize(template).map_err(|e| InjectError::InvalidPod(e.to_string()))?;
    let metadata = metadata.unwrap_or_default();
    let spec = spec.ok_or_else(|| InjectError::InvalidPod("it has no spec".into()))?;
    let injection = inject(&spec, &metadata, settings)?;
    let before = typed_json(metadata, spec);
    let after = typed_json(injection.metadata, injection.spec);
    Ok((json_patch::diff(&before, &after), injection.warnings))
}

fn typed_json(metadata: ObjectMeta, spec: PodSpec) -> Json {
    serde_json::to_value(PodTemplateSpec {
        metadata: Some(metadata),
        spec: Some(spec),
    })
    .expect("Kubernetes types serialize to JSON")
}

// === manifests ===

/// A YAML stream with every opted-in pod template injected.
#[derive(Debug, PartialEq)]
pub struct Rewritten {
    pub yaml: String,
    /// Each names its document: `document 2 (Deployment web): …`.
    pub warnings: Vec<String>,
    /// How many pod templates were injected.
    pub injected: usize,
}

/// A document that could not be read or injected.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("document {index} ({what}): {reason}")]
pub struct ManifestError {
    /// 1-based position in the stream.
    pub index: usize,
    /// `Kind name`, or what is known of it.
    pub what: String,
    pub reason: String,
}

/// Where a kind keeps its pod template (a JSON pointer), by API group and kind.
pub fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    Some(match (group, kind) {
        ("", "Pod") => "",
        ("", "PodTemplate") => "/template",
        ("", "ReplicationController") => "/spec/template",
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => "/spec/template",
        ("batch", "Job") => "/spec/template",
        ("batch", "CronJob") => "/spec/jobTemplate/spec/template",
        ("argoproj.io", "Rollout") => "/spec/template",
        _ => return None,
    })
}

/// Reads a multi-document YAML stream (`kind: List` included), injects every pod template
/// that opted in (with `all`: every one not labelled `"false"`), and writes the stream
/// back. A document injection does not change is copied byte for byte (comments, quoting,
/// anchors and all); a changed one keeps the comments above it and is written with every
/// string quoted that a YAML 1.1 reader (kubectl, Argo CD, kustomize) could read as
/// something else ([`crate::kube::yaml::emit_document`]).
///
/// Refused: a document that cannot be injected, and a Service that targets an injected
/// app's port by number (it would reach the app directly), unless that pod template allows
/// a degraded injection.
pub fn inject_manifests(
    input: &str,
    settings: &Settings,
    all: bool,
) -> Result<Rewritten, ManifestError> {
    // Each document's own text, so unchanged ones can be copied as they were.
    let mut docs: Vec<Doc> = Vec::new();
    for text in split_documents(input) {
        let index = docs.len() + 1;
        let unreadable = |e: yaml_serde::Error| ManifestError {
            index,
            what: "unreadable".into(),
            reason: e.to_string(),
        };
        let mut parsed = Vec::new();
        let (header, body) = document_header(text);
        let has_marker = header.lines().any(|l| l.starts_with("---"));
        // Comments alone are no document (a YAML reader sees none there).
        let content = has_marker || !body.trim().is_empty();
        for de in
            yaml_serde::Deserializer::from_str(text).take(if content { usize::MAX } else { 0 })
        {
            let mut doc = Yaml::deserialize(de).map_err(unreadable)?;
            // `<<: *anchor` merge keys, which Kubernetes' YAML reader applies too: a
            // container written with one is seen, and written back, whole.
            doc.apply_merge().map_err(unreadable)?;
            parsed.push(doc);
        }
        match parsed.len() {
            0 => docs.push(Doc {
                text,
                original: None,
                value: Yaml::Null,
            }),
            1 => {
                let value = parsed.pop().expect("one");
                docs.push(Doc {
                    text,
                    original: Some(value.clone()),
                    value,
                })
            }
            _ => {
                return Err(ManifestError {
                    index,
                    what: "unreadable".into(),
                    reason: "cannot tell where its documents begin: separate them with --- \
                             lines"
                        .into(),
                })
            }
        }
    }
    // Documents are numbered as a YAML reader counts them: text with no document in it
    // (comments before the first ---) has no number.
    let mut numbers = Vec::with_capacity(docs.len());
    let mut n = 0;
    for d in &docs {
        if d.original.is_some() {
            n += 1;
        }
        numbers.push(n);
    }

    let mut apps = Vec::new();
    // (document index, warning): sorted by document at the end.
    let mut warnings: Vec<(usize, String)> = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let index = numbers[i];
        if doc.value.is_null() {
            continue;
        }
        let what = describe(&doc.value);
        let mut found = Vec::new();
        rewrite_object(
            &mut doc.value,
            "",
            settings,
            all,
            &mut found,
            &mut |warning| warnings.push((index, format!("document {index} ({what}): {warning}"))),
        )
        .map_err(|(what, reason)| ManifestError {
            index,
            what,
            reason,
        })?;
        apps.extend(found.into_iter().map(|app| (i, app)));
    }

    // A Service that targets an injected app's port by number bypasses lameduck.
    let mut degraded: Vec<(usize, String, String)> = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if doc.value.is_null() {
            continue;
        }
        let index = numbers[i];
        for (app, problem) in service_problems(&doc.value, apps.iter().map(|(_, a)| a)) {
            let (app_doc, app) = &apps[app];
            let message = format!("document {index} ({}): {problem}", describe(&doc.value));
            if !app.allow_degraded {
                return Err(ManifestError {
                    index,
                    what: describe(&doc.value),
                    reason: format!(
                        "{problem} (or set annotation {ANN_ALLOW_DEGRADED}: \"true\" on the pod \
                         template of document {} ({}) to inject it anyway, marked \
                         {ANN_DEGRADED})",
                        numbers[*app_doc],
                        describe(&docs[*app_doc].value)
                    ),
                });
            }
            warnings.push((index, format!("{message} (allowed: {ANN_ALLOW_DEGRADED})")));
            degraded.push((
                *app_doc,
                app.pointer.clone(),
                format!(
                    "Service {} targets port {} by number, reaching the app directly",
                    str_at(&doc.value, &["metadata", "name"]).unwrap_or("?"),
                    app.port
                ),
            ));
        }
    }
    for (doc, pointer, what) in degraded {
        let template = yaml_pointer_mut(&mut docs[doc].value, &pointer).expect("found before");
        note_degraded(template, &what);
    }

    let mut out = Rewritten {
        yaml: String::with_capacity(input.len() * 2),
        warnings: Vec::new(),
        injected: apps.len(),
    };
    for (i, doc) in docs.iter().enumerate() {
        if doc.original.as_ref() == Some(&doc.value) || doc.original.is_none() {
            out.yaml.push_str(doc.text);
            continue;
        }
        let (header, _) = document_header(doc.text);
        let body =
            crate::kube::yaml::emit_document(&doc.value).map_err(|reason| ManifestError {
                index: numbers[i],
                what: describe(&doc.value),
                reason: format!("cannot be written back as YAML: {reason}"),
            })?;
        if !out.yaml.is_empty() && !out.yaml.ends_with('\n') {
            out.yaml.push('\n');
        }
        let has_marker = header.lines().any(|l| l.starts_with("---"));
        if i > 0 && !has_marker && !out.yaml.is_empty() {
            out.yaml.push_str("---\n");
        }
        out.yaml.push_str(header);
        out.yaml.push_str(&body);
    }
    warnings.sort_by_key(|(index, _)| *index);
    out.warnings = warnings.into_iter().map(|(_, w)| w).collect();
    Ok(out)
}

/// One document of the input stream: its text, as read, and as rewritten.
struct Doc<'a> {
    text: &'a str,
    /// `None`: text with no document in it (comments only).
    original: Option<Yaml>,
    value: Yaml,
}

/// Splits a YAML stream into the text of each document: a new one begins at a `---` line
/// (a directives-end marker: `---` alone or followed by a space) and after a `...` line.
/// Such lines cannot occur inside a document's content (YAML 1.2 §9.1.4 forbids them at
/// the start of a line), so the split is exact. Comments and `%` directives before a
/// `---` belong to the document it starts. The pieces concatenate to the input.
pub fn split_documents(input: &str) -> Vec<&str> {
    let is_marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let mut pieces = Vec::new();
    let (mut start, mut pos) = (0, 0);
    // Whether the current piece has content, or a `---` of its own, yet.
    let (mut content, mut marker) = (false, false);
    for line in input.split_inclusive('\n') {
        if is_marker(line, "---") {
            if content || marker {
                pieces.push(&input[start..pos]);
                start = pos;
                content = false;
            }
            marker = true;
        } else {
            let t = line.trim();
            if !(t.is_empty() || t.starts_with('#') || t.starts_with('%')) {
                content = true;
            }
        }
        pos += line.len();
        if is_marker(line, "...") {
            pieces.push(&input[start..pos]);
            start = pos;
            (content, marker) = (false, false);
        }
    }
    if start < input.len() || pieces.is_empty() {
        pieces.push(&input[start..]);
    }
    pieces
}

/// The lines at the top of a document's text that carry no content (its `---` marker
/// with at most a comment, blank lines and comments), kept above a rewritten document.
fn document_header(text: &str) -> (&str, &str) {
    let mut end = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        let rest = line.get(3..).unwrap_or_default().trim();
        let marker_only = line.starts_with("---") && (rest.is_empty() || rest.starts_with('#'));
        // A bare CR is a line break to YAML: what follows it may be content.
        let bare_cr = line
            .trim_end_matches('\n')
            .trim_end_matches('\r')
            .contains('\r');
        if bare_cr {
            break;
        }
        if t.is_empty() || t.starts_with('#') || t.starts_with('%') || marker_only {
            end += line.len();
        } else {
            break;
        }
    }
    text.split_at(end)
}

/// Adds `what` to a pod template's `lameduck.io/degraded` annotation.
fn note_degraded(template: &mut Yaml, what: &str) {
    let Some(meta) = template.get_mut("metadata").and_then(Yaml::as_mapping_mut) else {
        return;
    };
    let annotations = meta
        .entry(Yaml::String("annotations".into()))
        .or_insert_with(|| Yaml::Mapping(Default::default()));
    let Some(annotations) = annotations.as_mapping_mut() else {
        return;
    };
    let entry = annotations
        .entry(Yaml::String(ANN_DEGRADED.into()))
        .or_insert_with(|| Yaml::String(String::new()));
    if let Yaml::String(s) = entry {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(what);
    }
}

/// What the numeric-targetPort check needs to know about an injected template.
struct InjectedApp {
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    /// The app's port number, and the name that moved to the proxy.
    port: i32,
    moved_name: Option<String>,
    /// Where the template is in its document (a JSON pointer).
    pointer: String,
    allow_degraded: bool,
}

type Located = (String, String);

/// Injects into one object (recursing into `List` items); `base` is the object's JSON
/// pointer in its document.
fn rewrite_object(
    doc: &mut Yaml,
    base: &str,
    settings: &Settings,
    all: bool,
    apps: &mut Vec<InjectedApp>,
    warn: &mut dyn FnMut(String),
) -> Result<(), Located> {
    let api_version = str_at(doc, &["apiVersion"]).unwrap_or_default().to_owned();
    let kind = str_at(doc, &["kind"]).unwrap_or_default().to_owned();
    if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
        let Some(items) = doc.get_mut("items").and_then(Yaml::as_sequence_mut) else {
            return Ok(());
        };
        for (i, item) in items.iter_mut().enumerate() {
            let what = describe(item);
            rewrite_object(
                item,
                &format!("{base}/items/{i}"),
                settings,
                all,
                apps,
                &mut |w| warn(format!("item {} ({what}): {w}", i + 1)),
            )
            .map_err(|(inner, reason)| (format!("{kind}, item {} {inner}", i + 1), reason))?;
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(&api_version, &kind) else {
        return Ok(());
    };
    let what = describe(doc);
    let fail = |reason: String| (what.clone(), reason);
    let Some(template) = yaml_pointer_mut(doc, pointer) else {
        return Ok(()); // e.g. a Rollout with workloadRef instead of a template
    };
    let template_json: Json = serde_json::to_value(&*template)
        .map_err(|e| fail(format!("not representable as JSON: {e}")))?;
    let meta: ObjectMeta = template_json
        .get("metadata")
        .map(|m| ObjectMeta::deserialize(m).map_err(|e| fail(format!("bad pod metadata: {e}"))))
        .transpose()?
        .unwrap_or_default();
    if !wants_injection(&meta, all) {
        let object_labelled = str_at(doc, &["metadata", "labels", INJECT_LABEL]) == Some("true");
        if object_labelled && !pointer.is_empty() {
            warn(format!(
                "the label {INJECT_LABEL} is on the {kind} itself, not on its pod template \
                 ({pointer}/metadata/labels): not injected"
            ));
        }
        return Ok(());
    }
    let (patch, warnings) =
        template_patch(&template_json, settings).map_err(|e| fail(e.to_string()))?;
    for w in warnings {
        warn(w);
    }
    if patch.0.is_empty() {
        return Ok(());
    }
    let template = yaml_pointer_mut(doc, pointer).expect("found above");
    apply_to_yaml(template, &patch).map_err(fail)?;

    // Remember where the app listens now, for the Service check.
    let injected: PodTemplateSpec = serde_json::to_value(&*template)
        .ok()
        .and_then(|j| serde_json::from_value(j).ok())
        .unwrap_or_default();
    if let (Some(spec), Some(m)) = (injected.spec, injected.metadata) {
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == CONTAINER_NAME);
        let upstream_port = proxy
            .and_then(|c| c.args.as_ref())
            .and_then(|a| {
                a.iter()
                    .find_map(|a| a.strip_prefix("--upstream=127.0.0.1:"))
            })
            .and_then(|p| p.parse().ok());
        let moved_name = proxy
            .and_then(|c| c.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| p.name.clone())
            // A name the pod had before: the app's, moved. (An unnamed app port leaves the
            // proxy with a name of lameduck's own.)
            .filter(|n| {
                template_json
                    .pointer("/spec/containers")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .any(|p| p["name"] == n.as_str())
            });
        if let Some(port) = upstream_port {
            let namespace = str_at(doc, &["metadata", "namespace"]).map(str::to_owned);
            apps.push(InjectedApp {
                namespace,
                labels: m.labels.unwrap_or_default().into_iter().collect(),
                port,
                moved_name,
                pointer: format!("{base}{pointer}"),
                allow_degraded: m
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_ALLOW_DEGRADED))
                    .is_some_and(|v| v.trim() == "true"),
            });
        }
    }
    Ok(())
}

/// For a Service whose selector picks an injected template but which targets the app's
/// port by number (that still reaches the app directly): the app's index in `apps` and
/// what is wrong, naming the fix.
fn service_problems<'a>(
    doc: &Yaml,
    apps: impl Iterator<Item = &'a InjectedApp>,
) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    if str_at(doc, &["kind"]) != Some("Service") || str_at(doc, &["apiVersion"]) != Some("v1") {
        return out;
    }
    let namespace = str_at(doc, &["metadata", "namespace"]);
    let Some(selector) = doc
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Yaml::as_mapping)
    else {
        return out;
    };
    if selector.is_empty() {
        return out;
    }
    let Some(ports) = doc
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Yaml::as_sequence)
    else {
        return out;
    };
    for (i, app) in apps.enumerate() {
        if app.namespace.as_deref() != namespace {
            continue;
        }
        let selects = selector.iter().all(|(k, v)| {
            app.labels
                .iter()
                .any(|(lk, lv)| Some(lk.as_str()) == k.as_str() && Some(lv.as_str()) == v.as_str())
        });
        if !selects {
            continue;
        }
        for port in ports {
            let target = port.get("targetPort").or_else(|| port.get("port"));
            let number = match target {
                Some(Yaml::Number(n)) => n.as_i64(),
                Some(Yaml::String(s)) => s.parse::<i64>().ok(),
                _ => None,
            };
            if number == Some(i64::from(app.port)) {
                let label = match (port.get("name").and_then(Yaml::as_str), port.get("port")) {
                    (Some(n), _) => format!("port {n}"),
                    (None, Some(Yaml::Number(p))) => format!("port {p}"),
                    _ => "a port".to_owned(),
                };
                let fix = match &app.moved_name {
                    Some(n) => format!("use targetPort: {n}"),
                    None => "name the app's port and use that name as targetPort".to_owned(),
                };
                out.push((
                    i,
                    format!(
                        "{label} targets {} by number: that reaches the app \
                         directly, bypassing lameduck (a numeric targetPort cannot be moved to \
                         the proxy); {fix}",
                        app.port
                    ),
                ));
            }
        }
    }
    out
}

fn describe(doc: &Yaml) -> String {
    let kind = str_at(doc, &["kind"]).unwrap_or("no kind");
    match str_at(doc, &["metadata", "name"]) {
        Some(name) => format!("{kind} {name}"),
        None => kind.to_owned(),
    }
}

fn str_at<'a>(doc: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(doc, |v, k| v.get(k))?.as_str()
}

fn yaml_pointer_mut<'a>(doc: &'a mut Yaml, pointer: &str) -> Option<&'a mut Yaml> {
    pointer
        .split('/')
        .skip(1)
        .try_fold(doc, |v, k| v.get_mut(k))
}

/// Applies a JSON Patch of `add`, `remove` and `replace` operations (all that
/// [`json_patch::diff`] produces) to a YAML value in place, keeping the order of mapping
/// keys, which a round trip through JSON would sort.
pub fn apply_to_yaml(doc: &mut Yaml, patch: &Patch) -> Result<(), String> {
    for op in &patch.0 {
        let (path, value) = match op {
            PatchOperation::Add(o) => (&o.path, Some(&o.value)),
            PatchOperation::Replace(o) => (&o.path, Some(&o.value)),
            PatchOperation::Remove(o) => (&o.path, None),
            other => return Err(format!("unsupported patch operation {other}")),
        };
        let mut value = value
            .map(yaml_serde::to_value)
            .transpose()
            .map_err(|e| format!("patch value: {e}"))?;
        if let Some(v) = &mut value {
            name_first(v);
        }
        let tokens: Vec<String> = path.tokens().map(|t| t.decoded().into_owned()).collect();
        let Some((last, parents)) = tokens.split_last() else {
            *doc = value.unwrap_or(Yaml::Null);
            continue;
        };
        let parent = parents
            .iter()
            .try_fold(&mut *doc, |v, k| match v {
                Yaml::Mapping(m) => m.get_mut(k.as_str()),
                Yaml::Sequence(s) => k.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
                _ => None,
            })
            .ok_or_else(|| format!("patch path {path} does not exist"))?;
        let missing = || format!("patch path {path} does not exist");
        match (parent, op, value) {
            (Yaml::Mapping(m), PatchOperation::Remove(_), _) => {
                m.shift_remove(last.as_str()).ok_or_else(missing)?;
            }
            (Yaml::Mapping(m), PatchOperation::Replace(_), Some(v)) => {
                *m.get_mut(last.as_str()).ok_or_else(missing)? = v;
            }
            (Yaml::Mapping(m), _, Some(v)) => {
                m.insert(Yaml::String(last.clone()), v);
            }
            (Yaml::Sequence(s), op, v) => {
                let index = if last == "-" {
                    s.len()
                } else {
                    last.parse::<usize>().map_err(|_| missing())?
                };
                match (op, v) {
                    (PatchOperation::Add(_), Some(v)) if index <= s.len() => s.insert(index, v),
                    (PatchOperation::Replace(_), Some(v)) if index < s.len() => s[index] = v,
                    (PatchOperation::Remove(_), _) if index < s.len() => {
                        s.remove(index);
                    }
                    _ => return Err(missing()),
                }
            }
            _ => return Err(missing()),
        }
    }
    Ok(())
}

/// Moves `name` to the front of every mapping in a value that came through JSON (whose
/// keys are sorted), so an added container reads the way people write them.
fn name_first(v: &mut Yaml) {
    match v {
        Yaml::Mapping(m) => {
            if let Some(name) = m.shift_remove("name") {
                let rest = std::mem::take(m);
                m.insert(Yaml::String("name".into()), name);
                m.extend(rest);
            }
            m.values_mut().for_each(name_first);
        }
        Yaml::Sequence(s) => s.iter_mut().for_each(name_first),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comment line with a bare CR in it: YAML reads what follows the CR as content, so
    /// it is not kept above the rewritten document as well. Before: the key was written
    /// twice and the output refused as a duplicate key (found by fuzz/fuzz_targets/manifest.rs).
    #[test]
    fn a_bare_cr_ends_the_comment_header() {
        let input = "# note\rextra: v\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n    \
                     lameduck.io/inject: \"true\"\nspec:\n  containers:\n  - name: app\n    image: a:1\n    \
                     ports:\n    - name: http\n      containerPort: 5000\n";
        let out = inject_manifests(input, &Settings::default(), false).unwrap();
        assert_eq!(out.injected, 1);
        assert_eq!(out.yaml.matches("extra: v").count(), 1, "{}", out.yaml);
        let again = inject_manifests(&out.yaml, &Settings::default(), false).unwrap();
        assert_eq!(again.yaml, out.yaml);
    }

    #[test]
    fn port_names_follow_iana() {
        assert!(is_port_name("http"));
        assert!(is_port_name("http-app"));
        assert!(is_port_name("lameduck-admin"));
        assert!(!is_port_name("a-very-long-name-1"));
        assert!(!is_port_name("80"));
        assert!(!is_port_name("-http"));
        assert!(!is_port_name("http--x"));
        assert!(!is_port_name("HTTP"));
        assert!(!is_port_name(""));
    }

    #[test]
    fn app_port_renaming_fits_and_avoids_collisions() {
        let taken: BTreeSet<String> = ["http-app".to_owned(), "app".to_owned()].into();
        assert_eq!(pick_name(app_port_names("http"), &taken), "app-2");
        assert_eq!(pick_name(app_port_names("web"), &taken), "web-app");
        // 13 characters + "-app" is too long for a port name.
        assert_eq!(
            pick_name(app_port_names("metrics-public"), &BTreeSet::new()),
            "app"
        );
    }

    #[test]
    fn ports_skip_what_the_pod_declares() {
        let taken: BTreeSet<i32> = [9900, 9901, 9902].into();
        assert_eq!(
            pick_port(ANN_PROXY_PORT, None, 9900, &taken, None),
            Ok(9903)
        );
        assert_eq!(
            pick_port(ANN_ADMIN_PORT, None, 9901, &taken, Some(9903)),
            Ok(9904)
        );
        let e = pick_port(ANN_PROXY_PORT, Some("9901"), 9900, &taken, None).unwrap_err();
        assert!(e.to_string().contains("already declares"), "{e}");
        let e = pick_port(ANN_PROXY_PORT, Some("0"), 9900, &taken, None).unwrap_err();
        assert!(e.to_string().contains("expected a port number"), "{e}");
    }

    #[test]
    fn opt_in() {
        let meta = |v: Option<&str>| ObjectMeta {
            labels: v.map(|v| [(INJECT_LABEL.to_owned(), v.to_owned())].into()),
            ..Default::default()
        };
        assert!(wants_injection(&meta(Some("true")), false));
        assert!(!wants_injection(&meta(Some("yes")), false));
        assert!(!wants_injection(&meta(None), false));
        assert!(wants_injection(&meta(None), true));
        assert!(!wants_injection(&meta(Some("false")), true));
    }

    /// `--sidecar-default`: a cluster-wide value for an annotation the pod does not set; the
    /// pod's own annotation wins; unknown keys are refused.
    #[test]
    fn sidecar_defaults_apply_unless_the_pod_sets_its_own() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}]}]
        }))
        .unwrap();
        let settings = Settings {
            defaults: [
                (ANN_CPU_REQUEST.to_owned(), "50m".to_owned()),
                (ANN_DRAIN_MAX.to_owned(), "90s".to_owned()),
            ]
            .into(),
            ..Settings::default()
        };
        assert!(settings.check().is_ok());
        let sidecar = |meta: &ObjectMeta| {
            let out = inject(&spec, meta, &settings).unwrap();
            let c = out.spec.init_containers.unwrap().remove(0);
            let cpu = c.resources.unwrap().requests.unwrap()["cpu"].0.clone();
            (cpu, c.args.unwrap().join(" "))
        };
        let (cpu, args) = sidecar(&ObjectMeta::default());
        assert_eq!(cpu, "50m");
        assert!(args.contains("--drain-max=90s"), "{args}");
        let own = ObjectMeta {
            annotations: Some([(ANN_CPU_REQUEST.to_owned(), "20m".to_owned())].into()),
            ..Default::default()
        };
        assert_eq!(sidecar(&own).0, "20m");
        let bad = Settings {
            defaults: [("lameduck.io/drain_max".to_owned(), "90s".to_owned())].into(),
            ..Settings::default()
        };
        assert!(bad.check().unwrap_err().contains("lameduck.io/drain_max"));
        let status = Settings {
            defaults: [(STATUS_ANNOTATION.to_owned(), "injected".to_owned())].into(),
            ..Settings::default()
        };
        assert!(status.check().is_err());
    }

    /// Before: accepted, and the proxy then panicked on clock overflow at the end of the drain.
    #[test]
    fn absurd_drain_max_is_refused() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}]}]
        }))
        .unwrap();
        let meta = ObjectMeta {
            annotations: Some(
                [
                    (ANN_DRAIN_MAX.to_owned(), "300000000000y".to_owned()),
                    (ANN_QUIET.to_owned(), "1s".to_owned()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let err = inject(&spec, &meta, &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lameduck.io/drain-max"), "{err}");
        let meta = ObjectMeta {
            annotations: Some([(ANN_DRAIN_MAX.to_owned(), "48h".to_owned())].into()),
            ..Default::default()
        };
        let err = inject(&spec, &meta, &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 24h"), "{err}");
    }

    #[test]
    fn documents_split_where_a_reader_splits_them() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[""]),
            ("a: 1\n", &["a: 1\n"]),
            ("# c\n---\na: 1\n", &["# c\n---\na: 1\n"]),
            ("%YAML 1.1\n---\na: 1\n", &["%YAML 1.1\n---\na: 1\n"]),
            ("---\n---\na: 1\n", &["---\n", "---\na: 1\n"]),
            ("a: 1\n# c\n---\nb: 2\n", &["a: 1\n# c\n", "---\nb: 2\n"]),
            ("---\na: 1\n---\nb: 2", &["---\na: 1\n", "---\nb: 2"]),
            ("a: |\n  ---\n  x\n", &["a: |\n  ---\n  x\n"]),
            ("a: 1\n...\nb: 2\n", &["a: 1\n...\n", "b: 2\n"]),
            ("--- # c\na: 1\n---x: 1\n", &["--- # c\na: 1\n---x: 1\n"]),
        ];
        for (input, pieces) in cases {
            assert_eq!(split_documents(input), *pieces, "{input:?}");
            assert_eq!(split_documents(input).concat(), *input);
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("1"), Some(1.0));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert!(same_quantity(
            parse_quantity("1000m").unwrap(),
            parse_quantity("1").unwrap()
        ));
        for bad in ["", "m", "1x", "1.2.3", "--1", "1Mi2"] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn guaranteed_pods() {
        let pod = |resources: serde_json::Value| -> PodSpec {
            serde_json::from_value(serde_json::json!({
                "containers": [{"name": "a", "resources": resources}]
            }))
            .unwrap()
        };
        let equal = serde_json::json!({
            "requests": {"cpu": "1", "memory": "1Gi"},
            "limits": {"cpu": "1000m", "memory": "1Gi"}});
        assert!(is_guaranteed(&pod(equal)));
        let limits_only = serde_json::json!({"limits": {"cpu": "1", "memory": "1Gi"}});
        assert!(is_guaranteed(&pod(limits_only)));
        let burstable = serde_json::json!({
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"}});
        assert!(!is_guaranteed(&pod(burstable)));
        assert!(!is_guaranteed(&pod(serde_json::json!({}))));
    }

    #[test]
    fn h2c_port_names() {
        for n in ["grpc", "h2c", "grpc-api", "h2c-internal"] {
            assert!(is_h2c_port_name(n), "{n}");
        }
        for n in ["http", "grpc-web", "grpcx", "web"] {
            assert!(!is_h2c_port_name(n), "{n}");
        }
    }

    #[test]
    fn tokens() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}]}]
        }))
        .unwrap();
        let meta = ObjectMeta::default();
        assert_eq!(derived_token(&meta, &spec), derived_token(&meta, &spec));
        let mut other = spec.clone();
        other.containers[0].image = Some("b".into());
        assert_ne!(derived_token(&meta, &spec), derived_token(&meta, &other));
        assert!(is_token(&derived_token(&meta, &spec)));
        assert_ne!(random_token().unwrap(), random_token().unwrap());
        assert!(!is_token("short"));
        assert!(!is_token("has a space in it, long enough"));
    }

    #[test]
    fn template_kinds() {
        assert_eq!(
            template_pointer("apps/v1", "Deployment"),
            Some("/spec/template")
        );
        assert_eq!(
            template_pointer("batch/v1", "CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_pointer("v1", "Pod"), Some(""));
        assert_eq!(
            template_pointer("argoproj.io/v1alpha1", "Rollout"),
            Some("/spec/template")
        );
        assert_eq!(template_pointer("v1", "Service"), None);
        assert_eq!(template_pointer("example.com/v1", "Deployment"), None);
    }
}
