//! The ceilings of a request and of the files it reads, in one place. Each is checked before
//! anything loads or allocates, so that no value a user or a file gives can make the process
//! abort on an allocation or hang: the front end gets a one-line error that says what to
//! lower.
//!
//! The values (README "Limits" lists them for users):
//!
//! * output area ≤ [`DEFAULT_MAX_AREA`] (4 MP = 2048², FLUX.2's stated resolution limit), which a
//!   caller may raise up to [`MAX_AREA_CEILING`] (64 MP = 8192²);
//! * sides: multiples of 16 (floored), at least [`MIN_OUTPUT_SIDE`];
//! * steps ≤ [`MAX_STEPS`]; guidance finite and ≥ 0;
//! * references ≤ [`MAX_REFERENCES`] per image (the model was trained with up to 4);
//! * images per run ≤ [`MAX_IMAGES_PER_RUN`] (well inside a `u32` index);
//! * files read whole (references, prompt files, images to compare) are regular files of at
//!   most [`MAX_IMAGE_FILE_BYTES`] / [`MAX_PROMPT_FILE_BYTES`];
//! * decoders: sides ≤ [`MAX_DECODE_SIDE`], at most [`MAX_DECODE_BYTES`] of pixels.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// One megapixel as the ceilings count it: 2²⁰ pixels, so that 4 MP is exactly 2048×2048.
pub const MEGAPIXEL: u64 = 1 << 20;
/// The output area allowed by default: FLUX.2 generates up to 4 MP.
pub const DEFAULT_MAX_AREA: u64 = 4 * MEGAPIXEL;
/// The highest output area a caller may allow (`--max-area 64`): 8192², far above what the
/// model was trained for, and still a latent grid whose sizes fit every index type.
pub const MAX_AREA_CEILING: u64 = 64 * MEGAPIXEL;
/// The smallest output side: one 2×2 patch of 8× VAE latents (diffusers accepts any multiple
/// of 16).
pub const MIN_OUTPUT_SIDE: usize = 16;
/// Denoising steps per image (the schedules are tuned for 4–50).
pub const MAX_STEPS: usize = 1000;
/// Reference images per image (each one adds its tokens to every transformer step).
pub const MAX_REFERENCES: usize = 10;
/// Images in one run (prompts × count); the index stays far below `u32::MAX` and the queue of
/// planned images stays small.
pub const MAX_IMAGES_PER_RUN: usize = 100_000;
/// The largest image file read (a reference, an image to compare or read settings from).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// The most LoRA adapters applied to one image (their deltas add up).
pub const MAX_ADAPTERS_PER_IMAGE: usize = 16;
/// The most distinct LoRA files one run reads (each is held in memory for the run).
pub const MAX_ADAPTER_FILES_PER_RUN: usize = 64;
/// The largest prompt file read.
pub const MAX_PROMPT_FILE_BYTES: u64 = 16 << 20;
/// The most text read from an image's metadata (PNG text chunks after inflating, EXIF).
pub const MAX_METADATA_TEXT_BYTES: usize = 1 << 20;
/// The largest side an image decoder accepts (a 60000×60000 header is refused before any
/// pixel buffer is allocated).
pub const MAX_DECODE_SIDE: u32 = 16384;
/// The most bytes of pixels a decoder may allocate.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// The widest channel count, width or head dimension a model config may give (klein 9B's
/// largest is 12288): a hostile `config.json` is refused before any weight is allocated.
pub const MAX_CONFIG_WIDTH: usize = 1 << 16;
/// The most layers (blocks) of one kind a model config may give.
pub const MAX_CONFIG_LAYERS: usize = 1024;
/// The largest vocabulary a text encoder config may give (Qwen3's is 151936).
pub const MAX_CONFIG_VOCAB: usize = 1 << 20;

