//! Reading an adapter file: the safetensors container (size cap, truncation), its tensors,
//! diffusers' `lora_adapter_metadata` (peft's `LoraConfig`: `r`, `lora_alpha`, patterns), and
//! the checks against the transformer's modules (names, ranks, shapes) that make a bad file
//! fail before any model weight loads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};

use super::formats::{convert, detect, first_keys, Converted, Delta, Factor, LoraFormat};
use crate::transformer::Flux2TransformerConfig;

/// The largest adapter file read (a rank-256 adapter of the 9B model is ~2 GiB in bf16).
pub const MAX_ADAPTER_FILE_BYTES: u64 = 8 << 30;

/// diffusers' key in the safetensors `__metadata__` holding the peft config as JSON.
const METADATA_KEY: &str = "lora_adapter_metadata";

/// A read adapter file: its tensors by name, diffusers' adapter metadata (if any), and the
/// SHA-256 of its bytes (lowercase hex).
pub struct FileContents {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: Option<serde_json::Value>,
    pub sha256: String,
}

/// Reads an adapter file (named `label` in messages).
pub fn read_tensors(path: &Path, label: &str) -> Result<FileContents> {
    let bytes = crate::limits::read_regular_file(path, MAX_ADAPTER_FILE_BYTES, "LoRA file")?;
    let sha256 = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "LoRA file {label} is not a readable safetensors file ({e}) — it may be truncated \
             or not an adapter; download it again"
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("LoRA file {label}: bad safetensors header ({e})"))?;
    let metadata = match header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
        Some(raw) => Some(serde_json::from_str(raw).map_err(|e| {
            anyhow!("LoRA file {label}: its {METADATA_KEY} is not valid JSON ({e})")
        })?),
        None => None,
    };
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(&Device::Cpu)
            .with_context(|| format!("LoRA file {label}: reading tensor {name}"))?;
        tensors.insert(name, t);
    }
    Ok(FileContents {
        tensors,
        metadata,
        sha256,
    })
}

/// peft's scale of one module, `lora_alpha / r` (`/ √r` with rsLoRA), from the metadata's
/// config; 1 without metadata (diffusers then sets `lora_alpha = r` everywhere).
#[derive(Debug, Clone, Default)]
pub struct PeftConfig {
    r: Option<f64>,
    alpha: Option<f64>,
    rslora: bool,
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
}

