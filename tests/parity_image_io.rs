//! Image input/output against Pillow and diffusers (spec §4, §6.4).
//!
//! Fixtures: `tests/fixtures/images/` from `reference/image_fixtures.py` (Pillow 13.0.0,
//! diffusers 0.42.1) and the refcheck cases' `ref.{k}.pixels`.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::TempDir;
use flux2_klein::image_io::{
    check_reference_size, load_image, prepare_reference, read_png_text, reference_resize_target,
    resize_lanczos, rgb_to_tensor, save_image, sha256_file, to_rgb_like_pillow,
};
use image::RgbImage;

fn images_dir() -> PathBuf {
    common::fixtures().join("images")
}

fn manifest() -> serde_json::Value {
    let path = images_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {} (run reference/image_fixtures.py): {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn load_rgb(path: &Path) -> RgbImage {
    match load_image(path).unwrap() {
        image::DynamicImage::ImageRgb8(im) => im,
        other => panic!(
            "{}: expected an RGB PNG, got {:?}",
            path.display(),
            other.color()
        ),
    }
}

/// (max |a-b|, mean |a-b|, number of differing bytes)
fn diff_stats(a: &RgbImage, b: &RgbImage) -> (u8, f64, usize) {
    assert_eq!(a.dimensions(), b.dimensions(), "size mismatch");
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0usize);
    for (&x, &y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(y);
        max = max.max(d);
        sum += d as u64;
        n += (d != 0) as usize;
    }
    (max, sum as f64 / a.as_raw().len() as f64, n)
}

#[test]
fn lanczos_equals_pillow() {
    let m = manifest();
    for case in m["lanczos"].as_array().unwrap() {
        let src = load_rgb(&images_dir().join(case["src"].as_str().unwrap()));
        let want = load_rgb(&images_dir().join(case["out"].as_str().unwrap()));
        let size = case["size"].as_array().unwrap();
        let (w, h) = (
            size[0].as_u64().unwrap() as u32,
            size[1].as_u64().unwrap() as u32,
        );
        let ours = resize_lanczos(&src, w, h).unwrap();
        let (max, mean, n) = diff_stats(&ours, &want);
        eprintln!(
            "LANCZOS {}x{} -> {w}x{h}: max diff {max}, mean {mean:.4}, {n} bytes differ",
            src.width(),
            src.height()
        );
        assert_eq!(max, 0, "LANCZOS {w}x{h} differs from Pillow");
    }
}

#[test]
fn resize_target_matches_spec_worked_example() {
    // Spec §4: 1500×1000 → 1254×836 → crop 1248×832; 605×807 is left alone.
    assert_eq!(reference_resize_target(1500, 1000), Some((1254, 836)));
    assert_eq!(reference_resize_target(605, 807), None);
    assert_eq!(reference_resize_target(1024, 1024), None);
    assert_eq!(reference_resize_target(1025, 1024), Some((1024, 1023)));
}

#[test]
fn large_references_equal_diffusers_preprocessing() {
    let m = manifest();
    let large = m["large"].as_array().unwrap();
    assert_eq!(large.len(), 3);
    for case in large {
        let src_path = images_dir().join(case["src"].as_str().unwrap());
        let img = load_image(&src_path).unwrap();
        let ours = prepare_reference(&img).unwrap();
        let want = load_rgb(&images_dir().join(case["prepared"].as_str().unwrap()));
        let (max, mean, n) = diff_stats(&ours, &want);
        eprintln!(
            "{} ({}, {:?}) -> {:?}: max diff {max}, mean {mean:.5}, {n} bytes differ",
            case["src"],
            case["src_mode"],
            (img.width(), img.height()),
            ours.dimensions()
        );
        assert_eq!(
            max, 0,
            "{}: prepared pixels differ from diffusers",
            case["src"]
        );
    }
}

#[test]
fn refcheck_reference_pixels_are_exact() {
    for (case, refs) in [("edit2_64x64", 2), ("tiny2_edit_64x128", 1)] {
        let tensors = common::case_tensors(case);
        for k in 0..refs {
            let want = &tensors[&format!("ref.{k}.pixels")];
            assert_eq!(want.dtype(), DType::F32);
            let img = load_image(common::case_dir(case).join(format!("ref_{k}.png"))).unwrap();
            let ours = rgb_to_tensor(&prepare_reference(&img).unwrap(), &Device::Cpu).unwrap();
            assert_eq!(ours.dims(), want.dims(), "{case} ref {k}: shape");
            let d = (ours - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            eprintln!(
                "{case} ref.{k}.pixels {:?}: max abs diff {d:e}",
                want.dims()
            );
            assert_eq!(d, 0.0, "{case} ref.{k}.pixels differ");
        }
    }
}

#[test]
fn rgb_to_tensor_is_division_then_affine() {
    // Every byte value: x/255 (true f32 division) then 2x-1, in [1,3,h,w] order.
    let data: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
    let img = RgbImage::from_raw(16, 16, data).unwrap();
    let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 16, 16]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let want = 2.0f32 * (px[c] as f32 / 255.0f32) - 1.0f32;
            assert_eq!(v[c * 256 + i].to_bits(), want.to_bits());
        }
    }
    assert_eq!(v[0], -1.0);
    // 255/255 = 1 exactly, so the max is exactly 1.
    let max = t
        .max_keepdim(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert_eq!(max.to_scalar::<f32>().unwrap(), 1.0);
    // The reciprocal-multiply form differs for some bytes: show the division matters.
    let differs = (0..=255u32).any(|x| (x as f32 / 255.0f32) != (x as f32 * (1.0f32 / 255.0f32)));
    assert!(differs);
}

