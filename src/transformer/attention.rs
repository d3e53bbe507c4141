//! diffusers' `Flux2Attention` (double-stream: image projections plus the `add_*` text
//! projections) and `Flux2ParallelSelfAttention` (single-stream: one fused projection for
//! q, k, v and the MLP input), spec §5.2 steps 5 and 6. The attention itself is
//! [`ops::joint_attention::qk_norm_rope_attention`].
//!
//! KV-cache checkpoints (spec-wave2 §3): the `forward` methods take the cached reference K/V
//! of their block ([`JoinedKv`]); the `forward_reference` methods run the reference tokens
//! alone (they see only each other) and return their post-RoPE K/V.

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::Flux2TransformerConfig;
use super::embed::RopeTables;
use crate::ops::{self, joint_attention::JoinedKv, norm::QkRmsNorm, Linear};

/// A bias-free projection of a block, profiled as `dit.linear`.
fn projection(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::load_no_bias(in_dim, out_dim, vb)?.profiled("dit.linear"))
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

/// `Flux2Attention` at `transformer_blocks.N.attn`.
#[derive(Debug, Clone)]
pub struct Flux2Attention {
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
    heads: usize,
    head_dim: usize,
}

impl Flux2Attention {
    pub fn load(vb: VarBuilder, cfg: &Flux2TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        Ok(Self {
            to_q: projection(d, d, vb.pp("to_q"))?,
            to_k: projection(d, d, vb.pp("to_k"))?,
            to_v: projection(d, d, vb.pp("to_v"))?,
            norm_q: QkRmsNorm::load(vb.pp("norm_q"), hd, cfg.eps)?,
            norm_k: QkRmsNorm::load(vb.pp("norm_k"), hd, cfg.eps)?,
            to_out: projection(d, d, vb.pp("to_out").pp("0"))?,
            add_q_proj: projection(d, d, vb.pp("add_q_proj"))?,
            add_k_proj: projection(d, d, vb.pp("add_k_proj"))?,
            add_v_proj: projection(d, d, vb.pp("add_v_proj"))?,
            norm_added_q: QkRmsNorm::load(vb.pp("norm_added_q"), hd, cfg.eps)?,
            norm_added_k: QkRmsNorm::load(vb.pp("norm_added_k"), hd, cfg.eps)?,
            to_add_out: projection(d, d, vb.pp("to_add_out"))?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
        })
    }

    /// Joint attention of the normed, modulated image tokens `img` `[B, N, D]` and text tokens
    /// `txt` `[B, L, D]` over `[txt, img]` (and the cached reference K/V `refs`, joined after
    /// the text). Returns the projected `(txt, img)` outputs.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        rope: &RopeTables,
        refs: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let (hh, hd) = (self.heads, self.head_dim);
        let (l, n) = (txt.dim(1)?, img.dim(1)?);
        let q = heads(&self.to_q.forward(img)?, hh, hd)?;
        let k = heads(&self.to_k.forward(img)?, hh, hd)?;
        let v = heads(&self.to_v.forward(img)?, hh, hd)?;
        let qc = heads(&self.add_q_proj.forward(txt)?, hh, hd)?;
        let kc = heads(&self.add_k_proj.forward(txt)?, hh, hd)?;
        let vc = heads(&self.add_v_proj.forward(txt)?, hh, hd)?;
        // Text tokens first (spec §5.2 step 5), each stream with its own q/k norms.
        let o = ops::joint_attention::qk_norm_rope_attention(
            &[(&qc, &self.norm_added_q), (&q, &self.norm_q)],
            &[(&kc, &self.norm_added_k), (&k, &self.norm_k)],
            &Tensor::cat(&[&vc, &v], 1)?,
            &rope.cos,
            &rope.sin,
            refs.map(|(k, v)| JoinedKv { k, v, after: l }),
        )?;
        let txt_out = self.to_add_out.forward(&o.narrow(1, 0, l)?)?;
        let img_out = self.to_out.forward(&o.narrow(1, l, n)?)?;
        Ok((txt_out, img_out))
    }

    /// The reference tokens' attention: `refs` `[B, R, D]` (normed, modulated image-stream
    /// tokens) among themselves, with the image projections and their own RoPE table. Returns
    /// (projected output, post-RoPE K, V `[B, R, H, hd]`).
    pub fn forward_reference(
        &self,
        refs: &Tensor,
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (hh, hd) = (self.heads, self.head_dim);
        let q = heads(&self.to_q.forward(refs)?, hh, hd)?;
        let k = heads(&self.to_k.forward(refs)?, hh, hd)?;
        let v = heads(&self.to_v.forward(refs)?, hh, hd)?;
        let (o, k, v) = ops::joint_attention::qk_norm_rope_attention_keeping_kv(
            &[(&q, &self.norm_q)],
            &[(&k, &self.norm_k)],
            &v,
            &rope.cos,
            &rope.sin,
        )?;
        Ok((self.to_out.forward(&o)?, k, v))
    }
}

