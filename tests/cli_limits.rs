//! The binary's ceilings and hostile inputs (issue #23): sizes, counts and values from flags,
//! prompt files and PNG metadata; model configs; forged image headers and files that are not
//! regular files; log streams that cannot be written; `compare`'s exit codes; non-finite
//! results. Each failure is one `error:` line with its exit status, nothing on stdout and no
//! output file, and never a panic, an abort or a hang.
//!
//! Over 600 lines on purpose: one named test per hostile input reads better than a table (as
//! in `cli_errors.rs`), and the helpers that forge the inputs belong next to them.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cli::{assert_error_line, assert_no_output, command_in, run_in, stderr, write_png};
use common::TempDir;

fn tiny() -> PathBuf {
    common::model("tiny-w0")
}

/// Exit `code`, nothing on stdout, one `error:` line (after any warnings) holding every
/// needle, no panic.
fn assert_error(o: &Output, code: i32, needles: &[&str]) -> String {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    assert_error_line(o, code, needles)
}

/// A PNG with these text chunks (as flux2-klein writes its settings).
fn png_with_metadata(path: &Path, chunks: &[(&str, &str)]) {
    let chunks: Vec<(String, String)> = chunks
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
    flux2_klein::image_io::save_image(path, &img, &chunks).unwrap();
}

/// CRC-32 (ISO-HDLC, PNG's) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites the IHDR of the PNG at `path` to claim `w×h` pixels, with a correct CRC: a tiny
/// file whose decoder would allocate gigabytes.
fn forge_png_size(path: &Path, w: u32, h: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[12..16], b"IHDR");
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// A copy of the tiny model in `dir/name` (links to the fixture's files) whose `component`
/// gets `edit` applied to its `file` (JSON config or safetensors, read from the fixture).
fn model_variant(
    dir: &TempDir,
    name: &str,
    component: &str,
    file: &str,
    edit: &dyn Fn(&Path, &Path),
) -> String {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        let target = root.join(entry.file_name());
        if entry.file_name() != component {
            std::os::unix::fs::symlink(entry.path(), target).unwrap();
            continue;
        }
        std::fs::create_dir_all(&target).unwrap();
        for f in std::fs::read_dir(entry.path()).unwrap() {
            let f = f.unwrap();
            if f.file_name() == file {
                edit(&f.path(), &target.join(file));
            } else {
                std::os::unix::fs::symlink(f.path(), target.join(f.file_name())).unwrap();
            }
        }
    }
    root.display().to_string()
}

/// `model_variant` with one key of a JSON config set to `value` (JSON text).
fn config_variant(dir: &TempDir, name: &str, component: &str, key: &str, value: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(value).unwrap();
    model_variant(dir, name, component, "config.json", &|from, to| {
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(from).unwrap()).unwrap();
        cfg[key] = value.clone();
        std::fs::write(to, cfg.to_string()).unwrap();
    })
}

/// Every failure-path run here goes through `cli::command_in`, which caps its data segment:
/// an allocation sized by untrusted input aborts there (exit 134) rather than succeeding on a
/// big machine. The cap is really applied to the child:
#[test]
fn runs_are_memory_capped() {
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "ulimit -d"]);
    let o = cli::limit_memory(&mut sh).output().unwrap();
    let kib: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert_eq!(kib * 1024, cli::DATA_LIMIT_BYTES);
}

#[test]
fn output_area_is_bounded_before_anything_loads() {
    let dir = TempDir::new("limits-area");
    for (w, h) in [
        ("2064", "2048"),
        ("100000", "100000"),
        ("4294967295", "4294967295"),
    ] {
        let o = run_in(
            dir.path(),
            &["generate", "-p", "x", "-W", w, "-H", h, "-m", "./nope"],
        );
        assert_error(&o, 1, &["is above the 4 MP allowed", "--max-area"]);
    }
    // 2048² is the default ceiling; --max-area raises it (here the missing model is next).
    for args in [
        &["-W", "2048", "-H", "2048"][..],
        &["-W", "4096", "-H", "4096", "--max-area", "16"][..],
    ] {
        let mut all = vec!["generate", "-p", "x", "-m", "./nope"];
        all.extend_from_slice(args);
        let o = run_in(dir.path(), &all);
        assert_error(&o, 1, &["./nope", "does not exist"]);
    }
    assert_no_output(&dir, &[]);
}

