//! The pre-LN transformer layer F and G share, by hand: its parameters' places in a parameter list,
//! what its forward keeps for the backward, and both passes over the fused kernels of [`crate::engines::ops`].

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, TensorId};

use crate::models::flow::config::MLP_EXPANSION;
use crate::engines::ops::{self, AttentionDims};

/// Tokens per group in a pass that keeps nothing: samples go through such passes a group at a
/// time, so that a layer's activations stay in cache from one kernel to the next.
pub(crate) const GROUP_TOKENS: usize = 2048;

/// Indices of a linear layer's (or a LayerNorm's) weight and bias in the parameter list.
#[derive(Clone, Copy)]
pub(crate) struct Pair {
    pub w: usize,
    pub b: usize,
}

/// Where a model's parameters sit in the list a hand-written pass receives. The model walks its
/// own modules and asks for each tensor (found by identity, so no parameter name is spelt twice):
/// the candle modules stay the one description of the network.
pub(crate) struct Places(HashMap<TensorId, usize>);

impl Places {
    /// `named`: the model's parameters with their names; `order`: the names in the pass's order.
    pub fn new(named: &[(String, Tensor)], order: &[String]) -> Result<Places> {
        ensure!(named.len() == order.len(), "the pass receives {} parameters, the model has {}", order.len(), named.len());
        let at: HashMap<&str, usize> = order.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let places = named.iter().map(|(name, t)| Ok((t.id(), *at.get(name.as_str()).with_context(|| format!("the pass is given no parameter {name}"))?))).collect::<Result<_>>()?;
        Ok(Places(places))
    }
    pub fn of(&self, t: &Tensor) -> Result<usize> {
        self.0.get(&t.id()).copied().context("a tensor of the model is not among its parameters")
    }
    pub fn pair(&self, weight: &Tensor, bias: &Tensor) -> Result<Pair> {
        Ok(Pair { w: self.of(weight)?, b: self.of(bias)? })
    }
}

/// Where one layer's parameters sit (see [`crate::models::layers::AttentionBlock::places`]).
pub(crate) struct LayerParams {
    pub norm1: Pair,
    pub qkv: Pair,
    pub proj: Pair,
    pub norm2: Pair,
    pub fc1: Pair,
    pub fc2: Pair,
}

/// What one transformer layer keeps for its backward pass, each (N, T, width); `h` is its input.
pub(crate) struct LayerActs {
    pub h: Vec<f32>,
    a1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    h_mid: Vec<f32>,
    a2: Vec<f32>,
    f1: Vec<f32>,
    g: Vec<f32>,
}

impl LayerActs {
    pub fn new(rows: usize, c: usize) -> LayerActs {
        let buf = |width: usize| vec![0f32; rows * width];
        LayerActs { h: buf(c), a1: buf(c), qkv: buf(3 * c), att: buf(c), h_mid: buf(c), a2: buf(c), f1: buf(MLP_EXPANSION * c), g: buf(MLP_EXPANSION * c) }
    }
}

/// The backward pass's temporaries, (N, T, width), kept from one batch to the next.
pub(crate) struct LayerScratch {
    dg: Vec<f32>,
    df1: Vec<f32>,
    da2: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    da1: Vec<f32>,
}

impl LayerScratch {
    pub fn new(rows: usize, c: usize) -> LayerScratch {
        let buf = |width: usize| vec![0f32; rows * width];
        let e = MLP_EXPANSION * c;
        LayerScratch { dg: buf(e), df1: buf(e), da2: buf(c), datt: buf(c), dqkv: buf(3 * c), da1: buf(c) }
    }
}

/// The attention problem and the constants every layer shares.
#[derive(Clone, Copy)]
pub(crate) struct LayerShape {
    pub dims: AttentionDims,
    pub scale: f32,
    pub eps: f32,
    /// The layers' four weight matrices are stored packed ([`ops::pack`], a frozen model's layout; forward only).
    pub packed: bool,
}

/// One pre-LN transformer layer on `la.h`, keeping its intermediates in `la`; writes its output.
pub(crate) fn layer_forward(params: &[&[f32]], lp: &LayerParams, la: &mut LayerActs, out: &mut [f32], s: LayerShape) {
    let p = |pair: Pair| (params[pair.w], params[pair.b]);
    let linear = if s.packed { ops::linear_packed } else { ops::linear_fwd };
    let ((nw, nb), (qw, qb), (pw, pb)) = (p(lp.norm1), p(lp.qkv), p(lp.proj));
    ops::layer_norm_fwd(&la.h, nw, nb, s.eps, &mut la.a1);
    linear(&la.a1, qw, qb, &mut la.qkv);
    ops::attention_fwd(&la.qkv, s.dims, s.dims.heads(), s.scale, &mut la.att);
    linear(&la.att, pw, pb, &mut la.h_mid);
    add_assign(&mut la.h_mid, &la.h);
    let ((nw, nb), (w1, b1), (w2, b2)) = (p(lp.norm2), p(lp.fc1), p(lp.fc2));
    ops::layer_norm_fwd(&la.h_mid, nw, nb, s.eps, &mut la.a2);
    linear(&la.a2, w1, b1, &mut la.f1);
    ops::gelu_fwd(&la.f1, &mut la.g);
    linear(&la.g, w2, b2, out);
    add_assign(out, &la.h_mid);
}

