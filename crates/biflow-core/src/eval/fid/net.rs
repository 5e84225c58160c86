//! The FID Inception network of inception.rs composed of candle ops (conv2d, relu, pools, cat, mean), so
//! that it runs on any candle device; on a GPU this is the network, on the CPU [`FidInception`] stays the
//! faster default. NCHW activations, a whole batch at once; the same batch-norm-folded weights
//! ([`fold_tensors`]).
//!
//! candle's conv2d and pools pad both spatial dims alike and have no `count_include_pad=False`, so the
//! asymmetric 1xk / kx1 kernels are padded explicitly, the stride-1 average pools divide by the number of
//! valid inputs through a precomputed map (9 / count), and the Mixed_7c max pool pads with -inf.
//!
//! [`FidInception`]: super::inception::FidInception

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::inception::{check_inputs, fold_tensors, Act, ConvSpec, FeatureNet, Output, CLASSES, FEATURES, SIZE};

/// Images per forward pass: bounds the device memory (a few tens of MB per image) whatever the caller's batch.
const CHUNK: usize = 32;

/// A convolution with batch norm folded in: weight `(cout, cin, kh, kw)`, bias `(1, cout, 1, 1)`.
struct Conv {
    spec: ConvSpec,
    w: Tensor,
    b: Tensor,
}

impl Conv {
    /// conv + bias + ReLU.
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.spec;
        let y = if s.pad.0 == s.pad.1 {
            x.conv2d(&self.w, s.pad.0, s.stride, 1, 1)
        } else {
            // candle pads both dims alike: pad the 1xk / kx1 kernels' one padded dim by hand.
            x.pad_with_zeros(2, s.pad.0, s.pad.0)?.pad_with_zeros(3, s.pad.1, s.pad.1)?.conv2d(&self.w, 0, s.stride, 1, 1)
        };
        y.and_then(|y| y.broadcast_add(&self.b)?.relu()).with_context(|| format!("convolution {}", s.name))
    }
}

/// Pad both spatial dims of an NCHW tensor by 1 on each side with `v`.
fn pad1(x: &Tensor, v: f32) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let col = Tensor::full(v, (n, c, h, 1), x.device())?;
    let x = Tensor::cat(&[&col, x, &col], 3)?;
    let row = Tensor::full(v, (n, c, 1, w + 2), x.device())?;
    Ok(Tensor::cat(&[&row, &x, &row], 2)?)
}

/// `9 / count` of valid inputs under each 3x3 window with padding 1 (count 9 inside, 6 on edges, 4 at
/// corners), shaped `(1, 1, h, w)`: turns candle's average over 9 into pytorch's `count_include_pad=False`.
fn rescale_map(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let span = |i: usize, n: usize| (i + 1).min(n - 1) + 1 - i.saturating_sub(1);
    let data: Vec<f32> = (0..h * w).map(|p| 9.0 / (span(p / w, h) * span(p % w, w)) as f32).collect();
    Ok(Tensor::from_vec(data, (1, 1, h, w), device)?)
}

/// 3x3 stride-1 average pool with padding 1 over valid inputs only; `rescale` from [`rescale_map`].
fn avg_pool3_same(x: &Tensor, rescale: &Tensor) -> Result<Tensor> {
    Ok(pad1(x, 0.0)?.avg_pool2d_with_stride(3, 1)?.broadcast_mul(rescale)?)
}

/// 3x3 stride-1 max pool with padding 1: -inf padding never wins a max.
fn max_pool3_same(x: &Tensor) -> Result<Tensor> {
    Ok(pad1(x, f32::NEG_INFINITY)?.max_pool2d_with_stride(3, 1)?)
}

/// 3x3 stride-2 max pool, no padding.
fn max_pool_s2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// The network with its weights (batch norm folded) on one candle device.
pub struct DeviceInception {
    convs: HashMap<&'static str, Conv>,
    fc_wt: Tensor, // (FEATURES, CLASSES)
    fc_b: Tensor,  // (CLASSES)
    /// [`rescale_map`] per side of the average-pooled maps (35, 17, 8 for a 299 input).
    rescale: HashMap<usize, Tensor>,
    device: Device,
}

