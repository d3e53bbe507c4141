//! `flux2-klein` on a KV-cache checkpoint (the tiny `Flux2KleinKVPipeline` model,
//! `tests/fixtures/models/tiny-kv-w0`) end to end: a batch makes the references' K/V once,
//! and `bench --batch` records each image of its batches.

mod common;

use std::process::Command;

use common::TempDir;

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flux2-klein"))
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

fn model(name: &str) -> String {
    common::model(name).display().to_string()
}

fn case_ref(case: &str, k: usize) -> String {
    common::case_dir(case)
        .join(format!("ref_{k}.png"))
        .display()
        .to_string()
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

/// A KV checkpoint from the command line: `--count 2` on two references makes the reference
/// K/V once (one `reference K/V` stage line; its time in the first image's JSON record only),
/// and the first image is diffusers' `Flux2KleinKVPipeline` image.
#[test]
fn kv_checkpoint_batch_makes_the_reference_kv_once() {
    let case = "kv_refs2_64x64";
    let (r0, r1) = (case_ref(case, 0), case_ref(case, 1));
    let dir = TempDir::new("kv-batch");
    let out = succeed(
        bin()
            .arg("generate")
            .args(["-m", &model("tiny-kv-w0"), "-p", GIFU, "--seed", "0"])
            .args([
                "-W", "64", "-H", "64", "-r", &r0, "-r", &r1, "--count", "2", "--json",
            ])
            .arg("-o")
            .arg(dir.join("kv-{seed}.png")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let passes = stderr
        .lines()
        .filter(|l| l.contains("reference K/V:"))
        .count();
    assert_eq!(passes, 1, "one reference pass; stderr:\n{stderr}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    let kv_ms = |r: &serde_json::Value| r["timings_ms"]["reference_kv"].as_f64().unwrap();
    assert!(kv_ms(&records[0]) > 0.0 && kv_ms(&records[1]) == 0.0);
    let first = image::open(dir.join("kv-0.png")).unwrap().to_rgb8();
    let d = flux2_klein::image_io::compare_images(&first, &golden(case)).unwrap();
    assert!(
        d.max <= 1,
        "KV batch image 1 vs diffusers: max diff {}",
        d.max
    );
}

/// `bench --batch 3` on a KV checkpoint with a reference: each run is one batch of three
/// images, recorded per image; the reference pass counts for the first image only.
#[test]
fn bench_batch_records_each_image_and_one_reference_pass() {
    let kv = model("tiny-kv-w0");
    let r0 = case_ref("kv_ref1_default_size", 0);
    let out = succeed(bin().args([
        "bench", "-m", &kv, "-r", &r0, "--size", "64x64", "--runs", "1", "--warmup", "0",
        "--batch", "3", "--json",
    ]));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["batch"], 3);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "one run of three images");
    let kv_ms: Vec<f64> = runs
        .iter()
        .map(|r| r["reference_kv_ms"].as_f64().unwrap())
        .collect();
    assert!(
        kv_ms[0] > 0.0 && kv_ms[1] == 0.0 && kv_ms[2] == 0.0,
        "{kv_ms:?}"
    );
    let images: Vec<u64> = runs.iter().map(|r| r["image"].as_u64().unwrap()).collect();
    assert_eq!(images, [0, 1, 2]);
    assert_eq!(doc["summary"][0]["runs"], 3);
}
