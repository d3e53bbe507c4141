//! `generate --transformer PATH_OR_REPO` and `--quantize fp8` end to end on tiny-w0: the PNG
//! equals diffusers' image (within 1/255, fixtures by `reference/fp8_fixtures.py`), records
//! the transformer file (name, SHA-256) and the quantisation, and `--config-from-metadata`
//! makes it again; a hub repo id resolves to the one `.safetensors` file of its cached
//! snapshot; bad files fail with one line and write nothing.

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;
#[path = "common/fp8_layout.rs"]
mod fp8_layout;

use std::path::Path;

use cli::{assert_error_line, assert_no_output, run_in};
use common::TempDir;

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";

fn model() -> String {
    common::model("tiny-w0").display().to_string()
}

fn fp8_file(name: &str) -> String {
    common::fixtures()
        .join("fp8")
        .join(name)
        .display()
        .to_string()
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

fn png(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    flux2_klein::image_io::compare_images(a, b).unwrap().max
}

fn key(path: &Path, k: &str) -> Option<String> {
    flux2_klein::image_io::read_png_text(path)
        .unwrap()
        .into_iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v)
}

fn generate(dir: &Path, extra: &[&str]) -> std::process::Output {
    let m = model();
    let mut args = vec![
        "generate", "-p", GIFU, "-m", &m, "-W", "64", "-H", "64", "--steps", "4", "--seed", "0",
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = run_in(dir, &args);
    assert!(o.status.success(), "{}", cli::stderr(&o));
    o
}

/// A hub cache under `dir/.hf-home` in which the repo `repo` holds `file` (as hf-hub lays
/// it out: refs/main → snapshots/<commit>/).
fn cache_repo(dir: &Path, repo: &str, file: &str) {
    let root = dir
        .join(".hf-home/hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    let snap = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(file, snap.join("flux-2-klein-4b-fp8.safetensors")).unwrap();
}

#[test]
fn fp8_transformer_from_a_repo_id_is_recorded_and_made_again() {
    let dir = TempDir::new("cli-fp8-repo");
    let file = fp8_file("tiny-w0-fp8-bfl.safetensors");
    cache_repo(dir.path(), "test-org/klein-fp8", &file);
    generate(
        dir.path(),
        &["--transformer", "test-org/klein-fp8", "-o", "a.png"],
    );
    let a = dir.join("a.png");
    let d = max_diff(&png(&a), &golden("fp8_bfl_t2i"));
    eprintln!("fp8 file via repo id: max diff {d} vs diffusers");
    assert!(d <= 1, "{d}");
    assert_eq!(
        key(&a, "transformer").as_deref(),
        Some("test-org/klein-fp8")
    );
    assert_eq!(
        key(&a, "transformer_sha256"),
        Some(flux2_klein::image_io::sha256_file(Path::new(&file)).unwrap())
    );
    assert_eq!(key(&a, "quantize"), None);
    // The recorded transformer is used again.
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "a.png",
            "-m",
            &model(),
            "-o",
            "b.png",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", cli::stderr(&o));
    assert_eq!(max_diff(&png(&a), &png(&dir.join("b.png"))), 0);
    // Another --transformer wins, with a warning naming the recorded one.
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "a.png",
            "-m",
            &model(),
            "-o",
            "c.png",
            "--transformer",
            &file,
        ],
    );
    assert!(o.status.success(), "{}", cli::stderr(&o));
    assert!(
        cli::stderr(&o).contains("made with the transformer file test-org/klein-fp8"),
        "{}",
        cli::stderr(&o)
    );
    assert_eq!(max_diff(&png(&a), &png(&dir.join("c.png"))), 0);
    // `fetch --transformer` finds it too (and prints only the model's directory).
    let o = run_in(
        dir.path(),
        &[
            "fetch",
            "-m",
            &model(),
            "--transformer",
            "test-org/klein-fp8",
        ],
    );
    assert!(o.status.success(), "{}", cli::stderr(&o));
    assert!(cli::stderr(&o).contains("flux-2-klein-4b-fp8.safetensors"));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), model());
}

#[test]
fn quantize_fp8_matches_diffusers_and_is_made_again() {
    let dir = TempDir::new("cli-fp8-quantize");
    generate(dir.path(), &["--quantize", "fp8", "-o", "q.png"]);
    let q = dir.join("q.png");
    let d = max_diff(&png(&q), &golden("quantize_fp8_t2i"));
    eprintln!("--quantize fp8: max diff {d} vs diffusers");
    assert!(d <= 1, "{d}");
    assert_eq!(key(&q, "quantize").as_deref(), Some("fp8"));
    assert_eq!(key(&q, "transformer"), None);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "q.png",
            "-m",
            &model(),
            "-o",
            "r.png",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", cli::stderr(&o));
    assert_eq!(max_diff(&png(&q), &png(&dir.join("r.png"))), 0);
}

/// Runs `generate` with `--transformer FILE` (and `extra`) in `dir` and checks the one-line
/// failure; nothing is written.
fn assert_fails(
    dir: &TempDir,
    file: &str,
    extra: &[&str],
    code: i32,
    needles: &[&str],
    inputs: &[&str],
) -> String {
    let m = model();
    let mut args = vec![
        "generate", "-p", "x", "-m", &m, "-W", "64", "-H", "64", "-o", "out.png",
    ];
    if !file.is_empty() {
        args.extend_from_slice(&["--transformer", file]);
    }
    args.extend_from_slice(extra);
    let o = run_in(dir.path(), &args);
    let line = assert_error_line(&o, code, needles);
    eprintln!("{line}");
    // One message, not a candle backtrace (the tests run with RUST_BACKTRACE=1 at times).
    assert!(!line.contains("candle_core::"), "{line}");
    assert_no_output(dir, inputs);
    line
}

