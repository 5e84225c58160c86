//! Differentiable building blocks of the flow that candle's fast ops do not give with gradients:
//! LayerNorm, causal softmax, and the affine coupling.

use anyhow::Result;
use candle_core::{Tensor, D};

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// softmax(scale * s) over the last dimension with a causal mask (key j > query i excluded);
/// s: (..., T, T).
pub fn causal_softmax(s: &Tensor, scale: f64) -> Result<Tensor> {
    let t = s.dim(D::Minus1)?;
    let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), s.device())?.to_dtype(s.dtype())?;
    let s = (s * scale)?.broadcast_add(&mask)?;
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// The affine coupling y = (x - b) * exp(-a).
pub fn affine_forward(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(((x - b)? * a.neg()?.exp()?)?)
}
