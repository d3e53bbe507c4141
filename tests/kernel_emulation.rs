//! Our CUDA kernels' own code, run on the CPU (`tests/kernel_emu/`): the flash-attention
//! kernel with its PTX helpers (ldmatrix, mma.sync, cp.async, cvt) emulated per warp, and its
//! Hopper variant with wgmma emulated per warpgroup from the PTX ISA's layouts and
//! asynchronously (operands read at the wait), against attention computed in double precision,
//! and the index arithmetic exhaustively; the fused kernels of `src/cuda/kernels/fused.cu`,
//! launched as `src/cuda/fused/` launches them (the block geometry from the kernels' own
//! `#define`s), against the op sequences they replace with torch's roundings. No GPU, no CUDA
//! toolkit, no Python: g++ with C++20 (skipped with a message where there is none). So a
//! kernel change that breaks them fails here, not first on a GPU machine.
//! (`scripts/cuda/emulate-kernels.sh` also compares the fused kernels with PyTorch's own ops.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn gxx() -> Option<&'static str> {
    let ok = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("no g++: kernel emulation skipped");
    }
    ok.then_some("g++")
}

/// Compiles `tests/kernel_emu/<source>` into the test's temp dir and runs it; its report
/// goes to stderr, a non-zero exit fails the test.
fn compile_and_run(source: &str, defines: &[&str]) {
    let Some(cxx) = gxx() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu");
    let exe: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(source.replace(".cpp", ""));
    let out = Command::new(cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-w"])
        .args(defines)
        .arg("-o")
        .arg(&exe)
        .arg(dir.join(source))
        .output()
        .expect("running g++");
    assert!(
        out.status.success(),
        "g++ {source} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("running the emulation");
    eprintln!("{}", String::from_utf8_lossy(&run.stdout));
    assert!(
        run.status.success(),
        "{source} reported a failure:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn flash_attention_kernel_matches_exact_attention_on_cpu() {
    compile_and_run(
        "fa_selftest.cpp",
        &[
            "-DFA_SOURCE=\"../../src/cuda/kernels/flash_attn.cu\"",
            "-DFA_SM90_SOURCE=\"../../src/cuda/kernels/flash_attn_sm90.cu\"",
        ],
    );
}

#[test]
fn flash_attention_index_arithmetic_is_the_swizzled_layout() {
    compile_and_run("fa_index_check.cpp", &[]);
}

#[test]
fn fused_kernels_match_the_ops_they_replace_on_cpu() {
    compile_and_run("fused_selftest.cpp", &[]);
}
