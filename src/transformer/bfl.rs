//! Loading the original Black Forest Labs single-file checkpoint
//! (`flux-2-klein-4b.safetensors`) by mapping diffusers names to BFL names on the fly
//! (spec §5.1; the inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`).
//!
//! Three kinds of entries: plain renames; the fused `qkv` of the double blocks, split in 3
//! along rows into q/k/v; and the final adaLN modulation, whose two halves are swapped
//! (BFL stores (shift, scale), diffusers (scale, shift)). Files whose keys carry the
//! `model.diffusion_model.` prefix (ComfyUI-style) are accepted too.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::Flux2TransformerConfig;
use super::model::Flux2Transformer;

/// Where a diffusers tensor comes from in a BFL checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BflSource {
    /// The same tensor under another name.
    Rename(String),
    /// Row block `index` of 3 equal row blocks of a fused q/k/v weight.
    QkvChunk { name: String, index: usize },
    /// The tensor with its two row halves swapped.
    SwapHalves(String),
}

impl BflSource {
    pub fn name(&self) -> &str {
        match self {
            Self::Rename(n) | Self::QkvChunk { name: n, .. } | Self::SwapHalves(n) => n,
        }
    }
}

/// Top-level renames (diffusers prefix → BFL prefix).
const TOP_LEVEL: &[(&str, &str)] = &[
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    (
        "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.in_layer",
    ),
    (
        "time_guidance_embed.timestep_embedder.linear_2",
        "time_in.out_layer",
    ),
    (
        "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.in_layer",
    ),
    (
        "time_guidance_embed.guidance_embedder.linear_2",
        "guidance_in.out_layer",
    ),
    (
        "double_stream_modulation_img.linear",
        "double_stream_modulation_img.lin",
    ),
    (
        "double_stream_modulation_txt.linear",
        "double_stream_modulation_txt.lin",
    ),
    (
        "single_stream_modulation.linear",
        "single_stream_modulation.lin",
    ),
    ("proj_out", "final_layer.linear"),
];

/// Double-block renames (module inside `transformer_blocks.{i}.` → inside `double_blocks.{i}.`).
const DOUBLE_BLOCK: &[(&str, &str)] = &[
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.to_out.0", "img_attn.proj"),
    ("ff.linear_in", "img_mlp.0"),
    ("ff.linear_out", "img_mlp.2"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff_context.linear_in", "txt_mlp.0"),
    ("ff_context.linear_out", "txt_mlp.2"),
];

/// Fused q/k/v: (diffusers module, BFL module, chunk index).
const DOUBLE_QKV: &[(&str, &str, usize)] = &[
    ("attn.to_q", "img_attn.qkv", 0),
    ("attn.to_k", "img_attn.qkv", 1),
    ("attn.to_v", "img_attn.qkv", 2),
    ("attn.add_q_proj", "txt_attn.qkv", 0),
    ("attn.add_k_proj", "txt_attn.qkv", 1),
    ("attn.add_v_proj", "txt_attn.qkv", 2),
];

/// Single-block renames (inside `single_transformer_blocks.{i}.` → inside `single_blocks.{i}.`).
const SINGLE_BLOCK: &[(&str, &str)] = &[
    ("attn.to_qkv_mlp_proj", "linear1"),
    ("attn.to_out", "linear2"),
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
];

/// BFL parameter suffix: RMSNorm weights are called `scale` there.
fn bfl_param(module_is_norm: bool, param: &str) -> String {
    if module_is_norm && param == "weight" {
        "scale".to_string()
    } else {
        param.to_string()
    }
}

/// Maps a diffusers tensor name (e.g. `transformer_blocks.0.attn.to_k.weight`) to its BFL
/// source, or `None` for names that have no BFL counterpart.
pub fn bfl_source(name: &str) -> Option<BflSource> {
    let (module, param) = name.rsplit_once('.')?;
    if module == "norm_out.linear" {
        return Some(BflSource::SwapHalves(format!(
            "final_layer.adaLN_modulation.1.{param}"
        )));
    }
    for (diff, bfl) in TOP_LEVEL {
        if module == *diff {
            return Some(BflSource::Rename(format!("{bfl}.{param}")));
        }
    }
    if let Some(rest) = module.strip_prefix("transformer_blocks.") {
        let (idx, inner) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        for (diff, bfl, index) in DOUBLE_QKV {
            if inner == *diff {
                return Some(BflSource::QkvChunk {
                    name: format!("double_blocks.{idx}.{bfl}.{param}"),
                    index: *index,
                });
            }
        }
        for (diff, bfl) in DOUBLE_BLOCK {
            if inner == *diff {
                let p = bfl_param(bfl.contains("_norm"), param);
                return Some(BflSource::Rename(format!("double_blocks.{idx}.{bfl}.{p}")));
            }
        }
        return None;
    }
    if let Some(rest) = module.strip_prefix("single_transformer_blocks.") {
        let (idx, inner) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        for (diff, bfl) in SINGLE_BLOCK {
            if inner == *diff {
                let p = bfl_param(bfl.contains("_norm"), param);
                return Some(BflSource::Rename(format!("single_blocks.{idx}.{bfl}.{p}")));
            }
        }
    }
    None
}

/// The paths as printable strings, for error context.
fn path_names(paths: &[impl AsRef<Path>]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.as_ref().display().to_string())
        .collect()
}

