//! The binary's scripting contract under hostile conditions (issue #23, part A): the memory
//! estimate, signals, temp files, output collisions, inputs read once, control characters,
//! prompt-file paths and escapes, and the peer aliases. Every run checks its exit status, the
//! key words on stderr, that nothing panicked and that no output or temp file is left where
//! none may be.

#![cfg(unix)]

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{assert_error_line, assert_no_output, command_in, run_in, stderr, write_png, BIN};
use common::TempDir;

fn tiny() -> String {
    common::model("tiny-w0").display().to_string()
}

/// A failure: exit `code`, one `error:` line with every needle, no panic.
fn assert_error(o: &Output, code: i32, needles: &[&str]) -> String {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    assert_error_line(o, code, needles)
}

fn assert_success(o: &Output) {
    let err = stderr(o);
    assert!(o.status.success(), "exit {:?}; stderr:\n{err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
}

/// The hidden temp files in `dir` (`.NAME.flux2-klein-tmp-…`).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".flux2-klein-tmp-"))
        .collect()
}

/// Runs `cmd` to its end, or kills it after `limit` and fails: nothing may hang.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

// --- 1. The memory estimate. ---

#[test]
fn a_request_that_cannot_fit_is_refused_before_loading() {
    let dir = TempDir::new("hard-memory");
    // 8192² on the CPU: 262 656 tokens, whose f32 attention scores alone (one head at a
    // time) take 2 × 257 GiB.
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "x",
            "-m",
            &tiny(),
            "-W",
            "8192",
            "-H",
            "8192",
            "--max-area",
            "64",
            "--steps",
            "1",
            "--seed",
            "1",
            "-o",
            "big.png",
        ],
    );
    let line = assert_error(
        &o,
        1,
        &[
            "not enough memory",
            "attention scores at 8192×8192",
            "CPU has",
            "smaller --width/--height",
        ],
    );
    assert!(!line.contains("GPU"), "{line}");
    assert!(
        !stderr(&o).contains("load transformer"),
        "refused before any weights load:\n{}",
        stderr(&o)
    );
    assert_no_output(&dir, &[]);
}

// --- 2. Signals. ---

/// Starts a slow batch, waits for its first image, sends `signal` and returns (the output,
/// the images written).
fn interrupt_batch(name: &str, signal: &str) -> (Output, Vec<String>, TempDir) {
    let dir = TempDir::new(name);
    let mut cmd = command_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "x",
            "-m",
            &tiny(),
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "40",
            "-n",
            "100",
            "--resident",
            "--seed",
            "1",
            "-o",
            "out/{index}.png",
        ],
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.trim_end().ends_with("001.png"), "{first:?}");
    let killed = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    let mut printed: Vec<String> = std::iter::once(first)
        .chain(rest.lines().map(str::to_string))
        .map(|l| l.trim_end().to_string())
        .collect();
    printed.sort();
    (o, printed, dir)
}

