//! A seeded mutation run over the parsers of untrusted input (issue #23): image headers, image
//! metadata (PNG text chunks, JPEG/WebP EXIF), model configs, safetensors headers and shard
//! names in the library; prompt-file lines and output templates through the binary (they are
//! CLI code). Every input must give a value or an error — never a panic, an abort or a huge
//! allocation. Deterministic (fixed seeds) and fast: a few seconds in all.

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::TempDir;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutations of `seed_input`, `n` of them: bit flips, byte overwrites with boundary values,
/// truncation, duplicated or deleted runs, and 32-bit fields set to extremes.
fn mutations(seed_input: &[u8], n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut v = seed_input.to_vec();
        for _ in 0..rng.random_range(1..=4) {
            if v.is_empty() {
                v.push(rng.random());
                continue;
            }
            let at = rng.random_range(0..v.len());
            match rng.random_range(0..6) {
                0 => v[at] ^= 1 << rng.random_range(0..8),
                1 => v[at] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
                2 => v.truncate(at),
                3 => {
                    let end = (at + rng.random_range(1..64)).min(v.len());
                    let run = v[at..end].to_vec();
                    v.splice(at..at, run);
                }
                4 => {
                    let end = (at + rng.random_range(1..64)).min(v.len());
                    v.drain(at..end);
                }
                _ => {
                    let value: u32 =
                        [0, 1, 0x7fff_ffff, 0xffff_ffff, 60000][rng.random_range(0..5)];
                    let end = (at + 4).min(v.len());
                    let bytes = value.to_be_bytes();
                    v[at..end].copy_from_slice(&bytes[..end - at]);
                }
            }
        }
        out.push(v);
    }
    out
}

/// Runs `f` on every input; a panic fails with the input's index.
fn never_panics(what: &str, inputs: &[Vec<u8>], mut f: impl FnMut(&[u8])) {
    for (i, input) in inputs.iter().enumerate() {
        let r = catch_unwind(AssertUnwindSafe(|| f(input)));
        assert!(
            r.is_ok(),
            "{what}: input #{i} ({} bytes) panicked",
            input.len()
        );
    }
}

fn encoded(format: &str) -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
    let dir = TempDir::new(&format!("fuzz-seed-{format}"));
    let path = dir.join(format!("seed.{format}"));
    let meta = vec![
        ("prompt".to_string(), "un café ☕".to_string()),
        ("seed".to_string(), "42".to_string()),
        ("size".to_string(), "24x16".to_string()),
    ];
    flux2_klein::image_io::save_image(&path, &img, &meta).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn image_decoders_and_metadata_readers() {
    let dir = TempDir::new("fuzz-images");
    let path = dir.join("input");
    for (i, format) in ["png", "jpg", "webp"].into_iter().enumerate() {
        let inputs = mutations(&encoded(format), 150, 1 + i as u64);
        never_panics(&format!("{format} metadata"), &inputs, |b| {
            let _ = flux2_klein::image_io::read_metadata(b);
            let _ = flux2_klein::image_io::png_text_chunks(b);
        });
        never_panics(&format!("{format} decode"), &inputs[..60], |b| {
            std::fs::write(&path, b).unwrap();
            if let Ok(img) = flux2_klein::image_io::load_image(&path) {
                assert!(img.width() <= flux2_klein::limits::MAX_DECODE_SIDE);
            }
        });
    }
    let exif = flux2_klein::image_io::exif_with_settings(&[("prompt".into(), "x".into())]);
    never_panics("exif", &mutations(&exif, 300, 9), |b| {
        let _ = flux2_klein::image_io::settings_of_exif(b);
    });
}

#[test]
fn configs() {
    let dir = TempDir::new("fuzz-configs");
    let model = common::model("tiny-w0");
    let mut rng = StdRng::seed_from_u64(11);
    let extremes = [
        "0",
        "-1",
        "1e300",
        "4294967297",
        "1e11",
        "null",
        "[]",
        "\"x\"",
        "0.5",
        "NaN",
    ];
    for file in [
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let text = std::fs::read_to_string(model.join(file)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        let mut inputs: Vec<Vec<u8>> = mutations(text.as_bytes(), 40, rng.random());
        for _ in 0..80 {
            let mut v = value.clone();
            let obj = v.as_object_mut().unwrap();
            for _ in 0..rng.random_range(1..=3) {
                let key = &keys[rng.random_range(0..keys.len())];
                if rng.random_range(0..5) == 0 {
                    obj.remove(key);
                } else {
                    let e = extremes[rng.random_range(0..extremes.len())];
                    let parsed = serde_json::from_str(e).unwrap_or(serde_json::Value::Null);
                    obj.insert(key.clone(), parsed);
                }
            }
            inputs.push(v.to_string().into_bytes());
        }
        let path = dir.join("config.json");
        never_panics(file, &inputs, |b| {
            std::fs::write(&path, b).unwrap();
            use flux2_klein::model_dir::read_config;
            let _ = match file {
                "transformer/config.json" => {
                    read_config::<flux2_klein::transformer::Flux2TransformerConfig>(&path).map(drop)
                }
                "vae/config.json" => {
                    read_config::<flux2_klein::vae::AutoencoderKLFlux2Config>(&path).map(drop)
                }
                "text_encoder/config.json" => {
                    read_config::<flux2_klein::text_encoder::qwen3::Qwen3Config>(&path).map(drop)
                }
                _ => read_config::<flux2_klein::scheduler::SchedulerConfig>(&path).map(drop),
            };
        });
    }
}

#[test]
fn safetensors_headers_and_shard_names() {
    let header = br#"{"a.weight":{"dtype":"BF16","shape":[4,4],"data_offsets":[0,32]},"b.weight_scale":{"dtype":"F32","shape":[],"data_offsets":[32,36]},"__metadata__":{"format":"pt"}}"#;
    never_panics("safetensors header", &mutations(header, 400, 21), |b| {
        let _ = flux2_klein::model_dir::check_weight_header(b, 36);
    });
    let dir = TempDir::new("fuzz-weights");
    let path = dir.join("w.safetensors");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 36]);
    never_panics("safetensors file", &mutations(&file, 200, 22), |b| {
        std::fs::write(&path, b).unwrap();
        let _ = flux2_klein::model_dir::check_weight_file(&path);
    });
    let mut rng = StdRng::seed_from_u64(23);
    let parts = [
        "..",
        ".",
        "/",
        "\\",
        "model",
        ".safetensors",
        "\0",
        "-00001",
        "C:",
        "~",
        "%2e",
    ];
    for _ in 0..500 {
        let name: String = (0..rng.random_range(0..6))
            .map(|_| parts[rng.random_range(0..parts.len())])
            .collect();
        let ok = flux2_klein::model_dir::check_shard_name(&name).is_ok();
        if ok {
            let plain = !name.contains('/') && !name.contains('\\') && !name.contains('\0');
            assert!(plain && name.ends_with(".safetensors"), "{name:?} accepted");
        }
    }
}

