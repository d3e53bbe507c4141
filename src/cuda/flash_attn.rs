//! Fused (flash-attention style) scaled dot-product attention forward pass for CUDA.
//!
//! candle 0.11.1 has no attention op on CUDA (candle-nn's `sdpa` is Metal-only) and
//! candle-flash-attn cannot be built here (its CUTLASS kernels take hours), so the Flux2
//! transformer's `softmax(q kᵀ · scale) v` would otherwise materialise a `[B, H, S, S]` score
//! tensor (24 × 4608² bf16 = 1 GiB per block at 1024², and three full passes over it).
//!
//! The kernel (`flash_attn.cu`, embedded with `include_str!`) is compiled once per process and
//! device architecture with NVRTC and loaded through candle's per-device module cache. See the
//! header of `flash_attn.cu` for the algorithm (FlashAttention-2: query tiles per thread block,
//! K/V tiles double-buffered in shared memory with `cp.async`, `mma.sync` m16n8k16 on the
//! tensor cores, f32 online softmax with exp2 of log2(e)-prescaled scores). In short:
//!
//! * **Why online softmax**: the row max and row sum are updated tile by tile (rescaling the
//!   partial output by `2^(m_old - m_new)`), so a query block reads each K/V tile once and the
//!   score matrix never exists in memory: O(S) memory traffic per query tile instead of O(S²).
//! * **Tile sizes** (measured on an H100 for B=1, H=24, S=4608, D=128, see
//!   `scripts/gpu_attention_check.sh kernel`): for D = 128, 128 query rows per block (4 warps ×
//!   32 rows, two m16 MMA slices per warp, so every K/V fragment read from shared memory feeds
//!   two MMAs) and 64 keys per K/V tile: 96 KiB of shared memory with double buffering, 2
//!   blocks per SM, ~1.15 ms (227 TFLOP/s; 64-row blocks: 1.5 ms, 8 warps × 16 rows: 1.36 ms;
//!   PyTorch's FlashAttention-2: 0.78 ms; these timings predate the address rework that halved
//!   the main loop's instruction count, see the .cu header). Smaller head dims use 64-row
//!   blocks (speed does not matter there), D = 256 uses 32-key tiles to stay within the
//!   register file. Head dims that are not 16/32/64/128/256 run in the next larger instance
//!   with the extra columns zero-filled, so every head dim that is a multiple of 8 up to 256
//!   is supported.
//!
//! * **Hopper variant** (the default on compute capability 9.0 for bf16, head dim 128): the
//!   same algorithm on warpgroup MMAs (`wgmma.mma_async`, compiled for `compute_90a`), 128
//!   query rows per warpgroup pair and 128 keys per tile. On an H100 (2026-11-26) one
//!   attention at S = 4608 takes 0.554 ms (471 TFLOP/s) against 0.707 ms for the mma.sync
//!   kernel and 0.783 ms for PyTorch's FlashAttention-2; at S = 10514 (the 2-reference edit)
//!   2.716 / 3.683 / 3.939 ms. Emulated on the CPU in CI and self-checked against f32
//!   attention when it loads (the mma.sync kernel runs if that fails).
//!   `FLUX2_KLEIN_ATTN=wgmma` selects 64-key tiles, `FLUX2_KLEIN_ATTN=mma` the mma.sync kernel.
//!
//! Inputs may be strided (views from `narrow`/`transpose`) as long as the head dim is the
//! innermost, contiguous dimension and every other stride is a multiple of 8 elements (16-byte
//! chunks); anything else is made contiguous first. `flash_attention_bshd` takes and returns the
//! `[B, S, H, D]` layout directly, which saves the two transposes around attention.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};

use super::launch::cuda_only_cpu_fwd;

/// The CUDA C++ source of the kernels (no `#include`s: NVRTC needs no toolkit headers).
pub const KERNEL_SOURCE: &str = include_str!("flash_attn.cu");

