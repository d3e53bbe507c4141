//! The normalisations: LayerNorm + modulation (the transformer's), RMSNorm (Qwen3's, and the
//! transformer's q/k RMSNorm + RoPE straight from the projections) and GroupNorm(+SiLU) (the
//! VAE's).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::{
    bail, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    StorageRef, Tensor,
};
use half::bf16;

use super::pointwise::{row_wise, RowWise};
use super::{cuda_only, launch, KERNEL_SOURCE};
use crate::cuda::launch::{
    cuda_only_cpu_fwd, grid_for, grid_planes, grid_warp_rows, source_define, uninit, view, wrap,
    THREADS,
};

/// Largest row the LayerNorm kernel holds in registers (threads per block ×
/// `LN_MAX_PER_THREAD` of fused.cu).
pub const LAYERNORM_MAX_DIM: usize =
    THREADS as usize * source_define(KERNEL_SOURCE, "LN_MAX_PER_THREAD");

/// Thread blocks of the GroupNorm statistics pass per (batch, group).
const GN_SPLITS: usize = source_define(KERNEL_SOURCE, "GN_SPLITS");

// ---------------------------------------------------------------- LayerNorm + modulation

/// `(1 + scale) * LayerNorm(x) + shift` (LayerNorm without affine, f32 statistics) for
/// x `[B, N, D]` (D ≤ [`LAYERNORM_MAX_DIM`]) and scale/shift `[B, 1, D]`, with torch's four
/// roundings (LayerNorm output, `1 + scale`, the product, the sum).
pub fn layernorm_modulate(x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f32) -> Result<Tensor> {
    let op = RowWise {
        kernel: "layernorm_modulate_bf16",
        b_is_rows: false,
        eps: Some(eps),
        max_d: LAYERNORM_MAX_DIM,
    };
    row_wise(op, x, scale, shift)
}

// ---------------------------------------------------------------- RMSNorm (Qwen3)

/// Qwen3's RMSNorm: `weight * bf16(x * rsqrt(mean(x²) + eps))` over the last dim, the
/// normalisation in f32 and rounded, then multiplied by the bf16 `weight` `[D]` and rounded
/// (transformers' `Qwen3RMSNorm`), in one pass. `x` is made contiguous.
pub fn rms_norm_scale(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNormScale { eps })
}

struct RmsNormScale {
    eps: f32,
}

impl CustomOp2 for RmsNormScale {
    fn name(&self) -> &'static str {
        "flux2-rmsnorm-scale"
    }

    cuda_only_cpu_fwd!(2, self, cuda_only("rms_norm_scale"));

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&0);
        if d == 0 || !xl.is_contiguous() || wl.dims() != [d] || !wl.is_contiguous() {
            bail!(
                "rms_norm_scale: needs contiguous x [.., D] and weight [D], got {:?} and {:?}",
                xl.dims(),
                wl.dims()
            )
        }
        let rows = xl.shape().elem_count() / d;
        let cfg = grid_warp_rows(rows)?;
        if d > i32::MAX as usize {
            bail!("rms_norm_scale: rows of {d} do not fit one launch")
        }
        let dev = xs.device();
        // SAFETY: one warp per row writes the whole row.
        let out = unsafe { uninit::<bf16>(dev, rows * d)? };
        // SAFETY: the arguments match `rmsnorm_scale_bf16`, one warp per row.
        unsafe {
            launch(
                dev,
                "rmsnorm_scale_bf16",
                cfg,
                &[
                    &view::<bf16>(xs, xl)?,
                    &view::<bf16>(ws, wl)?,
                    &out,
                    &(rows as i64),
                    &(d as i32),
                    &self.eps,
                ],
            )
        }?;
        Ok((wrap(out, dev), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------- q/k RMSNorm + RoPE

/// One token segment of [`rmsnorm_rope`]: `x` `[B, S, H, D]` (bf16, last dim contiguous, any
/// other strides) and its RMSNorm weight (f32 `[D]`).
pub struct NormSegment<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The q/k RMSNorm (candle's `rms_norm` arithmetic: f32, weight applied in f32, one rounding)
/// followed by the interleaved-pair RoPE of [`super::rope_bshd`], in one pass. With two
/// segments (the double-stream blocks' text and image tokens, each with its own norm weight)
/// the output is their concatenation along the tokens, `[B, S0+S1, H, D]`, and `cos`/`sin` are
/// the joint `[S0+S1, D/2]` tables. Inputs may be strided views (no copy).
pub fn rmsnorm_rope(
    segments: &[NormSegment],
    cos: &Tensor,
    sin: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    cos.apply_op1_no_bwd(&RmsNormRope { segments, sin, eps })
}

/// The op: the cos table is the custom op's input; the rest is held here.
struct RmsNormRope<'a> {
    segments: &'a [NormSegment<'a>],
    sin: &'a Tensor,
    eps: f32,
}

fn cuda_storage(t: &Tensor) -> Result<(StorageRef<'_>, &Layout)> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cuda(_)) {
        bail!("rmsnorm_rope: every input must be on the CUDA device")
    }
    Ok((storage, layout))
}

