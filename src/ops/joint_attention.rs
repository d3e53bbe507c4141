//! FLUX.2's joint attention (spec §5.2 steps 5, 6): per-segment q/k RMSNorm, RoPE and
//! [`attention`], as one op so that on CUDA the norm and RoPE run fused straight from the
//! projections into the flash kernel's `[B, S, H, D]` layout.

use candle_core::{Result, Tensor};

use super::attention::{attention, Layout, Mask};
use super::norm::QkRmsNorm;
use super::rope::rope_interleaved;
use crate::profile;

/// FLUX.2's joint attention over token segments (text then image in the double-stream
/// blocks, one segment in the single-stream blocks): each segment's raw q/k heads
/// `[B, S_i, H, D]` get their own RMSNorm, the segments are joined along the tokens, then RoPE
/// (`cos`/`sin` `[S, D/2]` f32, [`rope_interleaved`]) and attention; `v` `[B, S, H, D]` is
/// already joined. Returns `[B, S, H·D]`.
pub fn qk_norm_rope_attention(
    q: &[(&Tensor, &QkRmsNorm)],
    k: &[(&Tensor, &QkRmsNorm)],
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(q[0].0)
        && q[0].0.dim(3)? % 32 == 0
        && q.iter().chain(k).all(|(x, n)| {
            x.dtype() == candle_core::DType::BF16
                && n.weight.dtype() == candle_core::DType::BF16
                && x.device().is_cuda()
        })
        && crate::cuda::is_supported(q[0].0, k[0].0, v, &unmasked_bshd(q[0].0)?)
    {
        // One pass per q/k: norm + RoPE straight from the (possibly strided) projections into
        // the joined [B, S, H, D] layout, then the flash kernel in that layout.
        let fused = |parts: &[(&Tensor, &QkRmsNorm)]| -> Result<Tensor> {
            let segments: Vec<crate::cuda::fused::NormSegment> = parts
                .iter()
                .map(|(x, n)| crate::cuda::fused::NormSegment {
                    x,
                    weight: &n.weight_f32,
                })
                .collect();
            crate::cuda::fused::rmsnorm_rope(&segments, cos, sin, parts[0].1.eps)
        };
        let (q, k) = profile::span("dit.qk_norm_rope", v.device(), || -> Result<_> {
            Ok((fused(q)?, fused(k)?))
        })?;
        return flash_bshd(&q, &k, v);
    }
    let join = |parts: &[(&Tensor, &QkRmsNorm)]| -> Result<Tensor> {
        let normed = parts
            .iter()
            .map(|(x, n)| n.forward(x))
            .collect::<Result<Vec<_>>>()?;
        match normed.len() {
            1 => Ok(normed.into_iter().next().expect("one segment")),
            _ => Tensor::cat(&normed, 1),
        }
    };
    rope_attention(&join(q)?, &join(k)?, v, cos, sin)
}

/// Unmasked flash parameters for `[B, S, H, D]` operands with `q`'s head dim.
#[cfg(feature = "cuda")]
fn unmasked_bshd(q: &Tensor) -> Result<crate::cuda::FlashParams<'static>> {
    Ok(crate::cuda::FlashParams {
        scale: 1.0 / (q.dim(3)? as f32).sqrt(),
        layout: crate::cuda::AttnLayout::Bshd,
        mask: crate::cuda::AttnMask::None,
    })
}

/// The flash kernel on `[B, S, H, D]` q (roped), k (roped), v, returning `[B, S, H·D]`.
#[cfg(feature = "cuda")]
fn flash_bshd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, s, h, hd) = q.dims4()?;
    let o = profile::span("dit.attention", q.device(), || {
        crate::cuda::flash_attention(q, k, v, &unmasked_bshd(q)?)
    })?;
    o.reshape((b, s, h * hd))
}

/// Joint attention on `[B, S, H, D]` q/k/v (already normed): RoPE on q and k, attention,
/// back to `[B, S, H·D]`.
fn rope_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, s, h, hd) = q.dims4()?;
    let dev = q.device();
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(q) && crate::cuda::is_supported(q, k, v, &unmasked_bshd(q)?) {
        // [B, S, H, D] throughout: fused RoPE, then the flash kernel in that layout.
        let (q, k) = profile::span("dit.rope", dev, || -> Result<_> {
            Ok((
                crate::cuda::fused::rope_bshd(q, cos, sin)?,
                crate::cuda::fused::rope_bshd(k, cos, sin)?,
            ))
        })?;
        return flash_bshd(&q, &k, v);
    }
    let (q, k, v) = profile::span("dit.rope", dev, || -> Result<_> {
        let q = rope_interleaved(&q.transpose(1, 2)?, cos, sin)?;
        let k = rope_interleaved(&k.transpose(1, 2)?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    })?;
    let o = profile::span("dit.attention", dev, || {
        attention(&q, &k, &v, Layout::Bhsd, &Mask::None)
    })?; // [B, H, S, D]
    profile::span("dit.attn_layout", dev, || {
        o.transpose(1, 2)?.reshape((b, s, h * hd))
    })
}
