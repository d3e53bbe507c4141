//! Scaled dot-product attention, the single place where the fused (flash) kernel is swapped in
//! on CUDA (bf16/f16, `crate::cuda::flash_attention`); this naive path is the reference.
//!
//! diffusers calls `F.scaled_dot_product_attention` (no mask, scale 1/√head_dim). On the CPU
//! torch runs its flash-attention kernel for f32 and bf16 alike: `QKᵀ` accumulated in f32 and
//! scaled in f32, `e = exp(s − max)` in f32 with the row sums in f32, `e` rounded to bf16 (for
//! bf16 inputs) for the `e·V` GEMM, which accumulates in f32, then the division by the sum in
//! f32 and a single rounding to bf16. The naive version below does exactly these roundings
//! (only the blocking of the online softmax differs, ~1e-7). For f32 it is the plain
//! `softmax(QKᵀ·scale)·V`.
//!
//! For bf16 this costs two f32 GEMMs over `[B, H, S, S]`; measured on the tiny bf16 case it
//! halves the error against diffusers compared with bf16 probabilities in a bf16 GEMM
//! (transformer output 2.6e-3 vs 6.8e-3 max rel err at step 0). On CUDA, where torch's own
//! kernels round differently anyway, a fused flash kernel replaces this function.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Largest f32 score tensor (in bytes) materialised at once; bigger problems are split over
/// (batch, head) groups so that a 1024² edit with references (S ≈ 10k tokens) stays within a
/// few GiB of scratch memory.
const MAX_SCORE_BYTES: usize = 1 << 30;

/// `softmax(q kᵀ / √D) v` for `q`, `k`, `v` of shape `[B, H, S, D]` (contiguous, as the
/// GEMMs need). Returns `[B, H, S, D]` in `q`'s dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // CUDA bf16/f16: our fused FlashAttention-2 kernel (src/cuda), tested against this naive
    // path on the GPU (tests/cuda_gpu/attention.rs).
    #[cfg(feature = "cuda")]
    if crate::cuda::is_supported(q, k, v) {
        let scale = 1.0 / (q.dim(3)? as f32).sqrt();
        return Ok(crate::cuda::flash_attention(q, k, v, scale)?);
    }
    attention_with_budget(q, k, v, MAX_SCORE_BYTES)
}

/// [`attention`] with an explicit scratch budget for the f32 score tensor.
fn attention_with_budget(q: &Tensor, k: &Tensor, v: &Tensor, max_bytes: usize) -> Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let (bk, hk, s_k, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || v.dims4()? != (b, h, s_k, d) {
        bail!(
            "attention shapes disagree: q {:?}, k {:?}, v {:?} (expected [B, H, S, D])",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let per_head = s_q * s_k * 4;
    let heads_per_chunk = (max_bytes / per_head.max(1)).max(1);
    if b * h <= heads_per_chunk {
        return attention_naive(q, k, v);
    }
    // Split the heads in groups that fit the scratch budget.
    let mut outs = Vec::new();
    for bi in 0..b {
        let (qb, kb, vb) = (
            q.narrow(0, bi, 1)?,
            k.narrow(0, bi, 1)?,
            v.narrow(0, bi, 1)?,
        );
        let mut h0 = 0;
        while h0 < h {
            let n = heads_per_chunk.min(h - h0);
            outs.push(attention_naive(
                &qb.narrow(1, h0, n)?.contiguous()?,
                &kb.narrow(1, h0, n)?.contiguous()?,
                &vb.narrow(1, h0, n)?.contiguous()?,
            )?);
            h0 += n;
        }
    }
    let groups_per_batch = h.div_ceil(heads_per_chunk);
    let per_batch = outs
        .chunks(groups_per_batch)
        .map(|c| Tensor::cat(c, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&per_batch, 0)?)
}

fn attention_naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let d = q.dim(3)?;
    // torch: scale = 1/sqrt(D) as a double, applied to the f32 scores after the GEMM.
    let scale = 1.0 / (d as f64).sqrt();
    let scores = if dtype == DType::F32 {
        q.matmul(&k.t()?)?
    } else {
        q.to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
    };
    let scores = (scores * scale)?;
    if dtype == DType::F32 {
        return Ok(candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)?);
    }
    // torch's CPU flash kernel for reduced precision: unnormalised probabilities rounded to
    // the input dtype, `P·V` accumulated in f32, divided by the f32 row sums, one rounding.
    let e = scores.broadcast_sub(&scores.max_keepdim(3)?)?.exp()?;
    let sum = e.sum_keepdim(3)?;
    let p = e.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let o = p.matmul(&v.to_dtype(DType::F32)?)?.broadcast_div(&sum)?;
    Ok(o.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_definition_and_chunking() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?;
        let out = attention(&q, &k, &v)?;
        // Reference: explicit softmax.
        let s = (q.matmul(&k.t()?)? * 0.5)?;
        let e = s.broadcast_sub(&s.max_keepdim(3)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(3)?)?;
        let r = p.matmul(&v)?;
        let diff = (out - &r)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // The chunked path (groups of 2 heads, then 1) gives the same values.
        let chunked = attention_with_budget(&q, &k, &v, 2 * 5 * 7 * 4)?;
        let diff = (chunked - &r)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // bf16 inputs: same values within bf16 rounding.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let o16 = attention(&bf(&q)?, &bf(&k)?, &bf(&v)?)?;
        assert_eq!(o16.dtype(), DType::BF16);
        let diff = (o16.to_dtype(DType::F32)? - &r)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 3e-2, "{diff}");
        Ok(())
    }
}
