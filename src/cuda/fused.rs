//! Fused bf16 kernels (`fused.cu`) for the transformer's SwiGLU, modulation and RoPE and the
//! VAE's GroupNorm(+SiLU), each replacing a chain of candle ops that reads and writes the
//! whole activation several times (measured on an H200 at 1024²: SwiGLU 1.8 ms/call,
//! modulation 0.44 ms, RoPE + transposes 1 ms, GroupNorm+SiLU 8.7 ms before fusion).
//!
//! The kernels keep torch's roundings (spec §1). Callers use them when [`applies`] says so
//! (CUDA, bf16, not disabled with `FLUX2_KLEIN_FUSED=0`) and keep the candle path, which is
//! the reference the tests compare against, everywhere else.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor,
};
use half::bf16;

/// The CUDA source (no `#include`s).
pub const KERNEL_SOURCE: &str = include_str!("fused.cu");

const THREADS: u32 = 256;
/// Thread blocks of the GroupNorm statistics pass per (batch, group).
const GN_SPLITS: usize = 64;

/// Whether the fused kernels apply to `t`: a bf16 CUDA tensor, and not switched off with
/// `FLUX2_KLEIN_FUSED=0` (which falls back to the reference candle ops).
pub fn applies(t: &Tensor) -> bool {
    crate::ops::cuda_speedups_enabled()
        && super::kernels_usable()
        && t.device().is_cuda()
        && t.dtype() == DType::BF16
}

/// Compiles (NVRTC, cached) and loads every kernel of this module on `dev`.
pub(crate) fn load_all(dev: &CudaDevice) -> Result<()> {
    for f in FUNCTIONS {
        load(dev, f)?;
    }
    Ok(())
}

/// Every kernel of `fused.cu` this module launches (checked by [`super::check_kernels`]).
pub(crate) const FUNCTIONS: &[&str] = &[
    "swiglu_bf16",
    "modulate_bf16",
    "layernorm_modulate_bf16",
    "gated_residual_bf16",
    "rope_bshd_bf16",
    "rmsnorm_rope_bf16",
    "gn_partial_bf16",
    "gn_finalize",
    "gn_apply_bf16",
    "channel_bias_bf16",
    "silu_mul_bf16",
    "rmsnorm_scale_bf16",
];

fn load(dev: &CudaDevice, function: &str) -> Result<CudaFunction> {
    debug_assert!(
        FUNCTIONS.contains(&function),
        "{function} missing from FUNCTIONS"
    );
    super::nvrtc::load_function(dev, "fused", KERNEL_SOURCE, &[], function)
}

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread block per row (the row-wise kernels: `blockIdx.x` is the row).
fn grid_rows(rows: usize) -> Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        bail!("fused kernel: {rows} rows do not fit one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One warp per row, 8 warps per block (the row-wise kernels over short rows: `rmsnorm_rope`,
/// `rmsnorm_scale`; row = blockIdx.x * 8 + warp).
fn grid_warp_rows(rows: usize) -> Result<LaunchConfig> {
    const WARPS: usize = 8;
    if rows.div_ceil(WARPS) > i32::MAX as usize {
        bail!("fused kernel: {rows} rows do not fit one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS).max(1) as u32, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, bf16>> {
    Ok(s.as_cuda_slice::<bf16>()?.slice(l.start_offset()..))
}

fn view_f32<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
}

/// The error of a fused op's `cpu_fwd` (unreachable: callers use the candle ops on the CPU).
fn cuda_only(name: &str) -> String {
    format!("{name} is a CUDA-only fused kernel (callers use the candle ops on the CPU)")
}

// ---------------------------------------------------------------- SwiGLU

/// `[.., 2F]` rows of `u` (contiguous last dim, evenly spaced rows): (rows, F, row stride).
fn swiglu_rows(l: &Layout) -> Result<(usize, usize, usize)> {
    let (dims, stride) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 || stride[r - 1] != 1 || !dims[r - 1].is_multiple_of(2) {
        bail!("swiglu: needs [.., 2F] with a contiguous last dim, got {dims:?} / {stride:?}")
    }
    // Rows must be evenly spaced (a contiguous tensor or a narrow of the last dim).
    for i in 0..r - 2 {
        if stride[i] != stride[i + 1] * dims[i + 1] {
            bail!("swiglu: rows are not evenly spaced ({dims:?} / {stride:?})")
        }
    }
    Ok((
        dims[..r - 1].iter().product(),
        dims[r - 1] / 2,
        stride[r - 2],
    ))
}

/// Launches `swiglu_bf16` on `u` with an optional contiguous `[.., D]` prefix (same rows):
/// output rows `[prefix | swiglu(u)]`, shaped like `u` with a last dim of D + F.
fn launch_swiglu(
    (us, ul): (&CudaStorage, &Layout),
    prefix: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let (rows, f, row_stride) = swiglu_rows(ul)?;
    let d = match prefix {
        None => 0,
        Some((_, pl)) => {
            let pd = pl.dims();
            if !pl.is_contiguous() || pd[..pd.len() - 1] != ul.dims()[..ul.dims().len() - 1] {
                bail!(
                    "swiglu: the prefix {:?} must be contiguous with the rows of u {:?}",
                    pd,
                    ul.dims()
                )
            }
            pd[pd.len() - 1]
        }
    };
    let dev = us.device().clone();
    let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(rows * (d + f))? };
    let func = load(&dev, "swiglu_bf16")?;
    let u = view(us, ul)?;
    let p = prefix.map(|(ps, pl)| view(ps, pl)).transpose()?;
    let (d_i, f_i, rs) = (d as i32, f as i32, row_stride as i64);
    let launch = grid_rows(rows)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&u);
    match &p {
        Some(p) => b.arg(p),
        None => b.arg(&u), // never read with d = 0; any valid pointer will do
    };
    b.arg(&out);
    b.arg(&d_i);
    b.arg(&f_i);
    b.arg(&rs);
    // SAFETY: arguments match `swiglu_bf16`; one block per row writes the whole output row.
    unsafe { b.launch(launch) }.w()?;
    let mut shape = ul.dims().to_vec();
    *shape.last_mut().expect("rank >= 2") = d + f;
    Ok((bf16::wrap_cuda_slice(out, dev), shape.into()))
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "flux2-swiglu"
    }

    cuda_only_cpu_fwd!(1, self, cuda_only("swiglu"));

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        launch_swiglu((s, l), None)
    }
}

