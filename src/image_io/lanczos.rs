//! Pillow-exact LANCZOS resampling of 8-bit images (spec §4 step 1, §10).
//!
//! diffusers shrinks a reference image larger than 1024² with `PIL.Image.resize(size, LANCZOS)`;
//! the VAE sees those exact bytes, so this is a port of Pillow's `libImaging/Resample.c`
//! (`precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResample{Horizontal,Vertical}_8bpc`,
//! `ImagingResampleInner`) for the default box `(0, 0, w, h)`:
//!
//! * separable, in Pillow 13's order: vertical first when the height shrinks by more than twice
//!   as many pixels as the width (`h' < h && 2·(w − w') < h − h'`), else horizontal first
//!   (over only the source rows the vertical pass reads); a pass whose size does not change is
//!   skipped. The two orders round differently, so the order is part of the exact result; the
//!   rule was pinned down against Pillow 13.0.0 on ~1500 size pairs (older Pillow always ran
//!   the horizontal pass first);
//! * the filter is `sinc(x)·sinc(x/3)` on `[-3, 3)`, stretched by the scale when shrinking
//!   (support = 3 × scale), the window bounds are rounded with `(int)(c ± support + 0.5)`;
//! * weights are normalised in f64, then turned into fixed point with 22 fractional bits
//!   (round half away from zero), accumulated in `i32` from `1 << 21` and clipped to 0..=255
//!   after the shift (`clip8`).
//!
//! Channels are independent in Pillow (one accumulator per band), so one routine serves
//! L, LA, RGB and RGBA buffers of any channel count.

use anyhow::{bail, Result};
use rayon::prelude::*;

/// Pillow's `PRECISION_BITS` (32 - 8 - 2): 8 bits for the value, 2 for overshoot, 22 fraction.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's LANCZOS support (a = 3 lobes).
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    // Same operation order as Pillow (`x = x * M_PI; return sin(x) / x;`).
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output sample: the first source index and the number of taps, plus `ksize` fixed-point
/// weights (unused tail zero), as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs(inSize, in0, in1, outSize, LANCZOS)` followed by
/// `normalize_coeffs_8bpc`. `in0`/`in1` are Pillow's `float` box edges (f32 on purpose: the
/// box arrives from Python as C floats and `in1 - in0` is computed in float).
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;

    let mut prekk = vec![0f64; out_size * ksize];
    let mut bounds = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero; the clamp to 0 below makes that equal to a floor.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin as i64).max(0) as usize;
        let k = &mut prekk[xx * ksize..xx * ksize + n];
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate() {
            // `(x + xmin - center + 0.5) * ss`: integer sum first, then in double.
            let w = lanczos((((x + xmin) as f64) - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in k.iter_mut() {
                *kx /= ww;
            }
        }
        bounds.push((xmin, n));
    }
    let one = (1u32 << PRECISION_BITS) as f64;
    let weights = prekk
        .iter()
        .map(|&v| {
            if v < 0.0 {
                (-0.5 + v * one) as i32
            } else {
                (0.5 + v * one) as i32
            }
        })
        .collect();
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: `clip8_lookups[in >> PRECISION_BITS]`, a table that maps negatives to 0
/// and anything above 255 to 255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved 8-bit image of `channels` bands from `w×h` to `out_w×out_h` exactly as
/// `PIL.Image.resize((out_w, out_h), Image.LANCZOS)` does for modes L, LA (as stored), RGB and
/// RGBa/RGBA buffers.
pub fn resize_lanczos_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || out_w == 0 || out_h == 0 {
        bail!("LANCZOS resize {w}×{h} → {out_w}×{out_h}: sizes must be positive");
    }
    if !(1..=4).contains(&channels) || src.len() != w * h * channels {
        bail!(
            "LANCZOS resize: buffer of {} bytes does not hold {w}×{h}×{channels} pixels",
            src.len()
        );
    }
    // ImagingResampleInner with box (0, 0, w, h). A pass whose size is unchanged is skipped.
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
    // many pixels as the width does (`h' < h && 2·(w − w') < h − h'`), else the horizontal
    // pass first (over only the source rows the vertical pass reads). The two orders round
    // differently, so this choice is part of the exact output; it was pinned down against
    // Pillow 13.0.0 on ~1500 size pairs (tests/parity_image_io.rs checks both orders).
    let need_horizontal = out_w != w;
    let need_vertical = out_h != h;
    let vertical_first = out_h < h && 2 * (w as i64 - out_w as i64) < (h as i64 - out_h as i64);
    let out = if vertical_first {
        let tmp = vertical_pass(src, w, h, 0, channels, out_h);
        if need_horizontal {
            horizontal_pass(&tmp, w, 0, out_h, channels, out_w)
        } else {
            tmp
        }
    } else if need_horizontal && need_vertical {
        // Only the source rows the vertical pass reads (Pillow's ybox_first..ybox_last).
        let vert = precompute_coeffs(h, 0.0, h as f32, out_h);
        let first = vert.bounds[0].0;
        let last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
        let tmp = horizontal_pass(src, w, first, last, channels, out_w);
        vertical_pass(&tmp, out_w, h, first, channels, out_h)
    } else if need_horizontal {
        horizontal_pass(src, w, 0, h, channels, out_w)
    } else if need_vertical {
        vertical_pass(src, w, h, 0, channels, out_h)
    } else {
        src.to_vec()
    };
    Ok(out)
}

