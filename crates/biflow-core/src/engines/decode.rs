//! Exact causal decoding on the CPU in f32: one token per sample through one flow block per step,
//! on host buffers that live for the whole block.
//!
//! A decoding step multiplies N rows (one token per sample) by each weight matrix, so candle's fixed
//! cost per op (dispatch, a fresh output tensor, a contiguous copy, the KV cache as strided tensors)
//! outweighed the arithmetic. Here a step is a few kernel calls on reused buffers: the same fused
//! LayerNorm, linear and GELU kernels as the training path, and the attention over the cache as
//! direct loops. The batch is cut into one slice of samples per worker thread, and each worker runs
//! the whole step for its samples (its own cache rows and buffers), so a step costs one fork-join
//! instead of one per op. The composed candle path in `models/flow/inverse.rs` stays for other devices and dtypes.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::models::flow::config::soft_clip;
use crate::engines::ops::{simd_kernels, exp_nonpositive, gelu_fwd, layer_norm_fwd, matmul, transpose, Threads, View};

/// A tensor's values as a host f32 vector.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// y = x W^T + b for W (d_out, d_in): host copies of a linear layer's parameters, the weight stored
/// transposed, (d_in, d_out) row-major. gemm repacks a strided operand on every call, and for the few
/// rows of a decoding step repacking W (element by element) took longer than the product itself.
/// Not the packed kernel G samples with ([`crate::engines::ops::linear_packed`]): its one long sum per output rounds
/// more than gemm's few-row path, 2040 dependent decoding steps amplify that (tests/decode.rs:
/// 1.1e-5 of the largest token from an f64 decoding instead of 1.3e-6), and at a step's few rows
/// the product is bound by reading W, which packing does not shorten.
pub(crate) struct HostLinear {
    wt: Vec<f32>,
    b: Vec<f32>,
}

impl HostLinear {
    pub fn new(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (w, b) = (host(w)?, host(b)?);
        let wt = transpose(&w, b.len(), w.len() / b.len().max(1));
        Ok(HostLinear { wt, b })
    }

    fn d_in(&self) -> usize {
        self.wt.len() / self.b.len()
    }

    /// y = x W^T + b.
    fn forward(&self, x: &[f32], y: &mut [f32], threads: Threads) {
        for row in y.chunks_mut(self.b.len()) {
            row.copy_from_slice(&self.b);
        }
        self.accumulate(x, y, threads);
    }

    /// y += x W^T + b (the residual stream takes the product in place).
    fn forward_add(&self, x: &[f32], y: &mut [f32], threads: Threads) {
        for row in y.chunks_mut(self.b.len()) {
            row.iter_mut().zip(&self.b).for_each(|(y, b)| *y += b);
        }
        self.accumulate(x, y, threads);
    }

    /// y += x W^T.
    fn accumulate(&self, x: &[f32], y: &mut [f32], threads: Threads) {
        let (d_out, d_in) = (self.b.len(), self.d_in());
        matmul(y, 0, d_out, x.len() / d_in, d_out, d_in, View::rows(x, 0, d_in), View::rows(&self.wt, 0, d_out), true, threads);
    }
}

/// Host copies of a LayerNorm's affine parameters.
pub(crate) struct HostNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl HostNorm {
    pub fn new(w: &Tensor, b: &Tensor, eps: f64) -> Result<Self> {
        Ok(HostNorm { w: host(w)?, b: host(b)?, eps: eps as f32 })
    }
}

/// One pre-LN transformer layer: x + attn(x), then + mlp(x).
pub(crate) struct HostLayer {
    pub attn_norm: HostNorm,
    pub qkv: HostLinear,
    pub proj: HostLinear,
    pub mlp_norm: HostNorm,
    pub fc1: HostLinear,
    pub fc2: HostLinear,
}

/// What a flow block needs to decode: its parameters (host copies) and its shapes.
pub(crate) struct HostBlock {
    pub proj_in: HostLinear,
    /// (T, C): the position embedding, rows in the canonical token order.
    pub pos: Vec<f32>,
    /// (N, C): the class embedding of each sample (conditional and guiding rows), if any.
    pub class: Option<Vec<f32>>,
    pub layers: Vec<HostLayer>,
    pub proj_out: HostLinear,
    /// The soft clip scale of the log-scales ([`soft_clip`]).
    pub clip: Option<f64>,
    pub heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
}

/// The state of one worker: a slice of the batch (rows `start..start + rows`), with its KV caches
/// (per layer, (rows, heads, T, head_dim)) and step buffers.
struct Worker {
    start: usize,
    rows: usize,
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    h: Vec<f32>,
    t1: Vec<f32>,
    qkv: Vec<f32>,
    hidden: Vec<f32>,
    act: Vec<f32>,
    out: Vec<f32>,
    scores: Vec<f32>,
}

