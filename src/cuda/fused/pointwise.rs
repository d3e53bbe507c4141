//! The elementwise kernels: modulation and gated residual (row-wise, with per-batch vectors),
//! RoPE on `[B, S, H, D]`, and the per-channel bias of the VAE's convolutions.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{cuda_only, launch};
use crate::cuda::launch::{
    cuda_only_cpu_fwd, grid_for, grid_planes, grid_rows, uninit, view, wrap,
};

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

/// Interleaved-pair RoPE on `[B, S, H, D]` (the projections' own layout, so no transposes)
/// with f32 `cos`/`sin` tables `[S, D/2]`, computed in f32 and rounded once.
pub fn rope_bshd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeBshd)
}

/// `x + bias` for bf16 `x [B, C, H, W]` and a per-channel bf16 `bias [C]`, rounded once (the
/// bias add of `nn.Conv2d` after its convolution). One pass, 16-byte accesses, where candle's
/// broadcast add computes a strided index per element.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&bias.flatten_all()?.contiguous()?, &ChannelBias)
}

// ---------------------------------------------------------------- row-wise

/// The row-wise kernels over `a` `[B, N, D]` with a second operand `b` (a per-batch vector
/// `[B, 1, D]`, or with `b_is_rows` a tensor shaped like `a`) and a per-batch vector `c`, all
/// contiguous bf16. Kernel arguments: `(a, b, c, out, rows_per_batch, d[, eps])`. Also
/// LayerNorm + modulation's ([`super::layernorm_modulate`]).
pub(super) struct RowWise {
    pub kernel: &'static str,
    pub b_is_rows: bool,
    /// Passed as the last argument when set (the LayerNorm epsilon).
    pub eps: Option<f32>,
    pub max_d: usize,
}

pub(super) fn row_wise(op: RowWise, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &c.contiguous()?, &op)
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
        let dev = a_s.device();
        let (x, y, z) = (
            view::<bf16>(a_s, a_l)?,
            view::<bf16>(b_s, b_l)?,
            view::<bf16>(c_s, c_l)?,
        );
        let (rows, d_i) = (n as i64, d as i32);
        let cfg = grid_rows(b * n)?;
        // SAFETY: one block per row writes the whole row.
        let out = unsafe { uninit::<bf16>(dev, b * n * d)? };
        // SAFETY: the arguments match the kernel's signature (see `RowWise`), D is within the
        // kernel's limit; one block per row.
        unsafe {
            match &self.eps {
                None => launch(dev, what, cfg, &[&x, &y, &z, &out, &rows, &d_i]),
                Some(eps) => launch(dev, what, cfg, &[&x, &y, &z, &out, &rows, &d_i, eps]),
            }
        }?;
        Ok((wrap(out, dev), a_l.shape().clone()))
    }
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
        let dev = xs.device();
        let total = b * s * h * d;
        // SAFETY: every output element is written.
        let out = unsafe { uninit::<bf16>(dev, total)? };
        // SAFETY: the arguments match `rope_bshd_bf16`; the grid-stride loop covers every pair.
        unsafe {
            launch(
                dev,
                "rope_bshd_bf16",
                grid_for(total / 2),
                &[
                    &view::<bf16>(xs, xl)?,
                    &view::<f32>(cs, cl)?,
                    &view::<f32>(ss, sl)?,
                    &out,
                    &((total / 2) as i64),
                    &(s as i32),
                    &(h as i32),
                    &((d / 2) as i32),
                ],
            )
        }?;
        Ok((wrap(out, dev), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------- per-channel bias

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
        let dev = xs.device();
        let cfg = grid_planes(b * c, h * w)?;
        // SAFETY: the grid-stride loop covers every element of every plane.
        let out = unsafe { uninit::<bf16>(dev, b * c * h * w)? };
        // SAFETY: the arguments match `channel_bias_bf16`, with that grid.
        unsafe {
            launch(
                dev,
                "channel_bias_bf16",
                cfg,
                &[
                    &view::<bf16>(xs, xl)?,
                    &view::<bf16>(bs, bl)?,
                    &out,
                    &(c as i32),
                    &((h * w) as i64),
                ],
            )
        }?;
        Ok((wrap(out, dev), xl.shape().clone()))
    }
}
