//! Fused (flash-attention style) scaled dot-product attention forward pass for CUDA.
//!
//! candle 0.11.1 has no attention op on CUDA (candle-nn's `sdpa` is Metal-only) and
//! candle-flash-attn cannot be built here (its CUTLASS kernels take hours), so the Flux2
//! transformer's `softmax(q kᵀ · scale) v` would otherwise materialise a `[B, H, S, S]` score
//! tensor (24 × 4608² bf16 = 1 GiB per block at 1024², and three full passes over it).
//!
//! The kernel (`kernels/flash_attn.cu`, embedded with `include_str!`) is compiled once per
//! process and device architecture with NVRTC and loaded through candle's per-device module
//! cache. See the header of `flash_attn.cu` for the algorithm (FlashAttention-2: query tiles
//! per thread block, K/V tiles double-buffered in shared memory with `cp.async`, `mma.sync`
//! m16n8k16 on the tensor cores, f32 online softmax with exp2 of log2(e)-prescaled scores). In
//! short:
//!
//! * **Why online softmax**: the row max and row sum are updated tile by tile (rescaling the
//!   partial output by `2^(m_old - m_new)`), so a query block reads each K/V tile once and the
//!   score matrix never exists in memory: O(S) memory traffic per query tile instead of O(S²).
//! * **Tile sizes** (chosen by timing B=1, H=24, S=4608, D=128 on an H100 with
//!   `scripts/gpu/gpu_attention_check.sh kernel`; measured: BENCHMARKS.md, 2026-11-26): for
//!   D = 128, 128 query rows per block (4 warps × 32 rows, two m16 MMA slices per warp, so
//!   every K/V fragment read from shared memory feeds two MMAs) and 64 keys per K/V tile:
//!   96 KiB of shared memory with double buffering, 2 blocks per SM. Smaller head dims use
//!   64-row blocks (speed does not matter there), D = 256 uses 32-key tiles to stay within the
//!   register file. Head dims that are not 16/32/64/128/256 run in the next larger instance
//!   with the extra columns zero-filled, so every head dim that is a multiple of 8 up to 256
//!   is supported.
//! * **Hopper variant** (the default on compute capability 9.0 for bf16, head dim 128): the
//!   same algorithm on warpgroup MMAs (`wgmma.mma_async`, compiled for `compute_90a`), 128
//!   query rows per warpgroup pair and 128 keys per tile, faster there than the mma.sync kernel
//!   and PyTorch's FlashAttention-2 (measured: BENCHMARKS.md, 2026-11-26). Emulated on the CPU
//!   in CI and self-checked against f32 attention when it loads (the mma.sync kernel runs if
//!   that fails). [`crate::ops::AttentionKernel`] selects 64-key tiles or the mma.sync kernel.
//! * **Causal variant** (the text encoder's): the mma.sync tiling with a causal mask over
//!   right-padded rows and grouped K/V heads, compiled as its own module, self-checked too.
//!
//! Inputs may be strided (views from `narrow`/`transpose`) as long as the head dim is the
//! innermost, contiguous dimension and every other stride is a multiple of 8 elements (16-byte
//! chunks); anything else is made contiguous first. [`AttnLayout::Bshd`] takes and returns the
//! `[B, S, H, D]` layout directly, which saves the two transposes around attention.
//!
//! The parts: `select` (which kernel), `op` (the custom op and its launch), `self_check` (the
//! load-time checks and the naive references).

mod op;
mod select;
mod self_check;

pub use self_check::{naive_attention, naive_causal_attention};

pub(crate) use select::compiled_variants;

use candle_core::{bail, CudaDevice, DType, Device, Result, Tensor, D};

use select::{KernelConfig, MAX_HEAD_DIM};

/// Memory layout of the four attention tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnLayout {
    /// `[batch, heads, seq, head_dim]` (candle-transformers' convention).
    Bhsd,
    /// `[batch, seq, heads, head_dim]` (the layout the QKV projections produce).
    Bshd,
}

/// Which keys each query sees. Room is left for the KV-cache issue (#22): a reference-isolation
/// mask (reference queries see only reference keys) and cached K/V appended to the keys.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum AttnMask<'a> {
    /// Every query sees every key.
    None,
    /// Causal with right padding per batch row (Qwen3): in row `b`, query `i` sees key `j`
    /// iff `j <= i` and `j < kv_valid[b]`; k/v may have fewer heads than q (a divisor: GQA).
    Causal { kv_valid: &'a [usize] },
}

/// How [`flash_attention`] attends: the score scale, the tensors' layout and the mask.
#[derive(Clone, Copy, Debug)]
pub struct FlashParams<'a> {
    /// Multiplies the scores `q kᵀ` (usually `1 / √D`).
    pub scale: f32,
    /// The layout of q, k, v and the output.
    pub layout: AttnLayout,
    pub mask: AttnMask<'a>,
}

