//! 2D convolution (stride 1, zero padding), image by image as an unfolding (im2col) and one matrix
//! product: candle 0.11's CPU conv2d and its backward (conv_transpose2d) are direct loops at about
//! a fifth of the matmul rate. The backward unfolds again instead of keeping the unfolded input
//! (9x the input for a 3x3 kernel), folds the input's gradient back (col2im), and skips the
//! gradient of a constant (a frozen network's weights).

use candle_core::{Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, Threads, View};
use super::{fused, unpack_grads, Kernel3, Op3};

/// `x` (N, C, H, W) convolved with `w` (C_out, C, k, k), plus `b` (C_out), zero padding `pad`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    convolution(x, w, b, pad, false)
}

/// [`conv2d`] followed by a ReLU, in one op: the backward needs only the output, so a network of
/// them keeps one tensor per layer, not two.
pub fn conv2d_relu(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    convolution(x, w, b, pad, true)
}

fn convolution(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize, relu: bool) -> candle_core::Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (c_out, c_in, k, k2) = w.dims4()?;
    if c_in != c || k != k2 || b.dims() != [c_out] || h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("conv2d: input {:?}, kernel {:?} and bias {:?} do not fit (padding {pad})", x.dims(), w.dims(), b.dims());
    }
    if !fused(x) {
        let y = x.conv2d(w, pad, 1, 1, 1)?.broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Op3(Conv { pad, relu }))
}

/// The geometry of an unfolding of one image (C, H, W) by k x k windows: the unfolded matrix is
/// (C*k*k, Ho*Wo), a row per kernel position (c, ky, kx) in the kernel's order, so that each row is
/// the image plane shifted, copied a row segment at a time.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
}

impl Geometry {
    fn out(&self) -> (usize, usize) {
        (self.h + 2 * self.pad - self.k + 1, self.w + 2 * self.pad - self.k + 1)
    }
    /// Values of one image, of its unfolded matrix's rows (C*k*k), of a row (Ho*Wo).
    fn sizes(&self) -> (usize, usize, usize) {
        let (ho, wo) = self.out();
        (self.c * self.h * self.w, self.c * self.k * self.k, ho * wo)
    }
    /// For kernel column kx: the output columns that read inside the image, [lo, hi), and the
    /// input column of `lo`.
    fn columns(&self, kx: usize) -> (usize, usize, usize) {
        let wo = self.out().1;
        let lo = self.pad.saturating_sub(kx).min(wo);
        let hi = (self.w + self.pad).saturating_sub(kx).min(wo).max(lo);
        (lo, hi, (lo + kx).saturating_sub(self.pad))
    }
    /// For kernel row ky and output row oy: the input row, when inside the image.
    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy + ky).checked_sub(self.pad).filter(|&iy| iy < self.h)
    }
}

