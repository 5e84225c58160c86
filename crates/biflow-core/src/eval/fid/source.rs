//! Where the images to score come from. Every source is a streaming iterator of image batches, so a model
//! run (sampling) can plug in without ever holding all images in memory.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::preprocess::Image;
use crate::io::npy::{Array, DType, Npz};

/// A stream of RGB images.
pub trait ImageSource: Send {
    /// A short description for messages ("image folder DIR", ...).
    fn describe(&self) -> String;
    /// How many images the source will give, when known.
    fn len(&self) -> Option<usize>;
    /// The next batch of at most `max` images, or `None` when the source is exhausted.
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>>;
}

/// File extensions of an image folder (those pytorch-fid reads that the image decoder supports).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// The images of an image file, a folder of images or an .npz array, and their names (file names;
/// indices for an array).
pub(crate) fn open_images(spec: &str) -> Result<(Box<dyn ImageSource>, Vec<String>)> {
    let path = Path::new(spec);
    ensure!(path.exists(), "{spec} does not exist");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if path.is_dir() {
        let s = FolderSource::open(path)?;
        let names = s.names();
        Ok((Box::new(s), names))
    } else if ext == "npz" {
        let s = ArraySource::open_npz(path)?;
        let n = s.len().unwrap_or(0);
        Ok((Box::new(s), (0..n).map(|i| format!("{i}")).collect()))
    } else if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        let s = FolderSource::file(path)?;
        Ok((Box::new(s), vec![path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()]))
    } else {
        bail!("{spec}: expected an image file ({}), a folder of images or an .npz array", IMAGE_EXTENSIONS.join(", "))
    }
}

/// Images (RGB, HWC in [0, 1]) of one size as a batch (N, 3, H, W) in [-1, 1].
pub(crate) fn images_tensor(images: &[Image], device: &candle_core::Device) -> Result<candle_core::Tensor> {
    let (h, w) = (images[0].h, images[0].w);
    let mut v = Vec::with_capacity(images.len() * 3 * h * w);
    for im in images {
        for c in 0..3 {
            v.extend(im.data.iter().skip(c).step_by(3).map(|x| 2.0 * x - 1.0));
        }
    }
    Ok(candle_core::Tensor::from_vec(v, (images.len(), 3, h, w), device)?)
}

/// The images of a folder (not recursive, as pytorch-fid), in name order, decoded in parallel.
pub struct FolderSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    pos: usize,
}

impl FolderSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let p = e?.path();
            let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
            if p.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                files.push(p);
            }
        }
        ensure!(
            !files.is_empty(),
            "the folder {} holds no images (looked for {} files, not in subfolders)",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
        files.sort();
        Ok(FolderSource { dir: dir.to_path_buf(), files, pos: 0 })
    }

    /// One image file.
    pub fn file(path: &Path) -> Result<Self> {
        ensure!(path.is_file(), "{} does not exist", path.display());
        Ok(FolderSource { dir: path.to_path_buf(), files: vec![path.to_path_buf()], pos: 0 })
    }

    /// The images' file names, in order.
    pub fn names(&self) -> Vec<String> {
        self.files.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect()
    }
}

