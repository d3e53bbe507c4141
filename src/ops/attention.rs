//! Scaled dot-product attention: one entry point, [`attention`], with a [`Mask`]; our flash
//! kernel on CUDA where it applies (`crate::cuda::flash_attention`), else the reference below.
//!
//! The reference is torch's CPU flash kernel, which diffusers and transformers get from
//! `F.scaled_dot_product_attention` for f32 and bf16 alike: `QKᵀ` accumulated in f32 and
//! scaled in f32, the mask added in f32, `e = exp(s − max)` in f32 with the row sums in f32,
//! `e` rounded to the input dtype (bf16) for the `e·V` GEMM, which accumulates in f32, then the
//! division by the f32 sum and a single rounding. Only the blocking of the online softmax
//! differs (~1e-7). For f32 it is the plain `softmax(QKᵀ·scale + mask)·V`. Grouped-query
//! attention (fewer K/V heads than query heads, Qwen3) groups the query heads instead of
//! repeating K/V.
//!
//! For bf16 this costs two f32 GEMMs over the scores; measured on the tiny bf16 case it halves
//! the error against diffusers compared with bf16 probabilities in a bf16 GEMM (transformer
//! output 2.6e-3 vs 6.8e-3 max rel err at step 0).
//!
//! The VAE's single-head attention ([`attention_f32`]) is separate: torch evaluates it in f32
//! end to end (its output, not `P`, is rounded once), a different rule.

use candle_core::{DType, Device, Result, Tensor, D};

/// Memory layout of the attention operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[batch, heads, seq, head_dim]`.
    Bhsd,
    /// `[batch, seq, heads, head_dim]` (the layout the QKV projections produce).
    Bshd,
}

impl Layout {
    /// `x` `[B, S, H, D]` in this layout (a contiguous copy for [`Layout::Bhsd`]).
    pub fn from_bshd(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layout::Bshd => Ok(x.clone()),
            Layout::Bhsd => x.transpose(1, 2)?.contiguous(),
        }
    }

    /// `x` in this layout as `[B, S, H, D]` (a view).
    pub fn to_bshd(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layout::Bshd => Ok(x.clone()),
            Layout::Bhsd => x.transpose(1, 2),
        }
    }
}

/// Which keys each query sees.
///
/// The KV-cache checkpoints need no mask: their reference queries see only reference keys,
/// which is a separate unmasked call on the reference tokens, and the cached K/V are joined to
/// the keys ([`super::joint_attention::JoinedKv`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Mask {
    /// Every query sees every key.
    None,
    /// Causal with right padding (Qwen3), see [`Mask::causal_padded`].
    Causal(CausalMask),
}

/// A causal mask over right-padded rows: query `i` of row `b` sees key `j` iff `j <= i` and
/// key `j` is a real token. Held in the form the attention will use.
#[derive(Debug, Clone)]
pub struct CausalMask {
    /// Each row's number of real tokens (the row's first tokens), for the causal kernel.
    kv_valid: Option<Vec<usize>>,
    /// The additive f32 bias `[B, 1, 1, L, L]` (0 or −∞) of the reference.
    bias: Option<Tensor>,
}

impl Mask {
    /// The mask of a decoder over `attention_mask` `[B, L]` (any dtype and device, nonzero =
    /// real token; spec §2.2: pad query rows see the real tokens only). On CUDA, when the
    /// causal kernel runs here for `head_dim`/`dtype` and every row is right padded, each
    /// row's real-token count (read from the host mask: no transfer); else the bias on
    /// `device`.
    pub fn causal_padded(
        attention_mask: &Tensor,
        device: &Device,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        if causal_kernel_runs(device, head_dim, dtype) {
            if let Some(real_tokens) = right_padded_lengths(attention_mask)? {
                return Ok(Mask::Causal(CausalMask {
                    kv_valid: Some(real_tokens),
                    bias: None,
                }));
            }
        }
        let seq_len = attention_mask.dim(1)?;
        Ok(Mask::Causal(CausalMask {
            kv_valid: None,
            bias: Some(causal_bias(&attention_mask.to_device(device)?, seq_len)?),
        }))
    }

    /// The layout [`attention`] runs in without copies for this mask: `[B, S, H, D]` for the
    /// causal kernel, `[B, H, S, D]` for the reference.
    pub fn layout(&self) -> Layout {
        match self {
            Mask::Causal(CausalMask {
                kv_valid: Some(_), ..
            }) => Layout::Bshd,
            _ => Layout::Bhsd,
        }
    }
}

