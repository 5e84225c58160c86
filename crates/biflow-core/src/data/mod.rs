//! Datasets: preparation from image folders, tar archives, `.npz` arrays and MNIST idx files into
//! compact shards of fixed-size uint8 records, and fast random access to them.
//!
//! A prepared dataset is a folder:
//!
//! ```text
//! DIR/manifest.json       format version, shape, classes, splits, source, checksum, skipped files
//! DIR/shard-00000.bin     records in input order, each C*H*W uint8 pixels (C,H,W order), no header
//! DIR/shard-00001.bin     ... every shard but the last holds exactly `recordsPerShard` records
//! DIR/labels.bin          one little-endian i32 per record (-1 when unlabelled)
//! DIR/val.idx             sorted little-endian u32 record indices of the validation split (absent if none)
//! ```
//!
//! A latent dataset (`data prepare --vae`) has the same files; its records are the images' VAE
//! latents as training sees them, `(mean - shift) * scaling`, float16 little-endian in (C,H,W) order, and
//! its manifest's `latent` names the VAE (path and checksum), the scaling and the images' shape.
//!
//! The checksum is SHA-256 over the shard files in order, then `labels.bin`, then `val.idx`.
//! Readers map the files into memory ([`Dataset`]); nothing is loaded whole.

pub mod bench;
mod decode;
pub mod inspect;
pub mod latent;
pub mod prepare;
mod resize;
mod rng;
mod shard;

pub use decode::decode_file;
pub use inspect::{inspect, InspectOptions};
pub use prepare::{prepare, PrepareOptions};
pub use shard::{ShardWriter, WriterSummary};
#[doc(hidden)]
pub use decode::synth_pngs;
#[doc(hidden)]
pub use decode::decode_bytes as decode_image_bytes;
pub use decode::{MAX_IMAGE_BYTES, MAX_IMAGE_SIDE, MAX_MEMBER_BYTES};

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

/// The version of the on-disk format written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "biflow-dataset";
pub const MANIFEST: &str = "manifest.json";
pub const LABELS_FILE: &str = "labels.bin";
pub const VAL_FILE: &str = "val.idx";

/// A split of a prepared dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Split> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            _ => bail!("unknown split '{s}' (expected train or val)"),
        }
    }
}

/// A class: its name (the folder name for image folders, the label number for arrays) and how many
/// records carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassInfo {
    pub name: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitInfo {
    pub count: usize,
}

/// How the records are divided into a training and a held-out split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Splits {
    pub train: SplitInfo,
    pub val: SplitInfo,
    pub val_fraction: f64,
    pub seed: u64,
    /// A sentence saying how the validation records were chosen.
    pub method: String,
}

/// Where the records came from and how they were transformed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    /// `folder`, `tar`, `npz` or `idx`.
    pub kind: String,
    /// The input as the user named it (`builtin:mnist` for the built-in set).
    pub input: String,
    /// `--size` when given.
    pub size: Option<usize>,
    /// A sentence describing the resize (filter, crop) or `none`.
    pub resize: String,
    pub limit: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardInfo {
    pub file: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checksum {
    pub algorithm: String,
    pub value: String,
    pub covers: String,
}

/// An input file left out under `--skip-bad`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedFile {
    pub path: String,
    pub error: String,
}

/// `DIR/manifest.json` (camelCase keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always `biflow-dataset`.
    pub format: String,
    pub version: u32,
    pub count: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Empty when unlabelled.
    pub classes: Vec<ClassInfo>,
    pub splits: Splits,
    pub source: SourceInfo,
    /// Bytes per record (`channels * height * width`).
    pub record_bytes: usize,
    pub records_per_shard: usize,
    pub shards: Vec<ShardInfo>,
    pub labels_file: String,
    /// `None` when the validation split is empty.
    pub val_file: Option<String>,
    pub checksum: Checksum,
    #[serde(default)]
    pub skipped: Vec<SkippedFile>,
    /// Present for a latent dataset: its records are VAE latents, not pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentInfo>,
}

/// How a latent dataset's records were made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatentInfo {
    /// The VAE folder, as given to `data prepare --vae`.
    pub vae: String,
    /// SHA-256 of its weights file.
    pub vae_sha256: String,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// "mean": each record is the posterior mean (deterministic; a draw adds noise training does not need).
    pub posterior: String,
    /// "float16", little-endian.
    pub dtype: String,
    /// The images' shape (channels, height, width) before encoding.
    pub image_shape: [usize; 3],
    /// Each image followed by its horizontal mirror (`--flip`).
    #[serde(default)]
    pub flipped: bool,
}

impl Manifest {
    pub fn labelled(&self) -> bool {
        !self.classes.is_empty()
    }

    /// Bytes per stored value: 1 (uint8 pixels) or 2 (float16 latents).
    pub fn value_bytes(&self) -> usize {
        if self.latent.is_some() { 2 } else { 1 }
    }

