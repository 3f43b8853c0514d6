//! The SVG plot of `cimg-bench` (with plotters' SVG backend): one panel per metric, the metric
//! against the number of parallel readers, a line per run so that several runs (a cimg mount and
//! a Lustre directory, say) can be overlaid, and a legend naming each run. The value axis is
//! linear from 0, or logarithmic (for runs that differ by orders of magnitude, such as warm and
//! cold ones).

use super::report::{all_readers, metric_title};
use super::{Metric, Run, fmt_si};
use anyhow::{Result, anyhow};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use std::path::Path;

/// Distinct line colours (the "tab10" palette); runs beyond ten reuse them.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// The value axis of the plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// From 0 to a bit above the largest value.
    Linear,
    /// Decades: the values' common logarithms on a linear axis, labelled with the values.
    Log,
}

/// Writes the plot of `runs` to `path` (an SVG file).
pub fn write_svg(runs: &[Run], path: &Path, scale: Scale) -> Result<()> {
    let readers = all_readers(runs);
    let metrics: Vec<Metric> = Metric::ALL
        .into_iter()
        .filter(|m| runs.iter().any(|r| r.metric(*m).is_some()))
        .collect();
    let cols = 3.min(metrics.len().max(1));
    let rows = metrics.len().div_ceil(cols).max(1);
    let legend_h = 30 + 22 * runs.len() as u32;
    let (w, h) = (420 * cols as u32, 320 * rows as u32 + legend_h);
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(legend_h);
    let top = top
        .titled(
            "cimg-bench: throughput against parallel readers",
            ("sans-serif", 20),
        )
        .map_err(err)?;
    for (k, run) in runs.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let y = 8 + 22 * k as i32;
        top.draw(&PathElement::new(
            vec![(20, y), (50, y)],
            color.stroke_width(3),
        ))
        .map_err(err)?;
        top.draw(&Circle::new((35, y), 4, color.filled()))
            .map_err(err)?;
        let text = format!(
            "{} ({} cache, {} s per point, {} cores)",
            run.label, run.cache, run.duration_secs, run.cores
        );
        top.draw(&Text::new(text, (60, y - 7), ("sans-serif", 14)))
            .map_err(err)?;
    }

    let n = readers.len().max(1) as i32;
    let x_fmt = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => readers
            .get(*i as usize)
            .map(|r| r.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let y_fmt = |v: &f64| match scale {
        Scale::Linear => fmt_si(*v),
        Scale::Log => fmt_si(10f64.powf(*v)),
    };
    for (panel, m) in body.split_evenly((rows, cols)).into_iter().zip(&metrics) {
        let results: Vec<_> = runs.iter().map(|r| (r, r.metric(*m))).collect();
        let title = results
            .iter()
            .find_map(|(run, r)| r.map(|r| metric_title(r, run.block_size)))
            .unwrap_or_else(|| m.title().to_string());
        let values: Vec<f64> = results
            .iter()
            .filter_map(|(_, r)| *r)
            .flat_map(|r| r.points.iter().map(|p| p.value))
            .filter(|v| *v > 0.0)
            .collect();
        let max = values.iter().copied().fold(0.0f64, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let (y, yrange) = match scale {
            Scale::Linear => (
                (|v: f64| v) as fn(f64) -> f64,
                0f64..if max > 0.0 { max * 1.1 } else { 1.0 },
            ),
            Scale::Log if max > 0.0 => (
                f64::log10 as fn(f64) -> f64,
                min.log10().floor()..(max.log10().ceil()).max(min.log10().floor() + 1.0),
            ),
            Scale::Log => (f64::log10 as fn(f64) -> f64, 0f64..1.0),
        };
        let decades = (yrange.end - yrange.start).round() as usize;
        let mut chart = ChartBuilder::on(&panel)
            .caption(format!("{title}, {}", m.unit()), ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((0..n - 1).into_segmented(), yrange)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_max_light_lines(1)
            .x_labels(readers.len())
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_labels(match scale {
                Scale::Linear => 10,
                Scale::Log => decades + 1,
            })
            .x_desc("parallel readers")
            .y_desc(match scale {
                Scale::Linear => m.unit().to_string(),
                Scale::Log => format!("{} (log scale)", m.unit()),
            })
            .draw()
            .map_err(err)?;
        let mut drawn = 0;
        for (k, (_, r)) in results.iter().enumerate() {
            let Some(r) = r else { continue };
            let color = COLORS[k % COLORS.len()];
            let pts: Vec<(SegmentValue<i32>, f64)> = r
                .points
                .iter()
                .filter_map(|p| {
                    let i = readers.iter().position(|&x| x == p.readers)?;
                    (p.value > 0.0 || scale == Scale::Linear)
                        .then(|| (SegmentValue::CenterOf(i as i32), y(p.value)))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            drawn += 1;
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?;
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        if drawn == 0 {
            let (pw, ph) = panel.dim_in_pixel();
            panel
                .draw(&Text::new(
                    "not measured (see the table)",
                    (pw as i32 / 2 - 80, ph as i32 / 2),
                    ("sans-serif", 14),
                ))
                .map_err(err)?;
        }
    }
    root.present()
        .map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}
