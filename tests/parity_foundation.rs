//! Parity of the pure-math foundation (scheduler, noise, latent layout, ids, BN, Euler step)
//! against diffusers/torch: every check here is **bit-exact**.
//!
//! Sources of truth: `tests/fixtures/foundation/{scheduler,noise}.json` (written by
//! `reference/foundation_fixtures.py` from diffusers 0.42.1 / torch 2.15), the refcheck cases
//! under `tests/fixtures/cases/`, and the golden numbers of spec §7.3 / §9.
#![allow(
    clippy::excessive_precision,
    clippy::type_complexity,
    clippy::needless_range_loop
)] // golden values as diffusers prints them

mod common;

use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use flux2_klein::latents::{
    batch_ids, bn_denormalize, bn_normalize, image_ids, latent_grid, pack, patchify, reference_ids,
    reference_time, text_ids, unpack, unpatchify, BnStats,
};
use flux2_klein::noise::{
    randn_tensor, randn_tensor_per_sample, randn_tensor_with, torch_randn, Bf16Noise,
    TorchGenerator,
};
use flux2_klein::scheduler::{
    compute_empirical_mu, euler_step, model_timestep, Schedule, SchedulerConfig,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const CPU: Device = Device::Cpu;

fn foundation_json(name: &str) -> Value {
    let path = common::fixtures().join("foundation").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (run reference/foundation_fixtures.py with the refenv python)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Bit patterns of a float tensor (bf16/f16 are widened to f32 exactly).
fn tensor_bits(t: &Tensor) -> Vec<u32> {
    f32_bits(
        &t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    )
}

/// Asserts two tensors have the same shape, dtype and bits.
fn assert_bits_eq(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    assert_eq!(ours.dtype(), reference.dtype(), "{name}: dtype");
    let (a, b) = (tensor_bits(ours), tensor_bits(reference));
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        diff,
        0,
        "{name}: {diff} of {} values differ (max rel err {:.3e})",
        a.len(),
        common::max_rel_err(ours, reference)
    );
    eprintln!("{name}: bit-exact ({} values, {:?})", a.len(), ours.dtype());
}

fn assert_ids_eq(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    assert_eq!(ours.dtype(), DType::I64, "{name}: dtype");
    let a = ours.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let b = reference.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(a, b, "{name}: ids differ");
    eprintln!("{name}: equal ({} rows)", a.len() / 4);
}

// ------------------------------------------------------------------------------------------
// Scheduler
// ------------------------------------------------------------------------------------------

fn check_schedule_entry(cfg: &SchedulerConfig, e: &Value, what: &str) {
    let n = e["num_steps"].as_u64().unwrap() as usize;
    let seq = e["image_seq_len"].as_u64().unwrap() as usize;
    let (hh, ww) = (
        e["height"].as_u64().unwrap() as usize,
        e["width"].as_u64().unwrap() as usize,
    );
    let (h, w) = latent_grid(hh, ww).unwrap();
    assert_eq!(h * w, seq, "{what}: latent_grid({hh}, {ww})");
    let s = Schedule::new(cfg, n, seq).unwrap();
    let ctx = format!("{what} {hh}x{ww} n={n}");
    assert_eq!(
        s.mu.to_bits(),
        e["mu_bits"].as_u64().unwrap(),
        "{ctx}: mu {}",
        s.mu
    );
    assert_eq!(compute_empirical_mu(seq, n).to_bits(), s.mu.to_bits());
    assert_eq!(
        f32_bits(&s.timesteps),
        u32s(&e["timesteps_bits"]),
        "{ctx}: timesteps {:?}",
        s.timesteps
    );
    assert_eq!(
        f32_bits(&s.sigmas),
        u32s(&e["sigmas_bits"]),
        "{ctx}: sigmas {:?}",
        s.sigmas
    );
    let dts: Vec<f32> = (0..n).map(|i| s.dt(i)).collect();
    assert_eq!(f32_bits(&dts), u32s(&e["dt_f32_bits"]), "{ctx}: dt");
    let dt_bf16: Vec<f32> = dts
        .iter()
        .map(|&d| half::bf16::from_f32(d).to_f32())
        .collect();
    assert_eq!(
        f32_bits(&dt_bf16),
        u32s(&e["dt_bf16_bits"]),
        "{ctx}: bf16 dt"
    );
    for (dtype, key) in [
        (DType::BF16, "model_timestep_bf16_bits"),
        (DType::F32, "model_timestep_f32_bits"),
    ] {
        let fed: Vec<u32> = s
            .timesteps
            .iter()
            .flat_map(|&t| tensor_bits(&model_timestep(t, 1, dtype, &CPU).unwrap()))
            .collect();
        assert_eq!(fed, u32s(&e[key]), "{ctx}: {key}");
    }
}

#[test]
fn scheduler_matches_diffusers_fixture() {
    let fx = foundation_json("scheduler.json");
    let cfg: SchedulerConfig = serde_json::from_value(fx["config"].clone()).unwrap();
    // The tiny model's scheduler file parses to the same (FLUX.2) configuration.
    let tiny = common::model("tiny-w0").join("scheduler/scheduler_config.json");
    if tiny.exists() {
        assert_eq!(SchedulerConfig::from_file(&tiny).unwrap(), cfg);
    }
    assert_eq!(cfg, SchedulerConfig::flux2());
    let entries = fx["entries"].as_array().unwrap();
    for e in entries {
        check_schedule_entry(&cfg, e, "flux2");
    }
    let mut count = entries.len();
    for other in fx["other_configs"].as_array().unwrap() {
        let name = other["name"].as_str().unwrap();
        let c: SchedulerConfig = serde_json::from_value(other["config"].clone()).unwrap();
        if name == "class_defaults" {
            assert_eq!(c, SchedulerConfig::default());
        }
        for e in other["entries"].as_array().unwrap() {
            check_schedule_entry(&c, e, name);
            count += 1;
        }
    }
    eprintln!("scheduler: {count} schedules bit-exact (timesteps, sigmas, mu, dt, fed timestep)");
}

#[test]
fn scheduler_spec_golden_values() {
    let cfg = SchedulerConfig::flux2();
    let cases: [(usize, usize, f64, [f32; 4], [f32; 4]); 4] = [
        (
            1024,
            1024,
            2.291179894115571,
            [
                1000.0,
                967.384033203125,
                908.1439208984375,
                767.199951171875,
            ],
            [1.0, 0.96875, 0.90625, 0.76953125],
        ),
        (
            512,
            512,
            2.0306897079499455,
            [
                1000.0,
                958.0853881835938,
                883.9818725585938,
                717.49658203125,
            ],
            [1.0, 0.9609375, 0.8828125, 0.71484375],
        ),
        (
            256,
            512,
            1.9872746769223413,
            [
                1000.0,
                956.3068237304688,
                879.4544677734375,
                708.6140747070312,
            ],
            [1.0, 0.95703125, 0.87890625, 0.70703125],
        ),
        (
            512,
            256,
            1.9872746769223413,
            [
                1000.0,
                956.3068237304688,
                879.4544677734375,
                708.6140747070312,
            ],
            [1.0, 0.95703125, 0.87890625, 0.70703125],
        ),
    ];
    for (hh, ww, mu, ts, fed) in cases {
        let (h, w) = latent_grid(hh, ww).unwrap();
        let s = Schedule::new(&cfg, 4, h * w).unwrap();
        assert_eq!(s.mu, mu, "{hh}x{ww} mu");
        assert_eq!(s.timesteps, ts, "{hh}x{ww} timesteps");
        let got: Vec<f32> = ts
            .iter()
            .map(|&t| {
                model_timestep(t, 1, DType::BF16, &CPU)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[0]
            })
            .collect();
        assert_eq!(got, fed, "{hh}x{ww} bf16 timestep fed to the model");
    }
    let s = Schedule::new(&cfg, 4, 4096).unwrap();
    assert_eq!(
        s.sigmas,
        [
            1.0,
            0.9673840403556824,
            0.908143937587738,
            0.7671999335289001,
            0.0
        ]
    );
    let dt: Vec<f32> = (0..4)
        .map(|i| half::bf16::from_f32(s.dt(i)).to_f32())
        .collect();
    assert_eq!(dt, [-0.03271484375, -0.059326171875, -0.140625, -0.765625]);
    let s = Schedule::new(&cfg, 50, 4096).unwrap();
    assert_eq!(s.mu, 2.0233511571292637);
    assert_eq!(
        &s.timesteps[..3],
        &[1000.0, 997.30908203125, 994.5213623046875]
    );
    assert_eq!(s.timesteps[49], 133.7189483642578);
    // §8: height 1000, width 520 → 992×512, grid 62×32 = 1984 tokens.
    assert_eq!(latent_grid(1000, 520).unwrap(), (62, 32));
    assert!(latent_grid(15, 64).is_err());
}

// ------------------------------------------------------------------------------------------
// Noise
// ------------------------------------------------------------------------------------------

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
        let shape: Vec<usize> = c["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
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
        let seeds: Vec<u64> = c["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let shape: Vec<usize> = c["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
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

#[test]
fn noise_is_fast() {
    let shape = [1, 128, 128, 128];
    let _ = torch_randn(1, &shape); // warm-up (page faults)
    let t0 = Instant::now();
    let v = torch_randn(1, &shape);
    let dt = t0.elapsed();
    eprintln!(
        "torch_randn {shape:?} ({} values): {:.1} ms",
        v.len(),
        dt.as_secs_f64() * 1e3
    );
    let t0 = Instant::now();
    let _t = randn_tensor(1, &shape, DType::BF16, &CPU).unwrap();
    eprintln!(
        "randn_tensor bf16 {shape:?}: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    // Generous bound: the machine is shared; typical is far below 100 ms.
    assert!(dt.as_millis() < 400, "torch_randn too slow: {dt:?}");
}

// ------------------------------------------------------------------------------------------
// Layout helpers
// ------------------------------------------------------------------------------------------

#[test]
fn layout_round_trips_and_ids() {
    let x = Tensor::arange(0f32, (2 * 8 * 6 * 10) as f32, &CPU)
        .unwrap()
        .reshape((2, 8, 6, 10))
        .unwrap();
    // patchify channel rule: out[b, 4c+2dy+dx, y, x] = in[b, c, 2y+dy, 2x+dx].
    let p = patchify(&x).unwrap();
    assert_eq!(p.dims(), &[2, 32, 3, 5]);
    for (c, dy, dx, y, xx) in [
        (0, 0, 0, 0, 0),
        (3, 1, 0, 2, 4),
        (7, 1, 1, 1, 3),
        (5, 0, 1, 2, 0),
    ] {
        let a = p
            .i((1, 4 * c + 2 * dy + dx, y, xx))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = x
            .i((1, c, 2 * y + dy, 2 * xx + dx))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }
    assert_bits_eq("unpatchify(patchify(x))", &unpatchify(&p).unwrap(), &x);
    // pack: token y*w+x, channel k.
    let packed = pack(&p).unwrap();
    assert_eq!(packed.dims(), &[2, 15, 32]);
    assert_eq!(
        packed
            .i((1, 2 * 5 + 3, 9))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        p.i((1, 9, 2, 3)).unwrap().to_scalar::<f32>().unwrap()
    );
    assert_bits_eq("unpack(pack(x))", &unpack(&packed, 3, 5).unwrap(), &p);
    assert!(unpack(&packed, 4, 4).is_err());
    assert!(patchify(&Tensor::zeros((1, 4, 3, 4), DType::F32, &CPU).unwrap()).is_err());

    // §9: img_ids rows for 1024² and txt_ids.
    let ids = image_ids(0, 64, 64, &CPU)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(ids.len(), 4096);
    assert_eq!(
        (
            ids[0].clone(),
            ids[1].clone(),
            ids[64].clone(),
            ids[4095].clone()
        ),
        (
            vec![0, 0, 0, 0],
            vec![0, 0, 1, 0],
            vec![0, 1, 0, 0],
            vec![0, 63, 63, 0]
        )
    );
    let t = text_ids(512, &CPU).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(
        (t[0].clone(), t[511].clone()),
        (vec![0, 0, 0, 0], vec![0, 0, 0, 511])
    );
    assert_eq!(
        (reference_time(0), reference_time(1), reference_time(2)),
        (10, 20, 30)
    );
    // §9: two references at 1024² (grids 50×37 and 52×78).
    let r = reference_ids(&[(50, 37), (52, 78)], &CPU)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(r.len(), 1850 + 4056);
    assert_eq!(
        (
            r[0].clone(),
            r[1849].clone(),
            r[1850].clone(),
            r[5905].clone()
        ),
        (
            vec![10, 0, 0, 0],
            vec![10, 49, 36, 0],
            vec![20, 0, 0, 0],
            vec![20, 51, 77, 0]
        )
    );
    assert_eq!(
        batch_ids(&image_ids(0, 2, 3, &CPU).unwrap(), 3)
            .unwrap()
            .dims(),
        &[3, 6, 4]
    );
}

#[test]
fn bn_matches_torch_fixture() {
    let fx = foundation_json("bn.json");
    for e in fx["cases"].as_array().unwrap() {
        let model = e["model"].as_str().unwrap();
        let dtype = if e["dtype"] == "bf16" {
            DType::BF16
        } else {
            DType::F32
        };
        let what = format!("bn {model} {dtype:?}");
        let dir = common::model(model).join("vae");
        let st =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &CPU)
                .unwrap();
        let (rm, rv) = (
            st["bn.running_mean"].to_dtype(dtype).unwrap(),
            st["bn.running_var"].to_dtype(dtype).unwrap(),
        );
        let eps = e["eps"].as_f64().unwrap();
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let from_bits = |k: &str| {
            let v: Vec<f32> = u32s(&e[k]).into_iter().map(f32::from_bits).collect();
            Tensor::from_vec(v, shape.as_slice(), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let z = from_bits("z_bits");
        let ours = BnStats::new(&rm, &rv, eps, dtype).unwrap();
        let tstd = torch_std(model, dtype);
        let ulps = max_ulps(&ours.std.flatten_all().unwrap(), &tstd);
        let differing = tensor_bits(&ours.std)
            .iter()
            .zip(tensor_bits(&tstd))
            .filter(|(a, b)| **a != *b)
            .count();
        eprintln!(
            "{what}: std: {differing} of {} channels differ from torch CPU, max {ulps} ulp",
            tstd.elem_count()
        );
        if dtype == DType::BF16 {
            assert_eq!(differing, 0, "{what}: bf16 std must be bit-exact");
        } else {
            assert!(ulps <= 1, "{what}: std more than 1 ulp from torch");
        }
        let torch_stats = BnStats::from_parts(&rm, &tstd, dtype).unwrap();
        assert_bits_eq(
            &format!("{what}: normalize (torch std)"),
            &torch_stats.normalize(&z).unwrap(),
            &from_bits("normalized_bits"),
        );
        assert_bits_eq(
            &format!("{what}: denormalize (torch std)"),
            &torch_stats.denormalize(&z).unwrap(),
            &from_bits("denormalized_bits"),
        );
        let n = bn_normalize(&z, &rm, &rv, eps).unwrap();
        let d = bn_denormalize(&z, &rm, &rv, eps).unwrap();
        if dtype == DType::BF16 {
            assert_bits_eq(
                &format!("{what}: normalize"),
                &n,
                &from_bits("normalized_bits"),
            );
            assert_bits_eq(
                &format!("{what}: denormalize"),
                &d,
                &from_bits("denormalized_bits"),
            );
        } else {
            common::assert_close(
                &format!("{what}: normalize"),
                &n,
                &from_bits("normalized_bits"),
                1e-6,
            );
            common::assert_close(
                &format!("{what}: denormalize"),
                &d,
                &from_bits("denormalized_bits"),
                1e-6,
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Refcheck cases
// ------------------------------------------------------------------------------------------

const CASES: [&str; 7] = [
    "t2i_64x64",
    "t2i_64x128",
    "t2i_128x128_s7",
    "edit2_64x64",
    "t2i_64x64_bf16",
    "t2i_64x64_cfg4",
    "tiny2_edit_64x128",
];

struct Bn {
    mean: Tensor,
    var: Tensor,
    eps: f64,
    /// Statistics with torch's own `std` (bn.json), to separate torch's CPU sqrt rounding.
    torch_stats: BnStats,
}

/// torch's `std` for a model/dtype from bn.json.
fn torch_std(model: &str, dtype: DType) -> Tensor {
    let fx = foundation_json("bn.json");
    let dname = if dtype == DType::BF16 { "bf16" } else { "f32" };
    let e = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["model"] == model && e["dtype"] == dname)
        .unwrap();
    let v: Vec<f32> = u32s(&e["std_bits"])
        .into_iter()
        .map(f32::from_bits)
        .collect();
    Tensor::new(v.as_slice(), &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Max distance in ulps between two f32-valued tensors of the same dtype.
fn max_ulps(a: &Tensor, b: &Tensor) -> i64 {
    let to_i = |t: &Tensor| -> Vec<i64> {
        match t.dtype() {
            DType::BF16 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits() as i16 as i64)
                .collect(),
            _ => tensor_bits(t)
                .into_iter()
                .map(|x| x as i32 as i64)
                .collect(),
        }
    };
    to_i(a)
        .iter()
        .zip(to_i(b))
        .map(|(x, y)| (x - y).abs())
        .max()
        .unwrap_or(0)
}

/// The VAE's batch-norm buffers, in the case's dtype (f32 cases load the bf16 file upcast, the
/// bf16 case keeps bf16, as `from_pretrained(torch_dtype=...)` does).
fn vae_bn(case: &Value, dtype: DType) -> Bn {
    let dir = common::fixtures()
        .join(case["model_dir"].as_str().unwrap())
        .join("vae");
    let st = candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &CPU)
        .unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| st[k].to_dtype(dtype).unwrap();
    let model = case["model_dir"]
        .as_str()
        .unwrap()
        .trim_start_matches("models/");
    let mean = get("bn.running_mean");
    let torch_stats = BnStats::from_parts(&mean, &torch_std(model, dtype), dtype).unwrap();
    Bn {
        mean,
        var: get("bn.running_var"),
        eps: cfg["batch_norm_eps"].as_f64().unwrap(),
        torch_stats,
    }
}

fn case_dtype(case: &Value) -> DType {
    match case["args"]["dtype"].as_str().unwrap() {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        other => panic!("unexpected case dtype {other}"),
    }
}

/// `scheduler.mu` of a case parsed from the raw text with Rust's correctly rounded parser
/// (serde_json's default float parser can be 1 ulp off).
fn case_mu(name: &str) -> f64 {
    let text = std::fs::read_to_string(common::case_dir(name).join("case.json")).unwrap();
    let at = text.find("\"mu\":").expect("case.json has scheduler.mu") + 5;
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
        .unwrap();
    rest[..end].parse().unwrap()
}

#[test]
fn cases_noise_ids_schedule() {
    let cfg = SchedulerConfig::from_file(
        common::model("tiny-w0").join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    for name in CASES {
        let case = common::case_json(name);
        let t = common::case_tensors(name);
        let dtype = case_dtype(&case);
        let seed = case["args"]["seed"].as_u64().unwrap();
        let (hh, ww) = (
            case["args"]["height"].as_u64().unwrap() as usize,
            case["args"]["width"].as_u64().unwrap() as usize,
        );
        let (h, w) = latent_grid(hh, ww).unwrap();
        let noise_ref = &t["noise"];
        let (b, c, nh, nw) = noise_ref.dims4().unwrap();
        assert_eq!((nh, nw), (h, w), "{name}: grid");
        let noise = randn_tensor(seed, &[b, c, h, w], dtype, &CPU).unwrap();
        assert_bits_eq(&format!("{name}: noise"), &noise, noise_ref);
        assert_bits_eq(
            &format!("{name}: latents.init"),
            &pack(&noise).unwrap(),
            &t["latents.init"],
        );
        let ids = batch_ids(&image_ids(0, h, w, &CPU).unwrap(), b).unwrap();
        assert_ids_eq(&format!("{name}: latent_ids"), &ids, &t["latent_ids"]);
        let txt = batch_ids(&text_ids(t["text_ids"].dim(1).unwrap(), &CPU).unwrap(), b).unwrap();
        assert_ids_eq(&format!("{name}: text_ids"), &txt, &t["text_ids"]);

        let sched_cfg = SchedulerConfig::from_file(
            common::fixtures()
                .join(case["model_dir"].as_str().unwrap())
                .join("scheduler/scheduler_config.json"),
        )
        .unwrap();
        assert_eq!(sched_cfg, cfg);
        let steps = case["args"]["steps"].as_u64().unwrap() as usize;
        let s = Schedule::new(&sched_cfg, steps, h * w).unwrap();
        assert_eq!(s.mu, case_mu(name), "{name}: mu");
        let ts = Tensor::new(s.timesteps.as_slice(), &CPU).unwrap();
        let sg = Tensor::new(s.sigmas.as_slice(), &CPU).unwrap();
        assert_bits_eq(
            &format!("{name}: sched.timesteps"),
            &ts,
            &t["sched.timesteps"],
        );
        assert_bits_eq(&format!("{name}: sched.sigmas"), &sg, &t["sched.sigmas"]);
        for (i, &tv) in s.timesteps.iter().enumerate() {
            let fed = model_timestep(tv, b, dtype, &CPU).unwrap();
            assert_bits_eq(
                &format!("{name}: step.{i}.cond.timestep"),
                &fed,
                &t[&format!("step.{i}.cond.timestep")],
            );
        }
    }
}

#[test]
fn cases_euler_steps() {
    for name in CASES {
        let case = common::case_json(name);
        let t = common::case_tensors(name);
        let steps = case["args"]["steps"].as_u64().unwrap() as usize;
        let sigmas = t["sched.sigmas"].to_vec1::<f32>().unwrap();
        let g = case["guidance_scale"].as_f64().unwrap();
        let cfg = !case["is_distilled"].as_bool().unwrap() && g > 1.0;
        let mut prev = t["latents.init"].clone();
        let n = prev.dim(1).unwrap();
        for s in 0..steps {
            let v_of = |k: &str| t[&format!("step.{s}.{k}.output")].narrow(1, 0, n).unwrap();
            let mut v = v_of("cond");
            if cfg {
                // neg + g * (cond - neg), each op one f32 rounding (f32 case).
                assert_eq!(v.dtype(), DType::F32);
                let neg = v_of("uncond");
                let gs = Tensor::new(g as f32, &CPU).unwrap();
                v = (&neg + (v - &neg).unwrap().broadcast_mul(&gs).unwrap()).unwrap();
            }
            let next = euler_step(&prev, &v, sigmas[s], sigmas[s + 1]).unwrap();
            assert_bits_eq(
                &format!("{name}: step.{s}.latents"),
                &next,
                &t[&format!("step.{s}.latents")],
            );
            prev = t[&format!("step.{s}.latents")].clone();
        }
    }
}

#[test]
fn cases_reference_latents_and_decode_input() {
    for name in CASES {
        let case = common::case_json(name);
        let t = common::case_tensors(name);
        let dtype = case_dtype(&case);
        let bn = vae_bn(&case, dtype);

        // References: vae_mean → patchify → bn_normalize = latents_bn; packed + ids.
        let mut k = 0;
        let mut packed = vec![];
        let mut grids = vec![];
        while let Some(mean) = t.get(&format!("ref.{k}.vae_mean")) {
            let reference = &t[&format!("ref.{k}.latents_bn")];
            let p = patchify(mean).unwrap();
            // With torch's std: bit-exact. With our (correctly rounded) std: ≤ 1e-6.
            let z = bn.torch_stats.normalize(&p).unwrap();
            assert_bits_eq(
                &format!("{name}: ref.{k}.latents_bn (torch std)"),
                &z,
                reference,
            );
            let ours = bn_normalize(&p, &bn.mean, &bn.var, bn.eps).unwrap();
            common::assert_close(
                &format!("{name}: ref.{k}.latents_bn"),
                &ours,
                reference,
                1e-6,
            );
            let (_, _, h, w) = z.dims4().unwrap();
            grids.push((h, w));
            packed.push(pack(&z).unwrap());
            k += 1;
        }
        if k > 0 {
            let all = Tensor::cat(&packed, 1).unwrap();
            let b = t["image_latents"].dim(0).unwrap();
            let all = all.repeat((b, 1, 1)).unwrap();
            assert_bits_eq(&format!("{name}: image_latents"), &all, &t["image_latents"]);
            let ids = batch_ids(&reference_ids(&grids, &CPU).unwrap(), b).unwrap();
            assert_ids_eq(
                &format!("{name}: image_latent_ids"),
                &ids,
                &t["image_latent_ids"],
            );
            let img_ids = Tensor::cat(&[&t["latent_ids"], &ids], 1).unwrap();
            assert_ids_eq(
                &format!("{name}: step.0.cond.img_ids"),
                &img_ids,
                &t["step.0.cond.img_ids"],
            );
        }

        // Decode input: last latents → unpack → bn_denormalize → unpatchify.
        let steps = case["args"]["steps"].as_u64().unwrap() as usize;
        let last = &t[&format!("step.{}.latents", steps - 1)];
        let (hh, ww) = (
            case["args"]["height"].as_u64().unwrap() as usize,
            case["args"]["width"].as_u64().unwrap() as usize,
        );
        let (h, w) = latent_grid(hh, ww).unwrap();
        let u = unpack(last, h, w).unwrap();
        let reference = &t["vae.decode.input"];
        let x = unpatchify(&bn.torch_stats.denormalize(&u).unwrap()).unwrap();
        assert_bits_eq(
            &format!("{name}: vae.decode.input (torch std)"),
            &x,
            reference,
        );
        let ours = unpatchify(&bn_denormalize(&u, &bn.mean, &bn.var, bn.eps).unwrap()).unwrap();
        common::assert_close(&format!("{name}: vae.decode.input"), &ours, reference, 1e-6);
        if dtype == DType::BF16 {
            assert_bits_eq(&format!("{name}: vae.decode.input"), &ours, reference);
        }
    }
}
