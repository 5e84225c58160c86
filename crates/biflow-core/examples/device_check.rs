//! The GPU check of the CUDA backend, run by scripts/device-check.sh on a machine with a GPU (built
//! elsewhere with `--features cuda`). Each part reports numbers and whether it passed:
//!
//! - `peak`: this GPU's f32 and bf16 matmul rate through candle (cuBLAS), the ceilings used below;
//! - `parity`: F on the device against the reference fixture and the CPU (f32, 1e-4), its exact
//!   inverse, the guided sample (1e-3), and how far bf16 products move z;
//! - `gradients`: F's and G's loss gradients on the device against the CPU's (same weights and data);
//! - `train`: steps on the device lower the loss; images/s and the fraction of the bf16 peak, f32 and bf16;
//! - `distill`: G distils on the device from an F trained there;
//! - `speed`: reverse (one evaluation of G) against exact sampling (causal decoding + score step)
//!   at T = 256, batch 1 and 64;
//! - `inception`: the FID network on the device against the CPU's.
//!
//!   device_check [--device cuda:0] [--fixtures fixtures] [--out results.json] [--quick] [--only part,part]
//!                [--composed]   (on the CPU: the composed ops a GPU runs instead of the fused kernels)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use biflow_core::device;
use biflow_core::jobs::DeviceArgs;
use biflow_core::jobs::distill::{distill_with, DistillSettings};
use biflow_core::jobs::training::SessionArgs;
use biflow_core::models::flow::{FlowConfig, ReverseOptions, TarFlow};
use biflow_core::job::JobCtx;
use biflow_core::device::mode;
use biflow_core::models::reverse::{self, ReverseConfig};
use biflow_core::models::flow::denoise;
use biflow_core::jobs::train::{train_with, TrainSettings};
use biflow_core::train::MemData;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

