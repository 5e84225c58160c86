//! TARFlow's training loss and its gradient on the CPU, by hand.
//!
//! The same computation as [`TarFlow::forward`](crate::flow::TarFlow::forward), then
//! [`nll_loss`](crate::flow::nll_loss) and candle's `backward`, written as explicit passes with the
//! fused kernels of [`crate::ops`]. Why: candle's autograd allocates a zero tensor and runs an add
//! for every gradient contribution and keeps its whole graph alive; on a 2-core CPU that bookkeeping
//! cost a quarter of a training step. The tests check the loss and every gradient against autograd.

use anyhow::{bail, ensure, Context, Result};

use crate::flow::{FlowConfig, HEAD_DIM, LN_EPS, MLP_EXPANSION};
use crate::ops::{self, AttentionDims};

/// Indices of a linear layer's weight and bias in the parameter list.
#[derive(Clone, Copy)]
struct Pair {
    w: usize,
    b: usize,
}

struct LayerParams {
    norm1: Pair,
    qkv: Pair,
    proj: Pair,
    norm2: Pair,
    fc1: Pair,
    fc2: Pair,
}

struct BlockParams {
    proj_in: Pair,
    pos: usize,
    class: Option<usize>,
    layers: Vec<LayerParams>,
    proj_out: Pair,
    flip: bool,
}

/// What one transformer layer keeps for its backward pass, each (N, T, width); `h` is its input.
#[derive(Default)]
struct LayerActs {
    h: Vec<f32>,
    a1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    h_mid: Vec<f32>,
    a2: Vec<f32>,
    f1: Vec<f32>,
    g: Vec<f32>,
}

/// What one flow block keeps: its layers', the last hidden state, and (token-sized, so made afresh
/// each pass) its input, the (clipped) log-scales a and its output y, all in its own token order.
struct BlockActs {
    layers: Vec<LayerActs>,
    h_last: Vec<f32>,
    xin: Vec<f32>,
    a: Vec<f32>,
    y: Vec<f32>,
}

/// Every hidden-state-sized buffer of a pass, kept from one batch to the next: allocating ~0.5 GB
/// afresh each step cost more in page faults and zeroing than LayerNorm and GELU together.
struct Workspace {
    rows: usize,
    blocks: Vec<BlockActs>,
    // Backward temporaries, (N, T, width).
    dh: Vec<f32>,
    dg: Vec<f32>,
    df1: Vec<f32>,
    da2: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    da1: Vec<f32>,
}

impl Workspace {
    fn new(rows: usize, cfg: &FlowConfig) -> Workspace {
        let c = cfg.channels;
        let buf = |width: usize| vec![0f32; rows * width];
        let layer = || LayerActs {
            h: buf(c),
            a1: buf(c),
            qkv: buf(3 * c),
            att: buf(c),
            h_mid: buf(c),
            a2: buf(c),
            f1: buf(MLP_EXPANSION * c),
            g: buf(MLP_EXPANSION * c),
        };
        let blocks = (0..cfg.num_blocks)
            .map(|_| BlockActs { layers: (0..cfg.layers_per_block).map(|_| layer()).collect(), h_last: buf(c), xin: Vec::new(), a: Vec::new(), y: Vec::new() })
            .collect();
        let e = MLP_EXPANSION * c;
        Workspace { rows, blocks, dh: buf(c), dg: buf(e), df1: buf(e), da2: buf(c), datt: buf(c), dqkv: buf(3 * c), da1: buf(c) }
    }
}

/// The result of one pass: z (N, T, D) and the per-sample sum over blocks of the logdets (N).
pub struct NllOutput {
    pub z: Vec<f32>,
    pub logdets: Vec<f32>,
}

/// The loss `0.5 mean(z^2) - mean(logdets)` and its gradient for a fixed parameter list.
pub struct NllGrad {
    cfg: FlowConfig,
    blocks: Vec<BlockParams>,
    sizes: Vec<usize>,
    work: Option<Workspace>,
}

