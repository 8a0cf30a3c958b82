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
//! | state | a volume `lameduck-state` (`emptyDir`, `medium: Memory`, `sizeLimit: 1Mi`) mounted in the sidecar at `/var/run/lameduck`, and `--drain-record=/var/run/lameduck/draining`: a sidecar restarted while the pod terminates resumes its drain. A pod volume of that name is left alone (the sidecar's is `lameduck-state-2`, with a warning) |
//! | mode | annotation `lameduck.io/mode: tcp` runs the proxy as the layer-4 forwarder (NLB); its probes stay on the admin port |
//! | marker | annotation `lameduck.io/status: injected`; a pod carrying it is left alone |
//!
//! **Never half-wired.** When the drain cannot be wired (an ambiguous app container, an
//! existing preStop hook, an app port a Service can only reach by number, an app port
//! another container declares too, a regular sidecar in a pod that must complete, a native
//! sidecar behind Istio's proxy as a regular container),
//! injection is refused with a message naming the fix. With
//! `lameduck.io/allow-degraded: "true"` the pod is injected anyway where that still makes
//! sense, and carries `lameduck.io/degraded` saying what is not wired.
//!
//! The sidecar's arguments are checked by the proxy's own parser and validation
//! ([`ProxyArgs::parse_and_validate`]): what injection produces, `lameduck proxy` accepts.
//!
//! | file | owns |
//! |---|---|
//! | `annotations.rs` | the vocabulary: every annotation's name, form and check; [`Settings`] |
//! | `pod.rs` | [`inject`], the pure transformation, as a recipe of named steps; [`Injection`] and its [`Wiring`] |
//! | `container.rs` | the lameduck container: ports, probes, hardening, resources |
//! | `ports.rs` | which port is the app's; the sidecar's port numbers and names |
//! | `manifests.rs` | [`inject_manifests`]: YAML streams, the Service check |
//! | `mod.rs` | [`InjectError`], and the pod as a JSON Patch ([`template_patch`]) |
//!
//! The webhook and the CLI both turn the typed result into a JSON Patch against the object
//! they were given (diffing the typed input against the typed output), so fields this
//! crate's Kubernetes types do not know are never dropped.

use std::fmt;

use json_patch::Patch;
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value as Json;

mod annotations;
mod container;
mod manifests;
mod pod;
mod ports;

pub use annotations::*;
pub use manifests::*;
pub use pod::*;
pub use ports::*;

// === errors ===

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
    template_injection(template, settings).map(|(patch, injection)| (patch, injection.warnings))
}

/// [`template_patch`], with the whole [`Injection`] the patch comes from (its warnings,
/// and the [`Wiring`] it decided).
pub fn template_injection(
    template: &Json,
    settings: &Settings,
) -> Result<(Patch, Injection), InjectError> {
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
    let after = typed_json(injection.metadata.clone(), injection.spec.clone());
    Ok((json_patch::diff(&before, &after), injection))
}

fn typed_json(metadata: ObjectMeta, spec: PodSpec) -> Json {
    serde_json::to_value(PodTemplateSpec {
        metadata: Some(metadata),
        spec: Some(spec),
    })
    .expect("Kubernetes types serialize to JSON")
}