impl PeftConfig {
    /// The `transformer.`-prefixed entries of diffusers' metadata (`LoraConfig` fields).
    pub fn from_metadata(meta: Option<&serde_json::Value>, label: &str) -> Result<Self> {
        let Some(obj) = meta.and_then(|m| m.as_object()) else {
            return Ok(Self::default());
        };
        let get = |k: &str| obj.get(&format!("transformer.{k}"));
        let number = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                    _ => bail!("LoRA file {label}: metadata {k} = {v} is not a positive number"),
                },
            }
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            let Some(m) = get(k).and_then(|v| v.as_object()) else {
                return Ok(vec![]);
            };
            m.iter()
                .map(|(p, v)| match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok((p.clone(), x)),
                    _ => {
                        bail!("LoRA file {label}: metadata {k}[{p}] = {v} is not a positive number")
                    }
                })
                .collect()
        };
        for flag in ["use_dora", "lora_bias"] {
            if get(flag).and_then(|v| v.as_bool()) == Some(true) {
                bail!("LoRA file {label}: {flag} adapters are not supported (only plain LoRA and LoKr)");
            }
        }
        Ok(Self {
            r: number("r")?,
            alpha: number("lora_alpha")?.or(number("alpha")?),
            rslora: get("use_rslora").and_then(|v| v.as_bool()) == Some(true),
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// peft's `get_pattern_key`: the first pattern `p` with `(.*\.)?(p)$` matching `module`.
    /// Patterns are matched literally (diffusers writes module names, or `^`-anchored ones).
    fn lookup(patterns: &[(String, f64)], module: &str) -> Option<f64> {
        patterns.iter().find_map(|(p, v)| {
            let p = p.strip_prefix('^').unwrap_or(p);
            (module == p || module.ends_with(&format!(".{p}"))).then_some(*v)
        })
    }

    /// (the rank the config expects, the scale) for `module`; `None` rank = any.
    pub fn module(&self, module: &str) -> (Option<f64>, f64) {
        let r = Self::lookup(&self.rank_pattern, module).or(self.r);
        let alpha = Self::lookup(&self.alpha_pattern, module).or(self.alpha);
        match (r, alpha) {
            (Some(r), Some(a)) => (Some(r), if self.rslora { a / r.sqrt() } else { a / r }),
            (r, _) => (r, 1.0),
        }
    }
}

/// One diffusers linear of the transformer that an adapter may target: `(out, in)`.
/// `to_qkv` / `to_added_qkv` are the fused projections diffusers builds for BFL LoKr files
/// (three row blocks of `d` rows: q, k, v).
pub fn linear_shapes(cfg: &Flux2TransformerConfig) -> BTreeMap<String, (usize, usize)> {
    let d = cfg.inner_dim();
    let f = cfg.mlp_hidden_dim();
    let mut m = BTreeMap::new();
    let mut put = |k: String, out: usize, inp: usize| {
        m.insert(k, (out, inp));
    };
    put("x_embedder".into(), d, cfg.in_channels);
    put("context_embedder".into(), d, cfg.joint_attention_dim);
    let t = "time_guidance_embed.timestep_embedder";
    put(format!("{t}.linear_1"), d, cfg.timestep_guidance_channels);
    put(format!("{t}.linear_2"), d, d);
    if cfg.guidance_embeds {
        let g = "time_guidance_embed.guidance_embedder";
        put(format!("{g}.linear_1"), d, cfg.timestep_guidance_channels);
        put(format!("{g}.linear_2"), d, d);
    }
    put("double_stream_modulation_img.linear".into(), 6 * d, d);
    put("double_stream_modulation_txt.linear".into(), 6 * d, d);
    put("single_stream_modulation.linear".into(), 3 * d, d);
    put("norm_out.linear".into(), 2 * d, d);
    let p = cfg.patch_size * cfg.patch_size * cfg.out_channels();
    put("proj_out".into(), p, d);
    for i in 0..cfg.num_layers {
        let b = format!("transformer_blocks.{i}");
        for l in [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_out.0",
            "attn.to_add_out",
        ] {
            put(format!("{b}.{l}"), d, d);
        }
        put(format!("{b}.attn.to_qkv"), 3 * d, d);
        put(format!("{b}.attn.to_added_qkv"), 3 * d, d);
        for ff in ["ff", "ff_context"] {
            put(format!("{b}.{ff}.linear_in"), 2 * f, d);
            put(format!("{b}.{ff}.linear_out"), d, f);
        }
    }
    for i in 0..cfg.num_single_layers {
        let b = format!("single_transformer_blocks.{i}");
        put(format!("{b}.attn.to_qkv_mlp_proj"), 3 * d + 2 * f, d);
        put(format!("{b}.attn.to_out"), d, d + f);
    }
    m
}

/// The module a fused LoKr projection is cut into, in row-block order.
pub fn fused_parts(module: &str) -> Option<[String; 3]> {
    let (block, which) = module.rsplit_once(".attn.")?;
    let parts = match which {
        "to_qkv" => ["to_q", "to_k", "to_v"],
        "to_added_qkv" => ["add_q_proj", "add_k_proj", "add_v_proj"],
        _ => return None,
    };
    Some(parts.map(|p| format!("{block}.attn.{p}")))
}

/// A module's delta with the shapes checked against the model: every factor 2-D, the ranks
/// agreeing, the product `[out, in]`.
pub fn check_delta(
    module: &str,
    delta: &Delta,
    expected: (usize, usize),
    expected_rank: Option<f64>,
    label: &str,
) -> Result<()> {
    let dims2 = |t: &Tensor, what: &str| -> Result<(usize, usize)> {
        match t.dims() {
            [a, b] => Ok((*a, *b)),
            d => bail!("LoRA file {label}: {module}.{what} has shape {d:?}, expected a matrix"),
        }
    };
    let (out, inp) = expected;
    match delta {
        Delta::LowRank { down, up } => {
            let (r, i) = dims2(down, "lora_A")?;
            let (o, r2) = dims2(up, "lora_B")?;
            if r != r2 {
                bail!(
                    "LoRA file {label}: {module} has lora_A of shape [{r}, {i}] and lora_B of \
                     shape [{o}, {r2}]: their ranks differ"
                );
            }
            if (o, i) != (out, inp) {
                bail!(
                    "LoRA file {label}: {module} makes a [{o}, {i}] delta (lora_B [{o}, {r}] · \
                     lora_A [{r}, {i}]) but the model's weight is [{out}, {inp}] — the adapter \
                     is for another model"
                );
            }
            if let Some(er) = expected_rank {
                if r as f64 != er {
                    bail!("LoRA file {label}: {module} has rank {r} but its metadata says {er}");
                }
            }
        }
        Delta::Kronecker { w1, w2 } => {
            let shape = |f: &Factor, w: &str| -> Result<(usize, usize)> {
                match f {
                    Factor::Full(t) => dims2(t, w),
                    Factor::Product(a, b) => {
                        let (p, r) = dims2(a, &format!("{w}_a"))?;
                        let (r2, q) = dims2(b, &format!("{w}_b"))?;
                        if r != r2 {
                            bail!(
                                "LoRA file {label}: {module}.{w}_a is [{p}, {r}] and {w}_b is \
                                 [{r2}, {q}]: their ranks differ"
                            );
                        }
                        Ok((p, q))
                    }
                }
            };
            let (a, b) = shape(w1, "lokr_w1")?;
            let (c, e) = shape(w2, "lokr_w2")?;
            if (a * c, b * e) != (out, inp) {
                bail!(
                    "LoRA file {label}: {module} makes a [{}, {}] delta (kron of [{a}, {b}] and \
                     [{c}, {e}]) but the model's weight is [{out}, {inp}] — the adapter is for \
                     another model",
                    a * c,
                    b * e
                );
            }
        }
    }
    Ok(())
}

/// Reads and converts an adapter, checked against the transformer; warns (through `warn`)
/// about what diffusers skips too.
pub fn read_adapter(
    path: &Path,
    label: &str,
    cfg: &Flux2TransformerConfig,
    warn: &mut dyn FnMut(String),
) -> Result<(Converted, PeftConfig, String)> {
    let FileContents {
        tensors,
        metadata,
        sha256,
    } = read_tensors(path, label)?;
    if tensors.is_empty() {
        bail!("LoRA file {label} holds no tensors");
    }
    if tensors.keys().any(|k| k.contains("dora_scale")) {
        warn(format!(
            "LoRA file {label} is a DoRA checkpoint: its dora_scale tensors are ignored, as \
             diffusers does, so it acts as a plain LoRA"
        ));
    }
    let names: Vec<String> = tensors.keys().cloned().collect();
    let detected = detect(tensors.keys());
    let converted = convert(tensors)
        .map_err(|e| anyhow!("LoRA file {label} ({} layout): {e}", detected.name()))?;
    let format = converted.format;
    if converted.modules.is_empty() {
        let what = if converted.skipped.iter().all(|k| is_text_encoder_key(k))
            && !converted.skipped.is_empty()
        {
            "only text-encoder adapters (FLUX.2 [klein] adapters apply to the transformer only)"
        } else {
            "no LoRA tensors for the FLUX.2 transformer"
        };
        bail!(
            "LoRA file {label} ({} layout) holds {what}; its keys: {}",
            format.name(),
            first_keys(&names)
        );
    }
    if !converted.skipped.is_empty() {
        let te = converted
            .skipped
            .iter()
            .filter(|k| is_text_encoder_key(k))
            .count();
        let kind = if te == converted.skipped.len() {
            "text-encoder keys"
        } else {
            "keys with no FLUX.2 transformer module"
        };
        warn(format!(
            "LoRA file {label}: {} {kind} skipped, as diffusers does: {}",
            converted.skipped.len(),
            first_keys(&converted.skipped)
        ));
    }
    let config = PeftConfig::from_metadata(metadata.as_ref(), label)?;
    let shapes = linear_shapes(cfg);
    let unknown: Vec<String> = converted
        .modules
        .keys()
        .filter(|m| !shapes.contains_key(*m))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        bail!(
            "LoRA file {label} ({} layout) targets {} — no such module in this FLUX.2 \
             transformer ({} double, {} single blocks{})",
            format.name(),
            first_keys(&unknown),
            cfg.num_layers,
            cfg.num_single_layers,
            if cfg.guidance_embeds {
                ""
            } else {
                ", no guidance embedder"
            }
        );
    }
    for (module, delta) in &converted.modules {
        let fused = fused_parts(module).is_some();
        if fused && !matches!(delta, Delta::Kronecker { .. }) {
            bail!("LoRA file {label}: {module} is a fused projection only LoKr files target");
        }
        let (rank, _) = config.module(module);
        let rank = rank.filter(|_| matches!(delta, Delta::LowRank { .. }));
        check_delta(module, delta, shapes[module], rank, label)?;
    }
    if format == LoraFormat::Lokr {
        // Fused and split deltas of one projection would both apply; diffusers refuses that too.
        for module in converted.modules.keys() {
            if let Some(parts) = fused_parts(module) {
                if let Some(p) = parts.iter().find(|p| converted.modules.contains_key(*p)) {
                    bail!("LoRA file {label} targets both {module} and {p}");
                }
            }
        }
    }
    Ok((converted, config, sha256))
}

