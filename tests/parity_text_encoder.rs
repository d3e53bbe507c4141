//! Parity of the prompt encoder with diffusers' `Flux2KleinPipeline.encode_prompt` (spec §2):
//! token ids (golden + diffusers fixtures from `reference/text_fixtures.py`), every Qwen3 hidden
//! state and the final `prompt_embeds` of the refcheck cases, bf16 tolerance, lazy layer
//! loading and batching with duplicates.
#![allow(
    clippy::excessive_precision,
    clippy::type_complexity,
    clippy::needless_range_loop
)] // golden values as diffusers prints them

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use flux2_klein::text_encoder::qwen3::rope_inv_freq;
use flux2_klein::text_encoder::{
    chat_template, encode_prompts, PromptTokenizer, Qwen3Config, Qwen3TextEncoder, DEFAULT_LAYERS,
    PAD_TOKEN_ID,
};

const GIFU: &str = r#"A cat holding a sign that says "Gifu AI Study Group""#;
const GIFU_IDS: [u32; 26] = [
    151644, 872, 198, 32, 8251, 9963, 264, 1841, 429, 2727, 330, 38, 20850, 15235, 19173, 5737, 1,
    151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271,
];
/// The spec's f32 quality bar, applied per layer on the reference's own input (measured
/// worst: 1.2e-6 tiny, 5.8e-7 tiny2, 7.9e-7 empty prompt).
const F32_TOL: f32 = 1e-5;
/// End to end through 27 chaotic tiny layers (see `check_hidden_states`; measured worst
/// 2.8e-4 tiny, 6.0e-4 tiny2 — torch's own f32 run is 4e-4 away from an f64 run).
const F32_CHAIN_TOL: f32 = 1e-3;
/// bf16, one layer on the reference's input (measured worst 7.4e-3 = ~2 bf16 ulps of the
/// largest element).
const BF16_TOL: f32 = 1e-2;
/// bf16 end to end. On the tiny random model bf16 rounding is amplified to O(1): torch's *own*
/// bf16 eager attention ends 0.75 (layer 27: 0.67) away from the sdpa reference, torch f32
/// 0.94 away; ours measures 0.64 worst, 0.56 on `prompt_embeds`. The bound only says we are
/// no farther from the reference than torch's other attention backend.
const BF16_CHAIN_TOL: f32 = 0.8;

fn tokenizer() -> PromptTokenizer {
    let path = common::fixtures().join("tokenizer/tokenizer.json");
    PromptTokenizer::from_file(&path, 512).unwrap()
}

fn te_paths(model: &str) -> (PathBuf, PathBuf) {
    let dir = common::model(model).join("text_encoder");
    (dir.join("config.json"), dir.join("model.safetensors"))
}

fn load_encoder(model: &str, dtype: DType, deepest: usize) -> Qwen3TextEncoder {
    let (cfg_path, weights) = te_paths(model);
    let cfg = Qwen3Config::from_file(&cfg_path).unwrap();
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }.unwrap();
    Qwen3TextEncoder::load(vb, &cfg, deepest).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