impl NllGrad {
    /// `names` and `sizes`: the parameter list in the order `run` receives it (reference names).
    pub fn new(cfg: &FlowConfig, names: &[String], sizes: &[usize]) -> Result<NllGrad> {
        cfg.validate()?;
        ensure!(names.len() == sizes.len(), "{} parameter names for {} sizes", names.len(), sizes.len());
        let index = |name: String| names.iter().position(|n| *n == name).with_context(|| format!("the model has no parameter {name}"));
        let pair = |p: &str| -> Result<Pair> { Ok(Pair { w: index(format!("{p}.weight"))?, b: index(format!("{p}.bias"))? }) };
        let mut blocks = Vec::new();
        for i in 0..cfg.num_blocks {
            let b = format!("blocks.{i}");
            let mut layers = Vec::new();
            for j in 0..cfg.layers_per_block {
                let l = format!("{b}.attn_blocks.{j}");
                layers.push(LayerParams {
                    norm1: pair(&format!("{l}.attention.norm"))?,
                    qkv: pair(&format!("{l}.attention.qkv"))?,
                    proj: pair(&format!("{l}.attention.proj"))?,
                    norm2: pair(&format!("{l}.mlp.norm"))?,
                    fc1: pair(&format!("{l}.mlp.main.0"))?,
                    fc2: pair(&format!("{l}.mlp.main.2"))?,
                });
            }
            blocks.push(BlockParams {
                proj_in: pair(&format!("{b}.proj_in"))?,
                pos: index(format!("{b}.pos_embed"))?,
                class: if cfg.num_classes > 0 { Some(index(format!("{b}.class_embed"))?) } else { None },
                layers,
                proj_out: pair(&format!("{b}.proj_out"))?,
                flip: i % 2 == 1,
            });
        }
        Ok(NllGrad { cfg: cfg.clone(), blocks, sizes: sizes.to_vec(), work: None })
    }

