//! The Stable Diffusion VAE family (diffusers' `AutoencoderKL`): the encoder maps an image to the mean
//! and log-variance of a latent Gaussian (8x smaller per side for the SD VAEs, 4 channels), the decoder
//! maps latents back to images. BiFlow's ImageNet 256 results model these latents, scaled as training
//! sees them: `(z - shift) * scaling` (0.18215 for SD, 0.13025 for SDXL; shift 0 unless the config has
//! one). The decoder is differentiable, so perceptual losses on decoded images reach the latents.
//!
//! Weights in the diffusers layout: a folder with config.json (block_out_channels, layers_per_block,
//! latent_channels, norm_num_groups, scaling_factor, shift_factor) and
//! diffusion_pytorch_model.safetensors (or the .bin pickle, read without executing it). Checkpoints
//! converted before diffusers renamed the mid-block attention (`query`, `key`, `value`, `proj_attn`)
//! load too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::engines::ops;
use crate::models::layers::Linear;
use crate::models::params;

/// The epsilon of every GroupNorm (diffusers' resnet_eps for the VAE).
const NORM_EPS: f64 = 1e-6;

/// The architecture, from diffusers' config.json (the keys biflow reads; others are ignored).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn groups() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Read and check `DIR/config.json`.
    pub fn read(dir: &Path) -> Result<VaeConfig> {
        ensure!(dir.is_dir(), "--vae {} is not a folder: give the folder of a diffusers AutoencoderKL (config.json and diffusion_pytorch_model.safetensors, as stabilityai/sd-vae-ft-ema on the hub)", dir.display());
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{} has no readable config.json: a VAE folder holds config.json and diffusion_pytorch_model.safetensors", dir.display()))?;
        let cfg: VaeConfig = serde_json::from_str(&text).with_context(|| format!("{} is not an AutoencoderKL config (block_out_channels, latent_channels, ...)", path.display()))?;
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.class_name.is_empty() || self.class_name == "AutoencoderKL", "_class_name is '{}': biflow reads diffusers' AutoencoderKL (the SD-VAE family)", self.class_name);
        ensure!(self.act_fn == "silu", "act_fn '{}' is not supported (the SD VAEs use silu)", self.act_fn);
        let blocks = self.block_out_channels.len();
        ensure!(blocks > 0, "block_out_channels is empty");
        let kinds_ok = |kinds: &[String], kind: &str| kinds.is_empty() || (kinds.len() == blocks && kinds.iter().all(|k| k == kind));
        ensure!(kinds_ok(&self.down_block_types, "DownEncoderBlock2D") && kinds_ok(&self.up_block_types, "UpDecoderBlock2D"), "only DownEncoderBlock2D/UpDecoderBlock2D VAEs (the SD family) are supported, one per width");
        ensure!(
            self.norm_num_groups > 0 && self.block_out_channels.iter().all(|&c| c > 0 && c % self.norm_num_groups == 0),
            "block_out_channels {:?} must be multiples of norm_num_groups {}",
            self.block_out_channels,
            self.norm_num_groups
        );
        ensure!(self.latent_channels > 0 && self.layers_per_block > 0 && self.in_channels > 0 && self.out_channels > 0, "channel counts and layers_per_block must be positive");
        ensure!(self.scaling_factor.is_finite() && self.scaling_factor > 0.0, "scaling_factor must be positive, got {}", self.scaling_factor);
        Ok(())
    }

    /// How much smaller a latent is per side than its image (8 for the SD VAEs).
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }
}

/// A 2D convolution with its bias: stride 1 through the fused kernel, stride 2 (the encoder's
/// downsampling, never differentiated) through candle's.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    pad: usize,
    stride: usize,
}

impl Conv {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, pad: usize, stride: usize) -> Result<Conv> {
        Ok(Conv { weight: vb.get((c_out, c_in, k, k), "weight")?, bias: vb.get(c_out, "bias")?, pad, stride })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.stride == 1 {
            return Ok(ops::conv2d(x, &self.weight, &self.bias, self.pad)?);
        }
        let c = self.bias.dim(0)?;
        Ok(x.conv2d(&self.weight, self.pad, self.stride, 1, 1)?.broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?)
    }
}

/// GroupNorm over (N, C, H, W): statistics per sample and group of channels, an affine per channel.
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<GroupNorm> {
        Ok(GroupNorm { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let g = x.reshape((n, self.groups, (c / self.groups) * h * w))?;
        let centred = g.broadcast_sub(&g.mean_keepdim(2)?)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?.reshape((n, c, h, w))?;
        let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1));
        Ok(normed.broadcast_mul(&per_channel(&self.weight)?)?.broadcast_add(&per_channel(&self.bias)?)?)
    }
}

