//! `flux2-klein generate --init-image/--mask/--strength/--padding-mask-crop` end to end on the
//! tiny models: the PNG equals diffusers' `Flux2KleinInpaintPipeline` image (within 1/255),
//! records the init image, mask (name and SHA-256) and strength, and `--config-from-metadata`
//! makes it again; a prompt-file line carries the same settings; bad input fails with one
//! line and writes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::TempDir;

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";
const BIN: &str = env!("CARGO_BIN_EXE_flux2-klein");

fn case_file(case: &str, file: &str) -> String {
    common::case_dir(case).join(file).display().to_string()
}

fn model(name: &str) -> String {
    common::model(name).display().to_string()
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("FLUX2_KLEIN_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running flux2-klein")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    flux2_klein::image_io::compare_images(a, b).unwrap().max
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

fn png_text(path: &Path) -> Vec<(String, String)> {
    flux2_klein::image_io::read_png_text(path).unwrap()
}

#[test]
fn inpaint_equals_diffusers_and_records_its_inputs() {
    let dir = TempDir::new("cli-inpaint");
    let out = dir.join("out.png");
    let (init, mask) = (
        case_file("inpaint_half_s07", "init.png"),
        case_file("inpaint_half_s07", "mask.png"),
    );
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "generate",
            "-p",
            GIFU,
            "-m",
            &model("tiny-w0"),
            "--device",
            "cpu",
            "--seed",
            "0",
            "--init-image",
            &init,
            "--mask",
            &mask,
            "--strength",
            "0.7",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = image::open(&out).unwrap().to_rgb8();
    let d = max_diff(&ours, &golden("inpaint_half_s07"));
    assert!(d <= 1, "max per-pixel difference {d} > 1");

    let chunks = png_text(&out);
    assert_eq!(
        common::text_chunk(&chunks, "init_image"),
        Some(init.as_str())
    );
    assert_eq!(common::text_chunk(&chunks, "mask"), Some(mask.as_str()));
    assert_eq!(common::text_chunk(&chunks, "strength"), Some("0.7"));
    assert_eq!(
        common::text_chunk(&chunks, "init_image_sha256").map(str::to_string),
        Some(flux2_klein::image_io::sha256_file(&init).unwrap())
    );
    assert_eq!(
        common::text_chunk(&chunks, "mask_sha256").map(str::to_string),
        Some(flux2_klein::image_io::sha256_file(&mask).unwrap())
    );
    assert_eq!(common::text_chunk(&chunks, "size"), Some("64x64"));

    // The recorded settings make the same image again.
    let again = dir.join("again.png");
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "generate",
            "--config-from-metadata",
            out.to_str().unwrap(),
            "-m",
            &model("tiny-w0"),
            "--device",
            "cpu",
            "-o",
            again.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(&again).unwrap().to_rgb8(), ours);
}

#[test]
fn image_to_image_from_a_prompt_file_line() {
    let dir = TempDir::new("cli-i2i");
    let out = dir.join("i2i.png");
    let line = serde_json::json!({
        "prompt": GIFU,
        "seed": 0,
        "init_image": case_file("i2i_s05", "init.png"),
        "strength": 0.5,
        "output": out.display().to_string(),
    });
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, format!("{line}\n")).unwrap();
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "generate",
            "--prompt-file",
            prompts.to_str().unwrap(),
            "-m",
            &model("tiny2-w0"),
            "--device",
            "cpu",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let d = max_diff(&image::open(&out).unwrap().to_rgb8(), &golden("i2i_s05"));
    assert!(d <= 1, "max per-pixel difference {d} > 1");
    let chunks = png_text(&out);
    assert_eq!(common::text_chunk(&chunks, "strength"), Some("0.5"));
    assert_eq!(common::text_chunk(&chunks, "mask"), None);
}

#[test]
fn padding_mask_crop_with_count() {
    let dir = TempDir::new("cli-crop");
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "generate",
            "-p",
            GIFU,
            "-m",
            &model("tiny-w0"),
            "--device",
            "cpu",
            "--seed",
            "0",
            "-n",
            "2",
            "--init-image",
            &case_file("inpaint_crop_s08", "init.png"),
            "--mask",
            &case_file("inpaint_crop_s08", "mask.png"),
            "--strength",
            "0.8",
            "--padding-mask-crop",
            "8",
            "-o",
            "crop-{seed}.png",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let first = image::open(dir.join("crop-0.png")).unwrap().to_rgb8();
    let d = max_diff(&first, &golden("inpaint_crop_s08"));
    assert!(d <= 1, "max per-pixel difference {d} > 1");
    let second = image::open(dir.join("crop-1.png")).unwrap().to_rgb8();
    assert_ne!(first, second, "seed 1 gives another image");
    let chunks = png_text(&dir.join("crop-1.png"));
    assert_eq!(common::text_chunk(&chunks, "padding_mask_crop"), Some("8"));
}