#[test]
fn ceilings_of_the_flags_are_usage_errors() {
    let dir = TempDir::new("limits-flags");
    for args in [
        &["generate", "-p", "x", "--steps", "1001"][..],
        &["generate", "-p", "x", "--steps", "4294967295"][..],
        &["generate", "-p", "x", "-n", "100001"][..],
        &["generate", "-p", "x", "-n", "4294967295"][..],
        &["generate", "-p", "x", "--max-area", "65"][..],
        &["generate", "-p", "x", "--max-area", "NaN"][..],
        &["generate", "-p", "x", "--guidance", "NaN"][..],
        &["generate", "-p", "x", "--guidance", "inf"][..],
        &["generate", "-p", "x", "-W", "8"][..],
        &["compare", "a.png", "b.png", "--min-psnr", "NaN"][..],
    ] {
        let o = run_in(dir.path(), args);
        assert_error(&o, 2, &[]);
    }
    assert_no_output(&dir, &[]);
}

#[test]
fn images_and_references_per_run_are_bounded() {
    let dir = TempDir::new("limits-counts");
    std::fs::write(dir.join("two.txt"), "a\nb\n").unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--prompt-file",
            "two.txt",
            "-n",
            "60000",
            "-m",
            "./nope",
        ],
    );
    assert_error(&o, 1, &["120000 images", "100000"]);
    // References are counted before any is read.
    let mut args = vec!["generate", "-p", "x", "-m", "./nope"];
    for _ in 0..11 {
        args.extend_from_slice(&["-r", "missing.png"]);
    }
    let o = run_in(dir.path(), &args);
    assert_error(&o, 1, &["11 reference images", "10 allowed"]);
    assert_no_output(&dir, &["two.txt"]);
}

#[test]
fn prompt_file_values_get_the_flags_checks() {
    let dir = TempDir::new("limits-lines");
    for (line, needles) in [
        (r#"{"prompt": "x", "steps": 5000}"#, &["line 1", "1000"][..]),
        (
            r#"{"prompt": "x", "width": 100000, "height": 100000}"#,
            &["line 1", "--max-area"][..],
        ),
        (
            r#"{"prompt": "x", "guidance": -1}"#,
            &["line 1", "guidance"][..],
        ),
        (r#"{"prompt": "x", "width": 8}"#, &["line 1", "16"][..]),
    ] {
        std::fs::write(dir.join("p.jsonl"), format!("{line}\n")).unwrap();
        let o = run_in(
            dir.path(),
            &["generate", "--prompt-file", "p.jsonl", "-m", "./nope"],
        );
        assert_error(&o, 1, needles);
    }
    assert_no_output(&dir, &["p.jsonl"]);
}

#[test]
fn metadata_values_get_the_flags_checks() {
    let dir = TempDir::new("limits-metadata");
    for (key, value, needle) in [
        ("guidance", "NaN", "guidance"),
        ("guidance", "-1", "guidance"),
        ("guidance", "inf", "guidance"),
        ("steps", "5000", "1000"),
        ("steps", "4294967300", "1000"),
        ("size", "4294967312x16", "--max-area"),
        ("size", "100000x100000", "--max-area"),
        ("size", "8x8", "16"),
    ] {
        png_with_metadata(&dir.join("made.png"), &[("prompt", "x"), (key, value)]);
        let o = run_in(
            dir.path(),
            &[
                "generate",
                "--config-from-metadata",
                "made.png",
                "-m",
                "./nope",
            ],
        );
        assert_error(&o, 1, &["--config-from-metadata made.png", needle]);
    }
    assert_no_output(&dir, &["made.png"]);
}

#[test]
fn outputs_of_any_multiple_of_16() {
    let dir = TempDir::new("limits-sides");
    let m = tiny().display().to_string();
    for (w, h) in [(80u32, 48u32), (16, 16)] {
        let out = format!("{w}x{h}.png");
        let o = run_in(
            dir.path(),
            &[
                "-q",
                "generate",
                "-p",
                "x",
                "--seed",
                "1",
                "-m",
                &m,
                "-W",
                &w.to_string(),
                "-H",
                &h.to_string(),
                "-o",
                &out,
            ],
        );
        assert!(o.status.success(), "{w}x{h}: {}", stderr(&o));
        let img = image::open(dir.join(&out)).unwrap();
        assert_eq!((img.width(), img.height()), (w, h));
    }
}

#[test]
fn hostile_model_configs_are_clear_errors() {
    let dir = TempDir::new("limits-configs");
    for (i, (component, key, value, needle)) in [
        ("transformer", "in_channels", "1000000000", "in_channels"),
        (
            "transformer",
            "timestep_guidance_channels",
            "100000000000",
            "timestep_guidance_channels",
        ),
        (
            "transformer",
            "axes_dims_rope",
            "[18446744073709551615, 1, 4, 4]",
            "overflows",
        ),
        (
            "transformer",
            "axes_dims_rope",
            "[4, 4, 4, 2]",
            "attention_head_dim",
        ),
        ("transformer", "num_layers", "0", "num_layers"),
        ("transformer", "eps", "-1", "eps"),
        ("vae", "latent_channels", "1000000000", "latent_channels"),
        ("vae", "layers_per_block", "1000000", "layers_per_block"),
        ("text_encoder", "hidden_size", "1000000000", "hidden_size"),
        (
            "text_encoder",
            "num_hidden_layers",
            "0",
            "num_hidden_layers",
        ),
        // Valid alone, but not with the tiny transformer (in_channels 16 = 4 × 2 × 2).
        ("vae", "latent_channels", "8", "do not belong together"),
    ]
    .into_iter()
    .enumerate()
    {
        let m = config_variant(&dir, &format!("m{i}"), component, key, value);
        let o = run_in(
            dir.path(),
            &[
                "generate", "-p", "x", "-W", "64", "-H", "64", "-m", &m, "-o", "out.png",
            ],
        );
        assert_error(&o, 1, &[needle]);
        assert!(!dir.join("out.png").exists());
    }
}

#[test]
fn forged_image_headers_are_refused_before_allocation() {
    let dir = TempDir::new("limits-forged");
    write_png(&dir.join("forged.png"), 64, 64);
    forge_png_size(&dir.join("forged.png"), 60000, 60000);
    png_with_metadata(&dir.join("meta.png"), &[("prompt", "x")]);
    forge_png_size(&dir.join("meta.png"), 60000, 60000);
    write_png(&dir.join("ok.png"), 64, 64);
    let o = run_in(
        dir.path(),
        &["generate", "-p", "x", "-r", "forged.png", "-m", "./nope"],
    );
    assert_error(&o, 1, &["forged.png", "60000x60000", "16384", "shrink it"]);
    let o = run_in(dir.path(), &["compare", "ok.png", "forged.png"]);
    assert_error(&o, 2, &["forged.png", "60000x60000", "16384"]);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "meta.png",
            "-m",
            "./nope",
        ],
    );
    // The settings are read without decoding the pixels: the forged size costs nothing, and
    // the run goes on to the (missing) model.
    assert_error(&o, 1, &["./nope", "does not exist"]);
    assert_no_output(&dir, &["forged.png", "meta.png", "ok.png"]);
}

