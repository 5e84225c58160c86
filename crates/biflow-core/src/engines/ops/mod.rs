//! Differentiable building blocks of the flow: the linear layer, causal attention, LayerNorm and
//! exact GELU (fused), and the affine coupling. candle's own fast softmax and layer-norm drop
//! gradients, and the composed versions spend most of a CPU training step in small elementwise ops.
//!
//! On the CPU with f32 data each is one custom op with a fused backward (one pass over memory instead
//! of the ~10 elementwise ops and temporaries of the composed version). Other devices and dtypes use
//! the composition of differentiable primitives (`*_reference`), which the tests also use to check
//! the fused kernels.

/// Define kernel functions that run compiled for AVX2 and FMA when the CPU has them, and as written
/// otherwise: the default x86-64 target stops at SSE2, which halves the width of the elementwise
/// loops. (Rust does not contract a * b + c into an FMA, so both versions give the same numbers.)
macro_rules! simd_kernels {
    ($($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block)*) => {$(
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    portable($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    )*};
}
pub(crate) use simd_kernels;

mod attention;
mod conv;
mod depthwise;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod packed;

pub use attention::{attention, attention_reference};
pub use conv::{conv2d, conv2d_relu};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_reference};
pub use gelu::gelu;
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear::{linear, linear_reference};
pub use packed::{linear_packed, pack, Kernel};
pub(crate) use {
    attention::{attention_bwd, attention_fwd, Dims as AttentionDims},
    gelu::{exp_nonpositive, gelu_bwd, gelu_fwd},
    gemm::{matmul, Threads, View},
    layer_norm::{layer_norm_bwd, layer_norm_fwd},
    linear::{linear_bwd, linear_fwd, transpose},
};

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// Which variant of each kernel family this CPU runs (chosen from its features at run time), for
/// `biflow doctor`.
pub fn kernels() -> serde_json::Value {
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    serde_json::json!({
        "frozenLinear": packed::Kernel::chosen().describe(),
        "matmul": if avx2 { "gemm crate, fma 16x6 tiles" } else { "gemm crate, without fma" },
        "elementwise": if avx2 { "avx2+fma (LayerNorm, GELU, attention, depthwise conv)" } else { "portable (sse2)" },
        "convolution": "im2col + matmul",
    })
}

/// Keep freed tensor buffers in the heap instead of returning them to the kernel.
///
/// glibc serves large allocations (every activation tensor) with mmap and trims the heap top
/// aggressively, so each op of a training step page-faults its output into existence again (~20%
/// of a CPU step in profiles, as kernel time). Raising the mmap and trim thresholds lets the buffers
/// be reused. Called by [`crate::models::flow::TarFlow::new`] and [`crate::models::lpips::Lpips::new`]; a no-op elsewhere than glibc Linux.
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
    crate::device::mode::current().fused && t.device().is_cpu() && t.dtype() == DType::F32
}

/// A fused CPU kernel over three f32 tensors (LayerNorm and the linear layer, forward and
/// backward). candle's [`CustomOp3`] is implemented once for all of them, by [`Op3`].
trait Kernel3 {
    const NAME: &'static str;
    /// The output values and shape from the inputs' contiguous values and layouts.
    fn cpu(&self, values: [&[f32]; 3], layouts: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)>;
    /// The inputs' gradients from the output (`out`) and its gradient (`grad`), for kernels that
    /// have a backward.
    fn backward(&self, _inputs: [&Tensor; 3], _out: &Tensor, _grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// The inputs' gradients from a backward kernel's one packed output `[d0 | d1 | d2]`, where input k's
/// part is present only when `needed[k]`: each split off in order and shaped as its input.
fn unpack_grads(packed: &Tensor, inputs: [&Tensor; 3], needed: [bool; 3]) -> candle_core::Result<[Option<Tensor>; 3]> {
    let mut offset = 0;
    let mut grads = [None, None, None];
    for ((grad, input), need) in grads.iter_mut().zip(inputs).zip(needed) {
        if need {
            *grad = Some(packed.narrow(0, offset, input.elem_count())?.reshape(input.shape())?);
            offset += input.elem_count();
        }
    }
    Ok(grads)
}

/// candle's custom op of a [`Kernel3`].
struct Op3<K>(K);

impl<K: Kernel3> CustomOp3 for Op3<K> {
    fn name(&self) -> &'static str {
        K::NAME
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
        let (out, shape) = self.0.cpu([slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?], [l1, l2, l3])?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.0.backward([a, b, c], res, grad)?;
        Ok((da, db, dc))
    }
}

/// The contiguous f32 slice of a storage/layout pair.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
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

    /// The report of chosen kernels follows this CPU's features (doctor prints it).
    #[test]
    fn kernel_report_follows_the_cpu() {
        let k = kernels();
        assert_eq!(k["frozenLinear"], Kernel::chosen().describe());
        let available = Kernel::available();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(available.contains(&Kernel::Avx512), std::is_x86_feature_detected!("avx512f"));
            assert_eq!(available.contains(&Kernel::Avx2), std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));
        }
        assert_eq!(available.last(), Some(&Kernel::Gemm), "gemm runs everywhere");
        if std::env::var("BIFLOW_KERNEL").is_err() {
            assert_eq!(Kernel::chosen(), available[0], "the widest kernel is chosen");
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(k["elementwise"].as_str().unwrap().starts_with("avx2"), std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));
        assert!(k["matmul"].is_string() && k["convolution"].is_string());
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
    fn fused_attention_matches_reference() {
        // 19 tokens, 3 heads of 8 channels; causal (F) and bidirectional (G); one sample (a task per
        // head) and three (a task per sample).
        for (causal, n) in [(true, 3), (false, 3), (true, 1), (false, 1)] {
            check(
                |t| attention(&t[0], 3, 0.35, causal).unwrap(),
                |t| attention_reference(&t[0], 3, 0.35, causal).unwrap(),
                vec![randn(&[n, 19, 72], 4, 2.0)],
                2e-5,
            );
        }
    }

    /// A few rows (gemm), and a training batch of >= 1024 rows (the packed kernel's path).
    #[test]
    fn fused_linear_matches_reference() {
        for (rows, tol) in [(37, 2e-5), (600, 1e-4)] {
            check(
                |t| linear(&t[0], &t[1], &t[2]).unwrap(),
                |t| linear_reference(&t[0], &t[1], &t[2]).unwrap(),
                vec![randn(&[3, rows, 40], 6, 1.0), randn(&[24, 40], 7, 0.5), randn(&[24], 8, 1.0)],
                tol,
            );
        }
    }

    #[test]
    fn fused_gelu_matches_candle() {
        check(|t| gelu(&t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), vec![randn(&[5, 301], 5, 3.0)], 1e-5);
    }
}

