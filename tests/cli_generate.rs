//! `flux2-klein generate` end to end on the tiny diffusers-made models: the PNG written by the
//! binary equals diffusers' image for the same model, seed and settings (max per-pixel
//! difference ≤ 1 in f32; PSNR ≥ 30 dB in bf16), and the run is deterministic.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TempDir;

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flux2-klein"))
}

/// Runs `generate` with `args` (plus `-q -o out`), returns the written RGB image and its path
/// (its directory is kept: callers read the file's metadata or compare it afterwards).
fn generate<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> (image::RgbImage, PathBuf) {
    let out = TempDir::new(name).keep().join("out.png");
    let result = bin()
        .arg("-q")
        .arg("generate")
        .args(args)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running flux2-klein");
    assert!(
        result.status.success(),
        "{name}: exit {:?}\nstderr: {}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert_eq!(
        stdout.trim(),
        out.display().to_string(),
        "stdout is the output path"
    );
    (image::open(&out).unwrap().to_rgb8(), out)
}

/// Runs `cmd` and asserts it succeeded (its stderr in the failure message).
fn succeed(cmd: &mut Command) -> std::process::Output {
    let result = cmd.output().expect("running flux2-klein");
    assert!(
        result.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    result
}

/// (max, mean) absolute per-channel difference.
fn diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    let d = flux2_klein::image_io::compare_images(a, b).unwrap();
    (d.max, d.mean)
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    flux2_klein::image_io::compare_images(a, b).unwrap().psnr
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

fn model(name: &str) -> String {
    common::model(name).display().to_string()
}

fn case_ref(case: &str, k: usize) -> String {
    common::case_dir(case)
        .join(format!("ref_{k}.png"))
        .display()
        .to_string()
}

/// `-m tests/fixtures/models/MODEL -p PROMPT --seed SEED -W W -H H` plus `extra`.
fn run_args(
    model_name: &str,
    prompt: &str,
    seed: u64,
    (w, h): (u32, u32),
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "-m".into(),
        model(model_name),
        "-p".into(),
        prompt.into(),
        "--seed".into(),
        seed.to_string(),
        "-W".into(),
        w.to_string(),
        "-H".into(),
        h.to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn assert_matches_diffusers(case: &str, args: &[String]) {
    let (ours, _) = generate(case, args);
    let (max, mean) = diff(&ours, &golden(case));
    eprintln!("{case}: max |diff| {max}, mean {mean:.5} (uint8)");
    assert!(max <= 1, "{case}: max per-pixel difference {max} > 1");
}

#[test]
fn text_to_image_square() {
    assert_matches_diffusers("t2i_64x64", &run_args("tiny-w0", GIFU, 0, (64, 64), &[]));
}

#[test]
fn text_to_image_non_square() {
    assert_matches_diffusers("t2i_64x128", &run_args("tiny-w0", GIFU, 0, (128, 64), &[]));
}

#[test]
fn text_to_image_seed_7_128px() {
    assert_matches_diffusers(
        "t2i_128x128_s7",
        &run_args("tiny-w0", GIFU, 7, (128, 128), &[]),
    );
}

#[test]
fn edit_with_two_references() {
    let (r0, r1) = (case_ref("edit2_64x64", 0), case_ref("edit2_64x64", 1));
    assert_matches_diffusers(
        "edit2_64x64",
        &run_args("tiny-w0", GIFU, 0, (64, 64), &["-r", &r0, "-r", &r1]),
    );
}

#[test]
fn second_model_shape_with_one_reference() {
    let r0 = case_ref("tiny2_edit_64x128", 0);
    assert_matches_diffusers(
        "tiny2_edit_64x128",
        &run_args("tiny2-w0", "a red fox in snow", 42, (128, 64), &["-r", &r0]),
    );
}

#[test]
fn cfg_on_a_base_model() {
    // tiny-base-w0: tiny-w0's weights with is_distilled = false → CFG with the '' prompt.
    assert_matches_diffusers(
        "t2i_64x64_cfg4",
        &run_args(
            "tiny-base-w0",
            GIFU,
            0,
            (64, 64),
            &["--steps", "4", "--guidance", "4"],
        ),
    );
}

#[test]
fn bf16_on_cpu_is_within_30_db() {
    let (ours, _) = generate(
        "bf16",
        &run_args("tiny-w0", GIFU, 0, (64, 64), &["--dtype", "bf16"]),
    );
    let reference = golden("t2i_64x64_bf16");
    let p = psnr(&ours, &reference);
    let (max, mean) = diff(&ours, &reference);
    eprintln!("t2i_64x64_bf16: PSNR {p:.2} dB, max |diff| {max}, mean {mean:.4}");
    assert!(p >= 30.0, "bf16 PSNR {p:.2} dB < 30 dB");
}

#[test]
fn same_command_twice_gives_identical_pixels_and_metadata() {
    let args = run_args("tiny-w0", "a lighthouse at dusk", 1234, (80, 64), &[]);
    let (a, path_a) = generate("twice-a", &args);
    let (b, _) = generate("twice-b", &args);
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "pixels differ between two identical runs"
    );
    let text = flux2_klein::image_io::read_png_text(&path_a).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("PNG metadata has no {k}: {text:?}"))
    };
    assert_eq!(get("prompt"), "a lighthouse at dusk");
    assert_eq!(get("seed"), "1234");
}

