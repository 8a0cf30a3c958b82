//! The README's install, as a reader would follow it: the shell block after the
//! `<!-- install` marker is run by bash, as written, in a directory that holds the
//! repository's `charts/` and `k8s/`, with three commands stubbed, since there is no cluster,
//! registry or Docker daemon here:
//! - `helm install`/`upgrade` runs `helm template` with the same arguments;
//! - `kubectl apply -k DIR` runs `kubectl kustomize DIR`;
//! - `docker` and every other `kubectl`/`helm` command are recorded, not run.
//!
//! Then: both install paths (Helm and the kustomize overlay) render a webhook whose image and
//! injected sidecar image are the one image the block pushed, built for linux/amd64 and
//! linux/arm64; and the opt-in command's patch, applied to a Deployment that has not opted
//! in, makes `lameduck inject` inject it.
//!
//! Needs bash, helm and kubectl; skipped with a plain message when helm or kubectl is
//! missing, unless `LAMEDUCK_REQUIRE_TOOLS=1`, where it fails.

#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value as Json;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn documents(yaml: &str) -> Vec<Json> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Json::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// The README's install block: the first ```sh block after the `<!-- install` marker.
fn install_block() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let at = readme
        .find("<!-- install")
        .expect("the README marks its install block with <!-- install");
    let rest = &readme[at..];
    let start = rest
        .find("```sh\n")
        .expect("a ```sh block follows the marker")
        + 6;
    let end = start + rest[start..].find("\n```").unwrap();
    // Nothing but the marker's comment between the marker and the block.
    let between = &rest[..start - 6];
    assert!(
        between.trim_end().ends_with("-->"),
        "the install block follows its marker directly"
    );
    rest[start..end].to_owned()
}

/// Stubs for the commands a cluster, a registry or a daemon would answer; each records its
/// arguments one per line, ending with a line `--`.
const STUBS: &str = r#"
record() { printf '%s\n' "$@" -- >>"$OUT/commands"; }
docker() { record docker "$@"; }
helm() {
  case "$1" in
    install|upgrade) record helm "$@"; shift; "$HELM" template "$@" >>"$OUT/helm.yaml" ;;
    *) record helm "$@" ;;
  esac
}
kubectl() {
  if [ "$1" = apply ] && [ "$2" = -k ]; then
    record kubectl "$@"; "$KUBECTL" kustomize "$3" >>"$OUT/kustomize.yaml"
  else
    record kubectl "$@"
  fi
}
set -euo pipefail
"#;

fn commands(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out.join("commands")).unwrap();
    let mut all = Vec::new();
    let mut cur = Vec::new();
    for line in text.lines() {
        if line == "--" {
            all.push(std::mem::take(&mut cur));
        } else {
            cur.push(line.to_owned());
        }
    }
    all
}

fn webhook_images(label: &str, yaml: &str) -> (String, String) {
    let docs = documents(yaml);
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "MutatingWebhookConfiguration"),
        "{label}: no MutatingWebhookConfiguration"
    );
    let deploy = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap_or_else(|| panic!("{label}: no Deployment"));
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let sidecar = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LAMEDUCK_SIDECAR_IMAGE")
        .unwrap_or_else(|| panic!("{label}: no LAMEDUCK_SIDECAR_IMAGE"))["value"]
        .as_str()
        .unwrap()
        .to_owned();
    (c["image"].as_str().unwrap().to_owned(), sidecar)
}

#[test]
fn the_readme_install_block_renders_one_image_everywhere() {
    let (Some(helm), Some(kubectl)) = (tools::helm(), tools::kubectl()) else {
        return;
    };
    let block = install_block();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lameduck-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let work = dir.join("clone");
    let out = dir.join("out");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    for d in ["charts", "k8s"] {
        std::os::unix::fs::symlink(root().join(d), work.join(d)).unwrap();
    }
    let script = format!("{STUBS}\n{block}\n");
    let run = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("OUT", &out)
        .env("HELM", &helm)
        .env("KUBECTL", &kubectl)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "the README's install block failed ({}):\n{}{}\n--- the block:\n{block}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let cmds = commands(&out);

    // The image the block builds and pushes.
    let docker = cmds
        .iter()
        .find(|c| c[0] == "docker")
        .expect("the block builds the image");
    assert_eq!(docker[1], "buildx");
    let arg_after = |c: &[String], flag: &str| -> String {
        let i = c
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{c:?} has no {flag}"));
        c[i + 1].clone()
    };
    assert_eq!(arg_after(docker, "--platform"), "linux/amd64,linux/arm64");
    assert!(docker.contains(&"--push".to_owned()), "{docker:?}");
    let pushed = arg_after(docker, "-t");
    assert!(!pushed.contains('$'), "{pushed}");

    // Both install paths run, and name that image for the webhook and for the sidecar.
    assert!(cmds.iter().any(|c| c[0] == "helm" && c[1] == "install"));
    assert!(cmds
        .iter()
        .any(|c| c[0] == "kubectl" && c[1] == "apply" && c[2] == "-k"));
    for (label, file) in [("helm", "helm.yaml"), ("kustomize", "kustomize.yaml")] {
        let yaml = std::fs::read_to_string(out.join(file)).unwrap();
        let (image, sidecar) = webhook_images(label, &yaml);
        assert_eq!(image, pushed, "{label}: the webhook runs the pushed image");
        assert_eq!(sidecar, pushed, "{label}: the sidecar is the pushed image");
    }

    // The opt-in: the patch, applied to a Deployment that has not opted in, opts it in.
    let patch = cmds
        .iter()
        .find(|c| c[0] == "kubectl" && c.contains(&"patch".to_owned()))
        .expect("the block opts a workload in");
    assert_eq!(arg_after(patch, "--type"), "merge");
    let patch: Json = serde_json::from_str(&arg_after(patch, "-p")).unwrap();
    let mut deploy: Json = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web",
                    "image": "example/web:1",
                    "ports": [{"name": "http", "containerPort": 8080}]
                }]}
            }
        }
    });
    let yaml = |d: &Json| lameduck::kube::yaml::emit_document(&yaml_serde::to_value(d).unwrap());
    let settings = lameduck::kube::inject::Settings::default();
    let before =
        lameduck::kube::inject::inject_manifests(&yaml(&deploy).unwrap(), &settings, false)
            .unwrap();
    assert_eq!(before.injected, 0);
    json_patch::merge(&mut deploy, &patch);
    let after = lameduck::kube::inject::inject_manifests(&yaml(&deploy).unwrap(), &settings, false)
        .unwrap();
    assert_eq!(after.injected, 1, "the patched Deployment is injected");
    let _ = std::fs::remove_dir_all(&dir);
}
