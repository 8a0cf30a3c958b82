//! The timeline picture (`--svg FILE`): one panel per run, requests/s answered fine and
//! failed over time, with markers for t0, deregistration and the app's SIGTERM.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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
