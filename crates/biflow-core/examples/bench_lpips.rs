//! LPIPS benchmark: the distance and its gradient with respect to the first image (what a
//! perceptual training loss needs), at a size and batch, on the CPU, over the parity fixture's
//! formula VGG16 and the real v0.1 heads; the f32 matmul ceiling of this machine in the same run.
//! Prints one JSON object; scripts/bench-lpips-pytorch.py measures the lpips package the same way.
//!
//!   cargo run --release -p biflow-core --example bench_lpips -- [--size 224] [--batch 16] [--rounds 2]

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use biflow_core::eval::lpips::formula_backbone;
use biflow_core::models::lpips::{convolutions, Lpips};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde_json::json;

mod common;
use common::{arg, matmul_ceiling, peak_rss_mib};

/// Multiply-adds x2 of VGG16's convolutions on one image of `size` pixels.
fn vgg_flops(size: usize) -> f64 {
    let mut side = size;
    let mut flops = 0.0;
    for (i, c_in, c_out) in convolutions() {
        // A pool opens each stage after the first (features 5, 10, 17, 24).
        if [5, 10, 17, 24].contains(&i) {
            side /= 2;
        }
        flops += 2.0 * (c_in * c_out * 9 * side * side) as f64;
    }
    flops
}

fn main() -> anyhow::Result<()> {
    let (size, batch, rounds) = (arg("--size", 224), arg("--batch", 16), arg("--rounds", 2));
    let dev = Device::Cpu;
    let backbone: HashMap<String, Tensor> = formula_backbone().into_iter().map(|(n, t)| Ok((n, Tensor::from_vec(t.data, t.shape, &dev)?))).collect::<anyhow::Result<_>>()?;
    let heads_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips/vgg-lin-v0.1.pth");
    let heads = biflow_core::io::tensors::load_weights(&heads_path, &dev)?;
    let net = Lpips::new(VarBuilder::from_tensors(backbone, DType::F32, &dev), VarBuilder::from_tensors(heads, DType::F32, &dev))?;
    let x0 = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (batch, 3, size, size), &dev)?)?;
    let x1 = Tensor::rand(-1f32, 1.0, (batch, 3, size, size), &dev)?;
    let ceiling = matmul_ceiling(&dev)?;
    let step = || -> anyhow::Result<()> {
        let d = net.distance(x0.as_tensor(), &x1)?;
        let g = d.sum_all()?.backward()?;
        g.get(x0.as_tensor()).expect("a gradient");
        Ok(())
    };
    step()?; // warm-up
    let t = Instant::now();
    for _ in 0..rounds {
        step()?;
    }
    let secs = t.elapsed().as_secs_f64() / rounds as f64;
    let t = Instant::now();
    net.distance(&x1, &x1)?.to_vec1::<f32>()?;
    let forward_secs = t.elapsed().as_secs_f64();
    // Forward of both images and the input gradient of the first (about one more forward).
    let flops = 3.0 * batch as f64 * vgg_flops(size);
    println!(
        "{}",
        json!({"what": "lpips forward+backward", "size": size, "batch": batch, "rounds": rounds,
            "secondsPerPass": secs, "pairsPerSecond": batch as f64 / secs, "forwardSeconds": forward_secs,
            "gflops": flops / secs / 1e9, "matmulGflops": ceiling, "fractionOfMatmul": flops / secs / 1e9 / ceiling, "peakRssMiB": peak_rss_mib()})
    );
    Ok(())
}
