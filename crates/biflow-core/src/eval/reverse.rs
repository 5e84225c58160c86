//! `biflow eval-reverse`: how well the distilled G inverts F, on held-out images.
//!
//! - reconstruction: x -> x~ = x + sigma eps -> z = F(x~) -> x' = G(z); MSE and PSNR against x, and
//!   LPIPS when its weights are given;
//! - agreement with the exact inverse: for the same noise z, G(z) against causal decoding of z;
//! - bits/dim under F of G's samples, of exact samples and of the data (each set as given,
//!   clamped to [-1, 1], no dequantisation, so the three numbers compare with each other).

use std::num::NonZeroUsize;
use std::time::Instant;

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

use crate::models::flow::{ReverseOptions, TarFlow, Values};
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::models::lpips::{self, Lpips};
use crate::models::reverse::ReverseModel;
use crate::run::Run;
use crate::models::flow::denoise;

crate::options! {
    pub struct EvalReverseOptions {
        /// the distilled run (biflow distill)
        model: String,
        /// a prepared dataset with F's image size
        data: String,
        /// dataset split
        split: Option<String> ["val when the dataset has one"] {"val", "train"},
        /// held-out images to reconstruct
        limit: NonZeroUsize = 256,
        /// noise draws decoded both ways (exact decoding is the slow part)
        num_exact: NonZeroUsize = 16,
        /// seed of the noise
        seed: u64 = 0,
        /// images evaluated at once
        batch_size: NonZeroUsize = 64,
        /// LPIPS's heads (the lpips package's weights/v0.1/vgg.pth): also report the reconstructions' LPIPS; needs --vgg
        lpips: Option<String>,
        /// torchvision's VGG16 weights (vgg16-397923af.pth), the backbone of --lpips
        vgg: Option<String>,
    }
}

/// F, G and the noise level of a distilled run, as the evaluation uses them.
pub struct Pair<'a> {
    pub flow: &'a TarFlow,
    pub g: &'a ReverseModel,
    pub sigma: f64,
}

impl Pair<'_> {
    /// G(z) as images, with F's score step when G has no learned denoiser (as `sample` does).
    pub fn generate(&self, z: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let n = z.dim(0)?;
        let w = self.g.config().guided().then(|| vec![0.0f32; n]);
        let x = self.flow.unpatchify(&self.g.sample(z, labels, w.as_deref())?)?;
        if self.g.config().denoise_layers == 0 {
            return denoise(self.flow, &x, labels, self.sigma);
        }
        Ok(x)
    }

    /// G(F(x + sigma eps)) for images x (N, C, H, W); F(x~) joins `latents`.
    pub fn reconstruct(&self, x: &Tensor, labels: Option<&Tensor>, rng: &mut rand::rngs::StdRng, latents: &mut LatentStats) -> Result<Tensor> {
        let noise: Vec<f32> = (0..x.elem_count()).map(|_| StandardNormal.sample(rng)).collect();
        let noisy = (x + (Tensor::from_vec(noise, x.dims(), x.device())? * self.sigma)?)?;
        let z = self.flow.forward(&noisy, labels)?.z;
        latents.add(&z)?;
        self.generate(&z, labels)
    }

    /// Per-image MSE of [`Self::reconstruct`] against x.
    pub fn reconstruction_mse(&self, x: &Tensor, labels: Option<&Tensor>, rng: &mut rand::rngs::StdRng, latents: &mut LatentStats) -> Result<Vec<f64>> {
        per_image_mse(&self.reconstruct(x, labels, rng, latents)?, x)
    }
}

/// How far F(x~), the z that G is trained on, is from the N(0, I) it is sampled at: moments over
/// all values and per token (tokens (N, T, D)).
#[derive(Default)]
pub struct LatentStats {
    /// Per token: count, sum, sum of squares.
    tokens: Vec<(f64, f64, f64)>,
}

impl LatentStats {
    pub fn add(&mut self, z: &Tensor) -> Result<()> {
        let (_, t, d) = z.dims3()?;
        let v: Vec<f32> = z.flatten_all()?.to_vec1()?;
        self.tokens.resize(t, (0.0, 0.0, 0.0));
        for (i, &x) in v.iter().enumerate() {
            let s = &mut self.tokens[(i / d) % t];
            s.0 += 1.0;
            s.1 += x as f64;
            s.2 += (x as f64) * (x as f64);
        }
        Ok(())
    }

    pub fn summary(&self) -> Value {
        let moments = |(n, s, q): (f64, f64, f64)| {
            let m = s / n.max(1.0);
            (m, (q / n.max(1.0) - m * m).max(0.0).sqrt())
        };
        let all = self.tokens.iter().fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
        let (mean, std) = moments(all);
        let (means, stds): (Vec<f64>, Vec<f64>) = self.tokens.iter().map(|&s| moments(s)).unzip();
        json!({
            "mean": mean,
            "std": std,
            "tokenStdMin": stds.iter().copied().fold(f64::INFINITY, f64::min),
            "tokenStdMax": stds.iter().copied().fold(0.0, f64::max),
            "tokenMeanAbsMax": means.iter().map(|m| m.abs()).fold(0.0, f64::max),
        })
    }
}

fn per_image_mse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let v: Vec<f32> = (a - b)?.sqr()?.flatten_from(1)?.mean(1)?.to_vec1()?;
    Ok(v.into_iter().map(f64::from).collect())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// PSNR in dB for images in [-1, 1] (peak-to-peak 2).
