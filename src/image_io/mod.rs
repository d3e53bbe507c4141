//! Image input and output of the pipeline: reference images in (spec §4), the result out (§6.4).
//!
//! Reference images go through the same steps as in the reference harness
//! (`refcheck/make_case.py`: `Image.open(p).convert("RGB")`, then `Flux2KleinPipeline`):
//!
//! 1. decode as `diffusers.utils.load_image` does ([`load_image`]: Pillow's JPEG pixels via
//!    libjpeg-turbo's decoder, the EXIF orientation applied), then Pillow's `convert("RGB")`
//!    ([`to_rgb_like_pillow`]);
//! 2. `check_image_input`: each side ≥ 64 px, aspect ratio ≤ 8 ([`check_reference_size`]);
//! 3. above 1024² pixels: `s = sqrt(1048576 / (w·h))`, LANCZOS to `(int(w·s), int(h·s))`
//!    ([`resize_lanczos`], a bit-exact port of Pillow's resampler);
//! 4. centre crop to multiples of 16 (`resize_mode="crop"` only crops);
//! 5. `x / 255` then `2x - 1` in f32 ([`rgb_to_tensor`]).
//!
//! Converting to RGB *first* is what the harness (and diffusers' own `load_image` helper) does.
//! A caller who hands diffusers a raw RGBA / LA / P image larger than 1024² would get a
//! different resize (Pillow premultiplies alpha for RGBA/LA and uses NEAREST for P); for
//! RGB, L and 16-bit RGB sources both orders give the same bytes.

mod atomic;
mod compare;
mod lanczos;
mod metadata;

pub use compare::{compare_images, compare_pixels, diff_image, ImageDiff};

pub use metadata::{
    container_of, exif_with_settings, jpeg_exif, png_text_chunks, read_metadata, settings_of_exif,
    webp_exif, Container, MAX_JPEG_EXIF_BYTES,
};

pub use atomic::{create_temp_file, remove_stale_temp_files, temp_path_for};
pub use lanczos::resize_lanczos_u8;

use atomic::write_atomically;

use std::fs;
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};
use sha2::{Digest, Sha256};

use crate::limits::MAX_IMAGE_FILE_BYTES;

/// diffusers `Flux2ImageProcessor.check_image_input(min_side_length=64)`.
pub const MIN_REFERENCE_SIDE: u32 = 64;
/// diffusers `Flux2ImageProcessor.check_image_input(max_aspect_ratio=8)`.
pub const MAX_REFERENCE_ASPECT: f64 = 8.0;
/// The pipeline shrinks references above this many pixels (spec §4 step 1).
pub const MAX_REFERENCE_AREA: u64 = 1024 * 1024;
/// `vae_scale_factor * 2`: references are cropped to multiples of this (spec §4 step 2).
pub const REFERENCE_MULTIPLE: u32 = 16;
/// JPEG quality of [`save_image`] (Pillow's default would be 75; 95 keeps generated detail).
pub const JPEG_QUALITY: u8 = 95;

/// Decodes a PNG, JPEG or WebP file, recognised by its content (not its extension), as
/// `diffusers.utils.load_image` opens it: the EXIF orientation is applied
/// (`ImageOps.exif_transpose`), so phone photos come out upright.
///
/// The pixels are what Pillow's decoder yields, in `image`'s layout: 16-bit PNGs stay 16-bit,
/// a PNG `tRNS` colour key or a palette with transparency becomes an alpha channel (Pillow keeps
/// those as info/palette; [`to_rgb_like_pillow`] drops the alpha again, as `convert("RGB")`
/// would). JPEG goes through libjpeg-turbo's decoder (via mozjpeg, default settings: islow
/// IDCT, fancy upsampling), like Pillow's, so the bytes are identical; CMYK/YCCK JPEGs fall
/// back to `image`'s decoder. Truncated JPEGs are refused, as Pillow refuses them.
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    load_image_hashed(path).map(|(image, _)| image)
}

