//! `biflow distill`: learn BiFlow's reverse model G from a frozen forward flow F.
//!
//! Training pairs come from real data: `x~ = x + sigma eps`, one parallel pass of F (no gradient
//! graph, no causal decoding) gives the trajectory x^1..x^B = z, and G(z) is held to it by the
//! losses of models/reverse/loss.rs. The session (lock, resume, the run) is jobs/training.rs and the loop the
//! trainer's (train/), both shared with `train`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::device::mode::Backend;
use crate::models::flow::{FlowConfig, TarFlow};
use crate::job::JobCtx;
use crate::engines::ReverseGrad;
use crate::models::convnext::{ConvNextConfig, ConvNextV2};
use crate::models::lpips::Lpips;
use crate::models::perceptual::{Crop, Perceptual};
use crate::models::vae::Vae;
use crate::models::reverse::loss::{implied_conditional, LossConfig, LossKind, LossValue, PerceptualTerms, Targets};
use crate::models::reverse::{self, ReverseConfig, ReverseModel, ReverseOutput};
use crate::run::{ForwardRef, Run, RunConfig};
use crate::jobs::train::host_gradients;
use crate::jobs::options::given;
use crate::jobs::training::{self, schedule_of, SessionArgs, TrainingJob};
use crate::train::{self, open_data, Objective, Schedule, Slot, StepOutput, TrainData};

crate::settings! {
    /// Every distillation knob as given on the command line (all optional).
    pub struct DistillSettings {
        /// the forward run F (from `biflow train` or `biflow import tarflow`)
        forward: String,
        /// prepared dataset folder with F's image size and classes; on --resume defaults to the run's
        data: String,
        /// images per step
        batch_size: usize = 64,
        /// total optimiser steps
        steps: u64 = 2000,
        /// peak learning rate
        lr: f64 = 1e-3,
        /// learning rate at the end of the cosine decay; equal to --lr: constant after warmup
        min_lr: f64 ["--lr"],
        /// linear warmup steps
        warmup: u64 ["min(100, steps/10)"],
        /// AdamW weight decay on weight matrices
        weight_decay: f64 = 1e-4,
        /// clip the global gradient norm to this (0: off)
        grad_clip: f64 ["1"] = 1.0,
        /// decay of the EMA of the weights
        ema_decay: f64 = 0.999,
        /// seed for G, data order, noise, label drops and guidance scales
        seed: u64 = 0,
        /// write a checkpoint every N steps
        save_every: u64 = 500,
        /// number of newest checkpoints to keep
        keep: usize = 3,
        /// distill on the first N training images only
        limit: usize,
        /// sigma of the training pairs
        noise_std: f64 ["F's training noise; required for imported F"],
        /// G's width, a multiple of 64
        channels: usize ["F's"],
        /// transformer layers per stage (one stage per block of F)
        layers_per_stage: usize = 1,
        /// layers of the learned-denoising block
        denoise_layers: usize = 1,
        /// align: hidden alignment + reconstruction; naive: reconstruction only; hidden: G's own states held to F's
        loss: String {"align", "naive", "hidden"} = "align",
        /// reverse-side norm control of the alignment targets
        align_norm: String {"rms", "none"} = "rms",
        /// learned: G outputs the clean image; none: G outputs x~ and sampling applies F's score step
        denoise: String {"learned", "none"} = "learned",
        /// adaptive weighting D / sg((D + eps)^p) of each term (0: off)
        adaptive_p: f64 ["1"] = 1.0,
        /// eps of the adaptive weighting
        adaptive_eps: f64 = 0.01,
        /// lo,hi: range of the training-time guidance scales
        cfg_range: [f64; 2] ["0,3 with classes"],
        /// probability of dropping the label
        drop_label: f64 ["0.1 with classes"],
        /// write a grid of 16 one-evaluation samples of G (fixed noise and labels, EMA weights) to RUN2/samples/step-N.png every N steps (0: never)
        sample_every: u64 = 0,
        /// LPIPS's heads (the lpips package's weights/v0.1/vgg.pth, or .safetensors): adds the LPIPS distance between G's clean output and the image to the loss; needs --vgg
        lpips: String,
        /// torchvision's VGG16 weights (vgg16-397923af.pth, or .safetensors), the backbone of --lpips
        vgg: String,
        /// weight of the LPIPS term, after its adaptive weighting as every term's
        lpips_weight: f64 = 0.4,
        /// a ConvNeXt-V2 folder (config.json + model.safetensors, as facebook/convnextv2-base-22k-224 on the hub): adds the squared distance of its pooled features between G's clean output and the image to the loss
        convnext: String,
        /// weight of the ConvNeXt term, after its adaptive weighting as every term's
        convnext_weight: f64 = 0.1,
        /// random: both images of a pair get the same random resized crop (8-100% of the area, aspect 3/4-4/3) before the perceptual networks, a new one per pair and step; none: the whole image
        perceptual_crop: String {"random", "none"} = "random",
        /// side of the images the perceptual networks see, bicubic with antialias (0: the images' own size, no resize: cheaper on a CPU)
        perceptual_size: usize = 224,
    }
}

