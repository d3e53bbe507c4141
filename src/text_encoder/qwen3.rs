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
//! The ops are `crate::ops` (`norm::RmsNorm`, `mlp::silu_mul`, `attention` with
//! `Mask::causal_padded`), which run our fused CUDA kernels with the same roundings where they
//! apply: on CUDA the masked attention is the causal flash kernel (causal plus right padding,
//! so each row needs only its count of real tokens; f32 scores and statistics, P rounded to
//! the compute dtype, like the memory-efficient kernel torch's SDPA picks for a masked call on
//! CUDA). The speed paths off (`KernelOptions::fused`), the op-by-op path runs there too.
//!
//! Why not `candle_transformers::models::qwen3`? It rounds differently from transformers in
//! bf16 (its RMSNorm applies the weight before the single rounding, its attention takes the
//! softmax in the compute dtype with a materialised mask), it has no way to stop at layer 27
//! and return intermediate residual streams, and its attention cannot run our causal kernel.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::ops::{self, norm::RmsNorm, Linear, Mask};
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
    /// Whether `lm_head` is the embedding matrix (Qwen3-4B) or its own weight (Qwen3-8B);
    /// transformers' default is false. Only [`Qwen3Config::parameter_count`] reads it: the
    /// encoder stops before the head.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Qwen3Config {
    /// Reads and validates the Qwen3 config file ([`crate::model_dir::read_config`]).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::model_dir::read_config(path)
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

    /// Parameters of transformers' `Qwen3ForCausalLM` built from this config (the checkpoint
    /// the text encoder loads): embeddings, per layer the q/k/v/o projections, the q/k
    /// RMSNorms, the SwiGLU MLP and two RMSNorms, the final norm, and `lm_head` unless tied.
    /// Qwen3-4B: 4,022,468,096 (the 8,044,936,192 bytes of klein-4B's bf16 shards,
    /// spec-wave2 §6).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let hd = self.head_dim() as u64;
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.num_key_value_heads as u64 * hd;
        let embed = self.vocab_size as u64 * h;
        let attention = h * q + 2 * h * kv + q * h + 2 * hd;
        let mlp = 3 * h * self.intermediate_size as u64;
        let layer = attention + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers as u64 * layer + h + head
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
        use crate::limits::{check_config_float, check_config_values};
        use crate::limits::{MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH as WIDTH};
        check_config_values(&[
            ("vocab_size", self.vocab_size, MAX_CONFIG_VOCAB),
            ("hidden_size", self.hidden_size, WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * WIDTH),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                MAX_CONFIG_LAYERS,
            ),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("head_dim", self.head_dim(), 1024),
        ])?;
        let width = self.num_attention_heads.saturating_mul(self.head_dim());
        check_config_values(&[("num_attention_heads × head_dim", width, WIDTH)])?;
        check_config_float("rms_norm_eps", self.rms_norm_eps, 1.0)?;
        check_config_float("rope_theta", self.rope_theta(), 1e12)?;
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

/// `Qwen3Attention` without cache (spec §2.2).
#[derive(Debug, Clone)]
struct Qwen3Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
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
            q_proj: Linear::load(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::load(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::load(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::load(nh * hd, h, bias, vb.pp("o_proj"))?,
            q_norm: RmsNorm::load(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: RmsNorm::load(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x` [B,L,H]; `cos`/`sin` [L,head_dim/2] in the compute dtype.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Mask) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // q/k RMSNorm per head *before* RoPE (Qwen3), on [B,L,heads,hd].
        let q = self.q_proj.forward(x)?.reshape((b, l, nh, hd))?;
        let q = self.q_norm.forward(&q)?;
        let k = self.k_proj.forward(x)?.reshape((b, l, nkv, hd))?;
        let k = self.k_norm.forward(&k)?;
        let v = self.v_proj.forward(x)?.reshape((b, l, nkv, hd))?;
        // Half-split rotation (`rotate_half`) in the compute dtype, in the layout the mask's
        // attention runs in (the causal kernel reads [B,L,H,D]: no transposes around it).
        let layout = mask.layout();
        let q = ops::rope::rope_half_split(&layout.from_bshd(&q)?, cos, sin, layout)?;
        let k = ops::rope::rope_half_split(&layout.from_bshd(&k)?, cos, sin, layout)?;
        let v = layout.from_bshd(&v)?;
        let out = ops::attention(&q, &k, &v, layout, mask)?;
        let out = layout.to_bshd(&out)?.reshape((b, l, nh * hd))?;
        Ok(self.o_proj.forward(&out)?)
    }
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
            gate_proj: Linear::load_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: Linear::load_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: Linear::load_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&ops::mlp::silu_mul(&gate, &up)?)?)
    }
}

/// `Qwen3DecoderLayer` (pre-norm, spec §2.2).
#[derive(Debug, Clone)]
struct Qwen3DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Qwen3Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Qwen3Mlp,
}

impl Qwen3DecoderLayer {
    fn load(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Qwen3Attention::load(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Qwen3Mlp::load(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Mask) -> Result<Tensor> {
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
        ops::attention::causal_kernel_name(&self.device, self.head_dim, self.dtype)
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
    /// device; the tokenizer's is on the host, so reading the padding costs no transfer).
    fn layer_mask(&self, attention_mask: &Tensor) -> Result<Mask> {
        Ok(Mask::causal_padded(
            attention_mask,
            &self.device,
            self.head_dim,
            self.dtype,
        )?)
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
        let mask = self.layer_mask(attention_mask)?;
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
            let mask = self.layer_mask(attention_mask)?;
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
impl crate::model_dir::ComponentConfig for Qwen3Config {
    const WHAT: &'static str = "Qwen3 config";

    fn validate(&self) -> Result<()> {
        Qwen3Config::validate(self)
    }
}
