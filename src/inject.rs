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
//! | app container and port | annotation `lameduck.io/port` (a port name or number), else the port named `http`, else the first declared TCP port |
//! | proxy | container `lameduck`: a native sidecar (`initContainers`, `restartPolicy: Always`) unless `--native-sidecar=false` or annotation `lameduck.io/native-sidecar: "false"` |
//! | traffic | the app port's *name* moves to the proxy's traffic port and the app port is renamed, so a Service whose `targetPort` is that name now reaches the proxy |
//! | drain | the app container gets `preStop: httpGet /drain` on the proxy's admin port; an existing preStop is kept (with a warning) unless `lameduck.io/replace-prestop: "true"` |
//! | grace | `terminationGracePeriodSeconds` raised to drain-max + 30 s, never lowered |
//! | marker | annotation `lameduck.io/status: injected`; a pod carrying it is left alone |
//!
//! The webhook and the CLI both turn the typed result into a JSON Patch against the object
//! they were given (diffing the typed input against the typed output), so fields this
//! crate's Kubernetes types do not know are never dropped.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use json_patch::{Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value as Json;
use yaml_serde::Value as Yaml;

use crate::cli::{parse_duration, parse_path, parse_quiet, QuietArg};

// === names ===

/// The opt-in label. Only the exact value `"true"` opts in.
pub const INJECT_LABEL: &str = "lameduck.io/inject";
/// Set on every injected pod; a pod that carries it is never injected again.
pub const STATUS_ANNOTATION: &str = "lameduck.io/status";
pub const STATUS_INJECTED: &str = "injected";

pub const ANN_PORT: &str = "lameduck.io/port";
pub const ANN_NATIVE_SIDECAR: &str = "lameduck.io/native-sidecar";
pub const ANN_DRAIN_MIN: &str = "lameduck.io/drain-min";
pub const ANN_QUIET: &str = "lameduck.io/quiet";
pub const ANN_DRAIN_MAX: &str = "lameduck.io/drain-max";
pub const ANN_HEALTH_PATH: &str = "lameduck.io/health-path";
pub const ANN_UPSTREAM_HEALTH: &str = "lameduck.io/upstream-health";
pub const ANN_REPLACE_PRESTOP: &str = "lameduck.io/replace-prestop";
pub const ANN_PROXY_PORT: &str = "lameduck.io/proxy-port";
pub const ANN_ADMIN_PORT: &str = "lameduck.io/admin-port";

/// The injected container's name.
pub const CONTAINER_NAME: &str = "lameduck";

/// The sidecar image when neither `--sidecar-image` nor `LAMEDUCK_SIDECAR_IMAGE` says
/// otherwise: this build's own version.
pub const DEFAULT_SIDECAR_IMAGE: &str =
    concat!("ghcr.io/lameduck/lameduck:", env!("CARGO_PKG_VERSION"));

/// `--quiet` passed to an injected proxy when the pod has no `lameduck.io/quiet`
/// annotation. `None`: pass nothing, the proxy's own default (`auto`) applies.
pub const DEFAULT_QUIET: Option<&str> = None;

/// The proxy's own defaults (`lameduck proxy --help`), used to check annotation values
/// against each other the way the proxy will at start (`ProxyArgs::validate`). A test
/// compares them with the proxy's flag definitions.
pub const PROXY_DRAIN_MIN: Duration = Duration::from_secs(5);
pub const PROXY_QUIET: QuietArg = QuietArg::Auto;
pub const PROXY_QUIET_FALLBACK: Duration = Duration::from_secs(30);
pub const PROXY_DRAIN_MAX: Duration = Duration::from_secs(120);

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

const DURATION_FORM: &str = "a duration such as 500ms, 10s or 2m";
const QUIET_FORM: &str = "auto, or a duration such as 500ms, 10s or 2m";
const BOOL_FORM: &str = "\"true\" or \"false\"";
const PATH_FORM: &str = "an absolute path such as /healthz";
const PORT_NUMBER_FORM: &str =
    "a port number 1-65535 that no container in the pod declares, different from the other lameduck port";

// === settings and results ===

