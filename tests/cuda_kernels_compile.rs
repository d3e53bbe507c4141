//! Every CUDA source of ours compiles with NVRTC, with the defines the run-time code uses, and
//! defines every kernel the Rust side launches. Needs libnvrtc but no GPU, so it runs where the
//! `cuda` binary is built (`scripts/cuda/check-cuda-kernels.sh`) as well as on the GPU machine:
//! a source that fails to compile would otherwise first fail there, at run time.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    for compute_cap in [80, 90] {
        let checked = flux2_klein::cuda::check_kernels(compute_cap)
            .unwrap_or_else(|e| panic!("compute_{compute_cap}: {e}"));
        assert!(checked.iter().any(|k| k == "rmsnorm_rope_bf16"));
        assert!(checked.iter().any(|k| k == "fa_fwd_bf16_d128_w4_m2_n64"));
        eprintln!("compute_{compute_cap}: {} kernels compile", checked.len());
    }
}
