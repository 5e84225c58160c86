//! VAE benchmark: images/s of encoding (to the posterior mean) and of decoding at the full SD-VAE
//! configuration (stabilityai/sd-vae-ft-ema's shapes, random weights), at a size and batch, on the CPU,
//! with this machine's f32 matmul rate in the same run. Prints one JSON object;
//! scripts/bench-vae-diffusers.py measures diffusers' AutoencoderKL the same way.
//!
//!   cargo run --release -p biflow-core --example bench_vae -- [--size 256] [--batch 8] [--rounds 1]

use std::time::Instant;

use biflow_core::models::vae::{Vae, VaeConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The process's peak resident memory (MiB), from /proc.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// The f32 matmul rate of this machine (GFLOP/s), 1024^3 products.
fn matmul_ceiling(dev: &Device) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), dev)?;
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), dev)?;
    let _ = a.matmul(&b)?;
    let t = Instant::now();
    for _ in 0..10 {
        let _ = a.matmul(&b)?;
    }
    Ok(10.0 * 2.0 * 1024f64.powi(3) / t.elapsed().as_secs_f64() / 1e9)
}

fn main() -> anyhow::Result<()> {
    let (size, batch, rounds) = (arg("--size", 256), arg("--batch", 8), arg("--rounds", 1));
    let dev = Device::Cpu;
    biflow_core::engines::ops::tune_allocator();
    let config: VaeConfig = serde_json::from_value(json!({
        "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "latent_channels": 4, "norm_num_groups": 32
    }))?;
    // Random weights drawn through a VarMap, then held as constants (a frozen network records no graph).
    let varmap = VarMap::new();
    Vae::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config)?;
    let weights = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect::<std::collections::HashMap<_, _>>();
    let vae = Vae::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &config)?;
    let ceiling = matmul_ceiling(&dev)?;
    let x = Tensor::rand(-1f32, 1.0, (batch, 3, size, size), &dev)?;
    let time = |f: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<f64> {
        f()?; // warm-up
        let t = Instant::now();
        for _ in 0..rounds {
            f()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        }
        Ok(t.elapsed().as_secs_f64() / rounds as f64)
    };
    let encode = time(&|| Ok(vae.encode(&x)?.0))?;
    let z = vae.encode(&x)?.0;
    let decode = time(&|| vae.decode(&z))?;
    println!(
        "{}",
        json!({"what": "vae", "size": size, "batch": batch, "rounds": rounds, "encodeSeconds": encode, "decodeSeconds": decode,
            "encodeImagesPerSecond": batch as f64 / encode, "decodeImagesPerSecond": batch as f64 / decode,
            "matmulGflops": ceiling, "peakRssMiB": peak_rss_mib(), "threads": rayon::current_num_threads()})
    );
    Ok(())
}