/// One image (C, H, W) unfolded: (C*k*k, Ho*Wo).
fn unfold(x: &[f32], g: Geometry) -> Vec<f32> {
    let (ho, wo) = g.out();
    let mut cols = vec![0f32; g.c * g.k * g.k * ho * wo];
    cols.par_chunks_mut(ho * wo).enumerate().for_each(|(r, out)| {
        let (c, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        let (lo, hi, ix) = g.columns(kx);
        if hi == lo {
            return;
        }
        for oy in 0..ho {
            if let Some(iy) = g.row(oy, ky) {
                out[oy * wo + lo..oy * wo + hi].copy_from_slice(&plane[iy * g.w + ix..iy * g.w + ix + hi - lo]);
            }
        }
    });
    cols
}

/// The adjoint of [`unfold`]: every window value's gradient added to the pixel it read, in `x`.
fn fold(cols: &[f32], g: Geometry, x: &mut [f32]) {
    let (ho, wo) = g.out();
    x.par_chunks_mut(g.h * g.w).enumerate().for_each(|(c, dx)| {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &cols[((c * g.k + ky) * g.k + kx) * ho * wo..][..ho * wo];
                let (lo, hi, ix) = g.columns(kx);
                if hi == lo {
                    continue;
                }
                for oy in 0..ho {
                    if let Some(iy) = g.row(oy, ky) {
                        let d = &mut dx[iy * g.w + ix..iy * g.w + ix + hi - lo];
                        d.iter_mut().zip(&row[oy * wo + lo..oy * wo + hi]).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
    });
}

/// The batch size and an image's geometry of (x, W) as a convolution's kernel gets them.
fn geometry(lx: &Layout, lw: &Layout, pad: usize) -> candle_core::Result<(usize, Geometry)> {
    let (n, c, h, w) = lx.shape().dims4()?;
    let (_, _, k, _) = lw.shape().dims4()?;
    Ok((n, Geometry { c, h, w, k, pad }))
}

/// (x, W, b) -> y (N, C_out, Ho, Wo), optionally through a ReLU.
struct Conv {
    pad: usize,
    relu: bool,
}

impl Kernel3 for Conv {
    const NAME: &'static str = "biflow-conv2d";

    fn cpu(&self, [x, w, b]: [&[f32]; 3], [lx, lw, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, g) = geometry(lx, lw, self.pad)?;
        let (ho, wo) = g.out();
        let ((image, kk, hw), c_out) = (g.sizes(), b.len());
        let mut y = vec![0f32; n * c_out * hw];
        for (xi, yi) in x.chunks(image).zip(y.chunks_mut(c_out * hw)) {
            let cols = unfold(xi, g);
            // y_i (C_out, HoWo) = W (C_out, C k k) cols (C k k, HoWo).
            matmul(yi, 0, hw, c_out, hw, kk, View::rows(w, 0, kk), View::rows(&cols, 0, hw), false, Threads::All);
            let relu = self.relu;
            yi.par_chunks_mut(hw).zip(b).for_each(|(row, bias)| row.iter_mut().for_each(|v| *v = if relu { (*v + bias).max(0.0) } else { *v + bias }));
        }
        Ok((y, Shape::from((n, c_out, ho, wo))))
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], out: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (need_x, need_w) = (x.track_op(), w.track_op() || b.track_op());
        // Through the ReLU: the gradient where the output is positive.
        let grad = if self.relu { (grad * out.gt(0f32)?.to_dtype(grad.dtype())?)? } else { grad.clone() };
        let bwd = ConvBwd { pad: self.pad, need_x, need_w };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &Op3(bwd))?;
        unpack_grads(&packed, [x, w, b], [need_x, need_w, need_w])
    }
}

/// (x, W, dy) -> [dx | dW | db], packed; the parts not needed are left out.
struct ConvBwd {
    pad: usize,
    need_x: bool,
    need_w: bool,
}

impl Kernel3 for ConvBwd {
    const NAME: &'static str = "biflow-conv2d-bwd";

    fn cpu(&self, [x, w, dy]: [&[f32]; 3], [lx, lw, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (_, g) = geometry(lx, lw, self.pad)?;
        let (image, kk, hw) = g.sizes();
        let c_out = w.len() / kk;
        let (nx, nw) = (if self.need_x { x.len() } else { 0 }, if self.need_w { w.len() } else { 0 });
        let mut out = vec![0f32; nx + nw + if self.need_w { c_out } else { 0 }];
        let (dx, rest) = out.split_at_mut(nx);
        let (dw, db) = rest.split_at_mut(nw);
        let mut dcols = if self.need_x { vec![0f32; kk * hw] } else { Vec::new() };
        for (i, (xi, gi)) in x.chunks(image).zip(dy.chunks(c_out * hw)).enumerate() {
            if self.need_x {
                // dcols (C k k, HoWo) = W^T dy_i, folded back onto the image.
                matmul(&mut dcols, 0, hw, kk, hw, c_out, View::rows(w, 0, kk).t(), View::rows(gi, 0, hw), false, Threads::All);
                fold(&dcols, g, &mut dx[i * image..(i + 1) * image]);
            }
            if self.need_w {
                // dW (C_out, C k k) += dy_i cols^T; db += the rows' sums.
                let cols = unfold(xi, g);
                matmul(dw, 0, kk, c_out, kk, hw, View::rows(gi, 0, hw), View::rows(&cols, 0, hw).t(), i > 0, Threads::All);
                db.iter_mut().zip(gi.chunks(hw)).for_each(|(d, row)| *d += row.iter().sum::<f32>());
            }
        }
        let n = out.len();
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Output and the gradients of input, weight and bias equal candle's conv2d (the composed
    /// reference), with and without padding and ReLU, odd sizes included.
    #[test]
    fn conv2d_matches_candle() {
        let dev = Device::Cpu;
        for (c, h, w, co, k, pad) in [(3, 9, 7, 5, 3, 1), (4, 6, 6, 2, 1, 0), (2, 5, 8, 3, 3, 0), (3, 1, 1, 2, 3, 1), (2, 2, 3, 4, 3, 1)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap()).unwrap();
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (co, c, k, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, co, &dev).unwrap()).unwrap();
            let relu = k == 3;
            let ours = super::convolution(x.as_tensor(), wt.as_tensor(), b.as_tensor(), pad, relu).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), pad, 1, 1, 1).unwrap().broadcast_add(&b.as_tensor().reshape((1, co, 1, 1)).unwrap()).unwrap();
            let theirs = if relu { theirs.relu().unwrap() } else { theirs };
            let r = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-4, "outputs differ by {}", diff(&ours, &theirs));
            let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt, &b] {
                let (a, b) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
                assert!(diff(a, b) < 1e-3, "a gradient differs by {}", diff(a, b));
            }
        }
    }
}
