//! `flux2-klein generate --lora PATH[:SCALE]` end to end on tiny-w0: the PNG equals
//! diffusers' image (within 1/255), records each adapter (name, SHA-256, scale), and
//! `--config-from-metadata` applies them again (warning when a file changed); in one batch,
//! jobs with and without adapters give the images of separate runs and the model's files stay
//! as they were; bad adapter files fail with one line and write nothing.

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cli::{assert_error_line, assert_no_output, run_in, stderr};
use common::TempDir;

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";

fn model() -> String {
    common::model("tiny-w0").display().to_string()
}

fn fixture(file: &str) -> std::path::PathBuf {
    common::fixtures().join("lora").join(file)
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    flux2_klein::image_io::compare_images(a, b).unwrap().max
}

/// `generate` on tiny-w0 at 64×64, 4 steps, seed 0, with `extra` arguments.
fn generate(dir: &Path, extra: &[&str]) -> std::process::Output {
    let model = model();
    let mut args = vec![
        "-q", "generate", "-m", &model, "--device", "cpu", "--seed", "0", "-W", "64", "-H", "64",
    ];
    args.extend_from_slice(extra);
    run_in(dir, &args)
}

fn assert_ok(o: &std::process::Output) {
    assert!(o.status.success(), "stderr:\n{}", stderr(o));
}

#[test]
fn lora_equals_diffusers_and_round_trips_through_metadata() {
    let dir = TempDir::new("cli-lora");
    std::fs::copy(fixture("peft.safetensors"), dir.join("style.safetensors")).unwrap();
    let o = generate(
        dir.path(),
        &[
            "-p",
            GIFU,
            "--lora",
            "style.safetensors:0.8",
            "-o",
            "out.png",
        ],
    );
    assert_ok(&o);
    let ours = rgb(&dir.join("out.png"));
    let d = max_diff(&rgb(&fixture("peft_s08.png")), &ours);
    assert!(d <= 1, "max diff {d} from diffusers' image");
    assert!(max_diff(&rgb(&fixture("base_t2i.png")), &ours) > 16);

    let chunks = flux2_klein::image_io::read_png_text(dir.join("out.png")).unwrap();
    let sha = flux2_klein::image_io::sha256_file(dir.join("style.safetensors")).unwrap();
    assert_eq!(
        common::text_chunk(&chunks, "loras"),
        Some("style.safetensors")
    );
    assert_eq!(
        common::text_chunk(&chunks, "loras_sha256"),
        Some(sha.as_str())
    );
    assert_eq!(common::text_chunk(&chunks, "lora_scales"), Some("0.8"));

    // The recorded adapter is applied again: the same image, bit for bit.
    let o = generate(
        dir.path(),
        &["--config-from-metadata", "out.png", "-o", "again.png"],
    );
    assert_ok(&o);
    assert_eq!(max_diff(&ours, &rgb(&dir.join("again.png"))), 0);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));

    // A changed file is named in a warning.
    std::fs::copy(
        fixture("aitoolkit.safetensors"),
        dir.join("style.safetensors"),
    )
    .unwrap();
    let o = generate(
        dir.path(),
        &["--config-from-metadata", "out.png", "-o", "changed.png"],
    );
    assert_ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning: the LoRA file style.safetensors has changed"),
        "{err}"
    );
}