/// The perceptual terms of a distillation (paper §4: LPIPS and ConvNeXt-V2 features between G's
/// clean output and the image). Runs made before ConvNeXt and the crop stored LPIPS alone, compared
/// whole at the images' size: the defaults of the later fields.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PerceptualOptions {
    /// LPIPS's heads and its VGG16 backbone, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lpips: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgg: Option<String>,
    pub lpips_weight: f64,
    /// The ConvNeXt-V2 folder, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convnext: Option<String>,
    #[serde(default = "convnext_weight")]
    pub convnext_weight: f64,
    #[serde(default)]
    pub crop: Crop,
    /// The side the networks see; None: the images' own.
    #[serde(default)]
    pub size: Option<usize>,
}

fn convnext_weight() -> f64 {
    0.1
}

/// The resolved options, stored in RUN2/config.json under "train".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DistillOptions {
    pub forward: String,
    pub data: String,
    #[serde(flatten)]
    pub schedule: Schedule,
    pub limit: Option<usize>,
    pub noise_std: f64,
    pub loss: LossConfig,
    /// None for an unconditional F (no guidance).
    pub cfg_range: Option<[f64; 2]>,
    pub drop_label: f64,
    /// None: the BiFlow MSE terms only (and in runs made before perceptual terms existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perceptual: Option<PerceptualOptions>,
}

impl DistillOptions {
    /// The settings that reproduce these options and G (for the resume check).
    fn as_settings(&self, g: &ReverseConfig) -> DistillSettings {
        let word = |b: bool, yes: &str, no: &str| Some(if b { yes } else { no }.to_string());
        DistillSettings {
            forward: Some(self.forward.clone()),
            data: Some(self.data.clone()),
            batch_size: Some(self.schedule.batch_size),
            steps: Some(self.schedule.steps),
            lr: Some(self.schedule.lr),
            min_lr: Some(self.schedule.min_lr),
            warmup: Some(self.schedule.warmup),
            weight_decay: Some(self.schedule.weight_decay),
            grad_clip: Some(self.schedule.grad_clip),
            ema_decay: Some(self.schedule.ema_decay),
            seed: Some(self.schedule.seed),
            save_every: Some(self.schedule.save_every),
            keep: Some(self.schedule.keep),
            limit: self.limit,
            noise_std: Some(self.noise_std),
            channels: Some(g.channels),
            layers_per_stage: Some(g.layers_per_stage),
            denoise_layers: Some(g.denoise_layers),
            loss: Some(serde_json::to_value(self.loss.kind).unwrap().as_str().unwrap().to_string()),
            align_norm: word(self.loss.rms_norm, "rms", "none"),
            denoise: word(self.loss.learned_denoise, "learned", "none"),
            adaptive_p: Some(self.loss.adaptive_p),
            adaptive_eps: Some(self.loss.adaptive_eps),
            cfg_range: self.cfg_range,
            drop_label: Some(self.drop_label),
            sample_every: Some(self.schedule.sample_every),
            lpips: self.perceptual.as_ref().and_then(|p| p.lpips.clone()),
            vgg: self.perceptual.as_ref().and_then(|p| p.vgg.clone()),
            lpips_weight: self.perceptual.as_ref().map(|p| p.lpips_weight),
            convnext: self.perceptual.as_ref().and_then(|p| p.convnext.clone()),
            convnext_weight: self.perceptual.as_ref().map(|p| p.convnext_weight),
            perceptual_crop: self.perceptual.as_ref().map(|p| serde_json::to_value(p.crop).unwrap().as_str().unwrap().to_string()),
            perceptual_size: self.perceptual.as_ref().map(|p| p.size.unwrap_or(0)),
        }
    }
}

/// Options that may change when resuming.
const RESUMABLE: &[&str] = &["data", "steps", "saveEvery", "keep", "sampleEvery"];

