//! `biflow sample`: noise to images by either of the two inverses of F, and image output.
//!
//! `reverse`: BiFlow's learned reverse model G, one network evaluation (distilled runs).
//! `exact`: F's exact inverse, causal decoding in B*(T-1) sequential steps (any run).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

use crate::models::flow::{ReverseOptions, TarFlow};
use crate::models::reverse::ReverseModel;
use crate::models::vae::Vae;
use crate::io::npy::{read_npy, write_npy, write_npz, Array};
use crate::io::atomic::ensure_empty_out;
use crate::io::image::{grid, image_buffer, to_u8};
use crate::jobs::options::DeviceArgs;
use crate::job::JobCtx;
use crate::models::flow::denoise;

crate::options! {
    pub struct SampleOptions {
        /// the run folder (distilled, trained or imported)
        model: String,
        /// output folder
        out: String,
        /// number of images (default 16, or the number of --noise tokens)
        num: Option<usize>,
        /// reverse: the distilled 1-NFE model G; exact: causal decoding of the forward flow
        method: String ["reverse for a distilled run, else exact"] {"reverse", "exact"} = "auto",
        /// classifier-free guidance weight w (0 = off)
        guidance: f64 = 0,
        /// exact: anneal the guidance weight as w*(i+1)/(T-1) over the tokens
        annealed: bool,
        /// exact: attention temperature of the guiding pass (guidance for unconditional models)
        attn_temp: f64 = 1,
        /// score: apply F's score-based denoising step; none: do not; auto: score where nothing
        /// learned denoises (exact, or G distilled with --denoise none) and the noise level is known
        denoise: String {"auto", "score", "none"} = "auto",
        /// training noise level sigma for denoising (default: from the run)
        noise_std: Option<f64>,
        /// decode these noise tokens (.npy, float32 N,T,D) instead of drawing them
        noise: Option<String>,
        /// scale of the drawn noise, z ~ N(0, T^2): below 1 (e.g. 0.7) trades diversity for cleaner
        /// samples
        temperature: f64 = 1,
        /// class labels, comma separated (cycled over the images; -1 = no class)
        labels: Option<Vec<i64>>,
        /// random seed for the noise
        seed: u64 = 0,
        /// png: one file per image plus grid.png; npz: uint8 N,H,W,C under arr_0; npy: float32 N,C,H,W; latent (a latent run): the latents, float32 N,C,h,w in latents.npy, not decoded
        format: String {"png", "npz", "npy", "latent"} = "png",
        /// a latent run's VAE folder, which decodes its samples (default: where the run records it; checked by checksum)
        vae: Option<String>,
        /// images decoded at once
        batch_size: NonZeroUsize = 64,
        /// write into --out even when it already holds files (same-named files are replaced)
        force: bool,
    }
}

impl SampleOptions {
    /// Defaults for sampling `num` images from the run `model` (no output folder: a streaming consumer).
    pub fn streaming(model: &str, method: Option<String>, num: usize, seed: u64, guidance: f64) -> SampleOptions {
        let d = SampleOptions::default();
        SampleOptions { model: model.to_string(), num: Some(num), method: method.unwrap_or(d.method.clone()), seed, guidance, ..d }
    }
}

/// How noise becomes tokens.
enum Method {
    /// Causal decoding of F with these settings.
    Exact(ReverseOptions),
    /// One evaluation of G at guidance scale w.
    Reverse(ReverseModel, f64),
}

/// Samples of a run, batch by batch: noise (seeded, or given tokens) -> G or causal decoding ->
/// optional score-based denoising. `biflow sample` keeps them; `eval-fid` on a run scores and drops
/// each batch.
pub struct Sampler {
    model: TarFlow,
    method: Method,
    /// A latent run's VAE: samples are its decodings (None: pixels, or latents kept as they are).
    decoder: Option<Vae>,
    /// The noise level of the denoising step; None = no denoising.
    pub sigma: Option<f64>,
    labels: Option<Vec<i64>>,
    given_noise: Option<Vec<f32>>,
    temperature: f32,
    rng: rand::rngs::StdRng,
    n: usize,
    done: usize,
}

