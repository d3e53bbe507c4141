//! Weights beyond a model directory's own files: one single-file transformer checkpoint
//! (`--transformer`, BFL or diffusers names, bf16/f32 or fp8: [`single_file`]), the fp8
//! formats and their scale arithmetic ([`fp8`]), quantisation at load (`--quantize fp8`:
//! [`quantize`]) and where a `--transformer PATH_OR_REPO` points ([`resolve`]).
//!
//! Each is a `VarBuilder` backend (or a wrapper of one): the models load the same way from
//! any of them, and other load-time layers (LoRA merges) can wrap them.

pub mod file_backend;
pub mod fp8;
pub mod quantize;
pub mod resolve;
pub mod single_file;

pub use file_backend::FileBackend;
pub use quantize::Quantization;
pub use single_file::TransformerFile;
