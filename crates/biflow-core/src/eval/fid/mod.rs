//! FID: the pytorch-fid Inception-v3 network (inception.rs on the CPU, net.rs on any candle device),
//! streaming activation statistics (stats.rs), the Frechet distance (frechet.rs), the weights file
//! (weights.rs), image sources (source.rs) and the `fid.eval` / `fid.convertWeights` jobs (eval.rs).

pub mod eval;
pub mod frechet;
pub mod inception;
pub mod net;
pub mod preprocess;
pub mod source;
pub mod stats;
pub mod weights;

use std::path::Path;

use anyhow::{ensure, Result};

pub use frechet::{frechet_distance, Gaussian};
pub use inception::FidInception;
use preprocess::Image;
use source::ImageSource;

use crate::data::{Dataset, Split};

/// The images of one split of a prepared dataset directory (`biflow data prepare`); a latent
/// dataset's are its VAE's decodings (FID is scored on images).
pub struct DatasetSource {
    dir: String,
    ds: Dataset,
    split: Split,
    pos: usize,
    vae: Option<crate::models::vae::Vae>,
}

impl ImageSource for DatasetSource {
    fn describe(&self) -> String {
        format!("dataset {} ({:?} split)", self.dir, self.split)
    }
    fn len(&self) -> Option<usize> {
        Some(self.ds.len(self.split))
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>> {
        let n = self.ds.len(self.split);
        if self.pos >= n {
            return Ok(None);
        }
        let end = (self.pos + max).min(n);
        if let Some(vae) = &self.vae {
            let (x, _) = self.ds.batch_f32(self.split, &(self.pos..end).collect::<Vec<_>>())?;
            let (c, h, w) = self.ds.shape();
            let latents = candle_core::Tensor::from_vec(x, (end - self.pos, c, h, w), &candle_core::Device::Cpu)?;
            self.pos = end;
            return source::images_of(&vae.images(&latents)?).map(Some);
        }
        let (c, h, w) = self.ds.shape();
        let mut out = Vec::with_capacity(end - self.pos);
        for i in self.pos..end {
            let (px, _) = self.ds.get(self.split, i)?;
            let mut data = vec![0f32; h * w * 3];
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3 {
                        let sc = if c == 1 { 0 } else { ch };
                        data[(y * w + x) * 3 + ch] = px[(sc * h + y) * w + x] as f32 / 255.0;
                    }
                }
            }
            out.push(Image { h, w, data });
        }
        self.pos = end;
        Ok(Some(out))
    }
}

/// Open a prepared dataset directory as an image source.
pub fn dataset_source(dir: &Path, split: Option<&str>) -> Result<Box<dyn ImageSource>> {
    let split = match split {
        Some("val") => Split::Val,
        _ => Split::Train,
    };
    let ds = Dataset::open(dir)?;
    let vae = ds.is_latent().then(|| crate::data::latent::dataset_vae(&ds, &candle_core::Device::Cpu)).transpose()?;
    let c = vae.as_ref().map_or(ds.shape().0, |v| v.config().out_channels);
    ensure!(c == 1 || c == 3, "dataset {} has {c} channels; FID needs grey or RGB images", dir.display());
    ensure!(ds.len(split) > 0, "the {split:?} split of dataset {} is empty", dir.display());
    Ok(Box::new(DatasetSource { dir: dir.display().to_string(), ds, split, pos: 0, vae }))
}
