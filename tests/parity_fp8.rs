//! Single-file transformer checkpoints (`PipelineOptions::transformer_file`) and fp8 weights
//! against diffusers 0.42.1 (fixtures by `reference/fp8_fixtures.py`): tiny-w0 with its
//! transformer replaced by a BFL fp8 file, a ComfyUI scaled-fp8 (E5M2) file, a bf16 BFL file
//! and a diffusers-named file, and `--quantize fp8`; each image within 1/255 of diffusers' run
//! on the dequantised weights (f32). The fp8 codes and scales equal torch's; BFL's real
//! klein-4B fp8 layout (309 tensors, a zero-weight sparse file) loads against the klein-4B
//! config.

mod common;
#[path = "common/fp8_layout.rs"]
mod fp8_layout;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flux2_klein::image_io::compare_images;
use flux2_klein::model_dir::ModelDir;
use flux2_klein::pipeline::{Pipeline, PipelineOptions, Request};
use flux2_klein::transformer::Flux2TransformerConfig;
use flux2_klein::weights::fp8::{self, Fp8Format};
use flux2_klein::weights::single_file::{Naming, WeightScale};
use flux2_klein::weights::{Quantization, TransformerFile};

/// f32 cases: the largest per-channel difference from diffusers' image.
const MAX_DIFF_F32: u8 = 1;

fn fp8_fixture(name: &str) -> PathBuf {
    common::fixtures().join("fp8").join(name)
}

/// Our image for a case's settings on tiny-w0, with `file` replacing the transformer.
fn run(file: Option<PathBuf>, quantize: Option<Quantization>) -> image::RgbImage {
    run_keeping(file, quantize, false)
}

