//! The last test binary `cargo test` runs (cargo runs integration tests in name order): it
//! prints how many tests of this `cargo test` run skipped for want of an outside tool, so a
//! run that skipped reads differently from one that did not. Each skip appended a line to the
//! run's log (tests/support/tools.rs); this reads it, prints the count on stderr (past the
//! harness's capture) and removes it.
//!
//! Run alone (`cargo test --test zz_skip_count`) it sees only its own run, which skipped
//! nothing. Under `LAMEDUCK_REQUIRE_TOOLS=1` nothing is ever skipped: a skip is a failure.

#[path = "support/tools.rs"]
mod tools;

use std::collections::BTreeMap;
use std::io::Write as _;

#[test]
fn count_the_tests_this_run_skipped() {
    let log = tools::skip_log();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // A test may skip more than one part (two tools): count tests, name every tool.
    let mut tests: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, '\t');
        let (Some(test), Some(tool)) = (fields.next(), fields.next()) else {
            continue;
        };
        let tool = if tool.is_empty() { "a tool" } else { tool };
        let tools = tests.entry(test).or_default();
        if !tools.contains(&tool) {
            tools.push(tool);
        }
    }
    let mut by_tool: BTreeMap<&str, usize> = BTreeMap::new();
    for tools in tests.values() {
        for t in tools {
            *by_tool.entry(t).or_default() += 1;
        }
    }
    let summary = if tests.is_empty() {
        "SKIPPED: 0 tests in this cargo test run (every outside tool was there)".to_owned()
    } else {
        let tools: Vec<String> = by_tool.iter().map(|(t, n)| format!("{t} {n}")).collect();
        format!(
            "SKIPPED: {} tests in this cargo test run did not run for want of an outside tool \
             ({}); each has its `SKIPPED` line above, and cargo counted it as passed. To run \
             them: `sudo bash .ci/install-tools` (docs/development.md)",
            tests.len(),
            tools.join(", ")
        )
    };
    let _ = writeln!(std::io::stderr(), "\n{summary}\n");
    let _ = std::fs::remove_file(&log);
    // Logs of runs that ended early (a failed test binary stops cargo): gone when their
    // cargo process is.
    if let Ok(dir) = std::fs::read_dir(tools::skip_log_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("run-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    assert!(
        !tools::require_tools() || tests.is_empty(),
        "LAMEDUCK_REQUIRE_TOOLS=1, yet {} tests skipped",
        tests.len()
    );
}
