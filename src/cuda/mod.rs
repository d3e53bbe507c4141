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

pub use flash_attn::{
    available, flash_attention, flash_attention_bshd, is_supported, naive_attention,
};
