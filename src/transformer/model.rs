//! `Flux2Transformer2DModel` (spec §5.2): embeddings, 5 double-stream blocks, 20
//! single-stream blocks, adaptive output norm and projection (klein 4B numbers).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{DoubleStreamBlock, SingleStreamBlock};
use super::config::Flux2TransformerConfig;
use super::embed::{RopeTables, TimestepGuidanceEmbeddings};
use super::kv_cache::ReferenceKv;
use super::modulation::{AdaLayerNormContinuous, Modulation};
use crate::ops::{norm::LayerNorm, Linear};

/// Named intermediate activations of one forward pass, in computation order, under the
/// names the refcheck cases record after `step.0.cond.blk.` (e.g. `double.0.img`).
pub type Trace = Vec<(String, Tensor)>;

/// The inputs of one transformer call (spec §5.2).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// `[B, N, in_channels]` in the model dtype: the packed latents, then any reference tokens.
    pub hidden_states: &'a Tensor,
    /// `[B, L, joint_attention_dim]` in the model dtype: the prompt embedding.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B]` = t/1000 (the pipeline's value; cast to the model dtype and ×1000 inside, in that
    /// dtype, spec §1).
    pub timestep: &'a Tensor,
    /// `[B]`: only used by checkpoints with `guidance_embeds` (ignored otherwise, as diffusers
    /// does).
    pub guidance: Option<&'a Tensor>,
}

/// The FLUX.2 transformer (diffusers `Flux2Transformer2DModel`).
#[derive(Debug, Clone)]
pub struct Flux2Transformer {
    cfg: Flux2TransformerConfig,
    dtype: DType,
    device: Device,
    time_guidance_embed: TimestepGuidanceEmbeddings,
    double_stream_modulation_img: Modulation,
    double_stream_modulation_txt: Modulation,
    single_stream_modulation: Modulation,
    x_embedder: Linear,
    context_embedder: Linear,
    transformer_blocks: Vec<DoubleStreamBlock>,
    single_transformer_blocks: Vec<SingleStreamBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
}

