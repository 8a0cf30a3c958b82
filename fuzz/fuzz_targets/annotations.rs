//! `inject` (src/kube/inject/) on a pod whose annotations, containers and ports come from the
//! fuzzer: the per-pod `lameduck.io/*` annotation parsing and everything it feeds.
//!
//! Never panics. On `Ok`, either the pod is unchanged (injected already, or wired by hand)
//! or it carries exactly one `lameduck` container whose arguments `lameduck proxy` accepts
//! (`ProxyArgs::parse_and_validate`), whose ports clash with no other container's and have
//! valid names, with the grace period covering drain-max + 30 s; and injecting the result
//! again changes nothing.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lameduck::cli::ProxyArgs;
use lameduck::kube::inject::{
    inject, is_port_name, Settings, CONTAINER_NAME, GRACE_MARGIN_SECS, KNOWN_ANNOTATIONS,
    KUBECTL_DEFAULT_CONTAINER, STATUS_ANNOTATION, STATUS_INJECTED,
};
use libfuzzer_sys::fuzz_target;

/// Values the annotations' parsers accept, or nearly: most fuzz inputs should get past
/// the first refusal.
const VALUES: &[&str] = &[
    "true",
    "false",
    "True",
    "",
    " ",
    "0",
    "1",
    "10s",
    "500ms",
    "2m",
    "24h",
    "25h",
    "1h30m",
    "300000000000y",
    "auto",
    "/healthz",
    "/",
    "healthz",
    "/a b",
    "http",
    "web",
    "grpc",
    "h2c",
    "http1",
    "80",
    "8080",
    "9900",
    "9901",
    "65535",
    "65536",
    "-1",
    "0.0.0.0",
    "::",
    "[::]",
    "127.0.0.1",
    "100m",
    "0.5",
    "64Mi",
    "1Gi",
    "0m",
    "1e3",
    "abcdefghijklmnop",
    "abcdefghijklmnop0123456789._~+/=-",
    "app",
    "sidecar",
    CONTAINER_NAME,
    STATUS_INJECTED,
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    DefaultContainer,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Listed(u8),
    Any(String),
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Listed(i) => VALUES[usize::from(*i) % VALUES.len()].to_owned(),
            Value::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Port {
    name: Option<Value>,
    number: u16,
    udp: bool,
}

#[derive(Arbitrary, Debug)]
struct AContainer {
    name: Value,
    ports: Vec<Port>,
    /// 0: none, 1: an exec hook, 2: an httpGet on a named port.
    pre_stop: u8,
    /// A readiness probe on the first port's name (renamed along with it).
    probe_by_name: bool,
    requests_equal_limits: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(Key, Value)>,
    containers: Vec<AContainer>,
    init_containers: Vec<AContainer>,
    restart_policy: u8,
    grace: Option<i64>,
    host_network: bool,
    native_sidecar: bool,
}

fn container(c: &AContainer) -> Container {
    let ports: Vec<ContainerPort> = c
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: p.name.as_ref().map(Value::text),
            container_port: i32::from(p.number),
            protocol: p.udp.then(|| "UDP".to_owned()),
            ..Default::default()
        })
        .collect();
    let first_name = ports.first().and_then(|p| p.name.clone());
    let pre_stop = match c.pre_stop % 3 {
        1 => Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["sleep".into(), "5".into()]),
            }),
            ..Default::default()
        }),
        2 => Some(LifecycleHandler {
            http_get: Some(HTTPGetAction {
                path: Some("/stop".into()),
                port: IntOrString::String(first_name.clone().unwrap_or_else(|| "http".into())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        _ => None,
    };
    let resources = c.requests_equal_limits.then(|| {
        let q: BTreeMap<_, _> = [
            (
                "cpu".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
            ),
            (
                "memory".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
            ),
        ]
        .into();
        k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(q.clone()),
            limits: Some(q),
            ..Default::default()
        }
    });
    Container {
        name: c.name.text(),
        image: Some("app:1".into()),
        ports: (!ports.is_empty()).then_some(ports),
        lifecycle: pre_stop.map(|h| Lifecycle {
            pre_stop: Some(h),
            ..Default::default()
        }),
        readiness_probe: (c.probe_by_name && first_name.is_some()).then(|| Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::String(first_name.clone().unwrap_or_default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources,
        ..Default::default()
    }
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

fuzz_target!(|input: Input| {
    let mut annotations = BTreeMap::new();
    for (k, v) in &input.annotations {
        let key = match k {
            Key::Known(i) => {
                KNOWN_ANNOTATIONS[usize::from(*i) % KNOWN_ANNOTATIONS.len()].to_owned()
            }
            Key::DefaultContainer => KUBECTL_DEFAULT_CONTAINER.to_owned(),
            Key::Other(s) => s.clone(),
        };
        annotations.insert(key, v.text());
    }
    let metadata = ObjectMeta {
        name: Some("web".into()),
        labels: Some([("lameduck.io/inject".to_owned(), "true".to_owned())].into()),
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..Default::default()
    };
    let spec = PodSpec {
        containers: input.containers.iter().take(4).map(container).collect(),
        init_containers: (!input.init_containers.is_empty()).then(|| {
            input
                .init_containers
                .iter()
                .take(2)
                .map(container)
                .collect()
        }),
        restart_policy: match input.restart_policy % 4 {
            1 => Some("Always".into()),
            2 => Some("Never".into()),
            3 => Some("OnFailure".into()),
            _ => None,
        },
        termination_grace_period_seconds: input.grace,
        host_network: input.host_network.then_some(true),
        ..Default::default()
    };
    let settings = Settings {
        native_sidecar: input.native_sidecar,
        ..Settings::default()
    };

    let Ok(out) = inject(&spec, &metadata, &settings) else {
        return;
    };
    let unchanged = out.spec == spec && out.metadata == metadata;
    let injected = out
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .map(String::as_str)
        == Some(STATUS_INJECTED);
    assert!(unchanged || injected, "changed but not marked injected");
    if unchanged {
        return;
    }

    let sidecars: Vec<&Container> = all_containers(&out.spec)
        .filter(|c| c.name == CONTAINER_NAME)
        .collect();
    assert_eq!(sidecars.len(), 1, "one lameduck container");
    let sidecar = sidecars[0];
    let args = sidecar.args.as_deref().expect("the sidecar has arguments");
    assert_eq!(args[0], "proxy");
    let proxy = match ProxyArgs::parse_and_validate(&args[1..]) {
        Ok(p) => p,
        Err(e) => panic!("lameduck proxy refuses the injected arguments {args:?}: {e}"),
    };

    // Its ports are its own: no other container in the pod declares their numbers. Their
    // names are valid where the pod's own were (the app port's name moves to the proxy).
    let names_valid = all_containers(&spec)
        .flat_map(|c| c.ports.iter().flatten())
        .all(|p| p.name.as_deref().is_none_or(is_port_name));
    for p in sidecar.ports.iter().flatten() {
        let name = p.name.as_deref().expect("sidecar ports are named");
        assert!(
            !names_valid || is_port_name(name),
            "sidecar port name {name:?}"
        );
        for c in all_containers(&out.spec).filter(|c| c.name != CONTAINER_NAME) {
            for q in c.ports.iter().flatten() {
                assert_ne!(
                    q.container_port, p.container_port,
                    "container {} declares the sidecar's port",
                    c.name
                );
            }
        }
    }

    let grace = out
        .spec
        .termination_grace_period_seconds
        .expect("the grace period is set");
    let needed = proxy.drain_max.as_secs_f64().ceil() as i64 + GRACE_MARGIN_SECS;
    assert!(
        grace >= needed,
        "grace {grace}s < drain-max {:?} + 30s",
        proxy.drain_max
    );

    let again = inject(&out.spec, &out.metadata, &settings).expect("an injected pod re-injects");
    assert_eq!(again.spec, out.spec, "injection is idempotent");
    assert_eq!(again.metadata, out.metadata, "injection is idempotent");
});
