//! Modulation, normalisations, feed-forward and the double-/single-stream blocks
//! (spec §5.2 steps 2, 5, 6).
//!
//! Dtype rules (spec §1): in bf16 every elementwise op rounds to bf16 — `(1+scale)` is
//! rounded, then `·norm`, then `+shift` — which candle's bf16 binary ops do as well. The ops
//! that torch evaluates internally in f32 with a single final rounding (LayerNorm, the q/k
//! RMSNorm *including its weight*, SiLU, RoPE, the attention softmax) are done the same way.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear_no_bias, Linear, Module, VarBuilder};

use super::attention::attention;
use super::config::Flux2TransformerConfig;
use super::embed::RopeTables;
use crate::profile;

pub use crate::ops::silu;

/// `nn.LayerNorm(dim, elementwise_affine=False)`: statistics and normalisation in f32, one
/// rounding to the input dtype (spec §1). `candle_nn::ops::layer_norm` is that computation
/// (its weight/bias here are the constants 1 and 0, which change nothing).
#[derive(Debug, Clone)]
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl PlainLayerNorm {
    pub fn new(dim: usize, eps: f64, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("dit.layernorm", x.device(), || {
            Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.ones,
                &self.zeros,
                self.eps,
            )?)
        })
    }
}

/// `torch.nn.RMSNorm(head_dim)` on the q/k heads: `x·rsqrt(mean(x²)+eps)·w` evaluated in f32
/// **with the weight applied in f32** and a single rounding (spec §1, unlike Qwen3's RMSNorm).
/// `candle_nn::ops::rms_norm` on f32 inputs is that computation.
#[derive(Debug, Clone)]
pub struct QkRmsNorm {
    weight_f32: Tensor,
    /// The weight in the model dtype, for candle's CUDA kernel (which already computes in
    /// f32 with the weight applied in f32 and rounds once).
    weight: Tensor,
    eps: f32,
}

impl QkRmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(Self {
            weight_f32: weight.to_dtype(DType::F32)?,
            weight,
            eps: eps as f32,
        })
    }

    /// `x` [..., head_dim] (contiguous or not).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("dit.qk_rmsnorm", x.device(), || {
            if x.device().is_cuda() && x.dtype() == self.weight.dtype() {
                return Ok(candle_nn::ops::rms_norm(
                    &x.contiguous()?,
                    &self.weight,
                    self.eps,
                )?);
            }
            let dtype = x.dtype();
            let xf = x.to_dtype(DType::F32)?.contiguous()?;
            Ok(candle_nn::ops::rms_norm(&xf, &self.weight_f32, self.eps)?.to_dtype(dtype)?)
        })
    }
}

/// shift, scale, gate chunks, each `[B, 1, D]` (a view into the modulation output).
#[derive(Debug, Clone)]
pub struct ModParams {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModParams {
    /// `(1 + scale) * x + shift`, each op rounded in the model dtype (spec §1).
    pub fn modulate(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("dit.modulate", x.device(), || {
            #[cfg(feature = "cuda")]
            if crate::cuda::fused::applies(x) {
                return Ok(crate::cuda::fused::modulate(x, &self.scale, &self.shift)?);
            }
            Ok(x.broadcast_mul(&(&self.scale + 1.0)?)?
                .broadcast_add(&self.shift)?)
        })
    }

    /// `modulate(norm(x))`; one fused pass on CUDA (same roundings).
    pub fn norm_modulate(&self, norm: &PlainLayerNorm, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x)
            && x.rank() == 3
            && x.dim(2)? <= crate::cuda::fused::LAYERNORM_MAX_DIM
        {
            return profile::span("dit.layernorm_modulate", x.device(), || {
                Ok(crate::cuda::fused::layernorm_modulate(
                    x,
                    &self.scale,
                    &self.shift,
                    norm.eps,
                )?)
            });
        }
        self.modulate(&norm.forward(x)?)
    }

    /// The gated residual `x + gate * y` (torch rounds the product, then the sum).
    pub fn gated_residual(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        profile::span("dit.residual", x.device(), || {
            #[cfg(feature = "cuda")]
            if crate::cuda::fused::applies(x) && y.dtype() == x.dtype() && x.rank() == 3 {
                return Ok(crate::cuda::fused::gated_residual(x, y, &self.gate)?);
            }
            Ok((x + y.broadcast_mul(&self.gate)?)?)
        })
    }
}

/// diffusers' `Flux2Modulation`: `linear(silu(temb))` → `[B, 3·sets·D]`.
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    sets: usize,
}

