//! `biflow train`: maximum-likelihood training of the forward flow (TARFlow) with exact resume.
//!
//! The objective: Gaussian noise (`noiseStd`) or uniform dequantisation, label dropout, then
//! `loss = 0.5 mean(z^2) - mean(logdet)`. The session (lock, resume, the run) is jobs/training.rs and the
//! loop the trainer's (train/), both shared with `distill`.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::models::flow::{bits_per_dim, nll_loss, FlowConfig, FlowOutput, TarFlow, Values};
use crate::job::JobCtx;
use crate::device::mode::Backend;
use crate::engines::NllGrad;
use crate::run::{Run, RunConfig};
use crate::jobs::options::given;
use crate::jobs::training::{self, schedule_of, SessionArgs, TrainingJob};
use crate::train::{self, open_data, Objective, Schedule, Slot, StepOutput, TrainData};

// ---------------------------------------------------------------------------------------------
// Options

crate::settings! {
    /// Every training knob, as given on the command line or in a `--config` file (all optional).
    pub struct TrainSettings {
        /// prepared dataset folder (from `biflow data prepare`); on --resume defaults to the run's
        data: String,
        /// images per step
        batch_size: usize = 64,
        /// total optimiser steps
        steps: u64 = 10000,
        /// train for this many passes over the data instead of --steps
        epochs: f64,
        /// peak learning rate
        lr: f64 = 3e-4,
        /// learning rate at the end of the cosine decay
        min_lr: f64 = 1e-6,
        /// linear warmup steps
        warmup: u64 ["min(1000, steps/20)"],
        /// AdamW weight decay on weight matrices
        weight_decay: f64 = 1e-4,
        /// clip the global gradient norm to this (0: off)
        grad_clip: f64 ["1"] = 1.0,
        /// decay of the EMA of the weights
        ema_decay: f64 = 0.999,
        /// Gaussian noise added to the data (0: none)
        noise_std: f64 ["0.05"],
        /// uniform dequantisation instead of Gaussian noise (likelihood models)
        dequantize: bool,
        /// probability of dropping the label, for guidance
        drop_label: f64 ["0.1 with classes"],
        /// seed for initial weights, data order, noise and label drops
        seed: u64 = 0,
        /// patch size p (tokens = (size/p)^2)
        patch_size: usize ["4 from 32px, else 2"],
        /// transformer width (multiple of 64)
        channels: usize = 256,
        /// number of flow blocks
        blocks: usize = 4,
        /// transformer layers in each block
        layers_per_block: usize = 2,
        /// soft clip c*tanh(a/c) of the affine scales (BiFlow norm control; 0: off)
        clip_scale: f64 ["off"],
        /// write a checkpoint every N steps
        save_every: u64 = 1000,
        /// number of newest checkpoints to keep
        keep: usize = 3,
        /// train on the first N training images only
        limit: usize,
        /// write a grid of 16 samples (fixed noise and labels, EMA weights) to RUN/samples/step-N.png every N steps (0: never)
        sample_every: u64 = 0,
    }
}

/// The resolved training options, stored in RUN/config.json under "train".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainOptions {
    pub data: String,
    #[serde(flatten)]
    pub schedule: Schedule,
    pub epochs: Option<f64>,
    pub noise_std: Option<f64>,
    pub dequantize: bool,
    pub drop_label: f64,
    pub limit: Option<usize>,
}

/// Options that may change when resuming (the rest must match the run).
const RESUMABLE: &[&str] = &["data", "steps", "epochs", "saveEvery", "keep", "sampleEvery"];

fn read_config_file(path: &Path) -> Result<TrainSettings> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    // A run's own config.json can be given too: take its "train" and "model" parts.
    let v = if v.get("kind").is_some() && v.get("model").is_some() {
        let mut m = Map::new();
        if let Some(Value::Object(t)) = v.get("train") {
            for (k, val) in t {
                if !["beta1", "beta2"].contains(&k.as_str()) {
                    m.insert(k.clone(), val.clone());
                }
            }
        }
        let model = &v["model"];
        for (from, to) in [("patchSize", "patchSize"), ("channels", "channels"), ("numBlocks", "blocks"), ("layersPerBlock", "layersPerBlock"), ("clipScale", "clipScale")] {
            if let Some(x) = model.get(from) {
                m.insert(to.into(), x.clone());
            }
        }
        m.retain(|_, v| !v.is_null());
        Value::Object(m)
    } else {
        v
    };
    serde_json::from_value(v).with_context(|| format!("{} has invalid training settings", path.display()))
}