/// `cat([prefix, swiglu(u)], -1)` in one pass (arguments: u, prefix).
struct PrefixedSwiGlu;

impl CustomOp2 for PrefixedSwiGlu {
    fn name(&self) -> &'static str {
        "flux2-prefixed-swiglu"
    }

    cuda_only_cpu_fwd!(2, self, cuda_only("prefixed swiglu"));

    fn cuda_fwd(
        &self,
        us: &CudaStorage,
        ul: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        launch_swiglu((us, ul), Some((ps, pl)))
    }
}

/// `silu(u[.., :F]) * u[.., F:]` with torch's two roundings; `u` may be a narrow of a wider
/// projection (evenly spaced rows).
pub fn swiglu(u: &Tensor) -> Result<Tensor> {
    u.apply_op1_no_bwd(&SwiGlu)
}

/// `cat([prefix, swiglu(u)], -1)` (`prefix` `[.., D]` over the same rows as `u` `[.., 2F]`),
/// bit-identical to the two ops, in one pass: the single-stream block's attention output and
/// MLP activation side by side for its output projection.
pub fn prefixed_swiglu(prefix: &Tensor, u: &Tensor) -> Result<Tensor> {
    u.apply_op2_no_bwd(&prefix.contiguous()?, &PrefixedSwiGlu)
}

// ------------------------- the text encoder's SiLU·up and RMSNorm (Qwen3)