#[test]
fn sigterm_and_sigint_stop_between_images_and_keep_the_finished_ones() {
    for (signal, code) in [("-TERM", 143), ("-INT", 130)] {
        let (o, printed, dir) = interrupt_batch(&format!("hard-signal{code}"), signal);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{signal}; stderr:\n{err}");
        assert!(
            !err.contains("panicked") && !err.contains("error:"),
            "{err}"
        );
        let last = err.lines().last().unwrap();
        let k = printed.len();
        assert!((1..100).contains(&k), "{k} images");
        assert_eq!(
            last,
            format!("interrupted after {k} of 100 images"),
            "{err}"
        );
        // Exactly the images printed are on disk, whole; no temp file.
        let out = dir.join("out");
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| format!("out/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        files.sort();
        assert_eq!(files, printed);
        for f in &files {
            image::open(dir.join(f)).unwrap();
        }
        assert!(temp_files(&out).is_empty());
    }
}

// --- 3. Temp files. ---

#[test]
fn temp_files_are_exclusive_stale_ones_go_and_modes_stay() {
    let dir = TempDir::new("hard-temp");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    // An existing output with mode 0600, and the leftovers of killed runs: a dead pid's temp
    // file and a dead pid's planted link (removed, the link itself), a live pid's link (kept).
    let out = dir.join("same.png");
    write_png(&out, 16, 16);
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dead = ".same.png.flux2-klein-tmp-4294967294-0123456789abcdef";
    std::fs::write(dir.join(dead), b"partial").unwrap();
    let dead_link = ".same.png.flux2-klein-tmp-4294967293-00";
    std::os::unix::fs::symlink(&victim, dir.join(dead_link)).unwrap();
    let live_link = ".same.png.flux2-klein-tmp-1-00";
    std::os::unix::fs::symlink(&victim, dir.join(live_link)).unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "x",
            "-m",
            &tiny(),
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "1",
            "-o",
            "same.png",
        ],
    );
    assert_success(&o);
    assert!(
        stderr(&o).contains("left by an earlier run that was killed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(temp_files(dir.path()), vec![live_link.to_string()]);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "replacing keeps the permissions");
    assert_eq!(image::open(&out).unwrap().width(), 64, "replaced");
}

// --- 4. Output collisions. ---

#[test]
fn outputs_collide_by_the_file_they_name() {
    let dir = TempDir::new("hard-collide");
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink(dir.join("sub"), dir.join("link")).unwrap();
    let abs = dir.join("sub/same.png").display().to_string();
    for second in [
        "./sub/same.png",
        "sub/../sub/same.png",
        abs.as_str(),
        "link/same.png",
    ] {
        let prompts = format!(
            "{{\"prompt\": \"a\", \"output\": \"sub/same.png\"}}\n{{\"prompt\": \"b\", \"output\": \"{second}\"}}\n"
        );
        std::fs::write(dir.join("p.txt"), prompts).unwrap();
        let o = run_in(
            dir.path(),
            &["generate", "--prompt-file", "p.txt", "-m", &tiny()],
        );
        assert_error(&o, 1, &["images 1 and 2 of 2", "same file", second]);
        assert!(
            std::fs::read_dir(dir.join("sub")).unwrap().next().is_none(),
            "{second}"
        );
    }
}

#[test]
fn every_output_of_a_batch_is_checked_before_any_work() {
    let dir = TempDir::new("hard-outdir");
    std::fs::create_dir(dir.join("second.png")).unwrap();
    std::fs::write(
        dir.join("p.txt"),
        "{\"prompt\": \"a\", \"output\": \"first.png\"}\n{\"prompt\": \"b\", \"output\": \"second.png\"}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "p.txt", "-m", &tiny()],
    );
    assert_error(&o, 1, &["second.png is a directory"]);
    assert!(!dir.join("first.png").exists(), "line 1 must not run");
    assert!(!stderr(&o).contains("encode prompt"), "{}", stderr(&o));
}

// --- 5. Inputs read once. ---

#[test]
fn a_reference_is_read_once_and_a_pipe_is_refused_not_waited_on() {
    let dir = TempDir::new("hard-once");
    write_png(&dir.join("ref.png"), 64, 64);
    // `<(…)`: a pipe, refused before it is opened.
    let mut bash = Command::new("bash");
    bash.args([
        "-c",
        &format!(
            "exec \"$0\" generate -p x -m {} -r <(cat ref.png) -o o.png",
            tiny()
        ),
        BIN,
    ])
    .current_dir(dir.path())
    .env_remove("FLUX2_KLEIN_MODEL")
    .env("HF_HUB_OFFLINE", "1");
    let o = output_within(bash, Duration::from_secs(60));
    assert_error(&o, 1, &["/dev/fd/", "not a regular file", "--ref"]);
    assert!(!dir.join("o.png").exists());
    // A regular file: the recorded SHA-256 is the hash of the bytes decoded.
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "x",
            "-m",
            &tiny(),
            "-r",
            "ref.png",
            "--steps",
            "1",
            "--json",
            "-o",
            "o.png",
        ],
    );
    assert_success(&o);
    let record: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(dir.join("ref.png")).unwrap();
    assert_eq!(
        record["references_sha256"][0],
        flux2_klein::image_io::sha256_hex(&bytes).as_str()
    );
    // A recorded reference that is now a FIFO: refused, never opened (opening would block).
    std::fs::remove_file(dir.join("ref.png")).unwrap();
    assert!(Command::new("mkfifo")
        .arg(dir.join("ref.png"))
        .status()
        .unwrap()
        .success());
    let cmd = command_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "o.png",
            "-o",
            "again.png",
            "-m",
            &tiny(),
        ],
    );
    let o = output_within(cmd, Duration::from_secs(60));
    assert_error(&o, 1, &["ref.png", "not a regular file"]);
    assert!(!dir.join("again.png").exists());
}

// --- 6. Control characters. ---

