//! Differentiable building blocks of the flow, fused: the linear layer, causal attention, LayerNorm,
//! exact GELU, and the affine coupling. candle's own fast softmax and layer-norm drop gradients, and
//! the composed versions spend most of a CPU training step in small elementwise ops and copies.
//!
//! On the CPU with f32 data each is one custom op with a fused backward (one pass over memory instead
//! of the ~10 elementwise ops and temporaries of the composed version). Other devices and dtypes use
//! the composition of differentiable primitives (`*_reference`), which the tests also use to check
//! the fused kernels.

mod attention;
mod gemm;
mod linear;

pub use attention::{causal_attention, causal_attention_reference};
pub use linear::{linear, linear_reference};

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Keep freed tensor buffers in the heap instead of returning them to the kernel.
///
/// glibc serves large allocations (every activation tensor) with mmap and trims the heap top
/// aggressively, so each op of a training step page-faults its output into existence again (~20%
/// of a CPU step in profiles, as kernel time). Raising the mmap and trim thresholds lets the buffers
/// be reused. Called once by [`crate::flow::TarFlow::new`]; a no-op elsewhere than glibc Linux.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 slice of a storage/layout pair.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b (biased variance).
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
        let c = w.len();
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(c) * c;
        out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(c).zip(xs.chunks(c)) {
                let (mean, rstd) = row_stats(xrow, self.eps);
                for j in 0..c {
                    orow[j] = (xrow[j] - mean) * rstd * w[j] + b[j];
                }
            }
        });
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
        let rows = x.elem_count() / c;
        // One pass gives dx (rows x C) and the per-task partial sums of dw and db, packed.
        let packed = x.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows * c)?.reshape(x.shape())?;
        let partial = packed.narrow(0, rows * c, packed.elem_count() - rows * c)?.reshape(((), 2, c))?.sum(0)?;
        Ok((Some(dx), Some(partial.get(0)?), Some(partial.get(1)?)))
    }
}

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
        let c = w.len();
        let rows = x.len() / c;
        let rpt = rows_per_task(c);
        let tasks = rows.div_ceil(rpt);
        let mut dx = vec![0f32; x.len()];
        let mut partials = vec![0f32; tasks * 2 * c];
        dx.par_chunks_mut(rpt * c)
            .zip(partials.par_chunks_mut(2 * c))
            .enumerate()
            .for_each(|(task, (dxs, part))| {
                let (dw, db) = part.split_at_mut(c);
                let base = task * rpt * c;
                let mut xhat = vec![0f32; c];
                for (r, dxrow) in dxs.chunks_mut(c).enumerate() {
                    let off = base + r * c;
                    let (xrow, grow) = (&x[off..off + c], &g[off..off + c]);
                    let (mean, rstd) = row_stats(xrow, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for j in 0..c {
                        xhat[j] = (xrow[j] - mean) * rstd;
                        let gy = grow[j] * w[j];
                        s1 += gy;
                        s2 += gy * xhat[j];
                        dw[j] += grow[j] * xhat[j];
                        db[j] += grow[j];
                    }
                    let (m1, m2) = (s1 / c as f32, s2 / c as f32);
                    for j in 0..c {
                        dxrow[j] = rstd * (grow[j] * w[j] - m1 - xhat[j] * m2);
                    }
                }
            });
        dx.extend_from_slice(&partials);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax (the composed reference of the attention op)

/// softmax(scale * s) over the last dimension with a causal mask (key j > query i gets weight 0);
/// s: (..., T, T).
pub fn causal_softmax_reference(s: &Tensor, scale: f64) -> Result<Tensor> {
    let t = s.dim(D::Minus1)?;
    let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), s.device())?.to_dtype(s.dtype())?;
    let s = (s * scale)?.broadcast_add(&mask)?;
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

// ---------------------------------------------------------------------------------------------
// Exact GELU

/// GELU with the exact erf: x * Phi(x).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        Ok(x.contiguous()?.apply_op1(Gelu)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// e^x for x <= 0, in plain arithmetic so that loops over it vectorise (libm's expf and erff are
/// calls, and made GELU a tenth of a training step). 2^n e^r with |r| <= ln2/2 and a degree-6 Taylor
/// polynomial: relative error < 2e-7; clamps its argument at -87 (e^-87 = 1.6e-38).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6; // ln 2 split in two for precision
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from the integer bits of `shifted` (no float-to-int conversion, which would not vectorise).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// Phi(x) = (1 + erf(x / sqrt 2)) / 2, with erf from Abramowitz & Stegun 7.1.26 (absolute error
/// < 1.5e-7) and e^(-x^2/2) also returned, for the backward's density.
#[inline(always)]
fn normal_cdf_and_gauss(x: f32) -> (f32, f32) {
    let z = (x * FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let gauss = exp_nonpositive(-z * z);
    let erf_abs = 1.0 - poly * gauss;
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    (0.5 * (1.0 + erf), gauss)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "biflow-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(o, xs)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = v * normal_cdf_and_gauss(v).0;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// d/dx gelu(x) = Phi(x) + x phi(x).
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "biflow-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16384).zip(x.par_chunks(16384).zip(g.par_chunks(16384))).for_each(|(o, (xs, gs))| {
            for ((o, &v), &gv) in o.iter_mut().zip(xs).zip(gs) {
                let (cdf, gauss) = normal_cdf_and_gauss(v);
                *o = gv * (cdf + v * FRAC_1_SQRT_2PI * gauss);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Affine coupling

/// The affine coupling y = (x - b) * exp(-a).
pub fn affine_forward(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(((x - b)? * a.neg()?.exp()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = Normal::new(0f32, std).unwrap();
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| n.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Compare a fused op and its reference composition: values and gradients of sum(out * r).
    fn check(f: impl Fn(&[Tensor]) -> Tensor, g: impl Fn(&[Tensor]) -> Tensor, inputs: Vec<Tensor>, tol: f32) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (f(&ts), g(&ts));
        assert!(max_diff(&a, &b) < tol, "forward differs by {}", max_diff(&a, &b));
        let r = randn(a.dims(), 99, 1.0);
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in ts.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(max_diff(x, y) < tol, "gradient of input {i} differs by {}", max_diff(x, y));
        }
    }

    #[test]
    fn fused_layer_norm_matches_reference() {
        check(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            vec![(randn(&[3, 37, 96], 1, 2.0) + 0.5).unwrap(), randn(&[96], 2, 1.0), randn(&[96], 3, 1.0)],
            2e-4,
        );
    }

    #[test]
    fn fused_causal_attention_matches_reference() {
        // 2 samples, 19 tokens, 3 heads of 8 channels.
        check(
            |t| causal_attention(&t[0], 3, 0.35).unwrap(),
            |t| causal_attention_reference(&t[0], 3, 0.35).unwrap(),
            vec![randn(&[2, 19, 72], 4, 2.0)],
            2e-5,
        );
    }

    #[test]
    fn fused_linear_matches_reference() {
        check(
            |t| linear(&t[0], &t[1], &t[2]).unwrap(),
            |t| linear_reference(&t[0], &t[1], &t[2]).unwrap(),
            vec![randn(&[3, 37, 40], 6, 1.0), randn(&[24, 40], 7, 0.5), randn(&[24], 8, 1.0)],
            2e-5,
        );
    }

    #[test]
    fn fast_exp_matches_std() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= 3e-7 * exact + 2e-38, "exp({x}) = {fast}, expected {exact}");
        }
    }

    #[test]
    fn fused_gelu_matches_candle() {
        check(|t| gelu(&t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), vec![randn(&[5, 301], 5, 3.0)], 1e-5);
    }
}
