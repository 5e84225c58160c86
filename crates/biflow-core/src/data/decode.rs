//! Input decoders. Each input kind becomes a [`Source`]: a reader thread that streams batches of
//! [`Item`]s (file paths, encoded image bytes, or raw pixel arrays) over a bounded channel, so that
//! reading overlaps decoding and memory stays bounded whatever the input size.
//!
//! Kinds: an image folder (class subfolders become labels, sorted by name; a flat folder is
//! unlabelled), a `.tar`/`.tar.gz`/`.tgz` of such a tree (read as a stream), a numpy `.npz` of uint8
//! images, and a folder of MNIST idx files (gzipped or not).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use anyhow::{bail, ensure, Context, Result};
use image::DynamicImage;

use crate::io::npy::{DType, Npz};

/// Image file extensions looked for (case-insensitive); other files are ignored.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// The largest image side read (pixels): bigger images are refused before any pixel is decoded.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most memory one image's decoder may allocate.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;
/// The largest image file read from an archive (a tar member claiming more is refused, not buffered).
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// Labels may number classes up to this many (or 4 per image, if more): the manifest names every class.
pub const MAX_CLASSES: i64 = 1 << 16;

/// Items per batch sent by a reader thread (and decoded in parallel).
pub const BATCH: usize = 256;
/// Encoded bytes per batch at most (tar archives).
const BATCH_BYTES: usize = 64 << 20;

/// Pixel layout of a raw array item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Hwc,
    Chw,
}

pub enum Payload {
    File(PathBuf),
    Bytes(Vec<u8>),
    Raw { h: usize, w: usize, c: usize, layout: Layout, data: Vec<u8> },
}

/// How an item's label is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    None,
    Known(i64),
    /// The folder an image sits in, inside an archive: classes are settled once all are seen.
    Dir(String),
}

pub struct Item {
    /// For messages: the file path, archive member, or `file[index]`.
    pub name: String,
    pub payload: Payload,
    pub label: Label,
}

/// An input opened for reading.
pub struct Source {
    /// `rx` yields non-empty batches, then one empty batch at the end of the input.
    /// Number of items when known in advance (for the progress bar).
    pub total: Option<u64>,
    /// Class names in label order when known in advance (`None`: unlabelled or [`Label::Dir`]).
    pub names: Option<Vec<String>>,
    pub messages: Vec<String>,
    pub rx: Receiver<Result<Vec<Item>>>,
    pub thread: Option<JoinHandle<()>>,
}

