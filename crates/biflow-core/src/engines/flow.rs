//! TARFlow's training loss and its gradient on the CPU, by hand: the same computation as
//! [`TarFlow::forward`](crate::models::flow::TarFlow::forward), then [`nll_loss`](crate::models::flow::nll_loss) and
//! candle's `backward`. The tests check the loss and every gradient against autograd.

use anyhow::{ensure, Context, Result};

use super::layer::{check_labels, check_sizes, GROUP_TOKENS, add_assign, class_table_bwd, layer_backward, layer_forward, linear, linear_bwd, mean_row, pair_mut, LayerActs, LayerParams, LayerScratch, LayerShape, Pair};
use crate::models::flow::config::{soft_clip, soft_clip_slope, FlowConfig, HEAD_DIM, LN_EPS};
use crate::engines::ops::{self, AttentionDims};

/// Where one flow block's parameters sit in the list the passes receive (the model's
/// `FlowBlock::places` says).
pub(crate) struct BlockParams {
    pub proj_in: Pair,
    pub pos: usize,
    pub class: Option<usize>,
    pub layers: Vec<LayerParams>,
    pub proj_out: Pair,
    pub flip: bool,
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
    dh: Vec<f32>,
    scratch: LayerScratch,
}

impl Workspace {
    fn new(rows: usize, cfg: &FlowConfig) -> Workspace {
        let c = cfg.channels;
        let blocks = (0..cfg.num_blocks)
            .map(|_| BlockActs {
                layers: (0..cfg.layers_per_block).map(|_| LayerActs::new(rows, c)).collect(),
                h_last: vec![0f32; rows * c],
                xin: Vec::new(),
                a: Vec::new(),
                y: Vec::new(),
            })
            .collect();
        Workspace { rows, blocks, dh: vec![0f32; rows * c], scratch: LayerScratch::new(rows, c) }
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
    /// The layers' weights are packed (a frozen F, see [`Self::frozen`]).
    packed: bool,
    work: Option<Workspace>,
}

impl NllGrad {
    /// `blocks`: where each block's parameters sit in the list `run` receives, of `sizes`
    /// (the model gives them: `TarFlow::engine`).
    pub(crate) fn new(cfg: &FlowConfig, blocks: Vec<BlockParams>, sizes: &[usize]) -> Result<NllGrad> {
        cfg.validate()?;
        ensure!(blocks.len() == cfg.num_blocks, "{} blocks for a model of {}", blocks.len(), cfg.num_blocks);
        Ok(NllGrad { cfg: cfg.clone(), blocks, sizes: sizes.to_vec(), packed: false, work: None })
    }

    /// This F frozen (sampling, evaluation, a distillation's teacher): the layers' weight matrices
    /// in `values` (the parameter list) are packed once for the sampling kernel ([`ops::pack`]),
    /// which [`Self::forward`] then reads; [`Self::run`] refuses.
    pub fn frozen(mut self, values: &mut [Vec<f32>]) -> Result<NllGrad> {
        ensure!(!self.packed && values.len() == self.sizes.len(), "the parameter list does not fit");
        for layer in self.blocks.iter().flat_map(|b| &b.layers) {
            layer.pack_weights(values);
        }
        self.sizes = values.iter().map(Vec::len).collect();
        self.packed = true;
        Ok(self)
    }

    fn shape(&self) -> Result<LayerShape> {
        let (t, c) = (self.cfg.num_tokens(), self.cfg.channels);
        let dims = AttentionDims::of(t, c, c / HEAD_DIM, true).context("channels must be a multiple of the head size")?;
        Ok(LayerShape { dims, scale: 1.0 / (HEAD_DIM as f32).sqrt(), eps: LN_EPS as f32, packed: self.packed })
    }

    /// The checked sample count and labels (None for an unconditional model).
    fn check<'a>(&self, params: &[&[f32]], tokens: &[f32], labels: Option<&'a [i64]>) -> Result<(usize, Option<&'a [i64]>)> {
        let (t, d) = (self.cfg.num_tokens(), self.cfg.token_dim());
        check_sizes(params, &self.sizes)?;
        ensure!(!tokens.is_empty() && tokens.len() % (t * d) == 0, "tokens must be N x {t} x {d}");
        let n = tokens.len() / (t * d);
        let labels = if self.cfg.num_classes > 0 { labels } else { None };
        if let Some(y) = labels {
            check_labels(y, n, self.cfg.num_classes)?;
        }
        Ok((n, labels))
    }