/// What the operator chose, for every pod (per-pod annotations override `native_sidecar`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub sidecar_image: String,
    pub native_sidecar: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.to_owned(),
            native_sidecar: true,
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
/// accepted form.
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
    #[error(
        "no container declares a TCP port: declare the app's containerPort (named, e.g. http, \
         so a Service can target it by name) or set annotation {ANN_PORT}"
    )]
    NoAppPort,
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
    let app = find_app_port(spec, opts.port.as_deref())?;

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

    // Move the app port's name to the proxy: a Service targeting that name, and the load
    // balancer's ip targets behind it, now reach the proxy.
    let app_container = &mut out.spec.containers[app.container];
    let app_container_name = app_container.name.clone();
    let app_port = &mut app_container.ports.as_mut().expect("the app port exists")[app.port];
    let app_port_number = app_port.container_port;
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
            out.warnings.push(format!(
                "container {app_container_name} port {app_port_number} has no name, so a \
                 Service can only target it by number, which still reaches the app directly, \
                 bypassing lameduck: name the port (e.g. http) and use that name as the \
                 Service's targetPort"
            ));
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

    // The app is signalled only once /drain answers. The kubelet resolves a named port
    // against the hook's own container, so the admin port goes in by number.
    let pre_stop = LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some("/drain".into()),
            port: IntOrString::Int(admin_port.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let lifecycle = app_container
        .lifecycle
        .get_or_insert_with(Lifecycle::default);
    match (&lifecycle.pre_stop, opts.replace_prestop) {
        (None, _) | (Some(_), true) => lifecycle.pre_stop = Some(pre_stop),
        (Some(_), false) => out.warnings.push(format!(
            "container {app_container_name} already has a preStop hook: kept it, so draining \
             is NOT wired (the app is signalled without waiting for traffic to stop); set \
             {ANN_REPLACE_PRESTOP}: \"true\" to replace it, or make the hook first GET \
             http://127.0.0.1:{admin_port}/drain (it answers once traffic has stopped)"
        )),
    }

    let sidecar = sidecar_container(
        settings,
        &opts,
        app_port_number,
        (proxy_port, traffic_name),
        (admin_port, admin_name),
    );
    if opts.native_sidecar {
        let mut sidecar = sidecar;
        sidecar.restart_policy = Some("Always".into());
        out.spec
            .init_containers
            .get_or_insert_with(Vec::new)
            .push(sidecar);
    } else {
        if matches!(
            out.spec.restart_policy.as_deref(),
            Some("Never" | "OnFailure")
        ) {
            out.warnings.push(format!(
                "the pod's restartPolicy is {}: lameduck as a regular container never exits \
                 on its own, so the pod (and its Job) never completes; use the native sidecar",
                out.spec.restart_policy.as_deref().unwrap_or_default()
            ));
        }
        out.spec.containers.push(sidecar);
    }

    let needed = i64::try_from(opts.drain_max.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(opts.drain_max.subsec_nanos() > 0))
        .saturating_add(GRACE_MARGIN_SECS);
    match out.spec.termination_grace_period_seconds {
        Some(current) if current >= needed => {}
        // 30 is Kubernetes' own default, which the API server fills in before admission:
        // raising it is the expected case, not news.
        Some(current) if current != K8S_DEFAULT_GRACE_SECS => {
            out.warnings.push(format!(
                "terminationGracePeriodSeconds raised from {current} to {needed} (drain-max \
                 {} + {GRACE_MARGIN_SECS}s for the app's own shutdown)",
                humantime::format_duration(opts.drain_max)
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

    out.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STATUS_ANNOTATION.into(), STATUS_INJECTED.into());
    Ok(out)
}

/// The settings a pod's annotations give, validated together the way the proxy will
/// validate its flags at start (so a bad value fails here, not as a crash-looping pod).
#[derive(Debug)]
struct Options {
    port: Option<String>,
    native_sidecar: bool,
    replace_prestop: bool,
    drain_min: Option<String>,
    quiet: Option<String>,
    drain_max_arg: Option<String>,
    drain_max: Duration,
    health_path: Option<String>,
    upstream_health: Option<String>,
    proxy_port: Option<String>,
    admin_port: Option<String>,
}

impl Options {
    fn from_annotations(meta: &ObjectMeta, settings: &Settings) -> Result<Options, InjectError> {
        let get = |name: &'static str| annotation(meta, name).map(str::trim);
        let boolean = |name: &'static str, default: bool| match get(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(InjectError::annotation(name, v, BOOL_FORM)),
        };
        let duration = |name: &'static str| -> Result<Option<(String, Duration)>, InjectError> {
            match get(name) {
                None => Ok(None),
                Some(v) => parse_duration(v)
                    .map(|d| Some((v.to_owned(), d)))
                    .map_err(|_| InjectError::annotation(name, v, DURATION_FORM)),
            }
        };
        let path = |name: &'static str| match get(name) {
            None => Ok(None),
            Some(v) => parse_path(v)
                .map(Some)
                .map_err(|_| InjectError::annotation(name, v, PATH_FORM)),
        };

        let drain_min = duration(ANN_DRAIN_MIN)?;
        let quiet = match get(ANN_QUIET) {
            None => None,
            Some(v) => Some((
                v.to_owned(),
                parse_quiet(v).map_err(|_| InjectError::annotation(ANN_QUIET, v, QUIET_FORM))?,
            )),
        };
        let drain_max = duration(ANN_DRAIN_MAX)?;

        let max = drain_max.as_ref().map_or(PROXY_DRAIN_MAX, |(_, d)| *d);
        if let Some((v, _)) = drain_max.as_ref().filter(|(_, d)| d.is_zero()) {
            return Err(InjectError::annotation_because(
                ANN_DRAIN_MAX,
                v,
                "must be greater than 0",
                DURATION_FORM,
            ));
        }
        let max_text = || match &drain_max {
            Some((v, _)) => format!("{ANN_DRAIN_MAX} ({v})"),
            None => format!(
                "drain-max ({}, the default)",
                humantime::format_duration(PROXY_DRAIN_MAX)
            ),
        };
        // When only drain-max was given, a clash with a default is drain-max's fault.
        let max_too_short = |problem: String, expected: String| {
            InjectError::annotation_because(
                ANN_DRAIN_MAX,
                &drain_max
                    .as_ref()
                    .expect("the proxy's defaults agree with each other")
                    .0,
                problem,
                expected,
            )
        };
        match &drain_min {
            Some((v, min)) if *min > max => {
                return Err(InjectError::annotation_because(
                    ANN_DRAIN_MIN,
                    v,
                    format!("longer than {}", max_text()),
                    format!("{DURATION_FORM}, at most drain-max"),
                ))
            }
            None if PROXY_DRAIN_MIN > max => {
                return Err(max_too_short(
                    format!(
                        "shorter than drain-min ({}, the default)",
                        humantime::format_duration(PROXY_DRAIN_MIN)
                    ),
                    format!("{DURATION_FORM}, at least drain-min"),
                ))
            }
            _ => {}
        }
        // The proxy checks the quiet window against drain-max: a fixed one itself, `auto`
        // its fallback (used until it has learned an interval).
        let effective_quiet = match (&quiet, DEFAULT_QUIET) {
            (Some((_, q)), _) => *q,
            (None, Some(default)) => parse_quiet(default).expect("DEFAULT_QUIET parses"),
            (None, None) => PROXY_QUIET,
        };
        match (effective_quiet, &quiet) {
            (QuietArg::Fixed(d), Some((v, _))) if d > max => {
                return Err(InjectError::annotation_because(
                    ANN_QUIET,
                    v,
                    format!(
                        "longer than {}: every drain would end at the cap",
                        max_text()
                    ),
                    format!("{QUIET_FORM}, at most drain-max"),
                ))
            }
            (QuietArg::Fixed(d), None) if d > max => {
                return Err(max_too_short(
                    format!(
                        "shorter than quiet ({}, the default): every drain would end at the cap",
                        humantime::format_duration(d)
                    ),
                    format!("{DURATION_FORM}, at least quiet (or set {ANN_QUIET})"),
                ))
            }
            (QuietArg::Auto, _) if PROXY_QUIET_FALLBACK > max => {
                return Err(max_too_short(
                    format!(
                        "shorter than {} (the window quiet auto uses until it has learned the health-check interval): every such drain would end at the cap",
                        humantime::format_duration(PROXY_QUIET_FALLBACK)
                    ),
                    format!(
                        "{DURATION_FORM}, at least {}, or a fixed {ANN_QUIET} no longer than drain-max",
                        humantime::format_duration(PROXY_QUIET_FALLBACK)
                    ),
                ))
            }
            _ => {}
        }
        let quiet_arg = quiet
            .map(|(v, _)| v)
            .or_else(|| DEFAULT_QUIET.map(str::to_owned));

        Ok(Options {
            port: get(ANN_PORT).map(str::to_owned),
            native_sidecar: boolean(ANN_NATIVE_SIDECAR, settings.native_sidecar)?,
            replace_prestop: boolean(ANN_REPLACE_PRESTOP, false)?,
            drain_min: drain_min.map(|(v, _)| v),
            quiet: quiet_arg,
            drain_max_arg: drain_max.map(|(v, _)| v),
            drain_max: max,
            health_path: path(ANN_HEALTH_PATH)?,
            upstream_health: path(ANN_UPSTREAM_HEALTH)?,
            proxy_port: get(ANN_PROXY_PORT).map(str::to_owned),
            admin_port: get(ANN_ADMIN_PORT).map(str::to_owned),
        })
    }
}

