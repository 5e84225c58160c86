//! `biflow report RUN`: one self-contained HTML page about a run (images and charts inline as data
//! URIs, no script, nothing fetched when opened): the command lines, the configuration, provenance,
//! the training curves, the sample grids over training, both sampling methods side by side where
//! both exist, and the evaluation results. Also written at the end of train, distill and demo.

use std::fmt::Write as _;
use std::fs;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};

mod evaluation;

use crate::job::JobCtx;
use crate::run::Run;
use crate::jobs::sample::{SampleOptions, Sampler};
use crate::train::{chart_svg, series, throughput, SAMPLES_DIR};

pub const REPORT_FILE: &str = "report.html";
pub const EVALUATION_FILE: &str = "evaluation.json";
const COMPARE_DIR: &str = "compare";

crate::options! {
    pub struct ReportOptions {
        /// the run folder (forward, distilled or imported)
        run: String,
        /// where to write the page
        out: Option<String> ["RUN/report.html"],
        /// sample the same noise and labels with each method the run has (reverse and exact for a
        /// distilled run; exact decoding is slow for large models), written to RUN/compare/
        compare: bool = true,
        /// images per method in the comparison
        num: NonZeroUsize = 16,
        /// guidance scale of the comparison samples (class-conditional runs)
        guidance: f64 = 0,
        /// noise temperature of the comparison samples (below 1: cleaner, less varied)
        temperature: f64 = 1,
    }
}

/// `biflow report`.
pub fn report(o: ReportOptions, ctx: &JobCtx) -> Result<Value> {
    write_report(o, None, ctx)
}

/// The report of a run, with `evaluation` results to show (saved as RUN/evaluation.json, which later
/// reports show too).
pub fn write_report(o: ReportOptions, evaluation: Option<&Value>, ctx: &JobCtx) -> Result<Value> {
    let run = Run::open(Path::new(&o.run))?;
    if let Some(ev) = evaluation {
        crate::io::atomic::write(&run.dir.join(EVALUATION_FILE), format!("{}\n", serde_json::to_string_pretty(ev)?).as_bytes())?;
    }
    let mut compared = Value::Null;
    if o.compare {
        compared = compare(&run, o.num.get(), o.guidance, o.temperature, ctx)?;
    }
    let out = o.out.map(PathBuf::from).unwrap_or_else(|| run.dir.join(REPORT_FILE));
    let html = render(&run)?;
    crate::io::atomic::write(&out, html.as_bytes()).with_context(|| format!("cannot write the report {}", out.display()))?;
    Ok(json!({"report": out, "bytes": html.len(), "compare": compared}))
}

/// Write RUN/report.html (no comparison sampling); used at the end of train and distill.
pub fn write_default(run_dir: &Path) -> Result<PathBuf> {
    let run = Run::open(run_dir)?;
    let out = run.dir.join(REPORT_FILE);
    crate::io::atomic::write(&out, render(&run)?.as_bytes())?;
    Ok(out)
}

/// The same noise and labels through every method the run has: RUN/compare/{reverse,exact}.png and
/// compare.json with the sampling times.
fn compare(run: &Run, n: usize, guidance: f64, temperature: f64, ctx: &JobCtx) -> Result<Value> {
    let dir = run.dir.join(COMPARE_DIR);
    fs::create_dir_all(&dir)?;
    let methods: &[&str] = if run.is_distilled() { &["reverse", "exact"] } else { &["exact"] };
    let mut out = serde_json::Map::new();
    for m in methods {
        let guidance = if run.config.model.num_classes > 0 { guidance } else { 0.0 };
        let opts = SampleOptions { temperature, ..SampleOptions::streaming(&run.dir.display().to_string(), Some(m.to_string()), n, 0, guidance) };
        let mut s = Sampler::new(&opts, &candle_core::Device::Cpu)?;
        let steps = s.steps_per_batch() as u64;
        ctx.start(&format!("compare {m}"), Some(steps));
        let t0 = Instant::now();
        let x = s.next_batch(n, |k| {
            if k % 8 == 0 || k as u64 == steps {
                ctx.progress(k as u64, Some(steps), serde_json::Map::new());
            }
            ctx.check_cancelled()
        })?;
        let secs = t0.elapsed().as_secs_f64();
        ctx.end();
        let x = x.context("the sampler made no images")?;
        let (c, h, w) = s.output_shape();
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let img = crate::io::image::grid(&v, n, c, h, w)?;
        crate::io::atomic::write_png(&dir.join(format!("{m}.png")), &img)?;
        out.insert(
            m.to_string(),
            json!({"seconds": secs, "imagesPerSecond": n as f64 / secs.max(1e-9), "networkSteps": steps, "num": n, "guidance": guidance, "temperature": temperature}),
        );
    }
    let v = Value::Object(out);
    crate::io::atomic::write(&dir.join("compare.json"), format!("{v}\n").as_bytes())?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// The page

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for ch in bytes.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= ch.len() {
                s.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn img_tag(mime: &str, bytes: &[u8], alt: &str, class: &str) -> String {
    format!("<img class=\"{class}\" alt=\"{}\" src=\"data:{mime};base64,{}\">", esc(alt), base64(bytes))
}

fn png_file(path: &Path, alt: &str) -> Option<String> {
    fs::read(path).ok().map(|b| img_tag("image/png", &b, alt, "grid"))
}

fn table(rows: &[(String, String)]) -> String {
    let mut s = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
    }
    s + "</table>"
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.fract() != 0.0 => format!("{x:.5}"),
            _ => n.to_string(),
        },
        Value::String(s) => esc(s),
        other => format!("<code>{}</code>", esc(&other.to_string())),
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
            }
        }
        other => out.push((prefix.to_string(), value_text(other))),
    }
}