struct Check {
    device: Device,
    name: String,
    fixtures: PathBuf,
    quick: bool,
    /// bf16 matmul TFLOP/s measured here (the ceiling for training throughput).
    bf16_peak: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let name = flag("--device").unwrap_or_else(|| "cuda:0".into());
    let out = flag("--out").map(PathBuf::from);
    let mut check = Check {
        device: device::select(Some(&name))?,
        name,
        fixtures: PathBuf::from(flag("--fixtures").unwrap_or_else(|| "fixtures".into())),
        quick: args.iter().any(|a| a == "--quick"),
        bf16_peak: 0.0,
    };
    let only: Option<Vec<String>> = flag("--only").map(|s| s.split(',').map(str::to_string).collect());
    let _composed = args.iter().any(|a| a == "--composed").then(mode::composed);
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    results.insert("doctor".into(), device::doctor());
    results.insert("device".into(), json!(check.name));
    let parts: [(&str, fn(&mut Check) -> Result<Value>); 7] = [
        ("peak", peak),
        ("parity", parity),
        ("gradients", gradients),
        ("train", train),
        ("distill", distill),
        ("speed", speed),
        ("inception", inception),
    ];
    for (part, run) in parts {
        // The peak always runs: the training throughput is reported as a fraction of it.
        if part != "peak" && only.as_ref().is_some_and(|o| !o.iter().any(|p| p == part)) {
            continue;
        }
        let t0 = Instant::now();
        let mut v = run(&mut check).unwrap_or_else(|e| json!({"pass": false, "error": format!("{e:#}")}));
        v["seconds"] = json!(t0.elapsed().as_secs_f64());
        eprintln!("{part}: {v}");
        results.insert(part.into(), v);
    }
    let pass = results.values().all(|v| v.get("pass").and_then(Value::as_bool) != Some(false));
    results.insert("pass".into(), json!(pass));
    results.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    let text = serde_json::to_string_pretty(&Value::Object(results))?;
    println!("{text}");
    if let Some(p) = out {
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn randn(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    let b = b.to_device(a.device())?.to_dtype(a.dtype())?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar()?)
}

/// Seconds per call of `f`, after one warm-up call, repeated for at least `min_secs`.
fn time(device: &Device, min_secs: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let (t0, mut reps) = (Instant::now(), 0);
    while reps == 0 || t0.elapsed().as_secs_f64() < min_secs {
        f()?;
        reps += 1;
    }
    device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

fn peak(c: &mut Check) -> Result<Value> {
    let n = if c.quick { 1024 } else { 8192 };
    let mut out = json!({"size": n});
    for dtype in [DType::F32, DType::BF16] {
        let a = randn(&[n, n], 1, &c.device)?.to_dtype(dtype)?;
        let b = randn(&[n, n], 2, &c.device)?.to_dtype(dtype)?;
        let s = time(&c.device, 1.0, || Ok(drop(a.matmul(&b)?)))?;
        let tflops = 2.0 * (n as f64).powi(3) / s / 1e12;
        out[format!("{dtype:?}").to_lowercase() + "Tflops"] = json!(tflops);
        if dtype == DType::BF16 {
            c.bf16_peak = tflops;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parity on the reference fixture

fn fixture_tensor(v: &Value, device: &Device) -> Result<Tensor> {
    fn floats(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| floats(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
            _ => {}
        }
    }
    let mut data = Vec::new();
    floats(&v["data"], &mut data);
    let shape: Vec<usize> = v["shape"].as_array().context("no shape")?.iter().filter_map(Value::as_u64).map(|s| s as usize).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

fn parity(c: &mut Check) -> Result<Value> {
    let dir = c.fixtures.join("tarflow-reference");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tiny-cond.json"))?)?;
    let cfg = FlowConfig::from_reference_args(&f["config"])?;
    let state: HashMap<String, Tensor> = biflow_core::jobs::import::read_reference_state(&dir.join("tiny-cond.pth"))?.into_iter().collect();
    let model = |device: &Device| -> Result<TarFlow> {
        let moved = state.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?))).collect::<Result<HashMap<_, _>>>()?;
        Ok(TarFlow::new(VarBuilder::from_tensors(moved, DType::F32, device), &cfg)?)
    };
    let (gpu, cpu) = (model(&c.device)?, model(&Device::Cpu)?);
    let labels = |key: &str, device: &Device| -> Result<Tensor> {
        let y: Vec<i64> = f[key].as_array().context("labels")?.iter().filter_map(Value::as_i64).collect();
        let n = y.len();
        Ok(Tensor::from_vec(y, n, device)?)
    };
    let x = fixture_tensor(&f["x"], &c.device)?;
    let y = labels("y", &c.device)?;
    let out = gpu.forward(&x, Some(&y))?;
    let cpu_out = cpu.forward(&x.to_device(&Device::Cpu)?, Some(&labels("y", &Device::Cpu)?))?;
    let z_ref = fixture_tensor(&f["z_tokens"], &c.device)?;
    let z_err = max_abs(&out.z, &z_ref)?;
    let z_cpu_err = max_abs(&out.z, &cpu_out.z)?;
    let logdet_err = max_abs(&out.logdets, &Tensor::new(f["logdets"].as_array().context("logdets")?.iter().filter_map(Value::as_f64).map(|v| v as f32).collect::<Vec<_>>(), &c.device)?)?;
    let opts = ReverseOptions { guidance: 0.0, annealed: false, attn_temp: 1.0 };
    let inverse_err = max_abs(&gpu.reverse_tokens(&z_ref, Some(&y), &opts, |_, _| Ok(()))?, &gpu.patchify(&x)?)?;
    let guided = ReverseOptions { guidance: f["config"]["guidance"].as_f64().unwrap_or(1.5), annealed: true, attn_temp: 1.0 };
    let noise = fixture_tensor(&f["noise_tokens"], &c.device)?;
    let sample_err = max_abs(&gpu.reverse(&noise, Some(&y), &guided, |_, _| Ok(()))?, &fixture_tensor(&f["sample"], &c.device)?)?;
    let bf16_z_err = {
        let _bf16 = mode::precision(device::Precision::Bf16);
        max_abs(&gpu.forward(&x, Some(&y))?.z, &z_ref)?
    };
    let pass = z_err <= 1e-4 && z_cpu_err <= 1e-4 && logdet_err <= 1e-4 && inverse_err <= 1e-4 && sample_err <= 1e-3;
    Ok(json!({"pass": pass, "zVsReference": z_err, "zVsCpu": z_cpu_err, "logdetsVsReference": logdet_err,
        "inverseVsX": inverse_err, "guidedSampleVsReference": sample_err, "bf16ZVsReference": bf16_z_err,
        "tolerance": {"f32": 1e-4, "guidedSample": 1e-3}}))
}

// ---------------------------------------------------------------------------------------------
// Gradients on the device against the CPU

/// Each variable's gradient on the device against the CPU's: the worst relative errors, by name.
fn compare_grads(dev_map: &candle_nn::VarMap, cpu_map: &candle_nn::VarMap, dev: &candle_core::backprop::GradStore, cpu: &candle_core::backprop::GradStore) -> Result<Vec<(String, f32)>> {
    let (dv, cv) = (dev_map.data().lock().map_err(|_| anyhow::anyhow!("lock"))?, cpu_map.data().lock().map_err(|_| anyhow::anyhow!("lock"))?);
    let mut errs = Vec::new();
    for (name, var) in cv.iter() {
        let want = cpu.get(var.as_tensor()).with_context(|| format!("no CPU gradient for {name}"))?;
        let got = dev.get(dv[name].as_tensor()).with_context(|| format!("no device gradient for {name}"))?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
        errs.push((name.clone(), max_abs(&got.to_device(&Device::Cpu)?, want)? / scale));
    }
    errs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(errs)
}

/// Make a trainable model's weights non-trivial (TARFlow starts as the identity) and the same on both sides.
fn perturb_and_copy(src: &candle_nn::VarMap, dst: &candle_nn::VarMap, std: f64) -> Result<()> {
    let (s, d) = (src.data().lock().map_err(|_| anyhow::anyhow!("lock"))?, dst.data().lock().map_err(|_| anyhow::anyhow!("lock"))?);
    for (i, (name, v)) in s.iter().enumerate() {
        v.set(&(v.as_tensor() + (randn(v.dims(), 100 + i as u64, v.device())? * std)?)?)?;
        d[name].set(&v.as_tensor().to_device(d[name].device())?)?;
    }
    Ok(())
}

fn gradients(c: &mut Check) -> Result<Value> {
    let cfg = tiny();
    let (cpu_map, cpu_f) = biflow_core::models::flow::new_trainable(&cfg, 1, &Device::Cpu)?;
    let (dev_map, dev_f) = biflow_core::models::flow::new_trainable(&cfg, 1, &c.device)?;
    perturb_and_copy(&cpu_map, &dev_map, 0.01)?;
    // 64 samples: repeated labels (the class embedding's gradient sums them) and dropped ones.
    let x = (randn(&[64, 1, 32, 32], 7, &Device::Cpu)? * 0.5)?;
    let y = Tensor::from_vec((0..64i64).map(|i| if i % 7 == 3 { -1 } else { i % 10 }).collect::<Vec<_>>(), 64, &Device::Cpu)?;
    let grads = |f: &TarFlow, dev: &Device| -> Result<(f32, candle_core::backprop::GradStore)> {
        let out = f.forward(&x.to_device(dev)?, Some(&y.to_device(dev)?))?;
        let loss = biflow_core::models::flow::nll_loss(&out)?;
        Ok((loss.to_scalar::<f32>()?, loss.backward()?))
    };
    let (cpu_loss, cpu_g) = {
        let _composed = mode::composed();
        grads(&cpu_f, &Device::Cpu)?
    };
    let (dev_loss, dev_g) = grads(&dev_f, &c.device)?;
    let f_errs = compare_grads(&dev_map, &cpu_map, &dev_g, &cpu_g)?;
    // G with heads and guidance, through the alignment loss.
    let g_cfg = ReverseConfig::for_flow(&cfg, 128, 1, 1, true);
    let (cpu_gm, cpu_g_model) = reverse::new_trainable(&g_cfg, 2, &Device::Cpu)?;
    let (dev_gm, dev_g_model) = reverse::new_trainable(&g_cfg, 2, &c.device)?;
    perturb_and_copy(&cpu_gm, &dev_gm, 0.05)?;
    let z = randn(&[64, cfg.num_tokens(), cfg.token_dim()], 8, &Device::Cpu)?;
    let w: Vec<f32> = (0..64).map(|i| (i % 8) as f32 * 0.3).collect();
    let g_grads = |g: &reverse::ReverseModel, dev: &Device| -> Result<candle_core::backprop::GradStore> {
        let out = g.forward(&z.to_device(dev)?, Some(&y.to_device(dev)?), Some(&w), true)?;
        let mut loss = out.x.sqr()?.mean_all()?;
        for h in &out.heads {
            loss = (loss + h.sqr()?.mean_all()?)?;
        }
        Ok(loss.backward()?)
    };
    let cpu_gg = {
        let _composed = mode::composed();
        g_grads(&cpu_g_model, &Device::Cpu)?
    };
    let g_errs = compare_grads(&dev_gm, &cpu_gm, &g_grads(&dev_g_model, &c.device)?, &cpu_gg)?;
    let worst = |e: &[(String, f32)]| json!(e.iter().take(5).map(|(n, v)| json!({"name": n, "relativeError": v})).collect::<Vec<_>>());
    // The first training steps from the initial (identity) flow: the same losses on both sides.
    let dir = tempfile::tempdir()?;
    let steps = 8;
    let cpu_run = {
        let _composed = mode::composed();
        let cpu = Check { device: Device::Cpu, name: "cpu".into(), fixtures: c.fixtures.clone(), quick: true, bf16_peak: 1.0 };
        train_once(&cpu, &cfg, 64, steps, 1e-3, "f32", &dir.path().join("cpu"))?;
        losses(&dir.path().join("cpu"))?
    };
    train_once(c, &cfg, 64, steps, 1e-3, "f32", &dir.path().join("dev")).ok();
    let dev_run = losses(&dir.path().join("dev")).unwrap_or_default();
    let same_steps = cpu_run.iter().zip(&dev_run).take_while(|(a, b)| (*a - *b).abs() <= 1e-3 * a.abs().max(1.0)).count();
    let pass = f_errs[0].1 <= 1e-3 && g_errs[0].1 <= 1e-3 && (cpu_loss - dev_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0) && same_steps == steps as usize;
    Ok(json!({"pass": pass, "fLossCpu": cpu_loss, "fLossDevice": dev_loss, "fWorst": worst(&f_errs), "gWorst": worst(&g_errs), "tolerance": 1e-3,
        "trainingLossesCpu": cpu_run, "trainingLossesDevice": dev_run, "stepsThatAgree": same_steps}))
}

// ---------------------------------------------------------------------------------------------
// Training and distillation on the device

fn synthetic(cfg: &FlowConfig, n: usize, seed: u64) -> MemData {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Smooth blobs rather than white noise, so that the loss has something to learn.
    let (s, ch) = (cfg.img_size, cfg.in_channels);
    let mut images = Vec::with_capacity(n * ch * s * s);
    for _ in 0..n {
        let (cx, cy, r) = (rng.gen_range(0.2..0.8) * s as f32, rng.gen_range(0.2..0.8) * s as f32, rng.gen_range(0.1..0.3) * s as f32);
        for _ in 0..ch {
            for yy in 0..s {
                for xx in 0..s {
                    let d = ((xx as f32 - cx).powi(2) + (yy as f32 - cy).powi(2)).sqrt();
                    images.push(if d < r { 0.8 } else { -0.8 });
                }
            }
        }
    }
    MemData { channels: ch, size: s, classes: cfg.num_classes, images, labels: (0..n as i64).map(|i| i % cfg.num_classes as i64).collect() }
}

/// FLOPs of one training image: forward and backward (about 3 forward passes) of F.
fn train_flops(f: &FlowConfig) -> f64 {
    let (t, c, d) = (f.num_tokens() as f64, f.channels as f64, f.token_dim() as f64);
    let layer = t * (24.0 * c * c + 4.0 * c * t / 2.0);
    3.0 * ((f.num_blocks * f.layers_per_block) as f64 * layer + f.num_blocks as f64 * 6.0 * t * c * d)
}

fn settings(cfg: &FlowConfig, batch: usize, steps: u64, lr: f64) -> TrainSettings {
    TrainSettings {
        batch_size: Some(batch),
        steps: Some(steps),
        patch_size: Some(cfg.patch_size),
        channels: Some(cfg.channels),
        blocks: Some(cfg.num_blocks),
        layers_per_block: Some(cfg.layers_per_block),
        save_every: Some(1_000_000),
        lr: Some(lr),
        noise_std: Some(0.05),
        ..Default::default()
    }
}

fn losses(run: &Path) -> Result<Vec<f64>> {
    Ok(std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect())
}

fn train_once(c: &Check, cfg: &FlowConfig, batch: usize, steps: u64, lr: f64, precision: &str, out: &Path) -> Result<Value> {
    let data = synthetic(cfg, batch * 8, 1);
    let s = settings(cfg, batch, steps, lr);
    let on = DeviceArgs { device: c.name.clone(), precision: precision.into() };
    let args = SessionArgs { out: out.to_path_buf(), on, ..Default::default() };
    let r = train_with(&args, &s, "synthetic", &data, &JobCtx::silent())?;
    let l = losses(out)?;
    let head = l.iter().take(5).sum::<f64>() / l.len().clamp(1, 5) as f64;
    let tail = l.iter().rev().take(5).sum::<f64>() / l.len().clamp(1, 5) as f64;
    let ips = r["imagesPerSec"].as_f64().unwrap_or(0.0);
    let tflops = ips * train_flops(cfg) / 1e12;
    Ok(json!({"precision": precision, "batch": batch, "steps": steps, "firstLoss": head, "lastLoss": tail,
        "imagesPerSec": ips, "tflops": tflops, "fractionOfBf16Peak": tflops / c.bf16_peak.max(1e-9),
        "parameters": r["parameters"], "phaseSeconds": r["phaseSeconds"]}))
}

fn tiny() -> FlowConfig {
    FlowConfig { img_size: 32, in_channels: 1, patch_size: 4, channels: 256, num_blocks: 4, layers_per_block: 2, num_classes: 10, clip_scale: None }
}

/// The T = 256 shape of the benchmarks (64x64x4, patch 4).
fn paper() -> FlowConfig {
    FlowConfig { img_size: 64, in_channels: 4, patch_size: 4, channels: 512, num_blocks: 8, layers_per_block: 1, num_classes: 10, clip_scale: None }
}

fn train(c: &mut Check) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let steps = if c.quick { 40 } else { 120 };
    let learn = train_once(c, &tiny(), 64, steps, 1e-3, "f32", &dir.path().join("tiny")).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let lowered = learn["lastLoss"].as_f64() < learn["firstLoss"].as_f64();
    let mut throughput = Vec::new();
    for precision in ["f32", "bf16"] {
        if precision == "bf16" && !c.device.is_cuda() {
            continue;
        }
        let run = train_once(c, &paper(), if c.quick { 8 } else { 64 }, if c.quick { 3 } else { 20 }, 1e-4, precision, &dir.path().join(format!("paper-{precision}")));
        throughput.push(run.unwrap_or_else(|e| json!({"precision": precision, "error": format!("{e:#}")})));
    }
    Ok(json!({"pass": lowered, "lossLowered": learn, "throughputT256": throughput}))
}

fn distill(c: &mut Check) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny();
    let f_dir = dir.path().join("f");
    train_once(c, &cfg, 64, 30, 1e-3, "f32", &f_dir)?;
    let data = synthetic(&cfg, 512, 2);
    let steps = if c.quick { 20 } else { 60 };
    let settings = DistillSettings { forward: Some(f_dir.display().to_string()), batch_size: Some(64), steps: Some(steps), save_every: Some(1_000_000), lr: Some(1e-3), ..Default::default() };
    let out = dir.path().join("g");
    let on = DeviceArgs { device: c.name.clone(), ..DeviceArgs::default() };
    let args = SessionArgs { out: out.clone(), on, ..Default::default() };
    let r = distill_with(&args, &settings, "synthetic", &data, &JobCtx::silent())?;
    let l = losses(&out)?;
    let (first, last) = (l.first().copied().unwrap_or(f64::NAN), l.last().copied().unwrap_or(f64::NAN));
    Ok(json!({"pass": last.is_finite() && last < first, "steps": r["steps"], "firstLoss": first, "lastLoss": last,
        "stepsPerSec": r["stepsPerSec"], "phaseSeconds": r["phaseSeconds"]}))
}

// ---------------------------------------------------------------------------------------------
// Sampling speed: reverse vs exact at T = 256

fn speed(c: &mut Check) -> Result<Value> {
    let cfg = paper();
    let (t, d) = (cfg.num_tokens(), cfg.token_dim());
    let params = biflow_core::models::flow::initial_parameters(&cfg, 0, &c.device)?;
    let flow = TarFlow::new(VarBuilder::from_tensors(params.into_iter().collect(), DType::F32, &c.device), &cfg)?;
    let g_cfg = ReverseConfig::for_flow(&cfg, cfg.channels, 1, 1, false);
    let (_, g) = reverse::new_trainable(&g_cfg, 0, &c.device)?;
    let mut rows = Vec::new();
    let precisions: &[device::Precision] = if c.device.is_cuda() { &[device::Precision::F32, device::Precision::Bf16] } else { &[device::Precision::F32] };
    for (&precision, n) in precisions.iter().flat_map(|p| (if c.quick { [1usize, 4] } else { [1, 64] }).map(move |n| (p, n))) {
        let _precision = mode::precision(precision);
        let z = randn(&[n, t, d], 3, &c.device)?;
        let y = Tensor::from_vec((0..n as i64).map(|i| i % 10).collect::<Vec<_>>(), n, &c.device)?;
        let w = vec![0f32; n];
        let reverse_s = time(&c.device, 1.0, || Ok(drop(flow.unpatchify(&g.sample(&z, Some(&y), Some(&w))?)?)))?;
        let decode_s = time(&c.device, 0.0, || Ok(drop(flow.reverse(&z, Some(&y), &ReverseOptions::default(), |_, _| Ok(()))?)))?;
        let x = flow.reverse(&z, Some(&y), &ReverseOptions::default(), |_, _| Ok(()))?;
        let denoise_s = time(&c.device, 0.5, || Ok(drop(denoise(&flow, &x, Some(&y), 0.05)?)))?;
        let exact_s = decode_s + denoise_s;
        rows.push(json!({"precision": precision, "batch": n, "reverseSeconds": reverse_s, "exactDecodeSeconds": decode_s, "exactDenoiseSeconds": denoise_s,
            "reverseImagesPerSec": n as f64 / reverse_s, "exactImagesPerSec": n as f64 / exact_s, "speedup": exact_s / reverse_s}));
    }
    Ok(json!({"tokens": t, "tokenDim": d, "channels": cfg.channels, "blocks": cfg.num_blocks, "rows": rows}))
}

// ---------------------------------------------------------------------------------------------
// Inception

fn inception(c: &mut Check) -> Result<Value> {
    use biflow_core::eval::fid::inception::FidInception;
    use biflow_core::eval::fid::preprocess::preprocess;
    use biflow_core::eval::fid::weights::formula_tensors;
    use biflow_core::eval::fid::net::DeviceInception;
    // Formula weights (no download); two smooth synthetic images, resized as pytorch-fid does.
    let cpu = FidInception::from_tensors(formula_tensors())?;
    let gpu = DeviceInception::from_tensors(formula_tensors(), &c.device)?;
    let images = (0..2u32)
        .map(|k| {
            let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| ((i as u32 * (7 + k) + k * 31) % 251) as u8).collect();
            preprocess(&rgb, 64, 64)
        })
        .collect::<Result<Vec<_>>>()?;
    let want = cpu.forward(&images, true);
    let got = gpu.forward_acts(&images, true)?;
    let mut err = 0f32;
    for (a, b) in got.iter().zip(&want) {
        let scale = b.features.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        err = err.max(a.features.iter().zip(&b.features).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
    }
    let batch = if c.quick { 4 } else { 64 };
    let x = randn(&[batch, 3, 299, 299], 5, &c.device)?.clamp(-1f32, 1f32)?;
    let s = time(&c.device, 1.0, || Ok(drop(gpu.forward(&x, false)?)))?;
    Ok(json!({"pass": err <= 1e-4, "featuresRelativeErrorVsCpu": err, "tolerance": 1e-4, "batch": batch, "imagesPerSec": batch as f64 / s}))
}
