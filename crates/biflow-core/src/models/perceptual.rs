//! BiFlow's perceptual terms (paper §4): G's clean output and the image, both as F's patch tokens,
//! compared as images by frozen networks (LPIPS, ConvNeXt-V2 features); the gradient reaches G
//! through them. As in the authors' code, both images of a pair are first given the same random
//! resized crop (torchvision's RandomResizedCrop: area U(0.08, 1) of the image, aspect ratio
//! log-uniform in [3/4, 4/3], bicubic with antialias) to the networks' size, 224.
//!
//! In a latent run the tokens are VAE latents: both are decoded to images first, and the gradient
//! reaches G through the decoder too, as in the paper.
//!
//! The crop and resize is linear in the image, so it is two matrix products per image:
//! `R_y X R_x^T`, with R's rows torch's antialiased bicubic weights over the crop's pixels.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::models::convnext::ConvNextV2;
use crate::models::flow::{unpatchify, FlowConfig};
use crate::models::lpips::Lpips;
use crate::models::reverse::loss::{PerceptualTerms, WeightedDistance};
use crate::models::vae::Vae;

/// A distance between image pairs (N, C, H, W) in [-1, 1], (N), differentiable in both images.
pub trait ImageDistance {
    fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Tensor>;
}

impl ImageDistance for Lpips {
    fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        Lpips::distance(self, x0, x1)
    }
}

impl ImageDistance for ConvNextV2 {
    fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        ConvNextV2::distance(self, x0, x1)
    }
}

/// What the pairs go through before the networks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Crop {
    /// The same random resized crop for both images of a pair, a new one per pair and step.
    Random,
    /// The whole image (resized when the size differs).
    #[default]
    None,
}

/// torchvision's RandomResizedCrop defaults: the crop's share of the area and its aspect ratio.
const AREA: (f64, f64) = (0.08, 1.0);
const ASPECT: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// A crop box of an image: rows `top..top + height`, columns `left..left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl CropBox {
    fn whole(height: usize, width: usize) -> CropBox {
        CropBox { top: 0, left: 0, height, width }
    }

    /// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area and aspect ratio
    /// that fits, else the central crop of the nearest allowed aspect ratio.
    pub fn random(height: usize, width: usize, rng: &mut impl Rng) -> CropBox {
        let area = (height * width) as f64;
        for _ in 0..10 {
            let target = area * rng.gen_range(AREA.0..AREA.1);
            let aspect = rng.gen_range(ASPECT.0.ln()..ASPECT.1.ln()).exp();
            let w = (target * aspect).sqrt().round() as usize;
            let h = (target / aspect).sqrt().round() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                return CropBox { top: rng.gen_range(0..=height - h), left: rng.gen_range(0..=width - w), height: h, width: w };
            }
        }
        let ratio = width as f64 / height as f64;
        let (h, w) = if ratio < ASPECT.0 {
            ((width as f64 / ASPECT.0).round() as usize, width)
        } else if ratio > ASPECT.1 {
            (height, (height as f64 * ASPECT.1).round() as usize)
        } else {
            (height, width)
        };
        CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
    }
}

/// Pillow's (and torch's antialiased) bicubic filter, a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The (output, full) matrix that takes `start..start + len` of an axis of `full` values to `output`
/// values as torch's `interpolate(mode="bicubic", antialias=True, align_corners=False)`: each output
/// a normalised window of the filter, widened by the scale when shrinking.
pub fn resize_matrix(full: usize, start: usize, len: usize, output: usize) -> Vec<f32> {
    let scale = len as f64 / output as f64;
    let (support, inv) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let mut m = vec![0f32; output * full];
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // torch truncates toward zero here.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(len as i64) as usize;
        let w: Vec<f64> = (lo..hi).map(|j| bicubic((j as f64 - center + 0.5) * inv)).collect();
        let total: f64 = w.iter().sum();
        for (j, w) in (lo..hi).zip(w) {
            m[i * full + start + j] = (if total != 0.0 { w / total } else { w }) as f32;
        }
    }
    m
}

/// One frozen network's term: its name in the logs, its weight in the loss.
struct Term {
    name: String,
    weight: f64,
    net: Box<dyn ImageDistance>,
}

/// The perceptual terms of a distillation, over F's tokens.
pub struct Perceptual {
    terms: Vec<Term>,
    crop: Crop,
    /// The side the networks see; None: the images' own (no resize).
    size: Option<usize>,
    patch: usize,
    /// F's values (channels, side): pixels, or latents that `decoder` turns into images.
    channels: usize,
    side: usize,
    decoder: Option<Vae>,
    /// The side of the images (decoded, in a latent run).
    image: usize,
}

impl Perceptual {
    /// The terms over `flow`'s tokens; `decoder` is a latent run's VAE.
    pub fn new(flow: &FlowConfig, crop: Crop, size: Option<usize>, decoder: Option<Vae>) -> Perceptual {
        let image = flow.img_size * decoder.as_ref().map_or(1, |v| v.config().downsampling());
        Perceptual { terms: Vec::new(), crop, size, patch: flow.patch_size, channels: flow.in_channels, side: flow.img_size, decoder, image }
    }

    pub fn add(&mut self, name: &str, weight: f64, net: Box<dyn ImageDistance>) {
        self.terms.push(Term { name: name.to_string(), weight, net });
    }

