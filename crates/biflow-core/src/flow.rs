//! STAND-IN for the flow-model helper's TARFlow (branch `flow-model`): the same public API as the
//! shared contract, with a deliberately tiny causal affine flow inside, so that the trainer can be
//! built and tested before the real model lands. Replaced wholesale by `git checkout flow-model -- flow.rs`.

use candle_core::{Result, Tensor, D};
use candle_nn::{Module, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowConfig {
    pub img_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub num_blocks: usize,
    pub layers_per_block: usize,
    pub num_classes: usize,
    pub clip_scale: Option<f64>,
}

impl FlowConfig {
    pub fn num_tokens(&self) -> usize {
        (self.img_size / self.patch_size).pow(2)
    }
    pub fn token_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }
}

struct Block {
    proj_in: candle_nn::Linear,
    proj_out: candle_nn::Linear,
    class_embed: Option<Tensor>,
}

pub struct TarFlow {
    cfg: FlowConfig,
    blocks: Vec<Block>,
}

pub struct FlowOutput {
    pub z: Tensor,
    pub logdets: Tensor,
    pub trajectory: Vec<Tensor>,
}

impl TarFlow {
    pub fn new(vb: VarBuilder, cfg: &FlowConfig) -> Result<TarFlow> {
        let d = cfg.token_dim();
        let c = cfg.channels;
        let mut blocks = Vec::new();
        for i in 0..cfg.num_blocks {
            let vb = vb.pp(format!("blocks.{i}"));
            let proj_in = candle_nn::linear(d, c, vb.pp("proj_in"))?;
            let w = vb.pp("proj_out").get_with_hints((2 * d, c), "weight", candle_nn::Init::Const(0.))?;
            let b = vb.pp("proj_out").get_with_hints(2 * d, "bias", candle_nn::Init::Const(0.))?;
            let class_embed = if cfg.num_classes > 0 {
                Some(vb.get_with_hints((cfg.num_classes, c), "class_embed", candle_nn::Init::Randn { mean: 0., stdev: 0.02 })?)
            } else {
                None
            };
            blocks.push(Block { proj_in, proj_out: candle_nn::Linear::new(w, Some(b)), class_embed });
        }
        Ok(TarFlow { cfg: cfg.clone(), blocks })
    }

    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        x.reshape((n, c, h / p, p, w / p, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, (h / p) * (w / p), c * p * p))
    }

    pub fn forward(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<FlowOutput> {
        let mut x = self.patchify(x)?;
        let (n, t, d) = x.dims3()?;
        let mut logdets = Tensor::zeros(n, x.dtype(), x.device())?;
        let mut trajectory = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            if i % 2 == 1 {
                x = x.flip(&[1])?;
            }
            let mut h = blk.proj_in.forward(&x)?.tanh()?;
            if let (Some(emb), Some(y)) = (&blk.class_embed, labels) {
                let mean = emb.mean_keepdim(0)?;
                let table = Tensor::cat(&[emb, &mean], 0)?;
                let nc = self.cfg.num_classes as i64;
                let idx: Vec<u32> = y.to_vec1::<i64>()?.iter().map(|&l| if l < 0 { nc as u32 } else { l as u32 }).collect();
                let idx = Tensor::new(idx, x.device())?;
                h = h.broadcast_add(&table.index_select(&idx, 0)?.unsqueeze(1)?)?;
            }
            let o = blk.proj_out.forward(&h)?;
            let o = Tensor::cat(&[o.zeros_like()?.narrow(1, 0, 1)?, o.narrow(1, 0, t - 1)?], 1)?;
            let mut a = o.narrow(D::Minus1, 0, d)?;
            let b = o.narrow(D::Minus1, d, d)?;
            if let Some(c) = self.cfg.clip_scale {
                a = ((a / c)?.tanh()? * c)?;
            }
            x = x.sub(&b)?.mul(&a.neg()?.exp()?)?;
            logdets = (logdets - a.flatten_from(1)?.mean(1)?)?;
            if i % 2 == 1 {
                x = x.flip(&[1])?;
            }
            trajectory.push(x.clone());
        }
        Ok(FlowOutput { z: x, logdets, trajectory })
    }
}

pub fn nll_loss(out: &FlowOutput) -> Result<Tensor> {
    (out.z.sqr()?.mean_all()? * 0.5)? - out.logdets.mean_all()?
}

pub fn bits_per_dim(out: &FlowOutput, _cfg: &FlowConfig) -> Result<Tensor> {
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let per = ((out.z.sqr()?.flatten_from(1)?.mean(1)? * 0.5)? + half_log_2pi)?;
    let nll = (per - &out.logdets)?;
    (nll + 128f64.ln())? / std::f64::consts::LN_2
}
