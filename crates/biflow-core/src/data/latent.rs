//! Latent datasets (`data prepare --vae`): a prepared image dataset encoded by a VAE, each record the
//! image's latents as training sees them, `(mean - shift) * scaling`, stored as float16. The posterior
//! mean is stored, not a draw: the latents are then a function of the image (a prepared dataset is
//! reproducible and checksummed), and the flow's own training noise already smooths them.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::shard::{default_records_per_shard, ShardWriter};
use super::{Checksum, Dataset, LatentInfo, Manifest, Split};
use crate::job::JobCtx;
use crate::models::vae::Vae;

/// Latents are encoded in parts of whole batches, each part's file written whole or not at all, so
/// an interrupted encoding continues at its first missing part (with the same batches: the same
/// bytes). About this many bytes a part (a few images in the tests, to have several parts).
const PART_BYTES: usize = if cfg!(test) { 1024 } else { 16 << 20 };
/// The parts, inside the folder being built.
const PARTS_DIR: &str = "parts";

/// Encode the image dataset at `images` into a latent dataset at `out` (same order, labels and
/// split), `batch` images at a time, then remove `images`. With `flip` each image is followed by its
/// horizontal mirror (record r becomes records 2r and 2r + 1, in the same split). Parts already in
/// `out` (an interrupted run's) are kept. `vae_sha256` is the checksum of the VAE's weights.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_dataset(images: &Path, vae: &Vae, device: &Device, vae_dir: &str, vae_sha256: &str, batch: usize, flip: bool, out: &Path, ctx: &JobCtx) -> Result<Value> {
    let ds = Dataset::open(images)?;
    let m = &ds.manifest;
    let (c, h, w) = ds.shape();
    let cfg = vae.config();
    let f = cfg.downsampling();
    let (l, lh, lw) = (cfg.latent_channels, h / f, w / f);
    let values = l * lh * lw;
    let record_bytes = 2 * values;
    let copies = if flip { 2 } else { 1 };
    let part_images = (PART_BYTES / (copies * record_bytes)).div_ceil(batch).max(1) * batch;
    let parts = out.join(PARTS_DIR);
    std::fs::create_dir_all(&parts).with_context(|| format!("cannot create {}", parts.display()))?;
    let part_path = |p: usize| parts.join(format!("part-{p:06}.bin"));
    let part_range = |p: usize| p * part_images..((p + 1) * part_images).min(m.count);
    let num_parts = m.count.div_ceil(part_images);
    let done = (0..num_parts).take_while(|&p| part_path(p).is_file()).count();
    if done > 0 {
        ctx.message(format!("continuing an interrupted encoding: {} of {} images are encoded", part_range(done - 1).end, m.count));
    }
    ctx.start("encode", Some(m.count as u64));
    for p in done..num_parts {
        let range = part_range(p);
        let mut bytes = Vec::with_capacity(range.len() * copies * record_bytes);
        for start in range.clone().step_by(batch) {
            ctx.check_cancelled()?;
            let k = batch.min(range.end - start);
            let mut pixels = Vec::with_capacity(k * c * h * w);
            for r in start..start + k {
                pixels.extend(ds.record(r).0.iter().map(|&p| p as f32 / 127.5 - 1.0));
            }
            let mut x = Tensor::from_vec(pixels, (k, c, h, w), device)?;
            if flip {
                // Each image, then its mirror: (k, 2, C, H, W) -> (2k, C, H, W).
                let mirrored = x.flip(&[3])?;
                x = Tensor::stack(&[&x, &mirrored], 1)?.reshape((2 * k, c, h, w))?;
            }
            let z = vae.latents(&x, None)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, record) in z.chunks(values).enumerate() {
                // float16 holds up to 65504: a VAE whose latents overflow it is not one of the SD family.
                ensure!(record.iter().all(|v| v.is_finite() && v.abs() <= 65504.0), "image {} encodes to latents beyond float16's range: is --vae the right VAE?", start + i / copies);
                bytes.extend(record.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()));
            }
            ctx.progress((start + k) as u64, Some(m.count as u64), serde_json::Map::new());
        }
        crate::io::atomic::write(&part_path(p), &bytes)?;
    }
    ctx.end();
    // The parts in order into shards, each record with its image's label.
    let mut writer = ShardWriter::create(out, record_bytes, default_records_per_shard(record_bytes))?;
    for p in 0..num_parts {
        let path = part_path(p);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let range = part_range(p);
        ensure!(bytes.len() == range.len() * copies * record_bytes, "{} is damaged (its size is not its images'): remove it and prepare again", path.display());
        for (j, record) in bytes.chunks(record_bytes).enumerate() {
            writer.push(record, ds.record(range.start + j / copies).1)?;
        }
    }
    std::fs::remove_dir_all(&parts).with_context(|| format!("cannot remove {}", parts.display()))?;
    let val = (0..ds.len(Split::Val)).map(|i| Ok(ds.record_index(Split::Val, i)? as u32)).collect::<Result<Vec<u32>>>()?;
    let (count, val) = if flip { (2 * m.count, val.iter().flat_map(|&r| [2 * r, 2 * r + 1]).collect()) } else { (m.count, val) };
    let splits = super::Splits {
        train: super::SplitInfo { count: count - val.len() },
        val: super::SplitInfo { count: val.len() },
        ..m.splits.clone()
    };
    let classes = m.classes.iter().map(|c| super::ClassInfo { count: if flip { 2 * c.count } else { c.count }, ..c.clone() }).collect();
    let summary = writer.finish(None, &val)?;
    let manifest = Manifest {
        count,
        splits,
        classes,
        channels: l,
        height: lh,
        width: lw,
        record_bytes,
        records_per_shard: summary.records_per_shard,
        shards: summary.shards,
        labels_file: summary.labels_file,
        val_file: summary.val_file,
        checksum: Checksum { value: summary.checksum, ..m.checksum.clone() },
        latent: Some(LatentInfo {
            vae: recorded_path(vae_dir),
            vae_sha256: vae_sha256.to_string(),
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift(),
            posterior: "mean".into(),
            dtype: "float16".into(),
            image_shape: [c, h, w],
            flipped: flip,
        }),
        ..m.clone()
    };
    manifest.write(out)?;
    drop(ds);
    std::fs::remove_dir_all(images).with_context(|| format!("cannot remove the staged images {}", images.display()))?;
    Ok(json!({
        "count": manifest.count,
        "height": lh,
        "width": lw,
        "channels": l,
        "classes": manifest.classes.len(),
        "train": manifest.splits.train.count,
        "val": manifest.splits.val.count,
        "skipped": manifest.skipped.len(),
        "kind": manifest.source.kind,
        "checksum": manifest.checksum.value,
        "latent": manifest.latent,
    }))
}