fn as_cuda(s: &Storage) -> &CudaStorage {
    match s {
        Storage::Cuda(c) => c,
        _ => unreachable!("checked by cuda_storage"),
    }
}

impl CustomOp1 for RmsNormRope<'_> {
    fn name(&self) -> &'static str {
        "flux2-rmsnorm-rope"
    }

    cuda_only_cpu_fwd!(1, self, cuda_only("rmsnorm_rope"));

    fn cuda_fwd(&self, cs: &CudaStorage, cl: &Layout) -> Result<(CudaStorage, Shape)> {
        let n_seg = self.segments.len();
        if !(1..=2).contains(&n_seg) {
            bail!("rmsnorm_rope: one or two segments, got {n_seg}")
        }
        let (b, _, h, d) = self.segments[0].x.dims4()?;
        if !d.is_multiple_of(32) {
            bail!("rmsnorm_rope: head dim {d} must be a multiple of 32")
        }
        let mut lens = [0usize; 2];
        let mut strides = [[0i64; 3]; 2];
        let guards: Vec<_> = self
            .segments
            .iter()
            .map(|seg| Ok((cuda_storage(seg.x)?, cuda_storage(seg.weight)?)))
            .collect::<Result<_>>()?;
        for (i, (seg, ((xs, xl), (ws, wl)))) in self.segments.iter().zip(&guards).enumerate() {
            let (sb, ss, sh, sd) = xl.shape().dims4()?;
            let st = xl.stride();
            if (sb, sh, sd) != (b, h, d) || st[3] != 1 {
                bail!(
                    "rmsnorm_rope: segment {i} {:?} (strides {st:?}) does not match [B={b}, S, H={h}, D={d}] with a contiguous last dim",
                    seg.x.dims()
                )
            }
            if as_cuda(xs).dtype() != DType::BF16
                || as_cuda(ws).dtype() != DType::F32
                || !wl.is_contiguous()
                || wl.shape().elem_count() != d
            {
                bail!("rmsnorm_rope: x must be bf16 and the weight a contiguous f32 [{d}]")
            }
            lens[i] = ss;
            strides[i] = [st[0] as i64, st[1] as i64, st[2] as i64];
        }
        let s_total = lens[0] + lens[1];
        let (sin_s, sin_l) = cuda_storage(self.sin)?;
        if !cl.is_contiguous()
            || !sin_l.is_contiguous()
            || cl.dims() != [s_total, d / 2]
            || sin_l.dims() != [s_total, d / 2]
            || cs.dtype() != DType::F32
            || as_cuda(&sin_s).dtype() != DType::F32
        {
            bail!(
                "rmsnorm_rope: cos/sin must be contiguous f32 [S={s_total}, D/2={}], got {:?}/{:?}",
                d / 2,
                cl.dims(),
                sin_l.dims()
            )
        }
        let dev = cs.device();
        let rows = b * s_total * h;
        let x: Vec<CudaView<bf16>> = guards
            .iter()
            .map(|((xs, xl), _)| view(as_cuda(xs), xl))
            .collect::<Result<_>>()?;
        let w: Vec<CudaView<f32>> = guards
            .iter()
            .map(|(_, (ws, wl))| view(as_cuda(ws), wl))
            .collect::<Result<_>>()?;
        // With one segment, the second is the first again (the kernel never reads it).
        let last = n_seg - 1;
        let [s0, s1] = [strides[0], strides[last]];
        // SAFETY: each warp writes its whole output row.
        let out = unsafe { uninit::<bf16>(dev, rows * d)? };
        // SAFETY: the arguments match `rmsnorm_rope_bf16`, and every row < rows has a warp.
        unsafe {
            launch(
                dev,
                "rmsnorm_rope_bf16",
                grid_warp_rows(rows)?,
                &[
                    &x[0],
                    &x[last],
                    &w[0],
                    &w[last],
                    &view::<f32>(cs, cl)?,
                    &view::<f32>(as_cuda(&sin_s), sin_l)?,
                    &out,
                    &(rows as i64),
                    &(lens[0] as i32),
                    &(s_total as i32),
                    &(h as i32),
                    &(d as i32),
                    &s0[0],
                    &s0[1],
                    &s0[2],
                    &s1[0],
                    &s1[1],
                    &s1[2],
                    &self.eps,
                ],
            )
        }?;
        Ok((wrap(out, dev), Shape::from((b, s_total, h, d))))
    }
}