    /// Write it as `dir`/manifest.json (atomically).
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::io::atomic::write(&dir.join(MANIFEST), format!("{text}\n").as_bytes())
    }
}

/// A prepared dataset opened for reading. Cheap random access: the files are memory-mapped.
/// `Dataset` is `Send + Sync`; share it between threads freely.
pub struct Dataset {
    pub manifest: Manifest,
    pub dir: PathBuf,
    shards: Vec<Mmap>,
    labels: Mmap,
    /// Record indices of each split, in increasing order.
    train: Vec<u32>,
    val: Vec<u32>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the files of a prepared dataset are never modified in place (preparation writes a
    // new folder and renames it); a user truncating them under a running reader is not supported.
    unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))
}

/// A latent record's float16 little-endian bytes as f32 values.
pub(crate) fn f16_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
}

/// u8 -> f32 in [-1, 1] (x / 127.5 - 1), precomputed.
fn to_unit_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f32 / 127.5 - 1.0;
    }
    t
}

impl Dataset {
    /// Open a prepared dataset; a clear error if `dir` is not one or is damaged.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let mpath = dir.join(MANIFEST);
        if !dir.is_dir() {
            bail!("{} is not a folder (expected a dataset made by `biflow data prepare`)", dir.display());
        }
        if !mpath.is_file() {
            bail!("{} is not a biflow dataset: it has no {MANIFEST} (make one with `biflow data prepare`)", dir.display());
        }
        let text = std::fs::read_to_string(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", mpath.display()))?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            bail!("{} is not a biflow dataset manifest (no \"format\": \"{FORMAT_NAME}\")", mpath.display());
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != FORMAT_VERSION as u64 {
            bail!(
                "{} has dataset format version {version}; this biflow reads version {FORMAT_VERSION} (prepare the dataset again)",
                dir.display()
            );
        }
        let manifest: Manifest =
            serde_json::from_value(value).with_context(|| format!("{} is a malformed dataset manifest", mpath.display()))?;
        let m = &manifest;
        ensure!(
            m.channels.checked_mul(m.height).and_then(|x| x.checked_mul(m.width)).and_then(|x| x.checked_mul(m.value_bytes())) == Some(m.record_bytes),
            "{}: recordBytes does not match the image shape",
            mpath.display()
        );
        ensure!(m.record_bytes > 0 && m.records_per_shard > 0, "{}: empty record layout", mpath.display());
        if let Some(l) = &m.latent {
            ensure!(l.dtype == "float16", "{}: latent dtype '{}' is not supported (float16)", mpath.display(), l.dtype);
        }
        ensure!(m.count <= u32::MAX as usize, "dataset {} is too large", dir.display());

        let mut shards = Vec::with_capacity(m.shards.len());
        let mut total = 0usize;
        // Every file a manifest names sits in the dataset folder: no paths (e.g. /dev/zero), no hidden names.
        let plain = |f: &str| !f.is_empty() && !f.contains('/') && !f.contains('\\') && !f.starts_with('.');
        for f in std::iter::once(&m.labels_file).chain(&m.val_file) {
            ensure!(plain(f), "{}: bad file name '{f}'", mpath.display());
        }
        for (i, s) in m.shards.iter().enumerate() {
            ensure!(plain(&s.file), "{}: bad shard file name '{}'", mpath.display(), s.file);
            if i + 1 < m.shards.len() {
                ensure!(s.count == m.records_per_shard, "{}: shard {} is not full", mpath.display(), s.file);
            } else {
                ensure!(s.count <= m.records_per_shard, "{}: shard {} holds more than recordsPerShard", mpath.display(), s.file);
            }
            let map = map_file(&dir.join(&s.file))?;
            ensure!(
                s.count.checked_mul(m.record_bytes) == Some(map.len()),
                "dataset {} is damaged: {} has {} bytes, expected {}",
                dir.display(),
                s.file,
                map.len(),
                s.count * m.record_bytes
            );
            total = total.saturating_add(s.count);
            shards.push(map);
        }
        ensure!(total == m.count, "dataset {} is damaged: the shards hold {total} records, the manifest says {}", dir.display(), m.count);
        let labels = map_file(&dir.join(&m.labels_file))?;
        ensure!(
            labels.len() as u64 == 4 * m.count as u64,
            "dataset {} is damaged: {} has {} bytes, expected {}",
            dir.display(),
            m.labels_file,
            labels.len(),
            4 * m.count
        );
        let val: Vec<u32> = match &m.val_file {
            None => Vec::new(),
            Some(f) => {
                let bytes = std::fs::read(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()))?;
                ensure!(bytes.len() % 4 == 0, "dataset {} is damaged: {f} has a partial index", dir.display());
                bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
            }
        };
        ensure!(
            val.len() == m.splits.val.count && val.windows(2).all(|w| w[0] < w[1]) && val.last().is_none_or(|&v| (v as usize) < m.count),
            "dataset {} is damaged: the validation index does not match the manifest",
            dir.display()
        );
        let mut train = Vec::with_capacity(m.count - val.len());
        let mut vi = 0;
        for i in 0..m.count as u32 {
            if vi < val.len() && val[vi] == i {
                vi += 1;
            } else {
                train.push(i);
            }
        }
        ensure!(train.len() == m.splits.train.count, "dataset {} is damaged: split counts do not add up", dir.display());
        Ok(Dataset { manifest, dir: dir.to_path_buf(), shards, labels, train, val })
    }

    /// Number of records in `split`.
    pub fn len(&self, split: Split) -> usize {
        self.index(split).len()
    }

    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    /// Number of classes (0 when unlabelled).
    pub fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }

    /// Shape of one image: (channels, height, width).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.manifest.channels, self.manifest.height, self.manifest.width)
    }

    fn index(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// The record number (over the whole dataset, in input order) of image `index` of `split`.
    pub fn record_index(&self, split: Split, index: usize) -> Result<usize> {
        let idx = self.index(split);
        match idx.get(index) {
            Some(&r) => Ok(r as usize),
            None => bail!("image {index} is out of range: the {split} split has {} images", idx.len()),
        }
    }

    /// Whether the records are VAE latents (see [`LatentInfo`]) rather than pixels.
    pub fn is_latent(&self) -> bool {
        self.manifest.latent.is_some()
    }

    /// Refuse a latent dataset where pixels are needed, naming the command that cannot use it yet.
    pub fn require_pixels(&self, what: &str) -> Result<()> {
        ensure!(
            !self.is_latent(),
            "{} is a latent dataset (VAE latents, made with --vae): {what} needs images; prepare the images without --vae for it",
            self.dir.display()
        );
        Ok(())
    }

    /// Pixels (C,H,W uint8) and label of record `r` (whole-dataset numbering); a latent dataset's
    /// record is its float16 bytes.
    pub fn record(&self, r: usize) -> (&[u8], i64) {
        let m = &self.manifest;
        let shard = &self.shards[r / m.records_per_shard];
        let off = (r % m.records_per_shard) * m.record_bytes;
        let label = i32::from_le_bytes(self.labels[4 * r..4 * r + 4].try_into().unwrap()) as i64;
        (&shard[off..off + m.record_bytes], label)
    }

    /// Image `index` of `split`: uint8 pixels in C,H,W order, and its label (-1 when unlabelled).
    pub fn get(&self, split: Split, index: usize) -> Result<(Vec<u8>, i64)> {
        let (px, label) = self.record(self.record_index(split, index)?);
        Ok((px.to_vec(), label))
    }

    /// A batch of images as f32 C,H,W in [-1, 1] (x/127.5 - 1) concatenated, plus labels; fast path
    /// (large batches are converted on several threads). A latent dataset gives its latents as stored.
    pub fn batch_f32(&self, split: Split, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        use rayon::prelude::*;
        let table = to_unit_table();
        let latent = self.is_latent();
        let values = self.manifest.record_bytes / self.manifest.value_bytes();
        let records = indices.iter().map(|&i| self.record_index(split, i)).collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; indices.len() * values];
        let fill = |(o, &r): (&mut [f32], &usize)| {
            let (bytes, _) = self.record(r);
            if latent {
                for (o, v) in o.iter_mut().zip(f16_values(bytes)) {
                    *o = v;
                }
            } else {
                for (o, &p) in o.iter_mut().zip(bytes) {
                    *o = table[p as usize];
                }
            }
        };
        if out.len() >= 1 << 20 {
            out.par_chunks_mut(values).zip(records.par_iter()).for_each(fill);
        } else {
            out.chunks_mut(values).zip(records.iter()).for_each(fill);
        }
        let labels = records.iter().map(|&r| self.record(r).1).collect();
        Ok((out, labels))
    }

    /// Recompute the content checksum and compare it with the manifest's.
    pub fn verify(&self) -> Result<()> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in &self.shards {
            h.update(&s[..]);
        }
        h.update(&self.labels[..]);
        if let Some(f) = &self.manifest.val_file {
            h.update(std::fs::read(self.dir.join(f))?);
        }
        let got = hex(&h.finalize());
        ensure!(
            got == self.manifest.checksum.value,
            "dataset {} is damaged: its checksum is {got}, the manifest says {}",
            self.dir.display(),
            self.manifest.checksum.value
        );
        Ok(())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The path where the writer builds a dataset before renaming it to `dir` (this process's own).
pub(crate) fn staging_path(dir: &Path, what: &str) -> Result<PathBuf> {
    beside(dir, &format!("{what}-{}", std::process::id()))
}

/// `.NAME.tag` next to the folder `dir` (on its file system, so a rename moves it into place).
pub(crate) fn beside(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} is not a usable output folder name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.{tag}")))
}

#[cfg(test)]
mod tests;
