//! The observability kit (k8s/observability) against the binary.
//!
//! Always: every metric a dashboard panel or an alerting rule queries is one the proxy's
//! registry exports (the registry rendered as in tests/docs.rs), with only label names that
//! metric has (or that Prometheus adds to a target: namespace, pod, ...); every panel has a
//! query; the PodMonitor scrapes the port name and path the injected sidecar serves.
//!
//! With promtool (installed by `.ci/install-promtool.sh`): the PrometheusRule's
//! `spec.groups` pass `promtool check rules`, and `promtool test rules` runs the unit tests
//! in tests/observability/rules.test.yaml (each alert fires on the series it is for, and not
//! on the ones it is not). Skipped with a plain message when promtool is missing, unless
//! `LAMEDUCK_REQUIRE_TOOLS=1`, where it fails.

#[path = "support/tools.rs"]
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lameduck::lifecycle::drain::{DrainSettings, Lifecycle, Phase, RequestKind};
use serde::Deserialize;
use serde_json::Value as Json;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_file(path: &str) -> Json {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    Json::deserialize(yaml_serde::Deserializer::from_str(&text)).unwrap()
}

/// Every metric family the proxy exports, with the label names its samples carry.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let lc = Lifecycle::new(DrainSettings::fixed(
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(1),
    ));
    let m = lameduck::metrics::Metrics::new(lc.clone());
    // Labelled families appear once they have a sample.
    m.upstream_error("connect");
    m.record_request(200, Phase::Serving, RequestKind::Traffic, Duration::ZERO);
    m.record_request(
        200,
        Phase::Serving,
        RequestKind::HealthCheck,
        Duration::ZERO,
    );
    lc.request(RequestKind::HealthCheck, [10, 0, 0, 1].into());
    let text = String::from_utf8(m.render()).unwrap();
    let mut families: BTreeMap<String, BTreeSet<String>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| (n.to_owned(), BTreeSet::new()))
        .collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, rest) = line.split_at(line.find(['{', ' ']).unwrap());
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| families.contains_key(*f))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| name.to_owned());
        let labels = families.get_mut(&family).unwrap();
        if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split('}').next()) {
            for pair in inner.split(',') {
                let label = pair.split('=').next().unwrap();
                if label != "le" {
                    labels.insert(label.to_owned());
                }
            }
        }
    }
    assert!(families.len() >= 14, "{families:?}");
    families
}

/// The metric table of src/metrics.rs's module doc: name -> label names. It lists the
/// families the exposition omits until they have a sample (a health-check source's learned
/// interval), and is checked against the exposition where they overlap.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    src.lines()
        .filter_map(|l| l.strip_prefix("//! | `lameduck_"))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = format!("lameduck_{}", cells[0].trim_end_matches('`'));
            let labels = cells[2]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .filter(|l| !l.is_empty())
                .collect();
            (name, labels)
        })
        .collect()
}

/// What a query may use: the documented families, after checking that the documentation
/// agrees with what the registry exports.
fn known_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let documented = documented();
    for (name, labels) in exported() {
        let doc = documented
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is exported but not in src/metrics.rs's table"));
        assert_eq!(doc, &labels, "{name}: labels in src/metrics.rs's table");
    }
    documented
}

/// Labels Prometheus itself puts on a scraped target's series (PodMonitor defaults), and
/// `le` of histogram buckets.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
    "service",
    "le",
];

/// (query, where) for every panel target and every rule.
fn queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(root().join("k8s/observability/dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            out.push((
                t["expr"].as_str().unwrap().to_owned(),
                format!("dashboard panel {}", panel["title"]),
            ));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            out.push((q.to_owned(), format!("dashboard variable {}", var["name"])));
        }
    }
    let rule = yaml_file("k8s/observability/prometheusrule.yaml");
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            out.push((
                r["expr"].as_str().unwrap().to_owned(),
                format!(
                    "rule {}",
                    r["alert"].as_str().or(r["record"].as_str()).unwrap()
                ),
            ));
        }
    }
    out
}

