//! Elementwise ops with PyTorch's rounding, shared by the text encoder, transformer and VAE.

use candle_core::{DType, Result, Tensor};

/// SiLU as torch evaluates it for half-precision tensors: in f32, rounded once to the input
/// dtype (spec §1). candle's native bf16 SiLU rounds the `exp`, the `1 + …` and the quotient
/// separately, which drifts from the reference.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => candle_nn::ops::silu(x),
        dt => candle_nn::ops::silu(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

/// False when `FLUX2_KLEIN_FUSED=0` switches off our CUDA speed paths (fused kernels,
/// tensor-core cuDNN convs, TF32 in the VAE attention), so the plain candle ops run instead
/// (the reference the GPU tests compare against).
pub fn cuda_speedups_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("FLUX2_KLEIN_FUSED").map_or(true, |v| v != "0"))
}