/// [`load_image`] and the lower-case hex SHA-256 of the same bytes: the file is read once,
/// so the hash recorded for an input is the hash of the pixels used, even when the file
/// changes meanwhile. Only regular files are read (a FIFO, `<(…)` or `/dev/zero` is refused
/// before it is opened: it could not be read twice, or would hang or fill memory).
pub fn load_image_hashed(path: impl AsRef<Path>) -> Result<(DynamicImage, String)> {
    let path = path.as_ref();
    let bytes = crate::limits::read_regular_file(path, MAX_IMAGE_FILE_BYTES, "image file")?;
    let image = decode_image(&bytes)
        .with_context(|| format!("cannot decode image file {}", path.display()))?;
    Ok((image, sha256_hex(&bytes)))
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// [`load_image`] on a file's bytes (the server's uploads): the same decoders, size checks and
/// EXIF orientation.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    // The header is read without limits (no pixel buffer yet), so that the size check below
    // can name the size; the decode then runs under the limits.
    reader.no_limits();
    let format = reader.format();
    match format {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(f) => bail!("{f:?} is not supported (use PNG, JPEG or WebP)"),
        None => bail!("not a PNG, JPEG or WebP file"),
    }
    let mut decoder = reader.into_decoder()?;
    let (width, height) = decoder.dimensions();
    // Before any pixel buffer is allocated (libjpeg below does not see `image`'s limits).
    crate::limits::check_decode_size(width, height, decoder.total_bytes())?;
    decoder.set_limits(crate::limits::decoder_limits())?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let libjpeg = match format {
        Some(ImageFormat::Jpeg) => decode_jpeg_libjpeg(bytes)?,
        _ => None,
    };
    let mut img = match libjpeg {
        Some(img) => img,
        None => DynamicImage::from_decoder(decoder)?,
    };
    img.apply_orientation(orientation);
    Ok(img)
}

/// A JPEG decoded by libjpeg-turbo's code with its default settings (what Pillow uses):
/// grayscale files as `L`, YCbCr/RGB ones as RGB; `Ok(None)` for other colour spaces (CMYK,
/// YCCK), which the caller decodes with `image`. A file libjpeg rejects (or a truncated one,
/// which Pillow refuses) is an error with libjpeg's message.
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Result<Option<DynamicImage>> {
    use mozjpeg::ColorSpace;
    let decode = || -> std::io::Result<Option<DynamicImage>> {
        let jpeg = mozjpeg::Decompress::builder()
            .with_err(libjpeg_error_manager())
            .from_mem(bytes)?;
        let (w, h) = (jpeg.width() as u32, jpeg.height() as u32);
        match jpeg.color_space() {
            ColorSpace::JCS_GRAYSCALE => {
                let mut started = jpeg.grayscale()?;
                let px: Vec<u8> = started.read_scanlines()?;
                started.finish()?;
                Ok(image::GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8))
            }
            ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => {
                let mut started = jpeg.rgb()?;
                let px: Vec<u8> = started.read_scanlines()?;
                started.finish()?;
                Ok(RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8))
            }
            _ => Ok(None),
        }
    };
    // libjpeg reports errors by unwinding out of the C code (`resume_unwind`: no panic hook
    // runs) with the message as the payload.
    match std::panic::catch_unwind(decode) {
        Ok(result) => Ok(result?),
        Err(payload) => match payload.downcast::<String>() {
            Ok(msg) => bail!("{msg}"),
            Err(_) => bail!("libjpeg failed"),
        },
    }
}

/// libjpeg's standard error manager, except that errors unwind with their message (they would
/// `exit()`) and a premature end of file is an error: libjpeg would pad the image with grey
/// and warn, where Pillow refuses the file ("image file is truncated"). Other warnings (e.g.
/// extraneous bytes) are ignored, as in Pillow.
fn libjpeg_error_manager() -> mozjpeg_sys::jpeg_error_mgr {
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};
    use std::os::raw::c_int;
    fn message(cinfo: &mut jpeg_common_struct) -> String {
        // SAFETY: libjpeg calls the handlers with its own cinfo, whose `err` is this manager;
        // format_message writes at most JMSG_LENGTH_MAX (200) bytes, NUL-terminated.
        unsafe {
            let Some(err) = cinfo.err.as_ref() else {
                return "libjpeg error".into();
            };
            let Some(format) = err.format_message else {
                return format!("libjpeg error {}", err.msg_code);
            };
            let mut buffer = [0u8; 200];
            // mozjpeg-sys declares the buffer as `&[u8; 80]`; libjpeg writes up to 200 bytes.
            let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
                std::mem::transmute(format);
            format(cinfo, buffer.as_mut_ptr());
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            String::from_utf8_lossy(&buffer[..end]).into_owned()
        }
    }
    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        std::panic::resume_unwind(Box::new(message(cinfo)));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: as in `message`.
        let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
        if level < 0 && code == JWRN_JPEG_EOF as c_int {
            std::panic::resume_unwind(Box::new(
                "the file is truncated (premature end of JPEG data)".to_string(),
            ));
        }
    }
    // SAFETY: jpeg_std_error fills every field of the zeroed struct.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

