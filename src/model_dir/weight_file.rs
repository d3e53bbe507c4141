//! A safetensors file checked before it is memory-mapped: the header parses, every tensor's
//! bytes lie inside the file and match its shape, and its dtype is one the models compute with.
//! candle would map integer tensors and convert them to floats without a word (a checkpoint of
//! I64 or U8 weights "loads" and makes noise), and F8 weights without their scales would be read
//! as if unscaled.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The largest header read (real headers are a few hundred KB).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// What a checked file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFileSummary {
    pub tensors: usize,
    /// Bytes of tensor data.
    pub data_bytes: u64,
}

#[derive(Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Checks the safetensors file at `path` (its header and the offsets against its size).
pub fn check_weight_file(path: &Path) -> Result<WeightFileSummary> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a safetensors file (shorter than its header) — download it again",
            path.display()
        )
    })?;
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_HEADER_BYTES || header_len > len - 8 {
        bail!(
            "{} is not a safetensors file or is truncated: its header claims {header_len} bytes \
             of a {len}-byte file — download it again",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .with_context(|| format!("cannot read the header of {}", path.display()))?;
    check_header(&header, len - 8 - header_len)
        .with_context(|| format!("{} is not a usable weight file", path.display()))
}

/// Checks a safetensors header (the JSON after the length) for a data section of
/// `data_len` bytes.
pub fn check_header(header: &[u8], data_len: u64) -> Result<WeightFileSummary> {
    let text = std::str::from_utf8(header).context("its header is not UTF-8")?;
    let mut map: HashMap<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("its header is not valid: {e}"))?;
    map.remove("__metadata__");
    let mut tensors: Vec<(String, TensorInfo)> = Vec::with_capacity(map.len());
    for (name, value) in map {
        let info: TensorInfo =
            serde_json::from_value(value).map_err(|e| anyhow::anyhow!("tensor {name:?}: {e}"))?;
        tensors.push((name, info));
    }
    let names: std::collections::HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut data_bytes = 0u64;
    for (name, info) in &tensors {
        let Some(elem) = element_bytes(&info.dtype) else {
            bail!("tensor {name:?} has the unknown dtype {:?}", info.dtype);
        };
        let (start, end) = info.data_offsets;
        let count = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|c| c.checked_mul(elem));
        if start > end || end > data_len || count != Some(end - start) {
            bail!(
                "tensor {name:?} ({} {:?}) lies at bytes {start}..{end} of a {data_len}-byte data \
                 section — the file is truncated or damaged; download it again",
                info.dtype,
                info.shape
            );
        }
        data_bytes += end - start;
        check_dtype(name, &info.dtype, &names)?;
    }
    Ok(WeightFileSummary {
        tensors: tensors.len(),
        data_bytes,
    })
}

/// Bytes per element of a safetensors dtype.
fn element_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Floats are weights; integers and bools are not (except BatchNorm's step counter, which
/// diffusers' VAE checkpoints carry and nothing reads); F8 needs its `weight_scale`.
fn check_dtype(name: &str, dtype: &str, names: &std::collections::HashSet<&str>) -> Result<()> {
    match dtype {
        "F16" | "BF16" | "F32" | "F64" => Ok(()),
        "F8_E4M3" | "F8_E5M2" => {
            let stem = name.strip_suffix(".weight").unwrap_or(name);
            if names.contains(format!("{stem}.weight_scale").as_str()) {
                Ok(())
            } else {
                bail!(
                    "tensor {name:?} is {dtype} without a {stem}.weight_scale: fp8 weights need \
                     their scales — use the bf16 checkpoint"
                )
            }
        }
        _ if name.ends_with("num_batches_tracked") => Ok(()),
        _ => bail!(
            "tensor {name:?} has the dtype {dtype}, which is not a weight dtype (F32, F16, BF16, \
             or F8 with scales) — this is not a checkpoint this program can run"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(entries: &str) -> Vec<u8> {
        format!("{{{entries}}}").into_bytes()
    }

    #[test]
    fn dtypes_and_offsets() {
        let ok = header(
            r#""a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"__metadata__":{"x":"y"}"#,
        );
        assert_eq!(
            check_header(&ok, 12).unwrap(),
            WeightFileSummary {
                tensors: 1,
                data_bytes: 12
            }
        );
        assert!(check_header(&ok, 11).is_err());
        let int = header(r#""a.weight":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}"#);
        let err = check_header(&int, 8).unwrap_err().to_string();
        assert!(err.contains("I64"), "{err}");
        let bn =
            header(r#""bn.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[0,8]}"#);
        check_header(&bn, 8).unwrap();
        let f8 = header(r#""l.weight":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}"#);
        assert!(check_header(&f8, 2)
            .unwrap_err()
            .to_string()
            .contains("weight_scale"));
        let f8s = header(
            r#""l.weight":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]},"l.weight_scale":{"dtype":"F32","shape":[],"data_offsets":[2,6]}"#,
        );
        check_header(&f8s, 6).unwrap();
        let overflow =
            header(r#""a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}"#);
        assert!(check_header(&overflow, 0).is_err());
        assert!(check_header(b"not json", 0).is_err());
    }
}
