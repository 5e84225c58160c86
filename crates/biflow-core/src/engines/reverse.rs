//! G's forward pass and its backward on the CPU, by hand: the same network as
//! [`ReverseModel::forward`](crate::models::reverse::ReverseModel::forward). The distillation losses stay in
//! models/reverse/loss.rs: the objective takes their gradient with respect to G's outputs (token-sized)
//! from candle's autograd over that small graph, and [`ReverseGrad::backward`] carries it through
//! the network. The tests check the outputs and every parameter's gradient against autograd.

use anyhow::{ensure, Context, Result};

use super::layer::{check_labels, check_sizes, GROUP_TOKENS, add_assign, class_table_bwd, layer_backward, layer_forward, layer_norm_bwd, linear, linear_bwd, mean_row, LayerActs, LayerParams, LayerScratch, LayerShape, Pair};
use crate::models::flow::config::{HEAD_DIM, LN_EPS};
use crate::engines::ops::{self, AttentionDims};
use crate::models::reverse::{guidance_features, ReverseConfig, CFG_FEATURES};

/// Where G's parameters sit in the list the passes receive (the model's `ReverseModel::engine` says).
pub(crate) struct ReverseParams {
    pub proj_in: Pair,
    pub pos: usize,
    /// The class table and `cfg_embed` (class-conditional G only).
    pub class: Option<(usize, Pair)>,
    /// The stages' layers, then the denoising block's, in the order they run.
    pub layers: Vec<LayerParams>,
    /// Per stage: the head's LayerNorm and projection.
    pub heads: Vec<(Pair, Pair)>,
    pub norm_out: Pair,
    pub proj_out: Pair,
}

/// G's outputs, host-side: x' (N, T, D), the heads' outputs (N, T, D each) and, when asked for,
/// the stages' hidden states (N, T, C each).
pub struct HostOutputs {
    pub x: Vec<f32>,
    pub heads: Vec<Vec<f32>>,
    pub states: Vec<Vec<f32>>,
}

/// What a kept forward pass leaves for the backward, reused from one batch to the next.
struct Workspace {
    rows: usize,
    /// Each layer's intermediates; layer i's output is layer i+1's input `h` (or `h_last`).
    layers: Vec<LayerActs>,
    h_last: Vec<f32>,
    /// norm_out(h_last), and per stage its head's LayerNorm of the stage's state (empty: no head).
    normed_out: Vec<f32>,
    normed_heads: Vec<Vec<f32>>,
    /// The kept pass's inputs.
    z: Vec<f32>,
    labels: Vec<i64>,
    features: Vec<f32>,
    dh: Vec<f32>,
    dtmp: Vec<f32>,
    scratch: LayerScratch,
}

/// G's forward (with or without keeping what its backward needs) and backward for a fixed parameter list.
pub struct ReverseGrad {
    cfg: ReverseConfig,
    p: ReverseParams,
    sizes: Vec<usize>,
    shape: LayerShape,
    work: Option<Workspace>,
}

impl ReverseGrad {
    /// `p`: where G's parameters sit in the list the passes receive, of `sizes`.
    pub(crate) fn new(cfg: &ReverseConfig, p: ReverseParams, sizes: &[usize]) -> Result<ReverseGrad> {
        cfg.validate()?;
        let layers = cfg.stages * cfg.layers_per_stage + cfg.denoise_layers;
        ensure!(p.layers.len() == layers && p.heads.len() == if cfg.heads { cfg.stages } else { 0 }, "the parameter places do not fit the configuration");
        let dims = AttentionDims::of(cfg.num_tokens, cfg.channels, cfg.channels / HEAD_DIM, false).context("channels must be a multiple of the head size")?;
        let shape = LayerShape { dims, scale: 1.0 / (HEAD_DIM as f32).sqrt(), eps: LN_EPS as f32, packed: false };
        Ok(ReverseGrad { cfg: cfg.clone(), p, sizes: sizes.to_vec(), shape, work: None })
    }

