//! The foundation stages on the seven refcheck cases, against the tensors diffusers 0.42.1's
//! `Flux2KleinPipeline.__call__` recorded for each (`tests/fixtures/cases/*`, written by
//! `reference/refcheck/make_case.py`): the noise and packed initial latents of
//! `prepare_latents`, the latent and text ids, the schedule of step 6 and the timestep fed to
//! the transformer, every `FlowMatchEulerDiscreteScheduler.step` (with the CFG combination of
//! the base model), the reference latents of `_encode_vae_image` / `prepare_image_latents`
//! with their ids, and the latent handed to `vae.decode`. Every check is **bit-exact**, with
//! torch's own batch-norm `std` (`bn.json`); with our correctly rounded one, within 1e-6.

mod common;

use candle_core::{DType, Device, Tensor};
use common::foundation::{assert_bits_eq, assert_ids_eq, torch_std};
use flux2_klein::latents::{
    batch_ids, bn_denormalize, bn_normalize, image_ids, latent_grid, pack, patchify, reference_ids,
    text_ids, unpack, unpatchify, BnStats,
};
use flux2_klein::noise::randn_tensor;
use flux2_klein::scheduler::{euler_step, model_timestep, Schedule, SchedulerConfig};
use serde_json::Value;

const CPU: Device = Device::Cpu;

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
