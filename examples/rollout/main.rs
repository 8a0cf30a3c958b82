//! `cargo run --release --example rollout`: the failure lameduck exists for, and the same
//! rollout with lameduck, on one machine in under a minute.
//!
//! One pod behind a simulated ALB, all on 127.0.0.1: steady load, the pod is deleted (t0),
//! the load balancer deregisters it only later (t0 + lag). Run four times: the app alone,
//! the app with lameduck as a regular sidecar, as a native sidecar, and with `--quiet auto`.
//! Prints a live progress line, then a table and a verdict; `--svg FILE` draws the timeline.
//!
//! `-- canary` tells the seed's story instead (`canary.rs`): an Argo Rollouts canary of a
//! fleet behind two weighted target groups, four runs at once; `-- both` tells both.
//! `-- nlb` tells the Network Load Balancer story (`nlb.rs`): a TCP app alone, then behind
//! lameduck `--mode tcp`.
//!
//! This file owns the command line, the single-pod story's terminal output and table; the
//! simulation is in `sim/` (shared with `tests/rollout.rs`), the pictures in `plot.rs`.

mod canary;
mod nlb;
mod plot;
// Shared with tests/rollout.rs, which reads parts of the report the demo does not.
#[allow(dead_code)]
mod sim;

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lameduck::cli::parse_duration;

use sim::{Mode, Recorder, Report, Scenario};

/// Reproduce the ALB 502s of a pod rollout on one machine, then the same rollout with
/// lameduck. Defaults are production scaled down about ten times: health checks every 2 s
/// (15 s), deregistration 5 s after the pod is deleted (70 s seen in production).
#[derive(Parser, Debug)]
#[command(name = "rollout", after_help = AFTER_HELP)]
struct Args {
    /// Which story: one pod deleted behind one target group (`pod`), the seed's Argo
    /// Rollouts canary of a fleet behind two weighted target groups, four runs at once
    /// (`canary`), or both, one after the other; `nlb`: one TCP pod behind a Network Load
    /// Balancer, the app alone and with lameduck --mode tcp.
    #[arg(value_enum, default_value = "pod")]
    story: Story,

    /// Requests per second the load balancer sends (open-loop, paced).
    #[arg(long, default_value_t = 200.0, help_heading = "Load balancer")]
    rate: f64,
    /// Keep-alive connections the load balancer keeps to the pod (it opens more if needed).
    #[arg(long, default_value_t = 16, help_heading = "Load balancer")]
    connections: usize,
    /// Health checks on the traffic port, each on a new connection; `0` for none.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration,
          help_heading = "Load balancer")]
    health_check_interval: Duration,
    /// Health checks come from this many addresses, 127.0.0.1 up (an ALB checks from each
    /// of its nodes). More than 1 needs the whole 127.0.0.0/8 on loopback, as on Linux.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        help_heading = "Load balancer"
    )]
    health_check_sources: u8,
    /// Deregistration lag: the load balancer keeps sending this long after the pod is
    /// deleted (the AWS Load Balancer Controller's, 70 s seen in production).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration,
          help_heading = "Load balancer")]
    lag: Duration,
    /// Steady load before the pod is deleted.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration,
          help_heading = "Load balancer")]
    warmup: Duration,

    /// The app's time to answer a request.
    #[arg(long, value_name = "DUR", default_value = "2ms", value_parser = parse_duration,
          help_heading = "App")]
    delay: Duration,
    /// Share of requests (0 to 1) that take --slow-delay instead.
    #[arg(long, value_name = "F", default_value_t = 0.0, help_heading = "App")]
    slow_fraction: f64,
    /// How long a slow request takes.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration,
          help_heading = "App")]
    slow_delay: Duration,
    /// The app closes keep-alive connections idle this long (Node.js: 5 s for years).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration,
          help_heading = "App")]
    app_idle_timeout: Duration,

    /// terminationGracePeriodSeconds [default: --drain-max + 5s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Pod")]
    grace: Option<Duration>,
    /// Which runs, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "alone,regular,native,auto",
        help_heading = "Pod"
    )]
    runs: Vec<Run>,

    /// lameduck --drain-min.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration,
          help_heading = "lameduck")]
    drain_min: Duration,
    /// lameduck --quiet: must exceed the health-check interval [default: the interval plus
    /// half of it, at least 1s more].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "lameduck")]
    quiet: Option<Duration>,
    /// lameduck --drain-max: must cover the lag [default: twice the lag plus --quiet, at
    /// least 15s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "lameduck")]
    drain_max: Option<Duration>,
    /// Any other lameduck proxy flag, e.g. `--proxy-arg=--health-path=/healthz`
    /// (repeatable; replaces a drain flag of the same name).
    #[arg(
        long,
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "lameduck"
    )]
    proxy_arg: Vec<String>,

    /// spec.replicas of the canary's Rollout (the stable fleet).
    #[arg(long, value_name = "N", default_value_t = 5, help_heading = "Canary")]
    replicas: u32,
    /// Requests per second over the canary's two target groups (15,000 a minute).
    #[arg(
        long,
        value_name = "R",
        default_value_t = 250.0,
        help_heading = "Canary"
    )]
    canary_rate: f64,
    /// Every pause step of the canary [default: --lag plus --quiet plus 1s, so that each
    /// step has settled before the next, as with production's 5-10 min pauses].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Canary")]
    pause: Option<Duration>,
    /// scaleDownDelaySeconds of the workaround runs (60 s in production).
    #[arg(long, value_name = "DUR", default_value = "4s", value_parser = parse_duration,
          help_heading = "Canary")]
    scale_down_delay: Duration,
    /// Consecutive failed health checks that take a target out of rotation
    /// (UnhealthyThresholdCount).
    #[arg(long, value_name = "N", default_value_t = 2, help_heading = "Canary")]
    unhealthy_threshold: u32,

    /// Write the single-pod story's timeline picture here.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    svg: Option<String>,
    /// Write the canary story's picture here (pods per ReplicaSet and errors over time).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    canary_svg: Option<String>,
    /// Write lameduck's own log here (nothing is logged to the terminal).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    log: Option<String>,
}

