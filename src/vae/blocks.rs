//! Building blocks of the FLUX.2 VAE (diffusers `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, `UNetMidBlock2D` with its deprecated-attn-block `Attention`), spec §6.1.
//!
//! VarBuilder paths mirror the diffusers state-dict keys (spec §6.2).
//!
//! Why not `candle_transformers::models::z_image::vae`? Its blocks have the same structure and
//! key names, but (a) its `GroupNorm` is `candle_nn::GroupNorm`, which rounds three times in
//! bf16 (normalised value, `×weight`, `+bias`) where torch rounds once (spec §1: a fused op
//! rounds once), (b) its attention runs the softmax in bf16 where torch's fused SDPA kernel
//! accumulates in f32, (c) it has no `mid_block_add_attention = false`, no quant convs and no
//! separate decoder channels, and its blocks are private; (d) candle's CPU backend has no bf16
//! matmul, so its convs cannot run a bf16 model on the CPU at all. So the blocks are written
//! here from candle-nn pieces (`candle_nn::Conv2d`, `Linear`, `ops::silu`,
//! `ops::softmax_last_dim`), with thin `Conv2d`/`Linear` wrappers for (d).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::profile;

/// Whether a half-precision layer on this device must compute in f32: candle's CPU backend has
/// no bf16/f16 matmul (conv2d lowers to one), so on the CPU the layer widens its input and
/// weights to f32 (exact), accumulates in f32 and rounds the output once — what torch's bf16
/// CPU kernels (oneDNN) do. On CUDA the native half-precision kernels are used.
fn needs_f32_compute(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && matches!(vb.dtype(), DType::BF16 | DType::F16)
}

/// `nn.Conv2d` (with bias), see [`needs_f32_compute`] for the CPU half-precision path.
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
                Ok(crate::cuda::fused::add_channel_bias(&y, b)?)
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
                // Unexpected (cuDNN refused the problem): say so once, use candle's conv.
                Some(Err(e)) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        eprintln!(
                            "warning: the tensor-core cuDNN conv failed ({e}); using candle's conv"
                        )
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

/// `nn.Linear` (with bias), see [`needs_f32_compute`] for the CPU half-precision path.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    f32_compute: Option<DType>,
}

/// Loads `{weight [out,in], bias [out]}` from `vb`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let f32_compute = needs_f32_compute(&vb).then(|| vb.dtype());
    let vb = if f32_compute.is_some() {
        vb.set_dtype(DType::F32)
    } else {
        vb
    };
    Ok(Linear {
        inner: candle_nn::linear(cin, cout, vb)?,
        f32_compute,
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.f32_compute {
            Some(dt) => self.inner.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
            None => self.inner.forward(x),
        }
    }
}

