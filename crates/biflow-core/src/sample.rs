//! `biflow sample`: exact sampling (causal decoding of the forward flow) and image output.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::flow::{nll_loss, ReverseOptions, TarFlow};
use crate::io::npy::{read_npy, write_npy, write_npz, Array};
use crate::job::JobCtx;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SampleOptions {
    pub model: String,
    pub out: String,
    #[serde(default)]
    pub num: Option<usize>,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub guidance: f64,
    #[serde(default)]
    pub annealed: bool,
    #[serde(default = "one")]
    pub attn_temp: f64,
    /// None: denoise when the run's noise level is known (or `noise_std` is given).
    #[serde(default)]
    pub denoise: Option<bool>,
    #[serde(default)]
    pub noise_std: Option<f64>,
    #[serde(default)]
    pub noise: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<i64>>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default)]
    pub batch_size: Option<usize>,
}

fn default_method() -> String {
    "exact".into()
}
fn default_format() -> String {
    "png".into()
}
fn one() -> f64 {
    1.0
}

/// One score-based denoising step: `x <- x - sigma^2 * d/dx [sum over the batch of the per-sample
/// NLL]`, i.e. the gradient of the mean-reduced loss times N*C*H*W*sigma^2 (Tweedie's formula).
pub fn denoise(model: &TarFlow, x: &Tensor, labels: Option<&Tensor>, sigma: f64) -> Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let out = model.forward(xv.as_tensor(), labels)?;
    let loss = nll_loss(&out)?;
    let grads = loss.backward()?;
    let g = grads.get(xv.as_tensor()).context("no gradient reached the input")?;
    let lr = x.elem_count() as f64 * sigma * sigma;
    Ok((x - (g * lr)?)?)
}

/// Images in [-1, 1] -> u8 like torchvision's save_image: round((x+1)/2 * 255), clamped.
pub fn to_u8(v: f32) -> u8 {
    (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8
}

/// Write one (C, H, W) image as PNG (C = 1 or 3), values in [-1, 1].
fn image_buffer(chw: &[f32], c: usize, h: usize, w: usize) -> Result<image::DynamicImage> {
    Ok(match c {
        1 => image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w as u32, h as u32, chw.iter().map(|&v| to_u8(v)).collect()).unwrap(),
        ),
        3 => {
            let mut buf = Vec::with_capacity(h * w * 3);
            for p in 0..h * w {
                for ch in 0..3 {
                    buf.push(to_u8(chw[ch * h * w + p]));
                }
            }
            image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, buf).unwrap())
        }
        _ => bail!("PNG output needs 1 or 3 channels, the model makes {c}: use --format npy or npz"),
    })
}

fn save_png(img: &image::DynamicImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::io::atomic::write(path, &bytes)
}

