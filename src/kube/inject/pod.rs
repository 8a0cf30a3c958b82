//! The pure pod transformation: [`inject`] puts lameduck in front of the app in one pod
//! spec, as a short recipe of named steps (app port, sidecar ports, preStop wiring, sidecar
//! arguments, TLS and environment, grace period, marks). No I/O.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HTTPHeader, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PodSpec, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::annotations::*;
use super::container::{all_containers, is_guaranteed, sidecar_container, sidecar_resources};
use super::ports::*;
use super::{typed_json, InjectError};
use crate::cli::{Mode, ProxyArgs};

pub use super::container::CONTAINER_NAME;

/// The environment variable the sidecar reads its `--drain-token` from (the proxy's own
/// `env =` on that flag), and the header the preStop hook sends it in (the admin
/// server's own).
pub const TOKEN_ENV: &str = "LAMEDUCK_DRAIN_TOKEN";
pub use crate::cli::TOKEN_HEADER;

/// The sidecar's state volume: an in-memory `emptyDir` that lives as long as the pod, for
/// the drain record.
pub const STATE_VOLUME: &str = "lameduck-state";
/// Where the state volume is mounted in the sidecar.
pub const STATE_MOUNT: &str = "/var/run/lameduck";
/// The sidecar's `--drain-record`, on the state volume: a sidecar restarted in the middle of
/// a drain finds it and resumes the drain.
pub const DRAIN_RECORD: &str = "/var/run/lameduck/draining";

/// terminationGracePeriodSeconds ≥ drain-max + this: time for the app's own shutdown
/// after `/drain` answers.
pub const GRACE_MARGIN_SECS: i64 = 30;
const K8S_DEFAULT_GRACE_SECS: i64 = 30;

/// An injected pod (or the untouched input, when it was injected already).
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    /// Things the user should know: the pod works, but not the way they may think.
    pub warnings: Vec<String>,
    /// What was wired; `None` when the pod was left as it was (injected already, or
    /// wired by hand).
    pub wiring: Option<Wiring>,
}

/// What [`inject`] decided, for a caller that acts on it (the manifest rewriting's Service
/// check) without reading it back out of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wiring {
    /// The app container's name, and the port the proxy forwards to (`--upstream`).
    pub app_container: String,
    pub app_port: i32,
    /// The app port's own name, now the proxy's traffic port's: a Service that targets it
    /// reaches the proxy. `None`: the app port had no name (only its number reaches it).
    pub moved_name: Option<String>,
    pub proxy_port: u16,
    pub admin_port: u16,
    /// What is not wired (`lameduck.io/degraded`); empty when the drain is fully wired.
    pub degraded: Vec<String>,
}

