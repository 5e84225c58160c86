//! TEMPORARY minimal reader of a run directory (RUN/config.json + weights), written against the
//! shared contract until `run.rs` (branch `flow-train`) is merged; then replaced by `run::Run`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::flow::{FlowConfig, TarFlow};

pub struct RunStub {
    pub dir: PathBuf,
    pub model: FlowConfig,
    pub noise_std: Option<f64>,
}

pub fn open(dir: &Path) -> Result<RunStub> {
    let cfg_path = dir.join("config.json");
    ensure!(dir.is_dir(), "{} is not a folder (expected a biflow run)", dir.display());
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{} is not a biflow run: it has no config.json", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let model: FlowConfig = serde_json::from_value(v.get("model").cloned().unwrap_or_default())
        .with_context(|| format!("{} has no valid \"model\" section", cfg_path.display()))?;
    model.validate()?;
    Ok(RunStub { dir: dir.to_path_buf(), model, noise_std: v.get("noiseStd").and_then(|s| s.as_f64()) })
}

impl RunStub {
    pub fn load_flow(&self, device: &Device) -> Result<TarFlow> {
        let w = self.dir.join("weights.safetensors");
        ensure!(w.exists(), "{} has no weights.safetensors", self.dir.display());
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&w], DType::F32, device) }
            .with_context(|| format!("cannot read {}", w.display()))?;
        TarFlow::new(vb, &self.model).with_context(|| format!("the weights in {} do not fit its config", w.display()))
    }
}