/// A latent dataset's VAE, found where the manifest says and checked against its checksum.
pub(crate) fn dataset_vae(ds: &Dataset, device: &Device) -> Result<Vae> {
    let info = ds.manifest.latent.as_ref().context("not a latent dataset")?;
    load_vae(info, None, &format!("the latent dataset {}", ds.dir.display()), "put it back to see the images", device)
}

/// The VAE whose latents `info` describes: at `at` when given, else where `info` records it; its
/// weights must be the ones the latents were made with. `owner` names what needs it and `fix` says
/// what the user can do, for the errors.
pub fn load_vae(info: &LatentInfo, at: Option<&Path>, owner: &str, fix: &str, device: &Device) -> Result<Vae> {
    Vae::load(&checked_vae_dir(info, at, owner, fix)?, device)
}

/// The folder of the VAE `info` describes (at `at` when given), once its weights' checksum is the
/// recorded one; the errors as [`load_vae`]'s.
pub fn checked_vae_dir(info: &LatentInfo, at: Option<&Path>, owner: &str, fix: &str) -> Result<std::path::PathBuf> {
    let dir = at.unwrap_or(Path::new(&info.vae));
    let sha = Vae::weights_sha256(dir).with_context(|| match at {
        Some(at) => format!("--vae {} is not the VAE {owner} works with (sha256 {})", at.display(), info.vae_sha256),
        None => format!("{owner} needs the VAE {} (sha256 {}), which is not there: {fix}", info.vae, info.vae_sha256),
    })?;
    let weights = Vae::weights_file(dir)?;
    ensure!(sha == info.vae_sha256, "{} holds other weights (sha256 {sha}) than the VAE {owner} works with ({}): {fix}", weights.display(), info.vae_sha256);
    Ok(dir.to_path_buf())
}

/// A run (or F) meets a dataset: both on pixels, or both on latents of the same VAE and scaling.
/// `run` and `data` name the two for the error.
pub fn check_same_space(run_latent: Option<&LatentInfo>, run: &str, data_latent: Option<&LatentInfo>, data: &str) -> Result<()> {
    match (run_latent, data_latent) {
        (None, None) => Ok(()),
        (None, Some(_)) => anyhow::bail!("{run} works on pixels and {data} is a latent dataset (VAE latents): give it a dataset of images, or train a new run on the latents"),
        (Some(r), None) => anyhow::bail!("{run} works on VAE latents and {data} holds images: give it a latent dataset made with `data prepare --vae {}`", r.vae),
        (Some(r), Some(d)) => {
            ensure!(
                r.vae_sha256 == d.vae_sha256 && r.scaling_factor == d.scaling_factor && r.shift_factor == d.shift_factor,
                "{run} works on latents of the VAE with sha256 {} (scaling {}), but {data} was encoded by another (sha256 {}, scaling {}): prepare the data with the run's VAE",
                r.vae_sha256,
                r.scaling_factor,
                d.vae_sha256,
                d.scaling_factor
            );
            Ok(())
        }
    }
}

/// A VAE folder as recorded in manifests and runs: absolute, so it is found from any working folder.
pub(crate) fn recorded_path(dir: &str) -> String {
    std::path::absolute(dir).map(|p| p.display().to_string()).unwrap_or_else(|_| dir.to_string())
}