/// Causal decoding of one flow block over a batch: feed token i, get (a, b) of token i + 1.
pub(crate) struct BlockDecoder<'a> {
    block: &'a HostBlock,
    workers: Vec<Worker>,
    /// Per-sample attention scale (1/sqrt(head_dim), over the temperature for guiding rows).
    scales: Vec<f32>,
    threads: Threads,
}

impl<'a> BlockDecoder<'a> {
    pub fn new(block: &'a HostBlock, scales: Vec<f32>) -> Result<Self> {
        let n = scales.len();
        let c = block.heads * block.head_dim;
        ensure!(block.pos.len() == block.tokens * c, "decoder: position table does not fit");
        if let Some(cl) = &block.class {
            ensure!(cl.len() == n * c, "decoder: class rows do not fit");
        }
        ensure!(block.head_dim.is_multiple_of(VALUE_COLUMNS), "decoder: head size {} is not a multiple of {VALUE_COLUMNS}", block.head_dim);
        // One slice of samples per thread; with fewer samples than threads, one slice whose products
        // use every thread instead.
        let parts = rayon::current_num_threads().min(n).max(1);
        let threads = if parts == 1 { Threads::All } else { Threads::One };
        let d = block.proj_in.d_in();
        let cache = |rows: usize| vec![0f32; rows * block.heads * block.tokens * block.head_dim];
        let workers = (0..parts)
            .map(|p| {
                let (start, end) = (p * n / parts, (p + 1) * n / parts);
                let rows = end - start;
                let mlp = block.layers.first().map_or(0, |l| l.fc1.b.len());
                Worker {
                    start,
                    rows,
                    len: 0,
                    k: block.layers.iter().map(|_| cache(rows)).collect(),
                    v: block.layers.iter().map(|_| cache(rows)).collect(),
                    h: vec![0f32; rows * c],
                    t1: vec![0f32; rows * c],
                    qkv: vec![0f32; rows * 3 * c],
                    hidden: vec![0f32; rows * mlp],
                    act: vec![0f32; rows * mlp],
                    out: vec![0f32; rows * 2 * d],
                    scores: vec![0f32; block.tokens],
                }
            })
            .collect();
        Ok(BlockDecoder { block, workers, scales, threads })
    }

    /// Feed the next token of each sample, (N, D), whose position embedding is row `pos_row` of
    /// the table, and write the affine parameters of the token after it to `a` and `b` (N, D).
    pub fn step(&mut self, tokens: &[f32], pos_row: usize, a: &mut [f32], b: &mut [f32]) {
        let (block, scales, threads) = (self.block, &self.scales, self.threads);
        let d = block.proj_in.d_in();
        let run = |w: &mut Worker, a: &mut [f32], b: &mut [f32]| {
            let rows = w.start..w.start + w.rows;
            worker_step(block, w, &tokens[rows.start * d..rows.end * d], pos_row, &scales[rows], a, b, threads);
        };
        // Cut a and b into the workers' row ranges. Even a single worker runs on the pool: the
        // kernels' own parallel loops then run inside it, instead of each handing its work over from
        // this thread (a wake-up per op, which costs most when other processes share the cores).
        let mut jobs = Vec::with_capacity(self.workers.len());
        let (mut a_rest, mut b_rest) = (a, b);
        for w in self.workers.iter_mut() {
            let (a_w, a_next) = a_rest.split_at_mut(w.rows * d);
            let (b_w, b_next) = b_rest.split_at_mut(w.rows * d);
            jobs.push((w, a_w, b_w));
            (a_rest, b_rest) = (a_next, b_next);
        }
        jobs.into_par_iter().for_each(|(w, a, b)| run(w, a, b));
    }
}

/// The whole step for one worker's samples.
#[allow(clippy::too_many_arguments)]
fn worker_step(block: &HostBlock, w: &mut Worker, tokens: &[f32], pos_row: usize, scales: &[f32], a: &mut [f32], b: &mut [f32], threads: Threads) {
    let c = block.heads * block.head_dim;
    let d = a.len() / w.rows.max(1);
    // h = proj_in(x) + pos (+ class)
    block.proj_in.forward(tokens, &mut w.h, threads);
    let pos = &block.pos[pos_row * c..(pos_row + 1) * c];
    for (s, row) in w.h.chunks_mut(c).enumerate() {
        row.iter_mut().zip(pos).for_each(|(h, p)| *h += p);
        if let Some(class) = &block.class {
            let cl = &class[(w.start + s) * c..(w.start + s + 1) * c];
            row.iter_mut().zip(cl).for_each(|(h, e)| *h += e);
        }
    }
    for (l, layer) in block.layers.iter().enumerate() {
        // Attention: LayerNorm -> qkv -> attend over the cache -> proj, added to the stream.
        norm_rows(&layer.attn_norm, &w.h, &mut w.t1);
        layer.qkv.forward(&w.t1, &mut w.qkv, threads);
        attend(&w.qkv, &mut w.k[l], &mut w.v[l], w.len, block, scales, &mut w.scores, &mut w.t1);
        layer.proj.forward_add(&w.t1, &mut w.h, threads);
        // MLP: LayerNorm -> fc1 -> GELU -> fc2, added to the stream.
        norm_rows(&layer.mlp_norm, &w.h, &mut w.t1);
        layer.fc1.forward(&w.t1, &mut w.hidden, threads);
        gelu_fwd(&w.hidden, &mut w.act);
        layer.fc2.forward_add(&w.act, &mut w.h, threads);
    }
    w.len += 1;
    // o = proj_out(h): (rows, 2D) = [a | b] per row.
    block.proj_out.forward(&w.h, &mut w.out, threads);
    for (s, row) in w.out.chunks(2 * d).enumerate() {
        let (ra, rb) = row.split_at(d);
        let out_a = &mut a[s * d..(s + 1) * d];
        out_a.iter_mut().zip(ra).for_each(|(o, &v)| *o = soft_clip(v, block.clip));
        b[s * d..(s + 1) * d].copy_from_slice(rb);
    }
}

