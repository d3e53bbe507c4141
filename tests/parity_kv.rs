//! KV-cache checkpoints (`Flux2KleinKVPipeline`, spec-wave2 §3) in process against diffusers
//! 0.42.1 on the tiny KV model (`tests/fixtures/models/tiny-kv-w0`: the tiny-w0 weights with
//! the KV class name; `tests/fixtures/cases/kv_*`, written by `reference/kv_fixtures.py`):
//! the image within 1/255 of diffusers' (f32), PSNR ≥ 30 dB (bf16); the references' step-0
//! K/V of every block equal diffusers' cache; the KV image differs from the plain pipeline's
//! on the same inputs; a batch computes the reference K/V once.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flux2_klein::image_io::{compare_images, load_image};
use flux2_klein::model_dir::{ModelDir, PipelineKind};
use flux2_klein::pipeline::{
    Event, Generated, Pipeline, PipelineOptions, Reference, Request, Stage,
};
use flux2_klein::transformer::{Flux2Transformer, Flux2TransformerConfig};

/// f32 cases: the largest per-channel difference from diffusers' image.
const MAX_DIFF_F32: u8 = 1;
/// bf16 cases: the lowest PSNR against diffusers' bf16 image.
const MIN_PSNR_BF16: f64 = 30.0;
/// The reference K/V against diffusers' cache (f32), max |diff|.
const KV_TOL: f32 = 1e-5;
/// The KV image must differ from the plain pipeline's by more than this (per channel).
const MIN_KV_EFFECT: u8 = 8;

fn load(case: &str, file: &str) -> Reference {
    let path = common::case_dir(case).join(file);
    Reference {
        image: Arc::new(load_image(&path).unwrap()),
        name: path.display().to_string(),
    }
}

