//! Benchmark of BiFlow's reverse model G against F's exact inverse, and of a distillation step.
//! Prints one JSON object per measurement:
//!
//! - `matmul`: this CPU's plain f32 matmul throughput (4096x1024 by 1024x1024 through the fused
//!   linear layer's gemm, best of 6), the ceiling the reverse pass is compared with, and that of the
//!   packed kernel frozen models sample with (`packedGflops`);
//! - `sample`: images/s of reverse sampling (one evaluation of G) and of exact sampling (causal
//!   decoding plus its denoising step) on the same F, noise and machine, in alternating rounds
//!   (best round of each), with the FLOPs of each path;
//! - `distill`: where the time of one distillation step goes (F's trajectory, G with its heads,
//!   the unconditional pass for guidance, the loss, backward) and steps/s;
//! - `perceptual` (not in `all`): steps/s of the `distill` job with both perceptual terms (LPIPS
//!   0.4 over the fixtures' formula VGG16 and real heads, ConvNeXt-V2 Base 0.1 with random weights) on
//!   random resized crops to `--size` (224), as scripts/reference/torch_biflow_distill_bench.py
//!   `--perceptual-size` measures PyTorch.
//!
//!   cargo run --release -p biflow-core --example bench_reverse -- [tiny|paper|demo|all] [matmul|sample|distill|perceptual|all] [--batches 1,64] [--steps N] [--size 224]

use std::time::Instant;

use biflow_core::models::flow::{initial_parameters, FlowConfig, ReverseOptions, TarFlow};
use biflow_core::jobs::distill::{distill_with, DistillSettings};
use biflow_core::jobs::training::SessionArgs;
use biflow_core::job::JobCtx;
use biflow_core::run::{write_safetensors, HostTensor, Run, RunConfig};
use biflow_core::train::MemData;
use biflow_core::models::reverse::loss::{implied_conditional, LossConfig, LossKind, Targets};
use biflow_core::models::reverse::{self, ReverseConfig, ReverseModel, ReverseOutput};
use biflow_core::models::flow::denoise;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use serde_json::json;

mod common;
use common::peak_rss_mib;

fn config(name: &str) -> FlowConfig {
    match name {
        // MNIST at 32x32, patch 4: T = 64, D = 16 (the forward benchmark's tiny).
        "tiny" => FlowConfig { img_size: 32, in_channels: 1, patch_size: 4, channels: 256, num_blocks: 4, layers_per_block: 2, num_classes: 10, clip_scale: None },
        // The MNIST recipe of the README and docs/: 128 channels, 4 blocks of 1 layer.
        "mnist" => FlowConfig { img_size: 32, in_channels: 1, patch_size: 4, channels: 128, num_blocks: 4, layers_per_block: 1, num_classes: 10, clip_scale: Some(3.0) },
        // 64x64x4 with patch 4: T = 256, D = 64 (the forward benchmark's paper shape).
        "paper" => FlowConfig { img_size: 64, in_channels: 4, patch_size: 4, channels: 512, num_blocks: 8, layers_per_block: 1, num_classes: 10, clip_scale: None },
        // The full demo's F: 28x28 digits, patch 4 (T = 49, D = 16), 128 channels, 4 blocks of 1 layer.
        "demo" => FlowConfig { img_size: 28, in_channels: 1, patch_size: 4, channels: 128, num_blocks: 4, layers_per_block: 1, num_classes: 10, clip_scale: Some(3.0) },
        _ => panic!("unknown config {name}: use tiny, paper or demo"),
    }
}

/// FLOPs of one transformer layer over `t` tokens of width `c` attending to `keys` keys each:
/// qkv, proj and the 4x MLP (24 c^2 per token) plus q k^T and P v (4 c keys per token).
fn layer_flops(t: f64, c: f64, keys: f64) -> f64 {
    t * (24.0 * c * c + 4.0 * c * keys)
}

/// FLOPs of one image through G (no heads): proj_in, B*L + Ld bidirectional layers, proj_out.
fn reverse_flops(g: &ReverseConfig) -> f64 {
    let (t, c, d) = (g.num_tokens as f64, g.channels as f64, g.token_dim as f64);
    let layers = (g.stages * g.layers_per_stage + g.denoise_layers) as f64;
    layers * layer_flops(t, c, t) + 4.0 * t * c * d
}

