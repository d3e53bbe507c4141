//! The gated activations of the feed-forward layers: SiLU evaluated in f32 and rounded once
//! (spec §1, [`super::silu`]), the product rounded in the model dtype; fused on CUDA.

use candle_core::{Result, Tensor, D};

use super::silu;
use crate::profile;

/// SwiGLU on a fused `[gate | value]` projection: `silu(u[..., :F]) * u[..., F:]`.
pub fn swiglu(u: &Tensor) -> Result<Tensor> {
    profile::span("dit.swiglu", u.device(), || {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(u) {
            return crate::cuda::fused::swiglu(u);
        }
        let f = u.dim(D::Minus1)? / 2;
        silu(&u.narrow(D::Minus1, 0, f)?)? * u.narrow(D::Minus1, f, f)?
    })
}

/// `cat([prefix, swiglu(u)], -1)`: the single-stream block's output-projection input (one
/// fused pass on CUDA, bit-identical).
pub fn swiglu_beside(prefix: &Tensor, u: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(u) && crate::cuda::fused::applies(prefix) {
        return profile::span("dit.swiglu", u.device(), || {
            crate::cuda::fused::prefixed_swiglu(prefix, u)
        });
    }
    Tensor::cat(&[prefix, &swiglu(u)?], D::Minus1)
}

/// `silu(gate) * up` (Qwen3's MLP).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(gate) {
        return crate::cuda::fused::silu_mul(gate, up);
    }
    silu(gate)? * up
}