/// The attention a causally masked (text-encoder) call runs on: the causal CUDA kernel's name,
/// or `naive` (the reference: CPU, f32, speed paths off, or the kernel unusable here).
pub fn causal_kernel_name(device: &Device, head_dim: usize, dtype: DType) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if causal_kernel_runs(device, head_dim, dtype) {
            if let Some(name) = crate::cuda::kernel_name(dev, head_dim, dtype, true) {
                return name;
            }
        }
    }
    let _ = (device, head_dim, dtype);
    "naive".into()
}

/// The attention an unmasked call with this head dim runs on: the flash kernel's name (e.g.
/// `fa90_fwd_bf16_d128_n128` on a Hopper GPU), or `naive`.
pub fn kernel_name(device: &Device, head_dim: usize, dtype: DType) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if let Some(name) = crate::cuda::kernel_name(dev, head_dim, dtype, false) {
            return name;
        }
    }
    let _ = (device, head_dim, dtype);
    "naive".into()
}

/// Whether a causal mask runs on the CUDA kernel: CUDA, bf16/f16, a supported head dim,
/// speed paths on, and the kernel loaded and self-checked (the first call loads it).
fn causal_kernel_runs(device: &Device, head_dim: usize, dtype: DType) -> bool {
    #[cfg(feature = "cuda")]
    if super::cuda_speedups_enabled() {
        return crate::cuda::causal_kernel_ready(device, head_dim, dtype);
    }
    let _ = (device, head_dim, dtype);
    false
}

/// `softmax(q kᵀ / √D + mask) v` for `q`, `k`, `v` in `layout` (`k`/`v` may have fewer heads
/// than `q`, a divisor of them); the result in `layout` and `q`'s dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: Layout,
    mask: &Mask,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = flash(q, k, v, layout, mask)? {
        return Ok(out);
    }
    let bias = match mask {
        Mask::None => None,
        Mask::Causal(c) => match &c.bias {
            Some(bias) => Some(bias),
            None => candle_core::bail!("the causal kernel's mask needs CUDA inputs"),
        },
    };
    match layout {
        Layout::Bhsd => sdpa_reference(q, k, v, bias, MAX_SCORE_BYTES),
        Layout::Bshd => {
            let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
            sdpa_reference(&t(q)?, &t(k)?, &t(v)?, bias, MAX_SCORE_BYTES)?.transpose(1, 2)
        }
    }
}

/// The flash kernel, where it applies (`None`: use the reference).
#[cfg(feature = "cuda")]
fn flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: Layout,
    mask: &Mask,
) -> Result<Option<Tensor>> {
    use crate::cuda::{AttnLayout, AttnMask, FlashParams};
    let params = FlashParams {
        scale: 1.0 / (q.dim(D::Minus1)? as f32).sqrt(),
        layout: match layout {
            Layout::Bhsd => AttnLayout::Bhsd,
            Layout::Bshd => AttnLayout::Bshd,
        },
        mask: match mask {
            Mask::None => AttnMask::None,
            Mask::Causal(CausalMask {
                kv_valid: Some(kv_valid),
                ..
            }) => AttnMask::Causal { kv_valid },
            Mask::Causal(_) => return Ok(None),
        },
    };
    // A mask built for the kernel has no reference form: its inputs must suit the kernel
    // (the kernel says which is wrong if not).
    let kernel_mask = !matches!(params.mask, AttnMask::None);
    if kernel_mask || crate::cuda::is_supported(q, k, v, &params) {
        return crate::cuda::flash_attention(q, k, v, &params).map(Some);
    }
    Ok(None)
}

/// Largest f32 score tensor (in bytes) materialised at once; bigger problems are split over
/// (batch, K/V head) groups so that a 1024² edit with references (S ≈ 10k tokens) stays within
/// a few GiB of scratch memory. Heads are independent, so the split is exact.
pub const MAX_SCORE_BYTES: usize = 1 << 30;

