//! The reverse model G of BiFlow (Lu et al. 2025, §3): noise tokens to CLEAN data in one evaluation.
//!
//! G is a bidirectional transformer over F's T tokens. Its input is `proj_in(z) + pos` plus a class
//! embedding (the mean embedding for no label) and an embedding of the guidance scale w. Then B
//! stages mirror F's blocks in reverse order; after stage j a head phi_j reads the hidden state out
//! in token space, to be aligned with the forward state x^{B-j} it mirrors (the heads serve the loss
//! only; sampling skips them). A final learned-denoising block and `proj_out` give x'.
//!
//! Parameter names (the checkpoint format):
//!   proj_in, pos_embed (T, C), class_embed (K, C), cfg_embed (Linear(16, C)),
//!   stages.{j}.{l}.{attention,mlp}.*, heads.{j}.{norm,proj}, denoise.{l}.*, norm_out, proj_out.

pub mod loss;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use std::sync::OnceLock;

use crate::models::flow::{FlowConfig, HEAD_DIM};
use crate::models::layers::{label_indices, AttentionBlock, LayerNorm, Linear};
use crate::models::params::{self, varmap_of, Named, Param, EMBEDDING};
use crate::engines::{Frozen, Places, ReverseGrad, ReverseParams};

/// Sine/cosine features of the guidance scale fed to `cfg_embed`.
pub(crate) const CFG_FEATURES: usize = 16;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReverseConfig {
    /// T and D: F's tokens.
    pub num_tokens: usize,
    pub token_dim: usize,
    /// 0 = unconditional (then there is no guidance embedding either).
    pub num_classes: usize,
    pub channels: usize,
    /// B: one stage per block of F.
    pub stages: usize,
    pub layers_per_stage: usize,
    /// Layers of the learned-denoising block (0: G stops at x~, F's score step denoises).
    pub denoise_layers: usize,
    /// The projection heads phi_j (the hidden-alignment loss needs them; the others do not).
    pub heads: bool,
}

impl ReverseConfig {
    /// G for the forward model `f`, `channels` wide.
    pub fn for_flow(f: &FlowConfig, channels: usize, layers_per_stage: usize, denoise_layers: usize, heads: bool) -> ReverseConfig {
        ReverseConfig {
            num_tokens: f.num_tokens(),
            token_dim: f.token_dim(),
            num_classes: f.num_classes,
            channels,
            stages: f.num_blocks,
            layers_per_stage,
            denoise_layers,
            heads,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.channels > 0 && self.channels % HEAD_DIM == 0,
            "--channels must be a positive multiple of {HEAD_DIM} (the attention head size), got {}",
            self.channels
        );
        ensure!(self.layers_per_stage > 0, "--layers-per-stage must be at least 1");
        ensure!(self.stages > 0 && self.num_tokens > 0 && self.token_dim > 0, "G needs at least one stage and one token");
        Ok(())
    }

    pub fn guided(&self) -> bool {
        self.num_classes > 0
    }
}

/// What one evaluation of G gives.
pub struct ReverseOutput {
    /// x': (N, T, D).
    pub x: Tensor,
    /// phi_j(h_j) for stages j = 1..B, each (N, T, D); empty when not asked for or G has no heads.
    pub heads: Vec<Tensor>,
    /// The hidden states h_j after each stage, (N, T, C); empty when not asked for.
    pub states: Vec<Tensor>,
}

/// A per-token projection head: LayerNorm -> Linear(C, D).
struct Head {
    norm: LayerNorm,
    proj: Linear,
}

impl Head {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.norm.forward(h)?)
    }
}

pub struct ReverseModel {
    cfg: ReverseConfig,
    proj_in: Linear,
    pos_embed: Tensor,
    class_embed: Option<Tensor>,
    cfg_embed: Option<Linear>,
    stages: Vec<Vec<AttentionBlock>>,
    heads: Vec<Head>,
    denoise: Vec<AttentionBlock>,
    norm_out: LayerNorm,
    proj_out: Linear,
    /// Every parameter with its name, as [`ReverseModel::parameters`] lists them.
    params: Named,
    /// The CPU's hand-written sampling pass over host copies of the weights, made on first use.
    host: OnceLock<Option<Frozen<ReverseGrad>>>,
}