/// `silu(gate) * up` with torch's two roundings (`silu` in f32 rounded once, the product
/// rounded): Qwen3's MLP activation without the f32 round trip. `gate` and `up` same shape
/// (made contiguous).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "flux2-silu-mul"
    }

    cuda_only_cpu_fwd!(2, self, cuda_only("silu_mul"));

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if gl.dims() != ul.dims() || !gl.is_contiguous() || !ul.is_contiguous() {
            bail!(
                "silu_mul: gate {:?} and up {:?} must be contiguous and of one shape",
                gl.dims(),
                ul.dims()
            )
        }
        let n = gl.shape().elem_count();
        let dev = gs.device().clone();
        // SAFETY: the grid-stride loop writes every element below n.
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(n)? };
        let func = load(&dev, "silu_mul_bf16")?;
        let (g, u, n_i) = (view(gs, gl)?, view(us, ul)?, n as i64);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&g);
        b.arg(&u);
        b.arg(&out);
        b.arg(&n_i);
        // SAFETY: arguments match `silu_mul_bf16`; 8 elements per thread on the vector path.
        unsafe { b.launch(grid_for(n.div_ceil(8))) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), gl.shape().clone()))
    }
}

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
        let launch = grid_warp_rows(rows)?;
        if d > i32::MAX as usize {
            bail!("rms_norm_scale: rows of {d} do not fit one launch")
        }
        let dev = xs.device().clone();
        // SAFETY: one warp per row writes the whole row.
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(rows * d)? };
        let func = load(&dev, "rmsnorm_scale_bf16")?;
        let (x, w) = (view(xs, xl)?, view(ws, wl)?);
        let (rows_i, d_i) = (rows as i64, d as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&x);
        b.arg(&w);
        b.arg(&out);
        b.arg(&rows_i);
        b.arg(&d_i);
        b.arg(&self.eps);
        // SAFETY: arguments match `rmsnorm_scale_bf16`.
        unsafe { b.launch(launch) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

// ------------------------- modulation, LayerNorm + modulation, gated residual (row-wise)

/// Largest row the LayerNorm kernel holds in registers (`THREADS` × `LN_MAX_PER_THREAD`).
pub const LAYERNORM_MAX_DIM: usize = THREADS as usize * 16;

/// The row-wise kernels over `a` `[B, N, D]` with a second operand `b` (a per-batch vector
/// `[B, 1, D]`, or with `b_is_rows` a tensor shaped like `a`) and a per-batch vector `c`, all
/// contiguous bf16. Kernel arguments: `(a, b, c, out, rows_per_batch, d[, eps])`.
struct RowWise {
    kernel: &'static str,
    b_is_rows: bool,
    /// Passed as the last argument when set (the LayerNorm epsilon).
    eps: Option<f32>,
    max_d: usize,
}

impl CustomOp3 for RowWise {
    fn name(&self) -> &'static str {
        self.kernel
    }

    cuda_only_cpu_fwd!(3, self, cuda_only(self.kernel));

    fn cuda_fwd(
        &self,
        a_s: &CudaStorage,
        a_l: &Layout,
        b_s: &CudaStorage,
        b_l: &Layout,
        c_s: &CudaStorage,
        c_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let what = self.kernel;
        let (b, n, d) = a_l.shape().dims3()?;
        if ![a_l, b_l, c_l].iter().all(|l| l.is_contiguous()) {
            bail!("{what}: inputs must be contiguous")
        }
        let b_len = if self.b_is_rows { b * n * d } else { b * d };
        if b_l.shape().elem_count() != b_len || c_l.shape().elem_count() != b * d {
            bail!(
                "{what}: operands {:?} / {:?} do not match x {:?}",
                b_l.dims(),
                c_l.dims(),
                a_l.dims()
            )
        }
        if d > self.max_d {
            bail!("{what}: D = {d} > {}", self.max_d)
        }
        let dev = a_s.device().clone();
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * n * d)? };
        let func = load(&dev, what)?;
        let (x, y, z) = (view(a_s, a_l)?, view(b_s, b_l)?, view(c_s, c_l)?);
        let (rows_i, d_i) = (n as i64, d as i32);
        let launch = grid_rows(b * n)?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&x);
        bld.arg(&y);
        bld.arg(&z);
        bld.arg(&out);
        bld.arg(&rows_i);
        bld.arg(&d_i);
        if let Some(eps) = &self.eps {
            bld.arg(eps);
        }
        // SAFETY: the arguments match the kernel's signature (see `RowWise`), D is within the
        // kernel's limit; one block per row writes the whole row.
        unsafe { bld.launch(launch) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), a_l.shape().clone()))
    }
}

fn row_wise(op: RowWise, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &c.contiguous()?, &op)
}

/// `(1 + scale) * x + shift` for x `[B, N, D]` and scale/shift `[B, 1, D]`, each op rounded to
/// bf16 as torch does.
pub fn modulate(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let op = RowWise {
        kernel: "modulate_bf16",
        b_is_rows: false,
        eps: None,
        max_d: usize::MAX,
    };
    row_wise(op, x, scale, shift)
}

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

/// `x + gate * y` for x, y `[B, N, D]` and gate `[B, 1, D]`, with torch's two roundings.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let op = RowWise {
        kernel: "gated_residual_bf16",
        b_is_rows: true,
        eps: None,
        max_d: usize::MAX,
    };
    row_wise(op, x, y, gate)
}

// ---------------------------------------------------------------- RoPE ([B, S, H, D])

struct RopeBshd;

