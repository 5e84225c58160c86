//! The forward model F: TARFlow (Zhai et al. 2024), as in the reference `transformer_flow.py`.
//!
//! An image in [-1,1]^(C,H,W) is cut into T = (H/p)^2 patch tokens of size D = C*p*p (channel order
//! (c, ph, pw), like `torch.nn.functional.unfold`). B blocks follow; block i reverses the token order
//! when i is odd and restores it at its end. Each block is a causal transformer whose output, shifted
//! right by one token, gives the affine parameters (a, b) of token t from tokens < t:
//! `y = (x - b) * exp(-a)`, with per-dimension log-determinant `-mean(a)`.
//!
//! Parameter names follow the reference `state_dict`, so imported checkpoints load as they are.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::engines::{self, BlockParams, Frozen, NllGrad, Places};
use crate::engines::ops;
use crate::models::layers::{label_indices, AttentionBlock, KvCache, LayerNorm, Linear};
use crate::models::params::{self, varmap_of, Named, Param, EMBEDDING};

pub mod config;
mod inverse;

pub use config::{FlowConfig, HEAD_DIM, LN_EPS, MLP_EXPANSION};
pub use inverse::ReverseOptions;

/// One flow block (the reference's MetaBlock): an autoregressive affine transform of the tokens.
pub struct FlowBlock {
    proj_in: Linear,
    pos_embed: Tensor,           // (T, C)
    class_embed: Option<Tensor>, // (K, 1, C)
    layers: Vec<AttentionBlock>,
    proj_out: Linear,
    flip: bool,
    token_dim: usize,
    clip_scale: Option<f64>,
}

impl FlowBlock {
    fn new(vb: VarBuilder, cfg: &FlowConfig, index: usize) -> Result<Self> {
        let (t, d, c) = (cfg.num_tokens(), cfg.token_dim(), cfg.channels);
        // In the reference's order: the parameter list, and so the seeded initialisation, follow it.
        Ok(FlowBlock {
            proj_in: Linear::new(vb.pp("proj_in"), d, c)?,
            pos_embed: vb.get_with_hints((t, c), "pos_embed", EMBEDDING)?,
            class_embed: if cfg.num_classes > 0 { Some(vb.get_with_hints((cfg.num_classes, 1, c), "class_embed", EMBEDDING)?) } else { None },
            layers: (0..cfg.layers_per_block).map(|j| AttentionBlock::new(vb.pp(format!("attn_blocks.{j}")), c, true)).collect::<Result<_>>()?,
            proj_out: Linear::zero(vb.pp("proj_out"), c, 2 * d)?,
            flip: index % 2 == 1,
            token_dim: d,
            clip_scale: cfg.clip_scale,
        })
    }

    /// Reverse the token order (dim 1 of N,T,D; dim 0 of T,C) when this block flips.
    fn permute(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if self.flip {
            Ok(x.flip(&[dim])?)
        } else {
            Ok(x.clone())
        }
    }

    /// The class embedding for each sample, (N, 1, C): the mean embedding for label -1 or no labels.
    fn class_embedding(&self, labels: Option<&Tensor>, n: usize) -> Result<Option<Tensor>> {
        let Some(table) = &self.class_embed else { return Ok(None) };
        let k = table.dim(0)?;
        let table = table.squeeze(1)?; // (K, C)
        let mean = table.mean_keepdim(0)?; // (1, C)
        match labels {
            None => Ok(Some(mean.unsqueeze(0)?.broadcast_as((n, 1, table.dim(1)?))?)),
            Some(y) => {
                // Index K (one past the last class) is the mean embedding.
                let idx = label_indices(y, k)?;
                let full = Tensor::cat(&[&table, &mean], 0)?;
                Ok(Some(full.index_select(&idx, 0)?.unsqueeze(1)?))
            }
        }
    }

    /// Soft clip of the log-scales, when configured.
    fn clip(&self, a: &Tensor) -> Result<Tensor> {
        match self.clip_scale {
            Some(c) => Ok(((a / c)?.tanh()? * c)?),
            None => Ok(a.clone()),
        }
    }