/// The Hopper (wgmma) variant: `flash_attn_sm90.cu` appended to `flash_attn.cu`, whose
/// helpers it uses (one NVRTC program, compiled for `compute_90a`).
pub const HOPPER_SOURCE: &str = concat!(
    include_str!("flash_attn.cu"),
    include_str!("flash_attn_sm90.cu")
);

/// Largest supported head dim.
pub const MAX_HEAD_DIM: usize = 256;

/// Memory layout of the four attention tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnLayout {
    /// `[batch, heads, seq, head_dim]` (candle-transformers' convention).
    Bhsd,
    /// `[batch, seq, heads, head_dim]` (the layout the QKV projections produce).
    Bshd,
}

/// One compiled tiling of the kernel: `NW` warps × `MT` m16-slices of queries per block,
/// `BN` keys per K/V tile, compiled head dim `d`; or (`hopper`) the sm_90a wgmma variant
/// (bf16, head dim 128, two warpgroups of 64 query rows, 64-key tiles). `causal`: the
/// mma.sync tiling's causal, right-padded, grouped-query instance (`fa_causal_*`, the text
/// encoder's), compiled as its own module with `-DFA_CAUSAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KernelConfig {
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

/// Set once the requested Hopper kernel passed its self-check ([`load_for`]); until then (or
/// when it fails) the mma.sync kernel runs.
static HOPPER_PASSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The Hopper (wgmma) variant for this head dim and dtype on `dev`, if any: compute capability
/// 9.0 (H100/H200), bf16, head dim 128. The default there is the 128-key-tile kernel (measured
/// on an H100 with `scripts/gpu.sh`: 1024² text-to-image 361 ms against 387 ms with mma.sync,
/// BENCHMARKS.md); `FLUX2_KLEIN_ATTN=wgmma` picks 64-key tiles, `FLUX2_KLEIN_ATTN=mma` the
/// mma.sync kernel. It runs only after [`load_for`]'s self-check passed.
fn hopper_requested(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Option<KernelConfig> {
    static CHOICE: std::sync::OnceLock<Option<KernelConfig>> = std::sync::OnceLock::new();
    let choice = *CHOICE.get_or_init(|| {
        match std::env::var("FLUX2_KLEIN_ATTN")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "mma" => None,
            "wgmma" => Some(KernelConfig::HOPPER),
            "" | "default" | "wgmma128" => Some(KernelConfig::HOPPER_N128),
            other => {
                eprintln!(
                    "warning: FLUX2_KLEIN_ATTN={other} is not one of wgmma, wgmma128, mma; \
                     using the default attention kernel"
                );
                Some(KernelConfig::HOPPER_N128)
            }
        }
    });
    choice.filter(|_| {
        head_dim == 128
            && dtype == DType::BF16
            && matches!(dev.cuda_stream().context().compute_capability(), Ok((9, 0)))
    })
}