/// [`run`], the fp8 weights kept in fp8 (`keep_fp8`) or dequantised at load.
fn run_keeping(
    file: Option<PathBuf>,
    quantize: Option<Quantization>,
    keep_fp8: bool,
) -> image::RgbImage {
    let dir = ModelDir::open_local(&common::model("tiny-w0")).unwrap();
    let mut options = PipelineOptions::for_device(Device::Cpu);
    options.dtype = DType::F32;
    options.transformer_file = file;
    options.quantize = quantize;
    options.keep_fp8 = keep_fp8;
    let mut pipeline = Pipeline::open(dir, options).unwrap();
    let meta = common::case_json("fp8_bfl_t2i");
    let mut request = Request::new(meta["prompt"].as_str().unwrap(), 0);
    request.width = Some(64);
    request.height = Some(64);
    request.steps = Some(4);
    pipeline.generate(&request, &mut |_| {}).unwrap().image
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

/// Runs a case and checks it against diffusers' image; returns ours.
fn check_case(case: &str, quantize: Option<Quantization>) -> image::RgbImage {
    let meta = common::case_json(case);
    let file = meta["transformer_file"]
        .as_str()
        .map(|f| common::fixtures().join(f));
    let ours = run(file, quantize);
    let diff = compare_images(&golden(case), &ours).unwrap();
    eprintln!("{case}: max diff {}, PSNR {:.2} dB", diff.max, diff.psnr);
    assert!(
        diff.max <= MAX_DIFF_F32,
        "{case}: max per-pixel difference {} > {MAX_DIFF_F32}",
        diff.max
    );
    ours
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    compare_images(a, b).unwrap().max
}

#[test]
fn bfl_fp8_file_matches_diffusers_on_dequantized_weights() {
    let ours = check_case("fp8_bfl_t2i", None);
    // The fp8 weights change the image (so the test can fail): tiny-w0's own transformer.
    let plain = run(None, None);
    let d = max_diff(&ours, &plain);
    eprintln!("fp8 file vs the unquantised transformer: max diff {d}");
    assert!(
        d >= 4,
        "the fp8 file's image equals the unquantised one ({d})"
    );
    // ComfyUI's per-layer `comfy_quant` records instead of the header: the same model.
    let comfy = run(
        Some(fp8_fixture("tiny-w0-fp8-comfyquant.safetensors")),
        None,
    );
    assert_eq!(max_diff(&ours, &comfy), 0, "comfy_quant file differs");
}

#[test]
fn comfyui_scaled_e5m2_file_matches_diffusers() {
    let ours = check_case("fp8_e5m2_scaled_t2i", None);
    assert!(max_diff(&ours, &golden("fp8_bfl_t2i")) > MAX_DIFF_F32);
}

#[test]
fn bf16_bfl_and_diffusers_named_files_match_diffusers() {
    let bfl = check_case("bf16_bfl_t2i", None);
    let named = check_case("diffusers_single_t2i", None);
    // Other weights than tiny-w0's own: the file is what ran.
    let plain = golden("fp8_bfl_t2i");
    assert!(max_diff(&bfl, &plain) > 50 && max_diff(&named, &plain) > 50);
}

#[test]
fn quantize_fp8_matches_diffusers_on_round_tripped_weights() {
    let ours = check_case("quantize_fp8_t2i", Some(Quantization::Fp8));
    let plain = run(None, None);
    let d = max_diff(&ours, &plain);
    eprintln!("--quantize fp8 vs unquantised: max diff {d}");
    assert!(d >= 10, "--quantize fp8 did not change the image ({d})");
}

/// Our fp8 casts equal torch's (after ComfyUI's clamp to ±max), both ways, both formats.
#[test]
fn fp8_codes_equal_torch() {
    let text = std::fs::read_to_string(fp8_fixture("fp8_codes.json")).unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let values: Vec<f32> = table["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (key, format) in [
        ("float8_e4m3fn", Fp8Format::E4M3),
        ("float8_e5m2", Fp8Format::E5M2),
    ] {
        let codes: Vec<u8> = common::json_uints(&table[key]);
        let decoded = table[format!("{key}_decoded")].as_array().unwrap();
        for ((v, code), dec) in values.iter().zip(&codes).zip(decoded) {
            assert_eq!(format.encode(*v), *code, "{key}: {v}");
            assert_eq!(format.decode(*code), dec.as_f64().unwrap() as f32, "{key}");
        }
    }
}

/// The scale and codes of every fp8 weight in the BFL fixture are what our per-tensor
/// arithmetic gives for the same weight (tiny-w0's, BFL-named in `tiny-w0-bfl.safetensors`).
#[test]
fn per_tensor_scales_and_codes_equal_the_reference_script() {
    let file = TransformerFile::open(&fp8_fixture("tiny-w0-fp8-bfl.safetensors")).unwrap();
    assert_eq!(file.naming(), Naming::Bfl);
    assert!(file.warnings().is_empty(), "{:?}", file.warnings());
    // 2 double blocks × 8 + 2 single blocks × 2.
    assert_eq!(file.fp8_weights().len(), 20);
    let plain = candle_core::safetensors::load(
        common::fixtures().join("transformer/tiny-w0-bfl.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let quant =
        candle_core::safetensors::load(fp8_fixture("tiny-w0-fp8-bfl.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, w) in file.fp8_weights() {
        let values: Vec<f32> = plain[name]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = fp8::per_tensor_scale(&values, Fp8Format::E4M3);
        assert_eq!(w.scale, WeightScale::Tensor(scale), "{name}");
        let codes = fp8::quantize(&values, scale, Fp8Format::E4M3);
        let stored: Vec<u8> = quant[name]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| Fp8Format::E4M3.encode(*v))
            .collect();
        assert_eq!(codes, stored, "{name}");
    }
}

/// BFL's klein-4B fp8 layout, as a zero-weight file: it opens (80 fp8 weights with their
/// scales), fits the klein-4B config with no tensor left over, and a weight reads back; the
/// tiny config does not fit it, and the error names the first tensor.
#[test]
fn official_klein_4b_fp8_layout_loads_against_the_klein_4b_config() {
    let dir = common::TempDir::new("fp8-layout");
    let (entries, stems) = fp8_layout::klein_4b_fp8_layout();
    assert_eq!(entries.len(), 309);
    assert_eq!(stems.len(), 80);
    let path = dir.join("flux-2-klein-4b-fp8.safetensors");
    let size = fp8_layout::write_zero_weight_file(
        &path,
        &entries,
        &fp8_layout::bfl_quantization_metadata(&stems),
    );
    // The data is the official file's but for its header (spec-wave2 §2.1: 4,070,624,520 B).
    let official = 4_070_624_520u64;
    assert!(
        size < official + 100_000 && official < size + 100_000,
        "{size}"
    );

    let file = TransformerFile::open(&path).unwrap();
    assert_eq!(file.naming(), Naming::Bfl);
    assert_eq!(file.fp8_weights().len(), 80);
    assert!(file.warnings().is_empty(), "{:?}", file.warnings());
    let unused = file.check(&Flux2TransformerConfig::klein_4b()).unwrap();
    assert_eq!(unused, None);
    let vb = file.var_builder(DType::BF16, &Device::Cpu);
    let k = vb
        .get((3072, 3072), "transformer_blocks.4.attn.add_k_proj.weight")
        .unwrap();
    assert_eq!(k.dtype(), DType::BF16);
    assert_eq!(
        k.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    let tiny: Flux2TransformerConfig = flux2_klein::model_dir::read_config(
        &common::model("tiny-w0").join("transformer/config.json"),
    )
    .unwrap();
    let err = format!("{:#}", file.check(&tiny).unwrap_err());
    eprintln!("{err}");
    assert!(
        err.contains("does not fit the model's transformer config"),
        "{err}"
    );
    assert!(
        err.contains("`double_blocks.0.") && err.contains("in the file, but the config needs"),
        "{err}"
    );
}

/// A scalar `weight_scale` multiplies every code: the dequantised tensor is `f32(q) · s`.
#[test]
fn dequantised_weight_is_codes_times_scale() {
    let file = TransformerFile::open(&fp8_fixture("tiny-w0-fp8-bfl.safetensors")).unwrap();
    let raw =
        candle_core::safetensors::load(fp8_fixture("tiny-w0-fp8-bfl.safetensors"), &Device::Cpu)
            .unwrap();
    let name = "single_blocks.1.linear2";
    let scale = raw[&format!("{name}.weight_scale")]
        .to_scalar::<f32>()
        .unwrap();
    let want =
        (raw[&format!("{name}.weight")].to_dtype(DType::F32).unwrap() * scale as f64).unwrap();
    let vb = file.var_builder(DType::F32, &Device::Cpu);
    let got: Tensor = vb
        .get(
            want.dims(),
            "single_transformer_blocks.1.attn.to_out.weight",
        )
        .unwrap();
    assert_eq!(
        (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

/// fp8 weights kept in fp8 (the CUDA default) give the same pixels as weights dequantised at
/// load: an fp8 file's E4M3 layers and `--quantize fp8`'s.
#[test]
fn fp8_weights_kept_in_fp8_give_the_same_images() {
    let file = Some(fp8_fixture("tiny-w0-fp8-bfl.safetensors"));
    let kept = run_keeping(file.clone(), None, true);
    assert_eq!(max_diff(&kept, &run(file, None)), 0);
    let kept = run_keeping(None, Some(Quantization::Fp8), true);
    assert_eq!(max_diff(&kept, &run(None, Some(Quantization::Fp8))), 0);
}

/// A layer over a kept fp8 weight holds it as `F8E4M3` and computes what the dequantised
/// layer computes.
#[test]
fn a_kept_fp8_layer_stores_fp8_and_equals_the_dequantised_one() {
    use candle_nn::VarBuilder;
    use flux2_klein::ops::linear::LinearWeight;
    use flux2_klein::ops::Linear;

    let file = TransformerFile::open(&fp8_fixture("tiny-w0-fp8-bfl.safetensors")).unwrap();
    let vb = |keep| {
        VarBuilder::from_backend(Box::new(file.backend(keep)), DType::F32, Device::Cpu)
            .pp("transformer_blocks.1.attn.add_v_proj")
    };
    let kept = Linear::load_no_bias(32, 32, vb(true)).unwrap();
    let dense = Linear::load_no_bias(32, 32, vb(false)).unwrap();
    match kept.weight() {
        LinearWeight::Fp8 { weight, scale, .. } => {
            assert_eq!(weight.dtype(), DType::F8E4M3);
            assert_eq!(weight.dims(), &[32, 32]);
            assert_eq!(scale.dims(), &[] as &[usize]);
        }
        other => panic!("not kept in fp8: {other:?}"),
    }
    assert!(matches!(dense.weight(), LinearWeight::Dense(_)));
    let x = Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap();
    let (a, b) = (kept.forward(&x).unwrap(), dense.forward(&x).unwrap());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}
