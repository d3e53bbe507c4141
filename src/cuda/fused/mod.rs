//! Fused bf16 kernels (`kernels/fused.cu`) for the transformer's SwiGLU, modulation and RoPE,
//! the text encoder's SiLU·up and RMSNorm and the VAE's GroupNorm(+SiLU) and conv bias, each
//! replacing a chain of candle ops that reads and writes the whole activation several times
//! (measured: BENCHMARKS.md, 2026-11-26).
//!
//! The kernels keep torch's roundings (spec §1). Callers use them when [`applies`] says so
//! (CUDA, bf16, [`crate::ops::KernelOptions::fused`] on) and keep the candle path, which is the
//! reference the tests compare against, everywhere else.
//!
//! * `mlp`: SwiGLU (plain and with a prefix), SiLU·up;
//! * `norm`: LayerNorm + modulation, RMSNorm (Qwen3's, and q/k RMSNorm + RoPE), GroupNorm;
//! * `pointwise`: modulation, gated residual, RoPE, per-channel bias;
//!
//! all launched through `crate::cuda::launch` (argument lists, grids, output buffers).

mod mlp;
mod norm;
mod pointwise;

pub use mlp::{prefixed_swiglu, silu_mul, swiglu};
pub use norm::{
    group_norm, layernorm_modulate, rms_norm_scale, rmsnorm_rope, NormSegment, LAYERNORM_MAX_DIM,
};
pub use pointwise::{add_channel_bias, gated_residual, modulate, rope_bshd};

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaDevice, DType, Result, Tensor};

use super::launch::KernelArg;

/// The CUDA source (no `#include`s).
pub const KERNEL_SOURCE: &str = include_str!("../kernels/fused.cu");

/// Every kernel of `fused.cu` this module launches (checked by [`super::check_kernels`]).
pub const FUNCTIONS: &[&str] = &[
    "swiglu_bf16",
    "modulate_bf16",
    "layernorm_modulate_bf16",
    "gated_residual_bf16",
    "rope_bshd_bf16",
    "rmsnorm_rope_bf16",
    "gn_partial_bf16",
    "gn_finalize",
    "gn_apply_bf16",
    "channel_bias_bf16",
    "silu_mul_bf16",
    "rmsnorm_scale_bf16",
];

/// Whether the fused kernels apply to `t`: a bf16 CUDA tensor, our kernels usable here, and
/// the fused paths on ([`crate::ops::cuda_speedups_enabled`]; off, the reference candle ops
/// run).
pub fn applies(t: &Tensor) -> bool {
    crate::ops::cuda_speedups_enabled()
        && super::kernels_usable()
        && t.device().is_cuda()
        && t.dtype() == DType::BF16
}

/// Compiles (NVRTC, cached) and loads every kernel of this module on `dev`.
pub(crate) fn load_all(dev: &CudaDevice) -> Result<()> {
    for f in FUNCTIONS {
        super::nvrtc::load_function(dev, "fused", KERNEL_SOURCE, &[], f)?;
    }
    Ok(())
}

/// Launches `function` of `fused.cu` on `dev` (compiled and loaded on first use).
///
/// # Safety
///
/// As [`super::launch::launch`]: `args` match the kernel's parameters, `cfg` its geometry.
unsafe fn launch(
    dev: &CudaDevice,
    function: &str,
    cfg: LaunchConfig,
    args: &[&dyn KernelArg],
) -> Result<()> {
    debug_assert!(
        FUNCTIONS.contains(&function),
        "{function} missing from FUNCTIONS"
    );
    let func = super::nvrtc::load_function(dev, "fused", KERNEL_SOURCE, &[], function)?;
    // SAFETY: the caller's contract.
    unsafe { super::launch::launch(dev, &func, cfg, args) }
}

/// The error of a fused op's `cpu_fwd` (unreachable: callers use the candle ops on the CPU).
fn cuda_only(name: &str) -> String {
    format!("{name} is a CUDA-only fused kernel (callers use the candle ops on the CPU)")
}
