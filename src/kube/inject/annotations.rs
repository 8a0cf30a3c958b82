//! The annotation vocabulary: every `lameduck.io/*` name a pod may carry, the form each
//! value takes, and where each is checked. "Where is annotation X defined and checked?" is
//! answered here: the names and forms are the constants below, `Options::from_annotations`
//! reads every value (the pod's own, else its `--sidecar-default`) and checks its form with
//! the proxy's own parsers, and the few checks that need the pod itself are named below.
//!
//! | annotation | form | checked by |
//! |---|---|---|
//! | label [`INJECT_LABEL`] | `"true"` (`"false"` opts out of `--all`) | [`wants_injection`] |
//! | any other `lameduck.io/*` | refused, with a hint | `check_known` |
//! | [`ANN_PORT`], [`ANN_CONTAINER`] | a port name or number; a container name | `Values::get`; against the pod: `ports::find_app_port` |
//! | [`ANN_NATIVE_SIDECAR`], [`ANN_REPLACE_PRESTOP`], [`ANN_EVENTS`], [`ANN_ALLOW_DEGRADED`] | `BOOL_FORM` | `Values::boolean` |
//! | [`ANN_FAIL_HEALTH_WHILE_DRAINING`] | `BOOL_FORM` | `Values::boolean`; the proxy's `--fail-health-while-draining` (tcp mode: [`crate::cli::ProxyArgs::validate`]) |
//! | [`ANN_DRAIN_MIN`], [`ANN_QUIET`], [`ANN_QUIET_FALLBACK`], [`ANN_DRAIN_MAX`], [`ANN_HEALTH_PATH`], [`ANN_READINESS_WHILE_DRAINING`], [`ANN_UPSTREAM_HEALTH`], [`ANN_IDLE_TIMEOUT`] | the proxy flag's own value (`FLAG_ANNOTATIONS`) | `Values::flags`; together: [`crate::cli::ProxyArgs::validate`], named by `Options::flag_error` |
//! | [`ANN_UPSTREAM_PROTOCOL`], [`ANN_MODE`] | `PROTOCOL_FORM`, `MODE_FORM` | `Values::upstream_h2c`, `Values::mode` (the proxy's `--upstream-protocol`, `--mode`) |
//! | [`ANN_TLS`] | `TLS_FORM` | `Values::tls` |
//! | [`ANN_BIND_ADDRESS`] | `ADDRESS_FORM` | `Values::bind_address` |
//! | [`ANN_DRAIN_TOKEN`] | `TOKEN_FORM` | `Values::drain_token` ([`crate::cli::check_drain_token`]) |
//! | [`ANN_PROXY_PORT`], [`ANN_ADMIN_PORT`] | `PORT_NUMBER_FORM` | `Values::get`; against the pod: `ports::pick_port` |
//! | [`ANN_CPU_REQUEST`], [`ANN_CPU_LIMIT`], [`ANN_MEMORY_REQUEST`], [`ANN_MEMORY_LIMIT`] | `QUANTITY_FORM` | `Values::quantity`; request within limit: `pod::sidecar_resources` |
//! | [`STATUS_ANNOTATION`], [`ANN_DEGRADED`] | written by lameduck, never a default | `pod::inject` (read), `pod::mark` (written) |

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::InjectError;
use crate::cli::{
    parse_duration, parse_path, parse_quiet, parse_readiness, ConfigError, Mode, ProxyArgs,
    SidecarArgs,
};

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
/// `--readiness-while-draining`: `fail`, `keep` or a duration (serving-aware consumers).
pub const ANN_READINESS_WHILE_DRAINING: &str = "lameduck.io/readiness-while-draining";
/// `"true"` (tcp mode only): `--fail-health-while-draining`, for NLB target groups that
/// drain unhealthy targets.
pub const ANN_FAIL_HEALTH_WHILE_DRAINING: &str = "lameduck.io/fail-health-while-draining";
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
    ANN_READINESS_WHILE_DRAINING,
    ANN_FAIL_HEALTH_WHILE_DRAINING,
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

/// Preferred traffic and admin ports; the next free numbers are used when the pod already
/// declares them. The admin default is the proxy's own (`--admin`), so `lameduck drain`
/// works inside the pod without flags.
pub const DEFAULT_PROXY_PORT: u16 = 9900;
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

const DURATION_FORM: &str = "a duration such as 500ms, 10s or 2m, at most 24h";
const QUIET_FORM: &str = "auto, or a duration such as 500ms, 10s or 2m, at most 24h";
const BOOL_FORM: &str = "\"true\" or \"false\"";
const PATH_FORM: &str = "an absolute path such as /healthz";
const READINESS_FORM: &str =
    "fail, keep, or a duration such as 500ms, 10s or 2m (ready that long into the drain), at most 24h";