/// One `error:` line, the exit status, nothing on stdout, nothing written.
fn assert_fails(dir: &TempDir, args: &[&str], code: i32, needles: &[&str]) {
    let o = run_in(dir.path(), args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}: stdout must stay empty");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("warning: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one error line, got:\n{err}"
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {}", lines[0]);
    }
}

#[test]
fn bad_inpainting_input_fails_clearly() {
    let dir = TempDir::new("cli-inpaint-errors");
    let tiny = model("tiny-w0");
    let init = case_file("inpaint_half_s07", "init.png");
    let mask = case_file("inpaint_half_s07", "mask.png");
    std::fs::write(dir.join("broken.png"), b"not an image").unwrap();
    image::RgbImage::new(48, 80)
        .save(dir.join("small.png"))
        .unwrap();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate", "-p", "x", "-m", &tiny, "--device", "cpu", "-o", "out.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, i32, Vec<&str>)> = vec![
        (
            base(&["--init-image", "missing.png"]),
            1,
            vec!["init image", "missing.png", "does not exist"],
        ),
        (
            base(&["--init-image", "broken.png"]),
            1,
            vec!["cannot decode init image", "broken.png"],
        ),
        (
            base(&["--init-image", &init, "--mask", "broken.png"]),
            1,
            vec!["cannot decode mask", "broken.png"],
        ),
        (
            base(&["--init-image", &init, "--mask", "."]),
            1,
            vec!["mask", "is a directory"],
        ),
        (
            base(&["--init-image", "small.png"]),
            1,
            vec!["init image", "small.png", "48x80", "at least 64"],
        ),
        (
            base(&["--mask", &mask]),
            1,
            vec!["--mask needs --init-image"],
        ),
        (
            base(&["--strength", "0.5"]),
            1,
            vec!["--strength needs --init-image"],
        ),
        (
            base(&["--init-image", &init, "--strength", "1.5"]),
            2,
            vec!["strength", "[0, 1]"],
        ),
        (
            base(&["--init-image", &init, "--strength", "-0.1"]),
            2,
            vec!["strength"],
        ),
        (
            base(&["--init-image", &init, "--strength", "nan"]),
            2,
            vec!["strength"],
        ),
        (
            base(&["--init-image", &init, "--strength", "inf"]),
            2,
            vec!["strength"],
        ),
        (
            base(&["--init-image", &init, "--strength", "0"]),
            1,
            vec!["strength 0", "greater than 0"],
        ),
        (
            base(&["--init-image", &init, "-W", "128"]),
            1,
            vec!["--width/--height", "--init-image"],
        ),
        (
            base(&["--init-image", &init, "--padding-mask-crop", "8"]),
            1,
            vec!["--padding-mask-crop needs --mask"],
        ),
    ];
    for (args, code, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails(&dir, &args, code, &needles);
    }
    let mut entries = dir.entries();
    entries.retain(|e| e != "broken.png" && e != "small.png");
    assert!(entries.is_empty(), "nothing may be written: {entries:?}");
}

#[test]
fn inpaint_with_a_reference_and_bench() {
    let dir = TempDir::new("cli-inpaint-ref");
    let case = "inpaint_box_ref_s10";
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "generate",
            "-p",
            GIFU,
            "-m",
            &model("tiny-w0"),
            "--device",
            "cpu",
            "--seed",
            "0",
            "--init-image",
            &case_file(case, "init.png"),
            "--mask",
            &case_file(case, "mask.png"),
            "--strength",
            "1",
            "--ref",
            &case_file(case, "ref_0.png"),
            "-o",
            "out.png",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let d = max_diff(
        &image::open(dir.join("out.png")).unwrap().to_rgb8(),
        &golden(case),
    );
    assert!(d <= 1, "max per-pixel difference {d} > 1");

    // bench runs image-to-image at each --size (the init image resized to it).
    let o = run_in(
        dir.path(),
        &[
            "-q",
            "bench",
            "-m",
            &model("tiny-w0"),
            "--device",
            "cpu",
            "--size",
            "64x64",
            "--size",
            "128x64",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--init-image",
            &case_file(case, "init.png"),
            "--strength",
            "0.5",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.to_string().contains("128"), "{v}");
}
