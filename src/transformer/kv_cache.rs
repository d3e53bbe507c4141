//! The reference K/V of a KV-cache checkpoint (diffusers' `Flux2KVCache`, spec-wave2 §3): the
//! post-RoPE keys and values of the reference tokens at every double- and single-stream
//! block, made by [`super::Flux2Transformer::reference_kv`] and joined to the keys of every
//! denoising step by [`super::Flux2Transformer::forward_with_references`].
//!
//! The reference tokens see only each other and are modulated with the timestep-0 embedding,
//! so their K/V depend on the reference images and the model alone (not on the prompt, the
//! noise or the step): one pass serves every step of every image that uses the same
//! references. diffusers computes them inside its step-0 forward over `[txt, ref, img]`; the
//! reference rows of that forward are this pass, row for row.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Per block `(K, V)`, each `[1, R, H, head_dim]` in the model dtype (diffusers' layout
/// `(B, N_ref, H, D)`, post-RoPE).
#[derive(Debug, Clone)]
pub struct ReferenceKv {
    double: Vec<(Tensor, Tensor)>,
    single: Vec<(Tensor, Tensor)>,
    tokens: usize,
}

impl ReferenceKv {
    /// The K/V of the `double` double-stream and `single` single-stream blocks, in block order.
    pub fn new(double: Vec<(Tensor, Tensor)>, single: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let Some((k0, _)) = double.first().or(single.first()) else {
            bail!("a reference K/V cache needs at least one block");
        };
        let tokens = k0.dim(1)?;
        for (k, v) in double.iter().chain(&single) {
            if k.dims() != v.dims() || k.rank() != 4 || k.dim(1)? != tokens {
                bail!(
                    "reference K/V shapes disagree: K {:?}, V {:?} ({tokens} reference tokens)",
                    k.dims(),
                    v.dims()
                );
            }
        }
        Ok(Self {
            double,
            single,
            tokens,
        })
    }

    /// `(K, V)` of double-stream block `i`.
    pub fn double(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.double.get(i).map(|(k, v)| (k, v))
    }

    /// `(K, V)` of single-stream block `i`.
    pub fn single(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.single.get(i).map(|(k, v)| (k, v))
    }

    pub fn num_double(&self) -> usize {
        self.double.len()
    }

    pub fn num_single(&self) -> usize {
        self.single.len()
    }

    /// The number of reference tokens R.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The memory the tensors hold, in bytes.
    pub fn bytes(&self) -> usize {
        self.double
            .iter()
            .chain(&self.single)
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}
