//! The release workflow (.github/workflows/release.yml). It cannot run here, so:
//!
//! Always: it builds the Dockerfile for linux/amd64 and linux/arm64 and pushes it; the image
//! name its overlay rewrites is the one k8s/webhook's `images:` sets, and the line its `sed`
//! rewrites in the chart's values.yaml exists, so the attached manifests and chart name the
//! pushed image; it attaches the rendered manifests and the packaged chart.
//!
//! With actionlint (built by `.ci/install-actionlint.sh`, which also installs shellcheck for
//! the `run:` scripts): no finding. Skipped with a plain message when missing, unless
//! `LAMEDUCK_REQUIRE_TOOLS=1`, where it fails.

#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value as Json;

const WORKFLOW: &str = ".github/workflows/release.yml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

fn steps() -> Vec<Json> {
    let doc = Json::deserialize(yaml_serde::Deserializer::from_str(&read(WORKFLOW))).unwrap();
    doc["jobs"]["release"]["steps"].as_array().unwrap().clone()
}

fn step<'a>(steps: &'a [Json], uses: &str) -> &'a Json {
    steps
        .iter()
        .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(uses)))
        .unwrap_or_else(|| panic!("no step uses {uses}"))
}

fn runs(steps: &[Json]) -> String {
    steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn builds_multi_arch_and_pushes() {
    let steps = steps();
    let build = &step(&steps, "docker/build-push-action@")["with"];
    assert_eq!(build["file"], "Dockerfile");
    assert_eq!(build["platforms"], "linux/amd64,linux/arm64");
    assert_eq!(build["push"], true);
    step(&steps, "docker/setup-qemu-action@");
    step(&steps, "docker/setup-buildx-action@");
    // The tag must be Cargo.toml's version: the binary's default sidecar image carries it.
    assert!(runs(&steps).contains("Cargo.toml"));
}

#[test]
fn attached_manifests_and_chart_name_the_pushed_image() {
    let run = runs(&steps());
    // The overlay rewrites the image k8s/webhook sets.
    let kustomization = read("k8s/webhook/kustomization.yaml");
    let image = "ghcr.io/lameduck/lameduck";
    assert!(kustomization.contains(&format!("- name: {image}\n")));
    assert!(run.contains(&format!("- name: {image}\n")), "{run}");
    assert!(run.contains("resources: [../../k8s/webhook]"));
    // The sed line of the chart's values.yaml exists as written.
    let values = read("charts/lameduck/values.yaml");
    assert!(
        values.contains(&format!("\n  repository: {image}\n")),
        "charts/lameduck/values.yaml has no `  repository: {image}` line for the workflow's sed"
    );
    assert!(run.contains(&format!("s|^  repository: {image}$|")));
    // What it attaches.
    for needle in [
        "kubectl kustomize dist/overlay >dist/lameduck-webhook.yaml",
        "kubectl kustomize k8s/observability >dist/lameduck-observability.yaml",
        "helm package charts/lameduck",
        "dist/lameduck-webhook.yaml dist/lameduck-observability.yaml dist/lameduck-*.tgz",
    ] {
        assert!(run.contains(needle), "the workflow lacks {needle:?}");
    }
}

#[test]
fn actionlint_workflows() {
    let Some(actionlint) = tools::actionlint() else {
        return;
    };
    let out = Command::new(actionlint)
        .arg("-no-color")
        .arg(WORKFLOW)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint {WORKFLOW}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