    /// x: (N, T, D) -> (y, logdet (N)).
    pub fn forward(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (n, t, d) = x.dims3()?;
        let x_in = self.permute(x, 1)?;
        let pos = self.permute(&self.pos_embed, 0)?;
        let mut h = self.proj_in.forward(&x_in)?.broadcast_add(&pos)?;
        if let Some(ce) = self.class_embedding(labels, n)? {
            h = h.broadcast_add(&ce)?;
        }
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        let o = self.proj_out.forward(&h)?; // (N, T, 2D)
        // Shift right by one token: token t gets the parameters computed from tokens < t.
        let o = Tensor::cat(&[&Tensor::zeros((n, 1, 2 * d), o.dtype(), o.device())?, &o.narrow(1, 0, t - 1)?], 1)?;
        let a = self.clip(&o.narrow(2, 0, d)?)?;
        let b = o.narrow(2, d, d)?;
        let y = ops::affine_forward(&x_in, &a, &b)?;
        let logdet = a.mean_keepdim(2)?.mean_keepdim(1)?.flatten_all()?.neg()?;
        Ok((self.permute(&y, 1)?, logdet))
    }

    /// The affine parameters (a, b), each (N, D), for the token after the one fed in (N, 1, D) at
    /// position `pos` (in this block's permuted order), using and extending the KV caches.
    fn step(
        &self,
        x_tok: &Tensor,
        pos: usize,
        class: Option<&Tensor>,
        caches: &mut [KvCache],
        scale: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = x_tok.dim(0)?;
        let t = self.pos_embed.dim(0)?;
        let p = if self.flip { t - 1 - pos } else { pos };
        let mut h = self.proj_in.forward(x_tok)?.broadcast_add(&self.pos_embed.narrow(0, p, 1)?)?;
        if let Some(ce) = class {
            h = h.broadcast_add(ce)?;
        }
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            h = layer.step(&h, cache, scale)?;
        }
        let o = self.proj_out.forward(&h)?.reshape((n, 2 * self.token_dim))?;
        let a = self.clip(&o.narrow(1, 0, self.token_dim)?)?;
        let b = o.narrow(1, self.token_dim, self.token_dim)?;
        Ok((a, b))
    }

    /// Where the hand-written passes find this block's parameters.
    fn places(&self, p: &Places) -> Result<BlockParams> {
        Ok(BlockParams {
            proj_in: self.proj_in.places(p)?,
            pos: p.of(&self.pos_embed)?,
            class: self.class_embed.as_ref().map(|t| p.of(t)).transpose()?,
            layers: self.layers.iter().map(|l| l.places(p)).collect::<Result<_>>()?,
            proj_out: self.proj_out.places(p)?,
            flip: self.flip,
        })
    }

    /// Host copies of this block's parameters for the CPU f32 decoder ([`engines::BlockDecoder`]), with
    /// the class embedding rows `class` (N, 1, C) of the batch being decoded.
    fn host_decoder(&self, class: Option<&Tensor>) -> Result<engines::HostBlock> {
        let linear = |l: &Linear| engines::HostLinear::new(&l.weight, &l.bias);
        let norm = |n: &LayerNorm| engines::HostNorm::new(&n.weight, &n.bias, LN_EPS);
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(engines::HostLayer {
                    attn_norm: norm(&l.attention.norm)?,
                    qkv: linear(&l.attention.qkv)?,
                    proj: linear(&l.attention.proj)?,
                    mlp_norm: norm(&l.mlp.norm)?,
                    fc1: linear(&l.mlp.fc1)?,
                    fc2: linear(&l.mlp.fc2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(engines::HostBlock {
            proj_in: linear(&self.proj_in)?,
            pos: host(&self.pos_embed)?,
            class: class.map(host).transpose()?,
            heads: self.layers[0].attention.heads,
            head_dim: HEAD_DIM,
            tokens: self.pos_embed.dim(0)?,
            layers,
            proj_out: linear(&self.proj_out)?,
            clip: self.clip_scale,
        })
    }
}

/// The output of the forward model.
pub struct FlowOutput {
    /// The noise tokens z = x^B: (N, T, D).
    pub z: Tensor,
    /// Per sample, the sum over blocks of the per-dimension-mean log-determinants: (N).
    pub logdets: Tensor,
    /// The output of every block, x^1 .. x^B, each (N, T, D).
    pub trajectory: Vec<Tensor>,
}

/// TARFlow: patchify, then B flow blocks with alternating token order.
pub struct TarFlow {
    cfg: FlowConfig,
    blocks: Vec<FlowBlock>,
    /// The reference's prior variance buffer `var` (T, D), used to scale z before decoding.
    var: Option<Tensor>,
    /// Every parameter with its name, as [`TarFlow::parameters`] lists them.
    params: Named,
    device: Device,
    /// The CPU's hand-written forward pass over host copies of the weights, made on first use.
    host: OnceLock<Option<Frozen<NllGrad>>>,
}

impl TarFlow {
    /// Build the model with parameters from `vb` (reference state_dict names).
    pub fn new(vb: VarBuilder, cfg: &FlowConfig) -> Result<TarFlow> {
        ops::tune_allocator();
        cfg.validate()?;
        let (blocks, params) = params::load(&vb, |vb| Self::blocks(vb, cfg)).context("the weights do not match the model configuration")?;
        let var = if vb.contains_tensor("var") { Some(vb.get((cfg.num_tokens(), cfg.token_dim()), "var")?) } else { None };
        Ok(TarFlow { cfg: cfg.clone(), blocks, var, params, device: vb.device().clone(), host: OnceLock::new() })
    }

    /// The modules: B flow blocks.
    fn blocks(vb: VarBuilder, cfg: &FlowConfig) -> Result<Vec<FlowBlock>> {
        (0..cfg.num_blocks).map(|i| FlowBlock::new(vb.pp(format!("blocks.{i}")), cfg, i)).collect()
    }

    /// F's parameter list (reference names, shapes, initialisation), read off its modules; the
    /// prior's `var` buffer is not a parameter.
    pub fn parameters(cfg: &FlowConfig) -> Result<Vec<Param>> {
        cfg.validate()?;
        params::parameter_list(|vb| Self::blocks(vb, cfg))
    }

    /// F's hand-written passes (loss gradient, frozen forward) over a parameter list holding this
    /// model's parameters in the order of `order`, of `sizes`.
    pub fn engine(&self, order: &[String], sizes: &[usize]) -> Result<NllGrad> {
        let places = Places::new(&self.params, order)?;
        let blocks = self.blocks.iter().map(|b| b.places(&places)).collect::<Result<_>>()?;
        NllGrad::new(&self.cfg, blocks, sizes)
    }

    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Images (N, C, H, W) -> tokens (N, T, D), channel order (c, ph, pw) inside a patch.
    pub fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        patchify(x, self.cfg.patch_size)
    }

    /// Tokens (N, T, D) -> images (N, C, H, W).
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        unpatchify(x, self.cfg.patch_size, self.cfg.in_channels, self.cfg.img_size)
    }

    /// x: (N, C, H, W) in [-1, 1]; labels (N, i64, -1 = dropped) or None.
    pub fn forward(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<FlowOutput> {
        let (_, c, h, w) = x.dims4().context("the flow takes images shaped N,C,H,W")?;
        ensure!(
            c == self.cfg.in_channels && h == self.cfg.img_size && w == self.cfg.img_size,
            "the model takes {}x{}x{} images, got {c}x{h}x{w}",
            self.cfg.in_channels,
            self.cfg.img_size,
            self.cfg.img_size
        );
        self.forward_tokens(&self.patchify(x)?, labels)
    }

    /// The forward pass on patch tokens (N, T, D). On the CPU, for tokens that need no gradient, this
    /// is the hand-written pass (engine::NllGrad::forward over the frozen weights); else candle's ops.
    pub fn forward_tokens(&self, tokens: &Tensor, labels: Option<&Tensor>) -> Result<FlowOutput> {
        let n = tokens.dim(0)?;
        if let Some(y) = labels {
            ensure!(y.elem_count() == n, "got {} labels for {n} samples", y.elem_count());
        }
        let labels = if self.cfg.num_classes == 0 { None } else { labels };
        if !tokens.track_op() && tokens.dtype() == DType::F32 {
            let frozen = Frozen::get_or_make(&self.host, || self.params.clone(), |names, sizes, values| self.engine(names, sizes)?.frozen(values))?;
            if let Some(host) = frozen {
                let (t, d) = (self.cfg.num_tokens(), self.cfg.token_dim());
                ensure!(tokens.dims() == [n, t, d], "the flow takes tokens N,{t},{d}, got {:?}", tokens.dims());
                let y: Option<Vec<i64>> = labels.map(|y| y.flatten_all()?.to_dtype(DType::I64)?.to_vec1()).transpose()?;
                let x: Vec<f32> = tokens.flatten_all()?.to_vec1()?;
                let (trajectory, logdets) = host.engine.forward(&host.params(), &x, y.as_deref())?;
                let trajectory = trajectory.into_iter().map(|v| Tensor::from_vec(v, (n, t, d), &self.device)).collect::<candle_core::Result<Vec<_>>>()?;
                return Ok(FlowOutput { z: trajectory.last().unwrap().clone(), logdets: Tensor::from_vec(logdets, n, &self.device)?, trajectory });
            }
        }
        let mut x = tokens.clone();
        let mut logdets: Option<Tensor> = None;
        let mut trajectory = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, ld) = block.forward(&x, labels)?;
            logdets = Some(match logdets {
                None => ld,
                Some(s) => (s + ld)?,
            });
            trajectory.push(y.clone());
            x = y;
        }
        Ok(FlowOutput { z: x, logdets: logdets.unwrap(), trajectory })
    }
}

