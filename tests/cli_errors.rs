//! The `flux2-klein` binary's failure paths: each must fail fast (before any model loads where
//! the problem is in the arguments), with one `error: …` line on stderr that names the bad
//! argument and says what to do, exit status 2 for usage errors and 1 for everything else,
//! nothing on stdout, and no output file left behind.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::Path;
use std::process::{Command, Output};

use cli::{assert_error_line, assert_no_output, run_in, stderr, write_png, BIN};
use common::TempDir;

/// Asserts a runtime failure: exit 1 and one `error:` line holding every needle.
fn assert_runtime_error(o: &Output, needles: &[&str]) -> String {
    assert_error_line(o, 1, needles)
}

#[test]
fn usage_errors_exit_2() {
    let dir = TempDir::new("usage");
    for args in [
        &["generate"][..],                       // no prompt
        &["generate", "-p", "x", "--bogus"][..], // unknown option
        &["generate", "-p", "x", "--steps", "0"][..],
        &["generate", "-p", "x", "--seed", "-2"][..],
        &["generate", "-p", "x", "--device", "tpu"][..],
        &["generate", "-p", "x", "--dtype", "f8"][..],
        &["generate", "-p", "x", "--prompt-file", "p.txt"][..], // one prompt source only
        &["generate", "-p", "x", "--count", "0"][..],
        &["bench", "--size", "1024"][..],
        &["frobnicate"][..],
    ] {
        let o = run_in(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("error: "),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(o.stdout.is_empty());
    }
    assert_no_output(&dir, &[]);
}

#[test]
fn help_lists_the_options() {
    let dir = TempDir::new("help");
    let o = run_in(dir.path(), &["generate", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--prompt",
        "--ref",
        "--width",
        "--height",
        "--steps",
        "--guidance",
        "--seed",
        "--output",
        "--model",
        "FLUX2_KLEIN_MODEL",
        "black-forest-labs/FLUX.2-klein-4B",
        "--revision",
        "--device",
        "--dtype",
        "--vae-dtype",
        "--vae-tile",
        "--prompt-file",
        "--negative-prompt",
        "--count",
        "--resident",
        "--quiet",
        "--verbose",
    ] {
        assert!(help.contains(opt), "generate --help lacks {opt}:\n{help}");
    }
    let o = run_in(dir.path(), &["bench", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--size", "--runs", "--warmup", "--ref", "--json", "--steps", "--model", "--device",
    ] {
        assert!(help.contains(opt), "bench --help lacks {opt}:\n{help}");
    }
    let o = run_in(dir.path(), &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("generate") && help.contains("bench"),
        "{help}"
    );
}

#[test]
fn unknown_output_extension_fails_before_anything_else() {
    let dir = TempDir::new("ext");
    // The model does not exist either: the extension must be reported first (cheap checks run
    // before the model is resolved).
    let o = run_in(
        dir.path(),
        &["generate", "-p", "a cat", "-o", "out.gif", "-m", "./nope"],
    );
    assert_runtime_error(&o, &[".gif", ".png"]);
    assert_no_output(&dir, &[]);

    let o = run_in(dir.path(), &["generate", "-p", "a cat", "-o", "out"]);
    assert_runtime_error(&o, &["no extension"]);
    assert_no_output(&dir, &[]);
}

#[test]
fn missing_output_directory_is_created_only_for_a_written_image() {
    // Missing directories are created when the image is written (`mkdir -p`): a run that
    // fails before that (here on the model) leaves none behind.
    let dir = TempDir::new("outdir");
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "a cat",
            "-o",
            "missing/deeper/out.png",
            "-m",
            "./nope",
        ],
    );
    assert_runtime_error(&o, &["./nope", "does not exist"]);
    assert_no_output(&dir, &[]);
    // Under a file, no directory can be made: said before any work.
    std::fs::write(dir.join("file"), "x").unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "a cat",
            "-o",
            "file/out.png",
            "-m",
            "./nope",
        ],
    );
    assert_runtime_error(&o, &["file/out.png", "not a directory"]);
    assert_no_output(&dir, &["file"]);
}

#[test]
fn missing_reference_file() {
    let dir = TempDir::new("noref");
    let o = run_in(
        dir.path(),
        &[
            "generate", "-p", "a cat", "-r", "nope.png", "-o", "out.png", "-m", "./nope",
        ],
    );
    assert_runtime_error(&o, &["nope.png", "does not exist", "--ref"]);
    assert_no_output(&dir, &[]);
}

