//! Images out: samples in [-1, 1] as 8-bit pixels, PNG-ready buffers and grids (like torchvision's
//! `save_image` and `make_grid`).

use anyhow::{bail, Result};

/// Images in [-1, 1] -> u8 like torchvision's save_image: round((x+1)/2 * 255), clamped.
pub fn to_u8(v: f32) -> u8 {
    (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8
}

/// One (C, H, W) image in [-1, 1] as an 8-bit PNG-ready image (C = 1 or 3).
pub(crate) fn image_buffer(chw: &[f32], c: usize, h: usize, w: usize) -> Result<image::DynamicImage> {
    Ok(match c {
        1 => image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w as u32, h as u32, chw.iter().map(|&v| to_u8(v)).collect()).unwrap(),
        ),
        3 => {
            let mut buf = Vec::with_capacity(h * w * 3);
            for p in 0..h * w {
                for ch in 0..3 {
                    buf.push(to_u8(chw[ch * h * w + p]));
                }
            }
            image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, buf).unwrap())
        }
        _ => bail!("PNG output needs 1 or 3 channels, the model makes {c}: use --format npy or npz"),
    })
}

/// A grid like torchvision's make_grid (nrow = ceil(sqrt(N)), 2-pixel black padding).
pub fn grid(images: &[f32], n: usize, c: usize, h: usize, w: usize) -> Result<image::DynamicImage> {
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (gh, gw) = (rows * (h + pad) + pad, cols * (w + pad) + pad);
    let mut g = vec![-1.0f32; c * gh * gw];
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    g[ch * gh * gw + (pad + r * (h + pad) + y) * gw + pad + col * (w + pad) + x] =
                        images[((i * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    image_buffer(&g, c, gh, gw)
}