fn resolve(s: &TrainSettings, data: &dyn TrainData, data_dir: &str) -> Result<(TrainOptions, FlowConfig)> {
    // The declared defaults; --steps and --epochs are read as given (one excludes the other).
    let all = s.clone().or(TrainSettings::defaults());
    let (c, h, w) = data.shape();
    if h != w {
        bail!("the dataset's images are {w}x{h}; TARFlow needs square images (prepare the data with a square --size)");
    }
    let n = data.len();
    let batch_size = given(&all.batch_size);
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if n < batch_size {
        bail!("the training split has {n} images, fewer than --batch-size {batch_size}");
    }
    let per_epoch = (n / batch_size) as f64;
    let steps = match (s.steps, s.epochs) {
        (Some(_), Some(_)) => bail!("give --steps or --epochs, not both"),
        (Some(st), None) => st,
        (None, Some(e)) => {
            if !(e > 0.0) {
                bail!("--epochs must be positive");
            }
            (e * per_epoch).ceil().max(1.0) as u64
        }
        (None, None) => given(&all.steps),
    };
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let lr = given(&all.lr);
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    let dequantize = s.dequantize.unwrap_or(false);
    ensure!(!(dequantize && data.latent().is_some()), "--dequantize spreads 8-bit pixel levels; this dataset holds continuous VAE latents (use --noise-std)");
    let noise_std = match (dequantize, s.noise_std) {
        (true, Some(x)) if x > 0.0 => bail!("give --noise-std or --dequantize, not both"),
        (true, _) => None,
        (false, Some(x)) if x < 0.0 => bail!("--noise-std must not be negative"),
        (false, Some(x)) if x == 0.0 => None,
        (false, Some(x)) => Some(x),
        (false, None) => Some(0.05),
    };
    let classes = data.num_classes();
    let drop_label = s.drop_label.unwrap_or(if classes > 0 { 0.1 } else { 0.0 });
    if !(0.0..=1.0).contains(&drop_label) {
        bail!("--drop-label must be between 0 and 1");
    }
    let patch_size = s.patch_size.unwrap_or(if h >= 32 && h % 4 == 0 { 4 } else { 2 });
    if patch_size == 0 || h % patch_size != 0 {
        bail!("--patch-size {patch_size} does not divide the image size {h}");
    }
    let channels = given(&all.channels);
    if channels == 0 || channels % 64 != 0 {
        bail!("--channels must be a positive multiple of 64 (attention heads have size 64), got {channels}");
    }
    let model = FlowConfig {
        img_size: h,
        in_channels: c,
        patch_size,
        channels,
        num_blocks: given(&all.blocks).max(1),
        layers_per_block: given(&all.layers_per_block).max(1),
        num_classes: classes,
        clip_scale: match s.clip_scale {
            Some(x) if x > 0.0 => Some(x),
            Some(_) => None,
            None => None,
        },
    };
    let opts = TrainOptions {
        data: data_dir.to_string(),
        schedule: schedule_of!(all, batch_size: batch_size, steps: steps, lr: lr, min_lr: given(&all.min_lr).min(lr), warmup: s.warmup.unwrap_or((steps / 20).min(1000))),
        epochs: s.epochs,
        noise_std,
        dequantize,
        drop_label,
        limit: s.limit,
    };
    Ok((opts, model))
}