#[test]
fn reference_names_and_hashes_are_in_the_metadata() {
    let r0 = case_ref("edit2_64x64", 0);
    let (_, path) = generate(
        "refmeta",
        &run_args("tiny-w0", "x", 3, (64, 64), &["-r", &r0]),
    );
    let text = flux2_klein::image_io::read_png_text(&path).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("references").as_deref(), Some(r0.as_str()));
    assert_eq!(
        get("references_sha256"),
        Some(flux2_klein::image_io::sha256_file(&r0).unwrap())
    );
}

#[test]
fn default_size_comes_from_the_first_reference() {
    // ref_0 of edit2 is 72x88 → centre-cropped to 64x80; no -W/-H given.
    let r0 = case_ref("edit2_64x64", 0);
    let (img, _) = generate(
        "refsize",
        &["-m", &model("tiny-w0"), "-p", "x", "--seed", "3", "-r", &r0],
    );
    assert_eq!(img.dimensions(), (64, 80));
}

#[test]
fn compare_command_checks_golden_images() {
    let golden = common::case_dir("t2i_64x64").join("image.png");
    let (_, ours) = generate(
        "compare",
        &[
            "-m",
            &model("tiny-w0"),
            "-p",
            GIFU,
            "--seed",
            "0",
            "-W",
            "64",
            "-H",
            "64",
        ],
    );
    let run = |extra: &[&str]| {
        bin()
            .arg("compare")
            .arg(&golden)
            .arg(&ours)
            .args(extra)
            .output()
            .unwrap()
    };
    // Identical to itself; ours is within 1/255 of diffusers but not bit-identical.
    let same = bin()
        .arg("compare")
        .arg(&golden)
        .arg(&golden)
        .output()
        .unwrap();
    assert!(same.status.success());
    let strict = run(&[]);
    assert_eq!(strict.status.code(), Some(1), "max diff 1 > default 0");
    assert!(String::from_utf8_lossy(&strict.stderr).contains("max channel difference 1 > 0"));
    let tolerant = run(&["--max-diff", "1", "--json"]);
    assert!(tolerant.status.success());
    let v: serde_json::Value = serde_json::from_slice(&tolerant.stdout).unwrap();
    assert_eq!(v["max_diff"], 1);
    assert_eq!(v["verdict"], "within");
    assert_eq!(
        run(&["--max-diff", "1", "--min-psnr", "99"]).status.code(),
        Some(1)
    );
    let other_size = bin()
        .arg("compare")
        .arg(&golden)
        .arg(common::case_dir("t2i_64x128").join("image.png"))
        .output()
        .unwrap();
    // Another size cannot be compared: trouble (2), not "different" (1), as cmp and diff.
    assert_eq!(other_size.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&other_size.stderr).contains("differ in size"));
}

