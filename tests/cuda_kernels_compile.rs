//! Every CUDA source of ours compiles with NVRTC, with the defines the run-time code uses, and
//! defines every kernel the Rust side launches. Needs libnvrtc but no GPU, so it runs where the
//! `cuda` binary is built (`scripts/cuda/check-cuda-kernels.sh`) as well as on the GPU machine:
//! a source that fails to compile would otherwise first fail there, at run time.
//! In a build without `cuda` (the default test run, CI's) there is no NVRTC: the test says so
//! and where the check runs instead.

#[cfg(not(feature = "cuda"))]
#[test]
fn every_kernel_compiles_for_every_supported_generation() {
    eprintln!(
        "skipped: the NVRTC compile check of our CUDA kernels (sm_80, 86, 89, 90, 120) needs a \
         --features cuda build: run scripts/cuda/check-cuda-kernels.sh"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn every_kernel_compiles_for_every_supported_generation() {
    // A100 (8.0), RTX 30 / A10 (8.6), RTX 40 / L4 (8.9), H100/H200 (9.0), RTX 50 (12.0).
    for compute_cap in [80, 86, 89, 90, 120] {
        let checked = flux2_klein::cuda::check_kernels(compute_cap)
            .unwrap_or_else(|e| panic!("compute_{compute_cap}: {e}"));
        assert!(checked.iter().any(|k| k == "rmsnorm_rope_bf16"));
        assert!(checked.iter().any(|k| k == "fa_fwd_bf16_d128_w4_m2_n64"));
        eprintln!("compute_{compute_cap}: {} kernels compile", checked.len());
    }
}
