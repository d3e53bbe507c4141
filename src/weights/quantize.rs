//! `--quantize fp8`: linear weights stored in bf16/f32 are quantised to fp8 when they load,
//! as a `VarBuilder` backend wrapped around the component's own (so any other loading layer,
//! e.g. a LoRA merge, can wrap or be wrapped the same way).
//!
//! Granularity: **one scale per weight tensor**, `scale = amax / 448`, E4M3 (round to
//! nearest even, saturating). That is the recipe of BFL's own fp8 files and ComfyUI's
//! (spec-wave2 §2.2), so `--quantize fp8` of the bf16 checkpoint holds the values an fp8 file
//! made the same way holds, and a per-tensor scale is what the fp8 tensor-core GEMM takes on
//! Ada/Hopper (cuBLASLt's scalar A/B scale pointers; per-row scaling needs Blackwell).
//! Per-row scales (torchao's default) would be slightly more accurate for rows far below the
//! tensor's largest value.
//!
//! Kept as fp8 ([`QuantizeFp8::keeping_fp8`], the default on CUDA), the quantised weight is
//! offered to the layers as stored (`ops::linear::FP8_WEIGHT`): half the memory of bf16, and
//! dequantised per layer at each forward. Otherwise (the CPU) it is dequantised at once to the
//! compute dtype. The numbers are the fp8 model's either way.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::file_backend::fp8_request;
use super::fp8::{self, Fp8Format};

/// A weight quantisation applied at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// fp8 E4M3 with one scale per tensor (see the module doc).
    Fp8,
}

impl Quantization {
    /// The name the CLI and image metadata use (`fp8`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp8 => "fp8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "fp8" => Some(Self::Fp8),
            _ => None,
        }
    }
}

/// The transformer's block linears: the 80 layers BFL's klein-4B fp8 file stores as fp8
/// (double blocks: q/k/v, out, the MLPs of both streams; single blocks: the fused input and
/// output projections), named as diffusers does.
pub fn is_transformer_block_linear(name: &str) -> bool {
    const DOUBLE: &[&str] = &[
        "attn.to_q.weight",
        "attn.to_k.weight",
        "attn.to_v.weight",
        "attn.add_q_proj.weight",
        "attn.add_k_proj.weight",
        "attn.add_v_proj.weight",
        "attn.to_out.0.weight",
        "attn.to_add_out.weight",
        "ff.linear_in.weight",
        "ff.linear_out.weight",
        "ff_context.linear_in.weight",
        "ff_context.linear_out.weight",
    ];
    const SINGLE: &[&str] = &["attn.to_qkv_mlp_proj.weight", "attn.to_out.weight"];
    let inner = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split_once('.'))
            .filter(|(i, _)| i.parse::<usize>().is_ok())
            .map(|(_, inner)| inner)
    };
    if let Some(inner) = inner("transformer_blocks.") {
        return DOUBLE.contains(&inner);
    }
    if let Some(inner) = inner("single_transformer_blocks.") {
        return SINGLE.contains(&inner);
    }
    false
}

/// The Qwen3 text encoder's decoder-layer linears (attention q/k/v/o, MLP gate/up/down); the
/// token embedding is a lookup and stays as stored.
pub fn is_text_encoder_linear(name: &str) -> bool {
    const LINEARS: &[&str] = &[
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(i, inner)| i.parse::<usize>().is_ok() && LINEARS.contains(&inner))
}

/// A backend that quantises the selected weights of `inner` to fp8 and back (module doc).
pub struct QuantizeFp8<B> {
    inner: B,
    select: fn(&str) -> bool,
    /// Weights that are already fp8 in the file (not quantised twice).
    already_fp8: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Offer the quantised weights as stored (fp8 + scale) instead of dequantised.
    keep_fp8: bool,
    /// The scale of each weight quantised for keeping (asked for after its codes).
    scales: Mutex<HashMap<String, f32>>,
}

