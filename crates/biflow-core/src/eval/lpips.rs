//! The `lpips` job: the LPIPS distance ([`crate::models::lpips`]) between two images, two folders of
//! images paired by file name, or two image arrays (.npz) paired by index.

use std::num::NonZeroUsize;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::fid::eval::FormulaOptions;
use super::fid::source::{images_tensor, open_images};
use crate::io::tensors::HostTensor;
use crate::job::JobCtx;
use crate::jobs::options::DeviceArgs;
use crate::models::lpips::Lpips;

crate::options! {
    pub struct LpipsOptions {
        /// the first image(s): an image file (PNG, JPEG, ...), a folder of images, or an .npz array
        a: String,
        /// the second image(s), of the same kind: folders are paired by file name, arrays by index
        b: String,
        /// LPIPS's linear heads: the lpips package's weights/v0.1/vgg.pth (or .safetensors)
        lpips: String,
        /// torchvision's VGG16 weights (vgg16-397923af.pth, or .safetensors)
        vgg: String,
        /// image pairs per batch
        batch_size: NonZeroUsize = 16,
    }
}

pub fn lpips(o: LpipsOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let placement = on.place()?;
    let device = &placement.device;
    let (mut a, names_a) = open_images(&o.a)?;
    let (mut b, names_b) = open_images(&o.b)?;
    ensure!(names_a.len() == names_b.len(), "{} holds {} images and {} holds {}: LPIPS compares them in pairs", o.a, names_a.len(), o.b, names_b.len());
    if Path::new(&o.a).is_dir() && Path::new(&o.b).is_dir() {
        if let Some((x, y)) = names_a.iter().zip(&names_b).find(|(x, y)| x != y) {
            bail!("the folders are paired by file name, but {} has {x} where {} has {y}", o.a, o.b);
        }
    }
    let net = Lpips::load(Path::new(&o.lpips), Path::new(&o.vgg), device)?;
    let total = names_a.len();
    ctx.start("lpips", Some(total as u64));
    let mut distances = Vec::with_capacity(total);
    while let (Some(xa), Some(xb)) = (a.next_batch(o.batch_size.get())?, b.next_batch(o.batch_size.get())?) {
        ctx.check_cancelled()?;
        ensure!(xa.len() == xb.len(), "the two sides gave batches of different sizes");
        // Pairs of one size go through the network together.
        let mut i = 0;
        while i < xa.len() {
            let (h, w) = (xa[i].h, xa[i].w);
            let k = distances.len();
            ensure!((xb[i].h, xb[i].w) == (h, w), "{} is {h}x{w} but {} is {}x{}: LPIPS compares images of one size", names_a[k], names_b[k], xb[i].h, xb[i].w);
            let mut j = i + 1;
            while j < xa.len() && (xa[j].h, xa[j].w) == (h, w) && (xb[j].h, xb[j].w) == (h, w) {
                j += 1;
            }
            let d = net.distance(&images_tensor(&xa[i..j], device)?, &images_tensor(&xb[i..j], device)?).with_context(|| format!("pair {}", names_a[k]))?;
            distances.extend(d.to_vec1::<f32>()?);
            i = j;
        }
        ctx.progress(distances.len() as u64, Some(total as u64), serde_json::Map::new());
    }
    ctx.end();
    ensure!(distances.len() == total, "read {} pairs of {total}", distances.len());
    let mean = distances.iter().map(|&d| d as f64).sum::<f64>() / total as f64;
    let pairs: Vec<Value> = names_a.iter().zip(&names_b).zip(&distances).map(|((x, y), d)| json!({"a": x, "b": y, "distance": d})).collect();
    Ok(json!({"a": o.a, "b": o.b, "pairs": pairs, "mean": mean, "count": total}))
}

/// The stand-in VGG16 backbone of the parity fixture (scripts/make-lpips-fixtures.py): He-uniform
/// convolutions from the formula of [`crate::io::formula`]. For tests and benchmarks only.
pub fn formula_backbone() -> Vec<(String, HostTensor)> {
    const SALT: &str = "biflow-lpips-fixture/";
    let mut out = Vec::new();
    for (i, c_in, c_out) in crate::models::lpips::convolutions() {
        let fan_in = (c_in * 9) as f64;
        let name = format!("features.{i}.weight");
        let data = crate::io::formula::uniform(SALT, &name, c_out * c_in * 9).map(|u| ((2.0 * u - 1.0) * (6.0 / fan_in).sqrt()) as f32).collect();
        out.push((name, HostTensor { shape: vec![c_out, c_in, 3, 3], data }));
        let name = format!("features.{i}.bias");
        let data = crate::io::formula::uniform(SALT, &name, c_out).map(|u| (0.02 * (2.0 * u - 1.0)) as f32).collect();
        out.push((name, HostTensor { shape: vec![c_out], data }));
    }
    out
}

/// Write [`formula_backbone`] as `.safetensors` (the CLI's tests and the benchmark).
pub fn formula_weights(o: FormulaOptions, _ctx: &JobCtx) -> Result<Value> {
    let tensors = formula_backbone();
    crate::io::tensors::write_safetensors(Path::new(&o.output), &tensors)?;
    Ok(json!({"output": o.output, "tensors": tensors.len()}))
}
