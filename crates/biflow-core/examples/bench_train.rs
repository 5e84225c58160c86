//! Training throughput of the forward flow: `bench_train CONFIG [STEPS] [WARMUP]`, one JSON line out.
//!
//! CONFIG: `tiny` (32x32x1, patch 4, 256 channels, 4 blocks x 2 layers, batch 64) or `paper`
//! (64x64x4, patch 4: T=256, D=64; 512 channels, 8 blocks x 1 layer, batch 16). Random data, the full
//! trainer (noise, label drop, AdamW, EMA, metrics), one checkpoint at the end. steps/s is measured over
//! the steps after WARMUP from the trainer's own per-step timestamps; peak memory is VmHWM.

use biflow_core::job::JobCtx;
use biflow_core::jobs::train::{train_with, TrainSettings};
use biflow_core::jobs::training::SessionArgs;
use biflow_core::train::MemData;
use rand::{Rng, SeedableRng};

fn vm_hwm_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) this process has used so far, from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("tiny");
    let steps: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let warm: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let (size, ch, patch, c, blocks, layers, batch) = match name {
        "tiny" => (32, 1, 4, 256, 4, 2, 64),
        "paper" => (64, 4, 4, 512, 8, 1, 16),
        // The model of the MNIST loss test.
        "small" => (32, 1, 4, 64, 2, 1, 32),
        _ => anyhow::bail!("unknown config '{name}' (tiny|paper)"),
    };
    let n = batch * 4;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let data = MemData {
        channels: ch,
        size,
        classes: 10,
        images: (0..n * ch * size * size).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        labels: (0..n as i64).map(|i| i % 10).collect(),
    };
    let s = TrainSettings {
        batch_size: Some(batch),
        steps: Some(steps),
        patch_size: Some(patch),
        channels: Some(c),
        blocks: Some(blocks),
        layers_per_block: Some(layers),
        save_every: Some(1_000_000),
        lr: Some(1e-4),
        ..Default::default()
    };
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let a = SessionArgs { out: out.clone(), ..Default::default() };
    let cpu0 = cpu_seconds();
    let r = train_with(&a, &s, "random", &data, &JobCtx::silent())?;
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let times: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time"].as_f64().unwrap())
        .collect();
    let measured = times.len() - warm;
    let secs = times[times.len() - 1] - times[warm - 1];
    let sps = measured as f64 / secs;
    let out = serde_json::json!({
        "config": name,
        "imgSize": size, "inChannels": ch, "patchSize": patch, "channels": c, "blocks": blocks, "layersPerBlock": layers,
        "batchSize": batch,
        "parameters": r["parameters"],
        "threads": rayon::current_num_threads(),
        "measuredSteps": measured,
        "stepsPerSec": sps,
        "imagesPerSec": sps * batch as f64,
        "secondsPerStep": 1.0 / sps,
        "phaseSeconds": r["phaseSeconds"],
        "peakRssMiB": vm_hwm_mib(),
        // CPU time of the whole run (all steps, checkpoint included) per step: less sensitive than wall
        // time to other processes sharing the machine.
        "cpuSecondsPerStepAllSteps": cpu.map(|c| c / steps as f64),
        "loadAverage": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().next().unwrap_or("").to_string()),
    });
    println!("{out}");
    Ok(())
}
