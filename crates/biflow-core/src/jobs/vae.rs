//! The `vae.encode` and `vae.decode` jobs: images to the latents training sees, `(mean - shift) *
//! scaling` (or a posterior draw instead of the mean), and latents back to images, through a VAE
//! folder ([`crate::models::vae`]). A user checks the round trip with them, or brings latents made by
//! other tools.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

use crate::eval::fid::source::{images_tensor, open_images};
use crate::io::atomic::{ensure_empty_out, write_png};
use crate::io::image::{grid, image_buffer};
use crate::io::npy::{read_npy, write_npy, Array};
use crate::job::JobCtx;
use crate::jobs::options::DeviceArgs;
use crate::models::vae::Vae;

crate::options! {
    pub struct VaeEncodeOptions {
        /// the images: an image file (PNG, JPEG, ...), a folder of images (one size), or an .npz array
        input: String,
        /// the VAE: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, as stabilityai/sd-vae-ft-ema)
        vae: String,
        /// the latents file to write (.npy, float32, N x L x H/f x W/f): (mean - shift) * scaling, the latents as training sees them
        out: String,
        /// draw the latents from the posterior (mean + exp(logvar / 2) * noise) instead of taking its mean
        sample: bool,
        /// seed of the posterior draws (--sample)
        seed: u64 = 0,
        /// images per batch
        batch_size: NonZeroUsize = 8,
        /// overwrite --out if it exists
        force: bool,
    }
}

crate::options! {
    pub struct VaeDecodeOptions {
        /// the latents (.npy, N x L x h x w) as training sees them, (z - shift) * scaling, as `vae encode` writes them
        latents: String,
        /// the VAE: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)
        vae: String,
        /// the folder to write the images into
        out: String,
        /// png: one file per image and grid.png; npy: images.npy (N x C x H x W, float32 in [-1, 1])
        format: String {"png", "npy"} = "png",
        /// latents per batch
        batch_size: NonZeroUsize = 8,
        /// write into a folder that is not empty
        force: bool,
    }
}

/// Refuse to overwrite a file unless asked.
fn check_out_file(out: &Path, force: bool) -> Result<()> {
    ensure!(force || !out.exists(), "{} exists: choose another --out, or add --force to overwrite it", out.display());
    ensure!(!out.is_dir(), "--out {} is a folder: give the .npy file to write", out.display());
    Ok(())
}

pub fn encode(o: VaeEncodeOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let out = PathBuf::from(&o.out);
    check_out_file(&out, o.force)?;
    let device = on.place()?.device;
    let vae = Vae::load(Path::new(&o.vae), &device)?;
    let (mut source, names) = open_images(&o.input)?;
    let total = names.len();
    ensure!(total > 0, "{} holds no images", o.input);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    ctx.start("encode", Some(total as u64));
    let f = vae.config().downsampling();
    let (mut latents, mut shape, mut size, mut done) = (Vec::new(), Vec::new(), None, 0);
    while let Some(images) = source.next_batch(o.batch_size.get())? {
        ctx.check_cancelled()?;
        for (k, im) in images.iter().enumerate() {
            let first = *size.get_or_insert((im.h, im.w));
            ensure!((im.h, im.w) == first, "the images must share one size to make one latent array: {} is {}x{}, {} is {}x{}", names[0], first.0, first.1, names[done + k], im.h, im.w);
        }
        let x = images_tensor(&images, &device)?;
        let (_, _, h, w) = x.dims4()?;
        let noise = o.sample.then(|| standard_normal((images.len(), vae.config().latent_channels, h / f, w / f), &mut rng, &device)).transpose()?;
        let l = vae.latents(&x, noise.as_ref()).with_context(|| format!("encoding {}", names[done]))?;
        shape = l.dims().to_vec();
        latents.extend(l.flatten_all()?.to_vec1::<f32>()?);
        done += images.len();
        ctx.progress(done as u64, Some(total as u64), serde_json::Map::new());
    }
    ctx.end();
    ensure!(done == total, "read {done} images of {total}");
    shape[0] = total;
    write_npy(&out, &Array::from_f32(shape.clone(), &latents)?)?;
    let cfg = vae.config();
    Ok(json!({"out": o.out, "shape": shape, "scaling": cfg.scaling_factor, "shift": cfg.shift(), "posterior": if o.sample { "sample" } else { "mean" }}))
}

/// A standard normal draw of `shape`.
fn standard_normal(shape: (usize, usize, usize, usize), rng: &mut rand_chacha::ChaCha8Rng, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1 * shape.2 * shape.3).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

