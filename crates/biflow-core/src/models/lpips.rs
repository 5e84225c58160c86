//! LPIPS (Zhang et al. 2018), as the `lpips` package 0.1.4 computes it with net='vgg', version 0.1:
//! both images are shifted and scaled per channel, go through torchvision's VGG16 features, and at
//! each of the five ReLU stages (relu1_2 .. relu5_3) every feature vector is scaled to unit length
//! over its channels; the squared difference, weighted per channel by the stage's learned 1x1 head
//! and averaged over space, summed over the stages, is the distance. Differentiable in both images
//! (a perceptual training loss, `models::perceptual`, takes its gradient through the frozen network).
//!
//! Weights: the backbone under torchvision's names (`features.{i}.weight|bias`, as in
//! `vgg16-397923af.pth`; the classifier's tensors are ignored) and the heads under the package's
//! (`lin{k}.model.1.weight`, (1, C, 1, 1), as in its `weights/v0.1/vgg.pth`).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::engines::ops;
use crate::models::params;

/// torchvision's `vgg16().features`: the indices of the 3x3 convolutions (padding 1) of each
/// stage; a 2x2 max-pool opens every stage after the first, a ReLU follows every convolution.
const STAGES: [&[usize]; 5] = [&[0, 2], &[5, 7], &[10, 12, 14], &[17, 19, 21], &[24, 26, 28]];
/// Output channels of each stage, and each convolution's input channels follow from them.
const WIDTHS: [usize; 5] = [64, 128, 256, 512, 512];
/// The package's ScalingLayer: `(x - shift) / scale` per RGB channel, for inputs in [-1, 1].
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// `lpips.normalize_tensor`'s epsilon.
const EPS: f64 = 1e-10;

/// Every convolution of the backbone: its index in `features`, input and output channels.
pub fn convolutions() -> Vec<(usize, usize, usize)> {
    let mut c_in = 3;
    let mut out = Vec::new();
    for (convs, &width) in STAGES.iter().zip(&WIDTHS) {
        for &i in convs.iter() {
            out.push((i, c_in, width));
            c_in = width;
        }
    }
    out
}

/// A 3x3 convolution, padding 1, with its bias.
struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Conv3> {
        Ok(Conv3 { weight: vb.get((c_out, c_in, 3, 3), "weight")?, bias: vb.get(c_out, "bias")? })
    }
    /// The convolution and the ReLU after it.
    fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::conv2d_relu(x, &self.weight, &self.bias, 1)?)
    }
}

/// VGG16's convolutional features, stage by stage.
pub struct Vgg16 {
    stages: Vec<Vec<Conv3>>,
}

impl Vgg16 {
    pub fn new(vb: VarBuilder) -> Result<Vgg16> {
        let mut convs = convolutions().into_iter();
        let mut stages = Vec::new();
        for stage in STAGES {
            let layers = convs.by_ref().take(stage.len()).map(|(i, c_in, c_out)| Conv3::new(vb.pp(format!("features.{i}")), c_in, c_out));
            stages.push(layers.collect::<Result<Vec<_>>>()?);
        }
        Ok(Vgg16 { stages })
    }

    /// The output of every stage (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) for images (N, 3, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut outs = Vec::with_capacity(self.stages.len());
        for (s, stage) in self.stages.iter().enumerate() {
            if s > 0 {
                h = max_pool2(&h)?;
            }
            for conv in stage {
                h = conv.forward_relu(&h)?;
            }
            outs.push(h.clone());
        }
        Ok(outs)
    }
}

/// A 2x2 max-pool with stride 2 (odd edges dropped, as torch's), from reshapes and max reductions:
/// candle 0.11's `max_pool2d` gives a wrong input gradient (a quarter of it).
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (h, w) = (h / 2, w / 2);
    let x = x.narrow(2, 0, 2 * h)?.narrow(3, 0, 2 * w)?;
    Ok(x.reshape((n, c, h, 2, w, 2))?.max(5)?.max(3)?)
}

