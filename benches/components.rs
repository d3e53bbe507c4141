//! CPU benchmarks of the model-independent stages: scheduler, seeded noise, reference-image
//! preprocessing and latent plumbing, at the sizes the real klein model uses (1024² output:
//! a `[1, 128, 64, 64]` patchified latent, 4096 tokens).
//!
//! Run with `cargo bench --bench components` (or `scripts/bench_cpu.sh` for everything).
//! Measurement times are short on purpose (see `bench_config`).

mod bench_config;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use flux2_klein::image_io::{prepare_reference, rgb_to_tensor};
use flux2_klein::latents;
use flux2_klein::noise::{randn_tensor, torch_randn};
use flux2_klein::scheduler::{Schedule, SchedulerConfig};
use image::{DynamicImage, RgbImage};

fn scheduler(c: &mut Criterion) {
    let cfg = SchedulerConfig::flux2();
    let mut g = c.benchmark_group("scheduler");
    // 4 steps: the distilled default; 50: base checkpoints. 4096 tokens = 1024² output.
    for steps in [4usize, 50] {
        g.bench_function(format!("schedule_new_{steps}"), |b| {
            b.iter(|| Schedule::new(black_box(&cfg), black_box(steps), 4096).unwrap())
        });
    }
    g.finish();
}

fn noise(c: &mut Criterion) {
    let mut g = c.benchmark_group("noise");
    // [1,128,64,64]: 1024² output; [1,128,128,128]: 2048². The 128x128 `torch_randn` and bf16
    // `randn_tensor` entries replace the timed test `noise_is_fast` (it asserted < 400 ms):
    // speed is watched here, never asserted in a test.
    for shape in [[1usize, 128, 64, 64], [1, 128, 128, 128]] {
        let name = format!("{}x{}", shape[2], shape[3]);
        g.bench_function(format!("torch_randn_{name}"), |b| {
            b.iter(|| torch_randn(black_box(0), black_box(&shape)))
        });
        g.bench_function(format!("randn_tensor_f32_{name}"), |b| {
            b.iter(|| randn_tensor(black_box(0), &shape, DType::F32, &Device::Cpu).unwrap())
        });
        g.bench_function(format!("randn_tensor_bf16_{name}"), |b| {
            b.iter(|| randn_tensor(black_box(0), &shape, DType::BF16, &Device::Cpu).unwrap())
        });
    }
    g.finish();
}

/// A deterministic 1500×1000 RGB image with detail at every scale (gradients plus xorshift
/// noise), so the Lanczos resize does real work. 1.5 MP > 1024², so `prepare_reference` shrinks
/// it to 1254×836 and centre-crops to 1248×832.
fn test_image() -> RgbImage {
    let (w, h) = (1500u32, 1000u32);
    let mut state = 0x2545_f491_u32;
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = state & 0x3f;
        image::Rgb([
            ((x * 255 / w + n) & 0xff) as u8,
            ((y * 255 / h + 2 * n) & 0xff) as u8,
            (((x ^ y) + n) & 0xff) as u8,
        ])
    })
}

fn image_io(c: &mut Criterion) {
    let img = DynamicImage::ImageRgb8(test_image());
    let prepared = prepare_reference(&img).unwrap();
    assert_eq!(
        (prepared.width(), prepared.height()),
        (1248, 832),
        "prepare_reference of 1500×1000"
    );
    let mut g = c.benchmark_group("image_io");
    // ~40 ms per resize: flat sampling (10 × n iterations) instead of linear (55 × n).
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("prepare_reference_1500x1000", |b| {
        b.iter(|| prepare_reference(black_box(&img)).unwrap())
    });
    g.bench_function("rgb_to_tensor_1248x832", |b| {
        b.iter(|| rgb_to_tensor(black_box(&prepared), &Device::Cpu).unwrap())
    });
    g.finish();
}

fn latent_plumbing(c: &mut Criterion) {
    let dev = Device::Cpu;
    // The VAE latent of a 1024² image: [1, 32, 128, 128] → patchify → [1, 128, 64, 64] →
    // pack → [1, 4096, 128].
    let z = Tensor::from_vec(torch_randn(1, &[1, 32, 128, 128]), (1, 32, 128, 128), &dev).unwrap();
    let patched = latents::patchify(&z).unwrap().contiguous().unwrap();
    let packed = latents::pack(&patched).unwrap();
    let mean = Tensor::from_vec(torch_randn(2, &[128]), 128, &dev).unwrap();
    let var = Tensor::from_vec(torch_randn(3, &[128]), 128, &dev)
        .unwrap()
        .abs()
        .unwrap();
    let eps = 1e-4;
    let mut g = c.benchmark_group("latents");
    g.bench_function("patchify_32x128x128", |b| {
        b.iter(|| {
            latents::patchify(black_box(&z))
                .unwrap()
                .contiguous()
                .unwrap()
        })
    });
    g.bench_function("unpatchify_128x64x64", |b| {
        b.iter(|| {
            latents::unpatchify(black_box(&patched))
                .unwrap()
                .contiguous()
                .unwrap()
        })
    });
    g.bench_function("pack_128x64x64", |b| {
        b.iter(|| latents::pack(black_box(&patched)).unwrap())
    });
    g.bench_function("unpack_4096x128", |b| {
        b.iter(|| {
            latents::unpack(black_box(&packed), 64, 64)
                .unwrap()
                .contiguous()
                .unwrap()
        })
    });
    g.bench_function("bn_normalize_128x64x64", |b| {
        b.iter(|| latents::bn_normalize(black_box(&patched), &mean, &var, eps).unwrap())
    });
    g.bench_function("bn_denormalize_128x64x64", |b| {
        b.iter(|| latents::bn_denormalize(black_box(&patched), &mean, &var, eps).unwrap())
    });
    g.bench_function("image_ids_64x64", |b| {
        b.iter(|| latents::image_ids(0, black_box(64), 64, &dev).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = bench_config::quick(Duration::from_millis(1500));
    targets = scheduler, noise, image_io, latent_plumbing
}
criterion_main!(benches);
