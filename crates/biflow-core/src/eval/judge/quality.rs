//! `biflow eval-quality`: samples of a run (either sampler) or a set of images, judged against the
//! held-out split of a labelled dataset in the judge's feature space.
//!
//! Samples are quantised to 8 bits as a PNG would store them, so scoring a run and scoring the PNGs
//! `biflow sample` wrote from it give the same numbers.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::metrics::{frechet, precision_recall, within_class_diversity, Features};
use super::net::Judge;
use crate::data::{Dataset, Split};
use crate::eval::fid::preprocess::Image;
use crate::eval::fid::source::{ArraySource, FolderSource, ImageSource};
use crate::io::npy::Npz;
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::io::image::to_u8;
use crate::jobs::sample::{SampleOptions, Sampler};

/// k of the k-NN manifolds (Kynkaanniemi et al. use 3).
pub const K_NEAREST: usize = 3;

crate::options! {
    pub struct QualityOptions {
        /// a run to sample (distilled: reverse by default; forward: exact)
        model: Option<String>,
        /// images to judge instead of a --model: a folder, an .npz or a prepared dataset
        images: Option<String>,
        /// the judge folder (biflow judge train)
        judge: String,
        /// the labelled dataset the judge's reference images come from
        data: String,
        /// the reference split
        split: String {"val", "train"} = "val",
        /// sampler of a --model
        method: Option<String> ["reverse for a distilled run"] {"reverse", "exact"},
        /// classifier-free guidance scale of the samples
        guidance: f64 = 0,
        /// scale of the drawn noise z ~ N(0, T^2)
        temperature: Option<f64> ["1"],
        /// samples to draw from --model (classes cycled), or images of IMAGES to score
        num: Option<usize> ["1000"],
        /// seed of the noise (the same seed gives both samplers the same noise)
        seed: u64 = 0,
        /// an .npy of noise tokens (N,T,D) instead of drawn noise
        noise: Option<String>,
        /// reference images from --split
        num_ref: Option<usize> ["the whole split, at most 10000"],
        /// images sampled at once
        batch_size: NonZeroUsize = 64,
    }
}


/// Open a dataset the judge can learn from or score against: labelled, square, with a held-out split.
pub fn labelled_dataset(dir: &str) -> Result<Dataset> {
    let ds = Dataset::open(Path::new(dir))?;
    ds.require_pixels("the judge")?;
    ensure!(
        ds.manifest.labelled() && ds.num_classes() >= 2,
        "the dataset {dir} has no class labels: the judge learns and scores classes (prepare a labelled dataset: class subfolders, an .npz with labels, MNIST)"
    );
    let (_, h, w) = ds.shape();
    ensure!(h == w, "the dataset {dir} has {h}x{w} images; the judge needs square images");
    ensure!(ds.len(Split::Val) > 0, "the dataset {dir} has no held-out split: prepare it with --val-fraction > 0");
    Ok(ds)
}

