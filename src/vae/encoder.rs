//! diffusers `Encoder` (`double_z=True`) of the FLUX.2 VAE, spec §6.1: `conv_in` → down blocks
//! (resnets, then a downsampler on every block but the last) → mid block → `conv_norm_out` →
//! SiLU → `conv_out` to `2·latent_channels` (mean and log-variance).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::blocks::{conv2d, Conv2d, Downsample2D, GroupNorm, MidBlock2D, ResnetBlock2D};
use super::config::AutoencoderKLFlux2Config;

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then an optional downsampler.
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// The VAE encoder (VarBuilder at `encoder`).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn load(cfg: &AutoencoderKLFlux2Config, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(cfg.in_channels, ch[0], 3, pad1, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cout = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let cin = cout;
            cout = c;
            let vb_i = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { cin } else { cout };
                    ResnetBlock2D::load(rin, cout, groups, vb_i.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::load(cout, vb_i.pp("downsamplers").pp("0"))?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsampler,
            });
        }
        let top = *ch.last().expect("validated: non-empty");
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock2D::load(
                top,
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            conv_norm_out: GroupNorm::load(groups, top, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(top, 2 * cfg.latent_channels, 3, pad1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    /// `[B,in,H,W]` → moments `[B,2·latent,H/f,W/f]` (before `quant_conv`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.apply(&self.conv_in)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_norm_out.forward_silu(&h)?.apply(&self.conv_out)
    }
}
