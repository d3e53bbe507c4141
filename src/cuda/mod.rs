//! Our own CUDA kernels, compiled at run time with NVRTC (no build-time CUDA step, so the
//! crate builds with `--features cuda` on machines without a GPU).
//!
//! * [`flash_attn`]: fused scaled-dot-product attention (FlashAttention-2 style forward pass)
//!   for bf16/f16, replacing the naive `softmax(q kᵀ · scale) v` of the Flux2 transformer.
//! * [`fused`]: bf16 SwiGLU, modulation, RoPE and GroupNorm(+SiLU) kernels with torch's
//!   roundings.
//! * [`conv`] (feature `cudnn`): the VAE's convolutions on cuDNN with tensor cores enabled.

#[cfg(feature = "cudnn")]
pub mod conv;
pub mod flash_attn;
pub mod fused;
mod nvrtc;

use candle_core::Result;

pub use flash_attn::{
    available, flash_attention, flash_attention_bshd, is_supported, naive_attention,
};

/// Compiles every CUDA source of ours with NVRTC for `compute_cap` (e.g. 90), with each set of
/// defines the run-time code uses, and checks that every kernel it launches is there. Needs
/// `libnvrtc` but no GPU: the run-time compile otherwise first happens on the GPU machine.
/// Returns the kernel names checked.
pub fn check_kernels(compute_cap: u32) -> Result<Vec<String>> {
    let mut checked = Vec::new();
    let fused: Vec<String> = fused::FUNCTIONS.iter().map(|f| f.to_string()).collect();
    nvrtc::check_compiles("fused", fused::KERNEL_SOURCE, compute_cap, &[], &fused)?;
    checked.extend(fused);
    for (defines, entries) in flash_attn::compiled_variants() {
        nvrtc::check_compiles(
            "flash_attn",
            flash_attn::KERNEL_SOURCE,
            compute_cap,
            &defines,
            &entries,
        )?;
        checked.extend(entries);
    }
    Ok(checked)
}