/// FLOPs of one image through F's forward pass (causal: T/2 keys per token on average).
fn forward_flops(f: &FlowConfig) -> f64 {
    let (t, c, d) = (f.num_tokens() as f64, f.channels as f64, f.token_dim() as f64);
    (f.num_blocks * f.layers_per_block) as f64 * layer_flops(t, c, t / 2.0) + f.num_blocks as f64 * 6.0 * t * c * d
}

/// FLOPs of one image of exact sampling: the decoding steps (each block: T-1 tokens, KV cache) plus
/// the denoising step (a forward and a backward pass of F, about 3 forward passes).
fn exact_flops(f: &FlowConfig) -> f64 {
    forward_flops(f) + 3.0 * forward_flops(f)
}

/// This CPU's f32 matmul throughput at a training-sized shape (4096x1024 by 1024x1024, best of 6),
/// through the fused linear layer (gemm, the plain product) and through the packed kernel that
/// frozen models sample with (weights packed once, outside the timing).
fn matmul_gflops() -> anyhow::Result<(f64, f64)> {
    let (rows, n) = (4096, 1024);
    let u = Uniform::new(-1.0f32, 1.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let xs: Vec<f32> = (0..rows * n).map(|_| u.sample(&mut rng)).collect();
    let ws: Vec<f32> = (0..n * n).map(|_| u.sample(&mut rng)).collect();
    let x = Tensor::from_vec(xs.clone(), (rows, n), &Device::Cpu)?;
    let w = Tensor::from_vec(ws.clone(), (n, n), &Device::Cpu)?;
    let b = Tensor::zeros(n, DType::F32, &Device::Cpu)?;
    let (packed, zeros, mut y) = (biflow_core::engines::ops::pack(&ws, n), vec![0f32; n], vec![0f32; rows * n]);
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..6 {
        let t0 = Instant::now();
        biflow_core::engines::ops::linear(&x, &w, &b)?;
        best.0 = best.0.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        biflow_core::engines::ops::linear_packed(&xs, &packed, &zeros, &mut y);
        best.1 = best.1.min(t0.elapsed().as_secs_f64());
    }
    let flops = 2.0 * (rows * n * n) as f64;
    Ok((flops / best.0 / 1e9, flops / best.1 / 1e9))
}

fn randn(shape: &[usize], rng: &mut rand::rngs::StdRng) -> anyhow::Result<Tensor> {
    let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The models: F and G (of F's width, 1 layer per stage, 1 denoising layer) with constant weights,
/// as sampling loads them.
fn models(cfg: &FlowConfig) -> anyhow::Result<(TarFlow, ReverseModel, ReverseConfig)> {
    let params = initial_parameters(cfg, 0, &Device::Cpu)?;
    let flow = TarFlow::new(VarBuilder::from_tensors(params, DType::F32, &Device::Cpu), cfg)?;
    let g_cfg = ReverseConfig::for_flow(cfg, cfg.channels, 1, 1, true);
    let g_params = reverse::initial_parameters(&g_cfg, 1, &Device::Cpu)?;
    let g = ReverseModel::new(VarBuilder::from_tensors(g_params, DType::F32, &Device::Cpu), &g_cfg)?;
    Ok((flow, g, g_cfg))
}

/// Steps/s of the `distill` job's steps (data, the step above, AdamW, EMA; after a warm-up step) on
/// random images, from a forward run of F's initial weights written to a temporary folder.
fn distill_steps_per_second(cfg: &FlowConfig, batch: usize, steps: usize, perceptual: Option<DistillSettings>) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let f_dir = dir.path().join("f");
    let mut rc = RunConfig::tarflow(cfg.clone());
    rc.noise_std = Some(0.05);
    let run = Run::create(&f_dir, rc)?;
    let params = initial_parameters(cfg, 0, &Device::Cpu)?;
    let host = params
        .into_iter()
        .map(|(k, t)| Ok((k, HostTensor { shape: t.dims().to_vec(), data: t.flatten_all()?.to_vec1()? })))
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_safetensors(&run.weights_path(), &host)?;
    let n = 4 * batch;
    let u = Uniform::new(-1.0f32, 1.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let data = MemData {
        channels: cfg.in_channels,
        size: cfg.img_size,
        classes: cfg.num_classes,
        images: (0..n * cfg.image_dim()).map(|_| u.sample(&mut rng)).collect(),
        labels: (0..n as i64).map(|i| i % cfg.num_classes as i64).collect(),
    };
    let settings = DistillSettings {
        forward: Some(f_dir.display().to_string()),
        batch_size: Some(batch),
        steps: Some(steps as u64 + 1),
        save_every: Some(1_000_000),
        ..perceptual.unwrap_or_default()
    };
    let args = SessionArgs { out: dir.path().join("g"), ..Default::default() };
    distill_with(&args, &settings, "synthetic", &data, &JobCtx::silent())?;
    // From the end of the first step (warm-up: buffers are made) to the end of the last, as the
    // PyTorch script times after its warm-up; metrics.jsonl stamps each step before any checkpoint.
    let log = std::fs::read_to_string(dir.path().join("g").join("metrics.jsonl"))?;
    let times: Vec<f64> = log.lines().map(|l| Ok(serde_json::from_str::<serde_json::Value>(l)?["time"].as_f64().unwrap_or(f64::NAN))).collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(times.len() == steps + 1, "expected {} steps in metrics.jsonl, found {}", steps + 1, times.len());
    Ok(steps as f64 / (times[steps] - times[0]))
}

/// The perceptual settings of a distillation with both terms on crops resized to `size`, their
/// weights written to `dir`: the formula VGG16 of the LPIPS fixtures with the real heads, and a
/// ConvNeXt-V2 Base of random weights in the hub's layout.
fn perceptual_settings(dir: &std::path::Path, size: usize) -> anyhow::Result<DistillSettings> {
    use biflow_core::models::convnext::{ConvNextConfig, ConvNextV2};
    let vgg = dir.join("vgg.safetensors");
    write_safetensors(&vgg, &biflow_core::eval::lpips::formula_backbone())?;
    let heads = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips/vgg-lin-v0.1.pth");
    let convnext = dir.join("convnextv2-base");
    std::fs::create_dir_all(&convnext)?;
    let config = json!({"model_type": "convnextv2", "hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]});
    std::fs::write(convnext.join("config.json"), config.to_string())?;
    let varmap = candle_nn::VarMap::new();
    ConvNextV2::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &serde_json::from_value::<ConvNextConfig>(config)?)?;
    varmap.save(convnext.join("model.safetensors"))?;
    Ok(DistillSettings {
        lpips: Some(heads.display().to_string()),
        vgg: Some(vgg.display().to_string()),
        convnext: Some(convnext.display().to_string()),
        perceptual_size: Some(size),
        ..Default::default()
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().cloned().unwrap_or_else(|| "all".into());
    let what = args.get(1).cloned().unwrap_or_else(|| "all".into());
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let batches: Vec<usize> = flag("--batches").unwrap_or_else(|| "1,64".into()).split(',').map(|s| s.parse().unwrap()).collect();
    let steps: usize = flag("--steps").map_or(5, |s| s.parse().unwrap());
    if what == "perceptual" {
        let size: usize = flag("--size").map_or(224, |s| s.parse().unwrap());
        let cfg = config(if which == "all" { "demo" } else { &which });
        let weights = tempfile::tempdir()?;
        for &n in &batches {
            let per_second = distill_steps_per_second(&cfg, n, steps, Some(perceptual_settings(weights.path(), size)?))?;
            println!("{}", json!({"what": "perceptual", "config": which, "batch": n, "size": size, "steps": steps, "stepsPerSecond": per_second, "peakRssMiB": peak_rss_mib()}));
        }
        return Ok(());
    }
    let dev = Device::Cpu;
    let (peak, packed_peak) = matmul_gflops()?;
    if what == "all" || what == "matmul" {
        println!("{}", json!({"what": "matmul", "size": 1024, "gflops": peak, "packedGflops": packed_peak, "threads": rayon::current_num_threads()}));
    }
    let names: Vec<&str> = if which == "all" { vec!["tiny", "paper"] } else { vec![which.as_str()] };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for name in names {
        let cfg = config(name);
        let (flow, g, g_cfg) = models(&cfg)?;
        let (t, d) = (cfg.num_tokens(), cfg.token_dim());
        if what == "all" || what == "sample" {
            for &n in &batches {
                let z = randn(&[n, t, d], &mut rng)?;
                let y = Tensor::from_vec((0..n as i64).map(|i| i % 10).collect::<Vec<_>>(), n, &dev)?;
                let w = vec![0.0f32; n];
                // Rounds that alternate the two paths, so that both see the same state of a shared
                // machine: G's one evaluation repeated for 0.5 s, then one exact sample (causal
                // decoding, then the denoising step). At least 3 rounds and 4 s of exact sampling;
                // each path's best round counts (one warm-up evaluation of each first).
                let reverse = || -> anyhow::Result<()> { flow.unpatchify(&g.sample(&z, Some(&y), Some(&w))?).map(drop) };
                let exact = || -> anyhow::Result<(f64, f64)> {
                    let t0 = Instant::now();
                    let x = flow.reverse(&z, Some(&y), &ReverseOptions::default(), |_, _| Ok(()))?;
                    let decode_s = t0.elapsed().as_secs_f64();
                    denoise(&flow, &x, Some(&y), 0.05)?;
                    Ok((decode_s, t0.elapsed().as_secs_f64()))
                };
                reverse()?;
                exact()?;
                let (mut reverse_s, mut decode_s, mut exact_s, mut exact_total, mut rounds) = (f64::INFINITY, f64::INFINITY, f64::INFINITY, 0.0, 0);
                while rounds < 3 || exact_total < 4.0 {
                    let (t0, mut reps) = (Instant::now(), 0);
                    while reps == 0 || t0.elapsed().as_secs_f64() < 0.5 {
                        reverse()?;
                        reps += 1;
                    }
                    reverse_s = reverse_s.min(t0.elapsed().as_secs_f64() / reps as f64);
                    let (d, e) = exact()?;
                    if e < exact_s {
                        (decode_s, exact_s) = (d, e);
                    }
                    exact_total += e;
                    rounds += 1;
                }
                let (rf, ef) = (reverse_flops(&g_cfg) * n as f64, exact_flops(&cfg) * n as f64);
                println!(
                    "{}",
                    json!({"what": "sample", "config": name, "batch": n,
                        "reverseImagesPerSecond": n as f64 / reverse_s, "exactImagesPerSecond": n as f64 / exact_s,
                        "speedup": exact_s / reverse_s, "exactDecodeSeconds": decode_s, "exactDenoiseSeconds": exact_s - decode_s,
                        "reverseSeconds": reverse_s, "rounds": rounds,
                        "reverseGflopPerImage": rf / n as f64 / 1e9, "exactGflopPerImage": ef / n as f64 / 1e9,
                        "reverseGflops": rf / reverse_s / 1e9, "reverseFractionOfMatmul": rf / reverse_s / 1e9 / peak, "reverseFractionOfPacked": rf / reverse_s / 1e9 / packed_peak,
                        "exactGflops": ef / exact_s / 1e9, "exactSequentialSteps": cfg.num_blocks * (t - 1), "matmulGflops": peak, "packedMatmulGflops": packed_peak})
                );
            }
        }
        if what == "all" || what == "distill" {
            // The CPU's distillation step, phase by phase, as distill.rs runs it: F's trajectory
            // (candle, no graph), G's unconditional pass (hand-written, kept nothing), G's guided
            // pass (kept), the loss and its gradient w.r.t. G's outputs (autograd), G's backward.
            let n = if name == "paper" { 16 } else { 64 };
            let loss_cfg = LossConfig { kind: LossKind::Align, rms_norm: true, learned_denoise: true, adaptive_p: 1.0, adaptive_eps: 0.01 };
            let g_params = reverse::initial_parameters(&g_cfg, 1, &dev)?;
            let mut g_names: Vec<String> = g_params.keys().cloned().collect();
            g_names.sort();
            let g_values: Vec<Vec<f32>> = g_names.iter().map(|k| g_params[k].flatten_all()?.to_vec1::<f32>()).collect::<Result<_, _>>()?;
            let sizes: Vec<usize> = g_values.iter().map(Vec::len).collect();
            let params: Vec<&[f32]> = g_values.iter().map(Vec::as_slice).collect();
            let g = ReverseModel::new(VarBuilder::from_tensors(g_params.clone(), DType::F32, &dev), &g_cfg)?;
            let mut engine = g.engine(&g_names, &sizes)?;
            let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0f32; s]).collect();
            let u = Uniform::new(-1.0f32, 1.0);
            let mut phase = [0f64; 6];
            for s in 0..=steps {
                let x = Tensor::from_vec((0..n * cfg.image_dim()).map(|_| u.sample(&mut rng)).collect::<Vec<f32>>(), (n, cfg.in_channels, cfg.img_size, cfg.img_size), &dev)?;
                let clean = flow.patchify(&x)?;
                let noisy = (&clean + (randn(&[n, t, d], &mut rng)? * 0.05)?)?;
                let labels: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
                let y = Tensor::new(labels.as_slice(), &dev)?;
                let w: Vec<f32> = (0..n).map(|i| (i % 4) as f32 + 0.5).collect();
                let c0 = Instant::now();
                let fo = flow.forward_tokens(&noisy, Some(&y))?;
                let z: Vec<f32> = fo.z.flatten_all()?.to_vec1()?;
                let c1 = Instant::now();
                let un = engine.forward(&params, &z, Some(&vec![-1; n]), &w, false, false)?;
                let c2 = Instant::now();
                let gu = engine.forward(&params, &z, Some(&labels), &w, true, false)?;
                let c3 = Instant::now();
                let tensor = |v: Vec<f32>| Tensor::from_vec(v, (n, t, d), &dev);
                let vars: Vec<Var> = std::iter::once(gu.x).chain(gu.heads).map(|v| Var::from_vec(v, (n, t, d), &dev)).collect::<Result<_, _>>()?;
                let guided = ReverseOutput { x: vars[0].as_tensor().clone(), heads: vars[1..].iter().map(|v| v.as_tensor().clone()).collect(), states: Vec::new() };
                let uncond = ReverseOutput { x: tensor(un.x)?, heads: un.heads.into_iter().map(tensor).collect::<Result<_, _>>()?, states: Vec::new() };
                let pred = implied_conditional(&guided, &uncond, &w)?;
                let loss = loss_cfg.loss(&pred, &Targets { clean: &clean, noisy: &noisy, trajectory: &fo.trajectory }, None)?;
                let store = loss.total.backward()?;
                let dv: Vec<Vec<f32>> = vars.iter().map(|v| store.get(v.as_tensor()).unwrap().flatten_all()?.to_vec1()).collect::<Result<_, _>>()?;
                let c4 = Instant::now();
                engine.backward(&params, &dv[0], &dv[1..], &[], &mut grads)?;
                let c5 = Instant::now();
                if s > 0 {
                    for (k, (a, b)) in [(c0, c1), (c1, c2), (c2, c3), (c3, c4), (c4, c5), (c0, c5)].into_iter().enumerate() {
                        phase[k] += (b - a).as_secs_f64() / steps as f64;
                    }
                }
            }
            // A step: F forward, G forward twice (with heads), G backward (about 2 forwards).
            let flops = n as f64 * (forward_flops(&cfg) + 4.0 * reverse_flops(&g_cfg));
            let whole = distill_steps_per_second(&cfg, n, steps, None)?;
            println!(
                "{}",
                json!({"what": "distill", "config": name, "batch": n, "steps": steps,
                    "forwardTrajectoryS": phase[0], "unconditionalPassS": phase[1], "guidedPassS": phase[2],
                    "lossS": phase[3], "backwardS": phase[4], "stepS": phase[5], "stepsPerSecond": 1.0 / phase[5],
                    "trainerStepsPerSecond": whole,
                    "gflopPerStep": flops / 1e9, "gflops": flops / phase[5] / 1e9, "fractionOfMatmul": flops / phase[5] / 1e9 / peak})
            );
        }
    }
    Ok(())
}