impl KernelConfig {
    /// The configuration for a head dim (keep in sync with the `FA_KERNELS` list of the .cu).
    fn for_head_dim(head_dim: usize) -> Option<Self> {
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
    fn causal_for_head_dim(head_dim: usize) -> Option<Self> {
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

    /// The kernel for `head_dim`/`dtype` on `dev`.
    fn select(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Option<Self> {
        hopper_requested(dev, head_dim, dtype)
            .filter(|_| HOPPER_PASSED.load(std::sync::atomic::Ordering::Relaxed))
            .or_else(|| Self::for_head_dim(head_dim))
    }

    fn block_m(&self) -> usize {
        16 * self.m_tiles * self.warps
    }

    /// Q tile + double-buffered K and V tiles, 2 bytes per element (the Hopper kernel aligns
    /// its tiles to 1024 bytes itself: 1024 more).
    fn shared_mem_bytes(&self) -> usize {
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

    fn kernel_name(&self, dtype: DType) -> String {
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
}

/// Every variant [`load_kernel`] may ask NVRTC for: one per supported head dim and dtype, plain
/// and causal, and the Hopper kernel (checked by [`super::check_kernels`]).
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

/// The name of the kernel attention with this head dim and dtype runs on `dev` (the Hopper
/// variant only once [`load_for`] checked it), or `None` where the naive path runs (f32,
/// unsupported head dims, kernels unusable): [`is_supported`]'s conditions on those two.
pub fn attention_kernel_name(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Option<String> {
    if !kernel_handles(head_dim, dtype) {
        return None;
    }
    KernelConfig::select(dev, head_dim, dtype).map(|cfg| cfg.kernel_name(dtype))
}

/// Compiles (NVRTC, cached) and loads the kernel for `head_dim` and `dtype` on `dev`; nothing
/// for a head dim the kernel does not cover (that model runs the naive path anyway).
pub(crate) fn load_for(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Result<()> {
    if let Some(cfg) = hopper_requested(dev, head_dim, dtype) {
        // Compare it with f32 attention once per process and keep the mma.sync kernel (with a
        // warning) if it fails to load or disagrees: a driver or NVRTC we have not run on
        // degrades to the portable kernel instead of wrong images.
        match load_kernel(dev, &cfg, dtype).and_then(|_| hopper_self_check(dev, cfg)) {
            Ok(()) => HOPPER_PASSED.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => eprintln!(
                "warning: the Hopper attention kernel failed its self-check ({e}); using the \
                 mma.sync kernel"
            ),
        }
    }
    match KernelConfig::select(dev, head_dim, dtype) {
        Some(cfg) => load_kernel(dev, &cfg, dtype).map(|_| ()),
        None => Ok(()),
    }
}

/// The Hopper kernel `cfg` against f32 attention on a small problem with partial query and
/// key tiles (bf16 tolerance).
fn hopper_self_check(dev: &CudaDevice, cfg: KernelConfig) -> Result<()> {
    let device = Device::Cuda(dev.clone());
    let rand = |s: usize| Tensor::randn(0f32, 1f32, (1, 2, s, 128), &device);
    let (q, k, v) = (rand(200)?, rand(300)?, rand(300)?);
    let bf = |t: &Tensor| t.to_dtype(DType::BF16);
    let scale = 1.0 / (128f32).sqrt();
    let ours = run_kernel(
        &bf(&q)?,
        &bf(&k)?,
        &bf(&v)?,
        scale,
        AttnLayout::Bhsd,
        Some(cfg),
    )?
    .to_dtype(DType::F32)?;
    // The same bf16 values in f32.
    let f = |t: &Tensor| bf(t)?.to_dtype(DType::F32);
    let reference = naive_attention(&f(&q)?, &f(&k)?, &f(&v)?, scale)?;
    check_close(&ours, &reference, "f32 attention")
}

/// A self-check's verdict: the kernel's output within bf16 tolerance (2 % of the output's
/// range) of the f32 reference computed on the same rounded inputs.
fn check_close(ours: &Tensor, reference: &Tensor, against: &str) -> Result<()> {
    let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let top = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    if err.is_nan() || err > 2e-2 * top.max(1e-6) {
        bail!("max abs error {err:.3e} against {against} (max |out| {top:.3e})")
    }
    Ok(())
}

/// The loaded kernel for `cfg`/`dtype` on `dev` (candle caches the module per device).
fn load_kernel(dev: &CudaDevice, cfg: &KernelConfig, dtype: DType) -> Result<CudaFunction> {
    let stream = dev.cuda_stream();
    let (major, minor) = stream.context().compute_capability().w()?;
    if major < 8 {
        bail!(
            "flash attention needs a GPU with compute capability >= 8.0 (bf16 mma.sync, \
             cp.async), this one is {major}.{minor}"
        )
    }
    let (name, source) = if cfg.hopper {
        ("flash_attn_sm90", HOPPER_SOURCE)
    } else {
        ("flash_attn", KERNEL_SOURCE)
    };
    let func = super::nvrtc::load_function_arch(
        dev,
        name,
        source,
        &cfg.defines(dtype),
        &cfg.kernel_name(dtype),
        cfg.arch_suffix(),
    )?;
    // More than 48 KiB of dynamic shared memory must be opted into per function.
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        cfg.shared_mem_bytes() as i32,
    )
    .w()?;
    Ok(func)
}

/// The custom op: `q`, `k`, `v` in `layout`, output contiguous in the same layout; the kernel
/// is [`KernelConfig::select`]'s, or `config` when given (the Hopper self-check), or the causal
/// instance with `causal`.
struct FlashAttn {
    scale: f32,
    layout: AttnLayout,
    config: Option<KernelConfig>,
    causal: Option<CausalMask>,
}

/// The causal kernel's mask: query `i` sees key `j` iff `j <= i` and `j < kv_valid`; K/V have
/// `heads / kv_group` heads (grouped-query attention).
#[derive(Clone, Copy, Debug)]
struct CausalMask {
    kv_valid: usize,
    kv_group: usize,
}

/// (batch, heads, seq, head_dim) and the element strides (batch, heads, seq) of one tensor.
fn dims_and_strides(what: &str, l: &Layout, layout: AttnLayout) -> Result<([usize; 4], [i64; 3])> {
    let dims = l.dims();
    let stride = l.stride();
    if dims.len() != 4 {
        bail!(
            "flash attention: {what} must have rank 4, got shape {:?}",
            l.shape()
        )
    }
    let (b, s, h, d) = match layout {
        AttnLayout::Bhsd => (0, 2, 1, 3),
        AttnLayout::Bshd => (0, 1, 2, 3),
    };
    if stride[d] != 1
        || [stride[b], stride[h], stride[s]]
            .iter()
            .any(|&x| x % 8 != 0)
    {
        bail!(
            "flash attention: {what} needs a contiguous last dim and other strides that are \
             multiples of 8, got strides {stride:?} (call .contiguous())"
        )
    }
    if !l.start_offset().is_multiple_of(8) {
        bail!(
            "flash attention: {what} starts at element offset {} (must be a multiple of 8; \
             call .contiguous())",
            l.start_offset()
        )
    }
    Ok((
        [dims[b], dims[h], dims[s], dims[d]],
        [stride[b] as i64, stride[h] as i64, stride[s] as i64],
    ))
}

/// The scalar kernel arguments (see the `FA_KERNEL` signature in flash_attn.cu).
struct KernelArgs {
    sq: i32,
    sk: i32,
    d: i32,
    /// (batch, head, seq) element strides of q, k, v, out.
    strides: [[i64; 3]; 4],
    scale_log2: f32,
    n_out: usize,
    /// The causal kernel's two extra arguments (kv_valid, kv_group).
    causal: Option<[i32; 2]>,
}

impl KernelArgs {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        func: &CudaFunction,
        launch: LaunchConfig,
        dev: &CudaDevice,
        [(qs, ql), (ks, kl), (vs, vl)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<CudaStorage> {
        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        // SAFETY: the kernel stores every output element (each row < Sq, column < D).
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(self.n_out)? };
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(func);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&self.sq);
        builder.arg(&self.sk);
        builder.arg(&self.d);
        for s in self.strides.iter().flatten() {
            builder.arg(s);
        }
        builder.arg(&self.scale_log2);
        if let Some(extra) = &self.causal {
            builder.arg(&extra[0]);
            builder.arg(&extra[1]);
        }
        // SAFETY: the argument list matches the kernel signature in flash_attn.cu, and the
        // launch configuration matches the kernel's compile-time tiling (`KernelConfig`).
        unsafe { builder.launch(launch) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flux2-flash-attention"
    }

    cuda_only_cpu_fwd!(
        3,
        self,
        "the fused flash-attention op runs on CUDA only (flash_attention() falls back to the \
         naive path on CPU)"
    );

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let ([b, h, sq, d], q_st) = dims_and_strides("q", ql, self.layout)?;
        let ([kb, kh, sk, kd], k_st) = dims_and_strides("k", kl, self.layout)?;
        let ([vb, vh, sv, vd], v_st) = dims_and_strides("v", vl, self.layout)?;
        let kv_group = self.causal.map_or(1, |c| c.kv_group);
        if kv_group == 0
            || (kb, kh * kv_group, kd) != (b, h, d)
            || (vb, vh, sv, vd) != (kb, kh, sk, kd)
        {
            bail!(
                "flash attention: shape mismatch q {:?}, k {:?}, v {:?} ({:?} layout)",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.layout
            )
        }
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            bail!(
                "flash attention: the kernel needs a finite scale > 0, got {}",
                self.scale
            )
        }
        if sk == 0 || d % 8 != 0 || d > MAX_HEAD_DIM {
            bail!("flash attention: needs Sk > 0 and a head dim that is a multiple of 8 up to {MAX_HEAD_DIM}, got Sk={sk}, D={d}")
        }
        if let Some(c) = self.causal {
            if sq != sk || c.kv_valid == 0 || c.kv_valid > sk {
                bail!(
                    "causal flash attention: needs Sq = Sk and 1 <= kv_valid <= Sk, got Sq={sq}, \
                     Sk={sk}, kv_valid={}",
                    c.kv_valid
                )
            }
        }
        let dtype = qs.dtype();
        let cfg = match self.causal {
            Some(_) => KernelConfig::causal_for_head_dim(d),
            None => self
                .config
                .or_else(|| KernelConfig::select(qs.device(), d, dtype)),
        }
        .ok_or_else(|| candle_core::Error::Msg(format!("flash attention: head dim {d}")))?;
        if ks.dtype() != dtype || vs.dtype() != dtype {
            bail!(
                "flash attention: q/k/v dtypes differ ({dtype:?}, {:?}, {:?})",
                ks.dtype(),
                vs.dtype()
            )
        }
        let dev = qs.device().clone();
        let out_shape: Shape = match self.layout {
            AttnLayout::Bhsd => (b, h, sq, d).into(),
            AttnLayout::Bshd => (b, sq, h, d).into(),
        };
        let o_st: [i64; 3] = match self.layout {
            AttnLayout::Bhsd => [(h * sq * d) as i64, (sq * d) as i64, d as i64],
            AttnLayout::Bshd => [(sq * h * d) as i64, d as i64, (h * d) as i64],
        };
        let func = load_kernel(&dev, &cfg, dtype)?;
        let bm = cfg.block_m();
        let launch = LaunchConfig {
            grid_dim: (sq.div_ceil(bm) as u32, h as u32, b as u32),
            block_dim: ((cfg.warps * 32) as u32, 1, 1),
            shared_mem_bytes: cfg.shared_mem_bytes() as u32,
        };
        if h > 65535 || b > 65535 || sq > i32::MAX as usize || sk > i32::MAX as usize {
            bail!("flash attention: too many heads/batches/positions (B={b}, H={h}, Sq={sq}, Sk={sk})")
        }
        let launch_args = KernelArgs {
            sq: sq as i32,
            sk: sk as i32,
            d: d as i32,
            strides: [q_st, k_st, v_st, o_st],
            scale_log2: self.scale * std::f32::consts::LOG2_E,
            n_out: out_shape.elem_count(),
            causal: self.causal.map(|c| [c.kv_valid as i32, c.kv_group as i32]),
        };
        let inputs = [(qs, ql), (ks, kl), (vs, vl)];
        let storage = match dtype {
            DType::BF16 => launch_args.run::<half::bf16>(&func, launch, &dev, inputs)?,
            DType::F16 => launch_args.run::<half::f16>(&func, launch, &dev, inputs)?,
            dt => {
                bail!("flash attention: dtype {dt:?} not supported by the kernel (bf16/f16 only)")
            }
        };
        Ok((storage, out_shape))
    }
}

/// Whether the fused kernel handles these inputs (CUDA, bf16/f16, same dtype and device, head
/// dim a multiple of 8 up to 256, Sk > 0). Otherwise `flash_attention*` use the naive path.
pub fn is_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let d = q.dim(D::Minus1).unwrap_or(0);
    operands_on_kernel(q, k, v, d)
        && q.rank() == 4
        && k.rank() == 4
        && v.rank() == 4
        && k.dims()[3] == d
        && v.dims()[3] == d
}

/// What every kernel entry needs of its operands: q on CUDA with a dtype and head dim `d` a
/// kernel handles, k and v of q's dtype on q's device.
fn operands_on_kernel(q: &Tensor, k: &Tensor, v: &Tensor, d: usize) -> bool {
    matches!(q.device(), Device::Cuda(_))
        && kernel_handles(d, q.dtype())
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && k.device().same_device(q.device())
        && v.device().same_device(q.device())
}

/// Whether the kernels are usable here and one exists for this head dim and dtype.
fn kernel_handles(head_dim: usize, dtype: DType) -> bool {
    super::kernels_usable()
        && matches!(dtype, DType::BF16 | DType::F16)
        && head_dim > 0
        && head_dim.is_multiple_of(8)
        && head_dim <= MAX_HEAD_DIM
}

/// True when CUDA device 0 exists and the kernel compiles and loads on it (a quick way to ask
/// "will `flash_attention` use the fused kernel here?").
pub fn available() -> bool {
    match Device::new_cuda(0) {
        Ok(Device::Cuda(dev)) => load_for(&dev, 128, DType::BF16).is_ok(),
        _ => false,
    }
}

/// Makes `t` acceptable to the kernel: contiguous head dim, 8-aligned strides and offset.
fn kernel_ready(t: &Tensor) -> Result<Tensor> {
    let l = t.layout();
    let s = l.stride();
    let ok = s.len() == 4
        && s[3] == 1
        && s[..3].iter().all(|x| x.is_multiple_of(8))
        && l.start_offset().is_multiple_of(8);
    if ok {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The unfused reference: `softmax(q kᵀ · scale) v` in the inputs' dtype, `[B, H, S, D]`.
/// This is what `flash_attention` replaces; it is also its fallback for unsupported inputs.
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale as f64)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

/// The unfused reference of [`flash_attention_causal`] with one `kv_valid` for every batch
/// row: [`naive_attention`] with the K/V heads repeated to `q`'s (`[B, Hkv, S, D]` →
/// `[B, H, S, D]`) and query `i` seeing keys `0..=min(i, kv_valid - 1)`, in the inputs' dtype.
/// Returns `[B, H, S, D]`.
pub fn naive_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kv_valid: usize,
) -> Result<Tensor> {
    let (_, h, s, _) = q.dims4()?;
    let repeat_heads = |t: &Tensor| -> Result<Tensor> {
        let (b, hk, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, hk, h / hk, s, d))?
            .reshape((b, h, s, d))
    };
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= i.min(kv_valid.saturating_sub(1)) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, s, s), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.contiguous()?.matmul(&repeat_heads(k)?.t()?)? * scale as f64)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    probs.matmul(&repeat_heads(v)?)
}

