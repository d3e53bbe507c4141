//! The output files: their names (from `--output` templates, checked for collisions), and
//! everything about them that can fail cheaply, checked before any work (format, directory,
//! permissions, not overwriting an input).
//!
//! The format rule and the atomic write are the library's (`image_io::OutputFormat`,
//! `image_io::save_image`, `image_io::create_temp_file`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flux2_klein::image_io::{create_temp_file, remove_stale_temp_files, OutputFormat};

use super::jobs::Planned;
use super::progress::Reporter;

/// The placeholders of an `--output` template.
const PLACEHOLDERS: [&str; 2] = ["{seed}", "{index}"];

/// The default output name of a single image.
const SINGLE_DEFAULT: &str = "flux2-klein-{seed}.png";
/// The default output name of the images of a batch.
const BATCH_DEFAULT: &str = "flux2-klein-{index}-{seed}.png";

/// The output path of image `index` (0-based) of `total`: `--output` with `{seed}` and
/// `{index}` (1-based, zero-padded to the width of `total`) replaced, or the default name
/// (`flux2-klein-{seed}.png`, in batches `flux2-klein-{index}-{seed}.png`).
pub fn output_path(arg: Option<&Path>, seed: u64, index: usize, total: usize) -> PathBuf {
    let default = if total > 1 {
        BATCH_DEFAULT
    } else {
        SINGLE_DEFAULT
    };
    filled(arg, default, seed, index, total.max(1).to_string().len())
}

/// The output path of image `index` (0-based) of a run whose total is not known (prompts
/// streamed from stdin): `{index}` not zero-padded, and the batch's default name.
pub fn streamed_output_path(arg: Option<&Path>, seed: u64, index: usize) -> PathBuf {
    filled(arg, BATCH_DEFAULT, seed, index, 1)
}

