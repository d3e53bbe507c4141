//! Our own CUDA kernels, compiled at run time with NVRTC (no build-time CUDA step, so the
//! crate builds with `--features cuda` on machines without a GPU). `crate::ops` is their one
//! caller besides the CUDA tests.
//!
//! * [`attention`]: fused scaled-dot-product attention (FlashAttention-2 style forward pass,
//!   a Hopper wgmma variant and a causal one) for bf16/f16, replacing the naive
//!   `softmax(q kᵀ · scale) v`;
//! * [`fused`]: bf16 SwiGLU, modulation, norms, RoPE and GroupNorm(+SiLU) kernels with torch's
//!   roundings;
//! * [`conv`] (feature `cudnn`): the VAE's convolutions on cuDNN with tensor cores enabled;
//! * [`memory`]: the CUDA memory pool's watermark and release policy.
//!
//! The sources are in `kernels/`, launched through `launch` (shared by all of them) and
//! compiled by `nvrtc` (cached on disk); `tests/kernel_emu/` runs them on the CPU.

mod launch;

pub mod attention;
#[cfg(feature = "cudnn")]
pub mod conv;
pub mod fused;
pub mod memory;
mod nvrtc;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CudaDevice, DType, Result};

pub use attention::{
    causal_kernel_ready, flash_attention, is_supported, kernel_name, naive_attention,
    naive_causal_attention, AttnLayout, AttnMask, FlashParams,
};

/// Set when [`preflight`] found that our kernels cannot run here: then the callers use the
/// plain candle ops ([`fused::applies`] and [`is_supported`] say no).
static KERNELS_UNUSABLE: AtomicBool = AtomicBool::new(false);

/// Whether our NVRTC kernels may be used (see [`preflight`]).
pub fn kernels_usable() -> bool {
    !KERNELS_UNUSABLE.load(Ordering::Relaxed)
}

/// Compiles and loads, once per process, every kernel a `dtype` model with `head_dim`-wide
/// attention heads will launch on `dev` (the fused kernels are bf16-only; f32 uses none). On
/// failure (e.g. a driver too old for the PTX of CUDA 13.0, or no NVRTC) the kernels are
/// switched off for the process, so generation falls back to candle's ops instead of failing
/// halfway; the error is returned for a warning.
pub fn preflight(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Result<()> {
    let result = match dtype {
        DType::BF16 => {
            fused::load_all(dev).and_then(|()| attention::load_for(dev, head_dim, dtype))
        }
        DType::F16 => attention::load_for(dev, head_dim, dtype),
        _ => Ok(()), // f32 runs candle's ops only
    };
    if result.is_err() {
        KERNELS_UNUSABLE.store(true, Ordering::Relaxed);
    }
    result
}

/// Compiles every CUDA source of ours with NVRTC for `compute_cap` (e.g. 90), with each set of
/// defines the run-time code uses, and checks that every kernel it launches is there. Needs
/// `libnvrtc` but no GPU: the run-time compile otherwise first happens on the GPU machine.
/// Returns the kernel names checked.
pub fn check_kernels(compute_cap: u32) -> Result<Vec<String>> {
    let mut checked = Vec::new();
    let fused: Vec<String> = fused::FUNCTIONS.iter().map(|f| f.to_string()).collect();
    let arch = compute_cap.to_string();
    nvrtc::check_compiles("fused", fused::KERNEL_SOURCE, &arch, &[], &fused)?;
    checked.extend(fused);
    for variant in attention::compiled_variants() {
        // Architecture-specific variants (sm_90a) compile only for their own architecture.
        let arch = match variant.arch {
            Some((cap, suffix)) if cap == compute_cap => format!("{cap}{suffix}"),
            Some(_) => continue,
            None => arch.clone(),
        };
        nvrtc::check_compiles(
            "flash_attn",
            variant.source,
            &arch,
            &variant.defines,
            &variant.entries,
        )?;
        checked.extend(variant.entries);
    }
    Ok(checked)
}
