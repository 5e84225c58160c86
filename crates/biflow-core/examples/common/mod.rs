//! What the benchmark examples share: their flags, this machine's matmul rate, peak memory.
#![allow(dead_code)] // each example uses its own subset

use std::time::Instant;

use candle_core::{Device, Tensor};

/// The value after flag `name`, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The f32 matmul rate of this machine (GFLOP/s), 1024^3 products.
pub fn matmul_ceiling(dev: &Device) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), dev)?;
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), dev)?;
    let _ = a.matmul(&b)?;
    let t = Instant::now();
    for _ in 0..10 {
        let _ = a.matmul(&b)?;
    }
    Ok(10.0 * 2.0 * 1024f64.powi(3) / t.elapsed().as_secs_f64() / 1e9)
}

/// The process's peak resident memory (MiB), from /proc (VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}