    /// The step's view of the pairs: `n` crops drawn from `rng` (with random crops; nothing is drawn
    /// otherwise, so a run without them keeps its random stream).
    pub fn at_step(&self, n: usize, rng: &mut impl Rng, device: &Device) -> Result<PerceptualStep<'_>> {
        let s = self.image;
        let boxes: Vec<CropBox> = match self.crop {
            Crop::Random => (0..n).map(|_| CropBox::random(s, s, rng)).collect(),
            Crop::None => vec![CropBox::whole(s, s); n],
        };
        let out = self.size.unwrap_or(s);
        let resize = if self.crop == Crop::None && out == s {
            None
        } else {
            let rows: Vec<f32> = boxes.iter().flat_map(|b| resize_matrix(s, b.top, b.height, out)).collect();
            let cols: Vec<f32> = boxes.iter().flat_map(|b| resize_matrix(s, b.left, b.width, out)).collect();
            Some((Tensor::from_vec(rows, (n, 1, out, s), device)?, Tensor::from_vec(cols, (n, 1, out, s), device)?.transpose(2, 3)?))
        };
        Ok(PerceptualStep { perceptual: self, resize })
    }
}

/// The perceptual terms with one step's crops.
pub struct PerceptualStep<'a> {
    perceptual: &'a Perceptual,
    /// Per pair, R_y (N, 1, S, H) and R_x^T (N, 1, W, S); None: the images as they are.
    resize: Option<(Tensor, Tensor)>,
}

impl PerceptualStep<'_> {
    /// Tokens (N, T, D) as the networks' images (N, C, S, S), decoded first in a latent run.
    fn images(&self, tokens: &Tensor) -> Result<Tensor> {
        let p = self.perceptual;
        let x = unpatchify(tokens, p.patch, p.channels, p.side)?;
        let x = match &p.decoder {
            Some(vae) => vae.images(&x)?,
            None => x,
        };
        Ok(match &self.resize {
            Some((rows, cols)) => rows.broadcast_matmul(&x.contiguous()?)?.broadcast_matmul(cols)?,
            None => x,
        })
    }
}

impl PerceptualTerms for PerceptualStep<'_> {
    fn distances(&self, predicted: &Tensor, target: &Tensor) -> Result<Vec<WeightedDistance>> {
        let (x0, x1) = (self.images(predicted)?, self.images(target)?);
        ensure!(x0.dims() == x1.dims(), "perceptual terms compare images of one shape");
        self.perceptual
            .terms
            .iter()
            .map(|t| Ok(WeightedDistance { name: t.name.clone(), weight: t.weight, distance: t.net.distance(&x0, &x1)? }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Crops as torchvision draws them: inside the image, area and aspect in range (up to the
    /// rounding to whole pixels), and varied.
    #[test]
    fn random_crops_fit_and_vary() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let boxes: Vec<CropBox> = (0..500).map(|_| CropBox::random(64, 64, &mut rng)).collect();
        for b in &boxes {
            assert!(b.height > 0 && b.width > 0 && b.top + b.height <= 64 && b.left + b.width <= 64, "{b:?}");
            let area = (b.height * b.width) as f64 / 4096.0;
            assert!((0.06..=1.0).contains(&area), "{b:?}");
            let aspect = b.width as f64 / b.height as f64;
            assert!((0.7..=1.45).contains(&aspect), "{b:?}");
        }
        let small = boxes.iter().filter(|b| b.height * b.width < 1024).count();
        assert!(small > 50 && small < 450, "{small} of 500 crops under a quarter of the image");
    }

    /// The crop and resize equal torchvision's resized_crop (torch's antialiased bicubic
    /// interpolation, float64) when enlarging, shrinking, and both (scripts/make-resize-fixtures.py).
    #[test]
    fn crop_and_resize_match_torch() {
        let dev = Device::Cpu;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/perceptual/resize.safetensors");
        let want = crate::io::tensors::load_weights(&path, &dev).unwrap();
        for case in ["enlarge", "shrink", "both"] {
            let x = &want[&format!("{case}.x")];
            let b: Vec<usize> = want[&format!("{case}.box")].to_vec1::<f32>().unwrap().into_iter().map(|v| v as usize).collect();
            let (side, size) = (x.dim(2).unwrap(), b[4]);
            let rows = Tensor::from_vec(resize_matrix(side, b[0], b[2], size), (size, side), &dev).unwrap();
            let cols = Tensor::from_vec(resize_matrix(side, b[1], b[3], size), (size, side), &dev).unwrap();
            let y = rows.broadcast_matmul(x).unwrap().broadcast_matmul(&cols.t().unwrap()).unwrap();
            let err = (y - &want[&format!("{case}.y")]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "{case}: {err}");
        }
    }

    /// Each output of the resize is a weighted mean (rows sum to 1) of the crop's pixels only.
    #[test]
    fn resize_rows_are_normalised_windows_of_the_crop() {
        for (full, start, len, out) in [(28, 3, 17, 224), (64, 0, 64, 24), (32, 10, 5, 5)] {
            let m = resize_matrix(full, start, len, out);
            for row in m.chunks(full) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{sum}");
                assert!(row.iter().enumerate().all(|(j, &w)| w == 0.0 || (start..start + len).contains(&j)));
            }
        }
        // The identity when nothing changes.
        let m = resize_matrix(8, 0, 8, 8);
        for i in 0..8 {
            assert!((m[i * 8 + i] - 1.0).abs() < 1e-6);
        }
    }
}