/// The settings that reproduce a run's resolved options and model.
fn settings_of(t: &TrainOptions, m: &FlowConfig) -> TrainSettings {
    TrainSettings {
        data: Some(t.data.clone()),
        batch_size: Some(t.schedule.batch_size),
        steps: Some(t.schedule.steps),
        epochs: None,
        lr: Some(t.schedule.lr),
        min_lr: Some(t.schedule.min_lr),
        warmup: Some(t.schedule.warmup),
        weight_decay: Some(t.schedule.weight_decay),
        grad_clip: Some(t.schedule.grad_clip),
        ema_decay: Some(t.schedule.ema_decay),
        noise_std: Some(t.noise_std.unwrap_or(0.0)),
        dequantize: Some(t.dequantize),
        drop_label: Some(t.drop_label),
        seed: Some(t.schedule.seed),
        patch_size: Some(m.patch_size),
        channels: Some(m.channels),
        blocks: Some(m.num_blocks),
        layers_per_block: Some(m.layers_per_block),
        clip_scale: Some(m.clip_scale.unwrap_or(0.0)),
        save_every: Some(t.schedule.save_every),
        keep: Some(t.schedule.keep),
        limit: t.limit,
        sample_every: Some(t.schedule.sample_every),
    }
}

/// On resume: every option the user gave must agree with the run, except the resumable ones.
fn check_resume_settings(given: &TrainSettings, run: &RunConfig, saved: &TrainOptions) -> Result<()> {
    let given = serde_json::to_value(given)?;
    let mut saved_flat = serde_json::to_value(saved)?;
    let m = &run.model;
    let flat = saved_flat.as_object_mut().unwrap();
    flat.insert("patchSize".into(), json!(m.patch_size));
    flat.insert("channels".into(), json!(m.channels));
    flat.insert("blocks".into(), json!(m.num_blocks));
    flat.insert("layersPerBlock".into(), json!(m.layers_per_block));
    flat.insert("clipScale".into(), json!(m.clip_scale));
    train::check_resume_options(given.as_object().unwrap(), flat, RESUMABLE, &["noiseStd", "clipScale"])
}

// ---------------------------------------------------------------------------------------------
// The objective: maximum likelihood

/// F's negative log-likelihood on noisy (or dequantised) images with label dropout. On the CPU the
/// gradient is computed by hand (engines::NllGrad), elsewhere by candle's autograd.
struct Likelihood {
    model: TarFlow,
    engine: Option<NllGrad>,
    opts: TrainOptions,
    values: Values,
}

impl Objective for Likelihood {
    fn step(&mut self, slots: &[Slot], mut xs: Vec<f32>, mut ys: Vec<i64>, rng: &mut ChaCha8Rng) -> Result<StepOutput> {
        let cfg = self.model.config();
        let device = self.model.device().clone();
        let n = ys.len();
        if self.opts.dequantize {
            for v in xs.iter_mut() {
                let k = ((*v + 1.0) * 127.5).round().clamp(0.0, 255.0);
                *v = (k + rng.gen::<f32>()) / 128.0 - 1.0;
            }
        } else if let Some(sd) = self.opts.noise_std {
            let sd = sd as f32;
            for v in xs.iter_mut() {
                *v += sd * rng.sample::<f32, _>(rand_distr::StandardNormal);
            }
        }
        let labels = if cfg.num_classes > 0 {
            for y in ys.iter_mut() {
                if self.opts.drop_label > 0.0 && rng.gen::<f64>() < self.opts.drop_label {
                    *y = -1;
                }
            }
            Some(Tensor::from_vec(ys, n, &device)?)
        } else {
            None
        };
        let x = Tensor::from_vec(xs, (n, cfg.in_channels, cfg.img_size, cfg.img_size), &device)?;
        let (out, grads) = match &mut self.engine {
            Some(engine) => {
                let tokens: Vec<f32> = self.model.patchify(&x)?.flatten_all()?.to_vec1()?;
                let labels: Option<Vec<i64>> = labels.map(|y| y.to_vec1()).transpose()?;
                let params: Vec<&[f32]> = slots.iter().map(|s| s.value.as_slice()).collect();
                let mut grads: Vec<Vec<f32>> = slots.iter().map(|s| vec![0f32; s.value.len()]).collect();
                let r = engine.run(&params, &tokens, labels.as_deref(), &mut grads)?;
                let out = FlowOutput {
                    z: Tensor::from_vec(r.z, (n, cfg.num_tokens(), cfg.token_dim()), &device)?,
                    logdets: Tensor::from_vec(r.logdets, n, &device)?,
                    trajectory: Vec::new(),
                };
                (out, Some(grads))
            }
            None => (self.model.forward(&x, labels.as_ref())?, None),
        };
        let loss = nll_loss(&out)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        let bpd = bits_per_dim(&out, cfg, self.values)?.mean_all()?.to_scalar::<f32>()? as f64;
        let grads = match grads {
            Some(g) => g,
            None => host_gradients(&loss, slots)?,
        };
        Ok(StepOutput { loss: loss_v, metrics: crate::metrics!["bpd" => bpd], grads })
    }

