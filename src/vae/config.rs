//! `vae/config.json` of an `AutoencoderKLFlux2` (diffusers 0.42.1), spec §0 and §6.1.
//!
//! Every field has the default of diffusers' `AutoencoderKLFlux2.__init__`, so a config that
//! omits a key means the same thing here as in diffusers; unknown keys (`_class_name`,
//! `force_upcast`, …) are ignored.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;

/// The VAE hyper-parameters. Field names are the diffusers config keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLFlux2Config {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Only `DownEncoderBlock2D` exists in this VAE; checked by [`Self::validate`].
    pub down_block_types: Vec<String>,
    /// Only `UpDecoderBlock2D` exists in this VAE; checked by [`Self::validate`].
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    /// Decoder channels when they differ from the encoder's (`None` → `block_out_channels`).
    pub decoder_block_out_channels: Option<Vec<usize>>,
    /// Resnets per encoder block; decoder blocks have one more (spec §6.1).
    pub layers_per_block: usize,
    /// Only `silu` is supported (the only value FLUX.2 uses).
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Int or `[h, w]`; used only for the default tile size of tiled decoding, as diffusers does.
    pub sample_size: serde_json::Value,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// eps of the latent BatchNorm (1e-4); the (de)normalisation itself is in `crate::latents`.
    pub batch_norm_eps: f64,
    pub batch_norm_momentum: f64,
    /// Latent patchify size (2×2); BN statistics have `latent_channels · ph · pw` entries.
    pub patch_size: Vec<usize>,
}

impl Default for AutoencoderKLFlux2Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            decoder_block_out_channels: None,
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 32,
            norm_num_groups: 32,
            sample_size: serde_json::Value::from(1024),
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            batch_norm_eps: 1e-4,
            batch_norm_momentum: 0.1,
            patch_size: vec![2, 2],
        }
    }
}

impl AutoencoderKLFlux2Config {
    /// Reads and validates the VAE config file ([`crate::model_dir::read_config`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::model_dir::read_config(path.as_ref())
    }

    /// Checks the invariants the model code relies on, so that a bad config fails at load time
    /// with a message instead of a shape error deep in a forward pass.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("block_out_channels is empty");
        }
        if self.down_block_types.len() != n {
            bail!(
                "down_block_types has {} entries but block_out_channels has {n}",
                self.down_block_types.len()
            );
        }
        if self.up_block_types.len() != self.decoder_channels().len() {
            bail!(
                "up_block_types has {} entries but the decoder has {} channel levels",
                self.up_block_types.len(),
                self.decoder_channels().len()
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("down block type {t:?} is not supported (only DownEncoderBlock2D)");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("up block type {t:?} is not supported (only UpDecoderBlock2D)");
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            bail!("act_fn {:?} is not supported (only silu)", self.act_fn);
        }
        if self.norm_num_groups == 0 {
            bail!("norm_num_groups must be > 0");
        }
        for &c in self
            .block_out_channels
            .iter()
            .chain(self.decoder_channels())
        {
            if c == 0 || c % self.norm_num_groups != 0 {
                bail!(
                    "block channel count {c} is not a positive multiple of norm_num_groups {}",
                    self.norm_num_groups
                );
            }
        }
        if self.patch_size.len() != 2 || self.patch_size.contains(&0) {
            bail!(
                "patch_size must be two positive integers, got {:?}",
                self.patch_size
            );
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            bail!("in_channels, out_channels and latent_channels must be > 0");
        }
        use crate::limits::{check_config_float, check_config_values, MAX_CONFIG_WIDTH as WIDTH};
        // The scale factor is 2^(levels - 1).
        check_config_values(&[
            ("the number of VAE levels", n, 8),
            ("in_channels", self.in_channels, 4),
            ("out_channels", self.out_channels, 4),
            ("latent_channels", self.latent_channels, WIDTH),
            ("norm_num_groups", self.norm_num_groups, WIDTH),
            ("layers_per_block", self.layers_per_block, 64),
            ("patch_size[0]", self.patch_size[0], 16),
            ("patch_size[1]", self.patch_size[1], 16),
        ])?;
        for &c in self
            .block_out_channels
            .iter()
            .chain(self.decoder_channels())
        {
            check_config_values(&[("a block channel count", c, WIDTH)])?;
        }
        check_config_values(&[("the BatchNorm channels", self.bn_channels(), WIDTH)])?;
        check_config_float("batch_norm_eps", self.batch_norm_eps, 1.0)?;
        Ok(())
    }

    /// The decoder's block channels (`decoder_block_out_channels or block_out_channels`).
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    /// Pixels per latent pixel: `2^(levels-1)` (8 for FLUX.2), as diffusers' `vae_scale_factor`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Number of BatchNorm channels: `latent_channels · patch_h · patch_w` (128 for FLUX.2).
    pub fn bn_channels(&self) -> usize {
        self.latent_channels * self.patch_size.iter().product::<usize>()
    }

    /// diffusers' `tile_latent_min_size = sample_size / 2^(levels-1)` (128 for FLUX.2).
    pub fn default_tile_latent_size(&self) -> usize {
        let sample = match &self.sample_size {
            serde_json::Value::Array(v) => v.first().and_then(|x| x.as_u64()),
            v => v.as_u64(),
        }
        .unwrap_or(1024) as usize;
        (sample / self.scale_factor()).max(1)
    }
}

impl crate::model_dir::ComponentConfig for AutoencoderKLFlux2Config {
    const WHAT: &'static str = "VAE config";

    fn validate(&self) -> Result<()> {
        AutoencoderKLFlux2Config::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klein_config_parses() {
        let json = r#"{"_class_name":"AutoencoderKLFlux2","act_fn":"silu","batch_norm_eps":0.0001,
          "batch_norm_momentum":0.1,"block_out_channels":[128,256,512,512],"force_upcast":true,
          "in_channels":3,"latent_channels":32,"layers_per_block":2,"mid_block_add_attention":true,
          "norm_num_groups":32,"out_channels":3,"patch_size":[2,2],"sample_size":1024,
          "use_post_quant_conv":true,"use_quant_conv":true}"#;
        let cfg: AutoencoderKLFlux2Config = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg, AutoencoderKLFlux2Config::default());
        assert_eq!(cfg.bn_channels(), 128);
        assert_eq!(cfg.scale_factor(), 8);
        assert_eq!(cfg.default_tile_latent_size(), 128);
    }

    #[test]
    fn bad_groups_rejected() {
        let cfg = AutoencoderKLFlux2Config {
            norm_num_groups: 3,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }
}
