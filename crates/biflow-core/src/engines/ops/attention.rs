//! Multi-head self-attention, causal (F) or bidirectional (G), as one op over the packed qkv
//! projection.
//!
//! Per sample and head: S = q k^T, P = (masked) softmax(scale S), y = P v, all on views into the qkv
//! buffer (no head split, no permuted copies). The backward recomputes P (cheaper than keeping the
//! N x H x T x T probabilities alive between passes) and writes dq, dk, dv straight into one dqkv.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::gelu::exp_nonpositive;
use super::gemm::{matmul, Threads, View};
use super::{fused, slice};

/// qkv (N, T, 3C), laid out per token as [q heads | k heads | v heads] with C / heads channels per
/// head -> (N, T, C): softmax(scale q k^T) v per head, heads side by side; with `causal`, token i
/// attends to tokens j <= i only.
pub fn attention(qkv: &Tensor, heads: usize, scale: f64, causal: bool) -> Result<Tensor> {
    if fused(qkv) {
        Ok(qkv.contiguous()?.apply_op1(Attention { heads, scale: scale as f32, causal })?)
    } else {
        attention_reference(qkv, heads, scale, causal)
    }
}

pub fn attention_reference(qkv: &Tensor, heads: usize, scale: f64, causal: bool) -> Result<Tensor> {
    let (n, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    // (N, T, 3, H, hd) -> (3, N, H, T, hd).
    let qkv = qkv.reshape((n, t, 3, heads, c / heads))?.permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
    let att = softmax_reference(&crate::device::mode::matmul(&q, &k.t()?)?, scale, causal)?;
    Ok(crate::device::mode::matmul(&att, &v)?.transpose(1, 2)?.reshape((n, t, c))?)
}

/// softmax(scale * s) over the last dimension, with a causal mask (key j > query i gets weight 0)
/// when asked; s: (..., T, T).
fn softmax_reference(s: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let t = s.dim(D::Minus1)?;
    let mut s = (s * scale)?;
    if causal {
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        s = s.broadcast_add(&Tensor::from_vec(mask, (t, t), s.device())?.to_dtype(s.dtype())?)?;
    }
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

simd_kernels! {
    /// In place, row by row: p[i, j] = softmax_j(scale s[i, j]), over j <= i with 0 for j > i when
    /// causal. Max and sum in 8 lanes and exp by polynomial, so the loops vectorise (this was scalar
    /// libm work, a tenth of sampling time at T = 256).
    fn softmax_rows(p: &mut [f32], t: usize, scale: f32, causal: bool) {
        for (i, row) in p.chunks_mut(t).enumerate() {
            let (live, masked) = row.split_at_mut(if causal { i + 1 } else { t });
            let mut lanes = [f32::NEG_INFINITY; 8];
            let chunks = live.chunks_exact(8);
            let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for ch in chunks {
                for (l, &v) in lanes.iter_mut().zip(ch) {
                    *l = l.max(v);
                }
            }
            let m = lanes.iter().fold(tail, |a, &b| a.max(b));
            let mut sums = [0f32; 8];
            let mut chunks = live.chunks_exact_mut(8);
            for ch in &mut chunks {
                for (s, v) in sums.iter_mut().zip(ch.iter_mut()) {
                    *v = exp_nonpositive((*v - m) * scale);
                    *s += *v;
                }
            }
            let mut sum: f32 = 0.0;
            for v in chunks.into_remainder() {
                *v = exp_nonpositive((*v - m) * scale);
                sum += *v;
            }
            let inv = 1.0 / (sum + sums.iter().sum::<f32>());
            live.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        }
    }
}

/// The sizes of one attention problem, read from the qkv layout.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    t: usize,
    c: usize,
    hd: usize,
    causal: bool,
}

impl Dims {
    fn new(l: &Layout, heads: usize, causal: bool) -> candle_core::Result<Dims> {
        let (_, t, c3) = l.shape().dims3()?;
        match Dims::of(t, c3 / 3, heads, causal) {
            Some(d) if c3 % 3 == 0 => Ok(d),
            _ => candle_core::bail!("attention: {c3} qkv channels do not split into 3 x {heads} heads"),
        }
    }
    /// T tokens of C channels in `heads` heads; None when C does not split.
    pub(crate) fn of(t: usize, c: usize, heads: usize, causal: bool) -> Option<Dims> {
        (heads > 0 && c % heads == 0).then_some(Dims { t, c, hd: c / heads, causal })
    }
    pub(crate) fn heads(&self) -> usize {
        self.c / self.hd
    }
    /// Views of head h's q, k and v in sample `base` (offset of the sample's first qkv element).
    fn qkv(&self, x: &[f32], base: usize, h: usize) -> (View, View, View) {
        let c3 = 3 * self.c;
        let at = |part: usize| View::rows(x, base + part * self.c + h * self.hd, c3);
        (at(0), at(1), at(2))
    }
}

/// The kernel: qkv (N, T, 3C) -> y (N, T, C).
pub(crate) fn attention_fwd(x: &[f32], d: Dims, heads: usize, scale: f32, y: &mut [f32]) {
    let (t, c, hd) = (d.t, d.c, d.hd);
    let n = y.len() / (t * c);
    if n < rayon::current_num_threads() {
        // Too few samples to keep every core busy (sampling one image): one task per (sample,
        // head) into a head-major buffer, then the heads side by side. Same arithmetic per head.
        let mut by_head = vec![0f32; n * heads * t * hd];
        by_head.par_chunks_mut(t * hd).enumerate().for_each(|(j, out)| {
            let mut p = vec![0f32; t * t];
            let (q, k, v) = d.qkv(x, (j / heads) * t * 3 * c, j % heads);
            matmul(&mut p, 0, t, t, t, hd, q, k.t(), false, Threads::One);
            softmax_rows(&mut p, t, scale, d.causal);
            matmul(out, 0, hd, t, hd, t, View::rows(&p, 0, t), v, false, Threads::One);
        });
        for (i, ys) in y.chunks_mut(t * c).enumerate() {
            for (h, head) in by_head[i * heads * t * hd..(i + 1) * heads * t * hd].chunks(t * hd).enumerate() {
                for (row, src) in ys.chunks_mut(c).zip(head.chunks(hd)) {
                    row[h * hd..(h + 1) * hd].copy_from_slice(src);
                }
            }
        }
        return;
    }
    // One task per sample; each head writes its own columns of the sample's rows.
    y.par_chunks_mut(t * c).enumerate().for_each(|(i, ys)| {
        let mut p = vec![0f32; t * t];
        for h in 0..heads {
            let (q, k, v) = d.qkv(x, i * t * 3 * c, h);
            matmul(&mut p, 0, t, t, t, hd, q, k.t(), false, Threads::One);
            softmax_rows(&mut p, t, scale, d.causal);
            matmul(ys, h * hd, c, t, hd, t, View::rows(&p, 0, t), v, false, Threads::One);
        }
    });
}

/// The backward kernel: (qkv, dy) -> dqkv (written).
pub(crate) fn attention_bwd(x: &[f32], g: &[f32], d: Dims, heads: usize, scale: f32, dx: &mut [f32]) {
    let (t, c, hd) = (d.t, d.c, d.hd);
    dx.par_chunks_mut(t * 3 * c).enumerate().for_each(|(i, ds)| {
        let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
        for h in 0..heads {
            let (q, k, v) = d.qkv(x, i * t * 3 * c, h);
            let dy = View::rows(g, i * t * c + h * hd, c);
            matmul(&mut p, 0, t, t, t, hd, q, k.t(), false, Threads::One);
            softmax_rows(&mut p, t, scale, d.causal);
            let pv = View::rows(&p, 0, t);
            // dv = P^T dy; dP = dy v^T.
            matmul(ds, 2 * c + h * hd, 3 * c, t, hd, t, pv.t(), dy, false, Threads::One);
            matmul(&mut dp, 0, t, t, t, hd, dy, v.t(), false, Threads::One);
            // dS = scale P (dP - rowsum(dP P)); masked entries have P = 0, hence dS = 0.
            for (prow, drow) in p.chunks(t).zip(dp.chunks_mut(t)) {
                let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                drow.iter_mut().zip(prow).for_each(|(d, &p)| *d = scale * p * (*d - dot));
            }
            // dq = dS k; dk = dS^T q.
            let dsv = View::rows(&dp, 0, t);
            matmul(ds, h * hd, 3 * c, t, hd, t, dsv, k, false, Threads::One);
            matmul(ds, c + h * hd, 3 * c, t, hd, t, dsv.t(), q, false, Threads::One);
        }
    });
}

struct Attention {
    heads: usize,
    scale: f32,
    causal: bool,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "biflow-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let d = Dims::new(l, self.heads, self.causal)?;
        let mut y = vec![0f32; x.len() / 3];
        attention_fwd(x, d, self.heads, self.scale, &mut y);
        let (n, _, _) = l.shape().dims3()?;
        Ok((CpuStorage::F32(y), Shape::from((n, d.t, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &AttentionBwd { heads: self.heads, scale: self.scale, causal: self.causal })?))
    }
}

/// (qkv, dy) -> dqkv.
struct AttentionBwd {
    heads: usize,
    scale: f32,
    causal: bool,
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "biflow-attention-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = Dims::new(l1, self.heads, self.causal)?;
        let mut dx = vec![0f32; x.len()];
        attention_bwd(x, g, d, self.heads, self.scale, &mut dx);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
