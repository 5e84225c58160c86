//! ConvNeXt-V2 image features (Woo et al. 2023), as transformers' `ConvNextV2Model` computes its
//! `pooler_output`: a patchifying stem, four stages of blocks (7x7 depthwise convolution, LayerNorm,
//! MLP with Global Response Normalisation, residual), each stage after the first opened by a
//! LayerNorm and a 2x2 stride-2 convolution; the last stage averaged over space and normalised. The
//! perceptual distance of BiFlow (paper §4, after its authors' code) is the squared L2 distance of
//! these features, for images in [-1, 1] normalised with ImageNet's mean and std.
//!
//! Weights in the hub's layout (`facebook/convnextv2-*`): a folder with config.json (depths,
//! hidden_sizes: Tiny to Huge load) and model.safetensors, tensors under the model's names, with or
//! without the `convnextv2.` prefix of the classification checkpoints (their classifier is unused).
//!
//! Activations are kept channels-last (N, H, W, C): the blocks' LayerNorm and MLP then run over
//! contiguous rows (the fused linear layer), and the strided convolutions are patchifications
//! followed by a linear layer.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::engines::ops;
use crate::models::layers::{LayerNorm, Linear};
use crate::models::params;

/// The epsilon of every LayerNorm but the last (which is the config's `layer_norm_eps`).
const BLOCK_EPS: f64 = 1e-6;
/// GRN's epsilon in its normalisation by the mean response.
const GRN_EPS: f64 = 1e-6;
/// The depthwise convolution's kernel size and padding.
const KERNEL: usize = 7;
/// ImageNet's per-channel mean and std, the networks' input normalisation for images in [0, 1].
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The architecture, from the hub's config.json (the keys biflow reads; others are ignored).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ConvNextConfig {
    pub model_type: String,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "four")]
    pub patch_size: usize,
    pub hidden_sizes: Vec<usize>,
    pub depths: Vec<usize>,
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn layer_norm_eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl ConvNextConfig {
    /// Read and check `DIR/config.json`.
    pub fn read(dir: &Path) -> Result<ConvNextConfig> {
        let path = dir.join("config.json");
        ensure!(dir.is_dir(), "--convnext {} is not a folder: give the folder of a ConvNeXt-V2 checkpoint (config.json and model.safetensors, as facebook/convnextv2-base-22k-224 on the hub)", dir.display());
        let text = std::fs::read_to_string(&path).with_context(|| format!("{} has no readable config.json: a ConvNeXt-V2 folder holds config.json and model.safetensors", dir.display()))?;
        let cfg: ConvNextConfig = serde_json::from_str(&text).with_context(|| format!("{} is not a ConvNeXt-V2 config (depths, hidden_sizes)", path.display()))?;
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.model_type == "convnextv2", "model_type is '{}', not 'convnextv2': biflow reads ConvNeXt-V2 checkpoints (facebook/convnextv2-*)", self.model_type);
        ensure!(self.hidden_act == "gelu", "hidden_act '{}' is not supported (ConvNeXt-V2 uses gelu)", self.hidden_act);
        ensure!(!self.depths.is_empty() && self.depths.len() == self.hidden_sizes.len(), "depths {:?} and hidden_sizes {:?} must name the same stages", self.depths, self.hidden_sizes);
        ensure!(self.hidden_sizes.iter().all(|&c| c > 0) && self.patch_size > 0 && self.num_channels == 3, "hidden_sizes, patch_size and num_channels (3) must be positive");
        Ok(())
    }

    /// The feature size (the last stage's width).
    pub fn features(&self) -> usize {
        *self.hidden_sizes.last().expect("validated")
    }

    /// The smallest input side: the stem's patch, then a halving per later stage.
    pub fn min_size(&self) -> usize {
        self.patch_size << (self.hidden_sizes.len() - 1)
    }
}

/// A k x k, stride-k convolution of channels-last images, as a patchification and a linear layer.
struct PatchConv {
    /// The kernel (C_out, C_in, k, k) as a linear layer over patches in (ky, kx, c) order.
    linear: Linear,
    k: usize,
}

