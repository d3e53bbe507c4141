//! The Qwen3 decoder stack as the FLUX.2 [klein] pipeline uses it: a feature extractor whose
//! intermediate residual streams (transformers' `output_hidden_states`) become the prompt
//! embedding (spec §2.2). No KV cache, no LM head, no final `model.norm`.
//!
//! Numerics follow transformers 5.24 `modeling_qwen3.py` with the attention implementation
//! diffusers actually gets, `sdpa` (the transformers 5 default), op by op:
//! * `Qwen3RMSNorm`: normalize in f32, round to the compute dtype, *then* multiply by the
//!   weight in the compute dtype (two roundings in bf16; spec §1 dtype table, §2.2).
//! * RoPE: `inv_freq` and angles in f32, cos/sin rounded to the compute dtype, half-split
//!   `rotate_half` applied in the compute dtype (spec §2.2).
//! * attention (`F.scaled_dot_product_attention`, CPU flash kernel / CUDA flash kernel): scores
//!   `q·kᵀ` accumulated in f32, scaled by `1/sqrt(head_dim)` and masked in f32, softmax
//!   statistics in f32; in bf16 the unnormalized probabilities are rounded to bf16 before the
//!   `P·V` product (f32 accumulation) and the result is divided by the f32 row sum and rounded
//!   once. In f32 this is the plain softmax attention.
//! * SwiGLU: `silu` evaluated in f32 and rounded once (torch's bf16 kernels compute in f32),
//!   the product with `up` rounded to the compute dtype.
//! * every residual add rounds to the compute dtype.
//!
//! On CUDA in bf16 the RMSNorms and the SiLU·up product run as single fused kernels with the
//! same roundings (`cuda::fused::{rms_norm_scale, silu_mul}`), and (bf16/f16) the masked
//! attention runs on our causal flash kernel instead
//! (`cuda::flash_attention_causal_bshd`: the mask is causal plus right padding, so each row needs
//! only its count of real tokens; f32 scores and statistics, P rounded to the compute dtype,
//! online softmax, like the memory-efficient kernel torch's SDPA picks for a masked call on
//! CUDA). `FLUX2_KLEIN_FUSED=0` keeps the op-by-op path there too.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

/// `rope_parameters` of a transformers 5 config (`{"rope_theta": .., "rope_type": "default"}`).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_rope_type() -> String {
    "default".to_string()
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

/// `text_encoder/config.json` (transformers `Qwen3Config`); unknown keys are ignored.
///
/// Defaults are transformers' `Qwen3Config` defaults where the real configs may omit a key.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Absent in some configs: then `hidden_size / num_attention_heads` (transformers'
    /// `getattr(config, "head_dim", hidden // heads)`). Use [`Qwen3Config::head_dim`].
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4 style top-level theta (the real FLUX.2-klein config).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5 style (what `save_pretrained` writes).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// transformers 4 style scaling; only `null` (plain RoPE) is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// transformers 5: per-layer attention kind; only `"full_attention"` is supported.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

impl Qwen3Config {
    /// Reads and validates `text_encoder/config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the Qwen3 config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as a transformers Qwen3Config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported Qwen3 config {}", path.display()))?;
        Ok(cfg)
    }

    /// Per-head dimension (explicit `head_dim`, else `hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base: `rope_parameters.rope_theta`, else top-level `rope_theta`, else 10000
    /// (transformers' default).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Rejects the variants this port does not implement instead of computing something else.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even and positive for RoPE",
                self.head_dim()
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act {:?} is not supported (Qwen3 uses \"silu\")",
                self.hidden_act
            );
        }
        if let Some(p) = &self.rope_parameters {
            if p.rope_type != "default" {
                bail!(
                    "rope_type {:?} is not supported (only \"default\")",
                    p.rope_type
                );
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!(
                "rope_scaling {:?} is not supported (only plain RoPE)",
                self.rope_scaling
            );
        }
        if let Some(kind) = self
            .layer_types
            .iter()
            .flatten()
            .find(|t| t.as_str() != "full_attention")
        {
            bail!("layer type {kind:?} is not supported (only \"full_attention\")");
        }
        if self.use_sliding_window {
            bail!("use_sliding_window=true is not supported (Qwen3-4B uses full attention)");
        }
        Ok(())
    }
}