/// Resolve the settings against F and the data.
fn resolve(s: &DistillSettings, f_run: &Run, forward_dir: &str, data: &dyn TrainData, data_dir: &str) -> Result<(DistillOptions, ReverseConfig)> {
    let s = &s.clone().or(DistillSettings::defaults());
    let f = &f_run.config.model;
    crate::data::latent::check_same_space(f_run.config.latent.as_ref(), &format!("the forward run {forward_dir}"), data.latent(), &format!("the dataset {data_dir}"))?;
    let (c, h, w) = data.shape();
    if (c, h, w) != (f.in_channels, f.img_size, f.img_size) || data.num_classes() != f.num_classes {
        bail!(
            "the dataset {data_dir} ({c}x{h}x{w} images, {} classes) does not match the forward model ({}x{}x{}, {} classes)",
            data.num_classes(),
            f.in_channels,
            f.img_size,
            f.img_size,
            f.num_classes
        );
    }
    let batch_size = given(&s.batch_size);
    ensure!(batch_size > 0, "--batch-size must be at least 1");
    ensure!(data.len() >= batch_size, "the training split has {} images, fewer than --batch-size {batch_size}", data.len());
    let steps = given(&s.steps);
    ensure!(steps > 0, "--steps must be at least 1");
    // A constant 1e-3 after a short warmup: on MNIST the old 5e-4 with cosine decay left G collapsed
    // (recall 0.001 in the judge's features after 1500 steps) where this reached 0.33 (docs/mnist).
    let lr = given(&s.lr);
    ensure!(lr > 0.0 && lr.is_finite(), "--lr must be a positive number");
    let noise_std = match s.noise_std.or(f_run.config.noise_std) {
        Some(x) if x > 0.0 && x.is_finite() => x,
        Some(x) => bail!("--noise-std must be positive, got {x}"),
        None => bail!(
            "the forward run {forward_dir} records no Gaussian training noise level (imported, or trained with --dequantize): give --noise-std (0.05 is the reference's at 64 px)"
        ),
    };
    let kind = match given(&s.loss).as_str() {
        "align" => LossKind::Align,
        "naive" => LossKind::Naive,
        "hidden" => LossKind::Hidden,
        other => bail!("unknown --loss '{other}': use align, naive or hidden"),
    };
    let rms_norm = match given(&s.align_norm).as_str() {
        "rms" => true,
        "none" => false,
        other => bail!("unknown --align-norm '{other}': use rms or none"),
    };
    let learned_denoise = match given(&s.denoise).as_str() {
        "learned" => true,
        "none" => false,
        other => bail!("unknown --denoise '{other}': use learned or none"),
    };
    let adaptive_p = given(&s.adaptive_p);
    let adaptive_eps = given(&s.adaptive_eps);
    ensure!(adaptive_p >= 0.0 && adaptive_p.is_finite(), "--adaptive-p must be >= 0");
    ensure!(adaptive_eps > 0.0 && adaptive_eps.is_finite(), "--adaptive-eps must be positive");
    let conditional = f.num_classes > 0;
    let cfg_range = match (conditional, s.cfg_range) {
        (false, Some([lo, hi])) if lo != 0.0 || hi != 0.0 => {
            bail!("--cfg-range: the forward model is unconditional, so there is no guidance to train")
        }
        (false, _) => None,
        (true, Some([lo, hi])) => {
            ensure!(lo >= 0.0 && hi >= lo && hi.is_finite(), "--cfg-range must be lo,hi with 0 <= lo <= hi, got {lo},{hi}");
            Some([lo, hi])
        }
        (true, None) => Some([0.0, 3.0]),
    };
    let drop_label = s.drop_label.unwrap_or(if conditional { 0.1 } else { 0.0 });
    ensure!((0.0..=1.0).contains(&drop_label), "--drop-label must be between 0 and 1");
    let channels = s.channels.unwrap_or(f.channels);
    let denoise_layers = if learned_denoise { given(&s.denoise_layers) } else { 0 };
    let g = ReverseConfig::for_flow(f, channels, given(&s.layers_per_stage), denoise_layers, kind == LossKind::Align);
    g.validate()?;
    if kind == LossKind::Hidden {
        ensure!(f.token_dim() <= channels, "--loss hidden reads G's states in token space: it needs --channels >= the token size {}", f.token_dim());
    }
    // The perceptual networks see images: in a latent run, the VAE's decodings.
    let image_side = data.latent().map_or(f.img_size, |l| l.image_shape[1]);
    let perceptual = perceptual_options(s, image_side)?;
    let opts = DistillOptions {
        forward: forward_dir.to_string(),
        data: data_dir.to_string(),
        schedule: schedule_of!(s, batch_size: batch_size, steps: steps, lr: lr, min_lr: s.min_lr.unwrap_or(lr).min(lr), warmup: s.warmup.unwrap_or((steps / 10).min(100))),
        limit: s.limit,
        noise_std,
        loss: LossConfig { kind, rms_norm, learned_denoise, adaptive_p, adaptive_eps },
        cfg_range,
        drop_label,
        perceptual,
    };
    Ok((opts, g))
}