/// `ImagingResampleHorizontal_8bpc` over source rows `[row0, row1)` of a `w`-wide buffer.
/// Output rows are independent and computed in parallel; the sums are the same integer sums
/// as Pillow's (wrapping i32 addition, so their order does not matter).
fn horizontal_pass(
    src: &[u8],
    w: usize,
    row0: usize,
    row1: usize,
    channels: usize,
    out_w: usize,
) -> Vec<u8> {
    let horiz = precompute_coeffs(w, 0.0, w as f32, out_w);
    let rows = row1 - row0;
    let mut out = vec![0u8; rows * out_w * channels];
    out.par_chunks_mut(out_w * channels)
        .enumerate()
        .for_each(|(yy, out_row)| {
            let src_row = &src[(yy + row0) * w * channels..][..w * channels];
            match channels {
                1 => horizontal_row::<1>(src_row, out_row, &horiz),
                2 => horizontal_row::<2>(src_row, out_row, &horiz),
                3 => horizontal_row::<3>(src_row, out_row, &horiz),
                _ => horizontal_row::<4>(src_row, out_row, &horiz),
            }
        });
    out
}

/// One output row of the horizontal pass for `C` interleaved bands (`C` fixed at compile
/// time, so the per-tap band loop unrolls).
fn horizontal_row<const C: usize>(src_row: &[u8], out_row: &mut [u8], horiz: &Coeffs) {
    for (xx, out_px) in out_row.chunks_exact_mut(C).enumerate() {
        let (xmin, n) = horiz.bounds[xx];
        let k = &horiz.weights[xx * horiz.ksize..][..n];
        let taps = &src_row[xmin * C..][..n * C];
        let mut ss = [1i32 << (PRECISION_BITS - 1); C];
        for (px, &kx) in taps.chunks_exact(C).zip(k) {
            for c in 0..C {
                ss[c] = ss[c].wrapping_add(px[c] as i32 * kx);
            }
        }
        for c in 0..C {
            out_px[c] = clip8(ss[c]);
        }
    }
}

/// `ImagingResampleVertical_8bpc` for an image of height `in_h` resized to `out_h`; `src`
/// holds its rows from `row0` on (the horizontal pass may have dropped unused top rows).
/// Each output row accumulates whole source rows (vectorisable), rows in parallel.
fn vertical_pass(
    src: &[u8],
    w: usize,
    in_h: usize,
    row0: usize,
    channels: usize,
    out_h: usize,
) -> Vec<u8> {
    let vert = precompute_coeffs(in_h, 0.0, in_h as f32, out_h);
    let row_len = w * channels;
    let mut out = vec![0u8; row_len * out_h];
    out.par_chunks_mut(row_len).enumerate().for_each_init(
        || vec![0i32; row_len],
        |acc, (yy, out_row)| {
            let (ymin, n) = vert.bounds[yy];
            let ymin = ymin - row0;
            let k = &vert.weights[yy * vert.ksize..][..n];
            acc.fill(1 << (PRECISION_BITS - 1));
            for (y, &ky) in k.iter().enumerate() {
                let src_row = &src[(y + ymin) * row_len..][..row_len];
                for (a, &v) in acc.iter_mut().zip(src_row) {
                    *a = a.wrapping_add(v as i32 * ky);
                }
            }
            for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
                *o = clip8(a);
            }
        },
    );
    out
}
