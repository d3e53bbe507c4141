//! Parity of the flow-match scheduler with diffusers 0.42.1: the sigmas, timesteps and `mu` of
//! `Flux2KleinPipeline.__call__` step 6 (`compute_empirical_mu`, then `retrieve_timesteps` on
//! `FlowMatchEulerDiscreteScheduler.set_timesteps` with `sigmas = linspace(1, 1/n, n)`), the
//! Euler `dt` and the timestep fed to the transformer (`t.expand(B).to(dtype) / 1000`). Every
//! check is **bit-exact**.
//!
//! Sources of truth: `tests/fixtures/foundation/scheduler.json` (written by
//! `reference/foundation_fixtures.py` from diffusers 0.42.1 / torch 2.15) and the golden numbers
//! of spec §7.3 / §9. The Euler steps of the refcheck cases are in `parity_cases.rs`.
#![allow(clippy::excessive_precision, clippy::type_complexity)] // golden values as diffusers prints them

mod common;

use candle_core::{DType, Device};
use common::foundation::{f32_bits, foundation_json, tensor_bits, u32s};
use flux2_klein::latents::latent_grid;
use flux2_klein::scheduler::{compute_empirical_mu, model_timestep, Schedule, SchedulerConfig};
use serde_json::Value;

const CPU: Device = Device::Cpu;

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
