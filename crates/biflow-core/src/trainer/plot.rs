//! metrics.jsonl upkeep and the loss plot.

use std::fs;
use std::path::Path;

use anyhow::Result;
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

/// Draw the loss curve (raw points and a moving average) into a PNG.
pub fn plot_loss(metrics: &Path, out: &Path) -> Result<()> {
    let text = fs::read_to_string(metrics).unwrap_or_default();
    let pts: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
        .filter(|p| p.1.is_finite())
        .collect();
    let (w, h) = (800u32, 400u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let (l, r, t, b) = (50.0, 20.0, 20.0, 40.0);
    let axis = image::Rgb([0, 0, 0]);
    for x in l as u32..(w - r as u32) {
        img.put_pixel(x, h - b as u32, axis);
    }
    for y in t as u32..=(h - b as u32) {
        img.put_pixel(l as u32, y, axis);
    }
    if pts.len() >= 2 {
        let win = (pts.len() / 50).max(1);
        let mut smooth = Vec::with_capacity(pts.len());
        let mut acc = 0.0;
        for i in 0..pts.len() {
            acc += pts[i].1;
            if i >= win {
                acc -= pts[i - win].1;
            }
            smooth.push((pts[i].0, acc / (i + 1).min(win) as f64));
        }
        let mut sorted: Vec<f64> = pts.iter().map(|p| p.1).collect();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let lo = sorted[0];
        let hi = sorted[((sorted.len() - 1) as f64 * 0.98) as usize].max(lo + 1e-9);
        let (x0, x1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
        let px = |x: f64| l + (x - x0) / (x1 - x0) * (w as f64 - l - r);
        let py = |y: f64| t + (1.0 - ((y - lo) / (hi - lo)).clamp(0.0, 1.0)) * (h as f64 - t - b);
        for k in 1..4 {
            let y = (t + k as f64 * (h as f64 - t - b) / 4.0) as u32;
            for x in (l as u32 + 1..(w - r as u32)).step_by(3) {
                img.put_pixel(x, y, image::Rgb([210, 210, 210]));
            }
        }
        for p in &pts {
            let (x, y) = (px(p.0) as u32, py(p.1) as u32);
            if x < w && y < h {
                img.put_pixel(x, y, image::Rgb([150, 180, 230]));
            }
        }
        for s in smooth.windows(2) {
            line(&mut img, (px(s[0].0), py(s[0].1)), (px(s[1].0), py(s[1].1)), image::Rgb([20, 60, 170]));
        }
    }
    crate::io::atomic::write_png(out, &image::DynamicImage::ImageRgb8(img))
}

fn line(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), c: image::Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let f = i as f64 / n as f64;
        let (x, y) = (a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1));
        for dy in 0..2 {
            let (xi, yi) = (x as u32, y as u32 + dy);
            if xi < img.width() && yi < img.height() {
                img.put_pixel(xi, yi, c);
            }
        }
    }
}
