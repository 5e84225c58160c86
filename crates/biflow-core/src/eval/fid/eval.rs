//! The `fid.eval` and `fid.convertWeights` jobs: score a source against a reference.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};

use super::frechet::{frechet_distance, Gaussian};
use super::inception::{FeatureNet, FEATURES};
use super::preprocess::preprocess_image;
use super::source::{ArraySource, FolderSource, ImageSource, Limited, RunSource};
use super::stats::{is_stats_npz, load_stats, save_stats, StatsAccumulator};
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;

crate::options! {
    pub struct EvalOptions {
        /// images to score: folder, .npz (images or mu/sigma), dataset DIR, or model RUN (with --num)
        source: String,
        /// what to compare with (same kinds); optional with --save-stats or --is
        reference: Option<String>,
        /// FID Inception weights (.pth legacy or zip, or .safetensors); default
        /// $BIFLOW_INCEPTION_WEIGHTS, then ~/.cache/biflow/
        inception_weights: Option<String>,
        /// write SOURCE's statistics (mu, sigma) to this .npz, as pytorch-fid's --save-stats
        save_stats: Option<String>,
        /// images per network batch
        batch_size: NonZeroUsize = 32,
        /// split of a prepared dataset directory
        split: String {"train", "val"} = "train",
        /// score at most this many images of each image source (the number of samples for a RUN)
        num: Option<NonZeroUsize>,
        /// also compute the Inception Score of SOURCE (10 splits)
        is: bool,
        /// number of splits for the Inception Score
        is_splits: NonZeroUsize = 10,
        /// seed of the noise when a side is a model RUN
        seed: u64 = 0,
        /// classifier-free guidance weight when a side is a model RUN
        guidance: f64 = 0,
        /// how a model RUN samples
        method: Option<String> ["reverse for a distilled run, else exact"] {"reverse", "exact"},
    }
}

/// What a side (source or reference) turned out to be.
enum Side {
    Stats(Gaussian),
    Images(Box<dyn ImageSource>),
}

fn open_side(spec: &str, o: &EvalOptions, device: &Device) -> Result<(Side, &'static str)> {
    let (split, num) = (Some(o.split.as_str()), o.num.map(NonZeroUsize::get));
    let path = Path::new(spec);
    ensure!(
        path.exists(),
        "{spec} does not exist (expected an image folder, an .npz file, a prepared dataset directory or a model run)"
    );
    let limit = |s: Box<dyn ImageSource>| -> Box<dyn ImageSource> {
        match num {
            Some(n) => Box::new(Limited::new(BoxedSource(s), n)),
            None => s,
        }
    };
    if path.is_file() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        ensure!(ext == "npz", "{spec}: a file source must be an .npz (images as arr_0, or mu/sigma statistics)");
        if is_stats_npz(path)? {
            return Ok((Side::Stats(load_stats(path)?), "stats"));
        }
        return Ok((Side::Images(limit(Box::new(ArraySource::open_npz(path)?))), "npz"));
    }
    if path.join("config.json").is_file() && path.join("weights.safetensors").is_file() {
        let n = num.with_context(|| format!("{spec} is a model run: give --num N, the number of samples to score"))?;
        return Ok((Side::Images(Box::new(RunSource::open(path, o.method.clone(), n, o.seed, o.guidance, device)?)), "run"));
    }
    if path.join("manifest.json").is_file() {
        return Ok((Side::Images(limit(super::dataset_source(path, split)?)), "dataset"));
    }
    Ok((Side::Images(limit(Box::new(FolderSource::open(path)?))), "folder"))
}