/// `arg` (else `default`) with its placeholders replaced, `{index}` 1-based and zero-padded
/// to `width` digits.
fn filled(arg: Option<&Path>, default: &str, seed: u64, index: usize, width: usize) -> PathBuf {
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
/// (compared as the file system resolves them, see [`resolved`]). Unknown `{…}`
/// placeholders, kept as written, are `warn`ed about.
pub fn output_paths(
    images: &[(Option<&Path>, u64)],
    warn: &mut dyn FnMut(&str),
) -> Result<Vec<PathBuf>> {
    let total = images.len();
    let mut names = OutputNames::default();
    images
        .iter()
        .enumerate()
        .map(|(i, &(template, seed))| {
            let path = output_path(template, seed, i, total);
            let inserted = names.insert(i, &path, template, Some(total));
            names.take_warnings().iter().for_each(|w| warn(w));
            inserted.map(|()| path)
        })
        .collect()
}

/// The output files of a run so far, for telling, image by image, when two would be one
/// file (a stream of prompts is checked as it comes).
#[derive(Default)]
pub struct OutputNames {
    /// By the file as the file system resolves it: the first image's 0-based index, its
    /// path and its template.
    seen: HashMap<PathBuf, (usize, PathBuf, Option<PathBuf>)>,
    /// The templates seen (each warned about once).
    templates: HashSet<PathBuf>,
    /// Warnings not yet reported ([`OutputNames::take_warnings`]).
    warnings: Vec<String>,
}

impl OutputNames {
    /// Adds image `index`'s `path`, made from `template` (`None`: the default name), of a run
    /// of `total` images (`None`: not known); an error when an earlier image has that file.
    /// The first time a template comes, warns about unknown `{…}` placeholders in it (kept
    /// as written).
    pub fn insert(
        &mut self,
        index: usize,
        path: &Path,
        template: Option<&Path>,
        total: Option<usize>,
    ) -> Result<()> {
        if let Some(t) = template {
            if self.templates.insert(t.to_path_buf()) {
                if let Some(unknown) = unknown_placeholder(t) {
                    self.warnings.push(format!(
                        "--output {} has the unknown placeholder {unknown}, written as is (the \
                         placeholders are {{seed}} and {{index}})",
                        t.display()
                    ));
                }
            }
        }
        let of_total = total.map(|t| format!(" of {t}")).unwrap_or_default();
        let file = resolved(path);
        if let Some((first, first_path, first_template)) = self.seen.get(&file) {
            if first_path != path {
                bail!(
                    "images {} and {}{of_total} would both be written to {}: {} and {} are the \
                     same file — give them different outputs",
                    first + 1,
                    index + 1,
                    file.display(),
                    first_path.display(),
                    path.display()
                );
            }
            let template = template
                .or(first_template.as_deref())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            bail!(
                "output {template} gives the same file ({}) to images {} and {}{of_total} — put \
                 {{index}} in it, e.g. --output out-{{index}}.png",
                path.display(),
                first + 1,
                index + 1
            );
        }
        self.seen.insert(
            file,
            (index, path.to_path_buf(), template.map(Path::to_path_buf)),
        );
        Ok(())
    }

    /// The warnings about templates gathered since the last call.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

/// The output paths of a run's images, in order (distinct files, see [`output_paths`]),
/// warning about unknown `{…}` placeholders, which are kept as written.
pub fn plan_outputs(images: &[Planned], reporter: &mut Reporter) -> Result<Vec<PathBuf>> {
    let templates: Vec<(Option<&Path>, u64)> =
        images.iter().map(|im| (im.output, im.seed)).collect();
    output_paths(&templates, &mut |w| reporter.warn(w))
}

/// Every cheap check of the outputs a run will write, before any work: a known format, not a
/// directory, a writable directory (probed once per directory), no output that would
/// overwrite one of `inputs` (the reference and init images). Temp files an earlier, killed
/// run left for these outputs are removed.
pub fn check_written(outputs: &[&Path], inputs: &[&Path], reporter: &mut Reporter) -> Result<()> {
    let inputs: Vec<(PathBuf, &Path)> = inputs
        .iter()
        .filter_map(|p| Some((p.canonicalize().ok()?, *p)))
        .collect();
    let mut checked_dirs = HashSet::new();
    for &path in outputs {
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
    Ok(())
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
        assert!(output_paths(&[(seeded, 5), (seeded, 5)], &mut |_| {}).is_err());
        let fixed = Some(Path::new("x.png"));
        let err = output_paths(&[(fixed, 1), (fixed, 2)], &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("{index}") && err.contains("images 1 and 2"),
            "{err}"
        );
        assert_eq!(
            output_paths(&[(seeded, 1), (seeded, 2)], &mut |_| {}).unwrap(),
            vec![PathBuf::from("x-1.png"), PathBuf::from("x-2.png")]
        );
        assert_eq!(
            output_paths(&[(None, 5), (None, 5)], &mut |_| {})
                .unwrap()
                .len(),
            2
        );
        // A stream's names: the total is not known.
        assert_eq!(
            streamed_output_path(None, 7, 11),
            PathBuf::from("flux2-klein-12-7.png")
        );
        assert_eq!(
            streamed_output_path(Some(Path::new("o/{index}.png")), 7, 0),
            PathBuf::from("o/1.png")
        );
        let mut names = OutputNames::default();
        names.insert(0, Path::new("s-1.png"), seeded, None).unwrap();
        names.insert(1, Path::new("s-2.png"), seeded, None).unwrap();
        let err = names
            .insert(2, Path::new("./s-1.png"), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("images 1 and 3 would both"), "{err}");
        let odd = Some(Path::new("{nope}-{index}.png"));
        names.insert(3, Path::new("a.png"), odd, None).unwrap();
        names.insert(4, Path::new("b.png"), odd, None).unwrap();
        let warnings = names.take_warnings();
        assert_eq!(warnings.len(), 1, "once per template: {warnings:?}");
        assert!(warnings[0].contains("{nope}"), "{warnings:?}");
        // Per-image templates (prompt-file lines) may differ.
        assert_eq!(
            output_paths(&[(fixed, 5), (Some(Path::new("y.png")), 5)], &mut |_| {}).unwrap(),
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