    /// This G frozen, for sampling: the layers' weight matrices in `values` (the parameter list)
    /// are packed once for the sampling kernel ([`ops::pack`]); [`Self::sample`] then reads them
    /// so, and the training passes refuse.
    pub fn frozen(mut self, values: &mut [Vec<f32>]) -> Result<ReverseGrad> {
        ensure!(!self.shape.packed, "the weights are already laid out for sampling");
        ensure!(values.len() == self.sizes.len(), "wrong number of parameters");
        for layer in &self.p.layers {
            layer.pack_weights(values);
        }
        self.sizes = values.iter().map(Vec::len).collect();
        self.shape.packed = true;
        self.work = None;
        Ok(self)
    }

    /// G(z | y, w) for noise tokens z (N, T, D), labels (N; -1 = none; None = none for all) and
    /// guidance scales w (N). With `keep`, what [`Self::backward`] needs is kept (until the next
    /// kept pass); `states` also returns the stages' hidden states.
    pub fn forward(&mut self, params: &[&[f32]], z: &[f32], labels: Option<&[i64]>, w: &[f32], keep: bool, states: bool) -> Result<HostOutputs> {
        if !keep {
            return self.grouped(params, z, labels, w, states);
        }
        ensure!(!self.shape.packed, "this pass holds sampling weights; training passes need their own");
        let (h0, labels, features) = self.input(params, z, labels, w)?;
        let (d, c, rows) = (self.cfg.token_dim, self.cfg.channels, h0.len() / self.cfg.channels);
        if self.work.as_ref().map(|w| w.rows) != Some(rows) {
            self.work = None; // free the old buffers before making the new ones
            self.work = Some(Workspace {
                rows,
                layers: (0..self.p.layers.len()).map(|_| LayerActs::new(rows, c)).collect(),
                h_last: vec![0f32; rows * c],
                normed_out: vec![0f32; rows * c],
                normed_heads: (0..self.cfg.stages).map(|j| if j < self.p.heads.len() { vec![0f32; rows * c] } else { Vec::new() }).collect(),
                z: Vec::new(),
                labels: Vec::new(),
                features: Vec::new(),
                dh: vec![0f32; rows * c],
                dtmp: vec![0f32; rows * c],
                scratch: LayerScratch::new(rows, c),
            });
        }
        let mut out = HostOutputs { x: Vec::new(), heads: Vec::new(), states: Vec::new() };
        // Taken out for the pass (the heads read self), put back after.
        let mut ws = self.work.take().unwrap();
        let Workspace { layers, h_last, normed_out, normed_heads, .. } = &mut ws;
        layers[0].h = h0;
        for i in 0..self.p.layers.len() {
            let (done, rest) = layers.split_at_mut(i + 1);
            let next = match rest.first_mut() {
                Some(next) => &mut next.h,
                None => &mut *h_last,
            };
            layer_forward(params, &self.p.layers[i], &mut done[i], next, self.shape);
            if let Some(j) = self.stage_ending_at(i) {
                self.head(params, next, j, &mut normed_heads[j], states, &mut out);
            }
        }
        ops::layer_norm_fwd(h_last, params[self.p.norm_out.w], params[self.p.norm_out.b], self.shape.eps, normed_out);
        out.x = linear(normed_out, params, self.p.proj_out, d);
        (ws.z, ws.labels, ws.features) = (z.to_vec(), labels, features);
        self.work = Some(ws);
        Ok(out)
    }

    /// x' = G(z | y, w) alone (sampling).
    pub fn sample(&self, params: &[&[f32]], z: &[f32], labels: Option<&[i64]>, w: &[f32]) -> Result<Vec<f32>> {
        Ok(self.grouped(params, z, labels, w, false)?.x)
    }

