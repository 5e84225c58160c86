//! The run directory: everything a trained (or imported) forward flow leaves on disk.
//!
//! ```text
//! RUN/config.json          {"version":1,"kind":"tarflow","model":FlowConfig,"noiseStd":0.05|null,
//!                           "dequantize":bool,"train":{...training options...},"source":...}
//! RUN/weights.safetensors  the weights to sample/evaluate with (EMA weights after training; imported weights)
//! RUN/checkpoints/step-00000100/{model.safetensors,ema.safetensors,optimizer.safetensors,state.json}
//! RUN/metrics.jsonl, RUN/loss.png
//! ```
//!
//! A checkpoint folder is written under a temporary name and renamed into place once every file in it
//! is on disk, so a folder named `step-NNNNNNNN` is always complete; temporaries left by a killed
//! process are ignored and swept.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::LatentInfo;
use crate::models::flow::{FlowConfig, TarFlow};
use crate::models::vae::Vae;
use crate::models::reverse::{ReverseConfig, ReverseModel};
use crate::io::atomic;
pub use crate::io::tensors::{decode_safetensors, encode_safetensors, read_safetensors, write_safetensors, HostTensor};

pub const RUN_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PNG: &str = "loss.png";

/// RUN/config.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunConfig {
    pub version: u32,
    /// "tarflow" for a forward flow run.
    pub kind: String,
    pub model: FlowConfig,
    /// The Gaussian noise level the model was trained with (None: unknown or not noise-trained).
    #[serde(default)]
    pub noise_std: Option<f64>,
    /// Trained with uniform dequantisation.
    #[serde(default)]
    pub dequantize: bool,
    /// Every training option, as the trainer resolved them (null for imported runs).
    #[serde(default)]
    pub train: Value,
    /// Where the weights came from (e.g. the imported checkpoint), free-form.
    #[serde(default)]
    pub source: Value,
    /// A distilled run ("biflow"): the forward run G was distilled from, and G itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseConfig>,
    /// A run on VAE latents: how its data was encoded (the dataset manifest's `latent`), so its
    /// samples can be decoded to images by that VAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentInfo>,
}

/// Where a distilled run's forward model F lives, and the checksum of the weights G learned from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ForwardRef {
    /// The forward run's folder: absolute, or relative to the distilled run's own folder.
    pub dir: String,
    pub weights_sha256: String,
}

impl RunConfig {
    pub fn tarflow(model: FlowConfig) -> RunConfig {
        RunConfig {
            version: RUN_VERSION,
            kind: "tarflow".into(),
            model,
            noise_std: None,
            dequantize: false,
            train: Value::Null,
            source: Value::Null,
            forward: None,
            reverse: None,
            latent: None,
        }
    }

    /// A distilled run: G over the tokens of the forward model `model`, which lives in `forward`.
    pub fn biflow(model: FlowConfig, reverse: ReverseConfig, forward: ForwardRef) -> RunConfig {
        RunConfig { kind: "biflow".into(), forward: Some(forward), reverse: Some(reverse), ..RunConfig::tarflow(model) }
    }
}

/// One complete checkpoint folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

impl Checkpoint {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn ema_path(&self) -> PathBuf {
        self.dir.join("ema.safetensors")
    }
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join("optimizer.safetensors")
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

pub struct Run {
    pub dir: PathBuf,
    pub config: RunConfig,
}

impl Run {
    /// Create a new run folder (it may exist but must not already hold a run) and write its config.
    pub fn create(dir: &Path, config: RunConfig) -> Result<Run> {
        if dir.join(CONFIG_FILE).exists() {
            bail!("{} already holds a biflow run; choose another folder (or --resume it)", dir.display());
        }
        fs::create_dir_all(dir.join(CHECKPOINTS_DIR)).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
        let run = Run { dir: dir.to_path_buf(), config };
        run.write_config()?;
        Ok(run)
    }

