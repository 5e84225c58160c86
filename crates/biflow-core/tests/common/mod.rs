//! Helpers shared by the trainer tests (train and distill).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use biflow_core::job::{Event, JobCtx};
use biflow_core::jobs::train::TrainSettings;
use biflow_core::train::MemData;
use rand::{Rng, SeedableRng};

/// 8x8 grey images: a ramp along x (class 0) or y (class 1) with random amplitude and noise.
pub fn toy_data(n: usize, seed: u64) -> MemData {
    toy_data_sized(n, seed, 8)
}

/// [`toy_data`] at `size` x `size` pixels.
#[allow(dead_code)]
pub fn toy_data_sized(n: usize, seed: u64, size: usize) -> MemData {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = (i % 2) as i64;
        let amp: f32 = rng.gen_range(0.5..0.9);
        for y in 0..size {
            for x in 0..size {
                let t = if class == 0 { x } else { y } as f32 / (size - 1) as f32;
                let v = amp * (2.0 * t - 1.0) + rng.gen_range(-0.05..0.05);
                images.push(((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0);
            }
        }
        labels.push(class);
    }
    MemData { channels: 1, size, classes: 2, images, labels }
}

/// A context that asks the job to stop (as Ctrl-C does) once it reports step `at`.
#[allow(dead_code)]
pub fn cancelling_ctx(at: u64) -> JobCtx {
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    JobCtx::new(
        move |e| {
            if let Event::Progress { metrics, .. } = e {
                if metrics.get("step").and_then(|v| v.as_u64()).is_some_and(|s| s >= at) {
                    c2.store(true, Ordering::SeqCst);
                }
            }
        },
        cancel,
    )
}

/// The toy F the trainer tests train on [`toy_data`]: patch 2 (T = 16, D = 4), 64 channels, 2
/// blocks of 1 layer, batch 16 at lr 2e-3 after 5 warmup steps.
#[allow(dead_code)]
pub fn toy_flow_settings(steps: u64, seed: u64) -> TrainSettings {
    TrainSettings {
        batch_size: Some(16),
        steps: Some(steps),
        lr: Some(2e-3),
        warmup: Some(5),
        patch_size: Some(2),
        channels: Some(64),
        blocks: Some(2),
        layers_per_block: Some(1),
        seed: Some(seed),
        ..Default::default()
    }
}