impl ReverseModel {
    pub fn new(vb: VarBuilder, cfg: &ReverseConfig) -> Result<ReverseModel> {
        cfg.validate()?;
        let (model, params) = params::load(&vb, |vb| Self::modules(vb, cfg)).context("the weights do not match the reverse model's configuration")?;
        Ok(ReverseModel { params, ..model })
    }

    /// G's parameter list (checkpoint names, shapes, initialisation), read off its modules.
    pub fn parameters(cfg: &ReverseConfig) -> Result<Vec<Param>> {
        cfg.validate()?;
        params::parameter_list(|vb| Self::modules(vb, cfg))
    }

    /// The modules over `vb`, in the order of the parameter list (stage j, then its head).
    fn modules(vb: VarBuilder, cfg: &ReverseConfig) -> Result<ReverseModel> {
        let (t, d, c) = (cfg.num_tokens, cfg.token_dim, cfg.channels);
        let layers = |vb: VarBuilder, n: usize| (0..n).map(|l| AttentionBlock::new(vb.pp(l), c, false)).collect::<Result<Vec<_>>>();
        let proj_in = Linear::new(vb.pp("proj_in"), d, c)?;
        let pos_embed = vb.get_with_hints((t, c), "pos_embed", EMBEDDING)?;
        let (class_embed, cfg_embed) = if cfg.guided() {
            (Some(vb.get_with_hints((cfg.num_classes, c), "class_embed", EMBEDDING)?), Some(Linear::new(vb.pp("cfg_embed"), CFG_FEATURES, c)?))
        } else {
            (None, None)
        };
        let (mut stages, mut heads) = (Vec::new(), Vec::new());
        for j in 0..cfg.stages {
            stages.push(layers(vb.pp("stages").pp(j), cfg.layers_per_stage)?);
            if cfg.heads {
                let vb = vb.pp("heads").pp(j);
                heads.push(Head { norm: LayerNorm::new(vb.pp("norm"), c)?, proj: Linear::new(vb.pp("proj"), c, d)? });
            }
        }
        Ok(ReverseModel {
            cfg: cfg.clone(),
            proj_in,
            pos_embed,
            class_embed,
            cfg_embed,
            stages,
            heads,
            denoise: layers(vb.pp("denoise"), cfg.denoise_layers)?,
            norm_out: LayerNorm::new(vb.pp("norm_out"), c)?,
            proj_out: Linear::new(vb.pp("proj_out"), c, d)?,
            params: Named::new(),
            host: OnceLock::new(),
        })
    }

    /// G's hand-written passes over a parameter list holding this model's parameters in the order
    /// of `order`, of `sizes`.
    pub fn engine(&self, order: &[String], sizes: &[usize]) -> Result<ReverseGrad> {
        let p = Places::new(&self.params, order)?;
        let layers = self.stages.iter().flatten().chain(&self.denoise).map(|l| l.places(&p)).collect::<Result<_>>()?;
        let heads = self.heads.iter().map(|h| Ok((h.norm.places(&p)?, h.proj.places(&p)?))).collect::<Result<_>>()?;
        let class = match (&self.class_embed, &self.cfg_embed) {
            (Some(table), Some(embed)) => Some((p.of(table)?, embed.places(&p)?)),
            _ => None,
        };
        let places = ReverseParams { proj_in: self.proj_in.places(&p)?, pos: p.of(&self.pos_embed)?, class, layers, heads, norm_out: self.norm_out.places(&p)?, proj_out: self.proj_out.places(&p)? };
        ReverseGrad::new(&self.cfg, places, sizes)
    }

    pub fn config(&self) -> &ReverseConfig {
        &self.cfg
    }

