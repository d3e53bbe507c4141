//! `flux2-klein compare EXPECTED ACTUAL`: the golden-image check for CI jobs. One line (or
//! JSON) on stdout; exit 0 when within tolerance, 1 (with an `error:` line) otherwise.

use anyhow::{bail, Result};
use flux2_klein::image_io::{compare_images, load_image};

use super::args::CompareArgs;
use super::common::print_stdout;

pub fn run(args: &CompareArgs) -> Result<()> {
    let expected = load_image(&args.expected)?.to_rgb8();
    let actual = load_image(&args.actual)?.to_rgb8();
    let d = compare_images(&expected, &actual)?;
    let psnr = if d.psnr.is_finite() {
        format!("{:.2}", d.psnr)
    } else {
        "inf".to_string()
    };
    let max_diff_ok = d.max <= args.max_diff;
    let psnr_ok = args.min_psnr.is_none_or(|min| d.psnr >= min);
    let line = if args.json {
        serde_json::json!({
            "expected": args.expected.display().to_string(),
            "actual": args.actual.display().to_string(),
            "max_diff": d.max,
            "mean_diff": d.mean,
            "psnr_db": d.psnr.is_finite().then_some(d.psnr),
            "differing_pixels": d.differing_pixels,
            "pass": max_diff_ok && psnr_ok,
            "allowed_max_diff": args.max_diff,
            "min_psnr_db": args.min_psnr,
        })
        .to_string()
    } else {
        format!(
            "max diff {} mean diff {:.4} PSNR {psnr} dB, {} pixels differ",
            d.max, d.mean, d.differing_pixels
        )
    };
    print_stdout(&(line + "\n"))?;
    if !max_diff_ok {
        bail!(
            "{} differs from {}: max channel difference {} > {} — regenerate the golden image \
             or raise --max-diff",
            args.actual.display(),
            args.expected.display(),
            d.max,
            args.max_diff
        );
    }
    if let Some(min) = args.min_psnr.filter(|_| !psnr_ok) {
        bail!(
            "{} differs from {}: PSNR {psnr} dB < {min} dB",
            args.actual.display(),
            args.expected.display()
        );
    }
    Ok(())
}
