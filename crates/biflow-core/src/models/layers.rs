//! The transformer pieces F and G are built from (candle modules over the fused ops of
//! [`crate::engines::ops`]): the linear layer, LayerNorm, attention with its decoding cache, the MLP and
//! the pre-norm attention block, with the reference's parameter names.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::engines::{ops, LayerParams, Pair, Places};
use crate::models::params::fan_in_uniform;
use crate::models::flow::config::{HEAD_DIM, LN_EPS, MLP_EXPANSION};

/// y = x W^T + b over the last dimension, for inputs of any rank.
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl Linear {
    pub(crate) fn new(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Self::with_weight_init(vb, d_in, d_out, fan_in_uniform(d_in))
    }

    /// A layer whose weight starts at zero (F's `proj_out`: each block starts as the identity).
    pub(crate) fn zero(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Self::with_weight_init(vb, d_in, d_out, Init::Const(0.0))
    }

    fn with_weight_init(vb: VarBuilder, d_in: usize, d_out: usize, init: Init) -> Result<Self> {
        let weight = vb.get_with_hints((d_out, d_in), "weight", init)?;
        Ok(Linear { weight, bias: vb.get_with_hints(d_out, "bias", fan_in_uniform(d_in))? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias)
    }

    pub(crate) fn places(&self, p: &Places) -> Result<Pair> {
        p.pair(&self.weight, &self.bias)
    }
}

/// LayerNorm over the last dimension with an affine weight and bias (differentiable).
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// With the flows' epsilon, 1e-5 (PyTorch's default).
    pub(crate) fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Self::with_eps(vb, dim, LN_EPS)
    }
    pub(crate) fn with_eps(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    pub(crate) fn places(&self, p: &Places) -> Result<Pair> {
        p.pair(&self.weight, &self.bias)
    }
}

/// One layer's key/value cache for causal decoding: (N, H, T, hd) buffers filled token by token.
pub(crate) struct KvCache {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) len: usize,
}

/// Multi-head self-attention: LayerNorm -> qkv -> softmax(q k^T / sqrt(64)) v -> proj; causal in F,
/// bidirectional in G.
pub struct Attention {
    pub(crate) norm: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) heads: usize,
    pub(crate) causal: bool,
}

impl Attention {
    pub(crate) fn new(vb: VarBuilder, channels: usize, causal: bool) -> Result<Self> {
        Ok(Attention {
            norm: LayerNorm::new(vb.pp("norm"), channels)?,
            qkv: Linear::new(vb.pp("qkv"), channels, 3 * channels)?,
            proj: Linear::new(vb.pp("proj"), channels, channels)?,
            heads: channels / HEAD_DIM,
            causal,
        })
    }

    /// Attention over all of x: (N, T, C).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?;
        self.proj.forward(&ops::attention(&qkv, self.heads, 1.0 / (HEAD_DIM as f64).sqrt(), self.causal)?)
    }

    /// One decoding step: x (N, 1, C) is the token at position `cache.len`; attends to the cache and
    /// itself. `scale` is per sample (N) so that a batch can mix attention temperatures.
    pub(crate) fn step(&self, x: &Tensor, cache: &mut KvCache, scale: &Tensor) -> Result<Tensor> {
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
    pub(crate) norm: LayerNorm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

impl Mlp {
    pub(crate) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Mlp {
            norm: LayerNorm::new(vb.pp("norm"), channels)?,
            fc1: Linear::new(vb.pp("main.0"), channels, channels * MLP_EXPANSION)?,
            fc2: Linear::new(vb.pp("main.2"), channels * MLP_EXPANSION, channels)?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&self.norm.forward(x)?)?;
        self.fc2.forward(&ops::gelu(&h)?)
    }
}

/// A pre-LN transformer layer: x + attn(x), then + mlp(x).
pub struct AttentionBlock {
    pub(crate) attention: Attention,
    pub(crate) mlp: Mlp,
}

impl AttentionBlock {
    /// Where the hand-written layer ([`crate::engines`]) finds this layer's parameters.
    pub(crate) fn places(&self, p: &Places) -> Result<LayerParams> {
        let (a, m) = (&self.attention, &self.mlp);
        Ok(LayerParams { norm1: a.norm.places(p)?, qkv: a.qkv.places(p)?, proj: a.proj.places(p)?, norm2: m.norm.places(p)?, fc1: m.fc1.places(p)?, fc2: m.fc2.places(p)? })
    }

    pub(crate) fn new(vb: VarBuilder, channels: usize, causal: bool) -> Result<Self> {
        Ok(AttentionBlock { attention: Attention::new(vb.pp("attention"), channels, causal)?, mlp: Mlp::new(vb.pp("mlp"), channels)? })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.forward(x)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
    }
    pub(crate) fn step(&self, x: &Tensor, cache: &mut KvCache, scale: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention.step(x, cache, scale)?)?;
        Ok((&x + self.mlp.forward(&x)?)?)
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