/// `nn.GroupNorm(groups, C, eps, affine=True)`.
///
/// torch computes the statistics *and the affine* in f32 and rounds the output once to the
/// input dtype (spec §1, "everything else … plain bf16 ops"); this reproduces that. The
/// affine parameters are kept as f32 copies (exact upcasts of the loaded values).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm {}: {groups} groups do not divide {channels} channels",
                vb.prefix()
            );
        }
        let weight = vb.get(channels, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight: weight.reshape((1, channels, 1, 1))?,
            bias: bias.reshape((1, channels, 1, 1))?,
            groups,
            channels,
            eps,
        })
    }

    /// The fused CUDA kernel (bf16 on CUDA), `None` where it does not apply.
    #[allow(unused_variables)]
    fn fused(&self, x: &Tensor, silu: bool) -> Option<Result<Tensor>> {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) {
            return Some(crate::cuda::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            ));
        }
        None
    }

    /// The normalised, affine-transformed value in f32, not yet rounded. `x`: `[B,C,H,W]`.
    fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            candle_core::bail!("GroupNorm expects {} channels, got {c}", self.channels);
        }
        let xs = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = xs.mean_keepdim(2)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = xs.sqr()?.mean_keepdim(2)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xs.reshape((b, c, h, w))?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }

    /// `silu(group_norm(x))` with torch's roundings: the norm output is rounded to the input
    /// dtype (it is a tensor in torch), then SiLU rounds once more.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("vae.groupnorm_silu", x.device(), || {
            if let Some(y) = self.fused(x, true) {
                return y;
            }
            self.forward_silu_inner(x)
        })
    }

    fn forward_silu_inner(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = self.forward_f32(x)?;
        let y = if dt == DType::F32 {
            y
        } else {
            y.to_dtype(dt)?.to_dtype(DType::F32)?
        };
        candle_nn::ops::silu(&y)?.to_dtype(dt)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, false) {
            return y;
        }
        self.forward_f32(x)?.to_dtype(x.dtype())
    }
}

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// diffusers `ResnetBlock2D` without time embedding (spec §6.1):
/// `out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, dropout 0,
/// `output_scale_factor` 1 (the `/ 1` of diffusers is exact and omitted).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1×1 conv with bias, present iff `cin != cout` (diffusers' `use_in_shortcut`).
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let eps = 1e-6;
        let conv_shortcut = if cin != cout {
            Some(conv2d(
                cin,
                cout,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            norm2: GroupNorm::load(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => x.apply(conv)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// Rows of queries per attention chunk so that one f32 score block stays below ~1 GiB. The
/// softmax is per query row, so chunking over queries is exact.
const ATTN_SCORE_BUDGET: usize = 1 << 28;

/// diffusers `Attention(_from_deprecated_attn_block=True)` of the mid block (spec §6.1):
/// group norm, single head over all `H·W` positions, Linear q/k/v/out with bias, residual add.
///
/// The core `softmax(q kᵀ/√C) v` is computed in f32 and rounded once to the model dtype, as
/// torch's fused `scaled_dot_product_attention` kernels do (they accumulate and normalise in
/// f32 for bf16 inputs); the projections and the residual add stay in the model dtype.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl Attention {
    pub fn load(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out").pp("0"))?,
            channels,
        })
    }

    /// `softmax(q kᵀ · scale) v` in f32, `q,k,v`: `[B,N,C]` in the model dtype.
    fn sdpa(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dt = q.dtype();
        // On CUDA with a bf16/f16 model the two f32 GEMMs may run on the tensor cores (TF32):
        // q and k hold bf16/f16 values, which TF32's 10-bit mantissa represents exactly, so
        // q·kᵀ is unchanged up to summation order; P is rounded to TF32 for P·v where torch's
        // flash SDPA rounds it to bf16. 16384² scores at 1024² otherwise take ~20 ms in
        // plain f32.
        let _tf32 = (q.device().is_cuda()
            && matches!(dt, DType::BF16 | DType::F16)
            && crate::ops::cuda_speedups_enabled())
        .then(Tf32Gemms::enable);
        let scale = 1.0 / (self.channels as f64).sqrt();
        let (_, n, _) = q.dims3()?;
        let q = q.to_dtype(DType::F32)?;
        let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
        let v = v.to_dtype(DType::F32)?;
        let chunk = (ATTN_SCORE_BUDGET / n.max(1)).clamp(1, n.max(1));
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let scores = (qc.matmul(&kt)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?);
            start += len;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one chunk")
        } else {
            Tensor::cat(&outs, 1)?
        };
        out.to_dtype(dt)
    }
}

/// Allows TF32 for candle's f32 GEMMs (a process-wide cuBLAS setting) until dropped, then
/// restores the previous setting.
struct Tf32Gemms {
    previous: bool,
}

impl Tf32Gemms {
    fn enable() -> Self {
        let previous = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        Self { previous }
    }
}

impl Drop for Tf32Gemms {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.previous);
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::span("vae.mid_attention", x.device(), || self.forward_inner(x))
    }
}

impl Attention {
    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = hs.apply(&self.to_q)?;
        let k = hs.apply(&self.to_k)?;
        let v = hs.apply(&self.to_v)?;
        let out = self.sdpa(&q, &k, &v)?.apply(&self.to_out)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers `Downsample2D(use_conv=True, padding=0)`: pad right and bottom by one zero, then
/// a 3×3 stride-2 conv without padding (spec §6.1).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding: 0,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?
            .apply(&self.conv)
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest-neighbour ×2 (`F.interpolate(…,
/// scale_factor=2, mode="nearest")`, source index `floor(dst/2)`), then a 3×3 conv, pad 1.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        profile::span("vae.upsample_nearest", x.device(), || {
            x.upsample_nearest2d(2 * h, 2 * w)
        })?
        .apply(&self.conv)
    }
}

/// diffusers `UNetMidBlock2D` with one layer: resnet, (attention), resnet.
#[derive(Debug, Clone)]
pub struct MidBlock2D {
    resnet0: ResnetBlock2D,
    attention: Option<Attention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock2D {
    pub fn load(
        channels: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = vb.pp("resnets");
        let attention = if add_attention {
            Some(Attention::load(
                channels,
                groups,
                vb.pp("attentions").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock2D::load(channels, channels, groups, resnets.pp("0"))?,
            attention,
            resnet1: ResnetBlock2D::load(channels, channels, groups, resnets.pp("1"))?,
        })
    }
}

impl Module for MidBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}
