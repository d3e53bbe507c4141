//! The stages diffusers 0.42.1's `Flux2KleinInpaintPipeline.__call__` adds to the plain
//! pipeline (spec-wave2 §4): the init image and mask preprocessing (`Flux2ImageProcessor` with
//! its `mask_processor`), `get_timesteps`, `scheduler.scale_noise`, the per-step blend of the
//! kept region and, with `padding_mask_crop`, `apply_overlay`. Image-to-image is the same
//! pipeline with an all-white mask.
//!
//! The rest is the plain pipeline's stages: the init image is VAE-encoded by
//! [`super::stages::prepare_image_latents`] as the first condition image (T = 10, before the
//! references, as diffusers passes `[image_latents, *references]`), and its packed latents are
//! also what the blend keeps; the loop is [`super::stages::denoise_with`].

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::image_io;
use crate::scheduler::Schedule;

/// diffusers' default `strength`.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The init image of an inpainting / image-to-image request.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: std::sync::Arc<DynamicImage>,
    pub name: String,
    /// White = repaint, black = keep; `None` = all white (image-to-image).
    pub mask: Option<super::Reference>,
    /// In [0, 1]: how much of the schedule runs (`get_timesteps`).
    pub strength: f64,
    /// diffusers' `padding_mask_crop`: inpaint only a crop around the mask (with this margin)
    /// and paste the result back into the init image. Needs a mask.
    pub padding_mask_crop: Option<u32>,
}

/// Checks `strength` as diffusers' `check_inputs` does (and refuses NaN, which Python's
/// comparisons let through).
pub fn check_strength(strength: f64) -> Result<()> {
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        bail!("strength must be a number in [0, 1], got {strength}");
    }
    Ok(())
}

/// The smallest side of an init image in pixels: its latents must cover at least one
/// 64 px square (diffusers' inpainting examples; [`prepare_init`] refuses less after the
/// resize). Front ends check the image as given, before any work.
pub const MIN_INIT_SIDE: u32 = 64;

/// Checks an init image's size as given (`MIN_INIT_SIDE` on both sides).
pub fn check_init_size(width: u32, height: u32) -> Result<()> {
    if width < MIN_INIT_SIDE || height < MIN_INIT_SIDE {
        bail!("{width}x{height} px: both sides must be at least {MIN_INIT_SIDE} px");
    }
    Ok(())
}

/// `get_timesteps`: `init_timestep = min(steps · strength, steps)`,
/// `t_start = int(max(steps − init_timestep, 0))` (Python floats, truncation). The first
/// schedule index that runs; an error when no step is left.
pub fn t_start(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let n = steps as f64;
    let init_timestep = (n * strength).min(n);
    let t_start = (n - init_timestep).max(0.0) as usize;
    if t_start >= steps {
        bail!(
            "strength {strength} leaves none of the {steps} steps to run (diffusers' \
             get_timesteps): use a strength greater than 0 ({} runs 1 step of {steps})",
            1.0 / n
        );
    }
    Ok(t_start)
}

/// The schedule from `t_start` on (`scheduler.timesteps[t_start:]` with `set_begin_index`).
pub fn truncate_schedule(schedule: &Schedule, t_start: usize) -> Schedule {
    Schedule {
        timesteps: schedule.timesteps[t_start..].to_vec(),
        sigmas: schedule.sigmas[t_start..].to_vec(),
        mu: schedule.mu,
    }
}

/// `FlowMatchEulerDiscreteScheduler.scale_noise`: `σ·noise + (1 − σ)·sample`, with σ cast to
/// the sample's dtype first (`sigmas.to(dtype=sample.dtype)`) and every op rounded in it.
pub fn scale_noise(sample: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let dtype = sample.dtype();
    let device = sample.device();
    let sigma_t = Tensor::new(sigma, device)?.to_dtype(dtype)?;
    // `1.0 - sigma` on a tensor of the sample's dtype: computed in f32, rounded once.
    let sigma_r = sigma_t.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let one_minus = Tensor::new(1.0f32 - sigma_r, device)?.to_dtype(dtype)?;
    let a = noise.broadcast_mul(&sigma_t)?;
    let b = sample.broadcast_mul(&one_minus)?;
    Ok((a + b)?)
}

