//! The batch scheduler of [`Pipeline::generate_batch`]: which stage runs when, what
//! consecutive requests share, which component is resident, and the timings and events
//! around each stage. The numerics are [`super::stages`].
//!
//! Each component is loaded once per chunk of [`BATCH_CHUNK`] requests and the work goes
//! stage by stage (all prompts, then all references, all denoising, all decodes), so a batch
//! peaks at the memory of a single image: only one large component is resident at a time.
//! With `keep_resident` every component stays loaded and requests run one after another
//! (first image soonest). Either way each image is computed exactly as a single `generate`
//! would compute it (batch size 1 through every model).
//!
//! The requests of a chunk are checked (references, size, steps) before its first model work;
//! front ends check what they can for the whole batch up front (the CLI does).
//!
//! KV-cache checkpoints: the reference K/V of a set of references is computed once and reused
//! by every following request with the same references, across chunks
//! ([`super::reference_kv`]).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::components::{
    with_component, StageTimer, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER,
};
use super::inpaint::{self, PreparedInit};
use super::reference_kv::{same_references, KvReuse};
use super::stages::{self, Conditioning, PromptEmbeds};
use super::MAX_SEQUENCE_LENGTH;
use super::{resolve_size, Cancelled, Event, Generated, Pipeline, Request, Stage, Timings};
use crate::image_io;
use crate::latents;
use crate::model_dir::PipelineKind;
use crate::scheduler::Schedule;

/// Requests per chunk of a batch: bounds the prompt embeddings and latents held between
/// stages (~9 MB per 1024² request in bf16).
pub const BATCH_CHUNK: usize = 16;

/// A request's prepared (capped, centre-cropped) reference images.
type Prepared = Arc<Vec<image::RgbImage>>;

/// (prompt, negative prompt when CFG runs)
pub(super) type PromptKey = (String, Option<String>);

/// One request on its way through the stages.
pub(super) struct Job<'r> {
    request: &'r Request,
    /// Prepared reference images, shared with the requests before it that use the same ones.
    references: Prepared,
    /// The latent grid (height, width) in 2×2 patches.
    grid: (usize, usize),
    steps: usize,
    guidance: f64,
    do_cfg: bool,
    /// After `encode_prompt`.
    prompt_embeds: Option<PromptEmbeds>,
    /// After `prepare_image_latents` (requests with references): tokens and ids.
    image_latents: Option<(Tensor, Tensor)>,
    /// After `denoise`: the packed latents.
    latents: Option<Tensor>,
    /// Inpainting: the prepared init image and mask, and the first schedule index that runs.
    init: Option<(PreparedInit, usize)>,
    /// Inpainting, after `encode_references`: the init image's packed latents.
    init_latents: Option<Tensor>,
    /// `total` sums the time spent on this request (its stages and the loads it triggered).
    pub(super) timings: Timings,
}

/// What consecutive requests of a batch share is computed once: the prompt embeddings
/// (`--count` runs one prompt with several seeds) and the prepared and encoded references
/// (edits of one set of images, recognised by the identity of their shared `Arc`s). Tensors
/// are immutable, so sharing them is exact.
#[derive(Default)]
struct Reuse {
    prompt: Option<(PromptKey, PromptEmbeds)>,
    /// (source images, prepared images)
    prepared: Option<(Vec<Arc<image::DynamicImage>>, Prepared)>,
    /// (prepared images, tokens and ids)
    image_latents: Option<(Prepared, (Tensor, Tensor))>,
    /// Inpainting: (init image, mask, crop margin and references, by identity; tokens and ids
    /// of the init image and the references).
    init_latents: Option<(InitKey, (Tensor, Tensor))>,
    /// KV-cache checkpoints: the K/V of the last set of references.
    reference_kv: KvReuse,
}

/// What an inpainting request's condition tokens depend on, by the identity of its images.
type InitKey = (
    Arc<image::DynamicImage>,
    Option<Arc<image::DynamicImage>>,
    Option<u32>,
    Vec<Arc<image::DynamicImage>>,
);

fn init_key(request: &Request) -> Option<InitKey> {
    let init = request.init.as_ref()?;
    Some((
        init.image.clone(),
        init.mask.as_ref().map(|m| m.image.clone()),
        init.padding_mask_crop,
        request.references.iter().map(|r| r.image.clone()).collect(),
    ))
}