/// diffusers' ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the
/// shortcut a 1x1 convolution where the width changes.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Resnet> {
        Ok(Resnet {
            norm1: GroupNorm::new(vb.pp("norm1"), c_in, groups)?,
            conv1: Conv::new(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), c_out, groups)?,
            conv2: Conv::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            shortcut: (c_in != c_out).then(|| Conv::new(vb.pp("conv_shortcut"), c_in, c_out, 1, 0, 1)).transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// The mid-block's single-head self-attention over all positions, with its GroupNorm and residual.
struct SelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<SelfAttention> {
        Ok(SelfAttention {
            norm: GroupNorm::new(vb.pp("group_norm"), c, groups)?,
            q: Linear::new(vb.pp("to_q"), c, c)?,
            k: Linear::new(vb.pp("to_k"), c, c)?,
            v: Linear::new(vb.pp("to_v"), c, c)?,
            out: Linear::new(vb.pp("to_out.0"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let qkv = Tensor::cat(&[self.q.forward(&tokens)?, self.k.forward(&tokens)?, self.v.forward(&tokens)?], 2)?;
        let attended = self.out.forward(&ops::attention(&qkv, 1, 1.0 / (c as f64).sqrt(), false)?)?;
        Ok((x + attended.transpose(1, 2)?.reshape((n, c, h, w))?)?)
    }
}

/// The middle of both networks: resnet, attention, resnet.
struct MidBlock {
    first: Resnet,
    attention: Option<SelfAttention>,
    second: Resnet,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, cfg: &VaeConfig) -> Result<MidBlock> {
        let g = cfg.norm_num_groups;
        Ok(MidBlock {
            first: Resnet::new(vb.pp("resnets.0"), c, c, g)?,
            attention: cfg.mid_block_add_attention.then(|| SelfAttention::new(vb.pp("attentions.0"), c, g)).transpose()?,
            second: Resnet::new(vb.pp("resnets.1"), c, c, g)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x)?;
        if let Some(att) = &self.attention {
            h = att.forward(&h)?;
        }
        self.second.forward(&h)
    }
}

/// GroupNorm, SiLU and the output convolution that end both networks.
struct Head {
    norm: GroupNorm,
    conv: Conv,
}

impl Head {
    fn new(vb: &VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Head> {
        Ok(Head { norm: GroupNorm::new(vb.pp("conv_norm_out"), c_in, groups)?, conv: Conv::new(vb.pp("conv_out"), c_in, c_out, 3, 1, 1)? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&self.norm.forward(x)?.silu()?)
    }
}

/// Image (N, C, H, W) -> the posterior's moments (N, 2 L, H/f, W/f).
struct Encoder {
    conv_in: Conv,
    /// Per width: its resnets, then (except the last) a stride-2 convolution.
    blocks: Vec<(Vec<Resnet>, Option<Conv>)>,
    mid: MidBlock,
    head: Head,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Encoder> {
        let (widths, g) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let mut blocks = Vec::new();
        let mut c_in = widths[0];
        for (i, &c) in widths.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block).map(|j| Resnet::new(vb.pp(format!("resnets.{j}")), if j == 0 { c_in } else { c }, c, g)).collect::<Result<_>>()?;
            let down = (i + 1 < widths.len()).then(|| Conv::new(vb.pp("downsamplers.0.conv"), c, c, 3, 0, 2)).transpose()?;
            blocks.push((resnets, down));
            c_in = c;
        }
        let last = *widths.last().expect("validated");
        Ok(Encoder {
            conv_in: Conv::new(vb.pp("conv_in"), cfg.in_channels, widths[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), last, cfg)?,
            head: Head::new(&vb, last, 2 * cfg.latent_channels, g)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = down {
                // diffusers pads one zero row and column at the bottom and right, then strides.
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        self.head.forward(&self.mid.forward(&h)?)
    }
}

/// Latents (N, L, h, w) -> images (N, C, h f, w f).
struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    /// From the widest: its resnets, then (except the last) a nearest 2x upsampling and convolution.
    blocks: Vec<(Vec<Resnet>, Option<Conv>)>,
    head: Head,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Decoder> {
        let (g, widths) = (cfg.norm_num_groups, cfg.block_out_channels.iter().rev().copied().collect::<Vec<_>>());
        let mut blocks = Vec::new();
        let mut c_in = widths[0];
        for (i, &c) in widths.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block).map(|j| Resnet::new(vb.pp(format!("resnets.{j}")), if j == 0 { c_in } else { c }, c, g)).collect::<Result<_>>()?;
            let up = (i + 1 < widths.len()).then(|| Conv::new(vb.pp("upsamplers.0.conv"), c, c, 3, 1, 1)).transpose()?;
            blocks.push((resnets, up));
            c_in = c;
        }
        Ok(Decoder {
            conv_in: Conv::new(vb.pp("conv_in"), cfg.latent_channels, widths[0], 3, 1, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), widths[0], cfg)?,
            head: Head::new(&vb, c_in, cfg.out_channels, g)?,
            blocks,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = up {
                h = conv.forward(&upsample_nearest2(&h)?)?;
            }
        }
        self.head.forward(&h)
    }
}

/// Nearest-neighbour 2x upsampling as a broadcast (differentiable: its gradient sums each 2x2 block).
fn upsample_nearest2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))?)
}