    /// A pass that keeps nothing, in groups of samples of about [`GROUP_TOKENS`] tokens, whose
    /// activations stay in cache between the layers' kernels.
    fn grouped(&self, params: &[&[f32]], z: &[f32], labels: Option<&[i64]>, w: &[f32], states: bool) -> Result<HostOutputs> {
        let (t, d) = (self.cfg.num_tokens, self.cfg.token_dim);
        ensure!(!z.is_empty() && z.len() % (t * d) == 0, "G takes noise tokens N x {t} x {d}");
        let n = z.len() / (t * d);
        ensure!(w.len() == n && labels.is_none_or(|y| y.len() == n), "got {} samples, {} guidance scales and {:?} labels", n, w.len(), labels.map(<[i64]>::len));
        let group = (GROUP_TOKENS / t).max(1);
        let mut out = HostOutputs { x: Vec::with_capacity(z.len()), heads: Vec::new(), states: Vec::new() };
        for lo in (0..n).step_by(group) {
            let hi = (lo + group).min(n);
            let (h0, _, _) = self.input(params, &z[lo * t * d..hi * t * d], labels.map(|y| &y[lo..hi]), &w[lo..hi])?;
            let part = self.light(params, h0, states);
            out.x.extend(part.x);
            for (all, p) in [(&mut out.heads, part.heads), (&mut out.states, part.states)] {
                all.resize(p.len(), Vec::new());
                all.iter_mut().zip(p).for_each(|(a, p)| a.extend(p));
            }
        }
        Ok(out)
    }

    /// The checked inputs and G's first hidden state: proj_in(z) + pos + class embedding +
    /// cfg_embed(features(w)); also the labels (-1 = none) and guidance features it used.
    fn input(&self, params: &[&[f32]], z: &[f32], labels: Option<&[i64]>, w: &[f32]) -> Result<(Vec<f32>, Vec<i64>, Vec<f32>)> {
        check_sizes(params, &self.sizes)?;
        let (t, d, c) = (self.cfg.num_tokens, self.cfg.token_dim, self.cfg.channels);
        ensure!(!z.is_empty() && z.len() % (t * d) == 0, "G takes noise tokens N x {t} x {d}");
        let n = z.len() / (t * d);
        ensure!(w.len() == n, "got {} guidance scales for {n} samples", w.len());
        let labels: Vec<i64> = match labels {
            Some(y) => {
                check_labels(y, n, self.cfg.num_classes)?;
                y.to_vec()
            }
            None => vec![-1; n],
        };
        if !self.cfg.guided() {
            ensure!(w.iter().all(|&w| w == 0.0), "guidance needs a class-conditional model");
        }
        let features = guidance_features(w);
        let mut h0 = vec![0f32; n * t * c];
        ops::linear_fwd(z, params[self.p.proj_in.w], params[self.p.proj_in.b], &mut h0);
        let per_sample = match self.p.class {
            Some((table, cfg_embed)) => {
                let mut e = linear(&features, params, cfg_embed, c);
                let (table, mean) = (params[table], mean_row(params[table], c));
                for (row, &l) in e.chunks_mut(c).zip(&labels) {
                    add_assign(row, if l < 0 { &mean } else { &table[l as usize * c..(l as usize + 1) * c] });
                }
                Some(e)
            }
            None => None,
        };
        let pos = params[self.p.pos];
        for (s, sample) in h0.chunks_mut(t * c).enumerate() {
            for (row, p) in sample.chunks_mut(c).zip(pos.chunks(c)) {
                add_assign(row, p);
                if let Some(e) = &per_sample {
                    add_assign(row, &e[s * c..(s + 1) * c]);
                }
            }
        }
        Ok((h0, labels, features))
    }

    /// The network from its first hidden state, keeping nothing: one layer's buffers, reused.
    fn light(&self, params: &[&[f32]], h0: Vec<f32>, states: bool) -> HostOutputs {
        let (d, c, rows) = (self.cfg.token_dim, self.cfg.channels, h0.len() / self.cfg.channels);
        let mut out = HostOutputs { x: Vec::new(), heads: Vec::new(), states: Vec::new() };
        let mut acts = LayerActs::new(rows, c);
        acts.h = h0;
        let (mut next, mut normed) = (vec![0f32; rows * c], vec![0f32; rows * c]);
        for (i, lp) in self.p.layers.iter().enumerate() {
            layer_forward(params, lp, &mut acts, &mut next, self.shape);
            std::mem::swap(&mut acts.h, &mut next);
            if let Some(j) = self.stage_ending_at(i) {
                self.head(params, &acts.h, j, &mut normed, states, &mut out);
            }
        }
        ops::layer_norm_fwd(&acts.h, params[self.p.norm_out.w], params[self.p.norm_out.b], self.shape.eps, &mut normed);
        out.x = linear(&normed, params, self.p.proj_out, d);
        out
    }