/// Attention without mask for `q: [B, H, Sq, D]`, `k, v: [B, H, Sk, D]`, returning
/// `[B, H, Sq, D]` (contiguous) in q's dtype.
///
/// On CUDA with bf16/f16 inputs, a head dim that is a multiple of 8 up to 256 and a scale > 0
/// this runs the fused kernel (f32 accumulation, probabilities rounded to the input dtype before the P·V
/// product, as in FlashAttention); otherwise (CPU, f32, other head dims) it computes
/// [`naive_attention`].
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    if !kernel_applies(q, k, v, scale) {
        return naive_attention(q, k, v, scale);
    }
    run_kernel(q, k, v, scale, AttnLayout::Bhsd, None)
}

/// Like [`flash_attention`] but for the `[B, S, H, D]` layout (inputs and output), which is how
/// the QKV projections lay out their result: no transposes are needed around the kernel.
pub fn flash_attention_bshd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    if !kernel_applies(q, k, v, scale) {
        let t = |x: &Tensor| x.transpose(1, 2);
        return naive_attention(&t(q)?, &t(k)?, &t(v)?, scale)?
            .transpose(1, 2)?
            .contiguous();
    }
    run_kernel(q, k, v, scale, AttnLayout::Bshd, None)
}

fn kernel_applies(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> bool {
    is_supported(q, k, v) && scale > 0.0 && scale.is_finite()
}

fn run_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    layout: AttnLayout,
    config: Option<KernelConfig>,
) -> Result<Tensor> {
    let (q, k, v) = (kernel_ready(q)?, kernel_ready(k)?, kernel_ready(v)?);
    q.apply_op3_no_bwd(
        &k,
        &v,
        &FlashAttn {
            scale,
            layout,
            config,
            causal: None,
        },
    )
}

