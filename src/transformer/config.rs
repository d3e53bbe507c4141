//! `transformer/config.json` of a diffusers `Flux2Transformer2DModel` (spec §0, §5).
//!
//! Field names and defaults are those of diffusers' `Flux2Transformer2DModel.__init__`
//! (the FLUX.2 [dev] values); every klein config overrides them. Unknown keys (`_class_name`,
//! `_diffusers_version`, ...) are ignored.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;

/// Hyper-parameters of the FLUX.2 transformer, deserialized from diffusers' `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Flux2TransformerConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    /// `null` in every FLUX.2 config: the output has `in_channels` channels.
    pub out_channels: Option<usize>,
    /// Number of double-stream blocks.
    pub num_layers: usize,
    /// Number of single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Channels of `encoder_hidden_states` (3 × text-encoder hidden size).
    pub joint_attention_dim: usize,
    /// Width of the sinusoidal timestep (and guidance) projection.
    pub timestep_guidance_channels: usize,
    pub mlp_ratio: f64,
    /// Head dims given to each of the id axes (T, H, W, L); they sum to `attention_head_dim`.
    pub axes_dims_rope: Vec<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    /// Guidance-distilled checkpoints (FLUX.2 [dev]) embed the guidance scale; klein does not.
    pub guidance_embeds: bool,
}

impl Default for Flux2TransformerConfig {
    /// diffusers' constructor defaults (FLUX.2 [dev]).
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 8,
            num_single_layers: 48,
            attention_head_dim: 128,
            num_attention_heads: 48,
            joint_attention_dim: 15360,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: true,
        }
    }
}

impl Flux2TransformerConfig {
    /// The FLUX.2 [klein] 4B configuration (spec §0).
    pub fn klein_4b() -> Self {
        Self {
            num_layers: 5,
            num_single_layers: 20,
            num_attention_heads: 24,
            joint_attention_dim: 7680,
            guidance_embeds: false,
            ..Self::default()
        }
    }

    /// Reads and validates the transformer config file ([`crate::model_dir::read_config`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::model_dir::read_config(path.as_ref())
    }

    /// Checks the relations the model relies on.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{check_config_float, check_config_values};
        use crate::limits::{MAX_CONFIG_LAYERS as LAYERS, MAX_CONFIG_WIDTH as WIDTH};
        // Sums of hostile values must not wrap around.
        let rope = self
            .axes_dims_rope
            .iter()
            .try_fold(0usize, |sum, &d| sum.checked_add(d));
        let Some(rope) = rope else {
            bail!("axes_dims_rope {:?} overflows", self.axes_dims_rope);
        };
        if rope != self.attention_head_dim {
            bail!(
                "axes_dims_rope {:?} sums to {rope}, but attention_head_dim is {}",
                self.axes_dims_rope,
                self.attention_head_dim
            );
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            bail!("axes_dims_rope {:?} must all be even", self.axes_dims_rope);
        }
        if !self.timestep_guidance_channels.is_multiple_of(2) {
            bail!(
                "timestep_guidance_channels {} must be even",
                self.timestep_guidance_channels
            );
        }
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 || self.patch_size == 0 {
            bail!("num_attention_heads, attention_head_dim and patch_size must be positive");
        }
        // Position ids have four axes (T, H, W, L).
        if self.axes_dims_rope.len() != 4 {
            bail!(
                "axes_dims_rope {:?} must have 4 entries (the T, H, W, L axes)",
                self.axes_dims_rope
            );
        }
        check_config_values(&[
            ("in_channels", self.in_channels, WIDTH),
            ("out_channels", self.out_channels(), WIDTH),
            ("attention_head_dim", self.attention_head_dim, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("joint_attention_dim", self.joint_attention_dim, WIDTH),
            (
                "timestep_guidance_channels",
                self.timestep_guidance_channels,
                WIDTH,
            ),
            ("patch_size", self.patch_size, 16),
            ("num_layers", self.num_layers, LAYERS),
            ("num_single_layers", self.num_single_layers, LAYERS),
        ])?;
        let inner = self
            .num_attention_heads
            .saturating_mul(self.attention_head_dim);
        check_config_values(&[("num_attention_heads × attention_head_dim", inner, WIDTH)])?;
        check_config_float("mlp_ratio", self.mlp_ratio, 16.0)?;
        check_config_float("rope_theta", self.rope_theta, 1e12)?;
        check_config_float("eps", self.eps, 1.0)?;
        Ok(())
    }

    /// `out_channels or in_channels`, as diffusers resolves it.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Model width D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// MLP hidden width F = `int(D * mlp_ratio)` (Python `int` truncates).
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    /// Number of parameters of the diffusers state dict, from the config alone (spec §5.1:
    /// 3,875,544,576 for klein 4B). All linears are bias-free; the LayerNorms have no
    /// parameters; only the q/k RMSNorms carry a `[head_dim]` weight.
    pub fn parameter_count(&self) -> u64 {
        let d = self.inner_dim() as u64;
        let f = self.mlp_hidden_dim() as u64;
        let hd = self.attention_head_dim as u64;
        let c = self.timestep_guidance_channels as u64;
        let p2 = (self.patch_size * self.patch_size) as u64;

        let timestep_embedder = c * d + d * d;
        let guidance_embedder = if self.guidance_embeds {
            c * d + d * d
        } else {
            0
        };
        let modulations = 2 * d * 6 * d + d * 3 * d;
        let embedders = self.in_channels as u64 * d + self.joint_attention_dim as u64 * d;
        let output = d * 2 * d + d * p2 * self.out_channels() as u64;

        // q, k, v, out for each stream + 4 RMSNorm weights + two SwiGLU feed-forwards.
        let double = 8 * d * d + 4 * hd + 2 * (d * 2 * f + f * d);
        // fused qkv+mlp-in, fused attn+mlp-out, 2 RMSNorm weights.
        let single = d * (3 * d + 2 * f) + (d + f) * d + 2 * hd;

        timestep_embedder
            + guidance_embedder
            + modulations
            + embedders
            + output
            + self.num_layers as u64 * double
            + self.num_single_layers as u64 * single
    }
}

impl crate::model_dir::ComponentConfig for Flux2TransformerConfig {
    const WHAT: &'static str = "transformer config";

    fn validate(&self) -> Result<()> {
        Flux2TransformerConfig::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klein_4b_parameter_count() {
        assert_eq!(
            Flux2TransformerConfig::klein_4b().parameter_count(),
            3_875_544_576
        );
    }

    #[test]
    fn klein_4b_config_json() {
        // Verbatim values of the klein-4B transformer/config.json (spec §0).
        let json = r#"{
          "_class_name": "Flux2Transformer2DModel",
          "_diffusers_version": "0.37.0.dev0",
          "_name_or_path": "/raid/yiyi/klein-4b-diffusers/transformer",
          "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06,
          "guidance_embeds": false, "in_channels": 128, "joint_attention_dim": 7680,
          "mlp_ratio": 3.0, "num_attention_heads": 24, "num_layers": 5,
          "num_single_layers": 20, "out_channels": null, "patch_size": 1, "rope_theta": 2000,
          "timestep_guidance_channels": 256
        }"#;
        let cfg: Flux2TransformerConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg, Flux2TransformerConfig::klein_4b());
        assert_eq!(cfg.out_channels(), 128);
        assert_eq!(cfg.inner_dim(), 3072);
        assert_eq!(cfg.mlp_hidden_dim(), 9216);
    }

    #[test]
    fn defaults_apply_to_missing_keys() {
        let cfg: Flux2TransformerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, Flux2TransformerConfig::default());
        assert!(cfg.guidance_embeds);
    }
}