#[test]
fn batch_from_a_prompt_file_equals_single_runs() {
    // Two prompts × --count 2 (seeds 0, 1), once stage by stage (the default: one model in
    // memory at a time) and once with --resident (everything loaded, image after image).
    let dir = TempDir::new("batch");
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        format!("# a comment\n{GIFU}\n\na lighthouse at dusk\r\n"),
    )
    .unwrap();
    let mut runs = Vec::new();
    for mode in ["staged", "resident"] {
        let out_dir = dir.join(mode);
        std::fs::create_dir_all(&out_dir).unwrap();
        let mut cmd = bin();
        cmd.args(["-q", "generate", "-m", &model("tiny-w0"), "--prompt-file"])
            .arg(&prompts)
            .args(["--count", "2", "--seed", "0", "-W", "64", "-H", "64", "-o"])
            .arg(out_dir.join("{index}-{seed}.png"));
        if mode == "resident" {
            cmd.arg("--resident");
        }
        let result = succeed(&mut cmd);
        let expected: Vec<PathBuf> = ["1-0", "2-1", "3-0", "4-1"]
            .iter()
            .map(|n| out_dir.join(format!("{n}.png")))
            .collect();
        let stdout = String::from_utf8_lossy(&result.stdout);
        let printed: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
        assert_eq!(printed, expected, "{mode}: one path per image, in order");
        let images: Vec<image::RgbImage> = expected
            .iter()
            .map(|p| image::open(p).unwrap().to_rgb8())
            .collect();
        for (path, (prompt, seed)) in expected.iter().zip([
            (GIFU, "0"),
            (GIFU, "1"),
            ("a lighthouse at dusk", "0"),
            ("a lighthouse at dusk", "1"),
        ]) {
            let text = flux2_klein::image_io::read_png_text(path).unwrap();
            let get = |k: &str| {
                text.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(get("prompt"), Some(prompt), "{}", path.display());
            assert_eq!(get("seed"), Some(seed), "{}", path.display());
        }
        // (GIFU, seed 0) is the t2i_64x64 case.
        let (max, _) = diff(&images[0], &golden("t2i_64x64"));
        assert!(
            max <= 1,
            "{mode}: batch image 1 vs diffusers: max diff {max}"
        );
        runs.push(images);
    }
    for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
        assert_eq!(a.as_raw(), b.as_raw(), "image {i}: staged vs resident");
    }
    // The batch computes each image exactly as a single run does.
    let (single, _) = generate(
        "batch-single",
        &run_args("tiny-w0", "a lighthouse at dusk", 1, (64, 64), &[]),
    );
    assert_eq!(single.as_raw(), runs[0][3].as_raw(), "batch vs single run");
}

#[test]
fn batch_edit_shares_prompt_and_references_exactly() {
    // --count 2 with two references: the prompt and the references are encoded once and
    // shared; each image still equals its single run (seed 0 is the edit2_64x64 case).
    let (r0, r1) = (case_ref("edit2_64x64", 0), case_ref("edit2_64x64", 1));
    let dir = TempDir::new("batch-edit");
    succeed(
        bin()
            .args(["-q", "generate"])
            .args(run_args(
                "tiny-w0",
                GIFU,
                0,
                (64, 64),
                &["-r", &r0, "-r", &r1, "--count", "2"],
            ))
            .arg("-o")
            .arg(dir.join("e-{seed}.png")),
    );
    let first = image::open(dir.join("e-0.png")).unwrap().to_rgb8();
    let second = image::open(dir.join("e-1.png")).unwrap().to_rgb8();
    let (max, _) = diff(&first, &golden("edit2_64x64"));
    assert!(max <= 1, "batch edit image 1 vs diffusers: max diff {max}");
    let (single, _) = generate(
        "batch-edit-single",
        &run_args("tiny-w0", GIFU, 1, (64, 64), &["-r", &r0, "-r", &r1]),
    );
    assert_eq!(
        single.as_raw(),
        second.as_raw(),
        "batch vs single run, seed 1"
    );
}

