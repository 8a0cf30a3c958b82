//! Ports: which container and port is the app's, the free numbers and valid names the
//! sidecar's ports get, and the app's own references that follow a renamed port.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::annotations::*;
use super::InjectError;

/// How far past the preferred port to look for a free one (bounded, and far more than any
/// pod declares).
const PORT_SEARCH: u16 = 1000;

/// A port name that says the app speaks HTTP/2 without TLS (gRPC): `grpc`, `h2c`, or
/// prefixed with them (`grpc-web` is HTTP/1, so not that one).
pub(super) fn is_h2c_port_name(name: &str) -> bool {
    name == "grpc"
        || name == "h2c"
        || (name.starts_with("grpc-") && name != "grpc-web")
        || name.starts_with("h2c-")
}

/// Where the app listens: indexes into `spec.containers` and that container's ports.
pub(super) struct AppPort {
    pub(super) container: usize,
    pub(super) port: usize,
}

fn is_tcp(p: &ContainerPort) -> bool {
    p.protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// Where the app listens: the port `lameduck.io/port` names (a name or a number, in the
/// container `lameduck.io/container` names, if set), else a guess that refuses to choose
/// between several containers.
pub(super) fn find_app_port(
    spec: &PodSpec,
    container: Option<&str>,
    wanted: Option<&str>,
    default_container: Option<&str>,
) -> Result<AppPort, InjectError> {
    let only = match container {
        Some(name) => Some(container_index(spec, name)?),
        None => None,
    };
    let (container, port) = match wanted {
        Some(v) => annotated_port(spec, only, container, v)?,
        None => guessed_port(spec, only, container, default_container)?,
    };
    let app = AppPort { container, port };
    check_owned(spec, &app)?;
    Ok(app)
}

/// The containers that run beside the app (the other regular containers, and native
/// sidecars: init containers with `restartPolicy: Always`), with their TCP ports. A plain
/// init container has exited before any traffic arrives.
fn neighbours(spec: &PodSpec, app: usize) -> impl Iterator<Item = (&Container, &ContainerPort)> {
    let regular = spec
        .containers
        .iter()
        .enumerate()
        .filter(move |(ci, _)| *ci != app)
        .map(|(_, c)| c);
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    regular.chain(sidecars).flat_map(|c| {
        c.ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p))
            .map(move |p| (c, p))
    })
}

/// The app port must be the app container's alone: lameduck takes over its name and
/// forwards to its number. Another running container that declares the same name keeps
/// the Service's traffic (Kubernetes resolves a named targetPort to the first container
/// declaring it, regular containers before sidecars), and one that declares the same
/// number may be what listens there (a proxy in front of the app): refused, naming both.
fn check_owned(spec: &PodSpec, app: &AppPort) -> Result<(), InjectError> {
    let owner = &spec.containers[app.container];
    let port = &owner.ports.as_ref().expect("the app port exists")[app.port];
    let number = port.container_port;
    for (other, p) in neighbours(spec, app.container) {
        if port.name.is_some() && p.name == port.name {
            let name = port.name.as_deref().unwrap_or_default();
            return Err(InjectError::Refused(format!(
                "container {} declares a port named {name} ({}) as well as container {} \
                 ({number}), and a Service's targetPort {name} reaches the first container \
                 that declares it (regular containers before sidecars): lameduck would take \
                 over the name while {} keeps the traffic, bypassing lameduck; give one of \
                 the two ports another name, and point the Service and annotation \
                 {ANN_CONTAINER} (or {ANN_PORT}) at the port the load balancer must reach",
                other.name, p.container_port, owner.name, other.name
            )));
        }
        if p.container_port == number {
            return Err(InjectError::Refused(format!(
                "containers {} and {} both declare port {number}, but only one process can \
                 listen on it: lameduck would forward to whichever does (a proxy in front of \
                 the app, say), not necessarily container {}; remove the port from the \
                 container that does not listen on it, or set annotation {ANN_CONTAINER} to \
                 the one that does",
                owner.name, other.name, owner.name
            )));
        }
    }
    Ok(())
}

/// The index of the container `lameduck.io/container` names.
fn container_index(spec: &PodSpec, name: &str) -> Result<usize, InjectError> {
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
        })
}

/// `(container index, port index, port)` of every port of container `only` (or of every
/// container).
fn ports_of(
    spec: &PodSpec,
    only: Option<usize>,
) -> impl Iterator<Item = (usize, usize, &ContainerPort)> {
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
}