#[test]
fn only_regular_files_are_read() {
    let dir = TempDir::new("limits-files");
    let made = Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::create_dir(dir.join("folder")).unwrap();
    write_png(&dir.join("ok.png"), 64, 64);
    for (args, code, needles) in [
        (
            &["generate", "-p", "x", "-r", "fifo", "-m", "./nope"][..],
            1,
            &["fifo", "not a regular file"][..],
        ),
        (
            &["generate", "-p", "x", "-r", "/dev/zero", "-m", "./nope"][..],
            1,
            &["/dev/zero", "not a regular file"][..],
        ),
        (
            &["generate", "--prompt-file", "fifo", "-m", "./nope"][..],
            1,
            &["fifo", "not a regular file"][..],
        ),
        (
            &["generate", "--prompt-file", "/dev/zero", "-m", "./nope"][..],
            1,
            &["/dev/zero", "not a regular file"][..],
        ),
        (
            &["generate", "--prompt-file", "folder", "-m", "./nope"][..],
            1,
            &["folder", "directory"][..],
        ),
        (
            &["generate", "--config-from-metadata", "fifo", "-m", "./nope"][..],
            1,
            &["fifo", "not a regular file"][..],
        ),
        (
            &["compare", "ok.png", "fifo"][..],
            2,
            &["fifo", "not a regular file"][..],
        ),
        (
            &["compare", "/dev/zero", "ok.png"][..],
            2,
            &["/dev/zero", "not a regular file"][..],
        ),
        (
            &["compare", "folder", "ok.png"][..],
            2,
            &["folder", "directory"][..],
        ),
    ] {
        let o = run_in(dir.path(), args);
        assert_error(&o, code, needles);
    }
    assert_no_output(&dir, &["fifo", "folder", "ok.png"]);
}