#[test]
fn negative_prompt_on_a_base_model() {
    // diffusers with negative_prompt_embeds = encode_prompt("blurry, low quality")
    // (reference/pipeline_fixtures.py); the empty negative prompt gives t2i_64x64_cfg4.
    let expected = image::open(common::fixtures().join("pipeline/negative_prompt.png"))
        .unwrap()
        .to_rgb8();
    let (ours, path) = generate(
        "negative",
        &run_args(
            "tiny-base-w0",
            GIFU,
            0,
            (64, 64),
            &[
                "--guidance",
                "4",
                "--steps",
                "4",
                "--negative-prompt",
                "blurry, low quality",
            ],
        ),
    );
    let (max, mean) = diff(&ours, &expected);
    eprintln!("negative prompt: max |diff| {max}, mean {mean:.5}");
    assert!(max <= 1, "negative prompt vs diffusers: max diff {max}");
    let (max_empty, _) = diff(&ours, &golden("t2i_64x64_cfg4"));
    assert!(max_empty > 10, "the negative prompt must change the image");
    let text = flux2_klein::image_io::read_png_text(&path).unwrap();
    assert!(text
        .iter()
        .any(|(k, v)| k == "negative_prompt" && v == "blurry, low quality"));
}

#[test]
fn prompt_file_json_lines_set_each_image() {
    // Per-line seed, size, references and output, mixed with a plain line; each image equals
    // its diffusers golden (t2i_64x128: 128x64 seed 0; edit2_64x64: two references).
    let dir = TempDir::new("jsonl");
    let (r0, r1) = (case_ref("edit2_64x64", 0), case_ref("edit2_64x64", 1));
    let json = |v: serde_json::Value| v.to_string();
    let lines = [
        json(
            serde_json::json!({"prompt": GIFU, "seed": 0, "width": 128, "height": 64,
                                "output": dir.join("wide.png")}),
        ),
        json(
            serde_json::json!({"prompt": GIFU, "seed": 0, "ref": [r0, r1],
                                "output": dir.join("edit.png")}),
        ),
        "a lighthouse at dusk".to_string(),
    ];
    let file = dir.join("jobs.txt");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let result = succeed(
        bin()
            .args(["-q", "generate", "-m", &model("tiny-w0"), "--prompt-file"])
            .arg(&file)
            .args(["-W", "64", "-H", "64", "--seed", "5", "-o"])
            .arg(dir.join("plain-{seed}.png")),
    );
    let printed: Vec<PathBuf> = String::from_utf8_lossy(&result.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        printed,
        vec![
            dir.join("wide.png"),
            dir.join("edit.png"),
            dir.join("plain-5.png")
        ]
    );
    for (file, case) in [("wide.png", "t2i_64x128"), ("edit.png", "edit2_64x64")] {
        let img = image::open(dir.join(file)).unwrap().to_rgb8();
        let (max, _) = diff(&img, &golden(case));
        assert!(max <= 1, "{file} vs {case}: max diff {max}");
    }
    let plain = image::open(dir.join("plain-5.png")).unwrap().to_rgb8();
    assert_eq!(plain.dimensions(), (64, 64));
}