impl<B: SimpleBackend> QuantizeFp8<B> {
    pub fn new(inner: B, select: fn(&str) -> bool) -> Self {
        Self {
            inner,
            select,
            already_fp8: Box::new(|_| false),
            keep_fp8: false,
            scales: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps the quantised weights in fp8 (see the module doc).
    pub fn keeping_fp8(mut self, keep: bool) -> Self {
        self.keep_fp8 = keep;
        self
    }

    /// Skips the weights for which `already_fp8` holds (an fp8 file's own layers).
    pub fn skipping(mut self, already_fp8: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.already_fp8 = Box::new(already_fp8);
        self
    }

    fn quantized(&self, t: Tensor, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = t.shape().clone();
        let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let values = fp8::round_trip(&values, Fp8Format::E4M3);
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn wants(&self, name: &str) -> bool {
        (self.select)(name) && !(self.already_fp8)(name)
    }

    /// The E4M3 codes (or with `scale`, the scale) of the model weight `weight`, quantised
    /// here; on `dev`.
    fn kept(
        &self,
        weight: &str,
        scale: bool,
        s: Option<Shape>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let cached = self
            .scales
            .lock()
            .expect("not poisoned")
            .get(weight)
            .copied();
        if let (true, Some(v)) = (scale, cached) {
            return Tensor::new(v, &Device::Cpu)?.to_device(dev);
        }
        let t = match s {
            Some(s) => self.inner.get(
                s,
                weight,
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )?,
            None => self.inner.get_unchecked(weight, DType::F32, &Device::Cpu)?,
        };
        let shape = t.shape().clone();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let v = fp8::per_tensor_scale(&values, Fp8Format::E4M3);
        self.scales
            .lock()
            .expect("not poisoned")
            .insert(weight.to_string(), v);
        if scale {
            return Tensor::new(v, &Device::Cpu)?.to_device(dev);
        }
        let codes = fp8::quantize(&values, v, Fp8Format::E4M3);
        Tensor::from_raw_buffer(&codes, DType::F8E4M3, shape.dims(), &Device::Cpu)?.to_device(dev)
    }
}

impl<B: SimpleBackend> SimpleBackend for QuantizeFp8<B> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some((weight, scale)) = fp8_request(name) {
            if !self.inner.contains_tensor(name) {
                return self.kept(&weight, scale, (!scale).then_some(s), dev);
            }
        }
        if !self.wants(name) {
            return self.inner.get(s, name, h, dtype, dev);
        }
        let t = self.inner.get(s, name, h, DType::F32, &Device::Cpu)?;
        self.quantized(t, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some((weight, scale)) = fp8_request(name) {
            if !self.inner.contains_tensor(name) {
                return self.kept(&weight, scale, None, dev);
            }
        }
        if !self.wants(name) {
            return self.inner.get_unchecked(name, dtype, dev);
        }
        let t = self.inner.get_unchecked(name, DType::F32, &Device::Cpu)?;
        self.quantized(t, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some((weight, _)) = fp8_request(name) {
            return self.inner.contains_tensor(name)
                || (self.keep_fp8 && self.wants(&weight) && self.inner.contains_tensor(&weight));
        }
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_layers() {
        assert!(is_transformer_block_linear(
            "transformer_blocks.3.attn.add_k_proj.weight"
        ));
        assert!(is_transformer_block_linear(
            "transformer_blocks.0.ff_context.linear_out.weight"
        ));
        assert!(is_transformer_block_linear(
            "single_transformer_blocks.19.attn.to_out.weight"
        ));
        assert!(!is_transformer_block_linear(
            "transformer_blocks.0.attn.norm_q.weight"
        ));
        assert!(!is_transformer_block_linear("x_embedder.weight"));
        assert!(!is_transformer_block_linear(
            "transformer_blocks.x.attn.to_q.weight"
        ));
        assert!(is_text_encoder_linear(
            "model.layers.7.mlp.down_proj.weight"
        ));
        assert!(!is_text_encoder_linear(
            "model.layers.7.self_attn.q_norm.weight"
        ));
        assert!(!is_text_encoder_linear("model.embed_tokens.weight"));
    }

    #[test]
    fn quantizes_only_the_selected_weights() {
        let mut map = std::collections::HashMap::new();
        let w = Tensor::new(&[[0.1f32, -0.7, 0.33], [1.9, 0.0, -0.02]], &Device::Cpu).unwrap();
        map.insert("model.layers.0.mlp.up_proj.weight".to_string(), w.clone());
        map.insert("model.norm.weight".to_string(), w.clone());
        let q = QuantizeFp8::new(map, is_text_encoder_linear);
        let get = |n: &str| {
            q.get(
                (2, 3).into(),
                n,
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        };
        let orig = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(get("model.norm.weight"), orig);
        let quant = get("model.layers.0.mlp.up_proj.weight");
        assert_ne!(quant, orig);
        assert_eq!(quant, fp8::round_trip(&orig, Fp8Format::E4M3));
        // The largest magnitude maps to 448 · scale (within the rounding of scale).
        assert!((quant[3] - 1.9).abs() <= 1.9 * f32::EPSILON);
    }
}
