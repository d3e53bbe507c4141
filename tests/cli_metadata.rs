//! The settings an image carries (issue #23): `--config-from-metadata` remakes the same pixels
//! (recorded model, dtype, VAE dtype and tiling re-applied, recorded paths found next to the
//! image, a warning on another dtype), reads the text without decoding the pixels (also after
//! the image data, with a cap on inflated text), JPEG and WebP outputs carry the same settings
//! as PNG (`--jpeg-quality`), and `flux2-klein info` prints them with control characters
//! escaped. Runs the tiny model (64×64, 2 steps).

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;

use std::path::Path;
use std::process::Output;

use cli::{assert_error_line, command_in, stderr};
use common::TempDir;

fn tiny() -> String {
    common::model("tiny-w0").display().to_string()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    command_in(dir, args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_error(o: &Output, code: i32, needles: &[&str]) -> String {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    assert_error_line(o, code, needles)
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// Largest channel difference of two images of the same size.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

/// A tiny-model image in `dir` (cwd `dir`), with `extra` options.
fn make(dir: &Path, out: &str, extra: &[&str]) {
    let tiny = tiny();
    let mut args = vec![
        "generate",
        "-q",
        "-m",
        &tiny,
        "-p",
        "a red fox",
        "--seed",
        "5",
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "2",
        "-o",
        out,
    ];
    args.extend_from_slice(extra);
    ok(&run(dir, &args));
}

#[test]
fn config_from_metadata_reapplies_model_dtype_and_tiling() {
    let tmp = TempDir::new("meta-remake");
    let made = tmp.join("made");
    std::fs::create_dir(&made).unwrap();
    let extra = ["--dtype", "bf16", "--vae-dtype", "f32", "--vae-tile", "2"];
    make(&made, "orig.png", &extra);
    // The settings matter: without them the image is another one.
    make(&made, "plain.png", &[]);
    let orig = rgb(&made.join("orig.png"));
    let plain = rgb(&made.join("plain.png"));
    assert!(
        max_diff(&orig, &plain) > 8,
        "dtype + tiling must change the image"
    );
    make(
        &made,
        "untiled.png",
        &["--dtype", "bf16", "--vae-dtype", "f32"],
    );
    assert!(
        max_diff(&orig, &rgb(&made.join("untiled.png"))) > 0,
        "the VAE tiling must change the image"
    );

    // From another directory, without -m: the recorded model and every setting.
    let o = run(
        tmp.path(),
        &[
            "generate",
            "--config-from-metadata",
            "made/orig.png",
            "-o",
            "again.png",
        ],
    );
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert_eq!(
        max_diff(&orig, &rgb(&tmp.join("again.png"))),
        0,
        "same pixels"
    );
    let text = flux2_klein::image_io::read_png_text(tmp.join("again.png")).unwrap();
    for (k, v) in [("dtype", "bf16"), ("vae_dtype", "f32"), ("vae_tile", "2")] {
        assert!(
            text.contains(&(k.into(), v.into())),
            "{k} recorded: {text:?}"
        );
    }

    // A flag wins, with a warning that the pixels will differ.
    let o = run(
        tmp.path(),
        &[
            "generate",
            "--config-from-metadata",
            "made/orig.png",
            "--dtype",
            "f32",
            "-o",
            "f32.png",
        ],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("was made on cpu in bf16; this run uses cpu in f32"),
        "{}",
        stderr(&o)
    );
    assert!(max_diff(&orig, &rgb(&tmp.join("f32.png"))) > 0);
}

#[test]
fn recorded_reference_paths_are_found_next_to_the_image() {
    let tmp = TempDir::new("meta-refs");
    let made = tmp.join("made");
    std::fs::create_dir(&made).unwrap();
    let reference =
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    reference.save(made.join("ref.png")).unwrap();
    make(&made, "orig.png", &["-r", "ref.png"]);
    make(&made, "noref.png", &[]);
    let orig = rgb(&made.join("orig.png"));
    assert!(
        max_diff(&orig, &rgb(&made.join("noref.png"))) > 8,
        "the reference matters"
    );
    let tiny = tiny();
    let o = run(
        tmp.path(),
        &[
            "generate",
            "--config-from-metadata",
            "made/orig.png",
            "-m",
            &tiny,
            "-o",
            "again.png",
        ],
    );
    ok(&o);
    assert!(!stderr(&o).contains("missing"), "{}", stderr(&o));
    assert_eq!(max_diff(&orig, &rgb(&tmp.join("again.png"))), 0);
}

#[test]
fn jpeg_and_webp_carry_the_settings() {
    let tmp = TempDir::new("meta-jpeg");
    make(tmp.path(), "a.png", &[]);
    make(tmp.path(), "a.webp", &[]);
    make(tmp.path(), "q95.jpg", &[]);
    make(tmp.path(), "q30.jpg", &["--jpeg-quality", "30"]);
    let png = ok(&run(tmp.path(), &["info", "--json", "a.png"]));
    for name in ["a.webp", "q95.jpg"] {
        let info = ok(&run(tmp.path(), &["info", "--json", name]));
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let p: serde_json::Value = serde_json::from_str(&png).unwrap();
        assert_eq!(v, p, "{name} records what the PNG records");
        assert_eq!(v["prompt"], "a red fox");
        assert_eq!(v["seed"], "5");
    }
    // The quality is applied: a lower one is a smaller, more different file.
    let size = |n: &str| std::fs::metadata(tmp.join(n)).unwrap().len();
    assert!(size("q30.jpg") < size("q95.jpg"));
    let exact = rgb(&tmp.join("a.png"));
    assert!(
        max_diff(&exact, &rgb(&tmp.join("q30.jpg"))) > max_diff(&exact, &rgb(&tmp.join("q95.jpg")))
    );
    // A JPEG remakes its image (the pixels are the PNG's; the JPEG is lossy).
    let o = run(
        tmp.path(),
        &[
            "generate",
            "--config-from-metadata",
            "a.webp",
            "-o",
            "b.png",
        ],
    );
    ok(&o);
    assert_eq!(max_diff(&exact, &rgb(&tmp.join("b.png"))), 0);
    let o = run(
        tmp.path(),
        &["generate", "-p", "x", "--jpeg-quality", "0", "-o", "x.jpg"],
    );
    assert_error(&o, 2, &["--jpeg-quality", "1..=100"]);
    let text = ok(&run(tmp.path(), &["info", "q30.jpg"]));
    assert!(text.starts_with("prompt: a red fox\nseed: 5\n"), "{text}");
}

#[test]
fn settings_too_long_for_a_jpeg_are_left_out_with_a_warning() {
    let tmp = TempDir::new("meta-long");
    let long = "fox ".repeat(10_000);
    let tiny = tiny();
    let o = run(
        tmp.path(),
        &[
            "generate", "-m", &tiny, "-p", &long, "-W", "64", "-H", "64", "--steps", "1", "-o",
            "long.jpg",
        ],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("do not fit a JPEG's EXIF segment"),
        "{}",
        stderr(&o)
    );
    let o = run(tmp.path(), &["info", "long.jpg"]);
    assert_error(&o, 1, &["long.jpg", "records no settings"]);
}

/// A PNG: signature, IHDR claiming `w`×`h`, then `chunks` (type, data) and IEND.
fn png_bytes(w: u32, h: u32, chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let all = [(b"IHDR", ihdr)]
        .into_iter()
        .chain(chunks.iter().map(|(t, d)| (*t, d.clone())))
        .chain([(b"IEND", vec![])]);
    for (kind, data) in all {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(&data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out
}

fn zlib(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec_zlib(data, 9)
}

#[test]
fn text_is_read_without_decoding_the_pixels() {
    let tmp = TempDir::new("meta-chunks");
    // 60000×60000 claimed, garbage image data, the settings after it (zTXt and iTXt).
    let mut ztxt = b"prompt\0\0".to_vec();
    ztxt.extend(zlib(b"after the pixels"));
    let mut itxt = b"model\0\x01\0\0\0".to_vec();
    itxt.extend(zlib("\u{1b}]0;pwned\u{7}\u{1b}[2J".as_bytes()));
    let forged = png_bytes(
        60000,
        60000,
        &[(b"IDAT", vec![1, 2, 3]), (b"zTXt", ztxt), (b"iTXt", itxt)],
    );
    std::fs::write(tmp.join("after.png"), forged).unwrap();
    let text = ok(&run(tmp.path(), &["info", "after.png"]));
    assert!(text.contains("prompt: after the pixels"), "{text}");
    assert!(text.contains("model: \\x1b]0;pwned\\x07\\x1b[2J"), "{text}");
    assert!(!text.contains('\u{1b}'), "no raw escape on the terminal");
    // --config-from-metadata reads the prompt and goes on to the model (which is missing).
    let o = run(
        tmp.path(),
        &[
            "generate",
            "--config-from-metadata",
            "after.png",
            "-m",
            "./nope",
            "-o",
            "x.png",
        ],
    );
    assert_error(&o, 1, &["./nope", "does not exist"]);

    // A zTXt bomb: 64 MiB of text in a few KB.
    let mut bomb = b"prompt\0\0".to_vec();
    bomb.extend(zlib(&vec![b'a'; 64 << 20]));
    std::fs::write(tmp.join("bomb.png"), png_bytes(64, 64, &[(b"zTXt", bomb)])).unwrap();
    for args in [
        &["info", "bomb.png"][..],
        &[
            "generate",
            "--config-from-metadata",
            "bomb.png",
            "-m",
            "./nope",
        ],
    ] {
        let o = run(tmp.path(), args);
        assert_error(&o, 1, &["bomb.png", "inflates to more than 1024 KiB"]);
    }
    let o = run(tmp.path(), &["info", "nowhere.png"]);
    assert_error(&o, 1, &["nowhere.png"]);
    cli::write_png(&tmp.join("plain.png"), 64, 64);
    let o = run(tmp.path(), &["info", "plain.png"]);
    assert_error(&o, 1, &["plain.png", "records no settings"]);
    std::fs::write(tmp.join("text.txt"), "hello").unwrap();
    let o = run(tmp.path(), &["info", "text.txt"]);
    assert_error(&o, 1, &["text.txt", "not a PNG, JPEG or WebP"]);
}
