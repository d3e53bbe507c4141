//! `Pipeline::open` then `generate(Request)`: the whole of diffusers' `Flux2KleinPipeline.__call__`
//! (spec §1, §8), with component lifetimes managed for low peak memory.
//!
//! * this file: the public types ([`Request`], [`PipelineOptions`], [`Event`], [`Stage`],
//!   [`Generated`]) and [`Pipeline`] (configs, component loading, the front door);
//! * [`stages`]: the numerics of each stage as pure functions named after diffusers' steps;
//! * [`batch`]: the batch scheduler (stage by stage over chunks of requests, reuse of shared
//!   prompts and references, component lifetimes, timings and events);
//! * [`reference_kv`]: the reference K/V of KV-cache checkpoints, kept across a batch.
//!
//! Order of work for one request (each stage loads its component only when needed, and frees
//! it afterwards unless `keep_resident` is set):
//!
//! 1. references → `image_io::prepare_reference` (size checks, Lanczos cap, centre crop)
//! 2. prompt (+ the empty negative prompt for CFG) → Qwen3 → `prompt_embeds`
//! 3. references → VAE encoder (mean) → patchify → BN normalise → packed tokens, T = 10, 20, …
//! 4. seeded noise (torch's CPU generator) → packed latents; ids; sigmas
//! 5. transformer + Euler steps (CFG on base checkpoints); on KV-cache checkpoints
//!    (`Flux2KleinKVPipeline`) the references' K/V are computed once first and joined to the
//!    keys of every step instead of the reference tokens (spec-wave2 §3)
//! 6. unpack → BN de-normalise → unpatchify → VAE decoder → uint8 image

mod batch;
mod cancel;
mod components;
pub mod inpaint;
pub mod memory;
mod reference_kv;
pub mod stages;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;

pub use batch::BATCH_CHUNK;
pub use cancel::{Cancel, Cancelled};
pub use inpaint::InitImage;

use crate::limits;
use crate::lora::{AppliedLora, Lora};
use crate::model_dir::{ModelDir, PipelineKind};
use crate::ops::KernelOptions;
use crate::scheduler::SchedulerConfig;
use crate::text_encoder::{self, PromptTokenizer, Qwen3Config, Qwen3TextEncoder};
use crate::transformer::{Flux2Transformer, Flux2TransformerConfig};
use crate::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config, VaeParts};
use crate::weights::quantize::{self, QuantizeFp8};
use crate::weights::{Quantization, TransformerFile};

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
    /// The largest output area in pixels ([`crate::limits::DEFAULT_MAX_AREA`] by default, at
    /// most [`crate::limits::MAX_AREA_CEILING`]).
    pub max_area: u64,
    /// Stops a running batch at its next safe point ([`Cancel`]).
    pub cancel: Cancel,
    /// Refuse a request whose estimated memory clearly exceeds what the device has
    /// ([`memory`]), before anything loads; on by default.
    pub check_memory: bool,
    /// A single-file transformer checkpoint that replaces the model's transformer weights
    /// (BFL or diffusers names, bf16/f32 or fp8; [`crate::weights::single_file`]); the
    /// architecture still comes from the model's `transformer/config.json`.
    pub transformer_file: Option<std::path::PathBuf>,
    /// Quantise the transformer's block linears and the text encoder's linears at load
    /// ([`crate::weights::quantize`]).
    pub quantize: Option<Quantization>,
    /// Keep fp8 weights (an fp8 `transformer_file`'s E4M3 layers, `quantize`'s) in fp8 in
    /// memory, dequantised per layer at each forward: half the memory of bf16, the same
    /// numbers. Off, they are dequantised at load (faster where memory is plenty). Default:
    /// on for CUDA, off for the CPU.
    pub keep_fp8: bool,
}

