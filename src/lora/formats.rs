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

type Tensors = BTreeMap<String, Tensor>;

/// Converts a file's tensors the way diffusers reads them.
pub fn convert(mut sd: Tensors) -> Result<Converted> {
    // DoRA magnitudes are dropped with a warning by diffusers (the caller warns).
    sd.retain(|k, _| !k.contains("dora_scale"));
    if sd.keys().any(|k| k.contains(".lora_down.weight")) {
        return kohya(sd);
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
        return lokr(sd, is_ai_toolkit);
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
fn split_prefix(sd: Tensors) -> (Tensors, Vec<String>) {
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

const IMG_QKV: [&str; 3] = ["attn.to_q", "attn.to_k", "attn.to_v"];
const TXT_QKV: [&str; 3] = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];

/// The diffusers module of a BFL module path (`double_blocks.0.img_mlp.0`), for the modules
/// that map one to one.
fn bfl_module(bfl: &str) -> Option<String> {
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
fn bfl_qkv(bfl: &str) -> Option<[String; 3]> {
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
fn row_block(t: &Tensor, index: usize, what: &str) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if rows % 3 != 0 {
        bail!("the fused qkv lora_B of {what} has {rows} rows, not a multiple of 3");
    }
    Ok(t.narrow(0, index * rows / 3, rows / 3)?)
}

/// kohya module (after `lora_unet_`) → diffusers modules (one, or q/k/v for a fused qkv).
fn kohya_targets(name: &str) -> Option<Vec<String>> {
    let top = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        (
            "time_in_in_layer",
            "time_guidance_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in_out_layer",
            "time_guidance_embed.timestep_embedder.linear_2",
        ),
        ("final_layer_linear", "proj_out"),
    ];
    if let Some((_, d)) = top.iter().find(|(k, _)| *k == name) {
        return Some(vec![d.to_string()]);
    }
    let (kind, rest) = if let Some(r) = name.strip_prefix("double_blocks_") {
        ("double", r)
    } else if let Some(r) = name.strip_prefix("single_blocks_") {
        ("single", r)
    } else {
        return None;
    };
    let (i, inner) = rest.split_once('_')?;
    // kohya block numbers are decimal, as diffusers' `int(key.split("_")[4])` reads them.
    let i: usize = i.parse().ok()?;
    let one = |d: &str, block: &str| Some(vec![format!("{block}.{i}.{d}")]);
    match (kind, inner) {
        ("double", "img_attn_qkv") => Some(
            IMG_QKV
                .iter()
                .map(|p| format!("transformer_blocks.{i}.{p}"))
                .collect(),
        ),
        ("double", "txt_attn_qkv") => Some(
            TXT_QKV
                .iter()
                .map(|p| format!("transformer_blocks.{i}.{p}"))
                .collect(),
        ),
        ("double", "img_attn_proj") => one("attn.to_out.0", "transformer_blocks"),
        ("double", "txt_attn_proj") => one("attn.to_add_out", "transformer_blocks"),
        ("double", "img_mlp_0") => one("ff.linear_in", "transformer_blocks"),
        ("double", "img_mlp_2") => one("ff.linear_out", "transformer_blocks"),
        ("double", "txt_mlp_0") => one("ff_context.linear_in", "transformer_blocks"),
        ("double", "txt_mlp_2") => one("ff_context.linear_out", "transformer_blocks"),
        ("single", "linear1") => one("attn.to_qkv_mlp_proj", "single_transformer_blocks"),
        ("single", "linear2") => one("attn.to_out", "single_transformer_blocks"),
        _ => None,
    }
}

/// kohya / musubi (`_convert_kohya_flux2_lora_to_diffusers`): alpha/rank folded into the
/// factors as diffusers does (`scale_down · scale_up = alpha / rank`, kept near each other);
/// a fused qkv gives q, k and v the same lora_down and a third of lora_up each. (diffusers
/// cuts a block-diagonal lora_up into rank/3 blocks instead; the products are the same, the
/// skipped terms being exact zeros.) Keys with no FLUX.2 counterpart are skipped with a
/// warning, as diffusers does.
fn kohya(mut sd: Tensors) -> Result<Converted> {
    let mut modules = BTreeMap::new();
    let stems: Vec<String> = sd
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .map(str::to_string)
        .collect();
    for stem in stems {
        let targets = stem.strip_prefix("lora_unet_").and_then(kohya_targets);
        let Some(targets) = targets else { continue };
        let down = sd
            .remove(&format!("{stem}.lora_down.weight"))
            .expect("listed");
        let Some(up) = sd.remove(&format!("{stem}.lora_up.weight")) else {
            bail!("{stem} has a lora_down but no lora_up tensor");
        };
        let rank = down.dim(0)?;
        let alpha = match sd.remove(&format!("{stem}.alpha")) {
            Some(a) => scalar(&a, &stem)?,
            None => rank as f64,
        };
        let (scale_down, scale_up) = balanced_scales(alpha / rank as f64);
        let down = (down.to_dtype(DType::F32)? * scale_down)?;
        let up = (up.to_dtype(DType::F32)? * scale_up)?;
        if targets.len() == 3 {
            for (i, t) in targets.into_iter().enumerate() {
                let block = row_block(&up, i, &stem)?;
                modules.insert(
                    t,
                    Delta::LowRank {
                        down: down.clone(),
                        up: block,
                    },
                );
            }
        } else {
            modules.insert(targets[0].clone(), Delta::LowRank { down, up });
        }
    }
    Ok(Converted {
        format: LoraFormat::Kohya,
        modules,
        skipped: sd.into_keys().collect(),
    })
}

/// diffusers' split of `scale` into `scale_down · scale_up`: halve `scale_up` and double
/// `scale_down` while `scale_down · 2 < scale_up`.
fn balanced_scales(scale: f64) -> (f64, f64) {
    let (mut down, mut up) = (scale, 1.0);
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    (down, up)
}

/// A one-element tensor's value (`.item()`).
fn scalar(t: &Tensor, what: &str) -> Result<f64> {
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

const LOKR_SUFFIXES: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// LoKr (`_convert_lycoris_flux2_lokr_to_diffusers`, `_convert_non_diffusers_flux2_lokr_to_diffusers`,
/// `_convert_non_diffusers_lokr_to_diffusers`): `.alpha` baked into the left factor as
/// `alpha / rank` when a factor is rank-decomposed; BFL fused qkv deltas target the fused
/// projections diffusers builds (`to_qkv`, `to_added_qkv`), which the merge cuts into q, k, v.
fn lokr(sd: Tensors, is_ai_toolkit: bool) -> Result<Converted> {
    let mut skipped = vec![];
    // (diffusers module → suffix → tensor), alpha keys by module.
    let mut sd: Tensors = if sd.keys().any(|k| k.starts_with("lycoris_")) {
        let mut out = Tensors::new();
        let mut bad = vec![];
        for (k, v) in sd {
            match lycoris_key(&k) {
                Some(d) => {
                    out.insert(d, v);
                }
                None => bad.push(k),
            }
        }
        if !bad.is_empty() {
            bail!("{} is not a LyCORIS FLUX.2 LoKr key", first_keys(&bad));
        }
        out
    } else if is_ai_toolkit {
        let mut out = Tensors::new();
        let mut bad = vec![];
        for (k, v) in sd {
            let key = k.strip_prefix("diffusion_model.").unwrap_or(&k);
            let Some((module, suffix)) = key.rsplit_once('.') else {
                bad.push(k);
                continue;
            };
            let target = match bfl_qkv(module) {
                Some(_) => Some(
                    module
                        .replace("double_blocks.", "transformer_blocks.")
                        .replace(".img_attn.qkv", ".attn.to_qkv")
                        .replace(".txt_attn.qkv", ".attn.to_added_qkv"),
                ),
                None => bfl_module(module),
            };
            match target {
                Some(t) if LOKR_SUFFIXES.contains(&suffix) || suffix == "alpha" => {
                    out.insert(format!("{t}.{suffix}"), v);
                }
                _ => bad.push(k),
            }
        }
        if !bad.is_empty() {
            bail!(
                "{} matches no module of the FLUX.2 transformer",
                first_keys(&bad)
            );
        }
        out
    } else if !sd.keys().any(|k| k.starts_with("transformer.")) {
        // Bare diffusers module paths (SimpleTuner exports).
        sd.into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("diffusion_model.").unwrap_or(&k).to_string(),
                    v,
                )
            })
            .collect()
    } else {
        let (ours, other) = split_prefix(sd);
        skipped = other;
        ours
    };
    bake_lokr_alpha(&mut sd, &mut skipped)?;
    let mut modules = BTreeMap::new();
    let mut parts: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    let mut bad = vec![];
    for (k, v) in sd {
        match k.rsplit_once('.') {
            Some((m, s)) if LOKR_SUFFIXES.contains(&s) => {
                parts
                    .entry(m.to_string())
                    .or_default()
                    .insert(s.to_string(), v);
            }
            _ => bad.push(k),
        }
    }
    if !bad.is_empty() {
        bail!("{} is not a LoKr key diffusers reads", first_keys(&bad));
    }
    for (module, mut p) in parts {
        let mut factor = |w: &str| -> Result<Factor> {
            match (
                p.remove(w),
                p.remove(&format!("{w}_a")),
                p.remove(&format!("{w}_b")),
            ) {
                (Some(f), None, None) => Ok(Factor::Full(f)),
                (None, Some(a), Some(b)) => Ok(Factor::Product(a, b)),
                _ => bail!("{module} needs either {w} or both {w}_a and {w}_b"),
            }
        };
        let w1 = factor("lokr_w1")?;
        let w2 = factor("lokr_w2")?;
        modules.insert(module, Delta::Kronecker { w1, w2 });
    }
    Ok(Converted {
        format: LoraFormat::Lokr,
        modules,
        skipped,
    })
}

