//! Images into the network as pytorch-fid feeds it: RGB in [0, 1], bilinear resize to 299 x 299
//! (align_corners=False), scaled to [-1, 1], NHWC.

use anyhow::{ensure, Context, Result};

use super::inception::{Act, SIZE};

/// An RGB image as pytorch-fid's `ToTensor` gives it: `HWC` float32 in [0, 1].
#[derive(Clone, Debug)]
pub struct Image {
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Image {
    /// From RGB uint8 `HWC` pixels: `v / 255` in float32, as `ToTensor`.
    pub fn from_rgb8(rgb: &[u8], h: usize, w: usize) -> Result<Image> {
        ensure!(h > 0 && w > 0, "an image has no pixels");
        ensure!(rgb.len() == h * w * 3, "an image of {h}x{w} RGB needs {} bytes, got {}", h * w * 3, rgb.len());
        Ok(Image { h, w, data: rgb.iter().map(|&v| v as f32 / 255.0).collect() })
    }
}

/// pytorch-fid preprocessing of one RGB image (`HWC` uint8): `/255`, then [`preprocess_image`].
pub fn preprocess(rgb: &[u8], h: usize, w: usize) -> Result<Act> {
    Ok(preprocess_image(&Image::from_rgb8(rgb, h, w)?))
}

/// Bilinear resize to 299x299 (`align_corners=False`, no antialias, as `F.interpolate`), then `2x - 1`.
/// Float32 throughout, with PyTorch's index and weight arithmetic.
pub fn preprocess_image(img: &Image) -> Act {
    let (h, w) = (img.h, img.w);
    // Source index and weights along one axis, as PyTorch's upsample_bilinear2d (float maths).
    fn axis(inp: usize, out: usize) -> Vec<(usize, usize, f32, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|i| {
                let real = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real.floor() as usize).min(inp - 1);
                let lambda = (real - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - lambda, lambda)
            })
            .collect()
    }
    let ys = axis(h, SIZE);
    let xs = axis(w, SIZE);
    let src = &img.data;
    let mut out = Act::zeros(SIZE, SIZE, 3);
    for (oy, &(y0, y1, wy0, wy1)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in xs.iter().enumerate() {
            for c in 0..3 {
                let p = |y: usize, x: usize| src[(y * w + x) * 3 + c];
                let v = wy0 * (wx0 * p(y0, x0) + wx1 * p(y0, x1)) + wy1 * (wx0 * p(y1, x0) + wx1 * p(y1, x1));
                out.data[(oy * SIZE + ox) * 3 + c] = 2.0 * v - 1.0;
            }
        }
    }
    out
}

/// Load image files' pixels as RGB for [`preprocess`].
pub fn load_rgb(path: &std::path::Path) -> Result<(Vec<u8>, usize, usize)> {
    let img = image::open(path).with_context(|| format!("cannot decode image {}", path.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    Ok((img.into_raw(), h as usize, w as usize))
}
