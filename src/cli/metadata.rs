//! The settings flux2-klein records in its images (PNG: one text chunk per key; JPEG and WebP:
//! the same keys as JSON in the EXIF `UserComment`, `image_io::read_metadata`), written by
//! `generate` and read back by `--config-from-metadata` and `info`: one schema, [`Recorded`].
//!
//! The keys and the value formats are a file format (images made by earlier versions must
//! read back): integers and floats in Rust's `Display` form, the size as `WxH`, lists one item
//! per line. A key whose field is `None` (or an empty list) is not written.

use std::path::Path;

use anyhow::{bail, Result};
use flux2_klein::lora::LoraSpec;

pub const PROMPT: &str = "prompt";
/// Only when classifier-free guidance ran with a non-empty negative prompt.
pub const NEGATIVE_PROMPT: &str = "negative_prompt";
pub const SEED: &str = "seed";
pub const STEPS: &str = "steps";
pub const GUIDANCE: &str = "guidance";
/// `WxH` in pixels.
pub const SIZE: &str = "size";
/// The model id as given (hub repo id or local directory).
pub const MODEL: &str = "model";
pub const REVISION: &str = "revision";
/// Reference names (paths as given), one per line.
pub const REFERENCES: &str = "references";
/// Lower-case hex SHA-256 of each reference file, one per line, in the order of `references`.
pub const REFERENCES_SHA256: &str = "references_sha256";
/// The init image of image-to-image / inpainting (its name as given) and its SHA-256.
pub const INIT_IMAGE: &str = "init_image";
pub const INIT_IMAGE_SHA256: &str = "init_image_sha256";
/// The inpainting mask (name as given) and its SHA-256; absent for image-to-image.
pub const MASK: &str = "mask";
pub const MASK_SHA256: &str = "mask_sha256";
/// With an init image.
pub const STRENGTH: &str = "strength";
pub const PADDING_MASK_CROP: &str = "padding_mask_crop";
/// `--transformer` as given (a path or hub repo id) and the SHA-256 of the file it named.
pub const TRANSFORMER: &str = "transformer";
pub const TRANSFORMER_SHA256: &str = "transformer_sha256";
/// `--quantize` (`fp8`), only when given.
pub const QUANTIZE: &str = "quantize";
/// The adapters (names as given), their SHA-256s and scales, one per line, in one order.
pub const LORAS: &str = "loras";
pub const LORAS_SHA256: &str = "loras_sha256";
pub const LORA_SCALES: &str = "lora_scales";
pub const DEVICE: &str = "device";
pub const DTYPE: &str = "dtype";
/// Only when `--vae-dtype` was given.
pub const VAE_DTYPE: &str = "vae_dtype";
/// Only when `--vae-tile` was given: the tile size in latent pixels.
pub const VAE_TILE: &str = "vae_tile";
/// `flux2-klein VERSION`.
pub const SOFTWARE: &str = "software";

/// The settings of one image, in the order they are written. Reading tolerates missing keys
/// (only the prompt is required), so every other field is optional.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recorded {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// (width, height)
    pub size: Option<(usize, usize)>,
    pub model: Option<String>,
    pub revision: Option<String>,
    pub references: Vec<String>,
    pub references_sha256: Vec<String>,
    pub init_image: Option<String>,
    pub init_image_sha256: Option<String>,
    pub mask: Option<String>,
    pub mask_sha256: Option<String>,
    pub strength: Option<f64>,
    pub padding_mask_crop: Option<u32>,
    pub transformer: Option<String>,
    pub transformer_sha256: Option<String>,
    pub quantize: Option<String>,
    /// The adapters (name as given, scale) and each file's SHA-256.
    pub loras: Vec<LoraSpec>,
    pub loras_sha256: Vec<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub vae_dtype: Option<String>,
    pub vae_tile: Option<u32>,
    pub software: Option<String>,
}

