//! The adapter layouts diffusers 0.42.1 reads for FLUX.2 (`Flux2LoraLoaderMixin.lora_state_dict`
//! and the flux2 converters of `lora_conversion_utils.py`, spec-wave2 §1.2), converted to one
//! form: per diffusers module of the transformer (`transformer_blocks.0.attn.to_q`), a
//! low-rank pair or a Kronecker pair.
//!
//! Detection runs in diffusers' order: `.lora_down.weight` anywhere → kohya/musubi; else a
//! `base_model.model.` prefix is renamed `diffusion_model.` (fal / BFL-PEFT); then `.lokr_`
//! keys → the LoKr converters (LyCORIS `lycoris_…`, BFL-named `diffusion_model.…`, bare
//! diffusers paths, or diffusers' own `transformer.…`); else `diffusion_model.` keys →
//! ai-toolkit; else the diffusers/peft layout (`transformer.…lora_A.weight`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The layout an adapter file was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers / peft: `transformer.…​.lora_A.weight`.
    Diffusers,
    /// ai-toolkit (BFL names): `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`.
    AiToolkit,
    /// fal / BFL-PEFT: `base_model.model.double_blocks.…`.
    BflPeft,
    /// kohya / musubi-tuner: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + alpha.
    Kohya,
    /// LoKr (LyCORIS / ai-toolkit / SimpleTuner): `….lokr_w1`, `….lokr_w2[_a|_b]`.
    Lokr,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers/peft",
            Self::AiToolkit => "ai-toolkit",
            Self::BflPeft => "BFL-PEFT (base_model.model.)",
            Self::Kohya => "kohya/musubi",
            Self::Lokr => "LoKr",
        }
    }
}

/// A LoKr factor: stored whole (`lokr_w1`) or as a product (`lokr_w1_a @ lokr_w1_b`).
#[derive(Debug, Clone)]
pub enum Factor {
    Full(Tensor),
    Product(Tensor, Tensor),
}

/// What one adapter adds to one diffusers module's weight (before the scales).
#[derive(Debug, Clone)]
pub enum Delta {
    /// `up · down`: `down` (lora_A) `[r, in]`, `up` (lora_B) `[out, r]`.
    LowRank { down: Tensor, up: Tensor },
    /// `kron(w1, w2)`.
    Kronecker { w1: Factor, w2: Factor },
}

/// An adapter's tensors, converted: diffusers module path (without `transformer.`) → delta.
#[derive(Debug)]
pub struct Converted {
    pub format: LoraFormat,
    pub modules: BTreeMap<String, Delta>,
    /// Keys diffusers skips (with a warning for kohya's, silently for other prefixes):
    /// text-encoder adapters and kohya keys with no FLUX.2 counterpart.
    pub skipped: Vec<String>,
}

pub(super) type Tensors = BTreeMap<String, Tensor>;

/// The layout diffusers would take a file with these keys for (the order of [`convert`]).
pub fn detect<'a>(keys: impl Iterator<Item = &'a String> + Clone) -> LoraFormat {
    let any = |f: &dyn Fn(&str) -> bool| keys.clone().any(|k| f(k));
    if any(&|k| k.contains(".lora_down.weight")) {
        LoraFormat::Kohya
    } else if any(&|k| k.contains(".lokr_")) {
        LoraFormat::Lokr
    } else if any(&|k| k.starts_with("base_model.model.")) {
        LoraFormat::BflPeft
    } else if any(&|k| k.starts_with("diffusion_model.")) {
        LoraFormat::AiToolkit
    } else {
        LoraFormat::Diffusers
    }
}

/// Converts a file's tensors the way diffusers reads them.
pub fn convert(mut sd: Tensors) -> Result<Converted> {
    // DoRA magnitudes are dropped with a warning by diffusers (the caller warns).
    sd.retain(|k, _| !k.contains("dora_scale"));
    if sd.keys().any(|k| k.contains(".lora_down.weight")) {
        return super::kohya::convert(sd);
    }
    let mut format = None;
    if sd.keys().any(|k| k.starts_with("base_model.model.")) {
        sd = sd
            .into_iter()
            .map(|(k, v)| (k.replace("base_model.model.", "diffusion_model."), v))
            .collect();
        format = Some(LoraFormat::BflPeft);
    }
    let is_ai_toolkit = sd.keys().any(|k| k.starts_with("diffusion_model."));
    if sd.keys().any(|k| k.contains(".lokr_")) {
        return super::lokr::convert(sd, is_ai_toolkit);
    }
    if is_ai_toolkit {
        let modules = bfl_lora(sd)?;
        return Ok(Converted {
            format: format.unwrap_or(LoraFormat::AiToolkit),
            modules,
            skipped: vec![],
        });
    }
    peft(sd)
}

