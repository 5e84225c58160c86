//! The `data.prepare` job: any input kind -> a dataset folder of shards (see the module docs of
//! `data`). The dataset is built in a staging folder next to DIR and renamed into place only when
//! complete, so a failure or Ctrl-C leaves DIR as it was (or absent).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use image::DynamicImage;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::decode::{self, Item, Label, Source};
use super::rng::splitmix64;
use super::resize;
use super::shard::{default_records_per_shard, ShardWriter};
use super::{staging_path, Checksum, MANIFEST, ClassInfo, Manifest, SkippedFile, SourceInfo, SplitInfo, Splits, FORMAT_NAME, FORMAT_VERSION};
use crate::job::JobCtx;
use crate::jobs::options::DeviceArgs;
use crate::models::vae::Vae;

crate::options! {
    pub struct PrepareOptions {
        /// image folder, .tar/.tar.gz/.tgz, .npz, MNIST idx folder, or builtin:mnist
        input: String,
        /// the dataset folder to create
        out: String,
        /// the input kind, when detection is not wanted
        format: Option<String> {"folder", "tar", "npz", "idx"},
        /// how the manifest names the source (`builtin:mnist`); the input path when absent
        source_name: Option<String>,
        /// resize the shorter side to N, then center crop to N x N
        size: Option<usize>,
        /// output channels, 1 (grey) or 3 (RGB); default: as the input
        channels: Option<usize> {1, 3},
        /// use only the first N images of the input
        limit: Option<usize>,
        /// fraction of images held out as the val split, chosen from --seed
        val_fraction: f64 = 0,
        /// seed of the val split choice
        seed: u64 = 0,
        /// replace DIR if it exists (only once the new dataset is complete)
        force: bool,
        /// leave out unreadable images (listed in the manifest) instead of stopping
        skip_bad: bool,
        /// records per shard file (default: about 256 MiB of records)
        records_per_shard: Option<usize>,
        /// a VAE folder (diffusers AutoencoderKL, as stabilityai/sd-vae-ft-ema): store each image's latents, (mean - shift) * scaling as float16, instead of its pixels; needs --size, a multiple of the VAE's downsampling (8 for the SD VAEs)
        vae: Option<String>,
        /// images per batch through the VAE (--vae)
        vae_batch_size: std::num::NonZeroUsize = 8,
        /// with --vae: also store each image's horizontal mirror (its latents follow it), as DiT's pipeline does; the val split keeps both of its images
        flip: bool,
    }
}


pub const SPLIT_METHOD: &str =
    "val = round(count * valFraction) records (at least 1 when valFraction > 0) drawn without replacement by Floyd's algorithm from a splitmix64 stream seeded with `seed`; the rest is train";