/// The perceptual terms asked for, checked: weights, the size the networks see, each network's
/// smallest input (ConvNeXt's read from its config.json).
fn perceptual_options(s: &DistillSettings, img_size: usize) -> Result<Option<PerceptualOptions>> {
    let lpips = crate::models::lpips::weight_files(s.lpips.as_deref(), s.vgg.as_deref())?;
    if lpips.is_none() && s.convnext.is_none() {
        return Ok(None);
    }
    let weight = |w: f64, flag: &str| -> Result<f64> {
        ensure!(w >= 0.0 && w.is_finite(), "--{flag} must be >= 0, got {w}");
        Ok(w)
    };
    let (lpips_weight, convnext_weight) = (weight(given(&s.lpips_weight), "lpips-weight")?, weight(given(&s.convnext_weight), "convnext-weight")?);
    let crop = match given(&s.perceptual_crop).as_str() {
        "random" => Crop::Random,
        "none" => Crop::None,
        other => bail!("unknown --perceptual-crop '{other}': use random or none"),
    };
    let size = match given(&s.perceptual_size) {
        0 => None,
        n => Some(n),
    };
    let side = size.unwrap_or(img_size);
    if lpips.is_some() {
        ensure!(side >= 16, "--lpips needs images of at least 16x16 pixels (VGG16 halves them four times); the perceptual networks would see {side}x{side} (--perceptual-size)");
    }
    if let Some(dir) = &s.convnext {
        let min = ConvNextConfig::read(Path::new(dir))?.min_size();
        ensure!(side >= min, "--convnext needs images of at least {min}x{min} pixels (its stem and downsamplings); the perceptual networks would see {side}x{side} (--perceptual-size)");
    }
    Ok(Some(PerceptualOptions {
        lpips: lpips.map(|(l, _)| l.to_string()),
        vgg: lpips.map(|(_, v)| v.to_string()),
        lpips_weight,
        convnext: s.convnext.clone(),
        convnext_weight,
        crop,
        size,
    }))
}

/// The frozen networks of the perceptual terms, loaded (and checked) before any run folder is made.
fn load_perceptual(p: &PerceptualOptions, flow: &FlowConfig, decoder: Option<Vae>, device: &Device) -> Result<Perceptual> {
    let mut perceptual = Perceptual::new(flow, p.crop, p.size, decoder);
    if let (Some(lpips), Some(vgg)) = (&p.lpips, &p.vgg) {
        perceptual.add("lpips", p.lpips_weight, Box::new(Lpips::load(Path::new(lpips), Path::new(vgg), device)?));
    }
    if let Some(dir) = &p.convnext {
        perceptual.add("convnext", p.convnext_weight, Box::new(ConvNextV2::load(Path::new(dir), device)?));
    }
    Ok(perceptual)
}

// ---------------------------------------------------------------------------------------------
// The objective

/// G's BiFlow loss on pairs (F's trajectory of x~, x) made on the fly from clean images. On the
/// CPU G's passes are the hand-written ones (engines::ReverseGrad), elsewhere candle's with autograd.
struct Distillation {
    flow: TarFlow,
    g: ReverseModel,
    engine: Option<ReverseGrad>,
    opts: DistillOptions,
    perceptual: Option<Perceptual>,
}

