//! The load time a rank-16 LoRA adds, on full-size klein-4B shapes: every weight of one double
//! block and of one single block (random bf16 weights in memory) loaded through a plain
//! backend and through `lora::merge::MergingBackend` with a rank-16 adapter on all of the
//! block's linears. The whole transformer has 5 double and 20 single blocks, so its added
//! load time is ≈ 5 × (double) + 20 × (single); BENCHMARKS.md has the numbers.
//!
//! Run with `cargo bench --bench lora` (~1 min on 2 cores, ~2 GB of memory; not part of
//! `scripts/bench_cpu.sh`). The per-step cost does not change: the merged weights are the
//! same dense tensors.

mod bench_config;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use flux2_klein::lora::{merge::MergingBackend, read::linear_shapes, AppliedLora, Lora};
use flux2_klein::transformer::Flux2TransformerConfig;

const RANK: usize = 16;

/// The block's linears and their `[out, in]` shapes in the full-size model.
fn block_linears(cfg: &Flux2TransformerConfig, block: &str) -> Vec<(String, (usize, usize))> {
    linear_shapes(cfg)
        .into_iter()
        .filter(|(m, _)| m.starts_with(block) && !m.ends_with("qkv"))
        .collect()
}

fn randn(shape: (usize, usize), std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

fn bench_block(c: &mut Criterion, name: &str, block: &str) {
    let cfg = Flux2TransformerConfig::klein_4b();
    let linears = block_linears(&cfg, block);
    let weights: HashMap<String, Tensor> = linears
        .iter()
        .map(|(m, s)| (format!("{m}.weight"), randn(*s, 0.02)))
        .collect();
    let mut adapter = HashMap::new();
    for (m, (out, inp)) in &linears {
        adapter.insert(
            format!("transformer.{m}.lora_A.weight"),
            randn((RANK, *inp), 0.01),
        );
        adapter.insert(
            format!("transformer.{m}.lora_B.weight"),
            randn((*out, RANK), 0.01),
        );
    }
    let path = std::env::temp_dir().join(format!(
        "flux2-klein-bench-lora-{name}-{}.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&adapter, &path).unwrap();
    let lora = Arc::new(Lora::open_file(&path, name, &cfg).unwrap());
    let _ = std::fs::remove_file(&path);
    let applied = [AppliedLora { lora, scale: 0.8 }];

    let load_all = |vb: &VarBuilder| {
        for (m, (out, inp)) in &linears {
            black_box(vb.pp(m).get((*out, *inp), "weight").unwrap());
        }
    };
    let mut g = c.benchmark_group("lora");
    g.sampling_mode(SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function(format!("{name}_plain"), |b| {
        b.iter(|| {
            let vb = VarBuilder::from_backend(Box::new(weights.clone()), DType::BF16, Device::Cpu);
            load_all(&vb)
        })
    });
    g.bench_function(format!("{name}_merge_rank{RANK}"), |b| {
        b.iter(|| {
            let (backend, _) = MergingBackend::new(Box::new(weights.clone()), &applied);
            let vb = VarBuilder::from_backend(Box::new(backend), DType::BF16, Device::Cpu);
            load_all(&vb)
        })
    });
    g.finish();
}

fn double_block(c: &mut Criterion) {
    bench_block(c, "full_double_block_bf16", "transformer_blocks.0.");
}

fn single_block(c: &mut Criterion) {
    bench_block(c, "full_single_block_bf16", "single_transformer_blocks.0.");
}

criterion_group! {
    name = benches;
    config = bench_config::quick(Duration::from_secs(10));
    targets = double_block, single_block
}
criterion_main!(benches);
