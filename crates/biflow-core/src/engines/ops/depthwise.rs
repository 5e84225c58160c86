//! Depthwise 2D convolution of channels-last images (ConvNeXt's 7x7 filter, one per channel; stride 1,
//! zero padding). candle convolves groups one at a time (a `conv2d` per channel, then a concatenation),
//! so its version is a reference only; here an output pixel is the sum of k*k shifted input pixels
//! scaled per channel, a loop over contiguous channels that vectorises.

use candle_core::{Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{fused, unpack_grads, Kernel3, Op3};

/// `x` (N, H, W, C) convolved channel by channel with `w` (C, 1, k, k), plus `b` (C), zero padding `pad`:
/// (N, H + 2 pad - k + 1, W + 2 pad - k + 1, C).
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    let (_, h, wd, c) = x.dims4()?;
    let (c_w, one, k, k2) = w.dims4()?;
    if c_w != c || one != 1 || k != k2 || b.dims() != [c] || h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("depthwise conv2d: input {:?} (N,H,W,C), kernel {:?} and bias {:?} do not fit (padding {pad})", x.dims(), w.dims(), b.dims());
    }
    if !fused(x) {
        return depthwise_conv2d_reference(x, w, b, pad);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Op3(Depthwise { pad }))
}

/// The composition: candle's grouped conv2d on the channels-first view.
pub fn depthwise_conv2d_reference(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    let c = b.dim(0)?;
    let y = x.permute((0, 3, 1, 2))?.contiguous()?.conv2d(w, pad, 1, 1, c)?;
    y.broadcast_add(&b.reshape((1, c, 1, 1))?)?.permute((0, 2, 3, 1))?.contiguous()
}

/// An image's geometry: H, W, C, the kernel size and padding.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    pad: usize,
}

impl Geometry {
    fn of(lx: &Layout, lw: &Layout, pad: usize) -> candle_core::Result<(usize, Geometry)> {
        let (n, h, w, c) = lx.shape().dims4()?;
        Ok((n, Geometry { h, w, c, k: lw.shape().dims4()?.2, pad }))
    }
    fn out(&self) -> (usize, usize) {
        (self.h + 2 * self.pad - self.k + 1, self.w + 2 * self.pad - self.k + 1)
    }
    /// The input index that output index `o` reads through kernel tap `t`, when inside `0..len`.
    fn input(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        (o + t).checked_sub(self.pad).filter(|&i| i < len)
    }
    /// The output index that reads input index `i` through kernel tap `t`, when inside `0..len`.
    fn output(&self, i: usize, t: usize, len: usize) -> Option<usize> {
        (i + self.pad).checked_sub(t).filter(|&o| o < len)
    }
}

/// W (C, 1, k, k) as taps (k*k, C): a tap's channel weights side by side, as the pixels' are.
fn taps(w: &[f32], c: usize) -> Vec<f32> {
    let kk = w.len() / c;
    (0..kk * c).map(|i| w[(i % c) * kk + i / c]).collect()
}

simd_kernels! {
    /// acc += x * w, elementwise.
    fn multiply_add(acc: &mut [f32], x: &[f32], w: &[f32]) {
        for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
            *a += x * w;
        }
    }

    /// One output row (Wo * C) of image `x`: its bias, plus every tap's shifted input.
    fn forward_row(x: &[f32], taps: &[f32], b: &[f32], y: &mut [f32], oy: usize, g: Geometry) {
        let c = g.c;
        for (ox, out) in y.chunks_mut(c).enumerate() {
            out.copy_from_slice(b);
            for ky in 0..g.k {
                let Some(iy) = g.input(oy, ky, g.h) else { continue };
                for kx in 0..g.k {
                    let Some(ix) = g.input(ox, kx, g.w) else { continue };
                    let pixel = &x[(iy * g.w + ix) * c..][..c];
                    for ((a, p), t) in out.iter_mut().zip(pixel).zip(&taps[(ky * g.k + kx) * c..][..c]) {
                        *a += p * t;
                    }
                }
            }
        }
    }

    /// One input row (W * C) of the input's gradient from the output's gradient `dy` (Ho, Wo, C).
    fn backward_row(dy: &[f32], taps: &[f32], dx: &mut [f32], iy: usize, g: Geometry) {
        let (c, (ho, wo)) = (g.c, g.out());
        for (ix, out) in dx.chunks_mut(c).enumerate() {
            out.fill(0.0);
            for ky in 0..g.k {
                let Some(oy) = g.output(iy, ky, ho) else { continue };
                for kx in 0..g.k {
                    let Some(ox) = g.output(ix, kx, wo) else { continue };
                    let grad = &dy[(oy * wo + ox) * c..][..c];
                    for ((a, d), t) in out.iter_mut().zip(grad).zip(&taps[(ky * g.k + kx) * c..][..c]) {
                        *a += d * t;
                    }
                }
            }
        }
    }
}