impl Objective for Distillation {
    fn step(&mut self, slots: &[Slot], xs: Vec<f32>, mut ys: Vec<i64>, rng: &mut ChaCha8Rng) -> Result<StepOutput> {
        let f = self.flow.config();
        let dev = self.flow.device().clone();
        let n = ys.len();
        let sd = self.opts.noise_std as f32;
        let noisy: Vec<f32> = xs.iter().map(|v| v + sd * rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
        let shape = (n, f.in_channels, f.img_size, f.img_size);
        let clean = self.flow.patchify(&Tensor::from_vec(xs, shape, &dev)?)?;
        let noisy = self.flow.patchify(&Tensor::from_vec(noisy, shape, &dev)?)?;
        // Label drops, then a guidance scale per sample (0 where the label was dropped).
        let (labels, w) = match self.opts.cfg_range {
            Some([lo, hi]) => {
                let mut w = Vec::with_capacity(n);
                for y in ys.iter_mut() {
                    if rng.gen::<f64>() < self.opts.drop_label {
                        *y = -1;
                    }
                    let u: f64 = rng.gen();
                    w.push(if *y < 0 { 0.0 } else { (lo + (hi - lo) * u * u * u) as f32 });
                }
                (Some(ys), w)
            }
            None => (None, vec![0.0; n]),
        };
        let label_tensor = labels.as_ref().map(|y| Tensor::from_vec(y.clone(), n, &dev)).transpose()?;
        // F is frozen: its weights are constants, so this pass records no gradient graph.
        let fo = self.flow.forward_tokens(&noisy, label_tensor.as_ref())?;
        let targets = Targets { clean: &clean, noisy: &noisy, trajectory: &fo.trajectory };
        let perceptual = self.perceptual.as_ref().map(|p| p.at_step(n, rng, &dev)).transpose()?;
        let loss = |pred: &ReverseOutput| self.opts.loss.loss(pred, &targets, perceptual.as_ref().map(|p| p as &dyn PerceptualTerms));
        let (value, grads) = match &mut self.engine {
            Some(engine) => step_by_hand(engine, slots, &fo.z, labels.as_deref(), &w, self.opts.loss.kind == LossKind::Hidden, loss)?,
            None => {
                let guided = self.g.forward(&fo.z, label_tensor.as_ref(), Some(&w), true)?;
                let pred = if w.iter().any(|&w| w > 0.0) {
                    let null = Tensor::from_vec(vec![-1i64; n], n, &dev)?;
                    let uncond = self.g.forward(&fo.z, Some(&null), Some(&w), true)?;
                    implied_conditional(&guided, &uncond, &w)?
                } else {
                    guided
                };
                let value = loss(&pred)?;
                let grads = host_gradients(&value.total, slots)?;
                (value, grads)
            }
        };
        let metrics: Map<String, Value> = value.parts.into_iter().map(|(k, v)| (k, json!(v))).collect();
        Ok(StepOutput { loss: value.total.to_scalar::<f32>()? as f64, metrics, grads })
    }

    fn reads_vars(&self) -> bool {
        self.engine.is_none()
    }

    /// One evaluation of G (EMA weights) at guidance 0, then F's score step where G does not denoise.
    fn preview(&self, slots: &[Slot]) -> Result<Option<Tensor>> {
        let f = self.flow.config();
        let dev = self.flow.device().clone();
        let g = ReverseModel::new(train::ema_varbuilder(slots, &dev)?, self.g.config())?;
        let (z, y) = train::preview_noise(train::PREVIEW_COUNT, f.num_tokens(), f.token_dim(), f.num_classes, &dev)?;
        let w = g.config().guided().then(|| vec![0f32; train::PREVIEW_COUNT]);
        let mut x = self.flow.unpatchify(&g.sample(&z, y.as_ref(), w.as_deref())?)?;
        if !self.opts.loss.learned_denoise {
            x = crate::models::flow::denoise(&self.flow, &x, y.as_ref(), self.opts.noise_std)?;
        }
        Ok(Some(x))
    }
}

/// One step with G's hand-written passes: the unconditional pass (only for the samples it
/// affects, w > 0; it carries no gradient), the guided pass kept for the backward, the loss and its
/// gradient with respect to G's outputs by autograd over that small graph, then G's backward.
fn step_by_hand(
    engine: &mut ReverseGrad,
    slots: &[Slot],
    z: &Tensor,
    labels: Option<&[i64]>,
    w: &[f32],
    states: bool,
    loss: impl FnOnce(&ReverseOutput) -> Result<LossValue>,
) -> Result<(LossValue, Vec<Vec<f32>>)> {
    let (n, t, d) = z.dims3()?;
    let dev = z.device();
    let params: Vec<&[f32]> = slots.iter().map(|s| s.value.as_slice()).collect();
    let z: Vec<f32> = z.flatten_all()?.to_vec1()?;
    let active: Vec<usize> = (0..n).filter(|&i| w[i] > 0.0).collect();
    let uncond = if active.is_empty() {
        None
    } else {
        let size = t * d;
        let z_active: Vec<f32> = active.iter().flat_map(|&i| z[i * size..(i + 1) * size].iter().copied()).collect();
        let w_active: Vec<f32> = active.iter().map(|&i| w[i]).collect();
        let part = engine.forward(&params, &z_active, Some(&vec![-1; active.len()]), &w_active, false, states)?;
        // Back to the whole batch; the samples left out (w = 0) are weighted 0 in the mix.
        let whole = |v: &[f32]| -> Result<Tensor> {
            let width = v.len() / active.len();
            let mut full = vec![0f32; n * width];
            for (k, &i) in active.iter().enumerate() {
                full[i * width..(i + 1) * width].copy_from_slice(&v[k * width..(k + 1) * width]);
            }
            Ok(Tensor::from_vec(full, (n, t, width / t), dev)?)
        };
        Some(ReverseOutput {
            x: whole(&part.x)?,
            heads: part.heads.iter().map(|h| whole(h)).collect::<Result<_>>()?,
            states: part.states.iter().map(|h| whole(h)).collect::<Result<_>>()?,
        })
    };
    let guided = engine.forward(&params, &z, labels, w, true, states)?;
    let var = |v: Vec<f32>| -> Result<Var> {
        let width = v.len() / n;
        Ok(Var::from_vec(v, (n, t, width / t), dev)?)
    };
    let x = var(guided.x)?;
    let heads = guided.heads.into_iter().map(var).collect::<Result<Vec<_>>>()?;
    let stage_states = guided.states.into_iter().map(var).collect::<Result<Vec<_>>>()?;
    let tensors = |vars: &[Var]| vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let pred = ReverseOutput { x: x.as_tensor().clone(), heads: tensors(&heads), states: tensors(&stage_states) };
    let pred = match &uncond {
        Some(u) => implied_conditional(&pred, u, w)?,
        None => pred,
    };
    let value = loss(&pred)?;
    let store = value.total.backward()?;
    let grad_of = |v: &Var| -> Result<Vec<f32>> {
        Ok(match store.get(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => Vec::new(),
        })
    };
    let d_x = grad_of(&x)?;
    ensure!(!d_x.is_empty(), "the loss does not depend on G's output");
    let d_heads = heads.iter().map(grad_of).collect::<Result<Vec<_>>>()?;
    let d_states = stage_states.iter().map(grad_of).collect::<Result<Vec<_>>>()?;
    let mut grads: Vec<Vec<f32>> = slots.iter().map(|s| vec![0f32; s.value.len()]).collect();
    engine.backward(&params, &d_x, &d_heads, &d_states, &mut grads)?;
    Ok((value, grads))
}

// ---------------------------------------------------------------------------------------------
// The job

/// The `distill` job: open the data named in the options (or the resumed run's), then [`distill_with`].
pub fn distill_job(options: Value, ctx: &JobCtx) -> Result<Value> {
    let (args, map) = SessionArgs::split("distill", options)?;
    let settings: DistillSettings = serde_json::from_value(Value::Object(map)).context("invalid distill options")?;
    let data_dir = match (&settings.data, args.resume) {
        (Some(d), _) => d.clone(),
        (None, true) => serde_json::from_value::<DistillOptions>(Run::open(&args.out)?.config.train)
            .map(|o| o.data)
            .map_err(|_| anyhow!("{} was not made by biflow distill; it cannot be resumed", args.out.display()))?,
        (None, false) => bail!("distill needs --data DIR (a dataset made by `biflow data prepare`)"),
    };
    let data = open_data(Path::new(&data_dir))?;
    distill_with(&args, &settings, &data_dir, data.as_ref(), ctx)
}

/// Distill on `data` (found at `data_dir`): a new run in `args.out`, or continue it with `args.resume`.
pub fn distill_with(args: &SessionArgs, settings: &DistillSettings, data_dir: &str, data: &dyn TrainData, ctx: &JobCtx) -> Result<Value> {
    let job = Distilling { given: settings.clone(), effective: settings.clone(), data_dir: data_dir.to_string(), forward: None, flow: None, perceptual: None };
    training::drive(job, args, data, ctx)
}

/// Distillation as a [`TrainingJob`].
struct Distilling {
    given: DistillSettings,
    effective: DistillSettings,
    data_dir: String,
    /// F's run and its canonical path, once settled.
    forward: Option<(Run, PathBuf)>,
    /// F, loaded on the job's device.
    flow: Option<TarFlow>,
    /// The perceptual terms' networks, loaded by `resolve`.
    perceptual: Option<Perceptual>,
}

impl TrainingJob for Distilling {
    type Options = DistillOptions;
    type Model = ReverseConfig;
    const NAME: &'static str = "distill";
    const RESUMES: &'static str = "an existing distilled run";

