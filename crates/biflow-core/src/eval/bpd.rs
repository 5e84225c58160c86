//! `biflow eval-bpd`: bits per dimension of data under the forward flow.

use std::num::NonZeroUsize;
use std::path::Path;

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

use rand::SeedableRng;
use rand_distr::Distribution;

use crate::data::{Dataset, Split};
use crate::data::LatentInfo;
use crate::models::flow::{bits_per_dim, FlowConfig, TarFlow, Values};
use crate::io::npy::read_npy;
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;

crate::options! {
    pub struct BpdOptions {
        /// the run folder (trained or imported)
        model: String,
        /// a prepared dataset folder (biflow data prepare)
        data: Option<String>,
        /// float32 images N,C,H,W in [-1,1] (.npy), already dequantised
        input: Option<String>,
        /// class labels of the --input images (.npy of integers; default: no class)
        labels: Option<String>,
        /// split of a --data dataset (default: val when the dataset has one)
        split: Option<String> {"val", "train"},
        /// evaluate at most this many images of --data
        limit: Option<NonZeroUsize>,
        /// also report the bits/dim of every sample
        per_sample: bool,
        /// seed of the dequantisation noise
        seed: u64 = 0,
        /// images evaluated at once
        batch_size: NonZeroUsize = 64,
    }
}

/// Bits/dim of images (N, C, H, W) in [-1, 1] (already dequantised), or of latents, in batches: one
/// value per sample.
pub fn evaluate(model: &TarFlow, values: Values, images: &[f32], labels: Option<&[i64]>, batch_size: usize, ctx: &JobCtx) -> Result<Vec<f64>> {
    let cfg = model.config();
    let per = cfg.image_dim();
    let n = images.len() / per;
    let mut out = Vec::with_capacity(n);
    ctx.start("bpd", Some(n as u64));
    let mut lo = 0;
    while lo < n {
        ctx.check_cancelled()?;
        let m = batch_size.min(n - lo);
        let x = Tensor::from_vec(
            images[lo * per..(lo + m) * per].to_vec(),
            (m, cfg.in_channels, cfg.img_size, cfg.img_size),
            model.device(),
        )?;
        let y = match labels {
            Some(l) => Some(Tensor::from_vec(l[lo..lo + m].to_vec(), m, model.device())?),
            None => None,
        };
        let fo = model.forward(&x, y.as_ref())?;
        let b: Vec<f32> = bits_per_dim(&fo, cfg, values)?.to_vec1()?;
        out.extend(b.into_iter().map(|v| v as f64));
        lo += m;
        let mean = out.iter().sum::<f64>() / out.len() as f64;
        ctx.progress(lo as u64, Some(n as u64), crate::metrics!["bpd" => mean]);
    }
    ctx.end();
    Ok(out)
}

/// A dataset to evaluate a model on: checked against the model's image shape and values (pixels, or
/// latents of the run's VAE), its `split` (default: val when the dataset has one), and how many
/// images to take (at most `limit`).
pub(crate) fn open_eval_split(dir: &str, split: Option<&str>, limit: Option<usize>, cfg: &FlowConfig, latent: Option<&LatentInfo>) -> Result<(Dataset, Split, usize)> {
    let ds = Dataset::open(Path::new(dir))?;
    crate::data::latent::check_same_space(latent, "the model", ds.manifest.latent.as_ref(), &format!("the dataset {dir}"))?;
    let (c, h, w) = ds.shape();
    ensure!(
        c == cfg.in_channels && h == cfg.img_size && w == cfg.img_size,
        "dataset {dir} holds {c}x{h}x{w} images; this model takes {}x{}x{}",
        cfg.in_channels,
        cfg.img_size,
        cfg.img_size
    );
    let split = match split {
        Some("val") => Split::Val,
        Some("train") => Split::Train,
        Some(s) => bail!("unknown split '{s}': use val or train"),
        None if !ds.is_empty(Split::Val) => Split::Val,
        None => Split::Train,
    };
    let n = limit.map_or(ds.len(split), |l| l.min(ds.len(split)));
    ensure!(n > 0, "the {split:?} split of {dir} is empty");
    Ok((ds, split, n))
}

/// The first `n` images of `split` with seeded uniform dequantisation, pixel k -> (k + u) / 256 * 2 - 1
/// with u ~ U[0, 1); a latent dataset's values as stored (continuous: nothing to dequantise).
fn dequantised(ds: &Dataset, split: Split, n: usize, seed: u64) -> Result<(Vec<f32>, Vec<i64>)> {
    if ds.is_latent() {
        return ds.batch_f32(split, &(0..n).collect::<Vec<_>>());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let u = rand_distr::Uniform::new(0.0f32, 1.0);
    let (c, h, w) = ds.shape();
    let mut x = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let (px, label) = ds.get(split, i)?;
        x.extend(px.iter().map(|&k| (k as f32 + u.sample(&mut rng)) / 128.0 - 1.0));
        labels.push(label);
    }
    Ok((x, labels))
}

