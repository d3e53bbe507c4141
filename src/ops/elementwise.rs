//! Elementwise ops of the transformer blocks, each op rounded in the model dtype as torch's
//! bf16 ops are (spec §1), one fused pass on CUDA with the same roundings.

use candle_core::{Result, Tensor};

use crate::profile;

/// `(1 + scale) * x + shift` (`scale`/`shift` broadcast over the tokens).
pub fn modulate(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    profile::span("dit.modulate", x.device(), || {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) {
            return crate::cuda::fused::modulate(x, scale, shift);
        }
        x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
    })
}

/// The gated residual `x + gate * y` (torch rounds the product, then the sum).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    profile::span("dit.residual", x.device(), || {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) && y.dtype() == x.dtype() && x.rank() == 3 {
            return crate::cuda::fused::gated_residual(x, y, gate);
        }
        x + y.broadcast_mul(gate)?
    })
}
