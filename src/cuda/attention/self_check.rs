//! The checks a kernel passes when it loads, before anything relies on it (a driver or NVRTC we
//! have not run on degrades to the portable kernel or the reference path instead of wrong
//! images), and the unfused references they, the fallbacks and the GPU tests compare against.

use candle_core::{bail, CudaDevice, DType, Device, Result, Tensor};

use super::select::KernelConfig;
use super::{op, AttnLayout, AttnMask, FlashParams};

/// The Hopper kernel `cfg` against f32 attention on a small problem with partial query and
/// key tiles (bf16 tolerance).
pub(super) fn hopper_self_check(dev: &CudaDevice, cfg: KernelConfig) -> Result<()> {
    let device = Device::Cuda(dev.clone());
    let rand = |s: usize| Tensor::randn(0f32, 1f32, (1, 2, s, 128), &device);
    let (q, k, v) = (rand(200)?, rand(300)?, rand(300)?);
    let bf = |t: &Tensor| t.to_dtype(DType::BF16);
    let scale = 1.0 / (128f32).sqrt();
    let ours = op::run(
        &bf(&q)?,
        &bf(&k)?,
        &bf(&v)?,
        scale,
        AttnLayout::Bhsd,
        Some(cfg),
    )?
    .to_dtype(DType::F32)?;
    // The same bf16 values in f32.
    let f = |t: &Tensor| bf(t)?.to_dtype(DType::F32);
    let reference = naive_attention(&f(&q)?, &f(&k)?, &f(&v)?, scale)?;
    check_close(&ours, &reference, "f32 attention")
}

/// The causal kernel against f32 masked attention on a small problem (two query blocks,
/// right padding inside the first key tile's range, grouped K/V heads), once per process
/// before the text encoder relies on it.
pub(super) fn causal_self_check(device: &Device, head_dim: usize, dtype: DType) -> Result<()> {
    let (h, kv_heads, s, real) = (4, 2, 150, 100);
    let rand =
        |heads: usize| Tensor::randn(0f32, 1f32, (1, heads, s, head_dim), device)?.to_dtype(dtype);
    let (q, k, v) = (rand(h)?, rand(kv_heads)?, rand(kv_heads)?);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // The [B, S, H, D] entry the text encoder uses, on contiguous [B, S, H, D] copies.
    let bshd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let params = FlashParams {
        scale,
        layout: AttnLayout::Bshd,
        mask: AttnMask::Causal { kv_valid: &[real] },
    };
    let ours = super::flash_attention(&bshd(&q)?, &bshd(&k)?, &bshd(&v)?, &params)?
        .transpose(1, 2)?
        .to_dtype(DType::F32)?;
    // The same rounded values in f32.
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let reference = naive_causal_attention(&f(&q)?, &f(&k)?, &f(&v)?, scale, real)?;
    check_close(&ours, &reference, "f32 masked attention")
}

/// A self-check's verdict: the kernel's output within bf16 tolerance (2 % of the output's
/// range) of the f32 reference computed on the same rounded inputs.
fn check_close(ours: &Tensor, reference: &Tensor, against: &str) -> Result<()> {
    let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let top = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    if err.is_nan() || err > 2e-2 * top.max(1e-6) {
        bail!("max abs error {err:.3e} against {against} (max |out| {top:.3e})")
    }
    Ok(())
}

/// The unfused reference: `softmax(q kᵀ · scale) v` in the inputs' dtype, `[B, H, S, D]`.
/// This is what [`super::flash_attention`] replaces; it is also its fallback for unsupported
/// inputs.
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale as f64)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

/// The unfused reference of [`super::flash_attention`] with [`AttnMask::Causal`] and one
/// `kv_valid` for every batch row: [`naive_attention`] with the K/V heads repeated to `q`'s
/// (`[B, Hkv, S, D]` → `[B, H, S, D]`) and query `i` seeing keys `0..=min(i, kv_valid - 1)`, in
/// the inputs' dtype. Returns `[B, H, S, D]`.
pub fn naive_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kv_valid: usize,
) -> Result<Tensor> {
    let (_, h, s, _) = q.dims4()?;
    let repeat_heads = |t: &Tensor| -> Result<Tensor> {
        let (b, hk, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, hk, h / hk, s, d))?
            .reshape((b, h, s, d))
    };
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= i.min(kv_valid.saturating_sub(1)) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, s, s), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.contiguous()?.matmul(&repeat_heads(k)?.t()?)? * scale as f64)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    probs.matmul(&repeat_heads(v)?)
}
