//! y = x W^T + b with W packed into the panels an AVX-512 kernel streams straight from memory: once
//! for a frozen model (G's sampling pass, F's frozen forward), per call for a training batch (where
//! the plain path copied W^T for gemm anyway; see `linear_fwd`).
//!
//! Why: on G's one-evaluation pass gemm spent ~8% of the time repacking W on every call, and its
//! AVX2 kernel (16 x 6 tiles in 16 registers) runs at ~80% of this CPU's FMA peak. Packed once, W is
//! read as it lies; the kernel keeps a 12 x 32 tile of y in 24 of AVX-512's 32 registers and
//! broadcasts x from a small packed copy (G's pass: ~20% faster). Without AVX-512 the packed form
//! is plain W^T and gemm runs.

use rayon::prelude::*;

use super::gemm::{linear_fwd_t, transpose};

/// Output columns per panel: two 16-lane vectors.
const NR: usize = 32;
/// Rows per tile: 12 x 2 accumulators, 2 panel vectors, room to spare in 32 registers.
const MR: usize = 12;
/// Depth per block: a panel's slice of KC x NR floats (32 KiB) is read from L1/L2 by every tile.
const KC: usize = 256;
/// Rows per block of packed x: MC x KC floats (144 KiB) stay in L2 while the panels stream past.
const MC: usize = 144;

/// Whether this CPU runs the AVX-512 kernel (else the packed form is W^T, for gemm).
pub(crate) fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// W (d_out, d_in), row-major, in the layout [`linear_packed`] reads: with the kernel, panels of
/// NR output columns (zero-padded), each d_in rows of NR values; without it, W^T (d_in, d_out).
pub fn pack(w: &[f32], d_out: usize) -> Vec<f32> {
    pack_for(w, d_out, kernel_available())
}

fn pack_for(w: &[f32], d_out: usize, kernel: bool) -> Vec<f32> {
    let d_in = w.len() / d_out.max(1);
    if !kernel {
        return transpose(w, d_out, d_in);
    }
    let panels = d_out.div_ceil(NR);
    let mut packed = vec![0f32; panels * d_in * NR];
    for (p, panel) in packed.chunks_mut(d_in * NR).enumerate() {
        for j in 0..NR.min(d_out - p * NR) {
            let row = &w[(p * NR + j) * d_in..][..d_in];
            for (k, &v) in row.iter().enumerate() {
                panel[k * NR + j] = v;
            }
        }
    }
    packed
}

/// y = x W^T + b for rows of x (length d_in), W given by [`pack`] and b (d_out).
pub fn linear_packed(x: &[f32], packed: &[f32], b: &[f32], y: &mut [f32]) {
    linear_packed_for(x, packed, b, y, kernel_available())
}