    fn settle(&mut self, resumed: Option<&Run>) -> Result<Option<usize>> {
        let s = &self.given;
        if let Some(run) = resumed {
            let (Some(g), Ok(saved)) = (&run.config.reverse, serde_json::from_value::<DistillOptions>(run.config.train.clone())) else {
                bail!("{} was not made by biflow distill; it cannot be resumed", run.dir.display())
            };
            if let Some(f) = &s.forward {
                let same = std::fs::canonicalize(f).ok().is_some_and(|p| p == Path::new(&saved.forward));
                ensure!(same, "--resume: {} was distilled from {}, not from {f}", run.dir.display(), saved.forward);
            }
            let mut given = serde_json::to_value(s)?;
            given.as_object_mut().unwrap().remove("forward");
            let flat = serde_json::to_value(saved.as_settings(g))?;
            train::check_resume_options(given.as_object().unwrap(), flat.as_object().unwrap(), RESUMABLE, &[])?;
            let mut merged = flat.as_object().unwrap().clone();
            merged.extend(serde_json::to_value(s)?.as_object().unwrap().clone().into_iter().filter(|(_, v)| !v.is_null()));
            self.effective = serde_json::from_value(Value::Object(merged))?;
        }
        let forward_dir = self.effective.forward.clone().context("distill needs --forward RUN (a forward run from `biflow train` or `biflow import`)")?;
        let f_run = match resumed {
            Some(run) => run.forward_run()?,
            None => {
                let f = Run::open(Path::new(&forward_dir)).with_context(|| format!("--forward {forward_dir} is not a usable forward run"))?;
                ensure!(!f.is_distilled(), "--forward {forward_dir} is a distilled run; give the forward run it was made from");
                f
            }
        };
        let forward_abs = std::fs::canonicalize(&f_run.dir).with_context(|| format!("cannot resolve {}", f_run.dir.display()))?;
        self.forward = Some((f_run, forward_abs));
        Ok(self.effective.limit)
    }