    /// The stage whose last layer is layer `i` (of the stages' and the denoising block's), if any.
    fn stage_ending_at(&self, i: usize) -> Option<usize> {
        let per_stage = self.cfg.layers_per_stage;
        ((i + 1) % per_stage == 0 && (i + 1) / per_stage <= self.cfg.stages).then_some(i / per_stage)
    }

    /// After stage j (state h): its head's output phi_j(h), normalising into `normed`; and h itself
    /// when `states` asks for it.
    fn head(&self, params: &[&[f32]], h: &[f32], j: usize, normed: &mut [f32], states: bool, out: &mut HostOutputs) {
        if let Some(&(norm, proj)) = self.p.heads.get(j) {
            ops::layer_norm_fwd(h, params[norm.w], params[norm.b], self.shape.eps, normed);
            out.heads.push(linear(normed, params, proj, self.cfg.token_dim));
        }
        if states {
            out.states.push(h.to_vec());
        }
    }

    /// The gradients of every parameter (written into `grads`, one buffer per parameter, every
    /// element) from those of the last kept pass's outputs: x' (N, T, D), each head's (N, T, D; may
    /// be empty: no gradient) and each stage state's (N, T, C; may be empty).
    pub fn backward(&mut self, params: &[&[f32]], d_x: &[f32], d_heads: &[Vec<f32>], d_states: &[Vec<f32>], grads: &mut [Vec<f32>]) -> Result<()> {
        check_sizes(params, &self.sizes)?;
        ensure!(!self.shape.packed, "this pass holds sampling weights; training passes need their own");
        ensure!(grads.len() == self.sizes.len(), "wrong number of gradient buffers");
        let (t, c) = (self.cfg.num_tokens, self.cfg.channels);
        let shape = self.shape;
        let p = &self.p;
        let (per_stage, stages) = (self.cfg.layers_per_stage, self.cfg.stages);
        let stage_ending_at = |i: usize| ((i + 1) % per_stage == 0 && (i + 1) / per_stage <= stages).then_some(i / per_stage);
        let ws = self.work.as_mut().context("backward needs a kept forward pass first")?;
        let n = ws.rows / t;
        ensure!(d_x.len() == ws.z.len(), "the gradient of x' has {} values, expected {}", d_x.len(), ws.z.len());
        let Workspace { layers, h_last, normed_out, normed_heads, z, labels, features, dh, dtmp, scratch, .. } = ws;

        // x' = proj_out(norm_out(h_last)).
        dh.fill(0.0);
        linear_bwd(normed_out, params, p.proj_out, d_x, Some(dtmp), grads);
        layer_norm_bwd(h_last, params, p.norm_out, dtmp, dh, grads, shape.eps);
        for &(norm, proj) in &p.heads {
            // Heads without a gradient (none given) still get theirs written: zero.
            for k in [norm.w, norm.b, proj.w, proj.b] {
                grads[k].fill(0.0);
            }
        }
        for i in (0..p.layers.len()).rev() {
            // At the end of stage j, the head and the state's own term join the stream's gradient.
            if let Some(j) = stage_ending_at(i) {
                let state = if i + 1 < layers.len() { &layers[i + 1].h } else { &*h_last };
                if let (Some(&(norm, proj)), Some(g)) = (p.heads.get(j), d_heads.get(j).filter(|g| !g.is_empty())) {
                    ensure!(g.len() == z.len(), "head {j}'s gradient has {} values, expected {}", g.len(), z.len());
                    linear_bwd(&normed_heads[j], params, proj, g, Some(dtmp), grads);
                    layer_norm_bwd(state, params, norm, dtmp, dh, grads, shape.eps);
                }
                if let Some(g) = d_states.get(j).filter(|g| !g.is_empty()) {
                    ensure!(g.len() == dh.len(), "state {j}'s gradient has {} values, expected {}", g.len(), dh.len());
                    add_assign(dh, g);
                }
            }
            layer_backward(params, &p.layers[i], &layers[i], dh, scratch, grads, shape);
        }

        // h0 = proj_in(z) + pos + class + cfg_embed(features).
        let dpos = &mut grads[p.pos];
        dpos.fill(0.0);
        let mut per_sample = vec![0f32; n * c];
        for (s, sample) in dh.chunks(t * c).enumerate() {
            for (row, dp) in sample.chunks(c).zip(dpos.chunks_mut(c)) {
                add_assign(dp, row);
                add_assign(&mut per_sample[s * c..(s + 1) * c], row);
            }
        }
        if let Some((table, cfg_embed)) = p.class {
            class_table_bwd(&per_sample, labels, c, &mut grads[table]);
            let (dw, db) = super::layer::pair_mut(grads, cfg_embed);
            ops::linear_bwd(features, params[cfg_embed.w], &per_sample, None, false, dw, db);
        }
        let (dw, db) = super::layer::pair_mut(grads, p.proj_in);
        ops::linear_bwd(z, params[p.proj_in.w], dh, None, false, dw, db);
        debug_assert_eq!(features.len(), n * CFG_FEATURES);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::max_abs_diff;
    use crate::models::reverse::new_trainable;
    use candle_core::{Device, Tensor};

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The variables' names (sorted, the trainer's order) and values.
    fn named_values(varmap: &candle_nn::VarMap) -> (Vec<String>, Vec<Vec<f32>>) {
        let vars = varmap.data().lock().unwrap().clone();
        let mut names: Vec<String> = vars.keys().cloned().collect();
        names.sort();
        let values = names.iter().map(|n| host(vars[n].as_tensor())).collect();
        (names, values)
    }