const PROTOCOL_FORM: &str = "http1 or h2c";
const MODE_FORM: &str = "http (ALB) or tcp (NLB)";
const TLS_FORM: &str = "self-signed, secret:<name of a kubernetes.io/tls Secret>, or off";

/// Where a `lameduck.io/tls: secret:<name>` Secret is mounted in the sidecar.
pub const TLS_MOUNT: &str = "/etc/lameduck/tls";
const ADDRESS_FORM: &str = "an IP address such as :: (dual-stack) or 0.0.0.0 (IPv4 only)";
const TOKEN_FORM: &str = "16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -";
const QUANTITY_FORM: &str =
    "a Kubernetes quantity above 0 such as 100m, 0.5 (CPU) or 64Mi (memory)";

/// The annotations whose value is a proxy flag's value as it is: `(flag, annotation, the
/// flag's own parser, the form)`, in the order the flags are passed.
#[allow(clippy::type_complexity)]
const FLAG_ANNOTATIONS: [(&str, &str, fn(&str) -> bool, &str); 8] = [
    (
        "--drain-min",
        ANN_DRAIN_MIN,
        |v| parse_duration(v).is_ok(),
        DURATION_FORM,
    ),
    ("--quiet", ANN_QUIET, |v| parse_quiet(v).is_ok(), QUIET_FORM),
    (
        "--quiet-fallback",
        ANN_QUIET_FALLBACK,
        |v| parse_duration(v).is_ok(),
        DURATION_FORM,
    ),
    (
        "--drain-max",
        ANN_DRAIN_MAX,
        |v| parse_duration(v).is_ok(),
        DURATION_FORM,
    ),
    (
        "--health-path",
        ANN_HEALTH_PATH,
        |v| parse_path(v).is_ok(),
        PATH_FORM,
    ),
    (
        "--readiness-while-draining",
        ANN_READINESS_WHILE_DRAINING,
        |v| parse_readiness(v).is_ok(),
        READINESS_FORM,
    ),
    (
        "--upstream-health",
        ANN_UPSTREAM_HEALTH,
        |v| parse_path(v).is_ok(),
        PATH_FORM,
    ),
    (
        "--idle-timeout",
        ANN_IDLE_TIMEOUT,
        |v| parse_duration(v).is_ok(),
        DURATION_FORM,
    ),
];
pub(super) const PORT_NUMBER_FORM: &str =
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
    pub fn check(&self) -> Result<(), NotASetting> {
        for key in self.defaults.keys() {
            if !KNOWN_ANNOTATIONS.contains(&key.as_str()) || NOT_DEFAULTABLE.contains(&key.as_str())
            {
                return Err(NotASetting(key.clone()));
            }
        }
        Ok(())
    }
}

/// A `--sidecar-default` whose key is not a per-pod setting (exit 2 at start).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "--sidecar-default {0}: not a per-pod setting; known: {known}",
    known = KNOWN_ANNOTATIONS
        .iter()
        .filter(|k| !NOT_DEFAULTABLE.contains(k))
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
)]
pub struct NotASetting(pub String);

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

