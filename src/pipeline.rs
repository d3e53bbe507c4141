//! `Pipeline::load` then `generate(Request)`: the whole of diffusers' `Flux2KleinPipeline.__call__`
//! (spec §1, §8), with component lifetimes managed for low peak memory.
//!
//! (API skeleton; the implementation lands with the components.)

use std::time::Duration;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::model_dir::ModelDir;

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
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
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

/// A reference image with the name it came from (for metadata and messages).
#[derive(Debug, Clone)]
pub struct Reference {
    pub image: image::DynamicImage,
    pub name: String,
}

/// Progress and diagnostics, reported while `generate` runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A stage starts ("load text encoder", "encode prompt", "encode references",
    /// "load transformer", "denoise", "load vae", "decode").
    StageStart(&'static str),
    /// A stage ended, with its wall time.
    StageEnd(&'static str, Duration),
    /// Denoising step `index` (0-based) of `total` finished.
    Step { index: usize, total: usize, elapsed: Duration },
    /// Something the user should know (truncated prompt, floored size, ignored guidance, …).
    Warning(String),
}

/// Wall time per stage of one `generate` call.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub load: Duration,
    pub text_encode: Duration,
    pub reference_encode: Duration,
    pub steps: Vec<Duration>,
    pub vae_decode: Duration,
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

/// The FLUX.2 [klein] pipeline.
pub struct Pipeline {
    pub model: ModelDir,
    pub options: PipelineOptions,
}

impl Pipeline {
    /// Resolves configs and the tokenizer; components are loaded when first needed.
    pub fn load(model: ModelDir, options: PipelineOptions) -> Result<Self> {
        Ok(Self { model, options })
    }

    /// Distilled checkpoints never run CFG (spec §8).
    pub fn is_distilled(&self) -> bool {
        self.model.index.is_distilled
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

    /// Runs one request.
    pub fn generate(
        &mut self,
        _request: &Request,
        _events: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        bail!("the pipeline is not implemented yet")
    }

    /// Peak device memory in bytes since the last reset, where the device can tell (CUDA).
    pub fn peak_device_memory(&self) -> Option<u64> {
        None
    }
}
