//! Parity of the seeded noise with torch 2.15's CPU generator: `torch.randn(shape,
//! generator=torch.Generator("cpu").manual_seed(seed), dtype)` in f32, bf16 and f16 (sha256 of
//! the bytes), diffusers 0.42.1's `randn_tensor` with a list of per-sample generators, and the
//! legacy (torch <= 2.11) native-bf16 path. Every check is **bit-exact**.
//!
//! Sources of truth: `tests/fixtures/foundation/noise.json` (written by
//! `reference/foundation_fixtures.py`) and the golden numbers of spec §9. Speed is measured by
//! the `noise` group of `benches/components.rs`, never here.
#![allow(clippy::excessive_precision)] // golden values as torch prints them

mod common;

use candle_core::{DType, Device};
use common::foundation::foundation_json;
use flux2_klein::noise::{
    randn_tensor_per_sample, randn_tensor_with, torch_randn, Bf16Noise, TorchGenerator,
};
use sha2::{Digest, Sha256};

const CPU: Device = Device::Cpu;

fn noise_bytes(seed: u64, shape: &[usize], dtype: &str) -> (Vec<u8>, Vec<f64>) {
    let n: usize = shape.iter().product();
    let mut g = TorchGenerator::new(seed);
    match dtype {
        "f32" => {
            let v = g.randn_f32(n);
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                v.iter().map(|&x| x as f64).collect(),
            )
        }
        "bf16" => {
            let v = g.randn_bf16(n);
            (
                v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                v.iter().map(|x| x.to_f64()).collect(),
            )
        }
        "f16" => {
            let v = g.randn_f16(n);
            (
                v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                v.iter().map(|x| x.to_f64()).collect(),
            )
        }
        other => panic!("unknown dtype {other}"),
    }
}

#[test]
fn noise_matches_torch_fixture() {
    let fx = foundation_json("noise.json");
    let cases = fx["cases"].as_array().unwrap();
    for c in cases {
        let seed = c["seed"].as_u64().unwrap();
        let shape: Vec<usize> = common::json_uints(&c["shape"]);
        let dtype = c["dtype"].as_str().unwrap();
        let (bytes, vals) = noise_bytes(seed, &shape, dtype);
        let sha = format!("{:x}", Sha256::digest(&bytes));
        // Compared as f32: every value is an exact f32, so the JSON decimal parse cannot matter.
        let first: Vec<f32> = c["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let ours: Vec<f32> = vals[..first.len()].iter().map(|&x| x as f32).collect();
        assert_eq!(ours, first, "seed {seed} {shape:?} {dtype}: first values");
        assert_eq!(
            sha,
            c["sha256"].as_str().unwrap(),
            "seed {seed} {shape:?} {dtype}: sha256"
        );
        let sum: f64 = vals.iter().sum();
        let want = c["sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "seed {seed} {shape:?} {dtype}: sum {sum} vs {want}"
        );
    }
    eprintln!(
        "noise: {} (seed, shape, dtype) cases sha256-equal to torch {} ({})",
        cases.len(),
        fx["torch"].as_str().unwrap(),
        fx["cpu_capability"].as_str().unwrap()
    );
}

#[test]
fn noise_per_sample_generators_match_diffusers() {
    let fx = foundation_json("noise.json");
    let cases = fx["per_sample"].as_array().unwrap();
    for c in cases {
        let seeds: Vec<u64> = common::json_uints(&c["seeds"]);
        let shape: Vec<usize> = common::json_uints(&c["shape"]);
        let dtype = if c["dtype"] == "bf16" {
            DType::BF16
        } else {
            DType::F32
        };
        let t = randn_tensor_per_sample(&seeds, &shape, dtype, &CPU).unwrap();
        assert_eq!(t.dtype(), dtype);
        let v = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            format!("{:x}", Sha256::digest(&bytes)),
            c["sha256"].as_str().unwrap(),
            "seeds {seeds:?} {shape:?} {dtype:?}"
        );
    }
    assert!(randn_tensor_per_sample(&[1, 2], &[3, 16, 1, 1], DType::F32, &CPU).is_err());
    eprintln!(
        "noise: {} per-sample generator lists equal to diffusers' randn_tensor",
        cases.len()
    );
}

#[test]
fn noise_spec_golden_values() {
    let shape = [1, 128, 64, 64];
    let f0 = torch_randn(0, &shape);
    assert_eq!(
        &f0[..8],
        &[
            -1.1258398294448853,
            -1.152360200881958,
            -0.2505785822868347,
            -0.4338788092136383,
            0.8487103581428528,
            0.6920091509819031,
            -0.31601276993751526,
            -2.1152193546295166
        ]
    );
    assert_eq!(f0[4096], 1.947645664215088);
    assert_eq!(
        f0.iter().map(|&x| x as f64).sum::<f64>() as f32,
        -1249.2839815202674_f64 as f32
    );
    let f42 = torch_randn(42, &shape);
    assert_eq!(
        &f42[..8],
        &[
            1.9269152879714966,
            1.4872840642929077,
            0.9007171988487244,
            -2.1055209636688232,
            0.6784184575080872,
            -1.2345448732376099,
            -0.04306747764348984,
            -1.6046669483184814
        ]
    );
    // Low 32 bits only.
    assert_eq!(torch_randn(5, &[64]), torch_randn((1 << 40) + 5, &[64]));
    assert_eq!(torch_randn(5, &[64]), torch_randn((1 << 32) + 5, &[64]));

    let bf = |seed, mode| {
        randn_tensor_with(seed, &shape, DType::BF16, mode, &CPU)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    for (seed, first, sum) in [
        (
            0,
            [
                -1.125,
                -1.15625,
                -0.25,
                -0.43359375,
                0.84765625,
                0.69140625,
                -0.31640625,
                -2.109375,
            ],
            -1248.1193707808852,
        ),
        (
            42,
            [
                1.9296875,
                1.484375,
                0.90234375,
                -2.109375,
                0.6796875,
                -1.234375,
                -0.04296875,
                -1.6015625,
            ],
            -790.3958424199373,
        ),
    ] {
        let v = bf(seed, Bf16Noise::RoundedF32);
        assert_eq!(&v[..8], &first);
        assert!((v.iter().sum::<f64>() - sum).abs() < 1e-9);
    }
    // Legacy torch ≤ 2.11 native-bf16 path (spec §9 table, last column).
    for (seed, first, sum) in [
        (
            0,
            [
                1.4609375,
                0.291015625,
                0.9609375,
                1.5703125,
                0.494140625,
                -1.515625,
                -0.25,
                0.57421875,
            ],
            748.0911245346069,
        ),
        (
            42,
            [
                -0.80859375,
                -1.53125,
                0.40625,
                0.171875,
                -0.2470703125,
                0.2041015625,
                -0.87890625,
                -0.38671875,
            ],
            -293.6999559402466,
        ),
    ] {
        let v = bf(seed, Bf16Noise::LegacyNative);
        assert_eq!(&v[..8], &first, "legacy bf16 seed {seed}");
        assert!(
            (v.iter().sum::<f64>() - sum).abs() < 1e-9,
            "legacy bf16 seed {seed} sum"
        );
        if seed == 0 {
            let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert_eq!(max, 3.328125);
        }
    }
}