    /// x' = G(z | y, w) (N, T, D): one evaluation, for sampling. On the CPU this is the hand-written
    /// pass (engines::ReverseGrad, in cache-sized groups of samples); elsewhere [`Self::forward`].
    pub fn sample(&self, z: &Tensor, labels: Option<&Tensor>, guidance: Option<&[f32]>) -> Result<Tensor> {
        let frozen = Frozen::get_or_make(&self.host, || self.params.clone(), |names, sizes, values| self.engine(names, sizes)?.frozen(values));
        let Some(host) = frozen? else {
            return Ok(self.forward(z, labels, guidance, false)?.x);
        };
        let (n, t, d) = z.dims3()?;
        ensure!(t == self.cfg.num_tokens && d == self.cfg.token_dim, "G takes noise tokens N,{},{}, got N,{t},{d}", self.cfg.num_tokens, self.cfg.token_dim);
        let labels: Option<Vec<i64>> = labels.map(|y| y.flatten_all()?.to_dtype(DType::I64)?.to_vec1()).transpose()?;
        let w = guidance.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; n]);
        let params = host.params();
        let z_host: Vec<f32> = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let x = host.engine.sample(&params, &z_host, labels.as_deref(), &w)?;
        Ok(Tensor::from_vec(x, (n, t, d), z.device())?.to_dtype(z.dtype())?)
    }

    /// G(z | y, w): z (N, T, D) noise tokens, labels (N, -1 = none) or None, guidance scales w (N)
    /// or None (= 0). With `with_heads`, also the head outputs and hidden states the losses read.
    pub fn forward(&self, z: &Tensor, labels: Option<&Tensor>, guidance: Option<&[f32]>, with_heads: bool) -> Result<ReverseOutput> {
        let (n, t, d) = z.dims3()?;
        ensure!(
            t == self.cfg.num_tokens && d == self.cfg.token_dim,
            "G takes noise tokens N,{},{}, got N,{t},{d}",
            self.cfg.num_tokens,
            self.cfg.token_dim
        );
        let mut h = self.proj_in.forward(z)?.broadcast_add(&self.pos_embed)?;
        if let Some(table) = &self.class_embed {
            // Row K of [table; mean] is the embedding of "no label".
            let full = Tensor::cat(&[table, &table.mean_keepdim(0)?], 0)?;
            let idx = match labels {
                Some(y) => label_indices(y, self.cfg.num_classes)?,
                None => Tensor::from_vec(vec![self.cfg.num_classes as u32; n], n, z.device())?,
            };
            h = h.broadcast_add(&full.index_select(&idx, 0)?.unsqueeze(1)?)?;
            let w = guidance.map(|w| w.to_vec()).unwrap_or_else(|| vec![0.0; n]);
            ensure!(w.len() == n, "got {} guidance scales for {n} samples", w.len());
            let features = Tensor::from_vec(guidance_features(&w), (n, CFG_FEATURES), z.device())?.to_dtype(h.dtype())?;
            h = h.broadcast_add(&self.cfg_embed.as_ref().unwrap().forward(&features)?.unsqueeze(1)?)?;
        } else {
            ensure!(guidance.is_none_or(|w| w.iter().all(|&w| w == 0.0)), "guidance needs a class-conditional model");
        }
        let (mut heads, mut states) = (Vec::new(), Vec::new());
        for (j, stage) in self.stages.iter().enumerate() {
            for layer in stage {
                h = layer.forward(&h)?;
            }
            if with_heads {
                if let Some(head) = self.heads.get(j) {
                    heads.push(head.forward(&h)?);
                }
                states.push(h.clone());
            }
        }
        for layer in &self.denoise {
            h = layer.forward(&h)?;
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&h)?)?;
        Ok(ReverseOutput { x, heads, states })
    }
}

/// [sin(k pi s), cos(k pi s)] for k = 1..8 with s = w / (1 + w) in [0, 1): bounded features of an
/// unbounded scale, smooth at w = 0.
pub(crate) fn guidance_features(w: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len() * CFG_FEATURES);
    for &w in w {
        let s = w / (1.0 + w);
        for k in 1..=CFG_FEATURES / 2 {
            let a = std::f32::consts::PI * k as f32 * s;
            out.push(a.sin());
            out.push(a.cos());
        }
    }
    out
}

/// Fresh parameters: PyTorch-style linears and LayerNorms, N(0, 0.01^2) embeddings.
pub fn initial_parameters(cfg: &ReverseConfig, seed: u64, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
    params::initial_parameters(&ReverseModel::parameters(cfg)?, seed, device)
}

/// A trainable G: its variables and the model built over them.
pub fn new_trainable(cfg: &ReverseConfig, seed: u64, device: &Device) -> Result<(VarMap, ReverseModel)> {
    let varmap = varmap_of(initial_parameters(cfg, seed, device)?)?;
    let model = ReverseModel::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    Ok((varmap, model))
}