/// The LPIPS distance over a VGG16 backbone.
pub struct Lpips {
    vgg: Vgg16,
    /// Per stage, the head's channel weights, (1, C, 1, 1).
    heads: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// From the backbone's tensors (`vgg`) and the heads' (`heads`).
    pub fn new(vgg: VarBuilder, heads: VarBuilder) -> Result<Lpips> {
        crate::engines::ops::tune_allocator();
        let device = vgg.device().clone();
        let backbone = Vgg16::new(vgg).context("these are not the weights of torchvision's VGG16 (features.{i}.weight and .bias)")?;
        let heads = linear_heads(&heads).context("these are not LPIPS's VGG heads (lin0..lin4.model.1.weight, from the lpips package's weights/v0.1/vgg.pth)")?;
        let per_channel = |v: [f32; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), &device);
        Ok(Lpips { vgg: backbone, heads, shift: per_channel(SHIFT)?, scale: per_channel(SCALE)? })
    }

    /// Load the heads (`lpips`: the package's vgg.pth) and the backbone (`vgg`: torchvision's
    /// vgg16-397923af.pth), each .pth or .safetensors.
    pub fn load(lpips: &Path, vgg: &Path, device: &Device) -> Result<Lpips> {
        let read = |path: &Path| crate::io::tensors::load_weights(path, device);
        let backbone = read(vgg).with_context(|| format!("cannot read the VGG16 weights {}", vgg.display()))?;
        let heads = read(lpips).with_context(|| format!("cannot read the LPIPS heads {}", lpips.display()))?;
        // Every tensor's name and shape first: the error then lists the first few wrong ones.
        params::check_tensors(&params::parameter_list(Vgg16::new)?, &backbone)
            .with_context(|| format!("{} does not hold torchvision's VGG16 features (features.{{i}}.weight and .bias)", vgg.display()))?;
        params::check_tensors(&params::parameter_list(|vb| linear_heads(&vb))?, &heads)
            .with_context(|| format!("{} does not hold LPIPS's VGG heads (the lpips package's weights/v0.1/vgg.pth)", lpips.display()))?;
        let vb = |t| VarBuilder::from_tensors(t, DType::F32, device);
        Lpips::new(vb(backbone), vb(heads)).with_context(|| format!("--vgg {} and --lpips {}", vgg.display(), lpips.display()))
    }

    /// The distance of each pair, (N): images (N, C, H, W) in [-1, 1], C = 1 (gray, repeated to
    /// RGB) or 3, both of one shape.
    pub fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Tensor> {
        ensure!(x0.dims() == x1.dims(), "LPIPS compares images of one shape, got {:?} and {:?}", x0.dims(), x1.dims());
        let (_, c, h, w) = x0.dims4().context("LPIPS takes images N,C,H,W")?;
        ensure!(c == 1 || c == 3, "LPIPS takes gray or RGB images, got {c} channels");
        ensure!(h >= 16 && w >= 16, "LPIPS needs images of at least 16x16 pixels (VGG16 halves them four times), got {h}x{w}");
        // Each image through the network on its own: a target that needs no gradient (a constant)
        // then costs no backward pass.
        let features = |x: &Tensor| -> Result<Vec<Tensor>> {
            let x = x.to_dtype(DType::F32)?;
            let x = if c == 1 { x.repeat((1, 3, 1, 1))? } else { x };
            let x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
            let unit = |f: &Tensor| -> candle_core::Result<Tensor> { f.broadcast_div(&(f.sqr()?.sum_keepdim(1)?.sqrt()? + EPS)?) };
            self.vgg.forward(&x)?.iter().map(|f| Ok(unit(f)?)).collect()
        };
        let (f0, f1) = (features(x0)?, features(x1)?);
        let mut d: Option<Tensor> = None;
        for ((a, b), head) in f0.iter().zip(&f1).zip(&self.heads) {
            let diff = (a - b)?.sqr()?;
            // The 1x1 head (no bias) over the channels, then the mean over space.
            let stage = diff.broadcast_mul(head)?.sum(1)?.flatten_from(1)?.mean(D::Minus1)?;
            d = Some(match d {
                None => stage,
                Some(d) => (d + stage)?,
            });
        }
        Ok(d.expect("five stages"))
    }
}

/// The five heads' channel weights, (1, C, 1, 1) each.
fn linear_heads(vb: &VarBuilder) -> Result<Vec<Tensor>> {
    Ok(WIDTHS.iter().enumerate().map(|(k, &c)| vb.get((1, c, 1, 1), &format!("lin{k}.model.1.weight"))).collect::<candle_core::Result<Vec<_>>>()?)
}