/// Runs the binary on `args` in `dir`: any exit but a crash (a panic is exit 101, an abort a
/// signal) and at most one `error:` line.
fn binary_survives(dir: &Path, args: &[&str], input: &str) {
    let o = cli::run_in(dir, args);
    let err = cli::stderr(&o);
    assert!(
        matches!(o.status.code(), Some(0..=2)),
        "{input:?}: exit {:?}\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{input:?}: {err}");
    assert!(err.matches("error: ").count() <= 1, "{input:?}: {err}");
}

#[test]
fn prompt_file_lines_and_output_templates() {
    let dir = TempDir::new("fuzz-cli");
    let lines = [
        r#"{"prompt": "a fox", "seed": 7, "width": 64, "height": 64, "ref": ["r.png"], "output": "o-{index}.png", "steps": 4, "guidance": 1.0}"#,
        "\u{feff}# comment\na plain prompt\n\n{\"prompt\": \"x\"}",
    ];
    let mut n = 0;
    for (i, line) in lines.iter().enumerate() {
        for m in mutations(line.as_bytes(), 25, 31 + i as u64) {
            std::fs::write(dir.join("p.txt"), &m).unwrap();
            let shown = String::from_utf8_lossy(&m).into_owned();
            binary_survives(
                dir.path(),
                &["generate", "-q", "--prompt-file", "p.txt", "-m", "./nope"],
                &shown,
            );
            n += 1;
        }
    }
    let template = "out/{index}-{seed}.png";
    for m in mutations(template.as_bytes(), 25, 41) {
        let Ok(t) = String::from_utf8(m) else {
            continue;
        };
        if t.contains('\0') || t.is_empty() {
            continue;
        }
        binary_survives(
            dir.path(),
            &[
                "generate", "-q", "-p", "x", "-n", "2", "-o", &t, "-m", "./nope",
            ],
            &t,
        );
        n += 1;
    }
    assert!(n > 50);
    // Nothing was written by any of them.
    let mut entries = dir.entries();
    entries.retain(|e| e != ".hf-home" && e != "p.txt");
    assert!(entries.is_empty() || entries == ["out"], "{entries:?}");
}

#[test]
fn shard_indices_through_fetch() {
    let dir = TempDir::new("fuzz-index");
    let model = dir.join("m");
    let weights = {
        let header = br#"{"a.weight":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header);
        v.extend_from_slice(&[0; 4]);
        v
    };
    for (name, bytes) in [
        (
            "model_index.json",
            br#"{"_class_name": "Flux2KleinPipeline"}"#.to_vec(),
        ),
        ("scheduler/scheduler_config.json", b"{}".to_vec()),
        ("text_encoder/config.json", b"{}".to_vec()),
        ("transformer/config.json", b"{}".to_vec()),
        ("vae/config.json", b"{}".to_vec()),
        ("tokenizer/tokenizer.json", b"{}".to_vec()),
        ("text_encoder/model.safetensors", weights.clone()),
        ("vae/diffusion_pytorch_model.safetensors", weights.clone()),
        ("transformer/shard-1.safetensors", weights),
    ] {
        let p = model.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let index = br#"{"metadata": {"total_size": 4}, "weight_map": {"a.weight": "shard-1.safetensors", "b.weight": "shard-1.safetensors"}}"#;
    let path = model.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    let mut accepted = 0;
    for m in mutations(index, 30, 51) {
        std::fs::write(&path, &m).unwrap();
        let shown = String::from_utf8_lossy(&m).into_owned();
        let o = cli::run_in(dir.path(), &["fetch", "-q", "-m", "m"]);
        let err = cli::stderr(&o);
        assert!(matches!(o.status.code(), Some(0..=1)), "{shown}: {err}");
        assert!(!err.contains("panicked"), "{shown}: {err}");
        accepted += (o.status.code() == Some(0)) as usize;
    }
    // Some mutations keep the index valid; most break it.
    assert!(accepted < 30, "every mutation was accepted");
}
