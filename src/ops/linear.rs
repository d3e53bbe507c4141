//! `Linear`: one `forward` over whatever the weights of a projection are stored as.
//!
//! Today a projection holds a dense weight (f32/bf16, with an optional bias) and computes as
//! candle's `Linear` does. The type is the seam for the next weight kinds, which change no
//! model file:
//! * fp8 weights with their scales (BFL's `weight_scale`/`input_scale`; issue #18): either
//!   dequantised at load by the weight backend (`crate::weights`, a dense layer), or kept as
//!   [`LinearWeight::Fp8`] and dequantised at each forward; an fp8 GEMM on GPUs with fp8
//!   tensor cores would compute from that variant directly;
//! * LoRA/LoKr deltas (issue #17): merged into the dense weight at load (`W + s·B·A`), or kept
//!   beside an fp8 weight and applied at run time as `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::profile;

/// The names under which a weight backend offers a projection's weight kept in fp8
/// (`<module>.weight:fp8`, `F8E4M3` `[out, in]`) and its scale (`<module>.weight:fp8_scale`,
/// F32, `[]` or `[out, 1]`); see `crate::weights`. A backend that does not keep fp8 weights
/// does not have them, and the layer loads its dense `weight`.
pub const FP8_WEIGHT: &str = "weight:fp8";
pub const FP8_SCALE: &str = "weight:fp8_scale";

/// What a [`Linear`] multiplies by.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `weight` `[out, in]` and an optional `bias` `[out]`, in the layer's dtype.
    Dense(candle_nn::Linear),
    /// An fp8 (E4M3) weight kept as stored, with its scale: dequantised at each forward, as
    /// `f32(q) · scale` rounded to the layer's dtype (the values a load-time dequantisation
    /// gives, so the numbers do not change), at half the resident memory of bf16.
    Fp8 {
        weight: Tensor,
        scale: Tensor,
        bias: Option<Tensor>,
        dtype: DType,
    },
}

/// `nn.Linear`: `x · Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// Set when the layer computes in f32 and rounds its output to this dtype (see
    /// [`Linear::load_widened_on_cpu`]).
    round_to: Option<DType>,
    /// The profile region the layer's time is added to.
    region: Option<&'static str>,
}

impl Linear {
    /// `{weight [out, in], bias [out]}` (the bias only if `bias`) from `vb`, in `vb`'s dtype.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = if vb.contains_tensor(FP8_WEIGHT) {
            let weight = vb.get_with_hints_dtype(
                (out_dim, in_dim),
                FP8_WEIGHT,
                Default::default(),
                DType::F8E4M3,
            )?;
            let scale = vb.get_unchecked_dtype(FP8_SCALE, DType::F32)?;
            let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
            LinearWeight::Fp8 {
                weight,
                scale,
                bias,
                dtype: vb.dtype(),
            }
        } else {
            LinearWeight::Dense(candle_nn::linear_b(in_dim, out_dim, bias, vb)?)
        };
        Ok(Self {
            weight,
            round_to: None,
            region: None,
        })
    }

    /// A bias-free projection.
    pub fn load_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::load(in_dim, out_dim, false, vb)
    }

    /// Like [`Linear::load`] with a bias, but a half-precision layer on the CPU keeps f32
    /// weights, widens its input and rounds its output once: what torch's bf16 CPU kernels
    /// (oneDNN) do, where candle's would round inside the GEMM (the VAE's rule, see
    /// `vae::blocks`).
    pub fn load_widened_on_cpu(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let round_to = needs_f32_compute(&vb).then(|| vb.dtype());
        let vb = if round_to.is_some() {
            vb.set_dtype(DType::F32)
        } else {
            vb
        };
        Ok(Self {
            round_to,
            ..Self::load(in_dim, out_dim, true, vb)?
        })
    }

    /// Adds the layer's time to the profile region `region`.
    pub fn profiled(mut self, region: &'static str) -> Self {
        self.region = Some(region);
        self
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let run = || match &self.weight {
            LinearWeight::Dense(l) => match self.round_to {
                Some(dt) => l.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
                None => l.forward(x),
            },
            LinearWeight::Fp8 {
                weight,
                scale,
                bias,
                dtype,
            } => {
                let w = weight
                    .to_dtype(DType::F32)?
                    .broadcast_mul(scale)?
                    .to_dtype(*dtype)?;
                candle_nn::Linear::new(w, bias.clone()).forward(x)
            }
        };
        match self.region {
            Some(region) => profile::span(region, x.device(), run),
            None => run(),
        }
    }

    /// The stored weight kind.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// Whether a half-precision layer on this device must compute in f32: candle's CPU backend has
/// no bf16/f16 convolution (it lowers to a matmul that rounds inside), so on the CPU such a
/// layer widens its input and weights to f32 (exact), accumulates in f32 and rounds the output
/// once — what torch's bf16 CPU kernels (oneDNN) do. On CUDA the native half-precision kernels
/// are used.
pub(crate) fn needs_f32_compute(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && matches!(vb.dtype(), DType::BF16 | DType::F16)
}