/// Text-encoder adapter keys: diffusers' `text_encoder.` prefix, kohya's `lora_te…`.
fn is_text_encoder_key(k: &str) -> bool {
    k.starts_with("text_encoder") || k.starts_with("lora_te")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_scales_from_metadata() {
        let meta = serde_json::json!({
            "transformer.r": 4,
            "transformer.lora_alpha": 8,
            "transformer.rank_pattern": {"proj_out": 2, "^transformer_blocks.0.attn.to_q": 8},
            "transformer.alpha_pattern": {"proj_out": 1},
        });
        let c = PeftConfig::from_metadata(Some(&meta), "x").unwrap();
        assert_eq!(c.module("transformer_blocks.1.attn.to_k"), (Some(4.0), 2.0));
        assert_eq!(c.module("proj_out"), (Some(2.0), 0.5));
        assert_eq!(c.module("transformer_blocks.0.attn.to_q"), (Some(8.0), 1.0));
        let rs = serde_json::json!({"transformer.r": 16, "transformer.lora_alpha": 8,
            "transformer.use_rslora": true});
        let c = PeftConfig::from_metadata(Some(&rs), "x").unwrap();
        assert_eq!(c.module("proj_out"), (Some(16.0), 2.0));
        assert_eq!(PeftConfig::default().module("proj_out"), (None, 1.0));
        let dora = serde_json::json!({"transformer.use_dora": true});
        assert!(PeftConfig::from_metadata(Some(&dora), "x").is_err());
        let bad = serde_json::json!({"transformer.lora_alpha": "big"});
        assert!(PeftConfig::from_metadata(Some(&bad), "x").is_err());
    }
}
