//! CPU benchmarks of the tiny random-weight fixture model (`tests/fixtures/models/tiny-w0`):
//! one transformer forward, one text-encoder forward, one VAE decode, each fed the inputs
//! diffusers recorded for the `t2i_64x64` case, and one whole `Pipeline::generate` at 64×64.
//!
//! The tiny model is far from klein's real cost profile, but every op and every code path of
//! the real model runs, so a regression in kernel choice, layout copies or per-call overhead
//! shows here without a GPU. Run with `cargo bench --bench models`.

mod bench_config;
#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use flux2_klein::model_dir::ModelDir;
use flux2_klein::pipeline::{Pipeline, PipelineOptions, Request};
use flux2_klein::text_encoder::{
    PromptTokenizer, Qwen3Config, Qwen3TextEncoder, DEFAULT_LAYERS, DEFAULT_MAX_LEN,
};
use flux2_klein::transformer::{Flux2Transformer, Flux2TransformerConfig, Inputs};
use flux2_klein::vae::{AutoencoderKLFlux2, VaeParts};

const MODEL: &str = "tiny-w0";
const CASE: &str = "t2i_64x64";
const PROMPT: &str = r#"A cat holding a sign that says "Gifu AI Study Group""#;

fn transformer(c: &mut Criterion) {
    let dir = common::model(MODEL).join("transformer");
    let cfg = Flux2TransformerConfig::from_file(dir.join("config.json")).unwrap();
    let m = Flux2Transformer::load_safetensors(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        &cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let t = common::case_tensors(CASE);
    let arg = |k: &str| -> Tensor {
        t.get(&format!("step.0.cond.{k}"))
            .unwrap_or_else(|| panic!("{CASE}: no tensor step.0.cond.{k}"))
            .clone()
    };
    let (x, ctx, ts, img_ids, txt_ids) = (
        arg("hidden_states"),
        arg("encoder_hidden_states"),
        arg("timestep"),
        arg("img_ids"),
        arg("txt_ids"),
    );
    let mut g = c.benchmark_group("tiny");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("transformer_forward_t2i_64x64", |b| {
        b.iter(|| {
            let inputs = Inputs {
                hidden_states: black_box(&x),
                encoder_hidden_states: &ctx,
                timestep: &ts,
                guidance: None,
            };
            m.forward(&inputs, &m.rope(&img_ids, &txt_ids).unwrap(), None)
                .unwrap()
        })
    });
    g.finish();
}

fn text_encoder(c: &mut Criterion) {
    // The pipeline's own loading path: config parsed and validated, weights mapped.
    let dir = ModelDir::open_local(&common::model(MODEL)).unwrap();
    let cfg: Qwen3Config = dir.config("text_encoder").unwrap();
    let vb = dir
        .var_builder("text_encoder", DType::F32, &Device::Cpu)
        .unwrap();
    let deepest = *DEFAULT_LAYERS.iter().max().unwrap();
    let enc = Qwen3TextEncoder::load(vb, &cfg, deepest).unwrap();
    let tok = PromptTokenizer::from_file(
        &common::fixtures().join("tokenizer/tokenizer.json"),
        DEFAULT_MAX_LEN,
    )
    .unwrap();
    let (ids, mask) = tok
        .encode(&[PROMPT])
        .unwrap()
        .to_tensors(&Device::Cpu)
        .unwrap();
    let mut g = c.benchmark_group("tiny");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("tokenize_prompt", |b| {
        b.iter(|| tok.encode(black_box(&[PROMPT])).unwrap())
    });
    // ~0.2-0.3 s per forward on 2 cores.
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("text_encoder_forward_512tok", |b| {
        b.iter(|| {
            enc.forward(black_box(&ids), &mask, &DEFAULT_LAYERS)
                .unwrap()
        })
    });
    g.finish();
}

fn vae_decode(c: &mut Criterion) {
    let vae = AutoencoderKLFlux2::load_dir(
        common::model(MODEL).join("vae"),
        DType::F32,
        &Device::Cpu,
        VaeParts::DECODER,
    )
    .unwrap();
    let t = common::case_tensors(CASE);
    let z = t
        .get("vae.decode.input")
        .unwrap_or_else(|| panic!("{CASE}: no tensor vae.decode.input"))
        .clone();
    let mut g = c.benchmark_group("tiny");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("vae_decode_t2i_64x64", |b| {
        b.iter(|| vae.decode(black_box(&z)).unwrap())
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let model = ModelDir::open_local(&common::model(MODEL)).unwrap();
    let options = PipelineOptions {
        keep_resident: true,
        ..PipelineOptions::for_device(Device::Cpu)
    };
    let mut p = Pipeline::open(model, options).unwrap();
    let mut request = Request::new(PROMPT, 0);
    request.width = Some(64);
    request.height = Some(64);
    // Load every component once, outside the measurement.
    let first = p.generate(&request, &mut |_| {}).unwrap();
    assert_eq!((first.width, first.height, first.steps), (64, 64, 4));
    let mut g = c.benchmark_group("tiny");
    g.sampling_mode(SamplingMode::Flat);
    // ~0.35 s per generation on 2 cores: 10 samples need more than the default 2 s.
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("pipeline_generate_64x64_4steps", |b| {
        b.iter(|| p.generate(black_box(&request), &mut |_| {}).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = bench_config::quick(Duration::from_secs(2));
    targets = transformer, text_encoder, vae_decode, pipeline
}
criterion_main!(benches);
