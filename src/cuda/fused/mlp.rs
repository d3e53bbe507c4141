//! The MLP activations: the transformer's SwiGLU (plain, and with the single-stream block's
//! attention output as a prefix) and the text encoder's SiLU·up (Qwen3).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{cuda_only, launch};
use crate::cuda::launch::{cuda_only_cpu_fwd, grid_for, grid_rows, uninit, view, wrap};

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

/// `silu(gate) * up` with torch's two roundings (`silu` in f32 rounded once, the product
/// rounded): Qwen3's MLP activation without the f32 round trip. `gate` and `up` same shape
/// (made contiguous).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

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
    let dev = us.device();
    let u = view::<bf16>(us, ul)?;
    // Never read with d = 0; any valid pointer will do.
    let p = prefix.map(|(ps, pl)| view::<bf16>(ps, pl)).transpose()?;
    // SAFETY: one block per row writes the whole output row.
    let out = unsafe { uninit::<bf16>(dev, rows * (d + f))? };
    // SAFETY: the arguments match `swiglu_bf16`, one block per row.
    unsafe {
        launch(
            dev,
            "swiglu_bf16",
            grid_rows(rows)?,
            &[
                &u,
                p.as_ref().unwrap_or(&u),
                &out,
                &(d as i32),
                &(f as i32),
                &(row_stride as i64),
            ],
        )
    }?;
    let mut shape = ul.dims().to_vec();
    *shape.last_mut().expect("rank >= 2") = d + f;
    Ok((wrap(out, dev), shape.into()))
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
        let dev = gs.device();
        // SAFETY: the grid-stride loop writes every element below n.
        let out = unsafe { uninit::<bf16>(dev, n)? };
        // SAFETY: the arguments match `silu_mul_bf16`; 8 elements per thread on the vector path.
        unsafe {
            launch(
                dev,
                "silu_mul_bf16",
                grid_for(n.div_ceil(8)),
                &[
                    &view::<bf16>(gs, gl)?,
                    &view::<bf16>(us, ul)?,
                    &out,
                    &(n as i64),
                ],
            )
        }?;
        Ok((wrap(out, dev), gl.shape().clone()))
    }
}