fn same_init(a: &InitKey, b: &InitKey) -> bool {
    let same = |x: &Arc<image::DynamicImage>, y: &Arc<image::DynamicImage>| Arc::ptr_eq(x, y);
    same(&a.0, &b.0)
        && match (&a.1, &b.1) {
            (Some(x), Some(y)) => same(x, y),
            (None, None) => true,
            _ => false,
        }
        && a.2 == b.2
        && a.3.len() == b.3.len()
        && a.3.iter().zip(&b.3).all(|(x, y)| same(x, y))
}

/// One stage's work on one request of a chunk: (events, request index, its job).
type StageFn<'a> = dyn for<'r> FnMut(&mut dyn FnMut(Event), usize, &mut Job<'r>) -> Result<()> + 'a;

/// [`run_chunks`], with a cancellation reported as [`Cancelled`] with the count of images
/// delivered (not inside the "image k of n" context of the stage it stopped).
pub(super) fn run(
    pipeline: &mut Pipeline,
    all: &[Request],
    events: &mut dyn FnMut(Event),
    on_image: &mut dyn FnMut(usize, Generated) -> Result<()>,
) -> Result<()> {
    let mut finished = 0;
    let result = run_chunks(pipeline, all, events, &mut |i, g| {
        on_image(i, g)?;
        finished += 1;
        Ok(())
    });
    match result {
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => Err(Cancelled {
            finished,
            total: all.len(),
            reason: pipeline.options.cancel.reason().unwrap_or(1),
        }
        .into()),
        other => other,
    }
}

fn run_chunks(
    pipeline: &mut Pipeline,
    all: &[Request],
    events: &mut dyn FnMut(Event),
    on_image: &mut dyn FnMut(usize, Generated) -> Result<()>,
) -> Result<()> {
    let requests = all;
    for w in pipeline.pending_warnings.drain(..) {
        events(Event::Warning(w));
    }
    let total = requests.len();
    crate::limits::check_max_area(pipeline.options.max_area)?;
    crate::limits::check_image_count(total)?;
    for (i, request) in requests.iter().enumerate() {
        in_job(super::check_request(request), i, total)?;
    }
    if pipeline.options.check_memory {
        super::memory::check_requests(pipeline, requests)?;
    }
    let cancel = pipeline.options.cancel.clone();
    let resident = pipeline.options.keep_resident;
    let chunk_len = if resident { 1 } else { BATCH_CHUNK };
    let mut reuse = Reuse {
        prompt: pipeline.last_prompt.clone(),
        ..Reuse::default()
    };
    for (c, requests) in requests.chunks(chunk_len).enumerate() {
        let first = c * chunk_len;
        let indices = first..first + requests.len();
        // Planned per chunk, so only this chunk's prepared references are in memory.
        let mut jobs = Vec::with_capacity(requests.len());
        for (i, request) in indices.clone().zip(requests) {
            jobs.push(in_job(
                plan(pipeline, request, &mut reuse, events),
                i,
                total,
            )?);
        }
        // One stage over the chunk's requests, announcing each request to `events`.
        let mut each = |events: &mut dyn FnMut(Event), f: &mut StageFn| -> Result<()> {
            for (i, job) in indices.clone().zip(jobs.iter_mut()) {
                cancel.check()?;
                if total > 1 {
                    events(Event::Job { index: i, total });
                }
                in_job(f(events, i, job), i, total)?;
            }
            Ok(())
        };
        each(events, &mut |ev, _, job| {
            encode_prompt(pipeline, job, &mut reuse, ev)
        })?;
        if !resident {
            pipeline.text_encoder = None;
        }
        each(events, &mut |ev, _, job| {
            encode_references(pipeline, job, &mut reuse, ev)
        })?;
        if !resident {
            pipeline.vae_encoder = None;
        }
        each(events, &mut |ev, i, job| {
            let next = all.get(i + 1);
            denoise(pipeline, job, &mut reuse, next, ev)
        })?;
        if !resident {
            pipeline.transformer = None;
        }
        each(events, &mut |ev, i, job| {
            on_image(i, decode(pipeline, job, ev)?)
        })?;
        if !resident {
            pipeline.vae_decoder = None;
        }
    }
    if let Some(report) = crate::profile::take_report() {
        events(Event::Profile(report));
    }
    Ok(())
}

/// Settings and reference preprocessing (cheap; fails before any model work on bad input).
fn plan<'r>(
    pipeline: &Pipeline,
    request: &'r Request,
    reuse: &mut Reuse,
    events: &mut dyn FnMut(Event),
) -> Result<Job<'r>> {
    let t = Instant::now();
    // Settings (spec §8): CFG only for base checkpoints with guidance > 1.
    let steps = request.steps.unwrap_or_else(|| pipeline.default_steps());
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let guidance = request
        .guidance
        .unwrap_or_else(|| pipeline.default_guidance());
    let do_cfg = pipeline.uses_cfg(guidance);
    // Distilled checkpoints ignore guidance > 1 (diffusers only logs a warning); front ends
    // warn before loading anything, see `cli::generate`.
    let (references, width, height, init) = match &request.init {
        None => {
            let references = prepare_references(request, reuse)?;
            let first = references
                .first()
                .map(|im| (im.width() as usize, im.height() as usize));
            let max_area = pipeline.options.max_area;
            let (width, height) =
                resolve_size(request.width, request.height, first, max_area, &mut |w| {
                    events(Event::Warning(w))
                })?;
            (references, width, height, None)
        }
        Some(init) => {
            if pipeline.kind() == PipelineKind::KleinKv {
                bail!(
                    "inpainting / image-to-image (an init image) needs a Flux2KleinPipeline \
                     checkpoint; {} is a Flux2KleinKVPipeline one, for which diffusers has no \
                     inpainting pipeline — edit with references instead, or use another model",
                    pipeline.model.id
                );
            }
            if request.width.is_some() || request.height.is_some() {
                bail!(
                    "an inpainting / image-to-image request has the init image's size \
                     (floored to 16, as diffusers): width and height cannot be set"
                );
            }
            let t_start = inpaint::t_start(steps, init.strength)?;
            // Its errors name the init image or mask.
            let prepared = inpaint::prepare_init(init)?;
            let references = Arc::new(inpaint::prepare_references(&request.references)?);
            let (w, h) = (prepared.width, prepared.height);
            crate::limits::check_output_size(w, h, pipeline.options.max_area)?;
            (references, w, h, Some((prepared, t_start)))
        }
    };
    let grid = latents::latent_grid(height, width)?;
    Ok(Job {
        request,
        references,
        grid,
        steps,
        guidance,
        do_cfg,
        prompt_embeds: None,
        image_latents: None,
        latents: None,
        init,
        init_latents: None,
        timings: Timings {
            total: t.elapsed(),
            ..Timings::default()
        },
    })
}