/// The sorted validation record indices: `round(n * fraction)` of `0..n`, chosen from `seed`.
pub fn choose_val(n: usize, fraction: f64, seed: u64) -> Vec<u32> {
    if fraction <= 0.0 || n < 2 {
        return Vec::new();
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut state = seed;
    let mut next = |bound: u64| {
        state = splitmix64(state);
        // multiply-shift: unbiased enough for any dataset size and portable
        ((state as u128 * bound as u128) >> 64) as u64
    };
    let mut chosen = std::collections::HashSet::with_capacity(k);
    for j in (n - k)..n {
        let t = next(j as u64 + 1) as usize;
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u32> = chosen.into_iter().map(|x| x as u32).collect();
    v.sort_unstable();
    v
}

enum ItemError {
    /// Unreadable or undecodable input: skipped under --skip-bad.
    Bad(anyhow::Error),
    /// Anything else stops the run.
    Fatal(anyhow::Error),
}

#[derive(Clone, Copy)]
struct Target {
    channels: usize,
    /// --channels was given (otherwise the first image decided, and a colour image after a grey
    /// first one is an error rather than a silent conversion to grey).
    explicit_channels: bool,
    height: usize,
    width: usize,
    first: (usize, usize),
}

/// Resize (with --size), convert channels, and lay out as C,H,W.
fn process(img: DynamicImage, item: &Item, target: &Target, size: Option<usize>, first_name: &str) -> Result<Vec<u8>, ItemError> {
    if !target.explicit_channels && target.channels == 1 && img.color().channel_count() >= 3 {
        return Err(ItemError::Fatal(anyhow::anyhow!(
            "{} is a colour image but the first image, {first_name}, is grey; pass --channels 3 to keep colour or --channels 1 to convert everything to grey",
            item.name
        )));
    }
    let img = match size {
        Some(n) => resize::resize_center_crop(img, n as u32),
        None => {
            let (w, h) = (img.width() as usize, img.height() as usize);
            if (w, h) != (target.width, target.height) {
                return Err(ItemError::Fatal(anyhow::anyhow!(
                    "images have different sizes: {first_name} is {}x{} but {} is {w}x{h}; pass --size N to resize them all to N x N",
                    target.first.0,
                    target.first.1,
                    item.name
                )));
            }
            img
        }
    };
    let (h, w) = (img.height() as usize, img.width() as usize);
    Ok(if target.channels == 1 {
        img.into_luma8().into_raw()
    } else {
        let hwc = img.into_rgb8().into_raw();
        let mut chw = vec![0u8; hwc.len()];
        let plane = h * w;
        for i in 0..plane {
            chw[i] = hwc[3 * i];
            chw[plane + i] = hwc[3 * i + 1];
            chw[2 * plane + i] = hwc[3 * i + 2];
        }
        chw
    })
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(false)
}

/// `Ok(true)` when `out` exists and will be replaced.
fn check_out(out: &Path, force: bool) -> Result<bool> {
    match std::fs::symlink_metadata(out) {
        Err(_) => Ok(false),
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a folder; choose another --out", out.display()),
        Ok(_) if dir_is_empty(out) => Ok(true),
        Ok(_) if force => Ok(true),
        Ok(_) => bail!("{} already exists; pass --force to replace it", out.display()),
    }
}

pub fn prepare(o: PrepareOptions, on: &DeviceArgs, ctx: &JobCtx) -> Result<Value> {
    let started = Instant::now();
    // The VAE is loaded (and checked) before any work, on the device asked for.
    ensure!(!o.flip || o.vae.is_some(), "--flip adds mirrored copies to a latent dataset: it needs --vae");
    let vae = match &o.vae {
        Some(dir) => {
            let size = o.size.context("--vae needs --size: latents are made from images of one square size")?;
            let device = on.place()?.device;
            let vae = Vae::load(Path::new(dir), &device)?;
            let sha = Vae::weights_sha256(Path::new(dir))?;
            let f = vae.config().downsampling();
            ensure!(size % f == 0, "--size {size} is not a multiple of the VAE's downsampling {f}: the latents would not cover the image (try {})", (size / f).max(1) * f);
            ensure!(o.channels.is_none_or(|c| c == vae.config().in_channels), "--channels {} does not fit the VAE, which encodes {}-channel images", o.channels.unwrap_or(0), vae.config().in_channels);
            Some((vae, device, sha))
        }
        None => None,
    };
    if let Some(c) = o.channels {
        ensure!(c == 1 || c == 3, "--channels must be 1 or 3 (got {c})");
    }
    if let Some(s) = o.size {
        ensure!((1..=8192).contains(&s), "--size must be between 1 and 8192 (got {s})");
    }
    if let Some(l) = o.limit {
        ensure!(l >= 1, "--limit must be at least 1");
    }
    ensure!((0.0..1.0).contains(&o.val_fraction), "--val-fraction must be in [0, 1) (got {})", o.val_fraction);
    ensure!(!o.out.is_empty(), "--out is required");
    let out = PathBuf::from(&o.out);
    let input = PathBuf::from(&o.input);
    let source_name = o.source_name.clone().unwrap_or_else(|| o.input.clone());
    check_out(&out, o.force)?;
    if let (Ok(a), Ok(b)) = (input.canonicalize(), out.canonicalize()) {
        ensure!(a != b && !a.starts_with(&b), "--out {} would replace the input; choose another folder", out.display());
    }
    let kind = decode::detect(&input, o.format.as_deref())?;
    let source = match kind {
        "folder" => decode::open_folder(&input, o.limit),
        "tar" => decode::open_tar(&input, o.limit),
        "npz" => decode::open_npz(&input, o.limit),
        _ => decode::open_idx(&input, o.limit),
    }?;
    for m in &source.messages {
        ctx.message(m.clone());
    }

    let staging = match &vae {
        None => staging_path(&out, "partial")?,
        Some((_, _, sha)) => resumable_staging(&out, &resume_key(&o, sha), ctx)?,
    };
    if vae.is_none() && staging.exists() {
        std::fs::remove_dir_all(&staging).ok();
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let pixels = staging.join("images");
    let built = match &vae {
        None => build(&o, kind, &source_name, source, &staging, ctx),
        Some((vae, device, sha)) => {
            // The images first (RGB, as the VAE takes them; kept from an interrupted run when they
            // were complete), then their latents beside them.
            let staged = if pixels.join(MANIFEST).is_file() {
                Ok(Value::Null)
            } else {
                let _ = std::fs::remove_dir_all(&pixels);
                std::fs::create_dir_all(&pixels).with_context(|| format!("cannot create {}", pixels.display()))?;
                let o_rgb = PrepareOptions { channels: Some(vae.config().in_channels), ..o.clone() };
                build(&o_rgb, kind, &source_name, source, &pixels, ctx)
            };
            let vae_dir = o.vae.as_deref().unwrap_or_default();
            staged
                .and_then(|_| super::latent::encode_dataset(&pixels, vae, device, vae_dir, sha, o.vae_batch_size.get(), o.flip, &staging, ctx))
                .and_then(|summary| {
                    std::fs::remove_file(staging.join(RESUME_KEY))?;
                    Ok(summary)
                })
        }
    };
    let result = built.and_then(|summary| {
        // Re-check: something may have appeared at `out` while we worked.
        let replace = check_out(&out, o.force)?;
        install(&staging, &out, replace)?;
        Ok(summary)
    });
    if result.is_err() {
        if vae.is_some() && pixels.join(MANIFEST).is_file() {
            // Staged images and encoded parts are kept for the same command to continue.
            ctx.message(format!("the work done so far is kept in {}: the same command continues it", staging.display()));
        } else {
            let _ = std::fs::remove_dir_all(&staging);
        }
    }
    let mut summary = result?;
    let secs = started.elapsed().as_secs_f64();
    let count = summary["count"].as_u64().unwrap_or(0) as f64;
    summary["out"] = json!(out.display().to_string());
    summary["seconds"] = json!(secs);
    summary["imagesPerSec"] = json!(count / secs.max(1e-9));
    Ok(summary)
}

/// In a latent prepare's folder: what it was started with ([`resume_key`]).
const RESUME_KEY: &str = "resume.json";

/// What must be the same for an interrupted latent prepare to be continued: every option that
/// changes the result, and the VAE's weights.
fn resume_key(o: &PrepareOptions, vae_sha256: &str) -> Value {
    let input = std::path::absolute(&o.input).map(|p| p.display().to_string()).unwrap_or_else(|_| o.input.clone());
    json!({"input": input, "format": o.format, "sourceName": o.source_name, "size": o.size, "limit": o.limit,
        "valFraction": o.val_fraction, "seed": o.seed, "skipBad": o.skip_bad, "vaeSha256": vae_sha256,
        "vaeBatchSize": o.vae_batch_size, "flip": o.flip})
}

/// The folder a latent prepare of `out` builds in, beside it under a fixed name: an interrupted one
/// started with the same `key` is continued, any other is replaced.
fn resumable_staging(out: &Path, key: &Value, ctx: &JobCtx) -> Result<std::path::PathBuf> {
    let staging = super::beside(out, "latent-partial")?;
    if staging.exists() {
        let same = std::fs::read(staging.join(RESUME_KEY)).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).is_some_and(|k| &k == key);
        if same {
            ctx.message(format!("continuing the interrupted prepare in {}", staging.display()));
            return Ok(staging);
        }
        ctx.message(format!("{} holds an interrupted prepare with other options: starting over", staging.display()));
        std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    crate::io::atomic::write(&staging.join(RESUME_KEY), format!("{key}\n").as_bytes())?;
    Ok(staging)
}

/// Rename the finished `staging` folder to `out` (moving an existing `out` aside first and
/// deleting it only once the new one is in place).
fn install(staging: &Path, out: &Path, replace: bool) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if replace && out.exists() {
        let old = staging_path(out, "old")?;
        std::fs::rename(out, &old).with_context(|| format!("cannot move the old {} aside", out.display()))?;
        if let Err(e) = std::fs::rename(staging, out) {
            let _ = std::fs::rename(&old, out);
            return Err(e).with_context(|| format!("cannot rename {} to {}", staging.display(), out.display()));
        }
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove the old dataset moved to {}", old.display()))?;
    } else {
        std::fs::rename(staging, out).with_context(|| format!("cannot rename {} to {}", staging.display(), out.display()))?;
    }
    Ok(())
}

fn build(o: &PrepareOptions, kind: &str, source_name: &str, source: Source, staging: &Path, ctx: &JobCtx) -> Result<Value> {
    ctx.start("prepare", source.total);
    let mut target: Option<Target> = None;
    let mut first_name = String::new();
    let mut writer: Option<ShardWriter> = None;
    let mut skipped: Vec<SkippedFile> = Vec::new();
    let mut done = 0u64;
    // Provisional labels: known labels as they are; archive folders numbered as first seen.
    let mut dirs: HashMap<String, i32> = HashMap::new();
    let mut dir_names: Vec<String> = Vec::new();
    let mut counts: HashMap<i32, usize> = HashMap::new();
    let mut last_report = Instant::now();

    loop {
        ctx.check_cancelled()?;
        let batch = match source.rx.recv() {
            Ok(b) => b?,
            Err(_) => bail!("the reader of {source_name} stopped unexpectedly (internal error)"),
        };
        if batch.is_empty() {
            break; // the end of the input
        }
        if target.is_none() {
            for item in &batch {
                match decode::decode(item) {
                    Ok(img) => {
                        let channels = o.channels.unwrap_or(if img.color().channel_count() == 1 { 1 } else { 3 });
                        let (w, h) = (img.width() as usize, img.height() as usize);
                        let (height, width) = o.size.map_or((h, w), |n| (n, n));
                        target = Some(Target { channels, explicit_channels: o.channels.is_some(), height, width, first: (w, h) });
                        first_name = item.name.clone();
                        let rb = channels * height * width;
                        let rps = o.records_per_shard.unwrap_or_else(|| default_records_per_shard(rb));
                        writer = Some(ShardWriter::create(staging, rb, rps)?);
                        break;
                    }
                    Err(e) if o.skip_bad => {
                        let _ = e;
                    }
                    Err(e) => return Err(e.context("pass --skip-bad to leave out unreadable images")),
                }
            }
        }
        let results: Vec<Result<Vec<u8>, ItemError>> = match &target {
            None => batch.iter().map(|it| Err(ItemError::Bad(decode::decode(it).err().unwrap_or_else(|| anyhow::anyhow!("unreadable"))))).collect(),
            Some(t) => batch
                .par_iter()
                .map(|it| decode::decode(it).map_err(ItemError::Bad).and_then(|img| process(img, it, t, o.size, &first_name)))
                .collect(),
        };
        for (item, r) in batch.iter().zip(results) {
            match r {
                Ok(px) => {
                    let label = match &item.label {
                        Label::None => -1,
                        Label::Known(l) => *l as i32,
                        Label::Dir(d) => match dirs.get(d) {
                            Some(&id) => id,
                            None => {
                                let id = dir_names.len() as i32;
                                dirs.insert(d.clone(), id);
                                dir_names.push(d.clone());
                                id
                            }
                        },
                    };
                    *counts.entry(label).or_default() += 1;
                    writer.as_mut().expect("writer exists once an image decoded").push(&px, label as i64)?;
                }
                Err(ItemError::Fatal(e)) => return Err(e),
                Err(ItemError::Bad(e)) if o.skip_bad => {
                    let error = format!("{:#}", e);
                    skipped.push(SkippedFile { path: item.name.clone(), error });
                }
                Err(ItemError::Bad(e)) => return Err(e.context("pass --skip-bad to leave out unreadable images")),
            }
            done += 1;
        }
        if last_report.elapsed().as_millis() >= 100 {
            ctx.progress(done, source.total, crate::metrics!["skipped" => skipped.len()]);
            last_report = Instant::now();
        }
    }
    ctx.progress(done, source.total, crate::metrics!["skipped" => skipped.len()]);
    ctx.end();

    let (target, writer) = match (target, writer) {
        (Some(t), Some(w)) if w.count() > 0 => (t, w),
        _ if !skipped.is_empty() => bail!("every image in {source_name} was unreadable ({} skipped); nothing to prepare", skipped.len()),
        _ => bail!("no images found in {source_name}"),
    };
    let count = writer.count();

    // Classes and the final labels.
    let (classes, remap): (Vec<ClassInfo>, Option<Vec<i32>>) = if !dir_names.is_empty() {
        let (names, labels) = decode::settle_dir_classes(source_name, &dir_names)?;
        let mut cc = vec![0usize; names.len()];
        for (prov, n) in &counts {
            let l = labels[*prov as usize];
            if l >= 0 {
                cc[l as usize] += n;
            }
        }
        let classes = names.into_iter().zip(cc).map(|(name, count)| ClassInfo { name, count }).collect();
        (classes, Some(labels))
    } else if let Some(names) = &source.names {
        let classes = names
            .iter()
            .enumerate()
            .map(|(i, name)| ClassInfo { name: name.clone(), count: counts.get(&(i as i32)).copied().unwrap_or(0) })
            .collect();
        (classes, None)
    } else {
        (Vec::new(), None)
    };
    drop(source);

    let val = choose_val(count, o.val_fraction, o.seed);
    let remap_fn = remap.as_ref().map(|m| move |l: i32| if l < 0 { l } else { m[l as usize] });
    let summary = writer.finish(remap_fn.as_ref().map(|f| f as &dyn Fn(i32) -> i32), &val)?;

    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        count,
        height: target.height,
        width: target.width,
        channels: target.channels,
        classes,
        splits: Splits {
            train: SplitInfo { count: count - val.len() },
            val: SplitInfo { count: val.len() },
            val_fraction: o.val_fraction,
            seed: o.seed,
            method: SPLIT_METHOD.into(),
        },
        source: SourceInfo {
            kind: kind.into(),
            input: source_name.into(),
            size: o.size,
            resize: if o.size.is_some() { resize::DESCRIPTION.into() } else { "none".into() },
            limit: o.limit,
        },
        record_bytes: target.channels * target.height * target.width,
        records_per_shard: summary.records_per_shard,
        shards: summary.shards,
        labels_file: summary.labels_file,
        val_file: summary.val_file,
        checksum: Checksum {
            algorithm: "sha256".into(),
            value: summary.checksum.clone(),
            covers: "shard files in order, then labels.bin, then val.idx when present".into(),
        },
        skipped,
        latent: None,
    };
    manifest.write(staging)?;
    Ok(json!({
        "count": manifest.count,
        "height": manifest.height,
        "width": manifest.width,
        "channels": manifest.channels,
        "classes": manifest.classes.len(),
        "train": manifest.splits.train.count,
        "val": manifest.splits.val.count,
        "skipped": manifest.skipped.len(),
        "kind": kind,
        "checksum": manifest.checksum.value,
    }))
}