/// `lameduck.io/port`: the TCP port of that name, or of that number.
fn annotated_port(
    spec: &PodSpec,
    only: Option<usize>,
    container: Option<&str>,
    v: &str,
) -> Result<(usize, usize), InjectError> {
    const FORM: &str = "the name or number of a port declared by one of the pod's containers";
    let by_number = v.parse::<u16>().ok().filter(|n| *n > 0);
    let hit = if v.bytes().all(|b| b.is_ascii_digit()) {
        let Some(n) = by_number else {
            return Err(InjectError::annotation(ANN_PORT, v, FORM));
        };
        ports_of(spec, only).find(|(_, _, p)| p.container_port == i32::from(n))
    } else {
        ports_of(spec, only).find(|(_, _, p)| p.name.as_deref() == Some(v))
    };
    let Some((ci, pi, p)) = hit else {
        return Err(InjectError::annotation_because(
            ANN_PORT,
            v,
            match container {
                Some(c) => format!("container {c} declares no such port"),
                None => "no container declares that port".to_owned(),
            },
            FORM,
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
    Ok((ci, pi))
}

/// No `lameduck.io/port`: the app container is the only one declaring a TCP port (within
/// `lameduck.io/container`, if set), and its port is the one named `http`, else its first
/// TCP port.
fn guessed_port(
    spec: &PodSpec,
    only: Option<usize>,
    container: Option<&str>,
    default_container: Option<&str>,
) -> Result<(usize, usize), InjectError> {
    let candidates: Vec<usize> = spec
        .containers
        .iter()
        .enumerate()
        .filter(|(ci, c)| only.is_none_or(|o| o == *ci) && c.ports.iter().flatten().any(is_tcp))
        .map(|(ci, _)| ci)
        .collect();
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
        several => app_among(spec, several, default_container)?,
    };
    let ports = spec.containers[app].ports.iter().flatten();
    let pi = ports
        .clone()
        .position(|p| p.name.as_deref() == Some("http") && is_tcp(p))
        .or_else(|| ports.clone().position(is_tcp))
        .expect("a candidate declares a TCP port");
    Ok((app, pi))
}

/// Which of several containers with TCP ports is the app: the one kubectl's
/// default-container annotation names, else the only one with a port named `http`. Else
/// refused: guessing would proxy a log shipper or a metrics exporter.
fn app_among(
    spec: &PodSpec,
    several: &[usize],
    default_container: Option<&str>,
) -> Result<usize, InjectError> {
    let has_http = |ci: &usize| {
        spec.containers[*ci]
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("http") && is_tcp(p))
    };
    let by_default = default_container.and_then(|d| {
        several
            .iter()
            .copied()
            .find(|ci| spec.containers[*ci].name == d)
    });
    let with_http: Vec<usize> = several.iter().copied().filter(has_http).collect();
    match (by_default, with_http.as_slice()) {
        (Some(ci), _) => Ok(ci),
        (None, [one]) => Ok(*one),
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
            Err(InjectError::Refused(format!(
                "several containers declare TCP ports ({list}), so which one is the app is \
                 ambiguous: set annotation {ANN_CONTAINER} to the app container's name (or \
                 {ANN_PORT} to its port)"
            )))
        }
    }
}

pub(super) fn pick_port(
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
pub(super) fn app_port_names(original: &str) -> impl Iterator<Item = String> {
    std::iter::once(format!("{original}-app")).chain(numbered("app".into(), "app"))
}

/// `first`, then `<stem>-2` … `<stem>-99`.
pub(super) fn numbered(first: String, stem: &'static str) -> impl Iterator<Item = String> {
    std::iter::once(first).chain((2..100).map(move |i| format!("{stem}-{i}")))
}

pub(super) fn pick_name(
    candidates: impl Iterator<Item = String>,
    taken: &BTreeSet<String>,
) -> String {
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

/// Points the container's probes and lifecycle hooks that name port `from` at `to`.
pub(super) fn rename_port_refs(c: &mut Container, from: &str, to: &str) {
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

    /// The app port is the app container's alone: the same name or number declared by a
    /// container running beside it (a regular container or a native sidecar) is refused;
    /// a plain init container (exited before traffic) and a UDP port are not in the way.
    #[test]
    fn the_app_port_belongs_to_the_app_alone() {
        let pod = |neighbour: serde_json::Value| -> PodSpec {
            serde_json::from_value(serde_json::json!({
                "initContainers": [neighbour],
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
            }))
            .unwrap()
        };
        let find = |spec: &PodSpec| {
            find_app_port(spec, Some("app"), None, None)
                .map(|a| (a.container, a.port))
                .map_err(|e| e.to_string())
        };
        let sidecar = |ports: serde_json::Value| serde_json::json!({"name": "envoy", "restartPolicy": "Always", "ports": ports});
        let same_number = pod(sidecar(
            serde_json::json!([{"name": "proxy", "containerPort": 8080}]),
        ));
        let e = find(&same_number).unwrap_err();
        assert!(e.contains("app and envoy both declare port 8080"), "{e}");
        let same_name = pod(sidecar(
            serde_json::json!([{"name": "http", "containerPort": 8081}]),
        ));
        let e = find(&same_name).unwrap_err();
        assert!(e.contains("envoy declares a port named http (8081)"), "{e}");
        let udp = pod(sidecar(serde_json::json!([
            {"name": "http", "containerPort": 8080, "protocol": "UDP"}
        ])));
        assert_eq!(find(&udp), Ok((0, 0)));
        let init = pod(serde_json::json!({
            "name": "migrate", "ports": [{"name": "http", "containerPort": 8080}]
        }));
        assert_eq!(find(&init), Ok((0, 0)));
        // By number, without lameduck.io/container: the first of two is not taken silently.
        let two: PodSpec = serde_json::from_value(serde_json::json!({"containers": [
            {"name": "nginx", "ports": [{"name": "web", "containerPort": 8080}]},
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}
        ]}))
        .unwrap();
        let e = find_app_port(&two, None, Some("8080"), None)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nginx and app both declare port 8080"), "{e}");
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
}