impl PatchConv {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, k: usize) -> Result<PatchConv> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        // The patches are read channels-last, so the kernel is reordered once here.
        let weight = weight.permute((0, 2, 3, 1))?.reshape((c_out, k * k * c_in))?;
        Ok(PatchConv { linear: Linear { weight, bias }, k })
    }

    /// (N, H, W, C) -> (N, H/k, W/k, C_out), a remainder of rows or columns dropped as torch's.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let (ho, wo, k) = (h / self.k, w / self.k, self.k);
        let x = x.narrow(1, 0, ho * k)?.narrow(2, 0, wo * k)?;
        let patches = x.reshape((n, ho, k, wo, k, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((n, ho, wo, k * k * c))?;
        self.linear.forward(&patches)
    }
}

/// Global Response Normalisation: each channel scaled by its L2 norm over space relative to the
/// mean over channels, `h + w (h * n) + b`.
struct Grn {
    weight: Tensor,
    bias: Tensor,
}

impl Grn {
    fn new(vb: VarBuilder, dim: usize) -> Result<Grn> {
        Ok(Grn { weight: vb.get((1, 1, 1, dim), "weight")?, bias: vb.get((1, 1, 1, dim), "bias")? })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let norms = h.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
        let relative = norms.broadcast_div(&(norms.mean_keepdim(D::Minus1)? + GRN_EPS)?)?;
        // h + w (h n) + b = h (1 + w n) + b: one pass over h for the scale, one for the bias.
        let scale = (relative.broadcast_mul(&self.weight)? + 1.0)?;
        Ok(h.broadcast_mul(&scale)?.broadcast_add(&self.bias)?)
    }
}

/// One block: x + pwconv2(GRN(GELU(pwconv1(LayerNorm(dwconv(x)))))).
struct Block {
    dw_weight: Tensor,
    dw_bias: Tensor,
    norm: LayerNorm,
    pwconv1: Linear,
    grn: Grn,
    pwconv2: Linear,
}