/// Whether the causal kernel runs for this device, head dim and dtype: CUDA, bf16/f16, head
/// dim a multiple of 8 up to 256, our kernels usable, and the kernel compiled and loaded (the
/// first call compiles it, later ones hit the caches). Callers decide their mask form with it
/// before any tensor exists; if the kernel cannot load they keep their reference path (with
/// one warning) instead of failing.
pub fn causal_kernel_ready(device: &Device, head_dim: usize, dtype: DType) -> bool {
    // (head dim, dtype) → whether the kernel loaded and passed its self-check.
    static READY: std::sync::Mutex<Vec<((usize, DType), bool)>> = std::sync::Mutex::new(Vec::new());
    let Device::Cuda(dev) = device else {
        return false;
    };
    let Some(cfg) = KernelConfig::causal_for_head_dim(head_dim) else {
        return false;
    };
    if !kernel_handles(head_dim, dtype) {
        return false;
    }
    let Ok(mut ready) = READY.lock() else {
        return false;
    };
    if let Some(&(_, ok)) = ready.iter().find(|(key, _)| *key == (head_dim, dtype)) {
        return ok;
    }
    let checked =
        load_kernel(dev, &cfg, dtype).and_then(|_| causal_self_check(device, head_dim, dtype));
    if let Err(e) = &checked {
        eprintln!(
            "warning: the causal attention kernel failed to load or its self-check ({e}); the \
             text encoder uses candle's ops"
        );
    }
    ready.push(((head_dim, dtype), checked.is_ok()));
    checked.is_ok()
}

