//! Atomic output files: each image is written to a temp file next to its output and renamed
//! over it, so a reader never sees a partial image and a failed run leaves nothing.
//!
//! The temp file is `.{name}.flux2-klein-tmp-{pid}-{random}` in the output's directory (the
//! same file system, so the rename is atomic; hidden). It is created exclusively (`O_EXCL`:
//! never through a symlink or over another file, so a planted link cannot redirect the
//! write), with a random suffix nobody can guess ahead. A run killed before its rename
//! (SIGKILL, a power cut) leaves one behind: the name carries the pid, so the next run over
//! the same output removes those whose process is gone ([`remove_stale_temp_files`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What sits between the output's name and the pid in its temp files' names.
const TEMP_TAG: &str = ".flux2-klein-tmp-";

/// `path`'s directory (`.` for a bare file name) and file name.
fn dir_and_name(path: &Path) -> (&Path, String) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    (dir, name)
}

/// The start of the names of `path`'s temp files: `.{name}.flux2-klein-tmp-`.
fn temp_prefix(path: &Path) -> (PathBuf, String) {
    let (dir, name) = dir_and_name(path);
    (dir.to_path_buf(), format!(".{name}{TEMP_TAG}"))
}

/// A fresh temp path for `path`: `.{name}.flux2-klein-tmp-{pid}-{16 random hex digits}` in its
/// directory.
pub fn temp_path_for(path: impl AsRef<Path>) -> PathBuf {
    let (dir, prefix) = temp_prefix(path.as_ref());
    dir.join(format!(
        "{prefix}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Creates a new temp file for `path` exclusively (`O_EXCL`: it fails on any existing entry,
/// a symlink included, instead of following it), with a fresh random name on a clash.
pub fn create_temp_file(path: impl AsRef<Path>) -> std::io::Result<(File, PathBuf)> {
    let path = path.as_ref();
    let mut last = None;
    for _ in 0..8 {
        let tmp = temp_path_for(path);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("eight attempts"))
}

/// Whether the process `pid` may still be running: on Linux, its `/proc` entry; elsewhere
/// (no procfs) every process counts as alive, so only old files are removed.
fn may_be_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// How old a temp file must be to be removed where the pid cannot be checked.
const STALE_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes the temp files of `path` that an earlier run left (killed before its rename):
/// entries named `.{name}.flux2-klein-tmp-{pid}-…` whose process is gone (or, without
/// `/proc`, older than a day). Only files and symlinks are removed (a link itself, never its
/// target). Returns the paths removed.
pub fn remove_stale_temp_files(path: impl AsRef<Path>) -> Vec<PathBuf> {
    let (dir, prefix) = temp_prefix(path.as_ref());
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            continue;
        }
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > STALE_AGE);
        if (!may_be_alive(pid) || (old && pid != std::process::id()))
            && fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

/// Writes `bytes` to `path` through a temp file ([`create_temp_file`]) and a rename. An
/// existing file at `path` keeps its permissions (the new file gets them before the rename);
/// on any failure the temp file is removed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.file_name().is_none() {
        bail!("cannot write {}: not a file path", path.display());
    }
    let (file, tmp) =
        create_temp_file(path).with_context(|| format!("cannot write {}", path.display()))?;
    let result = (|| -> Result<()> {
        let mut w = BufWriter::new(file);
        w.write_all(bytes)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        if let Ok(existing) = fs::metadata(path) {
            file.set_permissions(existing.permissions())?;
        }
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_are_exclusive_and_stale_ones_go() {
        let dir = std::env::temp_dir().join(format!("flux2-klein-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("a.png");
        let (a, b) = (temp_path_for(&out), temp_path_for(&out));
        assert_ne!(a, b, "random suffixes");
        let name = a.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with(".a.png.flux2-klein-tmp-"), "{name}");
        // A dead pid's file goes, a live one's (ours) and other names stay.
        let dead = dir.join(format!(".a.png{TEMP_TAG}{}-00", u32::MAX - 1));
        let ours = dir.join(format!(".a.png{TEMP_TAG}{}-00", std::process::id()));
        let other = dir.join(format!(".b.png{TEMP_TAG}{}-00", u32::MAX - 1));
        for p in [&dead, &ours, &other] {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temp_files(&out), vec![dead.clone()]);
        assert!(ours.exists() && other.exists() && !dead.exists());
        // Replacing keeps the mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::write(&out, b"old").unwrap();
            fs::set_permissions(&out, fs::Permissions::from_mode(0o600)).unwrap();
            write_atomically(&out, b"new").unwrap();
            assert_eq!(fs::read(&out).unwrap(), b"new");
            let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
