//! `Pipeline::open` then `generate(Request)`: the whole of diffusers' `Flux2KleinPipeline.__call__`
//! (spec §1, §8), with component lifetimes managed for low peak memory.
//!
//! Order of work for one request (each stage loads its component only when needed, and frees
//! it afterwards unless `keep_resident` is set):
//!
//! 1. references → `image_io::prepare_reference` (size checks, Lanczos cap, centre crop)
//! 2. prompt (+ the empty negative prompt for CFG) → Qwen3 → `prompt_embeds`
//! 3. references → VAE encoder (mean) → patchify → BN normalise → packed tokens, T = 10, 20, …
//! 4. seeded noise (torch's CPU generator) → packed latents; ids; sigmas
//! 5. transformer + Euler steps (CFG on base checkpoints)
//! 6. unpack → BN de-normalise → unpatchify → VAE decoder → uint8 image

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::image_io;
use crate::latents;
use crate::model_dir::ModelDir;
use crate::noise;
use crate::ops::KernelOptions;
use crate::scheduler::{self, Schedule, SchedulerConfig};
use crate::text_encoder::{self, PromptTokenizer, Qwen3Config, Qwen3TextEncoder};
use crate::transformer::{Flux2Transformer, Flux2TransformerConfig};
use crate::vae::{self, AutoencoderKLFlux2, AutoencoderKLFlux2Config, TileOptions, VaeParts};

/// Token length of every prompt (diffusers' `max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device: Device,
    /// Compute dtype of the text encoder and transformer (bf16 on CUDA, f32 on CPU by default).
    pub dtype: DType,
    /// VAE dtype; `None` = `dtype`.
    pub vae_dtype: Option<DType>,
    /// Keep every component resident between requests (batch/bench mode). Off: the text
    /// encoder is freed before the transformer loads, and so on (lowest peak memory).
    pub keep_resident: bool,
    /// Tiled VAE decode/encode (latent tile size in latent pixels); `None` = untiled.
    pub vae_tile: Option<usize>,
    /// Qwen3 hidden states stacked into the prompt embedding (diffusers'
    /// `text_encoder_out_layers`).
    pub text_layers: Vec<usize>,
    /// The kernel switches (process-wide, installed by [`Pipeline::open`]).
    pub kernels: KernelOptions,
    /// Time synchronised regions of the device work and report them as [`Event::Profile`]
    /// after each batch (slows the run down; off by default).
    pub profile: bool,
}

impl PipelineOptions {
    /// Defaults for a device: bf16 on CUDA, f32 on CPU; components freed after use.
    pub fn for_device(device: Device) -> Self {
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        Self {
            device,
            dtype,
            vae_dtype: None,
            keep_resident: false,
            vae_tile: None,
            text_layers: text_encoder::DEFAULT_LAYERS.to_vec(),
            kernels: KernelOptions::default(),
            profile: false,
        }
    }

    /// The VAE's dtype: [`Self::vae_dtype`] if set, else the compute dtype.
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype.unwrap_or(self.dtype)
    }
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// The negative prompt of classifier-free guidance (base checkpoints with guidance > 1
    /// only); diffusers' pipeline always uses "" (the default).
    pub negative_prompt: String,
    /// Reference images in order (T = 10, 20, …).
    pub references: Vec<Reference>,
    /// Output size in pixels; `None` = the first reference's cropped size, else 1024.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `None` = 4 for distilled checkpoints, 50 for base ones.
    pub steps: Option<usize>,
    /// `None` = 1.0 for distilled checkpoints, 4.0 for base ones.
    pub guidance: Option<f64>,
    pub seed: u64,
}

impl Request {
    pub fn new(prompt: impl Into<String>, seed: u64) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            references: Vec::new(),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            seed,
        }
    }
}

/// A reference image with the name it came from (for metadata and messages).
#[derive(Debug, Clone)]
pub struct Reference {
    /// Shared: a batch hands the same references to many requests.
    pub image: std::sync::Arc<image::DynamicImage>,
    pub name: String,
}

/// The stages of a request, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    LoadTextEncoder,
    EncodePrompt,
    LoadVaeEncoder,
    EncodeReferences,
    LoadTransformer,
    Denoise,
    LoadVaeDecoder,
    Decode,
}