/// Pillow's `Image.convert("RGB")` of the image Pillow would have opened for the same file.
///
/// * L / LA → the grey value in all three channels; RGBA → alpha dropped (not composited);
/// * 16-bit RGB(A) and grey+alpha PNGs: Pillow opens them as 8-bit `RGB`/`RGBA` keeping the high
///   byte (`RGB;16B`, `RGBA;16B`, `LA;16B` raw modes), so `v >> 8`;
/// * 16-bit grey PNG: Pillow's mode `I;16`, whose conversion to RGB saturates at 255
///   (`min(v, 255)`), it does not rescale.
pub fn to_rgb_like_pillow(img: &DynamicImage) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    let grey = |v: u8| [v, v, v];
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(im) => return Ok(im.clone()),
        DynamicImage::ImageLuma8(im) => im.as_raw().iter().flat_map(|&v| grey(v)).collect(),
        DynamicImage::ImageLumaA8(im) => im.as_raw().chunks_exact(2).flat_map(|p| grey(p[0])).collect(),
        DynamicImage::ImageRgba8(im) => im
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma16(im) => im
            .as_raw()
            .iter()
            .flat_map(|&v| grey(v.min(255) as u8))
            .collect(),
        DynamicImage::ImageLumaA16(im) => im
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| grey((p[0] >> 8) as u8))
            .collect(),
        DynamicImage::ImageRgb16(im) => im.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(im) => im
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => bail!(
            "unsupported pixel format {:?} for a reference image (expected 8/16-bit grey, grey+alpha, RGB or RGBA)",
            other.color()
        ),
    };
    RgbImage::from_raw(w, h, data).ok_or_else(|| anyhow!("internal: RGB buffer size for {w}×{h}"))
}

/// Why a reference image's size is refused (the error inside [`check_reference_size`]'s
/// `anyhow::Error`): front ends downcast to it to add their own advice (upscale or crop).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum ReferenceSizeError {
    #[error(
        "{width}×{height} px is too small: both sides must be at least {MIN_REFERENCE_SIDE} px"
    )]
    TooSmall { width: u32, height: u32 },
    #[error(
        "{width}×{height} px is too elongated: its aspect ratio {aspect:.1}:1 is above the \
         {MAX_REFERENCE_ASPECT}:1 allowed"
    )]
    TooElongated {
        width: u32,
        height: u32,
        aspect: f64,
    },
}

/// diffusers `Flux2ImageProcessor.check_image_input`: each side at least 64 px and
/// `max(w/h, h/w) <= 8` (computed in f64 as Python does). The error is a
/// [`ReferenceSizeError`].
pub fn check_reference_size(width: u32, height: u32) -> Result<()> {
    if width < MIN_REFERENCE_SIDE || height < MIN_REFERENCE_SIDE {
        return Err(ReferenceSizeError::TooSmall { width, height }.into());
    }
    let (w, h) = (width as f64, height as f64);
    let aspect = (w / h).max(h / w);
    if aspect > MAX_REFERENCE_ASPECT {
        return Err(ReferenceSizeError::TooElongated {
            width,
            height,
            aspect,
        }
        .into());
    }
    Ok(())
}

/// `PIL.Image.resize((width, height), Image.LANCZOS)` of an RGB image, bit-exact.
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let data = resize_lanczos_u8(
        img.as_raw(),
        img.width() as usize,
        img.height() as usize,
        3,
        width as usize,
        height as usize,
    )?;
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| anyhow!("internal: RGB buffer size for {width}×{height}"))
}

