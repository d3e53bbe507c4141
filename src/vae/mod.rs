//! `AutoencoderKLFlux2` (diffusers 0.42.1), spec §6: the FLUX.2 VAE with 32 latent channels,
//! quant convs and the latent BatchNorm statistics.
//!
//! Dtypes (spec §1): the model runs in the dtype it was loaded with (bf16 in the pipeline) with
//! no f32 upcast (`force_upcast` is ignored by the pipeline); only the ops that torch fuses
//! (group norm, SiLU, SDPA) compute internally in f32 and round once, see `blocks`.
//!
//! The BN (de)normalisation of latents is *not* here: it lives in `crate::latents`; this
//! module only exposes `bn.running_mean` / `bn.running_var` in the load dtype.

pub mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod postprocess;
pub mod tiling;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use blocks::{conv2d, Conv2d};

pub use config::AutoencoderKLFlux2Config;
pub use postprocess::to_rgb8;
pub use tiling::TileOptions;

use decoder::Decoder;
use encoder::Encoder;

/// File name of the VAE weights inside `vae/` (diffusers layout).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Which halves of the VAE to load: the pipeline needs the encoder only when it is given
/// reference images (spec §4), and the decoder only for non-latent output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeParts {
    pub encoder: bool,
    pub decoder: bool,
}

impl VaeParts {
    pub const ALL: Self = Self {
        encoder: true,
        decoder: true,
    };
    pub const DECODER: Self = Self {
        encoder: false,
        decoder: true,
    };
    pub const ENCODER: Self = Self {
        encoder: true,
        decoder: false,
    };
}

/// The FLUX.2 VAE. Build it with [`AutoencoderKLFlux2::load`] or [`AutoencoderKLFlux2::load_dir`].
#[derive(Debug, Clone)]
pub struct AutoencoderKLFlux2 {
    cfg: AutoencoderKLFlux2Config,
    encoder: Option<Encoder>,
    decoder: Option<Decoder>,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    bn_running_mean: Tensor,
    bn_running_var: Tensor,
    dtype: DType,
    device: Device,
}

impl AutoencoderKLFlux2 {
    /// Loads the parts named by `parts` from `vb` (root of the VAE state dict; paths mirror the
    /// diffusers keys, spec §6.2). `bn.running_mean`/`bn.running_var` are always loaded.
    pub fn load(vb: VarBuilder, cfg: &AutoencoderKLFlux2Config, parts: VaeParts) -> Result<Self> {
        cfg.validate()
            .context("invalid AutoencoderKLFlux2 config")?;
        let lat = cfg.latent_channels;
        let (encoder, quant_conv) = if parts.encoder {
            let enc = Encoder::load(cfg, vb.pp("encoder")).context("loading VAE encoder")?;
            let qc = if cfg.use_quant_conv {
                Some(
                    conv2d(2 * lat, 2 * lat, 1, Default::default(), vb.pp("quant_conv"))
                        .context("loading VAE quant_conv")?,
                )
            } else {
                None
            };
            (Some(enc), qc)
        } else {
            (None, None)
        };
        let (decoder, post_quant_conv) = if parts.decoder {
            let dec = Decoder::load(cfg, vb.pp("decoder")).context("loading VAE decoder")?;
            let pqc = if cfg.use_post_quant_conv {
                Some(
                    conv2d(lat, lat, 1, Default::default(), vb.pp("post_quant_conv"))
                        .context("loading VAE post_quant_conv")?,
                )
            } else {
                None
            };
            (Some(dec), pqc)
        } else {
            (None, None)
        };
        let n_bn = cfg.bn_channels();
        let bn = vb.pp("bn");
        let bn_running_mean = bn
            .get(n_bn, "running_mean")
            .context("loading VAE bn.running_mean")?;
        let bn_running_var = bn
            .get(n_bn, "running_var")
            .context("loading VAE bn.running_var")?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            bn_running_mean,
            bn_running_var,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (a diffusers `vae/`
    /// folder), converting the weights to `dtype` (bf16 → f32 is exact).
    pub fn load_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        parts: VaeParts,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg: AutoencoderKLFlux2Config =
            crate::model_dir::read_config(&dir.join("config.json"))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            bail!(
                "VAE weights {} not found (expected a diffusers vae/ folder)",
                weights.display()
            );
        }
        let vb = crate::model_dir::var_builder(&[&weights], dtype, device)?;
        Self::load(vb, &cfg, parts)
            .with_context(|| format!("loading VAE from {}", weights.display()))
    }