impl Modulation {
    pub fn load(vb: VarBuilder, dim: usize, sets: usize) -> Result<Self> {
        Ok(Self {
            linear: linear_no_bias(dim, dim * 3 * sets, vb.pp("linear"))?,
            sets,
        })
    }

    /// Raw modulation vector `[B, 3·sets·D]` (what diffusers' module returns).
    pub fn forward(&self, temb: &Tensor) -> Result<Tensor> {
        Ok(self.linear.forward(&silu(temb)?)?)
    }

    /// `Flux2Modulation.split`: `sets` groups of (shift, scale, gate), each `[B, 1, D]`.
    pub fn split(&self, m: &Tensor) -> Result<Vec<ModParams>> {
        let m = m.unsqueeze(1)?;
        let chunks = m.chunk(3 * self.sets, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|c| ModParams {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// A bias-free projection (profiled as `dit.linear`).
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    profile::span("dit.linear", x.device(), || Ok(l.forward(x)?))
}

/// SwiGLU on a fused `[gate | value]` projection: `silu(u[..., :F]) * u[..., F:]`.
fn swiglu(u: &Tensor) -> Result<Tensor> {
    profile::span("dit.swiglu", u.device(), || {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(u) {
            return Ok(crate::cuda::fused::swiglu(u)?);
        }
        let f = u.dim(D::Minus1)? / 2;
        Ok((silu(&u.narrow(D::Minus1, 0, f)?)? * u.narrow(D::Minus1, f, f)?)?)
    })
}

/// `cat([attn, swiglu(u)], -1)`: the single-stream block's output-projection input (one
/// fused pass on CUDA, bit-identical).
fn attention_and_swiglu(attn: &Tensor, u: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(u) && crate::cuda::fused::applies(attn) {
        return profile::span("dit.swiglu", u.device(), || {
            Ok(crate::cuda::fused::prefixed_swiglu(attn, u)?)
        });
    }
    Ok(Tensor::cat(&[attn, &swiglu(u)?], D::Minus1)?)
}

/// `Flux2FeedForward`: `linear_out(swiglu(linear_in(x)))`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            linear_in: linear_no_bias(dim, 2 * hidden, vb.pp("linear_in"))?,
            linear_out: linear_no_bias(hidden, dim, vb.pp("linear_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = lin(&self.linear_in, x)?;
        lin(&self.linear_out, &swiglu(&u)?)
    }
}

/// `[B, S, H·hd]` → `[B, S, H, hd]`.
fn heads(x: &Tensor, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    Ok(x.reshape((b, s, n_heads, head_dim))?)
}

/// Heads `[B, S, H, hd]` of the columns `[start, start + H·hd)` of a projection `u`
/// `[B, S, W]`: a strided view (no copy) when `W` and `start` are multiples of `hd`, else a
/// copy. The fused CUDA kernels read such views directly.
fn heads_of(u: &Tensor, start: usize, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, s, w) = u.dims3()?;
    if u.is_contiguous() && w.is_multiple_of(head_dim) && start.is_multiple_of(head_dim) {
        Ok(u.reshape((b, s, w / head_dim, head_dim))?
            .narrow(2, start / head_dim, n_heads)?)
    } else {
        heads(&u.narrow(2, start, n_heads * head_dim)?, n_heads, head_dim)
    }
}

/// Joint attention over token segments (text then image in the double-stream blocks, one
/// segment in the single-stream blocks): each segment's raw q/k heads `[B, S_i, H, hd]` get
/// their own RMSNorm, the segments are joined along the tokens, then RoPE and attention;
/// `v` is already joined. Returns `[B, S, H·hd]`.
fn normed_rope_attention(
    q: &[(&Tensor, &QkRmsNorm)],
    k: &[(&Tensor, &QkRmsNorm)],
    v: &Tensor,
    rope: &RopeTables,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(q[0].0)
        && crate::cuda::is_supported(q[0].0, k[0].0, v)
        && q[0].0.dim(3)? % 32 == 0
        && q.iter().chain(k).all(|(x, n)| {
            x.dtype() == DType::BF16 && n.weight.dtype() == DType::BF16 && x.device().is_cuda()
        })
    {
        // One pass per q/k: norm + RoPE straight from the (possibly strided) projections into
        // the joined [B, S, H, hd] layout, then the flash kernel in that layout.
        let dev = v.device();
        let fused = |parts: &[(&Tensor, &QkRmsNorm)]| -> Result<Tensor> {
            let segments: Vec<crate::cuda::fused::NormSegment> = parts
                .iter()
                .map(|(x, n)| crate::cuda::fused::NormSegment {
                    x,
                    weight: &n.weight_f32,
                })
                .collect();
            Ok(crate::cuda::fused::rmsnorm_rope(
                &segments,
                &rope.cos,
                &rope.sin,
                parts[0].1.eps,
            )?)
        };
        let (q, k) = profile::span("dit.qk_norm_rope", dev, || -> Result<_> {
            Ok((fused(q)?, fused(k)?))
        })?;
        return flash_bshd(&q, &k, v);
    }
    let join = |parts: &[(&Tensor, &QkRmsNorm)]| -> Result<Tensor> {
        let normed = parts
            .iter()
            .map(|(x, n)| n.forward(x))
            .collect::<Result<Vec<_>>>()?;
        Ok(match normed.len() {
            1 => normed.into_iter().next().expect("one segment"),
            _ => Tensor::cat(&normed, 1)?,
        })
    };
    rope_attention(&join(q)?, &join(k)?, v, rope)
}

/// The flash kernel on `[B, S, H, hd]` q (roped), k (roped), v, returning `[B, S, H·hd]`.
#[cfg(feature = "cuda")]
fn flash_bshd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, s, h, hd) = q.dims4()?;
    let scale = 1.0 / (hd as f32).sqrt();
    let o = profile::span("dit.attention", q.device(), || {
        crate::cuda::flash_attention_bshd(q, k, v, scale)
    })?;
    Ok(o.reshape((b, s, h * hd))?)
}

