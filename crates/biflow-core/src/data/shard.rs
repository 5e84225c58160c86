//! The shard writer: fixed-size uint8 records appended in order to `shard-NNNNN.bin` files, labels to
//! `labels.bin`, hashed as they go. Memory stays bounded: two write buffers, whatever the count.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};

use crate::io::atomic::Output;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::{hex, ShardInfo, LABELS_FILE, VAL_FILE};

/// Shards are cut at about this many bytes.
pub const SHARD_BYTES: usize = 256 << 20;
const BUF_BYTES: usize = 1 << 20;

pub fn default_records_per_shard(record_bytes: usize) -> usize {
    (SHARD_BYTES / record_bytes.max(1)).max(1)
}

pub struct ShardWriter {
    dir: PathBuf,
    record_bytes: usize,
    records_per_shard: usize,
    current: Option<BufWriter<Output>>,
    in_current: usize,
    shards: Vec<ShardInfo>,
    labels: BufWriter<Output>,
    hasher: Sha256,
    count: usize,
}

/// What a finished writer produced.
#[derive(Debug, Clone)]
pub struct WriterSummary {
    pub count: usize,
    pub records_per_shard: usize,
    pub shards: Vec<ShardInfo>,
    pub labels_file: String,
    pub val_file: Option<String>,
    /// SHA-256 (hex) of the shards in order, then labels.bin, then val.idx.
    pub checksum: String,
}

impl ShardWriter {
    /// Start writing records of `record_bytes` bytes into the existing folder `dir`.
    pub fn create(dir: &Path, record_bytes: usize, records_per_shard: usize) -> Result<ShardWriter> {
        ensure!(record_bytes > 0 && records_per_shard > 0, "empty record layout");
        let lp = dir.join(LABELS_FILE);
        let labels = Output::create(&lp)?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            record_bytes,
            records_per_shard,
            current: None,
            in_current: 0,
            shards: Vec::new(),
            labels: BufWriter::with_capacity(64 << 10, labels),
            hasher: Sha256::new(),
            count: 0,
        })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes held in memory waiting to be written (bounded by the buffer sizes).
    pub fn buffered_bytes(&self) -> usize {
        self.current.as_ref().map_or(0, |w| w.buffer().len()) + self.labels.buffer().len()
    }

    /// The capacity of the in-memory buffers: `buffered_bytes` never exceeds it.
    pub fn buffer_capacity(&self) -> usize {
        BUF_BYTES + (64 << 10)
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let p = w.get_ref().path().to_path_buf();
            let f = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", p.display()))?;
            f.sync_all()?;
            self.shards.last_mut().expect("a shard is open").count = self.in_current;
        }
        Ok(())
    }

    /// Append one record (C,H,W uint8 pixels) with its label (-1 when unlabelled).
    pub fn push(&mut self, pixels: &[u8], label: i64) -> Result<()> {
        ensure!(pixels.len() == self.record_bytes, "record has {} bytes, expected {}", pixels.len(), self.record_bytes);
        ensure!(label >= -1 && label <= i32::MAX as i64, "label {label} is out of range");
        ensure!(self.count < u32::MAX as usize, "too many records for one dataset");
        if self.current.is_none() || self.in_current == self.records_per_shard {
            self.close_current()?;
            let name = format!("shard-{:05}.bin", self.shards.len());
            let p = self.dir.join(&name);
            self.current = Some(BufWriter::with_capacity(BUF_BYTES, Output::create(&p)?));
            self.shards.push(ShardInfo { file: name, count: 0 });
            self.in_current = 0;
        }
        let w = self.current.as_mut().expect("a shard is open");
        w.write_all(pixels).with_context(|| format!("cannot write {}", w.get_ref().path().display()))?;
        let lw = &mut self.labels;
        lw.write_all(&(label as i32).to_le_bytes()).with_context(|| format!("cannot write {}", lw.get_ref().path().display()))?;
        self.hasher.update(pixels);
        self.in_current += 1;
        self.count += 1;
        Ok(())
    }

    /// Close the files. `remap` rewrites the provisional labels written so far (label -> new label,
    /// for sources whose class order is only known at the end); `val` is the sorted list of
    /// validation record indices (written to val.idx when not empty).
    pub fn finish(mut self, remap: Option<&dyn Fn(i32) -> i32>, val: &[u32]) -> Result<WriterSummary> {
        self.close_current()?;
        let lp = self.dir.join(LABELS_FILE);
        let labels = self.labels.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", lp.display()))?;
        labels.sync_all()?;
        drop(labels);
        if let Some(remap) = remap {
            let count = self.count;
            crate::io::atomic::write_with(&lp, |out| {
                let mut r = BufReader::new(File::open(&lp).with_context(|| format!("cannot read {}", lp.display()))?);
                let mut w = BufWriter::new(out);
                let mut b = [0u8; 4];
                for _ in 0..count {
                    r.read_exact(&mut b)?;
                    w.write_all(&remap(i32::from_le_bytes(b)).to_le_bytes())?;
                }
                w.flush()?;
                Ok(())
            })
            .context("cannot rewrite labels")?;
        }
        let mut r = BufReader::new(File::open(&lp)?);
        std::io::copy(&mut r, &mut HashWriter(&mut self.hasher))?;
        let val_file = if val.is_empty() {
            None
        } else {
            ensure!(val.windows(2).all(|w| w[0] < w[1]), "validation indices must be sorted and distinct");
            ensure!((*val.last().unwrap() as usize) < self.count, "validation index out of range");
            let bytes: Vec<u8> = val.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.hasher.update(&bytes);
            crate::io::atomic::write(&self.dir.join(VAL_FILE), &bytes)?;
            Some(VAL_FILE.to_string())
        };
        Ok(WriterSummary {
            count: self.count,
            records_per_shard: self.records_per_shard,
            shards: self.shards,
            labels_file: LABELS_FILE.to_string(),
            val_file,
            checksum: hex(&self.hasher.finalize()),
        })
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