/// A grid like torchvision's make_grid (nrow = ceil(sqrt(N)), 2-pixel black padding).
fn grid(images: &[f32], n: usize, c: usize, h: usize, w: usize) -> Result<image::DynamicImage> {
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (gh, gw) = (rows * (h + pad) + pad, cols * (w + pad) + pad);
    let mut g = vec![-1.0f32; c * gh * gw];
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    g[ch * gh * gw + (pad + r * (h + pad) + y) * gw + pad + col * (w + pad) + x] =
                        images[((i * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    image_buffer(&g, c, gh, gw)
}

/// Labels for N samples: the given list (cycled when shorter), else classes 0..K cycled.
fn make_labels(given: &Option<Vec<i64>>, n: usize, classes: usize) -> Result<Option<Vec<i64>>> {
    if classes == 0 {
        ensure!(given.is_none(), "this model is unconditional: --labels does not apply");
        return Ok(None);
    }
    let base: Vec<i64> = match given {
        Some(l) => {
            ensure!(!l.is_empty(), "--labels is empty");
            for &v in l {
                ensure!(v >= -1 && v < classes as i64, "label {v} is out of range: the model has {classes} classes (-1 = none)");
            }
            l.clone()
        }
        None => (0..classes as i64).collect(),
    };
    Ok(Some((0..n).map(|i| base[i % base.len()]).collect()))
}

pub fn sample(o: SampleOptions, ctx: &JobCtx) -> Result<Value> {
    match o.method.as_str() {
        "exact" => {}
        "reverse" => bail!(
            "--method reverse needs a distilled reverse model (biflow distill), which is not available yet; use --method exact"
        ),
        m => bail!("unknown sampling method '{m}': use exact or reverse"),
    }
    ensure!(matches!(o.format.as_str(), "png" | "npz" | "npy"), "unknown format '{}': use png, npz or npy", o.format);
    ensure!(o.guidance.is_finite() && o.guidance >= 0.0, "--guidance must be a number >= 0");
    let device = Device::Cpu;
    let run = crate::run::Run::open(Path::new(&o.model))?;
    let model = run.load_flow(&device)?;
    let cfg = model.config().clone();
    let (t, d) = (cfg.num_tokens(), cfg.token_dim());

    // The noise: given tokens, or drawn from a seeded host RNG.
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let (n, noise): (usize, Vec<f32>) = match &o.noise {
        Some(p) => {
            let a = read_npy(Path::new(p))?;
            ensure!(
                a.shape.len() == 3 && a.shape[1] == t && a.shape[2] == d,
                "--noise {p} has shape {:?}; this model needs N,{t},{d} tokens",
                a.shape
            );
            if let Some(num) = o.num {
                ensure!(num == a.shape[0], "--num {num} disagrees with the {} noise tokens in {p}", a.shape[0]);
            }
            (a.shape[0], a.to_f32())
        }
        None => {
            let n = o.num.or(o.labels.as_ref().map(|l| l.len())).unwrap_or(16);
            (n, (0..n * t * d).map(|_| StandardNormal.sample(&mut rng)).collect())
        }
    };
    ensure!(n > 0, "nothing to sample: --num must be at least 1");
    let labels = make_labels(&o.labels, n, cfg.num_classes)?;
    let sigma = o.noise_std.or(run.config.noise_std);
    let denoise_on = match o.denoise {
        Some(false) => false,
        Some(true) => {
            ensure!(sigma.is_some(), "denoising needs the training noise level: this run does not record one, give --noise-std");
            true
        }
        None => sigma.is_some(),
    };
    let opts = ReverseOptions { guidance: o.guidance, annealed: o.annealed, attn_temp: o.attn_temp };
    let bs = o.batch_size.unwrap_or(64).max(1);
    let steps_per_batch = cfg.num_blocks * (t - 1);
    let batches = n.div_ceil(bs);
    let total = (batches * steps_per_batch) as u64;
    ctx.start("decode", Some(total));
    let started = Instant::now();
    let mut images: Vec<f32> = Vec::with_capacity(n * cfg.image_dim());
    for bi in 0..batches {
        let lo = bi * bs;
        let m = bs.min(n - lo);
        let z = Tensor::from_vec(noise[lo * t * d..(lo + m) * t * d].to_vec(), (m, t, d), &device)?;
        let y = match &labels {
            Some(l) => Some(Tensor::from_vec(l[lo..lo + m].to_vec(), m, &device)?),
            None => None,
        };
        let mut x = model.reverse(&z, y.as_ref(), &opts, |done, _| {
            let all = (bi * steps_per_batch + done) as u64;
            if done % 8 == 0 || done == steps_per_batch {
                ctx.progress(all, Some(total), crate::metrics!["images" => lo]);
            }
            ctx.check_cancelled()
        })?;
        if denoise_on {
            x = denoise(&model, &x, y.as_ref(), sigma.unwrap())?;
        }
        images.extend(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    ctx.end();
    let secs = started.elapsed().as_secs_f64();
    ensure!(images.iter().all(|v| v.is_finite()), "sampling produced non-finite values (the model or the noise is broken)");

    let out = PathBuf::from(&o.out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (c, h) = (cfg.in_channels, cfg.img_size);
    let mut files = Vec::new();
    match o.format.as_str() {
        "png" => {
            let per = c * h * h;
            for i in 0..n {
                let p = out.join(format!("{i:06}.png"));
                save_png(&image_buffer(&images[i * per..(i + 1) * per], c, h, h)?, &p)?;
                files.push(p);
            }
            let p = out.join("grid.png");
            save_png(&grid(&images, n, c, h, h)?, &p)?;
            files.push(p);
        }
        "npz" => {
            let mut nhwc = Vec::with_capacity(images.len());
            for i in 0..n {
                for y in 0..h {
                    for x in 0..h {
                        for ch in 0..c {
                            nhwc.push(to_u8(images[((i * c + ch) * h + y) * h + x]));
                        }
                    }
                }
            }
            let arr = Array::from_u8(vec![n, h, h, c], nhwc)?;
            let p = out.join("samples.npz");
            match &labels {
                Some(l) => write_npz(&p, &[("arr_0", &arr), ("arr_1", &Array::from_i64(vec![n], l)?)])?,
                None => write_npz(&p, &[("arr_0", &arr)])?,
            }
            files.push(p);
        }
        _ => {
            let p = out.join("samples.npy");
            write_npy(&p, &Array::from_f32(vec![n, c, h, h], &images)?)?;
            files.push(p);
            if let Some(l) = &labels {
                let p = out.join("labels.npy");
                write_npy(&p, &Array::from_i64(vec![n], l)?)?;
                files.push(p);
            }
        }
    }
    Ok(json!({
        "out": out.display().to_string(),
        "method": "exact",
        "num": n,
        "format": o.format,
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "labels": labels,
        "denoised": denoise_on,
        "noiseStd": if denoise_on { sigma } else { None },
        "guidance": o.guidance,
        "seconds": secs,
        "imagesPerSecond": n as f64 / secs.max(1e-9),
    }))
}