const AFTER_HELP: &str = "\
Try your own numbers: a longer lag (--lag 20s), slow requests (--slow-fraction 0.2), a low
rate carried by health checks (--rate 0.5), the same with a quiet window shorter than the
health-check interval (--rate 0.5 --quiet 1s: lameduck lets go between two checks), a grace
period that runs out before the drain (--grace 4s), another lameduck flag
(--proxy-arg=--health-path=/healthz). Exit code 1 if a lameduck run failed a request or let
the app be signalled before deregistration.

`rollout canary`: the seed's Argo canary, four runs at once (app alone or lameduck, with
dynamicStableScale or the workaround); it uses --lag, --health-check-interval, --warmup, the
app and lameduck flags above, and the Canary ones. Try a longer lag (canary --lag 10s), or
pauses shorter than the lag plus the quiet window (canary --pause 6s): drains then overlap
the next step, and lameduck's peak grows. `rollout both` tells both stories.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Story {
    /// One pod deleted behind one target group.
    Pod,
    /// The seed's Argo canary: four runs at once.
    Canary,
    /// The pod story, then the canary.
    Both,
    /// One TCP pod behind a Network Load Balancer: the app alone, then lameduck --mode tcp.
    Nlb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Run {
    /// The app alone.
    Alone,
    /// lameduck as a regular sidecar, fixed --quiet.
    Regular,
    /// lameduck as a native sidecar, fixed --quiet.
    Native,
    /// lameduck as a native sidecar with --quiet auto (--quiet as its --quiet-fallback).
    Auto,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.log {
        if let Err(e) = init_log(path) {
            eprintln!("rollout: cannot write the log to {path}: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the runtime starts");
    let stories: &[Story] = match args.story {
        Story::Pod => &[Story::Pod],
        Story::Canary => &[Story::Canary],
        Story::Both => &[Story::Pod, Story::Canary],
        Story::Nlb => &[Story::Nlb],
    };
    let mut ok = true;
    for (i, story) in stories.iter().enumerate() {
        if i > 0 {
            println!("\n{}\n", "─".repeat(100));
        }
        let result = match story {
            Story::Canary => canary::story(&args, &runtime),
            Story::Nlb => nlb::story(&runtime),
            _ => pod_story(&args, &runtime),
        };
        match result {
            Ok(fine) => ok &= fine,
            Err(e) => {
                eprintln!("rollout: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The single-pod story: its runs one after the other, the table, the verdict, the
/// picture. `Ok(false)` if a lameduck run failed.
fn pod_story(args: &Args, runtime: &tokio::runtime::Runtime) -> Result<bool, String> {
    let scenarios = scenarios(args)?;
    // The header describes the runs with a fixed --quiet; a run that differs says so.
    let base = scenarios
        .iter()
        .find(|s| s.mode != Mode::AppAlone && s.proxy_arg("--quiet") != Some("auto"))
        .unwrap_or(&scenarios[0])
        .clone();
    print_header(args, &base);

    let mut reports = Vec::new();
    for scn in &scenarios {
        let r = runtime
            .block_on(run_one(scn, &base))
            .map_err(|e| format!("{}: {e}", scn.label))?;
        reports.push(r);
    }
    println!();
    print_table(&reports);
    let ok = print_verdict(&reports);
    if let Some(path) = &args.svg {
        plot::write_svg(path, &reports)?;
        println!("Timeline written to {path}");
    }
    Ok(ok)
}

/// lameduck's drain settings and the grace period, derived from the health-check interval
/// and the lag unless given.
struct Drain {
    quiet: Duration,
    drain_max: Duration,
    grace: Duration,
}

fn drain(a: &Args) -> Drain {
    let interval = a.health_check_interval;
    let quiet = a
        .quiet
        .unwrap_or(interval + (interval / 2).max(Duration::from_secs(1)));
    let drain_max = a
        .drain_max
        .unwrap_or((a.lag * 2 + quiet).max(Duration::from_secs(15)));
    let grace = a.grace.unwrap_or(drain_max + Duration::from_secs(5));
    Drain {
        quiet,
        drain_max,
        grace,
    }
}

/// The runs asked for, with the drain settings derived from the health-check interval and
/// the lag unless given.
fn scenarios(a: &Args) -> Result<Vec<Scenario>, String> {
    let hc = (!a.health_check_interval.is_zero()).then_some(a.health_check_interval);
    let interval = hc.unwrap_or(Duration::ZERO);
    let Drain {
        quiet,
        drain_max,
        grace,
    } = drain(a);
    if !(a.rate >= 0.0 && a.rate <= 20_000.0) {
        return Err(format!("--rate {} must be between 0 and 20000", a.rate));
    }
    if a.warmup + a.lag > Duration::from_secs(600) || grace > Duration::from_secs(600) {
        return Err("--warmup plus --lag, and --grace, must stay within 10 minutes".into());
    }
    if !(0.0..=1.0).contains(&a.slow_fraction) {
        return Err("--slow-fraction must be between 0 and 1".into());
    }
    let mut out = Vec::new();
    for run in &a.runs {
        let mode = match run {
            Run::Alone => Mode::AppAlone,
            Run::Regular => Mode::Regular,
            Run::Native | Run::Auto => Mode::Native,
        };
        let mut s = Scenario::new(mode);
        s.health_check_sources = (1..=a.health_check_sources.clamp(1, 200))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        s.rate = a.rate;
        s.connections = a.connections.max(1);
        s.max_connections = s.max_connections.max(s.connections);
        s.health_check_interval = hc;
        s.lag = a.lag;
        s.warmup = a.warmup;
        s.request_delay = a.delay;
        s.slow_fraction = a.slow_fraction;
        s.slow_delay = a.slow_delay;
        s.app_idle_timeout = a.app_idle_timeout;
        s.grace = grace;
        s.request_timeout = s.request_timeout.max(a.slow_delay + Duration::from_secs(5));
        s.proxy_args = sim::drain_args(a.drain_min, quiet, drain_max);
        if *run == Run::Auto {
            // lameduck fixes the window when the drain starts, from the checks it has seen
            // while serving: four from a source before t0 (a pod that just started falls
            // back to --quiet-fallback).
            s.warmup = s.warmup.max(interval * 7 / 2);
            s.label = "lameduck, native, --quiet auto".into();
            s.set_proxy_arg("--quiet", "auto");
            s.set_proxy_arg(
                "--quiet-fallback",
                &humantime::format_duration(quiet).to_string(),
            );
        }
        for extra in &a.proxy_arg {
            match extra.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => s.set_proxy_arg(flag, value),
                _ => s.proxy_args.push(extra.clone()),
            }
        }
        out.push(s);
    }
    if out.is_empty() {
        return Err("--runs names no run".into());
    }
    Ok(out)
}

fn init_log(path: &str) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    Ok(())
}

fn print_header(a: &Args, s: &Scenario) {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let hc = match s.health_check_interval {
        Some(i) => format!("a health check every {} on a new connection", d(i)),
        None => "no health checks".to_owned(),
    };
    println!("lameduck rollout demo: one pod behind a simulated ALB, all on 127.0.0.1\n");
    println!(
        "  load balancer  {} req/s over {} keep-alive connections; {hc}",
        a.rate, s.connections
    );
    println!(
        "  app            answers in {}; closes idle connections after {}; no SIGTERM handler",
        d(s.request_delay),
        d(s.app_idle_timeout)
    );
    if s.slow_fraction > 0.0 {
        println!(
            "                 {:.0} % of requests take {}",
            s.slow_fraction * 100.0,
            d(s.slow_delay)
        );
    }
    println!(
        "  rollout        {} of steady load, then the pod is deleted (t0); the load balancer",
        d(s.warmup)
    );
    println!(
        "                 deregisters it at t0 + {} (standing for the 70s controller lag seen in production)",
        d(s.lag)
    );
    println!(
        "  lameduck       {}; grace period {}",
        s.proxy_args.join(" "),
        d(s.grace)
    );
    if let (Some(q), Some(i)) = (
        s.proxy_arg("--quiet").and_then(|q| parse_duration(q).ok()),
        s.health_check_interval,
    ) {
        if q > i {
            println!(
                "                 quiet {} > health-check interval {}: while registered the pod is never",
                d(q),
                d(i)
            );
            println!(
                "                 silent that long, so silence means the load balancer has let go"
            );
        } else {
            println!(
                "                 warning: quiet {} does not exceed the health-check interval {}: lameduck may",
                d(q),
                d(i)
            );
            println!("                 end its drain between two checks while the pod is still registered");
        }
    }
}

/// One run, with live output: events as lines, and a progress line on a terminal.
async fn run_one(scn: &Scenario, base: &Scenario) -> Result<Report, String> {
    let tty = std::io::stdout().is_terminal();
    println!("\n▶ {}", scn.label);
    if scn.mode != Mode::AppAlone && scn.proxy_args != base.proxy_args {
        println!("  lameduck {}", scn.proxy_args.join(" "));
    }
    if scn.warmup != base.warmup {
        println!(
            "  {} of steady load before t0, so that lameduck sees the health checks it learns from",
            humantime::format_duration(scn.warmup)
        );
    }
    tracing::info!(run = %scn.label, "=== run starts ===");
    let rec = Recorder::new();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let display = tokio::spawn(show_progress(rec.clone(), tty, stopped));
    let result = sim::run(scn, rec.clone()).await;
    let _ = stop.send(());
    let _ = display.await;
    let r = result?;
    let t = &r.traffic;
    println!(
        "  {} requests, {} ok, {} failed; {} health checks, {} failed; \
         up to {} load balancer connections open, {} opened",
        t.total,
        t.ok,
        t.errors(),
        r.health_checks.total,
        r.health_checks.errors(),
        r.peak_connections,
        r.connections_opened
    );
    Ok(r)
}

/// Prints events as they are recorded and, on a terminal, redraws a progress line under
/// them every 100 ms, until `stop`.
async fn show_progress(
    rec: Arc<Recorder>,
    tty: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut printed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => {
                print_events(&rec, &mut printed, tty);
                if tty {
                    print!("\r\x1b[2K");
                }
                return;
            }
        }
        print_events(&rec, &mut printed, tty);
        if tty {
            let l = rec.live();
            let at =
                l.at.map_or("starting".to_owned(), |t| format!("t0{t:+.1}s"));
            print!(
                "\r\x1b[2K  {at:>9}  sent {}  ok {}  failed {}  in flight {}  health checks {} ({} failed)",
                l.sent, l.ok, l.errors, l.in_flight, l.health_checks, l.health_check_errors
            );
            let _ = std::io::stdout().flush();
        }
    }
}

fn print_events(rec: &Recorder, printed: &mut usize, tty: bool) {
    let events = rec.events_from(*printed);
    for e in &events {
        if tty {
            print!("\r\x1b[2K");
        }
        println!("  t0{:+6.2}s  {}", e.at, e.kind);
    }
    *printed += events.len();
}

fn print_table(reports: &[Report]) {
    let mut rows = vec![[
        "run",
        "requests",
        "ok",
        "5xx",
        "reset/EOF",
        "refused",
        "timeout",
        "error rate",
        "hc failed",
        "quiet window",
        "drain",
        "app SIGTERM vs deregistration",
    ]
    .map(String::from)];
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
        let drain = match (&r.drain, &r.hook_error) {
            (Some(d), _) => format!("{:.1}s ({})", d.seconds, d.reason),
            (None, Some(_)) => "hook failed".to_owned(),
            (None, None) => "-".to_owned(),
        };
        let sigterm = match r.app_sigterm_after_deregistration() {
            Some(d) if d < 0.0 => format!("{:.1}s before", -d),
            Some(d) => format!("{d:.1}s after"),
            None => "never (killed)".to_owned(),
        };
        rows.push([
            r.scenario.label.clone(),
            t.total.to_string(),
            t.ok.to_string(),
            status,
            t.reset.to_string(),
            t.refused.to_string(),
            t.timeout.to_string(),
            format!("{:.2} %", t.error_rate() * 100.0),
            format!("{} of {}", r.health_checks.errors(), r.health_checks.total),
            r.drain
                .as_ref()
                .and_then(|d| d.window.as_ref())
                .map_or("-".to_owned(), |(secs, kind)| format!("{secs:.2}s {kind}")),
            drain,
            sigterm,
        ]);
    }
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    print_aligned(&rows);
}

/// Prints a table: the first column left-aligned, the last one after two spaces, the
/// others right-aligned; a blank line after.
fn print_aligned(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let last = widths.len() - 1;
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[c] - cell.chars().count());
            match c {
                // Text columns left-aligned, figures right-aligned.
                0 => line.push_str(&format!("{cell}{pad}")),
                c if c == last => line.push_str(&format!("  {cell}")),
                _ => line.push_str(&format!("  {pad}{cell}")),
            }
        }
        println!("{line}");
    }
    println!();
}

