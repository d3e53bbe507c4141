//! The layout of BFL's `flux-2-klein-4b-fp8.safetensors` (spec-wave2 §2.2: 309 tensors, the
//! names, dtypes and shapes), written as a zero-weight file: the header, the scales (1.0,
//! they must be positive), and a sparse hole where the 4 GB of weights would be. Included
//! with `#[path = "common/fp8_layout.rs"] mod fp8_layout;`.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// One tensor of the layout: name, safetensors dtype, shape.
pub type Entry = (String, &'static str, Vec<usize>);

/// The 309 tensors of `flux-2-klein-4b-fp8.safetensors`, and the stems stored as fp8.
pub fn klein_4b_fp8_layout() -> (Vec<Entry>, Vec<String>) {
    const D: usize = 3072;
    let mut t: Vec<Entry> = Vec::new();
    let mut stems = Vec::new();
    let bf16 = |t: &mut Vec<Entry>, n: &str, s: &[usize]| t.push((n.into(), "BF16", s.to_vec()));
    bf16(&mut t, "img_in.weight", &[D, 128]);
    bf16(&mut t, "txt_in.weight", &[D, 7680]);
    bf16(&mut t, "time_in.in_layer.weight", &[D, 256]);
    bf16(&mut t, "time_in.out_layer.weight", &[D, D]);
    bf16(
        &mut t,
        "double_stream_modulation_img.lin.weight",
        &[6 * D, D],
    );
    bf16(
        &mut t,
        "double_stream_modulation_txt.lin.weight",
        &[6 * D, D],
    );
    bf16(&mut t, "single_stream_modulation.lin.weight", &[3 * D, D]);
    bf16(&mut t, "final_layer.adaLN_modulation.1.weight", &[2 * D, D]);
    bf16(&mut t, "final_layer.linear.weight", &[128, D]);
    let mut fp8 = |t: &mut Vec<Entry>, stem: String, s: &[usize]| {
        t.push((format!("{stem}.weight"), "F8_E4M3", s.to_vec()));
        t.push((format!("{stem}.weight_scale"), "F32", vec![]));
        t.push((format!("{stem}.input_scale"), "F32", vec![]));
        stems.push(stem);
    };
    for i in 0..5 {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            fp8(&mut t, format!("{p}_attn.qkv"), &[3 * D, D]);
            fp8(&mut t, format!("{p}_attn.proj"), &[D, D]);
            fp8(&mut t, format!("{p}_mlp.0"), &[6 * D, D]);
            fp8(&mut t, format!("{p}_mlp.2"), &[D, 3 * D]);
            bf16(&mut t, &format!("{p}_attn.norm.query_norm.scale"), &[128]);
            bf16(&mut t, &format!("{p}_attn.norm.key_norm.scale"), &[128]);
        }
    }
    for i in 0..20 {
        let p = format!("single_blocks.{i}");
        fp8(&mut t, format!("{p}.linear1"), &[3 * D + 6 * D, D]);
        fp8(&mut t, format!("{p}.linear2"), &[D, D + 3 * D]);
        bf16(&mut t, &format!("{p}.norm.query_norm.scale"), &[128]);
        bf16(&mut t, &format!("{p}.norm.key_norm.scale"), &[128]);
    }
    (t, stems)
}

fn dtype_bytes(dtype: &str) -> usize {
    match dtype {
        "F8_E4M3" | "F8_E5M2" | "U8" => 1,
        "BF16" | "F16" => 2,
        _ => 4,
    }
}

/// Writes `entries` as a safetensors file at `path` with `metadata`: F32 scalars hold 1.0, all
/// else is a sparse zero region (`set_len`, nothing written). Returns the file's size.
pub fn write_zero_weight_file(
    path: &Path,
    entries: &[Entry],
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> u64 {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::Value::Object(metadata.clone()),
    );
    let mut offset = 0usize;
    let mut scalars = Vec::new();
    for (name, dtype, shape) in entries {
        let len = shape.iter().product::<usize>() * dtype_bytes(dtype);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        if *dtype == "F32" && shape.is_empty() {
            scalars.push(offset);
        }
        offset += len;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let data_start = 8 + text.len() as u64;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len(data_start + offset as u64).unwrap();
    for at in scalars {
        f.seek(SeekFrom::Start(data_start + at as u64)).unwrap();
        f.write_all(&1.0f32.to_le_bytes()).unwrap();
    }
    data_start + offset as u64
}

/// The official file's `__metadata__`: `_quantization_metadata` listing the fp8 stems.
pub fn bfl_quantization_metadata(stems: &[String]) -> serde_json::Map<String, serde_json::Value> {
    let layers: serde_json::Map<String, serde_json::Value> = stems
        .iter()
        .map(|s| (s.clone(), serde_json::json!({"format": "float8_e4m3fn"})))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert(
        "_quantization_metadata".into(),
        serde_json::Value::String(serde_json::json!({ "layers": layers }).to_string()),
    );
    m
}
