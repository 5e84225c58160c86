//! LayerNorm over the last dimension, forward and backward in one pass over memory each.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{fused, rows_per_task, slice};

/// (x - mean) / sqrt(var + eps) * w + b over the last dimension (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps: eps as f32 })?)
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

fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = r.iter().sum::<f32>() / n;
    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The kernel: rows of x (row length w.len()) -> out.
pub(crate) fn layer_norm_fwd(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, xs)| {
        for (orow, xrow) in o.chunks_mut(c).zip(xs.chunks(c)) {
            let (mean, rstd) = row_stats(xrow, eps);
            for j in 0..c {
                orow[j] = (xrow[j] - mean) * rstd * w[j] + b[j];
            }
        }
    });
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
            let base = task * rpt * c;
            let mut xhat = vec![0f32; c];
            for (r, dxrow) in dxs.chunks_mut(c).enumerate() {
                let off = base + r * c;
                let (xrow, grow) = (&x[off..off + c], &g[off..off + c]);
                let (mean, rstd) = row_stats(xrow, eps);
                let (mut s1, mut s2) = (0f32, 0f32);
                for j in 0..c {
                    xhat[j] = (xrow[j] - mean) * rstd;
                    let gy = grow[j] * w[j];
                    s1 += gy;
                    s2 += gy * xhat[j];
                    pw[j] += grow[j] * xhat[j];
                    pb[j] += grow[j];
                }
                let (m1, m2) = (s1 / c as f32, s2 / c as f32);
                for j in 0..c {
                    dxrow[j] += rstd * (grow[j] * w[j] - m1 - xhat[j] * m2);
                }
            }
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

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "biflow-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut out = vec![0f32; x.len()];
        layer_norm_fwd(x, w, b, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok((Some(dx), Some(packed.narrow(0, n, c)?), Some(packed.narrow(0, n + c, c)?)))
    }
}

/// (x, w, g) -> [dx | dw | db], packed.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "biflow-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (n, c) = (x.len(), w.len());
        let mut out = vec![0f32; n + 2 * c];
        let (dx, rest) = out.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(c);
        layer_norm_bwd(x, w, g, self.eps, dx, dw, db);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}
