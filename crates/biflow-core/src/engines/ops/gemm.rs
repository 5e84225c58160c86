//! A strided-matrix front for the `gemm` crate, so the fused ops can multiply views of their
//! buffers (a head's columns, a transpose) without copying them first.

/// An f32 matrix view: element (i, j) lives at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View {
    ptr: *const f32,
    /// Elements from `ptr` to the end of the slice the view was made from.
    len: usize,
    rs: usize,
    cs: usize,
}

impl View {
    /// Row-major rows of `row_stride` elements starting at `data[offset]`.
    pub fn rows(data: &[f32], offset: usize, row_stride: usize) -> View {
        View { ptr: data[offset..].as_ptr(), len: data.len() - offset, rs: row_stride, cs: 1 }
    }
    /// The transpose: no data moves.
    pub fn t(self) -> View {
        View { rs: self.cs, cs: self.rs, ..self }
    }
    /// Whether a rows x cols matrix fits in the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.len
    }
}

/// Run the product single-threaded (inside a task that is already one of many) or on the rayon pool.
#[derive(Clone, Copy, PartialEq)]
pub enum Threads {
    One,
    All,
}

/// `dst[i, j] (+)= sum_k a[i, k] b[k, j]` for an m x n destination of row-major rows of `dst_stride`
/// elements starting at `dst[offset]`; with `accumulate` the product is added to what is there.
///
/// Panics if the destination or an operand (`a` is m x k, `b` is k x n) overruns its slice.
#[allow(clippy::too_many_arguments)]
pub fn matmul(dst: &mut [f32], offset: usize, dst_stride: usize, m: usize, n: usize, k: usize, a: View, b: View, accumulate: bool, threads: Threads) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(offset + (m - 1) * dst_stride + n <= dst.len(), "matmul destination out of bounds");
    assert!(a.fits(m, k) && b.fits(k, n), "matmul operand out of bounds");
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: every element gemm touches was bounds-checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(offset),
            1,
            dst_stride as isize,
            accumulate,
            a.ptr,
            a.cs as isize,
            a.rs as isize,
            b.ptr,
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// [`linear_fwd`](super::linear::linear_fwd) with the weight given transposed: W^T (d_in, d_out), row-major (a model that
/// only samples keeps its weights this way).
pub(crate) fn linear_fwd_t(x: &[f32], wt: &[f32], b: &[f32], y: &mut [f32]) {
    let (d_out, d_in) = (b.len(), wt.len() / b.len());
    let rows = x.len() / d_in;
    for row in y.chunks_mut(d_out) {
        row.copy_from_slice(b);
    }
    matmul(y, 0, d_out, rows, d_out, d_in, View::rows(x, 0, d_in), View::rows(wt, 0, d_out), true, Threads::All);
}

/// The (cols, rows) transpose of a row-major (rows, cols) matrix, in tiles: an element-by-element
/// transpose writes every value to another cache line and page, which cost a third of a training
/// linear's time.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut t = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    t
}