impl Sampler {
    /// A sampler on `device` (the caller's placement).
    pub fn new(o: &SampleOptions, device: &Device) -> Result<Sampler> {
        ensure!(o.guidance.is_finite() && o.guidance >= 0.0, "--guidance must be a number >= 0");
        ensure!(o.temperature.is_finite() && o.temperature > 0.0, "--temperature must be a number > 0, got {}", o.temperature);
        ensure!(o.temperature == 1.0 || o.noise.is_none(), "--temperature scales drawn noise; scale the tokens of --noise yourself");
        let run = crate::run::Run::open(Path::new(&o.model))?;
        let reverse = match o.method.as_str() {
            "auto" => run.is_distilled(),
            "exact" => false,
            "reverse" => {
                ensure!(
                    run.is_distilled(),
                    "--method reverse needs a distilled run: {} is a forward run (make one with `biflow distill --forward {}`), or use --method exact",
                    o.model,
                    o.model
                );
                true
            }
            m => bail!("unknown sampling method '{m}': use reverse or exact"),
        };
        let model = run.load_flow(device)?;
        let decoder = match o.format.as_str() {
            "latent" => {
                ensure!(run.config.latent.is_some(), "--format latent keeps a latent run's latents; {} is a run on pixels", o.model);
                None
            }
            _ => run.load_vae(o.vae.as_deref().map(Path::new), "give its folder with --vae DIR, or keep the latents with --format latent", device)?,
        };
        let cfg = model.config().clone();
        let (t, d) = (cfg.num_tokens(), cfg.token_dim());
        let (n, given_noise) = match &o.noise {
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
                (a.shape[0], Some(a.to_f32()))
            }
            None => (o.num.or(o.labels.as_ref().map(|l| l.len())).unwrap_or(16), None),
        };
        ensure!(n > 0, "nothing to sample: --num must be at least 1");
        let labels = make_labels(&o.labels, n, cfg.num_classes)?;
        let method = if reverse {
            let g = run.load_reverse(device)?;
            ensure!(o.guidance == 0.0 || g.config().guided(), "--guidance needs a class-conditional model; this one is unconditional");
            ensure!(!o.annealed && o.attn_temp == 1.0, "--annealed and --attn-temp apply to --method exact only (G takes the guidance scale as an input)");
            Method::Reverse(g, o.guidance)
        } else {
            Method::Exact(ReverseOptions { guidance: o.guidance, annealed: o.annealed, attn_temp: o.attn_temp })
        };
        // The score step is on by default where nothing learned denoises: exact sampling, and a G
        // distilled with --denoise none.
        let learned = matches!(&method, Method::Reverse(g, _) if g.config().denoise_layers > 0);
        let run_sigma = o.noise_std.or(run.config.noise_std);
        let sigma = match o.denoise.as_str() {
            "none" => None,
            "score" => Some(run_sigma.context(
                "denoising needs the training noise level: this run does not record one, give --noise-std",
            )?),
            "auto" if learned => None,
            "auto" => run_sigma,
            other => bail!("unknown --denoise '{other}': use auto, score or none"),
        };
        Ok(Sampler {
            model,
            method,
            decoder,
            sigma,
            labels,
            given_noise,
            temperature: o.temperature as f32,
            rng: rand::rngs::StdRng::seed_from_u64(o.seed),
            n,
            done: 0,
        })
    }

    pub fn config(&self) -> &crate::models::flow::FlowConfig {
        self.model.config()
    }
    /// The shape (C, H, W) of what [`Self::next_batch`] gives: images, or a latent run's latents
    /// with `--format latent`.
    pub fn output_shape(&self) -> (usize, usize, usize) {
        let cfg = self.model.config();
        match &self.decoder {
            Some(vae) => {
                let (v, f) = (vae.config(), vae.config().downsampling());
                (v.out_channels, cfg.img_size * f, cfg.img_size * f)
            }
            None => (cfg.in_channels, cfg.img_size, cfg.img_size),
        }
    }
    /// The number of images this sampler makes.
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }
    pub fn denoises(&self) -> bool {
        self.sigma.is_some()
    }
    /// "reverse" or "exact".
    pub fn method(&self) -> &'static str {
        match self.method {
            Method::Exact(_) => "exact",
            Method::Reverse(..) => "reverse",
        }
    }
    /// Sequential network steps per batch: B*(T-1) for causal decoding, 1 for G.
    pub fn steps_per_batch(&self) -> usize {
        let cfg = self.model.config();
        match self.method {
            Method::Exact(_) => cfg.num_blocks * (cfg.num_tokens() - 1),
            Method::Reverse(..) => 1,
        }
    }

    /// The next at most `max` images (N,C,H,W f32, about [-1,1]; a latent run's decoded by its VAE),
    /// or None when all are made.
    /// `on_step(k)` is called after each of the [`Self::steps_per_batch`] steps; its error stops the batch.
    pub fn next_batch(&mut self, max: usize, on_step: impl FnMut(usize) -> Result<()>) -> Result<Option<Tensor>> {
        if self.done >= self.n {
            return Ok(None);
        }
        let cfg = self.model.config();
        let (t, d) = (cfg.num_tokens(), cfg.token_dim());
        let (lo, m) = (self.done, max.max(1).min(self.n - self.done));
        // Drawing batch by batch from one RNG gives the same noise as drawing all of it at once.
        let noise: Vec<f32> = match &self.given_noise {
            Some(all) => all[lo * t * d..(lo + m) * t * d].to_vec(),
            None => (0..m * t * d).map(|_| self.temperature * Distribution::<f32>::sample(&StandardNormal, &mut self.rng)).collect(),
        };
        let device = self.model.device();
        let z = Tensor::from_vec(noise, (m, t, d), device)?;
        let y = match &self.labels {
            Some(l) => Some(Tensor::from_vec(l[lo..lo + m].to_vec(), m, device)?),
            None => None,
        };
        let mut on_step = on_step;
        let mut x = match &self.method {
            Method::Exact(opts) => self.model.reverse(&z, y.as_ref(), opts, |k, _| on_step(k))?,
            Method::Reverse(g, w) => {
                let w = g.config().guided().then(|| vec![*w as f32; m]);
                let x = self.model.unpatchify(&g.sample(&z, y.as_ref(), w.as_deref())?)?;
                on_step(1)?;
                x
            }
        };
        if let Some(sigma) = self.sigma {
            x = denoise(&self.model, &x, y.as_ref(), sigma)?;
        }
        if let Some(vae) = &self.decoder {
            x = vae.images(&x)?;
        }
        let x = x.to_dtype(DType::F32)?;
        ensure!(
            x.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()),
            "sampling produced non-finite values: the model's inverse diverged (an undertrained model without --clip-scale can do this)"
        );
        self.done += m;
        Ok(Some(x))
    }
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

