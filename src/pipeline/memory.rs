//! The memory a batch needs, estimated before anything loads, against what the device has
//! (`ops::device::available`): a request that clearly cannot fit is refused with one line
//! that says what to lower, instead of an allocation abort or the OOM killer minutes later.
//!
//! The estimate is a lower bound, so it only refuses what is clearly impossible: the weights
//! of each component as loaded (element counts from the safetensors headers × the dtype they
//! are loaded in), plus the largest activations that are certain to exist at once:
//!
//! * transformer: the hidden states of every token (image + references + 512 prompt tokens)
//!   through one block (≥ 8 × tokens × inner dim), and, where attention runs candle's
//!   reference (the CPU, or no flash kernel), its f32 score blocks (tokens² per head, at
//!   least one head at a time, `ops::attention` splits the rest into ~1 GiB blocks) and their
//!   softmax;
//! * VAE decode: two full-resolution feature maps with the channels of the decoder's
//!   full-resolution block (`block_out_channels[0]`; of one tile with `vae_tile`), and the
//!   f32 image; VAE encode: the same with the encoder's first block for each condition image.
//!
//! Without `keep_resident` the peak is the largest stage (its component + its activations);
//! with it, every component's weights + the largest activations. Components already loaded
//! (a resident pipeline's second batch) count as free: their memory is in use already.
//! The request is refused when the estimate exceeds the memory available (margin factor 1.0:
//! the estimate's omissions — the text encoder's activations, candle's temporaries, the
//! allocator's slack — are the margin).

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::DType;

use super::{floor_to_multiple_of_16, Pipeline, Request, MAX_SEQUENCE_LENGTH};
use crate::image_io::prepared_reference_size;
use crate::vae::AutoencoderKLFlux2Config;

/// The largest safetensors header read (the real ones are well under 1 MiB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Tensor elements in the safetensors files of a component.
pub fn weight_elements(files: &[impl AsRef<Path>]) -> Result<u64> {
    let mut total = 0u64;
    for file in files {
        let file = file.as_ref();
        total = total
            .saturating_add(header_elements(file).with_context(|| {
                format!("reading the safetensors header of {}", file.display())
            })?);
    }
    Ok(total)
}

/// The element count of every tensor a safetensors header lists.
fn header_elements(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        bail!("its header claims {len} bytes, above the {MAX_HEADER_BYTES} allowed");
    }
    let mut header = Vec::new();
    f.take(len).read_to_end(&mut header)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let mut total = 0u64;
    for (name, entry) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .with_context(|| format!("tensor {name} has no shape"))?;
        let mut n = 1u64;
        for d in shape {
            let d = d
                .as_u64()
                .with_context(|| format!("tensor {name} has a bad shape"))?;
            n = n.saturating_mul(d);
        }
        total = total.saturating_add(n);
    }
    Ok(total)
}

/// The estimate of one batch, in bytes, with its largest parts for the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub peak: u64,
    /// What the peak is made of: (what, bytes), largest first.
    pub parts: Vec<(String, u64)>,
    /// Whether the VAE decode's activations are the largest part (tiling would help).
    pub vae_bound: bool,
    /// Whether weights are the largest part (a smaller dtype would help).
    pub weight_bound: bool,
}

/// The sizes that drive a request's activations.
struct Shape {
    width: usize,
    height: usize,
    /// (width, height) of each condition image as prepared (references, the init image).
    conditions: Vec<(usize, usize)>,
}

fn shape_of(request: &Request) -> Shape {
    let prepared = |im: &image::DynamicImage| {
        let (w, h) = prepared_reference_size(im.width(), im.height());
        (w as usize, h as usize)
    };
    let mut conditions: Vec<(usize, usize)> = Vec::new();
    if let Some(init) = &request.init {
        conditions.push(prepared(&init.image));
    }
    conditions.extend(request.references.iter().map(|r| prepared(&r.image)));
    let default = conditions.first().copied().unwrap_or((1024, 1024));
    let (width, height) = match &request.init {
        Some(_) => default,
        None => (
            request.width.unwrap_or(default.0),
            request.height.unwrap_or(default.1),
        ),
    };
    Shape {
        width: floor_to_multiple_of_16(width),
        height: floor_to_multiple_of_16(height),
        conditions,
    }
}

