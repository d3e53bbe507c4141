//! FLUX.2's joint attention (spec §5.2 steps 5, 6): per-segment q/k RMSNorm, RoPE and
//! [`attention`], as one op so that on CUDA the norm and RoPE run fused straight from the
//! projections into the flash kernel's `[B, S, H, D]` layout.
//!
//! KV-cache checkpoints (spec-wave2 §3) add keys and values from outside the query sequence:
//! the cached reference tokens' ([`JoinedKv`]), joined to the keys as diffusers joins them.
//! The reference tokens' own attention (they see only each other) is a separate call on their
//! own sequence, so no mask is ever needed.

use candle_core::{Result, Tensor};

use super::attention::{attention, Layout, Mask};
use super::norm::QkRmsNorm;
use super::rope::rope_interleaved;
use crate::profile;

/// Post-RoPE keys and values `[1 or B, R, H, D]` of tokens outside the query sequence (the
/// cached reference tokens of a KV checkpoint), joined to the sequence's keys and values after
/// its first `after` tokens (diffusers' `cat([K_txt, K_ref, K_img])`, with `after` = the text
/// length).
#[derive(Debug, Clone, Copy)]
pub struct JoinedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub after: usize,
}

/// FLUX.2's joint attention over token segments (text then image in the double-stream
/// blocks, one segment in the single-stream blocks): each segment's raw q/k heads
/// `[B, S_i, H, D]` get their own RMSNorm, the segments are joined along the tokens, then RoPE
/// (`cos`/`sin` `[S, D/2]` f32, [`rope_interleaved`]) and attention; `v` `[B, S, H, D]` is
/// already joined. With `joined`, the queries also see those keys and values. Returns
/// `[B, S, H·D]`.
pub fn qk_norm_rope_attention(
    q: &[(&Tensor, &QkRmsNorm)],
    k: &[(&Tensor, &QkRmsNorm)],
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    joined: Option<JoinedKv>,
) -> Result<Tensor> {
    let roped = qk_norm_rope(q, k, v, cos, sin)?;
    attend(&roped, v, joined)
}

/// [`qk_norm_rope_attention`] without joined keys that also returns this sequence's post-RoPE
/// keys and its values, contiguous `[B, S, H, D]` (diffusers' layout of the KV cache): the
/// reference tokens' pass of a KV checkpoint. Returns (output `[B, S, H·D]`, keys, values).
pub fn qk_norm_rope_attention_keeping_kv(
    q: &[(&Tensor, &QkRmsNorm)],
    k: &[(&Tensor, &QkRmsNorm)],
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let roped = qk_norm_rope(q, k, v, cos, sin)?;
    let out = attend(&roped, v, None)?;
    // A copy: `v` may be a view into a wider projection, which must not stay alive.
    let keys = roped.layout.to_bshd(&roped.k)?.contiguous()?;
    Ok((out, keys, v.contiguous()?))
}

/// Normed and roped q and k in the layout the attention will run in.
struct Roped {
    q: Tensor,
    k: Tensor,
    /// [`Layout::Bshd`] on the fused CUDA paths, [`Layout::Bhsd`] (contiguous) otherwise.
    layout: Layout,
}

fn qk_norm_rope(
    q: &[(&Tensor, &QkRmsNorm)],
    k: &[(&Tensor, &QkRmsNorm)],
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Roped> {
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
        return Ok(Roped {
            q,
            k,
            layout: Layout::Bshd,
        });
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
    let (q, k) = (join(q)?, join(k)?);
    let dev = q.device();
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(&q) && crate::cuda::is_supported(&q, &k, v, &unmasked_bshd(&q)?)
    {
        // [B, S, H, D] throughout: fused RoPE, then the flash kernel in that layout.
        let (q, k) = profile::span("dit.rope", dev, || -> Result<_> {
            Ok((
                crate::cuda::fused::rope_bshd(&q, cos, sin)?,
                crate::cuda::fused::rope_bshd(&k, cos, sin)?,
            ))
        })?;
        return Ok(Roped {
            q,
            k,
            layout: Layout::Bshd,
        });
    }
    #[cfg(not(feature = "cuda"))]
    let _ = v; // only the CUDA paths check the values' shape
    let (q, k) = profile::span("dit.rope", dev, || -> Result<_> {
        Ok((
            rope_interleaved(&q.transpose(1, 2)?, cos, sin)?,
            rope_interleaved(&k.transpose(1, 2)?, cos, sin)?,
        ))
    })?;
    Ok(Roped {
        q,
        k,
        layout: Layout::Bhsd,
    })
}

/// `x` with `extra` (`[1 or B, R, H, D]`) inserted after its first `after` tokens, in `layout`.
fn insert_tokens(x: &Tensor, extra: &Tensor, after: usize, layout: Layout) -> Result<Tensor> {
    let seq = match layout {
        Layout::Bshd => 1,
        Layout::Bhsd => 2,
    };
    let (b, _, h, d) = extra.dims4()?;
    let batch = x.dim(0)?;
    let extra = if b == batch {
        extra.clone()
    } else {
        extra
            .broadcast_as((batch, extra.dim(1)?, h, d))?
            .contiguous()?
    };
    let extra = layout.from_bshd(&extra)?;
    let len = x.dim(seq)?;
    let parts = [
        x.narrow(seq, 0, after)?,
        extra,
        x.narrow(seq, after, len - after)?,
    ];
    // Contiguous for the kernels (a no-op when the inputs were).
    Tensor::cat(&parts, seq)?.contiguous()
}

/// The attention of roped q/k and `v` `[B, S, H, D]` (plus any joined keys and values),
/// back to `[B, S, H·D]`.
fn attend(roped: &Roped, v: &Tensor, joined: Option<JoinedKv>) -> Result<Tensor> {
    let Roped { q, k, layout } = roped;
    let layout = *layout;
    let dev = q.device();
    let v = match layout {
        Layout::Bshd => v.clone(),
        Layout::Bhsd => profile::span("dit.rope", dev, || v.transpose(1, 2)?.contiguous())?,
    };
    let (k, v) = match joined {
        None => (k.clone(), v),
        Some(j) => profile::span("dit.join_kv", dev, || -> Result<_> {
            Ok((
                insert_tokens(k, j.k, j.after, layout)?,
                insert_tokens(&v, j.v, j.after, layout)?,
            ))
        })?,
    };
    match layout {
        #[cfg(feature = "cuda")]
        Layout::Bshd => flash_bshd(q, &k, &v),
        #[cfg(not(feature = "cuda"))]
        Layout::Bshd => candle_core::bail!("the [B, S, H, D] attention path needs CUDA"),
        Layout::Bhsd => {
            let (b, h, s, hd) = q.dims4()?;
            let o = profile::span("dit.attention", dev, || {
                attention(q, &k, &v, Layout::Bhsd, &Mask::None)
            })?; // [B, H, S, D]
            profile::span("dit.attn_layout", dev, || {
                o.transpose(1, 2)?.reshape((b, s, h * hd))
            })
        }
    }
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
