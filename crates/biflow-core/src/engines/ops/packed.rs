//! y = x W^T + b with W packed into the panels a kernel streams straight from memory: once for a
//! frozen model (G's sampling pass, F's frozen forward), per call for a training batch (where the
//! plain path copied W^T for gemm anyway; see `linear_fwd`).
//!
//! Why: on G's one-evaluation pass gemm spent ~8% of the time repacking W on every call, and its
//! AVX2 kernel (16 x 6 tiles in 16 registers) runs at ~80% of this CPU's FMA peak. Packed once, W is
//! read as it lies; the kernel keeps a tile of y in registers (12 x 32 in AVX-512's 32, 6 x 16 in
//! AVX2's 16) and broadcasts x from a small packed copy (G's pass: ~20% faster). Without either the
//! packed form is plain W^T and gemm runs. [`Kernel::chosen`] is the one dispatch point.

use rayon::prelude::*;

use super::gemm::{linear_fwd_t, transpose};

/// Depth per block: a panel's slice of KC x NR floats is read from L1/L2 by every tile.
const KC: usize = 256;
/// Rows per block of packed x: MC x KC floats (144 KiB) stay in L2 while the panels stream past
/// (a multiple of both kernels' tile heights).
const MC: usize = 144;

/// The packed kernel this process runs, chosen once from the CPU's features: the widest it has,
/// or the one `BIFLOW_KERNEL` names (`avx512`, `avx2`, `gemm`) where the CPU can run it, so the
/// AVX2 path can be measured and tested on an AVX-512 machine too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 12 x 32 tiles of y in 24 of AVX-512's 32 registers.
    Avx512,
    /// 6 x 16 tiles of y in 12 of AVX2's 16 registers, with FMA.
    Avx2,
    /// No packed kernel: W^T for the gemm crate.
    Gemm,
}

impl Kernel {
    /// The kernels this CPU can run, widest first.
    pub fn available() -> Vec<Kernel> {
        let mut k = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                k.push(Kernel::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                k.push(Kernel::Avx2);
            }
        }
        k.push(Kernel::Gemm);
        k
    }

    /// The process's kernel (see [`Kernel`]); an unknown or unavailable `BIFLOW_KERNEL` is ignored
    /// with a warning on stderr.
    pub fn chosen() -> Kernel {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Kernel::available();
            match std::env::var("BIFLOW_KERNEL").ok().as_deref() {
                None | Some("") => available[0],
                Some(name) => match available.iter().find(|k| k.name() == name) {
                    Some(&k) => k,
                    None => {
                        eprintln!("biflow: BIFLOW_KERNEL={name} is not a kernel this CPU runs ({}); using {}", available.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "), available[0].name());
                        available[0]
                    }
                },
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Gemm => "gemm",
        }
    }

    /// What `biflow doctor` says of it.
    pub fn describe(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512 12x32 tiles over W packed once",
            Kernel::Avx2 => "avx2+fma 6x16 tiles over W packed once",
            Kernel::Gemm => "gemm crate over W^T",
        }
    }

    /// (rows, columns) of a tile: columns are also the panel width W is packed in.
    fn tile(self) -> (usize, usize) {
        match self {
            Kernel::Avx512 => (12, 32),
            Kernel::Avx2 => (6, 16),
            Kernel::Gemm => (1, 1),
        }
    }
}

/// W (d_out, d_in), row-major, in the layout [`linear_packed`] reads: for a kernel, panels of NR
/// output columns (zero-padded), each d_in rows of NR values; without one, W^T (d_in, d_out).
pub fn pack(w: &[f32], d_out: usize) -> Vec<f32> {
    pack_for(w, d_out, Kernel::chosen())
}

