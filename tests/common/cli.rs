//! Helpers for the tests that run the `flux2-klein` binary on its failure paths: a clean,
//! offline model environment, and the checks every failure must pass. Included with
//! `#[path = "common/cli.rs"] mod cli;` (only integration tests know the binary's path).

use std::path::Path;
use std::process::{Command, Output};

use super::common::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_flux2-klein");

/// Fails clearly when `BIN` is not this CLI (a target directory shared between checkouts can
/// hold another checkout's build of the same binary).
fn check_binary() {
    let o = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("running flux2-klein");
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(
        v.starts_with("flux2-klein "),
        "{BIN} is not the flux2-klein CLI (`--version` printed {v:?}); rebuild it"
    );
}

/// The data (heap and anonymous memory) a run through [`command_in`] may use. The tiny models
/// need a few hundred MiB; an allocation sized by untrusted input (a forged image header, a
/// config's `in_channels`, `-W 16384`) needs far more, so it aborts the child (exit 134)
/// instead of passing unnoticed on a machine with memory to spare.
pub const DATA_LIMIT_BYTES: u64 = 4 << 30;

/// Caps `cmd`'s data segment at [`DATA_LIMIT_BYTES`] (`RLIMIT_DATA`, which counts what is
/// written, not the address space reserved for thread stacks and malloc arenas).
pub fn limit_memory(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: DATA_LIMIT_BYTES as libc::rlim_t,
                rlim_max: DATA_LIMIT_BYTES as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The binary in `dir` with a clean model environment (no `FLUX2_KLEIN_MODEL`, an empty
/// offline HF cache in `dir/.hf-home`) so that nothing can reach the network or a real model,
/// and its memory capped ([`limit_memory`]).
pub fn command_in(dir: &Path, args: &[&str]) -> Command {
    check_binary();
    let hf_home = dir.join(".hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("FLUX2_KLEIN_MODEL")
        .env_remove("HF_TOKEN")
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1");
    limit_memory(&mut cmd);
    cmd
}

/// Runs [`command_in`].
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    command_in(dir, args).output().expect("running flux2-klein")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure: exit `code`, nothing on stdout, exactly one `error:` line (warnings may
/// precede it) that contains every needle; returns that line.
pub fn assert_error_line(o: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit status; stderr:\n{err}");
    assert!(
        o.stdout.is_empty(),
        "stdout must stay empty on failure: {:?}",
        o.stdout
    );
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("warning: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{n:?} missing from: {line}");
    }
    line.to_string()
}

/// Only the temp HF home (created by [`command_in`]) and the given inputs may be in `dir`.
pub fn assert_no_output(dir: &TempDir, inputs: &[&str]) {
    let mut expected: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    expected.push(".hf-home".into());
    expected.sort();
    assert_eq!(
        dir.entries(),
        expected,
        "no output or temp file may be left"
    );
}

/// A plain `w`×`h` PNG.
pub fn write_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([120, 60, 30]))
        .save(path)
        .unwrap();
}