    /// Open an existing run; a clear error when `dir` is not a biflow run or its config is unreadable.
    pub fn open(dir: &Path) -> Result<Run> {
        if !dir.is_dir() {
            bail!("{} is not a folder (expected a biflow run folder)", dir.display());
        }
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            bail!("{} is not a biflow run: it has no {CONFIG_FILE}", dir.display());
        }
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let version = raw.get("version").and_then(Value::as_u64);
        if version != Some(RUN_VERSION as u64) {
            bail!("{} has run format version {:?}; this biflow reads version {RUN_VERSION}", path.display(), version);
        }
        let config: RunConfig =
            serde_json::from_value(raw).with_context(|| format!("{} is not a valid biflow run config", path.display()))?;
        match (config.kind.as_str(), &config.forward, &config.reverse) {
            ("tarflow", _, _) | ("biflow", Some(_), Some(_)) => {}
            ("biflow", _, _) => bail!("{} is a distilled run without its forward run or reverse model description", path.display()),
            (kind, _, _) => bail!("{} holds a '{kind}' run; biflow knows 'tarflow' and 'biflow' runs", dir.display()),
        }
        let m = &config.model;
        if m.patch_size == 0 || m.img_size % m.patch_size != 0 || m.num_blocks == 0 || m.channels == 0 || m.in_channels == 0 {
            bail!("{} describes an impossible model: {:?}", path.display(), m);
        }
        Ok(Run { dir: dir.to_path_buf(), config })
    }

