//! LoRA adapters on fp8 transformers against diffusers 0.42.1 (fixtures by
//! `reference/lora_fp8_fixtures.py`): tiny-w0 with its transformer replaced by the BFL fp8 file
//! plus the peft adapter, and `--quantize fp8` plus the kohya adapter. diffusers runs
//! `load_lora_weights` + `set_adapters` on the dequantised (round-tripped) weights; we merge
//! the delta into the weights dequantised at load. Each f32 image is within 1/255 of
//! diffusers', and differs by far more both from the fp8 image without the adapter and from
//! the adapter's image on the unquantised weights.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use flux2_klein::image_io::compare_images;
use flux2_klein::lora::AppliedLora;
use flux2_klein::model_dir::ModelDir;
use flux2_klein::pipeline::{Pipeline, PipelineOptions, Request};
use flux2_klein::weights::Quantization;

/// The largest per-channel difference from diffusers' image (f32).
const MAX_DIFF_F32: u8 = 1;
/// The adapter (or the fp8 weights) must move some channel value by more than this.
const MIN_EFFECT: u8 = 8;

struct Case {
    file: Option<PathBuf>,
    quantize: Option<Quantization>,
    lora: PathBuf,
    scale: f64,
    prompt: String,
}

fn case(name: &str) -> Case {
    let meta = common::case_json(name);
    Case {
        file: meta["transformer_file"]
            .as_str()
            .map(|f| common::fixtures().join(f)),
        quantize: match meta["quantize"].as_str() {
            Some("fp8") => Some(Quantization::Fp8),
            None => None,
            Some(other) => panic!("{name}: quantize {other}"),
        },
        lora: common::fixtures().join(meta["lora"].as_str().unwrap()),
        scale: meta["lora_scale"].as_f64().unwrap(),
        prompt: meta["prompt"].as_str().unwrap().to_string(),
    }
}

/// Our f32 image of a case (64×64, 4 steps, seed 0) with its adapter, fp8 weights asked to be
/// kept in fp8 (`keep_fp8`) or not.
fn run(case: &Case, keep_fp8: bool) -> image::RgbImage {
    let dir = ModelDir::open_local(&common::model("tiny-w0")).unwrap();
    let mut options = PipelineOptions::for_device(Device::Cpu);
    options.dtype = DType::F32;
    options.transformer_file = case.file.clone();
    options.quantize = case.quantize;
    options.keep_fp8 = keep_fp8;
    let mut pipeline = Pipeline::open(dir, options).unwrap();
    let mut request = Request::new(&case.prompt, 0);
    request.width = Some(64);
    request.height = Some(64);
    request.steps = Some(4);
    let lora = pipeline.load_lora(case.lora.to_str().unwrap()).unwrap();
    request.adapters.push(AppliedLora {
        lora: Arc::new(lora),
        scale: case.scale,
    });
    pipeline.generate(&request, &mut |_| {}).unwrap().image
}

fn png(path: PathBuf) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn golden(case: &str) -> image::RgbImage {
    png(common::case_dir(case).join("image.png"))
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    compare_images(a, b).unwrap().max
}

/// Checks a case against diffusers' image; then that the adapter changes the fp8 image
/// (`without`: diffusers' fp8 case without it) and that the fp8 weights change the adapter's
/// image (`unquantized`: diffusers' LoRA case on tiny-w0's own weights).
fn check(name: &str, without: &str, unquantized: &str) -> image::RgbImage {
    let c = case(name);
    let ours = run(&c, false);
    let d = compare_images(&golden(name), &ours).unwrap();
    let no_adapter = max_diff(&golden(without), &ours);
    let plain = max_diff(
        &png(common::fixtures().join("lora").join(unquantized)),
        &ours,
    );
    eprintln!(
        "{name}: max diff {} (PSNR {:.2} dB) vs diffusers; {no_adapter} vs no adapter \
         ({without}); {plain} vs the adapter on unquantised weights",
        d.max, d.psnr
    );
    assert!(
        d.max <= MAX_DIFF_F32,
        "{name}: max per-pixel difference {} > {MAX_DIFF_F32}",
        d.max
    );
    assert!(
        no_adapter > MIN_EFFECT,
        "{name}: the adapter barely changes the fp8 image ({no_adapter})"
    );
    assert!(
        plain > MIN_EFFECT,
        "{name}: the fp8 weights barely change the adapter's image ({plain})"
    );
    ours
}

#[test]
fn bfl_fp8_file_with_peft_adapter_matches_diffusers() {
    let ours = check("lora_fp8_bfl_t2i", "fp8_bfl_t2i", "peft_s08.png");
    // Asked to keep fp8 (the CUDA default), the layers are still dequantised for the merge:
    // the same pixels.
    let kept = run(&case("lora_fp8_bfl_t2i"), true);
    assert_eq!(max_diff(&kept, &ours), 0);
}

#[test]
fn quantize_fp8_with_kohya_adapter_matches_diffusers() {
    let ours = check("lora_quantize_fp8_t2i", "quantize_fp8_t2i", "kohya.png");
    let kept = run(&case("lora_quantize_fp8_t2i"), true);
    assert_eq!(max_diff(&kept, &ours), 0);
}