/// Images (N, C, H, W) -> tokens (N, (H/p)*(W/p), C*p*p), like `unfold(x, p, stride=p).transpose(1, 2)`.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    Ok(x.reshape((n, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((n, gh * gw, c * p * p))?)
}

/// Tokens (N, T, C*p*p) -> images (N, C, H, W): the inverse of [`patchify`] (square images).
pub fn unpatchify(x: &Tensor, p: usize, c: usize, img: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    let g = img / p;
    Ok(x.reshape((n, g, g, c, p, p))?.permute((0, 3, 1, 4, 2, 5))?.reshape((n, c, img, img))?)
}

/// The maximum-likelihood loss `0.5 * mean(z^2) - mean(logdets)`, a scalar.
pub fn nll_loss(out: &FlowOutput) -> Result<Tensor> {
    let prior = (out.z.sqr()?.mean_all()? * 0.5)?;
    Ok((prior - out.logdets.mean_all()?)?)
}

/// What a flow's values are, which decides what its bits/dim count. Results name it "pixels" or
/// "latents".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// 8-bit pixels scaled to [-1, 1]: bits/dim of the 256 levels (dequantised, bin width 1/128).
    Pixels,
    /// Continuous VAE latents: the differential negative log-likelihood per value, in bits (it can
    /// be negative; it compares runs on the same latents, not with pixel bits/dim).
    Latents,
}