/// Each `(name, value, max)` of a model config in `1..=max`.
pub fn check_config_values(fields: &[(&str, usize, usize)]) -> Result<()> {
    for &(name, value, max) in fields {
        if !(1..=max).contains(&value) {
            bail!("{name} {value} is outside 1..={max}");
        }
    }
    Ok(())
}

/// A float of a model config (an epsilon, a RoPE θ, a ratio): finite and in `(0, max]`.
pub fn check_config_float(name: &str, value: f64, max: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0 && value <= max) {
        bail!("{name} {value} is not a number in (0, {max}]");
    }
    Ok(())
}

/// `px` pixels in megapixels, for messages ("4 MP", "4.5 MP").
pub fn megapixels(px: u64) -> String {
    let mp = px as f64 / MEGAPIXEL as f64;
    if mp.fract() == 0.0 {
        format!("{mp} MP")
    } else {
        format!("{mp:.2} MP")
    }
}

/// The output size `width×height` against `max_area` pixels.
pub fn check_output_size(width: usize, height: usize, max_area: u64) -> Result<()> {
    if width < MIN_OUTPUT_SIDE || height < MIN_OUTPUT_SIDE {
        bail!(
            "output size {width}x{height} is too small: width and height must be at least \
             {MIN_OUTPUT_SIDE} pixels"
        );
    }
    let area = (width as u64).saturating_mul(height as u64);
    if area > max_area {
        bail!(
            "output size {width}x{height} ({}) is above the {} allowed — lower the width and \
             height, or raise --max-area (at most {})",
            megapixels(area),
            megapixels(max_area),
            megapixels(MAX_AREA_CEILING)
        );
    }
    Ok(())
}

/// A caller's `max_area` (pixels): at least one minimal image, at most [`MAX_AREA_CEILING`].
pub fn check_max_area(max_area: u64) -> Result<()> {
    let min = (MIN_OUTPUT_SIDE * MIN_OUTPUT_SIDE) as u64;
    if !(min..=MAX_AREA_CEILING).contains(&max_area) {
        bail!(
            "the maximum output area {} is outside {}..={}",
            megapixels(max_area),
            megapixels(min),
            megapixels(MAX_AREA_CEILING)
        );
    }
    Ok(())
}

pub fn check_steps(steps: usize) -> Result<()> {
    if !(1..=MAX_STEPS).contains(&steps) {
        bail!("{steps} steps is outside 1..={MAX_STEPS}");
    }
    Ok(())
}

/// Guidance must be a finite number ≥ 0 (NaN, ∞ and negative values are refused).
pub fn check_guidance(guidance: f64) -> Result<()> {
    if !(guidance.is_finite() && guidance >= 0.0) {
        bail!("guidance {guidance} is not a finite number ≥ 0");
    }
    Ok(())
}

pub fn check_adapter_count(n: usize) -> Result<()> {
    if n > MAX_ADAPTERS_PER_IMAGE {
        bail!("{n} LoRA adapters for one image is more than the {MAX_ADAPTERS_PER_IMAGE} allowed");
    }
    Ok(())
}

pub fn check_reference_count(n: usize) -> Result<()> {
    if n > MAX_REFERENCES {
        bail!("{n} reference images is more than the {MAX_REFERENCES} allowed per image");
    }
    Ok(())
}

pub fn check_image_count(n: usize) -> Result<()> {
    if n > MAX_IMAGES_PER_RUN {
        bail!("{n} images is more than the {MAX_IMAGES_PER_RUN} allowed in one run");
    }
    Ok(())
}

/// The whole of a regular file of at most `cap` bytes. A directory, a FIFO, a device
/// (`/dev/zero`) or a socket is refused before it is opened (opening a FIFO would block), and
/// so is a file above the cap; `what` names the file in messages ("reference image").
pub fn read_regular_file(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    check_regular_file(path, cap, what)?;
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow!("cannot read {what} {}: {e}", path.display()))?;
    // The file may grow after the check: read at most one byte past the cap.
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("cannot read {what} {}: {e}", path.display()))?;
    if bytes.len() as u64 > cap {
        bail!(too_large(path, cap, what));
    }
    Ok(bytes)
}