impl LayerParams {
    /// Its four weight matrices (d_out, d_in) packed for [`ops::linear_packed`], in place in `values`.
    pub fn pack_weights(&self, values: &mut [Vec<f32>]) {
        for pair in [self.qkv, self.proj, self.fc1, self.fc2] {
            values[pair.w] = ops::pack(&values[pair.w], values[pair.b].len());
        }
    }
}

/// The backward of [`layer_forward`]: `dh` holds the gradient of the layer's output and becomes that
/// of its input; the parameters' gradients are written into `grads`.
pub(crate) fn layer_backward(params: &[&[f32]], lp: &LayerParams, la: &LayerActs, dh: &mut [f32], sc: &mut LayerScratch, grads: &mut [Vec<f32>], s: LayerShape) {
    let LayerScratch { dg, df1, da2, datt, dqkv, da1 } = sc;
    // h_next = h_mid + fc2(gelu(fc1(norm2(h_mid)))); dh holds d h_next, then d h_mid.
    linear_bwd(&la.g, params, lp.fc2, dh, Some(dg), grads);
    ops::gelu_bwd(&la.f1, dg, df1);
    linear_bwd(&la.a2, params, lp.fc1, df1, Some(da2), grads);
    layer_norm_bwd(&la.h_mid, params, lp.norm2, da2, dh, grads, s.eps);
    // h_mid = h + proj(attention(qkv(norm1(h)))); dh becomes d h.
    linear_bwd(&la.att, params, lp.proj, dh, Some(datt), grads);
    ops::attention_bwd(&la.qkv, datt, s.dims, s.dims.heads(), s.scale, dqkv);
    linear_bwd(&la.a1, params, lp.qkv, dqkv, Some(da1), grads);
    layer_norm_bwd(&la.h, params, lp.norm1, da1, dh, grads, s.eps);
}

/// The parameter list a pass receives has the sizes it was built for.
pub(crate) fn check_sizes(params: &[&[f32]], sizes: &[usize]) -> Result<()> {
    ensure!(params.len() == sizes.len(), "wrong number of parameters");
    for (i, (p, &size)) in params.iter().zip(sizes).enumerate() {
        ensure!(p.len() == size, "parameter {i} has {} values, expected {size}", p.len());
    }
    Ok(())
}

/// N labels, each a class below `classes` or -1 (no label).
pub(crate) fn check_labels(labels: &[i64], n: usize, classes: usize) -> Result<()> {
    ensure!(labels.len() == n, "got {} labels for {n} samples", labels.len());
    if let Some(l) = labels.iter().find(|&&l| l < -1 || l >= classes as i64) {
        bail!("label {l} is out of range: the model has {classes} classes (use -1 for no label)");
    }
    Ok(())
}

pub(crate) fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, v)| *a += v);
}

/// The mean of a table's rows of length c: the class embedding of a dropped label (-1).
pub(crate) fn mean_row(table: &[f32], c: usize) -> Vec<f32> {
    let mut mean = vec![0f32; c];
    for row in table.chunks(c) {
        add_assign(&mut mean, row);
    }
    let k = (table.len() / c) as f32;
    mean.iter_mut().for_each(|v| *v /= k);
    mean
}

/// The gradient of a class table (K rows of c) from per-sample gradients of the embedding each
/// sample added (N rows of c); a dropped label (-1) took the mean row, so its gradient spreads evenly.
pub(crate) fn class_table_bwd(per_sample: &[f32], labels: &[i64], c: usize, dtable: &mut [f32]) {
    dtable.fill(0.0);
    let k = dtable.len() / c;
    for (row, &l) in per_sample.chunks(c).zip(labels) {
        if l < 0 {
            let share: Vec<f32> = row.iter().map(|v| v / k as f32).collect();
            dtable.chunks_mut(c).for_each(|r| add_assign(r, &share));
        } else {
            add_assign(&mut dtable[l as usize * c..(l as usize + 1) * c], row);
        }
    }
}

pub(crate) fn linear(x: &[f32], params: &[&[f32]], p: Pair, d_out: usize) -> Vec<f32> {
    let d_in = params[p.w].len() / d_out;
    let mut y = vec![0f32; x.len() / d_in * d_out];
    ops::linear_fwd(x, params[p.w], params[p.b], &mut y);
    y
}

/// The gradient buffers of a (weight, bias) pair, borrowed together.
pub(crate) fn pair_mut(grads: &mut [Vec<f32>], p: Pair) -> (&mut [f32], &mut [f32]) {
    if p.w < p.b {
        let (lo, hi) = grads.split_at_mut(p.b);
        (&mut lo[p.w], &mut hi[0])
    } else {
        let (lo, hi) = grads.split_at_mut(p.w);
        (&mut hi[0], &mut lo[p.b])
    }
}

pub(crate) fn linear_bwd(x: &[f32], params: &[&[f32]], p: Pair, g: &[f32], dx: Option<&mut [f32]>, grads: &mut [Vec<f32>]) {
    let (dw, db) = pair_mut(grads, p);
    ops::linear_bwd(x, params[p.w], g, dx, false, dw, db);
}

/// Adds the input gradient to `dx` (the residual stream's gradient).
pub(crate) fn layer_norm_bwd(x: &[f32], params: &[&[f32]], p: Pair, g: &[f32], dx: &mut [f32], grads: &mut [Vec<f32>], eps: f32) {
    let (dw, db) = pair_mut(grads, p);
    ops::layer_norm_bwd(x, params[p.w], g, eps, dx, dw, db);
}
