//! Reference images: decoded and checked (the library's `check_reference_size`, diffusers'
//! `check_image_input`, spec §4) before any model loads, so a bad file fails in milliseconds.
//! This file adds only what a command line needs: file-system checks, where the path came
//! from, and what to do about it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use flux2_klein::image_io::{
    check_reference_size, load_image_hashed, prepared_reference_size, reference_resize_target,
    ReferenceSizeError,
};
use flux2_klein::limits::TooLargeToDecode;
use flux2_klein::pipeline::Reference;

use super::progress::Reporter;

/// The number of references FLUX.2 [klein] was trained with; more still run.
pub const TRAINED_MAX_REFS: usize = 4;

/// Where a reference path came from, for the advice in messages.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// `-r/--ref`.
    Flag,
    /// The `"ref"` list on a line of a prompt file.
    PromptFile { file: &'a Path, line: usize },
    /// The references recorded in a PNG (`--config-from-metadata`).
    Metadata { png: &'a Path },
}

impl Origin<'_> {
    /// What to check when the path is wrong.
    fn check_the_path(self) -> String {
        match self {
            Origin::Flag => "check the path given to --ref".into(),
            Origin::PromptFile { file, line } => format!(
                "check the \"ref\" paths on line {line} of {} (relative to that file's directory)",
                file.display()
            ),
            Origin::Metadata { png } => format!(
                "it is recorded in {} relative to the directory that run started in; run from \
                 there, or pass --ref",
                png.display()
            ),
        }
    }
}

/// Decodes and validates every reference, in order.
pub fn load_references(paths: &[PathBuf]) -> Result<Vec<Reference>> {
    paths
        .iter()
        .map(|p| load_reference(p, Origin::Flag).map(|(r, _)| r))
        .collect()
}

/// Decodes and validates one reference, and hashes the bytes it was decoded from (the file
/// is read once).
pub fn load_reference(path: &Path, origin: Origin) -> Result<(Reference, String)> {
    let name = path.display().to_string();
    if !path.exists() {
        bail!(
            "reference image {name} does not exist — {}",
            origin.check_the_path()
        );
    }
    if path.is_dir() {
        bail!(
            "reference {name} is a directory — {}",
            match origin {
                Origin::Flag => "pass an image file to --ref".to_string(),
                other => other.check_the_path(),
            }
        );
    }
    // The library's decoder: content sniffing (a mis-named file still decodes, as in PIL),
    // Pillow's JPEG pixels, the EXIF orientation applied as diffusers' `load_image` does.
    let (image, sha256) = load_image_hashed(path).map_err(|e| {
        let cause = e.root_cause();
        let fix = if cause.is::<TooLargeToDecode>() {
            "shrink it first"
        } else if !path.is_file() {
            // A FIFO, a device: the library's message says so.
            return anyhow!(
                "reference image {name}: {cause} ({})",
                origin.check_the_path()
            );
        } else {
            "use a PNG, JPEG or WebP file"
        };
        anyhow!("cannot decode reference image {name} ({cause}) — {fix}")
    })?;
    check_reference_size(image.width(), image.height()).map_err(|e| {
        let fix = match e.downcast_ref::<ReferenceSizeError>() {
            Some(ReferenceSizeError::TooSmall { .. }) => "upscale it first",
            _ => "crop it first",
        };
        anyhow!("reference image {name}: {e} — {fix}")
    })?;
    let reference = Reference {
        image: std::sync::Arc::new(image),
        name,
    };
    Ok((reference, sha256))
}

/// The distinct reference files of a run, each decoded, checked and hashed (for the
/// metadata) once.
#[derive(Default)]
pub struct Loaded {
    by_path: HashMap<PathBuf, Reference>,
    /// SHA-256 of each file's content, by reference name.
    pub sha256: HashMap<String, String>,
}

impl Loaded {
    /// Loads `path` unless it is loaded already, saying when the pipeline will resize or crop
    /// it.
    pub fn add(&mut self, path: &Path, origin: Origin, reporter: &Reporter) -> Result<()> {
        if !self.by_path.contains_key(path) {
            let (reference, hash) = load_reference(path, origin)?;
            report_preparation(&reference, reporter);
            self.sha256.insert(reference.name.clone(), hash);
            self.by_path.insert(path.to_path_buf(), reference);
        }
        Ok(())
    }

    /// The loaded references of `paths` (each [`add`](Self::add)ed before), sharing their
    /// images.
    pub fn get(&self, paths: &[PathBuf]) -> Vec<Reference> {
        paths.iter().map(|p| self.by_path[p].clone()).collect()
    }
}

/// What the pipeline will do to a reference before encoding it (spec §4), when it changes the
/// image: the size (and so, for the first reference, the default output size) would otherwise
/// change without a word.
fn report_preparation(reference: &Reference, reporter: &Reporter) {
    let (w, h) = (reference.image.width(), reference.image.height());
    let (pw, ph) = prepared_reference_size(w, h);
    if (pw, ph) == (w, h) {
        return;
    }
    let how = if reference_resize_target(w, h).is_some() {
        "shrunk to at most 1024² pixels and centre-cropped to multiples of 16"
    } else {
        "centre-cropped to multiples of 16"
    };
    reporter.info(&format!(
        "reference {}: {w}×{h} → {pw}×{ph} ({how})",
        reference.name
    ));
}
