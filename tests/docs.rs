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
    use lameduck::drain::{DrainSettings, Lifecycle, RequestKind};
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
    let serving = lameduck::drain::Phase::Serving;
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