fn linear_packed_for(x: &[f32], packed: &[f32], b: &[f32], y: &mut [f32], kernel: bool) {
    if !kernel {
        return linear_fwd_t(x, packed, b, y);
    }
    let d_out = b.len();
    for row in y.chunks_mut(d_out) {
        row.copy_from_slice(b);
    }
    let d_in = packed.len() / (d_out.div_ceil(NR) * NR);
    let rows = x.len() / d_in.max(1);
    assert!(d_in > 0 && x.len() == rows * d_in && y.len() == rows * d_out, "linear_packed: shapes do not fit");
    // The rows split in contiguous tile ranges, one per thread: each packs its own x, reads every panel.
    let per_thread = rows.div_ceil(MR).div_ceil(rayon::current_num_threads()).max(1) * MR;
    y.par_chunks_mut(per_thread * d_out).zip(x.par_chunks(per_thread * d_in)).for_each(|(y, x)| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 (`kernel` is only true then); the shapes were checked.
        unsafe {
            avx512::rows(x, packed, d_in, d_out, y)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no packed kernel on this architecture")
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KC, MC, MR, NR};

    /// y += x W^T for this thread's rows, block by block: KC of depth, MC rows packed, every panel.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(x: &[f32], packed: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
        let rows = x.len() / d_in;
        let mut xp = vec![0f32; MC.min(rows.div_ceil(MR) * MR) * KC];
        for k0 in (0..d_in).step_by(KC) {
            let kc = KC.min(d_in - k0);
            for m0 in (0..rows).step_by(MC) {
                let mc = MC.min(rows - m0);
                pack_rows(&x[m0 * d_in..], d_in, k0, kc, mc, &mut xp);
                for (p, panel) in packed.chunks(d_in * NR).enumerate() {
                    let cols = NR.min(d_out - p * NR);
                    let masks = [col_mask(cols), col_mask(cols.saturating_sub(16))];
                    let b = panel[k0 * NR..].as_ptr();
                    for t in 0..mc.div_ceil(MR) {
                        let a = xp[t * kc * MR..].as_ptr();
                        let c = y[(m0 + t * MR) * d_out + p * NR..].as_mut_ptr();
                        match MR.min(mc - t * MR) {
                            12 => tile::<12>(a, b, kc, c, d_out, masks),
                            11 => tile::<11>(a, b, kc, c, d_out, masks),
                            10 => tile::<10>(a, b, kc, c, d_out, masks),
                            9 => tile::<9>(a, b, kc, c, d_out, masks),
                            8 => tile::<8>(a, b, kc, c, d_out, masks),
                            7 => tile::<7>(a, b, kc, c, d_out, masks),
                            6 => tile::<6>(a, b, kc, c, d_out, masks),
                            5 => tile::<5>(a, b, kc, c, d_out, masks),
                            4 => tile::<4>(a, b, kc, c, d_out, masks),
                            3 => tile::<3>(a, b, kc, c, d_out, masks),
                            2 => tile::<2>(a, b, kc, c, d_out, masks),
                            _ => tile::<1>(a, b, kc, c, d_out, masks),
                        }
                    }
                }
            }
        }
    }

    fn col_mask(cols: usize) -> __mmask16 {
        if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 }
    }

    /// x's rows m..m+mc, columns k0..k0+kc, as tiles of MR rows: value (k, r) of tile t at
    /// `(t * kc + k) * MR + r`. A last tile of R < MR rows leaves its other slots as they are:
    /// `tile::<R>` never reads them.
    fn pack_rows(x: &[f32], d_in: usize, k0: usize, kc: usize, mc: usize, xp: &mut [f32]) {
        for m in 0..mc {
            let (t, r) = (m / MR, m % MR);
            let tile = &mut xp[t * kc * MR..(t + 1) * kc * MR];
            for (k, &v) in x[m * d_in + k0..][..kc].iter().enumerate() {
                tile[k * MR + r] = v;
            }
        }
    }

    /// One R x 32 tile of y at `c` (row stride `ldc`, columns masked): y += sum over kc of a (R of
    /// each MR-value step) times b (32 of each step).
    #[inline(always)]
    unsafe fn tile<const R: usize>(a: *const f32, b: *const f32, kc: usize, c: *mut f32, ldc: usize, masks: [__mmask16; 2]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (i, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_maskz_loadu_ps(masks[0], c.add(i * ldc));
            acc[1] = _mm512_maskz_loadu_ps(masks[1], c.add(i * ldc + 16));
        }
        for k in 0..kc {
            let (b0, b1) = (_mm512_loadu_ps(b.add(k * NR)), _mm512_loadu_ps(b.add(k * NR + 16)));
            let a = a.add(k * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*a.add(i));
                acc[0] = _mm512_fmadd_ps(v, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(v, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc), masks[0], acc[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), masks[1], acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed product (the AVX-512 kernel where the CPU has it, and gemm on W^T) equals the
    /// plain one on shapes that cut panels, tiles, row and depth blocks.
    #[test]
    fn packed_linear_matches_plain() {
        for (rows, d_in, d_out) in [(1, 3, 1), (13, 40, 24), (37, 300, 70), (300, 520, 64), (25, 16, 16)] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
            let w: Vec<f32> = (0..d_out * d_in).map(|i| ((i * 104_729) % 31) as f32 / 15.0 - 1.0).collect();
            let b: Vec<f32> = (0..d_out).map(|i| i as f32 / 10.0).collect();
            let mut want = vec![0f32; rows * d_out];
            super::super::linear_fwd(&x, &w, &b, &mut want);
            for kernel in [false, kernel_available()] {
                let mut got = vec![f32::NAN; rows * d_out];
                linear_packed_for(&x, &pack_for(&w, d_out, kernel), &b, &mut got, kernel);
                // f32::max drops NaN, so a NaN output is refused on its own.
                assert!(got.iter().all(|v| v.is_finite()), "{rows}x{d_in}x{d_out} (kernel {kernel}): non-finite output");
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs() / (1.0 + a.abs())).fold(0f32, f32::max);
                assert!(err < 1e-5, "{rows}x{d_in}x{d_out} (kernel {kernel}): relative error {err}");
            }
        }
    }
}
