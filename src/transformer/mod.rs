//! FLUX.2 transformer: diffusers' `Flux2Transformer2DModel` (spec §5), in any dtype the
//! weights are loaded in (f32 for parity tests, bf16 for inference, spec §1 dtype rules).
//!
//! * [`config`]: `transformer/config.json` and the parameter count;
//! * [`embed`]: timestep/guidance embedding and the RoPE tables;
//! * [`modulation`]: diffusers' `Flux2Modulation` and `AdaLayerNormContinuous`;
//! * [`attention`]: `Flux2Attention` and `Flux2ParallelSelfAttention` (the projections; the
//!   attention op is `crate::ops::attention`);
//! * [`feed_forward`]: diffusers' `Flux2FeedForward`;
//! * [`blocks`]: the double- and single-stream blocks;
//! * [`model`]: the whole model ([`Flux2Transformer`]);
//! * [`kv_cache`]: the reference K/V of KV-cache checkpoints ([`ReferenceKv`]);
//! * [`bfl`]: loading the original BFL single-file checkpoint.

pub mod attention;
pub mod bfl;
pub mod blocks;
pub mod config;
pub mod embed;
pub mod feed_forward;
pub mod kv_cache;
pub mod model;
pub mod modulation;

pub use config::Flux2TransformerConfig;
pub use embed::RopeTables;
pub use kv_cache::ReferenceKv;
pub use model::{Flux2Transformer, Inputs, Trace};
