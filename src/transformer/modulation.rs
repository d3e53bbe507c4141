//! diffusers' `Flux2Modulation` and `AdaLayerNormContinuous` (spec §5.2 steps 2 and 7).

use anyhow::Result;
use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::ops::{self, norm::LayerNorm, Linear};

/// shift, scale, gate chunks, each `[B, 1, D]` (a view into the modulation output).
#[derive(Debug, Clone)]
pub struct ModParams {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModParams {
    /// `(1 + scale) * norm(x) + shift`, each op rounded in the model dtype (spec §1).
    pub fn norm_modulate(&self, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        Ok(ops::norm::layer_norm_modulate(
            norm,
            x,
            &self.scale,
            &self.shift,
        )?)
    }

    /// The gated residual `x + gate * y`.
    pub fn gated_residual(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(ops::elementwise::gated_residual(x, y, &self.gate)?)
    }
}

/// diffusers' `Flux2Modulation`: `linear(silu(temb))` → `[B, 3·sets·D]`.
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    sets: usize,
}

impl Modulation {
    pub fn load(vb: VarBuilder, dim: usize, sets: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::load_no_bias(dim, dim * 3 * sets, vb.pp("linear"))?,
            sets,
        })
    }

    /// Raw modulation vector `[B, 3·sets·D]` (what diffusers' module returns).
    pub fn forward(&self, temb: &Tensor) -> Result<Tensor> {
        Ok(self.linear.forward(&ops::silu(temb)?)?)
    }

    /// `Flux2Modulation.split`: `sets` groups of (shift, scale, gate), each `[B, 1, D]`.
    pub fn split(&self, m: &Tensor) -> Result<Vec<ModParams>> {
        let m = m.unsqueeze(1)?;
        let chunks = m.chunk(3 * self.sets, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|c| ModParams {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// diffusers' `AdaLayerNormContinuous(D, D, elementwise_affine=False, bias=False)`:
/// `LN(x)·(1+scale) + shift` with `[scale, shift] = linear(silu(temb))` — note the
/// (scale, shift) order, opposite to the block modulations (spec §5.2 step 7).
#[derive(Debug, Clone)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
    norm: LayerNorm,
}

impl AdaLayerNormContinuous {
    pub fn load(vb: VarBuilder, dim: usize, norm: LayerNorm) -> Result<Self> {
        Ok(Self {
            linear: Linear::load_no_bias(dim, 2 * dim, vb.pp("linear"))?,
            norm,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let emb = self.linear.forward(&ops::silu(temb)?)?.unsqueeze(1)?;
        let d = emb.dim(2)? / 2;
        let scale = emb.narrow(2, 0, d)?;
        let shift = emb.narrow(2, d, d)?;
        Ok(self
            .norm
            .forward(x)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?)
    }
}