    pub fn config(&self) -> &AutoencoderKLFlux2Config {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }
    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }
    /// Pixels per latent pixel (8).
    pub fn scale_factor(&self) -> usize {
        self.cfg.scale_factor()
    }

    /// `bn.running_mean` `[latent·4]` in the load dtype (spec §1: bf16 in the pipeline).
    pub fn bn_running_mean(&self) -> &Tensor {
        &self.bn_running_mean
    }
    /// `bn.running_var` `[latent·4]` in the load dtype.
    pub fn bn_running_var(&self) -> &Tensor {
        &self.bn_running_var
    }
    /// `batch_norm_eps` of the config (1e-4).
    pub fn bn_eps(&self) -> f64 {
        self.cfg.batch_norm_eps
    }

    /// Casts/validates an input: 4-D, `channels` channels, spatial sizes multiples of `mult`,
    /// same device; cast to the model dtype (the pipeline does `x.to(vae.dtype)`, spec §4 step 5).
    fn prepare(&self, x: &Tensor, what: &str, channels: usize, mult: usize) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != channels {
            bail!("VAE {what}: expected a [B,{channels},H,W] tensor, got shape {dims:?}");
        }
        if dims[2] == 0
            || dims[3] == 0
            || !dims[2].is_multiple_of(mult)
            || !dims[3].is_multiple_of(mult)
        {
            bail!(
                "VAE {what}: height and width must be positive multiples of {mult}, got {}x{}",
                dims[2],
                dims[3]
            );
        }
        if !x.device().same_device(&self.device) {
            bail!(
                "VAE {what}: input is on {:?} but the VAE is on {:?}",
                x.device(),
                self.device
            );
        }
        Ok(x.to_dtype(self.dtype)?)
    }

    fn encoder(&self) -> Result<&Encoder> {
        self.encoder
            .as_ref()
            .context("VAE encoder was not loaded (load with VaeParts::ENCODER or VaeParts::ALL)")
    }

    fn decoder(&self) -> Result<&Decoder> {
        self.decoder
            .as_ref()
            .context("VAE decoder was not loaded (load with VaeParts::DECODER or VaeParts::ALL)")
    }

    /// Encoder + quant_conv on an already prepared tile/image: the moments `[B,2L,h,w]`.
    pub(crate) fn encode_moments_raw(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.encoder()?.forward(x)?;
        Ok(match &self.quant_conv {
            Some(qc) => h.apply(qc)?,
            None => h,
        })
    }

    /// post_quant_conv + decoder on an already prepared latent tile.
    pub(crate) fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(pqc) => z.apply(pqc)?,
            None => z.clone(),
        };
        Ok(self.decoder()?.forward(&z)?)
    }

    /// The posterior moments (mean ‖ logvar, `[B,2·latent,H/8,W/8]`) of images `x` in [-1,1].
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x, "encode", self.cfg.in_channels, self.scale_factor())?;
        self.encode_moments_raw(&x).context("VAE encode")
    }

    /// `vae.encode(x).latent_dist.mode()` (spec §4 step 5): the posterior mean, i.e. the first
    /// `latent_channels` channels of `quant_conv(encoder(x))`. `x`: `[B,3,H,W]` in [-1,1], H and
    /// W multiples of 8 → `[B,latent,H/8,W/8]` in the model dtype.
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.encode_moments(x)?;
        Ok(m.narrow(1, 0, self.cfg.latent_channels)?)
    }

    /// `vae.decode(z)`: post_quant_conv, then the decoder. `z`: `[B,latent,h,w]` (the
    /// de-normalised, unpatchified latents) → `[B,3,8h,8w]` in the model dtype, roughly [-1,1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.prepare(z, "decode", self.cfg.latent_channels, 1)?;
        self.decode_raw(&z).context("VAE decode")
    }
}