/// The causal kernel against f32 masked attention on a small problem (two query blocks,
/// right padding inside the first key tile's range, grouped K/V heads), once per process
/// before the text encoder relies on it: a driver or NVRTC we have not run on degrades to the
/// reference path instead of a wrong prompt embedding.
fn causal_self_check(device: &Device, head_dim: usize, dtype: DType) -> Result<()> {
    let (h, kv_heads, s, real) = (4, 2, 150, 100);
    let rand =
        |heads: usize| Tensor::randn(0f32, 1f32, (1, heads, s, head_dim), device)?.to_dtype(dtype);
    let (q, k, v) = (rand(h)?, rand(kv_heads)?, rand(kv_heads)?);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // The [B, S, H, D] entry the text encoder uses, on contiguous [B, S, H, D] copies.
    let bshd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let ours = flash_attention_causal_bshd(&bshd(&q)?, &bshd(&k)?, &bshd(&v)?, scale, &[real])?
        .transpose(1, 2)?
        .to_dtype(DType::F32)?;
    // The same rounded values in f32.
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let reference = naive_causal_attention(&f(&q)?, &f(&k)?, &f(&v)?, scale, real)?;
    check_close(&ours, &reference, "f32 masked attention")
}

/// The causal kernel's name for this head dim and dtype (what [`causal_kernel_ready`] loads).
pub fn causal_kernel_name(head_dim: usize, dtype: DType) -> Option<String> {
    KernelConfig::causal_for_head_dim(head_dim).map(|cfg| cfg.kernel_name(dtype))
}