/// Every `lameduck_*` identifier of a PromQL query, with the label names of the matcher
/// that follows it (`name{a="x",b=~"y"}`), if any.
fn metric_refs(query: &str) -> Vec<(String, Vec<String>)> {
    let bytes = query.as_bytes();
    let mut refs = Vec::new();
    let mut i = 0;
    while let Some(at) = query[i..].find("lameduck_") {
        let start = i + at;
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if start > 0 && word(bytes[start - 1]) {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        let name = query[start..end].to_owned();
        let mut labels = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = end + query[end..].find('}').unwrap();
            for m in query[end + 1..close].split(',') {
                let key: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !key.is_empty() {
                    labels.push(key);
                }
            }
            end = close;
        }
        refs.push((name, labels));
        i = end;
    }
    refs
}

#[test]
fn metric_refs_parse_names_and_labels() {
    assert_eq!(
        metric_refs(
            r#"sum by (kind) (rate(lameduck_upstream_errors_total{namespace=~"$ns", kind!="x"}[5m])) / lameduck_state"#
        ),
        vec![
            (
                "lameduck_upstream_errors_total".to_owned(),
                vec!["namespace".to_owned(), "kind".to_owned()]
            ),
            ("lameduck_state".to_owned(), vec![])
        ]
    );
}

#[test]
fn dashboard_and_rules_query_only_exported_metrics() {
    let families = known_metrics();
    let queries = queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for (query, place) in &queries {
        let refs = metric_refs(query);
        assert!(!refs.is_empty(), "{place}: no lameduck metric in {query:?}");
        for (name, labels) in refs {
            let known = families.get(&name).unwrap_or_else(|| {
                panic!("{place}: {name} is not a metric lameduck exports ({query:?})")
            });
            for l in labels {
                assert!(
                    known.contains(&l) || TARGET_LABELS.contains(&l.as_str()),
                    "{place}: {name} has no label {l} (it has {known:?})"
                );
            }
            used.insert(name);
        }
    }
    // What the kit is for: each of these is on the dashboard or in an alert.
    for name in [
        "lameduck_drains_total",
        "lameduck_drain_duration_seconds",
        "lameduck_requests_total",
        "lameduck_upstream_errors_total",
        "lameduck_quiet_window_seconds",
    ] {
        assert!(used.contains(name), "{name} is not used: {used:?}");
    }
}

#[test]
fn dashboard_panels_are_distinct_and_use_the_datasource_variable() {
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(root().join("k8s/observability/dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "lameduck");
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Drains by reason",
        "Drain duration",
        "Requests served while draining",
        "Late requests after drained",
        "Upstream errors by kind",
        "Learned quiet window",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        // No two panels overlap on the grid.
        let rect = |p: &Json| {
            let g = &p["gridPos"];
            ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap())
        };
        let [x, y, w, hh] = rect(p);
        for q in panels.iter().filter(|q| q["id"] != p["id"]) {
            let [x2, y2, w2, h2] = rect(q);
            let overlap = x < x2 + w2 && x2 < x + w && y < y2 + h2 && y2 < y + hh;
            assert!(!overlap, "{} overlaps {}", p["title"], q["title"]);
        }
    }
}

#[test]
fn podmonitor_scrapes_the_sidecar_admin_port() {
    let pm = yaml_file("k8s/observability/podmonitor.yaml");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"][lameduck::kube::inject::INJECT_LABEL],
        "true"
    );
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["path"], "/metrics");
    // The name injection gives the admin port, as the goldens show.
    let golden =
        std::fs::read_to_string(root().join("tests/golden/inject/deployment.out.yaml")).unwrap();
    let port = ep["port"].as_str().unwrap();
    assert!(
        golden.contains(&format!("- name: {port}\n")),
        "the injected sidecar has no port named {port}"
    );
}

// === with promtool ===

#[test]
fn promtool_checks_and_tests_the_rules() {
    let Some(promtool) = tools::promtool() else {
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lameduck-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rule = yaml_file("k8s/observability/prometheusrule.yaml");
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string(&groups).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/observability/rules.test.yaml"),
        dir.join("rules.test.yaml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "rules.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
