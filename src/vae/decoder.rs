//! diffusers `Decoder` of the FLUX.2 VAE, spec §6.1: `conv_in` → mid block → up blocks
//! (`layers_per_block + 1` resnets, then an upsampler on every block but the last) →
//! `conv_norm_out` → SiLU → `conv_out`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::blocks::{conv2d, Conv2d, GroupNorm, MidBlock2D, ResnetBlock2D, Upsample2D};
use super::config::AutoencoderKLFlux2Config;

/// `UpDecoderBlock2D`: resnets, then an optional upsampler.
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.upsampler {
            Some(u) => u.forward(&h),
            None => Ok(h),
        }
    }
}

/// The VAE decoder (VarBuilder at `decoder`).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn load(cfg: &AutoencoderKLFlux2Config, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.decoder_channels();
        let groups = cfg.norm_num_groups;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let top = *ch.last().expect("validated: non-empty");
        let conv_in = conv2d(cfg.latent_channels, top, 3, pad1, vb.pp("conv_in"))?;
        let mid_block =
            MidBlock2D::load(top, groups, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cout = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            let cin = cout;
            cout = c;
            let vb_i = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { cin } else { cout };
                    ResnetBlock2D::load(rin, cout, groups, vb_i.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < ch.len() {
                Some(Upsample2D::load(cout, vb_i.pp("upsamplers").pp("0"))?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(groups, ch[0], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, pad1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    /// `[B,latent,h,w]` (after `post_quant_conv`) → `[B,out,f·h,f·w]`.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = z.apply(&self.conv_in)?;
        let mut h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_norm_out.forward_silu(&h)?.apply(&self.conv_out)
    }
}