/// The per-step blend of `__call__`: `(1 − mask)·init + mask·latents` in the latents' dtype
/// (`mask` `[1, N, 1]`).
pub fn blend(latents: &Tensor, init: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let keep = mask.affine(-1.0, 1.0)?;
    Ok((init.broadcast_mul(&keep)? + latents.broadcast_mul(mask)?)?)
}

/// The host-side part of an inpainting request, computed before any model work.
#[derive(Debug, Clone)]
pub struct PreparedInit {
    /// The init image as the VAE sees it (output size).
    pub pixels: RgbImage,
    /// Output size (the init image's, floored to 16).
    pub width: usize,
    pub height: usize,
    /// The mask on the packed latent grid, row-major `(H/16)·(W/16)` values in [0, 1].
    pub mask: Vec<f32>,
    /// With `padding_mask_crop`: what `apply_overlay` needs.
    pub overlay: Option<Overlay>,
}

/// `apply_overlay`'s inputs.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// The init image before cropping (after the 1024² cap).
    pub original: RgbImage,
    /// The mask as given, in grey (`mask.convert("L")`).
    pub mask: image::GrayImage,
    /// (x1, y1, x2, y2) of `get_crop_region`.
    pub crop: (u32, u32, u32, u32),
}

/// `__call__` step 2 and the mask processor: the init image capped at 1024² pixels (LANCZOS),
/// the output size floored to 16, the init image (and the mask) cropped with
/// `padding_mask_crop` and resized to that size, the mask in grey, binarized at 0.5 and
/// bilinearly resized to the latent grid (`prepare_mask_latents`).
pub fn prepare_init(init: &InitImage) -> Result<PreparedInit> {
    check_strength(init.strength)?;
    let mut original = image_io::to_rgb_like_pillow(&init.image)
        .with_context(|| format!("init image {}", init.name))?;
    if let Some((w, h)) = image_io::reference_resize_target(original.width(), original.height()) {
        original = image_io::resize_lanczos(&original, w, h)?;
    }
    let width = super::floor_to_multiple_of_16(original.width() as usize);
    let height = super::floor_to_multiple_of_16(original.height() as usize);
    if width < 64 || height < 64 {
        bail!(
            "init image {} is {}x{} px: both sides must be at least 64 px",
            init.name,
            original.width(),
            original.height()
        );
    }
    let (w, h) = (width as u32, height as u32);
    let mask_rgb = match &init.mask {
        Some(m) => Some(
            image_io::to_rgb_like_pillow(&m.image).with_context(|| format!("mask {}", m.name))?,
        ),
        None => None,
    };
    if init.padding_mask_crop.is_some() && mask_rgb.is_none() {
        bail!("padding_mask_crop needs a mask");
    }
    let crop = match (init.padding_mask_crop, &mask_rgb) {
        (Some(pad), Some(m)) => Some(get_crop_region(&to_grey(m), w, h, pad)?),
        _ => None,
    };
    // `preprocess`: crop, resize ("fill" with a crop, else "default"), then RGB / grey.
    let process = |img: &RgbImage| -> Result<RgbImage> {
        match crop {
            Some((x1, y1, x2, y2)) => resize_and_fill(&crop_image(img, x1, y1, x2, y2), w, h),
            None => resize_default(img, w, h),
        }
    };
    let pixels = process(&original)?;
    let (gh, gw) = (height / 16, width / 16);
    let mask = match &mask_rgb {
        None => vec![1.0; gh * gw],
        Some(m) => {
            let grey = to_grey(&process(m)?);
            // pil_to_numpy (/255 in f32), binarize: < 0.5 → 0, ≥ 0.5 → 1.
            let bin: Vec<f32> = grey
                .as_raw()
                .iter()
                .map(|&v| {
                    if (v as f32 / 255.0f32) < 0.5 {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            bilinear(&bin, height, width, gh, gw)
        }
    };
    let overlay = match (crop, &init.mask) {
        (Some(crop), Some(m)) => {
            let mask = to_grey(&image_io::to_rgb_like_pillow(&m.image)?);
            if mask.dimensions() != original.dimensions() {
                bail!(
                    "with padding_mask_crop the mask must have the init image's size ({}x{}), \
                     it is {}x{}",
                    original.width(),
                    original.height(),
                    mask.width(),
                    mask.height()
                );
            }
            Some(Overlay {
                original,
                mask,
                crop,
            })
        }
        _ => None,
    };
    Ok(PreparedInit {
        pixels,
        width,
        height,
        mask,
        overlay,
    })
}

/// The packed mask `[1, N, 1]` in `dtype` (values 0, ¼, ½, ¾, 1 are exact in any dtype).
pub fn mask_tensor(mask: &[f32], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(
        Tensor::from_vec(mask.to_vec(), (1, mask.len(), 1), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?,
    )
}

/// Pillow's `convert("L")` of RGB: `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`.
fn to_grey(img: &RgbImage) -> image::GrayImage {
    let data = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    image::GrayImage::from_raw(img.width(), img.height(), data).expect("same size")
}

/// `resize(..., resize_mode="default")`: LANCZOS to exactly `w×h` (a copy when the size
/// already matches, as Pillow).
fn resize_default(img: &RgbImage, w: u32, h: u32) -> Result<RgbImage> {
    if img.dimensions() == (w, h) {
        return Ok(img.clone());
    }
    image_io::resize_lanczos(img, w, h)
}

/// `Image.crop((x1, y1, x2, y2))`: pixels outside the image are black.
fn crop_image(img: &RgbImage, x1: u32, y1: u32, x2: u32, y2: u32) -> RgbImage {
    let mut out = RgbImage::new(x2 - x1, y2 - y1);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (sx, sy) = (x + x1, y + y1);
        if sx < img.width() && sy < img.height() {
            *p = *img.get_pixel(sx, sy);
        }
    }
    out
}

/// `VaeImageProcessor._resize_and_fill`: LANCZOS to fit `w×h` keeping the aspect ratio,
/// centred on black, the bars filled with the edge rows (columns) stretched:
/// `resized.resize((w, bar), box=(0, 0, w, 0))` (Pillow's default filter) and its mirror at
/// the far edge.
fn resize_and_fill(img: &RgbImage, w: u32, h: u32) -> Result<RgbImage> {
    let (iw, ih) = (img.width() as u64, img.height() as u64);
    let ratio = w as f64 / h as f64;
    let src_ratio = iw as f64 / ih as f64;
    let src_w = if ratio < src_ratio {
        w
    } else {
        (iw * h as u64 / ih) as u32
    };
    let src_h = if ratio >= src_ratio {
        h
    } else {
        (ih * w as u64 / iw) as u32
    };
    if src_w == 0 || src_h == 0 {
        bail!("padding_mask_crop: the crop region ({iw}x{ih}) is too thin for {w}x{h}");
    }
    let resized = resize_default(img, src_w, src_h)?;
    let mut out = RgbImage::new(w, h);
    let (ox, oy) = (
        (w / 2) as i64 - (src_w / 2) as i64,
        (h / 2) as i64 - (src_h / 2) as i64,
    );
    image::imageops::replace(&mut out, &resized, ox, oy);
    if ratio < src_ratio {
        let bar = (h / 2) as i64 - (src_h / 2) as i64;
        if bar > 0 {
            let top = edge_line(&resized, false, false);
            let bottom = edge_line(&resized, false, true);
            for y in 0..bar {
                put_row(&mut out, y, &top);
                put_row(&mut out, bar + src_h as i64 + y, &bottom);
            }
        }
    } else if ratio > src_ratio {
        let bar = (w / 2) as i64 - (src_w / 2) as i64;
        if bar > 0 {
            let left = edge_line(&resized, true, false);
            let right = edge_line(&resized, true, true);
            for x in 0..bar {
                put_col(&mut out, x, &left);
                put_col(&mut out, bar + src_w as i64 + x, &right);
            }
        }
    }
    Ok(out)
}

/// One axis of diffusers' crop expansion: `[lo, hi)` grown (half on each side, the odd pixel
/// after) to `desired`, shifted back inside `[0, limit)` where it overflows, then clamped.
fn grow_to(mut lo: i64, mut hi: i64, limit: i64, desired: f64) -> (i64, i64) {
    let diff = (desired - (hi - lo) as f64) as i64;
    lo -= diff.div_euclid(2);
    hi += diff - diff.div_euclid(2);
    if hi >= limit {
        let d = hi - limit;
        hi -= d;
        lo -= d;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    if hi >= limit {
        hi = limit;
    }
    (lo, hi)
}

fn put_row(out: &mut RgbImage, y: i64, line: &[[u8; 3]]) {
    if (0..out.height() as i64).contains(&y) {
        for (x, p) in line.iter().enumerate().take(out.width() as usize) {
            out.put_pixel(x as u32, y as u32, image::Rgb(*p));
        }
    }
}

fn put_col(out: &mut RgbImage, x: i64, line: &[[u8; 3]]) {
    if (0..out.width() as i64).contains(&x) {
        for (y, p) in line.iter().enumerate().take(out.height() as usize) {
            out.put_pixel(x as u32, y as u32, image::Rgb(*p));
        }
    }
}

/// One output line of Pillow's resize with its default filter (BICUBIC, a = −0.5: diffusers
/// passes no `resample` here) from a zero-width box at an edge (`box` from 0 to 0, or from the
/// size to the size, along `columns ? x : y`): every output line has the same taps, the two
/// source lines nearest that edge with weights `bicubic(±0.5), bicubic(±1.5)` (Pillow's
/// `precompute_coeffs` with scale 0, normalised and in 22-bit fixed point as
/// `normalize_coeffs_8bpc`); along the other axis the image is copied.
fn edge_line(img: &RgbImage, columns: bool, far: bool) -> Vec<[u8; 3]> {
    fn bicubic(x: f64) -> f64 {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    let (len, in_size) = if columns {
        (img.height(), img.width() as i64)
    } else {
        (img.width(), img.height() as i64)
    };
    let center = if far { in_size as f64 } else { 0.0 };
    let support = 2.0;
    let xmin = ((center - support + 0.5) as i64).max(0);
    let xmax = ((center + support + 0.5) as i64).min(in_size);
    let taps: Vec<i64> = (xmin..xmax).collect();
    let raw: Vec<f64> = taps
        .iter()
        .map(|&x| bicubic(x as f64 - center + 0.5))
        .collect();
    let ww: f64 = raw.iter().sum();
    let one = (1u32 << 22) as f64;
    let weights: Vec<i32> = raw
        .iter()
        .map(|&k| {
            let v = if ww != 0.0 { k / ww } else { k };
            if v < 0.0 {
                (-0.5 + v * one) as i32
            } else {
                (0.5 + v * one) as i32
            }
        })
        .collect();
    (0..len)
        .map(|i| {
            let mut px = [0u8; 3];
            for (c, out) in px.iter_mut().enumerate() {
                let mut acc: i32 = 1 << 21;
                for (&t, &k) in taps.iter().zip(&weights) {
                    let v = if columns {
                        img.get_pixel(t as u32, i)[c]
                    } else {
                        img.get_pixel(i, t as u32)[c]
                    };
                    acc = acc.wrapping_add(v as i32 * k);
                }
                *out = (acc >> 22).clamp(0, 255) as u8;
            }
            px
        })
        .collect()
}

/// `VaeImageProcessor.get_crop_region(mask, width, height, pad)`: the bounding box of the
/// non-zero mask pixels, padded, grown to the `width/height` aspect ratio and kept inside the
/// mask.
fn get_crop_region(
    mask: &image::GrayImage,
    width: u32,
    height: u32,
    pad: u32,
) -> Result<(u32, u32, u32, u32)> {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let col_zero = |x: i64| (0..h).all(|y| mask.get_pixel(x as u32, y as u32)[0] == 0);
    let row_zero = |y: i64| (0..w).all(|x| mask.get_pixel(x as u32, y as u32)[0] == 0);
    let crop_left = (0..w).take_while(|&x| col_zero(x)).count() as i64;
    if crop_left == w {
        bail!("the mask has no white pixel: padding_mask_crop needs a masked area");
    }
    let crop_right = (0..w).rev().take_while(|&x| col_zero(x)).count() as i64;
    let crop_top = (0..h).take_while(|&y| row_zero(y)).count() as i64;
    let crop_bottom = (0..h).rev().take_while(|&y| row_zero(y)).count() as i64;
    let pad = pad as i64;
    let (mut x1, mut y1, mut x2, mut y2) = (
        (crop_left - pad).max(0),
        (crop_top - pad).max(0),
        (w - crop_right + pad).min(w),
        (h - crop_bottom + pad).min(h),
    );
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    if ratio_crop > ratio_processing {
        let desired_height = (x2 - x1) as f64 / ratio_processing;
        (y1, y2) = grow_to(y1, y2, h, desired_height);
    } else {
        let desired_width = (y2 - y1) as f64 * ratio_processing;
        (x1, x2) = grow_to(x1, x2, w, desired_width);
    }
    if x1 < 0 || y1 < 0 || x2 <= x1 || y2 <= y1 {
        bail!("padding_mask_crop: the crop region ({x1}, {y1}, {x2}, {y2}) is empty");
    }
    Ok((x1 as u32, y1 as u32, x2 as u32, y2 as u32))
}

/// `torch.nn.functional.interpolate(mask, (oh, ow), mode="bilinear")` (align_corners=False,
/// no antialias) of one `h×w` plane, in f32 as torch's CPU kernel.
fn bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    // Source index and the two weights per output index, as `area_pixel_compute_source_index`.
    let axis = |in_size: usize, out_size: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = in_size as f32 / out_size as f32;
        (0..out_size)
            .map(|d| {
                let real = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
                let i0 = real as usize;
                let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
                let l1 = real - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ys = axis(h, oh);
    let xs = axis(w, ow);
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, hy0, hy1) in &ys {
        for &(x0, x1, wx0, wx1) in &xs {
            let v = hy0 * (wx0 * src[y0 * w + x0] + wx1 * src[y0 * w + x1])
                + hy1 * (wx0 * src[y1 * w + x0] + wx1 * src[y1 * w + x1]);
            out.push(v);
        }
    }
    out
}

/// `Flux2ImageProcessor.apply_overlay(mask, original, image, crop)`: the generated image
/// centre-cropped to the crop region's size (Flux2's `_resize_and_crop` crops without
/// resizing) and placed there on black, then the original composited over it through the
/// inverted mask, with Pillow's integer arithmetic (`paste` with a mask into `RGBa`, RGBa →
/// RGBA, `alpha_composite`).
pub fn apply_overlay(overlay: &Overlay, generated: &RgbImage) -> RgbImage {
    let (x1, y1, x2, y2) = overlay.crop;
    let (cw, ch) = (x2 - x1, y2 - y1);
    let (gw, gh) = generated.dimensions();
    // Flux2ImageProcessor._resize_and_crop: left = (W − w)//2, top = (H − h)//2 (floors).
    let left = (gw as i64 - cw as i64).div_euclid(2);
    let top = (gh as i64 - ch as i64).div_euclid(2);
    let (w, h) = overlay.original.dimensions();
    let mut out = RgbImage::new(w, h);
    let div255 = |a: u32| {
        let t = a + 128;
        ((t >> 8) + t) >> 8
    };
    for (x, y, p) in out.enumerate_pixels_mut() {
        // The base: the cropped generated image pasted at (x1, y1) on black (alpha dropped).
        let mut base = [0u8; 3];
        if x >= x1 && x < x2 && y >= y1 && y < y2 {
            let sx = (x - x1) as i64 + left;
            let sy = (y - y1) as i64 + top;
            if sx >= 0 && sy >= 0 && (sx as u32) < gw && (sy as u32) < gh {
                base = generated.get_pixel(sx as u32, sy as u32).0;
            }
        }
        // init_image_masked: RGBA → RGBa (premultiply; alpha 255 leaves RGB), pasted onto
        // transparent black through mask' = 255 − mask: every band becomes DIV255(v·mask').
        let m = 255 - overlay.mask.get_pixel(x, y)[0] as u32;
        let o = overlay.original.get_pixel(x, y).0;
        let src_a = div255(255 * m);
        let mut src = [0u32; 3];
        for c in 0..3 {
            let prem = div255(o[c] as u32 * m);
            // RGBa → RGBA: CLIP8(255·v / a) for 0 < a < 255.
            src[c] = match src_a {
                0 => 0,
                255 => prem,
                a => (255 * prem / a).min(255),
            };
        }
        // alpha_composite(base (opaque), src): Pillow's AlphaComposite.c with 7 precision bits.
        if src_a == 0 {
            *p = image::Rgb(base);
            continue;
        }
        let blend = 255 * (255 - src_a);
        let outa255 = src_a * 255 + blend;
        let coef1 = src_a * 255 * 255 * (1 << 7) / outa255;
        let coef2 = 255 * (1 << 7) - coef1;
        let shift = |a: u32| ((a >> 8) + a) >> 8;
        let mut rgb = [0u8; 3];
        for c in 0..3 {
            let t = src[c] * coef1 + base[c] as u32 * coef2;
            rgb[c] = (shift(t + (0x80 << 7)) >> 7) as u8;
        }
        *p = image::Rgb(rgb);
    }
    out
}

/// The references of an inpainting request as `__call__` step 2.2 prepares `image_reference`:
/// no size checks; one image is capped at 1024² pixels (LANCZOS) and centre-cropped to
/// multiples of 16; several (a list, which `image_processor.resize` passes through uncapped)
/// are all centre-cropped to the first one's floored size, black where an image is smaller.
pub fn prepare_references(references: &[super::Reference]) -> Result<Vec<RgbImage>> {
    let mut rgbs = Vec::with_capacity(references.len());
    for r in references {
        rgbs.push(
            image_io::to_rgb_like_pillow(&r.image)
                .with_context(|| format!("reference image {}", r.name))?,
        );
    }
    if rgbs.len() == 1 {
        if let Some((w, h)) = image_io::reference_resize_target(rgbs[0].width(), rgbs[0].height()) {
            rgbs[0] = image_io::resize_lanczos(&rgbs[0], w, h)?;
        }
    }
    let Some(first) = rgbs.first() else {
        return Ok(rgbs);
    };
    let (tw, th) = (first.width() / 16 * 16, first.height() / 16 * 16);
    if tw == 0 || th == 0 {
        bail!(
            "reference image {} is {}x{} px: both sides must be at least 16 px",
            references[0].name,
            first.width(),
            first.height()
        );
    }
    Ok(rgbs
        .iter()
        .map(|im| {
            // Flux2ImageProcessor._resize_and_crop: left = (w − W)//2, top = (h − H)//2.
            let left = (im.width() as i64 - tw as i64).div_euclid(2);
            let top = (im.height() as i64 - th as i64).div_euclid(2);
            let mut out = RgbImage::new(tw, th);
            for (x, y, p) in out.enumerate_pixels_mut() {
                let (sx, sy) = (x as i64 + left, y as i64 + top);
                if sx >= 0 && sy >= 0 && (sx as u32) < im.width() && (sy as u32) < im.height() {
                    *p = *im.get_pixel(sx as u32, sy as u32);
                }
            }
            out
        })
        .collect())
}
