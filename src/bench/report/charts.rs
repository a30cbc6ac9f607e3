//! The SVG charts: latency CDFs for reads, propagation and writes, and propagation against
//! cluster size.

use std::path::Path as FsPath;

use plotters::prelude::*;

use super::Report;
use crate::bench::read::{Artifact, Path};
use crate::bench::scale::ScaleReport;
use crate::bench::stats::Summary;
use crate::bench::{BenchError, BenchResult};

fn chart_err(path: &FsPath) -> impl Fn(String) -> BenchError + '_ {
    move |message| BenchError::Report {
        path: path.to_path_buf(),
        message,
    }
}

pub(super) fn charts(report: &Report, out: &FsPath) -> BenchResult<()> {
    if let Some(r) = &report.read {
        for (path, file, what) in [
            (Path::Api, "read_api.svg", "in-process API"),
            (Path::Http, "read_http.svg", "HTTP"),
        ] {
            let series: Vec<(String, &Summary, bool)> = Artifact::ALL
                .iter()
                .flat_map(|&a| {
                    [true, false].into_iter().filter_map(move |cached| {
                        r.cell(a, path, cached, 1).map(|c| {
                            (
                                format!(
                                    "{} {}",
                                    a.label(),
                                    if cached { "cached" } else { "TTL 0" }
                                ),
                                &c.latency,
                                cached,
                            )
                        })
                    })
                })
                .collect();
            let f = out.join(file);
            cdf_chart(&f, &format!("Read latency, {what}, concurrency 1"), &series)
                .map_err(chart_err(&f))?;
        }
    }
    if let Some(p) = &report.propagation {
        let series: Vec<(String, &Summary, bool)> = p
            .channels
            .iter()
            .filter(|c| c.skipped.is_none())
            .map(|c| {
                (
                    c.label.clone(),
                    &c.latency,
                    c.id == "peer" || c.id == "tcp_floor",
                )
            })
            .collect();
        let f = out.join("propagation.svg");
        cdf_chart(
            &f,
            &format!(
                "Propagation, {} nodes: write until every peer evicted",
                p.nodes
            ),
            &series,
        )
        .map_err(chart_err(&f))?;
    }
    if let Some(sc) = &report.scale {
        let floor = report
            .propagation
            .as_ref()
            .and_then(|p| p.channel("tcp_floor"))
            .map(|c| c.latency.p50_us);
        let f = out.join("scale.svg");
        scale_chart(&f, sc, floor).map_err(chart_err(&f))?;
    }
    if let Some(w) = &report.write {
        let series: Vec<(String, &Summary, bool)> = w
            .cells
            .iter()
            .filter(|c| c.payload_bytes > 4096)
            .map(|c| {
                (
                    format!("{} writer(s), {}", c.writers, c.variant.label()),
                    &c.latency,
                    c.variant == crate::bench::write::Variant::LogAndNotify,
                )
            })
            .collect();
        let f = out.join("write.svg");
        cdf_chart(&f, "Upsert latency, 33 KB OPT", &series).map_err(chart_err(&f))?;
    }
    Ok(())
}

/// A latency CDF (x: µs on a log scale, y: percentile) with one line per series; `bold` series
/// are drawn thicker.
fn cdf_chart(
    path: &FsPath,
    title: &str,
    series: &[(String, &Summary, bool)],
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let values = series
        .iter()
        .flat_map(|(_, s, _)| s.cdf.iter().map(|p| p.us))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= 0.0 {
        return Ok(());
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format_axis(*v))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, s, bold)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if *bold { 3 } else { 1 };
        let points: Vec<(f64, f64)> = s
            .cdf
            .iter()
            .filter(|p| p.us > 0.0)
            .map(|p| (p.us, p.percentile))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn format_axis(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else if us >= 1.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us} µs")
    }
}

/// Propagation p50, p99 and max against cluster size (both axes log scale), with the raw TCP
/// floor's median for scale.
fn scale_chart(path: &FsPath, sc: &ScaleReport, floor: Option<f64>) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    if sc.rows.is_empty() {
        return Ok(());
    }
    let max_n = sc.rows.iter().map(|r| r.nodes).max().unwrap_or(2) as f64;
    let hi = sc.rows.iter().map(|r| r.latency.max_us).fold(1.0, f64::max);
    let lo = sc
        .rows
        .iter()
        .map(|r| r.latency.p50_us)
        .chain(floor)
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil());
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Peer-channel propagation against cluster size (loopback)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((1.8f64..max_n * 1.1).log_scale(), (lo..hi).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("until every peer evicted, µs")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format_axis(*v))
        .draw()
        .map_err(|x| e(&x))?;
    type Line = (&'static str, fn(&crate::bench::scale::ScaleRow) -> f64);
    let lines: [Line; 3] = [
        ("p50", |r| r.latency.p50_us),
        ("p99", |r| r.latency.p99_us),
        ("max", |r| r.latency.max_us),
    ];
    for (i, (name, f)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = sc.rows.iter().map(|r| (r.nodes as f64, f(r))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|x| e(&x))?;
    }
    if let Some(fl) = floor {
        let color = BLACK.mix(0.5);
        chart
            .draw_series(LineSeries::new(
                vec![(1.8, fl), (max_n * 1.1, fl)],
                color.stroke_width(1),
            ))
            .map_err(|x| e(&x))?
            .label("raw TCP floor, p50")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