    fn resolve(&mut self, data: &dyn TrainData, device: &Device) -> Result<(DistillOptions, ReverseConfig)> {
        let (f_run, forward_abs) = self.forward.as_ref().expect("settled");
        let resolved = resolve(&self.effective, f_run, &forward_abs.display().to_string(), data, &self.data_dir)?;
        let flow = f_run.load_flow(device)?;
        self.perceptual = match &resolved.0.perceptual {
            Some(p) => {
                // Perceptual terms on latents compare decoded images: the run's VAE is in the loss.
                let decoder = f_run.load_vae(None, "put it back: the perceptual terms compare its decoded images", device)?;
                Some(load_perceptual(p, flow.config(), decoder, device)?)
            }
            None => None,
        };
        self.flow = Some(flow);
        Ok(resolved)
    }

    fn schedule(opts: &DistillOptions) -> &Schedule {
        &opts.schedule
    }

    fn check_model(run: &Run, g: &ReverseConfig) -> Result<()> {
        ensure!(run.config.reverse.as_ref() == Some(g), "--resume: the options describe another reverse model than the run's");
        Ok(())
    }

    fn new_run(&self, opts: &DistillOptions, g: &ReverseConfig) -> Result<RunConfig> {
        let (f_run, forward_abs) = self.forward.as_ref().expect("settled");
        let weights = f_run.sampling_weights_path()?;
        let bytes = std::fs::read(&weights).with_context(|| format!("cannot read {}", weights.display()))?;
        let fref = ForwardRef { dir: forward_abs.display().to_string(), weights_sha256: crate::io::sha256_hex(&bytes) };
        let mut cfg = RunConfig::biflow(f_run.config.model.clone(), g.clone(), fref);
        cfg.noise_std = Some(opts.noise_std);
        cfg.train = serde_json::to_value(opts)?;
        cfg.source = json!({"kind": "distill", "data": self.data_dir, "forward": forward_abs});
        Ok(cfg)
    }

    fn objective(&mut self, opts: DistillOptions, g_cfg: &ReverseConfig, device: &Device, backend: Backend) -> Result<(Vec<Slot>, Box<dyn Objective>)> {
        let (map, g) = reverse::new_trainable(g_cfg, opts.schedule.seed, device)?;
        let slots = train::slots_of(&map)?;
        // The fused backend runs G's hand-written passes; the composed one candle's with autograd.
        let engine = match backend {
            Backend::Fused => {
                let (names, sizes) = train::slot_layout(&slots);
                Some(g.engine(&names, &sizes)?)
            }
            Backend::Composed => None,
        };
        let (flow, perceptual) = (self.flow.take().expect("resolved"), self.perceptual.take());
        Ok((slots, Box::new(Distillation { flow, g, engine, opts, perceptual })))
    }