/// The size a reference of `width×height` is LANCZOS-resized to before cropping (spec §4
/// step 1), or `None` when it is at most 1024² pixels. Python: `s = math.sqrt(1048576 / (w*h))`,
/// `(int(w*s), int(h*s))`, all in f64 with truncation.
pub fn reference_resize_target(width: u32, height: u32) -> Option<(u32, u32)> {
    let area = width as u64 * height as u64;
    if area <= MAX_REFERENCE_AREA {
        return None;
    }
    let s = (MAX_REFERENCE_AREA as f64 / area as f64).sqrt();
    Some(((width as f64 * s) as u32, (height as f64 * s) as u32))
}

/// The size [`prepare_reference`] makes of a `width×height` reference: shrunk above 1024²
/// pixels ([`reference_resize_target`]), then cropped to multiples of 16.
pub fn prepared_reference_size(width: u32, height: u32) -> (u32, u32) {
    let (w, h) = reference_resize_target(width, height).unwrap_or((width, height));
    (
        w / REFERENCE_MULTIPLE * REFERENCE_MULTIPLE,
        h / REFERENCE_MULTIPLE * REFERENCE_MULTIPLE,
    )
}

/// The preprocessed reference image that diffusers feeds to the VAE (spec §4 steps 1-3), as
/// 8-bit RGB: convert to RGB (as the harness does before calling the pipeline), size check,
/// LANCZOS shrink above 1024², centre crop to multiples of 16.
pub fn prepare_reference(img: &DynamicImage) -> Result<RgbImage> {
    check_reference_size(img.width(), img.height())?;
    let mut rgb = to_rgb_like_pillow(img)?;
    if let Some((w, h)) = reference_resize_target(rgb.width(), rgb.height()) {
        rgb = resize_lanczos(&rgb, w, h)?;
    }
    let (w, h) = (rgb.width(), rgb.height());
    let (cw, ch) = prepared_reference_size(img.width(), img.height());
    if (cw, ch) == (w, h) {
        return Ok(rgb);
    }
    // Flux2ImageProcessor._resize_and_crop: left = (w - W')//2, top = (h - H')//2.
    let (left, top) = ((w - cw) / 2, (h - ch) / 2);
    Ok(image::imageops::crop_imm(&rgb, left, top, cw, ch).to_image())
}

/// `[1, 3, h, w]` f32 in [-1, 1] on `device`, as `VaeImageProcessor.preprocess`:
/// `np.array(img).astype(float32) / 255.0`, then `2.0 * x - 1.0` (each op rounded in f32; the
/// division is a true division, not a multiplication by 1/255, which would differ in the last
/// bit). The values are computed on the host so that they are the same on every device.
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0f32; 3 * h * w];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = px[c] as f32 / 255.0f32;
            planar[c * h * w + i] = 2.0f32 * x - 1.0f32;
        }
    }
    Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)?
        .to_device(device)
        .context("moving the reference image tensor to the device")
}

/// The image formats [`save_image`] writes, chosen by the output file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Lossless, with the metadata as text chunks.
    Png,
    /// Quality [`JPEG_QUALITY`] by default, the metadata in the EXIF `UserComment`.
    Jpeg,
    /// Lossless WebP (the only WebP encoder in `image` 0.25), the metadata as for JPEG.
    WebP,
}

impl OutputFormat {
    /// The format for `path`'s extension (case-insensitive): `.png`, `.jpg`/`.jpeg` or
    /// `.webp`; else an error naming the path and the extensions that work. Front ends call it
    /// to check an output name before doing any work.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("jpg" | "jpeg") => Ok(Self::Jpeg),
            Some("webp") => Ok(Self::WebP),
            Some(other) => bail!(
                "unsupported output extension '{other}' in {} — use .png, .jpg, .jpeg or .webp",
                path.display()
            ),
            None => bail!(
                "output path {} has no extension — end it in .png, .jpg, .jpeg or .webp",
                path.display()
            ),
        }
    }
}