#[test]
fn gifu_token_ids_are_golden() {
    let tok = tokenizer();
    assert_eq!(
        chat_template(GIFU),
        "<|im_start|>user\nA cat holding a sign that says \"Gifu AI Study Group\"<|im_end|>\n\
         <|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    let batch = tok.encode(&[GIFU]).unwrap();
    let mut want: Vec<u32> = GIFU_IDS.to_vec();
    want.resize(512, 151643);
    assert_eq!(batch.input_ids[0], want);
    let mut mask = vec![1u32; 26];
    mask.resize(512, 0);
    assert_eq!(batch.attention_mask[0], mask);
    assert_eq!(batch.real_len, vec![26]);
    assert_eq!(batch.truncated, vec![0]);
    assert_eq!(PAD_TOKEN_ID, 151643);
}

/// Every prompt of `tests/fixtures/text/tokens.json` (diffusers' own tokenization path):
/// template text, ids, padding and the truncation count.
#[test]
fn fixture_prompts_match_diffusers_ids() {
    let path = common::fixtures().join("text/tokens.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tok = tokenizer();
    let prompts = doc["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 5);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let prompt = p["prompt"].as_str().unwrap();
        assert_eq!(
            chat_template(prompt),
            p["template"].as_str().unwrap(),
            "{name}"
        );
        let want: Vec<u32> = common::json_uints(&p["ids"]);
        let n_real = p["n_real"].as_u64().unwrap() as usize;
        let batch = tok.encode(&[prompt]).unwrap();
        assert_eq!(batch.real_len[0], n_real, "{name}: real token count");
        assert_eq!(&batch.input_ids[0][..n_real], &want[..], "{name}: ids");
        assert!(batch.input_ids[0][n_real..]
            .iter()
            .all(|&i| i == PAD_TOKEN_ID));
        assert_eq!(batch.attention_mask[0].iter().sum::<u32>() as usize, n_real);
        assert_eq!(
            batch.truncated[0],
            p["truncated"].as_u64().unwrap() as usize,
            "{name}: truncated count"
        );
        eprintln!(
            "{name}: {n_real} ids equal, truncated {}",
            batch.truncated[0]
        );
    }
    // The long prompt really exercises truncation.
    assert!(prompts.iter().any(|p| p["truncated"].as_u64().unwrap() > 0));
}

/// Compares our ids with `text.{i}.input_ids`/`attention_mask`, then every hidden state
/// k <= 27 with `text.{i}.hidden_states[k]` twice:
/// * per layer ("teacher-forced"): layer k-1 applied to the *reference* `hidden_states[k-1]`
///   must give `hidden_states[k]` within `layer_tol` — this is the implementation's accuracy;
/// * chained (our own full forward) within `chain_tol`. The tiny random models are chaotic
///   (q/k norm scales ×3 make attention sharp): torch's own f32 result drifts from an f64 run
///   by 1.1e-6 after one layer and 4e-4 after 27, and torch's eager vs sdpa attention differ
///   by 9.5e-5 at layer 27, so per-layer f32 rounding differences of ~1e-6 grow ~300× over the
///   stack here. 1e-5 end to end is below the reference's own f32 noise for these models.
///
/// Returns (worst per-layer error, worst chained error).
fn check_hidden_states(
    case: &str,
    text_idx: usize,
    prompt: &str,
    enc: &Qwen3TextEncoder,
    layer_tol: f32,
    chain_tol: f32,
) -> (f32, f32) {
    let t = common::case_tensors(case);
    let tok = tokenizer();
    let batch = tok.encode(&[prompt]).unwrap();
    let (ids, mask) = batch.to_tensors(&Device::Cpu).unwrap();
    let ref_ids = &t[&format!("text.{text_idx}.input_ids")];
    let ref_mask = &t[&format!("text.{text_idx}.attention_mask")];
    assert_eq!(ids_of(&ids), ids_of(ref_ids), "{case}: input_ids");
    assert_eq!(ids_of(&mask), ids_of(ref_mask), "{case}: attention_mask");

    let hs = &t[&format!("text.{text_idx}.hidden_states")];
    let name = format!("{case} text.{text_idx}.hidden_states");
    let layers: Vec<usize> = (0..=27).collect();
    let ours = enc.forward(ref_ids, ref_mask, &layers).unwrap();
    assert_eq!(
        common::max_rel_err(&ours[0], &hs.get(0).unwrap()),
        0.0,
        "{name}[0]"
    );
    let (mut worst_layer, mut worst_chain) = (0f32, 0f32);
    let mut chain = Vec::new();
    for k in 1..=27 {
        let r = hs.get(k).unwrap();
        let forced = enc
            .run_layers(&hs.get(k - 1).unwrap(), ref_mask, k - 1, k)
            .unwrap();
        let e_layer = common::max_rel_err(&forced, &r);
        let e_chain = common::max_rel_err(&ours[k], &r);
        assert!(
            e_layer <= layer_tol,
            "{name}[{k}] per layer: {e_layer:.3e} > {layer_tol:.0e}"
        );
        assert!(
            e_chain <= chain_tol,
            "{name}[{k}] chained: {e_chain:.3e} > {chain_tol:.0e}"
        );
        worst_layer = worst_layer.max(e_layer);
        worst_chain = worst_chain.max(e_chain);
        chain.push(format!("{e_chain:.1e}"));
    }
    eprintln!("{name}[1..=27]: per layer worst {worst_layer:.3e}; chained worst {worst_chain:.3e}");
    eprintln!("  chained by layer: {}", chain.join(" "));
    (worst_layer, worst_chain)
}

fn check_embeds(case: &str, name: &str, prompt: &str, enc: &Qwen3TextEncoder, tol: f32) -> f32 {
    let t = common::case_tensors(case);
    let out = encode_prompts(&tokenizer(), enc, &[prompt], &DEFAULT_LAYERS).unwrap();
    assert_eq!(out.truncated, vec![0]);
    assert_eq!(out.embeds.dtype(), t[name].dtype());
    let err = common::max_rel_err(&out.embeds, &t[name]);
    eprintln!("{case} {name}: max rel err {err:.3e} (tol {tol:.0e})");
    assert!(err <= tol, "{case} {name}: {err:.3e} > {tol:.0e}");
    err
}

#[test]
fn tiny_f32_matches_diffusers() {
    let enc = load_encoder("tiny-w0", DType::F32, 27);
    check_hidden_states("t2i_64x64", 0, GIFU, &enc, F32_TOL, F32_CHAIN_TOL);
    check_embeds("t2i_64x64", "prompt_embeds", GIFU, &enc, F32_CHAIN_TOL);
}

#[test]
fn tiny2_f32_matches_diffusers() {
    let prompt = common::case_json("tiny2_edit_64x128")["prompt"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(prompt, "a red fox in snow");
    let enc = load_encoder("tiny2-w0", DType::F32, 27);
    check_hidden_states(
        "tiny2_edit_64x128",
        0,
        &prompt,
        &enc,
        F32_TOL,
        F32_CHAIN_TOL,
    );
    check_embeds(
        "tiny2_edit_64x128",
        "prompt_embeds",
        &prompt,
        &enc,
        F32_CHAIN_TOL,
    );
}

/// CFG negative: the empty prompt (`text.1.*`, `negative_prompt_embeds`).
#[test]
fn cfg_negative_empty_prompt_matches_diffusers() {
    let enc = load_encoder("tiny-w0", DType::F32, 27);
    check_hidden_states("t2i_64x64_cfg4", 1, "", &enc, F32_TOL, F32_CHAIN_TOL);
    check_embeds(
        "t2i_64x64_cfg4",
        "negative_prompt_embeds",
        "",
        &enc,
        F32_CHAIN_TOL,
    );
    check_embeds("t2i_64x64_cfg4", "prompt_embeds", GIFU, &enc, F32_CHAIN_TOL);
}

#[test]
fn tiny_bf16_within_bf16_tolerance() {
    let enc = load_encoder("tiny-w0", DType::BF16, 27);
    assert_eq!(enc.dtype(), DType::BF16);
    check_hidden_states("t2i_64x64_bf16", 0, GIFU, &enc, BF16_TOL, BF16_CHAIN_TOL);
    check_embeds(
        "t2i_64x64_bf16",
        "prompt_embeds",
        GIFU,
        &enc,
        BF16_CHAIN_TOL,
    );
}

/// Batch `[Gifu, "", Gifu]`: the duplicate is computed once and every row equals the
/// single-prompt diffusers result.
#[test]
fn batch_with_duplicate_prompt() {
    let enc = load_encoder("tiny-w0", DType::F32, 27);
    let pos = &common::case_tensors("t2i_64x64")["prompt_embeds"];
    let neg = &common::case_tensors("t2i_64x64_cfg4")["negative_prompt_embeds"];
    let out = encode_prompts(&tokenizer(), &enc, &[GIFU, "", GIFU], &DEFAULT_LAYERS).unwrap();
    assert_eq!(out.embeds.dims(), [3, 512, 48]);
    assert_eq!(out.truncated, vec![0, 0, 0]);
    for (row, reference) in [(0, pos), (1, neg), (2, pos)] {
        let ours = out.embeds.narrow(0, row, 1).unwrap();
        common::assert_close(&format!("batch row {row}"), &ours, reference, F32_CHAIN_TOL);
    }
    let r0 = out.embeds.get(0).unwrap();
    let r2 = out.embeds.get(2).unwrap();
    assert_eq!(
        common::max_rel_err(&r0, &r2),
        0.0,
        "duplicate rows must be identical"
    );
}

/// The long fixture prompt reports its truncation through `encode_prompts`.
#[test]
fn truncation_count_is_reported() {
    let enc = load_encoder("tiny-w0", DType::F32, 9);
    let long: String = (0..60)
        .map(|i| {
            format!(
                "Sentence {i}: a watercolor fox walks through the snowy Gifu mountains at dawn."
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let out = encode_prompts(&tokenizer(), &enc, &["a", &long], &[9]).unwrap();
    assert_eq!(out.truncated, vec![0, 630]);
    assert_eq!(out.embeds.dims(), [2, 512, 16]);
}

/// A VarBuilder backend that records every tensor name asked for.
struct Recording {
    inner: candle_core::safetensors::MmapedSafetensors,
    names: Arc<Mutex<Vec<String>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.names.lock().unwrap().push(name.to_string());
        SimpleBackend::get(&self.inner, s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.names.lock().unwrap().push(name.to_string());
        SimpleBackend::get_unchecked(&self.inner, name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Layers >= the deepest requested hidden state and `model.norm` are never loaded (so they
/// cannot run); asking for a deeper state than loaded is an error, not a silent wrong answer.
#[test]
fn only_needed_layers_are_loaded() {
    let (cfg_path, weights) = te_paths("tiny-w0");
    let cfg = Qwen3Config::from_file(&cfg_path).unwrap();
    assert_eq!(cfg.num_hidden_layers, 28);
    let names = Arc::new(Mutex::new(Vec::new()));
    let backend = Recording {
        inner: unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }.unwrap(),
        names: names.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let enc = Qwen3TextEncoder::load(vb, &cfg, 27).unwrap();
    let names = names.lock().unwrap().clone();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    let deepest = names.iter().filter_map(|n| layer_of(n)).max().unwrap();
    assert_eq!(deepest, 26, "layers 0..27 loaded");
    assert!(
        names.iter().all(|n| !n.starts_with("model.norm")),
        "model.norm loaded"
    );
    assert!(names.iter().all(|n| !n.starts_with("lm_head")));
    assert_eq!(names.len(), 1 + 27 * 11, "embedding + 11 tensors per layer");
    assert_eq!(enc.num_loaded_layers(), 27);

    let t = common::case_tensors("t2i_64x64");
    let (ids, mask) = (&t["text.0.input_ids"], &t["text.0.attention_mask"]);
    let err = enc.forward(ids, mask, &[28]).unwrap_err();
    assert!(format!("{err:#}").contains("only 27 layers"), "{err:#}");
    // Asking for fewer layers still works (and runs only up to layer 9).
    let h = enc.forward(ids, mask, &[9]).unwrap();
    common::assert_close(
        "hidden_states[9]",
        &h[0],
        &t["text.0.hidden_states"].get(9).unwrap(),
        F32_CHAIN_TOL,
    );
    // More layers than the model has is rejected at load time.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
        .unwrap();
    assert!(Qwen3TextEncoder::load(vb, &cfg, 29).is_err());
}

/// `inv_freq` for the real model (head_dim 128, theta 1e6) against torch 2.15's f32 values
/// (`1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))`): at most 1 ulp apart.
#[test]
fn rope_inv_freq_matches_torch() {
    const TORCH_BITS: [u32; 64] = [
        0x3f800000, 0x3f4e4bad, 0x3f263de0, 0x3f05f6ef, 0x3ed7e89b, 0x3eadfcff, 0x3e8c3504,
        0x3e61f835, 0x3e361887, 0x3e12bd91, 0x3dec7fd6, 0x3dbe94c6, 0x3d99940d, 0x3d778513,
        0x3d47763f, 0x3d20bc1d, 0x3d0186e3, 0x3cd0c1a8, 0x3ca8398b, 0x3c879008, 0x3c5a7bf2,
        0x3c301052, 0x3c0de12d, 0x3be4aa46, 0x3bb8449c, 0x3b947dae, 0x3b6f520e, 0x3b40dac5,
        0x3b1b690d, 0x3afa78f0, 0x3ac9d75c, 0x3aa2a6f7, 0x3a83126f, 0x3a533f28, 0x3a2a3b44,
        0x3a092e02, 0x39dd1725, 0x39b229fb, 0x398f9272, 0x39676492, 0x393a7753, 0x39164324,
        0x38f22ce2, 0x38c327b5, 0x389d43a4, 0x387d75d4, 0x384c3fbe, 0x382497ab, 0x3804a2b2,
        0x37d5c441, 0x37ac431d, 0x378ad0ed, 0x375fba4f, 0x37344a0e, 0x371148e3, 0x36ea2732,
        0x36bcb0c1, 0x36980e02, 0x36751070, 0x36457bab, 0x361f23e4, 0x36003dec, 0x35ceaf79,
        0x35a68e4c,
    ];
    let ours = rope_inv_freq(1e6, 128);
    assert_eq!(ours.len(), 64);
    let mut exact = 0;
    for (i, &bits) in TORCH_BITS.iter().enumerate() {
        let ulps = (ours[i].to_bits() as i64 - bits as i64).abs();
        assert!(ulps <= 1, "inv_freq[{i}]: {ulps} ulp from torch");
        exact += (ulps == 0) as usize;
    }
    eprintln!("inv_freq: {exact}/64 bit-equal to torch, the rest 1 ulp");
    assert!(exact >= 63);
}

#[test]
fn config_head_dim_defaults_to_hidden_over_heads() {
    let cfg: Qwen3Config = serde_json::from_str(
        r#"{"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 1000000.0, "rope_scaling": null, "unknown_key": 1}"#,
    )
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.head_dim(), 16);
    assert_eq!(cfg.rope_theta(), 1e6);
    let bad: Qwen3Config = serde_json::from_str(
        r#"{"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}"#,
    )
    .unwrap();
    assert!(bad.validate().is_err());
}
