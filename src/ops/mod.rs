//! The op layer between the models and the kernels.
//!
//! The models (text encoder, transformer, VAE) call these ops; each op picks our fused CUDA
//! kernel when it applies (CUDA, the dtype the kernel is for, speed paths on) and otherwise
//! computes the reference with PyTorch's roundings (spec §1), which is also what the CPU
//! runs. So the model files hold no device dispatch: the `cfg(feature = "cuda")` seams live
//! here and in `crate::cuda`.
//!
//! * [`linear`]: [`Linear`], one `forward` over the stored weight kind;
//! * [`attention`]: scaled dot-product attention with a [`Mask`], and the VAE's f32
//!   attention; [`joint_attention`]: FLUX.2's q/k-norm + RoPE + attention;
//! * [`norm`]: LayerNorm (+ modulation), the two RMSNorm rounding rules, GroupNorm (+ SiLU);
//! * [`mlp`]: SwiGLU and SiLU·up; [`elementwise`]: modulation and the gated residual;
//! * [`rope`]: the interleaved (FLUX.2) and half-split (Qwen3) rotations;
//! * [`conv`]: the VAE's `Conv2d`; [`device`]: peak memory and the CUDA pool policy;
//! * the kernel switches ([`KernelOptions`]), device preparation and the warnings queue.

pub mod attention;
pub mod conv;
pub mod device;
pub mod elementwise;
pub mod joint_attention;
mod kernels;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use attention::{attention, Layout, Mask};
pub use kernels::{AttentionKernel, KernelOptions};
pub use linear::Linear;

use candle_core::{DType, Result, Tensor};

/// SiLU as torch evaluates it for half-precision tensors: in f32, rounded once to the input
/// dtype (spec §1). candle's native bf16 SiLU rounds the `exp`, the `1 + …` and the quotient
/// separately, which drifts from the reference.
/// Whether every value of `x` is finite: one sum over the tensor on its device (NaN and ±∞
/// propagate through it), read back as a scalar. Finite latents of this model stay many
/// orders of magnitude below f32's range, so a finite sum cannot overflow.
pub fn all_finite(x: &Tensor) -> Result<bool> {
    let sum = x.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(sum.is_finite())
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => candle_nn::ops::silu(x),
        dt => candle_nn::ops::silu(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

/// False when [`KernelOptions::fused`] switches off our CUDA speed paths (fused kernels,
/// tensor-core cuDNN convs, TF32 in the VAE attention), so the plain candle ops run instead
/// (the reference the GPU tests compare against).
pub fn cuda_speedups_enabled() -> bool {
    KernelOptions::current().fused
}

/// Readies `device` for a model whose attention heads are `head_dim` wide, computing in
/// `dtype`, under the installed [`KernelOptions`]: on CUDA with the speed paths on, the memory
/// pool keeps freed memory and every kernel the model will launch is compiled, loaded and
/// self-checked. Returns the warnings to show (kernels that cannot run here fall back to
/// candle's ops for the process).
pub fn prepare_device(device: &candle_core::Device, head_dim: usize, dtype: DType) -> Vec<String> {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut warnings = Vec::new();
    // The one CUDA seam of device set-up: everything below is CUDA-only.
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        if cuda_speedups_enabled() {
            device::keep_freed_memory(device);
            if let Err(e) = crate::cuda::preflight(dev, head_dim, dtype) {
                warnings.push(format!(
                    "flux2-klein's CUDA kernels cannot run here ({}); using candle's ops \
                     instead, which is slower. An NVIDIA driver for CUDA 13.0 (580 or newer) \
                     runs them.",
                    crate::one_line(&e.to_string())
                ));
            }
        }
    }
    let _ = (device, head_dim, dtype);
    warnings
}

/// Warnings raised inside ops and kernels (a kernel that failed its load-time self-check, a
/// cuDNN convolution that fell back), kept until the pipeline hands them on as
/// `Event::Warning`: the library never prints.
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Queues a warning for [`take_warnings`]; the same text is queued once per process.
pub fn warn(message: String) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(mut seen) = SEEN.lock() else { return };
    if seen.contains(&message) {
        return;
    }
    seen.push(message.clone());
    if let Ok(mut w) = WARNINGS.lock() {
        w.push(message);
    }
}

/// The warnings queued since the last call.
pub fn take_warnings() -> Vec<String> {
    WARNINGS
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default()
}