pub fn decode(o: VaeDecodeOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    ensure!(matches!(o.format.as_str(), "png" | "npy"), "unknown --format '{}': use png or npy", o.format);
    let out = PathBuf::from(&o.out);
    ensure_empty_out(&out, o.force)?;
    let device = on.place()?.device;
    let array = read_npy(Path::new(&o.latents))?;
    let vae = Vae::load(Path::new(&o.vae), &device)?;
    let l = vae.config().latent_channels;
    ensure!(
        array.shape.len() == 4 && array.shape[1] == l && array.shape[0] > 0,
        "{} holds an array of shape {:?}: this VAE decodes latents N x {l} x h x w",
        o.latents,
        array.shape
    );
    let (n, h, w) = (array.shape[0], array.shape[2], array.shape[3]);
    let values = array.to_f32();
    ensure!(values.iter().all(|v| v.is_finite()), "{} holds values that are not finite", o.latents);
    let per = l * h * w;
    ctx.start("decode", Some(n as u64));
    let mut images: Vec<f32> = Vec::new();
    let mut image_shape = Vec::new();
    for start in (0..n).step_by(o.batch_size.get()) {
        ctx.check_cancelled()?;
        let k = o.batch_size.get().min(n - start);
        let z = Tensor::from_slice(&values[start * per..(start + k) * per], (k, l, h, w), &device)?;
        let x = vae.images(&z)?.clamp(-1f32, 1f32)?;
        image_shape = x.dims()[1..].to_vec();
        images.extend(x.flatten_all()?.to_vec1::<f32>()?);
        ctx.progress((start + k) as u64, Some(n as u64), serde_json::Map::new());
    }
    ctx.end();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (c, ih, iw) = (image_shape[0], image_shape[1], image_shape[2]);
    let mut files = Vec::new();
    if o.format == "png" {
        let size = c * ih * iw;
        for i in 0..n {
            let p = out.join(format!("{i:06}.png"));
            write_png(&p, &image_buffer(&images[i * size..(i + 1) * size], c, ih, iw)?)?;
            files.push(p);
        }
        let p = out.join("grid.png");
        write_png(&p, &grid(&images[..n.min(64) * size], n.min(64), c, ih, iw)?)?;
        files.push(p);
    } else {
        let p = out.join("images.npy");
        write_npy(&p, &Array::from_f32(vec![n, c, ih, iw], &images)?)?;
        files.push(p);
    }
    Ok(json!({"out": o.out, "num": n, "shape": [n, c, ih, iw], "format": o.format, "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vae").join(name)
    }

    /// Images -> latents -> images through the jobs: shapes, the training scaling, posterior draws
    /// that differ from the mean, and nothing overwritten unasked.
    #[test]
    fn encodes_and_decodes_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        for i in 0..3u8 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 40 * i]));
            img.save(images.join(format!("{i}.png"))).unwrap();
        }
        let vae = fixture("tiny-random").display().to_string();
        let on = DeviceArgs::default();
        let lat = dir.path().join("lat.npy");
        let enc = |out: &Path, sample: bool, force: bool| {
            let o = VaeEncodeOptions { input: images.display().to_string(), vae: vae.clone(), out: out.display().to_string(), sample, seed: 0, batch_size: NonZeroUsize::new(2).unwrap(), force };
            encode(o, &on, &JobCtx::silent())
        };
        let r = enc(&lat, false, false).unwrap();
        assert_eq!(r["shape"], json!([3, 4, 8, 8]));
        let mean = read_npy(&lat).unwrap().to_f32();
        let e = format!("{:#}", enc(&lat, false, false).unwrap_err());
        assert!(e.contains("--force"), "{e}");
        enc(&lat, true, true).unwrap();
        let drawn = read_npy(&lat).unwrap().to_f32();
        assert!(mean.iter().zip(&drawn).any(|(a, b)| (a - b).abs() > 1e-3), "a posterior draw equals the mean");
        let out = dir.path().join("decoded");
        let dec = |format: &str| {
            let o = VaeDecodeOptions { latents: lat.display().to_string(), vae: vae.clone(), out: out.display().to_string(), format: format.into(), batch_size: NonZeroUsize::new(2).unwrap(), force: true };
            decode(o, &on, &JobCtx::silent())
        };
        let r = dec("png").unwrap();
        assert_eq!(r["shape"], json!([3, 3, 16, 16]));
        assert!(out.join("000002.png").is_file() && out.join("grid.png").is_file());
        dec("npy").unwrap();
        assert_eq!(read_npy(&out.join("images.npy")).unwrap().shape, vec![3, 3, 16, 16]);
        let wrong = dir.path().join("wrong.npy");
        write_npy(&wrong, &Array::from_f32(vec![1, 3, 8, 8], &[0.0; 192]).unwrap()).unwrap();
        let o = VaeDecodeOptions { latents: wrong.display().to_string(), vae, out: dir.path().join("w").display().to_string(), format: "png".into(), batch_size: NonZeroUsize::new(2).unwrap(), force: false };
        let e = format!("{:#}", decode(o, &on, &JobCtx::silent()).unwrap_err());
        assert!(e.contains("N x 4 x h x w"), "{e}");
    }
}
