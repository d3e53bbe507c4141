//! Rotary position embeddings with torch's roundings.

use candle_core::{DType, Result, Tensor};

use super::attention::Layout;

/// FLUX.2's RoPE on `x` `[B, H, S, D]`: interleaved pairs `(x[2i], x[2i+1])` rotated by the
/// f32 tables `cos`/`sin` `[S, D/2]`, evaluated in f32 and rounded once to `x`'s dtype (the
/// diffusers processor upcasts to f32, spec §5.2).
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (_, _, s, _) = x.dims4()?;
    let tokens = cos.dim(0)?;
    if s != tokens {
        candle_core::bail!("RoPE tables cover {tokens} tokens but the attention input has {s}");
    }
    let xf = if dtype == DType::F32 {
        x.contiguous()?
    } else {
        x.to_dtype(DType::F32)?.contiguous()?
    };
    candle_nn::rotary_emb::rope_i(&xf, cos, sin)?.to_dtype(dtype)
}

/// Qwen3's RoPE (`rotate_half`: the halves `x[..D/2]`, `x[D/2..]` rotated) in the compute
/// dtype, one rounding per op like torch's `q*cos + rotate_half(q)*sin`, on `x` in `layout`.
/// candle's `rope` ([B,H,S,D]) and `rope_thd` ([B,S,H,D]) compute the same per element, bit
/// for bit (tested below), so the layout is the caller's choice.
pub fn rope_half_split(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: Layout) -> Result<Tensor> {
    match layout {
        Layout::Bhsd => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        Layout::Bshd => candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn half_split_is_the_same_in_both_layouts() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 1.0, (2, 7, 3, 8), &dev)?.to_dtype(dtype)?;
            let cos = Tensor::randn(0f32, 1.0, (7, 4), &dev)?.to_dtype(dtype)?;
            let sin = Tensor::randn(0f32, 1.0, (7, 4), &dev)?.to_dtype(dtype)?;
            let thd = rope_half_split(&x, &cos, &sin, Layout::Bshd)?;
            let bhsd = rope_half_split(&x.transpose(1, 2)?, &cos, &sin, Layout::Bhsd)?;
            let diff = (thd.to_dtype(DType::F32)? - bhsd.transpose(1, 2)?.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
        Ok(())
    }
}
