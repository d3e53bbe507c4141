//! Scaled dot-product attention, the single place where a fused (flash) kernel will be
//! swapped in on CUDA later.
//!
//! diffusers calls `F.scaled_dot_product_attention` (no mask, scale 1/√head_dim). On the CPU
//! torch runs its flash-attention kernel for both f32 and bf16: `QKᵀ` accumulated in f32 and
//! scaled in f32, softmax in f32, the probabilities rounded to bf16 (for bf16 inputs) before
//! the `P·V` product, which accumulates in f32 and is rounded to bf16 once. The naive
//! version below follows that: scores and softmax in f32 whatever the input dtype, `P` cast
//! to the input dtype, `P·V` in the input dtype (f32 accumulation inside the GEMM). The only
//! difference for bf16 is that torch rounds the *unnormalised* `exp(s - max)` and divides by
//! the sum at the end, while we round the normalised probabilities (same error size).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Largest f32 score tensor (in bytes) materialised at once; bigger problems are split over
/// (batch, head) groups so that a 1024² edit with references (S ≈ 10k tokens) stays within a
/// few GiB of scratch memory.
const MAX_SCORE_BYTES: usize = 1 << 30;

/// `softmax(q kᵀ / √D) v` for `q`, `k`, `v` of shape `[B, H, S, D]` (q and k contiguous
/// after RoPE; `v` may be any layout the GEMM accepts). Returns `[B, H, S, D]` in `q`'s dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
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
    let probs = candle_nn::ops::softmax_last_dim(&(scores * scale)?)?;
    Ok(probs.to_dtype(dtype)?.matmul(v)?)
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
        Ok(())
    }
}
