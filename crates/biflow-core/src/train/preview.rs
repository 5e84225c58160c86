//! `--sample-every N`: a grid of samples every N steps, RUN/samples/step-N.png, drawn with the EMA
//! weights from the same noise and labels every time (so grids compare across steps). The noise
//! comes from its own seeded RNG: previews never change the training trajectory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::Slot;

/// Images in a preview grid.
pub const PREVIEW_COUNT: usize = 16;
const PREVIEW_SEED: u64 = 0x5eed;

pub const SAMPLES_DIR: &str = "samples";

/// The preview's fixed noise (N, T, D) and labels (classes 0..K cycled; None when unconditional).
pub fn preview_noise(n: usize, t: usize, d: usize, classes: usize, device: &Device) -> Result<(Tensor, Option<Tensor>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(PREVIEW_SEED);
    let z: Vec<f32> = (0..n * t * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let z = Tensor::from_vec(z, (n, t, d), device)?;
    let y = (classes > 0).then(|| Tensor::from_vec((0..n as i64).map(|i| i % classes as i64).collect::<Vec<_>>(), n, device)).transpose()?;
    Ok((z, y))
}

/// A VarBuilder over the slots' EMA weights (what sampling uses).
pub fn ema_varbuilder(slots: &[Slot], device: &Device) -> Result<VarBuilder<'static>> {
    let mut map = HashMap::new();
    for s in slots {
        map.insert(s.name.clone(), Tensor::from_slice(&s.ema, s.shape.as_slice(), device)?);
    }
    Ok(VarBuilder::from_tensors(map, DType::F32, device))
}

/// The grid file of `step`.
pub fn preview_path(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(SAMPLES_DIR).join(format!("step-{step}.png"))
}

/// Write the images (N, C, H, W) as the grid of `step`.
pub fn write_preview(run_dir: &Path, step: u64, images: &Tensor) -> Result<PathBuf> {
    let (n, c, h, w) = images.dims4()?;
    let v = images.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let img = crate::io::image::grid(&v, n, c, h, w)?;
    std::fs::create_dir_all(run_dir.join(SAMPLES_DIR))?;
    let path = preview_path(run_dir, step);
    crate::io::atomic::write_png(&path, &img)?;
    Ok(path)
}