#[test]
fn bad_transformer_files_fail_clearly() {
    let dir = TempDir::new("cli-fp8-bad");
    assert_fails(
        &dir,
        "nope.safetensors",
        &[],
        1,
        &["--transformer nope.safetensors does not exist"],
        &[],
    );
    std::fs::create_dir(dir.join("sub")).unwrap();
    assert_fails(
        &dir,
        "sub",
        &[],
        1,
        &["is a directory", "--model"],
        &["sub"],
    );
    std::fs::write(dir.join("notes.safetensors"), "hello, not a checkpoint").unwrap();
    assert_fails(
        &dir,
        "notes.safetensors",
        &[],
        1,
        &["not a safetensors file"],
        &["notes.safetensors", "sub"],
    );
    assert_fails(
        &dir,
        "test-org/missing",
        &[],
        1,
        &[
            "test-org/missing is not in the Hugging Face cache",
            "HF_HUB_OFFLINE",
        ],
        &["notes.safetensors", "sub"],
    );
    assert_fails(
        &dir,
        "",
        &["--quantize", "int4"],
        2,
        &["int4"],
        &["notes.safetensors", "sub"],
    );
    std::fs::remove_dir(dir.join("sub")).unwrap();
    std::fs::remove_file(dir.join("notes.safetensors")).unwrap();

    let none = serde_json::Map::new();
    let img_in = || ("img_in.weight".to_string(), "BF16", vec![32, 16]);
    let write = |name: &str, entries: &[fp8_layout::Entry], meta: &serde_json::Map<_, _>| {
        fp8_layout::write_zero_weight_file(&dir.join(name), entries, meta);
    };
    // A scale without its weight.
    write(
        "orphan.safetensors",
        &[
            img_in(),
            (
                "double_blocks.0.img_attn.qkv.weight_scale".into(),
                "F32",
                vec![],
            ),
        ],
        &none,
    );
    assert_fails(
        &dir,
        "orphan.safetensors",
        &[],
        1,
        &["`double_blocks.0.img_attn.qkv.weight_scale` is a scale without a weight"],
        &["orphan.safetensors"],
    );
    // NVFP4: declared, and by its second-level scale.
    let mut nvfp4 = serde_json::Map::new();
    nvfp4.insert(
        "_quantization_metadata".into(),
        serde_json::Value::String(
            r#"{"layers": {"single_blocks.0.linear1": {"format": "nvfp4"}}}"#.into(),
        ),
    );
    write(
        "nvfp4.safetensors",
        &[
            img_in(),
            ("single_blocks.0.linear1.weight".into(), "U8", vec![16, 8]),
        ],
        &nvfp4,
    );
    assert_fails(
        &dir,
        "nvfp4.safetensors",
        &[],
        1,
        &[
            "`single_blocks.0.linear1` uses the quantisation format `nvfp4`",
            "fp8",
        ],
        &["nvfp4.safetensors", "orphan.safetensors"],
    );
    write(
        "nvfp4b.safetensors",
        &[
            img_in(),
            ("single_blocks.0.linear1.weight".into(), "U8", vec![16, 8]),
            (
                "single_blocks.0.linear1.weight_scale_2".into(),
                "F32",
                vec![],
            ),
        ],
        &none,
    );
    assert_fails(
        &dir,
        "nvfp4b.safetensors",
        &[],
        1,
        &["NVFP4"],
        &[
            "nvfp4.safetensors",
            "nvfp4b.safetensors",
            "orphan.safetensors",
        ],
    );
    // A declared fp8 layer without its weight scale.
    let (_, stems) = fp8_layout::klein_4b_fp8_layout();
    write(
        "unscaled.safetensors",
        &[
            img_in(),
            (
                "double_blocks.0.img_attn.qkv.weight".into(),
                "F8_E4M3",
                vec![96, 32],
            ),
        ],
        &fp8_layout::bfl_quantization_metadata(&stems[..1]),
    );
    assert_fails(
        &dir,
        "unscaled.safetensors",
        &[],
        1,
        &["has no `double_blocks.0.img_attn.qkv.weight_scale`"],
        &[
            "nvfp4.safetensors",
            "nvfp4b.safetensors",
            "orphan.safetensors",
            "unscaled.safetensors",
        ],
    );
}

/// BFL's real klein-4B fp8 layout (a sparse zero-weight file) against the tiny model's
/// config: the error names the first tensor that does not fit, before anything loads.
#[test]
fn a_file_for_another_architecture_names_the_first_mismatch() {
    let dir = TempDir::new("cli-fp8-shape");
    let (entries, stems) = fp8_layout::klein_4b_fp8_layout();
    fp8_layout::write_zero_weight_file(
        &dir.join("klein-4b-fp8.safetensors"),
        &entries,
        &fp8_layout::bfl_quantization_metadata(&stems),
    );
    assert_fails(
        &dir,
        "klein-4b-fp8.safetensors",
        &[],
        1,
        &[
            "does not fit the model's transformer config",
            "`double_blocks.0.img_attn.qkv.weight` is [9216, 3072] in the file, but the config needs [96, 32]",
        ],
        &["klein-4b-fp8.safetensors"],
    );
}
