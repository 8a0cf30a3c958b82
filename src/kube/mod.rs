//! The Kubernetes integration: everything that knows what a pod, a manifest, an
//! AdmissionReview or an Event is.
//!
//! | module | owns |
//! |---|---|
//! | [`inject`] | the annotation vocabulary, the pure pod transformation, the manifest rewriting |
//! | [`webhook`] | `lameduck webhook`: the HTTPS AdmissionReview shell around [`inject`] |
//! | [`events`] | `--events`: the drain's Kubernetes Event on the pod, and the API call posting it |
//! | [`yaml`] | YAML out that YAML 1.1 readers read as meant (for [`inject`]'s manifests) |
//!
//! **What it may import.** [`crate::cli`] (the proxy's own flags, their parsers and
//! [`crate::cli::ProxyArgs::parse_and_validate`], so an injected sidecar gets only what
//! `lameduck proxy` accepts), [`crate::tls`] (the webhook's serving certificate), and the
//! lifecycle's drained `State` (the Event describes it). Nothing from the traffic path
//! (listener, proxy, tcp, upstream, PROXY protocol): what a pod's annotations mean is
//! decided by the proxy's flags, never by the code that serves them. Nothing outside this
//! folder imports [`inject`] or [`webhook`] but `main`.

pub mod events;
pub mod inject;
pub mod webhook;
pub mod yaml;
