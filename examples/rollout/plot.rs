//! The pictures. The single-pod story's timeline (`--svg FILE`): one panel per run,
//! requests/s answered fine and failed over time, with markers for t0, deregistration and
//! the app's SIGTERM. The canary's (`--canary-svg FILE`): one row per run, pods per
//! ReplicaSet over time beside requests/s answered and failed.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::sim::canary::CanaryReport;
use crate::sim::{Kind, Outcome, Report};

type Points = Vec<(f64, f64)>;

/// Width of a rate bucket, in seconds.
const BUCKET: f64 = 0.25;

const OK: RGBColor = RGBColor(46, 139, 87);
const ERR: RGBColor = RGBColor(214, 39, 40);
const DEREG: RGBColor = RGBColor(31, 119, 180);
const SIGTERM: RGBColor = RGBColor(255, 127, 14);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Writes the picture of `reports` to `path`.
pub fn write_svg(path: &str, reports: &[Report]) -> Result<(), String> {
    draw(path, reports).map_err(|e| format!("cannot write {path}: {e}"))
}

fn draw(path: &str, reports: &[Report]) -> Result<(), Box<dyn std::error::Error>> {
    let x0 = reports
        .iter()
        .map(|r| -r.scenario.warmup.as_secs_f64())
        .fold(0.0, f64::min);
    let x1 = reports
        .iter()
        .flat_map(|r| {
            r.samples
                .iter()
                .map(|s| s.end)
                .chain(r.events.iter().map(|e| e.at))
        })
        .fold(1.0, f64::max)
        .ceil()
        + 1.0;
    let series: Vec<_> = reports
        .iter()
        .map(|r| rates(r, -r.scenario.warmup.as_secs_f64(), x1))
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(ok, err)| ok.iter().chain(err).map(|p| p.1))
        .fold(10.0, f64::max)
        * 2.0;

    let root = SVGBackend::new(path, (960, 270 * reports.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for ((panel, report), (ok, err)) in root
        .split_evenly((reports.len(), 1))
        .iter()
        .zip(reports)
        .zip(series)
    {
        let t = &report.traffic;
        let title = format!(
            "{}: {} of {} requests failed ({:.1} %)",
            report.scenario.label,
            t.errors(),
            t.total,
            t.error_rate() * 100.0
        );
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 17))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the pod was deleted (t0)")
            .y_desc("requests/s")
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;

        chart
            .draw_series(LineSeries::new(ok, OK.stroke_width(2)))?
            .label("answered 2xx /s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], OK.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(err, ERR.stroke_width(2)))?
            .label("failed /s (5xx, reset, refused, timeout)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ERR.stroke_width(2)));

        // Markers: a dashed line each, labelled at its top; the label goes left of the line
        // near the right edge, or when another marker shares the moment.
        let markers = [
            (Some(0.0), GREY, "t0: pod deleted", true),
            (Some(report.deregistered), DEREG, "deregistered", false),
            (report.app_sigterm, SIGTERM, "app SIGTERM", false),
        ];
        for (i, (at, color, label, left)) in markers.into_iter().enumerate() {
            let Some(at) = at else { continue };
            chart.draw_series(DashedLineSeries::new(
                [(at, 0.0), (at, ymax)],
                6,
                4,
                color.stroke_width(2),
            ))?;
            let left = left || at > x1 - (x1 - x0) * 0.15;
            let (dx, hpos) = if left {
                (-(x1 - x0) * 0.006, HPos::Right)
            } else {
                ((x1 - x0) * 0.006, HPos::Left)
            };
            let style = ("sans-serif", 13)
                .into_font()
                .color(&color)
                .pos(Pos::new(hpos, VPos::Top));
            let y = ymax * (0.72 - 0.07 * i as f64);
            chart.draw_series(std::iter::once(Text::new(label, (at + dx, y), style)))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Traffic answered fine and failed per second, in `BUCKET` steps from `x0` (the run's
/// start), by completion time.
fn rates(r: &Report, x0: f64, x1: f64) -> (Points, Points) {
    let n = ((x1 - x0) / BUCKET).ceil() as usize;
    let (mut ok, mut err) = (vec![0u32; n], vec![0u32; n]);
    for s in r.samples.iter().filter(|s| s.kind == Kind::Traffic) {
        let i = (((s.end - x0) / BUCKET) as usize).min(n - 1);
        if s.outcome == Outcome::Ok {
            ok[i] += 1;
        } else {
            err[i] += 1;
        }
    }
    let points = |v: Vec<u32>| {
        v.into_iter()
            .enumerate()
            .map(|(i, c)| (x0 + (i as f64 + 0.5) * BUCKET, f64::from(c) / BUCKET))
            .collect()
    };
    (points(ok), points(err))
}

// === the canary story ===

/// Width of a rate bucket in the canary picture, in seconds.
const CANARY_BUCKET: f64 = 0.5;

const STABLE: RGBColor = RGBColor(31, 119, 180);
const CANARY: RGBColor = RGBColor(255, 127, 14);

/// Writes the canary picture of `reports` to `path`: one row per run, pods per ReplicaSet
/// on the left (terminating pods included, until they exit), requests/s answered and
/// failed on the right.
pub fn write_canary_svg(path: &str, reports: &[CanaryReport]) -> Result<(), String> {
    draw_canary(path, reports).map_err(|e| format!("cannot write {path}: {e}"))
}

fn draw_canary(path: &str, reports: &[CanaryReport]) -> Result<(), Box<dyn std::error::Error>> {
    let x0 = -reports
        .iter()
        .map(|r| r.scenario.warmup.as_secs_f64())
        .fold(0.0, f64::max);
    let x1 = reports
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.end))
        .fold(1.0, f64::max)
        .ceil()
        + 1.0;
    let pmax = reports.iter().map(|r| r.peak_pods()).max().unwrap_or(1) as f64 + 1.0;
    let series: Vec<_> = reports.iter().map(|r| canary_rates(r, x0, x1)).collect();
    let ymax = series
        .iter()
        .flat_map(|(ok, err)| ok.iter().chain(err).map(|p| p.1))
        .fold(10.0, f64::max)
        * 1.25;

    let root = SVGBackend::new(path, (1200, 250 * reports.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (row, (report, (ok, err))) in root
        .split_evenly((reports.len(), 1))
        .iter()
        .zip(reports.iter().zip(series))
    {
        let (left, right) = row.split_horizontally(row.dim_in_pixel().0 * 9 / 20);
        let replicas = f64::from(report.scenario.replicas);
        let title = format!(
            "{}: peak {} pods, {:.2}× the {}-pod fleet",
            report.scenario.label,
            report.peak_pods(),
            report.fleet_ratio(),
            report.scenario.replicas
        );
        let mut pods = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(x0..x1, 0.0..pmax)?;
        pods.configure_mesh()
            .x_desc("seconds since the rollout started (t0)")
            .y_desc("pods")
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let (stable, canary, total) = pod_counts(report, x0, x1);
        pods.draw_series(DashedLineSeries::new(
            [(x0, replicas), (x1, replicas)],
            4,
            4,
            GREY.stroke_width(1),
        ))?;
        pods.draw_series(LineSeries::new(total, BLACK.stroke_width(2)))?
            .label("all pods")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        pods.draw_series(LineSeries::new(stable, STABLE.stroke_width(2)))?
            .label("stable ReplicaSet")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], STABLE.stroke_width(2)));
        pods.draw_series(LineSeries::new(canary, CANARY.stroke_width(2)))?
            .label("canary ReplicaSet")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], CANARY.stroke_width(2)));
        pods.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()?;

        let t = &report.traffic;
        let title = format!(
            "{} of {} requests failed ({:.1} %)",
            t.errors(),
            t.total,
            t.error_rate() * 100.0
        );
        let mut reqs = ChartBuilder::on(&right)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(48)
            .build_cartesian_2d(x0..x1, 0.0..ymax)?;
        reqs.configure_mesh()
            .x_desc("seconds since the rollout started (t0)")
            .y_desc("requests/s")
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        // What the ALB's canary weight sends to the canary group: weight × load.
        let rate = report.scenario.rate;
        let mut weight = Vec::new();
        for (i, &(at, w)) in report.weights.iter().enumerate() {
            let next = report.weights.get(i + 1).map_or(x1, |n| n.0);
            let y = rate * f64::from(w) / 100.0;
            weight.push((at.max(x0), y));
            weight.push((next, y));
        }
        reqs.draw_series(LineSeries::new(weight, CANARY.mix(0.6).stroke_width(1)))?
            .label("sent to the canary group (the ALB's weight × load)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], CANARY.mix(0.6)));
        reqs.draw_series(LineSeries::new(ok, OK.stroke_width(2)))?
            .label("answered 2xx /s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], OK.stroke_width(2)));
        reqs.draw_series(LineSeries::new(err, ERR.stroke_width(2)))?
            .label("failed /s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ERR.stroke_width(2)));
        reqs.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Pods running per ReplicaSet and in all, as step lines through every moment a pod
/// started or exited.
fn pod_counts(r: &CanaryReport, x0: f64, x1: f64) -> (Points, Points, Points) {
    let mut moments: Vec<f64> = r
        .pods
        .iter()
        .flat_map(|p| [Some(p.created), p.exited])
        .flatten()
        .filter(|t| (x0..=x1).contains(t))
        .chain([x0, x1])
        .collect();
    moments.sort_by(f64::total_cmp);
    moments.dedup();
    let (mut stable, mut canary, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut before = r.pods_at(x0);
    for t in moments {
        let now = r.pods_at(t);
        for (points, (b, n)) in [
            (&mut stable, (before.0, now.0)),
            (&mut canary, (before.1, now.1)),
            (&mut total, (before.0 + before.1, now.0 + now.1)),
        ] {
            points.push((t, b as f64));
            points.push((t, n as f64));
        }
        before = now;
    }
    (stable, canary, total)
}

/// Traffic answered fine and failed per second, by completion time.
fn canary_rates(r: &CanaryReport, x0: f64, x1: f64) -> (Points, Points) {
    let n = ((x1 - x0) / CANARY_BUCKET).ceil() as usize;
    let (mut ok, mut err) = (vec![0u32; n], vec![0u32; n]);
    for s in r.samples.iter().filter(|s| s.kind == Kind::Traffic) {
        let i = (((s.end - x0) / CANARY_BUCKET).max(0.0) as usize).min(n - 1);
        if s.outcome == Outcome::Ok {
            ok[i] += 1;
        } else {
            err[i] += 1;
        }
    }
    // Up to this run's end: after it, no traffic was sent, none failed.
    let last = r.samples.iter().map(|s| s.end).fold(x0, f64::max);
    let points = |v: Vec<u32>| {
        v.into_iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    x0 + (i as f64 + 0.5) * CANARY_BUCKET,
                    f64::from(c) / CANARY_BUCKET,
                )
            })
            .take_while(|&(x, _)| x <= last)
            .collect()
    };
    (points(ok), points(err))
}