    /// Forward and backward for tokens (N, T, D) and labels (N; -1 = dropped; None = unconditional):
    /// writes d loss / d parameter into `grads` (one buffer per parameter, every element written)
    /// and returns z and the logdets, from which the loss and bits/dim follow.
    pub fn run(&mut self, params: &[&[f32]], tokens: &[f32], labels: Option<&[i64]>, grads: &mut [Vec<f32>]) -> Result<NllOutput> {
        let (t, d, c) = (self.cfg.num_tokens(), self.cfg.token_dim(), self.cfg.channels);
        ensure!(params.len() == self.sizes.len() && grads.len() == self.sizes.len(), "wrong number of parameters");
        for (i, &size) in self.sizes.iter().enumerate() {
            ensure!(params[i].len() == size, "parameter {i} has {} values, expected {size}", params[i].len());
        }
        ensure!(!tokens.is_empty() && tokens.len() % (t * d) == 0, "tokens must be N x {t} x {d}");
        let n = tokens.len() / (t * d);
        let labels = if self.cfg.num_classes > 0 { labels } else { None };
        if let Some(y) = labels {
            ensure!(y.len() == n, "got {} labels for {n} samples", y.len());
            if let Some(l) = y.iter().find(|&&l| l < -1 || l >= self.cfg.num_classes as i64) {
                bail!("label {l} is out of range: the model has {} classes (use -1 for no label)", self.cfg.num_classes);
            }
        }
        let dims = AttentionDims::of(t, c, c / HEAD_DIM, true).context("channels must be a multiple of the head size")?;
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let eps = LN_EPS as f32;
        let rows = n * t;

        if self.work.as_ref().map(|w| w.rows) != Some(rows) {
            self.work = None; // free the old buffers before making the new ones
            self.work = Some(Workspace::new(rows, &self.cfg));
        }
        let ws = self.work.as_mut().unwrap();

        // Forward.
        let mut x = tokens.to_vec();
        let mut logdets = vec![0f32; n];
        for (bp, acts) in self.blocks.iter().zip(ws.blocks.iter_mut()) {
            let xin = permute_tokens(&x, n, t, d, bp.flip);
            let h0 = &mut acts.layers[0].h;
            ops::linear_fwd(&xin, params[bp.proj_in.w], params[bp.proj_in.b], h0);
            add_position_and_class(h0, params[bp.pos], bp.class.map(|k| params[k]), labels, n, t, c, bp.flip);
            for l in 0..bp.layers.len() {
                let (done, rest) = acts.layers.split_at_mut(l + 1);
                let out = match rest.first_mut() {
                    Some(next) => &mut next.h,
                    None => &mut acts.h_last,
                };
                layer_forward(params, &bp.layers[l], &mut done[l], out, dims, scale, eps);
            }
            let o = linear(&acts.h_last, params, bp.proj_out, 2 * d);
            // Token i's (a, b) come from the output at token i - 1 (token 0: a = b = 0).
            let (mut a, mut y) = (vec![0f32; rows * d], vec![0f32; rows * d]);
            for s in 0..n {
                for i in 0..t {
                    let r = s * t + i;
                    for k in 0..d {
                        let (ak, bk) = if i == 0 { (0.0, 0.0) } else { (o[(r - 1) * 2 * d + k], o[(r - 1) * 2 * d + d + k]) };
                        let ak = match self.cfg.clip_scale {
                            Some(cs) => cs as f32 * (ak / cs as f32).tanh(),
                            None => ak,
                        };
                        a[r * d + k] = ak;
                        y[r * d + k] = (xin[r * d + k] - bk) * (-ak).exp();
                    }
                }
                logdets[s] -= a[s * t * d..(s + 1) * t * d].iter().sum::<f32>() / (t * d) as f32;
            }
            x = permute_tokens(&y, n, t, d, bp.flip);
            (acts.xin, acts.a, acts.y) = (xin, a, y);
        }
        let z = x;

        // Backward of 0.5 mean(z^2) - mean_n(logdets_n).
        let mut dx: Vec<f32> = z.iter().map(|v| v / z.len() as f32).collect();
        let dlogdet_da = 1.0 / (n * t * d) as f32; // d(-mean_n logdet_n) / da, every a
        let Workspace { blocks: saved, dh, dg, df1, da2, datt, dqkv, da1, .. } = ws;
        for (bi, (bp, acts)) in self.blocks.iter().zip(saved.iter()).enumerate().rev() {
            let gy = permute_tokens(&dx, n, t, d, bp.flip);
            // y = (xin - b) e^-a: the gradients of xin and of the proj_out output o (shifted back).
            let mut dxin = vec![0f32; rows * d];
            let mut d_o = vec![0f32; rows * 2 * d];
            for s in 0..n {
                for i in 0..t {
                    let r = s * t + i;
                    for k in 0..d {
                        let j = r * d + k;
                        let e = (-acts.a[j]).exp();
                        dxin[j] = gy[j] * e;
                        if i > 0 {
                            let mut da = dlogdet_da - gy[j] * acts.y[j];
                            if let Some(cs) = self.cfg.clip_scale {
                                let u = acts.a[j] / cs as f32;
                                da *= 1.0 - u * u;
                            }
                            d_o[(r - 1) * 2 * d + k] = da;
                            d_o[(r - 1) * 2 * d + d + k] = -gy[j] * e;
                        }
                    }
                }
            }
            linear_bwd(&acts.h_last, params, bp.proj_out, &d_o, Some(dh), grads);
            for (lp, la) in bp.layers.iter().zip(&acts.layers).rev() {
                // h_next = h_mid + fc2(gelu(fc1(norm2(h_mid)))); dh holds d h_next, then d h_mid.
                linear_bwd(&la.g, params, lp.fc2, dh, Some(dg), grads);
                ops::gelu_bwd(&la.f1, dg, df1);
                linear_bwd(&la.a2, params, lp.fc1, df1, Some(da2), grads);
                layer_norm_bwd(&la.h_mid, params, lp.norm2, da2, dh, grads, eps);
                // h_mid = h + proj(attention(qkv(norm1(h)))); dh becomes d h.
                linear_bwd(&la.att, params, lp.proj, dh, Some(datt), grads);
                ops::attention_bwd(&la.qkv, datt, dims, dims.heads(), scale, dqkv);
                linear_bwd(&la.a1, params, lp.qkv, dqkv, Some(da1), grads);
                layer_norm_bwd(&la.h, params, lp.norm1, da1, dh, grads, eps);
            }
            position_and_class_bwd(dh, bp, labels, n, t, c, grads);
            // xin's gradient: the coupling's plus proj_in's (none needed for the first block: data).
            let (dw, db) = pair_mut(grads, bp.proj_in);
            if bi > 0 {
                ops::linear_bwd(&acts.xin, params[bp.proj_in.w], dh, Some(&mut dxin), true, dw, db);
                dx = permute_tokens(&dxin, n, t, d, bp.flip);
            } else {
                ops::linear_bwd(&acts.xin, params[bp.proj_in.w], dh, None, false, dw, db);
            }
        }
        Ok(NllOutput { z, logdets })
    }
}

