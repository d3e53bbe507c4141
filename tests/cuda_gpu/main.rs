//! Our CUDA kernels on a GPU, against the candle / f32 references they replace (each test
//! passes with a "skipped" message where no CUDA device is present). One test executable, so
//! that a device run (`scripts/gpu/gpu.sh`) carries a single binary:
//!
//! * `attention`: the flash-attention kernels (plain, Hopper, causal) against naive attention;
//! * `fused`: the fused bf16 kernels (`src/cuda/kernels/fused.cu`) and the cuDNN convolution.
//!
//! Run with `--test-threads=1 --nocapture` to see the numbers.
#![cfg(feature = "cuda")]

mod attention;
mod fused;