    /// The hand-written pass equals the candle model and its autograd: every output, and every
    /// parameter's gradient under a random linear function of x', the heads and the states. Guided
    /// with dropped labels and 2 layers per stage; without heads or a denoising block; unconditional.
    #[test]
    fn outputs_and_gradients_match_autograd() {
        let base = ReverseConfig { num_tokens: 16, token_dim: 4, num_classes: 3, channels: 64, stages: 2, layers_per_stage: 2, denoise_layers: 1, heads: true };
        let configs = [
            (base.clone(), Some(vec![0i64, 2, -1]), vec![0.5f32, 2.0, 0.0]),
            (ReverseConfig { layers_per_stage: 1, denoise_layers: 0, heads: false, channels: 128, ..base.clone() }, Some(vec![1, 1, 0]), vec![0.0, 1.0, 3.0]),
            (ReverseConfig { num_classes: 0, stages: 3, layers_per_stage: 1, ..base.clone() }, None, vec![0.0; 3]),
        ];
        let dev = Device::Cpu;
        for (cfg, labels, w) in configs {
            let (varmap, g) = new_trainable(&cfg, 5, &dev).unwrap();
            let rng_t = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            // Non-zero output projections, so every path carries gradient.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                if name.contains("proj") {
                    var.set(&(Tensor::randn(0f32, 0.1, var.shape(), &dev).unwrap())).unwrap();
                }
            }
            let (n, t, d, c) = (3, cfg.num_tokens, cfg.token_dim, cfg.channels);
            let z = rng_t(&[n, t, d]);
            let y = labels.as_ref().map(|l| Tensor::new(l.as_slice(), &dev).unwrap());
            let out = g.forward(&z, y.as_ref(), cfg.guided().then_some(w.as_slice()), true).unwrap();
            let rx = rng_t(&[n, t, d]);
            let rh: Vec<Tensor> = out.heads.iter().map(|_| rng_t(&[n, t, d])).collect();
            let rs: Vec<Tensor> = out.states.iter().map(|_| rng_t(&[n, t, c])).collect();
            let mut f = (&out.x * &rx).unwrap().sum_all().unwrap();
            for (o, r) in out.heads.iter().zip(&rh).chain(out.states.iter().zip(&rs)) {
                f = (f + (o * r).unwrap().sum_all().unwrap()).unwrap();
            }
            let auto = f.backward().unwrap();

