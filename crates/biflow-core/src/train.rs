//! `biflow train`: maximum-likelihood training of the forward flow (TARFlow) with exact resume.
//!
//! One step: a batch in the epoch's seeded order, Gaussian noise (`noiseStd`) or uniform
//! dequantisation, label dropout, `loss = 0.5 mean(z^2) - mean(logdet)`, backward, global-norm
//! clipping, AdamW (host-side state, see optim.rs) under warmup + cosine, EMA.
//!
//! Everything a step depends on is in the checkpoint: weights, EMA, AdamW moments and step count, the
//! data position (epoch, offset; the epoch's order is a function of the seed and the epoch), and the
//! host RNG (ChaCha8 seed, stream, word position) that draws noise and label drops. So a resumed run
//! repeats the uninterrupted one bit for bit on the same machine and thread count.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::flow::{bits_per_dim, nll_loss, FlowConfig, FlowOutput, TarFlow};
use crate::job::{Cancelled, JobCtx};
use crate::nll_grad::NllGrad;
use crate::optim::{self, AdamW, AdamWConfig, Moments};
use crate::run::{decode_safetensors, encode_safetensors, Checkpoint, HostTensor, Run, RunConfig};

// ---------------------------------------------------------------------------------------------
// Data

/// What the trainer needs from a dataset: images as f32 in [-1,1] (N*C*H*W) and labels.
pub trait TrainData: Send + Sync {
    /// (channels, height, width)
    fn shape(&self) -> (usize, usize, usize);
    /// 0 when unlabelled.
    fn num_classes(&self) -> usize;
    fn len(&self) -> usize;
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)>;
}

/// An in-memory dataset (tests, benchmarks).
pub struct MemData {
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
}

impl TrainData for MemData {
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.size, self.size)
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        let per = self.channels * self.size * self.size;
        let mut x = Vec::with_capacity(per * indices.len());
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.images[i * per..(i + 1) * per]);
            y.push(self.labels[i]);
        }
        Ok((x, y))
    }
}

/// Only the first `limit` images of another dataset.
struct Limited<'a> {
    inner: &'a dyn TrainData,
    limit: usize,
}

impl TrainData for Limited<'_> {
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn len(&self) -> usize {
        self.inner.len().min(self.limit)
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        self.inner.batch(indices)
    }
}

impl<D: TrainData + ?Sized> TrainData for Box<D> {
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        (**self).batch(indices)
    }
}

/// A prepared dataset (`biflow data prepare`): its training split.
impl TrainData for crate::data::Dataset {
    fn shape(&self) -> (usize, usize, usize) {
        crate::data::Dataset::shape(self)
    }
    fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }
    fn len(&self) -> usize {
        crate::data::Dataset::len(self, crate::data::Split::Train)
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        self.batch_f32(crate::data::Split::Train, indices)
    }
}

/// Open a prepared dataset folder for training.
pub fn open_data(dir: &Path) -> Result<Box<dyn TrainData>> {
    let ds = crate::data::Dataset::open(dir)?;
    if ds.is_empty(crate::data::Split::Train) {
        bail!("the dataset {} has no training images", dir.display());
    }
    Ok(Box::new(ds))
}

/// Where the trainer is in the data: epoch `epoch`, `offset` images into that epoch's order.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataPos {
    pub epoch: u64,
    pub offset: usize,
}

/// The order of epoch `epoch`: a seeded shuffle (ChaCha8, stream = epoch).
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d);
    rng.set_stream(epoch);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        idx.swap(i, j);
    }
    idx
}

