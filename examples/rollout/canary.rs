//! `cargo run --release --example rollout -- canary`: the seed's Argo Rollouts canary, four
//! runs at once: the app alone and with lameduck, each with `dynamicStableScale` and with
//! the seed's workaround. Prints what the runs use, the control plane's timeline, one table
//! (requests, errors by class, pod-seconds, peak pods) and a verdict; `--canary-svg FILE`
//! draws pods per ReplicaSet and errors over time.
//!
//! This file owns the canary story's command-line defaults, terminal output and table; the
//! simulation is `sim/canary.rs`, the picture `plot.rs`.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::sim::argo::Step;
use crate::sim::canary::{self, CanaryReport, CanaryScenario};
use crate::sim::Recorder;
use crate::{drain, plot, print_aligned, Args, Drain};

/// The four runs from the command line.
fn scenarios(a: &Args) -> Result<Vec<CanaryScenario>, String> {
    if a.health_check_interval.is_zero() {
        return Err("the canary needs health checks (--health-check-interval > 0)".into());
    }
    if !(1..=20).contains(&a.replicas) {
        return Err("--replicas must be between 1 and 20".into());
    }
    if !(a.canary_rate > 0.0 && a.canary_rate <= 5_000.0) {
        return Err("--canary-rate must be above 0 and at most 5000".into());
    }
    let Drain {
        quiet,
        drain_max,
        grace,
    } = drain(a);
    let mut base = CanaryScenario::new(true, true);
    base.replicas = a.replicas;
    base.rate = a.canary_rate;
    base.lag = a.lag;
    base.warmup = a.warmup;
    base.health_check_interval = a.health_check_interval;
    base.unhealthy_threshold = a.unhealthy_threshold.max(1);
    base.request_delay = a.delay;
    base.app_idle_timeout = a.app_idle_timeout;
    base.drain_min = a.drain_min;
    base.quiet = quiet;
    base.drain_max = drain_max;
    base.grace = grace;
    base.pause = a.pause.unwrap_or(a.lag + quiet + Duration::from_secs(1));
    base.scale_down_delay = a.scale_down_delay;
    base.extra_proxy_args = a.proxy_arg.clone();
    if base.horizon() > Duration::from_secs(600) {
        return Err("the canary's pauses, lag and drain must stay within 10 minutes".into());
    }
    Ok(CanaryScenario::four(&base))
}

/// Runs the four canaries at once; `Ok(false)` if a lameduck run failed a request or let
/// an app be signalled while its pod was registered.
pub fn story(a: &Args, runtime: &tokio::runtime::Runtime) -> Result<bool, String> {
    let scenarios = scenarios(a)?;
    print_header(&scenarios[0]);
    let recorders: Vec<Arc<Recorder>> = scenarios.iter().map(|_| Recorder::new()).collect();
    let reports = runtime.block_on(async {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let display = tokio::spawn(show_progress(recorders.clone(), stopped));
        let runs: Vec<_> = scenarios
            .iter()
            .zip(&recorders)
            .map(|(s, rec)| {
                let (s, rec) = (s.clone(), rec.clone());
                tokio::spawn(async move { canary::run(&s, rec).await })
            })
            .collect();
        let mut results = Vec::new();
        for run in runs {
            results.push(run.await.map_err(|e| format!("a canary run failed: {e}")));
        }
        let _ = stop.send(());
        let _ = display.await;
        results
            .into_iter()
            .map(|r| r.and_then(|r| r))
            .collect::<Result<Vec<_>, _>>()
    })?;
    print_timeline(&reports[0]);
    print_table(&reports);
    let ok = print_verdict(&reports);
    if let Some(path) = &a.canary_svg {
        plot::write_canary_svg(path, &reports)?;
        println!("Picture written to {path}");
    }
    Ok(ok)
}

