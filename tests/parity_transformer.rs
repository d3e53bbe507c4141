//! Parity of `Flux2Transformer` with diffusers' `Flux2Transformer2DModel` on the tiny
//! random-weight models: every transformer call recorded in the refcheck cases (inputs fed
//! as recorded), every per-block activation of the first call, bf16, the BFL single-file
//! checkpoint and the parameter count.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, case_json, case_tensors, fixtures, max_rel_err, model};
use flux2_klein::transformer::{Flux2Transformer, Flux2TransformerConfig, Inputs, Trace};

const F32_TOL: f32 = 1e-5;
const BF16_TOL: f32 = 2e-2;

fn config(model_name: &str) -> Flux2TransformerConfig {
    Flux2TransformerConfig::from_file(model(model_name).join("transformer/config.json")).unwrap()
}

fn weights(model_name: &str) -> std::path::PathBuf {
    model(model_name).join("transformer/diffusion_pytorch_model.safetensors")
}

fn load(model_name: &str, dtype: DType) -> Flux2Transformer {
    Flux2Transformer::load_safetensors(
        &[weights(model_name)],
        &config(model_name),
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

/// One transformer call with the RoPE tables of `ids` = (img_ids, txt_ids).
fn run(
    m: &Flux2Transformer,
    x: &Tensor,
    ctx: &Tensor,
    ts: &Tensor,
    ids: (&Tensor, &Tensor),
    guidance: Option<&Tensor>,
    trace: Option<&mut Trace>,
) -> anyhow::Result<Tensor> {
    let rope = m.rope(ids.0, ids.1)?;
    let inputs = Inputs {
        hidden_states: x,
        encoder_hidden_states: ctx,
        timestep: ts,
        guidance,
    };
    m.forward(&inputs, &rope, trace)
}

/// The transformer calls of a case (`step.0.cond`, `step.0.uncond`, ...).
fn calls(case: &str) -> Vec<String> {
    case_json(case)["transformer_calls"]
        .as_array()
        .expect("case.json: transformer_calls")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Runs every transformer call of `case` with the recorded inputs and checks the outputs and,
/// for `step.0.cond`, every recorded `blk.*` activation. Returns the worst error seen.
fn check_case(m: &Flux2Transformer, case: &str, tol: f32) -> f32 {
    let t = case_tensors(case);
    let get = |k: &str| -> &Tensor { t.get(k).unwrap_or_else(|| panic!("{case}: no tensor {k}")) };
    let mut worst = 0f32;
    let mut ropes = HashMap::new();
    for call in calls(case) {
        let branch = call.rsplit('.').next().unwrap().to_string(); // cond / uncond
        let ctx = get(&format!("step.0.{branch}.encoder_hidden_states"));
        let img_ids = get(&format!("step.0.{branch}.img_ids"));
        let txt_ids = get(&format!("step.0.{branch}.txt_ids"));
        let x = get(&format!("{call}.hidden_states"));
        let ts = get(&format!("{call}.timestep"));
        let out = if call == "step.0.cond" {
            let mut trace = Trace::new();
            let out = run(m, x, ctx, ts, (img_ids, txt_ids), None, Some(&mut trace)).unwrap();
            let ours: HashMap<_, _> = trace.into_iter().collect();
            let prefix = "step.0.cond.blk.";
            let mut n = 0;
            for (name, reference) in t.iter().filter(|(k, _)| k.starts_with(prefix)) {
                let short = &name[prefix.len()..];
                let mine = ours
                    .get(short)
                    .unwrap_or_else(|| panic!("{case}: the trace lacks {short}"));
                let err = max_rel_err(mine, reference);
                worst = worst.max(err);
                assert_close(&format!("{case} blk.{short}"), mine, reference, tol);
                n += 1;
            }
            assert_eq!(
                n,
                ours.len(),
                "{case}: trace has names the case does not record"
            );
            assert!(n > 0, "{case}: no blk.* tensors recorded");
            out
        } else {
            let rope = ropes
                .entry(branch.clone())
                .or_insert_with(|| m.rope(img_ids, txt_ids).unwrap());
            let inputs = Inputs {
                hidden_states: x,
                encoder_hidden_states: ctx,
                timestep: ts,
                guidance: None,
            };
            m.forward(&inputs, rope, None).unwrap()
        };
        let reference = get(&format!("{call}.output"));
        let err = max_rel_err(&out, reference);
        worst = worst.max(err);
        assert_close(&format!("{case} {call}.output"), &out, reference, tol);
    }
    worst
}

#[test]
fn tiny_w0_f32_cases() {
    let m = load("tiny-w0", DType::F32);
    for case in ["t2i_64x64", "t2i_64x128", "edit2_64x64", "t2i_64x64_cfg4"] {
        let worst = check_case(&m, case, F32_TOL);
        eprintln!("== {case}: worst max rel err {worst:.3e}");
    }
}

#[test]
fn tiny2_w0_f32_edit_case() {
    let m = load("tiny2-w0", DType::F32);
    let worst = check_case(&m, "tiny2_edit_64x128", F32_TOL);
    eprintln!("== tiny2_edit_64x128: worst max rel err {worst:.3e}");
}

#[test]
fn tiny_w0_bf16_case() {
    let m = load("tiny-w0", DType::BF16);
    let worst = check_case(&m, "t2i_64x64_bf16", BF16_TOL);
    eprintln!("== t2i_64x64_bf16: worst max rel err {worst:.3e}");
}

/// The BFL-named file (made by `reference/bfl_fixture.py`) loads to the same model: outputs
/// bit-identical to the diffusers-named load, and equal to the diffusers reference.
#[test]
fn bfl_single_file_matches_diffusers_names() {
    let cfg = config("tiny-w0");
    let bfl_path = fixtures().join("transformer/tiny-w0-bfl.safetensors");
    let bfl = Flux2Transformer::load_bfl(&[bfl_path], &cfg, DType::F32, &Device::Cpu).unwrap();
    let diff = load("tiny-w0", DType::F32);
    for case in ["t2i_64x64", "edit2_64x64"] {
        let t = case_tensors(case);
        let args = |k: &str| t[&format!("step.0.cond.{k}")].clone();
        let call = |m: &Flux2Transformer| {
            run(
                m,
                &args("hidden_states"),
                &args("encoder_hidden_states"),
                &args("timestep"),
                (&args("img_ids"), &args("txt_ids")),
                None,
                None,
            )
            .unwrap()
        };
        let (a, b) = (call(&bfl), call(&diff));
        let same = a
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(b.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{case}: BFL load differs from the diffusers-named load"
        );
        assert_close(
            &format!("{case} BFL step.0.cond.output"),
            &a,
            &args("output"),
            F32_TOL,
        );
    }
}

/// A checkpoint with `guidance_embeds=True` (FLUX.2 [dev]-style; made by diffusers in
/// `reference/bfl_fixture.py`): the guidance embedder loads and is added to the timestep
/// embedding, and a missing guidance value is ignored, as in diffusers.
#[test]
fn guidance_embedder_matches_diffusers() {
    let dir = fixtures().join("transformer/tiny-guidance");
    let cfg = Flux2TransformerConfig::from_file(dir.join("config.json")).unwrap();
    assert!(cfg.guidance_embeds);
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let m =
        Flux2Transformer::load_safetensors(&[&weights], &cfg, DType::F32, &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let call = |g: Option<&Tensor>| {
        run(
            &m,
            &io["hidden_states"],
            &io["encoder_hidden_states"],
            &io["timestep"],
            (&io["img_ids"], &io["txt_ids"]),
            g,
            None,
        )
        .unwrap()
    };
    assert_close(
        "guidance output",
        &call(Some(&io["guidance"])),
        &io["output"],
        F32_TOL,
    );
    assert_close(
        "no-guidance output",
        &call(None),
        &io["output_no_guidance"],
        F32_TOL,
    );
    let stored: u64 = candle_core::safetensors::load(&weights, &Device::Cpu)
        .unwrap()
        .values()
        .map(|t| t.elem_count() as u64)
        .sum();
    assert_eq!(cfg.parameter_count(), stored);
}

/// Parameter counts from the config alone: the real klein-4B value (spec §0/§5.1) and the
/// element counts of the tiny safetensors files.
#[test]
fn parameter_counts() {
    assert_eq!(
        Flux2TransformerConfig::klein_4b().parameter_count(),
        3_875_544_576
    );
    for name in ["tiny-w0", "tiny2-w0"] {
        let tensors = candle_core::safetensors::load(weights(name), &Device::Cpu).unwrap();
        let stored: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
        assert_eq!(config(name).parameter_count(), stored, "{name}");
        eprintln!("{name}: {stored} parameters in {} tensors", tensors.len());
    }
}

/// Bad inputs are reported as errors that say what to fix.
#[test]
fn bad_inputs_are_errors() {
    let m = load("tiny-w0", DType::F32);
    let t = case_tensors("t2i_64x64");
    let a = |k: &str| t[&format!("step.0.cond.{k}")].clone();
    let x_bf16 = a("hidden_states").to_dtype(DType::BF16).unwrap();
    let err = run(
        &m,
        &x_bf16,
        &a("encoder_hidden_states"),
        &a("timestep"),
        (&a("img_ids"), &a("txt_ids")),
        None,
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("to_dtype"), "{err:#}");
    let x_wide = Tensor::zeros((1, 16, 17), DType::F32, &Device::Cpu).unwrap();
    let err = run(
        &m,
        &x_wide,
        &a("encoder_hidden_states"),
        &a("timestep"),
        (&a("img_ids"), &a("txt_ids")),
        None,
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("in_channels"), "{err:#}");
    let short_ids = a("img_ids").narrow(1, 0, 8).unwrap();
    let err = run(
        &m,
        &a("hidden_states"),
        &a("encoder_hidden_states"),
        &a("timestep"),
        (&short_ids, &a("txt_ids")),
        None,
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("RoPE"), "{err:#}");
}