/// A `VarBuilder` backend that serves diffusers names from BFL-named safetensors files.
pub struct BflBackend {
    tensors: MmapedSafetensors,
    /// `""` or `"model.diffusion_model."`.
    prefix: String,
}

impl BflBackend {
    /// Memory-maps the files and detects the key prefix.
    pub fn open(paths: &[impl AsRef<Path>]) -> Result<Self> {
        let names = path_names(paths);
        // SAFETY: the files are memory-mapped read-only and not modified while loading.
        let tensors = unsafe { MmapedSafetensors::multi(paths) }
            .with_context(|| format!("opening BFL checkpoint {names:?}"))?;
        let prefixed = "model.diffusion_model.";
        let prefix = if tensors
            .tensors()
            .iter()
            .any(|(k, _)| k.starts_with(prefixed))
        {
            prefixed.to_string()
        } else {
            String::new()
        };
        Ok(Self { tensors, prefix })
    }

    /// The diffusers-named tensor `name`, on the CPU in the stored dtype.
    fn load_mapped(&self, name: &str) -> candle_core::Result<Tensor> {
        let src = bfl_source(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("no BFL checkpoint name is known for `{name}`"))
        })?;
        let full = format!("{}{}", self.prefix, src.name());
        let t = self.tensors.load(&full, &Device::Cpu).map_err(|e| {
            candle_core::Error::Msg(format!(
                "BFL checkpoint lacks `{full}` (needed for `{name}`): {e}"
            ))
        })?;
        match src {
            BflSource::Rename(_) => Ok(t),
            BflSource::QkvChunk { index, .. } => {
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    candle_core::bail!("fused qkv `{full}` has {rows} rows, not a multiple of 3");
                }
                t.narrow(0, index * rows / 3, rows / 3)?.contiguous()
            }
            BflSource::SwapHalves(_) => {
                let rows = t.dim(0)?;
                if rows % 2 != 0 {
                    candle_core::bail!("adaLN modulation `{full}` has {rows} rows, not even");
                }
                let h = rows / 2;
                Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
            }
        }
    }
}

impl SimpleBackend for BflBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load_mapped(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (from the BFL checkpoint)"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_mapped(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        bfl_source(name).is_some_and(|s| {
            self.tensors
                .get(&format!("{}{}", self.prefix, s.name()))
                .is_ok()
        })
    }
}

impl Flux2Transformer {
    /// Loads an original BFL single-file checkpoint (e.g. `flux-2-klein-4b.safetensors`) in
    /// `dtype` on `device`.
    pub fn load_bfl(
        paths: &[impl AsRef<Path>],
        cfg: &Flux2TransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let names = path_names(paths);
        let backend = BflBackend::open(paths)?;
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Self::load(vb, cfg).with_context(|| format!("loading BFL checkpoint {names:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_map() {
        let r = |s: &str| Some(BflSource::Rename(s.to_string()));
        assert_eq!(bfl_source("x_embedder.weight"), r("img_in.weight"));
        assert_eq!(bfl_source("context_embedder.weight"), r("txt_in.weight"));
        assert_eq!(
            bfl_source("time_guidance_embed.timestep_embedder.linear_2.weight"),
            r("time_in.out_layer.weight")
        );
        assert_eq!(
            bfl_source("single_stream_modulation.linear.weight"),
            r("single_stream_modulation.lin.weight")
        );
        assert_eq!(
            bfl_source("proj_out.weight"),
            r("final_layer.linear.weight")
        );
        assert_eq!(
            bfl_source("norm_out.linear.weight"),
            Some(BflSource::SwapHalves(
                "final_layer.adaLN_modulation.1.weight".into()
            ))
        );
        assert_eq!(
            bfl_source("transformer_blocks.3.attn.add_k_proj.weight"),
            Some(BflSource::QkvChunk {
                name: "double_blocks.3.txt_attn.qkv.weight".into(),
                index: 1
            })
        );
        assert_eq!(
            bfl_source("transformer_blocks.0.attn.norm_added_q.weight"),
            r("double_blocks.0.txt_attn.norm.query_norm.scale")
        );
        assert_eq!(
            bfl_source("transformer_blocks.1.attn.to_out.0.weight"),
            r("double_blocks.1.img_attn.proj.weight")
        );
        assert_eq!(
            bfl_source("transformer_blocks.1.ff_context.linear_out.weight"),
            r("double_blocks.1.txt_mlp.2.weight")
        );
        assert_eq!(
            bfl_source("single_transformer_blocks.12.attn.norm_k.weight"),
            r("single_blocks.12.norm.key_norm.scale")
        );
        assert_eq!(
            bfl_source("single_transformer_blocks.12.attn.to_out.weight"),
            r("single_blocks.12.linear2.weight")
        );
        assert_eq!(bfl_source("transformer_blocks.x.attn.to_q.weight"), None);
        assert_eq!(bfl_source("foo.weight"), None);
    }
}
