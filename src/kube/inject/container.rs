//! The lameduck container itself: its ports, probes, hardening and resources (sized to
//! keep a Guaranteed pod Guaranteed).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::annotations::*;
use super::InjectError;

/// The injected container's name.
pub const CONTAINER_NAME: &str = "lameduck";

/// Every container of a pod: the app's, then the init containers (native sidecars included).
pub(super) fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

/// Whether every container (init containers included) requests exactly its limits for
/// CPU and memory: the pod's QoS class is Guaranteed.
pub(super) fn is_guaranteed(spec: &PodSpec) -> bool {
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

pub(super) fn sidecar_resources(
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

pub(super) fn sidecar_container(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