/// Prints the one-line verdict; false if a lameduck run failed requests or let the app be
/// signalled while the pod was still registered.
fn print_verdict(reports: &[Report]) -> bool {
    let (with, alone): (Vec<&Report>, Vec<&Report>) = reports
        .iter()
        .partition(|r| r.scenario.mode != Mode::AppAlone);
    let mut bad = Vec::new();
    for r in &with {
        if r.traffic.errors() > 0 {
            bad.push(format!(
                "{}: {} failed requests",
                r.scenario.label,
                r.traffic.errors()
            ));
        }
        match r.app_sigterm_after_deregistration() {
            Some(d) if d < 0.0 => bad.push(format!(
                "{}: app signalled {:.1}s before deregistration",
                r.scenario.label, -d
            )),
            _ => {}
        }
    }
    let baseline = alone.first().map(|r| {
        format!(
            "the app alone failed {} of {} requests ({:.1} %)",
            r.traffic.errors(),
            r.traffic.total,
            r.traffic.error_rate() * 100.0
        )
    });
    if !bad.is_empty() {
        println!(
            "Verdict: lameduck did NOT protect this rollout ({}).",
            bad.join("; ")
        );
        return false;
    }
    let after = with
        .iter()
        .filter_map(|r| r.app_sigterm_after_deregistration())
        .fold(f64::INFINITY, f64::min);
    let lameduck = format!(
        "with lameduck, 0 errors: the app got SIGTERM only after the load balancer had let \
         go ({after:.1}s after deregistration or later)"
    );
    match (baseline, with.is_empty()) {
        (Some(b), false) => println!("Verdict: {b}; {lameduck}."),
        (Some(b), true) => println!("Verdict: {b}."),
        (None, _) => println!("Verdict: {lameduck}."),
    }
    true
}