impl ImageSource for FolderSource {
    fn describe(&self) -> String {
        format!("image folder {}", self.dir.display())
    }
    fn len(&self) -> Option<usize> {
        Some(self.files.len())
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>> {
        if self.pos >= self.files.len() {
            return Ok(None);
        }
        let end = (self.pos + max).min(self.files.len());
        let batch = self.files[self.pos..end]
            .par_iter()
            .map(|p| {
                let (rgb, h, w) = super::preprocess::load_rgb(p)?;
                Image::from_rgb8(&rgb, h, w)
            })
            .collect::<Result<Vec<_>>>()?;
        self.pos = end;
        Ok(Some(batch))
    }
}

/// Images stored in an array: uint8 `N,H,W,C` (the ADM evaluator's reference batches, `arr_0`), uint8
/// `N,C,H,W`, `N,H,W` (grey), or float `N,C,H,W` in [-1, 1] (biflow's own sample arrays). One or three
/// channels (grey is repeated to RGB, as PIL's `convert('RGB')`).
pub struct ArraySource {
    what: String,
    array: Array,
    /// (n, h, w, c, channels_last)
    layout: (usize, usize, usize, usize, bool),
    pos: usize,
}

impl ArraySource {
    pub fn new(array: Array, what: String) -> Result<Self> {
        let s = array.shape.clone();
        let layout = match s.len() {
            3 => (s[0], s[1], s[2], 1, true),
            4 if matches!(s[3], 1 | 3) && !matches!(s[1], 1 | 3) => (s[0], s[1], s[2], s[3], true),
            4 if matches!(s[1], 1 | 3) => (s[0], s[2], s[3], s[1], false),
            4 if matches!(s[3], 1 | 3) => (s[0], s[1], s[2], s[3], true),
            _ => bail!("{what}: an image array must be N,H,W,C or N,C,H,W with 1 or 3 channels, or N,H,W; got shape {s:?}"),
        };
        ensure!(layout.0 > 0, "{what} holds no images");
        ensure!(layout.1 > 0 && layout.2 > 0, "{what}: images of shape {s:?} have no pixels");
        ensure!(
            matches!(array.dtype, DType::U8 | DType::F32 | DType::F64 | DType::F16),
            "{what}: images must be uint8 (0..255) or float (-1..1), not {}",
            array.dtype.name()
        );
        Ok(ArraySource { what, array, layout, pos: 0 })
    }

    /// An `.npz` of images: `arr_0`, else its only member.
    pub fn open_npz(path: &Path) -> Result<Self> {
        let mut npz = Npz::open(path)?;
        let names = npz.names();
        let name = if names.iter().any(|n| n == "arr_0") {
            "arr_0".to_string()
        } else if names.len() == 1 {
            names[0].clone()
        } else {
            bail!("{} holds neither images ('arr_0') nor statistics ('mu', 'sigma'); it has: {}", path.display(), names.join(", "))
        };
        let a = npz.read(&name)?;
        ArraySource::new(a, format!("{} ({name})", path.display()))
    }
}

impl ImageSource for ArraySource {
    fn describe(&self) -> String {
        format!("image array {}", self.what)
    }
    fn len(&self) -> Option<usize> {
        Some(self.layout.0)
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>> {
        let (n, h, w, c, last) = self.layout;
        if self.pos >= n {
            return Ok(None);
        }
        let end = (self.pos + max).min(n);
        let per = h * w * c;
        let a = &self.array;
        let es = a.dtype.size();
        let batch = (self.pos..end)
            .into_par_iter()
            .map(|i| {
                let raw = &a.data[i * per * es..(i + 1) * per * es];
                let val = |k: usize| -> f32 {
                    match a.dtype {
                        DType::U8 => raw[k] as f32 / 255.0,
                        DType::F32 => (f32::from_le_bytes(raw[4 * k..4 * k + 4].try_into().unwrap()) + 1.0) * 0.5,
                        DType::F64 => ((f64::from_le_bytes(raw[8 * k..8 * k + 8].try_into().unwrap()) + 1.0) * 0.5) as f32,
                        _ => (half::f16::from_le_bytes([raw[2 * k], raw[2 * k + 1]]).to_f32() + 1.0) * 0.5,
                    }
                };
                let mut data = vec![0f32; h * w * 3];
                for y in 0..h {
                    for x in 0..w {
                        for ch in 0..3 {
                            let sc = if c == 1 { 0 } else { ch };
                            let k = if last { (y * w + x) * c + sc } else { (sc * h + y) * w + x };
                            // Floats are clamped to the image range, as saving them as images would.
                            data[(y * w + x) * 3 + ch] = val(k).clamp(0.0, 1.0);
                        }
                    }
                }
                Image { h, w, data }
            })
            .collect();
        self.pos = end;
        Ok(Some(batch))
    }
}

/// A source truncated to its first `limit` images.
pub struct Limited<S: ImageSource> {
    inner: S,
    left: usize,
}

impl<S: ImageSource> Limited<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Limited { inner, left: limit }
    }
}