impl Flux2Transformer {
    /// Builds the model from a `VarBuilder` over diffusers-named weights
    /// (`transformer_blocks.{i}.attn.to_q.weight`, …). The model computes in `vb.dtype()`.
    pub fn load(vb: VarBuilder, cfg: &Flux2TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.inner_dim();
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let norm = LayerNorm::new(d, cfg.eps, dtype, &device)?;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                DoubleStreamBlock::load(vb.pp("transformer_blocks").pp(i), cfg, norm.clone())
                    .with_context(|| format!("loading transformer_blocks.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let single_transformer_blocks = (0..cfg.num_single_layers)
            .map(|i| {
                SingleStreamBlock::load(vb.pp("single_transformer_blocks").pp(i), cfg, norm.clone())
                    .with_context(|| format!("loading single_transformer_blocks.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            time_guidance_embed: TimestepGuidanceEmbeddings::load(
                vb.pp("time_guidance_embed"),
                cfg.timestep_guidance_channels,
                d,
                cfg.guidance_embeds,
            )
            .context("loading time_guidance_embed")?,
            double_stream_modulation_img: Modulation::load(
                vb.pp("double_stream_modulation_img"),
                d,
                2,
            )?,
            double_stream_modulation_txt: Modulation::load(
                vb.pp("double_stream_modulation_txt"),
                d,
                2,
            )?,
            single_stream_modulation: Modulation::load(vb.pp("single_stream_modulation"), d, 1)?,
            x_embedder: Linear::load_no_bias(cfg.in_channels, d, vb.pp("x_embedder"))?,
            context_embedder: Linear::load_no_bias(
                cfg.joint_attention_dim,
                d,
                vb.pp("context_embedder"),
            )?,
            transformer_blocks,
            single_transformer_blocks,
            norm_out: AdaLayerNormContinuous::load(vb.pp("norm_out"), d, norm)?,
            proj_out: Linear::load_no_bias(
                d,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                vb.pp("proj_out"),
            )?,
            cfg: cfg.clone(),
            dtype,
            device,
        })
    }

    /// Loads `diffusion_pytorch_model.safetensors` (or its shards) in `dtype` on `device`.
    pub fn load_safetensors(
        paths: &[impl AsRef<std::path::Path>],
        cfg: &Flux2TransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load(crate::model_dir::var_builder(paths, dtype, device)?, cfg)
            .context("loading the transformer weights")
    }

    pub fn config(&self) -> &Flux2TransformerConfig {
        &self.cfg
    }

    /// The dtype the model computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The joint `[txt, img]` RoPE tables. Like diffusers, only batch element 0 of 3-D ids is
    /// used. Compute once per generation: the ids do not change across denoising steps.
    pub fn rope(&self, img_ids: &Tensor, txt_ids: &Tensor) -> Result<RopeTables> {
        let img = self.rope_of(img_ids, "img_ids")?;
        let txt = self.rope_of(txt_ids, "txt_ids")?;
        RopeTables::concat(&txt, &img)
    }

    /// The RoPE table of one id sequence `[B, S, 4]` (batch element 0) or `[S, 4]`.
    fn rope_of(&self, ids: &Tensor, what: &str) -> Result<RopeTables> {
        let ids = match ids.rank() {
            3 => ids.get(0)?,
            2 => ids.clone(),
            _ => bail!("{what} must be [B, S, 4] or [S, 4], got {:?}", ids.dims()),
        };
        let (axes, theta) = (&self.cfg.axes_dims_rope, self.cfg.rope_theta);
        RopeTables::from_ids(&ids, axes, theta).with_context(|| format!("RoPE tables for {what}"))
    }

    /// The reference pass of a KV-cache checkpoint (spec-wave2 §3, diffusers'
    /// `kv_cache_mode="extract"` restricted to the reference rows): the packed reference
    /// tokens `[1, R, in_channels]` (model dtype) with their ids `[R, 4]` through every block,
    /// modulated with the embedding of timestep 0 (`ref_fixed_timestep`), attending only to
    /// each other, recording each block's post-RoPE K/V. Nothing here depends on the prompt,
    /// the noise or the step ([`ReferenceKv`]).
    pub fn reference_kv(&self, tokens: &Tensor, ids: &Tensor) -> Result<ReferenceKv> {
        let (b, r, c) = tokens
            .dims3()
            .context("reference tokens must be [B, R, in_channels]")?;
        if c != self.cfg.in_channels || tokens.dtype() != self.dtype || r == 0 {
            bail!(
                "reference tokens are {:?} {:?}; the model expects [B, R > 0, {}] in {:?}",
                tokens.dims(),
                tokens.dtype(),
                self.cfg.in_channels,
                self.dtype
            );
        }
        let rope = self.rope_of(ids, "reference ids")?;
        if rope.len() != r {
            bail!("{} reference ids for {r} reference tokens", rope.len());
        }
        // diffusers: `torch.full_like(timestep, ref_fixed_timestep * 1000)` in the model
        // dtype, no guidance.
        let t0 = Tensor::zeros(b, self.dtype, &self.device)?;
        let temb = self.time_guidance_embed.forward(&t0, None)?;
        let mod_img = self
            .double_stream_modulation_img
            .split(&self.double_stream_modulation_img.forward(&temb)?)?;
        let mod_single = self
            .single_stream_modulation
            .split(&self.single_stream_modulation.forward(&temb)?)?;
        let mut x = self.x_embedder.forward(tokens)?;
        let mut double = Vec::with_capacity(self.transformer_blocks.len());
        for (j, block) in self.transformer_blocks.iter().enumerate() {
            let (next, k, v) = block
                .forward_reference(&x, &mod_img, &rope)
                .with_context(|| format!("transformer_blocks.{j} (references)"))?;
            double.push((k, v));
            x = next;
        }
        let mut single = Vec::with_capacity(self.single_transformer_blocks.len());
        for (j, block) in self.single_transformer_blocks.iter().enumerate() {
            let (next, k, v) = block
                .forward_reference(&x, &mod_single[0], &rope)
                .with_context(|| format!("single_transformer_blocks.{j} (references)"))?;
            single.push((k, v));
            x = next;
        }
        ReferenceKv::new(double, single)
    }

    /// One transformer call (spec §5.2) with the joint RoPE tables of [`Self::rope`].
    ///
    /// Returns `[B, N, out_channels]` in the model dtype. With `trace`, also records the named
    /// intermediates the refcheck cases record (`time_guidance_embed`,
    /// `double_stream_modulation_img`, …, `pos_embed.img.cos`, `double.{j}.txt`,
    /// `double.{j}.img`, `single.{j}`, `norm_out`).
    pub fn forward(
        &self,
        inputs: &Inputs,
        rope: &RopeTables,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        self.forward_with_references(inputs, rope, None, trace)
    }

    /// [`Self::forward`] of a KV-cache checkpoint (diffusers' `kv_cache_mode="cached"`, and
    /// the text and image rows of step 0's `"extract"`): every block's queries also see the
    /// cached reference K/V of [`Self::reference_kv`], joined after the text keys. The
    /// input holds no reference tokens. `refs = None` is the plain forward.
    pub fn forward_with_references(
        &self,
        inputs: &Inputs,
        rope: &RopeTables,
        refs: Option<&ReferenceKv>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        if let Some(refs) = refs {
            let blocks = (
                self.transformer_blocks.len(),
                self.single_transformer_blocks.len(),
            );
            if (refs.num_double(), refs.num_single()) != blocks {
                bail!(
                    "the reference K/V cover {} + {} blocks but the model has {} + {}",
                    refs.num_double(),
                    refs.num_single(),
                    blocks.0,
                    blocks.1
                );
            }
        }
        let Inputs {
            hidden_states,
            encoder_hidden_states,
            timestep,
            guidance,
        } = *inputs;
        self.check_inputs(hidden_states, encoder_hidden_states, timestep)?;
        let n = hidden_states.dim(1)?;
        let l = encoder_hidden_states.dim(1)?;
        if rope.len() != l + n {
            bail!(
                "RoPE tables cover {} tokens but txt + img = {l} + {n}",
                rope.len()
            );
        }
        // diffusers' `pos_embed(img_ids)` / `pos_embed(txt_ids)`: the two halves of the table.
        if let Some(tr) = trace.as_deref_mut() {
            for (name, start, len) in [("img", l, n), ("txt", 0, l)] {
                let part = RopeTables {
                    cos: rope.cos.narrow(0, start, len)?,
                    sin: rope.sin.narrow(0, start, len)?,
                };
                let (cos, sin) = part.interleaved()?;
                tr.push((format!("pos_embed.{name}.cos"), cos));
                tr.push((format!("pos_embed.{name}.sin"), sin));
            }
        }
        let mut record = |name: &str, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name.to_string(), t.clone()));
            }
        };