impl Drop for Source {
    fn drop(&mut self) {
        // Dropping the receiver makes the reader's next send fail, so it stops.
        let (_tx, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_reader(f: impl FnOnce(&SyncSender<Result<Vec<Item>>>) -> Result<()> + Send + 'static) -> (Receiver<Result<Vec<Item>>>, JoinHandle<()>) {
    let (tx, rx) = sync_channel(2);
    let handle = std::thread::spawn(move || {
        // An empty batch marks the end: a reader that dies without it (a panic) is an error, never
        // a silently shorter dataset.
        match f(&tx) {
            Ok(()) => {
                let _ = tx.send(Ok(Vec::new()));
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    (rx, handle)
}

/// Sends a batch; `false` when the consumer has gone (stop reading).
fn send(tx: &SyncSender<Result<Vec<Item>>>, batch: Vec<Item>) -> bool {
    tx.send(Ok(batch)).is_ok()
}

pub fn is_image_name(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.starts_with('.') {
        return false; // hidden files, macOS "._x.png" resource forks
    }
    match base.rsplit_once('.') {
        Some((_, ext)) => IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Detection

/// The input kind: `folder`, `tar`, `npz` or `idx`, detected from the path unless `format` is given.
pub fn detect(input: &Path, format: Option<&str>) -> Result<&'static str> {
    if let Some(f) = format {
        return Ok(match f {
            "folder" | "images" => "folder",
            "tar" => "tar",
            "npz" => "npz",
            "idx" | "mnist" => "idx",
            other => bail!("unknown --format '{other}' (expected folder, tar, npz or idx)"),
        });
    }
    let meta = std::fs::metadata(input).with_context(|| format!("input {} does not exist or cannot be read", input.display()))?;
    let name = input.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if meta.is_dir() {
        let has_idx = std::fs::read_dir(input)
            .with_context(|| format!("cannot list {}", input.display()))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("idx3-ubyte"));
        return Ok(if has_idx { "idx" } else { "folder" });
    }
    if name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        return Ok("tar");
    }
    if name.ends_with(".npz") {
        return Ok("npz");
    }
    bail!(
        "cannot tell what kind of input {} is: expected an image folder, a .tar/.tar.gz/.tgz, an .npz or a folder of MNIST idx files (or pass --format)",
        input.display()
    )
}

// ---------------------------------------------------------------------------------------------
// Image folders

fn walk(dir: &Path, out: &mut Vec<PathBuf>, ignored: &mut usize) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list folder {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let p = e.path();
        let ft = e.file_type().with_context(|| format!("cannot read {}", p.display()))?;
        // only symbolic links need another look to see what they point to
        let is_dir = if ft.is_symlink() {
            std::fs::metadata(&p).with_context(|| format!("cannot read {} (a broken link?)", p.display()))?.is_dir()
        } else {
            ft.is_dir()
        };
        if is_dir {
            walk(&p, out, ignored)?;
        } else if is_image_name(&name) {
            out.push(p);
        } else {
            *ignored += 1;
        }
    }
    Ok(())
}

pub fn open_folder(root: &Path, limit: Option<usize>) -> Result<Source> {
    let mut files = Vec::new();
    let mut ignored = 0;
    walk(root, &mut files, &mut ignored)?;
    files.sort();
    if files.is_empty() {
        bail!("no images found in {} (looked for {} files)", root.display(), ext_list());
    }
    let rel = |p: &Path| p.strip_prefix(root).map(|r| r.to_path_buf()).unwrap_or_else(|_| p.to_path_buf());
    let top_level = files.iter().filter(|p| rel(p).components().count() == 1).count();
    let mut messages = Vec::new();
    if ignored > 0 {
        let files_word = if ignored == 1 { "file that is not an image" } else { "files that are not images" };
        messages.push(format!("ignored {ignored} {files_word} ({} are read)", ext_list()));
    }
    let (names, labels): (Option<Vec<String>>, Vec<Label>) = if top_level == files.len() {
        (None, vec![Label::None; files.len()])
    } else if top_level > 0 {
        bail!(
            "{} has images both at its top level and in subfolders: put every image in a class subfolder, or use a flat folder of images",
            root.display()
        );
    } else {
        let class_of = |p: &Path| rel(p).components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let names: Vec<String> = files.iter().map(|p| class_of(p)).collect::<BTreeSet<_>>().into_iter().collect();
        let labels = files
            .iter()
            .map(|p| Label::Known(names.binary_search(&class_of(p)).unwrap() as i64))
            .collect();
        (Some(names), labels)
    };
    let mut items: Vec<(PathBuf, Label)> = files.into_iter().zip(labels).collect();
    if let Some(n) = limit {
        items.truncate(n);
    }
    let total = items.len() as u64;
    let (rx, thread) = spawn_reader(move |tx| {
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            let batch: Vec<Item> = it
                .by_ref()
                .take(BATCH)
                .map(|(p, label)| Item { name: p.display().to_string(), payload: Payload::File(p), label })
                .collect();
            if !send(tx, batch) {
                break;
            }
        }
        Ok(())
    });
    Ok(Source { total: Some(total), names, messages, rx, thread: Some(thread) })
}

fn ext_list() -> String {
    IMAGE_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------------------------
// Tar archives

/// Remembers whether the underlying stream reached its end: a tar whose entries stop at a block
/// boundary without the end-of-archive blocks is truncated.
struct EofTracker<R> {
    inner: R,
    eof: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for EofTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(n)
    }
}

pub fn open_tar(path: &Path, limit: Option<usize>) -> Result<Source> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let lower = path.to_string_lossy().to_lowercase();
    let mut head = [0u8; 2];
    let gz = {
        let mut r = File::open(path)?;
        let n = r.read(&mut head)?;
        (n == 2 && head == [0x1f, 0x8b]) || lower.ends_with(".gz") || lower.ends_with(".tgz")
    };
    let reader: Box<dyn Read + Send> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, f)))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let shown = path.display().to_string();
    let (rx, thread) = spawn_reader(move |tx| {
        let eof = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut archive = tar::Archive::new(EofTracker { inner: reader, eof: eof.clone() });
        let bad = |e: std::io::Error| anyhow::anyhow!("{shown} is a truncated or corrupt tar archive ({e})");
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut taken = 0usize;
        let mut seen_any = false;
        let entries = archive.entries().map_err(bad)?;
        for entry in entries {
            let mut entry = entry.map_err(bad)?;
            seen_any = true;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            if !is_image_name(&name) {
                continue;
            }
            if limit.is_some_and(|n| taken >= n) {
                break;
            }
            // The size in the header is a claim: refuse an absurd one, reserve no more than a batch.
            ensure!(
                entry.size() <= MAX_MEMBER_BYTES,
                "{shown}: member {name} claims {} bytes; image files over {} MiB are refused",
                entry.size(),
                MAX_MEMBER_BYTES >> 20
            );
            let mut data = Vec::with_capacity((entry.size() as usize).min(BATCH_BYTES));
            entry.read_to_end(&mut data).map_err(bad)?;
            let name = name.trim_start_matches("./").to_string();
            let dir = name.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
            bytes += data.len();
            batch.push(Item { name: format!("{shown}:{name}"), payload: Payload::Bytes(data), label: Label::Dir(dir) });
            taken += 1;
            if batch.len() >= BATCH || bytes >= BATCH_BYTES {
                if !send(tx, std::mem::take(&mut batch)) {
                    return Ok(());
                }
                bytes = 0;
            }
        }
        let stopped_by_limit = limit.is_some_and(|n| taken >= n);
        if !stopped_by_limit && eof.load(std::sync::atomic::Ordering::Relaxed) {
            if seen_any {
                bail!("{shown} is a truncated tar archive: it ends without the end-of-archive marker");
            } else {
                bail!("{shown} is not a tar archive (it is empty or truncated)");
            }
        }
        if !batch.is_empty() {
            send(tx, batch);
        }
        Ok(())
    });
    Ok(Source { total: None, names: None, messages: Vec::new(), rx, thread: Some(thread) })
}

