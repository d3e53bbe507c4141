//! flux2-klein: FLUX.2 [klein] text-to-image and multi-reference editing on candle.
//!
//! The data flows one way (see `shared/DESIGN.md`):
//!
//! ```text
//! request ─► prompt encoding ─► noise + ids ─► denoise loop ─► VAE decode ─► image file
//!             (text_encoder)     (noise, latents) (transformer, scheduler) (vae)  (image_io)
//! references ─► image_io ─► vae encode ─► packed reference tokens ──┘
//! ```
//!
//! Every module reproduces diffusers 0.42.1 `Flux2KleinPipeline`; the dtype rules that make
//! the numbers match live next to the op they govern and cite the spec section.

pub mod image_io;
pub mod latents;
pub mod model_dir;
pub mod noise;
pub mod ops;
pub mod pipeline;
pub mod profile;
pub mod scheduler;
pub mod text_encoder;
pub mod transformer;
pub mod vae;

// Our CUDA kernels; only `ops` (and the CUDA tests) call them.
#[cfg(feature = "cuda")]
pub mod cuda;

/// `text` on one line: every run of whitespace (newlines included) folded to one space. Error
/// and warning texts go through it, so each reaches the terminal as one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