/// Whether [`flash_attention_causal`] runs on these `[B, H, S, D]` inputs: [`is_supported`]'s
/// conditions, with `k`/`v` allowed fewer heads than `q` (a divisor: grouped-query attention)
/// and Sq = Sk.
pub fn causal_is_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    causal_supported_in(q, k, v, AttnLayout::Bhsd)
}

fn causal_supported_in(q: &Tensor, k: &Tensor, v: &Tensor, layout: AttnLayout) -> bool {
    let (Ok(qd), Ok(kd)) = (q.dims4(), k.dims4()) else {
        return false;
    };
    // (batch, heads, seq, head dim) whatever the layout.
    let bhsd = |(b, x, y, d): (usize, usize, usize, usize)| match layout {
        AttnLayout::Bhsd => (b, x, y, d),
        AttnLayout::Bshd => (b, y, x, d),
    };
    let ((b, h, s, d), (kb, kh, ks, kd)) = (bhsd(qd), bhsd(kd));
    operands_on_kernel(q, k, v, d)
        && kh > 0
        && h % kh == 0
        && (kb, ks, kd) == (b, s, d)
        && v.dims() == k.dims()
}

/// Causal attention over right-padded sequences, `q` `[B, H, S, D]`, `k`/`v` `[B, Hkv, S, D]`
/// (`H` a multiple of `Hkv`: query head `h` reads K/V head `h / (H / Hkv)`), for the text
/// encoder: in batch row `b`, query `i` sees key `j` iff `j <= i` and `j < kv_valid[b]` (the
/// row's real tokens come first). Returns `[B, H, S, D]` in q's dtype. Needs
/// [`causal_is_supported`] and `1 <= kv_valid[b] <= S`.
///
/// Numerics as [`flash_attention`]'s: f32 scores and softmax statistics, probabilities
/// rounded to the input dtype for P·V with f32 accumulation, like the FlashAttention /
/// memory-efficient kernels torch's SDPA runs for a masked bf16 call on CUDA.
pub fn flash_attention_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kv_valid: &[usize],
) -> Result<Tensor> {
    causal_in(q, k, v, scale, kv_valid, AttnLayout::Bhsd)
}