impl PipelineOptions {
    /// Defaults for a device: bf16 on CUDA, f32 on CPU; components freed after use.
    pub fn for_device(device: Device) -> Self {
        let keep_fp8 = device.is_cuda();
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
            max_area: crate::limits::DEFAULT_MAX_AREA,
            cancel: Cancel::default(),
            check_memory: true,
            transformer_file: None,
            quantize: None,
            keep_fp8,
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
    /// Inpainting / image-to-image (diffusers' `Flux2KleinInpaintPipeline`): the output has
    /// the init image's size, so `width`/`height` must be `None`.
    pub init: Option<InitImage>,
    /// LoRA/LoKr adapters merged into the transformer for this request, each at its scale
    /// (their deltas add up); requests with another set reload the transformer.
    pub adapters: Vec<AppliedLora>,
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
            init: None,
            adapters: Vec::new(),
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
    /// KV-cache checkpoints: the reference tokens' K/V, once per set of references.
    ReferenceKv,
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
            Stage::ReferenceKv => "reference K/V",
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
    /// KV-cache checkpoints: the reference pass (zero for an image that reused the K/V of an
    /// earlier image of its batch).
    pub reference_kv: Duration,
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
/// floored to multiples of 16 as diffusers does (with a warning). Any multiple of 16 from
/// [`limits::MIN_OUTPUT_SIDE`] up works (diffusers accepts 80×48; the 64 px minimum is for
/// references only), within `max_area` pixels ([`limits::check_output_size`]).
pub fn resolve_size(
    width: Option<usize>,
    height: Option<usize>,
    first_reference: Option<(usize, usize)>,
    max_area: u64,
    warn: &mut dyn FnMut(String),
) -> Result<(usize, usize)> {
    let (dw, dh) = first_reference.unwrap_or((1024, 1024));
    let (w, h) = (width.unwrap_or(dw), height.unwrap_or(dh));
    if w < limits::MIN_OUTPUT_SIDE || h < limits::MIN_OUTPUT_SIDE {
        bail!(
            "output size {w}x{h} is too small: width and height must be at least {} pixels",
            limits::MIN_OUTPUT_SIDE
        );
    }
    let (fw, fh) = (floor_to_multiple_of_16(w), floor_to_multiple_of_16(h));
    limits::check_output_size(fw, fh, max_area)?;
    if (fw, fh) != (w, h) {
        warn(format!(
            "{w}x{h} is not a multiple of 16; the image will be {fw}x{fh} (as diffusers does)"
        ));
    }
    Ok((fw, fh))
}

/// The ceilings of [`crate::limits`] that a request's own values must keep (its size is
/// checked when it is resolved, see [`resolve_size`]); checked for every request of a batch
/// before any work.
pub fn check_request(request: &Request) -> Result<()> {
    if let Some(steps) = request.steps {
        limits::check_steps(steps)?;
    }
    if let Some(guidance) = request.guidance {
        limits::check_guidance(guidance)?;
    }
    limits::check_adapter_count(request.adapters.len())?;
    limits::check_reference_count(request.references.len())
}

/// The components' configs against each other (each is valid alone, see their `validate`):
/// the shapes one hands to the next must agree, else a load or a forward pass would fail
/// deep inside.
fn check_configs(
    transformer: &Flux2TransformerConfig,
    text: &Qwen3Config,
    vae: &AutoencoderKLFlux2Config,
    options: &PipelineOptions,
) -> Result<()> {
    let latent = vae.bn_channels();
    if transformer.in_channels != latent || transformer.out_channels() != latent {
        bail!(
            "the transformer's in_channels {} / out_channels {} do not match the VAE's {latent} \
             packed latent channels (latent_channels × patch_size) — the model's configs do not \
             belong together",
            transformer.in_channels,
            transformer.out_channels()
        );
    }
    let prompt = text.hidden_size.saturating_mul(options.text_layers.len());
    if transformer.joint_attention_dim != prompt {
        bail!(
            "the transformer's joint_attention_dim {} is not the text encoder's hidden_size {} × \
             {} stacked layers — the model's configs do not belong together",
            transformer.joint_attention_dim,
            text.hidden_size,
            options.text_layers.len()
        );
    }
    Ok(())
}

/// The FLUX.2 [klein] pipeline.
pub struct Pipeline {
    pub model: ModelDir,
    pub options: PipelineOptions,
    /// From `model_index.json` `_class_name`.
    kind: PipelineKind,
    scheduler_config: SchedulerConfig,
    transformer_config: Flux2TransformerConfig,
    /// [`PipelineOptions::transformer_file`], opened and checked against the config.
    transformer_file: Option<TransformerFile>,
    tokenizer: PromptTokenizer,
    text_encoder: Option<Qwen3TextEncoder>,
    transformer: Option<Flux2Transformer>,
    vae_encoder: Option<AutoencoderKLFlux2>,
    vae_decoder: Option<AutoencoderKLFlux2>,
    /// The adapters merged into `transformer` (or into the next one to load).
    transformer_adapters: Vec<AppliedLora>,
    /// Warnings of [`Pipeline::open`], not yet delivered.
    pending_warnings: Vec<String>,
    /// With `keep_resident`: the last prompt's embeddings, which the next batch reuses when
    /// its first request has the same prompt (a server's or a stream's repeated prompt pays
    /// the text encoder once, as the images of one batch do).
    last_prompt: Option<(batch::PromptKey, stages::PromptEmbeds)>,
}

impl Pipeline {
    /// Resolves configs and the tokenizer and installs the kernel switches; the components
    /// are loaded when a request first needs them. Warnings found here (e.g. CUDA kernels
    /// that cannot run) are delivered as [`Event::Warning`] by the first `generate`.
    pub fn open(model: ModelDir, options: PipelineOptions) -> Result<Self> {
        if options.text_layers.is_empty() {
            bail!("at least one text encoder layer must be requested");
        }
        let kind = model.index.kind()?;
        let scheduler_config: SchedulerConfig = model.config("scheduler")?;
        let transformer_config: Flux2TransformerConfig = model.config("transformer")?;
        // Every config is validated, alone and against the others, before anything loads.
        let text_config: Qwen3Config = model.config("text_encoder")?;
        let vae_config: AutoencoderKLFlux2Config = model.config("vae")?;
        check_configs(&transformer_config, &text_config, &vae_config, &options)?;
        let tokenizer = PromptTokenizer::from_file(&model.tokenizer()?, MAX_SEQUENCE_LENGTH)?;
        // A replacement transformer file must fit the config before anything loads.
        let mut file_warnings = Vec::new();
        let transformer_file = match &options.transformer_file {
            Some(path) => {
                let file = TransformerFile::open(path)?;
                file_warnings.extend(file.warnings().iter().cloned());
                file_warnings.extend(file.check(&transformer_config)?);
                Some(file)
            }
            None => None,
        };
        options.kernels.install();
        crate::profile::set_enabled(options.profile);
        let mut pending_warnings = crate::ops::prepare_device(
            &options.device,
            transformer_config.attention_head_dim,
            options.dtype,
        );
        pending_warnings.extend(file_warnings);
        Ok(Self {
            model,
            options,
            kind,
            scheduler_config,
            transformer_config,
            transformer_file,
            tokenizer,
            text_encoder: None,
            transformer: None,
            vae_encoder: None,
            vae_decoder: None,
            transformer_adapters: Vec::new(),
            pending_warnings,
            last_prompt: None,
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
        crate::ops::attention::kernel_name(
            &self.options.device,
            self.transformer_config.attention_head_dim,
            self.options.dtype,
        )
    }

    /// Which diffusers pipeline the checkpoint is for.
    pub fn kind(&self) -> PipelineKind {
        self.kind
    }

    /// Distilled checkpoints never run CFG (spec §8). diffusers' `Flux2KleinKVPipeline` has
    /// no guidance at all (4 steps by default), whatever `is_distilled` says.
    pub fn is_distilled(&self) -> bool {
        self.kind == PipelineKind::KleinKv || self.model.index.is_distilled
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

    fn var_builder(&self, component: &str, dtype: DType) -> Result<candle_nn::VarBuilder<'static>> {
        self.model
            .var_builder(component, dtype, &self.options.device)
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
        let vb = match self.options.quantize {
            None => self.var_builder("text_encoder", self.options.dtype)?,
            Some(Quantization::Fp8) => {
                let files = self.model.weights("text_encoder")?;
                // SAFETY: the weight files are memory-mapped read-only and not modified.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
                let backend = QuantizeFp8::new(st, quantize::is_text_encoder_linear)
                    .keeping_fp8(self.options.keep_fp8);
                candle_nn::VarBuilder::from_backend(
                    Box::new(backend),
                    self.options.dtype,
                    self.options.device.clone(),
                )
            }
        };
        Qwen3TextEncoder::load(vb, &cfg, deepest)
    }

    fn load_transformer(&self) -> Result<Flux2Transformer> {
        let (dtype, device) = (self.options.dtype, &self.options.device);
        // Adapters merge into dequantised weights: fp8 layers are kept as stored only without.
        let keep = self.options.keep_fp8 && self.transformer_adapters.is_empty();
        let backend: Option<Box<dyn SimpleBackend>> =
            match (&self.transformer_file, self.options.quantize) {
                (None, None) => None,
                (Some(file), None) => Some(Box::new(file.backend(keep))),
                (Some(file), Some(Quantization::Fp8)) => {
                    let skip = file.clone();
                    Some(Box::new(
                        QuantizeFp8::new(file.backend(keep), quantize::is_transformer_block_linear)
                            .skipping(move |name| skip.is_fp8(name))
                            .keeping_fp8(keep),
                    ))
                }
                (None, Some(Quantization::Fp8)) => Some(Box::new(
                    QuantizeFp8::new(
                        self.model.mmaped("transformer")?,
                        quantize::is_transformer_block_linear,
                    )
                    .keeping_fp8(keep),
                )),
            };
        let mut pending = None;
        let vb = match backend {
            None if self.transformer_adapters.is_empty() => {
                self.var_builder("transformer", dtype)?
            }
            backend => {
                let backend = match backend {
                    Some(b) => b,
                    None => Box::new(self.model.mmaped("transformer")?),
                };
                match self.transformer_adapters.as_slice() {
                    [] => candle_nn::VarBuilder::from_backend(backend, dtype, device.clone()),
                    adapters => {
                        let (vb, left) =
                            crate::lora::merging_var_builder(backend, adapters, dtype, device);
                        pending = Some(left);
                        vb
                    }
                }
            }
        };
        let what = match &self.transformer_file {
            Some(file) => format!("the transformer file {}", file.path().display()),
            None => format!("the transformer weights of {}", self.model.id),
        };
        let model = Flux2Transformer::load(vb, &self.transformer_config)
            .with_context(|| format!("loading {what}"))?;
        if let Some(left) = pending {
            crate::lora::check_all_merged(&left)?;
        }
        Ok(model)
    }

    /// Reads and checks an adapter file (local, or `owner/repo/file` on the hub) against this
    /// model's transformer; apply it through [`Request::adapters`].
    pub fn load_lora(&self, source: &str) -> Result<Lora> {
        Lora::open(source, &self.transformer_config)
    }

    /// Makes `adapters` the set the transformer carries: a resident transformer merged with
    /// another set is dropped, to be reloaded from the unchanged files.
    fn use_adapters(&mut self, adapters: &[AppliedLora]) {
        if self.transformer_adapters.as_slice() != adapters {
            self.transformer = None;
            self.transformer_adapters = adapters.to_vec();
        }
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
    /// decoded (an error from `on_image` stops the batch); see [`batch`] for how the work is
    /// ordered.
    pub fn generate_batch(
        &mut self,
        requests: &[Request],
        events: &mut dyn FnMut(Event),
        on_image: &mut dyn FnMut(usize, Generated) -> Result<()>,
    ) -> Result<()> {
        batch::run(self, requests, events, on_image)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sides_are_any_multiple_of_16() {
        let size = |w, h, max| resolve_size(Some(w), Some(h), None, max, &mut |_| {});
        let max = limits::DEFAULT_MAX_AREA;
        assert_eq!(size(80, 48, max).unwrap(), (80, 48));
        assert_eq!(size(16, 16, max).unwrap(), (16, 16));
        assert_eq!(size(40, 20, max).unwrap(), (32, 16));
        assert!(size(8, 64, max).is_err());
        assert_eq!(size(2048, 2048, max).unwrap(), (2048, 2048));
        assert!(size(2048, 2064, max).is_err());
        assert!(size(usize::MAX, usize::MAX, limits::MAX_AREA_CEILING).is_err());
    }

    #[test]
    fn requests_keep_the_ceilings() {
        let mut r = Request::new("x", 0);
        assert!(check_request(&r).is_ok());
        r.steps = Some(limits::MAX_STEPS + 1);
        assert!(check_request(&r).is_err());
        r.steps = None;
        r.guidance = Some(f64::NAN);
        assert!(check_request(&r).is_err());
    }
}