// ---------------------------------------------------------------- GroupNorm (+ SiLU)

/// `GroupNorm(groups, eps)` with f32 affine `weight`/`bias` (`[C]`), optionally followed by
/// SiLU (`silu(bf16(norm))`, rounded again), for bf16 `[B, C, H, W]`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    x.contiguous()?.apply_op3_no_bwd(
        &weight.flatten_all()?.contiguous()?,
        &bias.flatten_all()?.contiguous()?,
        &op,
    )
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "flux2-group-norm"
    }

    cuda_only_cpu_fwd!(3, self, cuda_only("group_norm"));

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let g = self.groups;
        if !xl.is_contiguous() || g == 0 || c % g != 0 {
            bail!("group_norm: needs contiguous [B,C,H,W] with C divisible by {g}")
        }
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            bail!("group_norm: weight/bias must have {c} elements")
        }
        if ws.dtype() != DType::F32 || bs.dtype() != DType::F32 {
            bail!("group_norm: weight/bias must be f32")
        }
        let dev = xs.device();
        let hw = h * w;
        let x = view::<bf16>(xs, xl)?;
        let splits = GN_SPLITS as i32;
        // SAFETY: every (batch, group, split) block writes its three statistics, every
        // (batch, group) thread of the second pass its two, the third pass every element.
        let (partial, stats, out) = unsafe {
            (
                uninit::<f32>(dev, b * g * GN_SPLITS * 3)?,
                uninit::<f32>(dev, b * g * 2)?,
                uninit::<bf16>(dev, b * c * hw)?,
            )
        };
        let partial_cfg = LaunchConfig {
            grid_dim: ((b * g) as u32, GN_SPLITS as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `gn_partial_bf16`, whose block is THREADS wide (its
        // GN_THREADS).
        unsafe {
            launch(
                dev,
                "gn_partial_bf16",
                partial_cfg,
                &[&x, &partial, &(((c / g) * hw) as i64), &splits],
            )
        }?;
        // SAFETY: the arguments match `gn_finalize`; one thread per (batch, group).
        unsafe {
            launch(
                dev,
                "gn_finalize",
                grid_for(b * g),
                &[&partial, &stats, &((b * g) as i32), &splits, &self.eps],
            )
        }?;
        // SAFETY: the arguments match `gn_apply_bf16`; the grid-stride loop covers every
        // element of every plane.
        unsafe {
            launch(
                dev,
                "gn_apply_bf16",
                grid_planes(b * c, hw)?,
                &[
                    &x,
                    &stats,
                    &view::<f32>(ws, wl)?,
                    &view::<f32>(bs, bl)?,
                    &out,
                    &(c as i32),
                    &(hw as i64),
                    &(g as i32),
                    &(self.silu as i32),
                ],
            )
        }?;
        Ok((wrap(out, dev), xl.shape().clone()))
    }
}