/// The request's references capped and centre-cropped; the same (shared) images as the
/// previous request's give the same prepared set without redoing the resize.
fn prepare_references(request: &Request, reuse: &mut Reuse) -> Result<Prepared> {
    if let Some((sources, prepared)) = &reuse.prepared {
        let same = sources.len() == request.references.len()
            && sources
                .iter()
                .zip(&request.references)
                .all(|(a, b)| Arc::ptr_eq(a, &b.image));
        if same {
            return Ok(prepared.clone());
        }
    }
    let mut prepared = Vec::with_capacity(request.references.len());
    for r in &request.references {
        let rgb = image_io::prepare_reference(&r.image)
            .with_context(|| format!("reference image {}", r.name))?;
        prepared.push(rgb);
    }
    let prepared = Arc::new(prepared);
    let sources = request.references.iter().map(|r| r.image.clone()).collect();
    reuse.prepared = Some((sources, prepared.clone()));
    Ok(prepared)
}

/// The prompt (and, for CFG, the negative prompt) through Qwen3.
fn encode_prompt(
    pipeline: &mut Pipeline,
    job: &mut Job,
    reuse: &mut Reuse,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let t_job = Instant::now();
    let request = job.request;
    let negative = job.do_cfg.then_some(request.negative_prompt.as_str());
    let key = (request.prompt.clone(), negative.map(str::to_string));
    if let Some((reused, embeds)) = &reuse.prompt {
        if *reused == key {
            job.prompt_embeds = Some(embeds.clone());
            return Ok(());
        }
    }
    let embeds = with_component(pipeline, TEXT_ENCODER, job, events, |p, te, job, events| {
        let timer = StageTimer::start(events, Stage::EncodePrompt);
        let embeds = stages::encode_prompt(
            &p.tokenizer,
            te,
            &job.request.prompt,
            negative,
            &p.options.text_layers,
        )?;
        if embeds.truncated > 0 {
            events(Event::Warning(format!(
                "the prompt is longer than {MAX_SEQUENCE_LENGTH} tokens: the last {} tokens were dropped",
                embeds.truncated
            )));
        }
        // Stage times are wall times of finished work: on CUDA the encoder's kernels are
        // still queued when the host returns, and without this their tail was billed to the
        // first denoising step (measured: BENCHMARKS.md, 2026-11-26).
        p.options.device.synchronize()?;
        job.timings.text_encode = timer.end(events);
        Ok(embeds)
    })?;
    job.timings.total += t_job.elapsed();
    if pipeline.options.keep_resident {
        pipeline.last_prompt = Some((key.clone(), embeds.clone()));
    }
    reuse.prompt = Some((key, embeds.clone()));
    job.prompt_embeds = Some(embeds);
    Ok(())
}