    pub fn write_config(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.config)?;
        atomic::write(&self.config_path(), format!("{text}\n").as_bytes())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join(CHECKPOINTS_DIR)
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }
    pub fn loss_png_path(&self) -> PathBuf {
        self.dir.join(LOSS_PNG)
    }
    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.checkpoints_dir().join(format!("step-{step:08}"))
    }

    /// The complete checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let dir = self.checkpoints_dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
                if entry.path().is_dir() {
                    out.push(Checkpoint { step, dir: entry.path() });
                }
            }
        }
        out.sort_by_key(|c| c.step);
        Ok(out)
    }

    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Remove temporaries that a killed process left in the checkpoints folder.
    pub fn sweep_temporaries(&self) -> Result<()> {
        let dir = self.checkpoints_dir();
        if !dir.is_dir() {
            return Ok(());
        }
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    /// The file holding the run's sampling weights: weights.safetensors, else the latest checkpoint's EMA.
    pub fn sampling_weights_path(&self) -> Result<PathBuf> {
        let w = self.weights_path();
        if w.is_file() {
            return Ok(w);
        }
        match self.latest_checkpoint()? {
            Some(c) if c.ema_path().is_file() => Ok(c.ema_path()),
            _ => bail!("{} has no weights yet (no {WEIGHTS_FILE} and no checkpoint)", self.dir.display()),
        }
    }

    /// Whether this run holds a distilled reverse model G.
    pub fn is_distilled(&self) -> bool {
        self.config.reverse.is_some()
    }

    /// The forward run a distilled run was made from, checked to be the same F (weights checksum).
    pub fn forward_run(&self) -> Result<Run> {
        let Some(fr) = &self.config.forward else { bail!("{} is not a distilled run", self.dir.display()) };
        // A relative location is inside the distilled run (an imported bundle carries its F along).
        let dir = self.dir.join(&fr.dir);
        let f = Run::open(&dir).with_context(|| {
            format!("the forward run of {} ({}) cannot be opened: was it moved or deleted?", self.dir.display(), fr.dir)
        })?;
        let path = f.sampling_weights_path()?;
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if crate::io::sha256_hex(&bytes) != fr.weights_sha256 {
            bail!(
                "the forward run {} changed since {} was distilled from it (its weights' checksum differs): distill again, or restore that F",
                fr.dir,
                self.dir.display()
            );
        }
        Ok(f)
    }

    /// The forward flow F: this run's own, or for a distilled run the (verified) one it was made from.
    pub fn load_flow(&self, device: &Device) -> Result<TarFlow> {
        if self.is_distilled() {
            return self.forward_run()?.load_flow(device);
        }
        let path = self.sampling_weights_path()?;
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .with_context(|| format!("{} is not a readable safetensors file (truncated or corrupted?)", path.display()))?;
        TarFlow::new(vb, &self.config.model).with_context(|| {
            format!("the weights in {} do not fit the model described in {}", path.display(), self.config_path().display())
        })
    }

    /// A latent run's VAE (at `at` when given, else where the run records it, checked by checksum);
    /// None for a run on pixels. `fix` tells the user what to do when it is missing or another.
    pub fn load_vae(&self, at: Option<&Path>, fix: &str, device: &Device) -> Result<Option<Vae>> {
        self.vae_dir(at, fix)?.map(|dir| Vae::load(&dir, device)).transpose()
    }

    /// The folder of a latent run's VAE, checked as [`Self::load_vae`] checks it, without loading it.
    pub fn vae_dir(&self, at: Option<&Path>, fix: &str) -> Result<Option<PathBuf>> {
        let Some(info) = &self.config.latent else {
            ensure!(at.is_none(), "{} is a run on pixels: --vae applies to runs on VAE latents only", self.dir.display());
            return Ok(None);
        };
        // A relative recorded folder (a bundle's) is inside the run.
        let info = LatentInfo { vae: self.dir.join(&info.vae).display().to_string(), ..info.clone() };
        crate::data::latent::checked_vae_dir(&info, at, &format!("the run {}", self.dir.display()), fix).map(Some)
    }

    /// The distilled reverse model G (EMA weights).
    pub fn load_reverse(&self, device: &Device) -> Result<ReverseModel> {
        let Some(cfg) = &self.config.reverse else {
            bail!("{} is a forward run without a reverse model: distill one with `biflow distill --forward {}`", self.dir.display(), self.dir.display())
        };
        let path = self.sampling_weights_path()?;
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .with_context(|| format!("{} is not a readable safetensors file (truncated or corrupted?)", path.display()))?;
        ReverseModel::new(vb, cfg).with_context(|| format!("the weights in {} do not fit the reverse model of {}", path.display(), self.config_path().display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FlowConfig {
        FlowConfig {
            img_size: 8,
            in_channels: 1,
            patch_size: 4,
            channels: 16,
            num_blocks: 2,
            layers_per_block: 1,
            num_classes: 0,
            clip_scale: None,
        }
    }

    #[test]
    fn create_open_round_trip_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join("run");
        let run = Run::create(&rd, RunConfig::tarflow(cfg())).unwrap();
        let again = Run::open(&rd).unwrap();
        assert_eq!(again.config, run.config);
        assert!(Run::create(&rd, RunConfig::tarflow(cfg())).is_err());
        let e = Run::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("not a biflow run"), "{e}");
        fs::write(rd.join(CONFIG_FILE), "{\"version\":1,\"kind\":\"tarflow\"}").unwrap();
        let e = format!("{:#}", Run::open(&rd).err().unwrap());
        assert!(e.contains("not a valid biflow run config"), "{e}");
        let e = format!("{:#}", run.load_flow(&Device::Cpu).err().unwrap());
        assert!(e.contains("no weights yet"), "{e}");
    }

    #[test]
    fn safetensors_round_trip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = HostTensor { shape: vec![2, 3], data: vec![1., 2., 3., 4., 5., f32::MIN_POSITIVE] };
        write_safetensors(&p, &[("w".into(), t.clone())]).unwrap();
        let back = read_safetensors(&p).unwrap();
        assert_eq!(back, vec![("w".to_string(), t)]);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!("{:#}", read_safetensors(&p).err().unwrap());
        assert!(e.contains("truncated or corrupted"), "{e}");
    }
}
