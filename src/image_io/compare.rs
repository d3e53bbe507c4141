//! How far apart two images are (`flux2-klein compare`, the tests' golden-image checks), and
//! a picture of where they differ.

use anyhow::{bail, Result};
use image::RgbImage;

/// How far apart two images of the same size are, per 8-bit channel value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageDiff {
    /// Largest absolute difference of one channel value (0–255).
    pub max: u8,
    /// Mean absolute difference over all channel values.
    pub mean: f64,
    /// Peak signal-to-noise ratio in dB (peak 255); infinite for identical images.
    pub psnr: f64,
    /// Pixels with any channel different.
    pub differing_pixels: usize,
}

/// Compares two RGB images of the same size (what golden-image checks need).
pub fn compare_images(a: &RgbImage, b: &RgbImage) -> Result<ImageDiff> {
    compare_pixels(a.dimensions(), a.as_raw(), b.dimensions(), b.as_raw(), 3)
}

/// Compares two images of the same size given as interleaved 8-bit samples with `channels`
/// per pixel (3 = RGB, 4 = RGBA: the alpha counts like a colour channel).
pub fn compare_pixels(
    size_a: (u32, u32),
    a: &[u8],
    size_b: (u32, u32),
    b: &[u8],
    channels: usize,
) -> Result<ImageDiff> {
    if size_a != size_b {
        bail!(
            "the images differ in size: {}x{} vs {}x{}",
            size_a.0,
            size_a.1,
            size_b.0,
            size_b.1
        );
    }
    if a.len() != b.len() || channels == 0 || !a.len().is_multiple_of(channels) {
        bail!("the images have different pixel layouts");
    }
    let (mut max, mut sum, mut sq) = (0u8, 0u64, 0u64);
    let mut differing_pixels = 0;
    for (pa, pb) in a.chunks_exact(channels).zip(b.chunks_exact(channels)) {
        let mut pixel_differs = false;
        for (x, y) in pa.iter().zip(pb.iter()) {
            let d = x.abs_diff(*y);
            max = max.max(d);
            sum += d as u64;
            sq += (d as u64) * (d as u64);
            pixel_differs |= d != 0;
        }
        differing_pixels += pixel_differs as usize;
    }
    let n = a.len().max(1) as f64;
    let mse = sq as f64 / n;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    Ok(ImageDiff {
        max,
        mean: sum as f64 / n,
        psnr,
        differing_pixels,
    })
}

/// Where two same-size images differ: each pixel's per-channel |a − b| (an alpha difference
/// added to all three colours), scaled so that the largest difference is 255 — a difference of
/// one level is as visible as a large one; identical images give black.
pub fn diff_image(size: (u32, u32), a: &[u8], b: &[u8], channels: usize) -> Result<RgbImage> {
    let expected = size.0 as usize * size.1 as usize * channels;
    if a.len() != expected || b.len() != expected || !(3..=4).contains(&channels) {
        bail!("the images have different pixel layouts");
    }
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
        .max(1) as u32;
    let mut out = RgbImage::new(size.0, size.1);
    for ((pa, pb), px) in a
        .chunks_exact(channels)
        .zip(b.chunks_exact(channels))
        .zip(out.pixels_mut())
    {
        let alpha = if channels == 4 {
            pa[3].abs_diff(pb[3])
        } else {
            0
        };
        for c in 0..3 {
            let d = pa[c].abs_diff(pb[c]).max(alpha) as u32;
            px.0[c] = (d * 255 / max) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_counts_and_the_diff_is_amplified() {
        let a = [10u8, 20, 30, 255, 0, 0, 0, 255];
        let mut b = a;
        b[3] = 254;
        let d = compare_pixels((2, 1), &a, (2, 1), &b, 4).unwrap();
        assert_eq!((d.max, d.differing_pixels), (1, 1));
        let img = diff_image((2, 1), &a, &b, 4).unwrap();
        assert_eq!(img.as_raw(), &[255, 255, 255, 0, 0, 0]);
        assert!(compare_pixels((2, 1), &a, (1, 2), &b, 4).is_err());
    }
}