/// The references through the VAE encoder (nothing to do without references).
fn encode_references(
    pipeline: &mut Pipeline,
    job: &mut Job,
    reuse: &mut Reuse,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    if job.init.is_some() {
        return encode_init(pipeline, job, reuse, events);
    }
    if job.references.is_empty() {
        return Ok(());
    }
    if let Some((images, latents)) = &reuse.image_latents {
        if Arc::ptr_eq(images, &job.references) {
            job.image_latents = Some(latents.clone());
            return Ok(());
        }
    }
    let t_job = Instant::now();
    let latents = with_component(pipeline, VAE_ENCODER, job, events, |p, vae, job, events| {
        let timer = StageTimer::start(events, Stage::EncodeReferences);
        let latents = stages::prepare_image_latents(
            vae,
            &job.references,
            p.options.dtype,
            p.options.vae_tile,
        )?;
        p.options.device.synchronize()?; // the stage's own time, as for the prompt
        job.timings.reference_encode = timer.end(events);
        Ok(latents)
    })?;
    job.timings.total += t_job.elapsed();
    reuse.image_latents = Some((job.references.clone(), latents.clone()));
    job.image_latents = Some(latents);
    Ok(())
}

/// Inpainting: the init image then the references through the VAE encoder (diffusers'
/// `prepare_image_latents([image_latents, *references])`); the init image's tokens are also
/// the latents the blend keeps.
fn encode_init(
    pipeline: &mut Pipeline,
    job: &mut Job,
    reuse: &mut Reuse,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let key = init_key(job.request).context("no init image")?;
    let n = job.grid.0 * job.grid.1;
    if let Some((reused, latents)) = &reuse.init_latents {
        if same_init(reused, &key) {
            job.init_latents = Some(latents.0.narrow(1, 0, n)?);
            job.image_latents = Some(latents.clone());
            return Ok(());
        }
    }
    let t_job = Instant::now();
    let latents = with_component(pipeline, VAE_ENCODER, job, events, |p, vae, job, events| {
        let timer = StageTimer::start(events, Stage::EncodeReferences);
        let (prepared, _) = job.init.as_ref().context("no init image")?;
        let mut images = Vec::with_capacity(1 + job.references.len());
        images.push(prepared.pixels.clone());
        images.extend(job.references.iter().cloned());
        let latents =
            stages::prepare_image_latents(vae, &images, p.options.dtype, p.options.vae_tile)?;
        p.options.device.synchronize()?;
        job.timings.reference_encode = timer.end(events);
        Ok(latents)
    })?;
    job.init_latents = Some(latents.0.narrow(1, 0, n)?);
    reuse.init_latents = Some((key, latents.clone()));
    job.image_latents = Some(latents);
    job.timings.total += t_job.elapsed();
    Ok(())
}