    /// The forward pass alone, keeping nothing: the block outputs x^1 .. x^B (= z), each (N, T, D),
    /// and the per-sample logdets (N). Samples go through in groups of about 2048 tokens, whose
    /// activations stay in cache between the layers' kernels.
    pub fn forward(&self, params: &[&[f32]], tokens: &[f32], labels: Option<&[i64]>) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let (n, labels) = self.check(params, tokens, labels)?;
        let (t, d) = (self.cfg.num_tokens(), self.cfg.token_dim());
        let group = (GROUP_TOKENS / t).max(1);
        let (mut trajectory, mut logdets) = (vec![Vec::with_capacity(tokens.len()); self.blocks.len()], Vec::with_capacity(n));
        for lo in (0..n).step_by(group) {
            let hi = (lo + group).min(n);
            let (part, ld) = self.forward_group(params, &tokens[lo * t * d..hi * t * d], labels.map(|y| &y[lo..hi]))?;
            trajectory.iter_mut().zip(part).for_each(|(all, p)| all.extend(p));
            logdets.extend(ld);
        }
        Ok((trajectory, logdets))
    }

    fn forward_group(&self, params: &[&[f32]], tokens: &[f32], labels: Option<&[i64]>) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let (t, d, c) = (self.cfg.num_tokens(), self.cfg.token_dim(), self.cfg.channels);
        let n = tokens.len() / (t * d);
        let shape = self.shape()?;
        let mut acts = LayerActs::new(n * t, c);
        let mut next = vec![0f32; n * t * c];
        let mut logdets = vec![0f32; n];
        let mut trajectory: Vec<Vec<f32>> = Vec::with_capacity(self.blocks.len());
        for bp in &self.blocks {
            let xin = permute_tokens(trajectory.last().map_or(tokens, Vec::as_slice), n, t, d, bp.flip);
            ops::linear_fwd(&xin, params[bp.proj_in.w], params[bp.proj_in.b], &mut acts.h);
            add_position_and_class(&mut acts.h, params[bp.pos], bp.class.map(|k| params[k]), labels, n, t, c, bp.flip);
            for lp in &bp.layers {
                layer_forward(params, lp, &mut acts, &mut next, shape);
                std::mem::swap(&mut acts.h, &mut next);
            }
            let o = linear(&acts.h, params, bp.proj_out, 2 * d);
            let (_, y) = couple(&self.cfg, &o, &xin, n, &mut logdets);
            trajectory.push(permute_tokens(&y, n, t, d, bp.flip));
        }
        Ok((trajectory, logdets))
    }

    /// Forward and backward for tokens (N, T, D) and labels (N; -1 = dropped; None = unconditional):
    /// writes d loss / d parameter into `grads` (one buffer per parameter, every element written)
    /// and returns z and the logdets, from which the loss and bits/dim follow.
    pub fn run(&mut self, params: &[&[f32]], tokens: &[f32], labels: Option<&[i64]>, grads: &mut [Vec<f32>]) -> Result<NllOutput> {
        ensure!(!self.packed, "a frozen F has no training gradient; make another NllGrad for training");
        ensure!(grads.len() == self.sizes.len(), "wrong number of gradient buffers");
        let (n, labels) = self.check(params, tokens, labels)?;
        let (t, d, c) = (self.cfg.num_tokens(), self.cfg.token_dim(), self.cfg.channels);
        let shape = self.shape()?;
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
                layer_forward(params, &bp.layers[l], &mut done[l], out, shape);
            }
            let o = linear(&acts.h_last, params, bp.proj_out, 2 * d);
            let (a, y) = couple(&self.cfg, &o, &xin, n, &mut logdets);
            x = permute_tokens(&y, n, t, d, bp.flip);
            (acts.xin, acts.a, acts.y) = (xin, a, y);
        }
        let z = x;

        // Backward of 0.5 mean(z^2) - mean_n(logdets_n).
        let mut dx: Vec<f32> = z.iter().map(|v| v / z.len() as f32).collect();
        let dlogdet_da = 1.0 / (n * t * d) as f32; // d(-mean_n logdet_n) / da, every a
        let Workspace { blocks: saved, dh, scratch, .. } = ws;
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
                            da *= soft_clip_slope(acts.a[j], self.cfg.clip_scale);
                            d_o[(r - 1) * 2 * d + k] = da;
                            d_o[(r - 1) * 2 * d + d + k] = -gy[j] * e;
                        }
                    }
                }
            }
            linear_bwd(&acts.h_last, params, bp.proj_out, &d_o, Some(dh), grads);
            for (lp, la) in bp.layers.iter().zip(&acts.layers).rev() {
                layer_backward(params, lp, la, dh, scratch, grads, shape);
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

/// The affine coupling of one block, in its token order: token i's (a, b) come from the output o
/// at token i - 1 (token 0: a = b = 0); y = (xin - b) e^-a. Returns the (clipped) a and y, and
/// subtracts each sample's mean a from `logdets`.
fn couple(cfg: &FlowConfig, o: &[f32], xin: &[f32], n: usize, logdets: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let (t, d) = (cfg.num_tokens(), cfg.token_dim());
    let (mut a, mut y) = (vec![0f32; n * t * d], vec![0f32; n * t * d]);
    for s in 0..n {
        for i in 0..t {
            let r = s * t + i;
            for k in 0..d {
                let (ak, bk) = if i == 0 { (0.0, 0.0) } else { (o[(r - 1) * 2 * d + k], o[(r - 1) * 2 * d + d + k]) };
                let ak = soft_clip(ak, cfg.clip_scale);
                a[r * d + k] = ak;
                y[r * d + k] = (xin[r * d + k] - bk) * (-ak).exp();
            }
        }
        logdets[s] -= a[s * t * d..(s + 1) * t * d].iter().sum::<f32>() / (t * d) as f32;
    }
    (a, y)
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
    let Some(k) = bp.class else { return };
    let mut per_sample = vec![0f32; n * c];
    for (s, sum) in per_sample.chunks_mut(c).enumerate() {
        for row in dh[s * t * c..(s + 1) * t * c].chunks(c) {
            add_assign(sum, row);
        }
    }
    let dropped = vec![-1i64; n];
    class_table_bwd(&per_sample, labels.unwrap_or(&dropped), c, &mut grads[k]);
}

#[cfg(test)]
mod tests {
    use crate::engines::max_abs_diff;
    use crate::models::flow::{new_trainable, nll_loss, patchify, FlowConfig};
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
            let mut engine = model.engine(&names, &sizes).unwrap();
            let tokens: Vec<f32> = patchify(&x, cfg.patch_size).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let params: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![f32::NAN; s]).collect();
            // Twice: the second pass reuses the first one's buffers and must give the same.
            engine.run(&params, &tokens, labels.as_deref(), &mut grads).unwrap();
            let got = engine.run(&params, &tokens, labels.as_deref(), &mut grads).unwrap();

            let z: Vec<f32> = out.z.flatten_all().unwrap().to_vec1().unwrap();
            let zd = max_abs_diff(&z, &got.z);
            assert!(zd < 1e-4, "z differs by {zd}");
            let ld: Vec<f32> = out.logdets.to_vec1().unwrap();
            let ldd = max_abs_diff(&ld, &got.logdets);
            assert!(ldd < 1e-5, "logdets differ by {ldd}");
            // The frozen forward (packed weights, nothing kept) gives the same trajectory and logdets.
            let mut frozen_values = values.clone();
            let frozen = model.engine(&names, &sizes).unwrap().frozen(&mut frozen_values).unwrap();
            let frozen_params: Vec<&[f32]> = frozen_values.iter().map(Vec::as_slice).collect();
            let (trajectory, logdets) = frozen.forward(&frozen_params, &tokens, labels.as_deref()).unwrap();
            assert_eq!(trajectory.len(), out.trajectory.len());
            for (want, got) in out.trajectory.iter().zip(&trajectory) {
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                let diff = max_abs_diff(&want, got);
                assert!(diff < 1e-4, "the frozen forward's trajectory differs by {diff}");
            }
            let lfd = max_abs_diff(&ld, &logdets);
            assert!(lfd < 1e-5, "the frozen forward's logdets differ by {lfd}");
            assert!(frozen.frozen(&mut frozen_values).is_err(), "frozen twice");
            for (name, g) in names.iter().zip(&grads) {
                let want: Vec<f32> = auto.get(vars[name].as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let diff = max_abs_diff(&want, g);
                assert!(diff <= 1e-3 * scale, "{name}: gradient differs by {diff} (largest {scale})");
                assert!(scale > 1e-6, "{name}: gradient is zero");
            }
        }
    }
}