/// RoPE inverse frequencies `1 / theta^(2i/d)` evaluated in f32 like transformers'
/// `compute_default_rope_parameters` (spec §2.2). torch's f32 `pow` is not always correctly
/// rounded, so one or two of the 64 values for d = 128 can differ by 1 ulp (relative 6e-8,
/// far below every tolerance).
pub fn rope_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / base.powf(exponent)
        })
        .collect()
}

/// `Qwen3RMSNorm`: `w * to_dtype(x_f32 * rsqrt(mean(x_f32²) + eps))` (spec §1, §2.2).
///
/// candle-nn's `rms_norm` on bf16 input rounds the rms to bf16 and applies the weight before
/// the single final rounding, so it is called on the f32 upcast with unit weight (= the f32
/// normalization), and the result is rounded and multiplied by the weight separately.
#[derive(Debug, Clone)]
struct Qwen3RmsNorm {
    weight: Tensor,
    ones_f32: Tensor,
    eps: f32,
}

impl Qwen3RmsNorm {
    fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let ones_f32 = Tensor::ones(dim, DType::F32, weight.device())?;
        Ok(Self {
            weight,
            ones_f32,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // CUDA bf16: the same two roundings in one kernel (the f32 normalisation multiplies by
        // rsqrt, as transformers does).
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(x) && self.weight.dtype() == DType::BF16 {
            return Ok(crate::cuda::fused::rms_norm_scale(
                x,
                &self.weight,
                self.eps,
            )?);
        }
        let dtype = x.dtype();
        let normed = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.ones_f32,
            self.eps,
        )?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// How the decoder layers mask attention (built once per forward).
enum LayerMask {
    /// Additive f32 bias `[B,1,1,L,L]` for [`sdpa`] (the op-by-op reference path).
    Bias(Tensor),
    /// CUDA: the causal flash kernel, with each batch row's number of real tokens (the row's
    /// first tokens; the rest is padding).
    #[cfg(feature = "cuda")]
    CausalKernel(Vec<usize>),
}

/// `Qwen3Attention` without cache (spec §2.2).
#[derive(Debug, Clone)]
struct Qwen3Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Qwen3RmsNorm,
    k_norm: Qwen3RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Qwen3Attention {
    fn load(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: candle_nn::linear_b(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_b(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_b(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_b(nh * hd, h, bias, vb.pp("o_proj"))?,
            q_norm: Qwen3RmsNorm::load(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: Qwen3RmsNorm::load(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x` [B,L,H]; `cos`/`sin` [L,head_dim/2] in the compute dtype.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &LayerMask) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // q/k RMSNorm per head *before* RoPE (Qwen3), on [B,L,heads,hd].
        let q = self.q_proj.forward(x)?.reshape((b, l, nh, hd))?;
        let q = self.q_norm.forward(&q)?;
        let k = self.k_proj.forward(x)?.reshape((b, l, nkv, hd))?;
        let k = self.k_norm.forward(&k)?;
        let v = self.v_proj.forward(x)?.reshape((b, l, nkv, hd))?;
        // Half-split rotation (`rotate_half`) in the compute dtype: candle's `rope` computes
        // `x1·cos − x2·sin`, `x1·sin + x2·cos` with one rounding per op like torch's
        // `q*cos + rotate_half(q)*sin` (`rope_thd` is the same per element, for [B,L,H,D]).
        let out = match mask {
            LayerMask::Bias(bias) => {
                let bhsd = |t: Tensor| t.transpose(1, 2)?.contiguous();
                let q = candle_nn::rotary_emb::rope(&bhsd(q)?, cos, sin)?;
                let k = candle_nn::rotary_emb::rope(&bhsd(k)?, cos, sin)?;
                let v = bhsd(v)?;
                sdpa(&q, &k, &v, bias, nkv)?.transpose(1, 2)? // [B,L,nh,hd]
            }
            // The kernel reads and writes [B,L,H,D]: no transposes around it.
            #[cfg(feature = "cuda")]
            LayerMask::CausalKernel(real_tokens) => {
                let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?;
                let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?;
                let scale = 1.0 / (hd as f32).sqrt();
                crate::cuda::flash_attention_causal_bshd(&q, &k, &v, scale, real_tokens)?
            }
        };
        let out = out.reshape((b, l, nh * hd))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// `F.scaled_dot_product_attention` with a boolean mask and GQA, as torch's flash kernels
/// evaluate it (see the module doc). `q` [B,nh,L,d], `k`/`v` [B,nkv,L,d]; query head `h` uses
/// kv head `h / (nh/nkv)`, done by grouping the query heads instead of repeating k/v.
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, nkv: usize) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, nh, l, d) = q.dims4()?;
    let rep = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    let qf = q.to_dtype(DType::F32)?.reshape((b, nkv, rep * l, d))?;
    let kf = k.to_dtype(DType::F32)?;
    let vf = v.to_dtype(DType::F32)?;
    let scores = (qf.matmul(&kf.t()?)? * scale)?.reshape((b, nkv, rep, l, l))?;
    let scores = scores.broadcast_add(mask)?;
    let out = if dtype == DType::F32 {
        let p = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, rep * l, l))?;
        p.matmul(&vf)?
    } else {
        let max = scores.max_keepdim(D::Minus1)?;
        let p = scores.broadcast_sub(&max)?.exp()?;
        let sum = p.sum_keepdim(D::Minus1)?.reshape((b, nkv, rep * l, 1))?;
        let p = p.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let p = p.reshape((b, nkv, rep * l, l))?;
        p.matmul(&vf)?.broadcast_div(&sum)?
    };
    Ok(out.reshape((b, nh, l, d))?.to_dtype(dtype)?)
}

/// `Qwen3MLP`: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Qwen3Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Qwen3Mlp {
    fn load(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: candle_nn::linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        #[cfg(feature = "cuda")]
        if crate::cuda::fused::applies(&gate) {
            let act = crate::cuda::fused::silu_mul(&gate, &up)?;
            return Ok(self.down_proj.forward(&act)?);
        }
        let act = crate::ops::silu(&gate)?;
        Ok(self.down_proj.forward(&(act * up)?)?)
    }
}

/// `Qwen3DecoderLayer` (pre-norm, spec §2.2).
#[derive(Debug, Clone)]
struct Qwen3DecoderLayer {
    input_layernorm: Qwen3RmsNorm,
    self_attn: Qwen3Attention,
    post_attention_layernorm: Qwen3RmsNorm,
    mlp: Qwen3Mlp,
}

impl Qwen3DecoderLayer {
    fn load(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: Qwen3RmsNorm::load(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Qwen3Attention::load(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: Qwen3RmsNorm::load(
                h,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Qwen3Mlp::load(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &LayerMask) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + h)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + m)?)
    }
}

/// The first `deepest_layer` decoder layers of Qwen3 plus the token embedding.
///
/// `hidden_states[k]` (transformers indexing: 0 = embeddings, k = after k layers) only needs
/// layers `0..k`, so layers `deepest_layer..` and `model.norm` are neither loaded nor run
/// (spec §2.2: for 9/18/27, layers 27..35 and the final norm are dead weight).
#[derive(Debug, Clone)]
pub struct Qwen3TextEncoder {
    embed_tokens: Embedding,
    layers: Vec<Qwen3DecoderLayer>,
    inv_freq: Vec<f32>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl Qwen3TextEncoder {
    /// Loads `model.embed_tokens` and `model.layers.{0..deepest_layer}` from `vb` (rooted at the
    /// checkpoint, i.e. keys `model.…`). The compute dtype is `vb.dtype()`.
    pub fn load(vb: VarBuilder, cfg: &Qwen3Config, deepest_layer: usize) -> Result<Self> {
        cfg.validate().context("unsupported Qwen3 config")?;
        if deepest_layer > cfg.num_hidden_layers {
            bail!(
                "hidden state {deepest_layer} requested but the text encoder has only {} layers \
                 (valid indices 0..={}; diffusers would raise IndexError)",
                cfg.num_hidden_layers,
                cfg.num_hidden_layers
            );
        }
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))
                .context("loading model.embed_tokens.weight")?;
        let vb_l = vb_m.pp("layers");
        let layers = (0..deepest_layer)
            .map(|i| {
                Qwen3DecoderLayer::load(cfg, vb_l.pp(i))
                    .with_context(|| format!("loading model.layers.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            inv_freq: rope_inv_freq(cfg.rope_theta(), cfg.head_dim()),
            head_dim: cfg.head_dim(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Compute dtype (the dtype the weights were loaded in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The attention a right-padded prompt runs on: the causal CUDA kernel's name, or `naive`
    /// (the op-by-op reference: CPU, f32, speed paths off, or the kernel unusable here).
    /// Benchmarks record it.
    pub fn attention_kernel(&self) -> String {
        #[cfg(feature = "cuda")]
        if self.uses_causal_kernel() {
            if let Some(name) = crate::cuda::causal_kernel_name(self.head_dim, self.dtype) {
                return name;
            }
        }
        "naive".into()
    }

    /// Whether right-padded prompts run on the causal CUDA kernel: CUDA, bf16/f16, a supported
    /// head dim, speed paths on, and the kernel loaded and self-checked.
    #[cfg(feature = "cuda")]
    fn uses_causal_kernel(&self) -> bool {
        crate::ops::cuda_speedups_enabled()
            && crate::cuda::causal_kernel_ready(&self.device, self.head_dim, self.dtype)
    }

    /// Number of decoder layers loaded (= the deepest hidden-state index available).
    pub fn num_loaded_layers(&self) -> usize {
        self.layers.len()
    }

    /// RoPE cos/sin `[L, head_dim/2]` for positions `0..L`: angles `pos·inv_freq` in f32,
    /// cos/sin in f32, then rounded to the compute dtype (spec §2.2). Computed on the host
    /// (a few KB) once per forward.
    fn rope_tables(&self, seq_len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// The mask for [`Qwen3DecoderLayer::forward`] from the caller's `attention_mask` (on any
    /// device; the tokenizer's is on the host, so reading the padding costs no transfer): the
    /// causal kernel's real-token counts where [`Self::uses_causal_kernel`] and every row's
    /// real tokens come first, the additive bias on this encoder's device otherwise.
    fn layer_mask(&self, attention_mask: &Tensor, seq_len: usize) -> Result<LayerMask> {
        #[cfg(feature = "cuda")]
        if self.uses_causal_kernel() {
            if let Some(real_tokens) = right_padded_lengths(attention_mask)? {
                return Ok(LayerMask::CausalKernel(real_tokens));
            }
        }
        Ok(LayerMask::Bias(Self::attention_bias(
            &attention_mask.to_device(&self.device)?,
            seq_len,
        )?))
    }

    /// Additive f32 mask `[B,1,1,L,L]`: query `i` may see key `j` iff `j <= i` and
    /// `attention_mask[j] != 0` (spec §2.2; pad query rows see the real tokens only).
    fn attention_bias(attention_mask: &Tensor, seq_len: usize) -> Result<Tensor> {
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
        Ok(allowed
            .where_cond(&zeros, &blocked)?
            .reshape((b, 1, 1, seq_len, seq_len))?)
    }

    /// Applies decoder layers `from..to` to `hidden` (= `hidden_states[from]`, `[B,L,H]`) and
    /// returns `hidden_states[to]`. Lets parity tests check each layer on the reference's own
    /// input (the tiny random models are chaotic enough that f32 rounding differences grow
    /// ~300× over 27 layers, see `tests/parity_text_encoder.rs`).
    pub fn run_layers(
        &self,
        hidden: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        to: usize,
    ) -> Result<Tensor> {
        if from > to || to > self.layers.len() {
            bail!(
                "run_layers: invalid layer range {from}..{to} ({} layers loaded)",
                self.layers.len()
            );
        }
        let (b, l, _) = hidden
            .dims3()
            .context("hidden must be [batch, seq_len, hidden]")?;
        if attention_mask.dims() != [b, l] {
            bail!(
                "attention_mask shape {:?} does not match hidden [{b}, {l}, _]",
                attention_mask.dims()
            );
        }
        let mut h = hidden.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (cos, sin) = self.rope_tables(l)?;
        let mask = self.layer_mask(attention_mask, l)?;
        for i in from..to {
            h = self.layers[i]
                .forward(&h, &cos, &sin, &mask)
                .with_context(|| format!("Qwen3 decoder layer {i}"))?;
        }
        Ok(h)
    }

    /// Runs the encoder and returns the raw residual stream `hidden_states[k]` `[B,L,H]` for
    /// each `k` in `layers` (in that order; 0 = embeddings, k = after k layers, never the final
    /// norm). `input_ids` [B,L] (u32 or i64), `attention_mask` [B,L] (any dtype, nonzero =
    /// real token). Positions are `0..L` for every row regardless of padding (spec §2.2).
    ///
    /// The first key of every row must be a real token (true for right padding); otherwise
    /// that row's first query has nothing to attend to (NaN, as in torch).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>> {
        let (b, l) = input_ids
            .dims2()
            .context("input_ids must be [batch, seq_len]")?;
        if attention_mask.dims() != [b, l] {
            bail!(
                "attention_mask shape {:?} does not match input_ids [{b}, {l}]",
                attention_mask.dims()
            );
        }
        if layers.is_empty() {
            bail!("no hidden-state layers requested (e.g. [9, 18, 27])");
        }
        let deepest = *layers.iter().max().unwrap_or(&0);
        if deepest > self.layers.len() {
            bail!(
                "hidden state {deepest} requested but only {} layers were loaded (load the \
                 encoder with deepest_layer >= {deepest})",
                self.layers.len()
            );
        }
        let input_ids = input_ids.to_device(&self.device)?;
        let mut outputs: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut record = |k: usize, h: &Tensor| {
            for (slot, &want) in outputs.iter_mut().zip(layers) {
                if want == k {
                    *slot = Some(h.clone());
                }
            }
        };
        let mut h = self
            .embed_tokens
            .forward(&input_ids)
            .context("embedding input_ids (ids must be < vocab_size)")?;
        record(0, &h);
        if deepest > 0 {
            let (cos, sin) = self.rope_tables(l)?;
            let mask = self.layer_mask(attention_mask, l)?;
            for (i, layer) in self.layers[..deepest].iter().enumerate() {
                h = layer
                    .forward(&h, &cos, &sin, &mask)
                    .with_context(|| format!("Qwen3 decoder layer {i}"))?;
                record(i + 1, &h);
            }
        }
        outputs
            .into_iter()
            .map(|o| o.context("internal: hidden state not recorded"))
            .collect()
    }
}

/// Each row's number of real tokens when every row of `attention_mask` `[B, L]` is right
/// padded (ones, then zeros) and holds at least one real token; `None` for any other pattern
/// (left padding, holes), which the additive bias handles.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA path rotates q/k in [B,L,H,D] with `rope_thd`, the reference path in
    /// [B,H,L,D] with `rope`: the same values, bit for bit (candle's CPU kernels; the CUDA
    /// kernels evaluate the same per-element expression).
    #[test]
    fn rope_thd_equals_rope_on_the_transpose() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 3, 8), &dev)?.to_dtype(DType::BF16)?;
        let cos = Tensor::randn(0f32, 1.0, (7, 4), &dev)?.to_dtype(DType::BF16)?;
        let sin = Tensor::randn(0f32, 1.0, (7, 4), &dev)?.to_dtype(DType::BF16)?;
        let thd = candle_nn::rotary_emb::rope_thd(&x, &cos, &sin)?;
        let bhsd = candle_nn::rotary_emb::rope(&x.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let diff = (thd.to_dtype(DType::F32)? - bhsd.transpose(1, 2)?.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
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