/// Estimates the memory `requests` need on `pipeline` (see the module documentation).
pub fn estimate(pipeline: &Pipeline, requests: &[Request]) -> Result<Estimate> {
    let o = &pipeline.options;
    let t = &pipeline.transformer_config;
    let vae: AutoencoderKLFlux2Config = pipeline.model.config("vae")?;
    let weights = |component: &str, dtype: DType, loaded: bool| -> Result<u64> {
        if loaded {
            return Ok(0);
        }
        let files = pipeline.model.weights(component)?;
        Ok(weight_elements(&files)?.saturating_mul(dtype.size_in_bytes() as u64))
    };
    let text_w = weights("text_encoder", o.dtype, pipeline.text_encoder.is_some())?;
    let transformer_w = weights("transformer", o.dtype, pipeline.transformer.is_some())?;
    let vae_w = weights(
        "vae",
        o.vae_dtype(),
        pipeline.vae_encoder.is_some() && pipeline.vae_decoder.is_some(),
    )?;
    let bytes = o.dtype.size_in_bytes() as u64;
    let vae_bytes = o.vae_dtype().size_in_bytes() as u64;
    let naive_attention =
        crate::ops::attention::kernel_name(&o.device, t.attention_head_dim, o.dtype)
            .starts_with("naive");
    // The channels at full resolution: the decoder's last block, the encoder's first.
    let dec_channels = vae.decoder_channels().first().copied().unwrap_or(0) as u64;
    let enc_channels = vae.block_out_channels.first().copied().unwrap_or(0) as u64;
    let heads = t.num_attention_heads as u64;
    let (mut hidden, mut scores, mut decode, mut encode) = (0u64, 0u64, 0u64, 0u64);
    let mut largest = (0, 0);
    for request in requests {
        let s = shape_of(request);
        let tokens = |w: usize, h: usize| (w / 16 * (h / 16)) as u64;
        let seq = tokens(s.width, s.height)
            + s.conditions.iter().map(|&(w, h)| tokens(w, h)).sum::<u64>()
            + MAX_SEQUENCE_LENGTH as u64;
        hidden = hidden.max(seq.saturating_mul(t.inner_dim() as u64) * bytes * 8);
        if naive_attention {
            let per_head = seq.saturating_mul(seq).saturating_mul(4);
            let at_once = (crate::ops::attention::MAX_SCORE_BYTES as u64 / per_head.max(1))
                .clamp(1, heads.max(1));
            // The scores and their softmax.
            scores = scores.max(per_head.saturating_mul(at_once).saturating_mul(2));
        }
        let pixels = match o.vae_tile {
            Some(tile) => {
                let side = (tile * vae.scale_factor()) as u64;
                side * side
            }
            None => (s.width * s.height) as u64,
        }
        .min((s.width * s.height) as u64);
        let image = (s.width * s.height) as u64 * 3 * 4;
        decode = decode.max(pixels.saturating_mul(dec_channels) * vae_bytes * 2 + image);
        for &(w, h) in &s.conditions {
            encode = encode.max((w * h) as u64 * enc_channels * vae_bytes * 2);
        }
        if (s.width * s.height) > largest.0 * largest.1 {
            largest = (s.width, s.height);
        }
    }
    let transformer_act = hidden.saturating_add(scores);
    let stages = [
        ("the text encoder", text_w, 0),
        ("the VAE encoder", vae_w, encode),
        ("the transformer", transformer_w, transformer_act),
        ("the VAE decoder", vae_w, decode),
    ];
    let (w, h) = largest;
    let act_parts = |stage: &str| -> Vec<(String, u64)> {
        match stage {
            "the transformer" => vec![
                (format!("transformer activations at {w}×{h}"), hidden),
                (format!("attention scores at {w}×{h}"), scores),
            ],
            "the VAE decoder" => vec![(format!("VAE decode at {w}×{h}"), decode)],
            "the VAE encoder" => vec![("VAE encode of the condition images".into(), encode)],
            _ => vec![],
        }
    };
    let weight_part = |name: &str, b: u64| (format!("{name} weights"), b);
    let (peak, mut parts) = if o.keep_resident {
        let act = stages.iter().map(|s| s.2).max().unwrap_or(0);
        let stage = stages.iter().max_by_key(|s| s.2).map_or("", |s| s.0);
        let mut parts = vec![
            weight_part("text encoder", text_w),
            weight_part("transformer", transformer_w),
            weight_part("VAE", vae_w),
        ];
        parts.extend(act_parts(stage));
        (text_w + transformer_w + vae_w + act, parts)
    } else {
        let top = stages
            .iter()
            .max_by_key(|s| s.1.saturating_add(s.2))
            .expect("four stages");
        let mut parts = vec![weight_part(top.0.trim_start_matches("the "), top.1)];
        parts.extend(act_parts(top.0));
        (top.1.saturating_add(top.2), parts)
    };
    parts.retain(|p| p.1 > 0);
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    let vae_bound = parts.first().is_some_and(|p| p.0.starts_with("VAE decode"));
    let weight_bound = parts.first().is_some_and(|p| p.0.ends_with("weights"));
    Ok(Estimate {
        peak,
        parts,
        vae_bound,
        weight_bound,
    })
}