/// [`flash_attention_causal`] in the `[B, S, H, D]` layout (inputs and output), as the
/// projections produce it: no transposes around the kernel.
pub fn flash_attention_causal_bshd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kv_valid: &[usize],
) -> Result<Tensor> {
    causal_in(q, k, v, scale, kv_valid, AttnLayout::Bshd)
}

fn causal_in(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kv_valid: &[usize],
    layout: AttnLayout,
) -> Result<Tensor> {
    if !causal_supported_in(q, k, v, layout) {
        bail!(
            "causal flash attention: unsupported inputs q {:?} {:?}, k {:?}, v {:?} ({layout:?}) on {:?}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims(),
            q.device().location()
        )
    }
    let b = q.dim(0)?;
    if kv_valid.len() != b {
        bail!(
            "causal flash attention: {} kv_valid lengths for a batch of {b}",
            kv_valid.len()
        )
    }
    let heads_dim = match layout {
        AttnLayout::Bhsd => 1,
        AttnLayout::Bshd => 2,
    };
    let kv_group = q.dim(heads_dim)? / k.dim(heads_dim)?;
    // One launch per batch row: the rows' padding differs (prompt and negative prompt).
    let rows = (0..b)
        .map(|i| {
            let (q, k, v) = (
                kernel_ready(&q.narrow(0, i, 1)?)?,
                kernel_ready(&k.narrow(0, i, 1)?)?,
                kernel_ready(&v.narrow(0, i, 1)?)?,
            );
            q.apply_op3_no_bwd(
                &k,
                &v,
                &FlashAttn {
                    scale,
                    layout,
                    config: None,
                    causal: Some(CausalMask {
                        kv_valid: kv_valid[i],
                        kv_group,
                    }),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0) // one row: returned as is
}