/// Settle the classes of images read from an archive from the folders they sit in: the root is the
/// longest folder prefix common to all images; each first folder below it is a class (sorted by
/// name). All images in one folder: unlabelled. Images both at the root and below it: an error.
/// Returns the class names and, for each distinct folder (in `dirs` order), its label.
pub fn settle_dir_classes(what: &str, dirs: &[String]) -> Result<(Vec<String>, Vec<i32>)> {
    if dirs.len() <= 1 {
        return Ok((Vec::new(), vec![-1; dirs.len()]));
    }
    let split: Vec<Vec<&str>> = dirs.iter().map(|d| d.split('/').filter(|s| !s.is_empty() && *s != ".").collect()).collect();
    let mut common = split[0].len();
    for s in &split[1..] {
        common = common.min(s.iter().zip(&split[0]).take_while(|(a, b)| a == b).count());
    }
    if split.iter().any(|s| s.len() == common) {
        bail!("{what} has images both in a folder and in its subfolders: put every image in a class folder, or use a flat tree");
    }
    let class_of: Vec<&str> = split.iter().map(|s| s[common]).collect();
    let names: Vec<String> = class_of.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    let labels = class_of.iter().map(|c| names.binary_search(&c.to_string()).unwrap() as i32).collect();
    Ok((names, labels))
}

// ---------------------------------------------------------------------------------------------
// Raw arrays: .npz and MNIST idx

/// Stream `n` records of `record` bytes from `r` as raw items.
fn stream_records(
    tx: &SyncSender<Result<Vec<Item>>>,
    r: &mut dyn Read,
    what: &str,
    n: usize,
    (h, w, c, layout): (usize, usize, usize, Layout),
    labels: Option<Vec<i64>>,
) -> Result<()> {
    let record = h * w * c;
    let mut i = 0;
    while i < n {
        let k = BATCH.min(n - i);
        let mut batch = Vec::with_capacity(k);
        for j in i..i + k {
            let mut data = vec![0u8; record];
            r.read_exact(&mut data)
                .with_context(|| format!("{what} is truncated: image {j} of {n} cannot be read"))?;
            let label = labels.as_ref().map_or(Label::None, |l| Label::Known(l[j]));
            batch.push(Item { name: format!("{what}[{j}]"), payload: Payload::Raw { h, w, c, layout, data }, label });
        }
        if !send(tx, batch) {
            return Ok(());
        }
        i += k;
    }
    Ok(())
}