impl Stage {
    /// The name progress lines show.
    pub fn name(self) -> &'static str {
        match self {
            Stage::LoadTextEncoder => "load text encoder",
            Stage::EncodePrompt => "encode prompt",
            Stage::LoadVaeEncoder => "load vae encoder",
            Stage::EncodeReferences => "encode references",
            Stage::LoadTransformer => "load transformer",
            Stage::Denoise => "denoise",
            Stage::LoadVaeDecoder => "load vae decoder",
            Stage::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Progress and diagnostics, reported while `generate` runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A stage starts.
    StageStart(Stage),
    /// A stage ended, with its wall time.
    StageEnd(Stage, Duration),
    /// Denoising step `index` (0-based) of `total` finished.
    Step {
        index: usize,
        total: usize,
        elapsed: Duration,
    },
    /// Something the user should know (truncated prompt, floored size, ignored guidance, …).
    Warning(String),
    /// In a batch of `total > 1` requests, the events that follow (until the next `Job`)
    /// belong to request `index` (0-based).
    Job { index: usize, total: usize },
    /// With [`PipelineOptions::profile`]: the table of synchronised region times of the
    /// batch that just ended.
    Profile(String),
}

/// Wall time per stage of one `generate` call.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Loading weights (the components this request loaded, summed).
    pub load: Duration,
    pub text_encode: Duration,
    pub reference_encode: Duration,
    pub steps: Vec<Duration>,
    pub vae_decode: Duration,
    /// Time spent on this request: for a single `generate` its wall time, in a batch the sum
    /// of its stages (batches interleave the stages of several requests).
    pub total: Duration,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generated {
    pub image: image::RgbImage,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub timings: Timings,
}

/// Classifier-free guidance runs on base (non-distilled) checkpoints with guidance > 1 only
/// (spec §8).
pub fn uses_cfg(is_distilled: bool, guidance: f64) -> bool {
    guidance > 1.0 && !is_distilled
}

/// diffusers floors output sizes to multiples of 16 (VAE factor 8 × 2×2 patches, spec §8).
pub fn floor_to_multiple_of_16(px: usize) -> usize {
    px / 16 * 16
}

/// Output size for a request: explicit, else the first reference's cropped size, else 1024²;
/// floored to multiples of 16 as diffusers does (with a warning).
pub fn resolve_size(
    width: Option<usize>,
    height: Option<usize>,
    first_reference: Option<(usize, usize)>,
    warn: &mut dyn FnMut(String),
) -> Result<(usize, usize)> {
    let (dw, dh) = first_reference.unwrap_or((1024, 1024));
    let (w, h) = (width.unwrap_or(dw), height.unwrap_or(dh));
    if w < 64 || h < 64 {
        bail!("output size {w}x{h} is too small: width and height must be at least 64 pixels");
    }
    let (fw, fh) = (floor_to_multiple_of_16(w), floor_to_multiple_of_16(h));
    if (fw, fh) != (w, h) {
        warn(format!(
            "{w}x{h} is not a multiple of 16; the image will be {fw}x{fh} (as diffusers does)"
        ));
    }
    Ok((fw, fh))
}

/// Requests per chunk of a batch (see [`Pipeline::generate_batch`]): bounds the prompt
/// embeddings and latents held between stages (~9 MB per 1024² request in bf16).
pub const BATCH_CHUNK: usize = 16;

/// One request on its way through the stages of [`Pipeline::generate_batch`].
struct Job<'r> {
    request: &'r Request,
    /// Prepared (capped, centre-cropped) reference images, shared with the requests before it
    /// that use the same images.
    references: Prepared,
    width: usize,
    height: usize,
    grid_h: usize,
    grid_w: usize,
    steps: usize,
    guidance: f64,
    do_cfg: bool,
    prompt_embeds: Option<Tensor>,
    negative_embeds: Option<Tensor>,
    /// Packed reference tokens of all references, concatenated.
    reference_tokens: Option<Tensor>,
    reference_ids: Vec<Tensor>,
    /// Denoised packed latents.
    latents: Option<Tensor>,
    /// `total` sums the time spent on this request (its stages and the loads it triggered).
    timings: Timings,
}

/// (prompt, negative prompt when CFG runs)
type PromptKey = (String, Option<String>);

/// A request's prepared (capped, centre-cropped) reference images.
type Prepared = Arc<Vec<image::RgbImage>>;