/// `_bake_lokr_alpha_`: each `{module}.alpha` scales `lokr_w1` (or `lokr_w1_a`) by
/// `alpha / rank`, the rank being that of `lokr_w2_b` (else `lokr_w1_b`); with both factors
/// whole the alpha is dropped.
fn bake_lokr_alpha(sd: &mut Tensors, skipped: &mut Vec<String>) -> Result<()> {
    let alphas: Vec<String> = sd
        .keys()
        .filter(|k| k.ends_with(".alpha"))
        .cloned()
        .collect();
    for key in alphas {
        let alpha_t = sd.remove(&key).expect("listed");
        let module = key.strip_suffix(".alpha").expect("filtered");
        let alpha = scalar(&alpha_t, module)?;
        let rank = match (
            sd.get(&format!("{module}.lokr_w2_b")),
            sd.get(&format!("{module}.lokr_w1_b")),
        ) {
            (Some(w2b), _) => w2b.dim(0)?,
            (None, Some(w1b)) => w1b.dim(0)?,
            (None, None) => continue,
        };
        let w1_key = [format!("{module}.lokr_w1"), format!("{module}.lokr_w1_a")]
            .into_iter()
            .find(|k| sd.contains_key(k));
        let Some(w1_key) = w1_key else {
            skipped.push(key);
            continue;
        };
        let w1 = sd.remove(&w1_key).expect("found");
        let dtype = w1.dtype();
        // torch multiplies in the factor's dtype by the Python float alpha / rank.
        let scaled = (w1.to_dtype(DType::F32)? * (alpha / rank as f64))?.to_dtype(dtype)?;
        sd.insert(w1_key, scaled);
    }
    Ok(())
}