struct Loader {
    seed: u64,
    n: usize,
    batch: usize,
    pos: DataPos,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Loader {
    fn next_indices(&mut self) -> Vec<usize> {
        if self.pos.offset + self.batch > self.n {
            self.pos = DataPos { epoch: self.pos.epoch + 1, offset: 0 };
        }
        if self.order_epoch != Some(self.pos.epoch) {
            self.order = epoch_order(self.seed, self.pos.epoch, self.n);
            self.order_epoch = Some(self.pos.epoch);
        }
        let out = self.order[self.pos.offset..self.pos.offset + self.batch].to_vec();
        self.pos.offset += self.batch;
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Options

/// Every training knob, as given on the command line or in a `--config` file (all optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_std: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dequantize: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_label: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_per_block: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    /// Train on the first N training images only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl TrainSettings {
    /// `self` where set, else `other`.
    fn or(self, other: TrainSettings) -> TrainSettings {
        let a = serde_json::to_value(&self).unwrap();
        let mut b = serde_json::to_value(&other).unwrap();
        if let (Value::Object(a), Value::Object(b)) = (a, &mut b) {
            for (k, v) in a {
                b.insert(k, v);
            }
        }
        serde_json::from_value(b).unwrap()
    }
}

/// The `train` job's options: where, whether to resume, a config file, and the settings.
#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub out: PathBuf,
    pub resume: bool,
    pub config: Option<PathBuf>,
    pub settings: TrainSettings,
    /// Testing hook: pretend the loss is NaN at this step.
    pub debug_nan_at_step: Option<u64>,
}

impl TrainArgs {
    /// From the job's JSON options (camelCase, unknown keys refused).
    pub fn from_json(options: Value) -> Result<TrainArgs> {
        let mut map = match options {
            Value::Object(m) => m,
            _ => bail!("train options must be an object"),
        };
        let out = match map.remove("out") {
            Some(Value::String(s)) => PathBuf::from(s),
            _ => bail!("train needs --out RUN (the run folder)"),
        };
        let resume = match map.remove("resume") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => bail!("resume must be true or false, got {v}"),
        };
        let config = match map.remove("config") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(PathBuf::from(s)),
            Some(v) => bail!("config must be a file path, got {v}"),
        };
        let debug_nan_at_step = map.remove("debugNanAtStep").and_then(|v| v.as_u64());
        map.retain(|_, v| !v.is_null());
        let settings: TrainSettings = serde_json::from_value(Value::Object(map)).context("invalid train options")?;
        Ok(TrainArgs { out, resume, config, settings, debug_nan_at_step })
    }
}

/// The resolved training options, stored in RUN/config.json under "train".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainOptions {
    pub data: String,
    pub batch_size: usize,
    pub steps: u64,
    pub epochs: Option<f64>,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub noise_std: Option<f64>,
    pub dequantize: bool,
    pub drop_label: f64,
    pub seed: u64,
    pub save_every: u64,
    pub keep: usize,
    pub limit: Option<usize>,
}

/// Options that may change when resuming (the rest must match the run).
const RESUMABLE: &[&str] = &["data", "steps", "epochs", "saveEvery", "keep"];

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
    let (c, h, w) = data.shape();
    if h != w {
        bail!("the dataset's images are {w}x{h}; TARFlow needs square images (prepare the data with a square --size)");
    }
    let n = data.len();
    let batch_size = s.batch_size.unwrap_or(64);
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
        (None, None) => 10_000,
    };
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let lr = s.lr.unwrap_or(3e-4);
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    let dequantize = s.dequantize.unwrap_or(false);
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
    let channels = s.channels.unwrap_or(256);
    if channels == 0 || channels % 64 != 0 {
        bail!("--channels must be a positive multiple of 64 (attention heads have size 64), got {channels}");
    }
    let model = FlowConfig {
        img_size: h,
        in_channels: c,
        patch_size,
        channels,
        num_blocks: s.blocks.unwrap_or(4).max(1),
        layers_per_block: s.layers_per_block.unwrap_or(2).max(1),
        num_classes: classes,
        clip_scale: match s.clip_scale {
            Some(x) if x > 0.0 => Some(x),
            Some(_) => None,
            None => None,
        },
    };
    let opts = TrainOptions {
        data: data_dir.to_string(),
        batch_size,
        steps,
        epochs: s.epochs,
        lr,
        min_lr: s.min_lr.unwrap_or(1e-6).min(lr),
        warmup: s.warmup.unwrap_or((steps / 20).min(1000)),
        weight_decay: s.weight_decay.unwrap_or(1e-4),
        beta1: 0.9,
        beta2: 0.95,
        grad_clip: s.grad_clip.unwrap_or(1.0),
        ema_decay: s.ema_decay.unwrap_or(0.999),
        noise_std,
        dequantize,
        drop_label,
        seed: s.seed.unwrap_or(0),
        save_every: s.save_every.unwrap_or(1000).max(1),
        keep: s.keep.unwrap_or(3).max(1),
        limit: s.limit,
    };
    Ok((opts, model))
}

