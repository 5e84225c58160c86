//! The `data.inspect` job: a dataset's manifest summary and a PNG grid of sample images (a row per
//! class when labelled).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use candle_core::{Device, Tensor};

use super::Dataset;
use crate::io::image::to_u8;
use crate::models::vae::Vae;
use crate::job::JobCtx;

crate::options! {
    pub struct InspectOptions {
        /// a dataset folder made by `biflow data prepare`
        dir: String,
        /// where to write the PNG grid (default: DIR/preview.png)
        grid: Option<String>,
        /// images per row of the grid (at most 256)
        per_row: usize = 8,
        /// rows of the grid at most (one per class when labelled; at most 1000)
        rows: usize = 10,
        /// recompute the content checksum and compare it with the manifest
        verify: bool,
    }
}

const GAP: usize = 2;

/// Pick the records to show: a row per class (the first records of each), or the first records.
fn pick(ds: &Dataset, per_row: usize, rows: usize) -> Vec<Vec<usize>> {
    let m = &ds.manifest;
    if !m.labelled() {
        let n = m.count.min(per_row * rows);
        return (0..n).collect::<Vec<_>>().chunks(per_row).map(|c| c.to_vec()).collect();
    }
    let shown = m.classes.len().min(rows);
    let mut out = vec![Vec::new(); shown];
    let mut missing: usize = m.classes.iter().take(shown).map(|c| c.count.min(per_row)).sum();
    for r in 0..m.count {
        if missing == 0 {
            break;
        }
        let (_, label) = ds.record(r);
        if label >= 0 && (label as usize) < shown && out[label as usize].len() < per_row {
            out[label as usize].push(r);
            missing -= 1;
        }
    }
    out
}

/// Latents decoded per batch: a VAE pass per image would cost minutes for a grid at 256 px.
const DECODE_BATCH: usize = 8;

/// The pixels (C,H,W uint8) of a row's records: as stored, or latent records decoded by the VAE.
fn row_pixels(ds: &Dataset, vae: Option<&Vae>, row: &[usize]) -> Result<Vec<Vec<u8>>> {
    let Some(vae) = vae else { return Ok(row.iter().map(|&r| ds.record(r).0.to_vec()).collect()) };
    let (c, h, w) = ds.shape();
    let mut out = Vec::with_capacity(row.len());
    for records in row.chunks(DECODE_BATCH) {
        let values: Vec<f32> = records.iter().flat_map(|&r| super::f16_values(ds.record(r).0)).collect();
        let x = vae.images(&Tensor::from_vec(values, (records.len(), c, h, w), &Device::Cpu)?)?;
        let px: Vec<u8> = x.flatten_all()?.to_vec1::<f32>()?.into_iter().map(to_u8).collect();
        out.extend(px.chunks(px.len() / records.len()).map(<[u8]>::to_vec));
    }
    Ok(out)
}

/// Write a grid of the chosen records as a PNG (grey or RGB as the dataset; a latent dataset's
/// records decoded by its VAE).
fn write_grid(ds: &Dataset, vae: Option<&Vae>, rows: &[Vec<usize>], per_row: usize, path: &Path) -> Result<()> {
    let (c, h, w) = match &ds.manifest.latent {
        Some(l) => (l.image_shape[0], l.image_shape[1], l.image_shape[2]),
        None => ds.shape(),
    };
    let gw = per_row * (w + GAP) + GAP;
    let gh = rows.len().max(1) * (h + GAP) + GAP;
    let mut canvas = vec![40u8; gw * gh * c];
    for (ri, row) in rows.iter().enumerate() {
        for (ci, px) in row_pixels(ds, vae, row)?.iter().enumerate() {
            let (x0, y0) = (GAP + ci * (w + GAP), GAP + ri * (h + GAP));
            for y in 0..h {
                for x in 0..w {
                    for k in 0..c {
                        canvas[((y0 + y) * gw + x0 + x) * c + k] = px[k * h * w + y * w + x];
                    }
                }
            }
        }
    }
    let img = if c == 1 {
        image::GrayImage::from_raw(gw as u32, gh as u32, canvas).map(image::DynamicImage::ImageLuma8)
    } else {
        image::RgbImage::from_raw(gw as u32, gh as u32, canvas).map(image::DynamicImage::ImageRgb8)
    };
    crate::io::atomic::write_png(path, &img.context("the sample grid has the wrong number of pixels")?)
}

pub fn inspect(o: InspectOptions, ctx: &JobCtx) -> Result<Value> {
    let dir = PathBuf::from(&o.dir);
    let ds = Dataset::open(&dir)?;
    let (per_row, rows) = (o.per_row, o.rows);
    ensure!((1..=256).contains(&per_row), "--per-row must be between 1 and 256");
    ensure!((1..=1000).contains(&rows), "--rows must be between 1 and 1000");
    if o.verify {
        ctx.message("verifying the checksum...");
        ds.verify()?;
    }
    let grid = o.grid.map(PathBuf::from).unwrap_or_else(|| dir.join("preview.png"));
    let chosen = pick(&ds, per_row, rows);
    let vae = if ds.is_latent() { Some(super::latent::dataset_vae(&ds, &Device::Cpu)?) } else { None };
    write_grid(&ds, vae.as_ref(), &chosen, per_row, &grid)?;
    let m = &ds.manifest;
    Ok(json!({
        "dir": dir.display().to_string(),
        "version": m.version,
        "count": m.count,
        "height": m.height,
        "width": m.width,
        "channels": m.channels,
        "classes": m.classes,
        "train": m.splits.train.count,
        "val": m.splits.val.count,
        "source": m.source,
        "shards": m.shards.len(),
        "checksum": m.checksum.value,
        "verified": o.verify,
        "skipped": m.skipped,
        "latent": m.latent,
        "grid": grid.display().to_string(),
        "gridRows": chosen.len(),
    }))
}
