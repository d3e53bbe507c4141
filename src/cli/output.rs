//! The output files: their names (from `--output` templates, checked for collisions), and
//! everything about them that can fail cheaply, checked before any work (format, directory,
//! permissions, not overwriting an input).
//!
//! The format rule and the atomic write are the library's (`image_io::OutputFormat`,
//! `image_io::save_image`, `image_io::create_temp_file`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flux2_klein::image_io::{create_temp_file, remove_stale_temp_files, OutputFormat};

use super::jobs::Planned;
use super::progress::Reporter;

/// The placeholders of an `--output` template.
const PLACEHOLDERS: [&str; 2] = ["{seed}", "{index}"];

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
/// (or none) and seed; an error, before any work, when two images would get the same file
/// (compared as the file system resolves them, see [`resolved`]).
pub fn output_paths(images: &[(Option<&Path>, u64)]) -> Result<Vec<PathBuf>> {
    let total = images.len();
    let paths: Vec<PathBuf> = images
        .iter()
        .enumerate()
        .map(|(i, &(template, seed))| output_path(template, seed, i, total))
        .collect();
    let mut seen = std::collections::HashMap::new();
    for (i, p) in paths.iter().enumerate() {
        if let Some(first) = seen.insert(resolved(p), i) {
            if paths[first] != *p {
                bail!(
                    "images {} and {} of {total} would both be written to {}: {} and {} are the \
                     same file — give them different outputs",
                    first + 1,
                    i + 1,
                    resolved(p).display(),
                    paths[first].display(),
                    p.display()
                );
            }
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

/// The output paths of a run's images, in order, after every cheap check of every one of
/// them, before any work: distinct files, a known format, not a directory, a writable
/// directory (probed once per directory), no output that would overwrite one of `inputs`
/// (the reference images). Temp files an earlier, killed run left for these outputs are
/// removed. Warns about unknown `{…}` placeholders, which are kept as written.
pub fn check_outputs(
    images: &[Planned],
    inputs: &[&Path],
    reporter: &mut Reporter,
) -> Result<Vec<PathBuf>> {
    let templates: Vec<(Option<&Path>, u64)> =
        images.iter().map(|im| (im.output, im.seed)).collect();
    for template in templates.iter().filter_map(|t| t.0) {
        if let Some(unknown) = unknown_placeholder(template) {
            reporter.warn(&format!(
                "--output {} has the unknown placeholder {unknown}, written as is (the \
                 placeholders are {{seed}} and {{index}})",
                template.display()
            ));
        }
    }
    let outputs = output_paths(&templates)?;
    let inputs: Vec<(PathBuf, &Path)> = inputs
        .iter()
        .filter_map(|p| Some((p.canonicalize().ok()?, *p)))
        .collect();
    let mut checked_dirs = std::collections::HashSet::new();
    for path in &outputs {
        // The format and kind of every name; the directory probe once per directory.
        OutputFormat::from_path(path)?;
        check_not_directory(path)?;
        if checked_dirs.insert(path.parent().map(Path::to_path_buf)) {
            check_output(path)?;
        }
        for stale in remove_stale_temp_files(path) {
            reporter.info(&format!(
                "removed {}, left by an earlier run that was killed",
                stale.display()
            ));
        }
        if let Ok(out) = path.canonicalize() {
            if let Some((_, input)) = inputs.iter().find(|(p, _)| *p == out) {
                bail!(
                    "output {} is the reference image {} — writing it would replace the \
                     reference; choose another --output",
                    path.display(),
                    input.display()
                );
            }
        }
    }
    Ok(outputs)
}

/// `path` as the file system resolves it, for telling whether two paths name one file
/// (`same.png`, `./same.png`, its absolute path, or a path through a symlinked directory):
/// the canonical path where it exists, else its nearest existing ancestor's canonical path
/// joined with the rest (an output usually does not exist yet).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let mut rest = Vec::new();
    let mut at = path;
    while let Some(name) = at.file_name() {
        rest.push(name.to_os_string());
        at = match at.parent() {
            Some(p) => p,
            None => break,
        };
        let base = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        if let Ok(mut p) = base.canonicalize() {
            p.extend(rest.iter().rev());
            return p;
        }
    }
    path.to_path_buf()
}

/// Creates the missing directories of an output path (as `mkdir -p`), just before its image
/// is written.
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output directory {}", dir.display())),
        _ => Ok(()),
    }
}

/// The first `{…}` in a template that is not a placeholder.
fn unknown_placeholder(template: &Path) -> Option<String> {
    let text = template.to_string_lossy();
    let mut rest = text.as_ref();
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let close = after.find('}')?;
        let candidate = &after[..=close];
        if !PLACEHOLDERS.contains(&candidate) {
            return Some(candidate.to_string());
        }
        rest = &after[close + 1..];
    }
    None
}

/// The checks of one output path that need the file system: the format, not a directory, and
/// we may create files in its directory (or, where that does not exist yet, in its nearest
/// existing ancestor).
pub fn check_output(path: &Path) -> Result<OutputFormat> {
    let format = OutputFormat::from_path(path)?;
    check_not_directory(path)?;
    // The final write goes through this temp file, so its directory is the one to check. A
    // directory that does not exist yet is created when the image is written (`mkdir -p`):
    // until then the nearest existing ancestor is probed, so a failed run leaves nothing.
    let mut probe = path.to_path_buf();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        let existing = dir
            .ancestors()
            .find(|a| a.as_os_str().is_empty() || a.exists())
            .map(|a| {
                if a.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    a
                }
            })
            .unwrap_or(Path::new("."));
        if !existing.is_dir() {
            bail!(
                "cannot create the directory of output {}: {} is not a directory — choose \
                 another --output",
                path.display(),
                existing.display()
            );
        }
        probe = existing.join("probe");
    }
    // Created exclusively, as the real temp file will be: never through a planted link.
    let (file, probe) = create_temp_file(&probe).with_context(|| {
        format!(
            "cannot create files in {} — check its permissions or choose another --output",
            probe.parent().unwrap_or(Path::new(".")).display()
        )
    })?;
    drop(file);
    let _ = std::fs::remove_file(&probe);
    Ok(format)
}

fn check_not_directory(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "output {} is a directory — pass a file name such as {}/image.png",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_names() {
        assert_eq!(
            OutputFormat::from_path(Path::new("a.PNG")).unwrap(),
            OutputFormat::Png
        );
        assert_eq!(
            OutputFormat::from_path(Path::new("a.jpeg")).unwrap(),
            OutputFormat::Jpeg
        );
        assert_eq!(
            OutputFormat::from_path(Path::new("a.webp")).unwrap(),
            OutputFormat::WebP
        );
        let err = OutputFormat::from_path(Path::new("a.gif"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.gif") && err.contains(".png"), "{err}");
        assert!(OutputFormat::from_path(Path::new("a")).is_err());
        assert_eq!(unknown_placeholder(Path::new("{index}-{seed}.png")), None);
        assert_eq!(
            unknown_placeholder(Path::new("{seed}-{foo}.png")).as_deref(),
            Some("{foo}")
        );
        assert_eq!(unknown_placeholder(Path::new("a{b.png")), None);
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
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
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
