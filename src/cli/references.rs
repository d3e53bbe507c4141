//! `--ref` images: decoded and checked (diffusers' `check_image_input`: both sides ≥ 64 px,
//! aspect ratio ≤ 8, spec §4) before any model loads, so a bad file fails in milliseconds.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use flux2_klein::image_io::load_image;
use flux2_klein::pipeline::Reference;

use super::args::MIN_SIDE;

/// The number of references FLUX.2 [klein] was trained with; more still run.
pub const TRAINED_MAX_REFS: usize = 4;

/// Largest allowed max(w/h, h/w) (diffusers' `check_image_input`).
const MAX_ASPECT: f64 = 8.0;

/// Decodes and validates every reference, in order.
pub fn load_references(paths: &[PathBuf]) -> Result<Vec<Reference>> {
    paths.iter().map(|p| load_reference(p)).collect()
}

/// Decodes and validates one reference.
pub fn load_reference(path: &Path) -> Result<Reference> {
    let name = path.display().to_string();
    if !path.exists() {
        bail!("reference image {name} does not exist — check the path given to --ref");
    }
    if path.is_dir() {
        bail!("reference {name} is a directory — pass an image file to --ref");
    }
    // The library's decoder: content sniffing (a mis-named file still decodes, as in PIL),
    // Pillow's JPEG pixels, the EXIF orientation applied as diffusers' `load_image` does.
    let image = match load_image(path) {
        Ok(img) => img,
        Err(e) => {
            let detail = e.root_cause().to_string();
            bail!("cannot decode reference image {name} ({detail}) — use a PNG, JPEG or WebP file")
        }
    };
    let (w, h) = (image.width(), image.height());
    if w < MIN_SIDE || h < MIN_SIDE {
        bail!(
            "reference image {name} is {w}×{h} px, too small — both sides must be at least \
             {MIN_SIDE} px; upscale it first"
        );
    }
    let aspect = (w as f64 / h as f64).max(h as f64 / w as f64);
    if aspect > MAX_ASPECT {
        bail!(
            "reference image {name} is {w}×{h} px (aspect ratio {aspect:.1}:1), too elongated — \
             at most {MAX_ASPECT}:1 is supported; crop it first"
        );
    }
    Ok(Reference {
        image: std::sync::Arc::new(image),
        name,
    })
}