/// AutoencoderKL: encoder, decoder and the 1x1 convolutions around the latent.
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    config: VaeConfig,
}

/// The names diffusers gave the mid-block attention before its rename, and the current ones.
const RENAMED: [(&str, &str); 4] = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Vae> {
        let l = config.latent_channels;
        Ok(Vae {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv: config.use_quant_conv.then(|| Conv::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 0, 1)).transpose()?,
            post_quant_conv: config.use_post_quant_conv.then(|| Conv::new(vb.pp("post_quant_conv"), l, l, 1, 0, 1)).transpose()?,
            config: config.clone(),
        })
    }

    /// The weights file of a VAE folder: the safetensors, else the .bin pickle.
    pub fn weights_file(dir: &Path) -> Result<PathBuf> {
        ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("{} has no diffusion_pytorch_model.safetensors (or .bin): a VAE folder holds config.json and the weights", dir.display()))
    }

    /// SHA-256 of a VAE folder's weights file: what manifests and runs name a VAE by.
    pub fn weights_sha256(dir: &Path) -> Result<String> {
        let weights = Vae::weights_file(dir)?;
        Ok(crate::io::sha256_hex(&std::fs::read(&weights).with_context(|| format!("cannot read {}", weights.display()))?))
    }

    /// Load a diffusers folder, checking every tensor's name and shape (extra tensors are refused too:
    /// they mean another architecture than config.json describes).
    pub fn load(dir: &Path, device: &Device) -> Result<Vae> {
        let config = VaeConfig::read(dir)?;
        let file = Vae::weights_file(dir)?;
        let tensors = crate::io::tensors::load_weights(&file, device).with_context(|| format!("cannot read the VAE weights {}", file.display()))?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let name = RENAMED.iter().fold(name, |n, (old, new)| n.replace(old, new));
                // The old attention kept its projections as 1x1 convolutions in some conversions.
                let t = if name.contains(".attentions.") && t.rank() == 4 { t.flatten_from(1)? } else { t };
                Ok((name, t))
            })
            .collect::<Result<_>>()?;
        let expected = params::parameter_list(|vb| Vae::new(vb, &config))?;
        let context = || format!("{} does not hold the AutoencoderKL that {} describes", file.display(), dir.join("config.json").display());
        params::check_tensors(&expected, &tensors).with_context(context)?;
        let known: std::collections::HashSet<&str> = expected.iter().map(|p| p.name.as_str()).collect();
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).collect();
        extra.sort();
        ensure!(extra.is_empty(), "{}: {} unexpected tensors ({})", context(), extra.len(), extra.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
        Vae::new(VarBuilder::from_tensors(tensors, DType::F32, device), &config)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Images (N, C, H, W) in [-1, 1] -> the posterior's mean and log-variance (N, L, H/f, W/f), the
    /// log-variance clamped to [-30, 20] as diffusers does.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4().context("the VAE encodes images N,C,H,W")?;
        let f = self.config.downsampling();
        ensure!(c == self.config.in_channels, "this VAE encodes {}-channel images, got {c}", self.config.in_channels);
        ensure!(h % f == 0 && w % f == 0 && h > 0 && w > 0, "the VAE needs image sides that are multiples of {f} (its downsampling), got {h}x{w}");
        let mut moments = self.encoder.forward(&x.to_dtype(DType::F32)?)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        Ok((moments.narrow(1, 0, l)?, moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?))
    }

    /// Latents z (N, L, h, w), unscaled -> images (N, C, h f, w f), roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, l, _, _) = z.dims4().context("the VAE decodes latents N,L,h,w")?;
        ensure!(l == self.config.latent_channels, "this VAE decodes {}-channel latents, got {l}", self.config.latent_channels);
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// The latents as training sees them: `(z - shift) * scaling`, z the posterior mean, or a draw
    /// `mean + exp(logvar / 2) noise` when `noise` (standard normal, shaped as the mean) is given.
    pub fn latents(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (mean, logvar) = self.encode(x)?;
        let z = match noise {
            Some(eps) => (mean + (logvar * 0.5)?.exp()?.mul(eps)?)?,
            None => mean,
        };
        Ok(((z - self.config.shift())? * self.config.scaling_factor)?)
    }

    /// Images from training's latents: `decode(l / scaling + shift)`; differentiable in `l`.
    pub fn images(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&((latents / self.config.scaling_factor)? + self.config.shift())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vae").join(name)
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() / scale
    }

    /// The VAE of `model` against the references of `parity` (scripts/make-vae-fixtures.py): encoder
    /// mean and log-variance, the decoded mean and the decoder's gradient with respect to the latents,
    /// with the fused and the composed engines, each within `tol` of the largest value.
    fn check_parity(model: &Path, parity: &Path, tol: f32) {
        let dev = Device::Cpu;
        let vae = Vae::load(model, &dev).unwrap();
        let want = crate::io::tensors::load_weights(parity, &dev).unwrap();
        for fused in [true, false] {
            let _mode = (!fused).then(crate::device::mode::composed);
            let (mean, logvar) = vae.encode(&want["x"]).unwrap();
            let z = Var::from_tensor(&want["mean"]).unwrap();
            let decoded = vae.decode(z.as_tensor()).unwrap();
            let grads = (&decoded * &want["r"]).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(z.as_tensor()).unwrap();
            for (what, got, reference) in [("mean", &mean, "mean"), ("logvar", &logvar, "logvar"), ("decoded", &decoded, "decoded"), ("gradient", g, "grad")] {
                let err = rel(got, &want[reference]);
                eprintln!("{what} (fused {fused}): {err:.2e} of the largest value");
                assert!(err <= tol, "{what} (fused {fused}): {err}");
            }
        }
    }

    /// Parity with diffusers' AutoencoderKL (float64) on a small random VAE (fixtures/vae).
    #[test]
    fn matches_diffusers() {
        check_parity(&fixture("tiny-random"), &fixture("parity.safetensors"), 1e-4);
        // Training's latents: (mean - 0) * 0.18215.
        let dev = Device::Cpu;
        let vae = Vae::load(&fixture("tiny-random"), &dev).unwrap();
        let want = crate::io::tensors::load_weights(&fixture("parity.safetensors"), &dev).unwrap();
        let l = vae.latents(&want["x"], None).unwrap();
        assert!(rel(&(l / 0.18215).unwrap(), &want["mean"]) <= 1e-4);
    }

    /// The same at the full SD-VAE configuration, 256 px: `make-vae-fixtures.py --full DIR`, then
    /// `BIFLOW_VAE_FULL=DIR cargo test --release -p biflow-core -- --ignored full_sd_vae`.
    #[test]
    #[ignore = "needs the full SD-VAE check of scripts/make-vae-fixtures.py --full (335 MB)"]
    fn full_sd_vae_matches_diffusers() {
        let dir = PathBuf::from(std::env::var("BIFLOW_VAE_FULL").expect("BIFLOW_VAE_FULL=DIR"));
        check_parity(&dir.join("vae"), &dir.join("parity.safetensors"), 1e-4);
    }

    /// A folder without config.json, another model class, a sample size the VAE cannot take, missing
    /// and extra tensors: refused, naming what is wrong.
    #[test]
    fn refuses_what_is_not_this_vae() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let err = |d: &Path| format!("{:#}", Vae::load(d, &dev).err().unwrap());
        assert!(err(dir.path()).contains("config.json"));
        let text = std::fs::read_to_string(fixture("tiny-random/config.json")).unwrap();
        std::fs::write(dir.path().join("config.json"), text.replace("\"AutoencoderKL\"", "\"UNet2DModel\"")).unwrap();
        assert!(err(dir.path()).contains("_class_name"));
        std::fs::write(dir.path().join("config.json"), &text).unwrap();
        assert!(err(dir.path()).contains("diffusion_pytorch_model"));
        std::fs::write(dir.path().join("config.json"), text.replace("\"layers_per_block\": 1", "\"layers_per_block\": 2")).unwrap();
        std::fs::copy(fixture("tiny-random/diffusion_pytorch_model.safetensors"), dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(err(dir.path()).contains("resnets.1"), "{}", err(dir.path()));
        std::fs::write(dir.path().join("config.json"), text.replace("\"mid_block_add_attention\": true", "\"mid_block_add_attention\": false")).unwrap();
        assert!(err(dir.path()).contains("unexpected tensors"), "{}", err(dir.path()));
        let vae = Vae::load(&fixture("tiny-random"), &dev).unwrap();
        let e = format!("{:#}", vae.encode(&Tensor::zeros((1, 3, 13, 13), DType::F32, &dev).unwrap()).unwrap_err());
        assert!(e.contains("multiples of 2"), "{e}");
    }
}
