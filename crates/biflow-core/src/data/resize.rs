//! `--size N`: resize the shorter side to N, then center crop to N x N, as the reference ADM
//! (`center_crop_arr`) and TARFlow pipelines do.
//!
//! The filter, exactly:
//! 1. while the shorter side is at least 2N, halve both sides with a 2x2 box filter (the mean of each
//!    2x2 block; an odd last row or column is dropped), as ADM's repeated `resize(.., BOX)`;
//! 2. scale so that the shorter side is N (the longer side `round(side * N / shorter)`) with a
//!    Catmull-Rom bicubic filter (the `image` crate's `CatmullRom`, whose support widens when
//!    downscaling, so it antialiases like PIL's `BICUBIC`);
//! 3. crop the center N x N (offset `(side - N) / 2`, rounded down).
//!
//! Images whose both sides are already N are left untouched.

use image::imageops::{self, FilterType};
use image::{DynamicImage, GenericImageView, ImageBuffer, Pixel};

pub const DESCRIPTION: &str = "shorter side to N (2x2 box halving while >= 2N, then Catmull-Rom bicubic), then center crop N x N";

fn halve<P: Pixel<Subpixel = u8>>(img: &ImageBuffer<P, Vec<u8>>) -> ImageBuffer<P, Vec<u8>> {
    let (w, h) = (img.width() / 2, img.height() / 2);
    let c = P::CHANNEL_COUNT as usize;
    let src = img.as_raw();
    let sw = img.width() as usize;
    let mut out = vec![0u8; w as usize * h as usize * c];
    for y in 0..h as usize {
        let r0 = 2 * y * sw * c;
        let r1 = (2 * y + 1) * sw * c;
        for x in 0..w as usize {
            for k in 0..c {
                let a = src[r0 + 2 * x * c + k] as u32;
                let b = src[r0 + (2 * x + 1) * c + k] as u32;
                let d = src[r1 + 2 * x * c + k] as u32;
                let e = src[r1 + (2 * x + 1) * c + k] as u32;
                out[(y * w as usize + x) * c + k] = ((a + b + d + e + 2) / 4) as u8;
            }
        }
    }
    ImageBuffer::from_raw(w, h, out).expect("buffer size matches")
}

fn resize_buf<P: Pixel<Subpixel = u8> + 'static>(mut img: ImageBuffer<P, Vec<u8>>, n: u32) -> ImageBuffer<P, Vec<u8>> {
    if img.width() == n && img.height() == n {
        return img;
    }
    while img.width().min(img.height()) >= 2 * n {
        img = halve(&img);
    }
    let (w, h) = (img.width() as f64, img.height() as f64);
    let scale = n as f64 / w.min(h);
    let nw = ((w * scale).round() as u32).max(n);
    let nh = ((h * scale).round() as u32).max(n);
    if (nw, nh) != (img.width(), img.height()) {
        img = imageops::resize(&img, nw, nh, FilterType::CatmullRom);
    }
    let (x0, y0) = ((nw - n) / 2, (nh - n) / 2);
    imageops::crop_imm(&img, x0, y0, n, n).to_image()
}

/// Resize and center crop an 8-bit grey or RGB image to `n` x `n`.
pub fn resize_center_crop(img: DynamicImage, n: u32) -> DynamicImage {
    match img {
        DynamicImage::ImageLuma8(b) => DynamicImage::ImageLuma8(resize_buf(b, n)),
        DynamicImage::ImageRgb8(b) => DynamicImage::ImageRgb8(resize_buf(b, n)),
        other => {
            let (_, _) = other.dimensions();
            DynamicImage::ImageRgb8(resize_buf(other.to_rgb8(), n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn shorter_side_then_center_crop() {
        // 8 wide, 4 high, left half black, right half white: the center crop keeps the edge.
        let img = GrayImage::from_fn(8, 4, |x, _| Luma([if x < 4 { 0 } else { 255 }]));
        let out = resize_center_crop(DynamicImage::ImageLuma8(img), 2).to_luma8();
        assert_eq!(out.dimensions(), (2, 2));
        // after halving: 4x2 -> crop x 1..3: one dark, one bright column
        assert!(out.get_pixel(0, 0)[0] < 64, "{:?}", out);
        assert!(out.get_pixel(1, 0)[0] > 192, "{:?}", out);
    }

    #[test]
    fn upscales_small_images_and_keeps_exact_sizes() {
        let img = GrayImage::from_pixel(3, 5, Luma([100]));
        let out = resize_center_crop(DynamicImage::ImageLuma8(img), 6).to_luma8();
        assert_eq!(out.dimensions(), (6, 6));
        assert!(out.pixels().all(|p| p[0] == 100));
        let same = GrayImage::from_fn(4, 4, |x, y| Luma([(x * 4 + y) as u8]));
        let out = resize_center_crop(DynamicImage::ImageLuma8(same.clone()), 4).to_luma8();
        assert_eq!(out, same);
    }

    #[test]
    fn box_halving_averages() {
        let img = GrayImage::from_fn(4, 4, |x, y| Luma([if (x + y) % 2 == 0 { 0 } else { 200 }]));
        let h = halve(&img);
        assert_eq!(h.dimensions(), (2, 2));
        assert!(h.pixels().all(|p| p[0] == 100));
    }
}