impl Recorded {
    /// The PNG text chunks, as `(key, value)` in the schema's order.
    pub fn to_text_chunks(&self) -> Vec<(String, String)> {
        let mut chunks = Vec::new();
        let mut put = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                chunks.push((key.to_string(), v));
            }
        };
        let lines = |items: &[String]| (!items.is_empty()).then(|| items.join("\n"));
        put(PROMPT, Some(self.prompt.clone()));
        put(NEGATIVE_PROMPT, self.negative_prompt.clone());
        put(SEED, self.seed.map(|s| s.to_string()));
        put(STEPS, self.steps.map(|s| s.to_string()));
        put(GUIDANCE, self.guidance.map(|g| g.to_string()));
        put(SIZE, self.size.map(|(w, h)| format!("{w}x{h}")));
        put(MODEL, self.model.clone());
        put(REVISION, self.revision.clone());
        put(REFERENCES, lines(&self.references));
        put(REFERENCES_SHA256, lines(&self.references_sha256));
        put(INIT_IMAGE, self.init_image.clone());
        put(INIT_IMAGE_SHA256, self.init_image_sha256.clone());
        put(MASK, self.mask.clone());
        put(MASK_SHA256, self.mask_sha256.clone());
        put(STRENGTH, self.strength.map(|s| s.to_string()));
        put(
            PADDING_MASK_CROP,
            self.padding_mask_crop.map(|p| p.to_string()),
        );
        put(TRANSFORMER, self.transformer.clone());
        put(TRANSFORMER_SHA256, self.transformer_sha256.clone());
        put(QUANTIZE, self.quantize.clone());
        let sources: Vec<String> = self.loras.iter().map(|l| l.source.clone()).collect();
        let scales: Vec<String> = self.loras.iter().map(|l| l.scale.to_string()).collect();
        put(LORAS, lines(&sources));
        put(LORAS_SHA256, lines(&self.loras_sha256));
        put(LORA_SCALES, lines(&scales));
        put(DEVICE, self.device.clone());
        put(DTYPE, self.dtype.clone());
        put(VAE_DTYPE, self.vae_dtype.clone());
        put(VAE_TILE, self.vae_tile.map(|t| t.to_string()));
        put(SOFTWARE, self.software.clone());
        chunks
    }

    /// The settings in a PNG's text chunks (as `image_io::read_png_text` returns them); an
    /// error (to follow the PNG's name) when there is no prompt or a value does not parse.
    pub fn from_text_chunks(chunks: &[(String, String)]) -> Result<Self, String> {
        let get = |key: &str| {
            chunks
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let owned = |key: &str| get(key).map(str::to_string);
        let number = |key: &str| -> Result<Option<f64>, String> {
            get(key)
                .map(|v| {
                    v.parse::<f64>()
                        .map_err(|_| format!("its {key} {v:?} is not a number"))
                })
                .transpose()
        };
        let lines =
            |key: &str| get(key).map_or(vec![], |v| v.lines().map(str::to_string).collect());
        let prompt = get(PROMPT).ok_or(
            "the image has no prompt in its metadata — only images written by flux2-klein can \
             be made again this way",
        )?;
        let seed = get(SEED)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("its seed {v:?} is not a number"))
            })
            .transpose()?;
        let size = get(SIZE)
            .map(|v| {
                v.split_once('x')
                    .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                    .ok_or(format!("its size {v:?} is not WxH"))
            })
            .transpose()?;
        let sources = lines(LORAS);
        let scales = lines(LORA_SCALES);
        if scales.len() != sources.len() {
            return Err(format!(
                "its {LORAS} and {LORA_SCALES} have {} and {} lines",
                sources.len(),
                scales.len()
            ));
        }
        let loras = sources
            .iter()
            .zip(&scales)
            .map(|(src, scale)| {
                let s: f64 = scale
                    .parse()
                    .map_err(|_| format!("its LoRA scale {scale:?} is not a number"))?;
                LoraSpec::new(src, s).map_err(|e| format!("its {LORAS}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            prompt: prompt.to_string(),
            negative_prompt: owned(NEGATIVE_PROMPT),
            seed,
            // Read as a number, as older files may have written "4.0".
            steps: number(STEPS)?.map(|s| s as usize),
            guidance: number(GUIDANCE)?,
            size,
            model: owned(MODEL),
            revision: owned(REVISION),
            references: lines(REFERENCES),
            references_sha256: lines(REFERENCES_SHA256),
            init_image: owned(INIT_IMAGE),
            init_image_sha256: owned(INIT_IMAGE_SHA256),
            mask: owned(MASK),
            mask_sha256: owned(MASK_SHA256),
            strength: number(STRENGTH)?,
            padding_mask_crop: number(PADDING_MASK_CROP)?.map(|p| p as u32),
            transformer: owned(TRANSFORMER),
            transformer_sha256: owned(TRANSFORMER_SHA256),
            quantize: owned(QUANTIZE),
            loras,
            loras_sha256: lines(LORAS_SHA256),
            device: owned(DEVICE),
            dtype: owned(DTYPE),
            vae_dtype: owned(VAE_DTYPE),
            vae_tile: get(VAE_TILE)
                .map(|v| match v.parse::<u32>() {
                    Ok(t) if t >= 1 => Ok(t),
                    _ => Err(format!("its vae_tile {v:?} is not a tile size")),
                })
                .transpose()?,
            software: owned(SOFTWARE),
        })
    }

    /// The settings recorded in the image file `path` (PNG, JPEG or WebP; for
    /// `--config-from-metadata`), read without decoding its pixels.
    pub fn read(path: &Path) -> Result<Self> {
        let chunks = read_settings(path, "--config-from-metadata")?;
        Self::from_text_chunks(&chunks)
            .map_err(|e| anyhow::anyhow!("--config-from-metadata {}: {e}", path.display()))
    }
}