fn pack_for(w: &[f32], d_out: usize, kernel: Kernel) -> Vec<f32> {
    let d_in = w.len() / d_out.max(1);
    if kernel == Kernel::Gemm {
        return transpose(w, d_out, d_in);
    }
    let nr = kernel.tile().1;
    let panels = d_out.div_ceil(nr);
    let mut packed = vec![0f32; panels * d_in * nr];
    for (p, panel) in packed.chunks_mut(d_in * nr).enumerate() {
        for j in 0..nr.min(d_out - p * nr) {
            let row = &w[(p * nr + j) * d_in..][..d_in];
            for (k, &v) in row.iter().enumerate() {
                panel[k * nr + j] = v;
            }
        }
    }
    packed
}

/// y = x W^T + b for rows of x (length d_in), W given by [`pack`] and b (d_out).
pub fn linear_packed(x: &[f32], packed: &[f32], b: &[f32], y: &mut [f32]) {
    linear_packed_for(x, packed, b, y, Kernel::chosen())
}

fn linear_packed_for(x: &[f32], packed: &[f32], b: &[f32], y: &mut [f32], kernel: Kernel) {
    if kernel == Kernel::Gemm {
        return linear_fwd_t(x, packed, b, y);
    }
    let d_out = b.len();
    for row in y.chunks_mut(d_out) {
        row.copy_from_slice(b);
    }
    let (mr, nr) = kernel.tile();
    let d_in = packed.len() / (d_out.div_ceil(nr) * nr);
    let rows = x.len() / d_in.max(1);
    assert!(d_in > 0 && x.len() == rows * d_in && y.len() == rows * d_out, "linear_packed: shapes do not fit");
    // The rows split in contiguous tile ranges, one per thread: each packs its own x, reads every panel.
    let per_thread = rows.div_ceil(mr).div_ceil(rayon::current_num_threads()).max(1) * mr;
    y.par_chunks_mut(per_thread * d_out).zip(x.par_chunks(per_thread * d_in)).for_each(|(y, x)| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a kernel other than Gemm is only chosen (or asked for by the tests) where
        // Kernel::available() found the CPU features it needs; the shapes were checked.
        unsafe {
            match kernel {
                Kernel::Avx512 => avx512::rows(x, packed, d_in, d_out, y),
                _ => avx2::rows(x, packed, d_in, d_out, y),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no packed kernel on this architecture")
    });
}

/// x's rows m..m+mc, columns k0..k0+kc, as tiles of `mr` rows: value (k, r) of tile t at
/// `(t * kc + k) * mr + r`. A last tile of R < mr rows leaves its other slots as they are: the
/// kernels' `tile::<R>` never reads them.
#[cfg(target_arch = "x86_64")]
fn pack_rows(x: &[f32], d_in: usize, k0: usize, kc: usize, mc: usize, mr: usize, xp: &mut [f32]) {
    for m in 0..mc {
        let (t, r) = (m / mr, m % mr);
        let tile = &mut xp[t * kc * mr..(t + 1) * kc * mr];
        for (k, &v) in x[m * d_in + k0..][..kc].iter().enumerate() {
            tile[k * mr + r] = v;
        }
    }
}

/// A kernel module's `rows`: y += x W^T for one thread's rows, block by block (KC of depth, MC rows
/// packed, every panel), each tile by the module's `tile::<R>` for R = MR (listed first) down to 1.
/// `$lanes` is the vector width, the masks' split of a panel's NR = 2 * lanes columns. A macro, not
/// a generic function, so the whole loop is compiled with the module's CPU features.
#[cfg(target_arch = "x86_64")]
macro_rules! blocked_rows {
    ($feature:literal, $lanes:expr, $($r:literal),+) => {
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn rows(x: &[f32], packed: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
            let rows = x.len() / d_in;
            let mut xp = vec![0f32; MC.min(rows.div_ceil(MR) * MR) * KC];
            for k0 in (0..d_in).step_by(KC) {
                let kc = KC.min(d_in - k0);
                for m0 in (0..rows).step_by(MC) {
                    let mc = MC.min(rows - m0);
                    pack_rows(&x[m0 * d_in..], d_in, k0, kc, mc, MR, &mut xp);
                    for (p, panel) in packed.chunks(d_in * NR).enumerate() {
                        let cols = NR.min(d_out - p * NR);
                        let masks = [col_mask(cols), col_mask(cols.saturating_sub($lanes))];
                        let b = panel[k0 * NR..].as_ptr();
                        for t in 0..mc.div_ceil(MR) {
                            let a = xp[t * kc * MR..].as_ptr();
                            let c = y[(m0 + t * MR) * d_out + p * NR..].as_mut_ptr();
                            match MR.min(mc - t * MR) {
                                $($r => tile::<$r>(a, b, kc, c, d_out, masks),)+
                                _ => unreachable!("a tile has 1 to MR rows"),
                            }
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{pack_rows, KC, MC};

    const MR: usize = 12;
    const NR: usize = 32;

    blocked_rows!("avx512f", 16, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);


    fn col_mask(cols: usize) -> __mmask16 {
        if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 }
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{pack_rows, KC, MC};

    /// 6 x 2 accumulators, 2 panel vectors and a broadcast: 15 of AVX2's 16 registers.
    const MR: usize = 6;
    const NR: usize = 16;

    blocked_rows!("avx2,fma", 8, 6, 5, 4, 3, 2, 1);


    /// Lanes 0..cols of 8 set (all bits), the rest clear: what maskload and maskstore touch.
    #[target_feature(enable = "avx2")]
    unsafe fn col_mask(cols: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(cols.min(8) as i32), lanes)
    }

    /// One R x 16 tile of y at `c` (row stride `ldc`, columns masked): y += sum over kc of a (R of
    /// each MR-value step) times b (16 of each step).
    #[inline(always)]
    unsafe fn tile<const R: usize>(a: *const f32, b: *const f32, kc: usize, c: *mut f32, ldc: usize, masks: [__m256i; 2]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (i, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm256_maskload_ps(c.add(i * ldc), masks[0]);
            acc[1] = _mm256_maskload_ps(c.add(i * ldc + 8), masks[1]);
        }
        for k in 0..kc {
            let (b0, b1) = (_mm256_loadu_ps(b.add(k * NR)), _mm256_loadu_ps(b.add(k * NR + 8)));
            let a = a.add(k * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*a.add(i));
                acc[0] = _mm256_fmadd_ps(v, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(v, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm256_maskstore_ps(c.add(i * ldc), masks[0], acc[0]);
            _mm256_maskstore_ps(c.add(i * ldc + 8), masks[1], acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed product equals the plain one, for every kernel this CPU runs (AVX-512, AVX2 and
    /// gemm on W^T on an AVX-512 machine), on shapes that cut panels, tiles, row and depth blocks.
    #[test]
    fn packed_linear_matches_plain() {
        for (rows, d_in, d_out) in [(1, 3, 1), (13, 40, 24), (37, 300, 70), (300, 520, 64), (25, 16, 16)] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
            let w: Vec<f32> = (0..d_out * d_in).map(|i| ((i * 104_729) % 31) as f32 / 15.0 - 1.0).collect();
            let b: Vec<f32> = (0..d_out).map(|i| i as f32 / 10.0).collect();
            let mut want = vec![0f32; rows * d_out];
            super::super::linear_fwd(&x, &w, &b, &mut want);
            for kernel in Kernel::available() {
                let mut got = vec![f32::NAN; rows * d_out];
                assert_eq!(pack_for(&w, d_out, kernel).len(), if kernel == Kernel::Gemm { w.len() } else { d_out.div_ceil(kernel.tile().1) * kernel.tile().1 * d_in });
                linear_packed_for(&x, &pack_for(&w, d_out, kernel), &b, &mut got, kernel);
                // f32::max drops NaN, so a NaN output is refused on its own.
                assert!(got.iter().all(|v| v.is_finite()), "{rows}x{d_in}x{d_out} (kernel {kernel:?}): non-finite output");
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs() / (1.0 + a.abs())).fold(0f32, f32::max);
                assert!(err < 1e-5, "{rows}x{d_in}x{d_out} (kernel {kernel:?}): relative error {err}");
            }
        }
    }
}
