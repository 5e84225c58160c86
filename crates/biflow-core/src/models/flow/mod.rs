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

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use crate::engines::{self, Frozen, NllGrad};
use crate::engines::ops;

/// Attention head size, fixed by the reference.
pub const HEAD_DIM: usize = 64;
/// MLP expansion factor, fixed by the reference.
pub const MLP_EXPANSION: usize = 4;
/// LayerNorm epsilon (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowConfig {
    pub img_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub num_blocks: usize,
    pub layers_per_block: usize,
    /// Number of classes; 0 = unconditional.
    #[serde(default)]
    pub num_classes: usize,
    /// Soft clip `c * tanh(a / c)` of the log-scales a (BiFlow's forward-side norm control); None = off.
    #[serde(default)]
    pub clip_scale: Option<f64>,
}

impl FlowConfig {
    /// T: the number of patch tokens.
    pub fn num_tokens(&self) -> usize {
        let s = self.img_size / self.patch_size.max(1);
        s * s
    }
    /// D: the size of one token.
    pub fn token_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }
    /// C*H*W: the number of dimensions of one image.
    pub fn image_dim(&self) -> usize {
        self.in_channels * self.img_size * self.img_size
    }
    pub fn num_heads(&self) -> usize {
        self.channels / HEAD_DIM
    }
    /// Check that the numbers make a model.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.img_size > 0 && self.in_channels > 0, "image size and channels must be positive");
        ensure!(self.patch_size > 0, "patch size must be positive");
        ensure!(
            self.img_size % self.patch_size == 0,
            "image size {} is not a multiple of the patch size {}",
            self.img_size,
            self.patch_size
        );
        ensure!(self.num_tokens() >= 2, "the model needs at least 2 tokens (image size / patch size >= 2)");
        ensure!(
            self.channels > 0 && self.channels % HEAD_DIM == 0,
            "channels ({}) must be a positive multiple of the head size {HEAD_DIM}",
            self.channels
        );
        ensure!(self.num_blocks > 0, "the model needs at least one block");
        ensure!(self.layers_per_block > 0, "each block needs at least one layer");
        if let Some(c) = self.clip_scale {
            ensure!(c.is_finite() && c > 0.0, "clip scale must be a positive number, got {c}");
        }
        Ok(())
    }
}

/// y = x W^T + b over the last dimension, for inputs of any rank.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub(crate) fn new(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Linear { weight: vb.get((d_out, d_in), "weight")?, bias: vb.get(d_out, "bias")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias)
    }
    pub(crate) fn named(&self, prefix: &str, out: &mut Named) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// A model's parameters with their checkpoint names (for the hand-written CPU passes).
pub(crate) type Named = Vec<(String, Tensor)>;

/// LayerNorm over the last dimension with an affine weight and bias (differentiable).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub(crate) fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")? })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, LN_EPS)
    }
    pub(crate) fn named(&self, prefix: &str, out: &mut Named) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// One layer's key/value cache for causal decoding: (N, H, T, hd) buffers filled token by token.
struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Multi-head self-attention: LayerNorm -> qkv -> softmax(q k^T / sqrt(64)) v -> proj; causal in F,
/// bidirectional in G.
pub struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    heads: usize,
    causal: bool,
}

impl Attention {
    fn new(vb: VarBuilder, channels: usize, causal: bool) -> Result<Self> {
        Ok(Attention {
            norm: LayerNorm::new(vb.pp("norm"), channels)?,
            qkv: Linear::new(vb.pp("qkv"), channels, 3 * channels)?,
            proj: Linear::new(vb.pp("proj"), channels, channels)?,
            heads: channels / HEAD_DIM,
            causal,
        })
    }