/// Keys that are not for the transformer: diffusers' `load_lora_into_transformer` takes the
/// `transformer.` keys only.
pub(super) fn split_prefix(sd: Tensors) -> (Tensors, Vec<String>) {
    let mut ours = Tensors::new();
    let mut skipped = vec![];
    for (k, v) in sd {
        match k.strip_prefix("transformer.") {
            Some(rest) => {
                ours.insert(rest.to_string(), v);
            }
            None => skipped.push(k),
        }
    }
    (ours, skipped)
}

/// diffusers/peft: `{module}.lora_A.weight`, `{module}.lora_B.weight`.
fn peft(sd: Tensors) -> Result<Converted> {
    let (ours, skipped) = split_prefix(sd);
    let mut modules = BTreeMap::new();
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut unknown = vec![];
    for (k, v) in ours {
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            pairs.entry(m.to_string()).or_default().0 = Some(v);
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            pairs.entry(m.to_string()).or_default().1 = Some(v);
        } else {
            unknown.push(format!("transformer.{k}"));
        }
    }
    if !unknown.is_empty() {
        bail!(
            "{} is not a LoRA key diffusers reads (lora_B biases, DoRA magnitudes and other \
             adapter kinds are not supported)",
            first_keys(&unknown)
        );
    }
    for (m, pair) in pairs {
        modules.insert(m.clone(), low_rank(&m, pair)?);
    }
    Ok(Converted {
        format: LoraFormat::Diffusers,
        modules,
        skipped,
    })
}

fn low_rank(module: &str, pair: (Option<Tensor>, Option<Tensor>)) -> Result<Delta> {
    match pair {
        (Some(down), Some(up)) => Ok(Delta::LowRank { down, up }),
        (Some(_), None) => bail!("{module} has a lora_A but no lora_B tensor"),
        _ => bail!("{module} has a lora_B but no lora_A tensor"),
    }
}

/// `a, b, c (and N more)`.
pub fn first_keys(keys: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s += &format!(" (and {} more)", keys.len() - SHOWN);
    }
    s
}

/// BFL top-level module → diffusers module (`extra_mappings` of the converters).
const BFL_TOP: &[(&str, &str)] = &[
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    (
        "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.out_layer",
        "time_guidance_embed.timestep_embedder.linear_2",
    ),
    (
        "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_2",
    ),
    ("final_layer.linear", "proj_out"),
    // No (shift, scale) half swap: diffusers maps this adapter as stored (spec-wave2 §1.3).
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
    (
        "single_stream_modulation.lin",
        "single_stream_modulation.linear",
    ),
    (
        "double_stream_modulation_img.lin",
        "double_stream_modulation_img.linear",
    ),
    (
        "double_stream_modulation_txt.lin",
        "double_stream_modulation_txt.linear",
    ),
];

/// Double-block BFL module → diffusers module (inside `transformer_blocks.N.`).
const BFL_DOUBLE: &[(&str, &str)] = &[
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.linear_in"),
    ("img_mlp.2", "ff.linear_out"),
    ("txt_mlp.0", "ff_context.linear_in"),
    ("txt_mlp.2", "ff_context.linear_out"),
];

pub(super) const IMG_QKV: [&str; 3] = ["attn.to_q", "attn.to_k", "attn.to_v"];
pub(super) const TXT_QKV: [&str; 3] = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];

/// The diffusers module of a BFL module path (`double_blocks.0.img_mlp.0`), for the modules
/// that map one to one.
pub(super) fn bfl_module(bfl: &str) -> Option<String> {
    if let Some((_, d)) = BFL_TOP.iter().find(|(b, _)| *b == bfl) {
        return Some(d.to_string());
    }
    if let Some(rest) = bfl.strip_prefix("single_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        i.parse::<usize>().ok()?;
        let d = match inner {
            "linear1" => "attn.to_qkv_mlp_proj",
            "linear2" => "attn.to_out",
            _ => return None,
        };
        return Some(format!("single_transformer_blocks.{i}.{d}"));
    }
    if let Some(rest) = bfl.strip_prefix("double_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        i.parse::<usize>().ok()?;
        let (_, d) = BFL_DOUBLE.iter().find(|(b, _)| *b == inner)?;
        return Some(format!("transformer_blocks.{i}.{d}"));
    }
    None
}

/// A fused double-block qkv (`double_blocks.N.img_attn.qkv`) → its block index and the
/// diffusers q, k, v modules.
pub(super) fn bfl_qkv(bfl: &str) -> Option<[String; 3]> {
    let rest = bfl.strip_prefix("double_blocks.")?;
    let (i, inner) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    let parts = match inner {
        "img_attn.qkv" => IMG_QKV,
        "txt_attn.qkv" => TXT_QKV,
        _ => return None,
    };
    Some(parts.map(|p| format!("transformer_blocks.{i}.{p}")))
}