            let vars = varmap.data().lock().unwrap().clone();
            let (names, values) = named_values(&varmap);
            let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
            let params: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let mut engine = g.engine(&names, &sizes).unwrap();
            let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![f32::NAN; s]).collect();
            let (dx, dh, ds) = (host(&rx), rh.iter().map(host).collect::<Vec<_>>(), rs.iter().map(host).collect::<Vec<_>>());
            // Twice, with a throw-away pass between: kept buffers are reused and must give the same.
            for _ in 0..2 {
                let got = engine.forward(&params, &host(&z), labels.as_deref(), &w, true, true).unwrap();
                let light = engine.forward(&params, &host(&z), labels.as_deref(), &w, false, true).unwrap();
                assert_eq!(got.x, light.x, "the kept and the light pass differ");
                assert!(max_abs_diff(&host(&out.x), &got.x) < 1e-4, "x' differs by {}", max_abs_diff(&host(&out.x), &got.x));
                assert_eq!(got.heads.len(), out.heads.len());
                for (a, b) in out.heads.iter().zip(&got.heads).chain(out.states.iter().zip(&got.states)) {
                    assert!(max_abs_diff(&host(a), b) < 1e-4, "a head or state differs by {}", max_abs_diff(&host(a), b));
                }
                engine.backward(&params, &dx, &dh, &ds, &mut grads).unwrap();
            }
            // Sampling (packed weights, in groups of samples: here 128 of 16 tokens) gives what one pass gives.
            let many = Tensor::randn(0f32, 1.0, (300, t, d), &dev).unwrap();
            let (y_many, w_many): (Option<Vec<i64>>, Vec<f32>) = (labels.as_ref().map(|_| (0..300).map(|i| i % 3 - 1).collect()), (0..300).map(|i| if cfg.guided() { (i % 4) as f32 } else { 0.0 }).collect());
            let whole = engine.forward(&params, &host(&many), y_many.as_deref(), &w_many, false, false).unwrap();
            let mut sampling_values = values.clone();
            let sampler = g.engine(&names, &sizes).unwrap().frozen(&mut sampling_values).unwrap();
            let sampling_params: Vec<&[f32]> = sampling_values.iter().map(Vec::as_slice).collect();
            let grouped = sampler.sample(&sampling_params, &host(&many), y_many.as_deref(), &w_many).unwrap();
            assert!(max_abs_diff(&whole.x, &grouped) < 1e-5, "grouped sampling differs by {}", max_abs_diff(&whole.x, &grouped));
            for (name, gr) in names.iter().zip(&grads) {
                let want = host(&auto.get(vars[name].as_tensor()).unwrap());
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&want, gr);
                assert!(scale > 1e-6, "{name}: gradient is zero");
                assert!(diff <= 1e-3 * scale, "{name}: gradient differs by {diff} (largest {scale})");
            }
        }
    }

    /// A head given no gradient gets zero, not stale values; a backward without a kept pass is an error.
    #[test]
    fn missing_gradients_are_zero_and_order_is_checked() {
        let cfg = ReverseConfig { num_tokens: 4, token_dim: 2, num_classes: 2, channels: 64, stages: 2, layers_per_stage: 1, denoise_layers: 1, heads: true };
        let (varmap, g) = new_trainable(&cfg, 1, &Device::Cpu).unwrap();
        let (names, values) = named_values(&varmap);
        let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
        let params: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        let mut engine = g.engine(&names, &sizes).unwrap();
        let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![f32::NAN; s]).collect();
        let z = vec![0.5f32; 2 * 4 * 2];
        assert!(engine.backward(&params, &z, &[], &[], &mut grads).is_err());
        engine.forward(&params, &z, Some(&[0, -1]), &[1.0, 0.0], true, false).unwrap();
        engine.backward(&params, &z, &[], &[], &mut grads).unwrap();
        for (name, g) in names.iter().zip(&grads) {
            assert!(g.iter().all(|v| v.is_finite()), "{name} has a non-finite gradient");
            if name.starts_with("heads.") {
                assert!(g.iter().all(|&v| v == 0.0), "{name} should get no gradient");
            }
        }
        assert!(engine.forward(&params, &z, Some(&[0, 2]), &[0.0, 0.0], false, false).is_err(), "label 2 of 2 classes");
    }
}