/// That `path` is a regular file (following symlinks) of at most `cap` bytes.
pub fn check_regular_file(path: &Path, cap: u64, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow!("cannot read {what} {}: {e}", path.display()))?;
    if meta.is_dir() {
        bail!("{what} {} is a directory, not a file", path.display());
    }
    if !meta.is_file() {
        bail!(
            "{what} {} is not a regular file (a FIFO, device or socket) — save it to a file \
             first",
            path.display()
        );
    }
    if meta.len() > cap {
        bail!(too_large(path, cap, what));
    }
    Ok(())
}

fn too_large(path: &Path, cap: u64, what: &str) -> String {
    format!(
        "{what} {} is larger than the {} MiB allowed",
        path.display(),
        cap >> 20
    )
}

/// The `image` crate's decoder limits: [`MAX_DECODE_SIDE`] and [`MAX_DECODE_BYTES`].
pub fn decoder_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

/// An image whose header claims more pixels than a decoder may allocate (the error inside
/// [`check_decode_size`]'s `anyhow::Error`: front ends downcast to it to add their advice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "its header claims {width}x{height} px, above the {MAX_DECODE_SIDE} px a side and {} MiB \
     of pixels that are decoded",
    MAX_DECODE_BYTES >> 20
)]
pub struct TooLargeToDecode {
    pub width: u32,
    pub height: u32,
}

/// An image header's size (and the `bytes` its pixels need) against the decoder limits,
/// before its pixels are allocated; the error is a [`TooLargeToDecode`].
pub fn check_decode_size(width: u32, height: u32, bytes: u64) -> Result<()> {
    if width > MAX_DECODE_SIDE || height > MAX_DECODE_SIDE || bytes > MAX_DECODE_BYTES {
        return Err(TooLargeToDecode { width, height }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings() {
        assert!(check_output_size(2048, 2048, DEFAULT_MAX_AREA).is_ok());
        assert!(check_output_size(16, 16, DEFAULT_MAX_AREA).is_ok());
        assert!(check_output_size(2064, 2048, DEFAULT_MAX_AREA).is_err());
        assert!(check_output_size(8, 64, DEFAULT_MAX_AREA).is_err());
        assert!(check_output_size(usize::MAX, usize::MAX, MAX_AREA_CEILING).is_err());
        assert!(check_max_area(MAX_AREA_CEILING + 1).is_err());
        assert!(check_steps(1000).is_ok() && check_steps(1001).is_err());
        assert!(check_steps(0).is_err());
        for g in [f64::NAN, -1.0, f64::INFINITY] {
            assert!(check_guidance(g).is_err(), "{g}");
        }
        assert!(check_guidance(0.0).is_ok());
        assert!(check_reference_count(10).is_ok() && check_reference_count(11).is_err());
        assert!(check_image_count(MAX_IMAGES_PER_RUN + 1).is_err());
        assert!(check_decode_size(60000, 60000, 0).is_err());
        assert!(check_decode_size(16384, 16384, 16384 * 16384 * 8).is_err());
        assert!(check_decode_size(4096, 4096, 4096 * 4096 * 4).is_ok());
        assert_eq!(megapixels(DEFAULT_MAX_AREA), "4 MP");
        assert!(check_config_values(&[("a", 1, 2), ("b", 0, 2)]).is_err());
        assert!(check_config_values(&[("a", 3, 2)]).is_err());
        assert!(check_config_float("eps", f64::NAN, 1.0).is_err());
    }

    #[test]
    fn only_regular_files() {
        let err = read_regular_file(Path::new("/dev/zero"), 10, "x").unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_regular_file(Path::new("/"), 10, "x").unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        let err = read_regular_file(Path::new("Cargo.toml"), 10, "x").unwrap_err();
        assert!(err.to_string().contains("larger"), "{err}");
    }
}