/// Scaled dot-product attention of `q`, `k`, `v` in `params.layout`, returning the output in
/// the same layout (contiguous) and q's dtype.
///
/// * [`AttnMask::None`]: `q` `[B, H, Sq, D]`, `k`/`v` `[B, H, Sk, D]` (or `[B, S, H, D]`). On
///   CUDA with bf16/f16 inputs, a head dim that is a multiple of 8 up to 256 and a scale > 0
///   this runs the fused kernel (f32 accumulation, probabilities rounded to the input dtype
///   before the P·V product, as in FlashAttention); otherwise (CPU, f32, other head dims) it
///   computes [`naive_attention`] in the same layout.
/// * [`AttnMask::Causal`]: `k`/`v` may have `Hkv` heads, a divisor of q's (query head `h`
///   reads K/V head `h / (H / Hkv)`), Sq = Sk, one `kv_valid` per batch row with
///   `1 <= kv_valid[b] <= S`. Numerics as above, like the FlashAttention / memory-efficient
///   kernels torch's SDPA runs for a masked bf16 call on CUDA. Inputs [`is_supported`] rejects
///   are an error (the caller keeps its reference path: see [`causal_kernel_ready`]).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, params: &FlashParams) -> Result<Tensor> {
    let FlashParams {
        scale,
        layout,
        mask,
    } = *params;
    let supported = is_supported(q, k, v, params);
    match mask {
        AttnMask::None if supported => op::run(q, k, v, scale, layout, None),
        AttnMask::None => match layout {
            AttnLayout::Bhsd => naive_attention(q, k, v, scale),
            AttnLayout::Bshd => {
                let t = |x: &Tensor| x.transpose(1, 2);
                naive_attention(&t(q)?, &t(k)?, &t(v)?, scale)?
                    .transpose(1, 2)?
                    .contiguous()
            }
        },
        AttnMask::Causal { kv_valid } if supported => {
            op::run_causal(q, k, v, scale, layout, kv_valid)
        }
        AttnMask::Causal { .. } => bail!(
            "causal flash attention: unsupported inputs q {:?} {:?}, k {:?}, v {:?} ({layout:?}) \
             on {:?}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims(),
            q.device().location()
        ),
    }
}

/// Whether [`flash_attention`] runs the kernel for these inputs: CUDA, bf16/f16, k and v of
/// q's dtype on q's device, rank 4, a head dim that is a multiple of 8 up to 256, a finite
/// scale > 0, our kernels usable here; without a mask the same head dim for q, k and v, with
/// the causal mask K/V heads dividing q's heads and K/V of q's batch, length and head dim.
pub fn is_supported(q: &Tensor, k: &Tensor, v: &Tensor, params: &FlashParams) -> bool {
    if !(params.scale > 0.0 && params.scale.is_finite()) {
        return false;
    }
    match params.mask {
        AttnMask::None => {
            let d = q.dim(D::Minus1).unwrap_or(0);
            operands_on_kernel(q, k, v, d)
                && q.rank() == 4
                && k.rank() == 4
                && v.rank() == 4
                && k.dims()[3] == d
                && v.dims()[3] == d
        }
        AttnMask::Causal { .. } => causal_supported(q, k, v, params.layout),
    }
}

/// The causal kernel's conditions on `[B, H, S, D]` (or `[B, S, H, D]`) inputs.
fn causal_supported(q: &Tensor, k: &Tensor, v: &Tensor, layout: AttnLayout) -> bool {
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

/// The name of the kernel attention with this head dim and dtype runs on `dev`, with the
/// causal mask if `causal` (the Hopper variant only once its self-check passed), or `None`
/// where no kernel runs (f32, unsupported head dims, kernels unusable): the naive path
/// without a mask, the caller's reference path with it.
pub fn kernel_name(
    dev: &CudaDevice,
    head_dim: usize,
    dtype: DType,
    causal: bool,
) -> Option<String> {
    if !kernel_handles(head_dim, dtype) {
        return None;
    }
    let cfg = if causal {
        KernelConfig::causal_for_head_dim(head_dim)
    } else {
        KernelConfig::select(dev, head_dim, dtype)
    };
    cfg.map(|cfg| cfg.kernel_name(dtype))
}

/// Compiles (NVRTC, cached) and loads the kernel for `head_dim` and `dtype` on `dev`; nothing
/// for a head dim the kernel does not cover (that model runs the naive path anyway). The
/// Hopper kernel the options ask for is first compared with f32 attention, once per process.
pub(crate) fn load_for(dev: &CudaDevice, head_dim: usize, dtype: DType) -> Result<()> {
    if let Some(cfg) = select::hopper_requested(dev, head_dim, dtype) {
        // Keep the mma.sync kernel (with a warning) if it fails to load or disagrees.
        match cfg
            .load(dev, dtype)
            .and_then(|_| self_check::hopper_self_check(dev, cfg))
        {
            Ok(()) => cfg.mark_self_checked(),
            Err(e) => crate::ops::warn(format!(
                "the Hopper attention kernel failed its self-check ({e}); using the mma.sync \
                 kernel"
            )),
        }
    }
    match KernelConfig::select(dev, head_dim, dtype) {
        Some(cfg) => cfg.load(dev, dtype).map(|_| ()),
        None => Ok(()),
    }
}

/// Whether the causal kernel runs for this device, head dim and dtype: CUDA, bf16/f16, head
/// dim a multiple of 8 up to 256, our kernels usable, and the kernel compiled, loaded and
/// self-checked (the first call does that, later ones hit the caches). Callers decide their
/// mask form with it before any tensor exists; if the kernel cannot load they keep their
/// reference path (with one warning, [`crate::ops::warn`]) instead of failing.
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
    let checked = cfg
        .load(dev, dtype)
        .and_then(|_| self_check::causal_self_check(device, head_dim, dtype));
    if let Err(e) = &checked {
        crate::ops::warn(format!(
            "the causal attention kernel failed to load or its self-check ({e}); the text \
             encoder uses candle's ops"
        ));
    }
    ready.push(((head_dim, dtype), checked.is_ok()));
    checked.is_ok()
}