fn d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn print_header(s: &CanaryScenario) {
    println!(
        "lameduck canary demo: the seed's Argo Rollouts canary behind a simulated ALB, \
         four runs at once, all on 127.0.0.1\n"
    );
    println!(
        "  load           {} req/s ({:.0}/min; the seed's: 15,000/min), open-loop, over one listener rule",
        s.rate,
        s.rate * 60.0
    );
    println!(
        "                 weighting two target groups, stable and canary; a keep-alive pool per target"
    );
    println!(
        "  health checks  every {} per target on a new connection; {} failures take a target out of",
        d(s.health_check_interval),
        s.unhealthy_threshold
    );
    println!("                 rotation (a group with none healthy fails open)");
    println!(
        "  controller     the AWS Load Balancer Controller applies weights, registrations and"
    );
    println!(
        "                 deregistrations {} after they are asked for (the seed's 70s ModifyRule lag)",
        d(s.lag)
    );
    println!("  Argo           spec.replicas {}; steps:", s.replicas);
    // One line per pause.
    let mut line = Vec::new();
    for st in &s.steps {
        match st {
            Step::Pause => {
                line.push(format!("pause {}", d(s.pause)));
                println!("                   {}", line.join(", "));
                line.clear();
            }
            other => line.push(other.to_string()),
        }
    }
    if !line.is_empty() {
        println!("                   {}", line.join(", "));
    }
    println!(
        "                 canary = ⌈weight × {}⌉; dynamicStableScale: stable = ⌈(100 − weight) × {}⌉ as soon as the",
        s.replicas, s.replicas
    );
    println!(
        "                 weight is written; workaround: dynamicStableScale false, scaleDownDelaySeconds {}",
        d(s.scale_down_delay)
    );
    println!(
        "  pods           app answers in {}, closes idle connections after {}, no SIGTERM handler;",
        d(s.request_delay),
        d(s.app_idle_timeout)
    );
    println!(
        "                 lameduck as a native sidecar: {}; grace period {}",
        s.proxy_args().join(" "),
        d(s.grace)
    );
    println!(
        "  cost           pod-seconds from t0 (the rollout starts) to t0 + {:.0}s, terminating pods included\n",
        s.horizon().as_secs_f64()
    );
}

/// A progress line on a terminal (requests failed per run, in table order) every 250 ms
/// until `stop`.
async fn show_progress(recs: Vec<Arc<Recorder>>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let tty = std::io::stdout().is_terminal();
    if !tty {
        println!("running…");
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => {
                if tty {
                    print!("\r\x1b[2K");
                    let _ = std::io::stdout().flush();
                }
                return;
            }
        }
        if tty {
            let at = recs[0]
                .live()
                .at
                .map_or("starting".to_owned(), |t| format!("t0{t:+.0}s"));
            let failed: Vec<String> = recs.iter().map(|r| r.live().errors.to_string()).collect();
            print!(
                "\r\x1b[2K  {at:>7}  requests failed so far, run by run: {}",
                failed.join(" · ")
            );
            let _ = std::io::stdout().flush();
        }
    }
}

/// The control plane's log of one run (every run follows the same steps).
fn print_timeline(r: &CanaryReport) {
    println!(
        "▶ control plane, as in every run (times from \"{}\")",
        r.scenario.label
    );
    for (at, line) in &r.timeline {
        println!("  t0{at:+6.2}s  {line}");
    }
    println!();
}

