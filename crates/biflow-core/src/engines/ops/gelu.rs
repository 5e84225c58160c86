//! Exact (erf) GELU, x * Phi(x), as PyTorch's default `nn.GELU()`.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{fused, slice};

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
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
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

/// The kernel: out = gelu(x).
pub(crate) fn gelu_fwd(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(o, xs)| gelu_fwd_chunk(o, xs));
}

/// The backward kernel: dx = g * (Phi(x) + x phi(x)).
pub(crate) fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(16384).zip(x.par_chunks(16384).zip(g.par_chunks(16384))).for_each(|(o, (xs, gs))| gelu_bwd_chunk(o, xs, gs));
}

simd_kernels! {
    fn gelu_fwd_chunk(o: &mut [f32], xs: &[f32]) {
        for (o, &v) in o.iter_mut().zip(xs) {
            *o = v * normal_cdf_and_gauss(v).0;
        }
    }

    fn gelu_bwd_chunk(o: &mut [f32], xs: &[f32], gs: &[f32]) {
        for ((o, &v), &gv) in o.iter_mut().zip(xs).zip(gs) {
            let (cdf, gauss) = normal_cdf_and_gauss(v);
            *o = gv * (cdf + v * FRAC_1_SQRT_2PI * gauss);
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "biflow-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut out = vec![0f32; x.len()];
        gelu_fwd(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// (x, g) -> dx.
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "biflow-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        gelu_bwd(x, g, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= 3e-7 * exact + 2e-38, "exp({x}) = {fast}, expected {exact}");
        }
    }
}