#[test]
fn json_output_describes_each_image() {
    // `--json`: one record per image on stdout, in order, each naming the file it describes.
    let dir = TempDir::new("json");
    let result = succeed(
        bin()
            .args(["-q", "generate", "-m", &model("tiny-w0"), "-p", GIFU])
            .args([
                "--seed", "0", "-n", "2", "-W", "64", "-H", "64", "--json", "-o",
            ])
            .arg(dir.join("{seed}.png")),
    );
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&result.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is one JSON object"))
        .collect();
    assert_eq!(records.len(), 2);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seed"], i as u64);
        assert_eq!(
            r["path"],
            dir.join(format!("{i}.png")).display().to_string()
        );
        assert_eq!(
            (r["width"].as_u64(), r["height"].as_u64()),
            (Some(64), Some(64))
        );
        assert_eq!(r["steps"], 4);
        assert_eq!(r["prompt"], GIFU);
        assert_eq!(r["references"], serde_json::json!([]));
        assert_eq!(r["timings_ms"]["steps"].as_array().map(Vec::len), Some(4));
        assert!(r["timings_ms"]["total"].as_f64().unwrap() > 0.0);
    }
    // The record's file is the image: seed 0 is diffusers' t2i_64x64.
    let img = image::open(dir.join("0.png")).unwrap().to_rgb8();
    let (max, _) = diff(&img, &golden("t2i_64x64"));
    assert!(max <= 1, "max diff {max}");
}

#[test]
fn config_from_metadata_makes_the_same_image_again() {
    // An edit with two references, a non-default size and steps, made again from its PNG's
    // metadata: the same pixels; a --seed given on the command line wins over the recorded one.
    let (first, path) = generate(
        "from-meta-first",
        &[
            "-m",
            &model("tiny-w0"),
            "-p",
            GIFU,
            "--seed",
            "7",
            "-W",
            "128",
            "-H",
            "64",
            "--steps",
            "3",
            "-r",
            &case_ref("edit2_64x64", 0),
            "-r",
            &case_ref("edit2_64x64", 1),
        ],
    );
    let tiny = model("tiny-w0");
    let source = path.to_str().unwrap();
    let remake = |name: &str, extra: &[&str]| {
        let args = [
            &["-m", tiny.as_str(), "--config-from-metadata", source],
            extra,
        ]
        .concat();
        generate(name, &args)
    };
    let (second, again) = remake("from-meta-again", &[]);
    assert_eq!(second.dimensions(), (128, 64));
    assert_eq!(diff(&first, &second).0, 0, "same settings, same pixels");
    assert_eq!(
        flux2_klein::image_io::read_png_text(&path).unwrap(),
        flux2_klein::image_io::read_png_text(&again).unwrap(),
        "same metadata"
    );

    let (varied, variation) = remake("from-meta-variation", &["--seed", "8"]);
    let text = flux2_klein::image_io::read_png_text(&variation).unwrap();
    assert!(text.contains(&("seed".to_string(), "8".to_string())));
    assert!(text.contains(&("size".to_string(), "128x64".to_string())));
    assert_ne!(diff(&first, &varied).0, 0);
}

/// `flux2-klein bench --json` (what scripts/gpu/gpu.sh records): every timed run, one summary row
/// per size, and the settings that make a number comparable, including the attention kernel
/// (`naive` on the CPU).
#[test]
fn bench_json_records_runs_and_settings() {
    let tiny = model("tiny-w0");
    let out = succeed(bin().args([
        "bench", "-m", &tiny, "--size", "64x64", "--size", "64x96", "--runs", "2", "--warmup", "0",
        "--json",
    ]));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["device"], "cpu");
    assert_eq!(doc["dtype"], "f32");
    assert_eq!(doc["attention_kernel"], "naive");
    assert_eq!(doc["steps"], 4);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 runs x 2 sizes");
    for run in runs {
        assert_eq!(run["step_ms"].as_array().unwrap().len(), 4);
        assert!(run["total_ms"].as_f64().unwrap() > 0.0);
    }
    let summary = doc["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 2);
    assert_eq!(
        (&summary[1]["width"], &summary[1]["height"]),
        (&64.into(), &96.into())
    );
    assert!(summary[0]["total_ms"]["mean"].as_f64().unwrap() > 0.0);
}