/// One pre-LN transformer layer on `la.h`, keeping its intermediates in `la`; writes its output.
fn layer_forward(params: &[&[f32]], lp: &LayerParams, la: &mut LayerActs, out: &mut [f32], dims: AttentionDims, scale: f32, eps: f32) {
    let p = |pair: Pair| (params[pair.w], params[pair.b]);
    let ((nw, nb), (qw, qb), (pw, pb)) = (p(lp.norm1), p(lp.qkv), p(lp.proj));
    ops::layer_norm_fwd(&la.h, nw, nb, eps, &mut la.a1);
    ops::linear_fwd(&la.a1, qw, qb, &mut la.qkv);
    ops::attention_fwd(&la.qkv, dims, dims.heads(), scale, &mut la.att);
    ops::linear_fwd(&la.att, pw, pb, &mut la.h_mid);
    add_assign(&mut la.h_mid, &la.h);
    let ((nw, nb), (w1, b1), (w2, b2)) = (p(lp.norm2), p(lp.fc1), p(lp.fc2));
    ops::layer_norm_fwd(&la.h_mid, nw, nb, eps, &mut la.a2);
    ops::linear_fwd(&la.a2, w1, b1, &mut la.f1);
    ops::gelu_fwd(&la.f1, &mut la.g);
    ops::linear_fwd(&la.g, w2, b2, out);
    add_assign(out, &la.h_mid);
}

/// Reverse the token order of each sample (N, T, D) when `flip`.
fn permute_tokens(x: &[f32], n: usize, t: usize, d: usize, flip: bool) -> Vec<f32> {
    if !flip {
        return x.to_vec();
    }
    let mut out = Vec::with_capacity(x.len());
    for s in 0..n {
        for i in (0..t).rev() {
            out.extend_from_slice(&x[(s * t + i) * d..(s * t + i + 1) * d]);
        }
    }
    out
}

fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, v)| *a += v);
}

/// The mean of a table's rows of length c: the class embedding of a dropped label (-1).
fn mean_row(table: &[f32], c: usize) -> Vec<f32> {
    let mut mean = vec![0f32; c];
    for row in table.chunks(c) {
        add_assign(&mut mean, row);
    }
    let k = (table.len() / c) as f32;
    mean.iter_mut().for_each(|v| *v /= k);
    mean
}

/// h (N, T, C) += pos_embed (in the block's token order) + the class embedding of each sample.
#[allow(clippy::too_many_arguments)]
fn add_position_and_class(h: &mut [f32], pos: &[f32], class: Option<&[f32]>, labels: Option<&[i64]>, n: usize, t: usize, c: usize, flip: bool) {
    let mean = class.map(|table| mean_row(table, c));
    for s in 0..n {
        let emb = class.zip(mean.as_deref()).map(|(table, mean)| match labels.map_or(-1, |y| y[s]) {
            -1 => mean,
            l => &table[l as usize * c..(l as usize + 1) * c],
        });
        for i in 0..t {
            let p = if flip { t - 1 - i } else { i };
            let row = &mut h[(s * t + i) * c..(s * t + i + 1) * c];
            add_assign(row, &pos[p * c..(p + 1) * c]);
            if let Some(e) = emb {
                add_assign(row, e);
            }
        }
    }
}

/// The gradients of pos_embed and class_embed from dh (N, T, C) at the block's first hidden state.
fn position_and_class_bwd(dh: &[f32], bp: &BlockParams, labels: Option<&[i64]>, n: usize, t: usize, c: usize, grads: &mut [Vec<f32>]) {
    let dpos = &mut grads[bp.pos];
    dpos.fill(0.0);
    for s in 0..n {
        for i in 0..t {
            let p = if bp.flip { t - 1 - i } else { i };
            add_assign(&mut dpos[p * c..(p + 1) * c], &dh[(s * t + i) * c..(s * t + i + 1) * c]);
        }
    }
    let Some(k_idx) = bp.class else { return };
    let dclass = &mut grads[k_idx];
    dclass.fill(0.0);
    let k = dclass.len() / c;
    for s in 0..n {
        let mut sum = vec![0f32; c];
        for i in 0..t {
            add_assign(&mut sum, &dh[(s * t + i) * c..(s * t + i + 1) * c]);
        }
        match labels.map_or(-1, |y| y[s]) {
            -1 => {
                // The mean embedding spreads its gradient evenly over the classes.
                sum.iter_mut().for_each(|v| *v /= k as f32);
                for row in dclass.chunks_mut(c) {
                    add_assign(row, &sum);
                }
            }
            l => add_assign(&mut dclass[l as usize * c..(l as usize + 1) * c], &sum),
        }
    }
}

