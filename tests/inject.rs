//! Golden tests for injection: `tests/golden/inject/<case>.in.yaml` → `<case>.out.yaml`
//! (stdout), `<case>.warnings.txt` (stderr warnings, one per line; absent: none) or
//! `<case>.error.txt` (the exit-2 message). A first line `# args: …` in the input gives the
//! `lameduck inject` flags for that case.
//!
//! Regenerate with `UPDATE_GOLDEN=1 cargo test --test inject`, then read every changed
//! golden: a golden is an assertion about what injection must produce, not a snapshot.
//!
//! Beyond the goldens: every output re-injected is unchanged (idempotence); the JSON Patch
//! that the webhook would send, applied with the json-patch crate, gives the same pod as the
//! CLI's YAML rewrite; and the binary itself is run for its stdin/file/exit-code behaviour.

#[path = "support/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lameduck::kube::inject::{self, Settings};
use serde_json::Value as Json;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("tests/golden/inject exists")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".in.yaml")?
                .to_owned();
            Some((name, path))
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "golden cases went missing");
    cases
}

/// The flags of a case, from its `# args:` line.
fn case_args(input: &str) -> Vec<String> {
    input
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# args:"))
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn settings_of(args: &[String]) -> (Settings, bool) {
    let mut settings = Settings::default();
    let mut all = false;
    for a in args {
        match a.as_str() {
            "--all" => all = true,
            "--native-sidecar=false" => settings.native_sidecar = false,
            "--native-sidecar=true" => settings.native_sidecar = true,
            other => match other.strip_prefix("--sidecar-image=") {
                Some(img) => settings.sidecar_image = img.to_owned(),
                None => panic!("unknown case flag {other}"),
            },
        }
    }
    (settings, all)
}

fn check_golden(path: &Path, actual: Option<&str>) -> Result<(), String> {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let expected = std::fs::read_to_string(path).ok();
    if update {
        match actual {
            Some(a) => std::fs::write(path, a).unwrap(),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
        return Ok(());
    }
    if expected.as_deref() == actual {
        return Ok(());
    }
    Err(format!(
        "{} differs\n--- expected\n{}\n--- actual\n{}",
        path.display(),
        expected.as_deref().unwrap_or("(no file)"),
        actual.unwrap_or("(nothing)")
    ))
}

#[test]
fn goldens() {
    let mut failures = Vec::new();
    for (name, input_path) in cases() {
        let input = std::fs::read_to_string(&input_path).unwrap();
        let (settings, all) = settings_of(&case_args(&input));
        let base = golden_dir().join(&name);
        let out = base.with_extension("out.yaml");
        let warnings = base.with_extension("warnings.txt");
        let error = base.with_extension("error.txt");
        let results = match inject::inject_manifests(&input, &settings, all) {
            Ok(r) => {
                let w = (!r.warnings.is_empty()).then(|| r.warnings.join("\n") + "\n");
                [
                    check_golden(&out, Some(&r.yaml)),
                    check_golden(&warnings, w.as_deref()),
                    check_golden(&error, None),
                ]
            }
            Err(e) => [
                check_golden(&out, None),
                check_golden(&warnings, None),
                check_golden(&error, Some(&format!("{e}\n"))),
            ],
        };
        failures.extend(results.into_iter().filter_map(Result::err));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn injecting_twice_changes_nothing() {
    for (name, input_path) in cases() {
        let input = std::fs::read_to_string(&input_path).unwrap();
        let (settings, all) = settings_of(&case_args(&input));
        let Ok(once) = inject::inject_manifests(&input, &settings, all) else {
            continue;
        };
        let twice = inject::inject_manifests(&once.yaml, &settings, all)
            .unwrap_or_else(|e| panic!("{name}: re-injecting failed: {e}"));
        assert_eq!(
            twice.yaml, once.yaml,
            "{name}: re-injecting changed the output"
        );
        assert_eq!(twice.injected, 0, "{name}");
    }
}

/// The webhook's path (JSON Patch against the pod template, applied by the API server)
/// and the CLI's path (the same patch applied to YAML) agree on every golden.
#[test]
fn json_patch_and_yaml_rewrite_agree() {
    for (name, input_path) in cases() {
        let input = std::fs::read_to_string(&input_path).unwrap();
        let (settings, all) = settings_of(&case_args(&input));
        let Ok(rewritten) = inject::inject_manifests(&input, &settings, all) else {
            continue;
        };
        let before = documents(&input);
        let after = documents(&rewritten.yaml);
        assert_eq!(before.len(), after.len(), "{name}: document count changed");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            for (pointer, template) in templates(b) {
                let label = &template["metadata"]["labels"][inject::INJECT_LABEL];
                if !(label == "true" || (all && label != "false")) {
                    continue;
                }
                let (patch, _) = inject::template_patch(&template, &settings)
                    .unwrap_or_else(|e| panic!("{name} doc {i}: {e}"));
                // A Pod's patch applies to the whole object, as the API server does it.
                let mut patched = b.pointer(&pointer).unwrap().clone();
                json_patch::patch(&mut patched, &patch).unwrap();
                let mut expected = a.pointer(&pointer).unwrap().clone();
                // What only the CLI sees (a Service in the same stream) adds to the
                // degraded note; the webhook's part must come first and be the same.
                let degraded = format!(
                    "/metadata/annotations/{}",
                    inject::ANN_DEGRADED.replace('/', "~1")
                );
                if let (Some(Json::String(p)), Some(Json::String(e))) =
                    (patched.pointer(&degraded), expected.pointer_mut(&degraded))
                {
                    assert!(e.starts_with(p.as_str()), "{name}: {e} / {p}");
                    *e = p.clone();
                }
                assert_eq!(patched, expected, "{name} doc {}: {pointer}", i + 1);
            }
        }
    }
}

/// Every injected sidecar's arguments are ones `lameduck proxy` accepts and validates, its
/// admin port is where the app's preStop hook and its own probes go, and the grace period
/// covers drain-max + 30 s.
#[test]
fn injected_sidecars_agree_with_the_proxy() {
    use clap::Parser as _;
    use lameduck::cli::{Cli, Command as Sub};
    let mut checked = 0;
    for (name, _) in cases() {
        let out = golden_dir().join(format!("{name}.out.yaml"));
        let Ok(out) = std::fs::read_to_string(out) else {
            continue;
        };
        for doc in documents(&out) {
            for (_, template) in templates(&doc) {
                if template["metadata"]["annotations"][inject::STATUS_ANNOTATION] != "injected" {
                    continue;
                }
                let spec = &template["spec"];
                let all: Vec<&Json> = spec["containers"]
                    .as_array()
                    .into_iter()
                    .chain(spec["initContainers"].as_array())
                    .flatten()
                    .collect();
                let Some(sidecar) = all.iter().find(|c| c["name"] == inject::CONTAINER_NAME) else {
                    // Only the hand-made "marked as injected" input lacks it.
                    assert_eq!(name, "already-injected", "an injected pod has the sidecar");
                    continue;
                };
                let args = sidecar["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap());
                let cli = Cli::try_parse_from(std::iter::once("lameduck").chain(args))
                    .unwrap_or_else(|e| panic!("{name}: sidecar args rejected: {e}"));
                let Sub::Proxy(proxy) = cli.command else {
                    panic!("{name}: the sidecar does not run `lameduck proxy`")
                };
                proxy
                    .validate()
                    .unwrap_or_else(|e| panic!("{name}: sidecar args invalid: {e}"));
                let admin = i64::from(proxy.admin.port());
                assert_eq!(sidecar["ports"][1]["containerPort"], admin, "{name}");
                assert_eq!(
                    sidecar["readinessProbe"]["httpGet"]["port"], admin,
                    "{name}"
                );
                assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], admin, "{name}");
                assert_eq!(
                    sidecar["ports"][0]["containerPort"],
                    i64::from(proxy.listen.port()),
                    "{name}"
                );
                // The app container: the one whose port the proxy forwards to.
                let upstream = i64::from(proxy.upstream.port());
                let app = spec["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| {
                        c["ports"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|p| p["containerPort"] == upstream))
                    })
                    .expect("the upstream port belongs to a container");
                let pre_stop = &app["lifecycle"]["preStop"];
                // The drain token: in the sidecar's environment (where --drain-token reads
                // it) and in the hook's header, the same value.
                let env = sidecar["env"].as_array().expect("the sidecar has env");
                let token = env
                    .iter()
                    .find(|e| e["name"] == inject::TOKEN_ENV)
                    .and_then(|e| e["value"].as_str())
                    .unwrap_or_else(|| panic!("{name}: no {} on the sidecar", inject::TOKEN_ENV));
                assert!(token.len() >= 16, "{name}: {token}");
                if pre_stop.get("httpGet").is_some() {
                    assert_eq!(pre_stop["httpGet"]["port"], admin, "{name}");
                    assert_eq!(pre_stop["httpGet"]["path"], "/drain", "{name}");
                    assert_eq!(
                        pre_stop["httpGet"]["httpHeaders"],
                        serde_json::json!([{"name": inject::TOKEN_HEADER, "value": token}]),
                        "{name}"
                    );
                } else {
                    assert!(
                        template["metadata"]["annotations"][inject::ANN_DEGRADED].is_string(),
                        "{name}: an unwired preStop is marked degraded"
                    );
                }
                // The drain record is on a mount of the pod's in-memory emptyDir, which a
                // restart during termination finds again.
                let record = proxy
                    .drain_record
                    .as_deref()
                    .unwrap_or_else(|| panic!("{name}: no --drain-record"));
                assert_eq!(record, std::path::Path::new(inject::DRAIN_RECORD), "{name}");
                let mount = sidecar["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| record.starts_with(m["mountPath"].as_str().unwrap()))
                    .unwrap_or_else(|| panic!("{name}: --drain-record is on no mount"));
                assert_ne!(mount["readOnly"], true, "{name}");
                let volume = spec["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{name}: no volume {}", mount["name"]));
                assert_eq!(
                    volume["emptyDir"],
                    serde_json::json!({"medium": "Memory", "sizeLimit": "1Mi"}),
                    "{name}"
                );
                let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
                assert!(
                    grace as f64 >= proxy.drain_max.as_secs_f64() + 30.0,
                    "{name}: grace {grace}s < drain-max {:?} + 30s",
                    proxy.drain_max
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} injected templates checked");
}

/// Issue 9: the token contract holds end to end. A `lameduck proxy` given the injected
/// sidecar's environment refuses `/drain` without the header (403) and accepts the hook's
/// header (202), so the env var the sidecar gets is the one `--drain-token` reads.
#[test]
fn injected_token_is_the_one_the_proxy_checks() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let out = std::fs::read_to_string(golden_dir().join("deployment.out.yaml")).unwrap();
    let doc = &documents(&out)[0];
    let spec = &doc["spec"]["template"]["spec"];
    let sidecar = &spec["initContainers"][0];
    let env = &sidecar["env"][0];
    assert_eq!(env["name"], inject::TOKEN_ENV);
    let header = &spec["containers"][0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"][0];
    let (name, value) = (
        header["name"].as_str().unwrap(),
        header["value"].as_str().unwrap(),
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_lameduck"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--upstream", "127.0.0.1:9", "--log-format", "json"])
        .env_clear()
        .env(inject::TOKEN_ENV, env["value"].as_str().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading stderr to the end: a closed pipe would stop the proxy.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let v: Json = serde_json::from_str(&line).unwrap_or(Json::Null);
            if let Some(a) = v["admin"].as_str() {
                let _ = tx.send(a.parse::<std::net::SocketAddr>().unwrap());
            }
        }
    });
    let admin = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the proxy logs its admin address");
    let status = |extra: &str| -> String {
        let mut c = std::net::TcpStream::connect(admin).unwrap();
        write!(
            c,
            "GET /drain?wait=false HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        let _ = c.read_to_string(&mut resp);
        resp.lines().next().unwrap_or_default().to_owned()
    };
    let without = status("");
    let wrong = status(&format!("{name}: not-the-token\r\n"));
    let with = status(&format!("{name}: {value}\r\n"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(without.contains(" 403 "), "{without}");
    assert!(wrong.contains(" 403 "), "{wrong}");
    assert!(with.contains(" 202 "), "{with}");
}

/// Issue 11: a document inject does not change comes out exactly as it went in.
#[test]
fn unchanged_documents_are_copied_byte_for_byte() {
    for case in [
        "hostile-configmap",
        "passthrough",
        "merge-keys",
        "already-injected",
    ] {
        let input = std::fs::read_to_string(golden_dir().join(format!("{case}.in.yaml"))).unwrap();
        let out = inject::inject_manifests(&input, &Settings::default(), false).unwrap();
        if out.injected == 0 {
            assert_eq!(out.yaml, input, "{case}");
        }
    }
    // And a stream mixing both keeps the unchanged documents' text.
    let configmap =
        "# keep me\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {A: \"yes\"}\n";
    let deployment = std::fs::read_to_string(golden_dir().join("deployment.in.yaml")).unwrap();
    let input = format!("{configmap}---\n{deployment}---\n{configmap}");
    let out = inject::inject_manifests(&input, &Settings::default(), false).unwrap();
    assert!(out.yaml.starts_with(configmap), "{}", out.yaml);
    assert!(
        out.yaml.ends_with(&format!("---\n{configmap}")),
        "{}",
        out.yaml
    );
    assert_eq!(out.injected, 1);

    // Directives pass through; helm's `# Source:` line stays above a rewritten document.
    let input = "%YAML 1.1\n---\na: 1\n";
    let out = inject::inject_manifests(input, &Settings::default(), false).unwrap();
    assert_eq!(out.yaml, input);
    let input = format!("a: 1\n---\n# Source: chart/templates/web.yaml\n{deployment}");
    let out = inject::inject_manifests(&input, &Settings::default(), false).unwrap();
    assert!(
        out.yaml
            .starts_with("a: 1\n---\n# Source: chart/templates/web.yaml\n# The common case"),
        "{}",
        out.yaml
    );
    assert_eq!(documents(&out.yaml).len(), 2);
}

/// Issue 11: what a YAML 1.1 reader (PyYAML, as kubectl's go-yaml v2 and Argo CD read)
/// makes of a changed document is what it meant: every hostile string stays a string.
#[test]
fn changed_documents_mean_the_same_to_a_yaml_1_1_reader() {
    let input = std::fs::read_to_string(golden_dir().join("hostile-deployment.in.yaml")).unwrap();
    let out = inject::inject_manifests(&input, &Settings::default(), true).unwrap();
    assert_eq!(out.injected, 1);
    let parsed = documents(&out.yaml);
    let template = &parsed[0]["spec"]["template"];
    assert_eq!(template["metadata"]["labels"][inject::INJECT_LABEL], "yes");
    let env = template["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    // PyYAML from the venv of .ci/install-k8s-tools.sh, never a python3 from PATH.
    let Some(python) = tools::pyyaml_python() else {
        return;
    };
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import sys, yaml, json\n\
             d = yaml.safe_load(sys.stdin.read())\n\
             t = d['spec']['template']\n\
             print(json.dumps({'labels': t['metadata']['labels'], \
             'env': t['spec']['containers'][0]['env']}, default=repr))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(out.yaml.as_bytes())
        .unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let read: Json = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(read["labels"][inject::INJECT_LABEL], "yes", "{read}");
    assert_eq!(read["labels"]["version"], "1.10", "{read}");
    assert_eq!(read["env"], Json::Array(env), "PyYAML read {read}");

    // And the original, read by the same reader, means the same (the test is fair).
    let original: Json = serde_json::from_value(documents(&input)[0].clone()).unwrap();
    assert_eq!(
        original["spec"]["template"]["spec"]["containers"][0]["env"],
        read["env"]
    );
}

/// The emitter writes back every golden document as the same value.
#[test]
fn emitter_round_trips_every_golden() {
    use serde::Deserialize as _;
    for (name, input_path) in cases() {
        let input = std::fs::read_to_string(&input_path).unwrap();
        for de in yaml_serde::Deserializer::from_str(&input) {
            let mut doc = yaml_serde::Value::deserialize(de).unwrap();
            doc.apply_merge().unwrap();
            let text = lameduck::kube::yaml::emit_document(&doc).unwrap();
            let back: yaml_serde::Value =
                yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
            assert_eq!(back, doc, "{name}:\n{text}");
        }
    }
}

/// lameduck's own default for `--quiet` is one the proxy accepts.
#[test]
fn default_quiet_is_a_valid_flag() {
    if let Some(q) = inject::DEFAULT_QUIET {
        lameduck::cli::parse_quiet(q).expect("DEFAULT_QUIET is a valid --quiet");
    }
}

fn documents(yaml: &str) -> Vec<Json> {
    use serde::Deserialize;
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| {
            let mut v = yaml_serde::Value::deserialize(d).unwrap();
            v.apply_merge().unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|d| !d.is_null())
        .collect()
}

/// (pointer, template) for the pod templates of a document, Lists included.
fn templates(doc: &Json) -> Vec<(String, Json)> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    if let Some(items) = doc["items"].as_array() {
        return items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| {
                templates(item)
                    .into_iter()
                    .map(move |(p, t)| (format!("/items/{i}{p}"), t))
            })
            .collect();
    }
    match inject::template_pointer(api, kind) {
        Some(p) => match doc.pointer(p) {
            Some(t) if p.is_empty() => vec![(
                p.to_owned(),
                serde_json::json!({"metadata": t["metadata"], "spec": t["spec"]}),
            )],
            Some(t) => vec![(p.to_owned(), t.clone())],
            None => vec![],
        },
        None => vec![],
    }
}

// === the binary ===

fn lameduck(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lameduck"))
        .args(args)
        .env_remove("LAMEDUCK_SIDECAR_IMAGE")
        .env_remove("LAMEDUCK_NATIVE_SIDECAR")
        .env_remove("LAMEDUCK_INJECT_ALL")
        .env_remove("LAMEDUCK_FILENAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_reads_stdin_and_files_alike() {
    let path = golden_dir().join("deployment.in.yaml");
    let input = std::fs::read_to_string(&path).unwrap();
    let expected = std::fs::read_to_string(golden_dir().join("deployment.out.yaml")).unwrap();
    let (code, stdout, stderr) = lameduck(&["inject"], &input);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(stdout, expected);
    let (code, stdout, _) = lameduck(&["inject", "-f", path.to_str().unwrap()], "");
    assert_eq!(code, 0);
    assert_eq!(stdout, expected);
    let (code, stdout, _) = lameduck(&["inject", "-f", "-"], &input);
    assert_eq!(code, 0);
    assert_eq!(stdout, expected);
}

#[test]
fn cli_flags_reach_the_injection() {
    let input = std::fs::read_to_string(golden_dir().join("deployment.in.yaml")).unwrap();
    let (code, stdout, _) = lameduck(
        &[
            "inject",
            "--sidecar-image",
            "registry.example/lameduck:test",
            "--native-sidecar=false",
        ],
        &input,
    );
    assert_eq!(code, 0);
    assert!(
        stdout.contains("image: registry.example/lameduck:test"),
        "{stdout}"
    );
    assert!(!stdout.contains("initContainers"), "{stdout}");
    assert!(!stdout.contains("restartPolicy: Always"), "{stdout}");
}

#[test]
fn cli_warnings_go_to_stderr() {
    let input = std::fs::read_to_string(golden_dir().join("degraded.in.yaml")).unwrap();
    let (code, stdout, stderr) = lameduck(&["inject"], &input);
    assert_eq!(code, 0);
    assert!(
        stderr.starts_with("lameduck: warning: document "),
        "{stderr}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");
}

#[test]
fn cli_invalid_document_exits_2_naming_it() {
    let input = std::fs::read_to_string(golden_dir().join("invalid-drain-max.in.yaml")).unwrap();
    let (code, stdout, stderr) = lameduck(&["inject"], &input);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stdout, "", "nothing is written when a document fails");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .starts_with("lameduck: document 2 (Deployment api): annotation lameduck.io/drain-max"),
        "{stderr}"
    );

    let (code, _, stderr) = lameduck(&["inject"], "a: [unclosed\n");
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("lameduck: document 1 (unreadable)"),
        "{stderr}"
    );

    let (code, _, stderr) = lameduck(&["inject", "-f", "/nonexistent/manifest.yaml"], "");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read /nonexistent/manifest.yaml"),
        "{stderr}"
    );

    let (code, _, stderr) = lameduck(&["inject", "--native-sidecar=maybe"], "");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--native-sidecar") && stderr.contains("possible values: true, false"),
        "{stderr}"
    );
}

/// Issue 11: what cannot be wired is refused by the binary too: exit 2, one line naming
/// the fix, nothing on stdout (not a pod that looks injected).
#[test]
fn cli_refusal_exits_2_with_one_line_naming_the_fix() {
    for (case, fix) in [
        ("ambiguous-container", "lameduck.io/container"),
        ("neighbour-proxy-on-data-port", "another name"),
        ("existing-prestop", "lameduck.io/replace-prestop"),
        ("service-numeric-target-port", "targetPort: http"),
        ("unknown-annotation", "lameduck.io/drain-max"),
    ] {
        let input = std::fs::read_to_string(golden_dir().join(format!("{case}.in.yaml"))).unwrap();
        let (code, stdout, stderr) = lameduck(&["inject"], &input);
        assert_eq!(code, 2, "{case}: {stderr}");
        assert_eq!(stdout, "", "{case}");
        assert_eq!(stderr.lines().count(), 1, "{case}: {stderr}");
        assert!(stderr.contains(fix), "{case}: {stderr}");
    }
}

#[test]
fn cli_empty_input_is_empty_output() {
    let (code, stdout, stderr) = lameduck(&["inject"], "");
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
}
