//! Timestep (and guidance) embedding and the 4-axis RoPE tables (spec §5.2 steps 1 and 4).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear_no_bias, Linear, Module, VarBuilder};

use crate::ops::silu;

/// Frequencies of diffusers' `get_timestep_embedding` (`max_period` 10000,
/// `downscale_freq_shift` 0): `exp(-ln(10000) * i / half)`, i = 0..half.
///
/// torch evaluates `-math.log(10000) * arange(half, f32)` in f32 (the Python scalar is
/// rounded to f32 first) and divides by `half` in f32; we do the same roundings. Its f32
/// `exp` (MKL VML on the x86 CPU builds, ≤ 1 ulp) is not correctly rounded: for klein's 128
/// frequencies it differs from the correctly rounded value used here in 2 entries (i = 12,
/// 106) by 1 ulp, which moves `t·f` at t = 1000 by ~3e-5 rad and the time embedding by
/// ~3e-6 relative (measured by the parity tests; SLEEF's algorithm does not reproduce it
/// either, so the exact values cannot be matched portably).
pub fn timestep_frequencies(half: usize) -> Vec<f32> {
    let neg_log = -(10000f64.ln()) as f32;
    (0..half)
        .map(|i| {
            let exponent = (neg_log * i as f32) / half as f32;
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// diffusers' `Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[cos(t·f), sin(t·f)]` computed in f32 whatever the input dtype (spec §1: "sinusoidal
/// timestep projection computed in f32"), returned in f32.
#[derive(Debug, Clone)]
pub struct TimestepProjection {
    /// `[1, channels/2]` f32.
    freqs: Tensor,
}

impl TimestepProjection {
    pub fn new(channels: usize, device: &Device) -> Result<Self> {
        let half = channels / 2;
        let freqs = Tensor::from_vec(timestep_frequencies(half), (1, half), device)?;
        Ok(Self { freqs })
    }

    /// `t` [B] (any float dtype, already ×1000) → [B, channels] f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let b = t
            .dims1()
            .context("timestep projection expects a [B] tensor")?;
        let t = t.to_dtype(DType::F32)?.reshape((b, 1))?;
        let args = t.broadcast_mul(&self.freqs)?;
        Ok(Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?)
    }
}

/// diffusers' `TimestepEmbedding` without biases: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(vb: VarBuilder, in_channels: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear_no_bias(in_channels, dim, vb.pp("linear_1"))?,
            linear_2: linear_no_bias(dim, dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(x)?;
        Ok(self.linear_2.forward(&silu(&h)?)?)
    }
}

/// diffusers' `Flux2TimestepGuidanceEmbeddings`: `timestep_embedder(proj(t))`, plus
/// `guidance_embedder(proj(g))` when the checkpoint has one *and* a guidance value is given
/// (otherwise the guidance is ignored, as in diffusers).
#[derive(Debug, Clone)]
pub struct TimestepGuidanceEmbeddings {
    proj: TimestepProjection,
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
}

impl TimestepGuidanceEmbeddings {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        dim: usize,
        guidance_embeds: bool,
    ) -> Result<Self> {
        let guidance_embedder = if guidance_embeds {
            Some(TimestepEmbedding::load(
                vb.pp("guidance_embedder"),
                channels,
                dim,
            )?)
        } else {
            None
        };
        Ok(Self {
            proj: TimestepProjection::new(channels, vb.device())?,
            timestep_embedder: TimestepEmbedding::load(vb.pp("timestep_embedder"), channels, dim)?,
            guidance_embedder,
        })
    }

    /// `timestep`, `guidance`: [B] in the model dtype, already multiplied by 1000 (in the
    /// model dtype, spec §1). The f32 sinusoid is cast to the model dtype before `linear_1`.
    pub fn forward(&self, timestep: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let dtype = timestep.dtype();
        let t_emb = self
            .timestep_embedder
            .forward(&self.proj.forward(timestep)?.to_dtype(dtype)?)?;
        match (guidance, &self.guidance_embedder) {
            (Some(g), Some(embedder)) => {
                let g_emb = embedder.forward(&self.proj.forward(g)?.to_dtype(g.dtype())?)?;
                Ok((t_emb + g_emb)?)
            }
            _ => Ok(t_emb),
        }
    }
}