impl Values {
    pub fn of(latent: bool) -> Values {
        if latent { Values::Latents } else { Values::Pixels }
    }
}

/// Bits per dimension per sample (N):
/// `(-(sum(-0.5 (z^2 + log 2 pi)) - D log 128) / D - logdets) / ln 2`, D = C*H*W, for pixels
/// (the log 128 turns density on [-1, 1] into probability of a pixel level); no offset for latents.
pub fn bits_per_dim(out: &FlowOutput, cfg: &FlowConfig, values: Values) -> Result<Tensor> {
    let dim = cfg.image_dim() as f64;
    let n = out.z.dim(0)?;
    let log_2pi = (2.0 * std::f64::consts::PI).ln();
    let log_p = ((out.z.sqr()? + log_2pi)? * -0.5)?.reshape((n, ()))?.sum(1)?; // (N)
    let level = match values {
        Values::Pixels => 128f64.ln(),
        Values::Latents => 0.0,
    };
    let nll = (((log_p - dim * level)? / dim)?.neg()? - &out.logdets)?;
    Ok((nll / std::f64::consts::LN_2)?)
}

/// Fresh parameters like the reference's initialisation, from a seeded host RNG (reproducible):
/// Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 0.01^2),
/// LayerNorm weight 1 and bias 0, proj_out weight 0.
pub fn initial_parameters(cfg: &FlowConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    params::initial_parameters(&TarFlow::parameters(cfg)?, seed, device)
}

/// A trainable model: a VarMap holding seeded initial parameters, and the model built over it.
pub fn new_trainable(cfg: &FlowConfig, seed: u64, device: &Device) -> Result<(VarMap, TarFlow)> {
    let varmap = varmap_of(initial_parameters(cfg, seed, device)?)?;
    let model = TarFlow::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    Ok((varmap, model))
}

