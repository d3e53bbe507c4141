//! Which speed paths the ops may take: the library's kernel switches.
//!
//! The CLI fills them from the environment (`FLUX2_KLEIN_FUSED`, `FLUX2_KLEIN_ATTN`) with
//! [`KernelOptions::from_env`]; the library itself reads no environment. They are
//! process-wide because what they select is: the NVRTC modules, their load-time self-checks
//! and the CUDA memory-pool policy belong to the process, not to one pipeline.
//! [`crate::pipeline::Pipeline::open`] installs the options it was given.

use std::sync::atomic::{AtomicU8, Ordering};

/// The attention kernel on compute capability 9.0 (H100/H200), bf16, head dim 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// The default: the Hopper (wgmma) kernel with 128-key tiles (measured fastest,
    /// BENCHMARKS.md 2026-11-26).
    #[default]
    Auto,
    /// The mma.sync kernel, as on every other architecture.
    Mma,
    /// The Hopper kernel with 64-key tiles.
    Wgmma64,
    /// The Hopper kernel with 128-key tiles.
    Wgmma128,
}

impl AttentionKernel {
    /// Parses a `FLUX2_KLEIN_ATTN` value (`""`/`default` = [`AttentionKernel::Auto`]).
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "" | "default" | "auto" => Some(Self::Auto),
            "mma" => Some(Self::Mma),
            "wgmma" | "wgmma64" => Some(Self::Wgmma64),
            "wgmma128" => Some(Self::Wgmma128),
            _ => None,
        }
    }
}

/// The kernel switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    /// Our CUDA speed paths: the fused NVRTC kernels, flash attention, tensor-core cuDNN
    /// convolutions, TF32 in the VAE attention and the memory-pool policy. Off, the plain
    /// candle ops run (the reference the GPU tests compare against). No effect on the CPU.
    pub fused: bool,
    /// The attention kernel on Hopper.
    pub attention: AttentionKernel,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            fused: true,
            attention: AttentionKernel::Auto,
        }
    }
}

impl KernelOptions {
    /// The switches from `FLUX2_KLEIN_FUSED` (`0` = off) and `FLUX2_KLEIN_ATTN` (`mma`,
    /// `wgmma`, `wgmma128`); an unknown value is reported through `warn` and the default kept.
    pub fn from_env(warn: &mut dyn FnMut(String)) -> Self {
        let mut options = Self::default();
        if let Ok(v) = std::env::var("FLUX2_KLEIN_FUSED") {
            options.fused = v != "0";
        }
        if let Ok(v) = std::env::var("FLUX2_KLEIN_ATTN") {
            match AttentionKernel::parse(&v) {
                Some(k) => options.attention = k,
                None => warn(format!(
                    "FLUX2_KLEIN_ATTN={v} is not one of wgmma, wgmma128, mma; using the default \
                     attention kernel"
                )),
            }
        }
        options
    }

    /// Makes these the process's switches (see the module doc).
    pub fn install(self) {
        let attention = match self.attention {
            AttentionKernel::Auto => 0,
            AttentionKernel::Mma => 1,
            AttentionKernel::Wgmma64 => 2,
            AttentionKernel::Wgmma128 => 3,
        };
        STATE.store(
            INSTALLED | (self.fused as u8) << 2 | attention,
            Ordering::Relaxed,
        );
    }

    /// The process's switches: the last installed, else the defaults.
    pub fn current() -> Self {
        let s = STATE.load(Ordering::Relaxed);
        if s & INSTALLED == 0 {
            return Self::default();
        }
        Self {
            fused: s & 4 != 0,
            attention: match s & 3 {
                1 => AttentionKernel::Mma,
                2 => AttentionKernel::Wgmma64,
                3 => AttentionKernel::Wgmma128,
                _ => AttentionKernel::Auto,
            },
        }
    }
}

const INSTALLED: u8 = 8;
static STATE: AtomicU8 = AtomicU8::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_round_trip() {
        assert_eq!(AttentionKernel::parse("MMA"), Some(AttentionKernel::Mma));
        assert_eq!(AttentionKernel::parse(""), Some(AttentionKernel::Auto));
        assert_eq!(AttentionKernel::parse("fast"), None);
        for attention in [
            AttentionKernel::Auto,
            AttentionKernel::Mma,
            AttentionKernel::Wgmma64,
            AttentionKernel::Wgmma128,
        ] {
            for fused in [false, true] {
                let k = KernelOptions { fused, attention };
                k.install();
                assert_eq!(KernelOptions::current(), k);
            }
        }
        KernelOptions::default().install();
    }
}
