//! The stages of diffusers' `Flux2KleinPipeline.__call__` (diffusers 0.42.1, spec §8) as pure
//! functions of the loaded components and their inputs, named after diffusers' steps. They
//! hold no state, load nothing and emit no events (the batch scheduler in [`super::batch`]
//! does that), so an inpainting or KV-cache pipeline can reuse them as they are.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::image_io;
use crate::latents;
use crate::noise;
use crate::scheduler::{self, Schedule};
use crate::text_encoder::{self, PromptTokenizer, Qwen3TextEncoder};
use crate::transformer::{Flux2Transformer, Inputs, ReferenceKv};
use crate::vae::{self, AutoencoderKLFlux2, TileOptions};

/// The conditioning of one request.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, L, joint_attention_dim]` in the compute dtype.
    pub prompt: Tensor,
    /// The negative prompt's, when classifier-free guidance runs.
    pub negative: Option<Tensor>,
    /// Tokens dropped from the prompt to fit the sequence length.
    pub truncated: usize,
}

/// `encode_prompt`: the prompt, and with CFG the negative prompt, through the chat template,
/// the tokenizer and Qwen3, hidden states `layers` stacked (spec §2). One batch of two when
/// both are encoded, as diffusers does.
pub fn encode_prompt(
    tokenizer: &PromptTokenizer,
    text_encoder: &Qwen3TextEncoder,
    prompt: &str,
    negative_prompt: Option<&str>,
    layers: &[usize],
) -> Result<PromptEmbeds> {
    let mut prompts = vec![prompt];
    prompts.extend(negative_prompt);
    let encoded = text_encoder::encode_prompts(tokenizer, text_encoder, &prompts, layers)?;
    Ok(PromptEmbeds {
        prompt: encoded.embeds.narrow(0, 0, 1)?,
        negative: match negative_prompt {
            Some(_) => Some(encoded.embeds.narrow(0, 1, 1)?),
            None => None,
        },
        truncated: encoded.truncated.first().copied().unwrap_or(0),
    })
}

/// `prepare_image_latents`: each prepared reference through the VAE encoder (the mean,
/// `_encode_vae_image`), patchified, BN-normalised and packed, joined along the tokens in the
/// compute `dtype`; with their ids at T = 10, 20, … (`_prepare_image_ids`). `images` must not
/// be empty. Returns (tokens `[1, ΣN_i, C]`, ids `[ΣN_i, 4]`).
pub fn prepare_image_latents(
    vae: &AutoencoderKLFlux2,
    images: &[image::RgbImage],
    dtype: DType,
    tile: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let device = vae.device();
    let mut tokens = Vec::with_capacity(images.len());
    let mut grids = Vec::with_capacity(images.len());
    for rgb in images {
        let pixels = image_io::rgb_to_tensor(rgb, device)?.to_dtype(vae.dtype())?;
        let mean = match tile {
            Some(tile) => {
                vae.encode_mean_tiled(&pixels, TileOptions::with_default_overlap(tile))?
            }
            None => vae.encode_mean(&pixels)?,
        };
        let z = latents::patchify(&mean)?;
        let z = latents::bn_normalize(
            &z,
            vae.bn_running_mean(),
            vae.bn_running_var(),
            vae.bn_eps(),
        )?;
        let (_, _, rh, rw) = z.dims4()?;
        grids.push((rh, rw));
        tokens.push(latents::pack(&z)?.to_dtype(dtype)?);
    }
    Ok((
        Tensor::cat(&tokens, 1)?,
        latents::reference_ids(&grids, device)?,
    ))
}

/// `prepare_latents`: the seeded noise of torch's CPU generator `[1, C, H/16, W/16]`, packed
/// to `[1, N, C]`, with its ids at T = 0 `[N, 4]`.
pub fn prepare_latents(
    seed: u64,
    channels: usize,
    grid: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (grid_h, grid_w) = grid;
    let noise = noise::randn_tensor(seed, &[1, channels, grid_h, grid_w], dtype, device)?;
    Ok((
        latents::pack(&noise)?,
        latents::image_ids(0, grid_h, grid_w, device)?,
    ))
}

/// The conditioning the denoising loop reads.
pub struct Conditioning<'a> {
    pub prompt_embeds: &'a Tensor,
    /// With CFG: the negative prompt's embeddings.
    pub negative_prompt_embeds: Option<&'a Tensor>,
    /// The packed reference tokens and their ids ([`prepare_image_latents`]), joined to the
    /// image tokens at every step (`Flux2KleinPipeline`).
    pub image_latents: Option<(&'a Tensor, &'a Tensor)>,
    /// KV-cache checkpoints (`Flux2KleinKVPipeline`): the references' K/V
    /// ([`reference_kv`]), joined to the keys at every step; `image_latents` is then `None`.
    pub reference_kv: Option<&'a ReferenceKv>,
    pub guidance: f64,
}

/// The reference pass of `Flux2KleinKVPipeline` (its step-0 `kv_cache_mode="extract"` for the
/// reference rows): the K/V of the packed reference tokens and their ids
/// ([`prepare_image_latents`]) at every block.
pub fn reference_kv(
    transformer: &Flux2Transformer,
    image_latents: (&Tensor, &Tensor),
) -> Result<ReferenceKv> {
    let (tokens, ids) = image_latents;
    transformer.reference_kv(&tokens.to_dtype(transformer.dtype())?, ids)
}