/// `lycoris_transformer_blocks_0_attn_to_q.lokr_w1` → `transformer_blocks.0.attn.to_q.lokr_w1`.
fn lycoris_key(key: &str) -> Option<String> {
    const SUB: &[(&str, &str)] = &[
        ("attn_to_q", "attn.to_q"),
        ("attn_to_k", "attn.to_k"),
        ("attn_to_v", "attn.to_v"),
        ("attn_to_out_0", "attn.to_out.0"),
        ("attn_to_add_out", "attn.to_add_out"),
        ("attn_add_q_proj", "attn.add_q_proj"),
        ("attn_add_k_proj", "attn.add_k_proj"),
        ("attn_add_v_proj", "attn.add_v_proj"),
        ("attn_to_qkv_mlp_proj", "attn.to_qkv_mlp_proj"),
        ("attn_to_out", "attn.to_out"),
        ("ff_linear_in", "ff.linear_in"),
        ("ff_linear_out", "ff.linear_out"),
        ("ff_context_linear_in", "ff_context.linear_in"),
        ("ff_context_linear_out", "ff_context.linear_out"),
    ];
    let rest = key.strip_prefix("lycoris_")?;
    let (path, suffix) = rest.rsplit_once('.')?;
    let (container, rest) = if let Some(r) = path.strip_prefix("single_transformer_blocks_") {
        ("single_transformer_blocks", r)
    } else if let Some(r) = path.strip_prefix("transformer_blocks_") {
        ("transformer_blocks", r)
    } else {
        return None;
    };
    let (i, sub) = rest.split_once('_')?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_, d) = SUB.iter().find(|(s, _)| *s == sub)?;
    Some(format!("{container}.{i}.{d}.{suffix}"))
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
    fn kohya_scales_and_skips() {
        assert_eq!(balanced_scales(0.25), (0.5, 0.5));
        assert_eq!(balanced_scales(2.0), (2.0, 1.0));
        let mut sd = Tensors::new();
        sd.insert("lora_unet_img_in.lora_down.weight".into(), t(4, 8));
        sd.insert("lora_unet_img_in.lora_up.weight".into(), t(8, 4));
        sd.insert("lora_te1_foo.lora_down.weight".into(), t(4, 8));
        let c = convert(sd).unwrap();
        assert_eq!(c.format, LoraFormat::Kohya);
        assert!(c.modules.contains_key("x_embedder"));
        assert_eq!(c.skipped, ["lora_te1_foo.lora_down.weight"]);
    }

    #[test]
    fn lycoris_names() {
        assert_eq!(
            lycoris_key("lycoris_single_transformer_blocks_3_attn_to_out.lokr_w1").as_deref(),
            Some("single_transformer_blocks.3.attn.to_out.lokr_w1")
        );
        assert_eq!(lycoris_key("lycoris_foo_3_attn_to_out.lokr_w1"), None);
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