/// The raw `(key, value)` settings of a PNG, JPEG or WebP file; `what` (the option or
/// subcommand) names it in errors.
pub fn read_settings(path: &Path, what: &str) -> Result<Vec<(String, String)>> {
    let bytes = flux2_klein::limits::read_regular_file(
        path,
        flux2_klein::limits::MAX_IMAGE_FILE_BYTES,
        what,
    )?;
    if flux2_klein::image_io::container_of(&bytes).is_none() {
        bail!(
            "{what} {}: not a PNG, JPEG or WebP file — only flux2-klein's image outputs record \
             their settings",
            path.display()
        );
    }
    flux2_klein::image_io::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

/// Where a path recorded in `image`'s metadata is now: paths were recorded as given (relative
/// to the directory the run started in), so a relative one is looked for next to the image
/// first, then as given; the candidate whose SHA-256 matches the recorded one wins, else the
/// first that exists, else the one next to the image (whose error then names it).
pub fn resolve_recorded_path(image: &Path, name: &str, sha256: Option<&str>) -> String {
    let as_given = Path::new(name);
    if as_given.is_absolute() {
        return name.to_string();
    }
    let dir = image.parent().filter(|d| !d.as_os_str().is_empty());
    let beside = dir.map_or_else(|| as_given.to_path_buf(), |d| d.join(as_given));
    let candidates = [beside.clone(), as_given.to_path_buf()];
    let matches = |p: &Path| {
        sha256.is_some_and(|want| {
            p.is_file() && flux2_klein::image_io::sha256_file(p).is_ok_and(|h| h == want)
        })
    };
    candidates
        .iter()
        .find(|p| matches(p))
        .or_else(|| candidates.iter().find(|p| p.is_file()))
        .unwrap_or(&beside)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Recorded {
        Recorded {
            prompt: "un café ☕\nsecond line".into(),
            negative_prompt: Some("blurry".into()),
            seed: Some(u64::MAX),
            steps: Some(4),
            guidance: Some(3.5),
            size: Some((1024, 768)),
            model: Some("black-forest-labs/FLUX.2-klein-4B".into()),
            revision: Some("main".into()),
            references: vec!["a.png".into(), "dir/b.jpg".into()],
            references_sha256: vec!["00ff".into(), "abcd".into()],
            init_image: Some("init.png".into()),
            init_image_sha256: Some("1234".into()),
            mask: Some("mask.png".into()),
            mask_sha256: Some("5678".into()),
            strength: Some(0.75),
            padding_mask_crop: Some(32),
            transformer: Some("black-forest-labs/FLUX.2-klein-4b-fp8".into()),
            transformer_sha256: Some("97ed".into()),
            quantize: Some("fp8".into()),
            loras: vec![
                LoraSpec::new("style.safetensors", 0.8).unwrap(),
                LoraSpec::new("o/r/b.safetensors", -1.0).unwrap(),
            ],
            loras_sha256: vec!["aa".into(), "bb".into()],
            device: Some("cuda:0".into()),
            dtype: Some("bf16".into()),
            vae_dtype: Some("f32".into()),
            vae_tile: Some(32),
            software: Some("flux2-klein 0.1.0".into()),
        }
    }

    #[test]
    fn round_trip() {
        for recorded in [
            full(),
            Recorded {
                prompt: "only a prompt".into(),
                ..Recorded::default()
            },
        ] {
            let chunks = recorded.to_text_chunks();
            assert_eq!(Recorded::from_text_chunks(&chunks), Ok(recorded));
        }
    }

    #[test]
    fn keys_and_values_as_written() {
        let chunks = full().to_text_chunks();
        let pairs: Vec<(&str, &str)> = chunks
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("prompt", "un café ☕\nsecond line"),
                ("negative_prompt", "blurry"),
                ("seed", "18446744073709551615"),
                ("steps", "4"),
                ("guidance", "3.5"),
                ("size", "1024x768"),
                ("model", "black-forest-labs/FLUX.2-klein-4B"),
                ("revision", "main"),
                ("references", "a.png\ndir/b.jpg"),
                ("references_sha256", "00ff\nabcd"),
                ("init_image", "init.png"),
                ("init_image_sha256", "1234"),
                ("mask", "mask.png"),
                ("mask_sha256", "5678"),
                ("strength", "0.75"),
                ("padding_mask_crop", "32"),
                ("transformer", "black-forest-labs/FLUX.2-klein-4b-fp8"),
                ("transformer_sha256", "97ed"),
                ("quantize", "fp8"),
                ("loras", "style.safetensors\no/r/b.safetensors"),
                ("loras_sha256", "aa\nbb"),
                ("lora_scales", "0.8\n-1"),
                ("device", "cuda:0"),
                ("dtype", "bf16"),
                ("vae_dtype", "f32"),
                ("vae_tile", "32"),
                ("software", "flux2-klein 0.1.0"),
            ]
        );
        let one = Recorded {
            guidance: Some(1.0),
            ..Recorded::default()
        };
        assert!(one
            .to_text_chunks()
            .contains(&("guidance".into(), "1".into())));
    }

    #[test]
    fn bad_values_are_named() {
        let chunks = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = Recorded::from_text_chunks(&chunks(&[("seed", "1")])).unwrap_err();
        assert!(err.contains("no prompt"), "{err}");
        let err =
            Recorded::from_text_chunks(&chunks(&[("prompt", "x"), ("size", "64")])).unwrap_err();
        assert!(err.contains("\"64\" is not WxH"), "{err}");
        let err =
            Recorded::from_text_chunks(&chunks(&[("prompt", "x"), ("steps", "four")])).unwrap_err();
        assert!(err.contains("steps"), "{err}");
        let old = Recorded::from_text_chunks(&chunks(&[("prompt", "x"), ("steps", "4.0")]));
        assert_eq!(old.unwrap().steps, Some(4));
    }
}
