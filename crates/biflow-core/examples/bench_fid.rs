//! FID benchmark: feature-extraction throughput (images/s) at a batch size (default 32) with the formula
//! weights, and the time of one 2048-dimensional Frechet distance. Prints one JSON object.
//!
//!   cargo run --release -p biflow-core --example bench_fid -- [--batch 32] [--batches 3] [--dim 2048]

use std::time::Instant;

use biflow_core::eval::fid::frechet::{frechet_distance, Gaussian};
use biflow_core::eval::fid::inception::FidInception;
use biflow_core::eval::fid::preprocess::{preprocess_image, Image};
use biflow_core::eval::fid::weights::formula_tensors;
use rand::{Rng, SeedableRng};

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let batch = arg("--batch", 32);
    let batches = arg("--batches", 3);
    let dim = arg("--dim", 2048);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);

    let t = Instant::now();
    let net = FidInception::from_tensors(formula_tensors())?;
    let load_s = t.elapsed().as_secs_f64();
    // Random 299x299 images (no resize work, as a 299 input in pytorch-fid).
    let imgs: Vec<Image> = (0..batch).map(|_| Image { h: 299, w: 299, data: (0..299 * 299 * 3).map(|_| rng.gen::<f32>()).collect() }).collect();
    let xs: Vec<_> = imgs.iter().map(preprocess_image).collect();
    let _ = net.forward(&xs[..batch.min(2)], false); // warm-up
    let t = Instant::now();
    for _ in 0..batches {
        let out = net.forward(&xs, false);
        assert_eq!(out.len(), batch);
    }
    let secs = t.elapsed().as_secs_f64();
    let ips = (batch * batches) as f64 / secs;

    // Frechet distance between two random dim x dim covariances (S = A A^T / dim).
    let make = |rng: &mut rand::rngs::StdRng| {
        let a: Vec<f64> = (0..dim * dim).map(|_| rng.gen::<f64>() - 0.5).collect();
        let am = faer::Mat::<f64>::from_fn(dim, dim, |i, j| a[i * dim + j]);
        let s = &am * am.transpose();
        Gaussian { mu: (0..dim).map(|_| rng.gen::<f64>()).collect(), sigma: (0..dim * dim).map(|k| s[(k / dim, k % dim)] / dim as f64).collect() }
    };
    let g1 = make(&mut rng);
    let g2 = make(&mut rng);
    let t = Instant::now();
    let d = frechet_distance(&g1, &g2)?;
    let fd_s = t.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "threads": rayon::current_num_threads(),
            "weightsLoadSeconds": load_s,
            "batchSize": batch,
            "batches": batches,
            "featureSeconds": secs,
            "imagesPerSecond": ips,
            "frechetDim": dim,
            "frechetSeconds": fd_s,
            "frechetValue": d,
        })
    );
    Ok(())
}
