//! Our own CUDA kernels (fused attention), compiled at run time with NVRTC. (work in progress)
