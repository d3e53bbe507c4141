//! `nn.Conv2d` (with bias) for the VAE: cuDNN with tensor cores on CUDA (feature `cudnn`),
//! candle's convolution otherwise, and on the CPU in half precision the f32 computation
//! torch's kernels do (see [`super::linear::needs_f32_compute`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::linear::needs_f32_compute;
use crate::profile;

#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The inner layer holds f32 weights and the output is rounded to this dtype.
    f32_compute: Option<DType>,
}

/// Loads `{weight [cout,cin,k,k], bias [cout]}` from `vb`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let f32_compute = needs_f32_compute(&vb).then(|| vb.dtype());
    let vb = if f32_compute.is_some() {
        vb.set_dtype(DType::F32)
    } else {
        vb
    };
    Ok(Conv2d {
        inner: candle_nn::conv2d(cin, cout, k, cfg, vb)?,
        f32_compute,
    })
}

impl Conv2d {
    /// The conv on cuDNN with tensor cores (`crate::cuda::conv`), then the bias added in the
    /// output dtype as `nn.Conv2d` does; `None` where that path does not apply.
    #[cfg(feature = "cudnn")]
    fn forward_tensor_cores(&self, x: &Tensor) -> Option<Result<Tensor>> {
        let cfg = self.inner.config();
        if self.f32_compute.is_some()
            || cfg.dilation != 1
            || cfg.groups != 1
            || !crate::cuda::conv::applies(x)
        {
            return None;
        }
        let y = crate::cuda::conv::conv2d(x, self.inner.weight(), cfg.padding, cfg.stride);
        Some(y.and_then(|y| match self.inner.bias() {
            Some(b) if crate::cuda::fused::applies(&y) && b.dtype() == y.dtype() => {
                crate::cuda::fused::add_channel_bias(&y, b)
            }
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }))
    }

    #[cfg(not(feature = "cudnn"))]
    fn forward_tensor_cores(&self, _x: &Tensor) -> Option<Result<Tensor>> {
        None
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("vae.conv2d", x.device(), || {
            match self.forward_tensor_cores(x) {
                Some(Ok(y)) => return Ok(y),
                // Unexpected (cuDNN refused the problem): say so (once), use candle's conv.
                Some(Err(e)) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        super::warn(format!(
                            "the tensor-core cuDNN conv failed ({}); using candle's conv",
                            crate::one_line(&e.to_string())
                        ))
                    });
                }
                None => {}
            }
            match self.f32_compute {
                Some(dt) => self.inner.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
                None => self.inner.forward(x),
            }
        })
    }
}