/// Whether a pod template opted in. With `all`, every template does except one labelled
/// `lameduck.io/inject: "false"`.
pub fn wants_injection(metadata: &ObjectMeta, all: bool) -> bool {
    match metadata.labels.as_ref().and_then(|l| l.get(INJECT_LABEL)) {
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        _ => all,
    }
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

pub(super) fn is_token(s: &str) -> bool {
    crate::cli::check_drain_token(s).is_ok()
}

/// A proxy flag injection sets: `(flag, the annotation that set it, value)`; no
/// annotation: lameduck's own default ([`DEFAULT_QUIET`]).
pub(super) type Flag = (&'static str, Option<&'static str>, String);

/// The settings a pod's annotations give. Each value's form is checked here, with the
/// proxy's own parsers; how they fit together is checked by the proxy's validation.
#[derive(Debug)]
pub(super) struct Options {
    pub(super) port: Option<String>,
    pub(super) container: Option<String>,
    pub(super) native_sidecar: bool,
    pub(super) replace_prestop: bool,
    pub(super) events: bool,
    pub(super) allow_degraded: bool,
    /// `(flag, annotation, value)` for every proxy flag injection sets beyond the ports,
    /// in flag order; no annotation: lameduck's own default ([`DEFAULT_QUIET`]).
    pub(super) flags: Vec<Flag>,
    /// `lameduck.io/upstream-protocol`: whether it says h2c (the other value is http1).
    pub(super) upstream_h2c: Option<bool>,
    pub(super) mode: Mode,
    pub(super) bind_address: Option<IpAddr>,
    pub(super) proxy_port: Option<String>,
    pub(super) admin_port: Option<String>,
    pub(super) cpu_request: Option<(String, f64)>,
    pub(super) cpu_limit: Option<(String, f64)>,
    pub(super) memory_request: Option<(String, f64)>,
    pub(super) memory_limit: Option<(String, f64)>,
    pub(super) drain_token: Option<String>,
    /// `lameduck.io/tls: secret:<name>`: the Secret to mount (`--tls-cert/--tls-key`).
    pub(super) tls_secret: Option<String>,
}

impl Options {
    /// Reads and checks every `lameduck.io/*` annotation (the pod's own, else its
    /// `--sidecar-default`), in a fixed order, so the first error is always the same one.
    pub(super) fn from_annotations(
        meta: &ObjectMeta,
        settings: &Settings,
    ) -> Result<Options, InjectError> {
        check_known(meta)?;
        let values = Values { meta, settings };
        let mut flags = values.flags()?;
        let upstream_h2c = values.upstream_h2c()?;
        let mode = values.mode()?;
        let tls_secret = values.tls(&mut flags)?;
        if values.boolean(ANN_FAIL_HEALTH_WHILE_DRAINING, false)? {
            // The proxy refuses it outside tcp mode, naming this annotation.
            flags.push((
                "--fail-health-while-draining",
                Some(ANN_FAIL_HEALTH_WHILE_DRAINING),
                "true".to_owned(),
            ));
        }
        if mode == Mode::Tcp {
            // Last: it is the last of the proxy's flags.
            flags.push(("--mode", Some(ANN_MODE), "tcp".to_owned()));
        }
        let bind_address = values.bind_address()?;
        let drain_token = values.drain_token()?;
        let container = values.get(ANN_CONTAINER).map(str::to_owned);

        Ok(Options {
            port: values.get(ANN_PORT).map(str::to_owned),
            container,
            native_sidecar: values.boolean(ANN_NATIVE_SIDECAR, settings.native_sidecar)?,
            replace_prestop: values.boolean(ANN_REPLACE_PRESTOP, false)?,
            events: values.boolean(ANN_EVENTS, false)?,
            allow_degraded: values.boolean(ANN_ALLOW_DEGRADED, false)?,
            flags,
            upstream_h2c,
            mode,
            bind_address,
            proxy_port: values.get(ANN_PROXY_PORT).map(str::to_owned),
            admin_port: values.get(ANN_ADMIN_PORT).map(str::to_owned),
            cpu_request: values.quantity(ANN_CPU_REQUEST)?,
            cpu_limit: values.quantity(ANN_CPU_LIMIT)?,
            memory_request: values.quantity(ANN_MEMORY_REQUEST)?,
            memory_limit: values.quantity(ANN_MEMORY_LIMIT)?,
            drain_token,
            tls_secret,
        })
    }

    /// The proxy's complaint about its arguments, with the annotations behind the flags
    /// it names (a flag no annotation set is the proxy's default).
    pub(super) fn flag_error(&self, e: &ConfigError) -> InjectError {
        let notes: Vec<String> = e
            .flags
            .iter()
            .map(|flag| match self.flags.iter().find(|(f, _, _)| f == flag) {
                Some((_, Some(annotation), _)) => format!("{flag} from {annotation}"),
                Some((_, None, _)) => format!("{flag} is lameduck's default"),
                None => format!("{flag} is the proxy's default"),
            })
            .collect();
        if notes.is_empty() {
            InjectError::Flags(e.message.clone())
        } else {
            InjectError::Flags(format!("{} ({})", e.message, notes.join(", ")))
        }
    }
}

/// Refuses a `lameduck.io/*` annotation that is not one of [`KNOWN_ANNOTATIONS`] (a typo
/// would otherwise be silently ignored), with a hint when it is close to one.
fn check_known(meta: &ObjectMeta) -> Result<(), InjectError> {
    for key in meta.annotations.iter().flat_map(|a| a.keys()) {
        if key.starts_with("lameduck.io/") && !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
            let hint = if key == INJECT_LABEL {
                " (lameduck.io/inject is a label on the pod template, not an annotation)".to_owned()
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
    Ok(())
}

/// A pod's annotation values: its own, else the cluster-wide default
/// (`--sidecar-default`), trimmed; each reader checks one value's form.
struct Values<'a> {
    meta: &'a ObjectMeta,
    settings: &'a Settings,
}

impl<'a> Values<'a> {
    fn get(&self, name: &'static str) -> Option<&'a str> {
        annotation(self.meta, name)
            .or_else(|| self.settings.defaults.get(name).map(String::as_str))
            .map(str::trim)
    }

    /// [`BOOL_FORM`].
    fn boolean(&self, name: &'static str, default: bool) -> Result<bool, InjectError> {
        match self.get(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(InjectError::annotation(name, v, BOOL_FORM)),
        }
    }

    /// A Kubernetes quantity above 0: as written, and its value.
    fn quantity(&self, name: &'static str) -> Result<Option<(String, f64)>, InjectError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match parse_quantity(v) {
                Some(q) if q > 0.0 => Ok(Some((v.to_owned(), q))),
                _ => Err(InjectError::annotation(name, v, QUANTITY_FORM)),
            },
        }
    }

    /// The annotations that are a proxy flag's value as they are ([`FLAG_ANNOTATIONS`]),
    /// checked with that flag's own parser; `--quiet` gets [`DEFAULT_QUIET`] when unset.
    fn flags(&self) -> Result<Vec<Flag>, InjectError> {
        let mut flags = Vec::new();
        for (flag, name, valid, form) in FLAG_ANNOTATIONS {
            match (self.get(name), flag) {
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
        Ok(flags)
    }

    /// [`ANN_UPSTREAM_PROTOCOL`]: whether it says h2c. Which values are valid is the
    /// proxy's own parser's call (`--upstream-protocol`), not a second copy of it here.
    fn upstream_h2c(&self) -> Result<Option<bool>, InjectError> {
        let Some(v) = self.get(ANN_UPSTREAM_PROTOCOL) else {
            return Ok(None);
        };
        ProxyArgs::parse_and_validate([format!("--upstream-protocol={v}")])
            .map_err(|_| InjectError::annotation(ANN_UPSTREAM_PROTOCOL, v, PROTOCOL_FORM))?;
        Ok(Some(v == "h2c"))
    }

    /// [`ANN_MODE`], as the proxy's own `--mode` parses it.
    fn mode(&self) -> Result<Mode, InjectError> {
        match self.get(ANN_MODE) {
            None => Ok(Mode::Http),
            Some(v) => ProxyArgs::parse_and_validate([format!("--mode={v}")])
                .map(|p| p.mode)
                .map_err(|_| InjectError::annotation(ANN_MODE, v, MODE_FORM)),
        }
    }

    /// [`ANN_TLS`]: `self-signed` is `--tls`; `secret:<name>` is `--tls-cert`/`--tls-key`
    /// in the Secret's mount, and the Secret to mount.
    fn tls(&self, flags: &mut Vec<Flag>) -> Result<Option<String>, InjectError> {
        match self.get(ANN_TLS) {
            None | Some("off") => Ok(None),
            Some("self-signed") => {
                flags.push(("--tls", Some(ANN_TLS), "self-signed".to_owned()));
                Ok(None)
            }
            Some(v) => match v.strip_prefix("secret:").map(str::trim) {
                Some(name) if is_dns_subdomain(name) => {
                    for (flag, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
                        flags.push((flag, Some(ANN_TLS), format!("{TLS_MOUNT}/{file}")));
                    }
                    Ok(Some(name.to_owned()))
                }
                _ => Err(InjectError::annotation(ANN_TLS, v, TLS_FORM)),
            },
        }
    }

    /// [`ANN_BIND_ADDRESS`]: an IP address, brackets allowed.
    fn bind_address(&self) -> Result<Option<IpAddr>, InjectError> {
        let Some(v) = self.get(ANN_BIND_ADDRESS) else {
            return Ok(None);
        };
        v.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(Some)
            .map_err(|_| InjectError::annotation(ANN_BIND_ADDRESS, v, ADDRESS_FORM))
    }

    /// [`ANN_DRAIN_TOKEN`], by the proxy's own rule; a bad one is never echoed.
    fn drain_token(&self) -> Result<Option<String>, InjectError> {
        match self.get(ANN_DRAIN_TOKEN) {
            Some(v) if is_token(v) => Ok(Some(v.to_owned())),
            Some(v) => Err(InjectError::annotation(
                ANN_DRAIN_TOKEN,
                &"*".repeat(v.len().min(8)),
                TOKEN_FORM,
            )),
            None => Ok(None),
        }
    }
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

pub(super) fn same_quantity(a: f64, b: f64) -> bool {
    (a - b).abs() <= f64::EPSILON * 16.0 * a.abs().max(b.abs()).max(1e-9)
}

pub(super) fn annotation<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::inject::inject;
    use k8s_openapi::api::core::v1::PodSpec;

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
        assert!(bad
            .check()
            .unwrap_err()
            .to_string()
            .contains("lameduck.io/drain_max"));
        let status = Settings {
            defaults: [(STATUS_ANNOTATION.to_owned(), "injected".to_owned())].into(),
            ..Settings::default()
        };
        assert!(status.check().is_err());
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
}