#[test]
fn undecodable_reference_file() {
    let dir = TempDir::new("badref");
    std::fs::write(dir.join("bad.png"), b"this is not an image").unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "-p", "a cat", "-r", "bad.png", "-o", "out.png"],
    );
    assert_runtime_error(&o, &["bad.png", "cannot decode"]);
    assert_no_output(&dir, &["bad.png"]);
}

#[test]
fn too_small_reference() {
    let dir = TempDir::new("smallref");
    write_png(&dir.join("ok.png"), 64, 64);
    write_png(&dir.join("small.png"), 40, 56);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "a cat",
            "-r",
            "ok.png",
            "-r",
            "small.png",
            "-o",
            "out.png",
        ],
    );
    assert_runtime_error(&o, &["small.png", "40×56", "64 px"]);
    assert_no_output(&dir, &["ok.png", "small.png"]);
}

#[test]
fn too_elongated_reference() {
    let dir = TempDir::new("longref");
    write_png(&dir.join("long.png"), 520, 64);
    let o = run_in(
        dir.path(),
        &["generate", "-p", "a cat", "-r", "long.png", "-o", "out.png"],
    );
    assert_runtime_error(&o, &["long.png", "aspect ratio", "8:1"]);
    assert_no_output(&dir, &["long.png"]);
}

#[test]
fn width_below_minimum_is_a_usage_error() {
    let dir = TempDir::new("width");
    let o = run_in(dir.path(), &["generate", "-p", "a cat", "--width", "8"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--width") && err.contains('8') && err.contains("16"),
        "{err}"
    );
    assert_no_output(&dir, &[]);
}

#[test]
fn nonexistent_local_model_directory() {
    let dir = TempDir::new("nomodel");
    let o = run_in(
        dir.path(),
        &[
            "generate", "-p", "a cat", "-m", "./nope", "--device", "cpu", "-o", "out.png",
        ],
    );
    assert_runtime_error(&o, &["./nope", "does not exist"]);
    assert_no_output(&dir, &[]);
}

/// A model_index.json for another pipeline (FLUX.2 [dev], no class name) fails before
/// anything loads, naming the pipelines this program runs.
#[test]
fn unsupported_pipeline_class_names_the_supported_ones() {
    let dir = TempDir::new("badclass");
    for (name, index) in [
        (
            "dev",
            r#"{"_class_name": "Flux2Pipeline", "is_distilled": false}"#,
        ),
        ("noclass", r#"{"is_distilled": true}"#),
    ] {
        let model = dir.path().join(name);
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model_index.json"), index).unwrap();
        let o = run_in(
            dir.path(),
            &[
                "generate", "-p", "a cat", "-m", name, "--device", "cpu", "-o", "out.png",
            ],
        );
        assert_runtime_error(
            &o,
            &[
                "Flux2KleinPipeline",
                "Flux2KleinKVPipeline",
                "Flux2KleinInpaintPipeline",
            ],
        );
    }
    assert_no_output(&dir, &["dev", "noclass"]);
}

#[test]
fn model_from_environment_variable() {
    let dir = TempDir::new("envmodel");
    let o = Command::new(BIN)
        .args([
            "generate", "-p", "a cat", "--device", "cpu", "-o", "out.png",
        ])
        .current_dir(dir.path())
        .env("FLUX2_KLEIN_MODEL", "./nope-from-env")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_runtime_error(&o, &["./nope-from-env"]);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_on_a_cpu_only_build() {
    let dir = TempDir::new("cuda");
    for dev in ["cuda", "cuda:1"] {
        let o = run_in(
            dir.path(),
            &["generate", "-p", "a cat", "--device", dev, "-o", "out.png"],
        );
        assert_runtime_error(&o, &["--features cuda", "--device cpu"]);
    }
    assert_no_output(&dir, &[]);
}

#[test]
fn offline_without_a_model_says_how_to_use_a_local_directory() {
    let dir = TempDir::new("offline");
    let o = run_in(
        dir.path(),
        &[
            "generate", "-p", "a cat", "--device", "cpu", "-o", "out.png",
        ],
    );
    assert_runtime_error(&o, &["black-forest-labs/FLUX.2-klein-4B", "--model DIR"]);
    assert_no_output(&dir, &[]);
}

#[test]
fn quiet_still_prints_warnings_and_errors() {
    let dir = TempDir::new("quiet");
    let o = run_in(
        dir.path(),
        &[
            "-q", "generate", "-p", "a cat", "-W", "1000", "-m", "./nope", "-o", "out.png",
        ],
    );
    let line = assert_runtime_error(&o, &["./nope"]);
    let err = stderr(&o);
    assert!(
        err.contains("warning: --width 1000 is not a multiple of 16; using 992"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "only the warning and {line}");
    assert_no_output(&dir, &[]);
}

#[test]
fn bench_checks_arguments_before_loading() {
    let dir = TempDir::new("bench");
    let o = run_in(dir.path(), &["bench", "-r", "nope.png", "-m", "./nope"]);
    assert_runtime_error(&o, &["nope.png"]);
    let o = run_in(dir.path(), &["bench", "--size", "512x512", "-m", "./nope"]);
    assert_runtime_error(&o, &["./nope"]);
    assert_no_output(&dir, &[]);
}

#[test]
fn prompt_file_problems() {
    let dir = TempDir::new("promptfile");
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "missing.txt", "-m", "./nope"],
    );
    assert_runtime_error(&o, &["missing.txt", "check the path"]);
    std::fs::write(dir.join("empty.txt"), "# only a comment\n\n   \n").unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "empty.txt", "-m", "./nope"],
    );
    assert_runtime_error(&o, &["empty.txt", "no prompts", "one per line"]);
    assert_no_output(&dir, &["empty.txt"]);
}