/// ai-toolkit / BFL-PEFT LoRA (`_convert_non_diffusers_flux2_lora_to_diffusers`): BFL names
/// under `diffusion_model.`; a fused qkv's lora_A goes unchanged to q, k and v and its lora_B
/// is cut in three row blocks (exact: ΔW_qkv = [B_q; B_k; B_v]·A).
fn bfl_lora(sd: Tensors) -> Result<BTreeMap<String, Delta>> {
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut leftover = vec![];
    for (k, v) in sd {
        // diffusers strips the prefix from every key, whatever it is.
        let key = k.get("diffusion_model.".len()..).unwrap_or("").to_string();
        let key = key
            .replace("lora_down", "lora_A")
            .replace("lora_up", "lora_B");
        let (module, is_a) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
            (m.to_string(), true)
        } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
            (m.to_string(), false)
        } else {
            leftover.push(k);
            continue;
        };
        // Exports that already use diffusers block names pass through.
        let module = if let Some(rest) = module.strip_prefix("sformer_blocks.") {
            format!("transformer_blocks.{rest}")
        } else {
            module
        };
        let slot = pairs.entry(module).or_default();
        if is_a {
            slot.0 = Some(v);
        } else {
            slot.1 = Some(v);
        }
    }
    let mut out = BTreeMap::new();
    for (module, pair) in pairs {
        if module.starts_with("transformer_blocks.")
            || module.starts_with("single_transformer_blocks.")
        {
            out.insert(module.clone(), low_rank(&module, pair)?);
        } else if let Some(targets) = bfl_qkv(&module) {
            let Delta::LowRank { down, up } = low_rank(&module, pair)? else {
                unreachable!()
            };
            for (i, target) in targets.into_iter().enumerate() {
                out.insert(
                    target,
                    Delta::LowRank {
                        down: down.clone(),
                        up: row_block(&up, i, &module)?,
                    },
                );
            }
        } else if let Some(target) = bfl_module(&module) {
            out.insert(target, low_rank(&module, pair)?);
        } else {
            let (a, b) = pair;
            if a.is_some() {
                leftover.push(format!("diffusion_model.{module}.lora_A.weight"));
            }
            if b.is_some() {
                leftover.push(format!("diffusion_model.{module}.lora_B.weight"));
            }
        }
    }
    if !leftover.is_empty() {
        bail!(
            "{} matches no module of the FLUX.2 transformer",
            first_keys(&leftover)
        );
    }
    Ok(out)
}

/// Row block `index` of 3 equal row blocks (`torch.chunk(w, 3, dim=0)`).
pub(super) fn row_block(t: &Tensor, index: usize, what: &str) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if rows % 3 != 0 {
        bail!("the fused qkv lora_B of {what} has {rows} rows, not a multiple of 3");
    }
    Ok(t.narrow(0, index * rows / 3, rows / 3)?)
}

/// A one-element tensor's value (`.item()`).
pub(super) fn scalar(t: &Tensor, what: &str) -> Result<f64> {
    if t.elem_count() != 1 {
        bail!(
            "{what}.alpha should hold one number but has shape {:?}",
            t.dims()
        );
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    if !v.is_finite() {
        bail!("{what}.alpha is {v}, not a finite number");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: usize, cols: usize) -> Tensor {
        Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn detection_and_names() {
        let mut sd = Tensors::new();
        sd.insert(
            "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight".into(),
            t(4, 8),
        );
        sd.insert(
            "diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight".into(),
            t(24, 4),
        );
        sd.insert(
            "diffusion_model.single_blocks.0.linear2.lora_A.weight".into(),
            t(4, 8),
        );
        sd.insert(
            "diffusion_model.single_blocks.0.linear2.lora_B.weight".into(),
            t(8, 4),
        );
        let c = convert(sd).unwrap();
        assert_eq!(c.format, LoraFormat::AiToolkit);
        let names: Vec<_> = c.modules.keys().cloned().collect();
        assert_eq!(
            names,
            [
                "single_transformer_blocks.0.attn.to_out",
                "transformer_blocks.1.attn.to_k",
                "transformer_blocks.1.attn.to_q",
                "transformer_blocks.1.attn.to_v"
            ]
        );
        let Delta::LowRank { up, .. } = &c.modules["transformer_blocks.1.attn.to_k"] else {
            panic!()
        };
        assert_eq!(up.dims(), &[8, 4]);
    }

    #[test]
    fn unknown_bfl_key_is_an_error() {
        let mut sd = Tensors::new();
        sd.insert(
            "diffusion_model.double_blocks.0.img_attn.bogus.lora_A.weight".into(),
            t(4, 8),
        );
        let e = convert(sd).unwrap_err().to_string();
        assert!(e.contains("double_blocks.0.img_attn.bogus"), "{e}");
    }
}