        // 1. Timestep (and guidance) embedding: `t.to(dtype) * 1000` in the model dtype.
        let t = (timestep.to_dtype(self.dtype)? * 1000.0)?;
        let g = match guidance {
            Some(g) => Some((g.to_dtype(self.dtype)? * 1000.0)?),
            None => None,
        };
        let temb = self.time_guidance_embed.forward(&t, g.as_ref())?;
        record("time_guidance_embed", &temb);

        // 2. Modulations, shared by all blocks of a kind.
        let m_img = self.double_stream_modulation_img.forward(&temb)?;
        record("double_stream_modulation_img", &m_img);
        let m_txt = self.double_stream_modulation_txt.forward(&temb)?;
        record("double_stream_modulation_txt", &m_txt);
        let m_single = self.single_stream_modulation.forward(&temb)?;
        record("single_stream_modulation", &m_single);
        let mod_img = self.double_stream_modulation_img.split(&m_img)?;
        let mod_txt = self.double_stream_modulation_txt.split(&m_txt)?;
        let mod_single = self.single_stream_modulation.split(&m_single)?;

        // 3. Input projections.
        let mut img = self.x_embedder.forward(hidden_states)?;
        record("x_embedder", &img);
        let mut txt = self.context_embedder.forward(encoder_hidden_states)?;
        record("context_embedder", &txt);

        // 5. Double-stream blocks.
        for (j, block) in self.transformer_blocks.iter().enumerate() {
            let kv = refs.and_then(|r| r.double(j));
            (txt, img) = block
                .forward(&img, &txt, &mod_img, &mod_txt, rope, kv)
                .with_context(|| format!("transformer_blocks.{j}"))?;
            record(&format!("double.{j}.txt"), &txt);
            record(&format!("double.{j}.img"), &img);
        }

        // 6. Single-stream blocks on `[txt, img]`.
        let mut z = Tensor::cat(&[&txt, &img], 1)?;
        for (j, block) in self.single_transformer_blocks.iter().enumerate() {
            let kv = refs.and_then(|r| r.single(j));
            z = block
                .forward(&z, &mod_single[0], rope, kv, l)
                .with_context(|| format!("single_transformer_blocks.{j}"))?;
            record(&format!("single.{j}"), &z);
        }

        // 7. Drop the text tokens, adaptive norm, projection.
        let z = self.norm_out.forward(&z.narrow(1, l, n)?, &temb)?;
        record("norm_out", &z);
        Ok(self.proj_out.forward(&z)?)
    }

    fn check_inputs(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
    ) -> Result<()> {
        let (b, _, c) = hidden_states
            .dims3()
            .context("hidden_states must be [B, N, in_channels]")?;
        let (bc, _, j) = encoder_hidden_states
            .dims3()
            .context("encoder_hidden_states must be [B, L, joint_attention_dim]")?;
        if c != self.cfg.in_channels {
            bail!(
                "hidden_states has {c} channels, the model expects in_channels = {}",
                self.cfg.in_channels
            );
        }
        if j != self.cfg.joint_attention_dim {
            bail!(
                "encoder_hidden_states has {j} channels, the model expects joint_attention_dim = {}",
                self.cfg.joint_attention_dim
            );
        }
        let bt = timestep.dims1().context("timestep must be [B]")?;
        if bc != b || bt != b {
            bail!(
                "batch sizes differ: hidden_states {b}, encoder_hidden_states {bc}, timestep {bt}"
            );
        }
        for (name, t) in [
            ("hidden_states", hidden_states),
            ("encoder_hidden_states", encoder_hidden_states),
        ] {
            if t.dtype() != self.dtype {
                bail!(
                    "{name} is {:?} but the transformer computes in {:?}; cast it with to_dtype first",
                    t.dtype(),
                    self.dtype
                );
            }
        }
        Ok(())
    }
}
