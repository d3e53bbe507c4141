//! Which kernel runs: the compiled tilings ([`KernelConfig`]), the Hopper choice (from
//! [`crate::ops::KernelOptions::attention`], and only once its self-check passed), the NVRTC
//! defines and names of each instance, and the list of every variant for the compile check.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, DType, Result};

use crate::ops::{AttentionKernel, KernelOptions};

/// The CUDA C++ source of the kernels (no `#include`s: NVRTC needs no toolkit headers).
const KERNEL_SOURCE: &str = include_str!("../kernels/flash_attn.cu");

/// The Hopper (wgmma) variant: `flash_attn_sm90.cu` appended to `flash_attn.cu`, whose
/// helpers it uses (one NVRTC program, compiled for `compute_90a`).
const HOPPER_SOURCE: &str = concat!(
    include_str!("../kernels/flash_attn.cu"),
    include_str!("../kernels/flash_attn_sm90.cu")
);

/// Largest supported head dim.
pub(super) const MAX_HEAD_DIM: usize = 256;

/// One compiled tiling of the kernel: `NW` warps × `MT` m16-slices of queries per block,
/// `BN` keys per K/V tile, compiled head dim `d`; or (`hopper`) the sm_90a wgmma variant
/// (bf16, head dim 128, two warpgroups of 64 query rows, 64- or 128-key tiles). `causal`: the
/// mma.sync tiling's causal, right-padded, grouped-query instance (`fa_causal_*`, the text
/// encoder's), compiled as its own module with `-DFA_CAUSAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KernelConfig {
    d: usize,
    warps: usize,
    m_tiles: usize,
    block_n: usize,
    hopper: bool,
    causal: bool,
}

/// What [`compiled_variants`] lists for the compile check: the architecture a variant needs
/// (compute capability and target suffix, e.g. `(90, "a")`; `None`: any), its NVRTC defines
/// and the kernels they define.
pub(crate) struct CompiledVariant {
    pub source: &'static str,
    pub arch: Option<(u32, &'static str)>,
    pub defines: Vec<String>,
    pub entries: Vec<String>,
}

/// The Hopper kernels that passed their self-check ([`super::load_for`]), one bit per tiling
/// ([`KernelConfig::hopper_bit`]); until then (or when it fails) the mma.sync kernel runs.
static HOPPER_PASSED: AtomicU8 = AtomicU8::new(0);

/// The Hopper (wgmma) variant for this head dim and dtype on `dev`, if any: compute capability
/// 9.0 (H100/H200), bf16, head dim 128, and [`KernelOptions::attention`] not
/// [`AttentionKernel::Mma`]. The default there is the 128-key-tile kernel, the fastest
/// (measured: BENCHMARKS.md, 2026-11-26). It runs only after [`super::load_for`]'s self-check
/// passed.
pub(super) fn hopper_requested(
    dev: &CudaDevice,
    head_dim: usize,
    dtype: DType,
) -> Option<KernelConfig> {
    let cfg = match KernelOptions::current().attention {
        AttentionKernel::Mma => return None,
        AttentionKernel::Wgmma64 => KernelConfig::HOPPER,
        AttentionKernel::Auto | AttentionKernel::Wgmma128 => KernelConfig::HOPPER_N128,
    };
    let on_hopper = matches!(dev.cuda_stream().context().compute_capability(), Ok((9, 0)));
    (head_dim == 128 && dtype == DType::BF16 && on_hopper).then_some(cfg)
}

impl KernelConfig {
    /// The configuration for a head dim (keep in sync with the `FA_KERNELS` list of the .cu).
    pub fn for_head_dim(head_dim: usize) -> Option<Self> {
        let (d, m_tiles, block_n) = match head_dim {
            0 => return None,
            1..=16 => (16, 1, 64),
            17..=32 => (32, 1, 64),
            33..=64 => (64, 1, 64),
            65..=128 => (128, 2, 64),
            129..=256 => (256, 1, 32),
            _ => return None,
        };
        Some(Self {
            d,
            warps: 4,
            m_tiles,
            block_n,
            hopper: false,
            causal: false,
        })
    }

    /// The causal instance of [`KernelConfig::for_head_dim`]'s tiling.
    pub fn causal_for_head_dim(head_dim: usize) -> Option<Self> {
        Self::for_head_dim(head_dim).map(|cfg| Self {
            causal: true,
            ..cfg
        })
    }

    /// The sm_90a wgmma kernel `fa90_fwd_bf16_d128` (flash_attn_sm90.cu).
    const HOPPER: Self = Self {
        d: 128,
        warps: 8,
        m_tiles: 1,
        block_n: 64,
        hopper: true,
        causal: false,
    };

    /// The same with 128-key tiles, `fa90_fwd_bf16_d128_n128`.
    const HOPPER_N128: Self = Self {
        block_n: 128,
        ..Self::HOPPER
    };