/// One score-based denoising step: `x <- x - sigma^2 * d/dx [sum over the batch of the per-sample
/// NLL]`, i.e. the gradient of the mean-reduced loss times N*C*H*W*sigma^2 (Tweedie's formula).
pub fn denoise(model: &TarFlow, x: &Tensor, labels: Option<&Tensor>, sigma: f64) -> Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let out = model.forward(xv.as_tensor(), labels)?;
    let loss = nll_loss(&out)?;
    let grads = loss.backward()?;
    let g = grads.get(xv.as_tensor()).context("no gradient reached the input")?;
    let lr = x.elem_count() as f64 * sigma * sigma;
    Ok((x - (g * lr)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal, Uniform};

    fn toy(img: usize, c_in: usize, p: usize, classes: usize, clip: Option<f64>) -> FlowConfig {
        FlowConfig {
            img_size: img,
            in_channels: c_in,
            patch_size: p,
            channels: 64,
            num_blocks: 2,
            layers_per_block: 2,
            num_classes: classes,
            clip_scale: clip,
        }
    }

    /// A trainable model whose zero-initialised output projections were randomised, so that the flow
    /// is far from the identity and gradients reach every parameter.
    fn perturbed(cfg: &FlowConfig, seed: u64, dtype: DType) -> (VarMap, TarFlow) {
        let dev = Device::Cpu;
        let mut params = initial_parameters(cfg, seed, &dev).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        let normal = Normal::new(0.0f32, 0.05).unwrap();
        for (name, t) in params.iter_mut() {
            if name.contains("proj_out") || name.contains(".norm.") {
                let noise: Vec<f32> = (0..t.elem_count()).map(|_| normal.sample(&mut rng)).collect();
                *t = (t.clone() + Tensor::from_vec(noise, t.dims(), &dev).unwrap()).unwrap();
            }
        }
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap();
            for (name, t) in params {
                data.insert(name, Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
            }
        }
        let model = TarFlow::new(VarBuilder::from_varmap(&varmap, dtype, &dev), cfg).unwrap();
        (varmap, model)
    }

    fn uniform_images(n: usize, cfg: &FlowConfig, seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let u = Uniform::new(-1.0f32, 1.0);
        let v: Vec<f32> = (0..n * cfg.image_dim()).map(|_| u.sample(&mut rng)).collect();
        Tensor::from_vec(v, (n, cfg.in_channels, cfg.img_size, cfg.img_size), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    #[test]
    fn patchify_roundtrip_and_channel_order() {
        // (1, 2, 4, 4) with value = c*100 + h*10 + w: token 1 is the patch at rows 0-1, cols 2-3.
        let v: Vec<f32> = (0..32).map(|i| ((i / 16) * 100 + ((i / 4) % 4) * 10 + i % 4) as f32).collect();
        let x = Tensor::from_vec(v, (1, 2, 4, 4), &Device::Cpu).unwrap();
        let t = patchify(&x, 2).unwrap();
        assert_eq!(t.dims(), &[1, 4, 8]);
        let tok1: Vec<f32> = t.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
        assert_eq!(tok1, vec![2., 3., 12., 13., 102., 103., 112., 113.]);
        let back = unpatchify(&t, 2, 2, 4).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    /// log|det dz/dx| from central finite differences equals the model's log-determinant
    /// (per-dimension mean, so times T*D). A 4-token toy (2x2 image, patch 1, 2 channels: T=4, D=2)
    /// in float64, with the soft clip on.
    #[test]
    fn logdet_matches_finite_difference_jacobian() {
        let cfg = toy(2, 2, 1, 0, Some(2.0));
        let (_vm, model) = perturbed(&cfg, 3, DType::F64);
        let x0 = uniform_images(1, &cfg, 4, DType::F64);
        let m = cfg.image_dim();
        let tok = model.patchify(&x0).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (t, d) = (cfg.num_tokens(), cfg.token_dim());
        let f = |v: &[f64]| -> Vec<f64> {
            let x = Tensor::from_vec(v.to_vec(), (1, t, d), &Device::Cpu).unwrap();
            model.forward_tokens(&x, None).unwrap().z.flatten_all().unwrap().to_vec1().unwrap()
        };
        let eps = 1e-5;
        let mut jac = vec![0f64; m * m];
        for j in 0..m {
            let (mut a, mut b) = (tok.clone(), tok.clone());
            a[j] += eps;
            b[j] -= eps;
            let (fa, fb) = (f(&a), f(&b));
            for i in 0..m {
                jac[i * m + j] = (fa[i] - fb[i]) / (2.0 * eps);
            }
        }
        // log|det| by Gaussian elimination with partial pivoting.
        let mut logdet = 0.0;
        for col in 0..m {
            let piv = (col..m).max_by(|&a, &b| jac[a * m + col].abs().total_cmp(&jac[b * m + col].abs())).unwrap();
            for k in 0..m {
                jac.swap(col * m + k, piv * m + k);
            }
            let p = jac[col * m + col];
            logdet += p.abs().ln();
            for r in col + 1..m {
                let fct = jac[r * m + col] / p;
                for k in col..m {
                    jac[r * m + k] -= fct * jac[col * m + k];
                }
            }
        }
        let x = Tensor::from_vec(tok.clone(), (1, t, d), &Device::Cpu).unwrap();
        let model_logdet = model.forward_tokens(&x, None).unwrap().logdets.to_vec1::<f64>().unwrap()[0] * m as f64;
        assert!(logdet.abs() > 0.05, "the toy flow is too close to volume preserving ({logdet})");
        assert!((logdet - model_logdet).abs() < 1e-6, "finite-difference log|det J| {logdet} vs model {model_logdet}");
    }

    /// Every parameter receives a non-zero gradient from the NLL loss (catches ops that silently
    /// drop gradients, like candle's fast softmax / layer_norm).
    #[test]
    fn every_parameter_gets_a_gradient() {
        let cfg = toy(8, 3, 2, 3, Some(3.0));
        let (vm, model) = perturbed(&cfg, 5, DType::F32);
        let x = uniform_images(4, &cfg, 6, DType::F32);
        let y = Tensor::new(&[0i64, 1, 2, -1], &Device::Cpu).unwrap();
        let loss = nll_loss(&model.forward(&x, Some(&y)).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let expected = initial_parameters(&cfg, 0, &Device::Cpu).unwrap().len();
        assert_eq!(data.len(), expected, "the model should read every initial parameter");
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "gradient of {name} is {norm}");
            if name.ends_with("qkv.weight") {
                // q and k are reached only through the softmax: check each third separately.
                for (part, label) in ["q", "k", "v"].iter().enumerate() {
                    let gp = g.narrow(0, part * cfg.channels, cfg.channels).unwrap();
                    let np = gp.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(np > 0.0, "the {label} rows of {name} get no gradient");
                }
            }
        }
    }

    /// After a few SGD steps on the NLL (a briefly trained model), the exact inverse undoes the
    /// forward pass within 1e-4, with and without labels and with the soft clip.
    #[test]
    fn exact_inverse_of_trained_model() {
        let cfg = toy(8, 1, 2, 2, Some(1.5));
        let (vm, model) = perturbed(&cfg, 7, DType::F32);
        let x = (uniform_images(8, &cfg, 8, DType::F32) * 0.9).unwrap();
        let y = Tensor::new(&[0i64, 1, 0, 1, -1, 0, 1, -1], &Device::Cpu).unwrap();
        let first = nll_loss(&model.forward(&x, Some(&y)).unwrap()).unwrap().to_scalar::<f32>().unwrap();
        let mut last = first;
        for _ in 0..10 {
            let loss = nll_loss(&model.forward(&x, Some(&y)).unwrap()).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            let grads = loss.backward().unwrap();
            for var in vm.all_vars() {
                let g = grads.get(var.as_tensor()).unwrap();
                var.set(&(var.as_tensor() - (g * 0.05).unwrap()).unwrap()).unwrap();
            }
        }
        assert!(last < first, "SGD did not lower the loss ({first} -> {last})");
        let out = model.forward(&x, Some(&y)).unwrap();
        let back = model.reverse(&out.z, Some(&y), &ReverseOptions::default(), |_, _| Ok(())).unwrap();
        let err = (back - &x).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 1e-4, "inverse of forward differs by {err}");
    }

    #[test]
    fn bad_labels_and_configs_are_clear_errors() {
        let cfg = toy(8, 1, 2, 2, None);
        let (_vm, model) = perturbed(&cfg, 9, DType::F32);
        let x = uniform_images(2, &cfg, 1, DType::F32);
        let e = model.forward(&x, Some(&Tensor::new(&[0i64, 5], &Device::Cpu).unwrap())).err().unwrap();
        assert!(e.to_string().contains("out of range"), "{e}");
        let mut bad = cfg.clone();
        bad.channels = 100;
        assert!(bad.validate().unwrap_err().to_string().contains("multiple of the head size"));
        bad = cfg.clone();
        bad.patch_size = 3;
        assert!(bad.validate().is_err());
    }
}