/// Class names "0".."max" for integer labels; negative labels are an error.
/// Labels numbered from 1 with no 0 (as in the downsampled-ImageNet files) are shifted to start at 0.
fn number_classes(what: &str, labels: &mut [i64], messages: &mut Vec<String>) -> Result<Vec<String>> {
    let (min, max) = labels.iter().fold((i64::MAX, i64::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    if labels.is_empty() {
        return Ok(Vec::new());
    }
    ensure!(min >= 0, "{what} has a negative label ({min}); labels must be 0, 1, 2, ...");
    // Each class up to the largest label gets a name in the manifest: a few images must not name millions.
    let most = MAX_CLASSES.max(4 * labels.len() as i64).min(1 << 24);
    ensure!(
        max < most,
        "{what} has a label too large to be a class number ({max}; labels must be below {most}: {MAX_CLASSES} or 4 per image)"
    );
    let mut max = max;
    if min == 1 {
        for l in labels.iter_mut() {
            *l -= 1;
        }
        max -= 1;
        messages.push(format!("{what}: labels start at 1; shifted to start at 0"));
    }
    Ok((0..=max).map(|i| i.to_string()).collect())
}

const NPZ_IMAGE_KEYS: &[&str] = &["data", "arr_0", "x"];
const NPZ_LABEL_KEYS: &[&str] = &["labels", "y"];

/// The shape (n, h, w, c, layout) of an image array: N,H,W,C or N,C,H,W (channels 1 or 3), N,H,W
/// (grey), or N,3*S*S (flattened C,H,W rows as in the downsampled-ImageNet files).
fn image_shape(what: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize, Layout)> {
    let dims = image_shape_unchecked(what, shape)?;
    check_side(what, dims.1, dims.2)?;
    Ok(dims)
}

/// Raw arrays claim their image size in a header: refuse sides past [`MAX_IMAGE_SIDE`] before allocating.
fn check_side(what: &str, h: usize, w: usize) -> Result<()> {
    let max = MAX_IMAGE_SIDE as usize;
    ensure!(h <= max && w <= max, "{what} holds {h}x{w} images; sides over {max} pixels are refused");
    Ok(())
}

fn image_shape_unchecked(what: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize, Layout)> {
    let is_c = |c: usize| c == 1 || c == 3;
    Ok(match *shape {
        [n, h, w] => (n, h, w, 1, Layout::Hwc),
        [n, a, b, c] if is_c(c) && (is_c(b) || !is_c(a)) => (n, a, b, c, Layout::Hwc),
        [n, c, h, w] if is_c(c) => (n, h, w, c, Layout::Chw),
        [n, d] => {
            let s = ((d / 3) as f64).sqrt().round() as usize;
            ensure!(s > 0 && s.checked_mul(s).and_then(|x| x.checked_mul(3)) == Some(d), "{what} has rows of {d} values, which is not 3*S*S (a flattened square RGB image)");
            (n, s, s, 3, Layout::Chw)
        }
        _ => bail!(
            "{what} has shape {shape:?}: expected images as N,H,W,C or N,C,H,W (1 or 3 channels), N,H,W, or N,3*S*S"
        ),
    })
}

pub fn open_npz(path: &Path, limit: Option<usize>) -> Result<Source> {
    let shown = path.display().to_string();
    let mut npz = Npz::open(path)?;
    let key = NPZ_IMAGE_KEYS
        .iter()
        .find(|k| npz.contains(k))
        .with_context(|| format!("{shown} has no image array: expected one named {} (it has: {})", NPZ_IMAGE_KEYS.join(", "), npz.names().join(", ")))?
        .to_string();
    let (shape, dtype) = {
        let (shape, dtype, _) = npz.open_member(&key)?;
        (shape, dtype)
    };
    let what = format!("{shown} ('{key}')");
    ensure!(dtype == DType::U8, "{what} has dtype {}; expected uint8 images (0..255)", dtype.name());
    let (n, h, w, c, layout) = image_shape(&what, &shape)?;
    ensure!(n > 0, "{what} holds no images");
    ensure!(h > 0 && w > 0, "{what} has empty images (shape {shape:?})");
    let mut messages = Vec::new();
    let mut labels = None;
    let mut names = None;
    if let Some(lk) = NPZ_LABEL_KEYS.iter().find(|k| npz.contains(k)) {
        let a = npz.read(lk)?;
        let lwhat = format!("{shown} ('{lk}')");
        ensure!(
            !matches!(a.dtype, DType::F16 | DType::F32 | DType::F64 | DType::Bool),
            "{lwhat} has dtype {}; expected integer labels",
            a.dtype.name()
        );
        ensure!(a.shape.len() == 1 || (a.shape.len() == 2 && a.shape[1] == 1), "{lwhat} has shape {:?}; expected one label per image", a.shape);
        ensure!(a.numel() == n, "{lwhat} has {} labels for {n} images", a.numel());
        let mut l = a.to_i64();
        names = Some(number_classes(&lwhat, &mut l, &mut messages)?);
        labels = Some(l);
    }
    let take = limit.map_or(n, |l| l.min(n));
    let path = path.to_path_buf();
    let (rx, thread) = spawn_reader(move |tx| {
        let mut npz = Npz::open(&path)?;
        let (_, _, mut r) = npz.open_member(&key)?;
        stream_records(tx, &mut r, &what, take, (h, w, c, layout), labels)
    });
    Ok(Source { total: Some(take as u64), names, messages, rx, thread: Some(thread) })
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = std::io::BufRead::fill_buf(&mut r)?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) { Box::new(flate2::read::GzDecoder::new(r)) } else { Box::new(r) })
}