/// Features and predicted classes of images (N, C, H, W in [-1, 1]).
fn judge_batch(judge: &Judge, x: &Tensor, feats: &mut Features, predicted: &mut Vec<i64>) -> Result<()> {
    let f = judge.features(x)?;
    predicted.extend(judge.logits(&f)?.argmax(1)?.to_vec1::<u32>()?.into_iter().map(i64::from));
    feats.data.extend(f.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// Judged images: features, the judge's classes, and the requested or true labels where known.
pub(super) struct Judged {
    features: Features,
    predicted: Vec<i64>,
    labels: Option<Vec<i64>>,
    what: String,
    sampling_seconds: Option<f64>,
}

impl Judged {
    /// How often the judge's class is the label, over the images that have one (None: no labels).
    pub(super) fn label_accuracy(&self) -> Option<f64> {
        let pairs: Vec<(i64, i64)> = self.labels.as_ref()?.iter().zip(&self.predicted).filter(|(y, _)| **y >= 0).map(|(y, p)| (*y, *p)).collect();
        (!pairs.is_empty()).then(|| pairs.iter().filter(|(y, p)| y == p).count() as f64 / pairs.len() as f64)
    }
}

/// The first `limit` images of a split, judged (progress shown as `phase`).
pub(super) fn judge_dataset(judge: &Judge, ds: &Dataset, split: Split, limit: usize, phase: &str, device: &Device, ctx: &JobCtx) -> Result<Judged> {
    let n = ds.len(split).min(limit);
    let (c, h, w) = ds.shape();
    let mut j = Judged { features: Features::new(judge.config().feature_dim), predicted: vec![], labels: Some(vec![]), what: String::new(), sampling_seconds: None };
    ctx.start(phase, Some(n as u64));
    for lo in (0..n).step_by(256) {
        ctx.check_cancelled()?;
        let idx: Vec<usize> = (lo..(lo + 256).min(n)).collect();
        let (xs, ys) = ds.batch_f32(split, &idx)?;
        judge_batch(judge, &Tensor::from_vec(xs, (idx.len(), c, h, w), device)?, &mut j.features, &mut j.predicted)?;
        j.labels.as_mut().unwrap().extend(ys);
        ctx.progress((lo + idx.len()) as u64, Some(n as u64), serde_json::Map::new());
    }
    ctx.end();
    Ok(j)
}

fn judge_run(judge: &Judge, o: &QualityOptions, model: &str, ds: &Dataset, device: &Device, ctx: &JobCtx) -> Result<Judged> {
    let mut so = SampleOptions::streaming(model, o.method.clone(), o.num.unwrap_or(1000), o.seed, o.guidance);
    so.temperature = o.temperature.unwrap_or(1.0);
    so.noise = o.noise.clone();
    if so.noise.is_some() {
        so.num = None;
    }
    let mut sampler = Sampler::new(&so, device)?;
    let ((mc, mh, mw), classes) = (sampler.output_shape(), sampler.config().num_classes);
    let (c, h, _) = ds.shape();
    ensure!(
        (mc, mh, classes) == (c, h, ds.num_classes()),
        "the model {model} makes {mc}x{mh}x{mw} images of {classes} classes; the dataset {} has {c}x{h}x{h} images of {} classes",
        o.data,
        ds.num_classes()
    );
    let n = sampler.len();
    let labels = sampler.labels().map(<[i64]>::to_vec);
    let method = sampler.method();
    let bs = o.batch_size.get();
    let steps = sampler.steps_per_batch();
    let total = (n.div_ceil(bs) * steps) as u64;
    let mut j = Judged { features: Features::new(judge.config().feature_dim), predicted: vec![], labels, what: format!("{method} samples of {model}"), sampling_seconds: None };
    ctx.start(if method == "exact" { "decode" } else { "sample" }, Some(total));
    let (mut batch, mut sampling) = (0usize, 0.0f64);
    loop {
        let t0 = Instant::now();
        let Some(x) = sampler.next_batch(bs, |k| {
            if k % 8 == 0 || k == steps {
                ctx.progress((batch * steps + k) as u64, Some(total), crate::metrics!["images" => batch * bs]);
            }
            ctx.check_cancelled()
        })?
        else {
            break;
        };
        sampling += t0.elapsed().as_secs_f64();
        // As a PNG stores it: clamped and quantised to 8 bits.
        let x = x.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| to_u8(v) as f32 / 127.5 - 1.0).collect::<Vec<_>>();
        let m = x.len() / (c * h * h);
        judge_batch(judge, &Tensor::from_vec(x, (m, c, h, h), device)?, &mut j.features, &mut j.predicted)?;
        batch += 1;
    }
    ctx.end();
    j.sampling_seconds = Some(sampling);
    Ok(j)
}

/// An image from a folder or an array, as the judge's input (C, H, W in [-1, 1]).
fn to_judge_input(img: &Image, c: usize, size: usize, what: &str) -> Result<Vec<f32>> {
    ensure!(
        img.h == size && img.w == size,
        "{what} holds {}x{} images; the judge was trained on {size}x{size} images",
        img.h,
        img.w
    );
    let mut out = vec![0f32; c * size * size];
    for p in 0..size * size {
        let rgb = &img.data[p * 3..p * 3 + 3];
        if c == 1 {
            ensure!(rgb[0] == rgb[1] && rgb[1] == rgb[2], "{what} holds colour images; the judge was trained on grey images");
            out[p] = rgb[0] * 2.0 - 1.0;
        } else {
            for ch in 0..3 {
                out[ch * size * size + p] = rgb[ch] * 2.0 - 1.0;
            }
        }
    }
    Ok(out)
}

fn judge_images(judge: &Judge, path: &str, limit: usize, device: &Device, ctx: &JobCtx) -> Result<Judged> {
    let p = Path::new(path);
    let (mut source, labels): (Box<dyn ImageSource>, Option<Vec<i64>>) = if p.is_dir() {
        (Box::new(FolderSource::open(p)?), None)
    } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")) {
        let labels = {
            let mut npz = Npz::open(p)?;
            if npz.contains("arr_1") { Some(npz.read("arr_1")?.to_i64()) } else { None }
        };
        (Box::new(ArraySource::open_npz(p)?), labels)
    } else {
        bail!("{path} is neither a folder of images, an .npz of images, nor a prepared dataset");
    };
    let cfg = judge.config();
    let (c, size) = (cfg.in_channels, cfg.img_size);
    ensure!(c == 1 || c == 3, "the judge takes {c}-channel images; only grey or RGB image files can be scored");
    let what = source.describe();
    if let (Some(l), Some(n)) = (&labels, source.len()) {
        ensure!(l.len() == n, "{path}: arr_1 has {} labels for {n} images", l.len());
    }
    let total = source.len().map(|n| n.min(limit) as u64);
    let mut j = Judged { features: Features::new(cfg.feature_dim), predicted: vec![], labels: None, what: what.clone(), sampling_seconds: None };
    ctx.start("judge images", total);
    while j.predicted.len() < limit {
        let Some(batch) = source.next_batch(256.min(limit - j.predicted.len()))? else { break };
        ctx.check_cancelled()?;
        let m = batch.len();
        let mut x = Vec::with_capacity(m * c * size * size);
        for img in &batch {
            x.extend(to_judge_input(img, c, size, &what)?);
        }
        judge_batch(judge, &Tensor::from_vec(x, (m, c, size, size), device)?, &mut j.features, &mut j.predicted)?;
        ctx.progress(j.predicted.len() as u64, total, serde_json::Map::new());
    }
    ctx.end();
    let n = j.predicted.len();
    let labels = labels.map(|mut l| {
        l.truncate(n);
        l
    });
    if let Some(l) = &labels {
        ensure!(l.iter().all(|&y| y >= -1 && y < cfg.num_classes as i64), "{path}: arr_1 holds labels outside 0..{}", cfg.num_classes);
    }
    j.labels = labels;
    Ok(j)
}