#[test]
fn batch_outputs_must_have_distinct_names() {
    let dir = TempDir::new("batchnames");
    // Checked before the (nonexistent) model is resolved.
    let o = run_in(
        dir.path(),
        &[
            "generate", "-p", "x", "--count", "3", "-o", "out.png", "-m", "./nope",
        ],
    );
    assert_runtime_error(&o, &["out.png", "{index}"]);
    std::fs::write(dir.join("p.txt"), "a\nb\n").unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--prompt-file",
            "p.txt",
            "--seed",
            "5",
            "-o",
            "x-{seed}.png",
            "-m",
            "./nope",
        ],
    );
    assert_runtime_error(&o, &["x-5.png", "{index}"]);
    assert_no_output(&dir, &["p.txt"]);
}

#[test]
fn truncated_jpeg_reference() {
    // libjpeg would pad a cut-off JPEG with grey; Pillow (and so diffusers) refuses it.
    let dir = TempDir::new("truncjpeg");
    let jpeg = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/jpeg_444.jpg"),
    )
    .unwrap();
    std::fs::write(dir.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "-p", "a cat", "-r", "cut.jpg", "-o", "out.png"],
    );
    assert_runtime_error(&o, &["cut.jpg", "truncated"]);
    assert_no_output(&dir, &["cut.jpg"]);
}

#[test]
fn prompt_file_json_line_errors_name_the_line() {
    let dir = TempDir::new("jsonlerr");
    std::fs::write(
        dir.join("jobs.txt"),
        "a fox\n{\"prompt\": \"b\", \"widht\": 512}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "jobs.txt", "-m", "./nope"],
    );
    assert_runtime_error(&o, &["jobs.txt line 2", "widht"]);
    std::fs::write(
        dir.join("refs.txt"),
        "{\"prompt\": \"b\", \"ref\": [\"missing.png\"]}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "refs.txt", "-m", "./nope"],
    );
    assert_runtime_error(&o, &["missing.png", "does not exist"]);
    assert_no_output(&dir, &["jobs.txt", "refs.txt"]);
}

#[test]
fn config_from_a_png_without_metadata() {
    // A PNG flux2-klein did not write has no settings to make again: one clear line, before
    // any model is touched.
    let dir = TempDir::new("nometa");
    write_png(&dir.join("plain.png"), 64, 64);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "plain.png",
            "-o",
            "out.png",
            "-m",
            "./nope",
        ],
    );
    assert_runtime_error(&o, &["plain.png", "no prompt in its metadata"]);
    assert_no_output(&dir, &["plain.png"]);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "gone.png",
            "-o",
            "out.png",
        ],
    );
    assert_runtime_error(&o, &["gone.png"]);
}

#[test]
fn fetch_checks_a_model_and_prints_its_directory() {
    // A complete local directory: its path on stdout, exit 0. A hub repo that is not cached
    // while offline: one error line (nothing on stdout).
    let dir = TempDir::new("fetch");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-w0");
    let o = run_in(dir.path(), &["fetch", "-m", tiny.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        tiny.display().to_string()
    );
    let o = run_in(dir.path(), &["fetch", "-m", "nobody/no-such-model"]);
    assert_runtime_error(&o, &["nobody/no-such-model", "HF_HUB_OFFLINE"]);
}
