//! The FID variant of Inception-v3 (pytorch-fid's `FIDInceptionA/C/E_1/E_2` patches of torchvision's
//! `Inception3`), for inference on the CPU.
//!
//! Layout: one image at a time in NHWC (`[h][w][c]`), so that a convolution is one matrix product
//! `[h_out*w_out, kh*kw*c_in] x [kh*kw*c_in, c_out]` (im2col rows copy whole channel vectors; 1x1 stride-1
//! convolutions use the input directly) and every branch writes its output straight into its channel slice
//! of the concatenated block output (no concat copies). Batch norm (inference mode, eps 0.001) is folded
//! into the convolution weights and bias at load time, in float64. A batch runs its images in parallel on
//! rayon's pool (`RAYON_NUM_THREADS`); a batch smaller than the pool parallelises inside the products.
//!
//! Pools as pytorch-fid builds them: 3x3 stride-2 max pools in the stem and in Mixed_6a/7a; 3x3 stride-1
//! average pools with padding 1 that do NOT count the padding (`count_include_pad=False`: each output is
//! divided by the number of valid inputs, 4 at corners, 6 on edges, 9 inside) in Mixed_5*, 6b-6e, 7b; a
//! 3x3 stride-1 max pool with padding 1 in Mixed_7c (padding never wins a max: only valid inputs are read).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

/// pool3 feature size and number of logits (the TF Inception's 1008 classes).
pub const FEATURES: usize = 2048;
pub const CLASSES: usize = 1008;
/// Input side of the network.
pub const SIZE: usize = 299;
const BN_EPS: f64 = 0.001;

/// One convolution of the network: name (as in the weights file), channels, kernel, stride, padding.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub name: &'static str,
    pub cin: usize,
    pub cout: usize,
    pub k: (usize, usize),
    pub stride: usize,
    pub pad: (usize, usize),
}

fn push(v: &mut Vec<ConvSpec>, prefix: &str, name: &str, cin: usize, cout: usize, k: (usize, usize), stride: usize, pad: (usize, usize)) {
    let full: &'static str = Box::leak(if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }.into_boxed_str());
    v.push(ConvSpec { name: full, cin, cout, k, stride, pad });
}

