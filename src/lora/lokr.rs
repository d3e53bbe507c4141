//! LoKr files (LyCORIS `lycoris_…`, ai-toolkit on BFL names `diffusion_model.…`, SimpleTuner's
//! bare diffusers paths, diffusers' own `transformer.…`): `lokr_w1` / `lokr_w1_a·lokr_w1_b`
//! and `lokr_w2` / `lokr_w2_a·lokr_w2_b`, ΔW = kron(w1, w2); diffusers'
//! `_convert_lycoris_flux2_lokr_to_diffusers`, `_convert_non_diffusers_flux2_lokr_to_diffusers`,
//! `_convert_non_diffusers_lokr_to_diffusers` and `_bake_lokr_alpha_`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::formats::{
    bfl_module, bfl_qkv, first_keys, scalar, split_prefix, Converted, Delta, Factor, LoraFormat,
    Tensors,
};

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
pub(super) fn convert(sd: Tensors, is_ai_toolkit: bool) -> Result<Converted> {
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
                Some(_) => bail!(
                    "{k} is not a LoKr tensor diffusers reads (lokr_w1[_a|_b], lokr_w2[_a|_b], \
                     alpha; CP-decomposed lokr_t2 is not supported)"
                ),
                None => bad.push(k),
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

    #[test]
    fn lycoris_names() {
        assert_eq!(
            lycoris_key("lycoris_single_transformer_blocks_3_attn_to_out.lokr_w1").as_deref(),
            Some("single_transformer_blocks.3.attn.to_out.lokr_w1")
        );
        assert_eq!(lycoris_key("lycoris_foo_3_attn_to_out.lokr_w1"), None);
    }
}