/// `--lpips` and `--vgg` as given: both (the heads, the backbone), or neither.
pub fn weight_files<'a>(lpips: Option<&'a str>, vgg: Option<&'a str>) -> Result<Option<(&'a str, &'a str)>> {
    match (lpips, vgg) {
        (None, None) => Ok(None),
        (Some(l), Some(v)) => Ok(Some((l, v))),
        (Some(_), None) => anyhow::bail!("--lpips needs --vgg: torchvision's VGG16 weights (vgg16-397923af.pth), the network whose features LPIPS's heads weigh"),
        (None, Some(_)) => anyhow::bail!("--vgg is the backbone of --lpips: give --lpips too (the lpips package's weights/v0.1/vgg.pth)"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use candle_core::Var;

    const SALT: &str = "biflow-lpips-fixture/";

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips").join(name)
    }

    /// The fixture's backbone (scripts/make-lpips-fixtures.py).
    fn formula_backbone(device: &Device) -> HashMap<String, Tensor> {
        crate::eval::lpips::formula_backbone().into_iter().map(|(n, t)| (n, Tensor::from_vec(t.data, t.shape, device).unwrap())).collect()
    }

    fn image(name: &str, shape: (usize, usize, usize, usize), device: &Device) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(crate::io::formula::uniform(SALT, name, n).map(|u| (2.0 * u - 1.0) as f32).collect::<Vec<_>>(), shape, device).unwrap()
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
    }

    /// Distances and their gradient with respect to the first image equal the lpips package's
    /// (PyTorch, float64) on the formula backbone with the real v0.1 heads, gray and RGB, at 32, 64
    /// and 224 px.
    #[test]
    fn matches_the_lpips_package() {
        let dev = Device::Cpu;
        let heads = crate::io::tensors::load_weights(&fixture("vgg-lin-v0.1.pth"), &dev).unwrap();
        let lpips = Lpips::new(VarBuilder::from_tensors(formula_backbone(&dev), DType::F32, &dev), VarBuilder::from_tensors(heads, DType::F32, &dev)).unwrap();
        let want: HashMap<String, Vec<f32>> = crate::io::tensors::read_safetensors(&fixture("parity.safetensors")).unwrap().into_iter().map(|(n, t)| (n, t.data)).collect();
        for (case, n, c, size) in [("gray32", 2, 1, 32), ("rgb32", 2, 3, 32), ("rgb64", 2, 3, 64), ("rgb224", 1, 3, 224)] {
            let x0 = Var::from_tensor(&image(&format!("{case}/x0"), (n, c, size, size), &dev)).unwrap();
            let x1 = image(&format!("{case}/x1"), (n, c, size, size), &dev);
            let d = lpips.distance(x0.as_tensor(), &x1).unwrap();
            let got: Vec<f32> = d.to_vec1().unwrap();
            let err = rel(&got, &want[&format!("{case}.d")]);
            assert!(err <= 1e-4, "{case}: distances {got:?} vs {:?} ({err})", want[&format!("{case}.d")]);
            let g: Vec<f32> = d.sum_all().unwrap().backward().unwrap().get(x0.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Where a 2x2 max-pool window holds two near-equal maxima, float32 rounding (ours sums
            // in another order than PyTorch's) can route a pixel's gradient to the other one: then
            // a patch of values differs by ~1% of the largest (PyTorch's own float32 gradient at
            // 224 px is 1.1e-3 from float64 in relative L2, single values 1.6%). So: nearly every
            // value within 1e-4 of the largest, and the whole within 5e-3 in relative L2.
            let (got, reference): (Vec<f32>, &Vec<f32>) = match want.get(&format!("{case}.grad")) {
                Some(full) => (g.clone(), full),
                None => (g.iter().step_by(101).copied().collect(), &want[&format!("{case}.grad_strided")]),
            };
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let close = got.iter().zip(reference).filter(|(a, b)| (*a - *b).abs() <= 1e-4 * scale).count();
            let l2 = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let rel_l2 = l2(&mut got.iter().zip(reference).map(|(a, b)| a - b)) / l2(&mut reference.iter().copied());
            assert!(close as f64 >= 0.95 * got.len() as f64 && rel_l2 <= 5e-3, "{case}: {close} of {} gradient values agree, relative L2 difference {rel_l2:.2e}", got.len());
            if want.contains_key(&format!("{case}.grad_sumsq")) {
                let sumsq: f64 = g.iter().map(|v| (*v as f64).powi(2)).sum();
                let want_sumsq = want[&format!("{case}.grad_sumsq")][0] as f64;
                assert!((sumsq / want_sumsq - 1.0).abs() <= 1e-4, "{case}: gradient sum of squares {sumsq} vs {want_sumsq}");
            }
        }
    }

    /// Wrong files are refused with the tensor they lack or misshape; pairs must match in shape.
    #[test]
    fn refuses_wrong_weights_and_mismatched_pairs() {
        let dev = Device::Cpu;
        let heads = fixture("vgg-lin-v0.1.pth");
        // The heads given as the backbone: no features.*.
        let err = Lpips::load(&heads, &heads, &dev).err().unwrap();
        assert!(format!("{err:#}").contains("26 of 26 tensors missing (features.0.weight"), "{err:#}");
        let mut backbone = formula_backbone(&dev);
        backbone.insert("features.5.weight".into(), Tensor::zeros((128, 3, 3, 3), DType::F32, &dev).unwrap());
        let h = crate::io::tensors::load_weights(&heads, &dev).unwrap();
        let err = Lpips::new(VarBuilder::from_tensors(backbone, DType::F32, &dev), VarBuilder::from_tensors(h.clone(), DType::F32, &dev)).err().unwrap();
        assert!(format!("{err:#}").contains("shape"), "{err:#}");
        let lpips = Lpips::new(VarBuilder::from_tensors(formula_backbone(&dev), DType::F32, &dev), VarBuilder::from_tensors(h, DType::F32, &dev)).unwrap();
        let a = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((1, 3, 32, 16), DType::F32, &dev).unwrap();
        assert!(format!("{:#}", lpips.distance(&a, &b).err().unwrap()).contains("one shape"));
        assert_eq!(lpips.distance(&a, &a).unwrap().to_vec1::<f32>().unwrap(), [0.0]);
    }
}