impl DeviceInception {
    /// Build from named tensors, as [`super::inception::FidInception::from_tensors`], on `device`.
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>, device: &Device) -> Result<DeviceInception> {
        let folded = fold_tensors(tensors)?;
        let on_device = || format!("cannot put the Inception weights on {device:?}");
        let mut convs = HashMap::new();
        for c in folded.convs {
            let s = c.spec;
            let w = Tensor::from_vec(c.w, (s.cout, s.cin, s.k.0, s.k.1), device).with_context(on_device)?;
            let b = Tensor::from_vec(c.b, (1, s.cout, 1, 1), device).with_context(on_device)?;
            convs.insert(s.name, Conv { spec: s, w, b });
        }
        let fc_wt = Tensor::from_vec(folded.fc_w, (CLASSES, FEATURES), device).and_then(|t| t.t()?.contiguous()).with_context(on_device)?;
        let fc_b = Tensor::from_vec(folded.fc_b, CLASSES, device).with_context(on_device)?;
        let rescale = [35, 17, 8].into_iter().map(|n| Ok((n, rescale_map(n, n, device)?))).collect::<Result<_>>()?;
        Ok(DeviceInception { convs, fc_wt, fc_b, rescale, device: device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn conv(&self, p: &str, name: &str, x: &Tensor) -> Result<Tensor> {
        let full = if p.is_empty() { name.to_string() } else { format!("{p}.{name}") };
        self.convs.get(full.as_str()).with_context(|| format!("the network has no convolution {full}"))?.run(x)
    }

    /// Convolutions of block `p` one after the other.
    fn chain(&self, p: &str, names: &[&str], x: &Tensor) -> Result<Tensor> {
        names.iter().try_fold(x.clone(), |cur, n| self.conv(p, n, &cur))
    }

    fn avg_pool(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        ensure!(h == w, "average pool of a non-square {h}x{w} map");
        let rescale = self.rescale.get(&h).with_context(|| format!("no average-pool count map for {h}x{w}"))?;
        avg_pool3_same(x, rescale)
    }

    fn block_a(&self, p: &str, x: &Tensor) -> Result<Tensor> {
        let b1 = self.chain(p, &["branch1x1"], x)?;
        let b5 = self.chain(p, &["branch5x5_1", "branch5x5_2"], x)?;
        let b3 = self.chain(p, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x)?;
        let bp = self.chain(p, &["branch_pool"], &self.avg_pool(x)?)?;
        Ok(Tensor::cat(&[b1, b5, b3, bp], 1)?)
    }

    fn block_b(&self, x: &Tensor) -> Result<Tensor> {
        let p = "Mixed_6a";
        let b3 = self.chain(p, &["branch3x3"], x)?;
        let bd = self.chain(p, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x)?;
        Ok(Tensor::cat(&[b3, bd, max_pool_s2(x)?], 1)?)
    }

    fn block_c(&self, p: &str, x: &Tensor) -> Result<Tensor> {
        let b1 = self.chain(p, &["branch1x1"], x)?;
        let b7 = self.chain(p, &["branch7x7_1", "branch7x7_2", "branch7x7_3"], x)?;
        let names = ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"];
        let bd = self.chain(p, &names, x)?;
        let bp = self.chain(p, &["branch_pool"], &self.avg_pool(x)?)?;
        Ok(Tensor::cat(&[b1, b7, bd, bp], 1)?)
    }

    fn block_d(&self, x: &Tensor) -> Result<Tensor> {
        let p = "Mixed_7a";
        let b3 = self.chain(p, &["branch3x3_1", "branch3x3_2"], x)?;
        let b7 = self.chain(p, &["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"], x)?;
        Ok(Tensor::cat(&[b3, b7, max_pool_s2(x)?], 1)?)
    }

    /// Mixed_7b averages in its pool branch, Mixed_7c (FIDInceptionE_2) max-pools.
    fn block_e(&self, p: &str, x: &Tensor, max_pool: bool) -> Result<Tensor> {
        let b1 = self.chain(p, &["branch1x1"], x)?;
        let b3 = self.conv(p, "branch3x3_1", x)?;
        let (b3a, b3b) = (self.conv(p, "branch3x3_2a", &b3)?, self.conv(p, "branch3x3_2b", &b3)?);
        let d = self.chain(p, &["branch3x3dbl_1", "branch3x3dbl_2"], x)?;
        let (da, db) = (self.conv(p, "branch3x3dbl_3a", &d)?, self.conv(p, "branch3x3dbl_3b", &d)?);
        let pooled = if max_pool { max_pool3_same(x)? } else { self.avg_pool(x)? };
        let bp = self.conv(p, "branch_pool", &pooled)?;
        Ok(Tensor::cat(&[b1, b3a, b3b, da, db, bp], 1)?)
    }

    /// The network on a batch `(N, 3, 299, 299)` of preprocessed images (values in [-1, 1]) on its device:
    /// the `(N, 2048)` pool3 features and, when asked, the `(N, 1008)` logits.
    pub fn forward(&self, x: &Tensor, logits: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (_, c, h, w) = x.dims4().context("the Inception input must be (N, 3, 299, 299)")?;
        ensure!((c, h, w) == (3, SIZE, SIZE), "the Inception input is (N, {c}, {h}, {w}), expected (N, 3, {SIZE}, {SIZE})");
        let x = self.chain("", &["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"], x)?;
        let x = self.chain("", &["Conv2d_3b_1x1", "Conv2d_4a_3x3"], &max_pool_s2(&x)?)?;
        let mut x = max_pool_s2(&x)?;
        for p in ["Mixed_5b", "Mixed_5c", "Mixed_5d"] {
            x = self.block_a(p, &x)?;
        }
        x = self.block_b(&x)?;
        for p in ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"] {
            x = self.block_c(p, &x)?;
        }
        x = self.block_d(&x)?;
        x = self.block_e("Mixed_7b", &x, false)?;
        x = self.block_e("Mixed_7c", &x, true)?;
        let features = x.mean((2, 3))?; // adaptive average pool to 1x1
        let logits = if logits { Some(features.matmul(&self.fc_wt)?.broadcast_add(&self.fc_b)?) } else { None };
        Ok((features, logits))
    }

    /// The network on preprocessed images (NHWC, as [`super::preprocess::preprocess_image`] gives them), in
    /// chunks of at most 32 images on the device.
    pub fn forward_acts(&self, xs: &[Act], logits: bool) -> Result<Vec<Output>> {
        check_inputs(xs)?;
        let mut out = Vec::with_capacity(xs.len());
        for chunk in xs.chunks(CHUNK) {
            let data: Vec<f32> = chunk.iter().flat_map(|a| a.data.iter().copied()).collect();
            let x = Tensor::from_vec(data, (chunk.len(), SIZE, SIZE, 3), &self.device)?.permute((0, 3, 1, 2))?.contiguous()?;
            let (f, l) = self.forward(&x, logits)?;
            let l: Vec<Option<Vec<f32>>> = match l {
                Some(l) => l.to_vec2()?.into_iter().map(Some).collect(),
                None => vec![None; chunk.len()],
            };
            out.extend(f.to_vec2()?.into_iter().zip(l).map(|(features, logits)| Output { features, logits }));
        }
        Ok(out)
    }
}

impl FeatureNet for DeviceInception {
    fn features(&self, xs: &[Act], logits: bool) -> Result<Vec<Output>> {
        self.forward_acts(xs, logits)
    }
}

#[cfg(test)]
mod tests {
    use super::super::inception::FidInception;
    use super::super::preprocess::preprocess;
    use super::super::weights::formula_tensors;
    use super::*;

    /// max |a - b| / max |b|.
    fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Deterministic images of different sizes, preprocessed (resized) to 299x299.
    fn inputs(n: usize) -> Vec<Act> {
        (0..n)
            .map(|i| {
                let (h, w) = (64 + 37 * i, 80 + 11 * i);
                let rgb: Vec<u8> = (0..h * w * 3).map(|p| ((p * 2654435761 + i * 97) >> 7) as u8).collect();
                preprocess(&rgb, h, w).unwrap()
            })
            .collect()
    }

    /// The hand-written network and the candle one on the CPU, with the formula weights.
    fn both_nets() -> (FidInception, DeviceInception) {
        let tensors = formula_tensors();
        (FidInception::from_tensors(tensors.clone()).unwrap(), DeviceInception::from_tensors(tensors, &Device::Cpu).unwrap())
    }

    #[test]
    fn avg_pool_same_divides_by_valid_inputs() {
        // One 3x4 map, values 1..12: corners average 4 inputs, edges 6, inside 9.
        let x = Tensor::from_vec((1..=12).map(|v| v as f32).collect::<Vec<_>>(), (1, 1, 3, 4), &Device::Cpu).unwrap();
        let got = avg_pool3_same(&x, &rescale_map(3, 4, &Device::Cpu).unwrap()).unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        // e.g. corner (1 + 2 + 5 + 6) / 4 = 3.5, top edge (1 + 2 + 3 + 5 + 6 + 7) / 6 = 4, inside 54 / 9 = 6.
        let want = [3.5, 4., 5., 5.5, 5.5, 6., 7., 7.5, 7.5, 8., 9., 9.5];
        assert!(rel_diff(&got, &want) < 1e-6, "{got:?}");
        // The max pool ignores padding even where every input is negative.
        let neg = x.neg().unwrap();
        let m: Vec<f32> = max_pool3_same(&neg).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&m[..4], &[-1., -1., -2., -3.]);
    }

    #[test]
    fn device_net_matches_the_cpu_net() {
        let (cpu, dev) = both_nets();
        let xs = inputs(2);
        let (want, got) = (cpu.forward(&xs, true), dev.forward_acts(&xs, true).unwrap());
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            let fd = rel_diff(&g.features, &w.features);
            let ld = rel_diff(g.logits.as_ref().unwrap(), w.logits.as_ref().unwrap());
            eprintln!("features rel diff {fd:e}, logits rel diff {ld:e}");
            assert!(fd <= 1e-4 && ld <= 1e-4, "features {fd:e}, logits {ld:e}");
        }
        assert!(dev.forward_acts(&xs[..1], false).unwrap()[0].logits.is_none());
    }

    #[test]
    fn device_net_rejects_bad_inputs() {
        let dev = DeviceInception::from_tensors(formula_tensors(), &Device::Cpu).unwrap();
        let small = Act { h: 10, w: 10, c: 3, data: vec![0.0; 300] };
        let err = dev.forward_acts(&[small], false).err().unwrap();
        assert!(format!("{err:#}").contains("expected 299x299x3"), "{err:#}");
        let x = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(dev.forward(&x, false).is_err());
        let mut t = formula_tensors();
        t.retain(|(n, _, _)| n != "fc.bias");
        assert!(DeviceInception::from_tensors(t, &Device::Cpu).is_err());
    }

    #[test]
    fn device_net_matches_pytorch_fid() {
        let net = DeviceInception::from_tensors(formula_tensors(), &Device::Cpu).unwrap();
        super::super::inception::tests::assert_matches_fixture(&net);
    }

    /// `cargo test --release -p biflow-core time_batch_of_4 -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn time_batch_of_4() {
        let (cpu, dev) = both_nets();
        let xs = inputs(4);
        for round in 0..2 {
            let t = std::time::Instant::now();
            cpu.forward(&xs, true);
            let hand = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            dev.forward_acts(&xs, true).unwrap();
            let candle = t.elapsed().as_secs_f64();
            eprintln!(
                "round {round}, batch of 4 on {} threads: hand-written {hand:.2} s, candle {candle:.2} s",
                rayon::current_num_threads()
            );
        }
    }
}