fn print_table(reports: &[CanaryReport]) {
    let mut rows = vec![[
        "run",
        "requests",
        "ok",
        "5xx",
        "reset/EOF",
        "refused",
        "timeout",
        "error rate",
        "pods removed",
        "peak pods",
        "pod-seconds",
        "vs 5 pods",
        "drains",
        "app SIGTERM vs deregistration",
    ]
    .map(String::from)
    .to_vec()];
    rows[0][11] = format!("vs {} pods", reports[0].scenario.replicas);
    for r in reports {
        let t = &r.traffic;
        let status = if t.status.is_empty() {
            "0".to_owned()
        } else {
            t.status
                .iter()
                .map(|(code, n)| format!("{code}×{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let sigterm = match r.earliest_sigterm_after_deregistration() {
            Some(d) if d < 0.0 => format!("up to {:.1}s before", -d),
            Some(d) => format!("{d:.1}s after or later"),
            None => "-".to_owned(),
        };
        rows.push(vec![
            r.scenario.label.clone(),
            t.total.to_string(),
            t.ok.to_string(),
            status,
            t.reset.to_string(),
            t.refused.to_string(),
            t.timeout.to_string(),
            format!("{:.2} %", t.error_rate() * 100.0),
            r.removed().to_string(),
            r.peak_pods().to_string(),
            format!("{:.0}", r.pod_seconds()),
            format!("{:.2}×", r.fleet_ratio()),
            drains(r),
            sigterm,
        ]);
    }
    print_aligned(&rows);
}

/// lameduck's drains, as `/drain` answered them: `5 quiet, 8.0-8.1s`.
fn drains(r: &CanaryReport) -> String {
    let answers: Vec<_> = r.pods.iter().filter_map(|p| p.drain.as_ref()).collect();
    let failed = r.pods.iter().filter(|p| p.hook_error.is_some()).count();
    if answers.is_empty() && failed == 0 {
        return "-".to_owned();
    }
    let quiet = answers.iter().filter(|d| d.reason == "quiet").count();
    let (lo, hi) = answers.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), d| {
        (lo.min(d.seconds), hi.max(d.seconds))
    });
    let mut out = format!("{quiet} quiet");
    if quiet < answers.len() {
        out.push_str(&format!(", {} max", answers.len() - quiet));
    }
    if failed > 0 {
        out.push_str(&format!(", {failed} hook failed"));
    }
    if !answers.is_empty() {
        out.push_str(&format!(", {lo:.1}-{hi:.1}s"));
    }
    out
}

/// The verdict: what the canary costs without lameduck and with it. False if a lameduck
/// run failed.
fn print_verdict(reports: &[CanaryReport]) -> bool {
    let find = |lameduck: bool, dynamic: bool| {
        reports
            .iter()
            .find(|r| r.scenario.lameduck == lameduck && r.scenario.dynamic_stable_scale == dynamic)
    };
    let mut bad = Vec::new();
    for r in reports.iter().filter(|r| r.scenario.lameduck) {
        if r.traffic.errors() > 0 {
            bad.push(format!(
                "{}: {} failed requests",
                r.scenario.label,
                r.traffic.errors()
            ));
        }
        if r.drains_capped() > 0 {
            bad.push(format!(
                "{}: {} drains hit --drain-max",
                r.scenario.label,
                r.drains_capped()
            ));
        }
        if let Some(t) = r
            .earliest_sigterm_after_deregistration()
            .filter(|t| *t < 0.0)
        {
            bad.push(format!(
                "{}: an app signalled {:.1}s before deregistration",
                r.scenario.label, -t
            ));
        }
    }
    if !bad.is_empty() {
        println!(
            "Verdict: lameduck did NOT protect this canary ({}).",
            bad.join("; ")
        );
        return false;
    }
    let (Some(alone), Some(workaround), Some(with)) =
        (find(false, true), find(false, false), find(true, true))
    else {
        return true;
    };
    println!(
        "Verdict: without lameduck this canary either failed {} of {} requests ({:.1} %, \
         dynamicStableScale) or kept the old fleet up: up to {} pods, {:.2}× the fleet's \
         pod-seconds (the workaround); with lameduck and dynamicStableScale, {} failed, at \
         up to {} pods and {:.2}×.",
        alone.traffic.errors(),
        alone.traffic.total,
        alone.traffic.error_rate() * 100.0,
        workaround.peak_pods(),
        workaround.fleet_ratio(),
        with.traffic.errors(),
        with.peak_pods(),
        with.fleet_ratio()
    );
    true
}