    /// Attention over all of x: (N, T, C).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?;
        self.proj.forward(&ops::attention(&qkv, self.heads, 1.0 / (HEAD_DIM as f64).sqrt(), self.causal)?)
    }

    /// One decoding step: x (N, 1, C) is the token at position `cache.len`; attends to the cache and
    /// itself. `scale` is per sample (N) so that a batch can mix attention temperatures.
    fn step(&self, x: &Tensor, cache: &mut KvCache, scale: &Tensor) -> Result<Tensor> {
        let (n, _, c) = x.dims3()?;
        let h = self.norm.forward(x)?;
        let qkv = self.qkv.forward(&h)?.reshape((n, 3, self.heads, 1, HEAD_DIM))?;
        let q = qkv.i((.., 0))?.contiguous()?; // (N, H, 1, hd)
        let k = qkv.i((.., 1))?.contiguous()?;
        let v = qkv.i((.., 2))?.contiguous()?;
        cache.k.slice_set(&k, 2, cache.len)?;
        cache.v.slice_set(&v, 2, cache.len)?;
        cache.len += 1;
        let ks = cache.k.narrow(2, 0, cache.len)?;
        let vs = cache.v.narrow(2, 0, cache.len)?;
        let scores = crate::device::mode::matmul(&q, &ks.t()?)?.broadcast_mul(&scale.reshape((n, 1, 1, 1))?)?; // (N, H, 1, t)
        let att = candle_nn::ops::softmax_last_dim(&scores)?; // inference only: no gradient needed
        // (N, H, 1, hd) has the memory layout of (N, 1, H, hd): heads merge by a reshape.
        let y = crate::device::mode::matmul(&att, &vs)?.reshape((n, 1, c))?;
        self.proj.forward(&y)
    }
}

/// LayerNorm -> Linear(c, 4c) -> exact GELU -> Linear(4c, c).
pub struct Mlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Mlp {
            norm: LayerNorm::new(vb.pp("norm"), channels)?,
            fc1: Linear::new(vb.pp("main.0"), channels, channels * MLP_EXPANSION)?,
            fc2: Linear::new(vb.pp("main.2"), channels * MLP_EXPANSION, channels)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&self.norm.forward(x)?)?;
        self.fc2.forward(&ops::gelu(&h)?)
    }
}

/// A pre-LN transformer layer: x + attn(x), then + mlp(x).
pub struct AttentionBlock {
    attention: Attention,
    mlp: Mlp,
}

impl AttentionBlock {
    pub(crate) fn new(vb: VarBuilder, channels: usize, causal: bool) -> Result<Self> {
        Ok(AttentionBlock { attention: Attention::new(vb.pp("attention"), channels, causal)?, mlp: Mlp::new(vb.pp("mlp"), channels)? })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.forward(x)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
    }
    pub(crate) fn named(&self, prefix: &str, out: &mut Named) {
        self.attention.norm.named(&format!("{prefix}.attention.norm"), out);
        self.attention.qkv.named(&format!("{prefix}.attention.qkv"), out);
        self.attention.proj.named(&format!("{prefix}.attention.proj"), out);
        self.mlp.norm.named(&format!("{prefix}.mlp.norm"), out);
        self.mlp.fc1.named(&format!("{prefix}.mlp.main.0"), out);
        self.mlp.fc2.named(&format!("{prefix}.mlp.main.2"), out);
    }
    fn step(&self, x: &Tensor, cache: &mut KvCache, scale: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.step(x, cache, scale)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
    }
}

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
        let class_embed = if cfg.num_classes > 0 { Some(vb.get((cfg.num_classes, 1, c), "class_embed")?) } else { None };
        let layers = (0..cfg.layers_per_block)
            .map(|j| AttentionBlock::new(vb.pp(format!("attn_blocks.{j}")), c, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(FlowBlock {
            proj_in: Linear::new(vb.pp("proj_in"), d, c)?,
            pos_embed: vb.get((t, c), "pos_embed")?,
            class_embed,
            layers,
            proj_out: Linear::new(vb.pp("proj_out"), c, 2 * d)?,
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
            clip: self.clip_scale.map(|c| c as f32),
        })
    }
}

