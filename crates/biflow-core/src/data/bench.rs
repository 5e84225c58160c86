//! Hidden jobs behind `npm run bench:data` and the tests: synthetic PNG folders and timed reads.

use anyhow::Result;
use serde_json::Value;

use super::{Dataset, Split};

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SynthOptions {
    out: String,
    count: usize,
    #[serde(default = "default_synth_size")]
    size: u32,
    #[serde(default)]
    classes: usize,
    #[serde(default)]
    seed: u64,
}

fn default_synth_size() -> u32 {
    32
}

/// Hidden (benchmarks, tests): write `count` random PNGs of `size` x `size` into `out`.
pub fn synth(o: SynthOptions) -> Result<Value> {
    let bytes = super::synth_pngs(std::path::Path::new(&o.out), o.count, o.size, o.classes, o.seed)?;
    Ok(serde_json::json!({ "count": o.count, "bytes": bytes }))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BenchReadOptions {
    dir: String,
    #[serde(default = "default_bench_batch")]
    batch: usize,
    /// Images to read in all (random batches from the train split).
    count: usize,
}

fn default_bench_batch() -> usize {
    256
}

/// Hidden (benchmarks): read random batches through `Dataset::batch_f32` and time it.
pub fn bench_read(o: BenchReadOptions) -> Result<Value> {
    let t0 = std::time::Instant::now();
    let ds = Dataset::open(std::path::Path::new(&o.dir))?;
    let open_secs = t0.elapsed().as_secs_f64();
    let n = ds.len(Split::Train);
    anyhow::ensure!(n > 0 && o.batch > 0, "nothing to read");
    let mut state = 1u64;
    let mut read = 0usize;
    let mut checksum = 0f64;
    let t1 = std::time::Instant::now();
    while read < o.count {
        let idx: Vec<usize> = (0..o.batch.min(o.count - read))
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as usize) % n
            })
            .collect();
        let (x, _) = ds.batch_f32(Split::Train, &idx)?;
        checksum += x[0] as f64;
        read += idx.len();
    }
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({ "count": read, "seconds": secs, "imagesPerSec": read as f64 / secs.max(1e-9), "openSeconds": open_secs, "sum": checksum }))
}
