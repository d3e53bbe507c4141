//! Normalisations with torch's roundings (spec §1): each picks our fused CUDA kernel where it
//! applies (bf16 on CUDA, speed paths on) and otherwise computes the reference op by op.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::elementwise::modulate;
use crate::profile;

/// `nn.LayerNorm(dim, elementwise_affine=False)`: statistics and normalisation in f32, one
/// rounding to the input dtype (spec §1). `candle_nn::ops::layer_norm` is that computation
/// (its weight/bias here are the constants 1 and 0, which change nothing).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("dit.layernorm", x.device(), || {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, self.eps)
        })
    }
}

/// `(1 + scale) · LayerNorm(x) + shift` (`x` `[B, S, D]`, `scale`/`shift` `[B, 1, D]`): one
/// fused pass on CUDA with the same roundings (the norm rounds once, then each of the three
/// elementwise ops rounds as torch's bf16 ops do).
pub fn layer_norm_modulate(
    norm: &LayerNorm,
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(x)
        && x.rank() == 3
        && x.dim(2)? <= crate::cuda::fused::LAYERNORM_MAX_DIM
    {
        return profile::span("dit.layernorm_modulate", x.device(), || {
            crate::cuda::fused::layernorm_modulate(x, scale, shift, norm.eps)
        });
    }
    modulate(&norm.forward(x)?, scale, shift)
}

/// `torch.nn.RMSNorm(head_dim)` on q/k heads: `x·rsqrt(mean(x²)+eps)·w` evaluated in f32
/// **with the weight applied in f32** and a single rounding (spec §1; unlike [`RmsNorm`]).
/// `candle_nn::ops::rms_norm` on f32 inputs is that computation.
#[derive(Debug, Clone)]
pub struct QkRmsNorm {
    pub(crate) weight_f32: Tensor,
    /// The weight in the model dtype, for candle's CUDA kernel (which already computes in
    /// f32 with the weight applied in f32 and rounds once).
    pub(crate) weight: Tensor,
    pub(crate) eps: f32,
}

impl QkRmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(Self {
            weight_f32: weight.to_dtype(DType::F32)?,
            weight,
            eps: eps as f32,
        })
    }

    /// `x` [..., head_dim] (contiguous or not).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("dit.qk_rmsnorm", x.device(), || {
            if x.device().is_cuda() && x.dtype() == self.weight.dtype() {
                return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps);
            }
            let dtype = x.dtype();
            let xf = x.to_dtype(DType::F32)?.contiguous()?;
            candle_nn::ops::rms_norm(&xf, &self.weight_f32, self.eps)?.to_dtype(dtype)
        })
    }
}

/// transformers' `Qwen3RMSNorm`: `w * to_dtype(x_f32 * rsqrt(mean(x_f32²) + eps))` (spec §1,
/// §2.2): normalised in f32, rounded, *then* multiplied by the weight in the compute dtype.
///
/// candle-nn's `rms_norm` on bf16 input rounds the rms to bf16 and applies the weight before
/// the single final rounding, so it is called on the f32 upcast with unit weight (= the f32
/// normalisation), and the result is rounded and multiplied by the weight separately.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    ones_f32: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let ones_f32 = Tensor::ones(dim, DType::F32, weight.device())?;
        Ok(Self {
            weight,
            ones_f32,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // CUDA bf16: the same two roundings in one kernel (the f32 normalisation multiplies by
        // rsqrt, as transformers does).
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) && self.weight.dtype() == DType::BF16 {
            return crate::cuda::fused::rms_norm_scale(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let normed = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.ones_f32,
            self.eps,
        )?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// `nn.GroupNorm(groups, C, eps, affine=True)` on `[B, C, H, W]`.
///
/// torch computes the statistics *and the affine* in f32 and rounds the output once to the
/// input dtype (spec §1, "everything else … plain bf16 ops"); this reproduces that. The
/// affine parameters are kept as f32 copies (exact upcasts of the loaded values).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm {}: {groups} groups do not divide {channels} channels",
                vb.prefix()
            );
        }
        let weight = vb.get(channels, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight: weight.reshape((1, channels, 1, 1))?,
            bias: bias.reshape((1, channels, 1, 1))?,
            groups,
            channels,
            eps,
        })
    }

    /// The fused CUDA kernel (bf16 on CUDA), `None` where it does not apply.
    #[allow(unused_variables)]
    fn fused(&self, x: &Tensor, silu: bool) -> Option<Result<Tensor>> {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) {
            return Some(crate::cuda::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            ));
        }
        None
    }

    /// The normalised, affine-transformed value in f32, not yet rounded. `x`: `[B,C,H,W]`.
    fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            candle_core::bail!("GroupNorm expects {} channels, got {c}", self.channels);
        }
        let xs = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = xs.mean_keepdim(2)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = xs.sqr()?.mean_keepdim(2)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xs.reshape((b, c, h, w))?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, false) {
            return y;
        }
        self.forward_f32(x)?.to_dtype(x.dtype())
    }

    /// `silu(group_norm(x))` with torch's roundings: the norm output is rounded to the input
    /// dtype (it is a tensor in torch), then SiLU rounds once more.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("vae.groupnorm_silu", x.device(), || {
            if let Some(y) = self.fused(x, true) {
                return y;
            }
            let dt = x.dtype();
            let y = self.forward_f32(x)?;
            let y = if dt == DType::F32 {
                y
            } else {
                y.to_dtype(dt)?.to_dtype(DType::F32)?
            };
            candle_nn::ops::silu(&y)?.to_dtype(dt)
        })
    }
}