fn norm_rows(n: &HostNorm, x: &[f32], out: &mut [f32]) {
    layer_norm_fwd(x, &n.w, &n.b, n.eps, out);
}

/// Append this token's k and v (from qkv rows laid out [q heads | k heads | v heads]) to the cache at
/// position `len`, then out[s, head] = softmax(scale_s q k^T) v over positions 0..=len.
#[allow(clippy::too_many_arguments)]
fn attend(qkv: &[f32], k: &mut [f32], v: &mut [f32], len: usize, block: &HostBlock, scales: &[f32], scores: &mut [f32], out: &mut [f32]) {
    let (heads, hd, t) = (block.heads, block.head_dim, block.tokens);
    let c = heads * hd;
    for (s, row) in qkv.chunks(3 * c).enumerate() {
        for h in 0..heads {
            let at = ((s * heads + h) * t + len) * hd;
            k[at..at + hd].copy_from_slice(&row[c + h * hd..c + (h + 1) * hd]);
            v[at..at + hd].copy_from_slice(&row[2 * c + h * hd..2 * c + (h + 1) * hd]);
        }
    }
    let live = len + 1;
    let scores = &mut scores[..live];
    for (s, row) in qkv.chunks(3 * c).enumerate() {
        for h in 0..heads {
            let q = &row[h * hd..(h + 1) * hd];
            let base = (s * heads + h) * t * hd;
            let (ks, vs) = (&k[base..base + live * hd], &v[base..base + live * hd]);
            attend_head(q, ks, vs, scales[s], scores, &mut out[s * c + h * hd..s * c + (h + 1) * hd]);
        }
    }
}

/// Columns of the attention output accumulated at once; the head size must be a multiple.
const VALUE_COLUMNS: usize = 64;

simd_kernels! {
    /// One head of one sample: scores = scale q k_j, softmax over j, out = sum_j p_j v_j.
    fn attend_head(q: &[f32], ks: &[f32], vs: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let hd = q.len();
        // Four keys at a time: four independent accumulator chains instead of one.
        let mut key_rows = ks.chunks_exact(4 * hd);
        let mut score_quads = scores.chunks_exact_mut(4);
        for (quad, k4) in (&mut score_quads).zip(&mut key_rows) {
            let mut acc = [[0f32; 8]; 4];
            for (c, qc) in q.chunks_exact(8).enumerate() {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let kc = &k4[u * hd + c * 8..u * hd + c * 8 + 8];
                    for i in 0..8 {
                        acc[i] += qc[i] * kc[i];
                    }
                }
            }
            for (sc, acc) in quad.iter_mut().zip(&acc) {
                *sc = acc.iter().sum::<f32>() * scale;
            }
        }
        for (sc, kr) in score_quads.into_remainder().iter_mut().zip(key_rows.remainder().chunks_exact(hd)) {
            let mut acc = [0f32; 8];
            for (qc, kc) in q.chunks_exact(8).zip(kr.chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] += qc[i] * kc[i];
                }
            }
            *sc = acc.iter().sum::<f32>() * scale;
        }
        let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = exp_nonpositive(*sc - m);
            sum += *sc;
        }
        // The weighted sum of the values, 64 columns at a time in a local accumulator (registers).
        let inv = 1.0 / sum;
        for (c0, out) in out.chunks_exact_mut(VALUE_COLUMNS).enumerate() {
            let mut acc = [0f32; VALUE_COLUMNS];
            for (&p, vr) in scores.iter().zip(vs.chunks_exact(hd)) {
                let vr = &vr[c0 * VALUE_COLUMNS..(c0 + 1) * VALUE_COLUMNS];
                for i in 0..VALUE_COLUMNS {
                    acc[i] += p * vr[i];
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = a * inv;
            }
        }
    }
}
