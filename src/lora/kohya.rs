//! kohya / musubi-tuner LoRA files (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`): diffusers' `_convert_kohya_flux2_lora_to_diffusers`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::DType;

use super::formats::{row_block, scalar, Converted, Delta, LoraFormat, Tensors, IMG_QKV, TXT_QKV};

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
pub(super) fn convert(mut sd: Tensors) -> Result<Converted> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn t(rows: usize, cols: usize) -> Tensor {
        Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn kohya_scales_and_skips() {
        assert_eq!(balanced_scales(0.25), (0.5, 0.5));
        assert_eq!(balanced_scales(2.0), (2.0, 1.0));
        let mut sd = Tensors::new();
        sd.insert("lora_unet_img_in.lora_down.weight".into(), t(4, 8));
        sd.insert("lora_unet_img_in.lora_up.weight".into(), t(8, 4));
        sd.insert("lora_te1_foo.lora_down.weight".into(), t(4, 8));
        let c = super::super::formats::convert(sd).unwrap();
        assert_eq!(c.format, LoraFormat::Kohya);
        assert!(c.modules.contains_key("x_embedder"));
        assert_eq!(c.skipped, ["lora_te1_foo.lora_down.weight"]);
    }
}
