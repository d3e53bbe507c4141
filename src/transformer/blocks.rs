//! The double- and single-stream blocks (spec §5.2 steps 5, 6), nested like their
//! checkpoint keys: `transformer_blocks.N.{attn, ff, ff_context}` and
//! `single_transformer_blocks.N.attn`. The block names are diffusers' (`Flux2TransformerBlock`,
//! `Flux2SingleTransformerBlock`); the struct names keep BFL's `DoubleStreamBlock` /
//! `SingleStreamBlock`, as candle's `models::flux` does.
//!
//! Dtype rules (spec §1): in bf16 every elementwise op rounds to bf16 — `(1+scale)` is
//! rounded, then `·norm`, then `+shift` — which candle's bf16 binary ops do as well. The ops
//! that torch evaluates internally in f32 with a single final rounding (LayerNorm, the q/k
//! RMSNorm *including its weight*, SiLU, RoPE, the attention softmax) are done the same way
//! (`crate::ops`).

use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::{Flux2Attention, Flux2ParallelSelfAttention};
use super::config::Flux2TransformerConfig;
use super::embed::RopeTables;
use super::feed_forward::FeedForward;
use super::modulation::ModParams;
use crate::ops::norm::LayerNorm;

/// `Flux2TransformerBlock` (double stream): separate weights for the image and text tokens,
/// one joint attention over `[txt, img]`.
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    attn: Flux2Attention,
    ff: FeedForward,
    ff_context: FeedForward,
    norm: LayerNorm,
}

impl DoubleStreamBlock {
    pub fn load(vb: VarBuilder, cfg: &Flux2TransformerConfig, norm: LayerNorm) -> Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            attn: Flux2Attention::load(vb.pp("attn"), cfg)?,
            ff: FeedForward::load(vb.pp("ff"), d, cfg.mlp_hidden_dim())?,
            ff_context: FeedForward::load(vb.pp("ff_context"), d, cfg.mlp_hidden_dim())?,
            norm,
        })
    }

    /// `img` [B, N, D], `txt` [B, L, D]; `mod_img`/`mod_txt`: the (attention, MLP) parameter
    /// sets; `rope`: the joint `[txt, img]` table; `refs`: this block's cached reference K/V
    /// (KV checkpoints). Returns `(txt, img)`.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mod_img: &[ModParams],
        mod_txt: &[ModParams],
        rope: &RopeTables,
        refs: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let ni = mod_img[0].norm_modulate(&self.norm, img)?;
        let nc = mod_txt[0].norm_modulate(&self.norm, txt)?;
        let (attn_txt, attn_img) = self.attn.forward(&ni, &nc, rope, refs)?;

        let img = self.image_mlp(&mod_img[0].gated_residual(img, &attn_img)?, mod_img)?;

        let txt = mod_txt[0].gated_residual(txt, &attn_txt)?;
        let ff = self
            .ff_context
            .forward(&mod_txt[1].norm_modulate(&self.norm, &txt)?)?;
        let txt = mod_txt[1].gated_residual(&txt, &ff)?;
        Ok((txt, img))
    }

    /// The reference tokens `refs` [B, R, D] of a KV checkpoint through the image-stream half
    /// of the block, modulated with `mod_ref` (the timestep-0 image-stream parameters), seeing
    /// only each other (`rope`: their own table). Returns (refs, post-RoPE K, V).
    pub fn forward_reference(
        &self,
        refs: &Tensor,
        mod_ref: &[ModParams],
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let nr = mod_ref[0].norm_modulate(&self.norm, refs)?;
        let (attn, k, v) = self.attn.forward_reference(&nr, rope)?;
        let refs = self.image_mlp(&mod_ref[0].gated_residual(refs, &attn)?, mod_ref)?;
        Ok((refs, k, v))
    }

    /// The image stream's MLP half: norm, modulation, feed-forward, gated residual.
    fn image_mlp(&self, img: &Tensor, mod_img: &[ModParams]) -> Result<Tensor> {
        let ff = self
            .ff
            .forward(&mod_img[1].norm_modulate(&self.norm, img)?)?;
        mod_img[1].gated_residual(img, &ff)
    }
}

/// `Flux2SingleTransformerBlock`: norm + modulation, the parallel attention/MLP, gated
/// residual.
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    attn: Flux2ParallelSelfAttention,
    norm: LayerNorm,
}

impl SingleStreamBlock {
    pub fn load(vb: VarBuilder, cfg: &Flux2TransformerConfig, norm: LayerNorm) -> Result<Self> {
        Ok(Self {
            attn: Flux2ParallelSelfAttention::load(vb.pp("attn"), cfg)?,
            norm,
        })
    }

    /// `z` [B, L+N, D] (text then image tokens), one parameter set, joint RoPE table; `refs`:
    /// this block's cached reference K/V, joined after the `text_len` text keys.
    pub fn forward(
        &self,
        z: &Tensor,
        m: &ModParams,
        rope: &RopeTables,
        refs: Option<(&Tensor, &Tensor)>,
        text_len: usize,
    ) -> Result<Tensor> {
        let out = self
            .attn
            .forward(&m.norm_modulate(&self.norm, z)?, rope, refs, text_len)?;
        m.gated_residual(z, &out).context("single-stream residual")
    }

    /// The reference tokens `refs` [B, R, D] of a KV checkpoint, modulated with `m` (the
    /// timestep-0 parameters), seeing only each other. Returns (refs, post-RoPE K, V).
    pub fn forward_reference(
        &self,
        refs: &Tensor,
        m: &ModParams,
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (out, k, v) = self
            .attn
            .forward_reference(&m.norm_modulate(&self.norm, refs)?, rope)?;
        let refs = m
            .gated_residual(refs, &out)
            .context("single-stream residual")?;
        Ok((refs, k, v))
    }
}