/// RoPE tables for one token sequence (txt then img), shared by every block and every
/// denoising step of a generation (the ids do not change across steps).
///
/// `cos`, `sin`: `[S, head_dim/2]` f32, one angle per interleaved pair (the form
/// `candle_nn::rotary_emb::rope_i` takes; diffusers stores each value repeated twice).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// diffusers' `Flux2PosEmbed(ids)` for `ids` [S, n_axes] (any integer or float dtype).
    ///
    /// Spec §1/§5.2 step 4: `pos = ids.float()`; per axis of `d` dims,
    /// `ω_k = 1 / θ^(2k/d)` and `pos·ω_k` in **f64**, `cos`/`sin` in f64, then f32.
    pub fn from_ids(ids: &Tensor, axes_dims: &[usize], theta: f64) -> Result<Self> {
        let (s, n_axes) = ids.dims2().context("RoPE ids must be [S, n_axes]")?;
        if n_axes < axes_dims.len() {
            bail!(
                "RoPE ids have {n_axes} axes per token but axes_dims_rope {:?} needs {}",
                axes_dims,
                axes_dims.len()
            );
        }
        let device = ids.device();
        // `ids.float()` first (exact for any realistic position), then f64.
        let pos = ids.to_dtype(DType::F32)?.to_dtype(DType::F64)?;
        let mut cos = Vec::with_capacity(axes_dims.len());
        let mut sin = Vec::with_capacity(axes_dims.len());
        for (axis, &dim) in axes_dims.iter().enumerate() {
            let omega: Vec<f64> = (0..dim / 2)
                .map(|k| 1.0 / theta.powf((2 * k) as f64 / dim as f64))
                .collect();
            let omega = Tensor::from_vec(omega, (1, dim / 2), device)?;
            let angles = pos.narrow(1, axis, 1)?.broadcast_mul(&omega)?; // [S, dim/2] f64
            cos.push(angles.cos()?.to_dtype(DType::F32)?);
            sin.push(angles.sin()?.to_dtype(DType::F32)?);
        }
        let cos = Tensor::cat(&cos, 1)?.contiguous()?;
        let sin = Tensor::cat(&sin, 1)?.contiguous()?;
        debug_assert_eq!(cos.dims(), &[s, axes_dims.iter().sum::<usize>() / 2]);
        Ok(Self { cos, sin })
    }

    /// Joint table `cat([txt, img])` (text tokens first, as the blocks concatenate them).
    pub fn concat(txt: &Self, img: &Self) -> Result<Self> {
        Ok(Self {
            cos: Tensor::cat(&[&txt.cos, &img.cos], 0)?,
            sin: Tensor::cat(&[&txt.sin, &img.sin], 0)?,
        })
    }

    /// Number of tokens covered.
    pub fn len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// diffusers' layout `[S, head_dim]` with each value repeated twice (for comparisons
    /// with the recorded `pos_embed.*` tensors).
    pub fn interleaved(&self) -> Result<(Tensor, Tensor)> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let (s, h) = t.dims2()?;
            Ok(t.unsqueeze(2)?
                .broadcast_as((s, h, 2))?
                .reshape((s, 2 * h))?)
        };
        Ok((rep(&self.cos)?, rep(&self.sin)?))
    }

    /// Rotates interleaved pairs of `x` [B, H, S, head_dim]: `y₀ = x₀cos − x₁sin`,
    /// `y₁ = x₁cos + x₀sin`, in f32 and cast back to `x`'s dtype (spec §1: diffusers'
    /// `apply_rotary_emb` computes `x.float()*cos + rot(x).float()*sin`, then `.to(x.dtype)`).
    /// `candle_nn::rotary_emb::rope_i` computes exactly these products and sums in f32.
    /// Accepts a non-contiguous `x` (e.g. a transposed view): the f32 copy is made contiguous.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::rope::rope_interleaved(x, &self.cos, &self.sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_frequencies_golden() {
        // Spec §9: f_0..3 = 1.0, 0.93057203, 0.86596435, 0.80584216, f_127 = 1.0746075e-4.
        let f = timestep_frequencies(128);
        let expected = [1.0f32, 0.930_572_03, 0.865_964_35, 0.805_842_16];
        for (a, b) in f.iter().zip(expected) {
            assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
        }
        assert!((f[127] - 1.074_607_5e-4).abs() <= 1e-11);
        // torch 2.15 CPU `torch.exp` bit patterns; all but i = 12 and 106 are correctly rounded.
        let bits: Vec<u32> = f.iter().map(|x| x.to_bits()).collect();
        for (i, b) in [
            (0, 0x3f80_0000u32),
            (1, 0x3f6e_39f8),
            (2, 0x3f5d_afd6),
            (64, 0x3c23_d70a),
            (127, 0x38e1_5c8e),
        ] {
            assert_eq!(bits[i], b, "frequency {i}");
        }
        assert_eq!(bits[12] + 1, 0x3ed7_e89b);
    }

    #[test]
    fn timestep_projection_golden() -> Result<()> {
        // t = 1000, values from diffusers' `get_timestep_embedding` (torch 2.15 CPU). Spec §9
        // lists 0.43998268 / -0.89800626 for index 2; diffusers gives the values below.
        let proj = TimestepProjection::new(256, &Device::Cpu)?;
        let t = Tensor::new(&[1000f32], &Device::Cpu)?;
        let e = proj.forward(&t)?.squeeze(0)?.to_vec1::<f32>()?;
        #[allow(clippy::excessive_precision)]
        let cos = [0.562_379_06f32, 0.789_626_66, 0.439_927_88];
        #[allow(clippy::excessive_precision)]
        let sin = [0.826_879_56f32, 0.613_587_62, -0.898_033_08];
        for k in 0..3 {
            assert!((e[k] - cos[k]).abs() < 1e-7, "cos {k}: {}", e[k]);
            assert!(
                (e[128 + k] - sin[k]).abs() < 1e-7,
                "sin {k}: {}",
                e[128 + k]
            );
        }
        Ok(())
    }

    #[test]
    fn rope_omegas_golden() -> Result<()> {
        // Spec §9: per 32-dim axis ω_0..2 = 1.0, 0.6218499808, 0.3866973986, ω_15 = 8.0405245e-4.
        // Position 1 on the first axis gives cos(ω_k) in column k.
        let ids = Tensor::new(&[[1i64, 0, 0, 0]], &Device::Cpu)?;
        let t = RopeTables::from_ids(&ids, &[32, 32, 32, 32], 2000.0)?;
        let cos = t.cos.squeeze(0)?.to_vec1::<f32>()?;
        let sin = t.sin.squeeze(0)?.to_vec1::<f32>()?;
        for (k, w) in [
            (0, 1.0f64),
            (1, 0.621_849_980_8),
            (2, 0.386_697_398_6),
            (15, 8.040_524_5e-4),
        ] {
            assert!((cos[k] as f64 - w.cos()).abs() < 1e-7);
            assert!((sin[k] as f64 - w.sin()).abs() < 1e-7);
        }
        // Other axes at position 0: cos 1, sin 0.
        assert!(cos[16..].iter().all(|&c| c == 1.0));
        assert!(sin[16..].iter().all(|&s| s == 0.0));
        Ok(())
    }

    #[test]
    fn rope_apply_matches_definition() -> Result<()> {
        // y[2k] = x0 cos − x1 sin, y[2k+1] = x1 cos + x0 sin (spec §5.2 step 4).
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[0i64, 3, 5, 0], [10, 1, 2, 7]], &dev)?;
        let t = RopeTables::from_ids(&ids, &[2, 2, 2, 2], 2000.0)?;
        let x = Tensor::arange(0f32, 16.0, &dev)?.reshape((1, 1, 2, 8))?;
        let y = t.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let (cos, sin) = t.interleaved()?;
        let (cos, sin) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        for i in (0..16).step_by(2) {
            assert_eq!(y[i], x[i] * cos[i] - x[i + 1] * sin[i]);
            assert_eq!(y[i + 1], x[i + 1] * cos[i + 1] + x[i] * sin[i + 1]);
        }
        Ok(())
    }
}
