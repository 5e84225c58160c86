//! Benchmark of the forward flow: forward+backward (the training step's model part) and exact
//! sampling, for the tiny and paper-shaped configurations. Prints one JSON object per measurement
//! (wall seconds, CPU seconds of this process, which stay meaningful on a busy machine, peak RSS;
//! the peak is cumulative over the process, so run one configuration per process to read it).
//!
//!   cargo run --release -p biflow-core --example bench_flow -- [tiny|paper|all] [train|sample|all] [--steps N] [--num N]

use std::time::Instant;

use biflow_core::models::flow::{new_trainable, nll_loss, FlowConfig, ReverseOptions};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal, Uniform};

mod common;
use common::peak_rss_mib;

fn config(name: &str) -> (FlowConfig, usize) {
    match name {
        // MNIST at 32x32, patch 4: T = 64, D = 16.
        "tiny" => (
            FlowConfig { img_size: 32, in_channels: 1, patch_size: 4, channels: 256, num_blocks: 4, layers_per_block: 2, num_classes: 10, clip_scale: None },
            64,
        ),
        // 64x64x4 with patch 4: T = 256, D = 64.
        "paper" => (
            FlowConfig { img_size: 64, in_channels: 4, patch_size: 4, channels: 512, num_blocks: 8, layers_per_block: 1, num_classes: 10, clip_scale: None },
            16,
        ),
        _ => panic!("unknown config {name}"),
    }
}

/// CPU seconds (user + system) used by this process so far: robust to other load on the machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().cloned().unwrap_or_else(|| "all".into());
    let what = args.get(1).cloned().unwrap_or_else(|| "all".into());
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok());
    let steps = flag("--steps").unwrap_or(3);
    let dev = Device::Cpu;
    let names: Vec<&str> = if which == "all" { vec!["tiny", "paper"] } else { vec![which.as_str()] };
    for name in names {
        let (cfg, batch) = config(name);
        let (_vm, model) = new_trainable(&cfg, 0, &dev)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let u = Uniform::new(-1.0f32, 1.0);
        if what == "all" || what == "train" {
            let x: Vec<f32> = (0..batch * cfg.image_dim()).map(|_| u.sample(&mut rng)).collect();
            let x = Tensor::from_vec(x, (batch, cfg.in_channels, cfg.img_size, cfg.img_size), &dev)?;
            let y = Tensor::from_vec((0..batch as i64).map(|i| i % 10).collect::<Vec<_>>(), batch, &dev)?;
            // Warm-up step, then timed steps.
            let mut fwd = 0.0;
            let mut bwd = 0.0;
            let mut cpu0 = 0.0;
            for s in 0..=steps {
                if s == 1 {
                    cpu0 = cpu_seconds();
                }
                let t0 = Instant::now();
                let loss = nll_loss(&model.forward(&x, Some(&y))?)?;
                let _ = loss.to_scalar::<f32>()?;
                let t1 = Instant::now();
                let _grads = loss.backward()?;
                let t2 = Instant::now();
                if s > 0 {
                    fwd += (t1 - t0).as_secs_f64();
                    bwd += (t2 - t1).as_secs_f64();
                }
            }
            let per = (fwd + bwd) / steps as f64;
            let cpu = (cpu_seconds() - cpu0) / steps as f64;
            println!(
                "{}",
                serde_json::json!({"config": name, "what": "forward+backward", "batch": batch, "steps": steps,
                    "forwardS": fwd / steps as f64, "backwardS": bwd / steps as f64,
                    "stepsPerSecond": 1.0 / per, "imagesPerSecond": batch as f64 / per, "cpuSecondsPerStep": cpu,
                    "threads": rayon::current_num_threads(), "peakRssMiB": peak_rss_mib().unwrap_or(0.0)})
            );
        }
        if what == "all" || what == "sample" {
            let num = flag("--num").unwrap_or(batch);
            let (t, d) = (cfg.num_tokens(), cfg.token_dim());
            let z: Vec<f32> = (0..num * t * d).map(|_| StandardNormal.sample(&mut rng)).collect();
            let z = Tensor::from_vec(z, (num, t, d), &dev)?;
            let y = Tensor::from_vec((0..num as i64).map(|i| i % 10).collect::<Vec<_>>(), num, &dev)?;
            for guidance in [0.0, 1.0] {
                let (t0, c0) = (Instant::now(), cpu_seconds());
                let _x = model.reverse(&z, Some(&y), &ReverseOptions { guidance, ..Default::default() }, |_, _| Ok(()))?;
                let s = t0.elapsed().as_secs_f64();
                println!(
                    "{}",
                    serde_json::json!({"config": name, "what": "exact-sample", "num": num, "guidance": guidance,
                        "seconds": s, "imagesPerSecond": num as f64 / s, "cpuSeconds": cpu_seconds() - c0, "peakRssMiB": peak_rss_mib().unwrap_or(0.0)})
                );
            }
        }
    }
    Ok(())
}