/// Joint attention on `[B, S, H, hd]` q/k/v (already normed): RoPE on q and k, attention,
/// back to `[B, S, H·hd]`.
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    let (b, s, h, hd) = q.dims4()?;
    let dev = q.device();
    #[cfg(feature = "cuda")]
    if crate::cuda::fused::applies(q) && crate::cuda::is_supported(q, k, v) {
        // [B, S, H, hd] throughout: fused RoPE, then the flash kernel in that layout.
        let (q, k) = profile::span("dit.rope", dev, || -> Result<_> {
            Ok((
                crate::cuda::fused::rope_bshd(q, &rope.cos, &rope.sin)?,
                crate::cuda::fused::rope_bshd(k, &rope.cos, &rope.sin)?,
            ))
        })?;
        return flash_bshd(&q, &k, v);
    }
    let (q, k, v) = profile::span("dit.rope", dev, || -> Result<_> {
        let q = rope.apply(&q.transpose(1, 2)?)?;
        let k = rope.apply(&k.transpose(1, 2)?)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    })?;
    let o = profile::span("dit.attention", dev, || attention(&q, &k, &v))?; // [B, H, S, hd]
    profile::span("dit.attn_layout", dev, || {
        Ok(o.transpose(1, 2)?.reshape((b, s, h * hd))?)
    })
}

/// `Flux2TransformerBlock` (double stream): separate weights for the image and text tokens,
/// one joint attention over `[txt, img]`.
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: QkRmsNorm,
    norm_k: QkRmsNorm,
    to_out: Linear,
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: QkRmsNorm,
    norm_added_k: QkRmsNorm,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    norm: PlainLayerNorm,
    heads: usize,
    head_dim: usize,
}