/// The metric keys charted, in order (others found in metrics.jsonl follow).
const CHARTS: &[(&str, &str, bool)] = &[("loss", "training loss", false), ("bpd", "bits/dim (training batches)", false), ("lr", "learning rate", false)];

fn render(run: &Run) -> Result<String> {
    let c = &run.config;
    let summary = crate::jobs::runs::describe(&run.dir);
    let name = fs::canonicalize(&run.dir).unwrap_or(run.dir.clone()).display().to_string();
    let kind = summary["kind"].as_str().unwrap_or("?").to_string();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>biflow report: {t}</title>\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\
         <style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}\
         h1{{font-size:1.5em}}h2{{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}}\
         table{{border-collapse:collapse;margin:.5em 0}}th,td{{text-align:left;padding:.2em .8em;border-bottom:1px solid #eee;vertical-align:top}}\
         th{{font-weight:600;color:#555}}code,pre{{font-size:.85em}}pre{{background:#f6f6f6;padding:.8em;overflow:auto}}\
         .charts{{display:flex;flex-wrap:wrap;gap:8px}}.chart{{width:520px;height:300px;border:1px solid #eee}}\
         .grid{{image-rendering:pixelated;width:260px;border:1px solid #ccc}}.grids{{display:flex;flex-wrap:wrap;gap:14px}}\
         figure{{margin:0}}figcaption{{font-size:.85em;color:#555;text-align:center}}</style></head><body>",
        t = esc(&name)
    );
    let _ = write!(h, "<h1>biflow report: <code>{}</code></h1>", esc(&name));
    let mut overview = vec![
        ("kind".to_string(), esc(&kind)),
        ("status".to_string(), value_text(&summary["status"])),
        ("steps".to_string(), format!("{} of {}", summary["steps"], value_text(&summary["totalSteps"]))),
    ];
    if let Some(b) = summary["bestBpd"].as_f64() {
        overview.push(("best training bits/dim".into(), format!("{b:.4}")));
    }
    if let Some(ck) = summary["lastCheckpoint"].as_str() {
        overview.push(("last checkpoint".into(), format!("<code>{}</code>", esc(ck))));
    }
    overview.push(("can resume".into(), value_text(&summary["canResume"])));
    h += &table(&overview);

    // Evaluation results.
    if let Some(ev) = fs::read_to_string(run.dir.join(EVALUATION_FILE)).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
        h += &evaluation::render(&ev);
    }

    // Both methods side by side.
    let cmp_dir = run.dir.join(COMPARE_DIR);
    let cmp_info: Value = fs::read_to_string(cmp_dir.join("compare.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
    let mut figs = String::new();
    for (m, label) in [("reverse", "reverse: learned G, 1 network evaluation"), ("exact", "exact: causal decoding of F")] {
        if let Some(img) = png_file(&cmp_dir.join(format!("{m}.png")), label) {
            let info = &cmp_info[m];
            let timing = match (info["seconds"].as_f64(), info["networkSteps"].as_u64()) {
                (Some(s), Some(k)) => format!("<br>{s:.3} s for {} images, {k} sequential network steps", info["num"]),
                _ => String::new(),
            };
            let settings = match (info["guidance"].as_f64(), info["temperature"].as_f64()) {
                (Some(g), Some(t)) => format!("<br>guidance {g}, noise temperature {t}"),
                _ => String::new(),
            };
            let timing = timing + &settings;
            let _ = write!(figs, "<figure>{img}<figcaption>{}{timing}</figcaption></figure>", esc(label));
        }
    }
    if !figs.is_empty() {
        h += "<h2>Samples: the same noise and labels through each method</h2><div class=\"grids\">";
        h += &figs;
        h += "</div>";
    }

    // Curves.
    let metrics = run.metrics_path();
    let mut charts = String::new();
    let mut keys: Vec<(String, String, bool)> = CHARTS.iter().map(|(k, t, l)| (k.to_string(), t.to_string(), *l)).collect();
    if let Some(first) = fs::read_to_string(&metrics).ok().and_then(|t| t.lines().next().and_then(|l| serde_json::from_str::<Value>(l).ok())) {
        if let Some(m) = first.as_object() {
            for k in m.keys() {
                if !["step", "time", "epoch", "loss", "bpd", "lr"].contains(&k.as_str()) && m[k].is_number() {
                    keys.push((k.clone(), k.clone(), k == "gradNorm"));
                }
            }
        }
    }
    for (k, title, log) in keys {
        let pts = series(&metrics, &k);
        if pts.len() >= 2 {
            let svg = chart_svg(&title, &k, &pts, log, (520, 300))?;
            charts += &img_tag("image/svg+xml", svg.as_bytes(), &title, "chart");
        }
    }
    let tp = throughput(&metrics);
    if tp.len() >= 2 {
        let svg = chart_svg("throughput", "steps/s", &tp, false, (520, 300))?;
        charts += &img_tag("image/svg+xml", svg.as_bytes(), "throughput", "chart");
    }
    if !charts.is_empty() {
        h += "<h2>Training curves</h2><div class=\"charts\">";
        h += &charts;
        h += "</div>";
    }

    // Sample grids over training.
    let mut grids: Vec<(u64, PathBuf)> = fs::read_dir(run.dir.join(SAMPLES_DIR))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let step = n.strip_prefix("step-")?.strip_suffix(".png")?.parse().ok()?;
                    Some((step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    grids.sort();
    if !grids.is_empty() {
        // At most 12 grids, evenly spread, the last always included.
        let keep = 12usize;
        let picked: Vec<&(u64, PathBuf)> = if grids.len() <= keep {
            grids.iter().collect()
        } else {
            (0..keep).map(|i| &grids[i * (grids.len() - 1) / (keep - 1)]).collect()
        };
        h += "<h2>Samples during training (fixed noise and labels, EMA weights)</h2><div class=\"grids\">";
        for (step, p) in picked {
            if let Some(img) = png_file(p, &format!("step {step}")) {
                let _ = write!(h, "<figure>{img}<figcaption>step {step}</figcaption></figure>");
            }
        }
        h += "</div>";
    }

    // Provenance and the command lines.
    h += "<h2>Provenance</h2>";
    let mut prov = vec![("biflow version (this report)".to_string(), env!("CARGO_PKG_VERSION").to_string())];
    if let Some(d) = c.train.get("data").and_then(Value::as_str) {
        let sum = crate::jobs::bundle::dataset_checksum(Path::new(d)).unwrap_or_else(|| "(dataset not found)".into());
        prov.push(("dataset".into(), format!("<code>{}</code>", esc(d))));
        prov.push(("dataset manifest checksum (sha256)".into(), format!("<code>{}</code>", esc(&sum))));
    }
    if let Some(f) = &c.forward {
        prov.push(("forward run".into(), format!("<code>{}</code>", esc(&f.dir))));
        prov.push(("forward weights (sha256)".into(), format!("<code>{}</code>", esc(&f.weights_sha256))));
    }
    if let Some(l) = &c.latent {
        prov.push(("VAE (latent space)".into(), format!("<code>{}</code>, scaling {}, shift {}", esc(&l.vae), l.scaling_factor, l.shift_factor)));
        prov.push(("VAE weights (sha256)".into(), format!("<code>{}</code>", esc(&l.vae_sha256))));
    }
    prov.push(("source".into(), format!("<code>{}</code>", esc(&c.source.to_string()))));
    h += &table(&prov);
    if let Ok(text) = fs::read_to_string(run.dir.join(crate::train::HISTORY_FILE)) {
        h += "<h3>Command lines</h3><pre>";
        for line in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
            let cmd = line["command"].as_str().unwrap_or("(not recorded)");
            let _ = writeln!(h, "{} (from step {}, biflow {})", esc(cmd), line["fromStep"], esc(line["biflowVersion"].as_str().unwrap_or("?")));
        }
        h += "</pre>";
    }

    h += "<h2>Configuration</h2><pre>";
    h += &esc(&serde_json::to_string_pretty(c)?);
    h += "</pre>";
    if let Some(img) = png_file(&run.loss_png_path(), "loss.png") {
        h += "<h3>loss.png</h3>";
        h += &img.replace("class=\"grid\"", "class=\"chart\" style=\"width:640px;height:auto\"");
    }
    h += "</body></html>\n";
    Ok(h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
