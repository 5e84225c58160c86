//! LayerNorm over the last dimension, forward and backward in one pass over memory each.

use anyhow::Result;
use candle_core::{Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{fused, unpack_grads, Kernel3, Op3};

/// (x - mean) / sqrt(var + eps) * w + b over the last dimension (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Op3(LayerNormOp { eps: eps as f32 }))?)
    } else {
        layer_norm_reference(x, w, b, eps)
    }
}

pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Sum in 8 interleaved lanes: a sequential float sum cannot be vectorised (its order is fixed).
#[inline(always)]
fn lane_sum(r: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = r.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Mean and 1 / sqrt(var + eps) of a row.
#[inline(always)]
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = lane_sum(r, |v| v) / n;
    let var = lane_sum(r, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The kernel: rows of x (row length w.len()) -> out.
pub(crate) fn layer_norm_fwd(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, xs)| layer_norm_fwd_rows(o, xs, w, b, eps));
}

/// The backward kernel: adds the input gradient to `dx` (so a residual stream's gradient can be
/// accumulated in place) and writes the gradients of w and b.
pub(crate) fn layer_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
    let c = w.len();
    let rpt = rows_per_task(c);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(rpt * c)
        .enumerate()
        .map(|(task, dxs)| {
            let mut part = vec![0f32; 2 * c]; // [dw | db] of this task's rows
            let (pw, pb) = part.split_at_mut(c);
            let rows = task * rpt * c..task * rpt * c + dxs.len();
            layer_norm_bwd_rows(dxs, &x[rows.clone()], &g[rows], w, eps, pw, pb);
            part
        })
        .collect();
    dw.fill(0.0);
    db.fill(0.0);
    for part in &partials {
        dw.iter_mut().zip(&part[..c]).for_each(|(d, p)| *d += p);
        db.iter_mut().zip(&part[c..]).for_each(|(d, p)| *d += p);
    }
}

simd_kernels! {
    fn layer_norm_fwd_rows(o: &mut [f32], xs: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let c = w.len();
        for (orow, xrow) in o.chunks_mut(c).zip(xs.chunks(c)) {
            let (mean, rstd) = row_stats(xrow, eps);
            for j in 0..c {
                orow[j] = (xrow[j] - mean) * rstd * w[j] + b[j];
            }
        }
    }

    /// Rows of dx (+=), and this task's partial sums of dw and db.
    fn layer_norm_bwd_rows(dxs: &mut [f32], xs: &[f32], gs: &[f32], w: &[f32], eps: f32, pw: &mut [f32], pb: &mut [f32]) {
        let c = w.len();
        let mut xhat = vec![0f32; c];
        let mut gy = vec![0f32; c];
        let mut gy_xhat = vec![0f32; c];
        for ((dxrow, xrow), grow) in dxs.chunks_mut(c).zip(xs.chunks(c)).zip(gs.chunks(c)) {
            let (mean, rstd) = row_stats(xrow, eps);
            for j in 0..c {
                xhat[j] = (xrow[j] - mean) * rstd;
                gy[j] = grow[j] * w[j];
                gy_xhat[j] = gy[j] * xhat[j];
                pw[j] += grow[j] * xhat[j];
                pb[j] += grow[j];
            }
            let (m1, m2) = (lane_sum(&gy, |v| v) / c as f32, lane_sum(&gy_xhat, |v| v) / c as f32);
            for j in 0..c {
                dxrow[j] += rstd * (gy[j] - m1 - xhat[j] * m2);
            }
        }
    }
}

struct LayerNormOp {
    eps: f32,
}

impl Kernel3 for LayerNormOp {
    const NAME: &'static str = "biflow-layer-norm";

    fn cpu(&self, [x, w, b]: [&[f32]; 3], [lx, _, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let mut out = vec![0f32; x.len()];
        layer_norm_fwd(x, w, b, self.eps, &mut out);
        Ok((out, lx.shape().clone()))
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], _out: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let packed = x.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &Op3(LayerNormBwd { eps: self.eps }))?;
        unpack_grads(&packed, [x, w, b], [true; 3])
    }
}

/// (x, w, g) -> [dx | dw | db], packed.
struct LayerNormBwd {
    eps: f32,
}

impl Kernel3 for LayerNormBwd {
    const NAME: &'static str = "biflow-layer-norm-bwd";

    fn cpu(&self, [x, w, g]: [&[f32]; 3], _: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, c) = (x.len(), w.len());
        let mut out = vec![0f32; n + 2 * c];
        let (dx, rest) = out.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(c);
        layer_norm_bwd(x, w, g, self.eps, dx, dw, db);
        Ok((out, Shape::from(n + 2 * c)))
    }
}