/// `Flux2ParallelSelfAttention` at `single_transformer_blocks.N.attn`: the attention and the
/// SwiGLU MLP side by side on one input projection, one output projection over both.
#[derive(Debug, Clone)]
pub struct Flux2ParallelSelfAttention {
    to_qkv_mlp_proj: Linear,
    norm_q: QkRmsNorm,
    norm_k: QkRmsNorm,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    mlp_hidden: usize,
}

impl Flux2ParallelSelfAttention {
    pub fn load(vb: VarBuilder, cfg: &Flux2TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let f = cfg.mlp_hidden_dim();
        let hd = cfg.attention_head_dim;
        Ok(Self {
            to_qkv_mlp_proj: projection(d, 3 * d + 2 * f, vb.pp("to_qkv_mlp_proj"))?,
            norm_q: QkRmsNorm::load(vb.pp("norm_q"), hd, cfg.eps)?,
            norm_k: QkRmsNorm::load(vb.pp("norm_k"), hd, cfg.eps)?,
            to_out: projection(d + f, d, vb.pp("to_out"))?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
            mlp_hidden: f,
        })
    }

    /// `x` `[B, L+N, D]` (normed, modulated; text then image tokens) → `[B, L+N, D]`; the
    /// cached reference K/V `refs` are joined after the first `text_len` keys.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        refs: Option<(&Tensor, &Tensor)>,
        text_len: usize,
    ) -> Result<Tensor> {
        let joined = refs.map(|(k, v)| JoinedKv {
            k,
            v,
            after: text_len,
        });
        Ok(self.attend(x, rope, joined, false)?.0)
    }

    /// The reference tokens `x` `[B, R, D]` (normed, modulated) among themselves with their
    /// own RoPE table. Returns (output `[B, R, D]`, post-RoPE K, V `[B, R, H, hd]`).
    pub fn forward_reference(
        &self,
        x: &Tensor,
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (out, kv) = self.attend(x, rope, None, true)?;
        let (k, v) = kv.expect("keep_kv returns the K/V");
        Ok((out, k, v))
    }

    /// The projection, attention and output projection; with `keep_kv` also the post-RoPE K
    /// and V.
    fn attend(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        joined: Option<JoinedKv>,
        keep_kv: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (hh, hd, f) = (self.heads, self.head_dim, self.mlp_hidden);
        let d = hh * hd;
        let u = self.to_qkv_mlp_proj.forward(x)?;
        let q = heads_of(&u, 0, hh, hd)?;
        let k = heads_of(&u, d, hh, hd)?;
        let v = heads_of(&u, 2 * d, hh, hd)?;
        let (qs, ks) = ([(&q, &self.norm_q)], [(&k, &self.norm_k)]);
        let (o, kv) = if keep_kv {
            let (o, k, v) = ops::joint_attention::qk_norm_rope_attention_keeping_kv(
                &qs, &ks, &v, &rope.cos, &rope.sin,
            )?;
            (o, Some((k, v)))
        } else {
            let o = ops::joint_attention::qk_norm_rope_attention(
                &qs, &ks, &v, &rope.cos, &rope.sin, joined,
            )?;
            (o, None)
        };
        let mlp_in = u.narrow(2, 3 * d, 2 * f)?;
        let out = self
            .to_out
            .forward(&ops::mlp::swiglu_beside(&o, &mlp_in)?)?;
        Ok((out, kv))
    }
}
