//! `flux2-klein compare` (issue #23): alpha is compared when either image has it, and
//! `--diff-image PATH` writes where the images differ, amplified (nothing written when they
//! cannot be compared).

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;

use std::path::Path;

use cli::{assert_error_line, run_in, stderr};
use common::TempDir;

fn rgba(path: &Path, alpha_at_1_1: u8) {
    let mut img = image::RgbaImage::from_pixel(8, 6, image::Rgba([40, 80, 120, 255]));
    img.put_pixel(1, 1, image::Rgba([40, 80, 120, alpha_at_1_1]));
    img.save(path).unwrap();
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn alpha_is_compared() {
    let dir = TempDir::new("compare-alpha");
    rgba(&dir.join("a.png"), 255);
    rgba(&dir.join("b.png"), 254);
    // The colours are the same; only the alpha of one pixel differs.
    let o = run_in(dir.path(), &["compare", "--json", "a.png", "b.png"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["verdict"], "differs");
    assert_eq!(v["max_diff"], 1);
    assert_eq!(v["differing_pixels"], 1);
    assert_eq!(v["alpha_compared"], true);
    let o = run_in(
        dir.path(),
        &["compare", "--max-diff", "1", "a.png", "b.png"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(alpha compared)"));
    // An opaque RGBA image equals its RGB twin.
    image::RgbImage::from_pixel(8, 6, image::Rgb([40, 80, 120]))
        .save(dir.join("rgb.png"))
        .unwrap();
    rgba(&dir.join("opaque.png"), 255);
    let o = run_in(dir.path(), &["compare", "--json", "rgb.png", "opaque.png"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["verdict"], "same");
}

#[test]
fn diff_image_shows_where_they_differ() {
    let dir = TempDir::new("compare-diff");
    rgba(&dir.join("a.png"), 255);
    rgba(&dir.join("b.png"), 250);
    let o = run_in(
        dir.path(),
        &[
            "compare",
            "--json",
            "--diff-image",
            "d.png",
            "a.png",
            "b.png",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(json(&o)["diff_image"], "d.png");
    let d = image::open(dir.join("d.png")).unwrap().to_rgb8();
    assert_eq!(d.dimensions(), (8, 6));
    for (x, y, p) in d.enumerate_pixels() {
        let want = if (x, y) == (1, 1) { 255 } else { 0 };
        assert_eq!(p.0, [want; 3], "pixel {x},{y}");
    }
    // Same images: a black difference image, exit 0.
    let o = run_in(
        dir.path(),
        &["compare", "--diff-image", "same.png", "a.png", "a.png"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let same = image::open(dir.join("same.png")).unwrap().to_rgb8();
    assert!(same.as_raw().iter().all(|&v| v == 0));

    // Trouble writes nothing: another size, a bad name, an input as the output.
    image::RgbImage::new(4, 4)
        .save(dir.join("small.png"))
        .unwrap();
    let o = run_in(
        dir.path(),
        &["compare", "--diff-image", "x.png", "a.png", "small.png"],
    );
    assert!(!stderr(&o).contains("panicked"));
    assert_error_line(&o, 2, &["differ in size"]);
    let o = run_in(
        dir.path(),
        &["compare", "--diff-image", "x.bmp", "a.png", "b.png"],
    );
    assert_error_line(&o, 2, &["x.bmp", ".png"]);
    let o = run_in(
        dir.path(),
        &["compare", "--diff-image", "b.png", "a.png", "b.png"],
    );
    assert_error_line(&o, 2, &["would overwrite the input b.png"]);
    let mut entries = dir.entries();
    entries.retain(|e| e != ".hf-home");
    assert_eq!(
        entries,
        ["a.png", "b.png", "d.png", "same.png", "small.png"]
    );
}