impl CustomOp3 for RopeBshd {
    fn name(&self) -> &'static str {
        "flux2-rope-bshd"
    }

    cuda_only_cpu_fwd!(3, self, cuda_only("rope_bshd"));

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, s, h, d) = xl.shape().dims4()?;
        if !xl.is_contiguous() || !cl.is_contiguous() || !sl.is_contiguous() || d % 2 != 0 {
            bail!("rope_bshd: needs contiguous x [B,S,H,D] (D even) and tables")
        }
        if cl.dims() != [s, d / 2] || sl.dims() != [s, d / 2] {
            bail!(
                "rope_bshd: tables {:?}/{:?} do not match [S={s}, D/2={}]",
                cl.dims(),
                sl.dims(),
                d / 2
            )
        }
        if cs.dtype() != DType::F32 || ss.dtype() != DType::F32 {
            bail!("rope_bshd: cos/sin tables must be f32")
        }
        let dev = xs.device().clone();
        let total = b * s * h * d;
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(total)? };
        let func = load(&dev, "rope_bshd_bf16")?;
        let (x, c, sn) = (view(xs, xl)?, view_f32(cs, cl)?, view_f32(ss, sl)?);
        let (pairs, s_i, h_i, half) = ((total / 2) as i64, s as i32, h as i32, (d / 2) as i32);
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&x);
        bld.arg(&c);
        bld.arg(&sn);
        bld.arg(&out);
        bld.arg(&pairs);
        bld.arg(&s_i);
        bld.arg(&h_i);
        bld.arg(&half);
        // SAFETY: arguments match `rope_bshd_bf16`; every output element is written.
        unsafe { bld.launch(grid_for(total / 2)) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// Interleaved-pair RoPE on `[B, S, H, D]` (the projections' own layout, so no transposes)
/// with f32 `cos`/`sin` tables `[S, D/2]`, computed in f32 and rounded once.
pub fn rope_bshd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeBshd)
}

// ---------------------------------------------------------------- q/k RMSNorm + RoPE

/// One token segment of [`rmsnorm_rope`]: `x` `[B, S, H, D]` (bf16, last dim contiguous, any
/// other strides) and its RMSNorm weight (f32 `[D]`).
pub struct NormSegment<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The op: the cos table is the custom op's input; the rest is held here.
struct RmsNormRope<'a> {
    segments: &'a [NormSegment<'a>],
    sin: &'a Tensor,
    eps: f32,
}

fn cuda_storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, candle_core::Storage::Cuda(_)) {
        bail!("rmsnorm_rope: every input must be on the CUDA device")
    }
    Ok((storage, layout))
}

fn as_cuda(s: &candle_core::Storage) -> &CudaStorage {
    match s {
        candle_core::Storage::Cuda(c) => c,
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
        let dev = cs.device().clone();
        let rows = b * s_total * h;
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(rows * d)? };
        let func = load(&dev, "rmsnorm_rope_bf16")?;
        let x_views: Vec<CudaView<bf16>> = guards
            .iter()
            .map(|((xs, xl), _)| view(as_cuda(xs), xl))
            .collect::<Result<_>>()?;
        let w_views: Vec<CudaView<f32>> = guards
            .iter()
            .map(|(_, (ws, wl))| view_f32(as_cuda(ws), wl))
            .collect::<Result<_>>()?;
        let last = n_seg - 1;
        let (c, sn) = (view_f32(cs, cl)?, view_f32(as_cuda(&sin_s), sin_l)?);
        let (rows_i, s0, s_len, h_i, d_i) = (
            rows as i64,
            lens[0] as i32,
            s_total as i32,
            h as i32,
            d as i32,
        );
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&x_views[0]);
        bld.arg(&x_views[last]);
        bld.arg(&w_views[0]);
        bld.arg(&w_views[last]);
        bld.arg(&c);
        bld.arg(&sn);
        bld.arg(&out);
        bld.arg(&rows_i);
        bld.arg(&s0);
        bld.arg(&s_len);
        bld.arg(&h_i);
        bld.arg(&d_i);
        for st in &strides[0] {
            bld.arg(st);
        }
        for st in &strides[last] {
            bld.arg(st);
        }
        bld.arg(&self.eps);
        let launch = grid_warp_rows(rows)?;
        // SAFETY: arguments match `rmsnorm_rope_bf16`; each warp writes its whole output row,
        // and every row < rows has a warp.
        unsafe { bld.launch(launch) }.w()?;
        Ok((
            bf16::wrap_cuda_slice(out, dev),
            Shape::from((b, s_total, h, d)),
        ))
    }
}

/// The q/k RMSNorm (candle's `rms_norm` arithmetic: f32, weight applied in f32, one rounding)
/// followed by the interleaved-pair RoPE of [`rope_bshd`], in one pass. With two segments
/// (the double-stream blocks' text and image tokens, each with its own norm weight) the
/// output is their concatenation along the tokens, `[B, S0+S1, H, D]`, and `cos`/`sin` are
/// the joint `[S0+S1, D/2]` tables. Inputs may be strided views (no copy).
pub fn rmsnorm_rope(
    segments: &[NormSegment],
    cos: &Tensor,
    sin: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    cos.apply_op1_no_bwd(&RmsNormRope { segments, sin, eps })
}

