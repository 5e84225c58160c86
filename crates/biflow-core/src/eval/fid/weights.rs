//! Where the FID Inception weights come from, and how they are read.
//!
//! Accepted files: the published `pt_inception-2015-12-05-6726825d.pth` (PyTorch LEGACY serialisation), any
//! zip-format `.pth` state_dict with the same tensor names, or a `.safetensors` file (as written by
//! `biflow fid convert-weights`). Lookup order: the explicit path, then `$BIFLOW_INCEPTION_WEIGHTS`, then
//! the cache file `~/.cache/biflow/pt_inception-2015-12-05-6726825d.pth` (`$XDG_CACHE_HOME/biflow/...` when
//! set), then the same name with `.safetensors`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::inception::{tensor_specs, FeatureNet, FidInception};
use super::net::DeviceInception;
use crate::io::tensors::{write_safetensors, HostTensor};

pub const PUBLISHED_NAME: &str = "pt_inception-2015-12-05-6726825d.pth";
pub const PUBLISHED_URL: &str =
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";
pub const PUBLISHED_SHA256_PREFIX: &str = "6726825d";
pub const ENV_VAR: &str = "BIFLOW_INCEPTION_WEIGHTS";

/// The cache directory: `$XDG_CACHE_HOME/biflow` or `~/.cache/biflow`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("biflow"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache").join("biflow"))
}

/// The weights file to use: `explicit`, else the environment variable, else the cache.
pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        ensure!(p.is_file(), "the Inception weights file {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(v) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        ensure!(p.is_file(), "${ENV_VAR} points to {}, which does not exist", p.display());
        return Ok(p);
    }
    let cache = cache_dir();
    if let Some(dir) = &cache {
        for name in [PUBLISHED_NAME.to_string(), PUBLISHED_NAME.replace(".pth", ".safetensors")] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let where_ = cache.map(|d| d.join(PUBLISHED_NAME).display().to_string()).unwrap_or_else(|| format!("~/.cache/biflow/{PUBLISHED_NAME}"));
    bail!(
        "no FID Inception weights: pass --inception-weights PATH, set ${ENV_VAR}, or place the file at {where_}. \
         The weights are pytorch-fid's published file {PUBLISHED_NAME} (SHA-256 starting {PUBLISHED_SHA256_PREFIX}), \
         from {PUBLISHED_URL}"
    )
}

fn sha256_hex(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Read named f32 tensors from a `.pth` (zip or legacy) or `.safetensors` file.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    if path.file_name().and_then(|n| n.to_str()) == Some(PUBLISHED_NAME) {
        let h = sha256_hex(path)?;
        ensure!(
            h.starts_with(PUBLISHED_SHA256_PREFIX),
            "{} is named like the published FID weights but its SHA-256 is {h}, not {PUBLISHED_SHA256_PREFIX}...: \
             the file is corrupt or incomplete; download it again from {PUBLISHED_URL}",
            path.display()
        );
    }
    crate::io::tensors::read_weights(path).with_context(|| format!("cannot load the Inception weights {}", path.display()))
}

/// Load the network from a weights file.
pub fn load(path: &Path) -> Result<FidInception> {
    let t = read_tensors(path)?;
    FidInception::from_tensors(t).with_context(|| format!("{} does not hold the FID Inception weights", path.display()))
}

/// Load the network from a weights file to run on `device`: the hand-written [`FidInception`] on the CPU,
/// the candle [`DeviceInception`] elsewhere.
pub fn load_net(path: &Path, device: &Device) -> Result<Box<dyn FeatureNet>> {
    if device.is_cpu() {
        return Ok(Box::new(load(path)?));
    }
    let t = read_tensors(path)?;
    let net = DeviceInception::from_tensors(t, device)
        .with_context(|| format!("{} does not hold the FID Inception weights, or they do not fit on {device:?}", path.display()))?;
    Ok(Box::new(net))
}

/// Convert a weights file to `.safetensors` (float32, the original tensor names, `num_batches_tracked` and
/// other extras dropped). Returns the number of tensors written.
pub fn convert(input: &Path, output: &Path) -> Result<usize> {
    let tensors = read_tensors(input)?;
    let specs = tensor_specs();
    let mut by_name: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, d)| (n.strip_prefix("module.").map(str::to_string).unwrap_or(n), (s, d))).collect();
    let mut kept = Vec::new();
    for (name, shape) in &specs {
        let Some((s, d)) = by_name.remove(name) else {
            bail!("{} has no tensor '{name}': not the FID Inception weights", input.display());
        };
        ensure!(&s == shape, "tensor '{name}' has shape {s:?}, expected {shape:?}");
        kept.push((name.clone(), HostTensor { shape: s, data: d }));
    }
    write_safetensors(output, &kept).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(kept.len())
}

/// The formula weights of the parity fixture (../shared/fixtures/fid-reference/README.md): deterministic
/// stand-ins for the published weights, used by the tests and the benchmark.
pub fn formula_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    tensor_specs()
        .into_par_iter()
        .map(|(name, shape)| {
            let data = formula_values(&name, &shape);
            (name, shape, data)
        })
        .collect()
}

/// The values of one formula tensor.
pub fn formula_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    crate::io::formula::uniform("biflow-fid-fixture/", name, numel)
        .map(|u| {
            let v = if name.ends_with("conv.weight") {
                let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
                (2.0 * u - 1.0) * (6.0 / fan_in).sqrt()
            } else if name.ends_with("bn.weight") {
                1.0 + 0.2 * (2.0 * u - 1.0)
            } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") {
                0.02 * (2.0 * u - 1.0)
            } else if name.ends_with("bn.running_var") {
                1.0 + 0.5 * u
            } else {
                0.02 * (2.0 * u - 1.0)
            };
            v as f32
        })
        .collect()
}