impl DoubleStreamBlock {
    pub fn load(
        vb: VarBuilder,
        cfg: &Flux2TransformerConfig,
        norm: PlainLayerNorm,
    ) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            to_q: linear_no_bias(d, d, a.pp("to_q"))?,
            to_k: linear_no_bias(d, d, a.pp("to_k"))?,
            to_v: linear_no_bias(d, d, a.pp("to_v"))?,
            norm_q: QkRmsNorm::load(a.pp("norm_q"), hd, cfg.eps)?,
            norm_k: QkRmsNorm::load(a.pp("norm_k"), hd, cfg.eps)?,
            to_out: linear_no_bias(d, d, a.pp("to_out").pp("0"))?,
            add_q_proj: linear_no_bias(d, d, a.pp("add_q_proj"))?,
            add_k_proj: linear_no_bias(d, d, a.pp("add_k_proj"))?,
            add_v_proj: linear_no_bias(d, d, a.pp("add_v_proj"))?,
            norm_added_q: QkRmsNorm::load(a.pp("norm_added_q"), hd, cfg.eps)?,
            norm_added_k: QkRmsNorm::load(a.pp("norm_added_k"), hd, cfg.eps)?,
            to_add_out: linear_no_bias(d, d, a.pp("to_add_out"))?,
            ff: FeedForward::load(vb.pp("ff"), d, cfg.mlp_hidden_dim())?,
            ff_context: FeedForward::load(vb.pp("ff_context"), d, cfg.mlp_hidden_dim())?,
            norm,
            heads: cfg.num_attention_heads,
            head_dim: hd,
        })
    }

    /// `img` [B, N, D], `txt` [B, L, D]; `mod_img`/`mod_txt`: the (attention, MLP) parameter
    /// sets; `rope`: the joint `[txt, img]` table. Returns `(txt, img)`.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mod_img: &[ModParams],
        mod_txt: &[ModParams],
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor)> {
        let (hh, hd) = (self.heads, self.head_dim);
        let l = txt.dim(1)?;
        let n = img.dim(1)?;

        let ni = mod_img[0].norm_modulate(&self.norm, img)?;
        let nc = mod_txt[0].norm_modulate(&self.norm, txt)?;

        let q = heads(&lin(&self.to_q, &ni)?, hh, hd)?;
        let k = heads(&lin(&self.to_k, &ni)?, hh, hd)?;
        let v = heads(&lin(&self.to_v, &ni)?, hh, hd)?;
        let qc = heads(&lin(&self.add_q_proj, &nc)?, hh, hd)?;
        let kc = heads(&lin(&self.add_k_proj, &nc)?, hh, hd)?;
        let vc = heads(&lin(&self.add_v_proj, &nc)?, hh, hd)?;

        // Text tokens first (spec §5.2 step 5), each stream with its own q/k norms.
        let o = normed_rope_attention(
            &[(&qc, &self.norm_added_q), (&q, &self.norm_q)],
            &[(&kc, &self.norm_added_k), (&k, &self.norm_k)],
            &Tensor::cat(&[&vc, &v], 1)?,
            rope,
        )?;
        let attn_txt = lin(&self.to_add_out, &o.narrow(1, 0, l)?)?;
        let attn_img = lin(&self.to_out, &o.narrow(1, l, n)?)?;

        let img = mod_img[0].gated_residual(img, &attn_img)?;
        let ff = self
            .ff
            .forward(&mod_img[1].norm_modulate(&self.norm, &img)?)?;
        let img = mod_img[1].gated_residual(&img, &ff)?;

        let txt = mod_txt[0].gated_residual(txt, &attn_txt)?;
        let ff = self
            .ff_context
            .forward(&mod_txt[1].norm_modulate(&self.norm, &txt)?)?;
        let txt = mod_txt[1].gated_residual(&txt, &ff)?;
        Ok((txt, img))
    }
}

/// `Flux2SingleTransformerBlock`: one fused projection for q, k, v and the MLP input, one
/// fused output projection for the attention and MLP outputs (a "parallel" block).
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    to_qkv_mlp_proj: Linear,
    norm_q: QkRmsNorm,
    norm_k: QkRmsNorm,
    to_out: Linear,
    norm: PlainLayerNorm,
    heads: usize,
    head_dim: usize,
    mlp_hidden: usize,
}

impl SingleStreamBlock {
    pub fn load(
        vb: VarBuilder,
        cfg: &Flux2TransformerConfig,
        norm: PlainLayerNorm,
    ) -> Result<Self> {
        let d = cfg.inner_dim();
        let f = cfg.mlp_hidden_dim();
        let hd = cfg.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            to_qkv_mlp_proj: linear_no_bias(d, 3 * d + 2 * f, a.pp("to_qkv_mlp_proj"))?,
            norm_q: QkRmsNorm::load(a.pp("norm_q"), hd, cfg.eps)?,
            norm_k: QkRmsNorm::load(a.pp("norm_k"), hd, cfg.eps)?,
            to_out: linear_no_bias(d + f, d, a.pp("to_out"))?,
            norm,
            heads: cfg.num_attention_heads,
            head_dim: hd,
            mlp_hidden: f,
        })
    }

    /// `z` [B, L+N, D] (text then image tokens), one parameter set, joint RoPE table.
    pub fn forward(&self, z: &Tensor, m: &ModParams, rope: &RopeTables) -> Result<Tensor> {
        let (hh, hd, f) = (self.heads, self.head_dim, self.mlp_hidden);
        let d = hh * hd;
        let n = m.norm_modulate(&self.norm, z)?;
        let u = lin(&self.to_qkv_mlp_proj, &n)?;
        let q = heads_of(&u, 0, hh, hd)?;
        let k = heads_of(&u, d, hh, hd)?;
        let v = heads_of(&u, 2 * d, hh, hd)?;
        let o = normed_rope_attention(&[(&q, &self.norm_q)], &[(&k, &self.norm_k)], &v, rope)?;
        let mlp_in = u.narrow(2, 3 * d, 2 * f)?;
        let out = lin(&self.to_out, &attention_and_swiglu(&o, &mlp_in)?)?;
        m.gated_residual(z, &out).context("single-stream residual")
    }
}