/// The reference on `[B, H, S, D]` `q` and `[B, Hkv, Sk, D]` `k`/`v`, with an optional
/// additive f32 `bias` broadcastable to `[B, Hkv, H/Hkv, S, Sk]`.
fn sdpa_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    max_bytes: usize,
) -> Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let (bk, hk, s_k, dk) = k.dims4()?;
    if (bk, dk) != (b, d) || hk == 0 || h % hk != 0 || v.dims4()? != (b, hk, s_k, d) {
        candle_core::bail!(
            "attention shapes disagree: q {:?}, k {:?}, v {:?} (expected [B, H, S, D] with \
             k/v heads dividing q heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let rep = h / hk;
    let per_kv_head = rep * s_q * s_k * 4;
    let kv_heads_per_chunk = (max_bytes / per_kv_head.max(1)).max(1);
    if b * hk <= kv_heads_per_chunk {
        return sdpa_block(q, k, v, bias);
    }
    let mut rows = Vec::with_capacity(b);
    for bi in 0..b {
        let (qb, kb, vb) = (
            q.narrow(0, bi, 1)?,
            k.narrow(0, bi, 1)?,
            v.narrow(0, bi, 1)?,
        );
        let bias_b = match bias {
            Some(t) if t.dim(0)? > 1 => Some(t.narrow(0, bi, 1)?),
            other => other.cloned(),
        };
        let mut groups = Vec::with_capacity(hk.div_ceil(kv_heads_per_chunk));
        let mut g0 = 0;
        while g0 < hk {
            let n = kv_heads_per_chunk.min(hk - g0);
            groups.push(sdpa_block(
                &qb.narrow(1, g0 * rep, n * rep)?.contiguous()?,
                &kb.narrow(1, g0, n)?.contiguous()?,
                &vb.narrow(1, g0, n)?.contiguous()?,
                bias_b.as_ref(),
            )?);
            g0 += n;
        }
        rows.push(Tensor::cat(&groups, 1)?);
    }
    Tensor::cat(&rows, 0)
}

/// [`sdpa_reference`] on one block of heads, all at once.
fn sdpa_block(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, nh, l, d) = q.dims4()?;
    let (_, nkv, lk, _) = k.dims4()?;
    let rep = nh / nkv;
    // torch: scale = 1/sqrt(D) as a double, applied to the f32 scores after the GEMM.
    let scale = 1.0 / (d as f64).sqrt();
    let qf = q.to_dtype(DType::F32)?.reshape((b, nkv, rep * l, d))?;
    let kf = k.to_dtype(DType::F32)?;
    let vf = v.to_dtype(DType::F32)?;
    let mut scores = (qf.matmul(&kf.t()?)? * scale)?;
    if let Some(bias) = bias {
        scores = scores.reshape((b, nkv, rep, l, lk))?.broadcast_add(bias)?;
    }
    let out = if dtype == DType::F32 {
        let p = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, rep * l, lk))?;
        p.matmul(&vf)?
    } else {
        // Unnormalised probabilities rounded to the input dtype, `P·V` accumulated in f32,
        // divided by the f32 row sums, one rounding.
        let max = scores.max_keepdim(D::Minus1)?;
        let p = scores.broadcast_sub(&max)?.exp()?;
        let sum = p.sum_keepdim(D::Minus1)?.reshape((b, nkv, rep * l, 1))?;
        let p = p.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let p = p.reshape((b, nkv, rep * l, lk))?;
        p.matmul(&vf)?.broadcast_div(&sum)?
    };
    out.reshape((b, nh, l, d))?.to_dtype(dtype)
}

/// Additive f32 mask `[B,1,1,L,L]`: query `i` may see key `j` iff `j <= i` and
/// `attention_mask[j] != 0` (spec §2.2; pad query rows see the real tokens only).
fn causal_bias(attention_mask: &Tensor, seq_len: usize) -> Result<Tensor> {
    let device = attention_mask.device();
    let b = attention_mask.dim(0)?;
    let pos = Tensor::arange(0u32, seq_len as u32, device)?;
    let causal = pos
        .reshape((seq_len, 1))?
        .broadcast_ge(&pos.reshape((1, seq_len))?)?; // [L,L] u8, i >= j
    let keys = attention_mask
        .to_dtype(DType::F32)?
        .ne(0f32)?
        .reshape((b, 1, seq_len))?; // [B,1,L] u8
    let allowed = causal.unsqueeze(0)?.broadcast_mul(&keys)?; // [B,L,L]
    let zeros = Tensor::zeros((b, seq_len, seq_len), DType::F32, device)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (b, seq_len, seq_len), device)?;
    allowed
        .where_cond(&zeros, &blocked)?
        .reshape((b, 1, 1, seq_len, seq_len))
}

/// Each row's number of real tokens when every row of `attention_mask` `[B, L]` is right
/// padded (ones, then zeros) and holds at least one real token; `None` for any other pattern
/// (left padding, holes), which the additive bias handles.
fn right_padded_lengths(attention_mask: &Tensor) -> Result<Option<Vec<usize>>> {
    let rows = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let real = row.iter().take_while(|&&m| m != 0.0).count();
            (real > 0 && row[real..].iter().all(|&m| m == 0.0)).then_some(real)
        })
        .collect())
}

/// Rows of queries per chunk of [`attention_f32`] so that one f32 score block stays below
/// ~1 GiB. The softmax is per query row, so chunking over queries is exact.
const F32_SCORE_BUDGET: usize = 1 << 28;