pub fn eval_bpd(o: BpdOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let on = on.place()?;
    let device = on.device.clone();
    let run = crate::run::Run::open(Path::new(&o.model))?;
    let model = run.load_flow(&device)?;
    let cfg = model.config().clone();
    let (images, labels): (Vec<f32>, Option<Vec<i64>>) = match (&o.input, &o.data) {
        (Some(_), Some(_)) => bail!("give either --data or --input, not both"),
        (None, None) => bail!("give the data to evaluate: --data DIR or --input X.npy"),
        (Some(p), None) => {
            let a = read_npy(Path::new(p))?;
            let want = [cfg.in_channels, cfg.img_size, cfg.img_size];
            ensure!(
                a.shape.len() == 4 && a.shape[1..] == want,
                "--input {p} has shape {:?}; this model takes N,{},{},{} images in [-1, 1]",
                a.shape,
                want[0],
                want[1],
                want[2]
            );
            let x = a.to_f32();
            ensure!(x.iter().all(|v| v.is_finite()), "--input {p} contains non-finite values");
            let labels = match &o.labels {
                Some(lp) => {
                    let l = read_npy(Path::new(lp))?.to_i64();
                    ensure!(l.len() == a.shape[0], "--labels {lp} has {} labels for {} images", l.len(), a.shape[0]);
                    Some(l)
                }
                None => None,
            };
            (x, labels)
        }
        (None, Some(dir)) => {
            ensure!(o.labels.is_none(), "--labels applies to --input only: datasets carry their own labels");
            let (ds, split, n) = open_eval_split(dir, o.split.as_deref(), o.limit.map(NonZeroUsize::get), &cfg, run.config.latent.as_ref())?;
            let (x, labels) = dequantised(&ds, split, n, o.seed)?;
            let labelled = labels.iter().any(|&l| l >= 0);
            (x, labelled.then_some(labels))
        }
    };
    ensure!(!images.is_empty(), "no images to evaluate");
    let labels = if cfg.num_classes == 0 { None } else { labels };
    let values = Values::of(run.config.latent.is_some());
    let per = evaluate(&model, values, &images, labels.as_deref(), o.batch_size.get(), ctx)?;
    let mean = per.iter().sum::<f64>() / per.len() as f64;
    let mut r = json!({ "bpd": mean, "num": per.len(), "values": values });
    if o.per_sample {
        r["perSampleBpd"] = json!(per);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy::{write_npz, Array};

    #[test]
    fn dataset_bpd_is_seeded_dequantised_and_per_sample() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tarflow-reference/tiny-cond.pth");
        let run = dir.path().join("run");
        crate::jobs::import::import_tarflow(
            serde_json::from_value(json!({"checkpoint": fixture, "out": run})).unwrap(),
            &JobCtx::silent(),
        )
        .unwrap();
        // Six 8x8 RGB images (N,H,W,C uint8) with labels, prepared as a dataset.
        let px: Vec<u8> = (0..6 * 8 * 8 * 3).map(|i| ((i * 37) % 256) as u8).collect();
        let npz = dir.path().join("imgs.npz");
        let labels = [0i64, 1, 2, 0, 1, 2];
        write_npz(&npz, &[("data", &Array::from_u8(vec![6, 8, 8, 3], px).unwrap()), ("labels", &Array::from_i64(vec![6], &labels).unwrap())])
            .unwrap();
        let data = dir.path().join("data");
        crate::data::prepare(serde_json::from_value(json!({"input": npz, "out": data})).unwrap(), &Default::default(), &JobCtx::silent()).unwrap();
        let eval = |seed: u64| -> Value {
            eval_bpd(
                serde_json::from_value(json!({"model": run, "data": data, "perSample": true, "seed": seed})).unwrap(),
                &Default::default(),
                &JobCtx::silent(),
            )
            .unwrap()
        };
        let (a, b, c) = (eval(1), eval(1), eval(2));
        assert_eq!(a, b, "same seed, same dequantisation");
        assert_ne!(a["bpd"], c["bpd"], "another seed draws other dequantisation noise");
        assert_eq!(a["perSampleBpd"].as_array().unwrap().len(), 6);
        let bpd = a["bpd"].as_f64().unwrap();
        assert!(bpd.is_finite() && bpd > 0.0, "{bpd}");
        // Both inputs given, or neither, are clear errors.
        let both = serde_json::from_value(json!({"model": run, "data": data, "input": "x.npy"})).unwrap();
        assert!(eval_bpd(both, &Default::default(), &JobCtx::silent()).unwrap_err().to_string().contains("not both"));
    }
}
