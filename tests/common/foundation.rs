//! Helpers of the bit-exact foundation parity tests (`parity_scheduler`, `parity_noise`,
//! `parity_latents`, `parity_cases`): the fixtures of `tests/fixtures/foundation/` (written by
//! `reference/foundation_fixtures.py`) and bit-level comparisons of tensors.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// `tests/fixtures/foundation/NAME` (`scheduler.json`, `noise.json`, `bn.json`).
pub fn foundation_json(name: &str) -> Value {
    let path = super::fixtures().join("foundation").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (run reference/foundation_fixtures.py with the refenv python)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of u32s (the fixtures store every f32 as its bit pattern).
pub fn u32s(v: &Value) -> Vec<u32> {
    super::json_uints(v)
}

/// Bit patterns of f32 values.
pub fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Bit patterns of a float tensor (bf16/f16 are widened to f32 exactly).
pub fn tensor_bits(t: &Tensor) -> Vec<u32> {
    f32_bits(
        &t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    )
}

/// Asserts two tensors have the same shape, dtype and bits.
pub fn assert_bits_eq(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    assert_eq!(ours.dtype(), reference.dtype(), "{name}: dtype");
    let (a, b) = (tensor_bits(ours), tensor_bits(reference));
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        diff,
        0,
        "{name}: {diff} of {} values differ (max rel err {:.3e})",
        a.len(),
        super::max_rel_err(ours, reference)
    );
    eprintln!("{name}: bit-exact ({} values, {:?})", a.len(), ours.dtype());
}

/// Asserts two position-id tensors (`[.., 4]` i64) are equal.
pub fn assert_ids_eq(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    assert_eq!(ours.dtype(), DType::I64, "{name}: dtype");
    let a = ours.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let b = reference.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(a, b, "{name}: ids differ");
    eprintln!("{name}: equal ({} rows)", a.len() / 4);
}

/// torch's `std` for a model/dtype from bn.json (torch's CPU f32 `sqrt` is not correctly
/// rounded, so tests that want bit-exact batch-norm use these values).
pub fn torch_std(model: &str, dtype: DType) -> Tensor {
    let fx = foundation_json("bn.json");
    let dname = if dtype == DType::BF16 { "bf16" } else { "f32" };
    let e = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["model"] == model && e["dtype"] == dname)
        .unwrap();
    let v: Vec<f32> = u32s(&e["std_bits"])
        .into_iter()
        .map(f32::from_bits)
        .collect();
    Tensor::new(v.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}
