//! Decoded tensor → 8-bit RGB images, exactly as diffusers' `VaeImageProcessor.postprocess`
//! with `output_type="pil"` (spec §6.4).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;

/// `[B,3,H,W]` decoder output (roughly [-1,1]) → one `RgbImage` per batch entry.
///
/// Spec §6.4 / §1: `(x*0.5 + 0.5).clamp(0,1)` is evaluated in the tensor's own dtype (in bf16
/// the `+0.5` rounds to bf16; `*0.5` is exact), then the value is widened to f32, multiplied by
/// 255 in f32 and rounded half-to-even (numpy `.round()`) before the cast to u8.
pub fn to_rgb8(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let dims = decoded.dims();
    if dims.len() != 4 || dims[1] != 3 {
        bail!("to_rgb8: expected a [B,3,H,W] tensor, got shape {dims:?}");
    }
    let (b, _, h, w) = (dims[0], dims[1], dims[2], dims[3]);
    // NaN would become black pixels and ∞ white ones: a broken image, written as if it were
    // fine.
    if !crate::ops::all_finite(decoded)? {
        bail!(
            "the VAE decode produced NaN or infinite values — the VAE weights or the VAE dtype \
             may be broken (try --vae-dtype f32)"
        );
    }
    // Two separate elementwise ops, as torch does: each rounds to the tensor dtype.
    let x = ((decoded * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    // HWC order on the device, then one transfer to the host.
    let x = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
        .context("to_rgb8: copying the image to the host")?;
    let per_image = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = x[i * per_image..(i + 1) * per_image]
                .iter()
                .map(|&v| (v * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes).context("to_rgb8: building the RgbImage")
        })
        .collect()
}
