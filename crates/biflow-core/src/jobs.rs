//! The table of jobs the CLI can run. Each job takes its options as JSON (camelCase keys, the
//! same names as the CLI flags) and returns a JSON result that `--json` prints.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::job::JobCtx;

fn opts<T: DeserializeOwned>(name: &str, options: Value) -> Result<T> {
    serde_json::from_value(options).with_context(|| format!("invalid options for job '{name}'"))
}

/// Run the job called `name`.
pub fn run(name: &str, options: Value, ctx: &JobCtx) -> Result<Value> {
    match name {
        "echo" => echo(opts(name, options)?, ctx),
        "data.prepare" => crate::data::prepare(opts(name, options)?, ctx),
        "data.inspect" => crate::data::inspect(opts(name, options)?, ctx),
        "data.synth" => synth(opts(name, options)?),
        "data.benchRead" => bench_read(opts(name, options)?),
        "fid.eval" => crate::fid::eval::eval(opts(name, options)?, ctx),
        "fid.convertWeights" => crate::fid::eval::convert_weights(opts(name, options)?, ctx),
        "fid.formulaWeights" => crate::fid::eval::formula_weights(opts(name, options)?, ctx),
        "train" => crate::train::train_job(options, ctx),
        "import-tarflow" => crate::import::import_tarflow(opts(name, options)?, ctx),
        "sample" => crate::sample::sample(opts(name, options)?, ctx),
        "eval-bpd" => crate::bpd::eval_bpd(opts(name, options)?, ctx),
        _ => bail!("unknown job '{name}'"),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EchoOptions {
    steps: u64,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    fail: Option<String>,
    #[serde(default)]
    sleep_ms: u64,
}

/// A self-test of the bridge: counts to `steps` with progress, can fail, panic or be cancelled.
fn echo(o: EchoOptions, ctx: &JobCtx) -> Result<Value> {
    ctx.start("echo", Some(o.steps));
    for i in 1..=o.steps {
        ctx.check_cancelled()?;
        std::thread::sleep(std::time::Duration::from_millis(o.sleep_ms));
        ctx.progress(i, Some(o.steps), crate::metrics!["i" => i]);
    }
    ctx.end();
    if o.panic {
        panic!("echo job asked to panic");
    }
    if let Some(msg) = o.fail {
        bail!(msg);
    }
    Ok(serde_json::json!({ "steps": o.steps }))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SynthOptions {
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
fn synth(o: SynthOptions) -> Result<Value> {
    let bytes = crate::data::synth_pngs(std::path::Path::new(&o.out), o.count, o.size, o.classes, o.seed)?;
    Ok(serde_json::json!({ "count": o.count, "bytes": bytes }))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BenchReadOptions {
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
fn bench_read(o: BenchReadOptions) -> Result<Value> {
    use crate::data::{Dataset, Split};
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
