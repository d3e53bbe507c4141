//! diffusers' `Flux2FeedForward` (spec §5.2 step 5).

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::{self, Linear};

/// `linear_out(swiglu(linear_in(x)))`, `linear_in` producing `[gate | value]`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            linear_in: Linear::load_no_bias(dim, 2 * hidden, vb.pp("linear_in"))?
                .profiled("dit.linear"),
            linear_out: Linear::load_no_bias(hidden, dim, vb.pp("linear_out"))?
                .profiled("dit.linear"),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.linear_in.forward(x)?;
        Ok(self.linear_out.forward(&ops::mlp::swiglu(&u)?)?)
    }
}