#[test]
fn a_batch_with_and_without_adapters_equals_separate_runs() {
    let dir = TempDir::new("cli-lora-batch");
    std::fs::copy(fixture("kohya.safetensors"), dir.join("k.safetensors")).unwrap();
    let weights = common::model("tiny-w0").join("transformer/diffusion_pytorch_model.safetensors");
    let before = (
        flux2_klein::image_io::sha256_file(&weights).unwrap(),
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
    );
    // Separate runs. The file's text-encoder keys are skipped with a warning, as diffusers does.
    let o = generate(
        dir.path(),
        &[
            "-p",
            GIFU,
            "--lora",
            "k.safetensors:0.5",
            "-o",
            "sep_lora.png",
        ],
    );
    assert_ok(&o);
    assert!(
        stderr(&o).contains("warning: LoRA file k.safetensors: 3 text-encoder keys skipped"),
        "{}",
        stderr(&o)
    );
    assert_ok(&generate(dir.path(), &["-p", GIFU, "-o", "sep_base.png"]));
    // One batch: adapter, none, adapter again (the transformer is re-merged each time the set
    // changes), with and without --resident.
    let lines = [
        format!(r#"{{"prompt": {GIFU:?}, "lora": ["k.safetensors:0.5"], "output": "b0.png"}}"#),
        format!(r#"{{"prompt": {GIFU:?}, "lora": [], "output": "b1.png"}}"#),
        format!(
            r#"{{"prompt": {GIFU:?}, "lora": [{{"path": "k.safetensors", "scale": 0.5}}], "output": "b2.png"}}"#
        ),
    ];
    std::fs::write(dir.join("jobs.jsonl"), lines.join("\n")).unwrap();
    assert_ok(&generate(dir.path(), &["--prompt-file", "jobs.jsonl"]));
    let lines: Vec<String> = lines.iter().map(|l| l.replace("b", "r")).collect();
    std::fs::write(dir.join("jobs_r.jsonl"), lines.join("\n")).unwrap();
    assert_ok(&generate(
        dir.path(),
        &["--prompt-file", "jobs_r.jsonl", "--resident"],
    ));
    let sep_lora = rgb(&dir.join("sep_lora.png"));
    let sep_base = rgb(&dir.join("sep_base.png"));
    assert!(
        max_diff(&sep_lora, &sep_base) > 16,
        "the adapter changes the image"
    );
    for (file, expected) in [
        ("b0.png", &sep_lora),
        ("b1.png", &sep_base),
        ("b2.png", &sep_lora),
        ("r0.png", &sep_lora),
        ("r1.png", &sep_base),
        ("r2.png", &sep_lora),
    ] {
        assert_eq!(max_diff(expected, &rgb(&dir.join(file))), 0, "{file}");
    }
    let after = (
        flux2_klein::image_io::sha256_file(&weights).unwrap(),
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after, "the base weights on disk are untouched");
}

/// Writes `tensors` (name → shape, zeros) as a safetensors file.
fn write_adapter(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn bad_adapter_files_fail_with_one_line() {
    let dir = TempDir::new("cli-lora-bad");
    let bytes = std::fs::read(fixture("peft.safetensors")).unwrap();
    std::fs::write(dir.join("truncated.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    write_adapter(
        &dir.join("shape.safetensors"),
        &[
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                &[4, 64],
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                &[32, 4],
            ),
        ],
    );
    write_adapter(&dir.join("nolora.safetensors"), &[("foo.weight", &[2, 2])]);
    write_adapter(
        &dir.join("te.safetensors"),
        &[
            ("text_encoder.layers.0.q_proj.lora_A.weight", &[4, 16]),
            ("text_encoder.layers.0.q_proj.lora_B.weight", &[16, 4]),
        ],
    );
    write_adapter(
        &dir.join("module.safetensors"),
        &[
            (
                "diffusion_model.double_blocks.7.img_attn.qkv.lora_A.weight",
                &[4, 32],
            ),
            (
                "diffusion_model.double_blocks.7.img_attn.qkv.lora_B.weight",
                &[96, 4],
            ),
        ],
    );
    let inputs = [
        "module.safetensors",
        "nolora.safetensors",
        "shape.safetensors",
        "te.safetensors",
        "truncated.safetensors",
    ];
    let cases: [(&str, &[&str]); 6] = [
        (
            "truncated.safetensors",
            &["truncated.safetensors", "truncated"],
        ),
        (
            "shape.safetensors",
            &["transformer_blocks.0.attn.to_q", "[32, 64]", "[32, 32]"],
        ),
        ("nolora.safetensors", &["no LoRA tensors", "foo.weight"]),
        ("te.safetensors", &["only text-encoder adapters"]),
        (
            "module.safetensors",
            &[
                "transformer_blocks.7.attn.to_q",
                "ai-toolkit",
                "no such module",
            ],
        ),
        (
            "missing.safetensors",
            &["missing.safetensors", "does not exist"],
        ),
    ];
    for (file, needles) in cases {
        let o = generate(dir.path(), &["-p", "x", "--lora", file]);
        assert_error_line(&o, 1, needles);
        assert_no_output(&dir, &inputs);
    }
    // More adapters than one image may take.
    let mut args = vec!["-p", "x"];
    for _ in 0..17 {
        args.extend(["--lora", "te.safetensors"]);
    }
    let o = generate(dir.path(), &args);
    assert_error_line(&o, 1, &["17 LoRA adapters", "16"]);
    // A scale that is not a finite number is a usage error.
    for bad in [
        "te.safetensors:nan",
        "te.safetensors:inf",
        "te.safetensors:big",
    ] {
        let o = generate(dir.path(), &["-p", "x", "--lora", bad]);
        assert_error_line(&o, 2, &["--lora"]);
        assert_no_output(&dir, &inputs);
    }
}

/// A hub file (`owner/repo/file` or `hf://owner/repo/file`) is read from the Hugging Face
/// cache as models are; offline and not cached, it fails with one line.
#[test]
fn hub_files_come_from_the_cache() {
    let dir = TempDir::new("cli-lora-hub");
    let repo = dir.join(".hf-home/hub/models--test--loras");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::copy(
        fixture("peft.safetensors"),
        repo.join("snapshots")
            .join(commit)
            .join("style.safetensors"),
    )
    .unwrap();
    for (spec, out) in [
        ("test/loras/style.safetensors:0.8", "a.png"),
        ("hf://test/loras/style.safetensors:0.8", "b.png"),
    ] {
        let o = generate(dir.path(), &["-p", GIFU, "--lora", spec, "-o", out]);
        assert_ok(&o);
        let d = max_diff(&rgb(&fixture("peft_s08.png")), &rgb(&dir.join(out)));
        assert!(d <= 1, "{spec}: max diff {d} from diffusers' image");
    }
    let chunks = flux2_klein::image_io::read_png_text(dir.join("a.png")).unwrap();
    assert_eq!(
        common::text_chunk(&chunks, "loras"),
        Some("test/loras/style.safetensors")
    );
    let o = generate(
        dir.path(),
        &["-p", "x", "--lora", "test/loras/other.safetensors"],
    );
    assert_error_line(&o, 1, &["other.safetensors", "HF_HUB_OFFLINE"]);
}