    fn reads_vars(&self) -> bool {
        self.engine.is_none()
    }

    /// Exact samples (causal decoding, then the score-based denoising step) with the EMA weights.
    fn preview(&self, slots: &[Slot]) -> Result<Option<Tensor>> {
        let cfg = self.model.config();
        let device = self.model.device().clone();
        let ema = TarFlow::new(train::ema_varbuilder(slots, &device)?, cfg)?;
        let (z, y) = train::preview_noise(train::PREVIEW_COUNT, cfg.num_tokens(), cfg.token_dim(), cfg.num_classes, &device)?;
        let opts = crate::models::flow::ReverseOptions { guidance: 0.0, annealed: false, attn_temp: 1.0 };
        let mut x = ema.reverse(&z, y.as_ref(), &opts, |_, _| Ok(()))?;
        if let Some(sigma) = self.opts.noise_std {
            x = crate::models::flow::denoise(&ema, &x, y.as_ref(), sigma)?;
        }
        Ok(Some(x))
    }
}

/// The gradient of `loss` for every slot (zeros where it does not reach), on the host.
/// Off the CPU (and on the composed path, which tests it there) the gradients come back in one
/// device-to-host copy: one synchronisation, not one per tensor.
pub(crate) fn host_gradients(loss: &Tensor, slots: &[Slot]) -> Result<Vec<Vec<f32>>> {
    let store = loss.backward()?;
    let device = loss.device();
    let flat = |s: &Slot| -> Result<Tensor> {
        Ok(match store.get(s.var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_dtype(candle_core::DType::F32)?,
            None => Tensor::zeros(s.value.len(), candle_core::DType::F32, device)?,
        })
    };
    if Backend::of(device) == Backend::Fused {
        return slots.iter().map(|s| Ok(flat(s)?.to_vec1::<f32>()?)).collect();
    }
    let all = Tensor::cat(&slots.iter().map(flat).collect::<Result<Vec<_>>>()?, 0)?.to_vec1::<f32>()?;
    let mut offset = 0;
    Ok(slots
        .iter()
        .map(|s| {
            offset += s.value.len();
            all[offset - s.value.len()..offset].to_vec()
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The job

crate::options! {
    pub struct ConfigFile {
        /// JSON file with training options (camelCase flag names, or a run's config.json); flags override it
        config: Option<String>,
    }
}

/// The `train` job: its settings (a `--config` file under the command line's), the data named in
/// them (or the resumed run's), then [`train_with`].
pub fn train_job(options: Value, ctx: &JobCtx) -> Result<Value> {
    let (args, mut map) = SessionArgs::split("train", options)?;
    let config: ConfigFile = crate::jobs::options::take(&mut map, "train")?;
    let given: TrainSettings = serde_json::from_value(Value::Object(map)).context("invalid train options")?;
    let file = match &config.config {
        Some(p) => read_config_file(Path::new(p))?,
        None => TrainSettings::default(),
    };
    let settings = given.or(file);
    let data_dir = match (&settings.data, args.resume) {
        (Some(d), _) => d.clone(),
        (None, true) => {
            let run = Run::open(&args.out)?;
            serde_json::from_value::<TrainOptions>(run.config.train.clone())
                .map(|t| t.data)
                .map_err(|_| anyhow!("{} was not made by biflow train; it cannot be resumed", args.out.display()))?
        }
        (None, false) => bail!("train needs --data DIR (a dataset made by `biflow data prepare`)"),
    };
    let data = open_data(Path::new(&data_dir))?;
    train_with(&args, &settings, &data_dir, data.as_ref(), ctx)
}

/// Train on `data` (found at `data_dir`): a new run in `args.out`, or continue it with `args.resume`.
pub fn train_with(args: &SessionArgs, settings: &TrainSettings, data_dir: &str, data: &dyn TrainData, ctx: &JobCtx) -> Result<Value> {
    let job = Training { given: settings.clone(), effective: settings.clone(), saved: None, data_dir: data_dir.to_string(), values: Values::Pixels };
    training::drive(job, args, data, ctx)
}

/// Maximum-likelihood training as a [`TrainingJob`].
struct Training {
    given: TrainSettings,
    effective: TrainSettings,
    /// The resumed run's options.
    saved: Option<TrainOptions>,
    data_dir: String,
    /// Pixels or latents, from the data.
    values: Values,
}

impl TrainingJob for Training {
    type Options = TrainOptions;
    type Model = FlowConfig;
    const NAME: &'static str = "train";
    const RESUMES: &'static str = "an existing run folder";

    fn settle(&mut self, resumed: Option<&Run>) -> Result<Option<usize>> {
        if let Some(run) = resumed {
            let saved: TrainOptions = serde_json::from_value(run.config.train.clone())
                .map_err(|_| anyhow!("{} was not made by biflow train; it cannot be resumed", run.dir.display()))?;
            check_resume_settings(&self.given, &run.config, &saved)?;
            let mut base = settings_of(&saved, &run.config.model);
            if self.given.steps.is_some() || self.given.epochs.is_some() {
                base.steps = None;
            }
            self.effective = self.given.clone().or(base);
            self.saved = Some(saved);
        }
        Ok(self.effective.limit)
    }

    fn resolve(&mut self, data: &dyn TrainData, _device: &Device) -> Result<(TrainOptions, FlowConfig)> {
        let (mut opts, model) = resolve(&self.effective, data, &self.data_dir)?;
        self.values = Values::of(data.latent().is_some());
        if let Some(saved) = &self.saved {
            if self.given.steps.is_none() && self.given.epochs.is_none() {
                opts.epochs = saved.epochs;
            }
        }
        Ok((opts, model))
    }

    fn schedule(opts: &TrainOptions) -> &Schedule {
        &opts.schedule
    }

    fn check_model(run: &Run, m: &FlowConfig) -> Result<()> {
        let r = &run.config.model;
        ensure!(
            r == m,
            "--resume: the data ({}x{}x{}, {} classes) does not fit the run's model ({}x{}x{}, {} classes)",
            m.in_channels, m.img_size, m.img_size, m.num_classes, r.in_channels, r.img_size, r.img_size, r.num_classes
        );
        Ok(())
    }

    fn new_run(&self, opts: &TrainOptions, model: &FlowConfig) -> Result<RunConfig> {
        let mut cfg = RunConfig::tarflow(model.clone());
        cfg.noise_std = opts.noise_std;
        cfg.dequantize = opts.dequantize;
        cfg.train = serde_json::to_value(opts)?;
        cfg.source = json!({"kind": "train", "data": self.data_dir});
        Ok(cfg)
    }

    fn objective(&mut self, opts: TrainOptions, cfg: &FlowConfig, device: &Device, backend: Backend) -> Result<(Vec<Slot>, Box<dyn Objective>)> {
        let (map, model) = crate::models::flow::new_trainable(cfg, opts.schedule.seed, device).context("cannot build the model")?;
        let slots = train::slots_of(&map)?;
        // The fused backend differentiates by hand; the composed one with candle's autograd.
        let engine = match backend {
            Backend::Fused => {
                let (names, sizes) = train::slot_layout(&slots);
                Some(model.engine(&names, &sizes)?)
            }
            Backend::Composed => None,
        };
        Ok((slots, Box::new(Likelihood { model, engine, opts, values: self.values })))
    }
}