#[test]
fn control_characters_from_files_and_paths_are_escaped() {
    let dir = TempDir::new("hard-escape");
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let chunks = vec![
        ("prompt".to_string(), format!("x{evil}")),
        ("seed".to_string(), "1".to_string()),
        ("model".to_string(), format!("evil{evil}")),
    ];
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
    flux2_klein::image_io::save_image(dir.join("evil.png"), &img, &chunks).unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--config-from-metadata",
            "evil.png",
            "-m",
            "./nope",
            "-r",
            "a\u{1b}[2Jb.png",
        ],
    );
    let err = stderr(&o);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");
    assert!(err.contains("evil\\x1b]0;pwned\\x07\\x1b[2J"), "{err}");
    assert_error(&o, 1, &["a\\x1b[2Jb.png", "does not exist"]);
}

// --- 7. Prompt files. ---

#[test]
fn prompt_file_paths_escapes_and_origins() {
    let dir = TempDir::new("hard-prompts");
    std::fs::create_dir(dir.join("batch")).unwrap();
    write_png(&dir.join("batch/ref.png"), 64, 64);
    std::fs::write(
        dir.join("batch/p.txt"),
        "\\#1 fan\n{\"prompt\": \"y\", \"ref\": [\"ref.png\"], \"output\": \"o-{index}.png\"}\n  \\{curly}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "--prompt-file",
            "batch/p.txt",
            "-m",
            &tiny(),
            "--steps",
            "1",
            "-W",
            "64",
            "-H",
            "64",
            "--seed",
            "3",
            "--json",
            "-o",
            "top-{index}.png",
        ],
    );
    assert_success(&o);
    let records: Vec<serde_json::Value> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let prompts: Vec<&str> = records
        .iter()
        .map(|r| r["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["#1 fan", "y", "  {curly}"]);
    // The line's paths are relative to the prompt file; --output stays the caller's.
    assert_eq!(records[1]["path"], "batch/o-2.png");
    assert_eq!(records[1]["references"][0], "batch/ref.png");
    assert!(dir.join("batch/o-2.png").exists() && dir.join("top-1.png").exists());
    // A missing reference names the file and line it came from.
    std::fs::write(
        dir.join("batch/bad.txt"),
        "a\n{\"prompt\": \"b\", \"ref\": [\"gone.png\"]}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "batch/bad.txt", "-m", &tiny()],
    );
    assert_error(
        &o,
        1,
        &[
            "batch/gone.png",
            "line 2 of batch/bad.txt",
            "that file's directory",
        ],
    );
    // So does an init image's.
    std::fs::write(
        dir.join("batch/init.txt"),
        "{\"prompt\": \"b\", \"init_image\": \"gone.png\"}\n",
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["generate", "--prompt-file", "batch/init.txt", "-m", &tiny()],
    );
    assert_error(
        &o,
        1,
        &[
            "init image batch/gone.png does not exist",
            "line 1 of batch/init.txt",
        ],
    );
}

// --- 8. Peer aliases. ---

#[test]
fn cfg_scale_ref_image_and_a_random_seed_of_minus_one() {
    let dir = TempDir::new("hard-alias");
    write_png(&dir.join("ref.png"), 100, 70);
    let o = run_in(
        dir.path(),
        &[
            "generate",
            "-p",
            "x",
            "-m",
            &tiny(),
            "--cfg-scale",
            "1.5",
            "--ref-image",
            "ref.png",
            "--seed",
            "-1",
            "--steps",
            "1",
            "--json",
            "-o",
            "o.png",
        ],
    );
    assert_success(&o);
    let record: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(record["guidance"], 1.5);
    assert_eq!(record["references"][0], "ref.png");
    assert_eq!(
        (record["width"].as_u64(), record["height"].as_u64()),
        (Some(96), Some(64))
    );
    let seed = record["seed"].as_u64().unwrap();
    let err = stderr(&o);
    assert!(err.contains(&format!("seed {seed}")), "printed: {err}");
    assert!(err.contains("reference ref.png: 100×70 → 96×64"), "{err}");
    let text = flux2_klein::image_io::read_png_text(dir.join("o.png")).unwrap();
    assert!(
        text.contains(&("seed".to_string(), seed.to_string())),
        "recorded: {text:?}"
    );
    // Other negative seeds are a usage error.
    let o = run_in(
        dir.path(),
        &["generate", "-p", "x", "--seed", "-2", "-m", "./nope"],
    );
    assert_error(&o, 2, &["-1 for a random one"]);
}