/// The denoising loop: the transformer on `[latents, image_latents]` (or on `latents` with the
/// cached reference K/V) at each timestep of `schedule`, CFG on base checkpoints, one
/// flow-match Euler step (spec §7, §8). `latents` `[1, N, C]` with ids `latent_ids` `[N, 4]`;
/// `on_step(i, wall time)` after each step.
pub fn denoise(
    transformer: &Flux2Transformer,
    latents: Tensor,
    latent_ids: &Tensor,
    cond: &Conditioning,
    schedule: &Schedule,
    on_step: &mut dyn FnMut(usize, Duration),
) -> Result<Tensor> {
    denoise_with(
        transformer,
        latents,
        latent_ids,
        cond,
        schedule,
        &mut |_, latents| Ok(latents),
        on_step,
    )
}

/// [`denoise`] with `after_step(i, latents)` applied to the latents after each Euler step
/// (the inpainting blend, [`super::inpaint::blend`]); `denoise` passes them through.
pub fn denoise_with(
    transformer: &Flux2Transformer,
    latents: Tensor,
    latent_ids: &Tensor,
    cond: &Conditioning,
    schedule: &Schedule,
    after_step: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    on_step: &mut dyn FnMut(usize, Duration),
) -> Result<Tensor> {
    let device = transformer.device().clone();
    let dtype = transformer.dtype();
    if cond.reference_kv.is_some() && cond.image_latents.is_some() {
        anyhow::bail!("references are either joined as tokens or as cached K/V, not both");
    }
    let n_target = latents.dim(1)?;
    let img_ids = match cond.image_latents {
        Some((_, ids)) => Tensor::cat(&[latent_ids, ids], 0)?,
        None => latent_ids.clone(),
    }
    .unsqueeze(0)?;
    let txt_ids = latents::text_ids(cond.prompt_embeds.dim(1)?, &device)?.unsqueeze(0)?;
    let rope = transformer.rope(&img_ids, &txt_ids)?;
    let mut latents = latents;
    for i in 0..schedule.num_steps() {
        let t_step = Instant::now();
        let x_in = match cond.image_latents {
            Some((refs, _)) => Tensor::cat(&[&latents, refs], 1)?,
            None => latents.clone(),
        };
        let timestep = scheduler::model_timestep(schedule.timesteps[i], 1, dtype, &device)?;
        let predict = |embeds: &Tensor| -> Result<Tensor> {
            let inputs = Inputs {
                hidden_states: &x_in,
                encoder_hidden_states: embeds,
                timestep: &timestep,
                guidance: None,
            };
            Ok(transformer
                .forward_with_references(&inputs, &rope, cond.reference_kv, None)?
                .narrow(1, 0, n_target)?)
        };
        let cond_velocity = predict(cond.prompt_embeds)?;
        let velocity = match cond.negative_prompt_embeds {
            Some(neg) => classifier_free_guidance(&cond_velocity, &predict(neg)?, cond.guidance)?,
            None => cond_velocity,
        };
        latents = scheduler::euler_step(
            &latents,
            &velocity,
            schedule.sigmas[i],
            schedule.sigmas[i + 1],
        )?;
        latents = after_step(i, latents)?;
        // Make the step's time real on asynchronous devices before reporting it.
        device.synchronize()?;
        on_step(i, t_step.elapsed());
    }
    Ok(latents)
}

/// `neg + g·(cond − neg)` with torch's rounding: the subtraction and the addition round in the
/// model dtype, and a python-float scale multiplies in f32 then rounds once (torch keeps the
/// scalar in f32 for `mul`).
pub fn classifier_free_guidance(cond: &Tensor, uncond: &Tensor, guidance: f64) -> Result<Tensor> {
    let dtype = cond.dtype();
    let diff = (cond - uncond)?;
    let scaled = (diff.to_dtype(DType::F32)? * guidance)?.to_dtype(dtype)?;
    Ok((uncond + scaled)?)
}

/// `decode_latents` (the end of `__call__`): unpack `[1, N, C]` to the latent grid,
/// BN-denormalise, unpatchify, VAE decoder, uint8 image.
pub fn decode_latents(
    vae: &AutoencoderKLFlux2,
    latents: &Tensor,
    grid: (usize, usize),
    tile: Option<usize>,
) -> Result<image::RgbImage> {
    let z = latents::unpack(&latents.to_dtype(vae.dtype())?, grid.0, grid.1)?;
    let z = latents::bn_denormalize(
        &z,
        vae.bn_running_mean(),
        vae.bn_running_var(),
        vae.bn_eps(),
    )?;
    let z = latents::unpatchify(&z)?;
    let decoded = match tile {
        Some(tile) => vae.decode_tiled(&z, TileOptions::with_default_overlap(tile))?,
        None => vae.decode(&z)?,
    };
    vae::to_rgb8(&decoded)?
        .into_iter()
        .next()
        .context("the VAE decoded no image")
}