/// Writes `img` to `path`, format from the extension ([`OutputFormat::from_path`]): PNG (with
/// `metadata` as tEXt chunks, iTXt for text that is not Latin-1), JPEG (quality
/// [`JPEG_QUALITY`]) or WebP (lossless), the last two with `metadata` as JSON in the EXIF
/// `UserComment`. The file is encoded in memory, written to [`temp_path_for`] `path` and
/// renamed, so a failure never leaves a partial file behind.
pub fn save_image(
    path: impl AsRef<Path>,
    img: &RgbImage,
    metadata: &[(String, String)],
) -> Result<()> {
    save_image_with_quality(path, img, metadata, JPEG_QUALITY)
}

/// [`save_image`] with the JPEG quality (1–100) given; PNG and WebP are lossless.
pub fn save_image_with_quality(
    path: impl AsRef<Path>,
    img: &RgbImage,
    metadata: &[(String, String)],
    jpeg_quality: u8,
) -> Result<()> {
    let path = path.as_ref();
    let format = OutputFormat::from_path(path)?;
    let bytes = encode_image(
        img,
        format,
        metadata,
        jpeg_quality,
        &path.display().to_string(),
    )
    .with_context(|| format!("encoding {}", path.display()))?;
    write_atomically(path, &bytes)
}

/// `img` encoded in memory as [`save_image_with_quality`] writes it (the server's responses
/// are these bytes). `name` names the image in the warning about metadata that does not fit
/// a JPEG.
pub fn encode_image(
    img: &RgbImage,
    format: OutputFormat,
    metadata: &[(String, String)],
    jpeg_quality: u8,
    name: &str,
) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    if !(1..=100).contains(&jpeg_quality) {
        bail!("JPEG quality {jpeg_quality} is outside 1-100");
    }
    let exif = (!metadata.is_empty()).then(|| exif_with_settings(metadata));
    match format {
        OutputFormat::Png => encode_png(img, metadata),
        OutputFormat::Jpeg => {
            let mut buf = Vec::new();
            let mut enc =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, jpeg_quality);
            match exif {
                Some(exif) if exif.len() > MAX_JPEG_EXIF_BYTES => crate::ops::warn(format!(
                    "{name}: the settings ({} KiB) do not fit a JPEG's EXIF segment (64 KiB) and \
                     are not recorded — write a PNG to keep them",
                    exif.len() >> 10
                )),
                Some(exif) => enc.set_exif_metadata(exif)?,
                None => {}
            }
            enc.write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map(|_| buf)
            .map_err(anyhow::Error::from)
        }
        OutputFormat::WebP => {
            let mut buf = Vec::new();
            let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut buf);
            if let Some(exif) = exif {
                enc.set_exif_metadata(exif)?;
            }
            enc.write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map(|_| buf)
            .map_err(anyhow::Error::from)
        }
    }
}

fn encode_png(img: &RgbImage, metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in metadata {
            let latin1 = value.chars().all(|c| (c as u32) < 256);
            let res = if latin1 {
                enc.add_text_chunk(key.clone(), value.clone())
            } else {
                enc.add_itxt_chunk(key.clone(), value.clone())
            };
            res.with_context(|| {
                format!("PNG text chunk with keyword {key:?} (1-79 Latin-1 characters)")
            })?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    Ok(buf)
}

/// The text chunks of a PNG file as `(keyword, text)` in file order (also those after the
/// image data), read without decoding the pixels; inflated text is capped
/// ([`crate::limits::MAX_METADATA_TEXT_BYTES`]).
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let bytes = crate::limits::read_regular_file(path, MAX_IMAGE_FILE_BYTES, "PNG file")?;
    png_text_chunks(&bytes).with_context(|| format!("cannot read PNG {}", path.display()))
}

/// The settings recorded in a PNG, JPEG or WebP file ([`read_metadata`]), read from the
/// regular file at `path` (size-capped); `what` names the file in errors.
pub fn read_image_metadata(path: impl AsRef<Path>, what: &str) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let bytes = crate::limits::read_regular_file(path, MAX_IMAGE_FILE_BYTES, what)?;
    read_metadata(&bytes).with_context(|| format!("{what} {}", path.display()))
}

/// Lower-case hex SHA-256 of a regular file's bytes (the CLI checks recorded inputs with it);
/// a FIFO or device is refused, not read (it could block forever).
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    crate::limits::check_regular_file(path, u64::MAX, "file")?;
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