// === the pure function ===

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
///
/// The recipe: read the annotations, find the app's port, pick the sidecar's ports, move
/// the app port's name to the proxy, wire the app's preStop to `/drain`, build the
/// sidecar's arguments (checked by the proxy's own parser), then its container (resources,
/// environment, TLS, the state volume), the grace period, and the marks.
pub fn inject(
    spec: &PodSpec,
    metadata: &ObjectMeta,
    settings: &Settings,
) -> Result<Injection, InjectError> {
    let mut out = Injection {
        metadata: metadata.clone(),
        spec: spec.clone(),
        warnings: Vec::new(),
        wiring: None,
    };
    if !wants_changes(spec, metadata, &mut out.warnings)? {
        return Ok(out);
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
    check_restart_policy(spec, &opts)?;
    let (ports, mut names) = taken_ports_and_names(spec);
    let (proxy_port, admin_port) = sidecar_ports(&opts, &ports)?;
    check_istio_proxy(
        spec,
        metadata,
        opts.native_sidecar,
        (proxy_port, admin_port),
        &mut out.warnings,
    )?;
    let token = match (&opts.drain_token, &settings.drain_token) {
        (Some(t), _) | (None, Some(t)) => t.clone(),
        (None, None) => derived_token(metadata, spec),
    };
    let guaranteed = is_guaranteed(spec);

    let app_container = &mut out.spec.containers[app.container];
    let port_names = move_port_name(
        app_container,
        app.port,
        proxy_port,
        &mut names,
        &mut degraded,
    )?;
    wire_pre_stop(
        app_container,
        admin_port,
        &token,
        opts.replace_prestop,
        &mut degraded,
    )?;
    let wiring = Wiring {
        app_container: app_container.name.clone(),
        app_port: port_names.app_port,
        moved_name: port_names.moved,
        proxy_port,
        admin_port,
        degraded: Vec::new(),
    };

    let args = sidecar_args(&opts, &wiring);
    // The proxy's own parser and validation decide whether these arguments make sense.
    let proxy = ProxyArgs::parse_and_validate(&args[1..]).map_err(|e| opts.flag_error(&e))?;
    let resources = sidecar_resources(&opts, guaranteed, &mut out.warnings)?;
    let mut sidecar = sidecar_container(
        settings,
        args,
        (proxy_port, port_names.traffic),
        (admin_port, port_names.admin),
        resources,
    );
    sidecar.env = Some(sidecar_env(token, opts.events));
    if let Some(secret) = &opts.tls_secret {
        mount_tls_secret(&mut out.spec, &mut sidecar, secret);
    }
    mount_state_volume(&mut out.spec, &mut sidecar, &mut out.warnings);
    add_sidecar(&mut out.spec, sidecar, opts.native_sidecar);

    raise_grace_period(&mut out.spec, proxy.drain_max, &mut out.warnings);
    if out.spec.host_network == Some(true) {
        out.warnings.push(format!(
            "the pod uses hostNetwork: lameduck's ports {proxy_port} and {admin_port} are \
             bound on the node and must be free there"
        ));
    }
    mark(&mut out, degraded.what, wiring);
    Ok(out)
}

/// Whether the pod is for injecting: `false` (unchanged) when it is marked injected
/// already or has a container of lameduck's name (with a warning); an error when it has
/// no containers.
fn wants_changes(
    spec: &PodSpec,
    metadata: &ObjectMeta,
    warnings: &mut Vec<String>,
) -> Result<bool, InjectError> {
    if annotation(metadata, STATUS_ANNOTATION) == Some(STATUS_INJECTED) {
        return Ok(false);
    }
    if all_containers(spec).any(|c| c.name == CONTAINER_NAME) {
        warnings.push(format!(
            "the pod already has a container named {CONTAINER_NAME} and no {STATUS_ANNOTATION} \
             annotation: left as it is (wired by hand?)"
        ));
        return Ok(false);
    }
    if spec.containers.is_empty() {
        return Err(InjectError::InvalidPod("it has no containers".into()));
    }
    Ok(true)
}

/// A regular sidecar never exits on its own: a pod that must complete never would.
fn check_restart_policy(spec: &PodSpec, opts: &Options) -> Result<(), InjectError> {
    let policy = spec.restart_policy.as_deref();
    if !opts.native_sidecar && matches!(policy, Some("Never" | "OnFailure")) {
        return Err(InjectError::Refused(format!(
            "the pod's restartPolicy is {}: lameduck as a regular container never exits on its \
             own, so the pod (and its Job) would never complete; use the native sidecar \
             (annotation {ANN_NATIVE_SIDECAR}: \"true\", Kubernetes >= 1.29)",
            policy.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Every port number and name the pod declares, so the proxy's own clash with none.
fn taken_ports_and_names(spec: &PodSpec) -> (BTreeSet<i32>, BTreeSet<String>) {
    let mut ports = BTreeSet::new();
    let mut names = BTreeSet::new();
    for c in all_containers(spec) {
        for p in c.ports.iter().flatten() {
            ports.insert(p.container_port);
            if let Some(n) = &p.name {
                names.insert(n.clone());
            }
        }
    }
    (ports, names)
}

/// The sidecar's traffic and admin port numbers: the annotated ones, else the first free
/// from the defaults.
fn sidecar_ports(opts: &Options, taken: &BTreeSet<i32>) -> Result<(u16, u16), InjectError> {
    let proxy_port = pick_port(
        ANN_PROXY_PORT,
        opts.proxy_port.as_deref(),
        DEFAULT_PROXY_PORT,
        taken,
        None,
    )?;
    let admin_port = pick_port(
        ANN_ADMIN_PORT,
        opts.admin_port.as_deref(),
        DEFAULT_ADMIN_PORT,
        taken,
        Some(proxy_port),
    )?;
    Ok((proxy_port, admin_port))
}

/// The names of the sidecar's two ports, and what became of the app's.
struct PortNames {
    traffic: String,
    admin: String,
    /// The app port's number, and its former name, now the traffic port's.
    app_port: i32,
    moved: Option<String>,
}

/// Moves the app port's name to the proxy: a Service targeting that name, and the load
/// balancer's ip targets behind it, now reach the proxy. The app port is renamed, and the
/// app's own probes and hooks follow the rename. An unnamed app port is degraded (only its
/// number reaches it, bypassing the proxy).
fn move_port_name(
    app_container: &mut Container,
    port: usize,
    proxy_port: u16,
    taken_names: &mut BTreeSet<String>,
    degraded: &mut Degraded,
) -> Result<PortNames, InjectError> {
    let container_name = app_container.name.clone();
    let app_port = &mut app_container.ports.as_mut().expect("the app port exists")[port];
    let app_port_number = app_port.container_port;
    let moved = app_port.name.clone();
    let traffic = match moved.clone() {
        Some(name) => {
            taken_names.remove(&name);
            let renamed = pick_name(app_port_names(&name), taken_names);
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
                    "container {container_name} port {app_port_number} has no name, so a \
                     Service can only target it by number, which reaches the app directly, \
                     bypassing lameduck: name the port (e.g. http) and use that name as the \
                     Service's targetPort"
                ),
                &format!(
                    "port {app_port_number} has no name: a Service reaches lameduck only at \
                     targetPort {proxy_port}"
                ),
            )?;
            pick_name(numbered(CONTAINER_NAME.to_owned(), "lameduck"), taken_names)
        }
    };
    taken_names.insert(traffic.clone());
    let admin = pick_name(
        std::iter::once("lameduck-admin".to_owned()).chain(numbered("ld-admin".into(), "ld-admin")),
        taken_names,
    );
    Ok(PortNames {
        traffic,
        admin,
        app_port: app_port_number,
        moved,
    })
}

/// The app is signalled only once /drain answers: its preStop hook calls the proxy's
/// `/drain` with the token. The kubelet resolves a named port against the hook's own
/// container, so the admin port goes in by number. An existing hook is replaced only with
/// `lameduck.io/replace-prestop`; otherwise the pod is degraded.
fn wire_pre_stop(
    app_container: &mut Container,
    admin_port: u16,
    token: &str,
    replace: bool,
    degraded: &mut Degraded,
) -> Result<(), InjectError> {
    let pre_stop = LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some("/drain".into()),
            port: IntOrString::Int(admin_port.into()),
            http_headers: Some(vec![HTTPHeader {
                name: TOKEN_HEADER.into(),
                value: token.to_owned(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = app_container.name.clone();
    let lifecycle = app_container
        .lifecycle
        .get_or_insert_with(Lifecycle::default);
    match (&lifecycle.pre_stop, replace) {
        (None, _) | (Some(_), true) => lifecycle.pre_stop = Some(pre_stop),
        (Some(_), false) => degraded.note(
            format!(
                "container {name} already has a preStop hook, so lameduck's /drain hook cannot \
                 be wired (the app would be signalled without waiting for traffic to stop): \
                 remove the hook (lameduck's /drain already waits until the load balancer has \
                 stopped sending, so a sleep is not needed), or set annotation \
                 {ANN_REPLACE_PRESTOP}: \"true\" to replace it"
            ),
            &format!(
                "container {name} keeps its own preStop hook: /drain is not called, the app is \
                 signalled without waiting for traffic to stop"
            ),
        )?,
    }
    Ok(())
}

/// The sidecar's `lameduck proxy` arguments: its ports, the app, the drain record, then
/// every flag the annotations set, in flag order.
fn sidecar_args(opts: &Options, wiring: &Wiring) -> Vec<String> {
    let bind = opts.bind_address.unwrap_or(DEFAULT_BIND_ADDRESS);
    let mut args = vec![
        "proxy".to_owned(),
        format!("--listen={}", SocketAddr::new(bind, wiring.proxy_port)),
        format!("--upstream=127.0.0.1:{}", wiring.app_port),
        format!("--admin={}", SocketAddr::new(bind, wiring.admin_port)),
    ];
    let h2c = opts.upstream_h2c.unwrap_or_else(|| {
        // A byte stream in tcp mode: what it carries is the app's business.
        wiring.moved_name.as_deref().is_some_and(is_h2c_port_name) && opts.mode == Mode::Http
    });
    if h2c {
        args.push("--upstream-protocol=h2c".into());
    }
    args.push(format!("--drain-record={DRAIN_RECORD}"));
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
    args
}

/// The sidecar's environment: the drain token, and with `--events` the pod's name,
/// namespace and uid from the downward API.
fn sidecar_env(token: String, events: bool) -> Vec<EnvVar> {
    let mut env = vec![EnvVar {
        name: TOKEN_ENV.into(),
        value: Some(token),
        ..Default::default()
    }];
    if events {
        for (name, path) in [
            ("LAMEDUCK_POD_NAME", "metadata.name"),
            ("LAMEDUCK_POD_NAMESPACE", "metadata.namespace"),
            ("LAMEDUCK_POD_UID", "metadata.uid"),
        ] {
            env.push(EnvVar {
                name: name.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: path.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    env
}

/// `lameduck.io/tls: secret:<name>`: the Secret as a volume, mounted read-only in the
/// sidecar at [`TLS_MOUNT`]. The kubelet updates a mounted Secret in place when
/// cert-manager renews it; the proxy re-reads the files (--tls-reload-interval).
fn mount_tls_secret(spec: &mut PodSpec, sidecar: &mut Container, secret: &str) {
    let taken: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let volume = pick_name(numbered("lameduck-tls".into(), "lameduck-tls"), &taken);
    sidecar
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: volume.clone(),
            mount_path: TLS_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume,
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// The state volume ([`STATE_VOLUME`]: `emptyDir`, `medium: Memory`, `sizeLimit: 1Mi`),
/// mounted in the sidecar at [`STATE_MOUNT`] for [`DRAIN_RECORD`]. An `emptyDir`'s
/// directory is world-writable (0777), so the non-root sidecar with a read-only root file
/// system writes it without an `fsGroup`. A pod volume of that name is not ours (an
/// injected pod is never injected again): it is left alone, and the sidecar's gets the next
/// free name, with a warning.
fn mount_state_volume(spec: &mut PodSpec, sidecar: &mut Container, warnings: &mut Vec<String>) {
    let taken: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let volume = numbered(STATE_VOLUME.into(), STATE_VOLUME)
        .find(|n| !taken.contains(n.as_str()))
        .expect("fewer than a hundred volumes share a name stem");
    if volume != STATE_VOLUME {
        warnings.push(format!(
            "the pod already has a volume named {STATE_VOLUME}: left as it is; lameduck's \
             drain record ({DRAIN_RECORD}) is on a volume named {volume} instead"
        ));
    }
    sidecar
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: volume.clone(),
            mount_path: STATE_MOUNT.into(),
            ..Default::default()
        });
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume,
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Mi".into())),
        }),
        ..Default::default()
    });
}

/// The sidecar in the pod: a native sidecar (an init container that keeps running), or a
/// regular container. Either way it goes last in its list, on purpose (docs/design.md,
/// *Neighbour sidecars*):
/// - the kubelet starts init containers in order, each native sidecar once it has started
///   (its startup probe passed), and stops native sidecars in reverse order once the app has
///   exited (KEP-753). Last, lameduck starts after a mesh proxy is up and stops before it
///   and before a log shipper: what carries its traffic, or ships its last log lines,
///   outlives it.
/// - an append is a single `add` at the end of the list in the JSON Patch (the diff is
///   index by index): no other container moves, so no container is rewritten into another,
///   which would carry fields the Kubernetes types here do not know onto the wrong one.
/// - Istio moves its own init containers to the front whenever it injects (`reorderPod`),
///   so either webhook order gives `istio-init, istio-proxy, …, lameduck`.
fn add_sidecar(spec: &mut PodSpec, mut sidecar: Container, native: bool) {
    if native {
        sidecar.restart_policy = Some("Always".into());
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .push(sidecar);
    } else {
        spec.containers.push(sidecar);
    }
}

/// Istio's proxy container, by the name its injector gives it, and the pod annotation
/// that keeps inbound ports out of its interception (istio-init's iptables, or istio-cni).
const ISTIO_PROXY: &str = "istio-proxy";
const ISTIO_EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// Istio's proxy as a regular container (Istio before 1.27, or
/// `sidecar.istio.io/nativeSidecar: "false"`) receives every inbound connection, the
/// kubelet's probes included, unless its port is excluded. It starts only after every init
/// container: a native lameduck's startup probe would go to a proxy not yet running, and
/// the pod would never start (refused). It is stopped as the pod starts terminating and
/// exits its `terminationDrainDuration` (5 s by default) later (istio
/// `pkg/envoy/agent.go`), ending the traffic lameduck drains through it (a warning). As a
/// native sidecar it starts before lameduck and is stopped after the app has exited.
fn check_istio_proxy(
    spec: &PodSpec,
    metadata: &ObjectMeta,
    native: bool,
    (proxy_port, admin_port): (u16, u16),
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    if !spec.containers.iter().any(|c| c.name == ISTIO_PROXY) {
        return Ok(());
    }
    let excluded: BTreeSet<u16> = annotation(metadata, ISTIO_EXCLUDE_INBOUND)
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let fix = format!(
        "inject Istio's proxy as a native sidecar (annotation sidecar.istio.io/nativeSidecar: \
         \"true\"), or keep lameduck's ports out of its interception (annotation \
         {ISTIO_EXCLUDE_INBOUND}: \"{proxy_port},{admin_port}\")"
    );
    if native && !excluded.contains(&admin_port) {
        return Err(InjectError::Refused(format!(
            "container {ISTIO_PROXY} is Istio's proxy as a regular container: it starts only \
             after the init containers, but istio-init's iptables (or istio-cni's) already send \
             the kubelet's probes to it, so lameduck (a native sidecar, an init container) would never pass its \
             startup probe on port {admin_port} and the pod would never start; {fix}"
        )));
    }
    if !excluded.contains(&proxy_port) {
        warnings.push(format!(
            "container {ISTIO_PROXY} is Istio's proxy as a regular container: it is stopped as \
             the pod starts terminating and exits after its terminationDrainDuration (5s by \
             default), ending the traffic lameduck drains through it; {fix}"
        ));
    }
    Ok(())
}

/// terminationGracePeriodSeconds raised to drain-max + [`GRACE_MARGIN_SECS`], never
/// lowered; a warning when it was set to something other than Kubernetes' default.
fn raise_grace_period(spec: &mut PodSpec, drain_max: Duration, warnings: &mut Vec<String>) {
    let needed = i64::try_from(drain_max.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(drain_max.subsec_nanos() > 0))
        .saturating_add(GRACE_MARGIN_SECS);
    match spec.termination_grace_period_seconds {
        Some(current) if current >= needed => {}
        // 30 is Kubernetes' own default, which the API server fills in before admission:
        // raising it is the expected case, not news.
        Some(current) if current != K8S_DEFAULT_GRACE_SECS => {
            warnings.push(format!(
                "terminationGracePeriodSeconds raised from {current} to {needed} (drain-max \
                 {} + {GRACE_MARGIN_SECS}s for the app's own shutdown)",
                humantime::format_duration(drain_max)
            ));
            spec.termination_grace_period_seconds = Some(needed);
        }
        Some(_) | None => spec.termination_grace_period_seconds = Some(needed),
    }
}

/// The marks: `lameduck.io/status: injected`, and what is not wired in
/// `lameduck.io/degraded` (each also a warning); the wiring, for the caller.
fn mark(out: &mut Injection, degraded: Vec<String>, mut wiring: Wiring) {
    let annotations = out
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(STATUS_ANNOTATION.into(), STATUS_INJECTED.into());
    if !degraded.is_empty() {
        out.warnings.extend(
            degraded
                .iter()
                .map(|w| format!("degraded ({ANN_ALLOW_DEGRADED}): {w}")),
        );
        annotations.insert(ANN_DEGRADED.into(), degraded.join("; "));
    }
    wiring.degraded = degraded;
    out.wiring = Some(wiring);
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
pub fn random_token() -> Result<String, RandomFailed> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RandomFailed)?;
    Ok(hex(&bytes))
}

/// The system's random number generator failed (the webhook then derives the token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct RandomFailed;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wiring is what was decided: the app's container and port, the name that moved,
    /// what is degraded; a pod left alone has none.
    #[test]
    fn wiring_is_what_was_decided() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]
        }))
        .unwrap();
        let out = inject(&spec, &ObjectMeta::default(), &Settings::default()).unwrap();
        let w = out.wiring.clone().unwrap();
        assert_eq!(
            (
                w.app_container.as_str(),
                w.app_port,
                w.moved_name.as_deref()
            ),
            ("web", 8080, Some("http"))
        );
        assert_eq!(
            (w.proxy_port, w.admin_port),
            (DEFAULT_PROXY_PORT, DEFAULT_ADMIN_PORT)
        );
        assert!(w.degraded.is_empty());
        let again = inject(&out.spec, &out.metadata, &Settings::default()).unwrap();
        assert_eq!(again.wiring, None, "injected already: left alone");

        let unnamed: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]
        }))
        .unwrap();
        let allow = ObjectMeta {
            annotations: Some([(ANN_ALLOW_DEGRADED.to_owned(), "true".to_owned())].into()),
            ..Default::default()
        };
        let w = inject(&unnamed, &allow, &Settings::default())
            .unwrap()
            .wiring
            .unwrap();
        assert_eq!((w.app_port, w.moved_name), (8080, None));
        assert_eq!(w.degraded.len(), 1, "{:?}", w.degraded);
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
}