struct BoxedSource(Box<dyn ImageSource>);
impl ImageSource for BoxedSource {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn len(&self) -> Option<usize> {
        self.0.len()
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<super::preprocess::Image>>> {
        self.0.next_batch(max)
    }
}

/// Features of every image of a source: streaming statistics (and softmax probabilities when `keep_probs`).
pub struct Scored {
    pub gaussian: Gaussian,
    pub count: u64,
    pub probs: Vec<Vec<f32>>,
    pub seconds: f64,
}

/// Run the network over a source, batch by batch, accumulating statistics in float64.
pub fn score_source(net: &dyn FeatureNet, src: &mut dyn ImageSource, batch: usize, keep_probs: bool, ctx: &JobCtx) -> Result<Scored> {
    let total = src.len().map(|n| n as u64);
    let t0 = Instant::now();
    ctx.start(&format!("inception features: {}", src.describe()), total);
    let mut acc = StatsAccumulator::new(FEATURES);
    let mut probs = Vec::new();
    while let Some(images) = src.next_batch(batch)? {
        ctx.check_cancelled()?;
        let xs: Vec<_> = {
            use rayon::prelude::*;
            images.par_iter().map(preprocess_image).collect()
        };
        let outs = net.features(&xs, keep_probs)?;
        let feats: Vec<Vec<f32>> = outs.iter().map(|o| o.features.clone()).collect();
        acc.add(&feats);
        if keep_probs {
            for o in outs {
                probs.push(softmax(o.logits.as_ref().context("the Inception network gave no logits")?));
            }
        }
        let done = acc.count();
        ctx.progress(done, total, crate::metrics!["imagesPerSecond" => done as f64 / t0.elapsed().as_secs_f64()]);
    }
    ctx.end();
    let count = acc.count();
    let gaussian = acc.finish().with_context(|| format!("cannot compute statistics of {}", src.describe()))?;
    Ok(Scored { gaussian, count, probs, seconds: t0.elapsed().as_secs_f64() })
}

fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|&v| ((v - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// The Inception Score over `splits` consecutive splits: mean and standard deviation of
/// `exp(E_x KL(p(y|x) || p(y)))`, as the usual implementations (float64).
pub fn inception_score(probs: &[Vec<f32>], splits: usize) -> Result<(f64, f64)> {
    ensure!(splits >= 1 && probs.len() >= splits, "the Inception Score needs at least {splits} images, got {}", probs.len());
    let n = probs.len();
    let mut scores = Vec::new();
    for k in 0..splits {
        let part = &probs[k * n / splits..(k + 1) * n / splits];
        let c = part[0].len();
        let mut py = vec![0f64; c];
        for p in part {
            for (a, &v) in py.iter_mut().zip(p) {
                *a += v as f64;
            }
        }
        py.iter_mut().for_each(|a| *a /= part.len() as f64);
        let mut kl = 0f64;
        for p in part {
            for (&v, &q) in p.iter().zip(&py) {
                let v = v as f64;
                if v > 0.0 {
                    kl += v * (v.ln() - q.ln());
                }
            }
        }
        scores.push((kl / part.len() as f64).exp());
    }
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / splits as f64;
    Ok((mean, var.sqrt()))
}

/// Run the job on the `--device` of the options: model runs sample there and the Inception runs there
/// (the hand-written network on the CPU, the candle one elsewhere).
pub fn eval(o: EvalOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    ensure!(
        o.reference.is_some() || o.save_stats.is_some() || o.is,
        "nothing to do: give a REFERENCE to compute the FID, --save-stats OUT.npz, or --is"
    );
    let (batch, splits) = (o.batch_size.get(), o.is_splits.get());
    ensure!(o.split == "train" || o.split == "val", "--split must be 'train' or 'val', not '{}'", o.split);
    let on = on.place()?;
    let (src, src_kind) = open_side(&o.source, &o, &on.device)?;
    let reference = match &o.reference {
        Some(r) => Some(open_side(r, &o, &on.device)?),
        None => None,
    };
    if o.is && matches!(src, Side::Stats(_)) {
        bail!("--is needs images, but {} holds only statistics", o.source);
    }
    let needs_net = matches!(src, Side::Images(_)) || matches!(reference, Some((Side::Images(_), _)));
    let mut weights_used = None;
    let net = if needs_net {
        let path = super::weights::resolve(o.inception_weights.as_deref().map(Path::new))?;
        ctx.message(format!("Inception weights: {}", path.display()));
        let net = super::weights::load_net(&path, &on.device)?;
        weights_used = Some(path.display().to_string());
        Some(net)
    } else {
        None
    };

    let side_result = |side: Side, kind: &str, spec: &str, keep_probs: bool| -> Result<(Gaussian, Value, Vec<Vec<f32>>)> {
        match side {
            Side::Stats(g) => Ok((g, json!({"path": spec, "kind": kind}), Vec::new())),
            Side::Images(mut s) => {
                let net = net.as_deref().context("the Inception network was not loaded")?;
                let r = score_source(net, s.as_mut(), batch, keep_probs, ctx)?;
                let info = json!({
                    "path": spec, "kind": kind, "images": r.count, "seconds": r.seconds,
                    "imagesPerSecond": r.count as f64 / r.seconds.max(1e-9),
                });
                Ok((r.gaussian, info, r.probs))
            }
        }
    };
    let (g1, info1, probs) = side_result(src, src_kind, &o.source, o.is)?;
    if let Some(out) = &o.save_stats {
        save_stats(Path::new(out), &g1)?;
        ctx.message(format!("saved the statistics of {} to {out}", o.source));
    }
    let mut result = json!({ "source": info1, "savedStats": o.save_stats, "inceptionWeights": weights_used });
    if o.is {
        let (mean, std) = inception_score(&probs, splits)?;
        result["is"] = json!(mean);
        result["isStd"] = json!(std);
        result["isSplits"] = json!(splits);
    }
    if let Some((side, kind)) = reference {
        let spec = o.reference.clone().unwrap();
        let (g2, info2, _) = side_result(side, kind, &spec, false)?;
        ensure!(
            g1.dim() == g2.dim(),
            "the statistics have different dimensions ({} for {}, {} for {spec})",
            g1.dim(),
            o.source,
            g2.dim()
        );
        let t = Instant::now();
        let fid = frechet_distance(&g1, &g2)?;
        result["fid"] = json!(fid);
        result["frechetSeconds"] = json!(t.elapsed().as_secs_f64());
        result["reference"] = info2;
    }
    Ok(result)
}

crate::options! {
    pub struct ConvertOptions {
        /// weights to read (.pth, legacy or zip format, or .safetensors)
        input: String,
        /// .safetensors file to write
        output: String,
    }
}

pub fn convert_weights(o: ConvertOptions, ctx: &JobCtx) -> Result<Value> {
    let input = PathBuf::from(&o.input);
    ensure!(input.is_file(), "{} does not exist", input.display());
    let n = super::weights::convert(&input, Path::new(&o.output))?;
    // Check that what was written loads as the network.
    super::weights::load(Path::new(&o.output))?;
    ctx.message(format!("wrote {n} tensors to {}", o.output));
    Ok(json!({ "input": o.input, "output": o.output, "tensors": n }))
}

crate::options! {
    pub struct FormulaOptions {
        /// .safetensors file to write
        output: String,
    }
}

/// Write the deterministic formula weights of the parity fixture as `.safetensors` (tests, benchmarks).
pub fn formula_weights(o: FormulaOptions, _ctx: &JobCtx) -> Result<Value> {
    use crate::io::tensors::{write_safetensors, HostTensor};
    let kept: Vec<(String, HostTensor)> = super::weights::formula_tensors()
        .into_iter()
        .map(|(n, shape, data)| (n, HostTensor { shape, data }))
        .collect();
    write_safetensors(Path::new(&o.output), &kept).with_context(|| format!("cannot write {}", o.output))?;
    Ok(json!({ "output": o.output, "tensors": kept.len() }))
}