/// "1.5 GiB", "300 MiB", "12 KiB".
pub fn fmt_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if b as f64 >= GIB {
        format!("{:.1} GiB", b as f64 / GIB)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b.div_ceil(1 << 10))
    }
}

/// Refuses `requests` when their [`estimate`] exceeds the memory the device has available
/// (nothing is checked where the device cannot tell).
pub fn check_requests(pipeline: &Pipeline, requests: &[Request]) -> Result<()> {
    let Some(available) = crate::ops::device::available(&pipeline.options.device) else {
        return Ok(());
    };
    let e = estimate(pipeline, requests)?;
    if e.peak <= available {
        return Ok(());
    }
    let o = &pipeline.options;
    let parts: Vec<String> = e
        .parts
        .iter()
        .take(3)
        .map(|(what, b)| format!("{what} {}", fmt_bytes(*b)))
        .collect();
    let mut fixes = vec!["a smaller --width/--height".to_string()];
    if e.vae_bound && o.vae_tile.is_none() {
        fixes.push("--vae-tile 64".into());
    }
    if o.keep_resident {
        fixes.push("no --resident".into());
    }
    if o.dtype == DType::F32 && e.weight_bound {
        fixes.push("--dtype bf16".into());
    }
    if requests.iter().any(|r| !r.references.is_empty()) {
        fixes.push("fewer references".into());
    }
    let device = if o.device.is_cuda() { "GPU" } else { "CPU" };
    bail!(
        "not enough memory: this run needs at least {} ({}), and the {device} has {} available \
         — try {}, or free memory",
        fmt_bytes(e.peak),
        parts.join(", "),
        fmt_bytes(available),
        fixes.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_headers_count_elements() {
        let dir = std::env::temp_dir().join(format!("flux2-klein-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = br#"{"__metadata__":{"a":"b"},"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"y":{"dtype":"BF16","shape":[5],"data_offsets":[24,34]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 34]);
        let file = dir.join("w.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(weight_elements(&[&file]).unwrap(), 11);
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        std::fs::write(&file, &huge).unwrap();
        assert!(weight_elements(&[&file]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(fmt_bytes(3 << 29), "1.5 GiB");
        assert_eq!(fmt_bytes(1000), "1 KiB");
    }

    #[test]
    fn the_tiny_model_fits_and_8192_squared_does_not() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-w0");
        let model = crate::ModelDir::open_local(&dir).unwrap();
        let mut options = super::super::PipelineOptions::for_device(candle_core::Device::Cpu);
        options.max_area = crate::limits::MAX_AREA_CEILING;
        let pipeline = Pipeline::open(model, options).unwrap();
        let sized = |w, h| {
            let mut r = Request::new("x", 0);
            (r.width, r.height) = (Some(w), Some(h));
            r
        };
        let small = estimate(&pipeline, &[sized(64, 64), sized(1024, 1024)]).unwrap();
        assert!(small.peak < 1 << 30, "{small:?}");
        let big = estimate(&pipeline, &[sized(64, 64), sized(8192, 8192)]).unwrap();
        // 262 656 tokens: one head's f32 scores and their softmax.
        let tokens = 512u64 * 512 + 512;
        assert!(big.peak >= tokens * tokens * 4 * 2, "{big:?}");
        assert!(
            big.parts[0].0.starts_with("attention scores at 8192×8192"),
            "{big:?}"
        );
        assert!(!big.weight_bound && !big.vae_bound);
    }
}
