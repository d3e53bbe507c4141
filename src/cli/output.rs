//! The output file: its format (from the extension, checked before any work), its default
//! name, and an atomic write (temp file in the same directory, then rename) so that a failed
//! or interrupted run never leaves a partial image behind.
//!
//! The write itself is `flux2_klein::image_io::save_image` (atomic, PNG text metadata).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Image formats we write, chosen by the output file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lossless, with the generation parameters as text chunks.
    Png,
    /// Quality 95, no metadata.
    Jpeg,
    /// Lossless WebP (the only WebP encoder in `image` 0.25), no metadata.
    WebP,
}

impl Format {
    /// The format for a path's extension (case-insensitive), or an error naming it.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("jpg") | Some("jpeg") => Ok(Format::Jpeg),
            Some("webp") => Ok(Format::WebP),
            Some(other) => bail!(
                "unsupported output extension .{other} in {} — use .png, .jpg, .jpeg or .webp",
                path.display()
            ),
            None => bail!(
                "output path {} has no extension — end it in .png, .jpg, .jpeg or .webp",
                path.display()
            ),
        }
    }
}

/// The output path of image `index` (0-based) of `total`: `--output` with `{seed}` and
/// `{index}` (1-based, zero-padded to the width of `total`) replaced, or the default name
/// (`flux2-klein-{seed}.png`, in batches `flux2-klein-{index}-{seed}.png`).
pub fn output_path(arg: Option<&Path>, seed: u64, index: usize, total: usize) -> PathBuf {
    let default = if total > 1 {
        "flux2-klein-{index}-{seed}.png"
    } else {
        "flux2-klein-{seed}.png"
    };
    let width = total.max(1).to_string().len();
    let fill = |s: &str| {
        s.replace("{seed}", &seed.to_string())
            .replace("{index}", &format!("{:0width$}", index + 1))
    };
    match arg {
        Some(p) => match p.to_str() {
            Some(s) => PathBuf::from(fill(s)),
            None => p.to_path_buf(),
        },
        None => PathBuf::from(fill(default)),
    }
}

/// The output paths of a run, one per image in order, from each image's `--output` template
/// (or none) and seed; an error, before any work, when two images would get the same file.
pub fn output_paths(images: &[(Option<&Path>, u64)]) -> Result<Vec<PathBuf>> {
    let total = images.len();
    let paths: Vec<PathBuf> = images
        .iter()
        .enumerate()
        .map(|(i, &(template, seed))| output_path(template, seed, i, total))
        .collect();
    let mut seen = std::collections::HashMap::new();
    for (i, p) in paths.iter().enumerate() {
        if let Some(first) = seen.insert(p, i) {
            let template = images[i]
                .0
                .or(images[first].0)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            bail!(
                "output {template} gives the same file ({}) to images {} and {} of {total} — put \
                 {{index}} in it, e.g. --output out-{{index}}.png",
                p.display(),
                first + 1,
                i + 1
            );
        }
    }
    Ok(paths)
}

/// Everything about the output that can fail cheaply, checked before the model loads: the
/// format, that the directory exists and that we may create files in it.
pub fn check_output(path: &Path) -> Result<Format> {
    let format = Format::from_path(path)?;
    if path.is_dir() {
        bail!(
            "output {} is a directory — pass a file name such as {}/image.png",
            path.display(),
            path.display()
        );
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!(
            "output directory {} does not exist — create it first (mkdir -p {})",
            dir.display(),
            dir.display()
        );
    }
    // Probe that the directory is writable, with the same temp name the final write uses.
    let probe = temp_path(path);
    File::create(&probe).with_context(|| {
        format!(
            "cannot create files in {} — check its permissions or choose another --output",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(format)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `dir/.name.tmp-<pid>`: hidden, in the same directory (so the rename is atomic), unique per
/// process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    parent_dir(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_names() {
        assert_eq!(Format::from_path(Path::new("a.PNG")).unwrap(), Format::Png);
        assert_eq!(
            Format::from_path(Path::new("a.jpeg")).unwrap(),
            Format::Jpeg
        );
        assert_eq!(
            Format::from_path(Path::new("a.webp")).unwrap(),
            Format::WebP
        );
        let err = Format::from_path(Path::new("a.gif"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(".gif"), "{err}");
        assert!(Format::from_path(Path::new("a")).is_err());
        assert_eq!(
            output_path(None, 7, 0, 1),
            PathBuf::from("flux2-klein-7.png")
        );
        assert_eq!(
            output_path(Some(Path::new("out/x-{seed}.jpg")), 3, 0, 1),
            PathBuf::from("out/x-3.jpg")
        );
        assert_eq!(
            output_path(None, 7, 2, 12),
            PathBuf::from("flux2-klein-03-7.png")
        );
        assert_eq!(
            output_path(Some(Path::new("b/{index}.png")), 7, 9, 10),
            PathBuf::from("b/10.png")
        );
        // Batches need names that differ.
        let seeded = Some(Path::new("x-{seed}.png"));
        assert!(output_paths(&[(seeded, 5), (seeded, 5)]).is_err());
        let fixed = Some(Path::new("x.png"));
        let err = output_paths(&[(fixed, 1), (fixed, 2)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("{index}") && err.contains("images 1 and 2"),
            "{err}"
        );
        assert_eq!(
            output_paths(&[(seeded, 1), (seeded, 2)]).unwrap(),
            vec![PathBuf::from("x-1.png"), PathBuf::from("x-2.png")]
        );
        assert_eq!(output_paths(&[(None, 5), (None, 5)]).unwrap().len(), 2);
        // Per-image templates (prompt-file lines) may differ.
        assert_eq!(
            output_paths(&[(fixed, 5), (Some(Path::new("y.png")), 5)]).unwrap(),
            vec![PathBuf::from("x.png"), PathBuf::from("y.png")]
        );
    }

    use flux2_klein::image_io::save_image;
    use image::RgbImage;

    #[test]
    fn png_round_trip_with_text_chunks() {
        let dir = std::env::temp_dir().join(format!("flux2-klein-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let meta = vec![
            ("prompt".to_string(), "un café ☕".to_string()),
            ("seed".to_string(), "42".to_string()),
        ];
        check_output(&path).unwrap();
        save_image(&path, &img, &meta).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        let dec = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.uncompressed_latin1_text[0].text, "42");
        assert_eq!(info.utf8_text[0].get_text().unwrap(), "un café ☕");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        for name in ["t.jpg", "t.JPEG", "t.webp"] {
            let path = dir.join(name);
            save_image(&path, &img, &meta).unwrap();
            let back = image::open(&path).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), img.dimensions(), "{name}");
            if name.ends_with("webp") {
                assert_eq!(back, img, "lossless WebP");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
