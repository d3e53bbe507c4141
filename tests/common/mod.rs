//! Helpers shared by the tests (and `benches/models.rs`): fixture paths, case tensors, error
//! metrics, JSON integer arrays and a self-removing temporary directory.
#![allow(dead_code)]

pub mod foundation;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Runs `cmd` with `input` written to its stdin (then closed) and its stdout and stderr
/// captured.
pub fn output_with_stdin(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running flux2-klein");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .expect("writing stdin");
    child.wait_with_output().expect("waiting for flux2-klein")
}

/// `tests/fixtures` of this checkout.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tiny diffusers-made model directory, e.g. `model("tiny-w0")`.
pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A refcheck case directory, e.g. `case_dir("t2i_64x64")`.
pub fn case_dir(name: &str) -> PathBuf {
    fixtures().join("cases").join(name)
}

/// Every tensor recorded by diffusers for a case (floats in the case's compute dtype, ids i64,
/// image u8).
pub fn case_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = case_dir(name).join("tensors.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// `case.json` of a case.
pub fn case_json(name: &str) -> serde_json::Value {
    let path = case_dir(name).join("case.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference tensor's largest magnitude.
pub fn max_rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let a = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = reference
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(f32::MIN_POSITIVE)
}

/// Asserts `max_rel_err(ours, reference) <= tol`, naming the tensor.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let err = max_rel_err(ours, reference);
    eprintln!("{name}: max rel err {err:.3e} (tol {tol:.0e})");
    assert!(err <= tol, "{name}: max rel err {err:.3e} > {tol:.0e}");
}

/// A JSON array of non-negative integers (a shape, token ids, f32 bit patterns).
pub fn json_uints<T>(v: &serde_json::Value) -> Vec<T>
where
    T: TryFrom<u64>,
    T::Error: std::fmt::Debug,
{
    v.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {v}"))
        .iter()
        .map(|x| T::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// A fresh, empty directory for one test (removed when dropped).
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMPDIR/flux2-klein-test-NAME-PID`, emptied if a previous run left it behind.
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("flux2-klein-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }

    /// Keeps the directory after the test (for a file the caller reads after this helper's
    /// scope ends) and returns its path.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }

    /// Names of the entries in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Empty after `keep`.
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The value of text chunk `k` among a PNG's `chunks` (`image_io::png_text_chunks`).
pub fn text_chunk<'a>(chunks: &'a [(String, String)], k: &str) -> Option<&'a str> {
    chunks
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}