/// The request a case describes (prompt, seed, steps, size, references).
fn case_request(case: &str) -> Request {
    let meta = common::case_json(case);
    let mut request = Request::new(
        meta["prompt"].as_str().unwrap(),
        meta["seed"].as_u64().unwrap(),
    );
    request.steps = Some(meta["steps"].as_u64().unwrap() as usize);
    if let Some(size) = meta["size"].as_array() {
        request.width = Some(size[0].as_u64().unwrap() as usize);
        request.height = Some(size[1].as_u64().unwrap() as usize);
    }
    request.references = meta["refs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| load(case, r.as_str().unwrap()))
        .collect();
    request
}

fn case_dtype(case: &str) -> DType {
    match common::case_json(case)["dtype"].as_str().unwrap() {
        "float32" => DType::F32,
        _ => DType::BF16,
    }
}

fn open(model: &str, dtype: DType, resident: bool) -> Pipeline {
    let dir = ModelDir::open_local(&common::model(model)).unwrap();
    let mut options = PipelineOptions::for_device(Device::Cpu);
    options.dtype = dtype;
    options.keep_resident = resident;
    Pipeline::open(dir, options).unwrap()
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

/// Runs requests as one batch; returns the images and how many reference passes ran.
fn run_batch(pipeline: &mut Pipeline, requests: &[Request]) -> (Vec<Generated>, usize) {
    let mut passes = 0;
    let mut images = Vec::new();
    pipeline
        .generate_batch(
            requests,
            &mut |e| {
                if let Event::StageStart(Stage::ReferenceKv) = e {
                    passes += 1;
                }
            },
            &mut |_, g| {
                images.push(g);
                Ok(())
            },
        )
        .unwrap();
    (images, passes)
}

/// Runs a case on the tiny KV model and compares it with diffusers' image; returns ours.
fn check_case(case: &str) -> image::RgbImage {
    let request = case_request(case);
    let dtype = case_dtype(case);
    let mut pipeline = open("tiny-kv-w0", dtype, false);
    assert_eq!(pipeline.kind(), PipelineKind::KleinKv);
    let (mut out, passes) = run_batch(&mut pipeline, std::slice::from_ref(&request));
    let out = out.pop().unwrap();
    let with_refs = !request.references.is_empty();
    assert_eq!(passes, usize::from(with_refs), "{case}: reference passes");
    let meta = common::case_json(case);
    let size: Vec<usize> = common::json_uints(&meta["image_size"]);
    assert_eq!((out.width, out.height), (size[0], size[1]), "{case}: size");
    let diff = compare_images(&golden(case), &out.image).unwrap();
    eprintln!("{case}: max diff {}, PSNR {:.2} dB", diff.max, diff.psnr);
    if dtype == DType::F32 {
        assert!(
            diff.max <= MAX_DIFF_F32,
            "{case}: max per-pixel difference {} > {MAX_DIFF_F32}",
            diff.max
        );
    } else {
        assert!(
            diff.psnr >= MIN_PSNR_BF16,
            "{case}: PSNR {:.2} dB < {MIN_PSNR_BF16}",
            diff.psnr
        );
    }
    out.image
}

/// One reference and no size: the output takes the reference's floored size (100×64 → 96×64).
#[test]
fn kv_one_reference_default_size() {
    check_case("kv_ref1_default_size");
}

/// Two references of different sizes; the KV result is not the plain pipeline's (the test can
/// fail): the plain pipeline on the same weights and inputs, ours and diffusers'
/// (`edit2_64x64`: the same prompt, seed, size and references), gives another image.
#[test]
fn kv_two_references_differ_from_plain_pipeline() {
    let case = "kv_refs2_64x64";
    let ours = check_case(case);
    let request = case_request(case);
    let mut plain = open("tiny-w0", DType::F32, false);
    assert_eq!(plain.kind(), PipelineKind::Klein);
    let plain_image = plain.generate(&request, &mut |_| {}).unwrap().image;
    let d = compare_images(&golden("edit2_64x64"), &plain_image).unwrap();
    assert!(d.max <= MAX_DIFF_F32, "plain edit vs diffusers: {}", d.max);
    for (what, other) in [
        ("ours", &plain_image),
        ("diffusers'", &golden("edit2_64x64")),
    ] {
        let d = compare_images(other, &ours).unwrap();
        eprintln!(
            "KV vs {what} plain edit: max diff {}, PSNR {:.2} dB",
            d.max, d.psnr
        );
        assert!(
            d.max > MIN_KV_EFFECT,
            "the KV image is (nearly) the plain pipeline's ({what}): max diff {}",
            d.max
        );
    }
}

#[test]
fn kv_bf16() {
    check_case("kv_ref1_default_size_bf16");
}

/// Text only on a KV model is the standard forward: diffusers' image, which is also the plain
/// pipeline's (`t2i_64x64`), and no reference pass.
#[test]
fn kv_text_only_is_the_plain_pipeline() {
    let ours = check_case("kv_t2i_64x64");
    let d = compare_images(&golden("t2i_64x64"), &ours).unwrap();
    assert!(d.max <= MAX_DIFF_F32, "vs plain t2i: {}", d.max);
}

/// The references' K/V at every double and single block, from diffusers' own reference
/// tokens and ids, equal the tensors of diffusers' step-0 cache; our reference tokens and
/// ids are diffusers'.
#[test]
fn reference_kv_equals_diffusers_cache() {
    for case in ["kv_ref1_default_size", "kv_refs2_64x64"] {
        let meta = common::case_json(case);
        let t = common::case_tensors(case);
        let dir = common::model("tiny-kv-w0").join("transformer");
        let cfg: Flux2TransformerConfig =
            flux2_klein::model_dir::read_config(&dir.join("config.json")).unwrap();
        let model = Flux2Transformer::load_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            &cfg,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let ids = t["image_latent_ids"].get(0).unwrap();
        let kv = model.reference_kv(&t["image_latents"], &ids).unwrap();
        let (nd, ns) = (
            meta["double_blocks"].as_u64().unwrap() as usize,
            meta["single_blocks"].as_u64().unwrap() as usize,
        );
        assert_eq!((kv.num_double(), kv.num_single()), (nd, ns));
        let mut worst = 0f32;
        let mut check = |name: String, ours: &Tensor| {
            let theirs = &t[&name];
            assert_eq!(ours.dims(), theirs.dims(), "{case} {name}");
            let d = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d <= KV_TOL,
                "{case} {name}: max |diff| {d:.2e} > {KV_TOL:.0e}"
            );
            worst = worst.max(d);
        };
        for i in 0..nd {
            let (k, v) = kv.double(i).unwrap();
            check(format!("kv.double.{i}.k"), k);
            check(format!("kv.double.{i}.v"), v);
        }
        for i in 0..ns {
            let (k, v) = kv.single(i).unwrap();
            check(format!("kv.single.{i}.k"), k);
            check(format!("kv.single.{i}.v"), v);
        }
        eprintln!(
            "{case}: reference K/V max |diff| {worst:.2e} over {} blocks",
            nd + ns
        );

        // Our reference tokens (VAE encode + pack) and ids are the ones diffusers used.
        let request = case_request(case);
        let images: Vec<image::RgbImage> = request
            .references
            .iter()
            .map(|r| flux2_klein::image_io::prepare_reference(&r.image).unwrap())
            .collect();
        let vae_dir = common::model("tiny-kv-w0").join("vae");
        let vae_cfg: flux2_klein::vae::AutoencoderKLFlux2Config =
            flux2_klein::model_dir::read_config(&vae_dir.join("config.json")).unwrap();
        let vb = flux2_klein::model_dir::var_builder(
            &[vae_dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let vae = flux2_klein::vae::AutoencoderKLFlux2::load(
            vb,
            &vae_cfg,
            flux2_klein::vae::VaeParts::ENCODER,
        )
        .unwrap();
        let (tokens, our_ids) =
            flux2_klein::pipeline::stages::prepare_image_latents(&vae, &images, DType::F32, None)
                .unwrap();
        common::assert_close(
            &format!("{case}: reference tokens"),
            &tokens,
            &t["image_latents"],
            1e-5,
        );
        let as_i64 = |x: &Tensor| x.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        assert_eq!(as_i64(&our_ids), as_i64(&ids), "{case}: reference ids");
    }
}

/// Three prompts × two seeds against the same two references in one batch: the six images of
/// six single runs (the first also diffusers'), with one reference pass — in chunks (the
/// default) and with every component resident (one request per chunk, so the K/V outlive the
/// chunk that made them).
#[test]
fn batch_computes_the_reference_kv_once() {
    let case = "kv_refs2_64x64";
    let base = case_request(case);
    let prompts = [
        base.prompt.clone(),
        "a red bicycle in the snow".to_string(),
        "two owls on a branch, watercolour".to_string(),
    ];
    let mut requests = Vec::new();
    for prompt in &prompts {
        for seed in [0, 7] {
            let mut r = base.clone();
            r.prompt = prompt.clone();
            r.seed = seed;
            requests.push(r);
        }
    }
    let mut pipeline = open("tiny-kv-w0", DType::F32, false);
    let mut singles = Vec::new();
    for r in &requests {
        let (mut out, passes) = run_batch(&mut pipeline, std::slice::from_ref(r));
        assert_eq!(passes, 1);
        singles.push(out.pop().unwrap().image);
    }
    let d = compare_images(&golden(case), &singles[0]).unwrap();
    assert!(d.max <= MAX_DIFF_F32, "{case}: max diff {}", d.max);
    for resident in [false, true] {
        let mut pipeline = open("tiny-kv-w0", DType::F32, resident);
        let (batch, passes) = run_batch(&mut pipeline, &requests);
        assert_eq!(
            passes, 1,
            "resident {resident}: reference passes in the batch"
        );
        assert_eq!(batch.len(), 6);
        for (i, (g, single)) in batch.iter().zip(&singles).enumerate() {
            assert_eq!(
                &g.image, single,
                "resident {resident}: image {i} differs from its single run"
            );
        }
    }
    // Six distinct images: the prompts and seeds matter.
    for i in 0..6 {
        for j in i + 1..6 {
            assert_ne!(singles[i], singles[j], "images {i} and {j}");
        }
    }
    // References that are not the previous request's are passed again: [A, B, A] → 3.
    let mut other = base.clone();
    other.references.reverse();
    let (_, passes) = run_batch(&mut pipeline, &[base.clone(), other, base]);
    assert_eq!(passes, 3, "[A, B, A]: the K/V of A are not kept past B");
}

/// diffusers has no KV inpainting pipeline: an init image on a KV model is refused before any
/// model work, naming the fix.
#[test]
fn init_image_on_a_kv_model_is_refused() {
    let mut request = case_request("kv_refs2_64x64");
    request.width = None;
    request.height = None;
    let init = load("kv_refs2_64x64", "ref_0.png");
    request.init = Some(flux2_klein::pipeline::InitImage {
        image: init.image,
        name: init.name,
        mask: None,
        strength: 0.8,
        padding_mask_crop: None,
    });
    let mut pipeline = open("tiny-kv-w0", DType::F32, false);
    let mut stages = 0;
    let err = pipeline
        .generate(&request, &mut |e| {
            if let Event::StageStart(_) = e {
                stages += 1;
            }
        })
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("Flux2KleinKVPipeline"), "{msg}");
    assert_eq!(stages, 0, "nothing ran");
}

/// FLUX.2 [klein] 9B-KV from its configs alone (`tests/fixtures/configs/klein-9b-kv`, written
/// by `reference/config_fixtures.py`, no weights): the configs parse and validate with the
/// spec's values, the pipeline opens on them as a KV checkpoint (the components agree: 3 ×
/// 4096 = 12288), and the parameter counts from the configs are the ones diffusers and
/// transformers build (`parameter_counts.json`). The same code as 4B: only config values.
#[test]
fn klein_9b_kv_configs_and_parameter_counts() {
    use flux2_klein::text_encoder::Qwen3Config;
    let dir = common::fixtures().join("configs/klein-9b-kv");
    let model = ModelDir::open_local(&dir).unwrap();
    let t: Flux2TransformerConfig = model.config("transformer").unwrap();
    assert_eq!(
        (t.num_layers, t.num_single_layers, t.num_attention_heads),
        (8, 24, 32)
    );
    assert_eq!(
        (t.attention_head_dim, t.inner_dim(), t.joint_attention_dim),
        (128, 4096, 12288)
    );
    assert_eq!(t.mlp_hidden_dim(), 12288);
    let te: Qwen3Config = model.config("text_encoder").unwrap();
    assert_eq!(
        (te.hidden_size, te.num_hidden_layers, te.intermediate_size),
        (4096, 36, 12288)
    );
    assert_eq!(
        (
            te.num_attention_heads,
            te.num_key_value_heads,
            te.head_dim()
        ),
        (32, 8, 128)
    );
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("parameter_counts.json")).unwrap())
            .unwrap();
    let count = |k: &str| counts[k].as_u64().unwrap();
    eprintln!(
        "9B: transformer {} ({}), text encoder {} ({})",
        t.parameter_count(),
        count("transformer"),
        te.parameter_count(),
        count("text_encoder")
    );
    assert_eq!(t.parameter_count(), count("transformer"));
    assert_eq!(te.parameter_count(), count("text_encoder"));

    let mut options = PipelineOptions::for_device(Device::Cpu);
    options.dtype = DType::BF16;
    let pipeline = Pipeline::open(model, options).unwrap();
    assert_eq!(pipeline.kind(), PipelineKind::KleinKv);
    assert_eq!(pipeline.default_steps(), 4);
    assert!(!pipeline.uses_cfg(4.0), "the KV pipeline has no guidance");

    // Qwen3-4B (klein 4B: tied embeddings) from the spec's values, and the tiny encoder's file.
    let mut qwen3_4b = te.clone();
    qwen3_4b.hidden_size = 2560;
    qwen3_4b.intermediate_size = 9728;
    qwen3_4b.tie_word_embeddings = true;
    assert_eq!(qwen3_4b.parameter_count(), 8_044_936_192 / 2);
    let tiny = common::model("tiny-w0").join("text_encoder");
    let tiny_cfg = Qwen3Config::from_file(&tiny.join("config.json")).unwrap();
    let stored: u64 = candle_core::safetensors::load(tiny.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .values()
        .map(|t| t.elem_count() as u64)
        .sum();
    assert_eq!(tiny_cfg.parameter_count(), stored, "tiny text encoder");
}