/// Seeded noise, ids and schedule, then the transformer's Euler steps. `next`: the request
/// after this one in the batch, if any (whether cached reference K/V are still needed).
fn denoise(
    pipeline: &mut Pipeline,
    job: &mut Job,
    reuse: &mut Reuse,
    next: Option<&Request>,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let t_job = Instant::now();
    let cancel = pipeline.options.cancel.clone();
    let kv_checkpoint = pipeline.kind() == PipelineKind::KleinKv;
    let (latents, latent_ids) = stages::prepare_latents(
        job.request.seed,
        pipeline.transformer_config.in_channels,
        job.grid,
        pipeline.options.dtype,
        &pipeline.options.device,
    )?;
    let embeds = job.prompt_embeds.take().context("prompt not encoded")?;
    let image_latents = job.image_latents.take();
    let schedule = Schedule::new(
        &pipeline.scheduler_config,
        job.steps,
        job.grid.0 * job.grid.1,
    )?;
    // Inpainting (`get_timesteps`, `prepare_latents`, `prepare_mask_latents`): the schedule
    // from t_start, the init latents noised to its first sigma, and the blend after each step.
    let masked = match &job.init {
        Some((prepared, t_start)) => {
            let init = job.init_latents.take().context("init image not encoded")?;
            let mask = inpaint::mask_tensor(&prepared.mask, init.dtype(), init.device())?;
            Some((init, mask, *t_start))
        }
        None => None,
    };
    let schedule = match &masked {
        Some((_, _, t_start)) => inpaint::truncate_schedule(&schedule, *t_start),
        None => schedule,
    };
    let noise = latents;
    let latents = match &masked {
        Some((init, _, _)) => inpaint::scale_noise(init, &noise, schedule.sigmas[0])?,
        None => noise.clone(),
    };
    // A request with other adapters than the resident transformer's reloads it.
    pipeline.use_adapters(&job.request.adapters);
    let latents = with_component(
        pipeline,
        TRANSFORMER,
        job,
        events,
        |p, transformer, job, events| {
            let cached = match (&image_latents, kv_checkpoint) {
                (Some(latents), true) => Some(reuse.reference_kv.get_or_compute(
                    p,
                    transformer,
                    &job.references,
                    latents,
                    &mut job.timings.reference_kv,
                    events,
                )?),
                _ => None,
            };
            let cond = Conditioning {
                prompt_embeds: &embeds.prompt,
                negative_prompt_embeds: embeds.negative.as_ref(),
                image_latents: match cached {
                    Some(_) => None,
                    None => image_latents.as_ref().map(|(t, ids)| (t, ids)),
                },
                reference_kv: cached.as_deref(),
                guidance: job.guidance,
            };
            let timer = StageTimer::start(events, Stage::Denoise);
            let total = schedule.num_steps();
            let steps = &mut job.timings.steps;
            let last = schedule.num_steps() - 1;
            let latents = stages::denoise_with(
                transformer,
                latents,
                &latent_ids,
                &cond,
                &schedule,
                &mut |i, latents| match &masked {
                    // A safe point: stop between steps when cancelled.
                    _ if cancel.reason().is_some() => cancel.check().map(|()| latents),
                    None => Ok(latents),
                    Some((init, mask, _)) => {
                        // `scale_noise` at the next timestep (the scheduler's step index,
                        // already advanced), except after the last step.
                        let proper = if i < last {
                            inpaint::scale_noise(init, &noise, schedule.sigmas[i + 1])?
                        } else {
                            init.clone()
                        };
                        inpaint::blend(&latents, &proper, mask)
                    }
                },
                &mut |index, elapsed| {
                    steps.push(elapsed);
                    events(Event::Step {
                        index,
                        total,
                        elapsed,
                    });
                },
            )?;
            timer.end(events);
            Ok(latents)
        },
    )?;
    // Freed as soon as no later image needs them.
    if !next.is_some_and(|n| same_references(n, job.request)) {
        reuse.reference_kv.clear();
    }
    if !crate::ops::all_finite(&latents)? {
        bail!(
            "the denoise stage produced NaN or infinite latents — the transformer weights or the \
             dtype may be broken (try --dtype f32), or the guidance is too large"
        );
    }
    job.latents = Some(latents);
    job.timings.total += t_job.elapsed();
    Ok(())
}

/// The VAE decoder on the denoised latents.
fn decode(
    pipeline: &mut Pipeline,
    job: &mut Job,
    events: &mut dyn FnMut(Event),
) -> Result<Generated> {
    let t_job = Instant::now();
    let image = with_component(pipeline, VAE_DECODER, job, events, |p, vae, job, events| {
        let timer = StageTimer::start(events, Stage::Decode);
        let latents = job.latents.take().context("latents not denoised")?;
        let mut image = stages::decode_latents(vae, &latents, job.grid, p.options.vae_tile)?;
        if let Some(overlay) = job.init.as_ref().and_then(|(i, _)| i.overlay.as_ref()) {
            image = inpaint::apply_overlay(overlay, &image);
        }
        job.timings.vae_decode = timer.end(events);
        Ok(image)
    })?;
    job.timings.total += t_job.elapsed();
    // With padding_mask_crop the image is pasted into the init image, whose size it takes.
    let (width, height) = (image.width() as usize, image.height() as usize);
    Ok(Generated {
        image,
        width,
        height,
        steps: job.steps,
        guidance: job.guidance,
        seed: job.request.seed,
        timings: std::mem::take(&mut job.timings),
    })
}

/// In a batch, errors name the image they belong to ("image 3 of 10: …").
fn in_job<T>(result: Result<T>, index: usize, total: usize) -> Result<T> {
    if total > 1 {
        result.with_context(|| format!("image {} of {total}", index + 1))
    } else {
        result
    }
}