/// Where the app listens: indexes into `spec.containers` and that container's ports.
struct AppPort {
    container: usize,
    port: usize,
}

fn find_app_port(spec: &PodSpec, wanted: Option<&str>) -> Result<AppPort, InjectError> {
    let ports = || {
        spec.containers.iter().enumerate().flat_map(|(ci, c)| {
            c.ports
                .iter()
                .flatten()
                .enumerate()
                .map(move |(pi, p)| (ci, pi, p))
        })
    };
    let is_tcp = |p: &ContainerPort| p.protocol.as_deref().is_none_or(|p| p == "TCP");
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
                    "no container declares that port",
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
            let named_http =
                ports().find(|(_, _, p)| p.name.as_deref() == Some("http") && is_tcp(p));
            let (ci, pi, _) = named_http
                .or_else(|| ports().find(|(_, _, p)| is_tcp(p)))
                .ok_or(InjectError::NoAppPort)?;
            (ci, pi)
        }
    };
    Ok(AppPort {
        container: found.0,
        port: found.1,
    })
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
    opts: &Options,
    app_port: i32,
    (proxy_port, proxy_name): (u16, String),
    (admin_port, admin_name): (u16, String),
) -> Container {
    let mut args = vec![
        "proxy".to_owned(),
        format!("--listen=0.0.0.0:{proxy_port}"),
        format!("--upstream=127.0.0.1:{app_port}"),
        format!("--admin=0.0.0.0:{admin_port}"),
    ];
    let flags = [
        ("--drain-min", &opts.drain_min),
        ("--quiet", &opts.quiet),
        ("--drain-max", &opts.drain_max_arg),
        ("--health-path", &opts.health_path),
        ("--upstream-health", &opts.upstream_health),
    ];
    for (flag, value) in flags {
        if let Some(v) = value {
            args.push(format!("{flag}={v}"));
        }
    }
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
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), Quantity("10m".into())),
                    ("memory".to_owned(), Quantity("32Mi".into())),
                ]
                .into(),
            ),
            ..Default::default()
        }),
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
/// back. Documents without a template pass through unchanged in meaning (comments and
/// quoting style are not kept).
pub fn inject_manifests(
    input: &str,
    settings: &Settings,
    all: bool,
) -> Result<Rewritten, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in yaml_serde::Deserializer::from_str(input).enumerate() {
        let unreadable = |e: yaml_serde::Error| ManifestError {
            index: i + 1,
            what: "unreadable".into(),
            reason: e.to_string(),
        };
        let mut doc = Yaml::deserialize(de).map_err(unreadable)?;
        // `<<: *anchor` merge keys, which Kubernetes' YAML reader applies too: a container
        // written with one is seen, and written back, whole.
        doc.apply_merge().map_err(unreadable)?;
        docs.push(doc);
    }
    let mut out = Rewritten {
        yaml: String::new(),
        warnings: Vec::new(),
        injected: 0,
    };
    let mut apps = Vec::new();
    // (document index, warning): sorted by document at the end.
    let mut warnings: Vec<(usize, String)> = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let index = i + 1;
        if doc.is_null() {
            continue;
        }
        let what = describe(doc);
        rewrite_object(doc, settings, all, &mut apps, &mut |warning| {
            warnings.push((index, format!("document {index} ({what}): {warning}")))
        })
        .map_err(|(what, reason)| ManifestError {
            index,
            what,
            reason,
        })?;
    }
    out.injected = apps.len();
    for (i, doc) in docs.iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        for warning in service_warnings(doc, &apps) {
            let index = i + 1;
            warnings.push((
                index,
                format!("document {index} ({}): {warning}", describe(doc)),
            ));
        }
        if !out.yaml.is_empty() {
            out.yaml.push_str("---\n");
        }
        out.yaml
            .push_str(&yaml_serde::to_string(doc).map_err(|e| ManifestError {
                index: i + 1,
                what: describe(doc),
                reason: format!("cannot be written back as YAML: {e}"),
            })?);
    }
    warnings.sort_by_key(|(index, _)| *index);
    out.warnings = warnings.into_iter().map(|(_, w)| w).collect();
    Ok(out)
}

/// What the numeric-targetPort check needs to know about an injected template.
struct InjectedApp {
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    /// The app's port number, and the name that moved to the proxy.
    port: i32,
    moved_name: Option<String>,
}

type Located = (String, String);

/// Injects into one object (recursing into `List` items).
fn rewrite_object(
    doc: &mut Yaml,
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
            rewrite_object(item, settings, all, apps, &mut |w| {
                warn(format!("item {} ({what}): {w}", i + 1))
            })
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
            });
        }
    }
    Ok(())
}

/// Warnings for a Service whose selector picks an injected template but which targets the
/// app's port by number: that still reaches the app directly.
fn service_warnings(doc: &Yaml, apps: &[InjectedApp]) -> Vec<String> {
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
    for app in apps {
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
                out.push(format!(
                    "{label} targets {} by number: that reaches the app directly, bypassing \
                     lameduck (a numeric targetPort cannot be moved to the proxy); {fix}",
                    app.port
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

    #[test]
    fn absurd_drain_max_saturates_the_grace_period() {
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
        let out = inject(&spec, &meta, &Settings::default()).unwrap();
        assert_eq!(out.spec.termination_grace_period_seconds, Some(i64::MAX));
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