#[test]
fn png_modes_convert_like_pillow() {
    let m = manifest();
    for case in m["modes"].as_array().unwrap() {
        let src = images_dir().join(case["src"].as_str().unwrap());
        let img = load_image(&src).unwrap();
        let ours = to_rgb_like_pillow(&img).unwrap();
        let want = load_rgb(&images_dir().join(case["rgb"].as_str().unwrap()));
        let (max, mean, _) = diff_stats(&ours, &want);
        eprintln!(
            "{} (Pillow mode {}, decoded as {:?}): max diff {max}, mean {mean:.4}",
            case["src"],
            case["pil_mode"],
            img.color()
        );
        assert_eq!(
            max, 0,
            "{}: convert(\"RGB\") differs from Pillow",
            case["src"]
        );
    }
}

#[test]
fn jpeg_decode_equals_pillow() {
    // libjpeg-turbo's decoder (mozjpeg) with Pillow's settings: identical bytes for baseline
    // 4:4:4, 4:2:0 and progressive files (image's zune-jpeg was up to 4 levels off).
    let m = manifest();
    for case in m["jpeg"].as_array().unwrap() {
        let jpg = images_dir().join(case["jpg"].as_str().unwrap());
        let ours = to_rgb_like_pillow(&load_image(&jpg).unwrap()).unwrap();
        let want = load_rgb(&images_dir().join(case["pillow"].as_str().unwrap()));
        let (max, mean, n) = diff_stats(&ours, &want);
        eprintln!(
            "JPEG {}: max |ours - Pillow| = {max}, mean = {mean:.4}, {n} of {} bytes differ",
            case["jpg"],
            ours.as_raw().len()
        );
        assert_eq!(ours, want, "{}: not Pillow's pixels", case["jpg"]);
    }
}

#[test]
fn load_image_like_diffusers() {
    // diffusers.utils.load_image: EXIF orientation applied (1, 3, 6, 8 and the transpose 5),
    // then convert("RGB"); and a grayscale JPEG.
    let m = manifest();
    let cases = m["load_image"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let src = images_dir().join(case["src"].as_str().unwrap());
        let ours = to_rgb_like_pillow(&load_image(&src).unwrap()).unwrap();
        let want = load_rgb(&images_dir().join(case["expected"].as_str().unwrap()));
        assert_eq!(
            ours.dimensions(),
            want.dimensions(),
            "{}: orientation",
            case["src"]
        );
        assert_eq!(ours, want, "{}: pixels", case["src"]);
    }
}