impl<S: ImageSource> ImageSource for Limited<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn len(&self) -> Option<usize> {
        Some(self.inner.len().map_or(self.left, |n| n.min(self.left)))
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>> {
        if self.left == 0 {
            return Ok(None);
        }
        let b = self.inner.next_batch(max.min(self.left))?;
        if let Some(b) = &b {
            self.left -= b.len();
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy::write_npz;

    #[test]
    fn npz_images_in_every_layout_read_the_same() {
        let (n, h, w) = (3usize, 5usize, 4usize);
        let nhwc: Vec<u8> = (0..n * h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imgs.npz");
        write_npz(&p, &[("arr_0", &Array::from_u8(vec![n, h, w, 3], nhwc.clone()).unwrap())]).unwrap();
        let mut s = ArraySource::open_npz(&p).unwrap();
        assert_eq!(s.len(), Some(3));
        let a = s.next_batch(2).unwrap().unwrap();
        let b = s.next_batch(2).unwrap().unwrap();
        assert!(s.next_batch(2).unwrap().is_none());
        assert_eq!((a.len(), b.len()), (2, 1));
        let per = h * w * 3;
        let want = Image::from_rgb8(&nhwc[per..2 * per], h, w).unwrap();
        assert_eq!(a[1].data, want.data);
        // The same pixels as float N,C,H,W in [-1, 1].
        let mut nchw = vec![0f32; n * per];
        for i in 0..n {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        nchw[((i * 3 + c) * h + y) * w + x] = nhwc[i * per + (y * w + x) * 3 + c] as f32 / 127.5 - 1.0;
                    }
                }
            }
        }
        let mut f = ArraySource::new(Array::from_f32(vec![n, 3, h, w], &nchw).unwrap(), "floats".into()).unwrap();
        let fb = f.next_batch(8).unwrap().unwrap();
        for (x, y) in fb[1].data.iter().zip(&want.data) {
            assert!((x - y).abs() < 1e-6);
        }
        // Limited sources stop early.
        let mut l = Limited::new(ArraySource::open_npz(&p).unwrap(), 2);
        assert_eq!(l.len(), Some(2));
        assert_eq!(l.next_batch(8).unwrap().unwrap().len(), 2);
        assert!(l.next_batch(8).unwrap().is_none());
        // Not images.
        let bad = Array::from_f32(vec![2, 7], &[0.0; 14]).unwrap();
        assert!(ArraySource::new(bad, "bad".into()).is_err());
    }

    #[test]
    fn empty_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = FolderSource::open(dir.path()).err().unwrap();
        assert!(format!("{e:#}").contains("holds no images"));
    }
}

/// Samples of a model run (G's for a distilled run, else exact), made batch by batch and quantised to 8 bits as `biflow sample` would
/// save them; only one batch is ever held, so 50,000 samples need no more memory than one.
pub struct RunSource {
    sampler: crate::jobs::sample::Sampler,
    what: String,
}

impl RunSource {
    pub fn open(run: &Path, method: Option<String>, num: usize, seed: u64, guidance: f64, device: &candle_core::Device) -> Result<Self> {
        let o = crate::jobs::sample::SampleOptions::streaming(&run.display().to_string(), method, num, seed, guidance);
        let sampler = crate::jobs::sample::Sampler::new(&o, device)?;
        let (c, _, _) = sampler.output_shape();
        ensure!(c == 1 || c == 3, "FID needs grey or RGB images; the model at {} makes {c} channels", run.display());
        let what = format!("{num} {} samples of {}", sampler.method(), run.display());
        Ok(RunSource { sampler, what })
    }
}

impl ImageSource for RunSource {
    fn describe(&self) -> String {
        self.what.clone()
    }
    fn len(&self) -> Option<usize> {
        Some(self.sampler.len())
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Image>>> {
        let Some(x) = self.sampler.next_batch(max, |_| Ok(()))? else { return Ok(None) };
        images_of(&x).map(Some)
    }
}

/// Images (N, C, H, W) in [-1, 1], grey or RGB, as FID reads them: quantised to 8 bits as a PNG
/// would store them, grey repeated to RGB.
pub(crate) fn images_of(x: &candle_core::Tensor) -> Result<Vec<Image>> {
    let (n, c, h, w) = x.dims4()?;
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    (0..n)
        .map(|i| {
            let rgb: Vec<u8> = (0..h * w)
                .flat_map(|p| (0..3).map(move |ch| (ch, p)))
                .map(|(ch, p)| crate::io::image::to_u8(v[(i * c + ch.min(c - 1)) * h * w + p]))
                .collect();
            Image::from_rgb8(&rgb, h, w)
        })
        .collect()
}