/// Map labels (N, i64; -1 = dropped) to rows of [class_embed; mean] (index K for -1).
pub(crate) fn label_indices(y: &Tensor, k: usize) -> Result<Tensor> {
    let v: Vec<i64> = y.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let mut idx = Vec::with_capacity(v.len());
    for l in v {
        if l == -1 {
            idx.push(k as u32);
        } else if l >= 0 && (l as usize) < k {
            idx.push(l as u32);
        } else {
            bail!("label {l} is out of range: the model has {k} classes (use -1 for no label)");
        }
    }
    let len = idx.len();
    Ok(Tensor::from_vec(idx, len, y.device())?)
}

/// Progress and the guidance schedule of one causal decoding.
struct Steps<'a> {
    guided: bool,
    opts: &'a ReverseOptions,
    done: usize,
    total: usize,
}

impl Steps<'_> {
    /// The guidance scale at step `i` of a block of `t` tokens (annealed: rising linearly to w).
    fn guidance_at(&self, i: usize, t: usize) -> f64 {
        if self.opts.annealed {
            self.opts.guidance * (i + 1) as f64 / (t - 1) as f64
        } else {
            self.opts.guidance
        }
    }

    fn advance(&mut self, on_step: &mut impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
        self.done += 1;
        on_step(self.done, self.total)
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

/// Settings of exact (causal-decoding) sampling.
#[derive(Clone, Debug)]
pub struct ReverseOptions {
    /// Classifier-free guidance weight w (0 = off).
    pub guidance: f64,
    /// Anneal the guidance weight as w (i+1)/(T-1).
    pub annealed: bool,
    /// Attention temperature of the guiding (unconditional) pass.
    pub attn_temp: f64,
}

impl Default for ReverseOptions {
    fn default() -> Self {
        ReverseOptions { guidance: 0.0, annealed: false, attn_temp: 1.0 }
    }
}

/// TARFlow: patchify, then B flow blocks with alternating token order.
pub struct TarFlow {
    cfg: FlowConfig,
    blocks: Vec<FlowBlock>,
    /// The reference's prior variance buffer `var` (T, D), used to scale z before decoding.
    var: Option<Tensor>,
    device: Device,
    /// The CPU's hand-written forward pass over host copies of the weights, made on first use.
    host: OnceLock<Option<Frozen<NllGrad>>>,
}

impl TarFlow {
    /// Build the model with parameters from `vb` (reference state_dict names).
    pub fn new(vb: VarBuilder, cfg: &FlowConfig) -> Result<TarFlow> {
        cfg.validate()?;
        ops::tune_allocator();
        let blocks = (0..cfg.num_blocks)
            .map(|i| FlowBlock::new(vb.pp(format!("blocks.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()
            .context("the weights do not match the model configuration")?;
        let var = if vb.contains_tensor("var") { Some(vb.get((cfg.num_tokens(), cfg.token_dim()), "var")?) } else { None };
        Ok(TarFlow { cfg: cfg.clone(), blocks, var, device: vb.device().clone(), host: OnceLock::new() })
    }

    /// Every parameter with its reference name (the prior's `var` buffer excepted).
    fn named_parameters(&self) -> Named {
        let mut out = Named::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let b = format!("blocks.{i}");
            block.proj_in.named(&format!("{b}.proj_in"), &mut out);
            out.push((format!("{b}.pos_embed"), block.pos_embed.clone()));
            if let Some(table) = &block.class_embed {
                out.push((format!("{b}.class_embed"), table.clone()));
            }
            for (j, layer) in block.layers.iter().enumerate() {
                layer.named(&format!("{b}.attn_blocks.{j}"), &mut out);
            }
            block.proj_out.named(&format!("{b}.proj_out"), &mut out);
        }
        out
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
            let frozen = Frozen::get_or_make(&self.host, || self.named_parameters(), |names, sizes, values| NllGrad::new(&self.cfg, names, sizes)?.frozen(values))?;
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

    /// The exact inverse: noise tokens z (N, T, D) -> tokens x (N, T, D), by causal decoding with a KV
    /// cache (B*(T-1) sequential steps), with optional classifier-free guidance. `on_step(done, total)`
    /// is called after each step and may return an error to stop (cancellation).
    pub fn reverse_tokens(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        opts: &ReverseOptions,
        on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, d) = z.dims3()?;
        ensure!(
            t == self.cfg.num_tokens() && d == self.cfg.token_dim(),
            "noise tokens must be N,{},{} for this model, got N,{t},{d}",
            self.cfg.num_tokens(),
            self.cfg.token_dim()
        );
        if let Some(y) = labels {
            ensure!(y.elem_count() == n, "got {} labels for {n} samples", y.elem_count());
        }
        ensure!(opts.attn_temp > 0.0, "attention temperature must be positive");
        let dtype = self.blocks[0].pos_embed.dtype();
        let z = z.to_dtype(DType::F32)?.to_device(&self.device)?;
        let z = match &self.var {
            Some(v) => z.broadcast_mul(&v.to_dtype(DType::F32)?.sqrt()?)?,
            None => z,
        };
        let labels = if self.cfg.num_classes == 0 { None } else { labels };
        let guided = opts.guidance != 0.0;
        // With guidance, the batch is doubled: [conditional | guiding (mean class, attn_temp)].
        let base_scale = 1.0 / (HEAD_DIM as f64).sqrt();
        let mut scales = vec![base_scale as f32; n];
        if guided {
            scales.extend(std::iter::repeat((base_scale / opts.attn_temp) as f32).take(n));
        }
        let steps = Steps { guided, opts, done: 0, total: self.blocks.len() * (t - 1) };
        // CPU f32: the host decoder; elsewhere candle ops with the KV caches and tokens on the device.
        if crate::device::mode::current().fused && self.device.is_cpu() && dtype == DType::F32 {
            self.decode_on_host(&z, labels, scales, steps, on_step)
        } else {
            self.decode_on_device(&z, labels, scales, steps, on_step)
        }
    }

    /// The class rows of a decoding batch: [conditional | mean class] when guided.
    fn decoding_class(&self, block: &FlowBlock, labels: Option<&Tensor>, n: usize, guided: bool) -> Result<Option<Tensor>> {
        let cond = block.class_embedding(labels, n)?;
        Ok(match (cond, guided) {
            (Some(c), true) => Some(Tensor::cat(&[&c, &block.class_embedding(None, n)?.unwrap()], 0)?),
            (c, _) => c,
        })
    }

    /// Causal decoding with the host decoder (ops/decode.rs), one token of every sample at a time.
    fn decode_on_host(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        scales: Vec<f32>,
        mut steps: Steps,
        mut on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, d) = z.dims3()?;
        let nb = scales.len();
        let mut x: Vec<f32> = z.flatten_all()?.to_vec1()?;
        for block in self.blocks.iter().rev() {
            let class = self.decoding_class(block, labels, n, steps.guided)?;
            let host_block = block.host_decoder(class.as_ref())?;
            let mut decoder = engines::BlockDecoder::new(&host_block, scales.clone())?;
            // Work in this block's token order.
            let perm = |i: usize| if block.flip { t - 1 - i } else { i };
            let (mut a, mut b) = (vec![0f32; nb * d], vec![0f32; nb * d]);
            let mut tok = vec![0f32; nb * d];
            for i in 0..t - 1 {
                for s in 0..n {
                    let off = (s * t + perm(i)) * d;
                    tok[s * d..(s + 1) * d].copy_from_slice(&x[off..off + d]);
                }
                if steps.guided {
                    tok.copy_within(0..n * d, n * d);
                }
                decoder.step(&tok, perm(i), &mut a, &mut b);
                if steps.guided {
                    // a += g (a - a_u), b += g (b - b_u): conditional rows first, guiding rows after.
                    let g = steps.guidance_at(i, t) as f32;
                    for v in [&mut a, &mut b] {
                        let (cond, uncond) = v.split_at_mut(n * d);
                        cond.iter_mut().zip(uncond.iter()).for_each(|(c, u)| *c += (*c - u) * g);
                    }
                }
                for s in 0..n {
                    let off = (s * t + perm(i + 1)) * d;
                    for j in 0..d {
                        let xv = &mut x[off + j];
                        *xv = *xv * a[s * d + j].exp() + b[s * d + j];
                    }
                }
                steps.advance(&mut on_step)?;
            }
        }
        Ok(Tensor::from_vec(x, (n, t, d), &self.device)?)
    }

    /// Causal decoding with candle ops: the KV caches, tokens and guidance stay on the model's device
    /// (no host round trip per step, which would stall a GPU B*(T-1) times).
    fn decode_on_device(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        scales: Vec<f32>,
        mut steps: Steps,
        mut on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, _) = z.dims3()?;
        let nb = scales.len();
        let dtype = self.blocks[0].pos_embed.dtype();
        let scale = Tensor::from_vec(scales, nb, &self.device)?.to_dtype(dtype)?;
        let heads = self.cfg.num_heads();
        let mut x = z.clone();
        for block in self.blocks.iter().rev() {
            let class = self.decoding_class(block, labels, n, steps.guided)?;
            let mut caches = (0..block.layers.len())
                .map(|_| -> Result<KvCache> {
                    Ok(KvCache {
                        k: Tensor::zeros((nb, heads, t, HEAD_DIM), dtype, &self.device)?,
                        v: Tensor::zeros((nb, heads, t, HEAD_DIM), dtype, &self.device)?,
                        len: 0,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Tokens in this block's order, (N, 1, D) each, f32.
            let xp = block.permute(&x, 1)?;
            let mut tokens = (0..t).map(|i| xp.narrow(1, i, 1)).collect::<candle_core::Result<Vec<_>>>()?;
            for i in 0..t - 1 {
                let tok = if steps.guided { Tensor::cat(&[&tokens[i], &tokens[i]], 0)? } else { tokens[i].clone() };
                let (a, b) = block.step(&tok.to_dtype(dtype)?, i, class.as_ref(), &mut caches, &scale)?;
                let (mut a, mut b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                if steps.guided {
                    let g = steps.guidance_at(i, t);
                    let guide = |v: &Tensor| -> Result<Tensor> {
                        let (c, u) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
                        Ok((&c + ((&c - u)? * g)?)?)
                    };
                    (a, b) = (guide(&a)?, guide(&b)?);
                }
                tokens[i + 1] = tokens[i + 1].broadcast_mul(&a.exp()?.unsqueeze(1)?)?.broadcast_add(&b.unsqueeze(1)?)?;
                steps.advance(&mut on_step)?;
            }
            x = block.permute(&Tensor::cat(&tokens, 1)?, 1)?;
        }
        Ok(x)
    }

    /// The exact inverse to images: z tokens (N, T, D) -> (N, C, H, W).
    pub fn reverse(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        opts: &ReverseOptions,
        on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        self.unpatchify(&self.reverse_tokens(z, labels, opts, on_step)?)
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

/// Bits per dimension per sample (N), for data in [-1, 1] with uniform dequantisation:
/// `(-(sum(-0.5 (z^2 + log 2 pi)) - D log 128) / D - logdets) / ln 2`, D = C*H*W.
pub fn bits_per_dim(out: &FlowOutput, cfg: &FlowConfig) -> Result<Tensor> {
    let dim = cfg.image_dim() as f64;
    let n = out.z.dim(0)?;
    let log_2pi = (2.0 * std::f64::consts::PI).ln();
    let log_p = ((out.z.sqr()? + log_2pi)? * -0.5)?.reshape((n, ()))?.sum(1)?; // (N)
    let nll = (((log_p - dim * 128f64.ln())? / dim)?.neg()? - &out.logdets)?;
    Ok((nll / std::f64::consts::LN_2)?)
}

/// Fresh parameters like the reference's initialisation, from a seeded host RNG (reproducible):
/// Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 0.01^2),
/// LayerNorm weight 1 and bias 0, proj_out weight 0.
pub fn initial_parameters(cfg: &FlowConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let (t, d, c) = (cfg.num_tokens(), cfg.token_dim(), cfg.channels);
    let mut init = ParamInit::new(seed, device);
    for i in 0..cfg.num_blocks {
        let p = format!("blocks.{i}");
        init.linear(&format!("{p}.proj_in"), d, c)?;
        init.embedding(&format!("{p}.pos_embed"), &[t, c])?;
        if cfg.num_classes > 0 {
            init.embedding(&format!("{p}.class_embed"), &[cfg.num_classes, 1, c])?;
        }
        for j in 0..cfg.layers_per_block {
            init.transformer_layer(&format!("{p}.attn_blocks.{j}"), c)?;
        }
        init.zero_linear(&format!("{p}.proj_out"), c, 2 * d)?;
    }
    Ok(init.params)
}

/// Seeded initial parameters, drawn in the order they are asked for (F and G share it).
pub(crate) struct ParamInit {
    rng: rand::rngs::StdRng,
    device: Device,
    pub params: HashMap<String, Tensor>,
}

impl ParamInit {
    pub fn new(seed: u64, device: &Device) -> ParamInit {
        ParamInit { rng: rand::rngs::StdRng::seed_from_u64(seed), device: device.clone(), params: HashMap::new() }
    }

    fn put(&mut self, name: String, values: Vec<f32>, shape: &[usize]) -> Result<()> {
        self.params.insert(name, Tensor::from_vec(values, shape, &self.device)?);
        Ok(())
    }

    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        let u = Uniform::new(-bound, bound);
        (0..n).map(|_| u.sample(&mut self.rng)).collect()
    }

    /// Weight and bias U(-1/sqrt(d_in), 1/sqrt(d_in)) (PyTorch's nn.Linear).
    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<()> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = self.uniform(d_in * d_out, bound);
        let b = self.uniform(d_out, bound);
        self.put(format!("{name}.weight"), w, &[d_out, d_in])?;
        self.put(format!("{name}.bias"), b, &[d_out])
    }

    /// A linear layer whose weight starts at zero (the bias as in [`Self::linear`]).
    pub fn zero_linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<()> {
        let b = self.uniform(d_out, 1.0 / (d_in as f32).sqrt());
        self.put(format!("{name}.weight"), vec![0.0; d_in * d_out], &[d_out, d_in])?;
        self.put(format!("{name}.bias"), b, &[d_out])
    }

    /// N(0, 0.01^2) entries.
    pub fn embedding(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let normal = Normal::new(0.0f32, 0.01).unwrap();
        let v = (0..shape.iter().product::<usize>()).map(|_| normal.sample(&mut self.rng)).collect();
        self.put(name.to_string(), v, shape)
    }

    /// Weight 1, bias 0.
    pub fn layer_norm(&mut self, name: &str, dim: usize) -> Result<()> {
        self.put(format!("{name}.weight"), vec![1.0; dim], &[dim])?;
        self.put(format!("{name}.bias"), vec![0.0; dim], &[dim])
    }

    /// An [`AttentionBlock`] of width `c` under `prefix`.
    pub fn transformer_layer(&mut self, prefix: &str, c: usize) -> Result<()> {
        self.layer_norm(&format!("{prefix}.attention.norm"), c)?;
        self.layer_norm(&format!("{prefix}.mlp.norm"), c)?;
        self.linear(&format!("{prefix}.attention.qkv"), c, 3 * c)?;
        self.linear(&format!("{prefix}.attention.proj"), c, c)?;
        self.linear(&format!("{prefix}.mlp.main.0"), c, MLP_EXPANSION * c)?;
        self.linear(&format!("{prefix}.mlp.main.2"), MLP_EXPANSION * c, c)
    }
}

/// A VarMap holding `params` as trainable variables.
pub(crate) fn varmap_of(params: HashMap<String, Tensor>) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in params {
            data.insert(name, candle_core::Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// A trainable model: a VarMap holding seeded initial parameters, and the model built over it.
pub fn new_trainable(cfg: &FlowConfig, seed: u64, device: &Device) -> Result<(VarMap, TarFlow)> {
    let varmap = varmap_of(initial_parameters(cfg, seed, device)?)?;
    let model = TarFlow::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    Ok((varmap, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