impl Block {
    fn new(vb: VarBuilder, dim: usize) -> Result<Block> {
        Ok(Block {
            dw_weight: vb.get((dim, 1, KERNEL, KERNEL), "dwconv.weight")?,
            dw_bias: vb.get(dim, "dwconv.bias")?,
            norm: LayerNorm::with_eps(vb.pp("layernorm"), dim, BLOCK_EPS)?,
            pwconv1: Linear::new(vb.pp("pwconv1"), dim, 4 * dim)?,
            grn: Grn::new(vb.pp("grn"), 4 * dim)?,
            pwconv2: Linear::new(vb.pp("pwconv2"), 4 * dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::depthwise_conv2d(x, &self.dw_weight, &self.dw_bias, KERNEL / 2)?;
        let h = ops::gelu(&self.pwconv1.forward(&self.norm.forward(&h)?)?)?;
        let h = self.pwconv2.forward(&self.grn.forward(&h)?)?;
        Ok((x + h)?)
    }
}

/// A stage: its downsampling (LayerNorm, 2x2 stride-2 convolution; none in the first) and blocks.
struct Stage {
    downsample: Option<(LayerNorm, PatchConv)>,
    blocks: Vec<Block>,
}

/// ConvNeXt-V2 up to its pooled, normalised features.
pub struct ConvNextV2 {
    stem: PatchConv,
    stem_norm: LayerNorm,
    stages: Vec<Stage>,
    norm: LayerNorm,
    config: ConvNextConfig,
    mean: Tensor,
    std: Tensor,
}

impl ConvNextV2 {
    /// The modules over `vb` (tensors under transformers' ConvNextV2Model names).
    pub fn new(vb: VarBuilder, config: &ConvNextConfig) -> Result<ConvNextV2> {
        let widths = &config.hidden_sizes;
        let embeddings = vb.pp("embeddings");
        let stem = PatchConv::new(embeddings.pp("patch_embeddings"), config.num_channels, widths[0], config.patch_size)?;
        let stem_norm = LayerNorm::with_eps(embeddings.pp("layernorm"), widths[0], BLOCK_EPS)?;
        let mut stages = Vec::new();
        for (i, (&width, &depth)) in widths.iter().zip(&config.depths).enumerate() {
            let vb = vb.pp(format!("encoder.stages.{i}"));
            let downsample = if i > 0 {
                let c_in = widths[i - 1];
                Some((LayerNorm::with_eps(vb.pp("downsampling_layer.0"), c_in, BLOCK_EPS)?, PatchConv::new(vb.pp("downsampling_layer.1"), c_in, width, 2)?))
            } else {
                None
            };
            let blocks = (0..depth).map(|j| Block::new(vb.pp(format!("layers.{j}")), width)).collect::<Result<_>>()?;
            stages.push(Stage { downsample, blocks });
        }
        let norm = LayerNorm::with_eps(vb.pp("layernorm"), config.features(), config.layer_norm_eps)?;
        let device = vb.device();
        let per_channel = |v: [f32; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), device);
        Ok(ConvNextV2 { stem, stem_norm, stages, norm, config: config.clone(), mean: per_channel(MEAN)?, std: per_channel(STD)? })
    }

    /// Load a hub folder (config.json + model.safetensors), checking every tensor's name and shape.
    pub fn load(dir: &Path, device: &Device) -> Result<ConvNextV2> {
        let config = ConvNextConfig::read(dir)?;
        let file = dir.join("model.safetensors");
        ensure!(file.is_file(), "{} has no model.safetensors (a ConvNeXt-V2 folder holds config.json and model.safetensors)", dir.display());
        let mut tensors = crate::io::tensors::load_weights(&file, device).with_context(|| format!("cannot read the ConvNeXt-V2 weights {}", file.display()))?;
        // The classification checkpoints keep the model under `convnextv2.`.
        if tensors.keys().any(|k| k.starts_with("convnextv2.")) {
            tensors = tensors.into_iter().filter_map(|(k, t)| k.strip_prefix("convnextv2.").map(|k| (k.to_string(), t))).collect();
        }
        let expected = params::parameter_list(|vb| ConvNextV2::new(vb, &config))?;
        params::check_tensors(&expected, &tensors).with_context(|| format!("{} does not hold the ConvNeXt-V2 that {} describes", file.display(), dir.join("config.json").display()))?;
        ConvNextV2::new(VarBuilder::from_tensors(tensors, DType::F32, device), &config)
    }

    pub fn config(&self) -> &ConvNextConfig {
        &self.config
    }

    /// The pooled features (N, C_last) of `pixel_values` (N, 3, H, W), as transformers' input: already
    /// normalised.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4().context("ConvNeXt-V2 takes images N,C,H,W")?;
        ensure!(c == self.config.num_channels, "ConvNeXt-V2 takes {} channels, got {c}", self.config.num_channels);
        let min = self.config.min_size();
        ensure!(h >= min && w >= min, "ConvNeXt-V2 needs images of at least {min}x{min} pixels (its stem and downsamplings), got {h}x{w}");
        let mut x = self.stem_norm.forward(&self.stem.forward(&pixel_values.permute((0, 2, 3, 1))?)?)?;
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                x = conv.forward(&norm.forward(&x)?)?;
            }
            for block in &stage.blocks {
                x = block.forward(&x)?;
            }
        }
        self.norm.forward(&x.mean((1, 2))?)
    }

    /// The squared L2 distance of each pair's features, (N): images (N, C, H, W) in [-1, 1], C = 1
    /// (gray, repeated to RGB) or 3, both of one shape.
    pub fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        ensure!(x0.dims() == x1.dims(), "ConvNeXt features compare images of one shape, got {:?} and {:?}", x0.dims(), x1.dims());
        let (_, c, _, _) = x0.dims4().context("ConvNeXt features take images N,C,H,W")?;
        ensure!(c == 1 || c == 3, "ConvNeXt features take gray or RGB images, got {c} channels");
        // Each image through the network on its own: a target that needs no gradient costs no backward.
        let features = |x: &Tensor| -> Result<Tensor> {
            let x = x.to_dtype(DType::F32)?;
            let x = if c == 1 { x.repeat((1, 3, 1, 1))? } else { x };
            let x = ((x + 1.0)? * 0.5)?.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
            self.forward(&x)
        };
        Ok((features(x0)? - features(x1)?)?.sqr()?.sum(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/convnext").join(name)
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
    }

    /// Pooled features and their input gradient equal transformers' ConvNextV2Model (float64) on a
    /// small random ConvNeXt-V2 in the hub's layout, at 32 and 64 px (scripts/make-convnext-fixtures.py).
    #[test]
    fn matches_transformers() {
        let dev = Device::Cpu;
        let net = ConvNextV2::load(&fixture("tiny-random"), &dev).unwrap();
        assert_eq!(net.config().features(), 32);
        let want = crate::io::tensors::load_weights(&fixture("parity.safetensors"), &dev).unwrap();
        for case in ["rgb32", "rgb64"] {
            let x = Var::from_tensor(&want[&format!("{case}.x")]).unwrap();
            let pooled = net.forward(x.as_tensor()).unwrap();
            let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = rel(&values(&pooled), &values(&want[&format!("{case}.pooled")]));
            assert!(err <= 1e-4, "{case}: pooled features differ by {err} of the largest");
            let grads = (pooled * &want[&format!("{case}.r")]).unwrap().sum_all().unwrap().backward().unwrap();
            let err = rel(&values(grads.get(x.as_tensor()).unwrap()), &values(&want[&format!("{case}.grad")]));
            assert!(err <= 1e-4, "{case}: input gradients differ by {err} of the largest");
        }
    }

    /// The fused and the composed engines give one answer (forward and input gradient).
    #[test]
    fn fused_and_composed_agree() {
        let dev = Device::Cpu;
        let net = ConvNextV2::load(&fixture("tiny-random"), &dev).unwrap();
        let x0 = Tensor::randn(0f32, 0.5, (2, 1, 40, 40), &dev).unwrap().clamp(-1f32, 1f32).unwrap();
        let x1 = Tensor::randn(0f32, 0.5, (2, 1, 40, 40), &dev).unwrap().clamp(-1f32, 1f32).unwrap();
        let run = |fused: bool| {
            let _mode = (!fused).then(crate::device::mode::composed);
            let x = Var::from_tensor(&x0).unwrap();
            let d = net.distance(x.as_tensor(), &x1).unwrap();
            let g = d.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (d.to_vec1::<f32>().unwrap(), g)
        };
        let ((d_f, g_f), (d_c, g_c)) = (run(true), run(false));
        assert!(rel(&d_f, &d_c) < 1e-4, "{d_f:?} vs {d_c:?}");
        assert!(rel(&g_f, &g_c) < 1e-4);
        assert!(d_f.iter().all(|d| *d > 0.0));
    }

    /// A folder without config.json, another model type and a file with a mis-shaped tensor are
    /// refused, naming what is wrong.
    #[test]
    fn refuses_what_is_not_a_convnext_v2() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", ConvNextV2::load(dir.path(), &dev).err().unwrap());
        assert!(err.contains("config.json"), "{err}");
        let text = std::fs::read_to_string(fixture("tiny-random/config.json")).unwrap();
        std::fs::write(dir.path().join("config.json"), text.replace("convnextv2", "convnext")).unwrap();
        let err = format!("{:#}", ConvNextV2::load(dir.path(), &dev).err().unwrap());
        assert!(err.contains("model_type"), "{err}");
        std::fs::write(dir.path().join("config.json"), text.replace("\"depths\": [\n    1,\n    1,\n    2,", "\"depths\": [\n    1,\n    1,\n    3,")).unwrap();
        std::fs::copy(fixture("tiny-random/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        let err = format!("{:#}", ConvNextV2::load(dir.path(), &dev).err().unwrap());
        assert!(err.contains("encoder.stages.2.layers.2"), "{err}");
    }
}