pub fn eval_quality(o: QualityOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let on = on.place()?;
    let device = &on.device;
    let (file, judge) = Judge::load(Path::new(&o.judge), device)?;
    ensure!(
        file.held_out_accuracy >= file.floor,
        "the judge {} reached {:.1}% held-out accuracy, below its floor of {:.1}%: it cannot be trusted as a yardstick (train it longer)",
        o.judge,
        100.0 * file.held_out_accuracy,
        100.0 * file.floor
    );
    let ds = labelled_dataset(&o.data)?;
    let (c, h, _) = ds.shape();
    let jc = &file.config;
    ensure!(
        (jc.in_channels, jc.img_size, jc.num_classes) == (c, h, ds.num_classes()),
        "the judge {} was trained on {}x{}x{} images of {} classes; the dataset {} has {c}x{h}x{h} images of {} classes",
        o.judge,
        jc.in_channels,
        jc.img_size,
        jc.img_size,
        jc.num_classes,
        o.data,
        ds.num_classes()
    );
    if let Some(t) = o.temperature {
        ensure!(o.model.is_some() || t == 1.0, "--temperature applies to sampling a --model");
    }
    let split = match o.split.as_str() {
        "val" => Split::Val,
        "train" => Split::Train,
        s => bail!("unknown split '{s}': use val or train"),
    };
    let num_ref = o.num_ref.unwrap_or(10_000);
    ensure!(num_ref >= 4 && o.num.is_none_or(|n| n >= 4), "--num and --num-ref must be at least 4 (the k-NN manifolds take {K_NEAREST} neighbours)");

    let samples = match (&o.model, &o.images) {
        (Some(m), None) => judge_run(&judge, &o, m, &ds, device, ctx)?,
        (None, Some(path)) if Path::new(path).join(crate::data::MANIFEST).is_file() => {
            let other = labelled_dataset(path)?;
            ensure!(other.shape() == ds.shape(), "the dataset {path} has images of another shape than {}", o.data);
            let mut j = judge_dataset(&judge, &other, Split::Train, o.num.unwrap_or(usize::MAX), "judge images", device, ctx)?;
            j.what = format!("the train split of dataset {path}");
            j
        }
        (None, Some(path)) => judge_images(&judge, path, o.num.unwrap_or(usize::MAX), device, ctx)?,
        (Some(_), Some(_)) => bail!("give either a --model to sample or images to score, not both"),
        (None, None) => bail!("nothing to judge: give a --model (a run) or IMAGES (a folder, an .npz or a dataset)"),
    };
    let reference = judge_dataset(&judge, &ds, split, num_ref, "reference features", device, ctx)?;
    let n = samples.features.len();
    ensure!(n > K_NEAREST, "{} has {n} images; eval-quality needs more than {K_NEAREST}", samples.what);

    ctx.start("metrics", None);
    let fd = frechet(&samples.features, &reference.features)?;
    // Precision and recall depend on the set sizes: compare equal numbers.
    let m = n.min(reference.features.len());
    let (precision, recall) = precision_recall(&reference.features.head(m), &samples.features.head(m), K_NEAREST)?;
    let ref_labels = reference.labels.as_deref().unwrap();
    let data_diversity = within_class_diversity(&reference.features.head(m), &ref_labels[..m]);
    // Within-class diversity groups samples by their requested label, else by the judge's class.
    let (group, grouped_by) = match &samples.labels {
        Some(l) if l.iter().all(|&y| y >= 0) => (l.clone(), "requested label"),
        _ => (samples.predicted.clone(), "judge's class"),
    };
    let diversity = within_class_diversity(&samples.features, &group);
    let label_accuracy = samples.label_accuracy();
    ctx.end();
    Ok(json!({
        "source": samples.what,
        "model": o.model,
        "images": o.images,
        "method": o.model.as_ref().map(|_| o.method.clone().unwrap_or_else(|| "auto".into())),
        "guidance": o.model.as_ref().map(|_| o.guidance),
        "temperature": o.model.as_ref().map(|_| o.temperature.unwrap_or(1.0)),
        "seed": o.seed,
        "num": n,
        "numRef": reference.features.len(),
        "split": split.to_string(),
        "fd": fd,
        "labelAccuracy": label_accuracy,
        "precision": precision,
        "recall": recall,
        "k": K_NEAREST,
        "diversity": diversity,
        "dataDiversity": data_diversity,
        "diversityRatio": match (diversity, data_diversity) { (Some(a), Some(b)) if b > 0.0 => Some(a / b), _ => None },
        "diversityGroupedBy": grouped_by,
        "samplingSeconds": samples.sampling_seconds,
        "judge": {"dir": o.judge, "heldOutAccuracy": file.held_out_accuracy, "accuracyOnReference": reference.label_accuracy()},
    }))
}
