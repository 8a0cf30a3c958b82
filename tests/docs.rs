//! The docs, `--help` and the code agree: every flag `--help` lists and every metric the
//! registry exposes is documented in the README or in docs/reference.md (which the README
//! links to), and every pod annotation injection knows is in the README's annotation table.

use std::collections::BTreeSet;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lameduck");

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn reference() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md")).unwrap()
}

/// The README and the reference it links to, as one text to search.
fn documented() -> String {
    let readme = readme();
    assert!(
        readme.contains("](docs/reference.md)"),
        "the README links to docs/reference.md"
    );
    readme + "\n" + &reference()
}

#[test]
fn the_reference_has_a_section_per_subcommand() {
    let reference = reference();
    for heading in [
        "## `lameduck proxy`",
        "## `lameduck webhook`",
        "## `lameduck inject`",
        "## `lameduck drain`",
        "## Admin endpoints",
        "## Metrics",
    ] {
        assert!(
            reference.contains(&format!("\n{heading}")),
            "docs/reference.md has no {heading:?}"
        );
    }
}

fn flags(subcommand: &str) -> BTreeSet<String> {
    let out = Command::new(BIN)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn every_flag_is_documented() {
    let readme = documented();
    for sub in ["proxy", "drain", "inject", "webhook"] {
        let flags = flags(sub);
        assert!(flags.len() > 2, "{sub}: parsed no flags from --help");
        for f in flags {
            assert!(
                readme.contains(&format!("`{f}")) || readme.contains(&format!("[{f}")),
                "`lameduck {sub} {f}` is documented neither in README.md nor in docs/reference.md"
            );
        }
    }
}

#[test]
fn every_metric_is_documented() {
    use lameduck::lifecycle::drain::{DrainSettings, Lifecycle, RequestKind};
    use std::time::Duration;
    let lc = Lifecycle::new(DrainSettings::fixed(
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(1),
    ));
    let m = lameduck::metrics::Metrics::new(lc.clone());
    // tcp mode's families appear (at 0) in tcp mode.
    m.set_mode("tcp");
    // Labelled families appear once they have a sample.
    m.upstream_error("connect");
    let serving = lameduck::lifecycle::drain::Phase::Serving;
    m.record_request(200, serving, RequestKind::Traffic, Duration::from_millis(1));
    m.record_request(
        200,
        serving,
        RequestKind::HealthCheck,
        Duration::from_millis(1),
    );
    lc.request(RequestKind::HealthCheck, [10, 0, 0, 1].into());
    let text = String::from_utf8(m.render()).unwrap();
    let names: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    let docs = documented();
    for n in names {
        assert!(
            docs.contains(&format!("`{n}`")),
            "metric {n} is documented neither in README.md nor in docs/reference.md"
        );
    }
}

#[test]
fn every_annotation_is_in_the_readme_table() {
    let readme = readme();
    for a in lameduck::kube::inject::KNOWN_ANNOTATIONS {
        assert!(
            readme.contains(&format!("| `{a}` |")),
            "annotation {a} is not in the README's annotation table"
        );
    }
}

// === issue 24: what a newcomer reads must be true ===

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Markdown files a reader is sent to: the README and docs/, except docs/design.md (kept
/// by the design work; it states Kubernetes feature versions, checked by hand).
fn doc_files() -> Vec<String> {
    let mut files = vec!["README.md".to_owned()];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "design.md" {
            files.push(format!("docs/{name}"));
        }
    }
    files.sort();
    files
}

/// The version after `≥`/`>=` (and spaces) at the start of `s`, as `1.30`.
fn version_after_ge(s: &str) -> Option<String> {
    let s = s.trim_start();
    let s = s
        .strip_prefix('≥')
        .or_else(|| s.strip_prefix(">="))?
        .trim_start();
    let v: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = v.trim_end_matches('.');
    let mut parts = v.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    (!major.is_empty() && !minor.is_empty()).then(|| format!("{major}.{minor}"))
}

#[test]
fn one_minimum_kubernetes_version_everywhere() {
    // The chart's kubeVersion is the minimum: ">=1.30.0-0".
    let chart = read("charts/lameduck/Chart.yaml");
    let line = chart
        .lines()
        .find_map(|l| l.strip_prefix("kubeVersion:"))
        .expect("Chart.yaml has a kubeVersion");
    let minimum = version_after_ge(line.trim().trim_matches('"')).expect("kubeVersion >=X.Y");
    // Every "Kubernetes ≥ X" / "EKS ... ≥ X" in the README and docs/ says the same.
    let mut claims = 0;
    for file in doc_files() {
        for (n, line) in read(&file).lines().enumerate() {
            for (at, _) in line
                .match_indices("Kubernetes")
                .chain(line.match_indices("EKS"))
            {
                let rest = &line[at..];
                let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                // "Kubernetes ≥ 1.30", "EKS version ≥ 1.30", "EKS ≥ 1.30".
                // A table's cell boundary may come between: "| Kubernetes | ≥ 1.30".
                let after = rest[word_end..].trim_start_matches([' ', '|']);
                let after = after.strip_prefix("version").unwrap_or(after);
                if let Some(v) = version_after_ge(after) {
                    claims += 1;
                    assert_eq!(
                        v,
                        minimum,
                        "{file}:{}: {line:?} gives a minimum other than the chart's kubeVersion",
                        n + 1
                    );
                }
            }
        }
    }
    assert!(
        claims >= 3,
        "the README states the minimum Kubernetes version ({claims} claims found)"
    );
    assert!(
        readme().contains(&format!("Kubernetes ≥ {minimum}")),
        "the README says Kubernetes ≥ {minimum}"
    );
}

/// The README's `## Benchmark` section.
fn benchmark_section(readme: &str) -> &str {
    let at = readme
        .find("\n## Benchmark\n")
        .expect("a ## Benchmark section");
    let rest = &readme[at + 1..];
    &rest[..rest[3..].find("\n## ").map_or(rest.len(), |e| e + 4)]
}

/// The numbers in `text`: runs of digits with `.` and `,` inside (`18.1`, `4,999`).
fn numbers(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
        .map(|t| t.trim_matches(|c| c == '.' || c == ','))
        .filter(|t| t.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_quoted_benchmark_figures_come_from_the_linked_run() {
    let readme = readme();
    let section = benchmark_section(&readme);
    // One run file, named in the section, that exists.
    let runs: BTreeSet<&str> = section
        .split(|c: char| c.is_whitespace() || "()[]`".contains(c))
        .filter(|w| w.starts_with("benches/results/run-") && w.ends_with(".md"))
        .collect();
    assert_eq!(
        runs.len(),
        1,
        "the Benchmark section names one run file: {runs:?}"
    );
    let run_file = *runs.iter().next().unwrap();
    let run = read(run_file);
    let in_run: BTreeSet<String> = numbers(&run).into_iter().collect();
    // Its date and time, as the run file's title gives them.
    let title = run.lines().next().unwrap();
    let when = title.rsplit("run ").next().unwrap().trim();
    assert!(
        section.contains(when),
        "the section quotes the run of {when}"
    );
    let mut checked = 0;
    let mut check = |what: &str, text: &str| {
        for n in numbers(text) {
            checked += 1;
            assert!(
                in_run.contains(&n),
                "README, {what}: {n} is not a figure of {run_file}"
            );
        }
    };
    let mut previous = "";
    for line in section.lines() {
        let header = line.starts_with('|') && !previous.starts_with('|');
        previous = line;
        if header || line.starts_with("|--") || line.starts_with("|---") {
            continue;
        }
        if let Some(row) = line.strip_prefix('|') {
            // Every cell but the row's label.
            let cells: Vec<&str> = row.split('|').skip(1).collect();
            check(line, &cells.join("|"));
        } else if !line.starts_with("One run of") && !line.contains("benches/results/") {
            // Prose: the decimal figures (not counts such as "3 rounds").
            let decimals: Vec<String> = numbers(line)
                .into_iter()
                .filter(|n| n.contains('.'))
                .collect();
            check(line, &decimals.join(" "));
        }
    }
    // Figures quoted elsewhere in the README that cite the benchmark.
    for line in readme.lines().filter(|l| l.contains("](#benchmark)")) {
        let decimals: Vec<String> = numbers(line)
            .into_iter()
            .filter(|n| n.contains('.'))
            .collect();
        check(line, &decimals.join(" "));
    }
    assert!(checked >= 40, "checked only {checked} figures");
}

#[test]
fn every_file_the_readme_names_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = readme();
    // The repository's top-level entries: a word that starts with one of them is a path.
    let top: BTreeSet<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target" && n != ".git")
        .collect();
    let mut named = BTreeSet::new();
    for (n, line) in readme.lines().enumerate() {
        // Markdown links to relative paths.
        for (at, _) in line.match_indices("](") {
            let target = &line[at + 2..];
            let target = &target[..target.find(')').unwrap_or(target.len())];
            if target.starts_with("http") || target.starts_with('#') || target.is_empty() {
                continue;
            }
            let path = target.split('#').next().unwrap();
            named.insert(path.to_owned());
            assert!(
                root.join(path).exists(),
                "README.md:{}: the link {target:?} names no file",
                n + 1
            );
        }
        // Paths in text and code: `tests/chart.rs`, .ci/install-tools, benches/results/....
        for word in line.split(|c: char| c.is_whitespace() || "()[]`'\",;:|".contains(c)) {
            let word = word.split('#').next().unwrap().trim_end_matches(['.', ',']);
            let first = word.split('/').next().unwrap();
            let is_path = (word.contains('/') && top.contains(first)) || top.contains(word);
            if !is_path || word.contains(['<', '>', '*', '$', '{', '=']) {
                continue;
            }
            named.insert(word.to_owned());
            assert!(
                root.join(word).exists(),
                "README.md:{}: {word:?} names no file",
                n + 1
            );
        }
    }
    assert!(
        named.len() >= 15,
        "found only {} paths: {named:?}",
        named.len()
    );
}

#[test]
fn the_readme_reads_in_ten_minutes() {
    let lines = readme().lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines: move detail into docs/ and link it (at most 300)"
    );
}
