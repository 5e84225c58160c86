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

mod common;
use common::{arg, matmul_ceiling, peak_rss_mib};

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