/// One stage's work on one request of a batch: (events, request index, its job).
type StageFn<'a> = dyn for<'r> FnMut(&mut dyn FnMut(Event), usize, &mut Job<'r>) -> Result<()> + 'a;

/// What consecutive requests of a batch share is computed once: the prompt embeddings
/// (`--count` runs one prompt with several seeds) and the prepared and encoded references
/// (edits of one set of images, recognised by the identity of their shared `Arc`s). Tensors
/// are immutable, so sharing them is exact.
#[derive(Default)]
struct Reuse {
    /// The prompt and (with CFG) the negative prompt, their embeddings.
    prompt: Option<(PromptKey, Tensor, Option<Tensor>)>,
    /// (source images, prepared images)
    prepared: Option<(Vec<Arc<image::DynamicImage>>, Prepared)>,
    /// (prepared images, packed tokens, ids)
    references: Option<(Prepared, Tensor, Vec<Tensor>)>,
}

/// The FLUX.2 [klein] pipeline.
pub struct Pipeline {
    pub model: ModelDir,
    pub options: PipelineOptions,
    scheduler_config: SchedulerConfig,
    transformer_config: Flux2TransformerConfig,
    tokenizer: PromptTokenizer,
    text_encoder: Option<Qwen3TextEncoder>,
    transformer: Option<Flux2Transformer>,
    vae_encoder: Option<AutoencoderKLFlux2>,
    vae_decoder: Option<AutoencoderKLFlux2>,
    /// Warnings of [`Pipeline::open`], not yet delivered.
    pending_warnings: Vec<String>,
}

impl Pipeline {
    /// Resolves configs and the tokenizer and installs the kernel switches; the components
    /// are loaded when a request first needs them. Warnings found here (e.g. CUDA kernels
    /// that cannot run) are delivered as [`Event::Warning`] by the first `generate`.
    pub fn open(model: ModelDir, options: PipelineOptions) -> Result<Self> {
        if options.text_layers.is_empty() {
            bail!("at least one text encoder layer must be requested");
        }
        let scheduler_config: SchedulerConfig = model.config("scheduler")?;
        let transformer_config: Flux2TransformerConfig = model.config("transformer")?;
        let tokenizer = PromptTokenizer::from_file(&model.tokenizer()?, MAX_SEQUENCE_LENGTH)?;
        options.kernels.install();
        crate::profile::set_enabled(options.profile);
        let pending_warnings = crate::ops::prepare_device(
            &options.device,
            transformer_config.attention_head_dim,
            options.dtype,
        );
        Ok(Self {
            model,
            options,
            scheduler_config,
            transformer_config,
            tokenizer,
            text_encoder: None,
            transformer: None,
            vae_encoder: None,
            vae_decoder: None,
            pending_warnings,
        })
    }

    /// The text encoder's attention (see [`Qwen3TextEncoder::attention_kernel`]), or
    /// `not loaded` before the first prompt was encoded (or after `generate` freed it).
    pub fn text_attention_kernel(&self) -> String {
        self.text_encoder
            .as_ref()
            .map_or_else(|| "not loaded".into(), |te| te.attention_kernel())
    }

    /// The attention the transformer runs: the CUDA kernel's name (e.g.
    /// `fa90_fwd_bf16_d128_n128` on a Hopper GPU, `fa_fwd_bf16_d128_w4_m2_n64` elsewhere), or
    /// `naive` (candle ops: the CPU, f32, or our kernels unusable here). Benchmarks record it.
    pub fn attention_kernel(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.options.device {
            let head_dim = self.transformer_config.attention_head_dim;
            if let Some(name) =
                crate::cuda::attention_kernel_name(dev, head_dim, self.options.dtype)
            {
                return name;
            }
        }
        "naive".into()
    }

    /// Distilled checkpoints never run CFG (spec §8).
    pub fn is_distilled(&self) -> bool {
        self.model.index.is_distilled
    }

    /// Whether a request with this guidance runs classifier-free guidance ([`uses_cfg`]).
    pub fn uses_cfg(&self, guidance: f64) -> bool {
        uses_cfg(self.is_distilled(), guidance)
    }

    pub fn default_steps(&self) -> usize {
        if self.is_distilled() {
            4
        } else {
            50
        }
    }

    pub fn default_guidance(&self) -> f64 {
        if self.is_distilled() {
            1.0
        } else {
            4.0
        }
    }

    fn vae_dtype(&self) -> DType {
        self.options.vae_dtype()
    }

    fn var_builder(&self, component: &str, dtype: DType) -> Result<VarBuilder<'static>> {
        let files = self.model.weights(component)?;
        // SAFETY: the weight files are memory-mapped read-only and not modified while mapped.
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &self.options.device) }
            .with_context(|| format!("loading the {component} weights of {}", self.model.id))
    }

    fn load_text_encoder(&self) -> Result<Qwen3TextEncoder> {
        let cfg: Qwen3Config = self.model.config("text_encoder")?;
        let deepest = *self.options.text_layers.iter().max().unwrap_or(&0);
        if deepest > cfg.num_hidden_layers {
            bail!(
                "text layer {deepest} was requested but the text encoder has {} layers",
                cfg.num_hidden_layers
            );
        }
        let vb = self.var_builder("text_encoder", self.options.dtype)?;
        Qwen3TextEncoder::load(vb, &cfg, deepest)
    }

    fn load_transformer(&self) -> Result<Flux2Transformer> {
        let vb = self.var_builder("transformer", self.options.dtype)?;
        Flux2Transformer::load(vb, &self.transformer_config)
    }

    fn load_vae(&self, parts: VaeParts) -> Result<AutoencoderKLFlux2> {
        let cfg: AutoencoderKLFlux2Config = self.model.config("vae")?;
        let vb = self.var_builder("vae", self.vae_dtype())?;
        AutoencoderKLFlux2::load(vb, &cfg, parts)
    }

    /// Runs one request.
    pub fn generate(
        &mut self,
        request: &Request,
        events: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let mut out = None;
        self.generate_batch(std::slice::from_ref(request), events, &mut |_, g| {
            out = Some(g);
            Ok(())
        })?;
        Ok(out.expect("generate_batch delivers every image"))
    }

    /// Runs several requests, handing each image to `on_image(index, image)` as soon as it is
    /// decoded (an error from `on_image` stops the batch).
    ///
    /// Each component is loaded once per chunk of [`BATCH_CHUNK`] requests and the work goes
    /// stage by stage (all prompts, then all references, all denoising, all decodes), so a
    /// batch peaks at the memory of a single image: only one large component is resident at a
    /// time. With `keep_resident` every component stays loaded and requests run one after
    /// another (first image soonest). Either way each image is computed exactly as a single
    /// `generate` would compute it (batch size 1 through every model).
    ///
    /// The requests of a chunk are checked (references, size, steps) before its first model
    /// work; front ends check what they can for the whole batch up front (the CLI does).
    pub fn generate_batch(
        &mut self,
        requests: &[Request],
        events: &mut dyn FnMut(Event),
        on_image: &mut dyn FnMut(usize, Generated) -> Result<()>,
    ) -> Result<()> {
        for w in self.pending_warnings.drain(..) {
            events(Event::Warning(w));
        }
        let total = requests.len();
        let chunk_len = if self.options.keep_resident {
            1
        } else {
            BATCH_CHUNK
        };
        let resident = self.options.keep_resident;
        let mut reuse = Reuse::default();
        for (c, requests) in requests.chunks(chunk_len).enumerate() {
            let first = c * chunk_len;
            let indices = first..first + requests.len();
            // Planned per chunk, so only this chunk's prepared references are in memory.
            let mut jobs = Vec::with_capacity(requests.len());
            for (i, request) in indices.clone().zip(requests) {
                jobs.push(in_job(self.plan(request, &mut reuse, events), i, total)?);
            }
            // One stage over the chunk's requests, announcing each request to `events`.
            let mut each = |events: &mut dyn FnMut(Event), f: &mut StageFn| -> Result<()> {
                for (i, job) in indices.clone().zip(jobs.iter_mut()) {
                    if total > 1 {
                        events(Event::Job { index: i, total });
                    }
                    in_job(f(events, i, job), i, total)?;
                }
                Ok(())
            };
            each(events, &mut |ev, _, job| {
                self.encode_prompt(job, &mut reuse, ev)
            })?;
            if !resident {
                self.text_encoder = None;
            }
            each(events, &mut |ev, _, job| {
                self.encode_references(job, &mut reuse, ev)
            })?;
            if !resident {
                self.vae_encoder = None;
            }
            each(events, &mut |ev, _, job| self.denoise(job, ev))?;
            if !resident {
                self.transformer = None;
            }
            each(events, &mut |ev, i, job| on_image(i, self.decode(job, ev)?))?;
            if !resident {
                self.vae_decoder = None;
            }
        }
        if let Some(report) = crate::profile::take_report() {
            events(Event::Profile(report));
        }
        Ok(())
    }

    /// Settings and reference preprocessing (cheap; fails before any model work on bad input).
    fn plan<'r>(
        &self,
        request: &'r Request,
        reuse: &mut Reuse,
        events: &mut dyn FnMut(Event),
    ) -> Result<Job<'r>> {
        let t = Instant::now();
        // Settings (spec §8): CFG only for base checkpoints with guidance > 1.
        let steps = request.steps.unwrap_or_else(|| self.default_steps());
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        let guidance = request.guidance.unwrap_or_else(|| self.default_guidance());
        let do_cfg = self.uses_cfg(guidance);
        // Distilled checkpoints ignore guidance > 1 (diffusers only logs a warning); front ends
        // warn before loading anything, see `cli::generate`.
        let references = self.prepare_references(request, reuse)?;
        let first = references
            .first()
            .map(|im| (im.width() as usize, im.height() as usize));
        let (width, height) = resolve_size(request.width, request.height, first, &mut |w| {
            events(Event::Warning(w))
        })?;
        let (grid_h, grid_w) = latents::latent_grid(height, width)?;
        let timings = Timings {
            total: t.elapsed(),
            ..Timings::default()
        };
        Ok(Job {
            request,
            references,
            width,
            height,
            grid_h,
            grid_w,
            steps,
            guidance,
            do_cfg,
            prompt_embeds: None,
            negative_embeds: None,
            reference_tokens: None,
            reference_ids: Vec::new(),
            latents: None,
            timings,
        })
    }

    /// The request's references capped and centre-cropped; the same (shared) images as the
    /// previous request's give the same prepared set without redoing the resize.
    fn prepare_references(&self, request: &Request, reuse: &mut Reuse) -> Result<Prepared> {
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

    /// Stage 2: the prompt (and, for CFG, the empty negative prompt) through Qwen3.
    fn encode_prompt(
        &mut self,
        job: &mut Job,
        reuse: &mut Reuse,
        events: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let t_job = Instant::now();
        let key = (
            job.request.prompt.clone(),
            job.do_cfg.then(|| job.request.negative_prompt.clone()),
        );
        if let Some((reused, embeds, negative)) = &reuse.prompt {
            if *reused == key {
                job.prompt_embeds = Some(embeds.clone());
                job.negative_embeds = negative.clone();
                return Ok(());
            }
        }
        if self.text_encoder.is_none() {
            let t = stage(events, Stage::LoadTextEncoder);
            self.text_encoder = Some(self.load_text_encoder()?);
            job.timings.load += end(events, Stage::LoadTextEncoder, t);
        }
        let t = stage(events, Stage::EncodePrompt);
        let mut prompts = vec![job.request.prompt.as_str()];
        if job.do_cfg {
            prompts.push(job.request.negative_prompt.as_str());
        }
        let encoded = text_encoder::encode_prompts(
            &self.tokenizer,
            self.text_encoder.as_ref().expect("loaded above"),
            &prompts,
            &self.options.text_layers,
        )?;
        if let Some(&dropped) = encoded.truncated.first() {
            if dropped > 0 {
                events(Event::Warning(format!(
                    "the prompt is longer than {MAX_SEQUENCE_LENGTH} tokens: the last {dropped} tokens were dropped"
                )));
            }
        }
        job.prompt_embeds = Some(encoded.embeds.narrow(0, 0, 1)?);
        if job.do_cfg {
            job.negative_embeds = Some(encoded.embeds.narrow(0, 1, 1)?);
        }
        // Stage times are wall times of finished work: on CUDA the encoder's kernels are still
        // queued when the host returns, and without this their tail was billed to the first
        // denoising step (H100: text encode read ~19 ms, step 1 ~22 ms slower than steps 2–4).
        self.options.device.synchronize()?;
        job.timings.text_encode = end(events, Stage::EncodePrompt, t);
        job.timings.total += t_job.elapsed();
        reuse.prompt = Some((
            key,
            job.prompt_embeds.clone().expect("set above"),
            job.negative_embeds.clone(),
        ));
        Ok(())
    }

    /// Stage 3: references → VAE encoder (mean) → patchify → BN normalise → packed tokens,
    /// with their ids at T = 10, 20, … (nothing to do without references).
    fn encode_references(
        &mut self,
        job: &mut Job,
        reuse: &mut Reuse,
        events: &mut dyn FnMut(Event),
    ) -> Result<()> {
        if job.references.is_empty() {
            return Ok(());
        }
        if let Some((images, tokens, ids)) = &reuse.references {
            if Arc::ptr_eq(images, &job.references) {
                job.reference_tokens = Some(tokens.clone());
                job.reference_ids = ids.clone();
                return Ok(());
            }
        }
        let t_job = Instant::now();
        let device = self.options.device.clone();
        if self.vae_encoder.is_none() {
            let t = stage(events, Stage::LoadVaeEncoder);
            self.vae_encoder = Some(self.load_vae(VaeParts {
                encoder: true,
                decoder: false,
            })?);
            job.timings.load += end(events, Stage::LoadVaeEncoder, t);
        }
        let t = stage(events, Stage::EncodeReferences);
        let vae = self.vae_encoder.as_ref().expect("loaded above");
        let mut tokens = Vec::with_capacity(job.references.len());
        for (i, rgb) in job.references.iter().enumerate() {
            let pixels = image_io::rgb_to_tensor(rgb, &device)?.to_dtype(self.vae_dtype())?;
            let mean = match self.options.vae_tile {
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
            tokens.push(latents::pack(&z)?.to_dtype(self.options.dtype)?);
            let t_ref = latents::reference_time(i);
            job.reference_ids
                .push(latents::image_ids(t_ref, rh, rw, &device)?);
        }
        job.reference_tokens = Some(Tensor::cat(&tokens, 1)?);
        device.synchronize()?; // the stage's own time, as for the prompt
        job.timings.reference_encode = end(events, Stage::EncodeReferences, t);
        job.timings.total += t_job.elapsed();
        reuse.references = Some((
            job.references.clone(),
            job.reference_tokens.clone().expect("set above"),
            job.reference_ids.clone(),
        ));
        Ok(())
    }

    /// Stages 4–5: seeded noise, ids and schedule, then the transformer's Euler steps (with
    /// CFG on base checkpoints).
    fn denoise(&mut self, job: &mut Job, events: &mut dyn FnMut(Event)) -> Result<()> {
        let t_job = Instant::now();
        let device = self.options.device.clone();
        let dtype = self.options.dtype;
        let (grid_h, grid_w, steps) = (job.grid_h, job.grid_w, job.steps);
        let in_channels = self.transformer_config.in_channels;
        let noise = noise::randn_tensor(
            job.request.seed,
            &[1, in_channels, grid_h, grid_w],
            dtype,
            &device,
        )?;
        let mut latents_packed = latents::pack(&noise)?;
        let n_target = grid_h * grid_w;
        let target_ids = latents::image_ids(0, grid_h, grid_w, &device)?;
        let img_ids = if job.reference_ids.is_empty() {
            target_ids
        } else {
            let mut all = vec![target_ids];
            all.append(&mut job.reference_ids);
            Tensor::cat(&all, 0)?
        }
        .unsqueeze(0)?;
        let prompt_embeds = job.prompt_embeds.take().context("prompt not encoded")?;
        let negative_embeds = job.negative_embeds.take();
        let txt_ids = latents::text_ids(prompt_embeds.dim(1)?, &device)?.unsqueeze(0)?;
        let image_latents = job.reference_tokens.take();
        let schedule = Schedule::new(&self.scheduler_config, steps, n_target)?;

        if self.transformer.is_none() {
            let t = stage(events, Stage::LoadTransformer);
            self.transformer = Some(self.load_transformer()?);
            job.timings.load += end(events, Stage::LoadTransformer, t);
        }
        let transformer = self.transformer.as_ref().expect("loaded above");
        let rope = transformer.rope(&img_ids, &txt_ids)?;
        let t_denoise = stage(events, Stage::Denoise);
        for i in 0..steps {
            let t_step = Instant::now();
            let x_in = match &image_latents {
                Some(refs) => Tensor::cat(&[&latents_packed, refs], 1)?,
                None => latents_packed.clone(),
            };
            let timestep = scheduler::model_timestep(schedule.timesteps[i], 1, dtype, &device)?;
            let cond = transformer
                .forward_with_rope(&x_in, &prompt_embeds, &timestep, &rope, None)?
                .narrow(1, 0, n_target)?;
            let velocity = match &negative_embeds {
                Some(neg) => {
                    let uncond = transformer
                        .forward_with_rope(&x_in, neg, &timestep, &rope, None)?
                        .narrow(1, 0, n_target)?;
                    classifier_free_guidance(&cond, &uncond, job.guidance)?
                }
                None => cond,
            };
            latents_packed = scheduler::euler_step(
                &latents_packed,
                &velocity,
                schedule.sigmas[i],
                schedule.sigmas[i + 1],
            )?;
            // Make the step's time real on asynchronous devices before reporting it.
            device.synchronize()?;
            let elapsed = t_step.elapsed();
            job.timings.steps.push(elapsed);
            events(Event::Step {
                index: i,
                total: steps,
                elapsed,
            });
        }
        end(events, Stage::Denoise, t_denoise);
        job.latents = Some(latents_packed);
        job.timings.total += t_job.elapsed();
        Ok(())
    }

    /// Stage 6: unpack → BN de-normalise → unpatchify → VAE decoder → uint8 image.
    fn decode(&mut self, job: &mut Job, events: &mut dyn FnMut(Event)) -> Result<Generated> {
        let t_job = Instant::now();
        if self.vae_decoder.is_none() {
            let t = stage(events, Stage::LoadVaeDecoder);
            self.vae_decoder = Some(self.load_vae(VaeParts {
                encoder: false,
                decoder: true,
            })?);
            job.timings.load += end(events, Stage::LoadVaeDecoder, t);
        }
        let t = stage(events, Stage::Decode);
        let vae = self.vae_decoder.as_ref().expect("loaded above");
        let vae_dtype = self.vae_dtype();
        let latents_packed = job.latents.take().context("latents not denoised")?;
        let z = latents::unpack(&latents_packed.to_dtype(vae_dtype)?, job.grid_h, job.grid_w)?;
        let z = latents::bn_denormalize(
            &z,
            vae.bn_running_mean(),
            vae.bn_running_var(),
            vae.bn_eps(),
        )?;
        let z = latents::unpatchify(&z)?;
        let decoded = match self.options.vae_tile {
            Some(tile) => vae.decode_tiled(&z, TileOptions::with_default_overlap(tile))?,
            None => vae.decode(&z)?,
        };
        let mut images = vae::to_rgb8(&decoded)?;
        job.timings.vae_decode = end(events, Stage::Decode, t);
        job.timings.total += t_job.elapsed();
        Ok(Generated {
            image: images.remove(0),
            width: job.width,
            height: job.height,
            steps: job.steps,
            guidance: job.guidance,
            seed: job.request.seed,
            timings: std::mem::take(&mut job.timings),
        })
    }

    /// Peak device memory in bytes since the last reset (or process start), where the device
    /// can tell (CUDA: live tensor memory, like torch's `max_memory_allocated`).
    pub fn peak_device_memory(&self) -> Option<u64> {
        crate::ops::device::peak(&self.options.device)
    }

    /// Starts a new peak-memory measurement (`bench` does this per workload).
    pub fn reset_peak_device_memory(&self) {
        crate::ops::device::reset_peak(&self.options.device)
    }
}

/// `neg + g·(cond − neg)` with torch's rounding: the subtraction and the addition round in the
/// model dtype, and a python-float scale multiplies in f32 then rounds once (torch keeps the
/// scalar in f32 for `mul`).
fn classifier_free_guidance(cond: &Tensor, uncond: &Tensor, guidance: f64) -> Result<Tensor> {
    let dtype = cond.dtype();
    let diff = (cond - uncond)?;
    let scaled = (diff.to_dtype(DType::F32)? * guidance)?.to_dtype(dtype)?;
    Ok((uncond + scaled)?)
}

/// In a batch, errors name the image they belong to ("image 3 of 10: …").
fn in_job<T>(result: Result<T>, index: usize, total: usize) -> Result<T> {
    if total > 1 {
        result.with_context(|| format!("image {} of {total}", index + 1))
    } else {
        result
    }
}

fn stage(events: &mut dyn FnMut(Event), name: Stage) -> Instant {
    events(Event::StageStart(name));
    Instant::now()
}

fn end(events: &mut dyn FnMut(Event), name: Stage, t: Instant) -> Duration {
    let d = t.elapsed();
    for w in crate::ops::take_warnings() {
        events(Event::Warning(w));
    }
    events(Event::StageEnd(name, d));
    d
}