pub fn psnr(mse: f64) -> f64 {
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

pub fn eval_reverse(o: EvalReverseOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let on = on.place()?;
    let device = on.device.clone();
    let run = Run::open(std::path::Path::new(&o.model))?;
    ensure!(run.is_distilled(), "{} is a forward run; eval-reverse needs a distilled run (biflow distill)", o.model);
    let flow = run.load_flow(&device)?;
    let g = run.load_reverse(&device)?;
    let sigma = run.config.noise_std.unwrap_or(0.0);
    let pair = Pair { flow: &flow, g: &g, sigma };
    let cfg = flow.config().clone();
    let (ds, split, n) = crate::eval::bpd::open_eval_split(&o.data, o.split.as_deref(), Some(o.limit.get()), &cfg, run.config.latent.as_ref())?;
    let values = Values::of(ds.is_latent());
    let lpips = lpips::weight_files(o.lpips.as_deref(), o.vgg.as_deref())?.map(|(l, v)| Lpips::load(Path::new(l), Path::new(v), &device)).transpose()?;
    // LPIPS compares images: a latent run's reconstructions are decoded first.
    let vae = if lpips.is_some() { run.load_vae(None, "put it back for --lpips, which compares decoded images", &device)? } else { None };
    let to_images = |x: &Tensor| -> Result<Tensor> {
        Ok(match &vae {
            Some(v) => v.images(x)?,
            None => x.clone(),
        })
    };
    let bs = o.batch_size.get();
    let labelled = cfg.num_classes > 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);

    // Reconstruction of held-out images.
    ctx.start("reconstruct", Some(n as u64));
    let (mut mse, mut perceptual, mut data, mut data_labels) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut latents = LatentStats::default();
    let started = Instant::now();
    for lo in (0..n).step_by(bs) {
        ctx.check_cancelled()?;
        let idx: Vec<usize> = (lo..(lo + bs).min(n)).collect();
        let (xs, ys) = ds.batch_f32(split, &idx)?;
        let m = idx.len();
        let x = Tensor::from_vec(xs.clone(), (m, cfg.in_channels, cfg.img_size, cfg.img_size), &device)?;
        let y = labelled.then(|| Tensor::from_vec(ys.clone(), m, &device)).transpose()?;
        let x_rec = pair.reconstruct(&x, y.as_ref(), &mut rng, &mut latents)?;
        mse.extend(per_image_mse(&x_rec, &x)?);
        if let Some(net) = &lpips {
            perceptual.extend(net.distance(&to_images(&x_rec)?.clamp(-1f32, 1f32)?, &to_images(&x)?.clamp(-1f32, 1f32)?)?.to_vec1::<f32>()?.into_iter().map(f64::from));
        }
        data.extend(xs);
        data_labels.extend(ys);
        ctx.progress((lo + m) as u64, Some(n as u64), crate::metrics!["mse" => mean(&mse)]);
    }
    ctx.end();
    let reconstruct_secs = started.elapsed().as_secs_f64();

    // The same noise through G and through causal decoding.
    let k = o.num_exact.get();
    let (t, d) = (cfg.num_tokens(), cfg.token_dim());
    let noise: Vec<f32> = (0..k * t * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let z = Tensor::from_vec(noise, (k, t, d), &device)?;
    let ys: Vec<i64> = (0..k).map(|i| (i % cfg.num_classes.max(1)) as i64).collect();
    let y = labelled.then(|| Tensor::from_vec(ys.clone(), k, &device)).transpose()?;
    let reverse = pair.generate(&z, y.as_ref())?;
    let steps = cfg.num_blocks * (t - 1);
    ctx.start("decode", Some(steps as u64));
    let exact = flow.reverse(&z, y.as_ref(), &ReverseOptions::default(), |done, total| {
        if done % 8 == 0 || done == total {
            ctx.progress(done as u64, Some(total as u64), serde_json::Map::new());
        }
        ctx.check_cancelled()
    })?;
    let exact = if sigma > 0.0 { denoise(&flow, &exact, y.as_ref(), sigma)? } else { exact };
    ctx.end();
    let agreement = per_image_mse(&reverse, &exact)?;

    // Samples are scored as saved: pixels clamped to [-1, 1]; latents as they are.
    let clamp = |x: &Tensor| -> Result<Vec<f32>> {
        let x = if values == Values::Pixels { x.clamp(-1f32, 1f32)? } else { x.clone() };
        Ok(x.flatten_all()?.to_vec1()?)
    };
    let labels_of = |l: &[i64]| labelled.then(|| l.to_vec());
    let bpd = |images: &[f32], labels: Option<Vec<i64>>| -> Result<f64> {
        Ok(mean(&crate::eval::bpd::evaluate(&flow, values, images, labels.as_deref(), bs, ctx)?))
    };
    let bpd_reverse = bpd(&clamp(&reverse)?, labels_of(&ys))?;
    let bpd_exact = bpd(&clamp(&exact)?, labels_of(&ys))?;
    let bpd_data = bpd(&data, labels_of(&data_labels))?;
    let m = mean(&mse);
    Ok(json!({
        "model": o.model,
        "split": format!("{split:?}").to_lowercase(),
        "num": n,
        "reconstructionMse": m,
        "reconstructionPsnr": (values == Values::Pixels).then(|| psnr(m)),
        "values": values,
        "reconstructionLpips": lpips.is_some().then(|| mean(&perceptual)),
        "numExact": k,
        "reverseVsExactMse": mean(&agreement),
        "bpdReverseSamples": bpd_reverse,
        "bpdExactSamples": bpd_exact,
        "bpdData": bpd_data,
        "noiseStd": sigma,
        "latent": latents.summary(),
        "reconstructSeconds": reconstruct_secs,
    }))
}
