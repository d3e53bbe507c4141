//! `flux2-klein info IMAGE [--json]`: the settings recorded in an image flux2-klein wrote (PNG
//! text chunks, JPEG/WebP EXIF), read without decoding its pixels. Text: one `key: value` line
//! each (continuation lines indented), control characters escaped so that a hostile file cannot
//! drive the terminal; `--json`: one object of the keys and their text values.

use anyhow::{bail, Result};

use flux2_klein::text::escape_control;

use super::args::InfoArgs;
use super::common::print_stdout;
use super::metadata::{read_settings, Recorded};

pub fn run(args: &InfoArgs) -> Result<()> {
    let mut settings = read_settings(&args.image, "info")?;
    if settings.is_empty() {
        bail!(
            "{} records no settings (only images written by flux2-klein do)",
            escape_control(&args.image.display().to_string())
        );
    }
    // The schema's order (as written to PNGs), then any other keys as found.
    let order: Vec<String> = Recorded {
        prompt: String::new(),
        ..full_schema()
    }
    .to_text_chunks()
    .into_iter()
    .map(|(k, _)| k)
    .collect();
    settings.sort_by_key(|(k, _)| order.iter().position(|o| o == k).unwrap_or(order.len()));
    let out = if args.json {
        let map: serde_json::Map<String, serde_json::Value> = settings
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        // serde_json escapes control characters itself.
        serde_json::Value::Object(map).to_string() + "\n"
    } else {
        settings
            .iter()
            .map(|(k, v)| {
                let lines: Vec<String> = v
                    .split('\n')
                    .map(|l| escape_control(l).into_owned())
                    .collect();
                format!("{}: {}\n", escape_control(k), lines.join("\n  "))
            })
            .collect()
    };
    print_stdout(&out)
}

/// Every field set, for the key order.
fn full_schema() -> Recorded {
    let s = || Some(String::new());
    Recorded {
        negative_prompt: s(),
        seed: Some(0),
        steps: Some(0),
        guidance: Some(0.0),
        size: Some((0, 0)),
        model: s(),
        revision: s(),
        references: vec![String::new()],
        references_sha256: vec![String::new()],
        init_image: s(),
        init_image_sha256: s(),
        mask: s(),
        mask_sha256: s(),
        strength: Some(0.0),
        padding_mask_crop: Some(0),
        device: s(),
        dtype: s(),
        vae_dtype: s(),
        vae_tile: Some(1),
        software: s(),
        ..Recorded::default()
    }
}
