//! Building blocks of the FLUX.2 VAE (diffusers `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, `UNetMidBlock2D` with its deprecated-attn-block `Attention`), spec §6.1.
//!
//! VarBuilder paths mirror the diffusers state-dict keys (spec §6.2).
//!
//! Why not `candle_transformers::models::z_image::vae`? Its blocks have the same structure and
//! key names, but (a) its `GroupNorm` is `candle_nn::GroupNorm`, which rounds three times in
//! bf16 (normalised value, `×weight`, `+bias`) where torch rounds once (spec §1: a fused op
//! rounds once), (b) its attention runs the softmax in bf16 where torch's fused SDPA kernel
//! accumulates in f32, (c) it has no `mid_block_add_attention = false`, no quant convs and no
//! separate decoder channels, and its blocks are private; (d) candle's CPU backend has no bf16
//! matmul, so its convs cannot run a bf16 model on the CPU at all. So the blocks are written
//! here from `crate::ops` pieces (`Conv2d`, `Linear`, `GroupNorm`, `attention_f32`), which
//! handle (a), (b) and (d).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::{self, Linear};
use crate::profile;

pub use crate::ops::conv::{conv2d, Conv2d};
pub use crate::ops::norm::GroupNorm;

/// `nn.Linear` with bias; on the CPU in half precision it computes in f32 (see
/// `crate::ops::linear::needs_f32_compute`).
fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::load_widened_on_cpu(cin, cout, vb)
}

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// diffusers `ResnetBlock2D` without time embedding (spec §6.1):
/// `out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, dropout 0,
/// `output_scale_factor` 1 (the `/ 1` of diffusers is exact and omitted).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1×1 conv with bias, present iff `cin != cout` (diffusers' `use_in_shortcut`).
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let eps = 1e-6;
        let conv_shortcut = if cin != cout {
            Some(conv2d(
                cin,
                cout,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            norm2: GroupNorm::load(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => x.apply(conv)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// diffusers `Attention(_from_deprecated_attn_block=True)` of the mid block (spec §6.1):
/// group norm, single head over all `H·W` positions, Linear q/k/v/out with bias, residual add.
///
/// The core `softmax(q kᵀ/√C) v` is computed in f32 and rounded once to the model dtype, as
/// torch's fused `scaled_dot_product_attention` kernels do (they accumulate and normalise in
/// f32 for bf16 inputs); the projections and the residual add stay in the model dtype.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    pub fn load(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out").pp("0"))?,
        })
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("vae.mid_attention", x.device(), || self.forward_inner(x))
    }
}

impl Attention {
    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = hs.apply(&self.to_q)?;
        let k = hs.apply(&self.to_k)?;
        let v = hs.apply(&self.to_v)?;
        let out = ops::attention::attention_f32(&q, &k, &v)?.apply(&self.to_out)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers `Downsample2D(use_conv=True, padding=0)`: pad right and bottom by one zero, then
/// a 3×3 stride-2 conv without padding (spec §6.1).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding: 0,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?
            .apply(&self.conv)
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest-neighbour ×2 (`F.interpolate(…,
/// scale_factor=2, mode="nearest")`, source index `floor(dst/2)`), then a 3×3 conv, pad 1.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        profile::span("vae.upsample_nearest", x.device(), || {
            x.upsample_nearest2d(2 * h, 2 * w)
        })?
        .apply(&self.conv)
    }
}

/// diffusers `UNetMidBlock2D` with one layer: resnet, (attention), resnet.
#[derive(Debug, Clone)]
pub struct MidBlock2D {
    resnet0: ResnetBlock2D,
    attention: Option<Attention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock2D {
    pub fn load(
        channels: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = vb.pp("resnets");
        let attention = if add_attention {
            Some(Attention::load(
                channels,
                groups,
                vb.pp("attentions").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock2D::load(channels, channels, groups, resnets.pp("0"))?,
            attention,
            resnet1: ResnetBlock2D::load(channels, channels, groups, resnets.pp("1"))?,
        })
    }
}

impl Module for MidBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}