#[test]
fn unwritable_stderr_does_not_abort_a_run() {
    let dir = TempDir::new("limits-devfull");
    let m = tiny().display().to_string();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    // -v logs every stage: each line is lost, the image is still written.
    let o = command_in(
        dir.path(),
        &[
            "-v", "generate", "-p", "x", "--seed", "1", "-m", &m, "-W", "64", "-H", "64", "-o",
            "a.png",
        ],
    )
    .stderr(Stdio::from(full()))
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "a.png");
    assert!(dir.join("a.png").exists());
    // A failure still exits 1 (not an abort) when its error line cannot be written.
    let o = command_in(
        dir.path(),
        &["generate", "-p", "x", "-m", "./nope", "-o", "b.png"],
    )
    .stderr(Stdio::from(full()))
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    // And so does a usage error.
    let o = command_in(dir.path(), &["generate", "--bogus"])
        .stderr(Stdio::from(full()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_no_output(&dir, &["a.png"]);
}

#[test]
fn readme_batch_example_creates_its_output_directory() {
    let dir = TempDir::new("limits-readme");
    let m = tiny().display().to_string();
    let o = common::output_with_stdin(
        &mut command_in(
            dir.path(),
            &[
                "-q",
                "generate",
                "--prompt-file",
                "-",
                "-n",
                "2",
                "--seed",
                "100",
                "-o",
                "out/{index}-{seed}.png",
                "-m",
                &m,
                "-W",
                "64",
                "-H",
                "64",
            ],
        ),
        b"a red fox in snow\na lighthouse at dusk\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut made: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(made, ["1-100.png", "2-101.png", "3-100.png", "4-101.png"]);
}

#[test]
fn compare_exit_codes_and_verdicts() {
    let dir = TempDir::new("limits-compare");
    write_png(&dir.join("a.png"), 64, 64);
    write_png(&dir.join("small.png"), 32, 32);
    let mut near = image::RgbImage::from_pixel(64, 64, image::Rgb([120, 60, 30]));
    near.put_pixel(3, 3, image::Rgb([121, 60, 30]));
    near.save(dir.join("near.png")).unwrap();
    std::fs::write(dir.join("text.png"), "not an image").unwrap();
    let compare = |args: &[&str]| {
        let mut all = vec!["compare"];
        all.extend_from_slice(args);
        all.push("--json");
        let o = run_in(dir.path(), &all);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: one JSON record ({e}): {o:?}"));
        (
            o.status.code(),
            v["verdict"].as_str().unwrap().to_string(),
            v,
        )
    };
    let (code, verdict, _) = compare(&["a.png", "a.png"]);
    assert_eq!((code, verdict.as_str()), (Some(0), "same"));
    let (code, verdict, _) = compare(&["a.png", "near.png", "--max-diff", "1"]);
    assert_eq!((code, verdict.as_str()), (Some(0), "within"));
    let (code, verdict, v) = compare(&["a.png", "near.png"]);
    assert_eq!((code, verdict.as_str()), (Some(1), "differs"));
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("max channel difference 1 > 0"));
    for args in [
        ["a.png", "missing.png"],
        ["a.png", "text.png"],
        ["a.png", "small.png"],
    ] {
        let (code, verdict, v) = compare(&args);
        assert_eq!((code, verdict.as_str()), (Some(2), "error"), "{args:?}");
        assert!(v["message"].as_str().unwrap().contains(args[1]) || args[1] == "small.png");
    }
    // Without --json: the summary on stdout for a comparison, nothing for trouble.
    let o = run_in(dir.path(), &["compare", "a.png", "small.png"]);
    assert_error(&o, 2, &["differ in size"]);
}

/// The tiny model with one tensor of `component`'s weights made NaN.
fn nan_variant(dir: &TempDir, name: &str, component: &str, file: &str, key: &str) -> String {
    let key = key.to_string();
    model_variant(dir, name, component, file, &move |from, to| {
        let mut tensors = candle_core::safetensors::load(from, &candle_core::Device::Cpu).unwrap();
        let t = &tensors[&key];
        let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
        tensors.insert(key.clone(), nan);
        candle_core::safetensors::save(&tensors, to).unwrap();
    })
}

#[test]
fn non_finite_results_name_their_stage() {
    let dir = TempDir::new("limits-nan");
    for (component, file, key, needles) in [
        (
            "transformer",
            "diffusion_pytorch_model.safetensors",
            "proj_out.weight",
            &["denoise", "NaN"][..],
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            "decoder.conv_out.bias",
            &["VAE decode", "NaN"][..],
        ),
    ] {
        let m = nan_variant(&dir, component, component, file, key);
        let o = run_in(
            dir.path(),
            &[
                "-q", "generate", "-p", "x", "--seed", "1", "-W", "64", "-H", "64", "-m", &m, "-o",
                "out.png",
            ],
        );
        assert_error(&o, 1, needles);
        assert!(!dir.join("out.png").exists());
    }
}