    /// The kernel for `head_dim`/`dtype` on `dev` without a mask.
    pub fn select(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Option<Self> {
        hopper_requested(dev, head_dim, dtype)
            .filter(|cfg| HOPPER_PASSED.load(Ordering::Relaxed) & cfg.hopper_bit() != 0)
            .or_else(|| Self::for_head_dim(head_dim))
    }

    /// This Hopper tiling's bit in [`HOPPER_PASSED`].
    fn hopper_bit(&self) -> u8 {
        if self.block_n == 64 {
            1
        } else {
            2
        }
    }

    /// Lets [`KernelConfig::select`] pick this Hopper kernel: it passed its self-check.
    pub fn mark_self_checked(&self) {
        HOPPER_PASSED.fetch_or(self.hopper_bit(), Ordering::Relaxed);
    }

    /// Query rows per thread block.
    pub fn block_m(&self) -> usize {
        16 * self.m_tiles * self.warps
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }

    /// Q tile + double-buffered K and V tiles, 2 bytes per element (the Hopper kernel aligns
    /// its tiles to 1024 bytes itself: 1024 more).
    pub fn shared_mem_bytes(&self) -> usize {
        (self.block_m() + 4 * self.block_n) * self.d * 2 + if self.hopper { 1024 } else { 0 }
    }

    /// The NVRTC defines that compile only this configuration's kernel for `dtype`.
    fn defines(&self, dtype: DType) -> Vec<String> {
        if self.hopper {
            // Only the Hopper kernels: none of flash_attn.cu's own instances.
            return ["-DFA_ONLY_D=0", "-DFA_ONLY_BF16"]
                .map(String::from)
                .to_vec();
        }
        let only = if dtype == DType::BF16 { "BF16" } else { "F16" };
        let mut defines = vec![
            format!("-DFA_ONLY_D={}", self.d),
            format!("-DFA_ONLY_{only}"),
        ];
        if self.causal {
            defines.push("-DFA_CAUSAL".to_string());
        }
        defines
    }

    pub fn kernel_name(&self, dtype: DType) -> String {
        if self.hopper {
            let tiles = if self.block_n == 64 { "" } else { "_n128" };
            return format!("fa90_fwd_bf16_d128{tiles}");
        }
        let dt = if dtype == DType::BF16 { "bf16" } else { "f16" };
        let kind = if self.causal { "causal" } else { "fwd" };
        format!(
            "fa_{kind}_{dt}_d{}_w{}_m{}_n{}",
            self.d, self.warps, self.m_tiles, self.block_n
        )
    }

    /// The NVRTC target suffix (`compute_90a` for wgmma).
    fn arch_suffix(&self) -> &'static str {
        if self.hopper {
            "a"
        } else {
            ""
        }
    }

    /// The loaded kernel for this configuration and `dtype` on `dev` (NVRTC's PTX is cached
    /// on disk, the module per device by candle).
    pub fn load(&self, dev: &CudaDevice, dtype: DType) -> Result<CudaFunction> {
        let stream = dev.cuda_stream();
        let (major, minor) = stream.context().compute_capability().w()?;
        if major < 8 {
            bail!(
                "flash attention needs a GPU with compute capability >= 8.0 (bf16 mma.sync, \
                 cp.async), this one is {major}.{minor}"
            )
        }
        let (name, source) = if self.hopper {
            ("flash_attn_sm90", HOPPER_SOURCE)
        } else {
            ("flash_attn", KERNEL_SOURCE)
        };
        let func = crate::cuda::nvrtc::load_function_arch(
            dev,
            name,
            source,
            &self.defines(dtype),
            &self.kernel_name(dtype),
            self.arch_suffix(),
        )?;
        // More than 48 KiB of dynamic shared memory must be opted into per function.
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.shared_mem_bytes() as i32,
        )
        .w()?;
        Ok(func)
    }
}

/// Every variant [`KernelConfig::load`] may ask NVRTC for: one per supported head dim and
/// dtype, plain and causal, and the Hopper kernels (checked by [`crate::cuda::check_kernels`]).
pub(crate) fn compiled_variants() -> Vec<CompiledVariant> {
    let mut variants: Vec<CompiledVariant> = [16, 32, 64, 128, 256]
        .into_iter()
        .flat_map(|d| {
            [
                KernelConfig::for_head_dim(d),
                KernelConfig::causal_for_head_dim(d),
            ]
        })
        .flatten()
        .flat_map(|cfg| {
            [DType::BF16, DType::F16].map(|dtype| CompiledVariant {
                source: KERNEL_SOURCE,
                arch: None,
                defines: cfg.defines(dtype),
                entries: vec![cfg.kernel_name(dtype)],
            })
        })
        .collect();
    // One compile defines both Hopper kernels.
    let hopper = [KernelConfig::HOPPER, KernelConfig::HOPPER_N128];
    variants.push(CompiledVariant {
        source: HOPPER_SOURCE,
        arch: Some((90, "a")),
        defines: hopper[0].defines(DType::BF16),
        entries: hopper.map(|cfg| cfg.kernel_name(DType::BF16)).to_vec(),
    });
    variants
}