pub fn sample(o: SampleOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    ensure!(matches!(o.format.as_str(), "png" | "npz" | "npy" | "latent"), "unknown format '{}': use png, npz, npy or latent", o.format);
    let out = PathBuf::from(&o.out);
    let on = on.place()?;
    ensure_empty_out(&out, o.force)?;
    let mut sampler = Sampler::new(&o, &on.device)?;
    let (c, h, w) = sampler.output_shape();
    let (n, labels, denoise_on, sigma) = (sampler.len(), sampler.labels().map(<[i64]>::to_vec), sampler.denoises(), sampler.sigma);
    let bs = o.batch_size.get();
    let steps_per_batch = sampler.steps_per_batch();
    let total = (n.div_ceil(bs) * steps_per_batch) as u64;
    ctx.start(if sampler.method() == "exact" { "decode" } else { "sample" }, Some(total));
    let started = Instant::now();
    let mut images: Vec<f32> = Vec::with_capacity(n * c * h * w);
    let mut batch_index = 0;
    while let Some(x) = sampler.next_batch(bs, |done| {
        let all = (batch_index * steps_per_batch + done) as u64;
        if done % 8 == 0 || done == steps_per_batch {
            ctx.progress(all, Some(total), crate::metrics!["images" => batch_index * bs]);
        }
        ctx.check_cancelled()
    })? {
        images.extend(x.flatten_all()?.to_vec1::<f32>()?);
        batch_index += 1;
    }
    ctx.end();
    let secs = started.elapsed().as_secs_f64();

    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    match o.format.as_str() {
        "png" => {
            let per = c * h * w;
            for i in 0..n {
                let p = out.join(format!("{i:06}.png"));
                crate::io::atomic::write_png(&p, &image_buffer(&images[i * per..(i + 1) * per], c, h, w)?)?;
                files.push(p);
            }
            let p = out.join("grid.png");
            crate::io::atomic::write_png(&p, &grid(&images, n, c, h, w)?)?;
            files.push(p);
        }
        "npz" => {
            let mut nhwc = Vec::with_capacity(images.len());
            for i in 0..n {
                for y in 0..h {
                    for x in 0..w {
                        for ch in 0..c {
                            nhwc.push(to_u8(images[((i * c + ch) * h + y) * w + x]));
                        }
                    }
                }
            }
            let arr = Array::from_u8(vec![n, h, w, c], nhwc)?;
            let p = out.join("samples.npz");
            match &labels {
                Some(l) => write_npz(&p, &[("arr_0", &arr), ("arr_1", &Array::from_i64(vec![n], l)?)])?,
                None => write_npz(&p, &[("arr_0", &arr)])?,
            }
            files.push(p);
        }
        format => {
            let p = out.join(if format == "latent" { "latents.npy" } else { "samples.npy" });
            write_npy(&p, &Array::from_f32(vec![n, c, h, w], &images)?)?;
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
        "method": sampler.method(),
        "num": n,
        "format": o.format,
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "labels": labels,
        "denoised": denoise_on,
        "noiseStd": if denoise_on { sigma } else { None },
        "guidance": o.guidance,
        "samplingSeconds": secs,
        "imagesPerSecond": n as f64 / secs.max(1e-9),
    }))
}
