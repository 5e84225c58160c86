//! `biflow edit`: noise-space editing with a distilled run (paper eq. 6), cheap only because both
//! directions are single passes: `z = F(x~)`, change z or the label, `x' = G(z')`.
//!
//! - inpainting: `z' = M * z + (1 - M) * eps`, M = 1 where the mask is black (kept), 0 where white;
//! - class editing: the same z under another label.
//!
//! A latent run edits the image's VAE latents (the mask taken down to the latent grid) and decodes
//! the results.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

use crate::eval::reverse::Pair;
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::run::Run;
use crate::io::atomic::ensure_empty_out;
use crate::io::image::{grid, image_buffer};

crate::options! {
    pub struct EditOptions {
        /// the distilled run (biflow distill)
        model: String,
        /// the image to edit (PNG/JPEG/WebP, the model's size)
        image: String,
        /// output folder
        out: String,
        /// inpainting mask, same size: black = keep, white = redraw
        mask: Option<String>,
        /// class editing: decode the same noise under this class
        to_class: Option<i64>,
        /// the class of --image (default: none, the mean class embedding)
        label: Option<i64>,
        /// number of variants
        num: NonZeroUsize = 4,
        /// seed of the noise
        seed: u64 = 0,
        /// write into --out even when it already holds files
        force: bool,
        /// a latent run's VAE folder (default: where the run records it): it encodes --image and decodes the edits
        vae: Option<String>,
    }
}

/// An image file as (C, H, W) values in [-1, 1], which must be `side` pixels square. `what` names it.
fn read_image(path: &str, c: usize, side: usize, what: &str) -> Result<Vec<f32>> {
    let img = crate::data::decode_file(Path::new(path))?;
    let n = side as u32;
    ensure!(
        img.width() == n && img.height() == n,
        "{what} {path} is {}x{}; this model works on {n}x{n} images",
        img.width(),
        img.height()
    );
    let hw = side * side;
    let hwc: Vec<u8> = match c {
        1 => img.to_luma8().into_raw(),
        3 => img.to_rgb8().into_raw(),
        _ => bail!("edit reads PNG/JPEG images, which cannot hold this model's {c} channels"),
    };
    let mut chw = vec![0f32; c * hw];
    for p in 0..hw {
        for ch in 0..c {
            chw[ch * hw + p] = hwc[p * c + ch] as f32 / 127.5 - 1.0;
        }
    }
    Ok(chw)
}

pub fn edit(o: EditOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let on = on.place()?;
    let device = on.device.clone();
    let run = Run::open(Path::new(&o.model))?;
    ensure!(run.is_distilled(), "{} is a forward run; edit needs a distilled run (biflow distill)", o.model);
    let out = PathBuf::from(&o.out);
    ensure_empty_out(&out, o.force)?;
    let flow = run.load_flow(&device)?;
    let g = run.load_reverse(&device)?;
    let cfg = flow.config().clone();
    // A latent run edits latents: the image is encoded, the edits decoded, by the run's VAE.
    let vae = run.load_vae(o.vae.as_deref().map(Path::new), "give its folder with --vae DIR", &device)?;
    let f = vae.as_ref().map_or(1, |v| v.config().downsampling());
    let (ic, side) = (vae.as_ref().map_or(cfg.in_channels, |v| v.config().in_channels), cfg.img_size * f);
    let sigma = run.config.noise_std.unwrap_or(0.0);
    let pair = Pair { flow: &flow, g: &g, sigma };
    let k = cfg.num_classes as i64;
    let check_label = |l: i64, flag: &str| -> Result<()> {
        ensure!(k > 0, "{flag} needs a class-conditional model; this one is unconditional");
        ensure!((-1..k).contains(&l), "{flag} {l} is out of range: the model has {k} classes (-1 = none)");
        Ok(())
    };
    if let Some(l) = o.label {
        check_label(l, "--label")?;
    }
    let image = read_image(&o.image, ic, side, "--image")?;
    let x = match &vae {
        Some(v) => v.latents(&Tensor::from_vec(image.clone(), (1, ic, side, side), &device)?, None)?.flatten_all()?.to_vec1()?,
        None => image.clone(),
    };
    let keep = match (&o.mask, o.to_class) {
        (Some(_), Some(_)) => bail!("give --mask (inpainting) or --to-class (class editing), not both"),
        (None, None) => bail!("say what to edit: --mask MASK.png (inpaint its white region) or --to-class K"),
        (Some(m), None) => {
            // Black (< 50%) = known, kept; white = redrawn. The mask's channels are averaged; a
            // latent is kept where most of the f x f pixels it covers are.
            let mask = read_image(m, 1, side, "--mask")?;
            let s = cfg.img_size;
            let kept: Vec<f32> = (0..s * s)
                .map(|p| {
                    let (y, x) = (p / s, p % s);
                    let black = (0..f * f).filter(|q| mask[(y * f + q / f) * side + x * f + q % f] < 0.0).count();
                    if 2 * black > f * f { 1.0 } else { 0.0 }
                })
                .collect();
            Some(kept.repeat(cfg.in_channels))
        }
        (None, Some(c)) => {
            check_label(c, "--to-class")?;
            None
        }
    };
    let n = o.num.get();
    let shape = (n, cfg.in_channels, cfg.img_size, cfg.img_size);
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut draw = |count: usize| -> Vec<f32> { (0..count).map(|_| StandardNormal.sample(&mut rng)).collect() };
    ctx.start("edit", Some(1));
    // x~ = x + sigma eps, one noise draw per variant.
    let xs = Tensor::from_vec(x.repeat(n), shape, &device)?;
    let noisy = (&xs + (Tensor::from_vec(draw(xs.elem_count()), shape, &device)? * sigma)?)?;
    let source = (k > 0).then(|| Tensor::from_vec(vec![o.label.unwrap_or(-1); n], n, &device)).transpose()?;
    let z = flow.forward(&noisy, source.as_ref())?.z;
    let (z, target) = match &keep {
        Some(m) => {
            let m = flow.patchify(&Tensor::from_vec(m.repeat(n), shape, &device)?)?;
            let eps = Tensor::from_vec(draw(z.elem_count()), z.dims(), &device)?;
            ((z.mul(&m)? + eps.mul(&(1.0 - &m)?)?)?, source)
        }
        None => (z, Some(Tensor::from_vec(vec![o.to_class.unwrap(); n], n, &device)?)),
    };
    let edited = pair.generate(&z, target.as_ref())?;
    let edited = match &vae {
        Some(v) => v.images(&edited)?,
        None => edited,
    };
    ctx.progress(1, Some(1), serde_json::Map::new());
    ctx.end();

    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (c, h) = (ic, side);
    let per = c * h * h;
    let images: Vec<f32> = edited.flatten_all()?.to_vec1()?;
    let mut files = Vec::new();
    let input = out.join("input.png");
    crate::io::atomic::write_png(&input, &image_buffer(&image, c, h, h)?)?;
    files.push(input);
    for i in 0..n {
        let p = out.join(format!("edit-{i:03}.png"));
        crate::io::atomic::write_png(&p, &image_buffer(&images[i * per..(i + 1) * per], c, h, h)?)?;
        files.push(p);
    }
    // The grid: the input first, then the variants.
    let all: Vec<f32> = image.iter().chain(images.iter()).copied().collect();
    let p = out.join("grid.png");
    crate::io::atomic::write_png(&p, &grid(&all, n + 1, c, h, h)?)?;
    files.push(p);
    Ok(json!({
        "out": out.display().to_string(),
        "kind": if keep.is_some() { "inpaint" } else { "class" },
        "num": n,
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    }))
}
