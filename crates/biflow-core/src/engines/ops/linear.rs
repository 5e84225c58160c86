//! The linear layer `y = x W^T + b` as one op. The bias is the gemm's starting value, and the
//! backward gives dx, dW and db from two gemms and one column sum, where the composed version pays
//! for transposed copies and a broadcast reduction.

use anyhow::Result;
use candle_core::{Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, Threads, View};
pub(crate) use super::gemm::transpose;
use super::packed::{linear_packed, pack};
use super::{fused, unpack_grads, Kernel3, Op3};

/// x (..., in), W (out, in), b (out) -> (..., out).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused(x) {
        Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Op3(Linear))?)
    } else {
        linear_reference(x, w, b)
    }
}

pub fn linear_reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (d_out, d_in) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let y = crate::device::mode::matmul(&x.reshape(((), d_in))?, &w.t()?)?.broadcast_add(b)?;
    *dims.last_mut().unwrap() = d_out;
    Ok(y.reshape(dims)?)
}

/// The kernel: rows of x (row length d_in) -> y = x W^T + b, for W (d_out, d_in) and b (d_out).
pub(crate) fn linear_fwd(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let (d_out, d_in) = (b.len(), w.len() / b.len());
    let rows = x.len() / d_in;
    // For enough rows (training batches, not decoding steps) W is packed for the packed kernel (or,
    // without one, transposed: gemm runs ~8% faster on a row-major right operand than on the strided
    // view W^T); the copy costs well under 1% of the product.
    if rows < 1024 {
        for row in y.chunks_mut(d_out) {
            row.copy_from_slice(b);
        }
        matmul(y, 0, d_out, rows, d_out, d_in, View::rows(x, 0, d_in), View::rows(w, 0, d_in).t(), true, Threads::All);
        return;
    }
    linear_packed(x, &pack(w, d_out), b, y);
}

/// The backward kernel: dW = g^T x and db = column sums of g (written), and dx = g W (written, or
/// added to what `dx` holds with `accumulate`; skipped when None, for an input without gradient).
pub(crate) fn linear_bwd(x: &[f32], w: &[f32], g: &[f32], dx: Option<&mut [f32]>, accumulate: bool, dw: &mut [f32], db: &mut [f32]) {
    let (d_out, d_in) = (db.len(), w.len() / db.len());
    let rows = x.len() / d_in;
    let g_rows = View::rows(g, 0, d_out);
    if let Some(dx) = dx {
        matmul(dx, 0, d_in, rows, d_in, d_out, g_rows, View::rows(w, 0, d_in), accumulate, Threads::All);
    }
    matmul(dw, 0, d_in, d_out, d_in, rows, g_rows.t(), View::rows(x, 0, d_in), false, Threads::All);
    let chunk = rows.div_ceil(rayon::current_num_threads()).max(1) * d_out;
    let sums = g
        .par_chunks(chunk)
        .map(|block| {
            let mut s = vec![0f32; d_out];
            for row in block.chunks(d_out) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            s
        })
        .collect::<Vec<_>>();
    db.fill(0.0);
    for s in sums {
        db.iter_mut().zip(&s).for_each(|(d, v)| *d += v);
    }
}

struct Linear;

impl Kernel3 for Linear {
    const NAME: &'static str = "biflow-linear";

    fn cpu(&self, [x, w, b]: [&[f32]; 3], [lx, lw, lb]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (d_out, d_in) = lw.shape().dims2()?;
        if lx.dims().last() != Some(&d_in) || b.len() != d_out {
            candle_core::bail!("linear: input {:?}, weight {:?}, bias {:?} do not fit", lx.dims(), lw.dims(), lb.dims());
        }
        let mut y = vec![0f32; x.len() / d_in * d_out];
        linear_fwd(x, w, b, &mut y);
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().unwrap() = d_out;
        Ok((y, Shape::from(dims)))
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], _out: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &Op3(LinearBwd))?;
        unpack_grads(&packed, [x, w, b], [true; 3])
    }
}

/// (x, W, g) -> [dx = g W | dW = g^T x | db = column sums of g], packed in one buffer.
struct LinearBwd;

impl Kernel3 for LinearBwd {
    const NAME: &'static str = "biflow-linear-bwd";

    fn cpu(&self, [x, w, g]: [&[f32]; 3], [_, lw, _]: [&Layout; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (d_out, d_in) = lw.shape().dims2()?;
        let dx_len = x.len();
        let mut out = vec![0f32; dx_len + d_out * d_in + d_out];
        let (dx, rest) = out.split_at_mut(dx_len);
        let (dw, db) = rest.split_at_mut(d_out * d_in);
        linear_bwd(x, w, g, Some(dx), false, dw, db);
        let n = out.len();
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    /// The tiled transpose, on shapes that are not multiples of the tile.
    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [(1, 1), (3, 40), (37, 17), (64, 256)] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&m, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "({r}, {c}) of {rows}x{cols}");
                }
            }
        }
    }
}
