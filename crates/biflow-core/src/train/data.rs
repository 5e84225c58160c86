//! What the trainers read: datasets as f32 batches, and a seeded, resumable epoch order.

use std::path::Path;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};


/// What the trainer needs from a dataset: images as f32 in [-1,1] (N*C*H*W), or VAE latents, and labels.
pub trait TrainData: Send + Sync {
    /// (channels, height, width)
    fn shape(&self) -> (usize, usize, usize);
    /// 0 when unlabelled.
    fn num_classes(&self) -> usize;
    fn len(&self) -> usize;
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)>;
    /// How the values were encoded when they are VAE latents (None: pixels in [-1, 1]).
    fn latent(&self) -> Option<&crate::data::LatentInfo> {
        None
    }
}

/// An in-memory dataset (tests, benchmarks).
pub struct MemData {
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
}

impl TrainData for MemData {
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.size, self.size)
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        let per = self.channels * self.size * self.size;
        let mut x = Vec::with_capacity(per * indices.len());
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.images[i * per..(i + 1) * per]);
            y.push(self.labels[i]);
        }
        Ok((x, y))
    }
}

/// Only the first `limit` images of another dataset.
pub struct Limited<'a> {
    pub inner: &'a dyn TrainData,
    pub limit: usize,
}

impl TrainData for Limited<'_> {
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn len(&self) -> usize {
        self.inner.len().min(self.limit)
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        self.inner.batch(indices)
    }
    fn latent(&self) -> Option<&crate::data::LatentInfo> {
        self.inner.latent()
    }
}

impl<D: TrainData + ?Sized> TrainData for Box<D> {
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        (**self).batch(indices)
    }
    fn latent(&self) -> Option<&crate::data::LatentInfo> {
        (**self).latent()
    }
}

/// A prepared dataset (`biflow data prepare`): its training split.
impl TrainData for crate::data::Dataset {
    fn shape(&self) -> (usize, usize, usize) {
        crate::data::Dataset::shape(self)
    }
    fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }
    fn len(&self) -> usize {
        crate::data::Dataset::len(self, crate::data::Split::Train)
    }
    fn batch(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<i64>)> {
        self.batch_f32(crate::data::Split::Train, indices)
    }
    fn latent(&self) -> Option<&crate::data::LatentInfo> {
        self.manifest.latent.as_ref()
    }
}

/// Open a prepared dataset folder for training.
pub fn open_data(dir: &Path) -> Result<Box<dyn TrainData>> {
    let ds = crate::data::Dataset::open(dir)?;
    if ds.is_empty(crate::data::Split::Train) {
        bail!("the dataset {} has no training images", dir.display());
    }
    Ok(Box::new(ds))
}

/// Where the trainer is in the data: epoch `epoch`, `offset` images into that epoch's order.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataPos {
    pub epoch: u64,
    pub offset: usize,
}

/// The order of epoch `epoch`: a seeded shuffle (ChaCha8, stream = epoch).
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d);
    rng.set_stream(epoch);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        idx.swap(i, j);
    }
    idx
}

/// Batches of indices in the epoch's seeded order, from a resumable position.
pub(super) struct Loader {
    seed: u64,
    n: usize,
    batch: usize,
    pub pos: DataPos,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Loader {
    pub fn new(seed: u64, n: usize, batch: usize) -> Loader {
        Loader { seed, n, batch, pos: DataPos { epoch: 0, offset: 0 }, order: Vec::new(), order_epoch: None }
    }

    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.pos.offset + self.batch > self.n {
            self.pos = DataPos { epoch: self.pos.epoch + 1, offset: 0 };
        }
        if self.order_epoch != Some(self.pos.epoch) {
            self.order = epoch_order(self.seed, self.pos.epoch, self.n);
            self.order_epoch = Some(self.pos.epoch);
        }
        let out = self.order[self.pos.offset..self.pos.offset + self.batch].to_vec();
        self.pos.offset += self.batch;
        out
    }
}