/// (x, W, b) -> y (N, Ho, Wo, C).
struct Depthwise {
    pad: usize,
}

impl Kernel3 for Depthwise {
    const NAME: &'static str = "biflow-depthwise-conv2d";

    fn cpu(&self, [x, w, b]: [&[f32]; 3], [lx, lw, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, g) = Geometry::of(lx, lw, self.pad)?;
        let (ho, wo) = g.out();
        let taps = taps(w, g.c);
        let mut y = vec![0f32; n * ho * wo * g.c];
        y.par_chunks_mut(wo * g.c).enumerate().for_each(|(row, out)| {
            let image = &x[row / ho * g.h * g.w * g.c..][..g.h * g.w * g.c];
            forward_row(image, &taps, b, out, row % ho, g);
        });
        Ok((y, Shape::from((n, ho, wo, g.c))))
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], _out: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (need_x, need_w) = (x.track_op(), w.track_op() || b.track_op());
        let bwd = DepthwiseBwd { pad: self.pad, need_x, need_w };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &Op3(bwd))?;
        unpack_grads(&packed, [x, w, b], [need_x, need_w, need_w])
    }
}

/// (x, W, dy) -> [dx | dW | db], packed; the parts not needed are left out.
struct DepthwiseBwd {
    pad: usize,
    need_x: bool,
    need_w: bool,
}

/// Output rows per partial sum of dW: a fixed split, so the sums (and a resumed run) do not depend on
/// how rayon schedules the work.
const ROWS_PER_PART: usize = 8;

impl Kernel3 for DepthwiseBwd {
    const NAME: &'static str = "biflow-depthwise-conv2d-bwd";

    fn cpu(&self, [x, w, dy]: [&[f32]; 3], [lx, lw, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, g) = Geometry::of(lx, lw, self.pad)?;
        let (ho, wo) = g.out();
        let (c, kk) = (g.c, g.k * g.k);
        let (image, out_image) = (g.h * g.w * c, ho * wo * c);
        let mut out = Vec::new();
        if self.need_x {
            let taps = taps(w, c);
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(g.w * c).enumerate().for_each(|(row, d)| {
                backward_row(&dy[row / g.h * out_image..][..out_image], &taps, d, row % g.h, g);
            });
            out = dx;
        }
        if self.need_w {
            // Per part of the output rows: dTaps (k*k, C) and db (C), then their sum in order.
            let rows = n * ho;
            let parts: Vec<Vec<f32>> = (0..rows.div_ceil(ROWS_PER_PART))
                .into_par_iter()
                .map(|p| {
                    let mut acc = vec![0f32; (kk + 1) * c];
                    for row in p * ROWS_PER_PART..((p + 1) * ROWS_PER_PART).min(rows) {
                        let (img, oy) = (row / ho, row % ho);
                        let xi = &x[img * image..][..image];
                        for ox in 0..wo {
                            let d = &dy[img * out_image + (oy * wo + ox) * c..][..c];
                            for ky in 0..g.k {
                                let Some(iy) = g.input(oy, ky, g.h) else { continue };
                                for kx in 0..g.k {
                                    let Some(ix) = g.input(ox, kx, g.w) else { continue };
                                    multiply_add(&mut acc[(ky * g.k + kx) * c..][..c], d, &xi[(iy * g.w + ix) * c..][..c]);
                                }
                            }
                            acc[kk * c..].iter_mut().zip(d).for_each(|(a, d)| *a += d);
                        }
                    }
                    acc
                })
                .collect();
            let mut sum = vec![0f32; (kk + 1) * c];
            for part in &parts {
                sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
            }
            // Taps (k*k, C) back to W's order (C, 1, k, k), then db.
            out.extend((0..c * kk).map(|i| sum[(i % kk) * c + i / kk]));
            out.extend_from_slice(&sum[kk * c..]);
        }
        let len = out.len();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Output and the gradients of input, weight and bias equal candle's grouped conv2d, with and
    /// without padding, odd sizes and images smaller than the kernel's reach included.
    #[test]
    fn depthwise_conv2d_matches_candle() {
        let dev = Device::Cpu;
        for (n, h, w, c, k, pad) in [(2, 9, 7, 5, 7, 3), (1, 4, 4, 16, 7, 3), (2, 6, 5, 3, 3, 0), (3, 2, 3, 9, 3, 1), (1, 1, 1, 8, 7, 3)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h, w, c), &dev).unwrap()).unwrap();
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev).unwrap()).unwrap();
            let ours = super::depthwise_conv2d(x.as_tensor(), wt.as_tensor(), b.as_tensor(), pad).unwrap();
            let theirs = super::depthwise_conv2d_reference(x.as_tensor(), wt.as_tensor(), b.as_tensor(), pad).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let r = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-4, "outputs differ by {}", diff(&ours, &theirs));
            let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
                let (a, b) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
                assert!(diff(a, b) < 1e-3, "the gradient of {name} differs by {}", diff(a, b));
            }
        }
    }
}