fn read_be_u32(r: &mut dyn Read, what: &str) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).with_context(|| format!("{what} is truncated (incomplete header)"))?;
    Ok(u32::from_be_bytes(b))
}

/// Read an idx header: the dimensions of a uint8 array (magic 0x0000_08_NN).
fn idx_header(r: &mut dyn Read, what: &str) -> Result<Vec<usize>> {
    let magic = read_be_u32(r, what)?;
    ensure!(magic >> 16 == 0, "{what} is not an idx file (bad magic number {magic:#010x})");
    ensure!((magic >> 8) & 0xff == 0x08, "{what} is not a uint8 idx file (type code {:#04x})", (magic >> 8) & 0xff);
    let rank = (magic & 0xff) as usize;
    ensure!((1..=4).contains(&rank), "{what} has an unsupported rank {rank}");
    (0..rank).map(|_| read_be_u32(r, what).map(|d| d as usize)).collect()
}

/// Find the images file of a folder of idx files: train-* first, then t10k-*, then a single one.
fn find_idx(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let images: Vec<&String> = names.iter().filter(|n| n.contains("idx3-ubyte")).collect();
    let pick = images
        .iter()
        .find(|n| n.starts_with("train"))
        .or_else(|| images.iter().find(|n| n.starts_with("t10k")))
        .or(if images.len() == 1 { images.first() } else { None })
        .with_context(|| {
            if images.is_empty() {
                format!("{} has no MNIST idx images file (*-images-idx3-ubyte[.gz])", dir.display())
            } else {
                format!("{} has several idx images files and none is named train-* or t10k-*", dir.display())
            }
        })?;
    let want = pick.replace("images", "labels").replace("idx3", "idx1");
    let want_plain = want.trim_end_matches(".gz").to_string();
    let labels = names.iter().find(|n| **n == want || **n == want_plain || **n == format!("{want_plain}.gz"));
    Ok((dir.join(pick.as_str()), labels.map(|l| dir.join(l))))
}

pub fn open_idx(dir: &Path, limit: Option<usize>) -> Result<Source> {
    let (images, labels_path) = find_idx(dir)?;
    let what = images.display().to_string();
    let mut r = open_maybe_gz(&images)?;
    let dims = idx_header(&mut r, &what)?;
    let (n, h, w) = match dims[..] {
        [n, h, w] => (n, h, w),
        _ => bail!("{what} has {} dimensions; MNIST images are N,H,W", dims.len()),
    };
    ensure!(n > 0 && h > 0 && w > 0, "{what} holds no images");
    check_side(&what, h, w)?;
    let mut messages = Vec::new();
    let (labels, names) = match &labels_path {
        Some(lp) => {
            let lwhat = lp.display().to_string();
            let mut lr = open_maybe_gz(lp)?;
            let ldims = idx_header(&mut lr, &lwhat)?;
            ensure!(ldims == [n], "{lwhat} has shape {ldims:?}, expected {n} labels for {what}");
            // n is the header's claim: read what is there rather than allocating n first.
            let mut raw = Vec::new();
            lr.by_ref().take(n as u64).read_to_end(&mut raw).with_context(|| format!("{lwhat} is unreadable"))?;
            ensure!(raw.len() == n, "{lwhat} is truncated: {} of {n} labels present", raw.len());
            let mut l: Vec<i64> = raw.into_iter().map(|v| v as i64).collect();
            let names = number_classes(&lwhat, &mut l, &mut messages)?;
            (Some(l), Some(names))
        }
        None => {
            messages.push(format!("no labels file next to {what}: the dataset is unlabelled"));
            (None, None)
        }
    };
    let take = limit.map_or(n, |l| l.min(n));
    let (rx, thread) = spawn_reader(move |tx| stream_records(tx, &mut r, &what, take, (h, w, 1, Layout::Hwc), labels));
    Ok(Source { total: Some(take as u64), names, messages, rx, thread: Some(thread) })
}