fn linear(x: &[f32], params: &[&[f32]], p: Pair, d_out: usize) -> Vec<f32> {
    let d_in = params[p.w].len() / d_out;
    let mut y = vec![0f32; x.len() / d_in * d_out];
    ops::linear_fwd(x, params[p.w], params[p.b], &mut y);
    y
}

/// The gradient buffers of a (weight, bias) pair, borrowed together.
fn pair_mut(grads: &mut [Vec<f32>], p: Pair) -> (&mut [f32], &mut [f32]) {
    if p.w < p.b {
        let (lo, hi) = grads.split_at_mut(p.b);
        (&mut lo[p.w], &mut hi[0])
    } else {
        let (lo, hi) = grads.split_at_mut(p.w);
        (&mut hi[0], &mut lo[p.b])
    }
}

fn linear_bwd(x: &[f32], params: &[&[f32]], p: Pair, g: &[f32], dx: Option<&mut [f32]>, grads: &mut [Vec<f32>]) {
    let (dw, db) = pair_mut(grads, p);
    ops::linear_bwd(x, params[p.w], g, dx, false, dw, db);
}

/// Adds the input gradient to `dx` (the residual stream's gradient).
fn layer_norm_bwd(x: &[f32], params: &[&[f32]], p: Pair, g: &[f32], dx: &mut [f32], grads: &mut [Vec<f32>], eps: f32) {
    let (dw, db) = pair_mut(grads, p);
    ops::layer_norm_bwd(x, params[p.w], g, eps, dx, dw, db);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{new_trainable, nll_loss, patchify, FlowConfig};
    use candle_core::{Device, Tensor};

    /// The hand-written gradient equals candle's autograd through the model, for every parameter:
    /// conditional with dropped labels and a soft clip, and unconditional with more layers.
    #[test]
    fn gradients_match_autograd() {
        let configs = [
            (FlowConfig { img_size: 8, in_channels: 2, patch_size: 2, channels: 128, num_blocks: 3, layers_per_block: 1, num_classes: 4, clip_scale: Some(2.0) }, Some(vec![0i64, 3, -1])),
            (FlowConfig { img_size: 8, in_channels: 1, patch_size: 4, channels: 64, num_blocks: 2, layers_per_block: 2, num_classes: 0, clip_scale: None }, None),
        ];
        for (cfg, labels) in configs {
            let dev = Device::Cpu;
            let (varmap, model) = new_trainable(&cfg, 7, &dev).unwrap();
            // Non-zero proj_out weights, so every path carries gradient.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                if name.contains("proj_out") {
                    var.set(&(Tensor::randn(0f32, 0.05, var.shape(), &dev).unwrap())).unwrap();
                }
            }
            let x = Tensor::randn(0f32, 0.5, (3, cfg.in_channels, cfg.img_size, cfg.img_size), &dev).unwrap();
            let y = labels.as_ref().map(|l| Tensor::new(l.as_slice(), &dev).unwrap());
            let out = model.forward(&x, y.as_ref()).unwrap();
            let loss = nll_loss(&out).unwrap();
            let auto = loss.backward().unwrap();

            let vars = varmap.data().lock().unwrap().clone();
            let mut names: Vec<String> = vars.keys().cloned().collect();
            names.sort();
            let values: Vec<Vec<f32>> = names.iter().map(|n| vars[n].flatten_all().unwrap().to_vec1().unwrap()).collect();
            let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
            let mut engine = NllGrad::new(&cfg, &names, &sizes).unwrap();
            let tokens: Vec<f32> = patchify(&x, cfg.patch_size).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let params: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![f32::NAN; s]).collect();
            // Twice: the second pass reuses the first one's buffers and must give the same.
            engine.run(&params, &tokens, labels.as_deref(), &mut grads).unwrap();
            let got = engine.run(&params, &tokens, labels.as_deref(), &mut grads).unwrap();

            let z: Vec<f32> = out.z.flatten_all().unwrap().to_vec1().unwrap();
            let zd = z.iter().zip(&got.z).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(zd < 1e-4, "z differs by {zd}");
            let ld: Vec<f32> = out.logdets.to_vec1().unwrap();
            let ldd = ld.iter().zip(&got.logdets).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(ldd < 1e-5, "logdets differ by {ldd}");
            for (name, g) in names.iter().zip(&grads) {
                let want: Vec<f32> = auto.get(vars[name].as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let diff = want.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-3 * scale, "{name}: gradient differs by {diff} (largest {scale})");
                assert!(scale > 1e-6, "{name}: gradient is zero");
            }
        }
    }
}