/// Every convolution of the network, in the order of the published weights file.
pub fn conv_specs() -> &'static [ConvSpec] {
    static SPECS: std::sync::OnceLock<Vec<ConvSpec>> = std::sync::OnceLock::new();
    SPECS.get_or_init(|| {
        let mut v = Vec::new();
        let s = &mut v;
        push(s, "", "Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0));
        push(s, "", "Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0));
        push(s, "", "Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1));
        push(s, "", "Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0));
        push(s, "", "Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0));
        for (p, cin, pf) in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)] {
            push(s, p, "branch1x1", cin, 64, (1, 1), 1, (0, 0));
            push(s, p, "branch5x5_1", cin, 48, (1, 1), 1, (0, 0));
            push(s, p, "branch5x5_2", 48, 64, (5, 5), 1, (2, 2));
            push(s, p, "branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0));
            push(s, p, "branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1));
            push(s, p, "branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1));
            push(s, p, "branch_pool", cin, pf, (1, 1), 1, (0, 0));
        }
        push(s, "Mixed_6a", "branch3x3", 288, 384, (3, 3), 2, (0, 0));
        push(s, "Mixed_6a", "branch3x3dbl_1", 288, 64, (1, 1), 1, (0, 0));
        push(s, "Mixed_6a", "branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1));
        push(s, "Mixed_6a", "branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0));
        for (p, c7) in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)] {
            push(s, p, "branch1x1", 768, 192, (1, 1), 1, (0, 0));
            push(s, p, "branch7x7_1", 768, c7, (1, 1), 1, (0, 0));
            push(s, p, "branch7x7_2", c7, c7, (1, 7), 1, (0, 3));
            push(s, p, "branch7x7_3", c7, 192, (7, 1), 1, (3, 0));
            push(s, p, "branch7x7dbl_1", 768, c7, (1, 1), 1, (0, 0));
            push(s, p, "branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0));
            push(s, p, "branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3));
            push(s, p, "branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0));
            push(s, p, "branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3));
            push(s, p, "branch_pool", 768, 192, (1, 1), 1, (0, 0));
        }
        push(s, "Mixed_7a", "branch3x3_1", 768, 192, (1, 1), 1, (0, 0));
        push(s, "Mixed_7a", "branch3x3_2", 192, 320, (3, 3), 2, (0, 0));
        push(s, "Mixed_7a", "branch7x7x3_1", 768, 192, (1, 1), 1, (0, 0));
        push(s, "Mixed_7a", "branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3));
        push(s, "Mixed_7a", "branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0));
        push(s, "Mixed_7a", "branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0));
        for (p, cin) in [("Mixed_7b", 1280), ("Mixed_7c", 2048)] {
            push(s, p, "branch1x1", cin, 320, (1, 1), 1, (0, 0));
            push(s, p, "branch3x3_1", cin, 384, (1, 1), 1, (0, 0));
            push(s, p, "branch3x3_2a", 384, 384, (1, 3), 1, (0, 1));
            push(s, p, "branch3x3_2b", 384, 384, (3, 1), 1, (1, 0));
            push(s, p, "branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0));
            push(s, p, "branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1));
            push(s, p, "branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1));
            push(s, p, "branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0));
            push(s, p, "branch_pool", cin, 192, (1, 1), 1, (0, 0));
        }
        v
    })
}

/// Every tensor of the published weights file: name and shape, in file order (472 tensors).
pub fn tensor_specs() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for c in conv_specs() {
        out.push((format!("{}.conv.weight", c.name), vec![c.cout, c.cin, c.k.0, c.k.1]));
        for t in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{}.bn.{t}", c.name), vec![c.cout]));
        }
    }
    out.push(("fc.weight".into(), vec![CLASSES, FEATURES]));
    out.push(("fc.bias".into(), vec![CLASSES]));
    out
}

/// An activation map of one image, NHWC.
#[derive(Clone)]
pub struct Act {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Act {
    pub(crate) fn zeros(h: usize, w: usize, c: usize) -> Act {
        Act { h, w, c, data: vec![0.0; h * w * c] }
    }
}

/// A convolution with batch norm folded in; weight laid out `[kh][kw][cin][cout]`.
struct Conv {
    spec: ConvSpec,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Conv {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.spec;
        ((h + 2 * s.pad.0 - s.k.0) / s.stride + 1, (w + 2 * s.pad.1 - s.k.1) / s.stride + 1)
    }

    /// conv + bias + ReLU of `x`, written to channels `off..off+cout` of `out` (which has `out.c` channels).
    fn run_into(&self, x: &Act, out: &mut Act, off: usize, par: bool) {
        let s = self.spec;
        debug_assert_eq!(x.c, s.cin);
        let (oh, ow) = self.out_hw(x.h, x.w);
        assert!(out.h == oh && out.w == ow && off + s.cout <= out.c, "{}: shape mismatch", s.name);
        let m = oh * ow;
        let kdim = s.k.0 * s.k.1 * s.cin;
        let col_buf;
        let lhs: &[f32] = if s.k == (1, 1) && s.stride == 1 && s.pad == (0, 0) {
            &x.data
        } else {
            let mut col = vec![0f32; m * kdim];
            col.par_chunks_mut(kdim * ow).enumerate().with_min_len(if par { 1 } else { usize::MAX }).for_each(|(oy, rows)| {
                for ox in 0..ow {
                    let row = &mut rows[ox * kdim..(ox + 1) * kdim];
                    for ky in 0..s.k.0 {
                        let iy = (oy * s.stride + ky) as isize - s.pad.0 as isize;
                        for kx in 0..s.k.1 {
                            let ix = (ox * s.stride + kx) as isize - s.pad.1 as isize;
                            let dst = &mut row[(ky * s.k.1 + kx) * s.cin..(ky * s.k.1 + kx + 1) * s.cin];
                            if iy >= 0 && (iy as usize) < x.h && ix >= 0 && (ix as usize) < x.w {
                                let p = (iy as usize * x.w + ix as usize) * s.cin;
                                dst.copy_from_slice(&x.data[p..p + s.cin]);
                            } // else: stays zero (zero padding)
                        }
                    }
                }
            });
            col_buf = col;
            &col_buf
        };
        let oc = out.c;
        let parallelism = if par { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
        // SAFETY: dst covers rows 0..m with row stride oc and columns off..off+cout < oc; lhs is m x kdim
        // (row stride kdim, or cin == kdim for the 1x1 case); rhs is kdim x cout.
        unsafe {
            gemm::gemm(
                m,
                s.cout,
                kdim,
                out.data.as_mut_ptr().add(off),
                1,
                oc as isize,
                false,
                lhs.as_ptr(),
                1,
                kdim as isize,
                self.w.as_ptr(),
                1,
                s.cout as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        for p in 0..m {
            let row = &mut out.data[p * oc + off..p * oc + off + s.cout];
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v = (*v + b).max(0.0);
            }
        }
    }

    fn run(&self, x: &Act, par: bool) -> Act {
        let (oh, ow) = self.out_hw(x.h, x.w);
        let mut out = Act::zeros(oh, ow, self.spec.cout);
        self.run_into(x, &mut out, 0, par);
        out
    }
}

/// 3x3 max pool, stride 2, no padding, into channels `off..` of `out`.
fn max_pool_s2_into(x: &Act, out: &mut Act, off: usize) {
    let (oh, ow) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
    assert!(out.h == oh && out.w == ow);
    for oy in 0..oh {
        for ox in 0..ow {
            let o = (oy * ow + ox) * out.c + off;
            let dst = &mut out.data[o..o + x.c];
            dst.fill(f32::NEG_INFINITY);
            for ky in 0..3 {
                for kx in 0..3 {
                    let p = ((oy * 2 + ky) * x.w + ox * 2 + kx) * x.c;
                    for (d, v) in dst.iter_mut().zip(&x.data[p..p + x.c]) {
                        *d = d.max(*v);
                    }
                }
            }
        }
    }
}

fn max_pool_s2(x: &Act) -> Act {
    let mut out = Act::zeros((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1, x.c);
    max_pool_s2_into(x, &mut out, 0);
    out
}

/// 3x3 stride-1 pool with padding 1 over valid inputs only: the average (`count_include_pad=False`) or the max.
fn pool3_same(x: &Act, max: bool) -> Act {
    let mut out = Act::zeros(x.h, x.w, x.c);
    for oy in 0..x.h {
        for ox in 0..x.w {
            let o = (oy * x.w + ox) * x.c;
            let dst = &mut out.data[o..o + x.c];
            if max {
                dst.fill(f32::NEG_INFINITY);
            }
            let (y0, y1) = (oy.saturating_sub(1), (oy + 1).min(x.h - 1));
            let (x0, x1) = (ox.saturating_sub(1), (ox + 1).min(x.w - 1));
            for iy in y0..=y1 {
                for ix in x0..=x1 {
                    let p = (iy * x.w + ix) * x.c;
                    let src = &x.data[p..p + x.c];
                    if max {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = d.max(*v);
                        }
                    } else {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
            if !max {
                let count = ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
                for d in dst.iter_mut() {
                    *d /= count;
                }
            }
        }
    }
    out
}

/// One convolution with batch norm folded in: weight OIHW (`[cout][cin][kh][kw]`) and bias, float32.
pub struct FoldedConv {
    pub spec: ConvSpec,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// The network's weights ready for inference, whatever runs them: the convolutions of [`conv_specs`] in
/// order, and the fc layer (`[CLASSES][FEATURES]`, `[CLASSES]`).
pub struct FoldedWeights {
    pub convs: Vec<FoldedConv>,
    pub fc_w: Vec<f32>,
    pub fc_b: Vec<f32>,
}

/// Check named tensors (shape, f32 data), as read from a .pth or .safetensors file, and fold batch norm
/// (inference mode, eps 0.001) into the convolutions, in float64. Every tensor of [`tensor_specs`] must be
/// present with its shape; a `module.` prefix, `num_batches_tracked` and other extras are ignored.
pub fn fold_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<FoldedWeights> {
    let mut map: HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, d)| (n.strip_prefix("module.").map(str::to_string).unwrap_or(n), (s, d))).collect();
    for (name, shape) in tensor_specs() {
        match map.get(&name) {
            None => bail!("the weights have no tensor '{name}': not the FID Inception weights (pt_inception-2015-12-05)"),
            Some((s, d)) => {
                ensure!(s == &shape, "tensor '{name}' has shape {s:?}, expected {shape:?}");
                ensure!(d.len() == shape.iter().product::<usize>(), "tensor '{name}' has the wrong number of values");
            }
        }
    }
    let mut take = |n: String| map.remove(&n).map(|t| t.1).with_context(|| format!("the weights have no tensor '{n}'"));
    let mut convs = Vec::new();
    for spec in conv_specs() {
        let w = take(format!("{}.conv.weight", spec.name))?;
        let gamma = take(format!("{}.bn.weight", spec.name))?;
        let beta = take(format!("{}.bn.bias", spec.name))?;
        let mean = take(format!("{}.bn.running_mean", spec.name))?;
        let var = take(format!("{}.bn.running_var", spec.name))?;
        let mut wf = Vec::with_capacity(w.len());
        let mut bf = Vec::with_capacity(spec.cout);
        for (co, filter) in w.chunks_exact(spec.cin * spec.k.0 * spec.k.1).enumerate() {
            let scale = gamma[co] as f64 / (var[co] as f64 + BN_EPS).sqrt();
            bf.push((beta[co] as f64 - mean[co] as f64 * scale) as f32);
            wf.extend(filter.iter().map(|&v| (v as f64 * scale) as f32));
        }
        convs.push(FoldedConv { spec: *spec, w: wf, b: bf });
    }
    Ok(FoldedWeights { convs, fc_w: take("fc.weight".into())?, fc_b: take("fc.bias".into())? })
}

/// The network with its weights (batch norm folded), ready for inference.
pub struct FidInception {
    convs: HashMap<&'static str, Conv>,
    fc_w: Vec<f32>, // [CLASSES][FEATURES]
    fc_b: Vec<f32>,
}

/// Features of one image: the 2048 pool3 values and, when asked, the 1008 logits.
pub struct Output {
    pub features: Vec<f32>,
    pub logits: Option<Vec<f32>>,
}

/// A network that turns preprocessed images into [`Output`]s: [`FidInception`] on the CPU, or
/// [`super::net::DeviceInception`] on any candle device.
pub trait FeatureNet: Send + Sync {
    fn features(&self, xs: &[Act], logits: bool) -> Result<Vec<Output>>;
}

/// Check that `xs` are preprocessed network inputs (299x299x3), so that a bad one is an error, not a panic.
pub fn check_inputs(xs: &[Act]) -> Result<()> {
    for (i, x) in xs.iter().enumerate() {
        ensure!(
            x.h == SIZE && x.w == SIZE && x.c == 3 && x.data.len() == SIZE * SIZE * 3,
            "input {i} of the Inception network is {}x{}x{} with {} values, expected {SIZE}x{SIZE}x3",
            x.h,
            x.w,
            x.c,
            x.data.len()
        );
    }
    Ok(())
}

impl FeatureNet for FidInception {
    fn features(&self, xs: &[Act], logits: bool) -> Result<Vec<Output>> {
        check_inputs(xs)?;
        Ok(self.forward(xs, logits))
    }
}

impl FidInception {
    /// Build from named tensors (shape, f32 data), as read from a .pth or .safetensors file; see [`fold_tensors`].
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<FidInception> {
        let folded = fold_tensors(tensors)?;
        let mut convs = HashMap::new();
        for FoldedConv { spec, w, b } in folded.convs {
            // OIHW -> [kh][kw][cin][cout], the right-hand side of the im2col product.
            let (kh, kw, cin, cout) = (spec.k.0, spec.k.1, spec.cin, spec.cout);
            let mut wt = vec![0f32; w.len()];
            for co in 0..cout {
                for ci in 0..cin {
                    for y in 0..kh {
                        for x in 0..kw {
                            wt[((y * kw + x) * cin + ci) * cout + co] = w[((co * cin + ci) * kh + y) * kw + x];
                        }
                    }
                }
            }
            convs.insert(spec.name, Conv { spec, w: wt, b });
        }
        Ok(FidInception { convs, fc_w: folded.fc_w, fc_b: folded.fc_b })
    }

    fn c(&self, name: &str) -> &Conv {
        &self.convs[name]
    }

    fn branch(&self, x: &Act, names: &[String], out: &mut Act, off: usize, par: bool) -> usize {
        let mut cur: Option<Act> = None;
        for (i, n) in names.iter().enumerate() {
            let conv = self.c(n);
            let input = cur.as_ref().unwrap_or(x);
            if i + 1 == names.len() {
                conv.run_into(input, out, off, par);
                return off + conv.spec.cout;
            }
            cur = Some(conv.run(input, par));
        }
        off
    }

    fn names(p: &str, ns: &[&str]) -> Vec<String> {
        ns.iter().map(|n| format!("{p}.{n}")).collect()
    }

    fn block_a(&self, p: &str, x: &Act, par: bool) -> Act {
        let pf = self.c(&format!("{p}.branch_pool")).spec.cout;
        let mut out = Act::zeros(x.h, x.w, 64 + 64 + 96 + pf);
        let mut off = self.branch(x, &Self::names(p, &["branch1x1"]), &mut out, 0, par);
        off = self.branch(x, &Self::names(p, &["branch5x5_1", "branch5x5_2"]), &mut out, off, par);
        off = self.branch(x, &Self::names(p, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]), &mut out, off, par);
        let pooled = pool3_same(x, false);
        self.branch(&pooled, &Self::names(p, &["branch_pool"]), &mut out, off, par);
        out
    }

    fn block_b(&self, x: &Act, par: bool) -> Act {
        let p = "Mixed_6a";
        let (oh, ow) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
        let mut out = Act::zeros(oh, ow, 384 + 96 + x.c);
        let mut off = self.branch(x, &Self::names(p, &["branch3x3"]), &mut out, 0, par);
        off = self.branch(x, &Self::names(p, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]), &mut out, off, par);
        max_pool_s2_into(x, &mut out, off);
        out
    }

    fn block_c(&self, p: &str, x: &Act, par: bool) -> Act {
        let mut out = Act::zeros(x.h, x.w, 768);
        let mut off = self.branch(x, &Self::names(p, &["branch1x1"]), &mut out, 0, par);
        off = self.branch(x, &Self::names(p, &["branch7x7_1", "branch7x7_2", "branch7x7_3"]), &mut out, off, par);
        off = self.branch(
            x,
            &Self::names(p, &["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"]),
            &mut out,
            off,
            par,
        );
        let pooled = pool3_same(x, false);
        self.branch(&pooled, &Self::names(p, &["branch_pool"]), &mut out, off, par);
        out
    }

    fn block_d(&self, x: &Act, par: bool) -> Act {
        let p = "Mixed_7a";
        let (oh, ow) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
        let mut out = Act::zeros(oh, ow, 320 + 192 + x.c);
        let mut off = self.branch(x, &Self::names(p, &["branch3x3_1", "branch3x3_2"]), &mut out, 0, par);
        off = self.branch(
            x,
            &Self::names(p, &["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]),
            &mut out,
            off,
            par,
        );
        max_pool_s2_into(x, &mut out, off);
        out
    }

    fn block_e(&self, p: &str, x: &Act, max_pool: bool, par: bool) -> Act {
        let mut out = Act::zeros(x.h, x.w, 2048);
        let mut off = self.branch(x, &Self::names(p, &["branch1x1"]), &mut out, 0, par);
        let b3 = self.c(&format!("{p}.branch3x3_1")).run(x, par);
        off = self.branch(&b3, &Self::names(p, &["branch3x3_2a"]), &mut out, off, par);
        off = self.branch(&b3, &Self::names(p, &["branch3x3_2b"]), &mut out, off, par);
        let d = self.c(&format!("{p}.branch3x3dbl_1")).run(x, par);
        let d = self.c(&format!("{p}.branch3x3dbl_2")).run(&d, par);
        off = self.branch(&d, &Self::names(p, &["branch3x3dbl_3a"]), &mut out, off, par);
        off = self.branch(&d, &Self::names(p, &["branch3x3dbl_3b"]), &mut out, off, par);
        // Mixed_7c (FIDInceptionE_2) max-pools; its input is a concatenation of ReLU outputs.
        let pooled = pool3_same(x, max_pool);
        self.branch(&pooled, &Self::names(p, &["branch_pool"]), &mut out, off, par);
        out
    }

    /// The network on one preprocessed 299x299x3 image (NHWC, values in [-1, 1]).
    pub fn forward_one(&self, x: &Act, logits: bool, par: bool) -> Output {
        assert!(x.h == SIZE && x.w == SIZE && x.c == 3);
        let x = self.c("Conv2d_1a_3x3").run(x, par);
        let x = self.c("Conv2d_2a_3x3").run(&x, par);
        let x = self.c("Conv2d_2b_3x3").run(&x, par);
        let x = max_pool_s2(&x);
        let x = self.c("Conv2d_3b_1x1").run(&x, par);
        let x = self.c("Conv2d_4a_3x3").run(&x, par);
        let x = max_pool_s2(&x);
        let x = self.block_a("Mixed_5b", &x, par);
        let x = self.block_a("Mixed_5c", &x, par);
        let x = self.block_a("Mixed_5d", &x, par);
        let x = self.block_b(&x, par);
        let x = self.block_c("Mixed_6b", &x, par);
        let x = self.block_c("Mixed_6c", &x, par);
        let x = self.block_c("Mixed_6d", &x, par);
        let x = self.block_c("Mixed_6e", &x, par);
        let x = self.block_d(&x, par);
        let x = self.block_e("Mixed_7b", &x, false, par);
        let x = self.block_e("Mixed_7c", &x, true, par);
        // Adaptive average pool to 1x1.
        let n = (x.h * x.w) as f32;
        let mut f = vec![0f32; FEATURES];
        for p in 0..x.h * x.w {
            for (a, v) in f.iter_mut().zip(&x.data[p * FEATURES..(p + 1) * FEATURES]) {
                *a += v;
            }
        }
        f.iter_mut().for_each(|a| *a /= n);
        let logits = logits.then(|| {
            (0..CLASSES)
                .map(|j| self.fc_b[j] + self.fc_w[j * FEATURES..(j + 1) * FEATURES].iter().zip(&f).map(|(w, x)| w * x).sum::<f32>())
                .collect()
        });
        Output { features: f, logits }
    }

    /// The network on a batch of preprocessed images, in parallel.
    pub fn forward(&self, xs: &[Act], logits: bool) -> Vec<Output> {
        let threads = rayon::current_num_threads();
        if xs.len() >= threads || xs.len() <= 1 {
            let inner = xs.len() <= 1 && threads > 1;
            xs.par_iter().with_max_len(1).map(|x| self.forward_one(x, logits, inner)).collect()
        } else {
            xs.iter().map(|x| self.forward_one(x, logits, true)).collect()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::fid::preprocess::{load_rgb, preprocess};
    use crate::eval::fid::weights::{formula_tensors, formula_values};

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fid-reference")
    }

    #[test]
    fn specs_match_the_published_file() {
        assert_eq!(tensor_specs().len(), 472);
        let v = formula_values("Conv2d_1a_3x3.conv.weight", &[32, 3, 3, 3]);
        assert_eq!(&v[..3], &[-0.26782575f32, -0.15434067, -0.34734887]);
        let v = formula_values("Conv2d_1a_3x3.bn.running_var", &[32]);
        assert_eq!(&v[..3], &[1.4537280f32, 1.4479444, 1.0484260]);
        let v = formula_values("Mixed_7c.branch_pool.bn.bias", &[192]);
        assert_eq!(&v[..3], &[-0.013779213f32, -0.0093566244, -0.0066672410]);
        let v = formula_values("fc.weight", &[1008, 2048]);
        assert_eq!(&v[..3], &[-0.0088953245f32, 0.015406575, -0.015828682]);
    }

    #[test]
    fn legacy_subset_has_formula_values() {
        let sd = crate::io::pickle::read_state_dict(&fixtures().join("fid-inception-formula-subset.pth")).unwrap();
        assert_eq!(sd.len(), 10);
        for (name, t) in sd {
            assert_eq!(t.data, formula_values(&name, &t.shape), "{name}");
        }
    }

    #[test]
    fn avg_pool_does_not_count_padding() {
        let x = Act { h: 3, w: 3, c: 1, data: (1..=9).map(|v| v as f32).collect() };
        let a = pool3_same(&x, false);
        assert_eq!(a.data[0], (1. + 2. + 4. + 5.) / 4.);
        assert_eq!(a.data[1], (1. + 2. + 3. + 4. + 5. + 6.) / 6.);
        assert_eq!(a.data[4], 5.);
        let m = pool3_same(&x, true);
        assert_eq!(m.data[0], 5.);
    }

    #[test]
    fn resize_identity_at_299_and_bilinear_matches_pytorch() {
        let rgb: Vec<u8> = (0..SIZE * SIZE * 3).map(|i| (i % 251) as u8).collect();
        let a = preprocess(&rgb, SIZE, SIZE).unwrap();
        for (o, &v) in a.data.iter().zip(&rgb) {
            assert!((o - (2.0 * (v as f32 / 255.0) - 1.0)).abs() < 1e-6);
        }
        // 2x2 -> 299: the first output samples the corner pixel, the centre output is the mean.
        let rgb = vec![0u8, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255];
        let a = preprocess(&rgb, 2, 2).unwrap();
        assert_eq!(a.data[0], -1.0);
        assert!((a.data[(149 * SIZE + 149) * 3]).abs() < 1e-6);
    }

    /// The parity test: formula weights, fixture images, features.json within 1e-4.
    #[test]
    fn features_match_pytorch_fid() {
        assert_matches_fixture(&FidInception::from_tensors(formula_tensors()).unwrap());
    }

    /// `net` (with the formula weights) on the fixture images gives features.json within 1e-4.
    pub(crate) fn assert_matches_fixture(net: &dyn FeatureNet) {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join("features.json")).unwrap()).unwrap();
        let feats = json["features"].as_object().unwrap();
        assert!(feats.len() >= 11);
        let mut names: Vec<&String> = feats.keys().collect();
        names.sort();
        let imgs: Vec<Act> = names
            .iter()
            .map(|n| {
                let (rgb, h, w) = load_rgb(&fixtures().join("images").join(n.as_str())).unwrap();
                preprocess(&rgb, h, w).unwrap()
            })
            .collect();
        let outs = net.features(&imgs, true).unwrap();
        let mut worst = 0f64;
        let mut sizes = std::collections::BTreeSet::new();
        for (n, o) in names.iter().zip(&outs) {
            let want: Vec<f64> = feats[n.as_str()].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(want.len(), FEATURES);
            for (a, b) in o.features.iter().zip(&want) {
                worst = worst.max((*a as f64 - b).abs());
            }
            assert_eq!(o.logits.as_ref().unwrap().len(), CLASSES);
            sizes.insert(image::image_dimensions(fixtures().join("images").join(n.as_str())).unwrap().0);
        }
        eprintln!("max |diff| = {worst:e} over {} images, sizes {sizes:?}", names.len());
        assert!(sizes.len() >= 4, "{sizes:?}");
        assert!(worst <= 1e-4, "max |diff| {worst}");
    }
}