// ---------------------------------------------------------------------------------------------
// Decoding one item

/// Decode an item to an 8-bit grey or RGB image. The error names the item.
pub fn decode(item: &Item) -> Result<DynamicImage> {
    match &item.payload {
        Payload::File(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read image {}", p.display()))?;
            decode_bytes(&bytes).with_context(|| format!("cannot decode image {}", p.display()))
        }
        Payload::Bytes(b) => decode_bytes(b).with_context(|| format!("cannot decode image {}", item.name)),
        Payload::Raw { h, w, c, layout, data } => {
            let (h, w, c) = (*h, *w, *c);
            let hwc = match layout {
                Layout::Hwc => data.clone(),
                Layout::Chw => {
                    let mut out = vec![0u8; data.len()];
                    for ch in 0..c {
                        for i in 0..h * w {
                            out[i * c + ch] = data[ch * h * w + i];
                        }
                    }
                    out
                }
            };
            Ok(match c {
                1 => DynamicImage::ImageLuma8(image::GrayImage::from_raw(w as u32, h as u32, hwc).context("bad raw image size")?),
                _ => DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, hwc).context("bad raw image size")?),
            })
        }
    }
}

/// Decode one image file (PNG, JPEG, WebP) to 8-bit grey or RGB; the error names the file.
pub fn decode_file(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_bytes(&bytes).with_context(|| format!("cannot decode image {}", path.display()))
}

/// A JPEG decoder fills a cut-off scan with grey instead of failing: require the end-of-image
/// marker after the last start-of-scan (an embedded thumbnail's EOI comes before the main scan).
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(());
    }
    let eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    let complete = match eoi {
        Some(p) => !bytes[p..].windows(2).any(|w| w == [0xFF, 0xDA]),
        None => false,
    };
    ensure!(complete, "the JPEG is truncated (no end-of-image marker after its image data)");
    Ok(())
}

/// Decode an encoded image (PNG, JPEG, WebP) to 8-bit grey or RGB, within [`MAX_IMAGE_SIDE`] and
/// [`MAX_IMAGE_BYTES`].
pub fn decode_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    check_jpeg_complete(bytes)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!(
            "{e}: images larger than {MAX_IMAGE_SIDE} pixels a side or {} MiB decoded are refused",
            MAX_IMAGE_BYTES >> 20
        ),
        e => e.into(),
    })?;
    ensure!(img.width() > 0 && img.height() > 0, "the image is empty");
    Ok(match img {
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => img,
        other if other.color().channel_count() <= 2 => DynamicImage::ImageLuma8(other.to_luma8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    })
}

// ---------------------------------------------------------------------------------------------
// Synthetic inputs (benchmarks, tests)

/// Write `count` random `size` x `size` RGB PNGs into `out` (in `classes` subfolders when > 0),
/// in parallel. Returns the number of bytes written.
pub fn synth_pngs(out: &Path, count: usize, size: u32, classes: usize, seed: u64) -> Result<u64> {
    use rayon::prelude::*;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for k in 0..classes {
        std::fs::create_dir_all(out.join(format!("class{k:03}")))?;
    }
    let bytes: Result<Vec<u64>> = (0..count)
        .into_par_iter()
        .map(|i| {
            let mut s = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let img = image::RgbImage::from_fn(size, size, |x, y| {
                s = super::rng::splitmix64(s);
                // smooth-ish content with some noise so PNG compression is realistic
                let n = (s >> 59) as u8;
                image::Rgb([(x * 255 / size) as u8 ^ n, (y * 255 / size) as u8 ^ n, ((i * 37) % 256) as u8 ^ n])
            });
            let mut buf = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
            let p = if classes > 0 { out.join(format!("class{:03}", i % classes)).join(format!("{i:06}.png")) } else { out.join(format!("{i:06}.png")) };
            std::fs::write(&p, &buf).with_context(|| format!("cannot write {}", p.display()))?;
            Ok(buf.len() as u64)
        })
        .collect();
    Ok(bytes?.iter().sum())
}