    fn finish(&self, result: &mut Map<String, Value>) {
        if let Some((_, forward_abs)) = &self.forward {
            result.insert("forward".into(), json!(forward_abs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    fn options(kind: LossKind, learned_denoise: bool) -> DistillOptions {
        DistillOptions {
            forward: String::new(),
            data: String::new(),
            schedule: Schedule {
                batch_size: 8,
                steps: 1,
                lr: 1e-3,
                min_lr: 0.0,
                warmup: 0,
                weight_decay: 0.0,
                beta1: 0.9,
                beta2: 0.95,
                grad_clip: 1.0,
                ema_decay: 0.0,
                seed: 0,
                save_every: 1,
                keep: 1,
                sample_every: 0,
            },
            limit: None,
            noise_std: 0.05,
            loss: LossConfig { kind, rms_norm: true, learned_denoise, adaptive_p: 1.0, adaptive_eps: 0.01 },
            cfg_range: Some([0.5, 3.0]),
            drop_label: 0.3,
            perceptual: None,
        }
    }

    /// Every parameter of G, the heads included where the loss has them, receives a non-zero
    /// gradient under each loss, with training-time guidance on; and the CPU's hand-written passes
    /// give the loss and gradients that candle's autograd gives.
    #[test]
    fn every_parameter_of_g_gets_a_gradient_under_each_loss() {
        let dev = Device::Cpu;
        let f_cfg = crate::models::flow::FlowConfig {
            img_size: 8,
            in_channels: 1,
            patch_size: 2,
            channels: 64,
            num_blocks: 2,
            layers_per_block: 1,
            num_classes: 3,
            clip_scale: None,
        };
        for (kind, learned) in [(LossKind::Align, true), (LossKind::Naive, true), (LossKind::Hidden, true), (LossKind::Align, false)] {
            let g_cfg = ReverseConfig::for_flow(&f_cfg, 64, 1, if learned { 1 } else { 0 }, kind == LossKind::Align);
            let mut results = Vec::new();
            for by_hand in [false, true] {
                let (map, g) = reverse::new_trainable(&g_cfg, 2, &dev).unwrap();
                let slots = train::slots_of(&map).unwrap();
                assert_eq!(slots.iter().any(|s| s.name.starts_with("heads.")), kind == LossKind::Align);
                let engine = by_hand.then(|| {
                    let (names, sizes) = train::slot_layout(&slots);
                    g.engine(&names, &sizes).unwrap()
                });
                let (_fm, flow) = crate::models::flow::new_trainable(&f_cfg, 1, &dev).unwrap();
                let mut obj = Distillation { flow, g, engine, opts: options(kind, learned), perceptual: None };
                let mut rng = ChaCha8Rng::seed_from_u64(3);
                let xs: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
                let ys: Vec<i64> = (0..8).map(|i| i % 3).collect();
                let out = obj.step(&slots, xs, ys, &mut rng).unwrap();
                assert!(out.loss.is_finite());
                for (s, gr) in slots.iter().zip(&out.grads) {
                    let norm: f32 = gr.iter().map(|v| v * v).sum();
                    assert!(norm > 0.0, "{kind:?} (learned denoise {learned}, by hand {by_hand}): {} gets no gradient", s.name);
                }
                results.push((slots, out));
            }
            let ((slots, auto), (_, hand)) = (&results[0], &results[1]);
            assert!((auto.loss - hand.loss).abs() < 1e-4 * auto.loss.abs().max(1.0), "{kind:?}: loss {} by autograd, {} by hand", auto.loss, hand.loss);
            for ((s, a), h) in slots.iter().zip(&auto.grads).zip(&hand.grads) {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = crate::engines::max_abs_diff(a, h);
                assert!(diff <= 1e-3 * scale, "{kind:?} (learned denoise {learned}): {} differs by {diff} (largest {scale})", s.name);
            }
        }
    }

    /// At guidance 0 the implied conditional prediction is G's output itself, and G without a
    /// guidance input is G at w = 0.
    #[test]
    fn guidance_zero_is_the_plain_conditional_output() {
        let dev = Device::Cpu;
        let g_cfg = ReverseConfig { num_tokens: 16, token_dim: 4, num_classes: 3, channels: 64, stages: 2, layers_per_stage: 1, denoise_layers: 1, heads: true };
        let (_m, g) = reverse::new_trainable(&g_cfg, 4, &dev).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let z: Vec<f32> = (0..3 * 16 * 4).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
        let z = Tensor::from_vec(z, (3, 16, 4), &dev).unwrap();
        let y = Tensor::from_vec(vec![0i64, 2, -1], 3, &dev).unwrap();
        let cond = g.forward(&z, Some(&y), Some(&[0.0; 3]), true).unwrap();
        let plain = g.forward(&z, Some(&y), None, true).unwrap();
        let null = Tensor::from_vec(vec![-1i64; 3], 3, &dev).unwrap();
        let uncond = g.forward(&z, Some(&null), Some(&[0.0; 3]), true).unwrap();
        let implied = implied_conditional(&cond, &uncond, &[0.0; 3]).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&cond.x, &plain.x), 0.0);
        assert_eq!(diff(&cond.x, &implied.x), 0.0);
        for (a, b) in cond.heads.iter().zip(&implied.heads) {
            assert_eq!(diff(a, b), 0.0);
        }
        // A positive scale does change the output (the embedding is live).
        let guided = g.forward(&z, Some(&y), Some(&[2.0; 3]), false).unwrap();
        assert!(diff(&guided.x, &cond.x) > 0.0);
        // And guidance on an unconditional G is refused.
        let (_m, ug) = reverse::new_trainable(&ReverseConfig { num_classes: 0, ..g_cfg }, 4, &dev).unwrap();
        assert!(ug.forward(&z, None, Some(&[1.0; 3]), false).is_err());
    }
}