// ---------------------------------------------------------------- GroupNorm (+ SiLU)

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
        let dev = xs.device().clone();
        let hw = h * w;
        let group_len = (c / g) * hw;
        let total = b * c * hw;
        let x = view(xs, xl)?;
        let stream = dev.cuda_stream();

        let partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(b * g * GN_SPLITS * 3)? };
        let stats: CudaSlice<f32> = unsafe { dev.alloc::<f32>(b * g * 2)? };
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(total)? };

        let f_partial = load(&dev, "gn_partial_bf16")?;
        let (gl, splits) = (group_len as i64, GN_SPLITS as i32);
        let mut bld = stream.launch_builder(&f_partial);
        bld.arg(&x);
        bld.arg(&partial);
        bld.arg(&gl);
        bld.arg(&splits);
        let cfg = LaunchConfig {
            grid_dim: ((b * g) as u32, GN_SPLITS as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `gn_partial_bf16` (blockDim = GN_THREADS = 256).
        unsafe { bld.launch(cfg) }.w()?;

        let f_final = load(&dev, "gn_finalize")?;
        let (gt, eps) = ((b * g) as i32, self.eps);
        let mut bld = stream.launch_builder(&f_final);
        bld.arg(&partial);
        bld.arg(&stats);
        bld.arg(&gt);
        bld.arg(&splits);
        bld.arg(&eps);
        // SAFETY: arguments match `gn_finalize`; one thread per (batch, group).
        unsafe { bld.launch(grid_for(b * g)) }.w()?;

        let f_apply = load(&dev, "gn_apply_bf16")?;
        let (wv, bv) = (view_f32(ws, wl)?, view_f32(bs, bl)?);
        let (c_i, hw_i, g_i, silu) = (c as i32, hw as i64, g as i32, self.silu as i32);
        let mut bld = stream.launch_builder(&f_apply);
        bld.arg(&x);
        bld.arg(&stats);
        bld.arg(&wv);
        bld.arg(&bv);
        bld.arg(&out);
        bld.arg(&c_i);
        bld.arg(&hw_i);
        bld.arg(&g_i);
        bld.arg(&silu);
        let cfg = grid_planes(b * c, hw)?;
        // SAFETY: arguments match `gn_apply_bf16`; the grid-stride loop covers every element
        // of every plane.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

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

// ---------------------------------------------------------------- per-channel bias

/// Grid of the per-(batch, channel)-plane kernels (`gn_apply_bf16`, `channel_bias_bf16`):
/// about four elements per thread along x, one plane per y.
fn grid_planes(planes: usize, hw: usize) -> Result<LaunchConfig> {
    if planes == 0 || planes > 65535 {
        bail!("fused kernel: {planes} (batch, channel) planes exceed one launch's grid")
    }
    let per_plane = hw.div_ceil(THREADS as usize * 4).clamp(1, 1 << 16) as u32;
    Ok(LaunchConfig {
        grid_dim: (per_plane, planes as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "flux2-channel-bias"
    }

    cuda_only_cpu_fwd!(2, self, cuda_only("channel_bias"));

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        if !xl.is_contiguous() || !bl.is_contiguous() || bl.shape().elem_count() != c {
            bail!("channel_bias: needs contiguous x [B,C,H,W] and a contiguous bias of C = {c}")
        }
        let dev = xs.device().clone();
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * c * h * w)? };
        let func = load(&dev, "channel_bias_bf16")?;
        let (x, bias) = (view(xs, xl)?, view(bs, bl)?);
        let (c_i, hw_i) = (c as i32, (h * w) as i64);
        let launch = grid_planes(b * c, h * w)?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&x);
        bld.arg(&bias);
        bld.arg(&out);
        bld.arg(&c_i);
        bld.arg(&hw_i);
        // SAFETY: arguments match `channel_bias_bf16`; the grid-stride loop covers every
        // element of every plane.
        unsafe { bld.launch(launch) }.w()?;
        Ok((bf16::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// `x + bias` for bf16 `x [B, C, H, W]` and a per-channel bf16 `bias [C]`, rounded once (the
/// bias add of `nn.Conv2d` after its convolution). One pass, 16-byte accesses, where candle's
/// broadcast add computes a strided index per element.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&bias.flatten_all()?.contiguous()?, &ChannelBias)
}