/// The VAE mid block's single-head `softmax(q kᵀ/√C) v` for `q`, `k`, `v` `[B, N, C]`:
/// computed in f32 and rounded once to the input dtype, as torch's fused SDPA kernels do for
/// it (they accumulate and normalise in f32); `P` is not rounded, unlike [`attention`].
pub fn attention_f32(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dt = q.dtype();
    // On CUDA with a bf16/f16 model the two f32 GEMMs may run on the tensor cores (TF32):
    // q and k hold bf16/f16 values, which TF32's 10-bit mantissa represents exactly, so
    // q·kᵀ is unchanged up to summation order; P is rounded to TF32 for P·v where torch's
    // flash SDPA rounds it to bf16. (Measured: BENCHMARKS.md, 2026-11-26.)
    let _tf32 = (q.device().is_cuda()
        && matches!(dt, DType::BF16 | DType::F16)
        && super::cuda_speedups_enabled())
    .then(Tf32Gemms::enable);
    let (_, n, c) = q.dims3()?;
    let scale = 1.0 / (c as f64).sqrt();
    let q = q.to_dtype(DType::F32)?;
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
    let v = v.to_dtype(DType::F32)?;
    let chunk = (F32_SCORE_BUDGET / n.max(1)).clamp(1, n.max(1));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    #[test]
    fn matches_definition_and_chunking() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?;
        let out = attention(&q, &k, &v, Layout::Bhsd, &Mask::None)?;
        // Reference: explicit softmax.
        let s = (q.matmul(&k.t()?)? * 0.5)?;
        let e = s.broadcast_sub(&s.max_keepdim(3)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(3)?)?;
        let r = p.matmul(&v)?;
        assert!(max_diff(&out, &r)? < 1e-6);
        // The chunked path (groups of 2 heads, then 1) gives the same values.
        let chunked = sdpa_reference(&q, &k, &v, None, 2 * 5 * 7 * 4)?;
        assert!(max_diff(&chunked, &r)? < 1e-6);
        // [B, S, H, D] in and out.
        let t = |x: &Tensor| x.transpose(1, 2);
        let bshd = attention(&t(&q)?, &t(&k)?, &t(&v)?, Layout::Bshd, &Mask::None)?;
        assert!(max_diff(&bshd.transpose(1, 2)?, &r)? < 1e-6);
        // bf16 inputs: same values within bf16 rounding.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let o16 = attention(&bf(&q)?, &bf(&k)?, &bf(&v)?, Layout::Bhsd, &Mask::None)?;
        assert_eq!(o16.dtype(), DType::BF16);
        assert!(max_diff(&o16, &r)? < 3e-2);
        Ok(())
    }

    /// Grouped K/V heads with the causal padding mask equal the same attention on repeated
    /// K/V heads with an explicit mask, chunked or not.
    #[test]
    fn causal_grouped_matches_repeated_heads() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, hk, s, d) = (2, 4, 2, 6, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, hk, s, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, hk, s, d), &dev)?;
        let am = Tensor::from_vec(vec![1u32, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], (b, s), &dev)?;
        let mask = Mask::causal_padded(&am, &dev, d, DType::F32)?;
        assert_eq!(mask.layout(), Layout::Bhsd);
        let out = attention(&q, &k, &v, Layout::Bhsd, &mask)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((b, hk, h / hk, s, d))?
                .reshape((b, h, s, d))
        };
        let bias = causal_bias(&am, s)?.reshape((b, 1, s, s))?;
        let scores =
            ((q.matmul(&repeat(&k)?.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&bias))?;
        let r = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&repeat(&v)?)?;
        assert!(max_diff(&out, &r)? < 1e-6);
        let Mask::Causal(c) = &mask else {
            unreachable!()
        };
        let chunked = sdpa_reference(&q, &k, &v, c.bias.as_ref(), 2 * s * s * 4)?;
        assert!(max_diff(&chunked, &r)? < 1e-6);
        Ok(())
    }

    #[test]
    fn right_padded_lengths_accepts_only_right_padding() -> Result<()> {
        let mask = |rows: &[&[u32]]| {
            let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
            Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
        };
        let lengths = |rows: &[&[u32]]| right_padded_lengths(&mask(rows)?);
        assert_eq!(lengths(&[&[1, 1, 0, 0], &[1, 1, 1, 1]])?, Some(vec![2, 4]));
        assert_eq!(lengths(&[&[1, 0, 0, 0]])?, Some(vec![1]));
        assert_eq!(lengths(&[&[0, 1, 1, 1]])?, None, "left padding");
        assert_eq!(lengths(&[&[1, 0, 1, 0]])?, None, "a hole");
        assert_eq!(lengths(&[&[0, 0, 0, 0]])?, None, "no real token");
        assert_eq!(lengths(&[&[1, 1], &[0, 1]])?, None, "one bad row");
        Ok(())
    }
}
