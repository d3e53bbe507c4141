//! `flux2-klein compare EXPECTED ACTUAL`: the golden-image check for CI jobs. One line (or
//! one JSON record, whatever happens) on stdout; exit 0 when the images are the same or within
//! tolerance, 1 (with an `error:` line) when they differ, 2 when they cannot be compared (a
//! missing or unreadable file, not an image, another size), as `cmp` and `diff` do. When
//! either image has an alpha channel, alpha is compared too; `--diff-image PATH` writes where
//! they differ, amplified.

use std::fmt;

use anyhow::Result;
use flux2_klein::image_io::{compare_pixels, diff_image, load_image, save_image, ImageDiff};

use super::args::CompareArgs;
use super::common::print_stdout;

/// A comparison that could not be made (exit status 2); the message is the error's line.
#[derive(Debug)]
pub struct Trouble(String);

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Trouble {}

fn trouble(err: &anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Trouble(super::error_line(err)))
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let (d, alpha) = match measure(args) {
        Ok(d) => d,
        Err(e) => {
            let e = trouble(&e);
            if args.json {
                let record = serde_json::json!({
                    "expected": args.expected.display().to_string(),
                    "actual": args.actual.display().to_string(),
                    "verdict": "error",
                    "message": e.to_string(),
                    "pass": false,
                });
                // The error line on stderr says what went wrong; stdout may be gone too.
                let _ = print_stdout(&(record.to_string() + "\n"));
            }
            return Err(e);
        }
    };
    let psnr = if d.psnr.is_finite() {
        format!("{:.2}", d.psnr)
    } else {
        "inf".to_string()
    };
    let max_diff_ok = d.max <= args.max_diff;
    let psnr_ok = args.min_psnr.is_none_or(|min| d.psnr >= min);
    let summary = format!(
        "max diff {} mean diff {:.4} PSNR {psnr} dB, {} pixels differ{}",
        d.max,
        d.mean,
        d.differing_pixels,
        if alpha { " (alpha compared)" } else { "" }
    );
    let failure = if !max_diff_ok {
        Some(format!(
            "{} differs from {}: max channel difference {} > {} — regenerate the golden image \
             or raise --max-diff",
            args.actual.display(),
            args.expected.display(),
            d.max,
            args.max_diff
        ))
    } else {
        args.min_psnr.filter(|_| !psnr_ok).map(|min| {
            format!(
                "{} differs from {}: PSNR {psnr} dB < {min} dB",
                args.actual.display(),
                args.expected.display()
            )
        })
    };
    let verdict = match (&failure, d.max) {
        (Some(_), _) => "differs",
        (None, 0) => "same",
        (None, _) => "within",
    };
    let line = if args.json {
        serde_json::json!({
            "expected": args.expected.display().to_string(),
            "actual": args.actual.display().to_string(),
            "verdict": verdict,
            "message": failure.as_deref().unwrap_or(&summary),
            "max_diff": d.max,
            "mean_diff": d.mean,
            "psnr_db": d.psnr.is_finite().then_some(d.psnr),
            "differing_pixels": d.differing_pixels,
            "pass": failure.is_none(),
            "allowed_max_diff": args.max_diff,
            "min_psnr_db": args.min_psnr,
            "alpha_compared": alpha,
            "diff_image": args.diff_image.as_ref().map(|p| p.display().to_string()),
        })
        .to_string()
    } else {
        summary
    };
    print_stdout(&(line + "\n")).map_err(|e| trouble(&e))?;
    match failure {
        Some(msg) => Err(anyhow::anyhow!(msg)),
        None => Ok(()),
    }
}

/// Both images decoded (within the decoder limits) and compared, with their alpha when
/// either has one (an image without alpha is opaque); the difference image written when
/// asked. Returns the difference and whether alpha was compared.
fn measure(args: &CompareArgs) -> Result<(ImageDiff, bool)> {
    if let Some(path) = &args.diff_image {
        // Before any decoding: a name that cannot be written is trouble, not a verdict.
        flux2_klein::image_io::OutputFormat::from_path(path)?;
        for input in [&args.expected, &args.actual] {
            if std::fs::canonicalize(input).ok() == std::fs::canonicalize(path).ok()
                && path.exists()
            {
                anyhow::bail!(
                    "--diff-image {} would overwrite the input {} — choose another name",
                    path.display(),
                    input.display()
                );
            }
        }
    }
    let expected = load_image(&args.expected)?;
    let actual = load_image(&args.actual)?;
    let alpha = expected.color().has_alpha() || actual.color().has_alpha();
    let (a, b, channels) = if alpha {
        (
            expected.to_rgba8().into_raw(),
            actual.to_rgba8().into_raw(),
            4,
        )
    } else {
        (
            expected.to_rgb8().into_raw(),
            actual.to_rgb8().into_raw(),
            3,
        )
    };
    let size = (expected.width(), expected.height());
    let d = compare_pixels(size, &a, (actual.width(), actual.height()), &b, channels)?;
    if let Some(path) = &args.diff_image {
        let img = diff_image(size, &a, &b, channels)?;
        save_image(path, &img, &[])?;
    }
    Ok((d, alpha))
}
