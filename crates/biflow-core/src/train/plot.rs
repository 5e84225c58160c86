//! metrics.jsonl upkeep and the loss plot.

use std::fs;
use std::path::Path;

use anyhow::Result;
use plotters::drawing::IntoDrawingArea;
use serde_json::Value;

/// Drop the lines after `step` (a resumed run rewrites them).
pub(super) fn rewrite_metrics_up_to(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let mut keep = String::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v.get("step").and_then(Value::as_u64).is_some_and(|s| s <= step) {
                keep.push_str(line);
                keep.push('\n');
            }
        }
    }
    crate::io::atomic::write(path, keep.as_bytes())
}

/// A series read from metrics.jsonl: (step, value) where both are finite.
pub fn series(metrics: &Path, key: &str) -> Vec<(f64, f64)> {
    let text = fs::read_to_string(metrics).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect()
}

/// Throughput (steps/s) over training, from the cumulative `time` of metrics.jsonl, averaged over
/// windows of about 1/50 of the run.
pub fn throughput(metrics: &Path) -> Vec<(f64, f64)> {
    let t = series(metrics, "time");
    let win = (t.len() / 50).max(1);
    let mut out = Vec::new();
    let mut i = win;
    while i < t.len() {
        let (a, b) = (t[i - win], t[i]);
        if b.1 > a.1 && b.0 > a.0 {
            out.push((b.0, (b.0 - a.0) / (b.1 - a.1)));
        }
        i += win;
    }
    out
}

/// A moving average over windows of about 1/50 of the points.
pub fn smooth(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let win = (pts.len() / 50).max(1);
    let mut acc = 0.0;
    let mut out = Vec::with_capacity(pts.len());
    for i in 0..pts.len() {
        acc += pts[i].1;
        if i >= win {
            acc -= pts[i - win].1;
        }
        out.push((pts[i].0, acc / (i + 1).min(win) as f64));
    }
    out
}

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

/// One line chart: raw points (light) and their moving average, axes with ticks and labels.
fn draw_chart<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    pts: &[(f64, f64)],
    log_y: bool,
) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw the chart '{title}': {e}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| !log_y || p.1 > 0.0).collect();
    let (x0, x1) = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1.0)),
        _ => (0.0, 1.0),
    };
    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut lo, mut hi) = match ys.len() {
        0 => (0.0, 1.0),
        n => (ys[0], ys[((n - 1) as f64 * 0.98) as usize]),
    };
    if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        lo -= pad;
        hi += pad;
    }
    let mut chart = ChartBuilder::on(&root);
    chart.caption(title, ("sans-serif", 18)).margin(10).x_label_area_size(40).y_label_area_size(70);
    let raw = RGBColor(150, 180, 230);
    let line = RGBColor(20, 60, 170);
    let smooth_pts = smooth(&pts);
    macro_rules! body {
        ($c:expr) => {{
            let mut c = $c;
            c.configure_mesh()
                .x_desc("step")
                .y_desc(y_label)
                .label_style(("sans-serif", 13))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| err(&e))?;
            if pts.len() > 1 {
                c.draw_series(pts.iter().map(|p| Circle::new(*p, 1, raw.filled()))).map_err(|e| err(&e))?;
                c.draw_series(LineSeries::new(smooth_pts.iter().copied(), line.stroke_width(2))).map_err(|e| err(&e))?;
            }
        }};
    }
    if log_y {
        // Whole decades: a log axis is labelled at powers of ten, and a range inside one decade
        // (a gradient norm between 0.8 and 6) would show none.
        let lo = lo.max(hi * 1e-6).max(f64::MIN_POSITIVE);
        let (lo, hi) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
        let hi = hi.max(lo * 10.0);
        body!(chart.build_cartesian_2d(x0..x1, (lo..hi).log_scale()).map_err(|e| err(&e))?);
    } else {
        body!(chart.build_cartesian_2d(x0..x1, lo..hi).map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A chart as a PNG image (w x h).
pub fn chart_png(title: &str, y_label: &str, pts: &[(f64, f64)], log_y: bool, (w, h): (u32, u32)) -> Result<image::RgbImage> {
    register_font();
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = plotters::prelude::BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_chart(root, title, y_label, pts, log_y)?;
    }
    Ok(image::RgbImage::from_raw(w, h, buf).expect("buffer of the right size"))
}

/// A chart as an SVG document (w x h).
pub fn chart_svg(title: &str, y_label: &str, pts: &[(f64, f64)], log_y: bool, (w, h): (u32, u32)) -> Result<String> {
    register_font();
    let mut s = String::new();
    {
        let root = plotters::prelude::SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
        draw_chart(root, title, y_label, pts, log_y)?;
    }
    Ok(s)
}

/// Draw the training loss (raw points and a moving average) with axes, ticks and labels into a PNG.
pub fn plot_loss(metrics: &Path, out: &Path) -> Result<()> {
    let pts = series(metrics, "loss");
    let img = chart_png("training loss", "loss", &pts, false, (800, 450))?;
    crate::io::atomic::write_png(out, &image::DynamicImage::ImageRgb8(img))
}

#[cfg(test)]
mod tests {
    /// A log axis whose values sit inside one decade (no power of ten among them) still gets
    /// numbered ticks: the decades around them.
    #[test]
    fn log_axis_inside_one_decade_has_tick_labels() {
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (100.0 + i as f64, 2.0 + 0.5 * (i % 7) as f64)).collect();
        let svg = super::chart_svg("gradient norm", "norm", &pts, true, (400, 300)).unwrap();
        let labels: Vec<&str> = svg.split("<text").skip(1).filter_map(|t| Some(t.split('>').nth(1)?.split('<').next()?.trim())).collect();
        for decade in ["1.0", "10.0"] {
            assert!(labels.contains(&decade), "no y tick {decade}: {labels:?}");
        }
    }
}
