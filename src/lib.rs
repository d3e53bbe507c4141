//! flux2-klein: FLUX.2 [klein] text-to-image and multi-reference editing on candle, equal to
//! diffusers 0.42.1 `Flux2KleinPipeline` (and `Flux2KleinKVPipeline` for the KV-cache
//! checkpoints, chosen by the model's `model_index.json`).
//!
//! ```no_run
//! use flux2_klein::{ModelDir, Pipeline, PipelineOptions, Request};
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = ModelDir::resolve("black-forest-labs/FLUX.2-klein-4B", None)?; // or a local dir
//! let options = PipelineOptions::for_device(candle_core::Device::Cpu);
//! let mut pipeline = Pipeline::open(model, options)?;
//! let mut request = Request::new("a red fox in snow, golden hour", 42); // prompt, seed
//! request.width = Some(512);
//! request.height = Some(512);
//! // Optionally a LoRA/LoKr adapter at scale 0.8, merged into the transformer as it loads:
//! let lora = std::sync::Arc::new(pipeline.load_lora("style.safetensors")?);
//! request.adapters.push(flux2_klein::lora::AppliedLora { lora, scale: 0.8 });
//! let mut events = Vec::new(); // stages, steps and warnings, as they happen
//! let out = pipeline.generate(&request, &mut |event| events.push(event))?;
//! flux2_klein::image_io::save_image("fox.png", &out.image, &[])?;
//! # Ok(())
//! # }
//! ```
//!
//! The data flows one way (`docs/design.md`):
//!
//! ```text
//! request ─► prompt encoding ─► noise + ids ─► denoise loop ─► VAE decode ─► image file
//!             (text_encoder)     (noise, latents) (transformer, scheduler) (vae)  (image_io)
//! references ─► image_io ─► vae encode ─► packed reference tokens ──┘
//! ```
//!
//! The stages are `pipeline::stages` (pure functions named after diffusers' steps), the
//! batching and component lifetimes `pipeline::batch`. The models call `ops`, which pick our
//! CUDA kernels (`cuda`, feature `cuda`) where they apply. The library reads no environment
//! and prints nothing: options go in ([`PipelineOptions`], [`ops::KernelOptions`]), events
//! come out ([`pipeline::Event`]).
//!
//! Every module reproduces diffusers 0.42.1; the dtype rules that make the numbers match live
//! next to the op they govern and cite the spec (`spec §N` = `docs/spec.md`, section N;
//! diffusers 0.42.1 wins where the spec disagrees with it).

pub mod image_io;
pub mod latents;
pub mod limits;
pub mod lora;
pub mod model_dir;
pub mod noise;
pub mod ops;
pub mod pipeline;
pub mod profile;
pub mod scheduler;
pub mod text;
pub mod text_encoder;
pub mod transformer;
pub mod vae;
pub mod weights;

// Our CUDA kernels; only `ops` (and the CUDA tests) call them.
#[cfg(feature = "cuda")]
pub mod cuda;

pub use model_dir::ModelDir;
pub use pipeline::{Event, Generated, Pipeline, PipelineOptions, Reference, Request};

/// `text` on one line: every run of whitespace (newlines included) folded to one space. Error
/// and warning texts go through it, so each reaches the terminal as one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