#[test]
fn reference_size_rules() {
    let e = check_reference_size(40, 56).unwrap_err().to_string();
    eprintln!("40x56: {e}");
    assert!(e.contains("40×56") && e.contains("64"), "{e}");
    let e = check_reference_size(64, 600).unwrap_err().to_string();
    eprintln!("64x600: {e}");
    assert!(
        e.contains("64×600") && e.contains("9.4") && e.contains("8:1"),
        "{e}"
    );
    check_reference_size(64, 512).unwrap(); // exactly 8:1 is allowed
    check_reference_size(64, 64).unwrap();
    assert!(check_reference_size(63, 100).is_err());
    assert!(check_reference_size(64, 513).is_err());
    // prepare_reference applies the same check.
    let small = image::DynamicImage::ImageRgb8(RgbImage::new(40, 56));
    assert!(prepare_reference(&small).is_err());
}

#[test]
fn load_errors_name_the_file() {
    let dir = TempDir::new("load");
    let missing = dir.join("nope.png");
    let e = format!("{:#}", load_image(&missing).unwrap_err());
    assert!(e.contains("nope.png") && !e.contains('\n'), "{e}");
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"this is not an image").unwrap();
    let e = format!("{:#}", load_image(&junk).unwrap_err());
    eprintln!("{e}");
    assert!(e.contains("junk.png") && !e.contains('\n'), "{e}");
    let truncated = dir.join("truncated.png");
    let bytes = std::fs::read(common::case_dir("edit2_64x64").join("ref_0.png")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", load_image(&truncated).unwrap_err());
    eprintln!("{e}");
    assert!(e.contains("truncated.png") && !e.contains('\n'), "{e}");
}

#[test]
fn save_png_metadata_round_trip() {
    let dir = TempDir::new("save");
    let img = load_rgb(&images_dir().join("lanczos_61x47.png"));
    let meta = vec![
        ("prompt".to_string(), "a cat, 4 steps".to_string()),
        ("seed".to_string(), "42".to_string()),
        ("Comment".to_string(), "Zürich".to_string()),
        ("note".to_string(), "ünïcödé → ok ✓".to_string()),
    ];
    let path = dir.join("out.png");
    save_image(&path, &img, &meta).unwrap();
    assert_eq!(load_rgb(&path), img);
    let mut got = read_png_text(&path).unwrap();
    let mut want = meta.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Overwriting goes through the same temp+rename.
    save_image(&path, &img, &[]).unwrap();
    assert!(read_png_text(&path).unwrap().is_empty());
    // WebP is lossless; JPEG decodes to the right size.
    save_image(dir.join("out.webp"), &img, &meta).unwrap();
    assert_eq!(
        to_rgb_like_pillow(&load_image(dir.join("out.webp")).unwrap()).unwrap(),
        img
    );
    save_image(dir.join("out.JPG"), &img, &meta).unwrap();
    let jpg = to_rgb_like_pillow(&load_image(dir.join("out.JPG")).unwrap()).unwrap();
    assert_eq!(jpg.dimensions(), img.dimensions());
    // Only the final files are left (no temp files).
    assert_eq!(dir.entries(), ["out.JPG", "out.png", "out.webp"]);
}

#[test]
fn unsupported_extension_writes_nothing() {
    let dir = TempDir::new("atomic");
    let img = RgbImage::new(64, 64);
    for name in ["out.bmp", "out"] {
        let e = save_image(dir.join(name), &img, &[])
            .unwrap_err()
            .to_string();
        eprintln!("{e}");
        assert!(e.contains(".png") && e.contains(".webp"), "{e}");
    }
    let e = save_image(dir.join("out.tiff"), &img, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'tiff'"), "{e}");
    // An invalid PNG keyword fails while encoding, before anything is written.
    let bad = vec![(String::new(), "x".to_string())];
    assert!(save_image(dir.join("bad.png"), &img, &bad).is_err());
    // Writing into a folder that does not exist fails cleanly too.
    assert!(save_image(dir.join("no/such/dir/x.png"), &img, &[]).is_err());
    assert_eq!(dir.entries(), Vec::<String>::new(), "files left behind");
}

#[test]
fn sha256_of_file() {
    let dir = TempDir::new("sha");
    let p = dir.join("abc.txt");
    std::fs::write(&p, b"abc").unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(sha256_file(dir.join("missing"))
        .unwrap_err()
        .to_string()
        .contains("missing"));
}