/// The settings that reproduce a run's resolved options and model.
fn settings_of(t: &TrainOptions, m: &FlowConfig) -> TrainSettings {
    TrainSettings {
        data: Some(t.data.clone()),
        batch_size: Some(t.batch_size),
        steps: Some(t.steps),
        epochs: None,
        lr: Some(t.lr),
        min_lr: Some(t.min_lr),
        warmup: Some(t.warmup),
        weight_decay: Some(t.weight_decay),
        grad_clip: Some(t.grad_clip),
        ema_decay: Some(t.ema_decay),
        noise_std: Some(t.noise_std.unwrap_or(0.0)),
        dequantize: Some(t.dequantize),
        drop_label: Some(t.drop_label),
        seed: Some(t.seed),
        patch_size: Some(m.patch_size),
        channels: Some(m.channels),
        blocks: Some(m.num_blocks),
        layers_per_block: Some(m.layers_per_block),
        clip_scale: Some(m.clip_scale.unwrap_or(0.0)),
        save_every: Some(t.save_every),
        keep: Some(t.keep),
        limit: t.limit,
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
    let mut problems = Vec::new();
    for (k, v) in given.as_object().unwrap() {
        if RESUMABLE.contains(&k.as_str()) {
            continue;
        }
        let s = flat.get(k).cloned().unwrap_or(Value::Null);
        let same = match (v.as_f64(), s.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => *v == s || ((k == "noiseStd" || k == "clipScale") && v.as_f64() == Some(0.0) && s.is_null()),
        };
        if !same {
            problems.push(format!("{k} = {s} in the run, {v} asked for"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "--resume: the options do not match the run being resumed ({}); drop them to continue the run as it was, or train a new run",
            problems.join("; ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Model parameters

/// One trainable parameter with its host-side value, moments and EMA.
struct Slot {
    name: String,
    shape: Vec<usize>,
    var: Var,
    value: Vec<f32>,
    mom: Moments,
    ema: Vec<f32>,
    decay: bool,
}

/// The error that stops a run whose loss or gradient norm stopped being finite at `step`.
fn non_finite_stop(what: &str, value: f64, step: u64, last: Option<&Checkpoint>) -> anyhow::Error {
    let keep = match last {
        Some(c) => format!("the last good checkpoint is {}", c.dir.display()),
        None => "no checkpoint was written before it".to_string(),
    };
    anyhow!("training stopped: the {what} became {value} at step {step}; {keep} (try a lower --lr, or --clip-scale)")
}

/// The loss, the mean bits/dim and the gradient of every slot (in slot order) for one batch.
fn loss_and_gradients(model: &TarFlow, engine: Option<&mut NllGrad>, slots: &[Slot], x: &Tensor, labels: Option<&Tensor>) -> Result<(f64, f64, Vec<Vec<f32>>)> {
    let (out, grads) = match engine {
        Some(engine) => {
            let cfg = model.config();
            let tokens: Vec<f32> = model.patchify(x)?.flatten_all()?.to_vec1()?;
            let labels: Option<Vec<i64>> = labels.map(|y| y.to_vec1()).transpose()?;
            let params: Vec<&[f32]> = slots.iter().map(|s| s.value.as_slice()).collect();
            let mut grads: Vec<Vec<f32>> = slots.iter().map(|s| vec![0f32; s.value.len()]).collect();
            let r = engine.run(&params, &tokens, labels.as_deref(), &mut grads)?;
            let n = r.logdets.len();
            let out = FlowOutput {
                z: Tensor::from_vec(r.z, (n, cfg.num_tokens(), cfg.token_dim()), x.device())?,
                logdets: Tensor::from_vec(r.logdets, n, x.device())?,
                trajectory: Vec::new(),
            };
            (out, Some(grads))
        }
        None => (model.forward(x, labels)?, None),
    };
    let loss = nll_loss(&out)?;
    let loss_v = loss.to_scalar::<f32>()? as f64;
    let bpd_v = bits_per_dim(&out, model.config())?.mean_all()?.to_scalar::<f32>()? as f64;
    let grads = match grads {
        Some(g) => g,
        None => {
            let store = loss.backward()?;
            let mut host = Vec::with_capacity(slots.len());
            for s in slots {
                host.push(match store.get(s.var.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; s.value.len()],
                });
            }
            host
        }
    };
    Ok((loss_v, bpd_v, grads))
}

/// Build the model with seeded initial weights; parameters in name order.
fn build_model(cfg: &FlowConfig, seed: u64, device: &Device) -> Result<(TarFlow, Vec<Slot>)> {
    let (map, model) = crate::flow::new_trainable(cfg, seed, device).context("cannot build the model")?;
    let vars: HashMap<String, Var> = map.data().lock().unwrap().clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut slots = Vec::new();
    for name in names {
        let var = vars[name].clone();
        let shape = var.dims().to_vec();
        let value = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let n = value.len();
        slots.push(Slot {
            name: name.clone(),
            decay: shape.len() >= 2 && name.ends_with("weight"),
            shape,
            var,
            ema: value.clone(),
            value,
            mom: Moments::zeros(n),
        });
    }
    Ok((model, slots))
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// RNG position, exactly restorable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RngState {
    pub seed: u64,
    pub stream: u64,
    /// u128 as a decimal string.
    pub word_pos: String,
}

fn rng_state(seed: u64, rng: &ChaCha8Rng) -> RngState {
    RngState { seed, stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
}

fn rng_restore(s: &RngState) -> Result<ChaCha8Rng> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(s.word_pos.parse::<u128>().map_err(|_| anyhow!("bad RNG position '{}'", s.word_pos))?);
    Ok(rng)
}

/// RUN/checkpoints/step-N/state.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointState {
    pub version: u32,
    pub step: u64,
    pub adam_steps: u64,
    pub data: DataPos,
    pub rng: RngState,
    pub model: FlowConfig,
    pub train: TrainOptions,
    /// sha256 of each file in the folder.
    pub files: std::collections::BTreeMap<String, String>,
    pub loss: Option<f64>,
    pub elapsed_secs: f64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

struct TrainState<'a> {
    run: &'a Run,
    opts: &'a TrainOptions,
    slots: &'a [Slot],
    adam: &'a AdamW,
    data: DataPos,
    rng: RngState,
    loss: Option<f64>,
    elapsed: f64,
}

/// Write checkpoint `step` atomically (temp folder, then rename), update weights.safetensors (EMA),
/// and keep only the newest `keep` checkpoints.
fn save_checkpoint(step: u64, st: &TrainState) -> Result<Checkpoint> {
    let run = st.run;
    let cdir = run.checkpoints_dir();
    fs::create_dir_all(&cdir)?;
    let tmp = cdir.join(format!(".step-{step:08}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let host = |f: &dyn Fn(&Slot) -> Vec<f32>| -> Vec<(String, HostTensor)> {
        st.slots.iter().map(|s| (s.name.clone(), HostTensor { shape: s.shape.clone(), data: f(s) })).collect()
    };
    let model = host(&|s| s.value.clone());
    let ema = host(&|s| s.ema.clone());
    let mut optim_t = Vec::new();
    for s in st.slots {
        optim_t.push((format!("m.{}", s.name), HostTensor { shape: s.shape.clone(), data: s.mom.m.clone() }));
        optim_t.push((format!("v.{}", s.name), HostTensor { shape: s.shape.clone(), data: s.mom.v.clone() }));
    }
    let mut files = std::collections::BTreeMap::new();
    let ema_bytes = encode_safetensors(&ema)?;
    for (name, bytes) in [
        ("model.safetensors", encode_safetensors(&model)?),
        ("ema.safetensors", ema_bytes.clone()),
        ("optimizer.safetensors", encode_safetensors(&optim_t)?),
    ] {
        files.insert(name.to_string(), sha256_hex(&bytes));
        write_synced(&tmp.join(name), &bytes)?;
    }
    let state = CheckpointState {
        version: 1,
        step,
        adam_steps: st.adam.t,
        data: st.data,
        rng: st.rng.clone(),
        model: run.config.model.clone(),
        train: st.opts.clone(),
        files,
        loss: st.loss,
        elapsed_secs: st.elapsed,
    };
    write_synced(&tmp.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    if let Ok(d) = fs::File::open(&tmp) {
        let _ = d.sync_all();
    }
    let dest = run.checkpoint_dir(step);
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    fs::rename(&tmp, &dest).with_context(|| format!("cannot move the checkpoint into {}", dest.display()))?;
    if let Ok(d) = fs::File::open(&cdir) {
        let _ = d.sync_all();
    }
    crate::io::atomic::write(&run.weights_path(), &ema_bytes)?;
    let all = run.checkpoints()?;
    if all.len() > st.opts.keep {
        for old in &all[..all.len() - st.opts.keep] {
            let _ = fs::remove_dir_all(&old.dir);
        }
    }
    Ok(Checkpoint { step, dir: dest })
}

/// A checkpoint read back and verified.
pub struct LoadedCheckpoint {
    pub state: CheckpointState,
    pub model: Vec<(String, HostTensor)>,
    pub ema: Vec<(String, HostTensor)>,
    pub optimizer: Vec<(String, HostTensor)>,
}

/// Read and verify a checkpoint: every file present, its checksum as recorded, parseable.
pub fn load_checkpoint(c: &Checkpoint) -> Result<LoadedCheckpoint> {
    let d = c.dir.display();
    let text = fs::read_to_string(c.state_path()).with_context(|| format!("checkpoint {d} is incomplete: cannot read state.json"))?;
    let state: CheckpointState =
        serde_json::from_str(&text).with_context(|| format!("checkpoint {d} is corrupted: state.json is not a valid checkpoint state"))?;
    let read = |name: &str| -> Result<Vec<(String, HostTensor)>> {
        let path = c.dir.join(name);
        let bytes = fs::read(&path).with_context(|| format!("checkpoint {d} is incomplete: cannot read {name}"))?;
        let want = state.files.get(name).ok_or_else(|| anyhow!("checkpoint {d} is corrupted: state.json records no checksum for {name}"))?;
        if &sha256_hex(&bytes) != want {
            bail!("checkpoint {d} is corrupted or truncated: {name} does not match the checksum in state.json (delete this checkpoint folder to resume from an earlier one)");
        }
        decode_safetensors(&bytes).with_context(|| format!("checkpoint {d} is corrupted: {name} is not a readable safetensors file"))
    };
    let model = read("model.safetensors")?;
    let ema = read("ema.safetensors")?;
    let optimizer = read("optimizer.safetensors")?;
    Ok(LoadedCheckpoint { state, model, ema, optimizer })
}

fn restore_slots(slots: &mut [Slot], ck: &LoadedCheckpoint, device: &Device) -> Result<()> {
    let index = |v: &Vec<(String, HostTensor)>| v.iter().map(|(n, t)| (n.clone(), t.clone())).collect::<HashMap<_, _>>();
    let (mut model, mut ema, mut opt) = (index(&ck.model), index(&ck.ema), index(&ck.optimizer));
    if model.len() != slots.len() {
        bail!("the checkpoint holds {} tensors but the model has {} parameters", model.len(), slots.len());
    }
    for s in slots.iter_mut() {
        let take = |map: &mut HashMap<String, HostTensor>, key: &str, what: &str| -> Result<Vec<f32>> {
            let t = map.remove(key).ok_or_else(|| anyhow!("the checkpoint's {what} lacks {key}"))?;
            if t.shape != s.shape {
                bail!("the checkpoint's {what} has {key} with shape {:?}, the model wants {:?}", t.shape, s.shape);
            }
            Ok(t.data)
        };
        s.value = take(&mut model, &s.name, "model")?;
        s.ema = take(&mut ema, &s.name, "EMA")?;
        s.mom.m = take(&mut opt, &format!("m.{}", s.name), "optimizer state")?;
        s.mom.v = take(&mut opt, &format!("v.{}", s.name), "optimizer state")?;
        s.var.set(&Tensor::from_slice(&s.value, s.shape.as_slice(), device)?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics and the loss plot

fn rewrite_metrics_up_to(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let mut keep = String::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v.get("step").and_then(Value::as_u64).is_some_and(|s| s <= step) {
                keep.push_str(line);
                keep.push('\n');
            }
        }
    }
    crate::io::atomic::write(path, keep.as_bytes())
}

/// Draw the loss curve (raw points and a moving average) into a PNG.
pub fn plot_loss(metrics: &Path, out: &Path) -> Result<()> {
    let text = fs::read_to_string(metrics).unwrap_or_default();
    let pts: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
        .filter(|p| p.1.is_finite())
        .collect();
    let (w, h) = (800u32, 400u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let (l, r, t, b) = (50.0, 20.0, 20.0, 40.0);
    let axis = image::Rgb([0, 0, 0]);
    for x in l as u32..(w - r as u32) {
        img.put_pixel(x, h - b as u32, axis);
    }
    for y in t as u32..=(h - b as u32) {
        img.put_pixel(l as u32, y, axis);
    }
    if pts.len() >= 2 {
        let win = (pts.len() / 50).max(1);
        let mut smooth = Vec::with_capacity(pts.len());
        let mut acc = 0.0;
        for i in 0..pts.len() {
            acc += pts[i].1;
            if i >= win {
                acc -= pts[i - win].1;
            }
            smooth.push((pts[i].0, acc / (i + 1).min(win) as f64));
        }
        let mut sorted: Vec<f64> = pts.iter().map(|p| p.1).collect();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let lo = sorted[0];
        let hi = sorted[((sorted.len() - 1) as f64 * 0.98) as usize].max(lo + 1e-9);
        let (x0, x1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
        let px = |x: f64| l + (x - x0) / (x1 - x0) * (w as f64 - l - r);
        let py = |y: f64| t + (1.0 - ((y - lo) / (hi - lo)).clamp(0.0, 1.0)) * (h as f64 - t - b);
        for k in 1..4 {
            let y = (t + k as f64 * (h as f64 - t - b) / 4.0) as u32;
            for x in (l as u32 + 1..(w - r as u32)).step_by(3) {
                img.put_pixel(x, y, image::Rgb([210, 210, 210]));
            }
        }
        for p in &pts {
            let (x, y) = (px(p.0) as u32, py(p.1) as u32);
            if x < w && y < h {
                img.put_pixel(x, y, image::Rgb([150, 180, 230]));
            }
        }
        for s in smooth.windows(2) {
            line(&mut img, (px(s[0].0), py(s[0].1)), (px(s[1].0), py(s[1].1)), image::Rgb([20, 60, 170]));
        }
    }
    crate::io::atomic::write_png(out, &image::DynamicImage::ImageRgb8(img))
}

fn line(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), c: image::Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let f = i as f64 / n as f64;
        let (x, y) = (a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1));
        for dy in 0..2 {
            let (xi, yi) = (x as u32, y as u32 + dy);
            if xi < img.width() && yi < img.height() {
                img.put_pixel(xi, yi, c);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The trainer

/// The `train` job: open the data named in the options, then [`train_with`].
pub fn train_job(options: Value, ctx: &JobCtx) -> Result<Value> {
    let args = TrainArgs::from_json(options)?;
    let file = match &args.config {
        Some(p) => read_config_file(p)?,
        None => TrainSettings::default(),
    };
    let settings = args.settings.clone().or(file);
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

/// Train on `data`: a new run in `args.out`, or continue it with `args.resume`.
pub fn train_with(args: &TrainArgs, settings: &TrainSettings, data_dir: &str, data: &dyn TrainData, ctx: &JobCtx) -> Result<Value> {
    let device = Device::Cpu;
    // On resume, the run's own options are the base; the user's must agree with them (except the
    // resumable ones, see RESUMABLE).
    let prior = if args.resume {
        let run = Run::open(&args.out).context("--resume needs an existing run folder as --out")?;
        let saved: TrainOptions = serde_json::from_value(run.config.train.clone())
            .map_err(|_| anyhow!("{} was not made by biflow train; it cannot be resumed", args.out.display()))?;
        check_resume_settings(settings, &run.config, &saved)?;
        Some((run, saved))
    } else {
        None
    };
    let effective = match &prior {
        Some((run, saved)) => {
            let mut base = settings_of(saved, &run.config.model);
            if settings.steps.is_some() || settings.epochs.is_some() {
                base.steps = None;
            }
            settings.clone().or(base)
        }
        None => settings.clone(),
    };
    let limited;
    let data: &dyn TrainData = match effective.limit {
        Some(l) if l > 0 && l < data.len() => {
            limited = Limited { inner: data, limit: l };
            &limited
        }
        _ => data,
    };
    let (mut opts, model_cfg) = resolve(&effective, data, data_dir)?;
    if let Some((_, saved)) = &prior {
        if settings.steps.is_none() && settings.epochs.is_none() {
            opts.epochs = saved.epochs;
        }
    }

    // The run folder: new, or the one being resumed with its checkpoint.
    let (run, resume_from) = if let Some((mut run, saved)) = prior {
        if run.config.model != model_cfg {
            bail!(
                "--resume: the data ({}x{}x{}, {} classes) does not fit the run's model ({}x{}x{}, {} classes)",
                model_cfg.in_channels, model_cfg.img_size, model_cfg.img_size, model_cfg.num_classes,
                run.config.model.in_channels, run.config.model.img_size, run.config.model.img_size, run.config.model.num_classes
            );
        }
        run.sweep_temporaries()?;
        let Some(ck) = run.latest_checkpoint()? else {
            bail!("--resume: {} has no checkpoint to resume from", run.dir.display());
        };
        let loaded = load_checkpoint(&ck)?;
        if loaded.state.model != model_cfg {
            bail!("checkpoint {} was written for another model than the run's config.json", ck.dir.display());
        }
        if opts != saved {
            run.config.train = serde_json::to_value(&opts)?;
            run.write_config()?;
        }
        (run, Some((ck, loaded)))
    } else {
        let mut cfg = RunConfig::tarflow(model_cfg.clone());
        cfg.noise_std = opts.noise_std;
        cfg.dequantize = opts.dequantize;
        cfg.train = serde_json::to_value(&opts)?;
        cfg.source = json!({"kind": "train", "data": data_dir});
        (Run::create(&args.out, cfg)?, None)
    };

    let (model, mut slots) = build_model(&model_cfg, opts.seed, &device)?;
    let mut adam = AdamW::new(AdamWConfig { beta1: opts.beta1, beta2: opts.beta2, eps: 1e-8, weight_decay: opts.weight_decay });
    let mut loader = Loader { seed: opts.seed, n: data.len(), batch: opts.batch_size, pos: DataPos { epoch: 0, offset: 0 }, order: Vec::new(), order_epoch: None };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(1);
    let mut step = 0u64;
    let mut elapsed_before = 0.0;
    let mut last_loss = None;
    if let Some((ck, loaded)) = &resume_from {
        restore_slots(&mut slots, loaded, &device).with_context(|| format!("cannot resume from {}", ck.dir.display()))?;
        adam.t = loaded.state.adam_steps;
        loader.pos = loaded.state.data;
        rng = rng_restore(&loaded.state.rng)?;
        step = loaded.state.step;
        elapsed_before = loaded.state.elapsed_secs;
        last_loss = loaded.state.loss;
        rewrite_metrics_up_to(&run.metrics_path(), step)?;
        ctx.message(format!("resuming {} from step {step}", run.dir.display()));
    }
    if step >= opts.steps {
        bail!("the run is already at step {step} of {}; pass a larger --steps to train further", opts.steps);
    }

    let mut metrics_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics_path())
        .with_context(|| format!("cannot open {}", run.metrics_path().display()))?;

    let (c, hgt, wid) = data.shape();
    let per_image = c * hgt * wid;
    let total = opts.steps;
    let start_step = step;
    let started = Instant::now();
    let mut last_saved = resume_from.as_ref().map(|(c, _)| c.step);
    let mut last_ckpt: Option<Checkpoint> = resume_from.as_ref().map(|(c, _)| c.clone());
    let mut last_report = Instant::now() - std::time::Duration::from_secs(1);
    let mut last_bpd = None;
    let mut rate_ema: Option<f64> = None;
    let mut last_step_time = Instant::now();
    // Where the time goes (seconds, this session): batch assembly, loss and gradients, optimiser, checkpoints.
    let mut phase = [0f64; 4];
    // On the CPU the gradient is computed by hand (nll_grad), elsewhere by candle's autograd.
    let mut engine = if device.is_cpu() {
        let names: Vec<String> = slots.iter().map(|s| s.name.clone()).collect();
        let sizes: Vec<usize> = slots.iter().map(|s| s.value.len()).collect();
        Some(NllGrad::new(&model_cfg, &names, &sizes)?)
    } else {
        None
    };

    ctx.start("train", Some(total - start_step));
    macro_rules! snapshot {
        ($step:expr) => {
            TrainState {
                run: &run,
                opts: &opts,
                slots: &slots,
                adam: &adam,
                data: loader.pos,
                rng: rng_state(opts.seed, &rng),
                loss: last_loss,
                elapsed: elapsed_before + started.elapsed().as_secs_f64(),
            }
        };
    }

    while step < total {
        if ctx.is_cancelled() {
            ctx.end();
            if last_saved != Some(step) {
                let ck = save_checkpoint(step, &snapshot!(step))?;
                ctx.message(format!("interrupted at step {step}: checkpoint written to {}", ck.dir.display()));
            } else if let Some(ck) = &last_ckpt {
                ctx.message(format!("interrupted at step {step}: the latest checkpoint is {}", ck.dir.display()));
            }
            let _ = plot_loss(&run.metrics_path(), &run.loss_png_path());
            return Err(Cancelled.into());
        }

        // The batch: data order, augmentation noise and label drops all from seeded host RNGs.
        let t0 = Instant::now();
        let idx = loader.next_indices();
        let (mut xs, mut ys) = data.batch(&idx)?;
        if xs.len() != per_image * idx.len() {
            bail!("the dataset returned {} values for {} images of {c}x{hgt}x{wid}", xs.len(), idx.len());
        }
        if opts.dequantize {
            for v in xs.iter_mut() {
                let k = ((*v + 1.0) * 127.5).round().clamp(0.0, 255.0);
                *v = (k + rng.gen::<f32>()) / 128.0 - 1.0;
            }
        } else if let Some(sd) = opts.noise_std {
            let sd = sd as f32;
            for v in xs.iter_mut() {
                *v += sd * rng.sample::<f32, _>(rand_distr::StandardNormal);
            }
        }
        let labels = if model_cfg.num_classes > 0 {
            for y in ys.iter_mut() {
                if opts.drop_label > 0.0 && rng.gen::<f64>() < opts.drop_label {
                    *y = -1;
                }
            }
            Some(Tensor::from_vec(ys, idx.len(), &device)?)
        } else {
            None
        };
        let x = Tensor::from_vec(xs, (idx.len(), c, hgt, wid), &device)?;

        let t1 = Instant::now();
        let (loss_v, bpd_v, host_grads) = loss_and_gradients(&model, engine.as_mut(), &slots, &x, labels.as_ref())?;
        let loss_v = if args.debug_nan_at_step == Some(step + 1) { f64::NAN } else { loss_v };
        if !loss_v.is_finite() {
            ctx.end();
            return Err(non_finite_stop("loss", loss_v, step + 1, last_ckpt.as_ref()));
        }
        let t2 = Instant::now();
        let gnorm = optim::global_norm(host_grads.iter().map(|g| g.as_slice()));
        if !gnorm.is_finite() {
            ctx.end();
            return Err(non_finite_stop("gradient norm", gnorm, step + 1, last_ckpt.as_ref()));
        }
        step += 1;
        let lr = optim::lr_at(step, total, opts.warmup, opts.lr, opts.min_lr);
        let scale = optim::clip_scale(gnorm, opts.grad_clip);
        adam.begin_step();
        let ema_d = optim::ema_decay_at(step, opts.ema_decay);
        for (s, g) in slots.iter_mut().zip(&host_grads) {
            adam.update(&mut s.value, g, &mut s.mom, lr, scale, s.decay);
            optim::ema_update(&mut s.ema, &s.value, ema_d);
            if engine.is_none() {
                // The autograd path reads the weights from the model's variables.
                s.var.set(&Tensor::from_slice(&s.value, s.shape.as_slice(), &device)?)?;
            }
        }
        last_loss = Some(loss_v);
        last_bpd = Some(bpd_v);
        let t3 = Instant::now();
        phase[0] += (t1 - t0).as_secs_f64();
        phase[1] += (t2 - t1).as_secs_f64();
        phase[2] += (t3 - t2).as_secs_f64();

        let now = Instant::now();
        let dt = now.duration_since(last_step_time).as_secs_f64().max(1e-9);
        last_step_time = now;
        rate_ema = Some(match rate_ema {
            None => 1.0 / dt,
            Some(r) => 0.9 * r + 0.1 / dt,
        });
        let line = json!({"step": step, "loss": loss_v, "bpd": bpd_v, "lr": lr, "gradNorm": gnorm,
            "epoch": loader.pos.epoch, "time": elapsed_before + started.elapsed().as_secs_f64()});
        writeln!(metrics_file, "{line}").context("cannot append to metrics.jsonl")?;

        if step % opts.save_every == 0 || step == total {
            let tc = Instant::now();
            last_ckpt = Some(save_checkpoint(step, &snapshot!(step))?);
            last_saved = Some(step);
            phase[3] += tc.elapsed().as_secs_f64();
        }
        if step - start_step <= 20 || now.duration_since(last_report).as_secs_f64() >= 0.1 || step == total {
            last_report = now;
            let sps = (step - start_step) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let eta = (total - step) as f64 / sps.max(1e-9);
            ctx.progress(
                step - start_step,
                Some(total - start_step),
                crate::metrics!["step" => step, "loss" => loss_v, "bpd" => bpd_v, "lr" => lr, "gradNorm" => gnorm,
                    "stepsPerSec" => sps, "imagesPerSec" => sps * opts.batch_size as f64, "etaSecs" => eta.round()],
            );
        }
    }
    ctx.end();
    plot_loss(&run.metrics_path(), &run.loss_png_path())?;
    let secs = started.elapsed().as_secs_f64();
    let sps = (step - start_step) as f64 / secs.max(1e-9);
    Ok(json!({
        "run": run.dir,
        "steps": step,
        "resumedFrom": resume_from.as_ref().map(|(c, _)| c.step),
        "loss": last_loss,
        "bpd": last_bpd,
        "lastCheckpoint": last_ckpt.as_ref().map(|c| c.dir.clone()),
        "weights": run.weights_path(),
        "metrics": run.metrics_path(),
        "lossPlot": run.loss_png_path(),
        "stepsPerSec": sps,
        "imagesPerSec": sps * opts.batch_size as f64,
        "seconds": secs,
        "parameters": slots.iter().map(|s| s.value.len()).sum::<usize>(),
        "phaseSeconds": {"data": phase[0], "lossAndGradients": phase[1], "optimizer": phase[2], "checkpoints": phase[3]},
    }))
}
